//! Replication across three regions, over the real JetStream and PostgreSQL: changes reach every
//! region, concurrent writes converge to the same stored sets and views everywhere, conflicts are
//! logged, and a region that was down catches up.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{cluster, eventually, expect_problem, record_path, Cluster};
use locus::record::{Home, Version};
use locus::replication::event::{Change, Event};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

async fn status_everywhere(c: &Cluster, collection: &str, key: &str, status: StatusCode) -> bool {
    for id in REGIONS {
        if c.get(id, collection, key).await.status() != status {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn puts_updates_and_deletes_reach_every_region_and_tombstones_do_not_resurrect() {
    let c = cluster(&REGIONS).await;
    let created: Value = c
        .put("eu", "users", "alice", &json!({"v": 1}))
        .await
        .json()
        .await
        .unwrap();
    eventually(20, "the create reaches us and ap", || {
        status_everywhere(&c, "users", "alice", StatusCode::OK)
    })
    .await;

    assert_eq!(
        c.put("eu", "users", "alice", &json!({"v": 2}))
            .await
            .status(),
        StatusCode::OK
    );
    eventually(20, "the update reaches us and ap", || async {
        for id in ["us", "ap"] {
            let body: Value = c.get(id, "users", "alice").await.json().await.unwrap();
            if body["value"] != json!({"v": 2}) {
                return false;
            }
        }
        true
    })
    .await;
    // Replicas know the home: a write at us is forwarded to eu.
    let forwarded = c.put("us", "users", "alice", &json!({"v": 3})).await;
    assert_eq!(forwarded.status(), StatusCode::OK);
    assert_eq!(
        crate::helpers::header(&forwarded, "locus-region"),
        Some("eu")
    );

    assert_eq!(
        c.delete("eu", "users", "alice").await.status(),
        StatusCode::NO_CONTENT
    );
    eventually(20, "the delete reaches us and ap", || {
        status_everywhere(&c, "users", "alice", StatusCode::NOT_FOUND)
    })
    .await;

    // The first version, delivered again late (as after a redelivery), does not bring the record back.
    let old = Version {
        value: created["value"].clone(),
        deleted: false,
        region: "eu".into(),
        hlc: created["hlc"].as_str().unwrap().parse().unwrap(),
        vector: serde_json::from_value(created["version"].clone()).unwrap(),
    };
    // us reports what it applied from eu, and eu's outbox drains.
    eventually(
        20,
        "us reports eu's events and eu's outbox is empty",
        || async {
            let eu = c.peer_entry("us", "eu").await;
            let own = c.get_json("eu", "/v1/regions").await;
            eu["reachable"] == true
                && eu["replication"]["state"] == "running"
                && eu["replication"]["events_applied"].as_u64() >= Some(4)
                && eu["replication"]["event_lag_ms"].is_u64()
                && eu["lag_ms"].is_u64()
                && eu["applied_through_ms"].is_u64()
                && eu["last_heard"].is_string()
                && own["regions"][0]["self"] == true
                && own["regions"][0]["outbox_backlog"] == 0
        },
    )
    .await;
    let metrics = c.metrics("us").await;
    assert!(
        metrics.contains("locus_replication_events_applied_total{origin=\"eu\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("locus_replication_lag_seconds_bucket{origin=\"eu\""));

    let replay = Event::new("eu", "users", "alice", Home::new("eu"), old);
    let applied = locus::replication::consumer::apply_batch(
        &c.region("ap").region,
        "eu",
        &[Change::Record(replay)],
        &[1],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(applied.conflicts, 0);
    expect_problem(c.get("ap", "users", "alice").await, StatusCode::NOT_FOUND).await;
    c.teardown().await;
}

/// Every region writes every key of `collection` at once, and some keys are deleted; return when
/// all writes were answered.
async fn write_from_everywhere(
    c: &Cluster,
    collection: &'static str,
    keys: std::ops::Range<usize>,
) {
    let mut tasks = Vec::new();
    for id in REGIONS {
        let (http, url, keys) = (c.http.clone(), c.url(id).to_owned(), keys.clone());
        tasks.push(tokio::spawn(async move {
            for i in keys {
                let path = format!("{url}{}", record_path(collection, &format!("k{i:03}")));
                let r = http
                    .put(&path)
                    .json(&json!({"from": id, "i": i}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{id} k{i}: {}", r.status());
                if i % 7 == 0 && id == "us" {
                    let r = http.delete(&path).send().await.unwrap();
                    assert!(
                        r.status().is_success() || r.status() == StatusCode::NOT_FOUND,
                        "{}",
                        r.status()
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Wait until every region holds exactly the same stored state for `collections`, and return it.
async fn converged(c: &Cluster, collections: &[&str]) -> Vec<(String, String, Value)> {
    let (first, others) = c.ids().split_first().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let reference = c.stored_states(first, collections).await;
        let mut differing = Vec::new();
        for id in others {
            let theirs = c.stored_states(id, collections).await;
            if theirs != reference {
                differing.push((*id, theirs));
            }
        }
        if differing.is_empty() {
            return reference;
        }
        if std::time::Instant::now() > deadline {
            // Say exactly which records differ, for whoever reads the failure.
            for (id, theirs) in &differing {
                crate::helpers::print_differences(first, &reference, id, theirs);
                for region in c.ids() {
                    eprintln!(
                        "{region} regions: {}",
                        c.get_json(region, "/v1/regions").await
                    );
                }
            }
            panic!("regions did not converge within 60s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn concurrent_writes_in_every_region_converge_under_lww_and_siblings() {
    let mut nats = crate::helpers::TestNats::start().await;
    let c = crate::helpers::Setup::regions(&REGIONS)
        .on_nats(&nats)
        .start()
        .await;
    c.configure("eu", "lww-any", &json!({"homing": "anywhere"}))
        .await;
    c.configure(
        "eu",
        "sib-any",
        &json!({"homing": "anywhere", "conflicts": {"strategy": "siblings"}}),
    )
    .await;
    eventually(20, "policies reach every region", || async {
        for id in REGIONS {
            let p = c.get_json(id, "/v1/collections/sib-any").await;
            if p["policy"]["conflicts"]["strategy"] != "siblings"
                || c.get_json(id, "/v1/collections/lww-any").await["configured"] != true
            {
                return false;
            }
        }
        true
    })
    .await;

    // First every region writes the same keys while replication runs (racing it), then while it
    // is cut off (so each region writes blind, and conflicts are certain).
    let keys = 120;
    tokio::join!(
        write_from_everywhere(&c, "lww-any", 0..keys / 2),
        write_from_everywhere(&c, "sib-any", 0..keys / 2)
    );
    nats.kill();
    tokio::join!(
        write_from_everywhere(&c, "lww-any", keys / 2..keys),
        write_from_everywhere(&c, "sib-any", keys / 2..keys)
    );
    nats.restart().await;
    let stored = converged(&c, &["lww-any", "sib-any"]).await;
    assert_eq!(stored.len(), 2 * keys);

    // Same stored sets, so the same views: compare every key's answer in every region.
    let mut multiple = 0;
    for collection in ["lww-any", "sib-any"] {
        for i in 0..keys {
            let key = format!("k{i:03}");
            let mut answers = Vec::new();
            for id in REGIONS {
                let r = c.get(id, collection, &key).await;
                let status = r.status();
                let etag = crate::helpers::header(&r, "etag").map(str::to_owned);
                answers.push((status, etag, r.text().await.unwrap()));
            }
            assert!(
                answers.iter().all(|a| *a == answers[0]),
                "{collection}/{key} differs: {answers:?}"
            );
            if answers[0].0 == StatusCode::MULTIPLE_CHOICES {
                assert_eq!(
                    collection, "sib-any",
                    "only the siblings strategy answers 300"
                );
                multiple += 1;
            }
        }
    }
    assert!(
        multiple > 0,
        "concurrent writes from three regions left some siblings"
    );

    // Every region logged conflicts, naming the strategy, listed through the API page by page.
    for id in REGIONS {
        for (collection, strategy) in [("lww-any", "lww"), ("sib-any", "siblings")] {
            let mut entries = Vec::new();
            let mut after = 0;
            loop {
                let page = c
                    .get_json(
                        id,
                        &format!("/v1/conflicts?collection={collection}&limit=7&after={after}"),
                    )
                    .await;
                entries.extend(page["conflicts"].as_array().unwrap().iter().cloned());
                match page["next"].as_i64() {
                    Some(next) => after = next,
                    None => break,
                }
            }
            assert!(
                !entries.is_empty(),
                "{id} logged no conflict in {collection}"
            );
            for e in &entries {
                assert_eq!(e["collection"], collection);
                assert_eq!(e["region"], id);
                assert_eq!(e["strategy"], strategy);
                assert!(e["versions"].as_array().unwrap().len() >= 2, "{e}");
                assert!(e["outcome"].is_object() && e["detected_at"].is_string());
            }
            let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "pages are in id order without repeats"
            );
            let key = entries[0]["key"].as_str().unwrap();
            let one = c
                .get_json(
                    id,
                    &format!("/v1/conflicts?collection={collection}&key={key}"),
                )
                .await;
            assert!(one["conflicts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["key"] == key));
        }
    }

    let metrics = c.metrics("eu").await;
    assert!(
        metrics.contains("locus_conflicts_total{strategy=\"siblings\"}"),
        "{metrics}"
    );

    // A write with the siblings' ETag resolves the conflict everywhere.
    let (collection, key) = stored
        .iter()
        .find(|(c, _, state)| c == "sib-any" && state["versions"].as_array().unwrap().len() > 1)
        .map(|(c, k, _)| (c.clone(), k.clone()))
        .unwrap();
    let read = c.get("ap", &collection, &key).await;
    let etag = crate::helpers::header(&read, "etag").unwrap().to_owned();
    let resolved = c
        .request("ap", Method::PUT, &record_path(&collection, &key))
        .header("if-match", &etag)
        .json(&json!("resolved"))
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), StatusCode::OK);
    eventually(20, "the resolution reaches every region", || async {
        for id in REGIONS {
            let r = c.get(id, &collection, &key).await;
            if r.status() != StatusCode::OK
                || r.json::<Value>().await.unwrap()["value"] != "resolved"
            {
                return false;
            }
        }
        true
    })
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn a_region_that_was_down_catches_up() {
    let mut c = cluster(&REGIONS).await;
    let ap_config = c.region("ap").region.config.clone();
    c.stop("ap").await;
    let ap = c.peer_entry("eu", "ap").await;
    assert_eq!(ap["reachable"], false, "{ap}");
    for i in 0..150 {
        let r = c.put("eu", "backlog", &format!("k{i:03}"), &json!(i)).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    for i in 0..10 {
        assert_eq!(
            c.delete("eu", "backlog", &format!("k{i:03}"))
                .await
                .status(),
            StatusCode::NO_CONTENT
        );
    }
    c.restart("ap", ap_config).await;
    let stored = converged(&c, &["backlog"]).await;
    assert_eq!(stored.len(), 150);
    let page = c
        .get_json("ap", "/v1/collections/backlog/records?limit=1000")
        .await;
    assert_eq!(page["records"].as_array().unwrap().len(), 140);
    c.teardown().await;
}

#[tokio::test]
async fn a_record_at_the_size_limit_replicates() {
    let c = cluster(&["eu", "us"]).await;
    let limit = c.region("eu").region.config.limits.record_body_bytes;
    let body = format!("\"{}\"", "x".repeat(limit - 2));
    assert_eq!(body.len(), limit);
    let r = c
        .request("eu", Method::PUT, &record_path("big", "k"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    eventually(20, "the largest record reaches us", || async {
        let r = c.get("us", "big", "k").await;
        r.status() == StatusCode::OK
            && r.json::<Value>().await.unwrap()["value"]
                .as_str()
                .map(str::len)
                == Some(limit - 2)
    })
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn nats_killed_and_restarted_mid_stream_loses_nothing() {
    let mut nats = crate::helpers::TestNats::start().await;
    let c = crate::helpers::Setup::regions(&["eu", "us"])
        .on_nats(&nats)
        .start()
        .await;

    let writer = {
        let (http, base) = (c.http.clone(), c.url("eu").to_owned());
        tokio::spawn(async move {
            for i in 0..300 {
                let r = http
                    .put(format!(
                        "{base}{}",
                        record_path("burst", &format!("k{i:03}"))
                    ))
                    .json(&json!(i))
                    .send()
                    .await
                    .unwrap();
                // NATS is not in the write path: every write is acknowledged, outage or not.
                assert_eq!(r.status(), StatusCode::CREATED, "k{i}");
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    nats.kill();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let held = c.region("eu").region.store.outbox_backlog().await.unwrap();
    assert!(held > 0, "writes during the outage wait in the outbox");
    nats.restart().await;
    writer.await.unwrap();

    let stored = converged(&c, &["burst"]).await;
    assert_eq!(stored.len(), 300, "every acknowledged write reached us");
    c.teardown().await;
}

#[tokio::test]
async fn rehome_moves_the_leader_and_racing_writes_are_neither_lost_nor_bounced() {
    let c = cluster(&REGIONS).await;
    let path = record_path("docs", "moving");
    let created = c
        .request("us", Method::PUT, &path)
        .header("locus-home", "eu")
        .json(&json!(0))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    eventually(20, "the record reaches every region", || {
        status_everywhere(&c, "docs", "moving", StatusCode::OK)
    })
    .await;

    // Writers at eu and ap, retrying what the move turns away (503: nothing written).
    let mut writers = Vec::new();
    for (w, id) in ["eu", "ap"].into_iter().enumerate() {
        let (http, url) = (c.http.clone(), format!("{}{path}", c.url(id)));
        writers.push(tokio::spawn(async move {
            let mut acknowledged = 0;
            for i in 0..100 {
                loop {
                    let r = http
                        .put(&url)
                        .json(&json!({"w": w, "i": i}))
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::OK => break,
                        StatusCode::SERVICE_UNAVAILABLE => {
                            assert!(
                                r.headers().contains_key("locus-home")
                                    && r.headers().contains_key("retry-after")
                            );
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        other => {
                            panic!("write {i} via {url}: {other} (a bounce or an unknown outcome)")
                        }
                    }
                }
                acknowledged += 1;
            }
            acknowledged
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let moved = c
        .request("us", Method::POST, &format!("{path}/rehome"))
        .json(&json!({"region": "us"}))
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), StatusCode::OK);
    assert_eq!(
        crate::helpers::header(&moved, "locus-region"),
        Some("eu"),
        "only the home moves the home"
    );
    assert_eq!(moved.json::<Value>().await.unwrap()["home"], "us");
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "the writes race the move"
    );
    let mut acknowledged = 0;
    for w in writers {
        acknowledged += w.await.unwrap();
    }

    let stored = converged(&c, &["docs"]).await;
    let state = &stored[0].2;
    assert_eq!(state["home"], json!({"epoch": 1, "region": "us"}));
    let context = state["versions"].as_array().unwrap().iter().fold(
        std::collections::BTreeMap::<String, u64>::new(),
        |mut acc, v| {
            for (actor, n) in v["version"].as_object().unwrap() {
                let entry = acc.entry(actor.clone()).or_insert(0);
                *entry = (*entry).max(n.as_u64().unwrap());
            }
            acc
        },
    );
    assert_eq!(
        context.values().sum::<u64>(),
        1 + acknowledged,
        "every acknowledged write, once: {context:?}"
    );

    // The new home leads: it takes writes itself, and the old home forwards to it.
    let at_us = c.put("us", "docs", "moving", &json!("after")).await;
    assert_eq!(at_us.status(), StatusCode::OK);
    assert_eq!(crate::helpers::header(&at_us, "locus-region"), Some("us"));
    let via_eu = c.put("eu", "docs", "moving", &json!("after 2")).await;
    assert_eq!(crate::helpers::header(&via_eu, "locus-region"), Some("us"));

    // Bad rehomes.
    let unknown = c
        .request("us", Method::POST, &format!("{path}/rehome"))
        .json(&json!({"region": "mars"}))
        .send()
        .await
        .unwrap();
    expect_problem(unknown, StatusCode::BAD_REQUEST).await;
    let absent = c
        .request(
            "us",
            Method::POST,
            &format!("{}/rehome", record_path("docs", "nothing")),
        )
        .json(&json!({"region": "eu"}))
        .send()
        .await
        .unwrap();
    expect_problem(absent, StatusCode::NOT_FOUND).await;
    c.teardown().await;
}

/// Wait until `origin` has published its whole outbox, then purge its stream: every event not
/// yet applied elsewhere is gone.
async fn publish_then_purge(c: &Cluster, origin: &str) {
    let region = c.region(origin).region.clone();
    eventually(20, "the origin publishes its outbox", || async {
        region.store.outbox_backlog().await.unwrap() == 0
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(crate::helpers::nats()).await.unwrap());
    js.get_stream(locus::replication::stream_name(&c.deployment, origin))
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_region_that_missed_purged_events_while_down_converges_by_repair() {
    let mut c = cluster(&["eu", "us"]).await;
    let us_config = c.region("us").region.config.clone();
    c.stop("us").await;
    for i in 0..10 {
        assert_eq!(
            c.put("eu", "lost", &format!("k{i}"), &json!(i))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    // Events us never applied disappear from eu's stream (an operator purged it; a NATS server
    // with the 2.9.10 bug does the same at restart).
    publish_then_purge(&c, "eu").await;

    c.restart("us", us_config).await;
    eventually(30, "us repairs what the stream lost", || async {
        let mut all = true;
        for i in 0..10 {
            all &= c.get("us", "lost", &format!("k{i}")).await.status() == StatusCode::OK;
        }
        all
    })
    .await;
    eventually(10, "us reports the repaired gap and runs on", || async {
        let eu = c.peer_entry("us", "eu").await;
        eu["replication"]["state"] == "running" && eu["replication"]["gaps_repaired"] == 1
    })
    .await;
    let metrics = c.metrics("us").await;
    assert!(
        metrics.contains("locus_replication_gaps_repaired_total{origin=\"eu\"} 1"),
        "{metrics}"
    );
    // Replication goes on after the gap.
    assert_eq!(
        c.put("eu", "lost", "after", &json!("x")).await.status(),
        StatusCode::CREATED
    );
    eventually(20, "later events replicate", || async {
        c.get("us", "lost", "after").await.status() == StatusCode::OK
    })
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn a_hole_that_opens_while_the_consumer_runs_is_repaired_not_jumped() {
    let c = cluster(&["eu", "us"]).await;
    assert_eq!(
        c.put("eu", "holes", "k0", &json!(0)).await.status(),
        StatusCode::CREATED
    );
    eventually(20, "us applies k0", || async {
        c.get("us", "holes", "k0").await.status() == StatusCode::OK
    })
    .await;
    // us's consumer blocks on its apply lock with the next event in hand ...
    let us_pool = c.region("us").region.store.pool().clone();
    let mut blocker = us_pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(locus::storage::apply::APPLY_LOCK)
        .execute(&mut *blocker)
        .await
        .unwrap();
    assert_eq!(
        c.put("eu", "holes", "k1", &json!(1)).await.status(),
        StatusCode::CREATED
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // ... while eu writes on, and those events vanish from the stream before us reads them.
    for i in 2..10 {
        assert_eq!(
            c.put("eu", "holes", &format!("k{i}"), &json!(i))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    publish_then_purge(&c, "eu").await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(locus::storage::apply::APPLY_LOCK)
        .execute(&mut *blocker)
        .await
        .unwrap();
    drop(blocker);
    // An event after the hole is applied at once; the hole is then found and repaired.
    assert_eq!(
        c.put("eu", "holes", "after", &json!("x")).await.status(),
        StatusCode::CREATED
    );
    eventually(40, "us repairs the hole", || async {
        let mut all = true;
        for i in 0..10 {
            all &= c.get("us", "holes", &format!("k{i}")).await.status() == StatusCode::OK;
        }
        all && c.get("us", "holes", "after").await.status() == StatusCode::OK
    })
    .await;
    let eu_status = c.peer_entry("us", "eu").await;
    assert!(
        eu_status["replication"]["gaps_repaired"].as_u64().unwrap() >= 1,
        "{eu_status}"
    );
    c.teardown().await;
}

#[tokio::test]
async fn failover_writes_made_while_the_home_is_down_converge_when_it_returns() {
    let mut c = cluster(&REGIONS).await;
    let policy =
        json!({"on_home_unreachable": "accept_local", "conflicts": {"strategy": "siblings"}});
    c.configure("eu", "carts", &policy).await;
    eventually(20, "the policy reaches every region", || async {
        for id in REGIONS {
            if c.get_json(id, "/v1/collections/carts").await["policy"]["on_home_unreachable"]
                != "accept_local"
            {
                return false;
            }
        }
        true
    })
    .await;
    for i in 0..30 {
        assert_eq!(
            c.put("eu", "carts", &format!("c{i:02}"), &json!({"items": []}))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    eventually(20, "the carts reach every region", || {
        status_everywhere(&c, "carts", "c29", StatusCode::OK)
    })
    .await;

    let eu_config = c.region("eu").region.config.clone();
    c.stop("eu").await;
    for id in ["us", "ap"] {
        for i in 0..30 {
            let r = c
                .put(id, "carts", &format!("c{i:02}"), &json!({"items": [id]}))
                .await;
            assert_eq!(r.status(), StatusCode::OK, "{id} c{i}");
            assert_eq!(crate::helpers::header(&r, "locus-failover"), Some("true"));
        }
    }
    c.restart("eu", eu_config).await;

    // Every region ends with the same sets; each failover write is in every key's history (us and
    // ap each wrote every key once: their counters are in the join of what is kept), and the home
    // stayed where it was.
    let stored = converged(&c, &["carts"]).await;
    assert_eq!(stored.len(), 30);
    for (_, key, state) in &stored {
        assert_eq!(
            state["home"],
            json!({"epoch": 0, "region": "eu"}),
            "{key}: failover writes never move the home"
        );
        let mut context = std::collections::BTreeMap::<String, u64>::new();
        for version in state["versions"].as_array().unwrap() {
            for (actor, n) in version["version"].as_object().unwrap() {
                let entry = context
                    .entry(actor.split('.').next().unwrap().to_owned())
                    .or_insert(0);
                *entry = (*entry).max(n.as_u64().unwrap());
            }
        }
        assert_eq!(context.get("us"), Some(&1), "{key}: {state}");
        assert_eq!(context.get("ap"), Some(&1), "{key}: {state}");
        let mut answers = Vec::new();
        for id in REGIONS {
            let r = c.get(id, "carts", key).await;
            answers.push((r.status(), r.text().await.unwrap()));
        }
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{key}: {answers:?}"
        );
    }
    c.teardown().await;
}

#[tokio::test]
async fn another_process_takes_over_publishing_when_the_publisher_dies() {
    let mut c = cluster(&["eu", "us"]).await;
    let first = c.region("eu").region.clone();
    let second = c.second_process("eu").await;
    let http = c.http.clone();
    let via_second = |i: usize| {
        let url = format!(
            "{}{}",
            second.url(),
            record_path("handover", &format!("k{i:02}"))
        );
        let http = http.clone();
        async move { http.put(url).json(&json!(i)).send().await.unwrap().status() }
    };
    for i in 0..5 {
        assert_eq!(via_second(i).await, StatusCode::CREATED);
    }
    eventually(20, "the first five reach us", || {
        status_everywhere_of(&c, &["us"], "handover", "k04")
    })
    .await;
    assert!(
        first.replication.events_published() >= 5,
        "the first process holds the publisher lock"
    );
    assert_eq!(
        second.region.replication.events_published(),
        0,
        "exactly one process publishes"
    );

    c.stop("eu").await;
    for i in 5..25 {
        assert_eq!(via_second(i).await, StatusCode::CREATED);
    }
    eventually(
        20,
        "the second process takes over and the rest reach us",
        || status_everywhere_of(&c, &["us"], "handover", "k24"),
    )
    .await;
    assert!(second.region.replication.events_published() >= 20);
    second.stop().await.unwrap();
    c.teardown().await;
}

async fn status_everywhere_of(c: &Cluster, ids: &[&str], collection: &str, key: &str) -> bool {
    for id in ids {
        if c.get(id, collection, key).await.status() != StatusCode::OK {
            return false;
        }
    }
    true
}

/// The outbox pitfall: ids are handed out at insert, not at commit, so rows commit out of id
/// order. Here one write takes its outbox id and then stays uncommitted while 640 later writes
/// commit and are published; a publisher keeping a watermark ("id > last published") would never
/// send it. Every write must arrive.
#[tokio::test]
async fn rows_committing_out_of_id_order_are_all_published() {
    let c = cluster(&["eu", "us"]).await;
    let eu = c.region("eu").region.clone();
    let mut slow = eu.store.pool().begin().await.unwrap();
    let late = Version {
        value: json!("late"),
        deleted: false,
        region: "eu".into(),
        hlc: locus::clock::hlc::Hlc::from_parts(locus::clock::hlc::wall_clock_ms(), 0),
        vector: locus::clock::version::VersionVector::from([(
            eu.settled_actor().expect("settled").as_str(),
            1,
        )]),
    };
    let state = locus::record::RecordState {
        home: Home::new("eu"),
        versions: vec![late.clone()],
    };
    let hash = locus::record::digest::state_hash(&state);
    sqlx::query(
        "INSERT INTO records (collection, key, rev, state, bucket, hash_hi, hash_lo)
         VALUES ('order', 'late', 1, $1, $2, $3, $4)",
    )
    .bind(sqlx::types::Json(&state))
    .bind(locus::record::digest::bucket_of("late"))
    .bind(hash.hi)
    .bind(hash.lo)
    .execute(&mut *slow)
    .await
    .unwrap();
    sqlx::query("INSERT INTO outbox (event) VALUES ($1)")
        .bind(Event::new("eu", "order", "late", Home::new("eu"), late).encode())
        .execute(&mut *slow)
        .await
        .unwrap();

    let writers = 16;
    let each = 40;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, url) = (c.http.clone(), c.url("eu").to_owned());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let r = http
                    .put(format!(
                        "{url}{}",
                        record_path("order", &format!("w{w:02}-{i:02}"))
                    ))
                    .json(&json!(i))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually(30, "the later writes reach us", || async {
        c.stored_states("us", &["order"]).await.len() == writers * each
    })
    .await;

    slow.commit().await.unwrap();
    let stored = converged(&c, &["order"]).await;
    assert_eq!(
        stored.len(),
        writers * each + 1,
        "the write that committed late arrived too"
    );
    c.teardown().await;
}

#[tokio::test]
async fn an_apply_finds_a_record_a_local_write_created_after_its_lock() {
    let c = cluster(&["eu", "us"]).await;
    let eu = c.region("eu").region.clone();
    let key = ("raced".to_owned(), "k".to_owned());
    let mut tx = eu.store.begin_apply().await.unwrap();
    let loaded = tx.lock(std::slice::from_ref(&key), None).await.unwrap();
    assert_eq!(loaded[&key].rev, 0, "absent at lock time");
    // A local write creates it meanwhile (local writes do not wait for applies).
    assert_eq!(
        c.put("eu", "raced", "k", &json!("local")).await.status(),
        StatusCode::CREATED
    );
    let state = locus::record::RecordState::new(Home::new("us"));
    let raced = tx
        .store_all(&[locus::storage::apply::MergedWrite {
            key: &key,
            rev: 0,
            state: &state,
            resolution: None,
        }])
        .await
        .unwrap();
    assert_eq!(
        raced,
        vec![key.clone()],
        "the write must be merged again, not lost"
    );
    drop(tx);
    let body: Value = c.get("eu", "raced", "k").await.json().await.unwrap();
    assert_eq!(body["value"], "local");
    c.teardown().await;
}

#[tokio::test]
async fn events_a_first_copy_holds_are_acknowledged_without_a_merge() {
    let mut nats = crate::helpers::TestNats::start().await;
    let c = crate::helpers::Setup::regions(&["eu", "us"])
        .on_nats(&nats)
        .start()
        .await;
    assert!(c
        .put("eu", "held", "first", &json!({"n": 0}))
        .await
        .status()
        .is_success());
    eventually(30, "replication runs", || async {
        c.get("us", "held", "first").await.status() == StatusCode::OK
    })
    .await;

    // Replication is cut while eu writes; its events wait in eu's outbox.
    nats.kill();
    for i in 1..=20 {
        let response = c
            .put("eu", "held", &format!("k{i:02}"), &json!({"n": i}))
            .await;
        assert!(response.status().is_success(), "{}", response.status());
    }
    // What a new region's completed copy records: every event of eu's stream through a sequence
    // (here far beyond these writes) is held, in the ranges and for the consumer.
    let us = c.region("us").region.clone();
    let through = 1_000_000;
    us.store.cover_ranges("eu", &[(1, through)]).await.unwrap();
    us.replication.copy_holds("eu", through);
    nats.restart().await;

    // us acknowledges the events without merging them, and counts them. No copy brought these
    // records here, so they are missing: the proof that nothing was merged.
    eventually(30, "us acknowledges eu's 20 events as held", || async {
        us.replication.events_held_by_copy("eu") >= 20
    })
    .await;
    for i in 1..=20 {
        let response = c.get("us", "held", &format!("k{i:02}")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "k{i:02}");
    }
    let metrics = c.metrics("us").await;
    assert!(
        metrics.contains("locus_replication_events_held_by_copy_total{origin=\"eu\"}"),
        "{metrics}"
    );
    // A repair round brings over what a real copy would have held.
    c.repair_everywhere().await;
    c.assert_converged().await;
    c.teardown().await;
}
