//! Integrity: whatever a region accepts reads back identically everywhere, nothing a region
//! accepts can stop replication, and regions that missed events converge again by repair.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{cluster, eventually, expect_problem, record_path, Cluster};

async fn put_text(c: &Cluster, id: &str, key: &str, body: String) -> reqwest::Response {
    c.request(id, Method::PUT, &record_path("poison", key))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The body text of a read, and its value.
async fn read_value(c: &Cluster, id: &str, key: &str) -> Option<(String, Value)> {
    let response = c.get(id, "poison", key).await;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body: Value = response.json().await.unwrap();
    Some((body["value"].to_string(), body["value"].clone()))
}

/// A request with the admin token.
async fn admin_call(c: &Cluster, id: &str, method: Method, path: &str) -> reqwest::Response {
    c.request(id, method, path)
        .bearer_auth(crate::helpers::ADMIN)
        .send()
        .await
        .unwrap()
}

/// Run a repair round at `id` from `peer` through the admin API, and return its report.
async fn repair_at(c: &Cluster, id: &str, peer: &str) -> Value {
    let response = admin_call(c, id, Method::POST, &format!("/v1/regions/{peer}/repair")).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn values_that_could_poison_replication_are_refused_or_kept_exact() {
    let c = cluster(&["eu", "us"]).await;

    // Doubles that do not round-trip without exact parsing, and -0, which jsonb makes 0.
    let tricky = r#"{"a":9018998923926082416e-26,"b":[0.1,1e-7,5e-324,1.7976931348623157e308,-0.0,-0,123456789012345678],"z":-0.0}"#;
    let written = put_text(&c, "eu", "numbers", tricky.to_owned()).await;
    assert_eq!(written.status(), StatusCode::CREATED);
    let answered: Value = written.json().await.unwrap();
    let answered = answered["value"].to_string();
    assert!(answered.contains("9.018998923926083e-8"), "{answered}");
    for id in ["eu", "us"] {
        eventually(20, "the value reaches every region", || async {
            read_value(&c, id, "numbers").await.is_some()
        })
        .await;
        let (seen, _) = read_value(&c, id, "numbers").await.unwrap();
        assert_eq!(seen, answered, "{id} reads back what eu answered");
    }

    // Too deep, NUL in a string or a key: a 400 each, nothing stored.
    let detail = expect_problem(
        put_text(&c, "eu", "deep", nested(101)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(detail.contains("nested deeper"), "{detail}");
    for body in [r#"{"a":"x\u0000y"}"#, r#"{"a\u0000":1}"#] {
        let detail = expect_problem(
            put_text(&c, "eu", "nul", body.to_owned()).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(detail.contains("NUL"), "{detail}");
    }
    // At the depth limit a value is stored, read and replicated.
    assert_eq!(
        put_text(&c, "eu", "deep", nested(100)).await.status(),
        StatusCode::CREATED
    );

    // A body within the size limit whose event would not fit NATS's max_payload: `1e15`
    // re-encodes as `1000000000000000.0`, so 512 KiB of it becomes about 2 MB.
    let mut numbers = String::from("[");
    while numbers.len() < 500 * 1024 {
        numbers.push_str("1e15,");
    }
    numbers.push_str("1]");
    let detail = expect_problem(
        put_text(&c, "eu", "swollen", numbers).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(detail.contains("replication event"), "{detail}");

    // Nothing above stopped replication: a later write arrives, and so did the deep value.
    assert_eq!(
        put_text(&c, "eu", "after", "\"after\"".to_owned())
            .await
            .status(),
        StatusCode::CREATED
    );
    eventually(20, "later writes replicate", || async {
        read_value(&c, "us", "after").await.is_some()
    })
    .await;
    let (eu_deep, _) = read_value(&c, "eu", "deep").await.unwrap();
    assert_eq!(read_value(&c, "us", "deep").await.unwrap().0, eu_deep);
    for key in ["nul", "swollen"] {
        assert_eq!(
            c.get_status("eu", &record_path("poison", key)).await,
            StatusCode::NOT_FOUND
        );
    }
    c.teardown().await;
}

#[tokio::test]
async fn a_version_from_a_clock_far_ahead_does_not_drag_later_writes() {
    let c = cluster(&["eu", "us"]).await;
    let max_drift_ms = c.region("eu").region.config.clock.max_drift_ms;
    let now_ms = locus::clock::hlc::wall_clock_ms();
    let day_ahead = locus::clock::hlc::Hlc::from_parts(now_ms + 86_400_000, 0);

    // A version of an eu-homed record from us, whose clock runs a day ahead, straight onto us's
    // stream.
    let event = json!({
        "v": 1, "origin": "us", "collection": "clock", "key": "ahead",
        "home": {"epoch": 0, "region": "eu"},
        "version": {"value": "from the future", "deleted": false, "region": "us",
                    "hlc": day_ahead.to_string(), "version": {"us.feedface": 1}}
    });
    let js = async_nats::jetstream::new(async_nats::connect(crate::helpers::nats()).await.unwrap());
    js.publish(
        locus::replication::subject(&c.deployment, "us"),
        serde_json::to_vec(&event).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    eventually(20, "eu applies the version from the future", || async {
        c.get("eu", "clock", "ahead").await.status() == StatusCode::OK
    })
    .await;

    // A write at eu that supersedes it still orders after it ...
    let superseding = c.put("eu", "clock", "ahead", &json!("local")).await;
    assert_eq!(superseding.status(), StatusCode::OK);
    let superseding: Value = superseding.json().await.unwrap();
    let stamped: u64 = superseding["hlc"].as_str().unwrap().parse().unwrap();
    assert!(stamped > day_ahead.as_u64());
    // ... but eu's next write to another record is stamped near eu's own time.
    let written: Value = c
        .put("eu", "clock", "later", &json!("now"))
        .await
        .json()
        .await
        .unwrap();
    let hlc: u64 = written["hlc"].as_str().unwrap().parse().unwrap();
    let millis = locus::clock::hlc::Hlc::from_u64(hlc).millis();
    assert!(
        millis <= locus::clock::hlc::wall_clock_ms() + max_drift_ms,
        "a later write was dragged {} ms ahead",
        millis.saturating_sub(now_ms)
    );
    c.teardown().await;
}

#[tokio::test]
async fn repair_pulls_back_what_a_region_lost_and_only_that() {
    let c = cluster(&["eu", "us"]).await;
    for i in 0..300 {
        let response = c
            .put("eu", "kept", &format!("k{i:03}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    assert_eq!(
        c.put("us", "other", "x", &json!(1)).await.status(),
        StatusCode::CREATED
    );
    c.assert_converged().await;

    // us loses records behind replication's back (a bad restore, a bug, an operator's DELETE),
    // and one of its records is changed under the same version (what only a hash can see).
    let us = c.region("us").region.clone();
    sqlx::query("DELETE FROM records WHERE collection = 'kept' AND key < 'k010'")
        .execute(us.store.pool())
        .await
        .unwrap();
    corrupt_record(&c, "us", "kept", "k100").await;
    let lost = c.get("us", "kept", "k005").await;
    assert_eq!(lost.status(), StatusCode::NOT_FOUND);

    // Only the admin may start a round, only against a peer; peers' endpoints want the peer token.
    let path = "/v1/regions/eu/repair";
    let r = c.request("us", Method::POST, path).send().await.unwrap();
    expect_problem(r, StatusCode::UNAUTHORIZED).await;
    let r = admin_call(&c, "us", Method::POST, "/v1/regions/mars/repair").await;
    expect_problem(r, StatusCode::NOT_FOUND).await;
    let r = c
        .request("eu", Method::GET, "/v1/peer/digests?collection=kept")
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::UNAUTHORIZED).await;

    // us's first copy at start was a round against eu already.
    let rounds_before = c.peer_entry("us", "eu").await["replication"]["repair"]["rounds"]
        .as_u64()
        .unwrap();
    let report = repair_at(&c, "us", "eu").await;
    // Ten missing records come back; the corrupted one has a different hash, so it is fetched,
    // but its vector equals eu's: the merge keeps one of the two, the same in every region.
    assert_eq!(report["records_fetched"], 11, "{report}");
    assert!(
        report["buckets_differing"].as_u64().unwrap() <= 11,
        "{report}"
    );
    assert!(
        report["buckets_compared"].as_u64().unwrap() > 200,
        "{report}"
    );
    for i in 0..10 {
        let back = c.get("us", "kept", &format!("k{i:03}")).await;
        assert_eq!(back.status(), StatusCode::OK);
    }
    let status = c.peer_entry("us", "eu").await;
    assert_eq!(
        status["replication"]["repair"]["rounds"],
        rounds_before + 1,
        "{status}"
    );
    let metrics = c.metrics("us").await;
    assert!(
        metrics.contains(&format!(
            "locus_repair_rounds_total{{peer=\"eu\",result=\"complete\"}} {}",
            rounds_before + 1
        )),
        "{metrics}"
    );
    // The tests run on the pinned, current nats-server, and each region says which it uses.
    let version = locus::nats_server::VERSION;
    assert!(
        metrics.contains(&format!(
            "locus_nats_server_info{{version=\"{version}\"}} 1"
        )),
        "{metrics}"
    );
    let regions = c.get_json("us", "/v1/regions").await;
    assert_eq!(regions["regions"][0]["nats_version"], version, "{regions}");
    // Equal vectors, different content: logged as an integrity violation, and every region keeps
    // the same one once eu has pulled from us too.
    let conflicts = c
        .get_json("us", "/v1/conflicts?collection=kept&key=k100")
        .await;
    assert_eq!(
        conflicts["conflicts"][0]["strategy"], "integrity",
        "{conflicts}"
    );
    repair_at(&c, "eu", "us").await;
    c.assert_converged().await;
    // Converged regions compare without fetching anything.
    let again = repair_at(&c, "us", "eu").await;
    assert_eq!(again["records_fetched"], 0, "{again}");
    assert_eq!(again["buckets_differing"], 0, "{again}");
    c.teardown().await;
}

/// Hold a region's apply lock, so it applies nothing from its peers until released.
async fn pause_applies(c: &Cluster, id: &str) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut connection = c.region(id).region.store.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(locus::storage::apply::APPLY_LOCK)
        .execute(&mut *connection)
        .await
        .unwrap();
    connection
}

async fn resume_applies(mut connection: sqlx::pool::PoolConnection<sqlx::Postgres>) {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(locus::storage::apply::APPLY_LOCK)
        .execute(&mut *connection)
        .await
        .unwrap();
}

#[tokio::test]
async fn read_your_writes_holds_under_anywhere_homing_where_the_home_lags_too() {
    let c = cluster(&["eu", "us", "ap"]).await;
    c.configure_everywhere("anywhere", &json!({"homing": "anywhere"}))
        .await;
    assert_eq!(
        c.request("eu", Method::PUT, &record_path("anywhere", "k"))
            .json(&json!("v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    for id in ["us", "ap"] {
        eventually(20, "v1 everywhere", || async {
            c.get(id, "anywhere", "k").await.status() == StatusCode::OK
        })
        .await;
    }
    // The home (eu) and the reader (ap) lag; us takes the write.
    let eu_paused = pause_applies(&c, "eu").await;
    let ap_paused = pause_applies(&c, "ap").await;
    let written = c.put("us", "anywhere", "k", &json!("v2")).await;
    assert_eq!(written.status(), StatusCode::OK);
    let session = crate::helpers::header(&written, "locus-session")
        .unwrap()
        .to_owned();

    // ap waits, then reads where the write was taken, not at the lagging home.
    let read = c
        .request("ap", Method::GET, &record_path("anywhere", "k"))
        .header("locus-session", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(crate::helpers::header(&read, "locus-region"), Some("us"));
    assert_eq!(read.json::<Value>().await.unwrap()["value"], "v2");
    // A read forwarded to a region that lacks the session's write is a 503, never stale data.
    let forwarded = c
        .request("eu", Method::GET, &record_path("anywhere", "k"))
        .header("locus-session", &session)
        .header("locus-forwarded-by", "ap")
        .bearer_auth(crate::helpers::PEER)
        .send()
        .await
        .unwrap();
    let detail = expect_problem(forwarded, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(detail.contains("session"), "{detail}");

    resume_applies(eu_paused).await;
    resume_applies(ap_paused).await;
    c.teardown().await;
}

#[tokio::test]
async fn repair_brings_over_a_resolver_module_a_region_lacks() {
    let c = cluster(&["eu", "us"]).await;
    let wat = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/resolvers/wat/hide-conflicts.wat"
    ))
    .unwrap();
    let uploaded = c.upload_resolver("eu", "hide", wat).await;
    assert_eq!(uploaded.status(), StatusCode::CREATED);
    let sha256 = uploaded.json::<Value>().await.unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let us = c.region("us").region.clone();
    let held = || async { us.store.module_hashes().await.unwrap() == vec![sha256.clone()] };
    eventually(20, "the module's chunks reach us", held).await;
    // us loses the module (a chunk that never arrived leaves it in the same state).
    sqlx::query("DELETE FROM resolver_modules")
        .execute(us.store.pool())
        .await
        .unwrap();
    let report = repair_at(&c, "us", "eu").await;
    assert_eq!(report["modules_fetched"], 1, "{report}");
    assert!(held().await, "the module is back, under its sha256");
    c.teardown().await;
}

/// `pg_dump` of a database, in the custom format, to a file under the system temp directory.
fn dump_database(url: &str, name: &str) -> std::path::PathBuf {
    let file = std::env::temp_dir().join(format!("locus-{name}-{}.dump", std::process::id()));
    let status = std::process::Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&file)
        .arg(url)
        .status()
        .expect("pg_dump runs");
    assert!(status.success(), "pg_dump of {url}");
    file
}

/// Replace a database by the contents of a dump.
async fn restore_database(url: &str, dump: &std::path::Path) {
    use sqlx::migrate::MigrateDatabase;
    sqlx::Postgres::force_drop_database(url).await.unwrap();
    sqlx::Postgres::create_database(url).await.unwrap();
    let status = std::process::Command::new("pg_restore")
        .args(["--no-owner", "--dbname", url])
        .arg(dump)
        .status()
        .expect("pg_restore runs");
    assert!(status.success(), "pg_restore into {url}");
}

/// Write `{"phase": phase}` at eu to each of `keys` of the collection `restored`.
async fn put_all(c: &Cluster, phase: &str, keys: Vec<String>) {
    for key in keys {
        let status = c
            .put("eu", "restored", &key, &json!({ "phase": phase }))
            .await
            .status();
        assert!(status.is_success(), "{key}: {status}");
    }
}

fn keys(prefix: &str) -> Vec<String> {
    (0..5).map(|i| format!("{prefix}{i}")).collect()
}

/// The `phase` a region reads for `key` of `restored` (null if absent).
async fn phase_at(c: &Cluster, id: &str, key: &str) -> Value {
    let response = c.get(id, "restored", key).await;
    if response.status() != StatusCode::OK {
        return Value::Null;
    }
    let body: Value = response.json().await.unwrap();
    body["value"]["phase"].clone()
}

#[tokio::test]
async fn a_region_restored_from_an_earlier_dump_loses_nothing_and_reuses_no_version() {
    let mut c = cluster(&["eu", "us"]).await;
    let eu_config = c.region("eu").region.config.clone();
    eventually(20, "eu settles its incarnation", || async {
        c.get_json("eu", "/v1/regions").await["incarnation"].is_string()
    })
    .await;
    let before = c.get_json("eu", "/v1/regions").await["incarnation"].clone();
    put_all(&c, "dumped", keys("k")).await;
    eventually(20, "us holds what the dump will hold", || async {
        phase_at(&c, "us", "k4").await == "dumped"
    })
    .await;
    let dump = dump_database(&eu_config.database_url, "eu");
    // Written after the dump: the restore rewinds them at eu, but us holds them.
    put_all(&c, "after", keys("k")).await;
    put_all(&c, "after", keys("late")).await;
    eventually(20, "us holds what eu wrote after the dump", || async {
        phase_at(&c, "us", "k4").await == "after" && phase_at(&c, "us", "late4").await == "after"
    })
    .await;

    c.stop("eu").await;
    restore_database(&eu_config.database_url, &dump).await;
    let _ = std::fs::remove_file(&dump);
    c.restart("eu", eu_config).await;

    eventually(20, "eu settles an incarnation", || async {
        c.get_json("eu", "/v1/regions").await["incarnation"].is_string()
    })
    .await;
    let after = c.get_json("eu", "/v1/regions").await["incarnation"].clone();
    assert_ne!(
        after, before,
        "a restored database must not write as its old incarnation"
    );
    assert!(c
        .metrics("eu")
        .await
        .contains("locus_incarnation_rotations_total 1"));
    // Ready only once a repair round against every peer has completed: by then everything the
    // rewind took is back, with no waiting.
    eventually(30, "the restored eu becomes ready", || async {
        c.get_status("eu", "/readyz").await == StatusCode::OK
    })
    .await;
    for key in keys("late") {
        assert_eq!(
            phase_at(&c, "eu", &key).await,
            "after",
            "{key} is back before eu says it is ready"
        );
    }

    // Writes on the restored database: under the old incarnation they would reuse the vectors of
    // the "after" writes us holds, and the two regions would keep different values for good.
    put_all(&c, "restored", keys("k")).await;
    // Nothing acknowledged is lost: the rotation asks for repair, which brings back what the
    // rewind took.
    eventually(
        30,
        "eu gets back the records the restore rewound",
        || async { phase_at(&c, "eu", "late4").await == "after" },
    )
    .await;
    for key in keys("k") {
        eventually(
            20,
            "both regions read the write made after the restore",
            || async {
                phase_at(&c, "eu", &key).await == "restored"
                    && phase_at(&c, "us", &key).await == "restored"
            },
        )
        .await;
    }
    for id in ["eu", "us"] {
        assert!(
            c.metrics(id)
                .await
                .contains("locus_integrity_violations_total 0"),
            "{id} found two writes under one version"
        );
    }
    c.teardown().await;
}

#[tokio::test]
async fn a_region_restored_from_before_deletes_whose_tombstones_are_reclaimed_brings_none_back() {
    let mut c = crate::helpers::Setup::regions(&["eu", "us"])
        .tweak(|config| config.replication.reclaim_interval_ms = 300)
        .start()
        .await;
    let eu_config = c.region("eu").region.config.clone();
    let keys: Vec<String> = (0..5).map(|i| format!("g{i}")).collect();
    for key in &keys {
        let put = c.put("eu", "graves", key, &json!({ "key": key })).await;
        assert_eq!(put.status(), StatusCode::CREATED);
    }
    crate::helpers::until_everywhere(&c, "graves", &keys).await;
    let dump = dump_database(&eu_config.database_url, "graves");
    // Deleted after the dump, and reclaimed everywhere: nothing but the dump remembers them.
    for key in &keys[..3] {
        assert_eq!(
            c.delete("eu", "graves", key).await.status(),
            StatusCode::NO_CONTENT
        );
    }
    for id in ["eu", "us"] {
        eventually(30, "the tombstones are reclaimed", || async {
            c.stored_keys(id, "graves").await == keys[3..]
        })
        .await;
    }

    // eu comes back from the dump, reaching us slowly, so its catch-up takes a while.
    c.stop("eu").await;
    restore_database(&eu_config.database_url, &dump).await;
    let _ = std::fs::remove_file(&dump);
    let slow = locus::delay_proxy::DelayProxy::start(
        c.url("us").trim_start_matches("http://"),
        std::time::Duration::from_millis(400),
    )
    .await
    .unwrap();
    let mut config = eu_config.clone();
    for peer in &mut config.peers {
        peer.api_url = slow.url();
    }
    c.restart("eu", config).await;
    eventually(30, "eu knows it was restored", || async {
        c.get_json("eu", "/v1/regions").await["catching_up_from"] == json!(["us"])
    })
    .await;
    // Meanwhile us repairs from eu, which still holds the deleted records: it takes none back.
    let report = repair_at(&c, "us", "eu").await;
    assert!(report["records_skipped"].as_u64().unwrap() >= 3, "{report}");
    assert_eq!(c.stored_keys("us", "graves").await, keys[3..]);
    assert_eq!(
        c.get_json("eu", "/v1/regions").await["catching_up_from"],
        json!(["us"]),
        "eu was still catching up during us's round"
    );

    // eu's catch-up deletes them: us lacks them and every region had applied what they hold.
    slow.set_delay(std::time::Duration::ZERO);
    eventually(60, "the restored eu becomes ready", || async {
        c.get_status("eu", "/readyz").await == StatusCode::OK
    })
    .await;
    for id in ["eu", "us"] {
        assert_eq!(c.stored_keys(id, "graves").await, keys[3..], "{id}");
        for key in &keys[..3] {
            assert_eq!(
                c.get(id, "graves", key).await.status(),
                StatusCode::NOT_FOUND
            );
        }
    }
    c.teardown().await;
}

/// The dead letters `id` holds, through the admin API.
async fn dead_letters(c: &Cluster, id: &str) -> Vec<Value> {
    let response = admin_call(c, id, Method::GET, "/v1/dead-letters").await;
    assert_eq!(response.status(), StatusCode::OK);
    let page: Value = response.json().await.unwrap();
    page["dead_letters"].as_array().unwrap().clone()
}

/// Make region `id` refuse to store any record keyed `key`, as a region with a local fault would:
/// a trigger named `refuse_<key>` raises on every insert and update of it.
async fn refuse_to_store(c: &Cluster, id: &str, key: &str) {
    let pool = c.region(id).region.store.pool();
    for statement in [
        format!(
            "CREATE FUNCTION refuse_{key}() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN IF NEW.key = '{key}' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER refuse_{key} BEFORE INSERT OR UPDATE ON records
               FOR EACH ROW EXECUTE FUNCTION refuse_{key}()"
        ),
    ] {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
}

/// Undo [`refuse_to_store`].
async fn store_again(c: &Cluster, id: &str, key: &str) {
    sqlx::query(&format!("DROP TRIGGER refuse_{key} ON records"))
        .execute(c.region(id).region.store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn what_a_peer_cannot_apply_is_set_aside_skipped_by_repair_and_retried_by_an_operator() {
    let c = crate::helpers::Setup::regions(&["eu", "us"])
        .tweak(|config| config.replication.reclaim_interval_ms = 200)
        .start()
        .await;
    // us refuses one record, as a region with a local fault would (a full disk, a bad index):
    // the event cannot be applied there even alone.
    refuse_to_store(&c, "us", "bad").await;
    for key in ["good1", "bad", "good2"] {
        assert_eq!(
            c.put("eu", "aside", key, &json!(key)).await.status(),
            StatusCode::CREATED
        );
    }
    // An unreadable event in eu's stream, as a buggy or hostile publisher would leave.
    let js = async_nats::jetstream::new(async_nats::connect(crate::helpers::nats()).await.unwrap());
    js.publish(
        locus::replication::subject(&c.deployment, "eu"),
        "not an event".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(
        c.put("eu", "aside", "good3", &json!("after"))
            .await
            .status(),
        StatusCode::CREATED
    );

    // The stream goes on past both.
    eventually(20, "events after the poison ones replicate", || async {
        c.get("us", "aside", "good3").await.status() == StatusCode::OK
            && c.get("us", "aside", "good2").await.status() == StatusCode::OK
    })
    .await;
    eventually(20, "both are set aside as dead letters", || async {
        dead_letters(&c, "us").await.len() >= 2
    })
    .await;
    // While us holds them, its heartbeats say nothing of what it applied: no tombstone it may
    // lack is reclaimed anywhere.
    let reclaimed_at_eu = || async {
        c.get_json("eu", "/v1/regions").await["tombstones_reclaimed_through_ms"].as_u64()
    };
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let held = reclaimed_at_eu().await;
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert_eq!(reclaimed_at_eu().await, held, "reclamation waits for us");

    // Repair fetches the refused record, fails to merge it, and marks it rather than failing
    // every round on it; the next round skips it.
    let first = repair_at(&c, "us", "eu").await;
    let marked = first["records_unrepairable"].as_u64().unwrap()
        + first["records_skipped"].as_u64().unwrap();
    assert_eq!(
        marked, 1,
        "marked by this round or by the one the dead letter woke: {first}"
    );
    let round = repair_at(&c, "us", "eu").await;
    assert_eq!(round["records_skipped"], 1, "{round}");
    assert_eq!(round["records_fetched"], 0, "{round}");
    let letters = dead_letters(&c, "us").await;
    let event = letters
        .iter()
        .find(|d| d["stream_sequence"].is_i64() && d["key"].is_null())
        .expect("the unreadable event is listed");
    let record = letters
        .iter()
        .find(|d| d["stream_sequence"].is_null() && d["key"] == "bad")
        .expect("the unrepairable record is listed");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("refused by the test"),
        "{record}"
    );
    let regions = c.get_json("us", "/v1/regions").await;
    assert_eq!(
        regions["dead_letters"].as_i64().unwrap(),
        letters.len() as i64
    );
    assert!(c
        .metrics("us")
        .await
        .contains(&format!("locus_dead_letters {}", letters.len())));

    // Retrying while the fault lasts fails again, counted; nothing is lost or looped.
    let id = record["id"].as_i64().unwrap();
    let again = admin_call(
        &c,
        "us",
        Method::POST,
        &format!("/v1/dead-letters/{id}/retry"),
    )
    .await;
    let detail = expect_problem(again, StatusCode::CONFLICT).await;
    assert!(detail.contains("refused by the test"), "{detail}");

    // The fault is fixed: the operator retries the record, and it is merged.
    store_again(&c, "us", "bad").await;
    let retried = admin_call(
        &c,
        "us",
        Method::POST,
        &format!("/v1/dead-letters/{id}/retry"),
    )
    .await;
    assert_eq!(retried.status(), StatusCode::OK);
    let body: Value = c.get("us", "aside", "bad").await.json().await.unwrap();
    assert_eq!(body["value"], "bad");
    // The unreadable event stays unreadable: discarded by the operator.
    let id = event["id"].as_i64().unwrap();
    expect_problem(
        admin_call(
            &c,
            "us",
            Method::POST,
            &format!("/v1/dead-letters/{id}/retry"),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    let discarded = admin_call(&c, "us", Method::DELETE, &format!("/v1/dead-letters/{id}")).await;
    assert_eq!(discarded.status(), StatusCode::NO_CONTENT);
    expect_problem(
        admin_call(&c, "us", Method::DELETE, &format!("/v1/dead-letters/{id}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    // The stream's dead letter of "bad" went with the merge of its record.
    assert_eq!(dead_letters(&c, "us").await, Vec::<Value>::new());
    eventually(
        20,
        "reclamation goes on once us holds no dead letter",
        || async { reclaimed_at_eu().await > held },
    )
    .await;
    expect_problem(
        c.request("us", Method::GET, "/v1/dead-letters")
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn sql_and_code_put_a_key_in_the_same_bucket() {
    let c = cluster(&["eu"]).await;
    let pool = c.region("eu").region.store.pool().clone();
    for key in ["", "a", "user:42", "ünïcødé ✓", "k/with/slashes"] {
        let in_sql: i32 = sqlx::query_scalar(
            "SELECT (get_byte(sha256(convert_to($1, 'UTF8')), 2) << 8) | get_byte(sha256(convert_to($1, 'UTF8')), 3)",
        )
        .bind(key)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(in_sql, locus::record::digest::bucket_of(key), "{key:?}");
    }
    c.teardown().await;
}

#[tokio::test]
async fn a_states_fetch_takes_a_full_batch_of_the_longest_keys_and_refuses_more() {
    use locus::record::names::MAX_NAME_BYTES;
    use locus::replication::repair::FETCH_KEYS;
    let c = cluster(&["eu"]).await;
    let long = "a".repeat(MAX_NAME_BYTES);
    for key in [long.as_str(), "k1"] {
        assert_eq!(
            c.put("eu", "fetched", key, &json!({"key": key}))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    // A full batch of the longest keys, each character one that JSON escapes, and the two held.
    let mut keys: Vec<String> = (0..FETCH_KEYS - 2)
        .map(|i| format!("{}{i:04}", "\"".repeat(MAX_NAME_BYTES - 4)))
        .collect();
    keys.push(long.clone());
    keys.push("k1".into());
    keys.sort_unstable();
    let fetch = |keys: Vec<String>| {
        c.request("eu", Method::POST, "/v1/peer/states?collection=fetched")
            .bearer_auth(crate::helpers::PEER)
            .json(&json!({ "keys": keys }))
            .send()
    };
    let response = fetch(keys.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    let held: Vec<&str> = answer["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record[0].as_str().unwrap())
        .collect();
    assert_eq!(held, vec![long.as_str(), "k1"]);

    keys.push("k2".into());
    let detail = expect_problem(fetch(keys).await.unwrap(), StatusCode::BAD_REQUEST).await;
    assert!(
        detail.contains(&format!("at most {FETCH_KEYS} keys")),
        "{detail}"
    );
    c.teardown().await;
}

#[tokio::test]
async fn the_peer_hash_listing_pages_through_every_key_of_the_chosen_buckets_once() {
    let c = cluster(&["eu"]).await;
    let keys: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
    for key in &keys {
        assert_eq!(
            c.put("eu", "paged", key, &json!(1)).await.status(),
            StatusCode::CREATED
        );
    }
    // Every bucket but one of those holding a key.
    let mut buckets: Vec<i32> = keys
        .iter()
        .map(|k| locus::record::digest::bucket_of(k))
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    let left_out = buckets.remove(buckets.len() / 2);
    let mut listed = Vec::new();
    let mut after = Value::Null;
    for _ in 0..20 {
        let response = c
            .request("eu", Method::POST, "/v1/peer/hashes?collection=paged")
            .bearer_auth(crate::helpers::PEER)
            .json(&json!({ "buckets": buckets, "after": after, "limit": 2 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.unwrap();
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 2);
        for entry in entries {
            listed.push((
                entry[0].as_i64().unwrap() as i32,
                entry[1].as_str().unwrap().to_owned(),
            ));
        }
        after = page["next"].clone();
        if after.is_null() {
            break;
        }
    }
    let mut expected: Vec<(i32, String)> = keys
        .iter()
        .map(|k| (locus::record::digest::bucket_of(k), k.clone()))
        .filter(|(bucket, _)| *bucket != left_out)
        .collect();
    expected.sort();
    assert_eq!(listed, expected, "in (bucket, key) order, each once");
    c.teardown().await;
}

/// `wanted` buckets of keys `{prefix}{n}`, each holding at least `sizes[i]` of them, none of the
/// buckets in `taken`; returns the first `sizes[i]` keys of each.
fn keys_sharing_buckets(prefix: &str, sizes: &[usize], taken: &[i32]) -> Vec<Vec<String>> {
    use locus::record::digest::bucket_of;
    let mut by_bucket: std::collections::HashMap<i32, Vec<String>> = Default::default();
    let mut found: Vec<Vec<String>> = Vec::new();
    let mut used: Vec<i32> = taken.to_vec();
    for n in 0.. {
        let key = format!("{prefix}{n}");
        let bucket = bucket_of(&key);
        let keys = by_bucket.entry(bucket).or_default();
        keys.push(key);
        let size = sizes[found.len()];
        if keys.len() == size && !used.contains(&bucket) {
            used.push(bucket);
            found.push(by_bucket[&bucket].clone());
            if found.len() == sizes.len() {
                break;
            }
        }
    }
    found
}

/// Delete `keys` of `collection` at `id` behind replication's back (a bad restore, a disk, an
/// operator's DELETE); returns how many rows went.
async fn lose_records(c: &Cluster, id: &str, collection: &str, keys: &[&String]) -> u64 {
    let region = &c.region(id).region;
    let lost = sqlx::query("DELETE FROM records WHERE collection = $1 AND key = ANY($2)")
        .bind(collection)
        .bind(keys)
        .execute(region.store.pool())
        .await
        .unwrap();
    for key in keys {
        region.forget_cached(collection, key);
    }
    lost.rows_affected()
}

/// Change a record's state in place at `id`, under the same version: what only its hash shows.
async fn corrupt_record(c: &Cluster, id: &str, collection: &str, key: &str) {
    let store = &c.region(id).region.store;
    let mut state: Value =
        sqlx::query_scalar("SELECT state FROM records WHERE collection = $1 AND key = $2")
            .bind(collection)
            .bind(key)
            .fetch_one(store.pool())
            .await
            .unwrap();
    state["versions"][0]["value"] = json!({"corrupted": key});
    let hash = locus::record::digest::state_hash(&serde_json::from_value(state.clone()).unwrap());
    sqlx::query(
        "UPDATE records SET state = $3, hash_hi = $4, hash_lo = $5
          WHERE collection = $1 AND key = $2",
    )
    .bind(collection)
    .bind(key)
    .bind(&state)
    .bind(hash.hi)
    .bind(hash.lo)
    .execute(store.pool())
    .await
    .unwrap();
    c.region(id).region.forget_cached(collection, key);
}

#[tokio::test]
async fn repair_fetches_a_bucket_s_one_missing_record_by_hash_and_lists_buckets_that_differ_otherwise(
) {
    use locus::record::digest::bucket_of;
    let c = cluster(&["eu", "us"]).await;
    // Three buckets: one that will lack one record of two (found by hash), one that will lack
    // one record of three and hold another changed (one more record there, but the digests' XOR
    // is no record's hash: listed), one that will lack two of two (listed).
    let shared = keys_sharing_buckets("s", &[2, 3, 2], &[]);
    let (a, b, cc) = (&shared[0], &shared[1], &shared[2]);
    // And ten large records alone in their buckets, lacked too: more than one answer's byte
    // limit, so the lookup is asked again for what follows its first answer.
    let taken: Vec<i32> = shared.iter().map(|keys| bucket_of(&keys[0])).collect();
    let large: Vec<String> = keys_sharing_buckets("large", &[1; 10], &taken)
        .into_iter()
        .flatten()
        .collect();
    let blob = "x".repeat(480 * 1024);
    let mut all: Vec<String> = shared.iter().flatten().cloned().collect();
    for key in &all {
        let response = c.put("eu", "lacked", key, &json!({"key": key})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    for key in &large {
        let response = c.put("eu", "lacked", key, &json!({"blob": blob})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    all.extend(large.iter().cloned());
    crate::helpers::until_everywhere(&c, "lacked", &all).await;

    // The peer answers a lookup by bucket and hash, up to its byte limit.
    let eu = c.region("eu").region.clone();
    let mut wanted = Vec::new();
    for key in &large {
        let (hi, lo): (i64, i64) = sqlx::query_as(
            "SELECT hash_hi, hash_lo FROM records WHERE collection = 'lacked' AND key = $1",
        )
        .bind(key)
        .fetch_one(eu.store.pool())
        .await
        .unwrap();
        let hash = locus::record::digest::StateHash { hi, lo };
        wanted.push(json!({"bucket": bucket_of(key), "hash": hash.to_hex()}));
    }
    wanted.sort_by_key(|w| w["bucket"].as_i64());
    let look_up = |wanted: Value, token: &'static str| {
        c.request(
            "eu",
            Method::POST,
            "/v1/peer/states-by-hash?collection=lacked",
        )
        .bearer_auth(token)
        .json(&json!({ "wanted": wanted }))
        .send()
    };
    let response = look_up(json!(wanted), crate::helpers::PEER).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    let answered = answer["records"].as_array().unwrap().len();
    assert!(
        answer["complete"] == json!(false) && (1..10).contains(&answered),
        "{answered} records, complete: {}",
        answer["complete"]
    );
    // The API document says what a hash looks like, so fuzzing sends ones the peer can look up.
    let doc = c.get_json("eu", "/openapi.json").await;
    let wanted_schema = &doc["components"]["schemas"]["WantedState"]["properties"]["hash"];
    assert_eq!(
        wanted_schema["pattern"], "^[0-9a-fA-F]{32}$",
        "{wanted_schema}"
    );
    let bad = json!([{"bucket": 1, "hash": "not hex"}]);
    expect_problem(
        look_up(bad, crate::helpers::PEER).await.unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect_problem(
        look_up(json!(wanted), crate::helpers::ADMIN).await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;

    let lacked: Vec<&String> = [&a[0], &b[0], &cc[0], &cc[1]]
        .into_iter()
        .chain(&large)
        .collect();
    assert_eq!(lose_records(&c, "us", "lacked", &lacked).await, 14);
    corrupt_record(&c, "us", "lacked", &b[1]).await;

    let report = repair_at(&c, "us", "eu").await;
    // Eleven found by hash (a's and the large ones), without listing their buckets; b's and
    // c's buckets listed whole, their three missing records and the changed one fetched.
    assert_eq!(report["records_found_by_hash"], 11, "{report}");
    assert_eq!(report["keys_compared"], 5, "{report}");
    assert_eq!(report["records_fetched"], 15, "{report}");
    assert_eq!(report["buckets_differing"], 13, "{report}");
    // Comparing digests comes first and is part of the round.
    let comparing = report["seconds_comparing"].as_f64().unwrap();
    assert!(
        comparing > 0.0 && comparing < report["seconds"].as_f64().unwrap(),
        "{report}"
    );
    for key in &lacked {
        assert_eq!(c.get("us", "lacked", key).await.status(), StatusCode::OK);
    }
    let blob_back = c.get_json("us", &record_path("lacked", &large[9])).await;
    assert_eq!(
        blob_back["value"]["blob"].as_str().map(str::len),
        Some(blob.len())
    );
    // The changed record's two contents: every region keeps the same one once eu pulls too.
    repair_at(&c, "eu", "us").await;
    c.assert_converged().await;
    c.teardown().await;
}

#[tokio::test]
async fn comparing_a_listing_page_by_page_finds_exactly_the_keys_the_peer_lacks() {
    use locus::record::digest::bucket_of;
    use locus::storage::repair::{BucketHash, HashCursor};
    let c = cluster(&["eu"]).await;
    // Six keys sharing one bucket, so pages end inside it, and three elsewhere.
    let crowded = bucket_of("x0");
    let mut keys: Vec<String> = (0..)
        .map(|i| format!("x{i}"))
        .filter(|k| bucket_of(k) == crowded)
        .take(6)
        .collect();
    keys.extend(["a", "b", "c"].map(str::to_owned));
    for key in &keys {
        assert_eq!(
            c.put("eu", "compared", key, &json!(1)).await.status(),
            StatusCode::CREATED
        );
    }
    let store = &c.region("eu").region.store;
    let mut buckets: Vec<i32> = keys.iter().map(|k| bucket_of(k)).collect();
    buckets.sort_unstable();
    buckets.dedup();
    let ours = store
        .bucket_hashes("compared", &buckets, None, 100)
        .await
        .unwrap();
    assert_eq!(ours.len(), keys.len());

    // The peer lacks the first, a middle and the last key of the crowded bucket (a bucket it
    // holds nothing of is not listed: the round prunes those buckets whole), and holds one key
    // this region lacks.
    let in_crowded: Vec<&BucketHash> = ours.iter().filter(|e| e.bucket == crowded).collect();
    let lacked: Vec<String> = [0, 2, 5].map(|i| in_crowded[i].key.clone()).into();
    let mut theirs: Vec<BucketHash> = ours
        .iter()
        .filter(|e| !lacked.contains(&e.key))
        .cloned()
        .collect();
    let extra = BucketHash {
        bucket: crowded,
        key: format!("{}~", in_crowded[3].key),
        hash: in_crowded[3].hash,
    };
    theirs.push(extra.clone());
    theirs.sort_by(|a, b| (a.bucket, &a.key).cmp(&(b.bucket, &b.key)));

    for page_size in [1, 2, 3, 100] {
        let pages: Vec<&[BucketHash]> = theirs.chunks(page_size).collect();
        let mut ours_only = Vec::new();
        let mut differing = Vec::new();
        let mut after: Option<HashCursor> = None;
        for (i, page) in pages.iter().enumerate() {
            let compared = store
                .compare_page("compared", page, after.as_ref(), i + 1 == pages.len())
                .await
                .unwrap();
            ours_only.extend(compared.ours_only);
            differing.extend(compared.differing.into_iter().map(|e| e.key));
            let last = page.last().unwrap();
            after = Some(HashCursor {
                bucket: last.bucket,
                key: last.key.clone(),
            });
        }
        ours_only.sort();
        let mut expected = lacked.clone();
        expected.sort();
        assert_eq!(ours_only, expected, "pages of {page_size}");
        assert_eq!(differing, vec![extra.key.clone()], "pages of {page_size}");
    }
    c.teardown().await;
}

#[tokio::test]
async fn a_peer_sends_its_digests_as_frames_to_a_region_that_asks_and_as_json_otherwise() {
    use locus::record::digest::{BucketDigest, StateHash};
    use locus::record::digest_frames::{Decoder, DIGESTS_MEDIA_TYPE};
    let c = cluster(&["eu"]).await;
    for i in 0..300 {
        let response = c
            .put("eu", "framed", &format!("k{i:03}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let digests = |collection: &'static str, accept: Option<&'static str>| {
        let mut request = c
            .request(
                "eu",
                Method::GET,
                &format!("/v1/peer/digests?collection={collection}"),
            )
            .bearer_auth(crate::helpers::PEER);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    let as_json: Value = digests("framed", None).await.unwrap().json().await.unwrap();
    let from_json: Vec<BucketDigest> = as_json["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| BucketDigest {
            bucket: entry["bucket"].as_i64().unwrap() as i32,
            count: entry["count"].as_i64().unwrap(),
            hash: StateHash::from_hex(entry["hash"].as_str().unwrap()).unwrap(),
        })
        .collect();
    assert_eq!(from_json.iter().map(|d| d.count).sum::<i64>(), 300);

    let framed = |collection| async move {
        let accept = "application/json;q=0.5, application/vnd.locus.digests";
        let response = digests(collection, Some(accept)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], DIGESTS_MEDIA_TYPE);
        assert_eq!(response.headers()["locus-restoring"], "false");
        assert!(response.headers().get("locus-reclaimed-through").is_none());
        let mut decoder = Decoder::default();
        decoder.feed(&response.bytes().await.unwrap()).unwrap();
        decoder.finish().unwrap()
    };
    assert_eq!(framed("framed").await, from_json);
    // A collection with no record: the closing frame alone.
    assert_eq!(framed("nothing").await, Vec::new());
    // Without the peer token, neither.
    let r = c
        .request("eu", Method::GET, "/v1/peer/digests?collection=framed")
        .header("accept", DIGESTS_MEDIA_TYPE)
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::UNAUTHORIZED).await;
    c.teardown().await;
}

/// The rows region `id` holds of `collection`.
async fn rows_of(c: &Cluster, id: &str, collection: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = $1")
        .bind(collection)
        .fetch_one(c.region(id).region.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_collection_held_nothing_of_is_copied_page_by_page_with_what_is_set_aside_skipped() {
    use futures_util::{stream, StreamExt};
    use locus::replication::repair::{FETCH_BYTES, FETCH_KEYS};
    let c = cluster(&["eu", "us"]).await;
    // More records than a page holds, and more bytes than a page's limit: pages end both ways.
    let filler = "p".repeat(5 * 1024);
    let count = FETCH_KEYS * 3 / 2;
    assert!(count * filler.len() > FETCH_BYTES);
    let keys: Vec<String> = (0..count).map(|i| format!("k{i:04}")).collect();
    stream::iter(&keys)
        .for_each_concurrent(16, |key| {
            let (c, filler) = (&c, &filler);
            async move {
                let value = json!({"key": key, "filler": filler});
                let response = c.put("eu", "paged", key, &value).await;
                assert_eq!(response.status(), StatusCode::CREATED);
            }
        })
        .await;
    assert_eq!(
        c.put("eu", "refusing", "refused", &json!("v1"))
            .await
            .status(),
        StatusCode::CREATED
    );
    eventually(30, "us holds every record", || async {
        rows_of(&c, "us", "paged").await == count as i64 && rows_of(&c, "us", "refusing").await == 1
    })
    .await;
    // us loses both collections whole, and from now on refuses one record, as a region with a
    // local fault would: holding nothing of them, it copies them page by page.
    refuse_to_store(&c, "us", "refused").await;
    let all: Vec<&String> = keys.iter().collect();
    assert_eq!(lose_records(&c, "us", "paged", &all).await, count as u64);
    let refused = "refused".to_owned();
    assert_eq!(lose_records(&c, "us", "refusing", &[&refused]).await, 1);
    let report = repair_at(&c, "us", "eu").await;
    assert_eq!(report["records_paged"], json!(count + 1), "{report}");
    assert_eq!(report["records_repaired"], json!(count), "{report}");
    assert_eq!(report["records_unrepairable"], 1, "{report}");
    assert_eq!(report["keys_compared"], 0, "nothing listed: {report}");
    assert_eq!(report["records_found_by_hash"], 0, "{report}");
    assert_eq!(rows_of(&c, "us", "paged").await, count as i64);
    // us still holds nothing of the refusing collection: the next round pages through it again
    // and skips the record set aside at the peer's unchanged state.
    let again = repair_at(&c, "us", "eu").await;
    assert_eq!(again["records_skipped"], 1, "{again}");
    assert_eq!(again["records_fetched"], 0, "{again}");
    assert_eq!(again["records_paged"], 0, "{again}");

    // The pages as the peer answers them: every key once, in key order, the first page cut short
    // by the byte limit, and only for the peer token.
    let page = |after: Value, token: &'static str| {
        c.request("eu", Method::POST, "/v1/peer/states-after?collection=paged")
            .bearer_auth(token)
            .json(&json!({ "after": after }))
            .send()
    };
    let (mut paged, mut pages, mut after) = (Vec::new(), 0, Value::Null);
    loop {
        let response = page(after, crate::helpers::PEER).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        let records = body["records"].as_array().unwrap();
        if pages == 0 {
            assert!(
                records.len() < FETCH_KEYS,
                "cut short by bytes: {}",
                records.len()
            );
        }
        paged.extend(records.iter().map(|r| r[0].as_str().unwrap().to_owned()));
        pages += 1;
        after = body["next"].clone();
        if after.is_null() {
            break;
        }
        assert_eq!(after, json!(paged.last().unwrap()));
    }
    assert_eq!(paged, keys, "every key once, in key order");
    assert!(pages >= 2);
    let response = page(Value::Null, crate::helpers::ADMIN).await.unwrap();
    expect_problem(response, StatusCode::FORBIDDEN).await;
    let response = page(json!("k\u{0}"), crate::helpers::PEER).await.unwrap();
    expect_problem(response, StatusCode::BAD_REQUEST).await;

    // Once us can hold it, the record's next write reaches it, and the regions agree.
    store_again(&c, "us", "refused").await;
    assert_eq!(
        c.put("eu", "refusing", "refused", &json!("v2"))
            .await
            .status(),
        StatusCode::OK
    );
    c.assert_converged().await;
    c.teardown().await;
}

/// A region of an earlier build, stood in for by a proxy in front of a current one: it refuses a
/// states fetch of more than `most` keys with the problem document those builds answered, knows
/// no `/v1/peer/applied`, `/v1/peer/states-by-hash` nor `/v1/peer/states-after`, answers digests
/// as JSON whatever is
/// asked, and passes every other request on to the region at `target` (set before the first
/// call). Returns its URL and how many fetches it refused.
async fn earlier_build_in_front(
    target: std::sync::Arc<std::sync::OnceLock<String>>,
    most: usize,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (target, counter, http) = (target.clone(), counter.clone(), http.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap();
            // Nor did they know the call that says how far each stream was applied, the lookup
            // of records by hash, nor the pages of a collection.
            if [
                "/v1/peer/applied",
                "/v1/peer/states-by-hash",
                "/v1/peer/states-after",
            ]
            .contains(&parts.uri.path())
            {
                return StatusCode::NOT_FOUND.into_response();
            }
            if parts.uri.path() == "/v1/peer/states" {
                let asked: Value = serde_json::from_slice(&body).unwrap();
                if asked["keys"].as_array().map_or(0, Vec::len) > most {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let problem = json!({"type": "urn:locus:problem:too-many-keys",
                        "title": "Bad request", "status": 400,
                        "detail": format!("at most {most} keys per request")});
                    return (
                        StatusCode::BAD_REQUEST,
                        [("content-type", "application/problem+json")],
                        problem.to_string(),
                    )
                        .into_response();
                }
            }
            let base = target
                .get()
                .expect("the region behind is known before any call");
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut forwarded = http
                .request(parts.method, format!("{base}{path}"))
                .body(body);
            for (name, value) in &parts.headers {
                // Without `accept`, the region answers digests as JSON, as those builds did.
                if !["host", "content-length", "accept"].contains(&name.as_str()) {
                    forwarded = forwarded.header(name, value);
                }
            }
            let answer = forwarded.send().await.unwrap();
            let status = answer.status();
            let content_type = answer.headers().get("content-type").cloned();
            let mut response = (status, answer.bytes().await.unwrap()).into_response();
            if let Some(content_type) = content_type {
                response.headers_mut().insert("content-type", content_type);
            }
            response
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, refused)
}

#[tokio::test]
async fn repair_fetches_from_a_peer_of_an_earlier_build_in_the_batches_it_accepts() {
    // us reaches eu through a stand-in for an earlier build, which takes at most 200 keys per
    // fetch of states (the limit before it rose to FETCH_KEYS).
    let target = std::sync::Arc::new(std::sync::OnceLock::new());
    let (earlier_url, refused) = earlier_build_in_front(target.clone(), 200).await;
    let c = crate::helpers::Setup::regions(&["eu", "us"])
        .tweak(move |config| {
            if config.region == "us" {
                for peer in &mut config.peers {
                    let _ = target.set(peer.api_url.clone());
                    peer.api_url = earlier_url.clone();
                }
            }
        })
        .start()
        .await;
    let keys: Vec<String> = (0..450).map(|i| format!("k{i:03}")).collect();
    for key in &keys {
        let response = c.put("eu", "earlier", key, &json!({"key": key})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    crate::helpers::until_everywhere(&c, "earlier", &keys).await;
    // us loses them (a restore, a disk): only a repair from eu brings them back.
    let all: Vec<&String> = keys.iter().collect();
    assert_eq!(lose_records(&c, "us", "earlier", &all).await, 450);
    let report = repair_at(&c, "us", "eu").await;
    assert_eq!(report["records_repaired"], json!(450), "{report}");
    // Each record lacked is alone in its bucket, yet listed: the peer cannot look it up by hash,
    // nor page through the collection us holds nothing of.
    assert_eq!(report["records_found_by_hash"], json!(0), "{report}");
    assert_eq!(report["records_paged"], json!(0), "{report}");
    assert!(
        refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the larger fetch was asked for first, and refused"
    );
    // 450 keys make one fetch: refused once, then asked 200 at a time, never more again.
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1);
    for key in &keys {
        assert_eq!(c.get("us", "earlier", key).await.status(), StatusCode::OK);
    }
    c.teardown().await;
}

#[tokio::test]
async fn repair_merges_run_beside_each_other_but_never_beside_a_stream_apply() {
    use std::time::Duration;
    let c = cluster(&["eu"]).await;
    let store = c.region("eu").region.store.clone();
    let first = store.begin_merge().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), store.begin_merge())
        .await
        .expect("a second merge begins while the first is open")
        .unwrap();
    let apply = {
        let store = store.clone();
        tokio::spawn(async move { store.begin_apply().await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !apply.is_finished(),
        "a stream apply began while merges were open"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !apply.is_finished(),
        "a stream apply began while a merge was open"
    );
    drop(second);
    tokio::time::timeout(Duration::from_secs(5), apply)
        .await
        .expect("the apply begins once the merges have ended")
        .unwrap()
        .unwrap();
    c.teardown().await;
}

#[tokio::test]
async fn concurrent_repair_merges_of_overlapping_records_lose_no_version() {
    use locus::clock::hlc::Hlc;
    use locus::clock::version::VersionVector;
    use locus::record::{Home, RecordState, Version};
    use std::collections::BTreeSet;

    const KEYS: usize = 300;
    const WRITERS: usize = 4;
    let c = cluster(&["eu"]).await;
    // Each writer holds a version of most keys, concurrent with the others' (its own actor), and
    // merges them in batches while the others do: keys one merge creates, another finds and
    // locks, or creates at the same moment.
    let includes = |writer: usize, key: usize| (key + writer) % 3 != 0;
    let state_of = |writer: usize, key: usize| RecordState {
        home: Home::new("us"),
        versions: vec![Version {
            value: json!({"writer": writer, "key": key}),
            deleted: false,
            region: "us".into(),
            hlc: Hlc::from_parts(1_700_000_000_000 + key as u64, writer as u16),
            vector: VersionVector::from([(format!("us.w{writer}").as_str(), 1)]),
        }],
    };
    let merges = (0..WRITERS).map(|writer| {
        let region = c.region("eu").region.clone();
        tokio::spawn(async move {
            let keys: Vec<usize> = (0..KEYS).filter(|&k| includes(writer, k)).collect();
            // Writers walk the keys from different places, so their batches overlap in time.
            let start = keys.len() * writer / WRITERS;
            let mut order = keys[start..].to_vec();
            order.extend_from_slice(&keys[..start]);
            for batch in order.chunks(40) {
                let states: Vec<(String, RecordState)> = batch
                    .iter()
                    .map(|&k| (format!("k{k:03}"), state_of(writer, k)))
                    .collect();
                locus::replication::repair::merge_states(&region, "us", "merged", &states)
                    .await
                    .unwrap();
            }
        })
    });
    for merge in merges.collect::<Vec<_>>() {
        merge.await.unwrap();
    }
    let store = &c.region("eu").region.store;
    for key in 0..KEYS {
        let held = store
            .load("merged", &format!("k{key:03}"))
            .await
            .unwrap()
            .state
            .expect("every key was merged by some writer");
        let vectors: BTreeSet<String> = held
            .versions
            .iter()
            .map(|v| format!("{:?}", v.vector))
            .collect();
        let expected: BTreeSet<String> = (0..WRITERS)
            .filter(|&w| includes(w, key))
            .map(|w| format!("{:?}", state_of(w, key).versions[0].vector))
            .collect();
        assert_eq!(vectors, expected, "k{key:03}");
    }
    c.teardown().await;
}
