//! Records in one region: the write/read/delete cycle, preconditions, listing, siblings, and
//! concurrent writers.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{cluster, expect_problem, header, record_path};
use locus::clock::hlc::Hlc;
use locus::clock::version::VersionVector;
use locus::record::{Home, RecordState, Version};
use locus::replication::event::Event;

fn counter(body: &Value) -> u64 {
    let version = body["version"].as_object().expect("a version vector");
    assert_eq!(version.len(), 1, "one region wrote: {version:?}");
    version.values().next().unwrap().as_u64().unwrap()
}

#[tokio::test]
async fn put_get_update_delete_and_recreate() {
    let c = cluster(&["eu"]).await;

    let created = c
        .put("eu", "users", "alice", &json!({"name": "Alice"}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(header(&created, "locus-region"), Some("eu"));
    let etag = header(&created, "etag").unwrap().to_owned();
    assert!(header(&created, "locus-session").is_some());
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["value"], json!({"name": "Alice"}));
    assert_eq!(body["home"], "eu");
    assert_eq!(body["deleted"], false);
    assert_eq!(counter(&body), 1);
    let first_hlc: Hlc = body["hlc"].as_str().unwrap().parse().unwrap();

    let read = c.get("eu", "users", "alice").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "etag"), Some(etag.as_str()));
    let read_body: Value = read.json().await.unwrap();
    assert_eq!(read_body, body);

    let updated = c
        .put("eu", "users", "alice", &json!({"name": "Alice B."}))
        .await;
    assert_eq!(updated.status(), StatusCode::OK);
    assert_ne!(header(&updated, "etag"), Some(etag.as_str()));
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(counter(&updated), 2);
    assert!(updated["hlc"].as_str().unwrap().parse::<Hlc>().unwrap() > first_hlc);

    let deleted = c.delete("eu", "users", "alice").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(header(&deleted, "locus-session").is_some());
    expect_problem(c.get("eu", "users", "alice").await, StatusCode::NOT_FOUND).await;
    expect_problem(
        c.delete("eu", "users", "alice").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect_problem(
        c.delete("eu", "users", "nobody").await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // A put over a tombstone creates again, with a version that supersedes the delete.
    let again = c
        .put("eu", "users", "alice", &json!({"name": "Alice C."}))
        .await;
    assert_eq!(again.status(), StatusCode::CREATED);
    let again: Value = again.json().await.unwrap();
    assert_eq!(counter(&again), 4);

    // Any JSON value is a record value, null included.
    let null = c.put("eu", "users", "nil", &Value::Null).await;
    assert_eq!(null.status(), StatusCode::CREATED);
    let read: Value = c.get("eu", "users", "nil").await.json().await.unwrap();
    assert_eq!(read["value"], Value::Null);
    assert_eq!(read["deleted"], false);
    c.teardown().await;
}

#[tokio::test]
async fn preconditions() {
    let c = cluster(&["eu"]).await;
    let path = record_path("docs", "d1");

    // If-None-Match: * creates only.
    let create = c
        .request("eu", Method::PUT, &path)
        .header("if-none-match", "*")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), StatusCode::CREATED);
    let etag = header(&create, "etag").unwrap().to_owned();
    let again = c
        .request("eu", Method::PUT, &path)
        .header("if-none-match", "*")
        .json(&json!(2))
        .send()
        .await
        .unwrap();
    expect_problem(again, StatusCode::PRECONDITION_FAILED).await;

    // If-Match with the current ETag succeeds once; the same ETag is then stale.
    let ok = c
        .request("eu", Method::PUT, &path)
        .header("if-match", &etag)
        .json(&json!(3))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let stale = c
        .request("eu", Method::PUT, &path)
        .header("if-match", &etag)
        .json(&json!(4))
        .send()
        .await
        .unwrap();
    expect_problem(stale, StatusCode::PRECONDITION_FAILED).await;
    let stale_delete = c
        .request("eu", Method::DELETE, &path)
        .header("if-match", &etag)
        .send()
        .await
        .unwrap();
    expect_problem(stale_delete, StatusCode::PRECONDITION_FAILED).await;
    let value: Value = c.get("eu", "docs", "d1").await.json().await.unwrap();
    assert_eq!(
        value["value"],
        json!(3),
        "failed preconditions wrote nothing"
    );

    // If-Match on a record that does not exist fails.
    let absent = c
        .request("eu", Method::PUT, &record_path("docs", "nope"))
        .header("if-match", &etag)
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(absent, StatusCode::PRECONDITION_FAILED).await;
    expect_problem(c.get("eu", "docs", "nope").await, StatusCode::NOT_FOUND).await;

    // If-None-Match: * succeeds over a tombstone.
    let current = header(&c.get("eu", "docs", "d1").await, "etag")
        .unwrap()
        .to_owned();
    let del = c
        .request("eu", Method::DELETE, &path)
        .header("if-match", &current)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let recreate = c
        .request("eu", Method::PUT, &path)
        .header("if-none-match", "*")
        .json(&json!(5))
        .send()
        .await
        .unwrap();
    assert_eq!(recreate.status(), StatusCode::CREATED);
    c.teardown().await;
}

#[tokio::test]
async fn listing_pages_through_a_prefix_in_key_order() {
    let c = cluster(&["eu"]).await;
    let mut expected = Vec::new();
    for i in 0..23 {
        let key = format!("a-{i:02}");
        assert_eq!(
            c.put("eu", "items", &key, &json!({"i": i})).await.status(),
            StatusCode::CREATED
        );
        expected.push(key);
    }
    for key in ["b-1", "a", "Z"] {
        assert_eq!(
            c.put("eu", "items", key, &json!(0)).await.status(),
            StatusCode::CREATED
        );
    }
    // Deleted records are not listed.
    for key in ["a-03", "a-10", "a-11"] {
        assert_eq!(
            c.delete("eu", "items", key).await.status(),
            StatusCode::NO_CONTENT
        );
        expected.retain(|k| k != key);
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/collections/items/records?prefix=a-&limit=7".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = c.request("eu", Method::GET, &path).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        let page: Value = page.json().await.unwrap();
        let records = page["records"].as_array().unwrap();
        assert!(records.len() <= 7);
        seen.extend(
            records
                .iter()
                .map(|r| r["key"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    assert_eq!(pages, 3, "20 records in pages of 7");

    let all: Value = c.get_json("eu", "/v1/collections/items/records").await;
    let keys: Vec<&str> = all["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys.first(),
        Some(&"Z"),
        "bytewise order puts uppercase first"
    );
    assert_eq!(keys.len(), 23);
    assert_eq!(all["next"], Value::Null);
    c.teardown().await;
}

/// Seed a record with two concurrent versions, as replication will when two regions wrote it.
async fn seed_siblings(c: &crate::helpers::Cluster, collection: &str, key: &str) {
    let store = &c.region("eu").region.store;
    let make = |actor: &str, region: &str, hlc: u64, value: Value| Version {
        value,
        deleted: false,
        region: region.into(),
        hlc: Hlc::from_u64(hlc),
        vector: VersionVector::from([(actor, 1)]),
    };
    let mut state = RecordState::new(Home::new("eu"));
    state.merge_version(make(
        "us.00000001",
        "us",
        2_000 << 16,
        json!({"from": "us"}),
    ));
    state.merge_version(make(
        "ap.00000002",
        "ap",
        1_000 << 16,
        json!({"from": "ap"}),
    ));
    assert_eq!(state.versions.len(), 2);
    let event = Event::new(
        "eu",
        collection,
        key,
        state.home.clone(),
        state.versions[0].clone(),
    );
    let bytes = event.encode();
    let event = locus::storage::OutboxEvent {
        bytes: &bytes,
        actor: "eu.00000000",
        hlc_ms: None,
    };
    assert_eq!(
        store
            .save(&locus::storage::RecordWrite::new(
                collection, key, 0, &state, &event, None
            ))
            .await
            .unwrap(),
        locus::storage::Saved::Yes
    );
}

#[tokio::test]
async fn siblings_are_shown_under_the_siblings_strategy_and_resolved_by_a_write() {
    let c = cluster(&["eu"]).await;
    assert_eq!(
        c.configure(
            "eu",
            "carts",
            &json!({"conflicts": {"strategy": "siblings"}})
        )
        .await
        .status(),
        StatusCode::CREATED
    );
    seed_siblings(&c, "carts", "k1").await;
    seed_siblings(&c, "plain", "k1").await;

    // Under lww the greatest (hlc, region) wins, and the record is readable as usual.
    let lww = c.get("eu", "plain", "k1").await;
    assert_eq!(lww.status(), StatusCode::OK);
    assert_eq!(
        lww.json::<Value>().await.unwrap()["value"],
        json!({"from": "us"})
    );

    let multiple = c.get("eu", "carts", "k1").await;
    assert_eq!(multiple.status(), StatusCode::MULTIPLE_CHOICES);
    assert_eq!(header(&multiple, "locus-siblings"), Some("2"));
    let context = header(&multiple, "etag").unwrap().to_owned();
    let body: Value = multiple.json().await.unwrap();
    let siblings = body["siblings"].as_array().unwrap();
    assert_eq!(siblings.len(), 2);
    assert_eq!(siblings[0]["region"], "ap", "sorted by (hlc, region)");
    assert_eq!(siblings[1]["value"], json!({"from": "us"}));
    assert_eq!(body["home"], "eu");

    // The listing shows the siblings too.
    let page: Value = c.get_json("eu", "/v1/collections/carts/records").await;
    assert_eq!(page["records"][0]["siblings"].as_array().unwrap().len(), 2);

    // Writing with the set's ETag resolves it: one version, dominating both.
    let resolved = c
        .request("eu", Method::PUT, &record_path("carts", "k1"))
        .header("if-match", &context)
        .json(&json!({"from": "both"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), StatusCode::OK);
    let after = c.get("eu", "carts", "k1").await;
    assert_eq!(after.status(), StatusCode::OK);
    let after: Value = after.json().await.unwrap();
    let version = after["version"].as_object().unwrap();
    assert_eq!(version["us.00000001"], 1);
    assert_eq!(version["ap.00000002"], 1);
    assert_eq!(version.len(), 3);
    c.teardown().await;
}

#[tokio::test]
async fn concurrent_writers_to_one_record_serialize() {
    let c = cluster(&["eu"]).await;
    let region = &c.region("eu").region;
    let writers = 12;
    let each = 10;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, url) = (c.http.clone(), c.url("eu").to_owned());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let r = http
                    .put(format!("{url}/v1/collections/hot/records/k"))
                    .json(&json!({"w": w, "i": i}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every write incremented the counter exactly once: none was lost to a race.
    let body: Value = c.get("eu", "hot", "k").await.json().await.unwrap();
    assert_eq!(counter(&body), writers * each);
    // One event per acknowledged write reached the stream, no more, no less. The publisher
    // counts a pass after deleting its rows, so an empty outbox alone does not say it counted.
    crate::helpers::eventually(20, "the outbox drains", || async {
        region.store.outbox_backlog().await.unwrap() == 0
            && region.replication.events_published() >= writers * each
    })
    .await;
    assert_eq!(region.replication.events_published(), writers * each);

    // Concurrent creates of one new key: exactly one wins.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (http, url) = (c.http.clone(), c.url("eu").to_owned());
        tasks.push(tokio::spawn(async move {
            http.put(format!("{url}/v1/collections/hot/records/new"))
                .header("if-none-match", "*")
                .json(&json!(w))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count(),
        7,
        "{statuses:?}"
    );
    c.teardown().await;
}

#[tokio::test]
async fn every_response_names_the_region_and_the_api_describes_itself() {
    let c = cluster(&["eu"]).await;
    for path in [
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/metrics",
        "/nope",
        "/v1/collections",
    ] {
        let r = c.request("eu", Method::GET, path).send().await.unwrap();
        assert_eq!(header(&r, "locus-region"), Some("eu"), "{path}");
    }
    expect_problem(
        c.request("eu", Method::GET, "/nope").send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    expect_problem(
        c.request("eu", Method::POST, "/healthz")
            .send()
            .await
            .unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;

    let doc: Value = c.get_json("eu", "/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/collections/{c}/records/{key}",
        "/v1/collections/{c}/records",
        "/v1/collections/{c}",
        "/v1/collections",
        "/readyz",
    ] {
        assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys());
    }
    assert!(paths["/v1/collections/{c}/records/{key}"]["put"]["responses"]["412"].is_object());

    c.put("eu", "m", "k", &json!(1)).await;
    let metrics = c.metrics("eu").await;
    assert!(
        metrics.contains(r#"locus_http_requests_total{method="PUT",route="/v1/collections/{c}/records/{key}",status="201"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("locus_http_request_duration_seconds_bucket"));
    c.teardown().await;
}

#[tokio::test]
async fn processes_of_one_region_never_write_on_stale_state() {
    let c = cluster(&["eu"]).await;
    let second = c.second_process("eu").await;
    let (a, b) = (c.url("eu").to_owned(), second.url());
    let http = &c.http;
    let put = |base: &str, value: Value| {
        http.put(format!("{base}{}", record_path("k", "k")))
            .json(&value)
            .send()
    };

    assert_eq!(
        counter(&put(&a, json!(1)).await.unwrap().json().await.unwrap()),
        1
    );
    assert_eq!(
        counter(&put(&b, json!(2)).await.unwrap().json().await.unwrap()),
        2
    );
    // a wrote last at revision 1; its write must still supersede b's.
    assert_eq!(
        counter(&put(&a, json!(3)).await.unwrap().json().await.unwrap()),
        3
    );

    // b deletes; a, which last saw the record live, must not refuse a create-only write.
    let deleted = http
        .delete(format!("{b}{}", record_path("k", "k")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let recreated = http
        .put(format!("{a}{}", record_path("k", "k")))
        .header("if-none-match", "*")
        .json(&json!(4))
        .send()
        .await
        .unwrap();
    assert_eq!(recreated.status(), StatusCode::CREATED);

    // Both hammer the record at once: every write counts exactly once.
    let mut tasks = Vec::new();
    for base in [a.clone(), b.clone()] {
        for w in 0..4 {
            let (http, base) = (http.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..15 {
                    let r = http
                        .put(format!("{base}{}", record_path("k", "k")))
                        .json(&json!([w, i]))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let body: Value = c.get("eu", "k", "k").await.json().await.unwrap();
    assert_eq!(counter(&body), 5 + 2 * 4 * 15);
    second.stop().await.unwrap();
    c.teardown().await;
}
