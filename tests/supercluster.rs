//! The compose topology without Docker: nine `nats-server` processes on loopback, started from the
//! very files `docker-compose.yml` mounts (`deploy/nats/<region>.conf`, with only addresses and
//! paths substituted): three clusters of three, joined by gateways into a supercluster. Three locus
//! regions each talk to their own region's cluster and place their stream there, three times
//! replicated. Every hop is on TLS as in the compose file (clients, routes and gateways, with
//! certificates made at test time), and each region connects as its own NATS user from
//! `deploy/nats/users.conf`, allowed only what it needs. The test cuts one region off entirely and checks that nothing acknowledged is lost,
//! then adds a fourth region the way `docker-compose.add-region.yml` does: a fourth cluster from
//! `deploy/nats/sa.conf` joins by its gateways alone, and region sa joins the running deployment.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    eventually, free_port, record_path, Cluster, SecureNats, Setup, TestPki, ADMIN_NATS_PASSWORD,
};

/// The deployment `deploy/nats/users.conf` grants its permissions for.
const DEPLOYMENT: &str = "compose";

const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// The region `docker-compose.add-region.yml` adds.
const ADDED: &str = "sa";

/// The ports one server listens on.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    http: u16,
    cluster: u16,
    gateway: u16,
}

pub struct Supercluster {
    dir: PathBuf,
    pki: TestPki,
    ports: HashMap<String, Ports>,
    children: HashMap<String, Child>,
}

fn servers() -> Vec<(String, &'static str)> {
    REGIONS.iter().flat_map(|r| servers_of(r)).collect()
}

fn servers_of(region: &'static str) -> Vec<(String, &'static str)> {
    (1..=3)
        .map(move |i| (format!("nats-{region}-{i}"), region))
        .collect()
}

impl Supercluster {
    pub async fn start() -> Supercluster {
        let dir = std::env::temp_dir().join(format!("locus-super-{:08x}", rand::random::<u32>()));
        // Ports for the added region's servers too, so every file's addresses can be substituted.
        let ports = servers()
            .into_iter()
            .chain(servers_of(ADDED))
            .map(|(name, _)| {
                let ports = Ports {
                    client: free_port(),
                    http: free_port(),
                    cluster: free_port(),
                    gateway: free_port(),
                };
                (name, ports)
            })
            .collect();
        std::fs::create_dir_all(&dir).unwrap();
        // The configurations include it from their own folder.
        std::fs::copy(
            format!("{}/deploy/nats/users.conf", env!("CARGO_MANIFEST_DIR")),
            dir.join("users.conf"),
        )
        .unwrap();
        let mut cluster = Supercluster {
            dir,
            pki: TestPki::new(false),
            ports,
            children: HashMap::new(),
        };
        for (name, _) in servers() {
            cluster.start_server(&name);
        }
        for (name, _) in servers() {
            cluster.wait_listening(&name).await;
        }
        cluster
    }

    /// The compose file's configuration of `name`'s region, with this machine's addresses and paths.
    fn config_of(&self, name: &str, region: &str) -> String {
        let file = format!("{}/deploy/nats/{region}.conf", env!("CARGO_MANIFEST_DIR"));
        let mut text = std::fs::read_to_string(&file).unwrap();
        let own = self.ports[name];
        for (from, port) in [
            ("0.0.0.0:4222", own.client),
            ("0.0.0.0:8222", own.http),
            ("0.0.0.0:6222", own.cluster),
            ("0.0.0.0:7222", own.gateway),
        ] {
            text = text.replace(from, &format!("127.0.0.1:{port}"));
        }
        for (server, ports) in &self.ports {
            text = text.replace(
                &format!("{server}:6222"),
                &format!("127.0.0.1:{}", ports.cluster),
            );
            text = text.replace(
                &format!("{server}:7222"),
                &format!("127.0.0.1:{}", ports.gateway),
            );
        }
        for (from, to) in [
            ("/etc/nats/certs/server.pem", &self.pki.cert),
            ("/etc/nats/certs/server-key.pem", &self.pki.key),
            ("/etc/nats/certs/ca.pem", &self.pki.ca),
        ] {
            text = text.replace(from, to.to_str().unwrap());
        }
        let store = self.dir.join(name);
        text.replace("/data/jetstream", store.to_str().unwrap())
    }

    fn start_server(&mut self, name: &str) {
        let region = &name[5..7];
        std::fs::create_dir_all(self.dir.join(name)).unwrap();
        let config = self.dir.join(format!("{name}.conf"));
        std::fs::write(&config, self.config_of(name, region)).unwrap();
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(crate::helpers::nats_server_binary())
            .arg("-c")
            .arg(&config)
            .env("SERVER_NAME", name)
            .envs(REGIONS.iter().chain([&ADDED]).map(|r| {
                (
                    format!("NATS_PASSWORD_{}", r.to_uppercase()),
                    SecureNats::password(r),
                )
            }))
            .env("NATS_PASSWORD_ADMIN", ADMIN_NATS_PASSWORD)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs");
        self.children.insert(name.to_owned(), child);
    }

    async fn wait_listening(&self, name: &str) {
        let port = self.ports[name].client;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} did not start; see {}", self.dir.display());
    }

    /// Start the added region's cluster: its gateways reach the running clusters, which learn
    /// of it from them.
    pub async fn add_region(&mut self) {
        for (name, _) in servers_of(ADDED) {
            self.start_server(&name);
        }
        for (name, _) in servers_of(ADDED) {
            self.wait_listening(&name).await;
        }
    }

    /// SIGKILL one server.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a killed server again, on its ports and store.
    pub async fn restart(&mut self, name: &str) {
        self.start_server(name);
        self.wait_listening(name).await;
    }

    /// The client URLs of a region's three servers, as a locus `nats_url`.
    pub fn urls(&self, region: &str) -> String {
        (1..=3)
            .map(|i| {
                format!(
                    "tls://127.0.0.1:{}",
                    self.ports[&format!("nats-{region}-{i}")].client
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Supercluster {
    /// A client of `region`'s servers as the operators' `admin` user.
    pub async fn admin(&self, region: &str) -> async_nats::Client {
        self.pki
            .nats_client("admin", ADMIN_NATS_PASSWORD)
            .connect(locus::app::nats_servers(&self.urls(region)))
            .await
            .unwrap()
    }
}

impl Drop for Supercluster {
    fn drop(&mut self) {
        let names: Vec<String> = self.children.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn write(
    c: &Cluster,
    id: &str,
    collection: &str,
    key: &str,
    value: Value,
    home: Option<&str>,
) -> reqwest::Response {
    let mut request = c
        .request(id, reqwest::Method::PUT, &record_path(collection, key))
        .json(&value);
    if let Some(home) = home {
        request = request.header("locus-home", home);
    }
    request.send().await.unwrap()
}

async fn visible(c: &Cluster, id: &str, collection: &str, key: &str, value: &Value) -> bool {
    let response = c.get(id, collection, key).await;
    response.status() == StatusCode::OK
        && response.json::<Value>().await.unwrap_or_default()["value"] == *value
}

/// Wait until every running region stores the same state for `collections`.
async fn converged(c: &Cluster, collections: &[&str], seconds: u64) {
    eventually(
        seconds,
        "all three regions store the same records",
        || async {
            let reference = c.stored_states("eu", collections).await;
            for id in ["us", "ap"] {
                if c.stored_states(id, collections).await != reference {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

#[tokio::test]
async fn three_regions_on_a_nats_supercluster_survive_losing_a_server_and_a_whole_region() {
    let mut nats = Supercluster::start().await;
    let urls: HashMap<String, String> = REGIONS
        .iter()
        .chain([&ADDED])
        .map(|r| (r.to_string(), nats.urls(r)))
        .collect();
    let mut configs = HashMap::new();
    let setup_urls = urls.clone();
    let setup_settings: HashMap<String, locus::config::NatsSettings> = REGIONS
        .iter()
        .chain([&ADDED])
        .map(|r| (r.to_string(), nats.pki.nats_settings(r)))
        .collect();
    // The regions start at once, while the supercluster is still electing its leaders: a stream
    // that cannot be created yet is retried, and writes wait in the outbox meanwhile.
    let mut c = Setup::regions(&["eu", "us", "ap", ADDED])
        .joining_later(&[ADDED])
        .tweak(move |config| {
            config.deployment = DEPLOYMENT.into();
            config.nats = setup_settings[&config.region].clone();
            config.nats_url = setup_urls[&config.region].clone();
            config.replication.stream_replicas = 3;
            config.replication.streams_in_region_clusters = true;
        })
        .start()
        .await;
    for id in REGIONS {
        configs.insert(id, c.region(id).region.config.clone());
    }
    let first = write(
        &c,
        "eu",
        "notes",
        "early",
        json!("before the streams exist"),
        None,
    )
    .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let policy = json!({"homing": "record", "on_home_unreachable": "accept_local"});
    assert!(c
        .configure("eu", "profiles", &policy)
        .await
        .status()
        .is_success());

    // Writes cross the gateways: each region's stream lives in its own cluster.
    for id in REGIONS {
        let r = write(
            &c,
            id,
            "notes",
            &format!("from-{id}"),
            json!({"by": id}),
            None,
        )
        .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    eventually(90, "writes of every region reach every region", || async {
        for reader in REGIONS {
            if !visible(
                &c,
                reader,
                "notes",
                "early",
                &json!("before the streams exist"),
            )
            .await
            {
                return false;
            }
            for writer in REGIONS {
                if !visible(
                    &c,
                    reader,
                    "notes",
                    &format!("from-{writer}"),
                    &json!({"by": writer}),
                )
                .await
                {
                    return false;
                }
            }
        }
        true
    })
    .await;
    // Each region's stream sits in its own region's cluster, on all three of its servers.
    for region in REGIONS {
        let js = async_nats::jetstream::new(nats.admin(region).await);
        let name = locus::replication::stream_name(DEPLOYMENT, region);
        let info = js
            .get_stream(&name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        let placed = info.cluster.expect("a clustered stream");
        assert_eq!(placed.name.as_deref(), Some(region), "{name}");
        assert_eq!(info.config.num_replicas, 3);
        let mut servers: Vec<String> = placed.replicas.iter().map(|p| p.name.clone()).collect();
        servers.extend(placed.leader);
        servers.sort();
        assert_eq!(
            servers,
            (1..=3)
                .map(|i| format!("nats-{region}-{i}"))
                .collect::<Vec<_>>()
        );
    }
    eventually(30, "the policy reaches every region", || async {
        for id in REGIONS {
            let shown = c.get_json(id, "/v1/collections/profiles").await;
            if shown["policy"]["on_home_unreachable"] != "accept_local" {
                return false;
            }
        }
        true
    })
    .await;
    for i in 0..10 {
        let r = write(
            &c,
            "eu",
            "profiles",
            &format!("p{i}"),
            json!({"v": 0}),
            Some("eu"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }

    // One server of eu's cluster dies: its stream keeps two of three copies and a quorum.
    nats.kill("nats-eu-2");
    for id in REGIONS {
        let r = write(&c, id, "notes", &format!("one-down-{id}"), json!(id), None).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    eventually(60, "replication carries on with a server down", || async {
        for reader in REGIONS {
            for writer in REGIONS {
                if !visible(
                    &c,
                    reader,
                    "notes",
                    &format!("one-down-{writer}"),
                    &json!(writer),
                )
                .await
                {
                    return false;
                }
            }
        }
        true
    })
    .await;
    nats.restart("nats-eu-2").await;
    converged(&c, &["notes", "profiles"], 60).await;

    // eu is cut off: its three NATS servers and its API stop. us and ap keep writing, failover
    // writes to records homed in eu included.
    for i in 1..=3 {
        nats.kill(&format!("nats-eu-{i}"));
    }
    c.stop("eu").await;
    let mut acknowledged: Vec<(String, String, Value)> = Vec::new();
    for id in ["us", "ap"] {
        for i in 0..5 {
            let key = format!("cut-{id}-{i}");
            let r = write(&c, id, "notes", &key, json!(i), None).await;
            assert_eq!(r.status(), StatusCode::CREATED, "{id} {key}");
            acknowledged.push(("notes".into(), key, json!(i)));
        }
        let key = format!("p{}", if id == "us" { 1 } else { 2 });
        let value = json!({"v": 1, "by": id});
        let r = write(&c, id, "profiles", &key, value.clone(), None).await;
        assert_eq!(r.status(), StatusCode::OK, "{id} {key}");
        assert_eq!(
            r.headers()["locus-failover"],
            "true",
            "a failover write at {id}"
        );
        acknowledged.push(("profiles".into(), key, value));
    }

    // eu comes back first as a process, while its NATS is still down: it serves and takes writes
    // into its outbox. Then its NATS returns.
    c.restart("eu", configs["eu"].clone()).await;
    let r = write(
        &c,
        "eu",
        "notes",
        "while-eu-nats-down",
        json!("queued"),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    acknowledged.push(("notes".into(), "while-eu-nats-down".into(), json!("queued")));
    for i in 1..=3 {
        nats.restart(&format!("nats-eu-{i}")).await;
    }
    converged(&c, &["notes", "profiles"], 120).await;
    for (collection, key, value) in &acknowledged {
        for id in REGIONS {
            assert!(
                visible(&c, id, collection, key, value).await,
                "{id} lacks {collection}/{key} = {value}"
            );
        }
    }
    let regions = c.get_json("eu", "/v1/regions").await;
    assert_eq!(regions["regions"][0]["outbox_backlog"], 0, "{regions}");

    // A fourth region joins, as docker-compose.add-region.yml adds it: its own cluster, joined to
    // the supercluster by its gateways alone, and a region that lists the three as peers.
    nats.add_region().await;
    c.join(ADDED).await;
    eventually(
        120,
        "sa copies the deployment's data and reports ready",
        || async { c.get_status(ADDED, "/readyz").await == StatusCode::OK },
    )
    .await;
    let r = write(&c, ADDED, "notes", "from-sa", json!({"by": ADDED}), None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    eventually(
        60,
        "sa's write crosses the gateways to every region",
        || async {
            for reader in REGIONS {
                if !visible(&c, reader, "notes", "from-sa", &json!({"by": ADDED})).await {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for (collection, key, value) in &acknowledged {
        assert!(
            visible(&c, ADDED, collection, key, value).await,
            "sa lacks {collection}/{key} = {value}"
        );
    }
    c.teardown().await;
    drop(nats);
}
