//! Building and running regions: open storage (creating the database and running migrations), build
//! the router, serve until shutdown. `locus serve` runs one region; `locus dev` runs the local
//! three-region deployment of `regions/*.toml` in one process. Tests use [`start`] with listeners
//! they bound themselves (port 0), so regions can learn each other's addresses before starting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use sqlx::migrate::MigrateDatabase;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::replication;
use crate::service::Region;
use crate::storage;

/// A region serving HTTP in this process.
pub struct RunningRegion {
    pub addr: SocketAddr,
    /// `https` when the region serves TLS ([`crate::tls`]).
    pub scheme: &'static str,
    pub region: Arc<Region>,
    pub api: Arc<ApiState>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl RunningRegion {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stop accepting requests, finish the ones in flight, and close the database pool.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for worker in &self.workers {
            worker.abort();
        }
        self.region.members.stop_consumers();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.server)
            .await
            .context("the HTTP server task panicked")?
            .context("the HTTP server failed")?;
        self.region.store.pool().close().await;
        Ok(())
    }
}

/// Open the region's storage and serve its API on `listener` (or on `config.listen`). Everything
/// the region does, its workers and its requests, runs in its log span.
pub async fn start(config: Config, listener: Option<TcpListener>) -> anyhow::Result<RunningRegion> {
    let span = crate::logging::region_span(&config.region);
    start_in_span(config, listener).instrument(span).await
}

async fn start_in_span(
    config: Config,
    listener: Option<TcpListener>,
) -> anyhow::Result<RunningRegion> {
    crate::tls::install_crypto_provider();
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(&config.listen).await.with_context(|| {
            format!(
                "region {}: cannot listen on {}",
                config.region, config.listen
            )
        })?,
    };
    let addr = listener.local_addr().context("listener address")?;
    let https = crate::tls::server_config(&config)
        .with_context(|| format!("region {}: its HTTPS listener", config.region))?;
    let scheme = if https.is_some() { "https" } else { "http" };
    let (store, identity) = storage::open(
        &config.database_url,
        config.database_pool_size,
        &config.region,
    )
    .await
    .with_context(|| format!("region {}: cannot open its database", config.region))?;
    let hashed = store
        .backfill_state_hashes()
        .await
        .with_context(|| format!("region {}: hashing records for anti-entropy", config.region))?;
    if hashed > 0 {
        tracing::info!(region = %config.region, records = hashed, "hashed records written before anti-entropy");
    }
    let region = Arc::new(Region::new(config, store, identity)?);
    crate::membership::load_recorded(&region)
        .await
        .with_context(|| {
            format!(
                "region {}: reading the deployment's membership",
                region.id()
            )
        })?;
    // Writes wait until the peers have said whether this database was restored.
    let mut workers = vec![tokio::spawn(
        replication::incarnation::run(region.clone()).in_current_span(),
    )];
    let own_url = region
        .config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    workers.extend(start_replication(&region, own_url).await?);
    let supervisor = &region.supervisor;
    let r = region.clone();
    workers.push(supervisor.spawn("resolutions", move || {
        crate::resolve::worker::run(r.clone())
    }));
    let r = region.clone();
    workers.push(supervisor.spawn("repair", move || replication::repair::run(r.clone())));
    let r = region.clone();
    workers.push(supervisor.spawn("purge", move || crate::deletion::run(r.clone())));
    let r = region.clone();
    workers.push(supervisor.spawn("peer-health", move || crate::peer_health::run(r.clone())));
    let api = Arc::new(ApiState::new(region.clone()));
    let router = api::router(api.clone()).layer(axum::middleware::from_fn_with_state(
        tracing::Span::current(),
        in_region_span,
    ));
    let (tx, rx) = oneshot::channel::<()>();
    // Either way, responses go out without waiting on Nagle's algorithm (TCP_NODELAY): a streamed
    // answer leaves in several writes (its headers, its pieces, the closing chunk), and each held
    // back until the asker's delayed ACK cost 40 ms (a peer's digests of a small collection took
    // 42–49 ms instead of 2 ms).
    let server = match https {
        None => tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        }),
        Some(tls) => tokio::spawn(serve_https(listener, router, tls, rx).in_current_span()),
    };
    Ok(RunningRegion {
        addr,
        scheme,
        region,
        api,
        shutdown: Some(tx),
        server,
        workers,
    })
}

/// Serve the API over TLS until `shutdown`: each accepted connection's handshake and requests in a
/// task of its own, so a slow or failed handshake holds up nobody else.
async fn serve_https(
    listener: TcpListener,
    router: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(
            async move {
                let stream = match acceptor.accept(stream).await {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "TLS handshake refused");
                        return;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            }
            .in_current_span(),
        );
    }
}

/// Serve each request in the region's log span (axum runs connections in tasks of their own,
/// which do not inherit it).
async fn in_region_span(
    axum::extract::State(span): axum::extract::State<tracing::Span>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    next.run(request).instrument(span).await
}

/// `locus health`: whether the region at `url` answers its liveness check within 3 s.
pub async fn health(url: &str, ca_file: Option<&Path>) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let mut client = reqwest::Client::builder().use_rustls_tls();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for certificate in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} holds no PEM certificate", path.display()))?
        {
            client = client.add_root_certificate(certificate);
        }
    }
    let response = client
        .build()
        .context("building the HTTP client")?
        .get(url)
        .timeout(std::time::Duration::from_secs(3))
        .send()
        .await
        .with_context(|| format!("{url} does not answer"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    Ok(())
}

/// `locus region retire`: find the region `id` through the region at `url` and retire it there
/// (or, `gone`, have the region at `url` take over its records); prints the report.
pub async fn retire(
    url: &str,
    id: &str,
    rehome_to: &str,
    gone: bool,
    admin_token: &str,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = url.trim_end_matches('/');
    let target = if gone {
        url.to_owned()
    } else {
        let regions: serde_json::Value = http
            .get(format!("{url}/v1/regions"))
            .bearer_auth(admin_token)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("{url} does not answer"))?
            .error_for_status()
            .with_context(|| format!("listing the regions at {url}"))?
            .json()
            .await
            .context("reading the regions")?;
        let entry = regions["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == id)
            .with_context(|| format!("{url} knows no region {id:?}"))?;
        match entry["api_url"].as_str() {
            Some(at) => at.trim_end_matches('/').to_owned(),
            None => url.to_owned(), // the region at `url` is the one retiring
        }
    };
    println!("retiring {id} at {target}: moving its records to {rehome_to} ...");
    let answer = http
        .post(format!("{target}/v1/regions/{id}/retire"))
        .bearer_auth(admin_token)
        .json(&serde_json::json!({"rehome_to": rehome_to, "gone": gone}))
        .timeout(std::time::Duration::from_secs(3600))
        .send()
        .await
        .with_context(|| {
            format!("{target} does not answer; if {id} is gone for good, pass --gone")
        })?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "{target} answered {status}: {}",
        body["detail"].as_str().unwrap_or("no detail")
    );
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

/// `nats_url` may list several servers of the region's NATS cluster, comma-separated: the client
/// connects to any of them and fails over between them.
pub fn nats_servers(nats_url: &str) -> Vec<&str> {
    nats_url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// `locus nats-users`: the users block of a deployment's nats-server config, passwords taken from
/// the server's environment.
pub fn nats_users(deployment: &str, regions: &[String], admin: bool) -> anyhow::Result<String> {
    use replication::permissions::{nats_users, PasswordSource};
    for region in regions {
        crate::config::validate_region_id("region", region)?;
    }
    let variables: Vec<String> = regions
        .iter()
        .map(|r| format!("NATS_PASSWORD_{}", r.to_uppercase().replace('-', "_")))
        .collect();
    let users: Vec<(&str, PasswordSource)> = regions
        .iter()
        .zip(&variables)
        .map(|(r, v)| (r.as_str(), PasswordSource::Variable(v)))
        .collect();
    Ok(format!(
        "# NATS users of deployment {deployment:?}: `locus nats-users --deployment {deployment}{} {}`\n{}",
        if admin { " --admin" } else { "" },
        regions.join(" "),
        nats_users(
            deployment,
            &users,
            admin.then_some(PasswordSource::Variable("NATS_PASSWORD_ADMIN"))
        )
    ))
}

/// Room a record's event needs beyond its value: names, version, home.
const EVENT_OVERHEAD_BYTES: usize = 4 * 1024;

/// Connect to NATS and start the publisher and one consumer per peer. A NATS that is down does
/// not stop the region: the client keeps reconnecting and the outbox holds the writes meanwhile.
/// A NATS whose `max_payload` cannot carry the largest record does stop it: such a record would
/// be acknowledged and then never replicate.
async fn start_replication(
    region: &Arc<Region>,
    own_url: String,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = &region.config;
    let (client, connected) = replication::connection::connect(config)
        .await
        .with_context(|| format!("region {}", config.region))?;
    if connected {
        let info = client.server_info();
        let max_payload = info.max_payload;
        region.set_max_event_bytes(max_payload);
        region.replication.set_nats_version(&info.version);
        if replication::has_interest_purge_bug(&info.version) {
            tracing::warn!(region = %config.region, version = %info.version,
                "this nats-server purges interest-stream events at restart while a consumer has never acknowledged (fixed in 2.9.16); \
                 repair brings lost events back, but use a current server");
        }
        let needed = config.limits.record_body_bytes + EVENT_OVERHEAD_BYTES;
        anyhow::ensure!(
            max_payload >= needed,
            "region {}: NATS max_payload is {max_payload} bytes, but a record of limits.record_body_bytes = {} needs {needed}; \
             raise max_payload on the NATS servers or lower the limit",
            config.region,
            config.limits.record_body_bytes
        );
    }
    let js = async_nats::jetstream::new(client);
    let supervisor = &region.supervisor;
    let (r, j) = (region.clone(), js.clone());
    let mut workers = vec![supervisor.spawn("publisher", move || {
        replication::publisher::run(r.clone(), j.clone())
    })];
    region.members.connected(region, js);
    let r = region.clone();
    workers.push(supervisor.spawn("membership", move || {
        crate::membership::run(r.clone(), own_url.clone())
    }));
    Ok(workers)
}

/// `locus serve`: one region until Ctrl-C or SIGTERM.
pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config =
        Config::load(config_path).with_context(|| format!("loading {}", config_path.display()))?;
    let running = start(config, None).await?;
    let region = &running.region;
    println!(
        "locus region {} listening on {}",
        region.id(),
        running.url()
    );
    shutdown_signal().await;
    println!("stopping region {}", region.id());
    running.stop().await
}

/// The region files of the local deployment, in order.
pub fn dev_config_paths(dir: &Path) -> Vec<PathBuf> {
    ["eu", "us", "ap"]
        .iter()
        .map(|r| dir.join(format!("{r}.toml")))
        .collect()
}

/// `locus dev`: the three regions of `dir` in one process, until Ctrl-C, on the NATS at `nats`
/// or, when none is given, on a current nats-server started here (on `nats_port`).
pub async fn dev(
    dir: &Path,
    reset: bool,
    nats: Option<String>,
    nats_port: u16,
) -> anyhow::Result<()> {
    let mut configs = dev_config_paths(dir)
        .iter()
        .map(|p| Config::load(p).with_context(|| format!("loading {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Kept until the regions stop; a server started here dies with this process.
    let mut _own_nats = None;
    let nats_url = match nats {
        Some(url) => url,
        None => {
            let binary = crate::nats_server::binary().context("finding a nats-server")?;
            let store = Path::new("target").join("dev-nats");
            std::fs::create_dir_all(&store)
                .with_context(|| format!("creating {}", store.display()))?;
            anyhow::ensure!(
                std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
                "port {nats_port} is taken: pass --nats <url> to use a running NATS, or --nats-port"
            );
            let server = tokio::task::spawn_blocking(move || {
                crate::nats_server::LocalNats::start(&binary, nats_port, &store, &[])
            })
            .await
            .context("starting nats-server")??;
            println!(
                "nats-server {} started on {} (data in target/dev-nats)",
                crate::nats_server::VERSION,
                server.url()
            );
            let url = server.url();
            _own_nats = Some(server);
            url
        }
    };
    for config in &mut configs {
        config.nats_url = nats_url.clone();
    }
    if reset {
        for config in &configs {
            println!("resetting region {}: dropping its database", config.region);
            if sqlx::Postgres::database_exists(&config.database_url).await? {
                sqlx::Postgres::force_drop_database(&config.database_url)
                    .await
                    .with_context(|| {
                        format!("dropping the database of region {}", config.region)
                    })?;
            }
        }
        let first = &configs[0];
        let regions: Vec<&str> = configs.iter().map(|c| c.region.as_str()).collect();
        println!("resetting the streams of deployment {}", first.deployment);
        replication::delete_streams(&first.nats_url, &first.deployment, &regions)
            .await
            .map_err(|e| anyhow::anyhow!("deleting the dev streams on {}: {e}", first.nats_url))?;
    }
    let mut running = Vec::new();
    for config in configs {
        println!("starting region {} ...", config.region);
        running.push(start(config, None).await?);
    }
    println!();
    for r in &running {
        println!("  region {:<4} {}", r.region.id(), r.url());
    }
    let first = &running[0];
    println!(
        "\ntry:\n  curl -X PUT {url}/v1/collections/users/records/alice -H 'content-type: application/json' -d '{{\"name\":\"Alice\"}}'\n  curl {url}/v1/collections/users/records/alice\n\nCtrl-C stops every region.",
        url = first.url()
    );
    shutdown_signal().await;
    println!("\nstopping ...");
    for r in running {
        let id = r.region.id().to_owned();
        r.stop()
            .await
            .with_context(|| format!("stopping region {id}"))?;
        println!("  region {id} stopped");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
