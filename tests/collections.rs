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

/// The keys a region lists in `collection`, in order.
async fn listed(c: &crate::helpers::Cluster, id: &str, collection: &str) -> Vec<String> {
    let page = c
        .get_json(
            id,
            &format!("/v1/collections/{collection}/records?limit=1000"),
        )
        .await;
    page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect()
}

/// Write `{"n": n}` to `key` of `doomed` at the region at `url`; the HLC the write was stamped with.
async fn write_stamped(http: &reqwest::Client, url: &str, key: &str, n: usize) -> u64 {
    let response = http
        .put(format!(
            "{url}{}",
            crate::helpers::record_path("doomed", key)
        ))
        .json(&json!({ "n": n }))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{key}: {}",
        response.status()
    );
    let body: Value = response.json().await.unwrap();
    body["hlc"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn deleting_a_collection_removes_what_was_written_before_it_everywhere_and_nothing_after() {
    let c = cluster(&["eu", "us", "ap"]).await;
    let ids = ["eu", "us", "ap"];
    assert!(c
        .configure("eu", "doomed", &json!({"homing": "anywhere"}))
        .await
        .status()
        .is_success());
    let mut stamped: Vec<(String, u64)> = Vec::new();
    for i in 0..30 {
        let key = format!("k{i:02}");
        stamped.push((
            key.clone(),
            write_stamped(&c.http, c.url(ids[i % 3]), &key, i).await,
        ));
    }
    for id in ids {
        crate::helpers::eventually(20, "every record reaches every region", || async {
            listed(&c, id, "doomed").await.len() == 30
        })
        .await;
    }

    // Only the admin deletes, and never a system collection.
    let anonymous = c
        .request("eu", Method::DELETE, "/v1/collections/doomed")
        .send()
        .await
        .unwrap();
    expect_problem(anonymous, StatusCode::UNAUTHORIZED).await;
    let reserved = c
        .request("eu", Method::DELETE, "/v1/collections/_collections")
        .bearer_auth(crate::helpers::ADMIN)
        .send()
        .await
        .unwrap();
    expect_problem(reserved, StatusCode::BAD_REQUEST).await;

    // us keeps writing new keys while eu deletes: each survives if and only if it was stamped
    // after the deletion's horizon, the same in every region.
    let writer = {
        let (http, url) = (c.http.clone(), c.url("us").to_owned());
        tokio::spawn(async move {
            let mut written = Vec::new();
            for n in 0..40 {
                let key = format!("w{n:02}");
                written.push((key.clone(), write_stamped(&http, &url, &key, n).await));
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            written
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let deleted = c
        .request("eu", Method::DELETE, "/v1/collections/doomed")
        .bearer_auth(crate::helpers::ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let body: Value = deleted.json().await.unwrap();
    let horizon: u64 = body["deleted_before"].as_str().unwrap().parse().unwrap();
    stamped.extend(writer.await.unwrap());
    // A record of the deleted collection written anew, after the deletion.
    stamped.push((
        "k00".into(),
        write_stamped(&c.http, c.url("ap"), "k00", 100).await,
    ));

    let mut survivors: Vec<String> = stamped
        .iter()
        .filter(|(_, hlc)| *hlc > horizon)
        .map(|(key, _)| key.clone())
        .collect();
    survivors.sort();
    survivors.dedup();
    assert!(survivors.contains(&"k00".to_owned()), "{survivors:?}");
    assert!(
        survivors.len() < stamped.len() - 30,
        "some concurrent writes came before the horizon: {survivors:?}"
    );
    for id in ids {
        crate::helpers::eventually(20, "every region lists exactly the survivors", || async {
            listed(&c, id, "doomed").await == survivors
        })
        .await;
        let read: Value = c.get_json(id, "/v1/collections/doomed/records/k00").await;
        assert_eq!(read["value"], json!({"n": 100}), "{id}");
        // The policy went with the deletion: the collection exists again only by its new records.
        let shown = c.get_json(id, "/v1/collections/doomed").await;
        assert_eq!(shown["configured"], false, "{id}: {shown}");
    }

    // An event of the old collection arriving late (a lagging stream, a repair) changes nothing.
    let late = locus::record::Version {
        value: json!({"late": true}),
        deleted: false,
        region: "ap".into(),
        hlc: locus::clock::hlc::Hlc::from_u64(horizon - 1),
        vector: locus::clock::version::VersionVector::from([("ap.00000000", 1)]),
    };
    let event = locus::replication::event::Event::new(
        "ap",
        "doomed",
        "late",
        locus::record::Home::new("ap"),
        late,
    );
    let us = c.region("us").region.clone();
    locus::replication::consumer::apply_batch(
        &us,
        "ap",
        &[locus::replication::event::Change::Record(event)],
        &[],
        &[],
    )
    .await
    .unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM records WHERE collection = 'doomed' AND key = 'late'",
    )
    .fetch_one(us.store.pool())
    .await
    .unwrap();
    assert_eq!(stored, 0, "the apply itself leaves the removed version out");
    assert_eq!(
        c.get("us", "doomed", "late").await.status(),
        StatusCode::NOT_FOUND
    );

    // The space is reclaimed: each region's rows are the survivors alone.
    for id in ids {
        let pool = c.region(id).region.store.pool().clone();
        let expected = survivors.len() as i64;
        crate::helpers::eventually(30, "the purge removes the deleted rows", || {
            let pool = pool.clone();
            async move {
                let rows: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = 'doomed'")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                rows == expected
            }
        })
        .await;
    }
    // Each region counted what its purge removed: at least the 30 first records, less any the
    // deletion left (k00 was written again).
    for id in ids {
        let metrics = c.metrics(id).await;
        let purged: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("locus_deleted_rows_purged_total "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(purged >= 29, "{id} purged {purged}");
    }
    c.teardown().await;
}
