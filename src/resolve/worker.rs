//! The resolution worker: the only place resolvers run on stored records.
//!
//! An apply that changes a record's set of versions under a resolver does not run the module: it
//! keeps the view readers had, marked pending (a resolution with `retry`), logs the conflict with
//! a pending outcome, and wakes this worker after its commit. The worker runs the module and
//! stores the result by compare-and-swap on the record's revision, so a slow module never holds
//! the apply's lock or its row locks, and a set that changed meanwhile is simply resolved again.
//!
//! It also keeps every materialised resolution in step with the policies, bindings and modules
//! this region holds: when one of them changes (locally or by replication), and once a second
//! anyway, it resolves, in key order, the records with concurrent versions whose resolution was
//! made by another resolver or module, is missing, or is marked pending. The marks live in the
//! records' rows and the conflict log, so they survive a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use super::{binding_of, compiled, resolve};
use crate::record::policy::Strategy;
use crate::record::resolution::Resolution;
use crate::record::view::{materialized_view, pending_outcome};
use crate::record::{Home, RecordState, Version};
use crate::service::Region;
use crate::storage::apply::{LoggedConflict, SettledConflict};
use crate::storage::resolvers::{ResolutionUpdate, Unresolved};
use crate::storage::StorageError;

const PASS_INTERVAL: Duration = Duration::from_secs(1);
const PAGE: i64 = 100;
/// Resolver calls of one page in flight at once (the sandbox's slots bound them further): the
/// calls run on blocking threads, so a page uses the cores PostgreSQL leaves free.
const CALLS_AT_ONCE: usize = 4;

pub async fn run(region: Arc<Region>) {
    let mut every_collection = true;
    loop {
        let result = if every_collection {
            pass(&region).await
        } else {
            pass_left_to_resolve(&region).await
        };
        if let Err(error) = result {
            tracing::warn!(region = %region.id(), %error, "resolution pass failed; trying again");
        }
        every_collection = tokio::select! {
            _ = region.resolvers.changed.notified() => true,
            _ = region.resolvers.left_to_resolve.notified() => false,
            _ = tokio::time::sleep(PASS_INTERVAL) => true,
        };
    }
}

/// One pass over every collection whose strategy is a resolver, after the pending conflict-log
/// entries. Returns how many records it resolved.
pub async fn pass(region: &Region) -> Result<u64, StorageError> {
    let mut settled = Settled::default();
    settle_conflicts(region, &mut settled).await?;
    let mut resolved = 0;
    for (collection, policy) in region.policies().await? {
        let Strategy::Resolver(name) = policy.strategy() else {
            continue;
        };
        let sha256 = match binding_of(region, &name).await? {
            // Without its module in full, nothing can be resolved yet: wait for it.
            Some(binding) if compiled(region, &binding.sha256).await?.is_none() => continue,
            Some(binding) => binding.sha256,
            None => String::new(),
        };
        let mut after = String::new();
        loop {
            let page = region
                .store
                .unresolved(&collection, &name, &sha256, &after, PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.key.clone();
            settle_conflicts(region, &mut settled).await?;
            let calls: Vec<_> = page
                .iter()
                .map(|record| resolved_record(region, record, Some(&name), &settled))
                .collect();
            let updates = in_order(calls).await;
            resolved += region.store.set_resolutions(&updates).await?;
        }
    }
    Ok(resolved)
}

/// One pass over what applies left pending, in every collection: the conflict-log entries
/// first, then the records, so a reader who sees a resolved value finds its conflict's outcome
/// too. Reads only those rows (partial indexes). Returns how many records it resolved.
pub async fn pass_left_to_resolve(region: &Region) -> Result<u64, StorageError> {
    let mut settled = Settled::default();
    settle_conflicts(region, &mut settled).await?;
    let strategies: HashMap<String, Strategy> = region
        .policies()
        .await?
        .into_iter()
        .map(|(collection, policy)| (collection, policy.strategy()))
        .collect();
    let mut resolved = 0;
    let mut after = (String::new(), String::new());
    loop {
        let page = region
            .store
            .left_to_resolve((&after.0, &after.1), PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = (last.collection.clone(), last.key.clone());
        settle_conflicts(region, &mut settled).await?;
        let calls: Vec<_> = page
            .iter()
            .map(|record| {
                let name = match strategies.get(&record.collection) {
                    Some(Strategy::Resolver(name)) if record.state.versions.len() > 1 => {
                        Some(name.as_str())
                    }
                    // The policy left the resolver, or a write superseded the concurrent
                    // versions: nothing is left to resolve, and the mark would only be read
                    // again.
                    _ => None,
                };
                resolved_record(region, record, name, &settled)
            })
            .collect();
        let updates = in_order(calls).await;
        resolved += region.store.set_resolutions(&updates).await?;
    }
    Ok(resolved)
}

/// Run `calls`, up to [`CALLS_AT_ONCE`] at a time, and give their results in order.
async fn in_order<F: std::future::Future>(calls: Vec<F>) -> Vec<F::Output> {
    futures_util::stream::iter(calls)
        .buffered(CALLS_AT_ONCE)
        .collect()
        .await
}

/// What a pass has settled of the conflict log.
#[derive(Default)]
struct Settled {
    /// Per record, the versions of the newest entry settled and what the resolver made of them:
    /// the record usually holds just those, and the call is not made twice.
    made: HashMap<(String, String), (Vec<Version>, Resolution)>,
    /// The last entry id gone through. Entries are only added by applies, which hold the apply
    /// lock until they commit, so ids grow in commit order and none appears behind this; an entry
    /// a transient failure left pending is tried again by the next pass, not on every page.
    through: i64,
}

/// What resolver `name` makes of one record (no resolution without a name), to be stored if the
/// record is still at the revision read.
async fn resolved_record(
    region: &Region,
    record: &Unresolved,
    name: Option<&str>,
    settled: &Settled,
) -> ResolutionUpdate {
    let resolution = match name {
        None => None,
        Some(name) => {
            let known = settled
                .made
                .get(&(record.collection.clone(), record.key.clone()))
                .filter(|(versions, resolution)| {
                    // A transient failure keeps the record's own previous view: not reusable.
                    *versions == record.state.versions
                        && resolution.resolver == name
                        && !resolution.retry
                });
            Some(match known {
                Some((_, resolution)) => resolution.clone(),
                None => {
                    resolve(
                        region,
                        &record.collection,
                        &record.key,
                        &record.state.versions,
                        name,
                        record.resolution.as_ref(),
                    )
                    .await
                }
            })
        }
    };
    ResolutionUpdate {
        collection: record.collection.clone(),
        key: record.key.clone(),
        rev: record.rev,
        resolution,
    }
}

/// Give every pending conflict-log entry the outcome its resolver makes of the versions it
/// logged, adding what it made to `settled`. A transient failure leaves it pending, with the
/// failure as its error, for the next pass.
///
/// Called again after each page of records is read, before their resolutions are stored: an
/// apply commits a record's pending mark and its conflict entry together, so every entry of a
/// record on the page is visible by then, even one committed after the pass began. A reader who
/// sees a record's new view therefore always finds its conflict's outcome filled in. When
/// nothing is pending this costs one indexed query.
async fn settle_conflicts(region: &Region, settled: &mut Settled) -> Result<(), StorageError> {
    loop {
        let page = region
            .store
            .conflicts_left_to_resolve(settled.through, PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        settled.through = last.id;
        let made = in_order(
            page.iter()
                .map(|entry| settle_conflict(region, entry))
                .collect(),
        )
        .await;
        let mut rows = Vec::with_capacity(made.len());
        for (entry, (row, resolved)) in page.iter().zip(made) {
            rows.push(row);
            if let Some(resolved) = resolved {
                settled
                    .made
                    .insert((entry.collection.clone(), entry.key.clone()), resolved);
            }
        }
        region.store.settle_conflicts(&rows).await?;
    }
}

/// What one entry's resolver makes of its versions, and those versions with their resolution
/// if they decoded.
async fn settle_conflict(
    region: &Region,
    entry: &LoggedConflict,
) -> (SettledConflict, Option<(Vec<Version>, Resolution)>) {
    let name = entry
        .resolver
        .as_ref()
        .and_then(|r| r["name"].as_str())
        .unwrap_or_default()
        .to_owned();
    let versions: Vec<Version> = match serde_json::from_value(entry.versions.clone()) {
        Ok(versions) => versions,
        Err(error) => {
            tracing::error!(id = entry.id, %error, "a pending conflict-log entry's versions do not decode; left unresolved");
            let settled = SettledConflict {
                id: entry.id,
                outcome: json!({ "unresolved": true }),
                resolver: json!({ "name": name }),
                error: Some(format!("the logged versions do not decode: {error}")),
            };
            return (settled, None);
        }
    };
    let resolution = resolve(
        region,
        &entry.collection,
        &entry.key,
        &versions,
        &name,
        None,
    )
    .await;
    let outcome = if resolution.retry {
        pending_outcome()
    } else {
        let state = RecordState {
            home: Home::new(entry.region.as_str()),
            versions: versions.clone(),
        };
        materialized_view(&state, &Strategy::Resolver(name.clone()), Some(&resolution))
            .logged_outcome()
    };
    let settled = SettledConflict {
        id: entry.id,
        outcome,
        resolver: json!({ "name": name, "sha256": resolution.sha256 }),
        error: resolution.error.clone(),
    };
    (settled, Some((versions, resolution)))
}
