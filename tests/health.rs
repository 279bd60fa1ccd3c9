//! Liveness and readiness: a region whose PostgreSQL goes away says so (503) and keeps serving.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{expect_problem, postgres_base, Setup, TcpProxy};

#[tokio::test]
async fn readiness_follows_postgres_and_the_region_survives_its_loss() {
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let run = format!("{:08x}", rand::random::<u32>());
    let direct = format!("{}/locus_test_{run}_ready", postgres_base());
    let proxied = format!("postgres://postgres@{}/locus_test_{run}_ready", proxy.addr);
    let mut setup = Setup::regions(&["eu"]);
    setup.database_override.insert("eu", proxied);
    let c = setup.start().await;

    assert_eq!(c.get_status("eu", "/readyz").await, StatusCode::OK);
    assert_eq!(
        c.put("eu", "c", "k", &json!(1)).await.status(),
        StatusCode::CREATED
    );

    proxy.cut();
    expect_problem(
        c.request("eu", Method::GET, "/readyz")
            .send()
            .await
            .unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    // Writes and reads fail cleanly, with a problem document and no leaked cause.
    let detail = expect_problem(
        c.put("eu", "c", "k2", &json!(2)).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(
        !detail.contains("Connection refused") && !detail.contains("5432"),
        "{detail}"
    );
    expect_problem(c.get("eu", "c", "k").await, StatusCode::SERVICE_UNAVAILABLE).await;
    // The process is alive.
    assert_eq!(c.get_status("eu", "/healthz").await, StatusCode::OK);

    c.teardown().await;
    let _ = <sqlx::Postgres as sqlx::migrate::MigrateDatabase>::force_drop_database(&direct).await;
}
