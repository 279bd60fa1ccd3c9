//! User resolvers: WebAssembly modules that turn a record's concurrent versions into the value a
//! reader sees under the `resolver` strategy.
//!
//! A resolver is uploaded by name; the module is stored by sha256 and the name is bound to it by a
//! record of the system collection [`RESOLVER_COLLECTION`], so bindings replicate and merge like
//! policies. The module itself travels through the outbox in chunks. A resolution is a view,
//! computed by the [`worker`] after an apply changed a record's set of versions (a local write
//! always leaves one version), and again whenever a policy, binding or module changes; a read
//! never runs a resolver, and neither does an apply, which only marks the view pending.

pub mod abi;
pub mod wasm;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;
use utoipa::ToSchema;

use crate::clock::hlc::Hlc;
use crate::clock::version::VersionVector;
use crate::config::ResolverLimits;
use crate::record::policy::Strategy;
use crate::record::resolution::{Outcome, Resolution};
use crate::record::view::lww_winner;
use crate::record::{RecordState, Version};
use crate::replication::event::ModuleChunk;
use crate::service::{
    Precondition, Region, Route, ServiceError, WriteOp, WriteOutcome, WriteRequest,
};
use crate::storage::StorageError;
use wasm::{CallError, Compiled, ModuleError, Sandbox};

/// The system collection of name bindings: key = resolver name, value = [`Binding`].
pub const RESOLVER_COLLECTION: &str = "_resolvers";

/// Longest resolver name.
const MAX_NAME_BYTES: usize = 64;

/// What a resolver name is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Binding {
    /// The module's sha256, hex.
    pub sha256: String,
    /// The module's size in bytes.
    pub size: u64,
    pub abi: u32,
    /// Counts the uploads under this name that changed the module: 1 for the first.
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("resolver names are 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadName,
    #[error("{0}")]
    Module(#[from] ModuleError),
    #[error("no resolver named {0:?}")]
    NotFound(String),
    #[error("resolver {name:?} is the strategy of collection(s) {collections:?}; change their policy first")]
    InUse {
        name: String,
        collections: Vec<String>,
    },
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub fn validate_name(name: &str) -> Result<(), ResolverError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(()).ok_or(ResolverError::BadName)
}

/// The sha256 of module bytes, as lowercase hex: a module's name in storage and on the wire.
pub fn module_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The input of the trial call every upload must pass: two concurrent versions of an object.
pub fn trial_input() -> Vec<u8> {
    let version = |region: &str, hlc: u64, value| Version {
        value,
        deleted: false,
        region: region.into(),
        hlc: Hlc::from_u64(hlc),
        vector: VersionVector::from([(format!("{region}.00000000").as_str(), 1)]),
    };
    abi::encode_input(
        "trial",
        "trial",
        &[
            version("eu", 1, serde_json::json!({})),
            version("us", 2, serde_json::json!({})),
        ],
    )
}

struct Metrics {
    calls: IntCounterVec,
    seconds: HistogramVec,
    pending: IntGauge,
}

/// A region's resolver machinery: the sandbox, the slots calls wait for, and the worker's signal.
pub struct Resolvers {
    sandbox: Arc<Sandbox>,
    slots: Semaphore,
    metrics: Metrics,
    /// Bindings as resolutions last read them, for [`BINDING_TTL`]: an apply batch full of
    /// conflicts then reads each binding once. A stale entry costs nothing lasting: the worker
    /// redoes every resolution whose sha256 is not the current binding's.
    bindings: Mutex<HashMap<String, (Instant, Option<Binding>)>>,
    /// Wakes the worker: a policy, binding or module changed.
    pub changed: Notify,
    /// Wakes the worker: an apply changed a set of versions under a resolver and left its
    /// resolution (and conflict-log outcome) pending.
    pub left_to_resolve: Notify,
}

impl Resolvers {
    pub fn new(
        limits: &ResolverLimits,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Resolvers> {
        let calls = IntCounterVec::new(
            Opts::new(
                "locus_resolver_calls_total",
                "Resolver calls by result: ok, or the kind of failure",
            ),
            &["result"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new("locus_resolver_call_seconds", "Time of one resolver call").buckets(
                vec![0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.01, 0.1, 1.0],
            ),
            &["resolver"],
        )?;
        let pending = IntGauge::new(
            "locus_resolutions_pending",
            "Records whose concurrent versions wait for their resolver's (next) run: their reads show the previous view",
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        Ok(Resolvers {
            sandbox: Arc::new(Sandbox::new(limits)?),
            slots: Semaphore::new(limits.concurrent_calls as usize),
            metrics: Metrics {
                calls,
                seconds,
                pending,
            },
            bindings: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            left_to_resolve: Notify::new(),
        })
    }

    /// How many records wait for the worker, as last counted (per `/metrics` scrape).
    pub fn set_pending(&self, records: i64) {
        self.metrics.pending.set(records);
    }

    pub fn fingerprint(&self) -> &str {
        self.sandbox.fingerprint()
    }

    /// A binding changed here (a local write or an applied event).
    pub fn forget_binding(&self, name: &str) {
        self.bindings
            .lock()
            .expect("binding cache lock")
            .remove(name);
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Compile an upload off the async threads.
    async fn compile(&self, upload: Vec<u8>) -> Result<(Vec<u8>, Compiled), ModuleError> {
        let sandbox = self.sandbox.clone();
        tokio::task::spawn_blocking(move || sandbox.compile(&upload))
            .await
            .unwrap_or_else(|e| Err(ModuleError::NotWasm(format!("compiler crashed: {e}"))))
    }

    /// One call, in a sandbox slot, off the async threads.
    pub async fn call(
        &self,
        resolver: &str,
        compiled: Compiled,
        input: Vec<u8>,
    ) -> Result<Outcome, CallError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the slot semaphore is never closed");
        let sandbox = self.sandbox.clone();
        let started = Instant::now();
        // The call's own log lines (`locus.log`) go out in the caller's span.
        let span = tracing::Span::current();
        let result =
            tokio::task::spawn_blocking(move || span.in_scope(|| sandbox.call(&compiled, &input)))
                .await
                .unwrap_or_else(|e| Err(CallError::Busy(format!("call thread failed: {e}"))));
        self.metrics
            .seconds
            .with_label_values(&[resolver])
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "ok",
            Err(error) => error.kind(),
        };
        self.metrics.calls.with_label_values(&[label]).inc();
        if let Err(error) = &result {
            tracing::warn!(%resolver, %error, "resolver call failed");
        }
        result
    }
}

/// The binding of `name` in this region, if it is bound.
pub async fn binding_of(region: &Region, name: &str) -> Result<Option<Binding>, StorageError> {
    let loaded = region.store.load(RESOLVER_COLLECTION, name).await?;
    Ok(loaded.state.as_ref().and_then(binding_in))
}

const BINDING_TTL: Duration = Duration::from_secs(1);

/// The binding of `name`, from the short-lived cache of resolutions.
async fn current_binding(region: &Region, name: &str) -> Result<Option<Binding>, StorageError> {
    let cache = &region.resolvers.bindings;
    if let Some((at, binding)) = cache.lock().expect("binding cache lock").get(name) {
        if at.elapsed() < BINDING_TTL {
            return Ok(binding.clone());
        }
    }
    let binding = binding_of(region, name).await?;
    cache
        .lock()
        .expect("binding cache lock")
        .insert(name.to_owned(), (Instant::now(), binding.clone()));
    Ok(binding)
}

/// The binding a `_resolvers` record holds, unless deleted.
pub fn binding_in(state: &RecordState) -> Option<Binding> {
    let winner = lww_winner(state).filter(|v| !v.deleted)?;
    serde_json::from_value(winner.value.clone())
        .map_err(|error| tracing::warn!(%error, "stored resolver binding does not decode"))
        .ok()
}

/// Every bound resolver of this region, by name.
pub async fn bindings(region: &Region) -> Result<Vec<(String, Binding)>, StorageError> {
    Ok(region
        .store
        .list_all(RESOLVER_COLLECTION)
        .await?
        .into_iter()
        .filter_map(|(name, state)| binding_in(&state).map(|b| (name, b)))
        .collect())
}

/// The collections whose policy in this region names resolver `name`.
pub async fn collections_using(region: &Region, name: &str) -> Result<Vec<String>, StorageError> {
    let strategy = Strategy::Resolver(name.to_owned());
    Ok(region
        .policies()
        .await?
        .into_iter()
        .filter(|(_, policy)| policy.strategy() == strategy)
        .map(|(collection, _)| collection)
        .collect())
}

/// The compiled module with this sha256: from the process's cache, else compiled from storage.
/// `None` while this region does not hold the module in full.
pub async fn compiled(region: &Region, sha256: &str) -> Result<Option<Compiled>, StorageError> {
    let resolvers = &region.resolvers;
    if let Some(compiled) = resolvers.sandbox.cached(sha256) {
        return Ok(Some(compiled));
    }
    let Some(bytes) = region.store.module(sha256).await? else {
        return Ok(None);
    };
    match resolvers.compile(bytes).await {
        Ok((_, compiled)) => {
            resolvers.sandbox.remember(sha256, compiled.clone());
            Ok(Some(compiled))
        }
        Err(error) => {
            // It compiled where it was uploaded; here it does not (another build?). Nothing to run.
            tracing::error!(%sha256, %error, "a stored resolver module does not compile");
            Ok(None)
        }
    }
}

/// Resolve one record's concurrent versions with the resolver `name` as bound here. Never fails:
/// every failure is part of the resolution (deterministic ones as its error, with the view falling
/// back to last-writer-wins; transient ones keep `previous` and mark a retry).
pub async fn resolve(
    region: &Region,
    collection: &str,
    key: &str,
    versions: &[Version],
    name: &str,
    previous: Option<&Resolution>,
) -> Resolution {
    let kept = |sha256: String, error: String| Resolution {
        resolver: name.to_owned(),
        sha256,
        outcome: previous
            .filter(|p| p.resolver == name)
            .and_then(|p| p.outcome.clone()),
        error: Some(error),
        retry: true,
    };
    let binding = match current_binding(region, name).await {
        Ok(Some(binding)) => binding,
        Ok(None) => {
            return Resolution {
                resolver: name.to_owned(),
                sha256: String::new(),
                outcome: None,
                error: Some(format!(
                    "no resolver named {name:?} is bound in this region"
                )),
                retry: false,
            }
        }
        Err(error) => return kept(String::new(), format!("storage: {error}")),
    };
    let compiled = match compiled(region, &binding.sha256).await {
        Ok(Some(compiled)) => compiled,
        Ok(None) => {
            return kept(
                binding.sha256,
                "the module has not fully reached this region yet".into(),
            )
        }
        Err(error) => return kept(binding.sha256, format!("storage: {error}")),
    };
    let input = abi::encode_input(collection, key, versions);
    let span = tracing::info_span!("resolver", name = %name, %collection, %key);
    match region
        .resolvers
        .call(name, compiled, input)
        .instrument(span)
        .await
    {
        Ok(outcome) => Resolution {
            resolver: name.to_owned(),
            sha256: binding.sha256,
            outcome: Some(outcome),
            error: None,
            retry: false,
        },
        Err(error) if error.is_transient() => kept(binding.sha256, error.to_string()),
        Err(error) => Resolution {
            resolver: name.to_owned(),
            sha256: binding.sha256,
            outcome: None,
            error: Some(error.to_string()),
            retry: false,
        },
    }
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub name: String,
    pub binding: Binding,
    /// The name was unbound before, or bound to another module.
    pub changed: bool,
}

/// Validate an upload (compile, check the ABI's imports and exports, one trial call), store the
/// module with its chunk events, and bind `name` to it.
pub async fn upload(region: &Region, name: &str, body: Vec<u8>) -> Result<Uploaded, ResolverError> {
    validate_name(name)?;
    let resolvers = &region.resolvers;
    let (bytes, compiled) = resolvers.compile(body).await?;
    resolvers
        .call(name, compiled.clone(), trial_input())
        .await
        .map_err(ModuleError::TrialCall)?;
    let sha256 = module_sha256(&bytes);
    let chunks: Vec<Vec<u8>> = ModuleChunk::split(region.id(), &sha256, &bytes)
        .iter()
        .map(ModuleChunk::encode)
        .collect();
    let actor = region.actor().await?;
    if region
        .store
        .insert_module(&sha256, &bytes, &chunks, actor.as_str())
        .await?
    {
        region.outbox_signal.notify_one();
    }
    resolvers.sandbox.remember(&sha256, compiled);
    let previous = binding_of(region, name).await?;
    if let Some(binding) = previous.as_ref().filter(|b| b.sha256 == sha256) {
        return Ok(Uploaded {
            name: name.to_owned(),
            binding: binding.clone(),
            changed: false,
        });
    }
    let binding = Binding {
        sha256,
        size: bytes.len() as u64,
        abi: abi::ABI_VERSION,
        version: previous.map_or(1, |b| b.version + 1),
    };
    write_binding(
        region,
        name,
        WriteOp::Put(serde_json::to_value(&binding).expect("bindings serialize")),
    )
    .await?;
    Ok(Uploaded {
        name: name.to_owned(),
        binding,
        changed: true,
    })
}

/// Unbind `name`, unless a collection's policy here still names it.
pub async fn remove(region: &Region, name: &str) -> Result<Binding, ResolverError> {
    validate_name(name)?;
    let Some(binding) = binding_of(region, name).await? else {
        return Err(ResolverError::NotFound(name.to_owned()));
    };
    let collections = collections_using(region, name).await?;
    if !collections.is_empty() {
        return Err(ResolverError::InUse {
            name: name.to_owned(),
            collections,
        });
    }
    write_binding(region, name, WriteOp::Delete).await?;
    Ok(binding)
}

async fn write_binding(region: &Region, name: &str, op: WriteOp) -> Result<(), ResolverError> {
    let request = WriteRequest {
        idempotency: None,
        collection: RESOLVER_COLLECTION.to_owned(),
        key: name.to_owned(),
        op,
        precondition: Precondition::None,
        home_hint: None,
        route: Route::Client,
    };
    match region.write(&request).await? {
        WriteOutcome::Written(_) => {
            region.resolvers.changed.notify_one();
            Ok(())
        }
        WriteOutcome::Forward { home, .. } => Err(ServiceError::NotHome { home }.into()),
    }
}
