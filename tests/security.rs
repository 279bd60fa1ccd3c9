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
