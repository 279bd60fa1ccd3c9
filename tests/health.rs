//! Liveness and readiness: a region whose PostgreSQL goes away, or whose background worker died,
//! says so (503) and keeps serving.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{expect_problem, link_to, postgres_base, Setup};

#[tokio::test]
async fn readiness_follows_postgres_and_the_region_survives_its_loss() {
    let proxy = link_to("127.0.0.1:5432").await;
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

#[tokio::test]
async fn a_killed_worker_restarts_and_readiness_names_it_meanwhile() {
    let c = crate::helpers::cluster(&["eu", "us"]).await;
    let eu = c.region("eu").region.clone();
    assert_eq!(c.get_status("eu", "/readyz").await, StatusCode::OK);
    assert!(eu.supervisor.kill("publisher"));
    // Down until the supervisor restarts it (after half a second): /readyz says which worker.
    let mut named = None;
    for _ in 0..100 {
        let response = c
            .request("eu", Method::GET, "/readyz")
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            named = Some(expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let named = named.expect("/readyz answered 503 while the publisher was down");
    assert!(named.contains("publisher"), "{named}");
    crate::helpers::eventually(10, "the publisher runs again", || async {
        c.get_status("eu", "/readyz").await == StatusCode::OK
    })
    .await;
    let metrics = c.metrics("eu").await;
    assert!(
        metrics.contains("locus_worker_restarts_total{worker=\"publisher\"} 1"),
        "{metrics}"
    );
    // The restarted publisher ships writes again.
    assert_eq!(
        c.put("eu", "after", "k", &serde_json::json!(1))
            .await
            .status(),
        StatusCode::CREATED
    );
    crate::helpers::eventually(20, "the write replicates", || async {
        c.get("us", "after", "k").await.status() == StatusCode::OK
    })
    .await;
    c.teardown().await;
}
