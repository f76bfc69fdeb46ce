//! The interception CA (`guard ca`), leaf certificates minted per name, and the upstream client
//! configuration that verifies servers against the system roots plus `tls.extra_roots`.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, bail, Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig,
};

/// Lifetime of a minted leaf; re-minted when less than [`LEAF_RENEW`] is left.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const LEAF_RENEW: Duration = Duration::from_secs(3600);
const CA_NAME: &str = "guard interception CA";
/// Leaves cached at most.
const MAX_LEAVES: usize = 4096;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Paths of the CA in the state directory.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// System roots plus the guard CA, for agents (`guard exec` points runtimes at it).
    pub bundle: PathBuf,
}

impl CaFiles {
    pub fn new(state_dir: &Path) -> CaFiles {
        CaFiles {
            cert: state_dir.join("ca/guard-ca.pem"),
            key: state_dir.join("ca/guard-ca.key"),
            bundle: state_dir.join("ca-bundle.pem"),
        }
    }
}

/// Creates the CA (key mode 0600). Refuses to replace an existing one unless `force`.
pub fn ca_init(files: &CaFiles, force: bool) -> Result<()> {
    if files.key.exists() && !force {
        bail!(
            "a guard CA already exists at {} (replacing it breaks every agent that trusts it); use --force to replace it",
            files.cert.display()
        );
    }
    let dir = files.key.parent().unwrap();
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "guard");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time_now();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key)?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    write_atomic(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The system's trusted roots as PEM (what the bundle for agents starts with).
fn system_roots_pem() -> String {
    let mut out = String::new();
    for c in rustls_native_certs::load_native_certs().certs {
        out.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())));
    }
    out
}

/// The loaded CA and the leaves minted from it.
pub struct Interceptor {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    /// name -> (server config presenting that name's leaf, expiry)
    leaves: Mutex<HashMap<String, (Arc<ServerConfig>, SystemTime)>>,
    upstream: Arc<ClientConfig>,
}

impl Interceptor {
    /// Loads the CA from the state directory, creating it on first start, writes the agents'
    /// bundle, and builds the upstream verifier from the system roots plus `extra_roots`.
    pub fn load(files: &CaFiles, extra_roots: &[PathBuf]) -> Result<Interceptor> {
        if !files.key.exists() {
            ca_init(files, false)?;
            tracing::info!(ca = %files.cert.display(), "created the guard interception CA");
        }
        let key_pem = fs::read_to_string(&files.key)
            .with_context(|| format!("reading the CA key {}", files.key.display()))?;
        let ca_pem = fs::read_to_string(&files.cert)
            .with_context(|| format!("reading the CA certificate {}", files.cert.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("the CA key does not parse")?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, key).context("the CA certificate does not parse")?;
        let bundle = format!("{}{}", system_roots_pem(), ca_pem);
        write_atomic(&files.bundle, bundle.as_bytes(), 0o644)?;
        if let Some(dir) = files.bundle.parent() {
            // Agents of every user read the bundle.
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
        }
        Ok(Interceptor {
            issuer,
            ca_pem,
            leaves: Mutex::new(HashMap::new()),
            upstream: Arc::new(upstream_config(extra_roots)?),
        })
    }

    pub fn upstream(&self) -> Arc<ClientConfig> {
        self.upstream.clone()
    }

    /// A server config presenting a leaf for `name` (a DNS name or an IP address), minted on
    /// first use and cached until it nears expiry (sessions resume within a config).
    pub fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>> {
        let now = SystemTime::now();
        if let Some((cfg, expiry)) = self.leaves.lock().unwrap().get(name) {
            if *expiry > now + LEAF_RENEW {
                return Ok(cfg.clone());
            }
        }
        let key = KeyPair::generate()?;
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into().map_err(|e| anyhow!("`{name}`: {e}"))?),
        };
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let t = time_now();
        params.not_before = t - time::Duration::minutes(5);
        params.not_after = t + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        let mut leaves = self.leaves.lock().unwrap();
        if leaves.len() >= MAX_LEAVES {
            // Bounded whatever names agents send; the ones in use are minted again.
            leaves.clear();
        }
        leaves.insert(name.to_string(), (cfg.clone(), now + LEAF_LIFETIME));
        Ok(cfg)
    }
}

/// Verification of upstream servers: system roots plus `extra_roots` (PEM files).
pub fn upstream_config(extra_roots: &[PathBuf]) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "loaded system roots");
    for path in extra_roots {
        let data = fs::read(path)
            .with_context(|| format!("tls.extra_roots: reading {}", path.display()))?;
        let mut n = 0;
        for p in pem::parse_many(&data)
            .with_context(|| format!("tls.extra_roots: {} is not PEM", path.display()))?
        {
            if p.tag() == "CERTIFICATE" {
                roots
                    .add(CertificateDer::from(p.contents().to_vec()))
                    .with_context(|| {
                        format!(
                            "tls.extra_roots: a certificate in {} is not usable",
                            path.display()
                        )
                    })?;
                n += 1;
            }
        }
        if n == 0 {
            bail!("tls.extra_roots: {} holds no certificate", path.display());
        }
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The name a TLS connection is for: the SNI, else the destination address.
pub fn server_name(sni: Option<&str>, dst: SocketAddr) -> Result<ServerName<'static>> {
    match sni {
        Some(n) => ServerName::try_from(n.to_string()).map_err(|e| anyhow!("SNI `{n}`: {e}")),
        None => Ok(ServerName::IpAddress(dst.ip().into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_leaves() {
        let dir = std::env::temp_dir().join(format!("guard-tls-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let files = CaFiles::new(&dir);
        ca_init(&files, false).unwrap();
        assert_eq!(
            fs::metadata(&files.key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(ca_init(&files, false)
            .unwrap_err()
            .to_string()
            .contains("--force"));
        let before = fs::read(&files.cert).unwrap();
        ca_init(&files, true).unwrap();
        assert_ne!(before, fs::read(&files.cert).unwrap());
        let i = Interceptor::load(&files, &[]).unwrap();
        let a = i.server_config("mcp.example.com").unwrap();
        let b = i.server_config("mcp.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "leaves are cached");
        i.server_config("127.0.0.3").unwrap();
        let bundle = fs::read_to_string(&files.bundle).unwrap();
        assert!(bundle.ends_with(&i.ca_pem));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn extra_roots_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("guard-tls-roots-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        fs::write(&empty, "").unwrap();
        assert!(upstream_config(&[empty]).is_err());
        assert!(upstream_config(&[dir.join("missing.pem")]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
