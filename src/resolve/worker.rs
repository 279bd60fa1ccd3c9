//! The resolution worker: keeps every materialised resolution in step with the policies, bindings
//! and modules this region holds. It wakes when one of them changes (locally or by replication)
//! and once a second anyway, and resolves, in key order, the records with concurrent versions whose
//! resolution was made by another resolver or module, is missing, or is marked for a retry. The
//! marks live in the records' rows, so retries survive a restart.

use std::sync::Arc;
use std::time::Duration;

use super::{binding_of, compiled, resolve};
use crate::record::policy::Strategy;
use crate::service::Region;
use crate::storage::StorageError;

const PASS_INTERVAL: Duration = Duration::from_secs(1);
const PAGE: i64 = 100;

pub async fn run(region: Arc<Region>) {
    loop {
        if let Err(error) = pass(&region).await {
            tracing::warn!(region = %region.id(), %error, "resolution pass failed; trying again");
        }
        tokio::select! {
            _ = region.resolvers.changed.notified() => {}
            _ = tokio::time::sleep(PASS_INTERVAL) => {}
        }
    }
}

/// One pass over every collection whose strategy is a resolver. Returns how many records it
/// resolved.
pub async fn pass(region: &Region) -> Result<usize, StorageError> {
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
                let resolution = resolve(
                    region,
                    &collection,
                    &record.key,
                    &record.state,
                    &name,
                    record.resolution.as_ref(),
                )
                .await;
                if region
                    .store
                    .set_resolution(&collection, &record.key, record.rev, &resolution)
                    .await?
                {
                    resolved += 1;
                }
            }
        }
    }
    Ok(resolved)
}
