//! TLS termination on the data listener (rustls through pingora), with the certificate and
//! key reloaded when their files change.
//!
//! The files are polled, and compared by content, every [`RELOAD_CHECK_INTERVAL`]. Polling
//! by content also catches the symlink swap with which Kubernetes updates a mounted Secret,
//! which file-change notifications on the link itself can miss. A file that fails to load
//! keeps the previous certificate in use and is logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::tls::server::handshake;
use pingora_core::protocols::{Stream, ALPN};
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{ClientHello, CryptoProvider, ResolvesServerCert};
use tracing::{info, warn};

use crate::config::TlsConfig;

/// How often the certificate and key files are checked for changes.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest time a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no certificate or no private key found in {cert} / {key}; expected PEM files")]
    Empty { cert: PathBuf, key: PathBuf },
    #[error("invalid TLS certificate or key ({cert} / {key}): {message}")]
    Invalid { cert: PathBuf, key: PathBuf, message: String },
}

/// Hands the current certificate to every handshake.
struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Accepts TLS connections with HTTP/2 and HTTP/1.1 offered through ALPN.
pub struct TlsTerminator {
    acceptor: pingora_core::listeners::tls::Acceptor,
    resolver: Arc<ReloadingCert>,
    config: TlsConfig,
}

impl TlsTerminator {
    /// Loads the certificate and key; fails when they cannot be used.
    pub fn new(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        pingora_rustls::install_default_crypto_provider();
        let (key, _) = load(config)?;
        let resolver = Arc::new(ReloadingCert { current: ArcSwap::from_pointee(key) });
        // The paths are placeholders: a certificate resolver replaces them in build().
        let mut settings = TlsSettings::intermediate("", "").expect("creating TLS settings cannot fail");
        settings.set_cert_resolver(resolver.clone());
        settings.set_alpn(ALPN::H2H1);
        Ok(Arc::new(TlsTerminator { acceptor: settings.build(), resolver, config: config.clone() }))
    }

    /// Runs the TLS handshake on an accepted connection.
    pub async fn accept(&self, stream: L4Stream) -> Result<Stream, String> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&self.acceptor, stream)).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}")),
        }
    }

    /// Polls the files and swaps in a new certificate when their content changes. The
    /// task ends when the terminator is dropped.
    pub fn watch(self: &Arc<Self>) {
        tokio::spawn(watch_files(Arc::downgrade(self)));
    }
}

async fn watch_files(terminator: std::sync::Weak<TlsTerminator>) {
    let Some(config) = terminator.upgrade().map(|t| t.config.clone()) else { return };
    let mut last_seen = file_contents(&config);
    loop {
        tokio::time::sleep(RELOAD_CHECK_INTERVAL).await;
        let Some(terminator) = terminator.upgrade() else { return };
        let seen = file_contents(&config);
        if seen == last_seen {
            continue;
        }
        last_seen = seen;
        match load(&config) {
            Ok((key, summary)) => {
                terminator.resolver.current.store(Arc::new(key));
                info!(cert = %config.cert_file.display(), %summary, "reloaded the TLS certificate");
            }
            Err(error) => warn!(%error, "TLS certificate reload failed; the previous certificate stays in use"),
        }
    }
}

fn file_contents(config: &TlsConfig) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((std::fs::read(&config.cert_file).ok()?, std::fs::read(&config.key_file).ok()?))
}

/// Loads the certificate chain and key into a signing key; the summary names the chain length.
fn load(config: &TlsConfig) -> Result<(CertifiedKey, String), TlsError> {
    let (cert, key) = (&config.cert_file, &config.key_file);
    for path in [cert, key] {
        check_readable(path)?;
    }
    let invalid = |message: String| TlsError::Invalid { cert: cert.clone(), key: key.clone(), message };
    let loaded = pingora_rustls::load_certs_and_key_files(&cert.to_string_lossy(), &key.to_string_lossy())
        .map_err(|e| invalid(e.to_string()))?;
    let Some((certs, private_key)) = loaded else {
        return Err(TlsError::Empty { cert: cert.clone(), key: key.clone() });
    };
    let provider = CryptoProvider::get_default().ok_or_else(|| invalid("no rustls crypto provider".into()))?;
    let signing_key = provider.key_provider.load_private_key(private_key).map_err(|e| invalid(e.to_string()))?;
    let summary = format!("{} certificate(s) in the chain", certs.len());
    Ok((CertifiedKey::new(certs, signing_key), summary))
}

fn check_readable(path: &Path) -> Result<(), TlsError> {
    std::fs::metadata(path).map(|_| ()).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}
