//! Collection policies: configure with the admin token, show, list.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{cluster, expect_problem};

#[tokio::test]
async fn policies_are_configured_shown_and_listed() {
    let c = cluster(&["eu", "us"]).await;
    let policy = json!({"homing": "anywhere", "conflicts": {"strategy": "siblings"}});
    let first = c.configure("eu", "carts", &policy).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["name"], "carts");
    assert_eq!(body["configured"], true);
    assert_eq!(body["policy"]["homing"], "anywhere");
    assert_eq!(
        body["policy"]["on_home_unreachable"], "reject",
        "omitted fields take their defaults"
    );

    let replaced = c
        .configure("eu", "carts", &json!({"default_home": "us"}))
        .await;
    assert_eq!(replaced.status(), StatusCode::OK);
    let shown: Value = c.get_json("eu", "/v1/collections/carts").await;
    assert_eq!(shown["policy"]["default_home"], "us");
    assert_eq!(
        shown["policy"]["homing"], "record",
        "a PUT replaces the whole policy"
    );

    // A collection that was never configured exists with the defaults once it has a record.
    expect_problem(
        c.request("eu", Method::GET, "/v1/collections/users")
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        c.put("eu", "users", "alice", &json!(1)).await.status(),
        StatusCode::CREATED
    );
    let users: Value = c.get_json("eu", "/v1/collections/users").await;
    assert_eq!(users["configured"], false);
    assert_eq!(users["policy"]["conflicts"]["strategy"], "lww");

    let list: Value = c.get_json("eu", "/v1/collections").await;
    let names: Vec<&str> = list["collections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["carts", "users"],
        "system collections are not listed"
    );

    // The policy is a versioned record: it replicates to us like data.
    crate::helpers::eventually(20, "the policy reaches us", || async {
        let shown = c.get_json("us", "/v1/collections/carts").await;
        shown["policy"]["default_home"] == "us" && shown["configured"] == true
    })
    .await;
    c.teardown().await;
}
