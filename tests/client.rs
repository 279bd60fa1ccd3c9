//! The geo-aware client (`locus-client`) and its command line, against three real regions: writes
//! go straight to the home, reads stay available and see the client's own writes, and a region
//! that is down costs the client one failed attempt, not a timeout per request.

use std::time::{Duration, Instant};

use locus_client::{Client, ClientConfig, Consistency, Error, Found, WriteOptions};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{eventually, record_path, until_everywhere, Cluster, Setup};

async fn client(c: &Cluster, read_preference: Option<&str>) -> Client {
    let mut config = ClientConfig::new(c.ids().iter().map(|id| c.url(id).to_owned()));
    config.probe_every = Duration::from_millis(200);
    config.read_preference = read_preference.map(str::to_owned);
    Client::connect(config)
        .await
        .expect("the client discovers the regions")
}

/// `k0`, `k1`, … : the keys the tests write.
fn keys(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("k{i}")).collect()
}

/// Create `k<i>` = `{"n": i}` of `things` homed in `homes[i]`, through `client`.
async fn create_at_homes(client: &Client, homes: &[&str]) -> Vec<locus_client::Written> {
    let mut written = Vec::new();
    for (i, home) in homes.iter().enumerate() {
        let options = WriteOptions {
            home: Some((*home).to_owned()),
            ..WriteOptions::default()
        };
        written.push(
            client
                .put_with("things", &format!("k{i}"), &json!({"n": i}), options)
                .await
                .unwrap(),
        );
    }
    written
}

/// Requests forwarded to `id` by its peers, by its metrics.
async fn forwarded_in(c: &Cluster, id: &str) -> u64 {
    c.metrics(id)
        .await
        .lines()
        .filter(|l| l.starts_with("locus_forwarded_requests_received_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

fn value_of(found: Option<Found>) -> Value {
    match found {
        Some(Found::Record { record, .. }) => record.value,
        other => panic!("expected a record, got {other:?}"),
    }
}

#[tokio::test]
async fn the_client_writes_straight_home_reads_its_own_writes_anywhere_and_resolves_siblings() {
    // us reaches NATS through a link the test cuts, to make its replica lag.
    let (c, mut link) = Setup::regions(&["eu", "us", "ap"])
        .start_with_nats_link("us")
        .await;
    let anywhere = client(&c, None).await;
    let ids: Vec<String> = anywhere.regions().into_iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");

    // New records homed in each region, then updates: every write lands at the home itself.
    let homes = ["eu", "us", "ap", "eu", "us", "ap"];
    let created = create_at_homes(&anywhere, &homes).await;
    for (i, (home, created)) in homes.into_iter().zip(created).enumerate() {
        let key = format!("k{i}");
        assert!(created.created);
        assert_eq!(created.region, home);
        let updated = anywhere
            .put("things", &key, &json!({"n": i, "v": 2}))
            .await
            .unwrap();
        assert_eq!((updated.region.as_str(), updated.created), (home, false));
    }
    for id in ["eu", "us", "ap"] {
        assert_eq!(
            forwarded_in(&c, id).await,
            0,
            "{id} saw a forwarded request"
        );
    }
    // The same update sent to a region that is not the home is forwarded, and counted.
    let forwarded = c.put("us", "things", "k0", &json!({"n": 0, "v": 3})).await;
    assert_eq!(forwarded.status(), StatusCode::OK);
    assert_eq!(forwarded_in(&c, "eu").await, 1);

    // With us cut off from replication, a client that reads at us still reads its own writes.
    link.cut();
    let at_us = client(&c, Some("us")).await;
    for round in 0..8 {
        at_us
            .put("things", "k0", &json!({"round": round}))
            .await
            .unwrap();
        let read = at_us.get("things", "k0").await.unwrap();
        assert_eq!(value_of(read), json!({"round": round}));
    }
    // Another client, without those session tokens, sees us's stale replica there, unless it
    // bounds the staleness.
    let stranger = client(&c, Some("us")).await;
    assert_ne!(
        value_of(stranger.get("things", "k0").await.unwrap()),
        json!({"round": 7})
    );
    eventually(20, "us's lag shows in its heartbeats", || async {
        let bounded = stranger
            .get_with(
                "things",
                "k0",
                Consistency::MaxStaleness(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        value_of(bounded) == json!({"round": 7})
    })
    .await;

    // Concurrent versions (written in eu and, cut off, in us) come back as siblings, and the
    // client resolves them with their ETag.
    c.configure_everywhere(
        "carts",
        &json!({"homing": "anywhere", "conflicts": {"strategy": "siblings"}}),
    )
    .await;
    for (id, item) in [("eu", "apple"), ("us", "pear")] {
        let r = c.put(id, "carts", "c1", &json!({"items": [item]})).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{id}");
    }
    link.resume().await.unwrap();
    // Every region must hold both versions before the resolution, or one would merge it with a
    // version it has not seen yet (and show siblings again).
    eventually(30, "every region holds both versions", || async {
        let mut all = true;
        for id in ["eu", "us", "ap"] {
            all &= c.get(id, "carts", "c1").await.status() == StatusCode::MULTIPLE_CHOICES;
        }
        all
    })
    .await;
    let Some(Found::Siblings(siblings)) = anywhere.get("carts", "c1").await.unwrap() else {
        panic!("the client does not show the siblings");
    };
    assert_eq!(siblings.siblings.len(), 2);
    let resolved = anywhere
        .resolve(&siblings, &json!({"items": ["apple", "pear"]}))
        .await
        .unwrap();
    assert!(!resolved.created);
    eventually(20, "every region shows the resolution", || async {
        let mut all = true;
        for id in ["eu", "us", "ap"] {
            let body: Value = c.get(id, "carts", "c1").await.json().await.unwrap();
            all &= body["value"] == json!({"items": ["apple", "pear"]});
        }
        all
    })
    .await;

    // Conditional writes: a stale ETag is refused, create-only on an existing record too.
    let stale = anywhere
        .put_with(
            "carts",
            "c1",
            &json!({}),
            WriteOptions {
                if_match: Some(siblings.etag.clone()),
                ..WriteOptions::default()
            },
        )
        .await;
    assert!(
        matches!(stale, Err(Error::Api { status: 412, .. })),
        "{stale:?}"
    );
    let again = anywhere
        .put_with(
            "things",
            "k1",
            &json!({}),
            WriteOptions {
                create_only: true,
                ..WriteOptions::default()
            },
        )
        .await;
    assert!(
        matches!(again, Err(Error::Api { status: 412, .. })),
        "{again:?}"
    );

    // Listing pages through everything, deletes remove.
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = anywhere
            .list("things", None, Some(4), cursor.as_deref())
            .await
            .unwrap();
        keys.extend(
            page.records
                .iter()
                .map(|r| r["key"].as_str().unwrap().to_owned()),
        );
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4", "k5"]);
    let deleted = anywhere.delete("things", "k5").await.unwrap();
    assert_eq!(deleted.region, "ap", "the delete went to k5's home");
    assert!(anywhere
        .get_with("things", "k5", Consistency::Home)
        .await
        .unwrap()
        .is_none());
    c.teardown().await;
}

#[tokio::test]
async fn with_a_region_down_the_client_reads_elsewhere_and_writes_homed_there_fail_at_once() {
    let mut c = Setup::regions(&["eu", "us", "ap"]).start().await;
    let client = client(&c, None).await;
    create_at_homes(&client, &["eu", "us", "ap"]).await;
    until_everywhere(&c, "things", &keys(3)).await;

    c.stop("ap").await;
    for round in 0..15 {
        for i in 0..3 {
            let read = client.get("things", &format!("k{i}")).await;
            assert_eq!(value_of(read.unwrap()), json!({"n": i}), "round {round}");
        }
    }
    // Failed reads and probes take ap out of rotation (within a probe or two on a loaded machine).
    eventually(5, "ap goes out of rotation", || async {
        client
            .regions()
            .iter()
            .any(|(id, _, available, _)| id == "ap" && !available)
    })
    .await;

    // A write for a record homed in ap gets the policy's answer (reject) at once.
    let started = Instant::now();
    let refused = client.put("things", "k2", &json!({"n": 22})).await;
    let took = started.elapsed();
    match refused {
        Err(Error::HomeUnavailable { home, .. }) => assert_eq!(home.as_deref(), Some("ap")),
        other => panic!("expected the home to be unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_millis(1_500), "took {took:?}");
    // Records homed elsewhere take writes as before.
    let written = client.put("things", "k0", &json!({"n": 10})).await.unwrap();
    assert_eq!(written.region, "eu");
    c.teardown().await;
}

#[tokio::test]
async fn the_command_line_reads_and_writes_through_the_client() {
    let c = Setup::regions(&["eu", "us"]).start().await;
    let seeds = format!("{},{}", c.url("eu"), c.url("us"));
    // The regions serve from this test's runtime: the command runs without blocking it.
    let locus = async |args: &[&str]| {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_locus"))
            .args(args)
            .env("LOCUS_SEEDS", &seeds)
            .env("RUST_LOG", "error")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            panic!("{args:?} printed no JSON ({e}): {stdout}\n{stderr}")
        });
        (output.status.success(), json)
    };
    let (ok, written) = locus(&[
        "put",
        "notes",
        "n1",
        r#"{"text":"hi"}"#,
        "--home-region",
        "us",
    ])
    .await;
    assert!(ok, "{written}");
    assert_eq!(written["created"], true);
    assert_eq!(written["region"], "us");
    assert!(written["idempotency_key"].is_string());
    // The same write again (the same request, under its key) is a replay, not a second write.
    let key = written["idempotency_key"].as_str().unwrap().to_owned();
    let (ok, again) = locus(&[
        "put",
        "notes",
        "n1",
        r#"{"text":"hi"}"#,
        "--home-region",
        "us",
        "--idempotency-key",
        &key,
    ])
    .await;
    assert!(ok && again["replayed"] == true, "{again}");
    // A new process knows no homes: it reads and writes at the nearest region, which
    // forwards to the home once it holds the record.
    eventually(20, "eu holds n1", || async {
        c.get("eu", "notes", "n1").await.status() == StatusCode::OK
    })
    .await;
    let (ok, read) = locus(&["get", "notes", "n1", "--home"]).await;
    assert!(ok);
    assert_eq!(
        (read["value"].clone(), read["home"].clone()),
        (json!({"text": "hi"}), json!("us"))
    );
    let (ok, page) = locus(&["list", "notes", "--limit", "10"]).await;
    assert!(ok);
    assert_eq!(page["records"].as_array().unwrap().len(), 1);
    let (ok, _) = locus(&["delete", "notes", "n1"]).await;
    assert!(ok);
    let (ok, absent) = locus(&["get", "notes", "n1", "--home"]).await;
    assert!(!ok, "an absent record exits 1");
    assert_eq!(absent, Value::Null);
    let raw = c
        .request("eu", Method::GET, &record_path("notes", "n1"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::NOT_FOUND);
    c.teardown().await;
}

/// Which regions answered 60 reads through `reader`, by their metrics.
async fn reads_by_region(c: &Cluster, reader: &Client) -> Vec<u64> {
    let before = served(c).await;
    for n in 0..60 {
        assert_eq!(
            value_of(reader.get("things", &format!("k{}", n % 5)).await.unwrap()),
            json!({"n": n % 5})
        );
    }
    let after = served(c).await;
    after.iter().zip(&before).map(|(a, b)| a - b).collect()
}

/// Record reads each region has answered, by their metrics.
async fn served(c: &Cluster) -> Vec<u64> {
    let mut counts = Vec::new();
    for id in ["eu", "us", "ap"] {
        counts.push(reads_served(c, id).await);
    }
    counts
}

/// Record reads `id` has answered, by its metrics.
async fn reads_served(c: &Cluster, id: &str) -> u64 {
    c.metrics(id)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("locus_http_requests_total{")
                && l.contains("method=\"GET\"")
                && l.contains("route=\"/v1/collections/{c}/records/{key}\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

#[tokio::test]
async fn reads_go_mostly_to_the_near_region_and_a_region_that_turns_slow_sheds_them() {
    use locus::delay_proxy::DelayProxy;
    let c = Setup::regions(&["eu", "us", "ap"]).start().await;
    // Distance, as delay proxies between the client and each region: eu is near.
    let mut links = Vec::new();
    for (id, one_way_ms) in [("eu", 1), ("us", 25), ("ap", 25)] {
        let addr = c.url(id).trim_start_matches("http://").to_owned();
        links.push(
            DelayProxy::start(&addr, Duration::from_millis(one_way_ms))
                .await
                .unwrap(),
        );
    }
    let mut config = ClientConfig::new(links.iter().map(DelayProxy::url));
    config.probe_every = Duration::from_millis(200);
    let client = Client::connect(config).await.unwrap();
    for i in 0..5 {
        client
            .put("things", &format!("k{i}"), &json!({"n": i}))
            .await
            .unwrap();
    }
    until_everywhere(&c, "things", &keys(5)).await;
    // A reader without session tokens, once its probes have measured every region.
    let mut config = ClientConfig::new(links.iter().map(DelayProxy::url));
    config.probe_every = Duration::from_millis(200);
    let reader = Client::connect(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    let share = reads_by_region(&c, &reader).await;
    assert_eq!(share.iter().sum::<u64>(), 60, "{share:?}");
    assert!(
        share[0] >= 30,
        "the near region carries most reads: {share:?}"
    );

    // ap turns slow: it sheds its reads to the others.
    links[2].set_delay(Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let share = reads_by_region(&c, &reader).await;
    assert!(share[2] <= 2, "the slow region is avoided: {share:?}");
    assert!(share[0] >= 30, "{share:?}");
    c.teardown().await;
}
