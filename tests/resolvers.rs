//! WebAssembly resolvers: uploads and their validation, hostile modules, the materialised view in
//! three regions, dry runs.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    cluster, eventually, example_resolver, expect_problem, header, record_path, Cluster, Setup,
    TestNats, ADMIN,
};
use locus::clock::hlc::Hlc;
use locus::clock::version::VersionVector;
use locus::record::{Home, Version};
use locus::replication::event::{Change, Event};
use locus::resolve::module_sha256;

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

#[tokio::test]
async fn examples_upload_and_bad_uploads_are_refused() {
    let c = Setup::regions(&["eu"])
        .tweak(|config| config.limits.module_body_bytes = 1024 * 1024)
        .start()
        .await;
    for example in ["cart", "counter", "merge-fields"] {
        let module = example_resolver(example);
        let response = c.upload_resolver("eu", example, module.clone()).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{example}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["name"], example);
        assert_eq!(body["sha256"], module_sha256(&module));
        assert_eq!(body["size"], module.len());
        assert_eq!(body["abi"], 1);
        assert_eq!(body["version"], 1);
        // The same module again changes nothing.
        let again = c.upload_resolver("eu", example, module).await;
        assert_eq!(again.status(), StatusCode::OK);
    }
    // WAT text is accepted; a new module under a name is a new version.
    let wat = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/resolvers/wat/hide-conflicts.wat"
    ))
    .unwrap();
    let replaced = c.upload_resolver("eu", "cart", wat).await;
    assert_eq!(replaced.status(), StatusCode::CREATED);
    let replaced: Value = replaced.json().await.unwrap();
    assert_eq!(replaced["version"], 2);
    let shown = c.get_json("eu", "/v1/resolvers/cart").await;
    assert_eq!(shown["sha256"], replaced["sha256"]);
    assert_eq!(shown["available"], true);
    let list = c.get_json("eu", "/v1/resolvers").await;
    let names: Vec<&str> = list["resolvers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cart", "counter", "merge-fields"]);

    // Bad uploads: each a clear 4xx, nothing bound.
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        ("not-wasm", b"hello, world".to_vec(), StatusCode::BAD_REQUEST, "not a WebAssembly module"),
        (
            "wasi",
            br#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "locus_alloc") (param i32) (result i32) (i32.const 0))
                (func (export "locus_resolve") (param i32 i32) (result i64) (i64.const 0)))"#
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "wasi_snapshot_preview1",
        ),
        (
            "no-alloc",
            br#"(module (memory (export "memory") 1)
                (func (export "locus_resolve") (param i32 i32) (result i64) (i64.const 0)))"#
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "locus_alloc",
        ),
        (
            "traps",
            br#"(module (memory (export "memory") 1)
                (func (export "locus_alloc") (param i32) (result i32) (i32.const 0))
                (func (export "locus_resolve") (param i32 i32) (result i64) (unreachable)))"#
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "trial call",
        ),
        (
            "too-big",
            vec![0u8; 1024 * 1024 + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
    ];
    for (name, module, status, says) in cases {
        let detail = expect_problem(c.upload_resolver("eu", name, module).await, status).await;
        assert!(detail.contains(says), "{name}: {detail}");
        expect_problem(
            c.request("eu", Method::GET, &format!("/v1/resolvers/{name}"))
                .send()
                .await
                .unwrap(),
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    let module = example_resolver("counter");
    let anonymous = c
        .request("eu", Method::PUT, "/v1/resolvers/sneaky")
        .body(module.clone())
        .send()
        .await
        .unwrap();
    expect_problem(anonymous, StatusCode::UNAUTHORIZED).await;
    let wrong = c
        .request("eu", Method::PUT, "/v1/resolvers/sneaky")
        .bearer_auth("not-the-admin-token")
        .body(module.clone())
        .send()
        .await
        .unwrap();
    expect_problem(wrong, StatusCode::FORBIDDEN).await;
    expect_problem(
        c.upload_resolver("eu", "bad name!", module).await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    // A policy may name only a bound resolver; a resolver in use cannot be removed.
    let unknown = json!({"conflicts": {"strategy": "resolver", "resolver": "nope"}});
    expect_problem(
        c.configure("eu", "carts", &unknown).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let policy = json!({"conflicts": {"strategy": "resolver", "resolver": "counter"}});
    assert_eq!(
        c.configure("eu", "counters", &policy).await.status(),
        StatusCode::CREATED
    );
    let delete = |name: &'static str| {
        c.request("eu", Method::DELETE, &format!("/v1/resolvers/{name}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let detail = expect_problem(delete("counter").await.unwrap(), StatusCode::CONFLICT).await;
    assert!(detail.contains("counters"), "{detail}");
    assert_eq!(
        c.configure("eu", "counters", &json!({})).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        delete("counter").await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    expect_problem(delete("counter").await.unwrap(), StatusCode::NOT_FOUND).await;
    c.teardown().await;
}

/// A module that resolves the upload's trial call (collection `trial`: its first letter sits at
/// byte 23 of the input) and runs `hostile` on every real conflict.
fn two_faced(hostile: &str, data: &str) -> Vec<u8> {
    format!(
        r#"(module
             (memory (export "memory") 1)
             (data (i32.const 16) "{{\"value\":0}}")
             (data (i32.const 32) "{data}")
             (func (export "locus_alloc") (param i32) (result i32) (i32.const 1024))
             (func $recurse (param i32) (result i32)
               (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
             (func (export "locus_resolve") (param $ptr i32) (param $len i32) (result i64)
               (if (i32.eq (i32.load8_u offset=23 (local.get $ptr)) (i32.const 116))
                 (then (return (i64.const {trial_output}))))
               {hostile}))"#,
        trial_output = (16u64 << 32) | 11,
    )
    .into_bytes()
}

/// A version of `key` from `region`, concurrent with everything held, newer by HLC.
fn concurrent_version(region: &str, value: Value) -> Version {
    Version {
        value,
        deleted: false,
        region: region.into(),
        hlc: Hlc::from_parts(locus::clock::hlc::wall_clock_ms() + 1_000, 0),
        vector: VersionVector::from([(format!("{region}.00000000").as_str(), 1)]),
    }
}

/// A conflict under a resolver, made certain: upload `module` as resolver `name` at eu, bind
/// `collection` to it (homing anywhere), write `ours` to its record `k` at eu, and apply `theirs`,
/// a concurrent version from us, at eu directly, past replication (a repair round brings it to
/// us). The apply leaves the resolver's run to the worker: see [`resolved_at_eu`]. Returns how
/// long the apply took.
async fn conflict_at_eu(
    c: &Cluster,
    name: &str,
    module: Vec<u8>,
    collection: &str,
    ours: Value,
    theirs: Version,
) -> Duration {
    let upload = c.upload_resolver("eu", name, module).await;
    assert!(upload.status().is_success(), "{}", upload.status());
    let policy =
        json!({"homing": "anywhere", "conflicts": {"strategy": "resolver", "resolver": name}});
    assert!(c
        .configure("eu", collection, &policy)
        .await
        .status()
        .is_success());
    assert!(c
        .put("eu", collection, "k", &ours)
        .await
        .status()
        .is_success());
    let event = Event::new("us", collection, "k", Home::new("eu"), theirs);
    let eu = c.region("eu").region.clone();
    let started = Instant::now();
    locus::replication::consumer::apply_batch(&eu, "us", &[Change::Record(event)], &[], &[])
        .await
        .unwrap();
    started.elapsed()
}

/// Run eu's resolution worker over what applies left it (the background worker may run it too;
/// either stores the same resolution). Once this returns, the record and its conflict-log entry
/// are resolved, unless the call failed transiently.
async fn resolved_at_eu(c: &Cluster) {
    let eu = c.region("eu").region.clone();
    locus::resolve::worker::pass_left_to_resolve(&eu)
        .await
        .unwrap();
}

#[tokio::test]
async fn hostile_resolvers_fall_back_to_lww_and_the_server_keeps_serving() {
    let c = Setup::regions(&["eu", "us"])
        .tweak(|config| {
            config.resolvers.fuel = 20_000_000;
            config.resolvers.memory_bytes = 16 * 1024 * 1024;
        })
        .start()
        .await;
    let output_at_32 = |len: u64| format!("(i64.const {})", (32u64 << 32) | len);
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "loop",
            "(loop $l (br $l)) (unreachable)".into(),
            "",
            "ran out of fuel",
        ),
        (
            "grow",
            "(loop $l (drop (memory.grow (i32.const 16))) (br $l)) (unreachable)".into(),
            "",
            "ran out of fuel",
        ),
        (
            "recursion",
            "(drop (call $recurse (i32.const 0))) (i64.const 0)".into(),
            "",
            "call stack exhausted",
        ),
        (
            "huge-output",
            output_at_32(100 * 1024 * 1024),
            "",
            "over the limit",
        ),
        ("not-utf8", output_at_32(4), r"\ff\fe\fd\fc", "not UTF-8"),
        ("not-abi", output_at_32(11), r#"{\"val\":123}"#, "neither"),
        ("trap", "(unreachable)".into(), "", "unreachable"),
    ];
    let region = c.region("eu").region.clone();
    for (name, hostile, data, error) in cases {
        let upload = c
            .upload_resolver("eu", name, two_faced(&hostile, data))
            .await;
        assert_eq!(upload.status(), StatusCode::CREATED, "{name}");
        let sha256 = upload.json::<Value>().await.unwrap()["sha256"].clone();
        let collection = format!("hostile-{name}");
        let policy =
            json!({"homing": "anywhere", "conflicts": {"strategy": "resolver", "resolver": name}});
        assert!(c
            .configure("eu", &collection, &policy)
            .await
            .status()
            .is_success());
        assert!(c
            .put("eu", &collection, "k", &json!({"from": "eu"}))
            .await
            .status()
            .is_success());

        // A concurrent version arrives from us. The apply does not run the resolver: it leaves
        // it to the worker, which runs it in the background of the HTTP server, which keeps
        // answering meanwhile.
        let remote = concurrent_version("us", json!({"from": "us"}));
        let event = Event::new("us", &collection, "k", Home::new("eu"), remote);
        locus::replication::consumer::apply_batch(
            &region,
            "us",
            &[Change::Record(event)],
            &[],
            &[],
        )
        .await
        .unwrap();
        let resolving = {
            let region = region.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                locus::resolve::worker::pass_left_to_resolve(&region)
                    .await
                    .unwrap();
                started.elapsed()
            })
        };
        let mut slowest = Duration::ZERO;
        while !resolving.is_finished() {
            let started = Instant::now();
            assert_eq!(c.get_status("eu", "/healthz").await, StatusCode::OK);
            slowest = slowest.max(started.elapsed());
        }
        let took = resolving.await.unwrap();
        assert!(
            took < Duration::from_secs(10),
            "{name}: the call ran {took:?}"
        );
        assert!(
            slowest < Duration::from_millis(500),
            "{name}: a health check took {slowest:?}"
        );

        // The view falls back to last-writer-wins (us wrote last) and the log says why.
        let read: Value = c.get("eu", &collection, "k").await.json().await.unwrap();
        assert_eq!(read["value"], json!({"from": "us"}), "{name}");
        let log = c
            .get_json("eu", &format!("/v1/conflicts?collection={collection}"))
            .await;
        let entry = &log["conflicts"][0];
        assert_eq!(entry["strategy"], "resolver");
        assert_eq!(entry["resolver"], json!({"name": name, "sha256": sha256}));
        assert_eq!(entry["outcome"], json!({"value": {"from": "us"}}));
        let logged_error = entry["error"].as_str().unwrap_or_default();
        assert!(logged_error.contains(error), "{name}: {logged_error}");
    }
    let metrics = c.metrics("eu").await;
    for kind in ["fuel", "trap", "output_size", "bad_output"] {
        assert!(
            metrics.contains(&format!("locus_resolver_calls_total{{result=\"{kind}\"}}")),
            "{kind}: {metrics}"
        );
    }
    assert_eq!(c.get_status("eu", "/readyz").await, StatusCode::OK);
    // The conflicting versions were put into eu alone, past replication: repair brings them to us.
    c.repair_everywhere().await;
    c.teardown().await;
}

#[tokio::test]
async fn a_slow_resolver_runs_after_the_apply_and_reads_say_the_view_is_pending() {
    // Fuel for a long loop and the wall time to let fuel end it: a slow call whose failure is
    // final (the view falls back to last-writer-wins), so every region ends with the same view.
    let c = Setup::regions(&["eu", "us"])
        .tweak(|config| {
            config.resolvers.fuel = 3_000_000_000;
            config.resolvers.wall_time_ms = 120_000;
        })
        .start()
        .await;
    let eu = c.region("eu").region.clone();
    let module = two_faced("(loop $l (br $l)) (unreachable)", "");
    let applied_in = conflict_at_eu(
        &c,
        "slow",
        module,
        "slow",
        json!({"from": "eu"}),
        concurrent_version("us", json!({"from": "us"})),
    )
    .await;
    let conflict_applied = Instant::now();

    // Until the worker's call ends, readers see the view they had before the conflict, and are
    // told it is pending; the conflict log says the outcome is still to come.
    let read = c.get("eu", "slow", "k").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "locus-resolution"), Some("pending"));
    assert_eq!(header(&read, "locus-siblings"), Some("2"));
    let body: Value = read.json().await.unwrap();
    assert_eq!(body["value"], json!({"from": "eu"}));
    let listed = c.get_json("eu", "/v1/collections/slow/records").await;
    assert_eq!(listed["records"][0]["value"], json!({"from": "eu"}));
    assert_eq!(
        listed["records"][0]["resolution_pending"],
        json!(true),
        "{listed}"
    );
    let log = c.get_json("eu", "/v1/conflicts?collection=slow").await;
    assert_eq!(log["conflicts"][0]["outcome"], json!({"pending": true}));
    assert_eq!(log["conflicts"][0]["resolver"], json!({"name": "slow"}));
    let pending_gauge = || async {
        let metrics = c.metrics("eu").await;
        metrics
            .lines()
            .find(|l| l.starts_with("locus_resolutions_pending "))
            .map(str::to_owned)
    };
    assert_eq!(
        pending_gauge().await.as_deref(),
        Some("locus_resolutions_pending 1")
    );

    // The worker's call holds no lock: another apply, of the same collection, goes through
    // while it runs.
    let other = Event::new(
        "us",
        "slow",
        "other",
        Home::new("us"),
        concurrent_version("us", json!({"other": true})),
    );
    let started = Instant::now();
    locus::replication::consumer::apply_batch(&eu, "us", &[Change::Record(other)], &[], &[])
        .await
        .unwrap();
    let other_applied_in = started.elapsed();
    let still = c.get("eu", "slow", "k").await;
    assert_eq!(
        header(&still, "locus-resolution"),
        Some("pending"),
        "the call was still running when the other apply ended"
    );
    let other: Value = c.get("eu", "slow", "other").await.json().await.unwrap();
    assert_eq!(other["value"], json!({"other": true}));

    eventually(120, "the worker's call ends and its view shows", || async {
        let read = c.get("eu", "slow", "k").await;
        header(&read, "locus-resolution").is_none()
    })
    .await;
    let call_took = conflict_applied.elapsed();
    eprintln!(
        "slow resolver: applies took {applied_in:?} and {other_applied_in:?}; the call ~{call_took:?}"
    );
    assert!(
        applied_in * 4 < call_took && other_applied_in * 4 < call_took,
        "an apply waited for the call: {applied_in:?}, {other_applied_in:?} vs {call_took:?}"
    );
    let read: Value = c.get("eu", "slow", "k").await.json().await.unwrap();
    assert_eq!(
        read["value"],
        json!({"from": "us"}),
        "out of fuel: last-writer-wins"
    );
    let listed = c.get_json("eu", "/v1/collections/slow/records").await;
    assert_eq!(listed["records"][0]["value"], json!({"from": "us"}));
    assert_eq!(
        listed["records"][0].get("resolution_pending"),
        None,
        "{listed}"
    );
    assert_eq!(
        pending_gauge().await.as_deref(),
        Some("locus_resolutions_pending 0")
    );
    let log = c.get_json("eu", "/v1/conflicts?collection=slow").await;
    let entry = &log["conflicts"][0];
    assert_eq!(
        entry["outcome"],
        json!({"value": {"from": "us"}}),
        "{entry}"
    );
    assert_eq!(entry["resolver"]["name"], "slow");
    assert!(
        entry["error"].as_str().unwrap_or_default().contains("fuel"),
        "{entry}"
    );
    // The versions were put into eu alone, past replication: repair brings them to us.
    c.repair_everywhere().await;
    c.teardown().await;
}

#[tokio::test]
async fn a_record_resolved_to_deleted_says_so_and_a_write_brings_it_back() {
    let c = Setup::regions(&["eu", "us"]).start().await;
    let wat = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/resolvers/wat/hide-conflicts.wat"
    ))
    .unwrap();
    // A concurrent version from us reaches eu: the resolver answers "deleted".
    conflict_at_eu(
        &c,
        "hide",
        wat,
        "hidden",
        json!({"from": "eu"}),
        concurrent_version("us", json!({"from": "us"})),
    )
    .await;
    resolved_at_eu(&c).await;

    let read = c.get("eu", "hidden", "k").await;
    assert_eq!(
        header(&read, "locus-resolution"),
        None,
        "resolved, not pending"
    );
    assert_eq!(read.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&read, "locus-resolved"), Some("deleted"));
    assert_eq!(header(&read, "locus-resolver"), Some("hide"));
    assert_eq!(header(&read, "locus-siblings"), Some("2"));
    let conflict = header(&read, "locus-conflict").unwrap().to_owned();
    let etag = header(&read, "etag").unwrap().to_owned();
    let problem: Value = read.json().await.unwrap();
    assert_eq!(problem["type"], "urn:locus:problem:resolved-deleted");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("conflict {conflict}")),
        "{problem}"
    );
    let log = c
        .get_json("eu", "/v1/conflicts?collection=hidden&key=k")
        .await;
    let entry = log["conflicts"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(entry["id"].to_string(), conflict);
    assert_eq!(entry["outcome"], json!({"deleted": true}));

    // A record that never existed, or one deleted by a write, is a plain 404.
    let absent = c.get("eu", "hidden", "never").await;
    assert_eq!(header(&absent, "locus-resolved"), None);
    let detail = expect_problem(absent, StatusCode::NOT_FOUND).await;
    assert_eq!(detail, "no such record");

    // A write with the ETag supersedes both versions, and the record reads again.
    let rewrite = c
        .request("eu", Method::PUT, &record_path("hidden", "k"))
        .header("if-match", &etag)
        .json(&json!({"from": "a human"}))
        .send()
        .await
        .unwrap();
    assert!(rewrite.status().is_success(), "{}", rewrite.status());
    let read: Value = c.get("eu", "hidden", "k").await.json().await.unwrap();
    assert_eq!(read["value"], json!({"from": "a human"}));
    // The concurrent version was put into eu alone, past replication: repair brings it to us.
    c.repair_everywhere().await;
    c.teardown().await;
}

#[tokio::test]
async fn a_scaffolded_resolver_builds_outside_the_workspace_and_serves_its_view() {
    // `locus resolver new`, as a user runs it, into a folder outside this repository.
    let parent = std::env::temp_dir().join(format!("locus-scaffold-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    let created = std::process::Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["resolver", "new", "newest-live", "--path"])
        .arg(&parent)
        .output()
        .expect("the locus binary runs");
    assert!(created.status.success(), "{created:?}");
    let root = parent.join("newest-live");
    assert!(String::from_utf8_lossy(&created.stdout).contains(&root.display().to_string()));

    // Its own tests pass natively, and it builds for WebAssembly. A target folder inside this
    // repository's keeps later runs fast; the crate itself knows nothing of this repository. One
    // job, so the other tests running meanwhile keep a core.
    crate::helpers::add_wasm_target();
    let target_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/scaffolded");
    for args in [
        &["test", "--quiet", "--jobs", "1"][..],
        &[
            "build",
            "--quiet",
            "--jobs",
            "1",
            "--release",
            "--target",
            "wasm32-unknown-unknown",
        ][..],
    ] {
        let status = std::process::Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(args)
            .env("CARGO_TARGET_DIR", target_dir)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo {args:?} in the scaffolded crate");
    }
    let module = std::fs::read(format!(
        "{target_dir}/wasm32-unknown-unknown/release/newest_live.wasm"
    ))
    .unwrap();
    std::fs::remove_dir_all(&parent).unwrap();

    let c = Setup::regions(&["eu", "us"]).start().await;
    // A concurrent, newer delete from us: last-writer-wins would hide the record; the scaffold's
    // rule keeps the newest live value.
    let mut delete = concurrent_version("us", Value::Null);
    delete.deleted = true;
    conflict_at_eu(
        &c,
        "newest-live",
        module,
        "notes",
        json!({"text": "kept"}),
        delete,
    )
    .await;
    resolved_at_eu(&c).await;
    let read = c.get("eu", "notes", "k").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "locus-siblings"), Some("2"));
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["value"], json!({"text": "kept"}));
    c.repair_everywhere().await;
    c.teardown().await;
}

/// `module` with a custom section of `padding` bytes appended: still the same resolver, but
/// several replication chunks long.
fn padded(mut module: Vec<u8>, padding: usize) -> Vec<u8> {
    let name = b"padding";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend(std::iter::repeat_n(0x5a, padding));
    module.push(0);
    let mut size = payload.len();
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            module.push(byte);
            break;
        }
        module.push(byte | 0x80);
    }
    module.extend(payload);
    module
}

async fn read_value(c: &Cluster, id: &str, key: &str) -> (StatusCode, Value) {
    let response = c.get(id, "carts", key).await;
    (response.status(), response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn three_regions_show_the_same_resolved_value_for_every_key() {
    let mut nats = TestNats::start().await;
    let c = Setup::regions(&REGIONS).on_nats(&nats).start().await;
    // Several chunks long, so the module crosses as pieces and is assembled in each region.
    let module = padded(example_resolver("cart"), 700 * 1024);
    let sha256 = module_sha256(&module);
    let upload = c.upload_resolver("eu", "cart", module).await;
    assert_eq!(upload.status(), StatusCode::CREATED);
    let policy =
        json!({"homing": "anywhere", "conflicts": {"strategy": "resolver", "resolver": "cart"}});
    assert_eq!(
        c.configure("eu", "carts", &policy).await.status(),
        StatusCode::CREATED
    );
    eventually(
        30,
        "the module, binding and policy reach every region",
        || async {
            for id in REGIONS {
                let shown = c.get_json(id, "/v1/resolvers/cart").await;
                if shown["sha256"] != sha256
                    || shown["available"] != true
                    || shown["collections"] != json!(["carts"])
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let regions = c.get_json("us", "/v1/regions").await;
    let engines: Vec<&Value> = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["engine"])
        .collect();
    assert!(engines[0].as_str().unwrap().starts_with("wasmtime-48-"));
    assert!(engines.iter().all(|e| *e == engines[0]), "{regions}");

    // Every region adds its own item to every cart, blind to the others: replication is cut.
    nats.kill();
    let keys = 12;
    let mut writers = Vec::new();
    for id in REGIONS {
        let (http, base) = (c.http.clone(), c.url(id).to_owned());
        writers.push(tokio::spawn(async move {
            for i in 0..keys {
                let cart = json!({"items": {format!("{id}-item"): i + 1}});
                let r = http
                    .put(format!(
                        "{base}{}",
                        record_path("carts", &format!("cart{i:02}"))
                    ))
                    .json(&cart)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{id}: {}", r.status());
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    nats.restart().await;

    let expected =
        |i: usize| json!({"items": {"ap-item": i + 1, "eu-item": i + 1, "us-item": i + 1}});
    eventually(60, "every region shows the union of every cart", || async {
        for id in REGIONS {
            for i in 0..keys {
                let (status, body) = read_value(&c, id, &format!("cart{i:02}")).await;
                if status != StatusCode::OK || body["value"] != expected(i) {
                    return false;
                }
            }
        }
        true
    })
    .await;
    // Identical everywhere, ETag included (the causal context of the resolved versions).
    for i in 0..keys {
        let key = format!("cart{i:02}");
        let mut seen = Vec::new();
        for id in REGIONS {
            let response = c.get(id, "carts", &key).await;
            let etag = response.headers()["etag"].to_str().unwrap().to_owned();
            assert_eq!(response.headers()["locus-siblings"], "3");
            seen.push((etag, response.json::<Value>().await.unwrap()));
        }
        assert!(seen.iter().all(|s| *s == seen[0]), "{key}: {seen:?}");
    }
    let listed = c
        .get_json("ap", "/v1/collections/carts/records?limit=3")
        .await;
    assert_eq!(listed["records"][0]["value"], expected(0));

    // The conflict log names the resolver and its module.
    let log = c.get_json("us", "/v1/conflicts?collection=carts").await;
    let entry = &log["conflicts"][0];
    assert_eq!(entry["resolver"], json!({"name": "cart", "sha256": sha256}));
    assert!(entry["error"].is_null(), "{entry}");

    // A dry run of the merge-fields resolver over the logged conflicts changes nothing.
    let upload = c
        .upload_resolver("eu", "fields", example_resolver("merge-fields"))
        .await;
    assert_eq!(upload.status(), StatusCode::CREATED);
    let before = c.stored_states("eu", &["carts"]).await;
    let dry = c
        .request("eu", Method::POST, "/v1/resolvers/fields/dry-run")
        .bearer_auth(ADMIN)
        .json(&json!({"collection": "carts", "last": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(dry.status(), StatusCode::OK);
    let dry: Value = dry.json().await.unwrap();
    let results = dry["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for result in results {
        assert!(result["conflict"].is_i64());
        assert!(result["before"]["value"]["items"].is_object(), "{result}");
        // Field merge keeps one `items` object: the newest version's, a single item.
        let after = result["after"]["value"]["items"].as_object().unwrap();
        assert_eq!(after.len(), 1, "{result}");
    }
    assert_eq!(c.stored_states("eu", &["carts"]).await, before);
    let given = c
        .request("eu", Method::POST, "/v1/resolvers/cart/dry-run")
        .bearer_auth(ADMIN)
        .json(&json!({"versions": [
            {"value": {"items": {"a": 1}}, "deleted": false, "region": "eu", "hlc": "10", "version": {"eu.1": 1}},
            {"value": {"items": {"b": 2}}, "deleted": false, "region": "us", "hlc": "11", "version": {"us.1": 1}},
        ]}))
        .send()
        .await
        .unwrap();
    let given: Value = given.json().await.unwrap();
    assert_eq!(
        given["results"][0]["before"],
        json!({"value": {"items": {"b": 2}}})
    );
    assert_eq!(
        given["results"][0]["after"],
        json!({"value": {"items": {"a": 1, "b": 2}}})
    );
    assert_eq!(given["resolver"]["sha256"], sha256);

    // A client write with the resolved ETag supersedes the siblings everywhere.
    let response = c.get("eu", "carts", "cart00").await;
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let written = c
        .request("eu", Method::PUT, &record_path("carts", "cart00"))
        .header("if-match", etag)
        .json(&json!({"items": {"checked-out": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), StatusCode::OK);
    eventually(
        20,
        "the write supersedes the siblings everywhere",
        || async {
            for id in REGIONS {
                let response = c.get(id, "carts", "cart00").await;
                if response.headers().get("locus-siblings").is_some() {
                    return false;
                }
                let body: Value = response.json().await.unwrap();
                if body["value"] != json!({"items": {"checked-out": 1}}) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn a_policy_switched_to_a_resolver_recomputes_existing_conflicts() {
    let c = cluster(&["eu"]).await;
    let region = c.region("eu").region.clone();
    assert!(c
        .configure("eu", "tally", &json!({"homing": "anywhere"}))
        .await
        .status()
        .is_success());
    assert!(c
        .put("eu", "tally", "t", &json!({"counts": {"eu": 4}}))
        .await
        .status()
        .is_success());
    let remote = concurrent_version("us", json!({"counts": {"us": 3}}));
    let event = Event::new("us", "tally", "t", Home::new("eu"), remote);
    locus::replication::consumer::apply_batch(&region, "us", &[Change::Record(event)], &[], &[])
        .await
        .unwrap();
    let lww: Value = c.get("eu", "tally", "t").await.json().await.unwrap();
    assert_eq!(lww["value"], json!({"counts": {"us": 3}}));

    // The conflict exists before the resolver does: binding it recomputes the view.
    assert_eq!(
        c.upload_resolver("eu", "counter", example_resolver("counter"))
            .await
            .status(),
        StatusCode::CREATED
    );
    let policy =
        json!({"homing": "anywhere", "conflicts": {"strategy": "resolver", "resolver": "counter"}});
    assert!(c
        .configure("eu", "tally", &policy)
        .await
        .status()
        .is_success());
    eventually(10, "the worker resolves the existing conflict", || async {
        let body: Value = c.get("eu", "tally", "t").await.json().await.unwrap();
        body["value"] == json!({"counts": {"eu": 4, "us": 3}, "total": 7})
    })
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn a_wall_time_interruption_is_retried_never_final() {
    // Fuel far beyond the wall time: only the (non-deterministic) clock can stop this call.
    let c = Setup::regions(&["eu"])
        .tweak(|config| {
            config.resolvers.fuel = u64::MAX / 4;
            config.resolvers.wall_time_ms = 20;
        })
        .start()
        .await;
    let module = two_faced("(loop $l (br $l)) (unreachable)", "");
    conflict_at_eu(
        &c,
        "slow",
        module,
        "slow",
        json!(1),
        concurrent_version("us", json!(2)),
    )
    .await;
    resolved_at_eu(&c).await;
    let log = c.get_json("eu", "/v1/conflicts?collection=slow").await;
    let entry = &log["conflicts"][0];
    let error = entry["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("wall-time"), "{error}");
    assert_eq!(entry["outcome"], json!({"pending": true}), "{entry}");
    // Not final: the worker keeps trying (each try interrupted again), and meanwhile readers
    // see the view they had before the conflict, marked pending.
    let interruptions = || async {
        let metrics = c.metrics("eu").await;
        metrics
            .lines()
            .find(|l| l.starts_with("locus_resolver_calls_total{result=\"wall_time\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let first = interruptions().await;
    eventually(
        10,
        "the worker retries the interrupted resolution",
        || async { interruptions().await > first + 1 },
    )
    .await;
    let read = c.get("eu", "slow", "k").await;
    assert_eq!(header(&read, "locus-resolution"), Some("pending"));
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["value"], json!(1));

    // The collection leaves the resolver: the mark goes (the worker would otherwise read it on
    // every pass), and readers get last-writer-wins, no longer pending.
    assert!(c
        .configure("eu", "slow", &json!({"homing": "anywhere"}))
        .await
        .status()
        .is_success());
    resolved_at_eu(&c).await;
    let eu = c.region("eu").region.clone();
    assert!(eu
        .store
        .left_to_resolve(("", ""), 10)
        .await
        .unwrap()
        .is_empty());
    let read = c.get("eu", "slow", "k").await;
    assert_eq!(header(&read, "locus-resolution"), None);
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["value"], json!(2));
    c.teardown().await;
}

#[tokio::test]
async fn a_pending_entry_whose_versions_do_not_decode_is_settled_unresolved_once_not_retried() {
    let c = Setup::regions(&["eu"]).start().await;
    let eu = c.region("eu").region.clone();
    // A module that makes `{"value":"made"}` of every real conflict.
    let made = r#"{\"value\":\"made\"}"#;
    let module = two_faced(&format!("(i64.const {})", (32u64 << 32) | 16), made);

    // A pending entry that no build could have logged (a damaged row, say), ahead of a real one.
    sqlx::query(
        "INSERT INTO conflicts (collection, key, region, strategy, versions, outcome, resolver)
         VALUES ('made', 'damaged', 'eu', 'resolver', '[{\"not\": \"a version\"}]',
                 '{\"pending\": true}', '{\"name\": \"maker\"}')",
    )
    .execute(eu.store.pool())
    .await
    .unwrap();
    conflict_at_eu(
        &c,
        "maker",
        module,
        "made",
        json!({"from": "eu"}),
        concurrent_version("us", json!({"from": "us"})),
    )
    .await;
    resolved_at_eu(&c).await;

    let entry_of = |log: &Value, key: &str| {
        log["conflicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("an entry for {key}: {log}"))
            .clone()
    };
    let log = c.get_json("eu", "/v1/conflicts?collection=made").await;
    let damaged = entry_of(&log, "damaged");
    assert_eq!(damaged["outcome"], json!({"unresolved": true}), "{damaged}");
    assert!(
        damaged["error"]
            .as_str()
            .unwrap_or_default()
            .contains("do not decode"),
        "{damaged}"
    );
    // The entry behind it was settled in the same pass, and its record shows the view.
    let real = entry_of(&log, "k");
    assert_eq!(real["outcome"], json!({"value": "made"}), "{real}");
    let read = c.get("eu", "made", "k").await;
    assert_eq!(header(&read, "locus-resolution"), None);
    assert_eq!(read.json::<Value>().await.unwrap()["value"], "made");

    // Final: no later pass takes the damaged entry up again.
    assert!(eu
        .store
        .conflicts_left_to_resolve(0, 10)
        .await
        .unwrap()
        .is_empty());
    resolved_at_eu(&c).await;
    let again = entry_of(
        &c.get_json("eu", "/v1/conflicts?collection=made").await,
        "damaged",
    );
    assert_eq!(again, damaged);
    c.teardown().await;
}

#[tokio::test]
async fn a_module_is_used_only_once_every_chunk_is_here_and_it_hashes_right() {
    use locus::replication::event::ModuleChunk;
    let c = cluster(&["eu"]).await;
    let region = c.region("eu").region.clone();
    let module = padded(example_resolver("cart"), 600 * 1024);
    let sha256 = module_sha256(&module);
    let chunks = ModuleChunk::split("us", &sha256, &module);
    assert_eq!(chunks.len(), 4);
    // Out of order, one of them twice, each batch its own transaction; the last one missing.
    for index in [2usize, 0, 2, 3] {
        let change = Change::ModuleChunk(chunks[index].clone());
        locus::replication::consumer::apply_batch(&region, "us", &[change], &[], &[])
            .await
            .unwrap();
        assert_eq!(region.store.module(&sha256).await.unwrap(), None);
    }
    let last = Change::ModuleChunk(chunks[1].clone());
    locus::replication::consumer::apply_batch(&region, "us", &[last], &[], &[])
        .await
        .unwrap();
    assert_eq!(
        region.store.module(&sha256).await.unwrap(),
        Some(module.clone())
    );

    // Chunks that do not hash to the sha256 they name are discarded, never used.
    let forged_sha = module_sha256(b"another module");
    let forged: Vec<Change> = ModuleChunk::split("us", &forged_sha, &module)
        .into_iter()
        .map(Change::ModuleChunk)
        .collect();
    locus::replication::consumer::apply_batch(&region, "us", &forged, &[], &[])
        .await
        .unwrap();
    assert_eq!(region.store.module(&forged_sha).await.unwrap(), None);
    let leftover: i64 = sqlx::query_scalar("SELECT count(*) FROM resolver_module_chunks")
        .fetch_one(region.store.pool())
        .await
        .unwrap();
    assert_eq!(leftover, 0, "the forged chunks are gone too");
    c.teardown().await;
}
