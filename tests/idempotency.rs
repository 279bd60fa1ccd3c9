//! `Idempotency-Key`: a write whose answer was lost can be sent again, to any region, and gets the
//! first outcome instead of writing twice.

use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{eventually, expect_problem, header, record_path, Cluster, Setup};

async fn put_with_key(
    c: &Cluster,
    id: &str,
    key: &str,
    idempotency: &str,
    value: &Value,
) -> Response {
    c.request(id, Method::PUT, &record_path("orders", key))
        .header("Idempotency-Key", idempotency)
        .header("Locus-Home", "eu")
        .json(value)
        .send()
        .await
        .unwrap()
}

/// How many writes made the record's versions: the sum of its version vector's counters.
async fn writes_behind(c: &Cluster, id: &str, key: &str) -> u64 {
    let body: Value = c.get(id, "orders", key).await.json().await.unwrap();
    body["version"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"))
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn a_retried_write_with_the_same_key_is_answered_not_written_again_in_any_region() {
    let c = Setup::regions(&["eu", "us", "ap"]).start().await;

    // Written at us, forwarded to the home eu; the retry goes to ap, which forwards it too.
    let first = put_with_key(&c, "us", "o1", "key-o1", &json!({"qty": 1})).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(header(&first, "idempotent-replayed"), None);
    let first_etag = header(&first, "etag").unwrap().to_owned();
    let first_body: Value = first.json().await.unwrap();
    for retry_at in ["ap", "eu", "us"] {
        let again = put_with_key(&c, retry_at, "o1", "key-o1", &json!({"qty": 1})).await;
        assert_eq!(
            again.status(),
            StatusCode::CREATED,
            "the first outcome, at {retry_at}"
        );
        assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
        assert_eq!(header(&again, "etag"), Some(first_etag.as_str()));
        assert!(header(&again, "locus-session").is_some());
        assert_eq!(again.json::<Value>().await.unwrap(), first_body);
    }
    assert_eq!(writes_behind(&c, "eu", "o1").await, 1);

    // A later write changes the record; a retry of the first still answers what it did then.
    let later = c.put("eu", "orders", "o1", &json!({"qty": 5})).await;
    assert_eq!(later.status(), StatusCode::OK);
    let replay = put_with_key(&c, "eu", "o1", "key-o1", &json!({"qty": 1})).await;
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.json::<Value>().await.unwrap(), first_body);
    let now: Value = c.get("eu", "orders", "o1").await.json().await.unwrap();
    assert_eq!(now["value"], json!({"qty": 5}), "the replay wrote nothing");

    // The same key on a different request is refused; a malformed key too.
    let reused = put_with_key(&c, "eu", "o1", "key-o1", &json!({"qty": 2})).await;
    expect_problem(reused, StatusCode::UNPROCESSABLE_ENTITY).await;
    let reused_elsewhere = put_with_key(&c, "eu", "o2", "key-o1", &json!({"qty": 1})).await;
    expect_problem(reused_elsewhere, StatusCode::UNPROCESSABLE_ENTITY).await;
    let long = "k".repeat(256);
    for bad in [long.as_str(), "with space"] {
        let response = put_with_key(&c, "eu", "o3", bad, &json!({})).await;
        expect_problem(response, StatusCode::BAD_REQUEST).await;
    }

    // A delete retried answers 204 again instead of 404, and deletes once.
    let delete = |at: &'static str| {
        c.request(at, Method::DELETE, &record_path("orders", "o1"))
            .header("Idempotency-Key", "key-o1-delete")
            .send()
    };
    assert_eq!(delete("eu").await.unwrap().status(), StatusCode::NO_CONTENT);
    let again = delete("us").await.unwrap();
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
    let plain = c.delete("eu", "orders", "o1").await;
    assert_eq!(
        plain.status(),
        StatusCode::NOT_FOUND,
        "without a key, a second delete finds nothing"
    );

    // Many copies of one request at once: one write, one outcome for all of them.
    let copies: Vec<_> = (0..8)
        .map(|i| {
            let at = ["eu", "us", "ap"][i % 3];
            c.request(at, Method::PUT, &record_path("orders", "o4"))
                .header("Idempotency-Key", "key-o4")
                .header("Locus-Home", "eu")
                .json(&json!({"qty": 4}))
                .send()
        })
        .collect();
    let mut answers = Vec::new();
    for response in futures_util::future::join_all(copies).await {
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(writes_behind(&c, "eu", "o4").await, 1);

    eventually(20, "every region holds o4 as written once", || async {
        let mut once = true;
        for id in ["us", "ap"] {
            once &= c.get(id, "orders", "o4").await.status() == StatusCode::OK
                && writes_behind(&c, id, "o4").await == 1;
        }
        once
    })
    .await;
    c.teardown().await;
}
