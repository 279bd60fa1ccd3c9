//! TLS on the connections a region makes, against the real servers.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{eventually, postgres_base, Setup};

/// The certificate the PostgreSQL of this machine serves (Debian's, for `localhost`).
const POSTGRES_CA: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// `url` reaching the same server by the name its certificate holds, with TLS settings.
fn over_tls(url: &str, settings: &str) -> String {
    let url = url.replace("@127.0.0.1:", "@localhost:");
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{settings}")
}

#[tokio::test]
async fn regions_reach_postgres_over_verified_tls() {
    let settings = format!("sslmode=verify-full&sslrootcert={POSTGRES_CA}");
    let c = Setup::regions(&["eu", "us"])
        .tweak(move |config| config.database_url = over_tls(&config.database_url, &settings).into())
        .start()
        .await;
    for id in ["eu", "us"] {
        let encrypted: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(c.region(id).region.store.pool())
                .await
                .unwrap();
        assert!(encrypted, "{id}'s connections to PostgreSQL use TLS");
    }
    let response = c.put("eu", "notes", "tls", &json!({"over": "tls"})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    eventually(30, "the write replicates", || async {
        c.get("us", "notes", "tls").await.status() == StatusCode::OK
    })
    .await;
    c.teardown().await;
}

#[tokio::test]
async fn a_postgres_certificate_from_another_ca_is_refused_naming_the_database() {
    // A CA of our own, which did not sign the server's certificate.
    let ca = rcgen::generate_simple_self_signed(vec!["some-other-ca".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("locus-ca-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let wrong = dir.join("ca.pem");
    std::fs::write(&wrong, ca.cert.pem()).unwrap();
    let run = format!("{:08x}", rand::random::<u32>());
    let config = crate::helpers::test_config(
        &format!("test{run}"),
        "eu",
        over_tls(
            &format!("{}/locus_test_tls_{run}", postgres_base()),
            &format!("sslmode=verify-full&sslrootcert={}", wrong.display()),
        ),
    );
    let error = match locus::app::start(config, None).await {
        Ok(_) => panic!("a region trusting another CA reached PostgreSQL"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.starts_with("region eu: cannot open its database: TLS with the database failed"),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(error.contains("sslrootcert"), "{error}");
    assert_eq!(
        error.matches("UnknownIssuer").count(),
        1,
        "each cause once: {error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PUT `notes/key` at region `at`, creating it homed in `home`.
async fn put_homed(
    c: &crate::helpers::Cluster,
    at: &str,
    home: &str,
    key: &str,
    value: serde_json::Value,
) -> reqwest::Result<reqwest::Response> {
    c.request(
        at,
        reqwest::Method::PUT,
        &crate::helpers::record_path("notes", key),
    )
    .header("locus-home", home)
    .json(&value)
    .send()
    .await
}

/// A cluster whose regions serve HTTPS with `pki` and call each other over it.
async fn https_cluster(pki: &crate::helpers::TestPki) -> crate::helpers::Cluster {
    let mut setup = Setup::regions(&["eu", "us"]);
    setup.https = Some(pki.clone());
    setup.start().await
}

#[tokio::test]
async fn regions_serve_https_and_forward_and_repair_over_it() {
    let pki = crate::helpers::TestPki::new(false);
    let c = https_cluster(&pki).await;
    assert!(c.url("eu").starts_with("https://localhost:"));
    // A write at eu for a record homed in us is forwarded over TLS, and replicates back.
    let response = put_homed(&c, "eu", "us", "n1", json!({"over": "https"}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        crate::helpers::header(&response, "locus-region"),
        Some("us")
    );
    eventually(30, "the write replicates to eu", || async {
        c.get("eu", "notes", "n1").await.status() == StatusCode::OK
    })
    .await;
    // The peer API (anti-entropy) and health probes go over TLS too.
    c.repair_everywhere().await;
    let regions = c.get_json("eu", "/v1/regions").await;
    assert_eq!(regions["regions"][1]["reachable"], json!(true), "{regions}");
    // Plain HTTP is not served.
    let plain = c.url("eu").replace("https://", "http://");
    assert!(reqwest::get(format!("{plain}/healthz")).await.is_err());
    c.teardown().await;
}

#[tokio::test]
async fn a_peer_certificate_from_another_ca_or_expired_is_refused() {
    for expired in [false, true] {
        let served = crate::helpers::TestPki::new(expired);
        // Clients of the test trust the served certificate's CA; the regions trust another
        // (for the wrong-CA case) or this one (for the expired case).
        let trusted = if expired {
            served.clone()
        } else {
            crate::helpers::TestPki::new(false)
        };
        let mut setup = Setup::regions(&["eu", "us"]);
        setup.https = Some(served.clone());
        setup.peers_reachable = false;
        let peer_ca = trusted.ca.clone();
        setup.tweak = Box::new(move |config| config.tls.peer_ca_file = Some(peer_ca.clone()));
        let c = setup.start().await;
        let response = put_homed(&c, "eu", "us", "n1", json!(1)).await;
        match response {
            // The test's client trusts the CA: eu answers, and refuses to write without its home.
            Ok(response) if !expired => {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                let detail =
                    crate::helpers::expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
                assert!(detail.contains("us"), "{detail}");
            }
            // An expired certificate: even the test's own client refuses eu.
            Ok(response) => panic!("an expired certificate was accepted: {}", response.status()),
            Err(error) => {
                assert!(expired, "{error}");
                assert!(format!("{error:?}").contains("Expired"), "{error:?}");
            }
        }
        let eu = &c.region("eu").region;
        let repair = locus::replication::repair::round(eu, "us").await;
        let error = repair
            .expect_err("repair over an untrusted TLS connection")
            .to_string();
        assert!(error.contains("peer us"), "{error}");
        assert!(error.contains("invalid peer certificate"), "{error}");
        if expired {
            assert!(error.contains("certificate expired"), "{error}");
        }
        c.teardown_without_checks().await;
    }
}

#[tokio::test]
async fn the_peer_token_rotates_without_downtime() {
    // Mid-rotation: eu already sends the new token and still accepts the old one, which us
    // still sends while it accepts the new one.
    const ROTATED: &str = "rotated-peer-token";
    let c = Setup::regions(&["eu", "us"])
        .tweak(|config| {
            if config.region == "eu" {
                config.peer_token = ROTATED.into();
                config.accepted_peer_tokens = vec![crate::helpers::PEER.into()];
            } else {
                config.accepted_peer_tokens = vec![ROTATED.into()];
            }
        })
        .start()
        .await;
    for (at, home) in [("eu", "us"), ("us", "eu")] {
        let response = put_homed(&c, at, home, at, json!({"written_at": at}))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{at} → {home}");
        assert_eq!(
            crate::helpers::header(&response, "locus-region"),
            Some(home)
        );
    }
    for (token, expected) in [
        (ROTATED, StatusCode::OK),
        (crate::helpers::PEER, StatusCode::OK),
        ("a-token-nobody-accepts", StatusCode::FORBIDDEN),
    ] {
        let response = c
            .request("eu", reqwest::Method::GET, "/v1/peer/collections")
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{token}");
    }
    c.teardown().await;
}
