//! Homing across regions: forwarding to the home, reads at the home, and what happens when the
//! home is down (503, or a failover write) or does not answer (504).

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use locus::clock::version::{SessionToken, VersionVector};

use crate::helpers::{
    black_hole, cluster, eventually, expect_problem, header, record_path, Setup, PEER,
};

#[tokio::test]
async fn writes_are_forwarded_to_the_home_and_reads_can_go_there() {
    let c = cluster(&["eu", "us"]).await;
    let path = record_path("users", "alice");

    let created = c
        .request("us", Method::PUT, &path)
        .header("locus-home", "eu")
        .json(&json!({"v": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        header(&created, "locus-region"),
        Some("eu"),
        "the client gets the home's answer"
    );
    let session = header(&created, "locus-session").unwrap().to_owned();
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["home"], "eu");
    assert!(
        body["version"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k.starts_with("eu.")),
        "written by eu: {body}"
    );

    // Stored at the home, from where it replicates.
    assert_eq!(c.get("eu", "users", "alice").await.status(), StatusCode::OK);

    // Read your writes: with the session token, a read at us right after the write sees it,
    // served by us if it has applied the write already, else by the home.
    let ryw = c
        .request("us", Method::GET, &path)
        .header("locus-session", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(ryw.status(), StatusCode::OK);
    assert_eq!(ryw.json::<Value>().await.unwrap()["value"], json!({"v": 1}));
    // A token ahead of anything us holds is sent, after the bounded wait, to the region that took
    // the write (here the home); as that one does not hold it either, the answer is a 503 rather
    // than stale data.
    let mut ahead = SessionToken::decode(&session).unwrap();
    let actor = ahead.version.entries().next().unwrap().0.to_owned();
    ahead.version = VersionVector::from([(actor.as_str(), 1_000)]);
    let asked = std::time::Instant::now();
    let at_home = c
        .request("us", Method::GET, &path)
        .header("locus-session", ahead.encode())
        .send()
        .await
        .unwrap();
    assert_eq!(header(&at_home, "locus-region"), Some("eu"));
    assert!(
        asked.elapsed() >= std::time::Duration::from_millis(600),
        "us, then eu, waited for the write first"
    );
    expect_problem(at_home, StatusCode::SERVICE_UNAVAILABLE).await;

    // consistency=home at the home itself is a local read.
    let at_home = c
        .request("eu", Method::GET, &format!("{path}?consistency=home"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&at_home, "locus-region"), Some("eu"));
    // An unknown consistency is a client error.
    let bad = c
        .request("us", Method::GET, &format!("{path}?consistency=eventual"))
        .send()
        .await
        .unwrap();
    expect_problem(bad, StatusCode::BAD_REQUEST).await;

    // A delete at us for a record us knows to be homed at eu is forwarded too.
    c.put("eu", "users", "bob", &json!(1)).await;
    let us_view = c
        .request("us", Method::PUT, &record_path("users", "bob"))
        .header("locus-home", "eu")
        .json(&json!(2))
        .send()
        .await
        .unwrap();
    assert_eq!(us_view.status(), StatusCode::OK, "an update, forwarded");
    c.teardown().await;
}

#[tokio::test]
async fn default_home_places_new_records() {
    let c = cluster(&["eu", "us"]).await;
    c.configure_everywhere("orders", &json!({"default_home": "us"}))
        .await;
    let created = c.put("eu", "orders", "o1", &json!({"total": 3})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(header(&created, "locus-region"), Some("us"));
    assert_eq!(created.json::<Value>().await.unwrap()["home"], "us");
    // consistency=home at eu finds the home from the policy, and reads it there.
    let read = c
        .request(
            "eu",
            Method::GET,
            &format!("{}?consistency=home", record_path("orders", "o1")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "locus-region"), Some("us"));
    c.teardown().await;
}

#[tokio::test]
async fn home_down_rejects_by_default_and_fails_over_when_the_policy_allows() {
    let mut c = cluster(&["eu", "us"]).await;
    c.configure_everywhere("carts", &json!({"on_home_unreachable": "accept_local"}))
        .await;
    c.stop("eu").await;

    // Default policy: 503 with Retry-After and the home; nothing written.
    let rejected = c
        .request("us", Method::PUT, &record_path("users", "u1"))
        .header("locus-home", "eu")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&rejected, "retry-after"), Some("2"));
    assert_eq!(header(&rejected, "locus-home"), Some("eu"));
    expect_problem(rejected, StatusCode::SERVICE_UNAVAILABLE).await;
    expect_problem(c.get("us", "users", "u1").await, StatusCode::NOT_FOUND).await;

    // accept_local: a failover write, kept here, still homed at eu.
    let failover = c
        .request("us", Method::PUT, &record_path("carts", "c1"))
        .header("locus-home", "eu")
        .json(&json!({"items": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(failover.status(), StatusCode::CREATED);
    assert_eq!(header(&failover, "locus-failover"), Some("true"));
    assert_eq!(header(&failover, "locus-region"), Some("us"));
    let body: Value = failover.json().await.unwrap();
    assert_eq!(
        body["home"], "eu",
        "a failover write does not move the home"
    );
    assert!(body["version"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| k.starts_with("us.")));
    let read: Value = c.get("us", "carts", "c1").await.json().await.unwrap();
    assert_eq!(read["value"], json!({"items": [1]}));

    // Now us knows c1's home is eu: a consistency=home read is a 503, not a silent local read.
    let read = c
        .request(
            "us",
            Method::GET,
            &format!("{}?consistency=home", record_path("carts", "c1")),
        )
        .send()
        .await
        .unwrap();
    expect_problem(read, StatusCode::SERVICE_UNAVAILABLE).await;

    // Conditional writes never fail over.
    let conditional = c
        .request("us", Method::PUT, &record_path("carts", "c2"))
        .header("locus-home", "eu")
        .header("if-none-match", "*")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(conditional, StatusCode::SERVICE_UNAVAILABLE).await;
    expect_problem(c.get("us", "carts", "c2").await, StatusCode::NOT_FOUND).await;
    c.teardown().await;
}

#[tokio::test]
async fn a_forward_that_gets_no_answer_is_a_504_and_never_a_failover_write() {
    let (hole, _task) = black_hole().await;
    let mut setup =
        Setup::regions(&["eu", "us"]).tweak(|config| config.forwarding.request_timeout_ms = 400);
    setup.peer_override.insert("eu", hole);
    let c = setup.start().await;
    c.configure(
        "us",
        "carts",
        &json!({"on_home_unreachable": "accept_local"}),
    )
    .await;

    let started = std::time::Instant::now();
    let timed_out = c
        .request("us", Method::PUT, &record_path("carts", "k"))
        .header("locus-home", "eu")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    let detail = expect_problem(timed_out, StatusCode::GATEWAY_TIMEOUT).await;
    assert!(detail.contains("may or may not"), "{detail}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    expect_problem(c.get("us", "carts", "k").await, StatusCode::NOT_FOUND).await;
    c.teardown().await;
}

#[tokio::test]
async fn anywhere_collections_write_locally_in_every_region() {
    let c = cluster(&["eu", "us"]).await;
    c.configure_everywhere("events", &json!({"homing": "anywhere"}))
        .await;
    for region in ["eu", "us"] {
        let r = c
            .request(
                region,
                Method::PUT,
                &record_path("events", &format!("e-{region}")),
            )
            .header("locus-home", "eu")
            .json(&json!(region))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(header(&r, "locus-region"), Some(region));
        assert!(header(&r, "locus-failover").is_none());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["home"], "eu");
        assert!(body["version"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k.starts_with(&format!("{region}."))));
    }
    c.teardown().await;
}

#[tokio::test]
async fn forwarded_requests_take_one_hop_and_need_the_peer_token() {
    let c = cluster(&["eu", "us"]).await;
    let path = record_path("users", "x");

    // A forwarded write for a record eu is not the home of: 503 naming the home, no second hop.
    let not_home = c
        .request("eu", Method::PUT, &path)
        .header("locus-forwarded-by", "us")
        .header("locus-home", "us")
        .bearer_auth(PEER)
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&not_home, "locus-home"), Some("us"));
    assert_eq!(header(&not_home, "locus-region"), Some("eu"));
    expect_problem(not_home, StatusCode::SERVICE_UNAVAILABLE).await;
    expect_problem(c.get("us", "users", "x").await, StatusCode::NOT_FOUND).await;

    // Claiming to be a peer needs the peer token.
    let no_token = c
        .request("eu", Method::PUT, &path)
        .header("locus-forwarded-by", "us")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(no_token, StatusCode::UNAUTHORIZED).await;
    let wrong = c
        .request("eu", Method::PUT, &path)
        .header("locus-forwarded-by", "us")
        .bearer_auth("nope-nope")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(wrong, StatusCode::FORBIDDEN).await;
    let stranger = c
        .request("eu", Method::PUT, &path)
        .header("locus-forwarded-by", "mars")
        .bearer_auth(PEER)
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(stranger, StatusCode::BAD_REQUEST).await;
    c.teardown().await;
}

#[tokio::test]
async fn a_home_that_hangs_up_is_a_502_and_never_a_failover_write() {
    let (peer, _task) = crate::helpers::hang_up().await;
    let mut setup = Setup::regions(&["eu", "us"]);
    setup.peer_override.insert("eu", peer);
    let c = setup.start().await;
    c.configure(
        "us",
        "carts",
        &json!({"on_home_unreachable": "accept_local"}),
    )
    .await;
    let r = c
        .request("us", Method::PUT, &record_path("carts", "k"))
        .header("locus-home", "eu")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    let detail = expect_problem(r, StatusCode::BAD_GATEWAY).await;
    assert!(detail.contains("eu"), "{detail}");
    expect_problem(c.get("us", "carts", "k").await, StatusCode::NOT_FOUND).await;
    c.teardown().await;
}

/// A listener whose accept queue is full: the kernel drops further connection attempts, as a host
/// that drops packets does, so a connect waits out its whole timeout.
fn dropping_listener() -> (String, Vec<std::net::TcpStream>, std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) again on a listening socket only changes its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    while held.len() < 8 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) {
            Ok(stream) => held.push(stream),
            Err(_) => break,
        }
    }
    assert!(
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_err(),
        "the queue is full: connections are dropped"
    );
    (format!("http://{addr}"), held, listener)
}

async fn eu_health_at_us(c: &crate::helpers::Cluster) -> Value {
    c.peer_entry("us", "eu").await["health"].clone()
}

#[tokio::test]
async fn forwards_to_a_peer_known_down_fail_at_once_instead_of_waiting_out_the_connect_timeout() {
    let (dropping, _held, _listener) = dropping_listener();
    let mut setup =
        Setup::regions(&["eu", "us"]).tweak(|config| config.forwarding.connect_timeout_ms = 1_000);
    setup.peer_override.insert("eu", dropping);
    setup.peers_reachable = false;
    let c = setup.start().await;
    let put = |key: String| {
        c.request("us", Method::PUT, &record_path("carts", &key))
            .header("locus-home", "eu")
            .json(&json!(1))
            .send()
    };
    // The first forwards and probes wait out the connect timeout; two in a row and us answers for
    // eu at once.
    expect_problem(
        put("first".into()).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    eventually(10, "us answers for eu at once", || async {
        eu_health_at_us(&c).await["fail_fast"] == json!(true)
    })
    .await;
    let health = eu_health_at_us(&c).await;
    assert!(
        health["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{health}"
    );
    assert_eq!(health["up"], json!(false), "{health}");
    assert!(health["down_since_ms"].as_u64().is_some(), "{health}");
    // Every later forward answers at once, with the policy's 503 and Retry-After.
    for n in 0..5 {
        let started = std::time::Instant::now();
        let response = put(format!("k{n}")).await.unwrap();
        let elapsed = started.elapsed();
        assert!(header(&response, "retry-after").is_some());
        let detail = expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(detail.contains("eu"), "{detail}");
        assert!(
            elapsed < std::time::Duration::from_millis(300),
            "answered in {elapsed:?}, not after the 1 s connect timeout"
        );
    }
    c.teardown().await;
}

#[tokio::test]
async fn a_peer_that_comes_back_is_probed_up_and_forwarded_to_again() {
    let mut c = cluster(&["eu", "us"]).await;
    let eu_config = c.region("eu").region.config.clone();
    c.stop("eu").await;
    let refused = c
        .request("us", Method::PUT, &record_path("carts", "while-down"))
        .header("locus-home", "eu")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(refused, StatusCode::SERVICE_UNAVAILABLE).await;
    eventually(10, "us sees eu down", || async {
        eu_health_at_us(&c).await["up"] == json!(false)
    })
    .await;
    // Refused at once, so not worth failing fast for: forwards keep trying.
    assert_eq!(eu_health_at_us(&c).await["fail_fast"], json!(false));
    c.restart("eu", eu_config).await;
    eventually(10, "a probe finds eu up again", || async {
        eu_health_at_us(&c).await["up"] == json!(true)
    })
    .await;
    let forwarded = c
        .request("us", Method::PUT, &record_path("carts", "after"))
        .header("locus-home", "eu")
        .json(&json!(2))
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), StatusCode::CREATED);
    assert_eq!(header(&forwarded, "locus-region"), Some("eu"));
    c.assert_converged().await;
    c.teardown().await;
}
