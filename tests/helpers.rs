//! Test harness: regions started in this process on port 0, each against a fresh database on the
//! real PostgreSQL, driven over real HTTP.

use std::collections::HashMap;
use std::sync::Mutex;

use locus::app::{self, RunningRegion};
use locus::config::{Config, Forwarding, Limits, Peer, Replication};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use sqlx::migrate::MigrateDatabase;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "test-admin-token";
pub const PEER: &str = "test-peer-token";

/// The tests' shared NATS: a current nats-server (see [`locus::nats_server`]) started once for
/// this test process on a free port, and killed with it. `LOCUS_TEST_NATS` names another.
pub fn nats() -> &'static str {
    static SHARED: std::sync::OnceLock<(String, Option<locus::nats_server::LocalNats>)> =
        std::sync::OnceLock::new();
    &SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("LOCUS_TEST_NATS") {
                return (url, None);
            }
            let dir = std::env::temp_dir().join(format!(
                "locus-test-nats-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let server =
                locus::nats_server::LocalNats::start(&nats_server_binary(), free_port(), &dir, &[])
                    .expect("the tests' nats-server starts");
            (server.url(), Some(server))
        })
        .0
}

/// The pinned nats-server binary, installed on first use.
pub fn nats_server_binary() -> std::path::PathBuf {
    static BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools");
            locus::nats_server::binary_in(&tools).expect("a nats-server binary")
        })
        .clone()
}

pub fn postgres_base() -> String {
    std::env::var("LOCUS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Settings a test may change before its regions start.
pub struct Setup {
    pub ids: Vec<&'static str>,
    /// Peer URLs to use instead of the real ones (e.g. a black hole).
    pub peer_override: HashMap<&'static str, String>,
    /// Database URLs to use instead of the direct one (e.g. through a proxy), by region.
    pub database_override: HashMap<&'static str, String>,
    /// Regions that join later ([`Cluster::join`]): the others' configurations do not list them.
    pub joining: Vec<&'static str>,
    /// Serve every region's API over HTTPS with these files, peers as `https://localhost:…`.
    pub https: Option<TestPki>,
    /// Whether the regions can reach each other's APIs (not when a test makes them refuse each
    /// other): only then does the start wait for their first copy.
    pub peers_reachable: bool,
    pub tweak: Box<dyn Fn(&mut Config)>,
}

/// Certificates made at test time: a CA, and a certificate for `localhost` and `127.0.0.1` it
/// signed (also good as a client certificate).
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl TestPki {
    /// `expired`: the certificate's validity ended in 2021.
    pub fn new(expired: bool) -> TestPki {
        let dir = std::env::temp_dir().join(format!("locus-pki-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "locus test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }

    /// What region `region` needs to reach a NATS server with these certificates: the CA, a
    /// client certificate, and its user (password [`SecureNats::password`]).
    pub fn nats_settings(&self, region: &str) -> locus::config::NatsSettings {
        locus::config::NatsSettings {
            ca_file: Some(self.ca.clone()),
            cert_file: Some(self.cert.clone()),
            key_file: Some(self.key.clone()),
            user: Some(region.to_owned()),
            password: Some(SecureNats::password(region).into()),
            credentials_file: None,
        }
    }

    /// Options of a NATS client as `user`: TLS trusting this CA, presenting this certificate.
    pub fn nats_client(&self, user: &str, password: &str) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(self.ca.clone())
            .add_client_certificate(self.cert.clone(), self.key.clone())
            .user_and_password(user.to_owned(), password.to_owned())
    }

    /// An HTTP client that trusts this CA.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .build()
            .unwrap()
    }
}

impl Setup {
    pub fn regions(ids: &[&'static str]) -> Setup {
        Setup {
            ids: ids.to_vec(),
            peer_override: HashMap::new(),
            database_override: HashMap::new(),
            joining: Vec::new(),
            https: None,
            peers_reachable: true,
            tweak: Box::new(|_| {}),
        }
    }

    /// `ids` start only when [`Cluster::join`] says so, as regions added to a running deployment.
    pub fn joining_later(mut self, ids: &[&'static str]) -> Setup {
        self.joining = ids.to_vec();
        self
    }

    pub fn tweak(mut self, f: impl Fn(&mut Config) + 'static) -> Setup {
        let earlier = self.tweak;
        self.tweak = Box::new(move |config| {
            earlier(config);
            f(config)
        });
        self
    }

    /// Reach NATS through a server of the test's own, which it can kill and restart.
    pub fn on_nats(self, nats: &TestNats) -> Setup {
        let url = nats.url();
        self.tweak(move |config| config.nats_url = url.clone())
    }

    /// Start, with `region` reaching NATS through a link the test can cut (its consumers stall and
    /// its publisher stops; its API stays up).
    pub async fn start_with_nats_link(self, region: &'static str) -> (Cluster, Link) {
        let link = link_to(nats().trim_start_matches("nats://")).await;
        let through_link = format!("nats://{}", link.addr);
        let tweak = self.tweak;
        let setup = Setup {
            tweak: Box::new(move |config| {
                tweak(config);
                if config.region == region {
                    config.nats_url = through_link.clone();
                }
            }),
            ..self
        };
        (setup.start().await, link)
    }
}

pub struct Cluster {
    pub http: reqwest::Client,
    pub deployment: String,
    ids: Vec<&'static str>,
    regions: HashMap<&'static str, RunningRegion>,
    /// Regions set up to join later, with the listener they will serve on.
    joining: HashMap<&'static str, (Config, TcpListener)>,
    urls: HashMap<&'static str, String>,
    databases: Vec<String>,
}

pub async fn cluster(ids: &[&'static str]) -> Cluster {
    Setup::regions(ids).start().await
}

/// Logs of the regions under test, shown for failing tests (`RUST_LOG` selects, default warn).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The settings every test region starts from: no peers, short timeouts, small streams.
pub fn test_config(deployment: &str, id: &str, database_url: String) -> Config {
    Config {
        deployment: deployment.into(),
        region: id.into(),
        listen: "127.0.0.1:0".into(),
        advertise_url: None,
        database_url: database_url.into(),
        database_pool_size: 4,
        nats_url: nats().into(),
        admin_token: ADMIN.into(),
        peer_token: PEER.into(),
        accepted_peer_tokens: Vec::new(),
        api_tokens: Vec::new(),
        peers: Vec::new(),
        limits: Limits::default(),
        forwarding: Forwarding {
            connect_timeout_ms: 500,
            request_timeout_ms: 3_000,
            retry_after_secs: 2,
            probe_interval_ms: 500,
        },
        clock: Default::default(),
        resolvers: Default::default(),
        repair: Default::default(),
        tls: Default::default(),
        nats: Default::default(),
        replication: Replication {
            stream_max_bytes: 64 * 1024 * 1024,
            stream_replicas: 1,
            streams_in_region_clusters: false,
            session_wait_ms: 300,
            heartbeat_interval_ms: 250,
            // Tests that count tombstones keep them; the reclamation test shortens this.
            reclaim_interval_ms: 3_600_000,
        },
    }
}

impl Setup {
    pub async fn start(self) -> Cluster {
        init_logging();
        let mut listeners = Vec::new();
        let mut urls = HashMap::new();
        for id in &self.ids {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = match &self.https {
                None => format!("http://{}", listener.local_addr().unwrap()),
                Some(_) => format!(
                    "https://localhost:{}",
                    listener.local_addr().unwrap().port()
                ),
            };
            urls.insert(*id, url);
            listeners.push(listener);
        }
        let run = format!("{:08x}", rand::random::<u32>());
        let mut regions = HashMap::new();
        let mut joining = HashMap::new();
        let mut databases = Vec::new();
        for (id, listener) in self.ids.iter().zip(listeners) {
            let database_url = format!("{}/locus_test_{run}_{id}", postgres_base());
            databases.push(database_url.clone());
            let mut config = test_config(&format!("test{run}"), id, database_url);
            if let Some(url) = self.database_override.get(id) {
                config.database_url = url.clone().into();
            }
            config.peers = self
                .ids
                .iter()
                .filter(|p| *p != id && !self.joining.contains(p))
                .map(|p| Peer {
                    id: (*p).into(),
                    api_url: self
                        .peer_override
                        .get(p)
                        .cloned()
                        .unwrap_or_else(|| urls[p].clone()),
                })
                .collect();
            if let Some(pki) = &self.https {
                config.tls.cert_file = Some(pki.cert.clone());
                config.tls.key_file = Some(pki.key.clone());
                config.tls.peer_ca_file = Some(pki.ca.clone());
                config.advertise_url = Some(urls[id].clone());
            }
            (self.tweak)(&mut config);
            config.validate().expect("test config is valid");
            if self.joining.contains(id) {
                joining.insert(*id, (config, listener));
                continue;
            }
            let running = app::start(config, Some(listener))
                .await
                .expect("region starts");
            regions.insert(*id, running);
        }
        // Ready means writable: each region has asked its peers whether its database was
        // restored, which it can only do once they listen.
        for (id, running) in &regions {
            tokio::time::timeout(std::time::Duration::from_secs(20), running.region.settled())
                .await
                .unwrap_or_else(|_| panic!("{id} settles its incarnation"));
        }
        // And holds the deployment's data: a new region copies it from a peer first (which it
        // cannot do when its peers are a black hole).
        if self.peers_reachable && self.peer_override.is_empty() {
            for (id, running) in &regions {
                wait_until_copied(id, running).await;
            }
        }
        Cluster {
            http: self
                .https
                .as_ref()
                .map_or_else(reqwest::Client::new, TestPki::client),
            deployment: format!("test{run}"),
            ids: self.ids.clone(),
            regions,
            joining,
            urls,
            databases,
        }
    }
}

/// Wait (up to 30 s) until a region's first copy of the deployment's data is complete.
async fn wait_until_copied(id: &str, running: &RunningRegion) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while running.region.is_bootstrapping() {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} copies the deployment's data"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// Start a region set up with [`Setup::joining_later`]: it announces itself to the running
    /// regions and copies their data. Returns at once; its `/readyz` says when it is ready.
    pub async fn join(&mut self, id: &'static str) {
        self.join_with(id, |_| {}).await;
    }

    /// [`Cluster::join`], with a last change to the region's configuration (its peers' URLs
    /// through a link made once the others listen, say).
    pub async fn join_with(&mut self, id: &'static str, tweak: impl FnOnce(&mut Config)) {
        let (mut config, listener) = self.joining.remove(id).expect("a region set up to join");
        tweak(&mut config);
        let running = app::start(config, Some(listener))
            .await
            .expect("joining region starts");
        self.regions.insert(id, running);
    }

    pub fn url(&self, id: &str) -> &str {
        &self.urls[id]
    }

    /// The regions of this cluster, in the order they were set up.
    pub fn ids(&self) -> &[&'static str] {
        &self.ids
    }

    pub fn region(&self, id: &str) -> &RunningRegion {
        &self.regions[id]
    }

    /// Start another process of region `id`, on its own port and against the same database, as
    /// when a region runs several replicas behind a load balancer.
    pub async fn second_process(&self, id: &str) -> RunningRegion {
        let config = self.regions[id].region.config.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        app::start(config, Some(listener))
            .await
            .expect("second process starts")
    }

    /// Start a stopped region again, on its old address and database.
    pub async fn restart(&mut self, id: &'static str, config: Config) {
        let addr = self.urls[id].trim_start_matches("http://").to_owned();
        let mut listener = None;
        for _ in 0..50 {
            match TcpListener::bind(&addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        let running = app::start(config, Some(listener.expect("the old port is free again")))
            .await
            .expect("region restarts");
        self.regions.insert(id, running);
    }

    /// Every stored record of `collections` in region `id`, as JSON, in key order: what must be
    /// identical in every region once replication is quiet.
    pub async fn stored_states(
        &self,
        id: &str,
        collections: &[&str],
    ) -> Vec<(String, String, Value)> {
        sqlx::query_as::<_, (String, String, Value)>(
            "SELECT collection, key, state::jsonb FROM records WHERE collection = ANY($1) ORDER BY collection, key",
        )
        .bind(collections)
        .fetch_all(self.region(id).region.store.pool())
        .await
        .unwrap()
    }

    /// The keys of `collection` with a stored row (live or not) in region `id`, in key order.
    pub async fn stored_keys(&self, id: &str, collection: &str) -> Vec<String> {
        self.stored_states(id, &[collection])
            .await
            .into_iter()
            .map(|(_, key, _)| key)
            .collect()
    }

    /// Every stored record of region `id`, system collections included, in key order.
    pub async fn whole_region(&self, id: &str) -> Vec<(String, String, Value)> {
        sqlx::query_as::<_, (String, String, Value)>(
            "SELECT collection, key, state::jsonb FROM records ORDER BY collection, key",
        )
        .fetch_all(self.region(id).region.store.pool())
        .await
        .unwrap()
    }

    /// A region's anti-entropy view of itself, through its peer API: every collection and the
    /// digests of its buckets.
    pub async fn digests(&self, id: &str) -> Vec<(String, Value)> {
        let peer_get = |path: String| async move {
            let response = self
                .request(id, Method::GET, &path)
                .bearer_auth(PEER)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            response.json::<Value>().await.unwrap()
        };
        let collections = peer_get("/v1/peer/collections".into()).await;
        let mut digests = Vec::new();
        for collection in collections["collections"].as_array().unwrap() {
            let name = collection.as_str().unwrap().to_owned();
            let buckets = peer_get(format!("/v1/peer/digests?collection={name}")).await;
            digests.push((name, buckets["buckets"].clone()));
        }
        digests
    }

    /// Run an anti-entropy round in every running region against every other, through the admin
    /// API.
    pub async fn repair_everywhere(&self) {
        for id in &self.ids {
            for peer in &self.ids {
                if id == peer || !self.regions.contains_key(id) || !self.regions.contains_key(peer)
                {
                    continue;
                }
                let response = self
                    .request(id, Method::POST, &format!("/v1/regions/{peer}/repair"))
                    .bearer_auth(ADMIN)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status(),
                    StatusCode::OK,
                    "repair at {id} from {peer}"
                );
            }
        }
    }

    /// Wait (up to 60 s) until every running region holds exactly the same records, all
    /// collections included, and their anti-entropy digests agree: how every multi-region test
    /// ends.
    pub async fn assert_converged(&self) {
        let running: Vec<&str> = self
            .ids
            .iter()
            .copied()
            .filter(|id| self.regions.contains_key(id))
            .collect();
        let Some((first, others)) = running.split_first() else {
            return;
        };
        if others.is_empty() {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let reference = self.whole_region(first).await;
            let mut differing = Vec::new();
            for id in others {
                let theirs = self.whole_region(id).await;
                if theirs != reference {
                    differing.push((*id, theirs));
                }
            }
            if differing.is_empty() {
                // Read a moment after the records: a region may reclaim a tombstone every region
                // applied in between (each does so on its own schedule), so a difference here is
                // only a failure if it lasts.
                let reference = self.digests(first).await;
                let mut digests_differ = None;
                for id in others {
                    let theirs = self.digests(id).await;
                    if theirs != reference {
                        digests_differ = Some((*id, theirs));
                        break;
                    }
                }
                let Some((id, theirs)) = digests_differ else {
                    return;
                };
                if std::time::Instant::now() > deadline {
                    assert_eq!(
                        theirs, reference,
                        "{id}'s digests differ from {first}'s although their records are equal"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            if std::time::Instant::now() > deadline {
                for (id, theirs) in &differing {
                    print_differences(first, &reference, id, theirs);
                }
                panic!("regions did not converge within 60s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Stop a region: its port closes, so peers find it unreachable. Its database stays.
    pub async fn stop(&mut self, id: &str) {
        let running = self.regions.remove(id).expect("a running region");
        running.stop().await.unwrap();
    }

    pub fn request(&self, id: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url(id)))
    }

    /// GET `path` and parse the JSON body, whatever the status.
    pub async fn get_json(&self, id: &str, path: &str) -> Value {
        self.request(id, Method::GET, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Region `id`'s entry for `peer` in its `/v1/regions`.
    pub async fn peer_entry(&self, id: &str, peer: &str) -> Value {
        let regions = self.get_json(id, "/v1/regions").await;
        regions["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == peer)
            .cloned()
            .unwrap_or_else(|| panic!("{id} lists {peer}: {regions}"))
    }

    /// The region's Prometheus text.
    pub async fn metrics(&self, id: &str) -> String {
        self.request(id, Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get_status(&self, id: &str, path: &str) -> StatusCode {
        self.request(id, Method::GET, path)
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn put(&self, id: &str, collection: &str, key: &str, value: &Value) -> Response {
        self.request(id, Method::PUT, &record_path(collection, key))
            .json(value)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, id: &str, collection: &str, key: &str) -> Response {
        self.request(id, Method::GET, &record_path(collection, key))
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, id: &str, collection: &str, key: &str) -> Response {
        self.request(id, Method::DELETE, &record_path(collection, key))
            .send()
            .await
            .unwrap()
    }

    pub async fn configure(&self, id: &str, collection: &str, policy: &Value) -> Response {
        self.request(id, Method::PUT, &format!("/v1/collections/{collection}"))
            .bearer_auth(ADMIN)
            .json(policy)
            .send()
            .await
            .unwrap()
    }

    /// Configure the same policy in every running region (until policies replicate on their own).
    pub async fn configure_everywhere(&self, collection: &str, policy: &Value) {
        for id in self.regions.keys() {
            let response = self.configure(id, collection, policy).await;
            assert!(
                response.status().is_success(),
                "configure at {id}: {}",
                response.status()
            );
        }
    }

    /// Check that the running regions converged (every multi-region test ends so), then stop
    /// every region and drop their databases.
    pub async fn teardown(self) {
        self.assert_converged().await;
        self.teardown_without_checks().await;
    }

    /// Stop every region and drop their databases, whatever state they are in.
    pub async fn teardown_without_checks(mut self) {
        for (_, running) in self.regions.drain() {
            let _ = running.stop().await;
        }
        for url in self.databases.drain(..) {
            let _ = sqlx::Postgres::force_drop_database(&url).await;
        }
        let _ = locus::replication::delete_streams(nats(), &self.deployment, &self.ids).await;
    }
}

impl Drop for Cluster {
    /// A test that failed before its teardown still drops its databases (from a thread of its
    /// own, since the test's runtime is unwinding).
    fn drop(&mut self) {
        let databases = std::mem::take(&mut self.databases);
        if databases.is_empty() {
            return;
        }
        let (deployment, ids) = (self.deployment.clone(), self.ids.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for url in databases {
                    let _ = sqlx::Postgres::force_drop_database(&url).await;
                }
                let _ = locus::replication::delete_streams(nats(), &deployment, &ids).await;
            });
        })
        .join();
    }
}

/// Say which records differ between two regions' stored states (the first five), for whoever
/// reads a failed convergence.
pub fn print_differences(
    first: &str,
    reference: &[(String, String, Value)],
    id: &str,
    theirs: &[(String, String, Value)],
) {
    let ours: std::collections::BTreeMap<_, _> =
        reference.iter().map(|(c, k, s)| ((c, k), s)).collect();
    let mine: std::collections::BTreeMap<_, _> =
        theirs.iter().map(|(c, k, s)| ((c, k), s)).collect();
    let keys: std::collections::BTreeSet<_> = ours.keys().chain(mine.keys()).collect();
    for key in keys
        .into_iter()
        .filter(|k| ours.get(*k) != mine.get(*k))
        .take(5)
    {
        eprintln!(
            "{key:?}: {first} has {:?}\n  {id} has {:?}",
            ours.get(key),
            mine.get(key)
        );
    }
}

/// Poll `check` until it holds, for at most `seconds`; replication is asynchronous.
pub async fn eventually<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {seconds}s: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Wait until every region of `c` holds every one of `keys` of `collection`.
pub async fn until_everywhere(c: &Cluster, collection: &str, keys: &[String]) {
    eventually(20, "every region holds the records", || async {
        let mut all = true;
        for id in c.ids() {
            for key in keys {
                all &= c.get(id, collection, key).await.status() == StatusCode::OK;
            }
        }
        all
    })
    .await;
}

pub fn record_path(collection: &str, key: &str) -> String {
    format!("/v1/collections/{collection}/records/{key}")
}

pub fn header<'r>(response: &'r Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Assert a problem document with this status, and return its `detail`.
pub async fn expect_problem(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status, "status");
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );
    assert!(
        header(&response, "locus-region").is_some(),
        "problem responses carry Locus-Region"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:locus:problem:"),
        "{body}"
    );
    assert!(body["title"].is_string());
    body["detail"].as_str().expect("a detail").to_owned()
}

/// A link to `target` (`host:port`) the test can cut and mend.
pub type Link = locus::delay_proxy::DelayProxy;

pub async fn link_to(target: &str) -> Link {
    Link::start(target, std::time::Duration::ZERO)
        .await
        .unwrap()
}

/// A peer that accepts connections and never answers: a forwarded request to it times out.
pub async fn black_hole() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

/// A port nothing listens on right now, for processes that need their address before they start.
///
/// Not a port from the kernel's ephemeral range (32768 and up here): between this call and the
/// process binding it, any outgoing connection of this busy test process could take such a port
/// (seen as a NATS supercluster without its route port, so without JetStream quorum). Ports below
/// that range are never handed out implicitly, and none is handed out twice in one test process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..32_000u16);
        if given.contains(&port) || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
}

/// A NATS server of the test's own, on a free port with its own JetStream directory, that the test
/// can kill and restart (same port, same store) to cut replication off.
pub struct TestNats {
    pub port: u16,
    dir: std::path::PathBuf,
    server: Option<locus::nats_server::LocalNats>,
}

impl TestNats {
    pub async fn start() -> TestNats {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("locus-nats-{port}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nats = TestNats {
            port,
            dir,
            server: None,
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port and store, and wait until it accepts connections.
    pub async fn restart(&mut self) {
        let (port, dir) = (self.port, self.dir.clone());
        let server = tokio::task::spawn_blocking(move || {
            locus::nats_server::LocalNats::start(&nats_server_binary(), port, &dir, &[])
        })
        .await
        .unwrap()
        .expect("nats-server starts");
        self.server = Some(server);
    }

    /// SIGKILL: no goodbye to the clients, as in a crash.
    pub fn kill(&mut self) {
        self.server.take();
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A nats-server of the test's own that speaks TLS only (with `pki`'s certificate, verifying
/// clients' certificates against its CA) and knows one user per region, each granted only
/// [`locus::replication::permissions::for_region`], and an `admin` user.
pub struct SecureNats {
    pub port: u16,
    pub deployment: String,
    pub pki: TestPki,
    dir: std::path::PathBuf,
    server: Option<locus::nats_server::LocalNats>,
}

impl SecureNats {
    pub async fn start(pki: &TestPki, deployment: &str, regions: &[&str]) -> SecureNats {
        use locus::replication::permissions::{nats_users, PasswordSource};
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "locus-secure-nats-{port}-{:08x}",
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let passwords: Vec<String> = regions.iter().map(|r| Self::password(r)).collect();
        let users: Vec<(&str, PasswordSource)> = regions
            .iter()
            .zip(&passwords)
            .map(|(r, p)| (*r, PasswordSource::Literal(p)))
            .collect();
        let config = locus::nats_server::tls_config(
            &pki.cert,
            &pki.key,
            &pki.ca,
            &nats_users(
                deployment,
                &users,
                Some(PasswordSource::Literal(ADMIN_NATS_PASSWORD)),
            ),
        );
        let config_file = dir.join("server.conf");
        std::fs::write(&config_file, config).unwrap();
        let store = dir.join("store");
        let server = tokio::task::spawn_blocking(move || {
            let config_file = config_file.to_string_lossy().into_owned();
            locus::nats_server::LocalNats::start(
                &nats_server_binary(),
                port,
                &store,
                &["-c", &config_file],
            )
        })
        .await
        .unwrap()
        .expect("nats-server with TLS starts");
        SecureNats {
            port,
            deployment: deployment.to_owned(),
            pki: pki.clone(),
            dir,
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn password(region: &str) -> String {
        format!("nats-password-of-{region}")
    }

    /// Point `config` at this server as its region.
    pub fn configure(&self, config: &mut Config) {
        config.nats_url = self.url();
        config.nats = self.pki.nats_settings(&config.region);
    }

    /// A client as `user` (a region's inbox prefix when it is one), whose refusals by the
    /// server arrive on the returned channel.
    pub async fn client_as(
        &self,
        user: &str,
        password: &str,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = self
            .pki
            .nats_client(user, password)
            .custom_inbox_prefix(locus::replication::connection::inbox_prefix(
                &self.deployment,
                user,
            ))
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(error) = event {
                        let _ = tx.send(error.to_string());
                    }
                }
            })
            .connect(self.url())
            .await
            .expect("the test connects to its TLS nats-server");
        (client, rx)
    }

    pub async fn admin(&self) -> async_nats::Client {
        self.client_as("admin", ADMIN_NATS_PASSWORD).await.0
    }
}

pub const ADMIN_NATS_PASSWORD: &str = "nats-admin-password";

impl Drop for SecureNats {
    fn drop(&mut self) {
        self.server.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A peer that takes the request and hangs up without answering: the outcome is unknown.
pub async fn hang_up() -> (String, JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buffer = [0u8; 4096];
            let _ = socket.read(&mut buffer).await;
            drop(socket);
        }
    });
    (url, task)
}

/// The example resolvers, built for wasm32-unknown-unknown once per test run (in their own target
/// directory, so the build does not wait on the lock of the `cargo test` that runs this).
/// The toolchain file names the WebAssembly target, but rustup adds a file's targets only when it
/// installs the toolchain: add it here, a no-op once present.
pub fn add_wasm_target() {
    let _ = std::process::Command::new("rustup")
        .args(["target", "add", "wasm32-unknown-unknown"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
}

pub fn example_resolver(name: &str) -> Vec<u8> {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let root = env!("CARGO_MANIFEST_DIR");
    BUILT.get_or_init(|| {
        add_wasm_target();
        let status = std::process::Command::new(env!("CARGO"))
            .current_dir(root)
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-unknown-unknown",
                "--target-dir",
                "target/resolvers",
                "-p",
                "locus-resolver-cart",
                "-p",
                "locus-resolver-counter",
                "-p",
                "locus-resolver-merge-fields",
            ])
            .status()
            .expect("run cargo");
        assert!(
            status.success(),
            "building the example resolvers failed (is the wasm32-unknown-unknown target installed?)"
        );
    });
    let file = format!(
        "{root}/target/resolvers/wasm32-unknown-unknown/release/locus_resolver_{}.wasm",
        name.replace('-', "_")
    );
    std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"))
}

impl Cluster {
    /// Upload a resolver module (or WAT text) at `id`.
    pub async fn upload_resolver(&self, id: &str, name: &str, module: Vec<u8>) -> Response {
        self.request(id, Method::PUT, &format!("/v1/resolvers/{name}"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/wasm")
            .body(module)
            .send()
            .await
            .unwrap()
    }
}
