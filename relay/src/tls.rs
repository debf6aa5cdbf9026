//! TLS for TURN over TLS (RFC 8656 §3.1, port 5349) and DTLS for TURN over
//! DTLS (RFC 7350): the certificate and key are read from PEM files and
//! reloaded when the files change or on demand (SIGHUP). A reload affects
//! new connections only; established sessions keep the configuration they
//! started with, so nothing is dropped.

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
    /// With DTLS: what its sessions start from.
    dtls: Option<RwLock<Arc<DtlsMaterial>>>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The certificate chain and key files, read once for TLS and DTLS alike
/// (so both serve the same pair, even when a reload meets a file being
/// replaced).
struct Pem {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read_pem(cert: &Path, key: &Path) -> anyhow::Result<Pem> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS key {}", key.display()))?;
    Ok(Pem { certs, key })
}

/// The TLS configuration and, with `dtls`, the DTLS material, from the
/// files.
fn build_all(
    cert: &Path,
    key: &Path,
    dtls: bool,
) -> anyhow::Result<(ServerConfig, Option<DtlsMaterial>)> {
    let pem = read_pem(cert, key)?;
    let config = build(&pem)?;
    let material = if dtls {
        let why = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "DTLS cannot use the certificate {} and key {}: {e} (DTLS needs an ECDSA P-256 or P-384 key that matches the certificate)",
                cert.display(),
                key.display()
            )
        };
        Some(build_dtls(&pem).map_err(|e| why(&e))?)
    } else {
        None
    };
    Ok((config, material))
}

fn build(pem: &Pem) -> anyhow::Result<ServerConfig> {
    let (certs, key) = (pem.certs.clone(), pem.key.clone_key());
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

/// What a DTLS session starts from: the engine's settings and the
/// certificate (the chain's first, its leaf) with its key.
pub struct DtlsMaterial {
    /// The engine's settings.
    pub config: Arc<dimpl::Config>,
    /// The leaf certificate and its key (DER).
    pub certificate: dimpl::DtlsCertificate,
}

impl std::fmt::Debug for DtlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsMaterial").finish_non_exhaustive()
    }
}

/// Largest datagram a DTLS session sends several records in (a record
/// larger than this goes alone).
const DTLS_MTU: usize = 1400;
/// How long a DTLS handshake may take, retransmissions included.
const DTLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A server key parsed once and shared by every DTLS session: the engine
/// loads its key for each session it creates, which with RustCrypto costs
/// a scalar multiplication (~0.2 ms) — per ClientHello, so a flood of them
/// would burn a core; shared, a session starts in under a microsecond.
#[derive(Debug)]
struct SharedKey {
    key: Arc<Mutex<Box<dyn dimpl::crypto::SigningKey>>>,
    algorithm: dimpl::crypto::SignatureAlgorithm,
    hash: dimpl::crypto::HashAlgorithm,
    hashes: Vec<dimpl::crypto::HashAlgorithm>,
}

impl dimpl::crypto::SigningKey for SharedKey {
    fn sign(
        &mut self,
        data: &[u8],
        hash: dimpl::crypto::HashAlgorithm,
        out: &mut dimpl::crypto::Buf,
    ) -> Result<(), dimpl::CryptoError> {
        self.key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sign(data, hash, out)
    }

    fn algorithm(&self) -> dimpl::crypto::SignatureAlgorithm {
        self.algorithm
    }

    fn hash_algorithm(&self) -> dimpl::crypto::HashAlgorithm {
        self.hash
    }

    fn supported_hash_algorithms(&self) -> &[dimpl::crypto::HashAlgorithm] {
        &self.hashes
    }
}

/// Loads keys through RustCrypto once per key (the last few kept: a reload
/// brings a new one).
#[derive(Debug)]
struct KeyCache;

/// Parsed keys by their DER bytes, newest last.
type ParsedKeys = Vec<(Vec<u8>, Arc<Mutex<Box<dyn dimpl::crypto::SigningKey>>>)>;
static PARSED_KEYS: Mutex<ParsedKeys> = Mutex::new(Vec::new());
static KEY_CACHE: KeyCache = KeyCache;
/// Keys kept parsed.
const PARSED_KEPT: usize = 4;

impl dimpl::crypto::KeyProvider for KeyCache {
    fn load_private_key(
        &self,
        key_der: &[u8],
    ) -> Result<Box<dyn dimpl::crypto::SigningKey>, dimpl::CryptoError> {
        let mut parsed = PARSED_KEYS.lock().unwrap_or_else(|e| e.into_inner());
        let key = match parsed.iter().find(|(der, _)| der == key_der) {
            Some((_, key)) => key.clone(),
            None => {
                let key = Arc::new(Mutex::new(
                    dimpl::crypto::rust_crypto::default_provider()
                        .key_provider
                        .load_private_key(key_der)?,
                ));
                if parsed.len() >= PARSED_KEPT {
                    parsed.remove(0);
                }
                parsed.push((key_der.to_vec(), key.clone()));
                key
            }
        };
        drop(parsed);
        let (algorithm, hash, hashes) = {
            let k = key.lock().unwrap_or_else(|e| e.into_inner());
            (
                k.algorithm(),
                k.hash_algorithm(),
                k.supported_hash_algorithms().to_vec(),
            )
        };
        Ok(Box::new(SharedKey {
            key,
            algorithm,
            hash,
            hashes,
        }))
    }
}

/// The DTLS settings: DTLS 1.2 with ECDHE-ECDSA AEAD suites, the
/// HelloVerifyRequest cookie (a client proves its address before any key
/// exchange), no client certificate. Checked by a handshake in memory: the
/// key must be ECDSA P-256 or P-384 and match the certificate.
fn build_dtls(pem: &Pem) -> Result<DtlsMaterial, String> {
    let certificate = dimpl::DtlsCertificate {
        certificate: pem.certs[0].to_vec(),
        private_key: pem.key.secret_der().to_vec(),
    };
    // The engine panics on a key it cannot load: load it first (and keep
    // it parsed for every session).
    use dimpl::crypto::KeyProvider;
    KEY_CACHE
        .load_private_key(&certificate.private_key)
        .map_err(|e| e.to_string())?;
    let mut provider = dimpl::crypto::rust_crypto::default_provider();
    provider.key_provider = &KEY_CACHE;
    let config = dimpl::Config::builder()
        .with_crypto_provider(provider)
        .require_client_certificate(false)
        .use_server_cookie(true)
        .mtu(DTLS_MTU)
        .handshake_timeout(DTLS_HANDSHAKE_TIMEOUT)
        .build()
        .map_err(|e| format!("DTLS settings: {e}"))?;
    let material = DtlsMaterial {
        config: Arc::new(config),
        certificate,
    };
    handshake_in_memory(&material)?;
    Ok(material)
}

/// Ok when DTLS can serve with `cert` and `key` (an ECDSA P-256 or P-384
/// key matching the certificate); the reason otherwise.
pub fn dtls_usable(cert: &Path, key: &Path) -> anyhow::Result<()> {
    build_all(cert, key, true).map(|_| ())
}

/// Runs a DTLS client against a server built from `material`, in memory;
/// Ok once both ends are connected.
fn handshake_in_memory(material: &DtlsMaterial) -> Result<(), String> {
    use dimpl::{Dtls, Output};
    let now = std::time::Instant::now();
    let mut server = Dtls::new_12(material.config.clone(), material.certificate.clone(), now);
    let mut client = Dtls::new_12(material.config.clone(), material.certificate.clone(), now);
    client.set_active(true);
    let mut buf = vec![0u8; 4096];
    let (mut client_up, mut server_up) = (false, false);
    // Moves what `from` sends to `to`; true once `from` is connected.
    let mut step = |from: &mut Dtls, to: &mut Dtls, up: &mut bool| -> Result<(), String> {
        from.handle_timeout(now).map_err(|e| e.to_string())?;
        let mut packets = Vec::new();
        loop {
            match from.poll_output(&mut buf) {
                Output::Packet(p) => packets.push(p.to_vec()),
                Output::Connected => *up = true,
                Output::BufferTooSmall { needed } => buf.resize(needed, 0),
                Output::Timeout(_) => break,
                _ => {}
            }
        }
        to.handle_timeout(now).map_err(|e| e.to_string())?;
        for p in packets {
            to.handle_packet(&p).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    for _ in 0..32 {
        step(&mut client, &mut server, &mut client_up)?;
        step(&mut server, &mut client, &mut server_up)?;
        if client_up && server_up {
            return Ok(());
        }
    }
    Err("the handshake did not complete".into())
}

impl TlsReloader {
    /// Loads `cert` and `key` (PEM); fails when they are unreadable or do
    /// not match, or (with `dtls`) when DTLS cannot use them.
    pub fn load(cert: &Path, key: &Path, dtls: bool) -> anyhow::Result<TlsReloader> {
        let (config, dtls) = build_all(cert, key, dtls)?;
        let dtls = dtls.map(|m| RwLock::new(Arc::new(m)));
        Ok(TlsReloader {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(config)),
            dtls,
            stamps: Mutex::new((modified(cert), modified(key))),
        })
    }

    /// What new DTLS sessions use (None: DTLS is off).
    pub fn dtls(&self) -> Option<Arc<DtlsMaterial>> {
        let current = self.dtls.as_ref()?;
        Some(
            current
                .read()
                .map(|c| c.clone())
                .unwrap_or_else(|e| e.into_inner().clone()),
        )
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
        let (config, dtls) = build_all(&self.cert, &self.key, self.dtls.is_some())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        if let (Some(current), Some(material)) = (&self.dtls, dtls) {
            *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        }
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
