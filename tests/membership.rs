//! Regions joining a running deployment: the membership record, the new region's copy of the
//! deployment's data under write load, and the peers adopting it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{eventually, record_path, Setup, PEER};

/// Records each existing region holds before the new one joins.
const SEEDED: usize = 50_000;

#[tokio::test]
async fn a_region_added_under_write_load_copies_everything_and_misses_no_write() {
    let mut c = Setup::regions(&["eu", "us", "ap"])
        .joining_later(&["ap"])
        .start()
        .await;
    for id in ["eu", "us"] {
        locus::bench::seed_records(&c.region(id).region.store, "seeded", SEEDED)
            .await
            .unwrap();
    }

    // Clients keep writing at eu and us, each write a new key, before, during and after the join.
    let acknowledged: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (n, id) in ["eu", "us", "eu", "us"].into_iter().enumerate() {
        let (url, http) = (c.url(id).to_owned(), c.http.clone());
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{n}-{i:06}");
                let value = json!({"writer": n, "i": i});
                let response = http
                    .put(format!("{url}{}", record_path("live", &key)))
                    .json(&value)
                    .send()
                    .await
                    .unwrap();
                if response.status().is_success() {
                    acknowledged.lock().unwrap().insert(key, value);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    c.join("ap").await;
    // Not ready until the copy is complete, and saying how far it is meanwhile.
    let mut saw_progress = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let response = c
            .request("ap", Method::GET, "/readyz")
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::OK {
            break;
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let detail = response.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(detail.starts_with("new region:"), "{detail}");
        saw_progress |= detail.contains(" records compared, ");
        assert!(
            std::time::Instant::now() < deadline,
            "ap is ready within 120 s: {detail}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        saw_progress,
        "/readyz showed the copy's progress while ap was not ready"
    );
    let regions = c.get_json("ap", "/v1/regions").await;
    assert_eq!(regions["bootstrapping"], json!(false));
    let copied_from: Vec<&Value> = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["replication"]["repair"]["progress"].as_object())
        .filter_map(|p| p.get("records_copied"))
        .collect();
    assert!(
        copied_from
            .iter()
            .any(|n| n.as_u64() >= Some(SEEDED as u64)),
        "a peer's round copied every seeded record: {copied_from:?}"
    );

    // The existing regions adopted ap from its membership record, without a restart.
    for id in ["eu", "us"] {
        let listed = c.get_json(id, "/v1/regions").await;
        let ap = listed["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "ap")
            .unwrap_or_else(|| panic!("{id} lists ap: {listed}"))
            .clone();
        assert_eq!(ap["api_url"], json!(c.url("ap")), "{id}");
        assert_eq!(ap["reachable"], json!(true), "{id}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    // A write at ap replicates to the others (they read its stream), and a write at ap of a
    // record homed in eu is forwarded there.
    let response = c.put("ap", "live", "from-ap", &json!({"at": "ap"})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = c
        .put("ap", "seeded", "k00000007", &json!({"changed": "at ap"}))
        .await;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        crate::helpers::header(&response, "locus-region"),
        Some("eu"),
        "the write of a record homed in eu was forwarded there"
    );
    for id in ["eu", "us"] {
        eventually(30, "ap's write replicates", || async {
            c.get(id, "live", "from-ap").await.status() == StatusCode::OK
        })
        .await;
    }

    c.assert_converged().await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 100,
        "the load ran: {}",
        acknowledged.len()
    );
    for id in ["eu", "us", "ap"] {
        let held: BTreeMap<String, Value> = c
            .whole_region(id)
            .await
            .into_iter()
            .filter(|(collection, _, _)| collection == "live")
            .map(|(_, key, state)| (key, state["versions"][0]["value"].clone()))
            .collect();
        for (key, value) in &acknowledged {
            assert_eq!(held.get(key), Some(value), "{id} holds acknowledged {key}");
        }
        let seeded = c
            .whole_region(id)
            .await
            .into_iter()
            .filter(|(collection, _, _)| collection == "seeded")
            .count();
        assert_eq!(seeded, SEEDED, "{id} holds every seeded record");
    }
    c.teardown().await;
}

#[tokio::test]
async fn an_announcement_needs_the_peer_token_and_a_valid_region_and_url() {
    let c = Setup::regions(&["eu", "us"]).start().await;
    let announce = |id: &str, body: Value| {
        c.request("eu", Method::PUT, &format!("/v1/peer/members/{id}"))
            .bearer_auth(PEER)
            .json(&body)
    };
    let unauthenticated = c
        .request("eu", Method::PUT, "/v1/peer/members/ap")
        .json(&json!({"api_url": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    for (id, body) in [
        ("Not-A-Region", json!({"api_url": "http://127.0.0.1:9"})),
        ("eu", json!({"api_url": "http://127.0.0.1:9"})),
        ("ap", json!({"api_url": "ftp://127.0.0.1:9"})),
        ("ap", json!({"url": "http://127.0.0.1:9"})),
    ] {
        let response = announce(id, body.clone()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{id} {body}");
    }
    // A valid one is recorded, replicates, and us adopts the region it names.
    let response = announce("ap", json!({"api_url": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    eventually(30, "us adopts ap from eu's record", || async {
        let listed = c.get_json("us", "/v1/regions").await;
        listed["regions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "ap" && r["api_url"] == "http://127.0.0.1:9")
    })
    .await;
    let deployment = c.deployment.clone();
    c.teardown().await;
    // The stream us created to read the announced region, which never came.
    locus::replication::delete_streams(crate::helpers::nats(), &deployment, &["ap"])
        .await
        .unwrap();
}
