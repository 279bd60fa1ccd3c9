//! `locus bench`: benchmark programs that print measured figures. Not tests: timings depend on the
//! machine, so they are reported, not asserted.
//!
//! `locus bench writes` starts one region on a scratch database and measures PUT throughput and
//! latency over HTTP with N concurrent clients, next to a raw sqlx upsert of the same row shape at
//! the same concurrency, in the same run and on the same database server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use sqlx::migrate::MigrateDatabase;
use tokio::net::TcpListener;

use crate::config::{Config, Limits};
use crate::service::{Precondition, Route, WriteOp, WriteOutcome, WriteRequest};

/// The PostgreSQL and NATS a benchmark runs against.
#[derive(Debug, clap::Args)]
pub struct Servers {
    /// PostgreSQL server URL (no database); scratch databases are created and dropped.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
    /// NATS with JetStream; scratch streams are created and deleted.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
}

#[derive(Debug, clap::Args)]
pub struct WritesArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Concurrent clients; several values run one after the other (e.g. 8,32).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub clients: Vec<usize>,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Distinct keys each client cycles through (so most writes are updates).
    #[arg(long, default_value_t = 200)]
    pub keys_per_client: usize,
}

#[derive(Debug, clap::Args)]
pub struct ReplicationArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Seconds of the maximum-rate and of the lag phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Events the late region has to catch up on.
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Records the backlog's events write, each updated again and again; 0: a new record per event.
    /// A new region's copy brings one state per record, however many events made it.
    #[arg(long, default_value_t = 0)]
    pub backlog_keys: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
}

#[derive(Debug, clap::Args)]
pub struct ResolversArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// The resolver module measured (build it with `cargo build --release --target
    /// wasm32-unknown-unknown --target-dir target/resolvers -p locus-resolver-cart`).
    #[arg(
        long,
        default_value = "target/resolvers/wasm32-unknown-unknown/release/locus_resolver_cart.wasm"
    )]
    pub module: std::path::PathBuf,
    /// Calls timed one by one.
    #[arg(long, default_value_t = 20_000)]
    pub calls: usize,
    /// Conflicting records resolved in the region phase.
    #[arg(long, default_value_t = 20_000)]
    pub conflicts: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Home-region write throughput and latency vs a raw sqlx upsert. Point --nats at a closed
    /// port to measure the write path without the publisher's share of the machine.
    Writes(WritesArgs),
    /// Replication lag at half the maximum write rate, and the catch-up rate of a late region.
    Replication(ReplicationArgs),
    /// Per-call overhead of a resolver, and conflicts resolved per second in one region.
    Resolvers(ResolversArgs),
    /// Anti-entropy: comparing two regions in sync, and repairing one that misses records.
    Repair(RepairArgs),
    /// A new region's first copy from a peer: unthrottled, then throttled under write load.
    Bootstrap(BootstrapArgs),
    /// Write rate and replication lag between two regions with plain connections, then with TLS on
    /// every hop (HTTPS, PostgreSQL verify-full, NATS with TLS both ways and per-region users).
    Tls(TlsArgs),
    /// The geo-aware client across delay proxies that stand in for distance: write latency through
    /// the client, directly at the home and through a fixed non-home region; read latency with
    /// every region well and with one region slow.
    Client(ClientArgs),
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// One-way delay between regions, and between the client and a far region.
    #[arg(long, default_value_t = 30)]
    pub far_ms: u64,
    /// One-way delay between the client and its near region (eu).
    #[arg(long, default_value_t = 2)]
    pub near_ms: u64,
    /// One-way delay of the region made slow in the last phase (ap).
    #[arg(long, default_value_t = 200)]
    pub slow_ms: u64,
}

#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    /// PostgreSQL server URL (no database), by the name its certificate holds.
    #[arg(long, default_value = "postgres://postgres@localhost:5432")]
    pub postgres: String,
    /// libpq TLS settings of the TLS phase (this machine's PostgreSQL serves Debian's snakeoil
    /// certificate for localhost).
    #[arg(
        long,
        default_value = "sslmode=verify-full&sslrootcert=/etc/ssl/certs/ssl-cert-snakeoil.pem"
    )]
    pub postgres_tls: String,
    /// The script that makes the certificates of the TLS phase.
    #[arg(long, default_value = "deploy/make-certs.sh")]
    pub certs_script: std::path::PathBuf,
    /// Seconds of the maximum-rate and of the lag phase, in each mode.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Records the existing region holds.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: usize,
    /// `repair.max_records_per_sec` of the second new region, copied while the peer takes writes.
    #[arg(long, default_value_t = 5_000)]
    pub throttle: u64,
}

#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Records each region holds.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: usize,
    /// Share of the records one region misses, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub missing_percent: f64,
    /// Rounds that repair the missing share with the machine to themselves, one after another
    /// (the share is removed again before each): their spread shows the run's noise.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Writes(args) => writes(args).await,
        BenchCommand::Replication(args) => replication(args).await,
        BenchCommand::Resolvers(args) => resolvers(args).await,
        BenchCommand::Repair(args) => repair(args).await,
        BenchCommand::Bootstrap(args) => bootstrap(args).await,
        BenchCommand::Tls(args) => tls(args).await,
        BenchCommand::Client(args) => client(args).await,
    }
}

/// Latencies of one phase, in microseconds.
struct Figures {
    ops: usize,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Figures {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index] as f64 / 1000.0
    }

    fn line(&self, name: &str) -> String {
        format!(
            "{name:<28} {:>9.0} writes/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} writes)",
            self.throughput(),
            self.percentile(0.50),
            self.percentile(0.99),
            self.ops
        )
    }
}

/// PUT `sample_value(client, n)` to `key` of `collection` at the region at `url`; anything but a
/// 2xx is an error.
async fn put_sample(
    http: &reqwest::Client,
    url: &str,
    collection: &str,
    key: &str,
    (client, n): (usize, usize),
) -> anyhow::Result<()> {
    let response = http
        .put(format!("{url}/v1/collections/{collection}/records/{key}"))
        .json(&sample_value(client, n))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "PUT answered {}",
        response.status()
    );
    Ok(())
}

fn sample_value(client: usize, n: usize) -> serde_json::Value {
    json!({
        "name": format!("client {client} item {n}"),
        "n": n,
        "tags": ["alpha", "beta", "gamma"],
        "address": {"street": "1 Long Road", "city": "Somewhere", "zip": "12345"},
        "active": true,
    })
}

/// Run `clients` tasks for `seconds`, each calling `op(client, n)` in a loop, printing progress;
/// each call's latency.
async fn drive<F, Fut>(label: &str, clients: usize, seconds: u64, op: F) -> anyhow::Result<Figures>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (op, done) = (op.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                op(client, n).await?;
                latencies.push(t.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let progress = {
        let done = done.clone();
        let label = label.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "  {label}: {:>4.0}s, {} calls",
                    started.elapsed().as_secs_f64(),
                    done.load(Ordering::Relaxed)
                );
            }
        })
    };
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await.context("a client task panicked")??);
    }
    progress.abort();
    Ok(Figures {
        ops: latencies_us.len(),
        elapsed: started.elapsed(),
        latencies_us,
    })
}

fn scratch_config(
    postgres: &str,
    nats: &str,
    deployment: &str,
    region: &str,
    peers: Vec<crate::config::Peer>,
    pool: u32,
) -> Config {
    Config {
        deployment: deployment.into(),
        region: region.into(),
        listen: "127.0.0.1:0".into(),
        advertise_url: None,
        database_url: format!(
            "{}/locus_bench_{deployment}_{region}",
            postgres.trim_end_matches('/')
        )
        .into(),
        database_pool_size: pool,
        nats_url: nats.into(),
        admin_token: "bench-admin-token".into(),
        peer_token: "bench-peer-token".into(),
        accepted_peer_tokens: Vec::new(),
        api_tokens: Vec::new(),
        peers,
        limits: Limits::default(),
        forwarding: Default::default(),
        clock: Default::default(),
        resolvers: Default::default(),
        repair: Default::default(),
        tls: Default::default(),
        nats: Default::default(),
        replication: crate::config::Replication {
            stream_max_bytes: 256 * 1024 * 1024,
            ..Default::default()
        },
    }
}

/// Scratch configurations of regions `ids`, each knowing the others at `peer_urls` (by index).
fn mesh_configs(
    servers: &Servers,
    deployment: &str,
    ids: &[&str],
    peer_urls: &[String],
    pool: u32,
) -> Vec<Config> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let peers = ids
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| crate::config::Peer {
                    id: (*p).into(),
                    api_url: peer_urls[j].clone(),
                })
                .collect();
            scratch_config(
                &servers.postgres,
                &servers.nats,
                deployment,
                id,
                peers,
                pool,
            )
        })
        .collect()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile_ms(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort_unstable();
    if samples.is_empty() {
        return 0.0;
    }
    millis(samples[((samples.len() as f64 - 1.0) * p).round() as usize])
}

/// What [`rate_and_lag`] measured.
struct RateAndLag {
    max_rate: f64,
    half_rate: f64,
    lag_p50: f64,
    lag_p99: f64,
    samples: usize,
}

/// The maximum write rate at the region at `url`, then the replication lag to `reader` at half
/// that rate (commit to visible in `reader`'s database, every tenth write sampled).
async fn rate_and_lag(
    http: &reqwest::Client,
    url: &str,
    reader: &Arc<crate::service::Region>,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<RateAndLag> {
    // The maximum write rate.
    let max = {
        let (http, url) = (http.clone(), url.to_owned());
        drive("max rate", clients, seconds, move |client, n| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                put_sample(&http, &url, "max", &format!("c{client}-{n}"), (client, n)).await
            }
        })
        .await?
    };
    let rate = max.throughput() / 2.0;
    println!(
        "  maximum write rate {:.0}/s; lag phase at {rate:.0}/s",
        max.throughput()
    );

    // Lag at half the maximum rate: every tenth write is looked for at the reader until visible
    // there. One poller looks for all outstanding samples in one query per millisecond, so the
    // measurement's own load on the database stays small and does not grow with the lag.
    let lags = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let outstanding = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        Instant,
    >::new()));
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let (lags, outstanding, writing) = (lags.clone(), outstanding.clone(), writing.clone());
        let pool = reader.store.pool().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let give_up = Duration::from_secs(30);
            loop {
                tick.tick().await;
                let keys: Vec<String> = outstanding.lock().unwrap().keys().cloned().collect();
                if keys.is_empty() {
                    if writing.load(Ordering::Relaxed) {
                        continue;
                    }
                    return;
                }
                let found: Vec<String> = sqlx::query_scalar(
                    "SELECT key FROM records WHERE collection = 'lag' AND key = ANY($1)",
                )
                .bind(&keys)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                let mut outstanding = outstanding.lock().unwrap();
                let mut lags = lags.lock().unwrap();
                for key in found {
                    if let Some(acknowledged) = outstanding.remove(&key) {
                        lags.push(acknowledged.elapsed());
                    }
                }
                outstanding.retain(|_, acknowledged| acknowledged.elapsed() < give_up);
            }
        })
    };
    let interval = Duration::from_secs_f64(clients as f64 / rate);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut writers = Vec::new();
    for client in 0..clients {
        let (http, url, outstanding) = (http.clone(), url.to_owned(), outstanding.clone());
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut n = 0usize;
            while Instant::now() < deadline {
                tick.tick().await;
                let key = format!("c{client}-{n}");
                put_sample(&http, &url, "lag", &key, (client, n)).await?;
                if n % 10 == 0 {
                    outstanding.lock().unwrap().insert(key, Instant::now());
                }
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut lag_writes = 0;
    for w in writers {
        lag_writes += w.await??;
    }
    writing.store(false, Ordering::Relaxed);
    poller.await?;
    let mut lag_samples = lags.lock().unwrap().clone();
    let lag_p50 = percentile_ms(&mut lag_samples, 0.50);
    let lag_p99 = percentile_ms(&mut lag_samples, 0.99);
    println!(
        "  lag phase: {lag_writes} writes, {} sampled",
        lag_samples.len()
    );

    Ok(RateAndLag {
        max_rate: max.throughput(),
        half_rate: rate,
        lag_p50,
        lag_p99,
        samples: lag_samples.len(),
    })
}

async fn replication(args: ReplicationArgs) -> anyhow::Result<()> {
    let deployment = format!("bench{:08x}", rand::random::<u32>());
    let ids = ["eu", "us", "ap"];
    let mut listeners = Vec::new();
    for _ in ids {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let configs = mesh_configs(
        &args.servers,
        &deployment,
        &ids,
        &urls,
        (args.clients as u32).max(8),
    );
    println!("locus bench replication: deployment {deployment}; eu and us run, ap starts late");
    let mut listeners = listeners.into_iter();
    let eu = crate::app::start(configs[0].clone(), listeners.next()).await?;
    let us = crate::app::start(configs[1].clone(), listeners.next()).await?;
    let ap_listener = listeners.next();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .build()?;
    let url = eu.url();

    // The same writes at a region of its own whose NATS is unreachable: every event waits in its
    // outbox, so this is the write rate without publishing and without a peer applying.
    let offline_rate = {
        let config = scratch_config(
            &args.servers.postgres,
            "nats://127.0.0.1:1",
            &format!("{deployment}off"),
            "eu",
            Vec::new(),
            (args.clients as u32).max(8),
        );
        let offline = crate::app::start(
            config.clone(),
            Some(TcpListener::bind("127.0.0.1:0").await?),
        )
        .await?;
        let (http, url) = (http.clone(), offline.url());
        let figures = drive(
            "publishing off",
            args.clients,
            args.seconds,
            move |client, n| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    put_sample(&http, &url, "max", &format!("c{client}-{n}"), (client, n)).await
                }
            },
        )
        .await?;
        offline.stop().await?;
        sqlx::Postgres::force_drop_database(&config.database_url).await?;
        figures.throughput()
    };
    println!("  maximum write rate with publishing off {offline_rate:.0}/s");

    // eu and us are new regions, each copying the other's (empty) data first: measured only
    // once both copies are done, so no copy runs during the phases.
    for running in [&eu, &us] {
        let seconds = until_copied(running).await;
        println!(
            "  {} holds the deployment's data ({seconds:.1} s after the phase above)",
            running.region.id()
        );
    }

    let measured = rate_and_lag(&http, &url, &us.region, args.clients, args.seconds).await?;
    let (rate, lag_p50, lag_p99) = (measured.half_rate, measured.lag_p50, measured.lag_p99);

    // 3. A backlog for ap, which has not started: eu's stream keeps every event for it.
    let backlog_phase = {
        let (http, url) = (http.clone(), url.clone());
        let per_client = args.backlog.div_ceil(args.clients);
        let keys_per_client = match args.backlog_keys {
            0 => per_client,
            keys => keys.div_ceil(args.clients),
        };
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..args.clients {
            let (http, url) = (http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..per_client {
                    put_sample(
                        &http,
                        &url,
                        "backlog",
                        &format!("c{client}-{}", n % keys_per_client),
                        (client, n),
                    )
                    .await?;
                }
                anyhow::Ok(per_client)
            }));
        }
        let mut written = 0;
        for t in tasks {
            written += t.await??;
        }
        (written, started.elapsed())
    };
    let origin_rate = backlog_phase.0 as f64 / backlog_phase.1.as_secs_f64();
    println!(
        "  backlog written: {} events at {origin_rate:.0}/s",
        backlog_phase.0
    );
    let eu_region = eu.region.clone();
    while eu_region.store.outbox_backlog().await? > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let published = eu_region.replication.events_published();
    let started = Instant::now();
    let ap = crate::app::start(configs[2].clone(), ap_listener).await?;
    let mut last_report = Instant::now();
    loop {
        let applied = ap
            .region
            .replication
            .peer("eu")
            .map_or(0, |p| p.events_applied);
        if applied >= published {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!("  ap catching up: {applied}/{published} events");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = started.elapsed();
    let apply_rate = published as f64 / catch_up.as_secs_f64();
    let held_by_copy = ap.region.replication.events_held_by_copy("eu");

    println!("\nreplication (eu -> us, one PostgreSQL and one NATS on this machine):");
    println!(
        "  maximum write rate at eu           {:>8.0} writes/s ({} clients)",
        measured.max_rate, args.clients
    );
    println!(
        "  the same with publishing off       {offline_rate:>8.0} writes/s (NATS unreachable); with replication on: {:.0}%",
        100.0 * measured.max_rate / offline_rate
    );
    println!(
        "  lag at {rate:>6.0} writes/s (half)     p50 {lag_p50:>6.2} ms   p99 {lag_p99:>6.2} ms   ({} samples, commit to visible at us)",
        measured.samples
    );
    println!(
        "  catch-up of a late region          {published} events in {:.1} s = {apply_rate:.0} events/s (origin wrote {origin_rate:.0}/s; ratio {:.2})",
        catch_up.as_secs_f64(),
        apply_rate / origin_rate
    );
    println!(
        "    of which {held_by_copy} were held by ap's first copy (acknowledged without a merge)"
    );

    for running in [eu, us, ap] {
        running.stop().await?;
    }
    for config in &configs {
        sqlx::Postgres::force_drop_database(&config.database_url).await?;
    }
    crate::replication::delete_streams(&args.servers.nats, &deployment, &ids)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

async fn writes(args: WritesArgs) -> anyhow::Result<()> {
    let run = format!("{:08x}", rand::random::<u32>());
    let database = format!("locus_bench_{run}");
    let deployment = format!("bench{run}");
    let database_url = format!("{}/{database}", args.servers.postgres.trim_end_matches('/'));
    let max_clients = args.clients.iter().copied().max().unwrap_or(8);
    let config = Config {
        deployment: deployment.clone(),
        region: "eu".into(),
        listen: "127.0.0.1:0".into(),
        advertise_url: None,
        database_url: database_url.clone().into(),
        database_pool_size: (max_clients as u32).max(8),
        nats_url: args.servers.nats.clone(),
        admin_token: "bench-admin-token".into(),
        peer_token: "bench-peer-token".into(),
        accepted_peer_tokens: Vec::new(),
        api_tokens: Vec::new(),
        peers: vec![],
        limits: Limits::default(),
        forwarding: Default::default(),
        clock: Default::default(),
        resolvers: Default::default(),
        repair: Default::default(),
        tls: Default::default(),
        nats: Default::default(),
        replication: Default::default(),
    };
    println!(
        "locus bench writes: scratch database {database}, phases of {}s",
        args.seconds
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let region = crate::app::start(config, Some(listener)).await?;
    let url = region.url();
    println!("region eu listening on {url}");

    // The strongest simple baseline: like pgbench, each upsert goes straight to its connection,
    // without the round trip that sqlx's pool spends by default checking a connection it hands out.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_clients as u32)
        .test_before_acquire(false)
        .connect(&database_url)
        .await
        .context("connecting the raw-upsert pool")?;
    // Exactly the shape of a record row, whatever the migrations made it.
    sqlx::query("CREATE TABLE bench_raw (LIKE records INCLUDING ALL)")
        .execute(&pool)
        .await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(max_clients)
        .build()?;
    let mut report = Vec::new();
    for &clients in &args.clients {
        let keys = args.keys_per_client;
        drain_outbox(&region.region).await?;
        let raw = {
            let pool = pool.clone();
            drive("raw upsert", clients, args.seconds, move |client, n| {
                let pool = pool.clone();
                async move {
                    // The same shape a record row holds: home plus one version.
                    let state = json!({"home": {"epoch": 0, "region": "eu"}, "versions": [{
                        "value": sample_value(client, n), "deleted": false, "region": "eu",
                        "hlc": "1", "version": {"eu.00000000": n + 1}}]});
                    sqlx::query(
                        "INSERT INTO bench_raw (collection, key, rev, state) VALUES ('bench', $1, 1, $2)
                         ON CONFLICT (collection, key) DO UPDATE SET rev = bench_raw.rev + 1,
                         state = EXCLUDED.state, updated_at = now()",
                    )
                    .bind(format!("c{client}-k{}", n % keys))
                    .bind(state)
                    .execute(&pool)
                    .await?;
                    Ok(())
                }
            })
            .await?
        };
        let service = {
            let region = region.region.clone();
            drive(
                "locus write path (no HTTP)",
                clients,
                args.seconds,
                move |client, n| {
                    let region = region.clone();
                    async move {
                        let request = WriteRequest {
                            idempotency: None,
                            collection: "bench-direct".into(),
                            key: format!("c{client}-k{}", n % keys),
                            op: WriteOp::Put(sample_value(client, n)),
                            precondition: Precondition::None,
                            home_hint: None,
                            route: Route::Client,
                        };
                        anyhow::ensure!(matches!(
                            region.write(&request).await?,
                            WriteOutcome::Written(_)
                        ));
                        Ok(())
                    }
                },
            )
            .await?
        };
        let service_left = region.region.store.outbox_backlog().await?;
        drain_outbox(&region.region).await?;
        let api = {
            let (http, url) = (http.clone(), url.clone());
            drive("locus PUT", clients, args.seconds, move |client, n| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let key = format!("c{client}-k{}", n % keys);
                    put_sample(&http, &url, "bench", &key, (client, n)).await
                }
            })
            .await?
        };
        let api_left = region.region.store.outbox_backlog().await?;
        let ratio = api.throughput() / raw.throughput();
        report.push(format!(
            "clients {clients}:\n  {}\n  {}\n  {}\n  locus / raw throughput: {ratio:.2}\n  \
             events left unpublished at the end of a phase: {service_left} (no HTTP), {api_left} (PUT)",
            raw.line("raw sqlx upsert"),
            service.line("locus write path (no HTTP)"),
            api.line("locus PUT (HTTP, outbox)")
        ));
    }
    println!("\n{}", report.join("\n"));

    pool.close().await;
    region.stop().await?;
    sqlx::Postgres::force_drop_database(&database_url)
        .await
        .context("dropping the scratch database")?;
    // Deleting the stream of a NATS that is not there (`--nats` at a closed port) has nothing to do.
    let _ = crate::replication::delete_streams(&args.servers.nats, &deployment, &["eu"]).await;
    Ok(())
}

/// Wait until the publisher has shipped the outbox, so that a phase does not pay for publishing
/// the events of the one before; give up when the backlog stops shrinking (NATS unreachable).
async fn drain_outbox(region: &crate::service::Region) -> anyhow::Result<()> {
    let mut last = i64::MAX;
    loop {
        let backlog = region.store.outbox_backlog().await?;
        if backlog == 0 {
            return Ok(());
        }
        if backlog >= last {
            eprintln!("  {backlog} events stay in the outbox: NATS is not taking them");
            return Ok(());
        }
        eprintln!("  publishing the previous phase's events: {backlog} left");
        last = backlog;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A cart conflict of two versions with a few items each: the input of the per-call phase.
fn cart_versions(key: usize) -> Vec<crate::record::Version> {
    use crate::clock::hlc::Hlc;
    use crate::clock::version::VersionVector;
    ["eu", "us"]
        .iter()
        .enumerate()
        .map(|(i, region)| crate::record::Version {
            value: json!({"items": {format!("{region}-a"): 1, format!("{region}-b"): 2, "shared": key % 5 + i}}),
            deleted: false,
            region: (*region).into(),
            hlc: Hlc::from_parts(1_700_000_000_000 + i as u64, 0),
            vector: VersionVector::from([(format!("{region}.00000000").as_str(), 1)]),
        })
        .collect()
}

fn micros_at(samples: &mut [Duration], p: f64) -> f64 {
    percentile_ms(samples, p) * 1000.0
}

async fn resolvers(args: ResolversArgs) -> anyhow::Result<()> {
    use crate::replication::event::{Change, Event};
    use crate::resolve::{abi, wasm::Sandbox};

    let module = std::fs::read(&args.module).with_context(|| {
        format!(
            "reading {} (build the example resolvers first)",
            args.module.display()
        )
    })?;
    println!(
        "locus bench resolvers: module {} ({} bytes), default limits",
        args.module.display(),
        module.len()
    );

    // Phase 1: the sandbox alone, one call at a time: fresh store, instantiate from the pool,
    // write the input, call, read and parse the output.
    let limits = crate::config::ResolverLimits::default();
    let sandbox = Sandbox::new(&limits)?;
    let started = Instant::now();
    let (_, compiled) = sandbox
        .compile(&module)
        .map_err(|e| anyhow::anyhow!("the module does not compile: {e}"))?;
    println!("compile: {:.1} ms", millis(started.elapsed()));
    let input = abi::encode_input("carts", "k1", &cart_versions(1));
    for _ in 0..1_000 {
        sandbox
            .call(&compiled, &input)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut samples = Vec::with_capacity(args.calls);
    let phase = Instant::now();
    for i in 0..args.calls {
        let started = Instant::now();
        sandbox
            .call(&compiled, &input)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        samples.push(started.elapsed());
        if i > 0 && i % 5_000 == 0 {
            println!("  … {i} calls");
        }
    }
    let total = phase.elapsed();
    println!(
        "per call (instantiate + call + parse), {} calls of a {}-byte input: p50 {:.1} µs, p99 {:.1} µs, {:.0} calls/s on one thread",
        args.calls,
        input.len(),
        micros_at(&mut samples, 0.50),
        micros_at(&mut samples, 0.99),
        args.calls as f64 / total.as_secs_f64()
    );

    // Phase 2: one region resolving conflicts as they arrive: each remote event conflicts with a
    // local version, so every apply leaves a resolution (and a conflict-log outcome) to the
    // worker, which runs the resolver and stores its view after the apply commits.
    let run = format!("{:08x}", rand::random::<u32>());
    let deployment = format!("bench{run}");
    let config = scratch_config(
        &args.servers.postgres,
        &args.servers.nats,
        &deployment,
        "eu",
        vec![],
        16,
    );
    let database_url = config.database_url.clone();
    let region = crate::app::start(config, Some(TcpListener::bind("127.0.0.1:0").await?)).await?;
    let url = region.url();
    println!("region eu listening on {url}; scratch database {database_url}");
    let shared = region.region.clone();
    crate::resolve::upload(&shared, "cart", module.clone())
        .await
        .map_err(|e| anyhow::anyhow!("upload: {e}"))?;
    let http = reqwest::Client::new();
    let policy = http
        .put(format!("{url}/v1/collections/carts"))
        .bearer_auth("bench-admin-token")
        .json(&json!({"homing": "anywhere", "conflicts": {"strategy": "resolver", "resolver": "cart"}}))
        .send()
        .await?;
    anyhow::ensure!(policy.status().is_success(), "policy: {}", policy.status());
    println!("writing {} local carts…", args.conflicts);
    for key in 0..args.conflicts {
        let request = WriteRequest {
            idempotency: None,
            collection: "carts".into(),
            key: format!("cart{key:06}"),
            op: WriteOp::Put(cart_versions(key)[0].value.clone()),
            precondition: Precondition::None,
            home_hint: None,
            route: Route::Client,
        };
        anyhow::ensure!(matches!(
            shared.write(&request).await?,
            WriteOutcome::Written(_)
        ));
    }
    let batch = 512;
    let phase = Instant::now();
    let mut sequence = 0;
    for first in (0..args.conflicts).step_by(batch) {
        let changes: Vec<Change> = (first..(first + batch).min(args.conflicts))
            .map(|key| {
                let mut version = cart_versions(key)[1].clone();
                version.hlc =
                    crate::clock::hlc::Hlc::from_parts(crate::clock::hlc::wall_clock_ms(), 0);
                Change::Record(Event::new(
                    "us",
                    "carts",
                    &format!("cart{key:06}"),
                    crate::record::Home::new("eu"),
                    version,
                ))
            })
            .collect();
        sequence += 1;
        let applied =
            crate::replication::consumer::apply_batch(&shared, "us", &changes, &[sequence], &[])
                .await?;
        anyhow::ensure!(
            applied.conflicts == changes.len(),
            "every event is a conflict"
        );
        if first % 5_120 == 0 {
            println!("  … {first} conflicts applied");
        }
    }
    let applied_in = phase.elapsed();
    println!("waiting for the resolution worker…");
    loop {
        let records = shared.store.left_to_resolve(("", ""), 1).await?;
        let conflicts = shared.store.conflicts_left_to_resolve(0, 1).await?;
        if records.is_empty() && conflicts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = phase.elapsed();
    let sample: serde_json::Value = http
        .get(format!("{url}/v1/collections/carts/records/cart000007"))
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(
        sample["value"]["items"]["us-a"] == 1 && sample["value"]["items"]["eu-a"] == 1,
        "the resolver's union is what a reader sees: {sample}"
    );
    println!(
        "conflicts applied in one region (merge + pending view + conflict log): {} in {:.2} s = {:.0} conflicts/s",
        args.conflicts,
        applied_in.as_secs_f64(),
        args.conflicts as f64 / applied_in.as_secs_f64()
    );
    println!(
        "conflicts resolved in one region (apply, then the worker's resolver call, stored view and conflict-log outcome): {} in {:.2} s = {:.0} conflicts/s",
        args.conflicts,
        elapsed.as_secs_f64(),
        args.conflicts as f64 / elapsed.as_secs_f64()
    );

    region.stop().await?;
    sqlx::Postgres::force_drop_database(&database_url)
        .await
        .context("dropping the scratch database")?;
    let _ = crate::replication::delete_streams(&args.servers.nats, &deployment, &["eu"]).await;
    Ok(())
}

/// The peak resident memory of this process so far, in MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Seed `count` single-version records of `collection`, homed in eu, straight into a region's
/// table (as replication would have left them), in multi-row statements: keys `k00000000` on.
pub async fn seed_records(
    store: &crate::storage::Store,
    collection: &str,
    count: usize,
) -> anyhow::Result<()> {
    use crate::clock::version::VersionVector;
    use crate::record::{digest, Home, RecordState, Version};
    const BATCH: usize = 5_000;
    for first in (0..count).step_by(BATCH) {
        let (mut keys, mut states, mut buckets, mut his, mut los) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for n in first..(first + BATCH).min(count) {
            let key = format!("k{n:08}");
            let state = RecordState {
                home: Home::new("eu"),
                versions: vec![Version {
                    value: json!({"n": n, "name": format!("record {n}"), "tags": ["a", "b"]}),
                    deleted: false,
                    region: "eu".into(),
                    hlc: crate::clock::hlc::Hlc::from_parts(1_700_000_000_000 + n as u64, 0),
                    vector: VersionVector::from([("eu.bench", n as u64 + 1)]),
                }],
            };
            let hash = digest::state_hash(&state);
            buckets.push(digest::bucket_of(&key));
            his.push(hash.hi);
            los.push(hash.lo);
            states.push(serde_json::to_value(&state)?);
            keys.push(key);
        }
        sqlx::query(
            "INSERT INTO records (collection, key, rev, state, bucket, hash_hi, hash_lo)
             SELECT $6, k, 1, s, b, h, l
               FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::bigint[], $5::bigint[])
                 AS t(k, s, b, h, l)",
        )
        .bind(&keys)
        .bind(&states)
        .bind(&buckets)
        .bind(&his)
        .bind(&los)
        .bind(collection)
        .execute(store.pool())
        .await?;
    }
    Ok(())
}

/// Four clients writing at `writer` for a few seconds, and the replication lag `reader` reports
/// for them, sampled every 50 ms.
async fn live_writes(
    writer: &crate::app::RunningRegion,
    reader: &crate::app::RunningRegion,
    label: &str,
) -> anyhow::Result<(Figures, Vec<Duration>)> {
    live_writes_for(writer, reader, label, LIVE_SECONDS).await
}

async fn live_writes_for(
    writer: &crate::app::RunningRegion,
    reader: &crate::app::RunningRegion,
    label: &str,
    seconds: u64,
) -> anyhow::Result<(Figures, Vec<Duration>)> {
    let http = reqwest::Client::new();
    let url = writer.url();
    let origin = writer.region.id().to_owned();
    let region = reader.region.clone();
    let sampler = tokio::spawn(async move {
        let mut lags = Vec::new();
        let until = Instant::now() + Duration::from_secs(seconds);
        // The lag shown is that of the newest event applied: sampled only once an event of
        // this phase has been, or the first samples would repeat one applied long before.
        let applied_before = region
            .replication
            .peer(&origin)
            .map_or(0, |p| p.events_applied);
        while Instant::now() < until {
            if let Some(lag) = region
                .replication
                .peer(&origin)
                .filter(|p| p.events_applied > applied_before)
                .and_then(|p| p.event_lag_ms)
            {
                lags.push(Duration::from_millis(lag));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lags
    });
    let run = rand::random::<u32>();
    let figures = drive(label, 4, seconds, move |client, n| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            put_sample(
                &http,
                &url,
                "live",
                &format!("{run}-{client}-{n}"),
                (client, n),
            )
            .await
        }
    })
    .await?;
    Ok((figures, sampler.await?))
}

const LIVE_SECONDS: u64 = 3;

async fn repair(args: RepairArgs) -> anyhow::Result<()> {
    let deployment = format!("bench{:08x}", rand::random::<u32>());
    let eu_listener = TcpListener::bind("127.0.0.1:0").await?;
    let us_listener = TcpListener::bind("127.0.0.1:0").await?;
    let eu_url = format!("http://{}", eu_listener.local_addr()?);
    let us_url = format!("http://{}", us_listener.local_addr()?);
    let peer = |id: &str, url: &str| {
        vec![crate::config::Peer {
            id: id.into(),
            api_url: url.into(),
        }]
    };
    let mut eu_config = scratch_config(
        &args.servers.postgres,
        &args.servers.nats,
        &deployment,
        "eu",
        peer("us", &us_url),
        8,
    );
    let mut us_config = scratch_config(
        &args.servers.postgres,
        &args.servers.nats,
        &deployment,
        "us",
        peer("eu", &eu_url),
        8,
    );
    // Rounds run only when asked here.
    eu_config.repair.interval_secs = 86_400;
    us_config.repair.interval_secs = 86_400;
    us_config.repair.max_records_per_sec = u64::MAX / 2;
    println!(
        "locus bench repair: deployment {deployment}; eu and us each hold {} records",
        args.records
    );
    let eu = crate::app::start(eu_config.clone(), Some(eu_listener)).await?;
    let us = crate::app::start(us_config.clone(), Some(us_listener)).await?;
    // Both are new regions, each copying the other's (empty) data first: seeded only once both
    // copies are done, or a copy would bring the other's seed into the one being seeded.
    for running in [&eu, &us] {
        until_copied(running).await;
    }
    let seeding = Instant::now();
    seed_records(&eu.region.store, "bench", args.records).await?;
    seed_records(&us.region.store, "bench", args.records).await?;
    for region in [&eu, &us] {
        sqlx::query("VACUUM ANALYZE records")
            .execute(region.region.store.pool())
            .await?;
    }
    println!(
        "  seeded both regions in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let rss_before = peak_rss_mib();

    let started = Instant::now();
    let in_sync = crate::replication::repair::round(&us.region, "eu").await?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        in_sync.records_fetched == 0,
        "regions in sync fetch nothing"
    );
    println!(
        "  in sync: compared {} records in {} buckets in {seconds:.2} s = {:.0} records/s",
        args.records,
        in_sync.buckets_compared,
        args.records as f64 / seconds
    );

    let missing = ((args.records as f64) * args.missing_percent / 100.0) as i64;
    // The rows are deleted, then vacuumed: a region that misses records holds no dead rows of
    // them, and a fresh delete's dead rows made the round's digest reads take 425 ms instead of
    // 218 ms (the index no longer answers without the table).
    let remove_share = || async {
        sqlx::query(
            "DELETE FROM records WHERE collection = 'bench'
                AND key IN (SELECT key FROM records WHERE collection = 'bench' ORDER BY md5(key) LIMIT $1)",
        )
        .bind(missing)
        .execute(us.region.store.pool())
        .await?;
        sqlx::query("VACUUM records")
            .execute(us.region.store.pool())
            .await
    };
    // Returns the rate of repair: comparing a million records' digests takes as long whether one
    // record differs or ten thousand (the in-sync round above), so the rate is taken over the
    // rest of the round, and the whole round's is shown beside it.
    let report_round = |label: &str, repaired: &crate::replication::repair::RepairReport| {
        let repairing = repaired.seconds - repaired.seconds_comparing;
        let rate = repaired.records_repaired as f64 / repairing;
        println!(
            "  {label}: {missing} missing, {} buckets differed, {} records found by hash, {} keys listed and compared, {} records repaired in {repairing:.2} s after {:.2} s comparing digests = {:.0} records repaired/s ({:.0}/s over the whole round, {:.2} s)",
            repaired.buckets_differing,
            repaired.records_found_by_hash,
            repaired.keys_compared,
            repaired.records_repaired,
            repaired.seconds_comparing,
            rate,
            repaired.records_repaired as f64 / repaired.seconds,
            repaired.seconds,
        );
        println!(
            "    of the repair, finding what differs (by hash, then listing) {:.2} s, merging {:.2} s (the stages overlap)",
            repaired.seconds_listing, repaired.seconds_merging
        );
        rate
    };
    let check_round = |repaired: &crate::replication::repair::RepairReport| {
        anyhow::ensure!(
            repaired.records_repaired == missing as u64,
            "repaired {} of {missing}",
            repaired.records_repaired
        );
        Ok(())
    };

    // Rounds alone: what repair costs when it has the machine to itself.
    let rounds = args.rounds.max(1);
    let mut rates = Vec::new();
    for n in 1..=rounds {
        remove_share().await?;
        let quiet = crate::replication::repair::round(&us.region, "eu").await?;
        check_round(&quiet)?;
        rates.push(report_round(
            &format!("round alone ({n} of {rounds})"),
            &quiet,
        ));
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "  rounds alone: {:.0} to {:.0} records repaired/s after comparing, median {:.0}",
        rates[0],
        rates[rates.len() - 1],
        rates[rates.len() / 2]
    );

    // Writes at the repairing region, and their replication to the peer, alone and then while
    // a round runs.
    remove_share().await?;
    let alone = live_writes(&us, &eu, "writes at us, no repair").await?;
    let round = {
        let region = us.region.clone();
        tokio::spawn(async move { crate::replication::repair::round(&region, "eu").await })
    };
    let during = live_writes(&us, &eu, "writes at us during the round").await?;
    let repaired = round.await??;
    check_round(&repaired)?;
    report_round("round under 4 writing clients", &repaired);
    for (label, (figures, mut lag)) in [("alone", alone), ("during the round", during)] {
        println!(
            "  writes at us {label}: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms; replication lag to eu p50 {:.0} ms, max {:.0} ms",
            figures.throughput(),
            figures.percentile(0.50),
            figures.percentile(0.99),
            percentile_ms(&mut lag, 0.5),
            percentile_ms(&mut lag, 1.0),
        );
    }
    println!(
        "  peak memory of this process (both regions): {:.0} MiB after seeding, {:.0} MiB after both rounds",
        rss_before,
        peak_rss_mib()
    );
    eu.stop().await?;
    us.stop().await?;
    for config in [&eu_config, &us_config] {
        sqlx::Postgres::force_drop_database(&config.database_url).await?;
    }
    crate::replication::delete_streams(&args.servers.nats, &deployment, &["eu", "us"])
        .await
        .map_err(|e| anyhow::anyhow!("deleting the bench streams: {e}"))?;
    Ok(())
}

/// Start a new region that lists `eu` as its peer and return it with its config.
async fn new_region(
    args: &BootstrapArgs,
    deployment: &str,
    id: &str,
    eu_url: &str,
    max_records_per_sec: u64,
) -> anyhow::Result<(crate::app::RunningRegion, Config)> {
    let mut config = scratch_config(
        &args.servers.postgres,
        &args.servers.nats,
        deployment,
        id,
        vec![crate::config::Peer {
            id: "eu".into(),
            api_url: eu_url.into(),
        }],
        8,
    );
    config.repair.interval_secs = 86_400;
    config.repair.max_records_per_sec = max_records_per_sec;
    let region = crate::app::start(config.clone(), None).await?;
    Ok((region, config))
}

/// Wait until `region` has copied the deployment's data, printing its progress every 2 s.
async fn until_copied(region: &crate::app::RunningRegion) -> f64 {
    let started = Instant::now();
    let mut shown = Instant::now();
    while region.region.is_bootstrapping() {
        if shown.elapsed() >= Duration::from_secs(2) {
            shown = Instant::now();
            if let Some(p) = region.region.replication.repair_progress_now("eu") {
                println!(
                    "    {}: {} of {} records compared, {} copied, {:.0}/s, about {:.0} s left",
                    region.region.id(),
                    p.records_compared,
                    p.records_to_compare,
                    p.records_copied,
                    p.per_second,
                    p.seconds_left.unwrap_or(0.0)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed().as_secs_f64()
}

/// How long eu's write throughput is measured, alone and during the throttled copy: long enough
/// that the round's start (both sides scan their digests) weighs no more than it does in a copy.
const WINDOW_SECONDS: u64 = 10;

async fn bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let deployment = format!("bench{:08x}", rand::random::<u32>());
    println!(
        "locus bench bootstrap: deployment {deployment}; eu holds {} records",
        args.records
    );
    let eu_config = scratch_config(
        &args.servers.postgres,
        &args.servers.nats,
        &deployment,
        "eu",
        vec![],
        8,
    );
    let eu = crate::app::start(eu_config.clone(), None).await?;
    let seeding = Instant::now();
    seed_records(&eu.region.store, "bench", args.records).await?;
    sqlx::query("VACUUM ANALYZE records")
        .execute(eu.region.store.pool())
        .await?;
    println!("  seeded eu in {:.1} s", seeding.elapsed().as_secs_f64());
    let rss_before = peak_rss_mib();

    // Unthrottled: a new region copies everything.
    let (ap, ap_config) = new_region(&args, &deployment, "ap", &eu.url(), u64::MAX / 2).await?;
    let seconds = until_copied(&ap).await;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = 'bench'")
        .fetch_one(ap.region.store.pool())
        .await?;
    anyhow::ensure!(
        held as usize == args.records,
        "ap holds {held} of {} records",
        args.records
    );
    println!(
        "  unthrottled: ap copied {} records in {seconds:.1} s = {:.0} records/s (until ready)",
        args.records,
        args.records as f64 / seconds
    );
    // Throttled, under writes at eu: eu's throughput while ap (caught up) applies them, then
    // while a new region copies eu's data and applies them instead. One region applies eu's
    // writes in both phases: on this one machine its applies cost eu as much as the copy does.
    let alone = live_writes_for(&eu, &eu, "writes at eu, ap applying", WINDOW_SECONDS)
        .await?
        .0;
    ap.stop().await?;
    let (sa, sa_config) = new_region(&args, &deployment, "sa", &eu.url(), args.throttle).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // past the attach, into the copy
    let during = live_writes_for(
        &eu,
        &eu,
        "writes at eu during a throttled copy",
        WINDOW_SECONDS,
    )
    .await?
    .0;
    let copy_rate = sa
        .region
        .replication
        .repair_progress_now("eu")
        .map_or(0.0, |p| {
            p.records_copied as f64 / p.seconds.max(f64::EPSILON)
        });
    println!(
        "  throttled to {}/s: eu's writes {:.0}/s with ap applying them, {:.0}/s with sa copying and applying them = {:.0}% (p99 {:.1} ms vs {:.1} ms); the copy ran at {:.0} records copied/s",
        args.throttle,
        alone.throughput(),
        during.throughput(),
        100.0 * during.throughput() / alone.throughput(),
        during.percentile(0.99),
        alone.percentile(0.99),
        copy_rate
    );
    println!(
        "  peak memory of this process (all regions): {:.0} MiB after seeding, {:.0} MiB at the end",
        rss_before,
        peak_rss_mib()
    );
    sa.stop().await?;
    eu.stop().await?;
    for config in [&eu_config, &ap_config, &sa_config] {
        sqlx::Postgres::force_drop_database(&config.database_url).await?;
    }
    crate::replication::delete_streams(&args.servers.nats, &deployment, &["eu", "ap", "sa"])
        .await
        .map_err(|e| anyhow::anyhow!("deleting the bench streams: {e}"))?;
    Ok(())
}

/// `locus bench tls`: the same two-region measurement without and with TLS on every hop, each on
/// a nats-server of its own (the pinned one), the TLS one verifying clients and knowing only the
/// regions' least-privilege users.
async fn tls(args: TlsArgs) -> anyhow::Result<()> {
    use crate::replication::permissions::{nats_users, PasswordSource};
    let run = format!("{:08x}", rand::random::<u32>());
    let dir = std::env::temp_dir().join(format!("locus-bench-tls-{run}"));
    let certs = dir.join("certs");
    let status = std::process::Command::new("sh")
        .arg(&args.certs_script)
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", args.certs_script.display()))?;
    anyhow::ensure!(status.success(), "{} failed", args.certs_script.display());
    let binary = crate::nats_server::binary().context("finding or installing nats-server")?;
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let ids = ["eu", "us"];
    let password = |id: &str| format!("bench-nats-{id}-{run}");

    let mut results = Vec::new();
    for secure in [false, true] {
        let deployment = format!("bench{run}{}", if secure { "tls" } else { "plain" });
        let store = dir.join(format!("nats-{deployment}"));
        std::fs::create_dir_all(&store)?;
        let port = free_port()?;
        let mut server_args = Vec::new();
        if secure {
            let passwords: Vec<String> = ids.iter().map(|id| password(id)).collect();
            let users: Vec<(&str, PasswordSource)> = ids
                .iter()
                .zip(&passwords)
                .map(|(id, p)| (*id, PasswordSource::Literal(p)))
                .collect();
            let config = crate::nats_server::tls_config(
                &certs.join("nats-eu-1.pem"),
                &certs.join("nats-eu-1-key.pem"),
                &certs.join("ca.pem"),
                &nats_users(&deployment, &users, None),
            );
            let file = dir.join(format!("{deployment}.conf"));
            std::fs::write(&file, config)?;
            server_args = vec!["-c".to_owned(), file.to_string_lossy().into_owned()];
        }
        let server_arg_refs: Vec<&str> = server_args.iter().map(String::as_str).collect();
        let _nats = crate::nats_server::LocalNats::start(&binary, port, &store, &server_arg_refs)
            .context("starting the benchmark's nats-server")?;
        let mut listeners = Vec::new();
        for _ in ids {
            listeners.push(TcpListener::bind("127.0.0.1:0").await?);
        }
        let scheme_host = if secure {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        let urls: Vec<String> = listeners
            .iter()
            .map(|l| format!("{scheme_host}:{}", l.local_addr().unwrap().port()))
            .collect();
        let nats_url = format!("{}://127.0.0.1:{port}", if secure { "tls" } else { "nats" });
        let configs: Vec<Config> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let peers = vec![crate::config::Peer {
                    id: ids[1 - i].into(),
                    api_url: urls[1 - i].clone(),
                }];
                let mut config = scratch_config(
                    &args.postgres,
                    &nats_url,
                    &deployment,
                    id,
                    peers,
                    (args.clients as u32).max(8),
                );
                if secure {
                    let service = |name: &str| certs.join(format!("{name}.pem"));
                    config.database_url =
                        format!("{}?{}", &*config.database_url, args.postgres_tls).into();
                    config.advertise_url = Some(urls[i].clone());
                    config.tls.cert_file = Some(service(&format!("locus-{id}")));
                    config.tls.key_file = Some(service(&format!("locus-{id}-key")));
                    config.tls.peer_ca_file = Some(service("ca"));
                    config.nats = crate::config::NatsSettings {
                        ca_file: Some(service("ca")),
                        cert_file: Some(service(&format!("locus-{id}"))),
                        key_file: Some(service(&format!("locus-{id}-key"))),
                        user: Some((*id).into()),
                        password: Some(password(id).into()),
                        credentials_file: None,
                    };
                }
                config
            })
            .collect();
        let mode = if secure { "TLS on every hop" } else { "plain" };
        println!("locus bench tls: {mode} (deployment {deployment}, NATS {nats_url})");
        let mut listeners = listeners.into_iter();
        let eu = crate::app::start(configs[0].clone(), listeners.next()).await?;
        let us = crate::app::start(configs[1].clone(), listeners.next()).await?;
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .pool_max_idle_per_host(args.clients * 2);
        if secure {
            let ca = std::fs::read(certs.join("ca.pem"))?;
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&ca)?);
        }
        let http = http.build()?;
        let measured =
            rate_and_lag(&http, &eu.url(), &us.region, args.clients, args.seconds).await?;
        results.push((mode, measured));
        for running in [eu, us] {
            running.stop().await?;
        }
        for config in &configs {
            sqlx::Postgres::force_drop_database(&config.database_url).await?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nTLS (eu -> us, {} clients, one PostgreSQL and a NATS per mode on this machine):",
        args.clients
    );
    println!(
        "  {:<18} {:>12} {:>24}",
        "", "writes/s", "lag at half rate p50/p99"
    );
    for (mode, m) in &results {
        println!(
            "  {mode:<18} {:>12.0} {:>12.2} ms {:>7.2} ms   ({} samples at {:.0}/s)",
            m.max_rate, m.lag_p50, m.lag_p99, m.samples, m.half_rate
        );
    }
    if let [(_, plain), (_, secure)] = &results[..] {
        println!(
            "  TLS keeps {:.0}% of the plain write rate",
            100.0 * secure.max_rate / plain.max_rate
        );
    }
    Ok(())
}

fn latency_line(name: &str, figures: &Figures) -> String {
    format!(
        "{name:<44} p50 {:>7.2} ms   p99 {:>7.2} ms   ({} calls)",
        figures.percentile(0.50),
        figures.percentile(0.99),
        figures.ops
    )
}

async fn client(args: ClientArgs) -> anyhow::Result<()> {
    use crate::delay_proxy::DelayProxy;
    use locus_client::{Client, ClientConfig, WriteOptions};

    let deployment = format!("bench{:08x}", rand::random::<u32>());
    let ids = ["eu", "us", "ap"];
    let far = Duration::from_millis(args.far_ms);
    let near = Duration::from_millis(args.near_ms);
    let mut listeners = Vec::new();
    for _ in ids {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    // Regions reach each other across the far delay; the client reaches eu across the near one.
    let mut between_regions = Vec::new();
    let mut to_client = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        between_regions.push(DelayProxy::start(addr, far).await?);
        let delay = if i == 0 { near } else { far };
        to_client.push(DelayProxy::start(addr, delay).await?);
    }
    let peer_urls: Vec<String> = between_regions.iter().map(DelayProxy::url).collect();
    let configs = mesh_configs(&args.servers, &deployment, &ids, &peer_urls, 8);
    println!(
        "locus bench client: deployment {deployment}; regions {} ms apart one way, the client {} ms from eu and {} ms from us and ap",
        args.far_ms, args.near_ms, args.far_ms
    );
    let mut running = Vec::new();
    for (config, listener) in configs.into_iter().zip(listeners) {
        running.push(crate::app::start(config, Some(listener)).await?);
    }
    let mut config = ClientConfig::new(to_client.iter().map(DelayProxy::url));
    config.probe_every = Duration::from_millis(500);
    let client = Client::connect(config).await?;
    let http = reqwest::Client::new();

    // Records homed in us, far from the client.
    const KEYS: usize = 64;
    for key in 0..KEYS {
        let options = WriteOptions {
            home: Some("us".into()),
            ..WriteOptions::default()
        };
        client
            .put_with("bench", &format!("k{key}"), &sample_value(0, key), options)
            .await?;
    }
    let (us_url, eu_url) = (to_client[1].url(), to_client[0].url());
    let put_at = |url: String| {
        let http = http.clone();
        move |caller: usize, n: usize| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let key = format!("k{}", (caller * 7919 + n) % KEYS);
                put_sample(&http, &url, "bench", &key, (caller, n)).await
            }
        }
    };
    println!(
        "writes to records homed in us ({} callers, {} s each):",
        args.clients, args.seconds
    );
    let through_client = {
        let client = client.clone();
        drive("client", args.clients, args.seconds, move |caller, n| {
            let client = client.clone();
            async move {
                let key = format!("k{}", (caller * 7919 + n) % KEYS);
                let written = client.put("bench", &key, &sample_value(caller, n)).await?;
                anyhow::ensure!(written.region == "us", "written at {}", written.region);
                Ok(())
            }
        })
        .await?
    };
    println!("  {}", latency_line("through the client", &through_client));
    let at_home = drive("at us", args.clients, args.seconds, put_at(us_url)).await?;
    println!("  {}", latency_line("directly at the home (us)", &at_home));
    let via_eu = drive("through eu", args.clients, args.seconds, put_at(eu_url)).await?;
    println!("  {}", latency_line("through eu, forwarded to us", &via_eu));

    let reads = |client: Client| {
        move |caller: usize, n: usize| {
            let client = client.clone();
            async move {
                let key = format!("k{}", (caller * 7919 + n) % KEYS);
                anyhow::ensure!(client.get("bench", &key).await?.is_some(), "k{key} absent");
                Ok(())
            }
        }
    };
    // A fresh client for the reads, so the writes' session tokens play no part.
    let reader = Client::connect({
        let mut config = ClientConfig::new(to_client.iter().map(DelayProxy::url));
        config.probe_every = Duration::from_millis(500);
        config
    })
    .await?;
    println!("reads through the client:");
    let well = drive("reads", args.clients, args.seconds, reads(reader.clone())).await?;
    println!("  {}", latency_line("every region well", &well));
    to_client[2].set_delay(Duration::from_millis(args.slow_ms));
    between_regions[2].set_delay(Duration::from_millis(args.slow_ms));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slow = drive("reads", args.clients, args.seconds, reads(reader.clone())).await?;
    println!(
        "  {}",
        latency_line(&format!("ap {} ms away one way", args.slow_ms), &slow)
    );
    let averages: Vec<String> = reader
        .regions()
        .into_iter()
        .map(|(id, _, _, latency)| format!("{id} {:.1} ms", latency.unwrap_or(f64::NAN)))
        .collect();
    println!("  the client's latency averages: {}", averages.join(", "));
    println!(
        "  p99 with ap slow is {:+.1}% ({:+.2} ms) of p99 with every region well",
        (slow.percentile(0.99) / well.percentile(0.99) - 1.0) * 100.0,
        slow.percentile(0.99) - well.percentile(0.99)
    );

    for region in running {
        region.stop().await?;
    }
    for id in ids {
        let url = format!(
            "{}/locus_bench_{deployment}_{id}",
            args.servers.postgres.trim_end_matches('/')
        );
        let _ = sqlx::Postgres::drop_database(&url).await;
    }
    let _ = crate::replication::delete_streams(&args.servers.nats, &deployment, &ids).await;
    Ok(())
}
