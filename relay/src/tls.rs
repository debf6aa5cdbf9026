//! TLS for TURN over TLS (RFC 8656 §3.1, port 5349): the certificate and key
//! are read from PEM files and reloaded when the files change or on demand
//! (SIGHUP). A reload affects new connections only; established sessions
//! keep the configuration they started with, so nothing is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use anyhow::Context;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The current TLS configuration and where it comes from.
#[derive(Debug)]
pub struct TlsReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn build(cert: &Path, key: &Path) -> anyhow::Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    // A binary upgrade moves TLS 1.3 sessions to the successor process with
    // their traffic secrets (`shell/sealed.rs`); they never leave it.
    config.enable_secret_extraction = true;
    Ok(config)
}

impl TlsReloader {
    /// Loads `cert` and `key` (PEM); fails when they are unreadable or do
    /// not match.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<TlsReloader> {
        let config = build(cert, key)?;
        Ok(TlsReloader {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new((modified(cert), modified(key))),
        })
    }

    /// The configuration new connections use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Reloads the files now. On error the previous configuration stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = build(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) =
            (modified(&self.cert), modified(&self.key));
        Ok(())
    }

    /// Reloads when either file's modification time changed; `Ok(true)`
    /// when it did.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let now = (modified(&self.cert), modified(&self.key));
        let changed = *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != now;
        if changed {
            // Record the stamps first: a broken file is reported once, not
            // every second, and retried when it changes again.
            *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = now;
            self.reload()?;
        }
        Ok(changed)
    }
}
