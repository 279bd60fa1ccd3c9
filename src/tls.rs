//! TLS for every connection that leaves a process: PostgreSQL (sqlx), peers (reqwest), NATS
//! (async-nats) and the region's own listener all use rustls, with one crypto provider (ring)
//! installed once at start, so no library picks another and none needs OpenSSL.
//!
//! PostgreSQL takes its TLS settings in the URL, as libpq does: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`) and `sslrootcert` for a private CA. Peers are `https`
//! URLs, checked against Mozilla's roots and `tls.peer_ca_file`; the region serves HTTPS itself
//! when `tls.cert_file` and `tls.key_file` are set. NATS is reached over TLS with a `tls://` URL or
//! the `nats` table's `ca_file` and client certificate ([`crate::replication::connection`]).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {path}: {cause}")]
    Unreadable {
        field: &'static str,
        path: String,
        cause: String,
    },
    #[error("{field}: {path} holds no PEM {what}")]
    Empty {
        field: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("tls.cert_file and tls.key_file do not make a server certificate: {0}")]
    Server(String),
}

/// Install the process's rustls crypto provider (ring). Idempotent: later calls keep the first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        field,
        path: path.display().to_string(),
        cause: e.to_string(),
    })
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            field,
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certificates)
}

/// Fail at start, naming the field, when `path` holds no PEM certificate: what a library given
/// the path would otherwise report only at its first connection, without the field.
pub fn check_certificates(field: &'static str, path: &Path) -> Result<(), TlsError> {
    certificates(field, path).map(|_| ())
}

/// As [`check_certificates`], for a PEM private key.
pub fn check_private_key(field: &'static str, path: &Path) -> Result<(), TlsError> {
    private_key(field, path).map(|_| ())
}

fn private_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(field, path)?).map_err(|_| TlsError::Empty {
        field,
        path: path.display().to_string(),
        what: "private key",
    })
}

/// The HTTPS settings of the region's listener, if its config asks for HTTPS.
pub fn server_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&config.tls.cert_file, &config.tls.key_file) else {
        return Ok(None);
    };
    let chain = certificates("tls.cert_file", cert_file)?;
    let key = private_key("tls.key_file", key_file)?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Server(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// What calls to peers trust: Mozilla's roots and the CAs of `tls.peer_ca_file`, read once at
/// start. The one place peer clients get their trust from.
#[derive(Clone, Default)]
pub struct PeerTrust {
    authorities: Vec<reqwest::Certificate>,
}

impl PeerTrust {
    pub fn load(config: &Config) -> Result<PeerTrust, TlsError> {
        let Some(path) = &config.tls.peer_ca_file else {
            return Ok(PeerTrust::default());
        };
        let authorities = certificates("tls.peer_ca_file", path)?
            .into_iter()
            .map(|certificate| {
                reqwest::Certificate::from_der(certificate.as_ref()).map_err(|e| {
                    TlsError::Unreadable {
                        field: "tls.peer_ca_file",
                        path: path.display().to_string(),
                        cause: e.to_string(),
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(PeerTrust { authorities })
    }

    /// An HTTP client builder for calls to peers (rustls, this trust, the connect timeout).
    pub fn client(&self, config: &Config) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(config.connect_timeout());
        for authority in &self.authorities {
            builder = builder.add_root_certificate(authority.clone());
        }
        builder
    }
}
