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
        // First it asks its peers whether its database is a restored one, then it copies.
        assert!(
            detail.starts_with("new region:")
                || detail == "checking with the peers whether this region's database was restored",
            "{detail}"
        );
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
        let ap = c.peer_entry(id, "ap").await;
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
        // The record is homed in ap: the peers, which adopted ap without a restart, forward to it.
        let response = c.put(id, "live", "from-ap", &json!({"at": id})).await;
        assert_eq!(response.status(), StatusCode::OK, "{id}");
        assert_eq!(
            crate::helpers::header(&response, "locus-region"),
            Some("ap"),
            "{id} forwarded the write to ap"
        );
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
async fn a_new_region_copies_from_a_peer_that_answers_rather_than_wait_on_one_that_hangs() {
    // To ap, eu's API is a listener that takes connections and never answers (a stuck process);
    // us answers. eu comes first in id order, which is where ap used to start its copy, waiting
    // out the peer client's minute before it tried us.
    let (hung_url, _hung) = crate::helpers::black_hole().await;
    let mut c = Setup::regions(&["eu", "us", "ap"])
        .joining_later(&["ap"])
        .tweak(move |config| {
            if config.region == "ap" {
                for peer in &mut config.peers {
                    if peer.id == "eu" {
                        peer.api_url = hung_url.clone();
                    }
                }
            }
        })
        .start()
        .await;
    let mut written = Vec::new();
    for (i, id) in ["eu", "us", "eu", "us"].into_iter().enumerate() {
        let key = format!("before-ap-{i}");
        let response = c.put(id, "copied", &key, &json!({"i": i})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        written.push(key);
    }
    eventually(20, "eu and us hold each other's writes", || async {
        let mut all = true;
        for id in ["eu", "us"] {
            for key in &written {
                all &= c.get(id, "copied", key).await.status() == StatusCode::OK;
            }
        }
        all
    })
    .await;

    let joined = std::time::Instant::now();
    c.join("ap").await;
    let deadline = joined + std::time::Duration::from_secs(30);
    while c.region("ap").region.is_bootstrapping() {
        assert!(
            std::time::Instant::now() < deadline,
            "ap copies from us within 30 s although eu's API hangs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for key in &written {
        assert_eq!(
            c.get("ap", "copied", key).await.status(),
            StatusCode::OK,
            "ap holds {key}"
        );
    }
    c.teardown().await;
}

/// Start ap, set up to join, with no peer API it can reach: eu's is a closed port, us's is
/// behind a link that is cut. Returns that link, to mend once ap may copy from us; returns once
/// ap's consumers have attached to both streams.
async fn join_ap_unable_to_copy(c: &mut crate::helpers::Cluster) -> crate::helpers::Link {
    let to_us = crate::helpers::link_to(c.url("us").trim_start_matches("http://")).await;
    to_us.cut();
    let closed_url = format!("http://127.0.0.1:{}", crate::helpers::free_port());
    let to_us_url = to_us.url();
    c.join_with("ap", move |config| {
        for peer in &mut config.peers {
            peer.api_url = match peer.id.as_str() {
                "us" => to_us_url.clone(),
                _ => closed_url.clone(),
            };
        }
    })
    .await;
    let ap = c.region("ap").region.clone();
    eventually(10, "ap's consumers attach", || async {
        ap.replication.is_consumer_attached("eu") && ap.replication.is_consumer_attached("us")
    })
    .await;
    to_us
}

#[tokio::test]
async fn a_new_region_merges_no_event_of_another_stream_that_its_copy_source_had_applied() {
    // ap copies from us: to ap, eu's API is a closed port, and us's is cut until eu has written
    // and us has applied those events. ap's copy from us then holds them, so ap's consumer of
    // eu's stream must leave them waiting while it cannot copy and acknowledge them without a
    // merge once the copy completes.
    let mut c = Setup::regions(&["eu", "us", "ap"])
        .joining_later(&["ap"])
        .start()
        .await;
    let mut to_us = join_ap_unable_to_copy(&mut c).await;
    let ap = c.region("ap").region.clone();
    let keys: Vec<String> = (0..30).map(|i| format!("k{i:02}")).collect();
    for key in &keys {
        let response = c.put("eu", "waiting", key, &json!({"key": key})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let us = c.region("us").region.clone();
    eventually(10, "us applies eu's writes", || async {
        let mut all = true;
        for key in &keys {
            all &= c.get("us", "waiting", key).await.status() == StatusCode::OK;
        }
        all
    })
    .await;
    assert!(
        us.replication
            .peer("eu")
            .is_some_and(|p| p.events_applied >= 30),
        "us applied them from eu's stream"
    );
    assert!(
        ap.is_bootstrapping(),
        "ap cannot copy while no peer answers"
    );
    to_us.resume().await.unwrap();
    eventually(30, "ap's copy from us completes", || async {
        !ap.is_bootstrapping()
    })
    .await;
    eventually(
        10,
        "ap acknowledges eu's events without a merge",
        || async { ap.replication.events_held_by_copy("eu") >= 30 },
    )
    .await;
    for key in &keys {
        assert_eq!(c.get("ap", "waiting", key).await.status(), StatusCode::OK);
    }
    // Replication from eu goes on past what the copy held.
    let response = c
        .put("eu", "waiting", "after", &json!({"after": true}))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    eventually(20, "ap applies eu's next write", || async {
        c.get("ap", "waiting", "after").await.status() == StatusCode::OK
    })
    .await;
    c.assert_converged().await;
    c.teardown().await;
}

#[tokio::test]
async fn a_new_region_applies_events_during_its_copy_once_their_stream_is_half_full() {
    // No peer's API answers ap (us's link is cut, eu's port closed), so its copy cannot run; eu's stream
    // (1 MiB) fills with events kept for ap. Past half of it, ap's consumer must apply them rather
    // than wait for the copy, or eu's outbox would stall once the stream is full.
    let mut c = Setup::regions(&["eu", "us", "ap"])
        .joining_later(&["ap"])
        .tweak(|config| config.replication.stream_max_bytes = 1024 * 1024)
        .start()
        .await;
    let mut to_us = join_ap_unable_to_copy(&mut c).await;
    let ap = c.region("ap").region.clone();
    let pad = "x".repeat(10_000);
    for i in 0..20 {
        let response = c
            .put("eu", "filling", &format!("k{i:02}"), &json!({"pad": pad}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    // A fifth of the stream: the consumer still waits for the copy, and says so.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(ap.is_bootstrapping());
    let eu = c.peer_entry("ap", "eu").await;
    assert_eq!(
        eu["replication"]["state"],
        json!("waiting for the first copy"),
        "{eu}"
    );
    for i in 0..20 {
        assert_eq!(
            c.get("ap", "filling", &format!("k{i:02}")).await.status(),
            StatusCode::NOT_FOUND,
            "ap's consumer waits for the copy while the stream has room"
        );
    }
    for i in 20..60 {
        let response = c
            .put("eu", "filling", &format!("k{i:02}"), &json!({"pad": pad}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    eventually(
        20,
        "ap applies eu's events while its copy cannot run",
        || async {
            let mut all = true;
            for i in 0..60 {
                all &= c.get("ap", "filling", &format!("k{i:02}")).await.status() == StatusCode::OK;
            }
            all
        },
    )
    .await;
    assert!(ap.is_bootstrapping(), "no copy ran");
    assert_eq!(
        ap.replication.peer("eu").map(|p| p.state),
        Some("running".to_owned())
    );
    // Once us answers, the copy completes and the regions converge.
    to_us.resume().await.unwrap();
    eventually(30, "ap's copy from us completes", || async {
        !ap.is_bootstrapping()
    })
    .await;
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

async fn retire_ap(c: &crate::helpers::Cluster, at: &str, gone: bool) -> reqwest::Response {
    c.request(at, Method::POST, "/v1/regions/ap/retire")
        .bearer_auth(crate::helpers::ADMIN)
        .json(&json!({"rehome_to": "eu", "gone": gone}))
        .send()
        .await
        .unwrap()
}

/// The home each region of `ids` gives `key`.
async fn homes(
    c: &crate::helpers::Cluster,
    ids: &[&str],
    collection: &str,
    key: &str,
) -> Vec<String> {
    let mut homes = Vec::new();
    for id in ids {
        let body: Value = c.get(id, collection, key).await.json().await.unwrap();
        homes.push(body["home"].as_str().unwrap_or_default().to_owned());
    }
    homes
}

async fn stream_exists(deployment: &str, region: &str) -> bool {
    let js = async_nats::jetstream::new(async_nats::connect(crate::helpers::nats()).await.unwrap());
    js.get_stream(locus::replication::stream_name(deployment, region))
        .await
        .is_ok()
}

#[tokio::test]
async fn retiring_a_region_moves_its_records_loses_no_write_and_removes_its_stream() {
    let mut c = Setup::regions(&["eu", "us", "ap"]).start().await;
    for i in 0..40 {
        let response = c
            .put("ap", "notes", &format!("n{i:02}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    assert_eq!(
        c.delete("ap", "notes", "n39").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.put("eu", "notes", "at-eu", &json!("stays"))
            .await
            .status(),
        StatusCode::CREATED
    );
    c.assert_converged().await;

    // A client keeps updating ap's records through eu while ap retires; the last value it was
    // acknowledged for each key is what every region ends with.
    let last_acknowledged: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, http) = (c.url("eu").to_owned(), c.http.clone());
        let (last_acknowledged, stop) = (last_acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..39 {
                    let key = format!("n{i:02}");
                    let value = json!({"i": i, "round": round});
                    let response = http
                        .put(format!("{url}{}", record_path("notes", &key)))
                        .json(&value)
                        .send()
                        .await
                        .unwrap();
                    if response.status().is_success() {
                        last_acknowledged.lock().unwrap().insert(key, value);
                    }
                }
                round += 1;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // Through the command's code path: found through eu, retired at ap itself.
    locus::app::retire(c.url("eu"), "ap", "us", false, crate::helpers::ADMIN)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    for id in ["eu", "us"] {
        eventually(30, "the peers let go of ap", || async {
            let listed = c.get_json(id, "/v1/regions").await;
            listed["retired"] == json!(["ap"])
                && !listed["regions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["id"] == "ap")
        })
        .await;
    }
    assert!(
        !stream_exists(&c.deployment, "ap").await,
        "ap's stream is removed"
    );
    let js = async_nats::jetstream::new(async_nats::connect(crate::helpers::nats()).await.unwrap());
    for id in ["eu", "us"] {
        let stream = js
            .get_stream(locus::replication::stream_name(&c.deployment, id))
            .await
            .unwrap();
        eventually(30, "ap's consumers are removed", || async {
            stream
                .consumer_info(locus::replication::consumer_name("ap"))
                .await
                .is_err()
        })
        .await;
    }
    // A retired region id is not reused: it cannot announce itself again.
    let again = c
        .request("eu", Method::PUT, "/v1/peer/members/ap")
        .bearer_auth(PEER)
        .json(&json!({"api_url": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    crate::helpers::expect_problem(again, StatusCode::CONFLICT).await;
    // A retired region is no home and no target.
    let response = c
        .request("eu", Method::PUT, &record_path("notes", "new"))
        .header("locus-home", "ap")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    c.stop("ap").await;

    c.assert_converged().await;
    for i in 0..40 {
        let key = format!("n{i:02}");
        eventually(
            30,
            "every moved record is homed in us everywhere",
            || async {
                homes(&c, &["eu", "us"], "notes", &key).await == ["us", "us"] || i == 39
                // the tombstone: no body to read its home from
            },
        )
        .await;
    }
    let deleted = c.get("us", "notes", "n39").await;
    assert_eq!(
        deleted.status(),
        StatusCode::NOT_FOUND,
        "the deletion survives the move"
    );
    assert_eq!(homes(&c, &["eu"], "notes", "at-eu").await, ["eu"]);
    let last_acknowledged = last_acknowledged.lock().unwrap().clone();
    assert_eq!(
        last_acknowledged.len(),
        39,
        "the writer ran across the retirement"
    );
    for id in ["eu", "us"] {
        for (key, value) in &last_acknowledged {
            let body: Value = c.get(id, "notes", key).await.json().await.unwrap();
            assert_eq!(&body["value"], value, "{id} {key}");
        }
    }
    // Writes to the moved records now go to their new home.
    let response = c.put("eu", "notes", "n00", &json!("after")).await;
    assert!(response.status().is_success());
    assert_eq!(
        crate::helpers::header(&response, "locus-region"),
        Some("us")
    );
    c.teardown().await;
}

#[tokio::test]
async fn a_region_gone_for_good_is_retired_by_a_survivor_that_takes_over_its_records() {
    let mut c = Setup::regions(&["eu", "us", "ap"]).start().await;
    for i in 0..25 {
        let response = c
            .put("ap", "notes", &format!("n{i:02}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    c.assert_converged().await;
    // Not gone while it answers; a live region retires itself; unknown regions and successors.
    crate::helpers::expect_problem(retire_ap(&c, "eu", true).await, StatusCode::CONFLICT).await;
    crate::helpers::expect_problem(retire_ap(&c, "eu", false).await, StatusCode::CONFLICT).await;
    let unknown = c
        .request("eu", Method::POST, "/v1/regions/mars/retire")
        .bearer_auth(crate::helpers::ADMIN)
        .json(&json!({"rehome_to": "eu"}))
        .send()
        .await
        .unwrap();
    crate::helpers::expect_problem(unknown, StatusCode::NOT_FOUND).await;
    let to_itself = c
        .request("eu", Method::POST, "/v1/regions/ap/retire")
        .bearer_auth(crate::helpers::ADMIN)
        .json(&json!({"rehome_to": "ap", "gone": true}))
        .send()
        .await
        .unwrap();
    crate::helpers::expect_problem(to_itself, StatusCode::BAD_REQUEST).await;
    let no_token = c
        .request("eu", Method::POST, "/v1/regions/ap/retire")
        .json(&json!({"rehome_to": "eu", "gone": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);

    c.stop("ap").await;
    let response = retire_ap(&c, "eu", true).await;
    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["records_rehomed"], 25, "{report}");
    assert_eq!(report["gone"], true, "{report}");
    assert!(
        !stream_exists(&c.deployment, "ap").await,
        "ap's stream is removed"
    );
    eventually(30, "us learns that ap is retired", || async {
        c.get_json("us", "/v1/regions").await["retired"] == json!(["ap"])
    })
    .await;
    for i in 0..25 {
        let key = format!("n{i:02}");
        eventually(
            30,
            "every record of ap is homed in eu everywhere",
            || async { homes(&c, &["eu", "us"], "notes", &key).await == ["eu", "eu"] },
        )
        .await;
    }
    let response = c.put("us", "notes", "n03", &json!("after")).await;
    assert!(response.status().is_success());
    assert_eq!(
        crate::helpers::header(&response, "locus-region"),
        Some("eu")
    );
    c.teardown().await;
}
