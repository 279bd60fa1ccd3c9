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

use serde_json::json;

use super::{binding_of, compiled, resolve};
use crate::record::policy::Strategy;
use crate::record::resolution::Resolution;
use crate::record::view::{materialized_view, pending_outcome};
use crate::record::{Home, RecordState, Version};
use crate::service::Region;
use crate::storage::apply::LoggedConflict;
use crate::storage::resolvers::Unresolved;
use crate::storage::StorageError;

const PASS_INTERVAL: Duration = Duration::from_secs(1);
const PAGE: i64 = 100;

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
pub async fn pass(region: &Region) -> Result<usize, StorageError> {
    let settled = settle_conflicts(region).await?;
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
            for record in &page {
                resolved += usize::from(resolve_record(region, record, &name, &settled).await?);
            }
        }
    }
    Ok(resolved)
}

/// One pass over what applies left pending, in every collection: the conflict-log entries
/// first, then the records, so a reader who sees a resolved value finds its conflict's outcome
/// too. Reads only those rows (partial indexes). Returns how many records it resolved.
pub async fn pass_left_to_resolve(region: &Region) -> Result<usize, StorageError> {
    let settled = settle_conflicts(region).await?;
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
        for record in &page {
            match strategies.get(&record.collection) {
                Some(Strategy::Resolver(name)) if record.state.versions.len() > 1 => {
                    resolved += usize::from(resolve_record(region, record, name, &settled).await?);
                }
                // The policy left the resolver, or a write superseded the concurrent versions:
                // nothing is left to resolve, and the mark would only be read again.
                _ => {
                    region
                        .store
                        .set_resolution(&record.collection, &record.key, record.rev, None)
                        .await?;
                }
            }
        }
    }
    Ok(resolved)
}

/// Per record, the versions of the newest conflict-log entry this pass settled and what the
/// resolver made of them: the record usually holds just those, and the call is not made twice.
type Settled = HashMap<(String, String), (Vec<Version>, Resolution)>;

/// Resolve one record and store the result if the record is still at the revision read.
async fn resolve_record(
    region: &Region,
    record: &Unresolved,
    name: &str,
    settled: &Settled,
) -> Result<bool, StorageError> {
    let known = settled
        .get(&(record.collection.clone(), record.key.clone()))
        .filter(|(versions, resolution)| {
            // A transient failure keeps the record's own previous view: not reusable.
            *versions == record.state.versions && resolution.resolver == name && !resolution.retry
        });
    let resolution = match known {
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
    };
    region
        .store
        .set_resolution(
            &record.collection,
            &record.key,
            record.rev,
            Some(&resolution),
        )
        .await
}

/// Give every pending conflict-log entry the outcome its resolver makes of the versions it
/// logged. A transient failure leaves it pending, with the failure as its error, for the next
/// pass.
async fn settle_conflicts(region: &Region) -> Result<Settled, StorageError> {
    let mut settled = Settled::new();
    let mut after = 0;
    loop {
        let page = region.store.conflicts_left_to_resolve(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(settled);
        };
        after = last.id;
        for entry in &page {
            if let Some(made) = settle_conflict(region, entry).await? {
                settled.insert((entry.collection.clone(), entry.key.clone()), made);
            }
        }
    }
}

/// Settle one entry; returns its versions and their resolution, if they decoded.
async fn settle_conflict(
    region: &Region,
    entry: &LoggedConflict,
) -> Result<Option<(Vec<Version>, Resolution)>, StorageError> {
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
            let error = format!("the logged versions do not decode: {error}");
            region
                .store
                .settle_conflict(
                    entry.id,
                    &json!({ "unresolved": true }),
                    &json!({ "name": name }),
                    Some(&error),
                )
                .await?;
            return Ok(None);
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
    region
        .store
        .settle_conflict(
            entry.id,
            &outcome,
            &json!({ "name": name, "sha256": resolution.sha256 }),
            resolution.error.as_deref(),
        )
        .await?;
    Ok(Some((versions, resolution)))
}
