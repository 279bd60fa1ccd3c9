//! Bad input: each case gets a 4xx problem document, writes nothing, and the region keeps serving.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{expect_problem, record_path, Cluster, Setup, ADMIN};
use locus::config::{ApiToken, Scope};

const LIMIT: usize = 1024;

async fn nothing_written(c: &Cluster) {
    let page: Value = c.get_json("eu", "/v1/collections").await;
    assert_eq!(
        page["collections"],
        json!([]),
        "no collection came into being"
    );
    let pool = c.region("eu").region.store.pool();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
}

#[tokio::test]
async fn bad_bodies_names_and_headers_are_refused_and_nothing_is_written() {
    let c = Setup::regions(&["eu"])
        .tweak(|config| config.limits.record_body_bytes = LIMIT)
        .start()
        .await;
    let path = record_path("c", "k");
    let put = |path: &str| c.request("eu", Method::PUT, path);

    // Malformed JSON, a non-JSON content type, no content type.
    let r = put(&path)
        .header("content-type", "application/json")
        .body("{\"a\":")
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::BAD_REQUEST).await;
    let r = put(&path)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let r = put(&path).body("{}").send().await.unwrap();
    expect_problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    // A body over the limit, declared or streamed; at the limit it would be accepted.
    let big = format!("\"{}\"", "x".repeat(LIMIT - 1));
    let r = put(&path)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let detail = expect_problem(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(detail.contains(&LIMIT.to_string()), "{detail}");
    let chunks = streamed(vec![vec![b'"'; 1], vec![b'y'; LIMIT + 10], vec![b'"'; 1]]);
    let r = put(&path)
        .header("content-type", "application/json")
        .body(chunks)
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::PAYLOAD_TOO_LARGE).await;

    // Names: empty, too long, control characters, reserved.
    let long = "k".repeat(513);
    for bad in [
        format!("/v1/collections/c/records/{long}"),
        format!("/v1/collections/{long}/records/k"),
        "/v1/collections/c/records/a%0Ab".to_owned(),
        "/v1/collections/c%07/records/k".to_owned(),
        "/v1/collections/_collections/records/k".to_owned(),
        "/v1/collections/c/records/%FF".to_owned(),
    ] {
        let r = put(&bad).json(&json!(1)).send().await.unwrap();
        expect_problem(r, StatusCode::BAD_REQUEST).await;
    }
    // An empty collection is named as such; an empty key matches no route.
    let r = put("/v1/collections//records/k")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    let detail = expect_problem(r, StatusCode::BAD_REQUEST).await;
    assert!(detail.contains("collection must not be empty"), "{detail}");
    let r = put("/v1/collections/c/records/")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::NOT_FOUND).await;
    let r = put(&format!("/v1/collections/c/records/{}", "k".repeat(512)))
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "512 bytes is allowed");
    c.delete("eu", "c", &"k".repeat(512)).await;
    sqlx::query("TRUNCATE records, outbox")
        .execute(c.region("eu").region.store.pool())
        .await
        .unwrap();

    // Headers: unknown Locus-Home region, malformed If-Match, If-None-Match other than *.
    let r = put(&path)
        .header("locus-home", "mars")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    let detail = expect_problem(r, StatusCode::BAD_REQUEST).await;
    assert!(detail.contains("mars"), "{detail}");
    for tag in ["unquoted", "\"!!not base64!!\"", "\"WzFd\""] {
        let r = put(&path)
            .header("if-match", tag)
            .json(&json!(1))
            .send()
            .await
            .unwrap();
        expect_problem(r, StatusCode::BAD_REQUEST).await;
    }
    let r = put(&path)
        .header("if-none-match", "\"abc\"")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::BAD_REQUEST).await;
    let r = c
        .request("eu", Method::GET, &path)
        .header("locus-session", "garbage")
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::BAD_REQUEST).await;

    nothing_written(&c).await;
    assert_eq!(c.get_status("eu", "/healthz").await, StatusCode::OK);
    c.teardown().await;
}

/// A streamed body with no declared length.
fn streamed(chunks: Vec<Vec<u8>>) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, std::io::Error>),
    ))
}

#[tokio::test]
async fn bad_policies_tokens_and_listing_parameters_are_refused() {
    let c = Setup::regions(&["eu"]).start().await;
    let configure = |token: Option<&str>, body: &str| {
        let mut r = c
            .request("eu", Method::PUT, "/v1/collections/carts")
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    expect_problem(
        configure(None, "{}").await.unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    expect_problem(
        configure(Some("wrong-token"), "{}").await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    let r = c
        .request("eu", Method::PUT, "/v1/collections/carts")
        .header("authorization", "Basic abc")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_problem(r, StatusCode::UNAUTHORIZED).await;
    for bad in [
        r#"{"homing":"record","colour":"red"}"#,
        r#"{"homing":"sometimes"}"#,
        r#"{"conflicts":{"strategy":"coin-flip"}}"#,
        r#"{"default_home":"mars"}"#,
        r#"{"conflicts":{"strategy":"resolver","resolver":"none-such"}}"#,
        r#"{"on_home_unreachable":"accept_local""#,
        r#"[]"#,
    ] {
        let detail = expect_problem(
            configure(Some(crate::helpers::ADMIN), bad).await.unwrap(),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(!detail.is_empty());
    }
    expect_problem(
        c.request("eu", Method::GET, "/v1/collections/carts")
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;

    // Listing: a tampered cursor, a cursor from another prefix, a bad limit, an unknown parameter.
    for i in 0..3 {
        c.put("eu", "items", &format!("k{i}"), &json!(i)).await;
    }
    let page: Value = c
        .get_json("eu", "/v1/collections/items/records?limit=1")
        .await;
    let cursor = page["next"].as_str().unwrap().to_owned();
    let ok = c
        .request(
            "eu",
            Method::GET,
            &format!("/v1/collections/items/records?limit=1&cursor={cursor}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let (key_part, tag) = cursor.split_once('.').unwrap();
    let tampered = format!(
        "{}.{tag}",
        if key_part.ends_with('A') {
            key_part.replace('A', "B")
        } else {
            format!("{key_part}A")
        }
    );
    for query in [
        format!("cursor={tampered}"),
        format!("cursor={cursor}&prefix=k"),
        "cursor=nonsense".to_owned(),
        "limit=0".to_owned(),
        "limit=100000".to_owned(),
        "limit=ten".to_owned(),
        "colour=red".to_owned(),
    ] {
        let r = c
            .request(
                "eu",
                Method::GET,
                &format!("/v1/collections/items/records?{query}"),
            )
            .send()
            .await
            .unwrap();
        expect_problem(r, StatusCode::BAD_REQUEST).await;
    }
    assert_eq!(c.get_status("eu", "/healthz").await, StatusCode::OK);
    c.teardown().await;
}

#[tokio::test]
async fn api_tokens_grant_their_scope_and_no_more() {
    let c = Setup::regions(&["eu"])
        .tweak(|config| {
            config.api_tokens = vec![
                ApiToken {
                    token: "reader-token".into(),
                    scope: Scope::Read,
                },
                ApiToken {
                    token: "writer-token".into(),
                    scope: Scope::Write,
                },
                ApiToken {
                    token: "second-writer".into(),
                    scope: Scope::Write,
                },
            ]
        })
        .start()
        .await;
    let put = |token: Option<&'static str>, key: &'static str| {
        let mut request = c
            .request("eu", Method::PUT, &record_path("c", key))
            .json(&json!(1));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    expect_problem(put(None, "k").await.unwrap(), StatusCode::UNAUTHORIZED).await;
    expect_problem(
        put(Some("nope-nope"), "k").await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    // A read-scoped token reads but cannot write.
    expect_problem(
        put(Some("reader-token"), "k").await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    for writer in ["writer-token", "second-writer"] {
        assert_eq!(
            put(Some(writer), writer).await.unwrap().status(),
            StatusCode::CREATED
        );
    }
    let read = |token: &'static str| {
        c.request("eu", Method::GET, &record_path("c", "writer-token"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(read("reader-token").await.unwrap().status(), StatusCode::OK);
    assert_eq!(read("writer-token").await.unwrap().status(), StatusCode::OK);
    expect_problem(
        c.get("eu", "c", "writer-token").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // Neither may change a policy: that takes admin scope (the admin token here).
    for token in ["reader-token", "writer-token"] {
        let r = c
            .request("eu", Method::PUT, "/v1/collections/c")
            .bearer_auth(token)
            .json(&json!({"conflicts": {"strategy": "siblings"}}))
            .send()
            .await
            .unwrap();
        expect_problem(r, StatusCode::FORBIDDEN).await;
    }
    let admin = c
        .request("eu", Method::PUT, "/v1/collections/c")
        .bearer_auth(ADMIN)
        .json(&json!({"conflicts": {"strategy": "siblings"}}))
        .send()
        .await
        .unwrap();
    assert!(admin.status().is_success(), "{}", admin.status());
    // Health endpoints stay open for load balancers.
    assert_eq!(c.get_status("eu", "/readyz").await, StatusCode::OK);
    c.teardown().await;
}
