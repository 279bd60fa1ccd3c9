//! Region and deployment settings: a TOML file (`regions/<id>.toml`) with every field overridable
//! by a `LOCUS_*` environment variable (`LOCUS_ADMIN_TOKEN`, `LOCUS_LISTEN`; nested fields with a
//! double underscore: `LOCUS_LIMITS__RECORD_BODY_BYTES`; peers as
//! `LOCUS_PEERS='[{id="us",api_url="http://..."}]'`).
//!
//! Why strict: a misspelt field in a region's config silently falling back to a default could
//! point a region at another region's database. Unknown fields are refused and every error names
//! the field it is about.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable does not fit the config's shape: every problem found,
    /// each naming its field and where the value came from.
    #[error("{0}")]
    Load(String),
    #[error("field {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// A token or password. `Debug` and `Display` print nothing of it, so neither a log line nor an
/// error message can leak it; [`Secret::expose`] is the one way to read it. It serializes as
/// itself: serializing is how a config is handed on, not how it is shown.
///
/// In a config it is the value itself, or `{ file = "/run/secrets/…" }`: the file's content without
/// its trailing line break, read at load, so secrets can come from files that a container platform
/// mounts instead of from environment variables that every process of the host may read.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Value(String),
            File { file: std::path::PathBuf },
        }
        match Given::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected the secret itself or { file = \"<path>\" }")
        })? {
            Given::Value(value) => Ok(Secret(value)),
            Given::File { file } => match std::fs::read_to_string(&file) {
                Ok(text) => Ok(Secret(text.trim_end_matches(['\n', '\r']).to_owned())),
                Err(e) => Err(serde::de::Error::custom(format!(
                    "cannot read secret file {}: {e}",
                    file.display()
                ))),
            },
        }
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A PostgreSQL URL, which may hold a password: it reads as the URL it is (`&str`), but shows
/// (`Debug`, `Display`) with the password replaced by `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL with its password, if any, hidden.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.clone();
        };
        let authority_end = url[scheme_end..]
            .find(['/', '?'])
            .map_or(url.len(), |i| scheme_end + i);
        match url[scheme_end..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &url[scheme_end..scheme_end + at];
                match userinfo.find(':') {
                    Some(colon) => format!(
                        "{}{}:***{}",
                        &url[..scheme_end],
                        &userinfo[..colon],
                        &url[scheme_end + at..]
                    ),
                    None => url.clone(),
                }
            }
            None => url.clone(),
        }
    }
}

impl std::ops::Deref for DatabaseUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for DatabaseUrl {
    fn from(value: &str) -> DatabaseUrl {
        DatabaseUrl(value.to_owned())
    }
}

impl From<String> for DatabaseUrl {
    fn from(value: String) -> DatabaseUrl {
        DatabaseUrl(value)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: String,
    /// Base URL of the peer's REST API, e.g. `http://127.0.0.1:7102`.
    pub api_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest record body accepted, in bytes.
    pub record_body_bytes: usize,
    /// Largest resolver module accepted, in bytes.
    pub module_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            record_body_bytes: 512 * 1024,
            module_body_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Forwarding {
    /// A peer that does not accept a connection within this is unreachable (nothing was sent).
    pub connect_timeout_ms: u64,
    /// A forwarded request without an answer within this has an unknown outcome: 504.
    pub request_timeout_ms: u64,
    /// `Retry-After` of a 503 when the home cannot take the write.
    pub retry_after_secs: u64,
    /// How often each peer's `/healthz` is probed ([`crate::peer_health`]); 0 turns probes off,
    /// leaving only what forwards meet.
    pub probe_interval_ms: u64,
}

impl Default for Forwarding {
    fn default() -> Forwarding {
        Forwarding {
            connect_timeout_ms: 1_000,
            request_timeout_ms: 5_000,
            retry_after_secs: 1,
            probe_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// A remote HLC further ahead of the wall clock than this does not advance the local clock.
    pub max_drift_ms: u64,
}

impl Default for ClockConfig {
    fn default() -> ClockConfig {
        ClockConfig {
            max_drift_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Replication {
    /// Largest size of this region's stream. JetStream reserves it against its storage limit; when
    /// the stream is full, new events wait in the outbox (nothing is dropped).
    pub stream_max_bytes: i64,
    /// Copies of the stream inside the region's NATS cluster (1 for a single server).
    pub stream_replicas: usize,
    /// Place each region's stream in the NATS cluster named after that region (a supercluster of
    /// one NATS cluster per region). Any region may create a peer's stream (a reader attaches as
    /// early as it can), so this must be the same in every region.
    pub streams_in_region_clusters: bool,
    /// How long a read with a session token waits for this region to apply the session's write
    /// before reading at the home instead.
    pub session_wait_ms: u64,
    /// How often the region's publisher sends a heartbeat through its stream (the promise
    /// bounded-staleness reads and the lag in `/v1/regions` rest on). At least 50.
    pub heartbeat_interval_ms: u64,
    /// How often the region looks for tombstones every region has applied, and removes them.
    /// At least 50.
    pub reclaim_interval_ms: u64,
}

impl Default for Replication {
    fn default() -> Replication {
        Replication {
            stream_max_bytes: 1024 * 1024 * 1024,
            stream_replicas: 1,
            streams_in_region_clusters: false,
            session_wait_ms: 500,
            heartbeat_interval_ms: 1000,
            reclaim_interval_ms: 10_000,
        }
    }
}

/// What a client token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Reads of records, collections, conflicts, resolvers and regions.
    Read,
    /// Reads, and writes and deletes of records.
    Write,
    /// Everything: policies, resolvers, dead letters, repair, retirement.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub token: Secret,
    pub scope: Scope,
}

/// How the region reaches NATS beyond `nats_url` ([`crate::replication::connection`]): TLS and
/// credentials. A `tls://` URL, `ca_file` or `cert_file` makes TLS required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// PEM CA certificates the NATS servers' certificates are checked against (instead of the
    /// system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for servers that verify clients (`verify: true`).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
    /// The region's NATS user, with `password`. Grant it only what `locus nats-permissions`
    /// prints for this region.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A `.creds` file (JWT and nkey seed), instead of `user` and `password`.
    pub credentials_file: Option<std::path::PathBuf>,
}

impl NatsSettings {
    pub fn wants_tls(&self, nats_url: &str) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || crate::app::nats_servers(nats_url)
                .iter()
                .any(|u| u.starts_with("tls://"))
    }
}

/// TLS of the region's own listener and of its calls to peers ([`crate::tls`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of this region's API. With `key_file`, the API serves HTTPS only.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
    /// PEM CA certificates trusted for `https` peers, besides Mozilla's roots (a private CA).
    pub peer_ca_file: Option<std::path::PathBuf>,
}

/// Anti-entropy rounds ([`crate::replication::repair`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepairConfig {
    /// Seconds between rounds against every peer (gaps and `POST /v1/regions/{peer}/repair`
    /// start one sooner).
    pub interval_secs: u64,
    /// Most records a round fetches per second, so repair never starves the region's writes.
    pub max_records_per_sec: u64,
}

impl Default for RepairConfig {
    fn default() -> RepairConfig {
        RepairConfig {
            interval_secs: 300,
            max_records_per_sec: 50_000,
        }
    }
}

/// Limits on each resolver call. Fuel, memory, table and output limits decide outcomes, so they
/// belong to the deployment: every region must use the same values (the engine fingerprint in
/// `/v1/regions` covers them). Wall time does not decide outcomes; it only bounds a stuck call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverLimits {
    /// Instructions (roughly) a call may run.
    pub fuel: u64,
    /// Largest linear memory of a call, in bytes.
    pub memory_bytes: usize,
    /// Largest table of a call, in elements.
    pub table_elements: usize,
    /// Largest output document, in bytes.
    pub output_bytes: usize,
    /// A call still running after this is interrupted and retried later.
    pub wall_time_ms: u64,
    /// Calls that may run at once (sandbox slots reserved at start).
    pub concurrent_calls: u32,
}

impl Default for ResolverLimits {
    fn default() -> ResolverLimits {
        ResolverLimits {
            fuel: 50_000_000,
            memory_bytes: 32 * 1024 * 1024,
            table_elements: 10_000,
            output_bytes: 1024 * 1024,
            wall_time_ms: 5_000,
            concurrent_calls: 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the installation; prefixes every NATS subject and stream.
    pub deployment: String,
    /// This region's id: lowercase letters, digits and '-', starting with a letter, at most 16.
    pub region: String,
    pub listen: String,
    /// The URL at which peers reach this region's API, announced to them when it joins
    /// ([`crate::membership`]); by default `http://` and the address it listens on, which serves
    /// only when that address is one the peers can reach (not `0.0.0.0`).
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// `postgres://…`; TLS settings as libpq has them: `?sslmode=verify-full&sslrootcert=<file>`.
    pub database_url: DatabaseUrl,
    #[serde(default = "default_pool_size")]
    pub database_pool_size: u32,
    /// The region's NATS: one URL, or several servers of its cluster, comma-separated.
    pub nats_url: String,
    /// Bearer token for policy and resolver changes.
    pub admin_token: Secret,
    /// Bearer token regions present to each other on forwarded requests.
    pub peer_token: Secret,
    /// Peer tokens accepted besides `peer_token`, so it can be rotated without downtime: add the
    /// new token here in every region, then make it `peer_token` everywhere (the old one moves
    /// here), then remove the old one.
    #[serde(default)]
    pub accepted_peer_tokens: Vec<Secret>,
    /// Bearer tokens of clients, each with its scope. With none, record endpoints are open (to
    /// whoever reaches the listener) and admin endpoints take `admin_token` alone.
    #[serde(default)]
    pub api_tokens: Vec<ApiToken>,
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub forwarding: Forwarding,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub replication: Replication,
    #[serde(default)]
    pub resolvers: ResolverLimits,
    #[serde(default)]
    pub repair: RepairConfig,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub nats: NatsSettings,
}

fn default_pool_size() -> u32 {
    16
}

const TOP_LEVEL_FIELDS: &[&str] = &[
    "deployment",
    "region",
    "listen",
    "advertise_url",
    "database_url",
    "database_pool_size",
    "nats_url",
    "admin_token",
    "peer_token",
    "accepted_peer_tokens",
    "api_tokens",
    "peers",
    "limits",
    "forwarding",
    "clock",
    "replication",
    "resolvers",
    "repair",
    "tls",
    "nats",
];

impl Config {
    /// Load `path`, then apply `LOCUS_*` overrides, then validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::file_exact(path)))
    }

    /// Build from a config value (tests and `locus dev`), still applying `LOCUS_*` overrides.
    pub fn from_value(config: &Config) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Serialized::defaults(config)))
    }

    fn from_figment(base: Figment) -> Result<Config, ConfigError> {
        // Only variables that name a config field: LOCUS_* variables of other tools (or of tests)
        // must not become unknown-field errors. figment filters after splitting, so a nested key
        // arrives as `LIMITS.RECORD_BODY_BYTES`.
        let env = Env::prefixed("LOCUS_").split("__").filter(|key| {
            let top = key.as_str().split('.').next().unwrap_or_default();
            TOP_LEVEL_FIELDS
                .iter()
                .any(|field| top.eq_ignore_ascii_case(field))
        });
        let config: Config = base
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Load(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_region_id("region", &self.region)?;
        if self.deployment.is_empty()
            || !self
                .deployment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "deployment",
                "must be non-empty ASCII letters, digits, '-' or '_'",
            ));
        }
        self.listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not host:port ({e})", self.listen),
            )
        })?;
        if let Some(url) = &self.advertise_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(invalid(
                    "advertise_url",
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
        }
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err(invalid("database_url", "must be a postgres:// URL"));
        }
        if self.database_pool_size == 0 {
            return Err(invalid("database_pool_size", "must be at least 1"));
        }
        if self.replication.heartbeat_interval_ms < 50 {
            return Err(invalid(
                "replication.heartbeat_interval_ms",
                "must be at least 50",
            ));
        }
        if self.replication.reclaim_interval_ms < 50 {
            return Err(invalid(
                "replication.reclaim_interval_ms",
                "must be at least 50",
            ));
        }
        if self.admin_token.expose().len() < 8 {
            return Err(invalid("admin_token", "must be at least 8 characters"));
        }
        if self.peer_token.expose().len() < 8 {
            return Err(invalid("peer_token", "must be at least 8 characters"));
        }
        if self
            .accepted_peer_tokens
            .iter()
            .any(|t| t.expose().len() < 8)
        {
            return Err(invalid(
                "accepted_peer_tokens",
                "each must be at least 8 characters",
            ));
        }
        if self.api_tokens.iter().any(|t| t.token.expose().len() < 8) {
            return Err(invalid(
                "api_tokens.token",
                "each must be at least 8 characters",
            ));
        }
        for url in crate::app::nats_servers(&self.nats_url) {
            if url.contains("://") && !url.starts_with("nats://") && !url.starts_with("tls://") {
                return Err(invalid(
                    "nats_url",
                    format!("{url:?}: the scheme must be nats:// or tls://"),
                ));
            }
        }
        let nats = &self.nats;
        if nats.user.is_some() != nats.password.is_some() {
            return Err(invalid(
                "nats.user",
                "nats.user and nats.password go together: set both, or neither",
            ));
        }
        if nats.user.is_some() && nats.credentials_file.is_some() {
            return Err(invalid(
                "nats.credentials_file",
                "give either nats.credentials_file or nats.user and nats.password, not both",
            ));
        }
        if nats.cert_file.is_some() != nats.key_file.is_some() {
            return Err(invalid(
                "nats.cert_file",
                "nats.cert_file and nats.key_file go together: set both, or neither",
            ));
        }
        for (index, peer) in self.peers.iter().enumerate() {
            validate_region_id("peers.id", &peer.id)?;
            if peer.id == self.region {
                return Err(invalid(
                    "peers.id",
                    format!("peer {:?} is this region itself", peer.id),
                ));
            }
            if self.peers[..index].iter().any(|p| p.id == peer.id) {
                return Err(invalid(
                    "peers.id",
                    format!("peer {:?} is listed twice", peer.id),
                ));
            }
            if !peer.api_url.starts_with("http://") && !peer.api_url.starts_with("https://") {
                return Err(invalid(
                    "peers.api_url",
                    format!("{:?} is not an http(s) URL", peer.api_url),
                ));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "tls.cert_file",
                "tls.cert_file and tls.key_file go together: set both to serve HTTPS, or neither",
            ));
        }
        if self.limits.record_body_bytes == 0 {
            return Err(invalid("limits.record_body_bytes", "must be positive"));
        }
        if self.replication.stream_max_bytes < 1024 * 1024 {
            return Err(invalid(
                "replication.stream_max_bytes",
                "must be at least 1 MiB",
            ));
        }
        if self.resolvers.fuel == 0 || self.resolvers.output_bytes == 0 {
            return Err(invalid(
                "resolvers",
                "fuel and output_bytes must be positive",
            ));
        }
        if self.resolvers.memory_bytes < 65_536 {
            return Err(invalid(
                "resolvers.memory_bytes",
                "must be at least one page (65536)",
            ));
        }
        if self.resolvers.concurrent_calls == 0 || self.resolvers.wall_time_ms < 10 {
            return Err(invalid(
                "resolvers",
                "concurrent_calls must be positive and wall_time_ms at least 10",
            ));
        }
        if self.limits.module_body_bytes == 0 {
            return Err(invalid("limits.module_body_bytes", "must be positive"));
        }
        if self.replication.stream_replicas == 0 {
            return Err(invalid("replication.stream_replicas", "must be at least 1"));
        }
        if self.forwarding.connect_timeout_ms == 0 || self.forwarding.request_timeout_ms == 0 {
            return Err(invalid("forwarding", "timeouts must be positive"));
        }
        Ok(())
    }

    /// The regions of this region's configuration: itself and the peers listed; the deployment
    /// may hold more ([`crate::membership`]).
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.region.as_str()).chain(self.peers.iter().map(|p| p.id.as_str()))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.forwarding.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.forwarding.request_timeout_ms)
    }
}

/// figment's own messages name a profile (`default.listen`), repeat themselves through their
/// source chain, and quote the environment provider in backticks; this names what an operator
/// edits instead: the field, and the file or variable that holds it.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let field = e.path.join(".");
            let from_file = e.metadata.as_ref().and_then(|m| match &m.source {
                Some(figment::Source::File(path)) => Some(shown_path(path)),
                _ => None,
            });
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let place = match (from_file, from_env) {
                (Some(file), _) => format!(" in {file}"),
                (None, true) => format!(
                    " (environment variable LOCUS_{})",
                    e.path.join("__").to_uppercase()
                ),
                (None, false) => String::new(),
            };
            let what = if field.is_empty() {
                "config".to_owned()
            } else {
                format!("field {field}")
            };
            format!("{what}{place}: {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A path as the user would write it: relative to the working directory when it is inside it.
fn shown_path(path: &Path) -> String {
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    relative
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// Region ids: lowercase letters, digits and '-', starting with a letter, at most 16.
pub fn validate_region_id(field: &'static str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 16
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{id:?} is not a region id (a-z, 0-9, '-', starting with a letter, at most 16)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::{Mutex, MutexGuard};

    /// Tests that read or set `LOCUS_*` variables run one at a time, each in a folder of its own,
    /// and leave no variable behind.
    struct Sandbox {
        dir: PathBuf,
        set: Vec<String>,
        _one_at_a_time: MutexGuard<'static, ()>,
    }

    static ENVIRONMENT: Mutex<()> = Mutex::new(());

    impl Sandbox {
        fn new() -> Sandbox {
            let guard = ENVIRONMENT
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let dir = std::env::temp_dir().join(format!(
                "locus-config-test-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Sandbox {
                dir,
                set: Vec::new(),
                _one_at_a_time: guard,
            }
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }

        fn set_env(&mut self, name: &str, value: &str) {
            std::env::set_var(name, value);
            self.set.push(name.to_owned());
        }
    }

    impl Drop for Sandbox {
        fn drop(&mut self) {
            for name in &self.set {
                std::env::remove_var(name);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const GOOD: &str = r#"
        deployment = "dev"
        region = "eu"
        listen = "127.0.0.1:7101"
        database_url = "postgres://postgres@127.0.0.1:5432/locus_dev_eu"
        nats_url = "nats://127.0.0.1:4222"
        admin_token = "dev-admin-token"
        peer_token = "dev-peer-token"
        [[peers]]
        id = "us"
        api_url = "http://127.0.0.1:7102"
    "#;

    /// Load `text` as a config file named region.toml; the error as the operator would read it.
    fn load(text: &str) -> Result<Config, String> {
        let sandbox = Sandbox::new();
        let path = sandbox.file("region.toml", text);
        Config::load(&path).map_err(|e| {
            e.to_string()
                .replace(&*path.to_string_lossy(), "region.toml")
        })
    }

    #[test]
    fn loads_a_good_file_with_defaults() {
        let config = load(GOOD).unwrap();
        assert_eq!(config.region, "eu");
        assert_eq!(config.limits.record_body_bytes, 512 * 1024);
        assert_eq!(config.regions().collect::<Vec<_>>(), ["eu", "us"]);
    }

    #[test]
    fn environment_variables_override_fields_nested_ones_included() {
        let mut sandbox = Sandbox::new();
        let path = sandbox.file("eu.toml", GOOD);
        sandbox.set_env("LOCUS_ADMIN_TOKEN", "from-the-environment");
        sandbox.set_env("LOCUS_LIMITS__RECORD_BODY_BYTES", "2048");
        sandbox.set_env("LOCUS_FORWARDING__REQUEST_TIMEOUT_MS", "750");
        sandbox.set_env(
            "LOCUS_PEERS",
            r#"[{id="ap",api_url="http://127.0.0.1:7103"}]"#,
        );
        sandbox.set_env("LOCUS_SOMETHING_ELSE", "not a config field: ignored");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.admin_token.expose(), "from-the-environment");
        assert_eq!(config.limits.record_body_bytes, 2048);
        assert_eq!(config.forwarding.request_timeout_ms, 750);
        assert_eq!(config.regions().collect::<Vec<_>>(), ["eu", "ap"]);

        sandbox.set_env("LOCUS_LIMITS__RECORD_BODY_BYTES", "lots");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "field limits.record_body_bytes (environment variable LOCUS_LIMITS__RECORD_BODY_BYTES): "
            ),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_region_files_load_and_agree() {
        let _no_overrides_meanwhile = Sandbox::new();
        // The compose deployment's fourth region (docker-compose.add-region.yml) lists the
        // three it joins; they do not list it.
        for (folder, regions) in [
            ("regions", &["eu", "us", "ap"][..]),
            ("regions/compose", &["eu", "us", "ap", "sa"][..]),
        ] {
            let mut fingerprints = Vec::new();
            for &region in regions {
                let path = format!("{}/{folder}/{region}.toml", env!("CARGO_MANIFEST_DIR"));
                let config =
                    Config::load(Path::new(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(config.region, region);
                let mut peers: Vec<&str> = config.regions().collect();
                peers.sort_unstable();
                let expected: &[&str] = if region == "sa" {
                    &["ap", "eu", "sa", "us"]
                } else {
                    &["ap", "eu", "us"]
                };
                assert_eq!(peers, expected, "{path}");
                if folder == "regions/compose" {
                    // Listening on every interface of a container: peers need the name (which
                    // its certificate holds).
                    let port = config.listen.rsplit(':').next().unwrap_or_default();
                    assert_eq!(
                        config.advertise_url,
                        Some(format!("https://locus-{region}:{port}")),
                        "{path}"
                    );
                }
                // What decides resolver outcomes and the deployment's name must agree everywhere.
                // Stream settings are the deployment's: one set, whichever region reads it.
                let streams = (
                    config.replication.stream_replicas,
                    config.replication.streams_in_region_clusters,
                );
                fingerprints.push((config.deployment.clone(), config.resolvers.clone(), streams));
            }
            assert!(
                fingerprints.iter().all(|f| *f == fingerprints[0]),
                "{folder}"
            );
        }
    }

    #[test]
    fn secrets_come_from_files_too() {
        let mut sandbox = Sandbox::new();
        let token = sandbox.file("admin-token", "from-a-file-token\n");
        let text = format!(
            "{GOOD}\n[nats]\nuser = \"eu\"\npassword = {{ file = {:?} }}\n",
            sandbox.file("nats-password", "nats-from-file")
        );
        let path = sandbox.file("eu.toml", &text);
        sandbox.set_env(
            "LOCUS_ADMIN_TOKEN",
            &format!("{{file={:?}}}", token.display().to_string()),
        );
        let config = Config::load(&path).unwrap();
        assert_eq!(config.admin_token.expose(), "from-a-file-token");
        assert_eq!(
            config.nats.password.as_ref().map(Secret::expose),
            Some("nats-from-file")
        );
        sandbox.set_env("LOCUS_ADMIN_TOKEN", "{file=\"/nonexistent/token\"}");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("admin_token")
                && err.contains("cannot read secret file /nonexistent/token"),
            "{err}"
        );
    }

    #[test]
    fn nats_settings_are_checked() {
        for (extra, field) in [
            ("[nats]\nuser = \"eu\"\n", "field nats.user"),
            (
                "[nats]\nuser = \"eu\"\npassword = \"pw\"\ncredentials_file = \"eu.creds\"\n",
                "field nats.credentials_file",
            ),
            ("[nats]\ncert_file = \"c.pem\"\n", "field nats.cert_file"),
        ] {
            let err = load(&format!("{GOOD}\n{extra}")).unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
        let err = load(&GOOD.replace("nats://127.0.0.1:4222", "ws://127.0.0.1:4222")).unwrap_err();
        assert!(err.starts_with("field nats_url"), "{err}");
        let config = load(&GOOD.replace("nats://", "tls://")).unwrap();
        assert!(config.nats.wants_tls(&config.nats_url));
    }

    #[test]
    fn secrets_never_show() {
        let mut config = load(GOOD).unwrap();
        config.admin_token = "admin-secret-1".into();
        config.peer_token = "peer-secret-2".into();
        config.api_tokens = vec![ApiToken {
            token: "api-secret-3".into(),
            scope: Scope::Read,
        }];
        config.nats.user = Some("eu".into());
        config.nats.password = Some("nats-secret-5".into());
        config.database_url =
            "postgres://locus:pg-secret-4@db.example:5432/locus_eu?sslmode=require".into();
        let shown = format!("{config:?} {} {}", config.database_url, config.admin_token);
        for secret in [
            "admin-secret-1",
            "peer-secret-2",
            "api-secret-3",
            "pg-secret-4",
            "nats-secret-5",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("postgres://locus:***@db.example:5432/locus_eu?sslmode=require"),
            "{shown}"
        );
        // They are still what the region uses.
        assert_eq!(config.admin_token.expose(), "admin-secret-1");
        assert!(config.database_url.contains("pg-secret-4"));
        let no_password: DatabaseUrl = "postgres://postgres@127.0.0.1:5432/db".into();
        assert_eq!(
            no_password.redacted(),
            "postgres://postgres@127.0.0.1:5432/db"
        );
    }

    #[test]
    fn a_certificate_needs_its_key() {
        let err = load(&format!("{GOOD}\n[tls]\ncert_file = \"cert.pem\"\n")).unwrap_err();
        assert!(err.starts_with("field tls.cert_file: "), "{err}");
        let config = load(&format!(
            "{GOOD}\n[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n"
        ))
        .unwrap();
        assert_eq!(config.tls.key_file, Some("key.pem".into()));
    }

    #[test]
    fn errors_name_the_bad_field() {
        let err = load(&GOOD.replace("127.0.0.1:7101", "nowhere")).unwrap_err();
        assert!(err.starts_with("field listen: "), "{err}");

        let err = load(&format!("{GOOD}\n[limits]\nrecord_body_bytes = \"big\"\n")).unwrap_err();
        // The field and the file as given, once, without figment's profile prefix.
        assert!(
            err.starts_with("field limits.record_body_bytes in region.toml: invalid type"),
            "{err}"
        );
        assert!(!err.contains("default."), "{err}");
        assert_eq!(err.matches("record_body_bytes").count(), 1, "{err}");

        let err =
            load(&GOOD.replace("region = \"eu\"", "region = \"eu\"\nregoin = \"us\"")).unwrap_err();
        assert!(err.contains("regoin"), "{err}");

        let err = load(&GOOD.replace("id = \"us\"", "id = \"eu\"")).unwrap_err();
        assert!(err.contains("peers.id"), "{err}");
    }
}
