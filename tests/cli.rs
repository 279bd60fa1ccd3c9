//! The `locus` binary as users run it: a config file with `LOCUS_*` overrides, a database created on
//! first start, a start-up line naming the address, a bad config naming its field, and writes that
//! survive `kill -9`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::migrate::MigrateDatabase;

use crate::helpers::postgres_base;
use locus::replication::event::Change;

struct Serve {
    child: Child,
    url: String,
    /// Kept open: the process prints on shutdown too.
    _stdout: BufReader<std::process::ChildStdout>,
}

/// Start `locus serve --config regions/<region>.toml` with `LOCUS_*` overrides, and wait for its
/// start-up line.
fn serve(region: &str, overrides: &[(&str, String)]) -> Serve {
    let mut command = Command::new(env!("CARGO_BIN_EXE_locus"));
    command
        .args(["serve", "--config", &format!("regions/{region}.toml")])
        .env("LOCUS_LISTEN", "127.0.0.1:0")
        .env("LOCUS_NATS_URL", crate::helpers::nats())
        .env("LOCUS_REPLICATION__STREAM_MAX_BYTES", "67108864")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (name, value) in overrides {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("the locus binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in the start-up line {line:?}"))
        .to_owned();
    assert!(
        line.starts_with(&format!("locus region {region}")),
        "{line}"
    );
    Serve {
        child,
        url,
        _stdout: stdout,
    }
}

#[tokio::test]
async fn serve_applies_overrides_and_keeps_acknowledged_writes_through_kill_9() {
    let run = format!("{:08x}", rand::random::<u32>());
    let database_url = format!("{}/locus_test_cli_{run}", postgres_base());
    let deployment = format!("testcli{run}");
    let http = reqwest::Client::new();
    let overrides = [
        ("LOCUS_DATABASE_URL", database_url.clone()),
        ("LOCUS_DEPLOYMENT", deployment.clone()),
        ("LOCUS_ADMIN_TOKEN", "cli-admin-token".to_owned()),
        ("LOCUS_LIMITS__RECORD_BODY_BYTES", "2048".to_owned()),
        // The same address both times, as a region's restart usually is.
        (
            "LOCUS_LISTEN",
            format!("127.0.0.1:{}", crate::helpers::free_port()),
        ),
    ];
    let mut first = serve("eu", &overrides);

    // LOCUS_ADMIN_TOKEN replaced the file's token; LOCUS_LIMITS__RECORD_BODY_BYTES the limit.
    let policy = |token: &str| {
        http.put(format!("{}/v1/collections/things", first.url))
            .bearer_auth(token.to_owned())
            .json(&json!({}))
            .send()
    };
    assert_eq!(
        policy("dev-admin-token").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        policy("cli-admin-token").await.unwrap().status(),
        StatusCode::CREATED
    );
    let big = http
        .put(format!("{}/v1/collections/things/records/big", first.url))
        .json(&"x".repeat(3000))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Acknowledged writes, then kill -9 while more writes are in flight.
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        let r = http
            .put(format!("{}/v1/collections/things/records/k{i}", first.url))
            .json(&json!({"i": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        acknowledged.push(i);
    }
    // The writer runs until the process dies; the kill comes once it has had a few answers, not
    // after a fixed time, which a loaded machine may not have given it.
    let answered = Arc::new(AtomicUsize::new(0));
    let in_flight = {
        let (http, url, answered) = (http.clone(), first.url.clone(), answered.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 40.. {
                match http
                    .put(format!("{url}/v1/collections/things/records/k{i}"))
                    .json(&json!({"i": i}))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => acked.push(i),
                    _ => break,
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
            acked
        })
    };
    crate::helpers::eventually(30, "the writer has its first answers", || {
        let answered = answered.clone();
        async move { answered.load(Ordering::SeqCst) >= 5 }
    })
    .await;
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    acknowledged.extend(in_flight.await.unwrap());
    assert!(
        acknowledged.len() > 40,
        "some writes were in flight when the process died"
    );

    // Restart on the same database: every acknowledged write is there, with its outbox event.
    let mut second = serve("eu", &overrides);
    for i in &acknowledged {
        let r = http
            .get(format!("{}/v1/collections/things/records/k{i}", second.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "k{i} was acknowledged");
        assert_eq!(r.json::<Value>().await.unwrap()["value"], json!({"i": i}));
    }
    // And every one of them has its event, in the outbox or in the stream (nobody consumes the
    // stream here, and the message ids dedupe a republish after the kill): one per write.
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(&pool)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(crate::helpers::nats()).await.unwrap());
    let stream_name = locus::replication::stream_name(&deployment, "eu");
    crate::helpers::eventually(20, "the outbox drains into the stream", || async {
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        queued == 0
    })
    .await;
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut record_events = 0;
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.unwrap();
        // The stream also carries the region's heartbeats.
        if let Change::Record(_) = Change::decode(&message.payload).unwrap() {
            record_events += 1;
        }
    }
    assert_eq!(
        record_events, stored,
        "one event per stored write (the policy's included)"
    );
    pool.close().await;

    // SIGTERM stops it cleanly.
    terminate(second.child.id());
    let status = second.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = sqlx::Postgres::force_drop_database(&database_url).await;
    let _ = locus::replication::delete_streams(
        crate::helpers::nats(),
        &deployment,
        &["eu", "us", "ap"],
    )
    .await;
}

impl Drop for Serve {
    /// A test that fails must not leave its server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Run `locus serve` with one override that breaks the config; it must exit (within a deadline,
/// else it is killed and the test fails) and name the field.
fn refused(variable: &str, value: &str, field: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["serve", "--config", "regions/eu.toml"])
        .env(variable, value)
        .env("LOCUS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("locus serve with {variable}={value:?} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.to_lowercase().contains(field), "{stderr}");
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    refused(
        "LOCUS_LIMITS__RECORD_BODY_BYTES",
        "lots",
        "record_body_bytes",
    );
    refused("LOCUS_REGION", "Not A Region", "region");
    refused("LOCUS_DATABASE_URL", "mysql://elsewhere", "database_url");
}

#[tokio::test]
async fn kill_9_of_a_region_mid_burst_loses_no_acknowledged_write_anywhere() {
    let run = format!("{:08x}", rand::random::<u32>());
    let deployment = format!("testkill{run}");
    let regions = ["eu", "us", "ap"];
    let ports: Vec<u16> = regions
        .iter()
        .map(|_| crate::helpers::free_port())
        .collect();
    let overrides = |index: usize| -> Vec<(&'static str, String)> {
        let peers: Vec<String> = regions
            .iter()
            .zip(&ports)
            .filter(|(id, _)| **id != regions[index])
            .map(|(id, port)| format!("{{id=\"{id}\",api_url=\"http://127.0.0.1:{port}\"}}"))
            .collect();
        vec![
            ("LOCUS_LISTEN", format!("127.0.0.1:{}", ports[index])),
            (
                "LOCUS_DATABASE_URL",
                format!(
                    "{}/locus_test_kill_{run}_{}",
                    postgres_base(),
                    regions[index]
                ),
            ),
            ("LOCUS_DEPLOYMENT", deployment.clone()),
            ("LOCUS_PEERS", format!("[{}]", peers.join(","))),
        ]
    };
    let mut servers: Vec<Serve> = (0..3).map(|i| serve(regions[i], &overrides(i))).collect();
    let http = reqwest::Client::new();
    let eu = servers[0].url.clone();

    // 32 writers to records homed at eu, until eu dies under them: enough that group commits
    // carry several writes each, so the kill lands while batches are in flight.
    let writers_count = 32;
    let mut writers = Vec::new();
    for w in 0..writers_count {
        let (http, eu) = (http.clone(), eu.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..1000 {
                let key = format!("w{w:02}-{i:04}");
                match http
                    .put(format!("{eu}/v1/collections/burst/records/{key}"))
                    .json(&json!({"w": w, "i": i}))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        acknowledged.push((key, json!({"w": w, "i": i})))
                    }
                    Ok(r) => panic!("{key}: {}", r.status()),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let metrics = http
        .get(format!("{eu}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    servers[0].child.kill().unwrap(); // SIGKILL, mid-burst
    servers[0].child.wait().unwrap();
    let figure = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (batches, batched_writes) = (
        figure("locus_write_batch_size_count"),
        figure("locus_write_batch_size_sum"),
    );
    assert!(
        batched_writes > batches,
        "writes shared commits before the kill: {batched_writes} writes in {batches} batches"
    );
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap());
    }
    assert!(
        !acknowledged.is_empty() && acknowledged.len() < writers_count * 1000,
        "eu died mid-burst ({} acknowledged)",
        acknowledged.len()
    );
    servers[0] = serve("eu", &overrides(0));

    // Every acknowledged write is in every region with its value, and the regions hold the
    // same records (writes answered with an error may or may not have committed, but
    // identically everywhere).
    let mut listings = Vec::new();
    for server in &servers {
        let base = server.url.clone();
        crate::helpers::eventually(
            60,
            &format!("all acknowledged writes at {base}"),
            || async {
                let records = all_records(&http, &base, "burst").await;
                acknowledged
                    .iter()
                    .all(|(key, value)| records.get(key).map(|r| &r["value"]) == Some(value))
            },
        )
        .await;
        listings.push(base);
    }
    crate::helpers::eventually(30, "every region holds the same records", || async {
        let mut whole = Vec::new();
        for base in &listings {
            whole.push(all_records(&http, base, "burst").await);
        }
        whole.windows(2).all(|pair| pair[0] == pair[1])
    })
    .await;
    drop(servers);
    for region in regions {
        let url = format!("{}/locus_test_kill_{run}_{region}", postgres_base());
        let _ = sqlx::Postgres::force_drop_database(&url).await;
    }
    let _ = locus::replication::delete_streams(crate::helpers::nats(), &deployment, &regions).await;
}

/// Every record a region lists in `collection`, following the cursors: key to its JSON (value,
/// home, version and HLC).
async fn all_records(
    http: &reqwest::Client,
    base: &str,
    collection: &str,
) -> std::collections::BTreeMap<String, Value> {
    let mut records = std::collections::BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/collections/{collection}/records?limit=1000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        records.extend(
            page["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["key"].as_str().unwrap().to_owned(), r.clone())),
        );
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return records,
        }
    }
}

#[tokio::test]
async fn locus_dev_runs_three_replicating_regions_and_stops_on_ctrl_c() {
    let run = format!("{:08x}", rand::random::<u32>());
    let deployment = format!("testdev{run}");
    let dir = std::env::temp_dir().join(format!("locus-dev-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ids = ["eu", "us", "ap"];
    let ports: Vec<u16> = ids.iter().map(|_| crate::helpers::free_port()).collect();
    for (i, id) in ids.iter().enumerate() {
        let peers: String = ids
            .iter()
            .zip(&ports)
            .filter(|(p, _)| *p != id)
            .map(|(p, port)| {
                format!("\n[[peers]]\nid = \"{p}\"\napi_url = \"http://127.0.0.1:{port}\"\n")
            })
            .collect();
        let text = format!(
            "deployment = \"{deployment}\"\nregion = \"{id}\"\nlisten = \"127.0.0.1:{}\"\n\
             database_url = \"{}/locus_test_dev_{run}_{id}\"\nnats_url = \"{}\"\n\
             admin_token = \"dev-admin-token\"\npeer_token = \"dev-peer-token\"\n\
             [replication]\nstream_max_bytes = 67108864\n{peers}",
            ports[i],
            postgres_base(),
            "nats://127.0.0.1:1"
        );
        std::fs::write(dir.join(format!("{id}.toml")), text).unwrap();
    }
    // Without --nats, locus dev starts a current nats-server of its own (its data under the
    // working directory's target/dev-nats) and points every region at it.
    let nats_port = crate::helpers::free_port();
    // Logs as JSON, into a file read at the end.
    let log_file = dir.join("locus-dev.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_locus"))
        .args([
            "dev",
            "--reset",
            "--nats-port",
            &nats_port.to_string(),
            "--regions",
        ])
        .arg(&dir)
        .current_dir(&dir)
        .env("LOCUS_NATS_SERVER", crate::helpers::nats_server_binary())
        .env("LOCUS_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,locus::api=debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops every region") {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "locus dev ended early: {banner}"
        );
        banner.push_str(&line);
    }
    for port in &ports {
        assert!(
            banner.contains(&format!("http://127.0.0.1:{port}")),
            "{banner}"
        );
    }
    assert!(banner.contains("curl -X PUT"), "{banner}");
    assert!(
        banner.contains(&format!(
            "nats-server {} started on nats://127.0.0.1:{nats_port}",
            locus::nats_server::VERSION
        )),
        "{banner}"
    );

    let http = reqwest::Client::new();
    let put = http
        .put(format!(
            "http://127.0.0.1:{}/v1/collections/users/records/alice",
            ports[0]
        ))
        .json(&json!({"name": "Alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let at_ap = format!(
        "http://127.0.0.1:{}/v1/collections/users/records/alice",
        ports[2]
    );
    crate::helpers::eventually(20, "alice reaches ap", || async {
        http.get(&at_ap).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
    // A client error at us: logged at debug, as JSON, labelled with the region that answered.
    let bad = http
        .put(format!(
            "http://127.0.0.1:{}/v1/collections/users/records/bob",
            ports[1]
        ))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // Ctrl-C: every region stops and the command exits cleanly.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(exit.success(), "{exit:?}: {rest}");
    for id in ids {
        assert!(rest.contains(&format!("region {id} stopped")), "{rest}");
    }
    for id in ids {
        let _ = sqlx::Postgres::force_drop_database(&format!(
            "{}/locus_test_dev_{run}_{id}",
            postgres_base()
        ))
        .await;
    }
    // Its nats-server ended with it.
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err());

    // Every log line is a JSON object; the bad request's line names its region and level.
    let log = std::fs::read_to_string(&log_file).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let answered = lines
        .iter()
        .find(|line| line["status"] == 400)
        .unwrap_or_else(|| panic!("no line for the 400 in {log}"));
    assert_eq!(answered["level"], "DEBUG", "{answered}");
    assert_eq!(answered["span"]["region"], "us", "{answered}");
    assert!(
        answered["error"].as_str().unwrap().contains("JSON"),
        "{answered}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
