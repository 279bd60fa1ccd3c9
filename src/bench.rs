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

#[derive(Debug, clap::Args)]
pub struct WritesArgs {
    /// PostgreSQL server URL (no database); a scratch database is created and dropped.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
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

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Home-region write throughput and latency vs a raw sqlx upsert.
    Writes(WritesArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Writes(args) => writes(args).await,
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

fn sample_value(client: usize, n: usize) -> serde_json::Value {
    json!({
        "name": format!("client {client} item {n}"),
        "n": n,
        "tags": ["alpha", "beta", "gamma"],
        "address": {"street": "1 Long Road", "city": "Somewhere", "zip": "12345"},
        "active": true,
    })
}

/// Run `clients` tasks for `seconds`, each calling `op(client, n)` in a loop, printing progress.
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
                    "  {label}: {:>4.0}s, {} writes",
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

async fn writes(args: WritesArgs) -> anyhow::Result<()> {
    let database = format!("locus_bench_{:08x}", rand::random::<u32>());
    let database_url = format!("{}/{database}", args.postgres.trim_end_matches('/'));
    let max_clients = args.clients.iter().copied().max().unwrap_or(8);
    let config = Config {
        deployment: "bench".into(),
        region: "eu".into(),
        listen: "127.0.0.1:0".into(),
        database_url: database_url.clone(),
        database_pool_size: (max_clients as u32).max(8),
        nats_url: "nats://127.0.0.1:4222".into(),
        admin_token: "bench-admin-token".into(),
        peer_token: "bench-peer-token".into(),
        api_token: None,
        peers: vec![],
        limits: Limits::default(),
        forwarding: Default::default(),
        clock: Default::default(),
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

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_clients as u32)
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
        let api = {
            let (http, url) = (http.clone(), url.clone());
            drive("locus PUT", clients, args.seconds, move |client, n| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let response = http
                        .put(format!(
                            "{url}/v1/collections/bench/records/c{client}-k{}",
                            n % keys
                        ))
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
            })
            .await?
        };
        let ratio = api.throughput() / raw.throughput();
        report.push(format!(
            "clients {clients}:\n  {}\n  {}\n  {}\n  locus / raw throughput: {ratio:.2}",
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
    Ok(())
}
