//! TLS on the connections a region makes, against the real servers.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{eventually, postgres_base, SecureNats, Setup, TestPki};

/// The certificate the PostgreSQL of this machine serves (Debian's, for `localhost`).
const POSTGRES_CA: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// `url` reaching the same server by the name its certificate holds, with TLS settings.
fn over_tls(url: &str, settings: &str) -> String {
    let url = url.replace("@127.0.0.1:", "@localhost:");
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{settings}")
}

/// Each region's own PostgreSQL connection is encrypted, as the server sees it.
async fn assert_postgres_over_tls(c: &crate::helpers::Cluster, ids: &[&str]) {
    for id in ids {
        let encrypted: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(c.region(id).region.store.pool())
                .await
                .unwrap();
        assert!(encrypted, "{id}'s connections to PostgreSQL use TLS");
    }
}

#[tokio::test]
async fn regions_reach_postgres_over_verified_tls() {
    let settings = format!("sslmode=verify-full&sslrootcert={POSTGRES_CA}");
    let c = Setup::regions(&["eu", "us"])
        .tweak(move |config| config.database_url = over_tls(&config.database_url, &settings).into())
        .start()
        .await;
    assert_postgres_over_tls(&c, &["eu", "us"]).await;
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

/// Every hop of a three-region deployment on TLS: PostgreSQL verified (`verify-full`), the
/// regions' APIs and calls between them on HTTPS, and NATS on TLS with a client certificate and a
/// user per region allowed only what `locus::replication::permissions` grants it.
#[tokio::test]
async fn three_regions_replicate_with_every_hop_on_tls_and_least_privilege_nats_users() {
    let regions = ["eu", "us", "ap"];
    let pki = TestPki::new(false);
    let deployment = format!("tls{:08x}", rand::random::<u32>());
    let nats = std::sync::Arc::new(SecureNats::start(&pki, &deployment, &regions).await);
    let postgres_tls = format!("sslmode=verify-full&sslrootcert={POSTGRES_CA}");
    let mut setup = Setup::regions(&regions);
    setup.https = Some(pki.clone());
    let (n, d) = (nats.clone(), deployment.clone());
    let c = setup
        .tweak(move |config| {
            config.deployment = d.clone();
            n.configure(config);
            config.database_url = over_tls(&config.database_url, &postgres_tls).into();
        })
        .start()
        .await;
    assert_postgres_over_tls(&c, &regions).await;

    // Writes at every region, of records homed in every region (forwarded over HTTPS), updates
    // and deletes among them.
    for (i, at) in regions.iter().cycle().take(30).enumerate() {
        let home = regions[(i / 3) % 3];
        let response = put_homed(&c, at, home, &format!("k{i}"), json!({"i": i, "at": at}))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "k{i} at {at}");
    }
    // Updates and deletes once every region holds every record (an update at a region that has
    // not seen the record yet would create another, concurrent one).
    c.assert_converged().await;
    for i in (0..30).step_by(4) {
        let response = c
            .put("us", "notes", &format!("k{i}"), &json!({"updated": i}))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "update of k{i}");
    }
    for i in (1..30).step_by(7) {
        let response = c
            .request(
                "ap",
                reqwest::Method::DELETE,
                &crate::helpers::record_path("notes", &format!("k{i}")),
            )
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "delete of k{i}: {}",
            response.status()
        );
    }
    c.assert_converged().await;
    for i in 0..30 {
        let deleted = (1..30).step_by(7).any(|d| d == i);
        for id in regions {
            let expected = if deleted {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            };
            assert_eq!(
                c.get(id, "notes", &format!("k{i}")).await.status(),
                expected,
                "k{i} at {id}"
            );
        }
    }

    // Events went through the streams, not only repair: every consumer of every stream has
    // delivered and been acknowledged through (acknowledgements pass the permissions too).
    let admin = async_nats::jetstream::new(nats.admin().await);
    eventually(
        30,
        "every consumer has applied and acknowledged everything",
        || async {
            let mut done = true;
            for origin in regions {
                let name = locus::replication::stream_name(&deployment, origin);
                let mut stream = admin.get_stream(&name).await.unwrap();
                let delivered = stream.info().await.unwrap().state.last_sequence;
                done &= delivered > 0;
                for reader in regions.iter().filter(|r| **r != origin) {
                    let info = stream
                        .consumer_info(locus::replication::consumer_name(reader))
                        .await
                        .unwrap();
                    done &= info.num_pending == 0
                        && info.num_ack_pending == 0
                        && info.ack_floor.stream_sequence == delivered;
                }
            }
            done
        },
    )
    .await;

    // us, with its own credentials, can touch nothing of eu's.
    let (us, mut refusals) = nats.client_as("us", &SecureNats::password("us")).await;
    let eu_stream = locus::replication::stream_name(&deployment, "eu");
    let eu_state = || async {
        let mut stream = admin.get_stream(&eu_stream).await.unwrap();
        stream.info().await.unwrap().state.clone()
    };
    let before = eu_state().await;
    async fn expect_refusal(
        refusals: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        what: &str,
    ) {
        let refusal = tokio::time::timeout(std::time::Duration::from_secs(5), refusals.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} was not refused"))
            .unwrap();
        assert!(
            refusal.to_lowercase().contains("permissions violation"),
            "{what}: {refusal}"
        );
    }
    us.publish(
        locus::replication::subject(&deployment, "eu"),
        "forged".into(),
    )
    .await
    .unwrap();
    us.flush().await.unwrap();
    expect_refusal(&mut refusals, "publishing into eu's subject").await;
    let _spy = us
        .subscribe(format!(
            "{}.>",
            locus::replication::connection::inbox_prefix(&deployment, "eu")
        ))
        .await
        .unwrap();
    expect_refusal(&mut refusals, "subscribing to eu's replies").await;
    let ap_stream = locus::replication::stream_name(&deployment, "ap");
    for (subject, what) in [
        (
            format!("$JS.API.CONSUMER.MSG.NEXT.{ap_stream}.to-eu"),
            "pulling ap's events through eu's consumer",
        ),
        (
            format!("$JS.API.STREAM.DELETE.{eu_stream}"),
            "deleting eu's stream",
        ),
        (
            format!("$JS.API.STREAM.PURGE.{eu_stream}"),
            "purging eu's stream",
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.{eu_stream}.spy"),
            "reading eu's stream through a consumer of another name",
        ),
    ] {
        us.publish(subject, "{}".into()).await.unwrap();
        us.flush().await.unwrap();
        expect_refusal(&mut refusals, what).await;
    }
    let after = eu_state().await;
    assert_eq!(
        after.consumer_count, before.consumer_count,
        "no consumer was added to it"
    );
    // eu's own heartbeats (every 250 ms here) may reach its stream meanwhile, so its sequence
    // proves nothing. A forged message would reach every reader of the stream, which would set it
    // aside as unreadable: once us and ap have acknowledged the stream through its end, neither
    // may hold a dead letter.
    eventually(
        30,
        "us and ap acknowledge eu's stream through its end",
        || async {
            let stream = admin.get_stream(&eu_stream).await.unwrap();
            let mut done = true;
            for reader in ["us", "ap"] {
                let info = stream
                    .consumer_info(locus::replication::consumer_name(reader))
                    .await
                    .unwrap();
                done &= info.ack_floor.stream_sequence >= after.last_sequence;
            }
            done
        },
    )
    .await;
    for reader in ["us", "ap"] {
        let held = c
            .region(reader)
            .region
            .store
            .dead_letter_count()
            .await
            .unwrap();
        assert_eq!(
            held, 0,
            "nothing forged reached eu's stream (read by {reader})"
        );
    }
    c.assert_converged().await;
    c.teardown().await;
}

/// A region that NATS refuses does not start, and says which connection refused it and why:
/// a wrong password, a server certificate from a CA it does not trust, an expired one.
#[tokio::test]
async fn nats_refusals_name_the_connection_and_the_cause() {
    let pki = TestPki::new(false);
    let deployment = format!("tls{:08x}", rand::random::<u32>());
    let nats = SecureNats::start(&pki, &deployment, &["eu"]).await;
    let expired_pki = TestPki::new(true);
    let expired = SecureNats::start(&expired_pki, &deployment, &["eu"]).await;
    let other_ca = TestPki::new(false);
    let database = format!("{}/locus_test_{deployment}", postgres_base());

    let start = |config: locus::config::Config| async move {
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("wrong-password-here"),
            "Debug shows no password: {shown}"
        );
        assert!(!shown.contains(&SecureNats::password("eu")), "{shown}");
        match locus::app::start(config, None).await {
            Ok(_) => panic!("NATS accepted a region it should refuse"),
            Err(error) => format!("{error:#}"),
        }
    };
    let with_password = |config: &mut locus::config::Config| {
        nats.configure(config);
        config.nats.password = Some("wrong-password-here".into());
    };
    let with_other_ca = |config: &mut locus::config::Config| {
        nats.configure(config);
        config.nats.ca_file = Some(other_ca.ca.clone());
    };
    let with_expired = |config: &mut locus::config::Config| expired.configure(config);
    type Change<'a> = &'a dyn Fn(&mut locus::config::Config);
    let cases: [(Change, String, &str); 3] = [
        (
            &with_password,
            format!(
                "region eu: NATS at {} refused this region's credentials (user \"eu\")",
                nats.url()
            ),
            "authorization violation",
        ),
        (
            &with_other_ca,
            format!("region eu: TLS with NATS at {} failed", nats.url()),
            "invalid peer certificate",
        ),
        (
            &with_expired,
            format!("region eu: TLS with NATS at {} failed", expired.url()),
            "certificate expired",
        ),
    ];
    for (change, begins, cause) in cases {
        let mut config = crate::helpers::test_config(&deployment, "eu", database.clone());
        change(&mut config);
        let error = start(config).await;
        assert!(error.starts_with(&begins), "{error}");
        assert!(error.contains(cause), "{error}");
        assert!(!error.contains("wrong-password-here"), "{error}");
    }

    use sqlx::migrate::MigrateDatabase;
    let _ = sqlx::Postgres::drop_database(&database).await;
}

/// The certificates `deploy/make-certs.sh` makes for the compose deployment serve: regions on
/// HTTPS with theirs, a NATS server with its own, each verifying the other's as a client.
#[tokio::test]
async fn the_compose_certificate_script_makes_certificates_that_serve_every_hop() {
    let dir = std::env::temp_dir().join(format!("locus-certs-{:08x}", rand::random::<u32>()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/make-certs.sh");
    let status = std::process::Command::new("sh")
        .arg(script)
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{script} ran");
    let files = |service: &str| TestPki {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{service}.pem")),
        key: dir.join(format!("{service}-key.pem")),
    };
    let deployment = format!("certs{:08x}", rand::random::<u32>());
    let nats = std::sync::Arc::new(
        SecureNats::start(&files("nats-eu-1"), &deployment, &["eu", "us"]).await,
    );
    let region_files = files("locus-eu");
    let mut setup = Setup::regions(&["eu", "us"]);
    setup.https = Some(region_files.clone());
    let (n, d, client) = (nats.clone(), deployment.clone(), region_files.clone());
    let c = setup
        .tweak(move |config| {
            config.deployment = d.clone();
            n.configure(config);
            config.nats.cert_file = Some(client.cert.clone());
            config.nats.key_file = Some(client.key.clone());
        })
        .start()
        .await;
    let response = put_homed(&c, "us", "eu", "made", json!({"by": "make-certs.sh"}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    eventually(30, "the write replicates to us", || async {
        c.get("us", "notes", "made").await.status() == StatusCode::OK
    })
    .await;
    // The container health check, trusting the script's CA.
    let health = format!("{}/healthz", c.url("eu"));
    locus::app::health(&health, Some(&region_files.ca))
        .await
        .expect("healthy over HTTPS with the CA");
    let untrusted = locus::app::health(&health, None).await.unwrap_err();
    assert!(
        format!("{untrusted:#}").contains("does not answer"),
        "{untrusted:#}"
    );
    c.assert_converged().await;
    c.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
