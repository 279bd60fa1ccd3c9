//! Group commit: writes that share a statement each pass their own compare-and-swap and floor
//! check, lock their rows in key order, and are answered only once committed.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{cluster, eventually, Setup};
use locus::clock::hlc::Hlc;
use locus::clock::version::VersionVector;
use locus::record::{Home, RecordState, Version};
use locus::storage::{OutboxEvent, RecordWrite, Saved, StorageError, Store};

/// One batch statement, as the group committer runs it, on a connection of its own.
async fn save_batch(store: &Store, writes: &[RecordWrite]) -> Result<Vec<Saved>, StorageError> {
    let mut connection = store.pool().acquire().await.unwrap();
    locus::storage::records::save_batch(&mut connection, writes).await
}

/// A single-version state of `value`, written by a test actor with counter `counter`.
fn state_of(value: Value, counter: u64) -> RecordState {
    let mut state = RecordState::new(Home::new("eu"));
    state.merge_version(Version {
        value,
        deleted: false,
        region: "eu".into(),
        hlc: Hlc::from_parts(4_000_000_000_000, counter as u16),
        vector: VersionVector::from([("eu.7e570000", counter)]),
    });
    state
}

/// A write of `value` to `key` of `batched`, built on revision `rev`, stamped at `hlc_ms`.
fn write(key: &str, rev: i64, value: Value, hlc_ms: Option<u64>) -> RecordWrite {
    let event = OutboxEvent {
        bytes: key.as_bytes(),
        actor: "eu.7e570000",
        hlc_ms,
    };
    RecordWrite::new("batched", key, rev, &state_of(value, 1), &event, None)
}

/// `key`'s revision and stored value, if it has a row.
async fn stored(store: &Store, key: &str) -> Option<(i64, Value)> {
    sqlx::query_as(
        "SELECT rev, state->'versions'->0->'value' FROM records
          WHERE collection = 'batched' AND key = $1",
    )
    .bind(key)
    .fetch_optional(store.pool())
    .await
    .unwrap()
}

/// The outbox events queued for `keys` (each event's bytes are its key here), in id order.
async fn queued(store: &Store) -> Vec<String> {
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT event FROM outbox ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    rows.into_iter()
        .map(|(bytes,)| String::from_utf8(bytes).unwrap())
        .filter(|event| event.starts_with("g-"))
        .collect()
}

#[tokio::test]
async fn a_batch_commits_the_writes_that_pass_and_leaves_out_only_those_that_do_not() {
    // No NATS: the outbox keeps what the batch queued, for the test to read.
    let c = Setup::regions(&["eu"])
        .tweak(|config| config.nats_url = "nats://127.0.0.1:1".into())
        .start()
        .await;
    let store = &c.region("eu").region.store;
    for (key, value) in [("g-update", 1), ("g-stale", 1), ("g-exists", 1)] {
        assert_eq!(
            store
                .save(&write(key, 0, json!(value), None))
                .await
                .unwrap(),
            Saved::Yes
        );
    }
    // A floor above the next write's HLC, as a heartbeat would have raised it.
    sqlx::query("UPDATE write_floor SET through_ms = greatest(through_ms, 1000)")
        .execute(store.pool())
        .await
        .unwrap();
    let before = queued(store).await.len();

    let batch = [
        write("g-new", 0, json!("created"), None),
        write("g-update", 1, json!("updated"), None),
        write("g-stale", 7, json!("lost a race"), None),
        write("g-exists", 0, json!("created twice"), None),
        write("g-late", 0, json!("below the floor"), Some(999)),
        write(
            "g-also-new",
            0,
            json!("created too"),
            Some(4_000_000_000_000),
        ),
    ];
    let outcomes = save_batch(store, &batch).await.unwrap();
    let floor = match outcomes[4] {
        Saved::BelowFloor(floor) => floor,
        other => panic!("the write below the floor was {other:?}"),
    };
    assert!(floor >= 1000);
    assert_eq!(
        outcomes,
        [
            Saved::Yes,
            Saved::Yes,
            Saved::Raced,
            Saved::Raced,
            Saved::BelowFloor(floor),
            Saved::Yes
        ]
    );

    assert_eq!(stored(store, "g-new").await, Some((1, json!("created"))));
    assert_eq!(stored(store, "g-update").await, Some((2, json!("updated"))));
    assert_eq!(stored(store, "g-stale").await, Some((1, json!(1))));
    assert_eq!(stored(store, "g-exists").await, Some((1, json!(1))));
    assert_eq!(stored(store, "g-late").await, None);
    assert_eq!(
        stored(store, "g-also-new").await,
        Some((1, json!("created too")))
    );
    // One event per committed write, in the batch's order.
    let events = queued(store).await;
    assert_eq!(events[before..], ["g-new", "g-update", "g-also-new"]);
    c.teardown_without_checks().await;
}

#[tokio::test]
async fn a_batch_locks_its_rows_in_key_order() {
    let c = cluster(&["eu"]).await;
    let store = c.region("eu").region.store.clone();
    for key in ["g-a", "g-m", "g-z"] {
        assert_eq!(
            store.save(&write(key, 0, json!(0), None)).await.unwrap(),
            Saved::Yes
        );
    }
    // Another transaction holds the middle row.
    let held = store.lock("batched", "g-m").await.unwrap();

    // The batch names its rows out of order; it must lock g-a, then wait for g-m, and not
    // have touched g-z yet.
    let batch = tokio::spawn({
        let store = store.clone();
        async move {
            save_batch(
                &store,
                &[
                    write("g-z", 1, json!("z"), None),
                    write("g-m", 1, json!("m"), None),
                    write("g-a", 1, json!("a"), None),
                ],
            )
            .await
        }
    });
    // A row lock is waited for on the holder's transaction id. Any other lock wait is not it:
    // the batch also waits, before it locks a row, while the publisher raises the write floor.
    eventually(10, "the batch waits for the held row", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND wait_event = 'transactionid'
                AND datname = current_database() AND query LIKE '%unnest%'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        waiting == 1
    })
    .await;
    let locked = |key: &'static str| {
        let store = store.clone();
        async move {
            let mut tx = store.pool().begin().await.unwrap();
            let free = sqlx::query(
                "SELECT 1 FROM records WHERE collection = 'batched' AND key = $1 FOR UPDATE NOWAIT",
            )
            .bind(key)
            .execute(&mut *tx)
            .await
            .is_ok();
            tx.rollback().await.unwrap();
            !free
        }
    };
    assert!(
        locked("g-a").await,
        "g-a is locked before g-m is waited for"
    );
    assert!(!locked("g-z").await, "g-z is not locked before g-m");

    drop(held);
    let outcomes = batch.await.unwrap().unwrap();
    assert_eq!(outcomes, [Saved::Yes, Saved::Yes, Saved::Yes]);
    for (key, value) in [("g-a", "a"), ("g-m", "m"), ("g-z", "z")] {
        assert_eq!(stored(&store, key).await, Some((2, json!(value))));
    }
    c.teardown_without_checks().await;
}

/// The `locus_write_batch_size` histogram's sample count and sum at region `id`.
async fn batch_figures(c: &crate::helpers::Cluster, id: &str) -> (f64, f64) {
    let metrics = c.metrics(id).await;
    let figure = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        figure("locus_write_batch_size_count"),
        figure("locus_write_batch_size_sum"),
    )
}

#[tokio::test]
async fn concurrent_writes_share_commits_and_every_answered_write_is_stored_and_replicated() {
    let c = crate::helpers::Setup::regions(&["eu", "us"])
        .tweak(|config| config.database_pool_size = 16)
        .start()
        .await;
    let (batches_before, writes_before) = batch_figures(&c, "eu").await;

    // 64 writers of their own records and 16 of one shared record, all at once, twice over.
    let mut answered = Vec::new();
    for round in 0..2 {
        let mut tasks = Vec::new();
        for writer in 0..80 {
            let (http, url) = (c.http.clone(), c.url("eu").to_owned());
            tasks.push(tokio::spawn(async move {
                let key = if writer < 64 {
                    format!("w{writer:02}")
                } else {
                    "shared".to_owned()
                };
                let value = json!({"writer": writer, "round": round});
                let response = http
                    .put(format!("{url}/v1/collections/grouped/records/{key}"))
                    .json(&value)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "{key}: {}",
                    response.status()
                );
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["value"], value, "the answer is the write's own");
                (key, value)
            }));
        }
        for task in tasks {
            answered.push(task.await.unwrap());
        }
    }

    let (batches, writes) = batch_figures(&c, "eu").await;
    assert!(
        writes - writes_before >= 160.0,
        "every write went through a group commit ({writes_before} -> {writes})"
    );
    assert!(
        writes - writes_before > batches - batches_before,
        "some writes shared a commit: {} writes in {} batches",
        writes - writes_before,
        batches - batches_before
    );

    // Each writer's own record holds its second round; the shared one holds one of its writes,
    // the same in both regions.
    for (key, value) in &answered {
        if key != "shared" && value["round"] == 1 {
            for id in ["eu", "us"] {
                eventually(20, &format!("{key} at {id}"), || async {
                    let response = c.get(id, "grouped", key).await;
                    response.status() == StatusCode::OK
                        && response.json::<Value>().await.unwrap()["value"] == *value
                })
                .await;
            }
        }
    }
    let shared: Value = c.get("eu", "grouped", "shared").await.json().await.unwrap();
    assert!(
        answered
            .iter()
            .any(|(key, value)| key == "shared" && *value == shared["value"]),
        "the shared record holds one of its writes: {shared}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.teardown().await;
}

#[tokio::test]
async fn a_batch_that_fails_as_a_whole_is_committed_write_by_write() {
    let c = cluster(&["eu"]).await;
    let store = c.region("eu").region.store.clone();
    let with_key = |key: &str, idempotency_key: &str| {
        let event = OutboxEvent {
            bytes: key.as_bytes(),
            actor: "eu.7e570000",
            hlc_ms: None,
        };
        let idempotent = locus::storage::IdempotentWrite {
            key: idempotency_key,
            fingerprint: "fingerprint",
            created: true,
            failover: false,
            session: "session",
        };
        RecordWrite::new(
            "batched",
            key,
            0,
            &state_of(json!(key), 1),
            &event,
            Some(&idempotent),
        )
    };
    assert_eq!(
        store.save(&with_key("g-first", "taken")).await.unwrap(),
        Saved::Yes
    );

    // One statement: the taken idempotency key fails it, and nothing of it is written.
    let batch = [
        write("g-alone-1", 0, json!(1), None),
        with_key("g-second", "taken"),
    ];
    assert!(save_batch(&store, &batch).await.is_err());
    assert_eq!(stored(&store, "g-alone-1").await, None);

    // Through the group committer: queued together (this runtime polls every save before the
    // committer runs), failed together, then committed one by one, each with its own outcome.
    let registry = prometheus::Registry::new();
    let commits = locus::storage::group_commit::GroupCommit::new(store.clone(), 1, &registry);
    let mut writes: Vec<RecordWrite> = (0..19)
        .map(|i| write(&format!("g-many-{i:02}"), 0, json!(i), None))
        .collect();
    writes.insert(7, with_key("g-third", "taken"));
    let outcomes =
        futures_util::future::join_all(writes.into_iter().map(|w| commits.save(w))).await;
    let outcomes: Vec<Saved> = outcomes.into_iter().map(Result::unwrap).collect();
    assert_eq!(outcomes[7], Saved::KeyTaken);
    assert_eq!(outcomes.iter().filter(|o| **o == Saved::Yes).count(), 19);
    assert_eq!(stored(&store, "g-third").await, None);
    for i in 0..19 {
        assert_eq!(
            stored(&store, &format!("g-many-{i:02}")).await,
            Some((1, json!(i)))
        );
    }
    let batch_sizes = registry.gather();
    let histogram = batch_sizes
        .iter()
        .find(|f| f.name() == "locus_write_batch_size")
        .unwrap()
        .get_metric()[0]
        .get_histogram()
        .clone();
    assert_eq!(
        (histogram.get_sample_count(), histogram.get_sample_sum()),
        (1, 20.0),
        "the twenty writes were one batch"
    );
    c.teardown_without_checks().await;
}
