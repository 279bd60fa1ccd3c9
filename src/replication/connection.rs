//! The region's connection to NATS: TLS, the region's own credentials and its own inbox prefix.
//!
//! Why a first attempt before the background retries: a NATS that is down must not stop a region
//! (the outbox holds its writes), but a NATS that refuses the region's password or certificate
//! will refuse it for ever. Retrying that silently would look like an outage; so the first attempt
//! tells the two apart, and a refusal stops the start with what was refused and why.
//!
//! Why an inbox prefix per region: JetStream delivers a pull consumer's events to the reply
//! subject of the fetch. With every region on `_INBOX.>`, any region allowed to subscribe there
//! could read another's deliveries; with `_INBOX.<deployment>.<region>` each region is granted
//! its own ([`super::permissions`]).

use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error("NATS at {url} refused this region's credentials ({who}): {cause}")]
    Refused {
        url: String,
        who: String,
        cause: String,
    },
    #[error("TLS with NATS at {url} failed: {cause}")]
    Tls { url: String, cause: String },
    #[error("NATS address {url}: {cause}")]
    Address { url: String, cause: String },
    #[error(transparent)]
    Files(#[from] crate::tls::TlsError),
    #[error("nats.credentials_file: {0}")]
    Credentials(String),
}

/// The subject prefix of this region's replies (JetStream API answers and pull deliveries).
pub fn inbox_prefix(deployment: &str, region: &str) -> String {
    format!("_INBOX.{deployment}.{region}")
}

/// Who the region presents itself as, for messages (never the secret).
fn identity(config: &Config) -> String {
    match (&config.nats.user, &config.nats.credentials_file) {
        (Some(user), _) => format!("user {user:?}"),
        (None, Some(file)) => format!("credentials {}", file.display()),
        (None, None) => "no credentials".to_owned(),
    }
}

async fn options(config: &Config) -> Result<ConnectOptions, NatsConnectError> {
    let nats = &config.nats;
    let region = config.region.clone();
    let mut options = ConnectOptions::new()
        .name(format!("locus-{}-{}", config.deployment, config.region))
        .custom_inbox_prefix(inbox_prefix(&config.deployment, &config.region))
        .connection_timeout(Duration::from_secs(2))
        // The servers in `nats_url` only: others a server gossips are named by addresses its
        // certificate need not hold, and are the same cluster's anyway.
        .ignore_discovered_servers()
        .event_callback(move |event| {
            let region = region.clone();
            async move {
                match event {
                    // A refused subscription or publish: the region's NATS permissions lack
                    // something it needs (or something tried what it must not).
                    async_nats::Event::ServerError(error) => {
                        tracing::error!(%region, %error, "NATS refused an operation")
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%region, "disconnected from NATS; reconnecting")
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(%region, "connected to NATS")
                    }
                    other => tracing::debug!(%region, event = %other, "NATS connection"),
                }
            }
        });
    if nats.wants_tls(&config.nats_url) {
        options = options.require_tls(true);
    }
    if let Some(ca_file) = &nats.ca_file {
        crate::tls::check_certificates("nats.ca_file", ca_file)?;
        options = options.add_root_certificates(ca_file.clone());
    }
    if let (Some(cert_file), Some(key_file)) = (&nats.cert_file, &nats.key_file) {
        crate::tls::check_certificates("nats.cert_file", cert_file)?;
        crate::tls::check_private_key("nats.key_file", key_file)?;
        options = options.add_client_certificate(cert_file.clone(), key_file.clone());
    }
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(file) = &nats.credentials_file {
        options = options
            .credentials_file(file)
            .await
            .map_err(|e| NatsConnectError::Credentials(format!("{}: {e}", file.display())))?;
    }
    Ok(options)
}

/// Connect the region to its NATS. `Ok((client, true))` when connected now; `Ok((client, false))`
/// when NATS did not answer, the client retrying in the background; an error when NATS answered
/// and refused the region (credentials, TLS) or the settings cannot work.
pub async fn connect(config: &Config) -> Result<(async_nats::Client, bool), NatsConnectError> {
    let servers = crate::app::nats_servers(&config.nats_url);
    let url = config.nats_url.clone();
    match options(config).await?.connect(servers.clone()).await {
        Ok(client) => Ok((client, true)),
        Err(error) => {
            let cause = crate::logging::chain(&error);
            if is_tls_failure(&error) {
                return Err(NatsConnectError::Tls { url, cause });
            }
            match error.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    Err(NatsConnectError::Refused {
                        url,
                        who: identity(config),
                        cause,
                    })
                }
                ConnectErrorKind::Tls => Err(NatsConnectError::Tls { url, cause }),
                ConnectErrorKind::ServerParse | ConnectErrorKind::Dns => {
                    Err(NatsConnectError::Address { url, cause })
                }
                ConnectErrorKind::TimedOut
                | ConnectErrorKind::Io
                | ConnectErrorKind::MaxReconnects => {
                    tracing::warn!(region = %config.region, %url, %cause, "NATS unreachable at start; writes wait in the outbox");
                    let client = options(config)
                        .await?
                        .retry_on_initial_connect()
                        .connect(servers)
                        .await
                        .map_err(|e| NatsConnectError::Address {
                            url: config.nats_url.clone(),
                            cause: crate::logging::chain(&e),
                        })?;
                    Ok((client, false))
                }
            }
        }
    }
}

/// Whether a failed connection failed in its TLS handshake: async-nats reports a certificate it
/// refused as an I/O error, with the rustls error inside.
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    if error.kind() == ConnectErrorKind::Tls {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        source = cause.source();
    }
    false
}
