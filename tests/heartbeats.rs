//! Heartbeats: every region promises, through its stream, "every write of mine with an HLC below T
//! is before this", so each region knows how far behind every peer it is even while nobody writes,
//! and a read with `Locus-Max-Staleness` is served locally only when that promise is recent enough.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use locus::clock::hlc::Hlc;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{eventually, header, record_path, Cluster, Setup};

async fn lag_ms(c: &Cluster, id: &str, peer: &str) -> Option<u64> {
    c.peer_entry(id, peer).await["lag_ms"].as_u64()
}

/// A read of `key` at `id` accepting `max_ms` of staleness: who answered, and the value.
async fn bounded_read(c: &Cluster, id: &str, key: &str, max_ms: &str) -> (String, Value) {
    let response = c
        .request(id, Method::GET, &record_path("notes", key))
        .header("Locus-Max-Staleness", max_ms)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let served_by = header(&response, "locus-region").unwrap().to_owned();
    (
        served_by,
        response.json::<Value>().await.unwrap()["value"].clone(),
    )
}

#[tokio::test]
async fn a_stalled_consumer_shows_its_lag_and_bounded_staleness_reads_go_to_the_home() {
    let (c, mut link) = Setup::regions(&["eu", "us", "ap"])
        .start_with_nats_link("us")
        .await;
    assert_eq!(
        c.put("eu", "notes", "n1", &json!({"v": 1})).await.status(),
        StatusCode::CREATED
    );
    eventually(20, "us applies eu's heartbeats and write", || async {
        lag_ms(&c, "us", "eu").await.is_some_and(|lag| lag < 2_000)
            && lag_ms(&c, "us", "ap").await.is_some_and(|lag| lag < 2_000)
            && c.get("us", "notes", "n1").await.status() == StatusCode::OK
    })
    .await;

    // Nobody writes for a while: the heartbeats keep the lag small all the same.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for peer in ["eu", "ap"] {
        let lag = lag_ms(&c, "us", peer).await.unwrap();
        assert!(lag < 2_000, "idle, us is {lag} ms behind {peer}");
    }
    let (served_by, value) = bounded_read(&c, "us", "n1", "3000").await;
    assert_eq!((served_by.as_str(), value), ("us", json!({"v": 1})));

    // Cut us off from NATS, then change the record at its home.
    link.cut();
    assert_eq!(
        c.put("eu", "notes", "n1", &json!({"v": 2})).await.status(),
        StatusCode::OK
    );
    eventually(20, "us's lag grows from the missing heartbeats", || async {
        lag_ms(&c, "us", "eu").await.is_some_and(|lag| lag > 3_000)
            && lag_ms(&c, "us", "ap").await.is_some_and(|lag| lag > 3_000)
    })
    .await;
    let metrics = c.metrics("us").await;
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("locus_replication_lag_ms{origin=\"eu\"}"))
        .unwrap_or_else(|| panic!("no lag gauge for eu in\n{metrics}"));
    let gauged: f64 = gauge.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(gauged > 3_000.0, "{gauge}");

    // A bounded read too strict for us's replica goes to the home and sees the new value; one that
    // tolerates the lag, or none, is served by us's stale replica.
    let (served_by, value) = bounded_read(&c, "us", "n1", "2000").await;
    assert_eq!((served_by.as_str(), value), ("eu", json!({"v": 2})));
    let (served_by, value) = bounded_read(&c, "us", "n1", "600000").await;
    assert_eq!((served_by.as_str(), value), ("us", json!({"v": 1})));
    let plain = c.get("us", "notes", "n1").await;
    assert_eq!(header(&plain, "locus-region"), Some("us"));
    assert_eq!(
        plain.json::<Value>().await.unwrap()["value"],
        json!({"v": 1})
    );
    let bad = c
        .request("us", Method::GET, &record_path("notes", "n1"))
        .header("Locus-Max-Staleness", "soon")
        .send()
        .await
        .unwrap();
    crate::helpers::expect_problem(bad, StatusCode::BAD_REQUEST).await;

    // The link mended, us catches up and is fresh again.
    link.resume().await.unwrap();
    eventually(30, "us catches up with eu", || async {
        lag_ms(&c, "us", "eu").await.is_some_and(|lag| lag < 2_000)
            && lag_ms(&c, "us", "ap").await.is_some_and(|lag| lag < 2_000)
    })
    .await;
    let (served_by, value) = bounded_read(&c, "us", "n1", "3000").await;
    assert_eq!((served_by.as_str(), value), ("us", json!({"v": 2})));
    c.teardown().await;
}

/// The promise itself, checked while writes pour in: whenever us says it is applied through T
/// from eu, every write eu acknowledged with an HLC below T is already at us.
#[tokio::test]
async fn every_write_below_a_heartbeat_promise_is_applied_when_the_promise_is() {
    let c = Setup::regions(&["eu", "us"])
        .tweak(|config| config.replication.heartbeat_interval_ms = 50)
        .start()
        .await;
    let acknowledged: Arc<Mutex<Vec<(String, Hlc)>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (http, url, acknowledged) =
                (c.http.clone(), c.url("eu").to_owned(), acknowledged.clone());
            tokio::spawn(async move {
                for i in 0..150 {
                    let key = format!("w{writer}-{i}");
                    let response = http
                        .put(format!("{url}{}", record_path("notes", &key)))
                        .bearer_auth(crate::helpers::ADMIN)
                        .json(&json!({"i": i}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::CREATED);
                    let body: Value = response.json().await.unwrap();
                    let hlc: Hlc = body["hlc"].as_str().unwrap().parse().unwrap();
                    acknowledged.lock().unwrap().push((key, hlc));
                }
            })
        })
        .collect();

    // While they write: take us's promise from eu, then what us holds.
    let mut checks = Vec::new();
    while !writers.iter().all(|w| w.is_finished()) {
        let through = c.peer_entry("us", "eu").await["applied_through_ms"].as_u64();
        let held: BTreeSet<String> = c
            .stored_states("us", &["notes"])
            .await
            .into_iter()
            .map(|(_, key, _)| key)
            .collect();
        if let Some(through) = through {
            checks.push((through, held));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), 600);
    let mut promised_writes = 0;
    for (through, held) in &checks {
        for (key, hlc) in &acknowledged {
            if hlc.millis() < *through {
                promised_writes += 1;
                assert!(
                    held.contains(key),
                    "us was applied through {through} from eu, but lacked {key} (HLC {})",
                    hlc.millis()
                );
            }
        }
    }
    assert!(
        checks.len() >= 5 && promised_writes > 0,
        "the check ran while writes flowed ({} checks, {promised_writes} writes under a promise)",
        checks.len()
    );
    c.teardown().await;
}

#[tokio::test]
async fn tombstones_are_reclaimed_only_once_every_region_applied_them_and_records_come_back_new() {
    let (c, mut link) = Setup::regions(&["eu", "us", "ap"])
        .tweak(|config| config.replication.reclaim_interval_ms = 500)
        .start_with_nats_link("ap")
        .await;
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for key in &keys {
        let put = c.put("eu", "tombs", key, &json!({"key": key})).await;
        assert_eq!(put.status(), StatusCode::CREATED);
    }
    crate::helpers::until_everywhere(&c, "tombs", &keys).await;

    // ap stops applying: what eu deletes now cannot be reclaimed anywhere, ap still needs it.
    link.cut();
    for key in &keys[..5] {
        assert_eq!(
            c.delete("eu", "tombs", key).await.status(),
            StatusCode::NO_CONTENT
        );
    }
    eventually(20, "us applies the deletes", || async {
        c.get("us", "tombs", "k4").await.status() == StatusCode::NOT_FOUND
    })
    .await;
    // Several reclamation passes and heartbeats later, the tombstones are all still held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in ["eu", "us", "ap"] {
        assert_eq!(
            c.stored_keys(id, "tombs").await,
            keys,
            "{id} kept every row"
        );
    }

    // ap applies them; then every region reclaims them, and says so.
    link.resume().await.unwrap();
    for id in ["eu", "us", "ap"] {
        eventually(30, "the tombstones are reclaimed", || async {
            c.stored_keys(id, "tombs").await == keys[5..]
        })
        .await;
        let metrics = c.metrics(id).await;
        let reclaimed: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("locus_tombstones_reclaimed_total "))
            .unwrap_or_else(|| panic!("{id} counts reclaimed tombstones"))
            .parse()
            .unwrap();
        assert!(reclaimed >= 5, "{id} reclaimed {reclaimed}");
        let regions = c.get_json(id, "/v1/regions").await;
        assert!(
            regions["tombstones_reclaimed_through_ms"]
                .as_u64()
                .is_some(),
            "{regions}"
        );
        assert_eq!(
            c.get(id, "tombs", "k0").await.status(),
            StatusCode::NOT_FOUND
        );
    }

    // A record written again after its tombstone was reclaimed is new everywhere, wherever it
    // is written.
    for (id, key) in [("us", "k1"), ("ap", "k2")] {
        let put = c.put(id, "tombs", key, &json!({"again": key})).await;
        assert_eq!(put.status(), StatusCode::CREATED, "{id} {key}");
    }
    for id in ["eu", "us", "ap"] {
        eventually(20, "the records written again read everywhere", || async {
            let k1 = c.get(id, "tombs", "k1").await;
            let k2 = c.get(id, "tombs", "k2").await;
            k1.status() == StatusCode::OK && k2.status() == StatusCode::OK && {
                k1.json::<Value>().await.unwrap()["value"] == json!({"again": "k1"})
                    && k2.json::<Value>().await.unwrap()["value"] == json!({"again": "k2"})
            }
        })
        .await;
    }
    c.teardown().await;
}
