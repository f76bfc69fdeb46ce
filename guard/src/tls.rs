//! TLS: the interception CA (`guard ca`), leaf certificates minted per name, the ClientHello
//! peek (SNI and ALPN without consuming a byte), and the upstream client configuration that
//! verifies servers against the system roots plus `tls.extra_roots`.

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
use tokio::net::TcpStream;

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

/// What guard reads from a ClientHello.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// Highest version offered (0x0303 TLS 1.2, 0x0304 TLS 1.3 via supported_versions).
    pub max_version: u16,
}

/// Parses a TLS record holding a ClientHello. `Ok(None)`: more bytes are needed.
pub fn parse_client_hello(b: &[u8]) -> Result<Option<ClientHello>, String> {
    if b.len() < 5 {
        return Ok(None);
    }
    if b[0] != 0x16 || b[1] != 3 {
        return Err("not a TLS handshake record".into());
    }
    let rec_len = u16::from_be_bytes([b[3], b[4]]) as usize;
    if rec_len > 16_384 + 2048 {
        return Err("TLS record too long".into());
    }
    if b.len() < 5 + rec_len {
        return Ok(None);
    }
    let mut r = Reader {
        b: &b[5..5 + rec_len],
    };
    if r.u8()? != 1 {
        return Err("the first handshake message is not a ClientHello".into());
    }
    let hs_len = r.u24()? as usize;
    if hs_len > r.b.len() {
        return Err("ClientHello spans several records (not supported)".into());
    }
    let mut r = Reader { b: &r.b[..hs_len] };
    let legacy_version = r.u16()?;
    r.skip(32)?;
    let sid = r.u8()? as usize;
    r.skip(sid)?;
    let suites = r.u16()? as usize;
    r.skip(suites)?;
    let comp = r.u8()? as usize;
    r.skip(comp)?;
    let mut hello = ClientHello {
        max_version: legacy_version,
        ..Default::default()
    };
    if r.b.is_empty() {
        return Ok(Some(hello));
    }
    let ext_len = r.u16()? as usize;
    let mut exts = Reader {
        b: r.take(ext_len)?,
    };
    while !exts.b.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()? as usize;
        let mut e = Reader { b: exts.take(len)? };
        match ty {
            0 => {
                let list = e.u16()? as usize;
                let mut l = Reader { b: e.take(list)? };
                while !l.b.is_empty() {
                    let kind = l.u8()?;
                    let n = l.u16()? as usize;
                    let name = l.take(n)?;
                    if kind == 0 {
                        let name = std::str::from_utf8(name).map_err(|_| "SNI is not UTF-8")?;
                        if name.is_empty()
                            || !name.bytes().all(|c| {
                                c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_'
                            })
                        {
                            return Err(format!(
                                "SNI `{}` is not a host name",
                                name.escape_default()
                            ));
                        }
                        hello.sni =
                            Some(name.to_ascii_lowercase().trim_end_matches('.').to_string());
                    }
                }
            }
            16 => {
                let list = e.u16()? as usize;
                let mut l = Reader { b: e.take(list)? };
                while !l.b.is_empty() {
                    let n = l.u8()? as usize;
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(l.take(n)?).into_owned());
                }
            }
            43 => {
                let n = e.u8()? as usize;
                let mut l = Reader { b: e.take(n)? };
                while l.b.len() >= 2 {
                    let v = l.u16()?;
                    // GREASE values (0x?a?a) are not versions.
                    if v & 0x0f0f != 0x0a0a {
                        hello.max_version = hello.max_version.max(v);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Some(hello))
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("truncated ClientHello".into());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Result<u32, String> {
        let b = self.take(3)?;
        Ok(u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

/// Peeks until a whole ClientHello is there (it is not consumed). Errors: malformed, or the
/// client stopped sending before it was complete.
pub async fn peek_client_hello(client: &TcpStream, limit: Duration) -> Result<ClientHello, String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 5 + 16_384 + 2048];
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(Ok(0)) => return Err("the client closed during the ClientHello".into()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("reading the ClientHello: {e}")),
            Err(_) => return Err("truncated ClientHello (the client stopped sending)".into()),
        };
        if let Some(h) = parse_client_hello(&buf[..n])? {
            return Ok(h);
        }
        if n == buf.len() {
            return Err("ClientHello too long".into());
        }
        if n == last {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last = n;
        if tokio::time::Instant::now() >= deadline {
            return Err("truncated ClientHello (the client stopped sending)".into());
        }
    }
}

/// Whether `name` resolves to `dst`'s address (the domain-fronting check for passthrough).
pub async fn resolves_to(name: &str, dst: SocketAddr) -> Result<bool, String> {
    let lookup = tokio::net::lookup_host((name, dst.port()));
    let addrs = tokio::time::timeout(Duration::from_secs(5), lookup)
        .await
        .map_err(|_| format!("resolving {name} timed out"))?
        .map_err(|e| format!("resolving {name}: {e}"))?;
    let want = crate::redirect::canonical(dst).ip();
    Ok(addrs
        .map(|a| crate::redirect::canonical(a).ip())
        .any(|ip| ip == want))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, made by rustls for `name`.
    fn hello_for(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let sn = ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), sn).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn parses_sni_alpn_and_version() {
        let b = hello_for("mcp.example.com", &[b"h2", b"http/1.1"]);
        let h = parse_client_hello(&b).unwrap().unwrap();
        assert_eq!(h.sni.as_deref(), Some("mcp.example.com"));
        assert_eq!(h.alpn, vec!["h2", "http/1.1"]);
        assert_eq!(h.max_version, 0x0304);
        // No SNI for an IP address.
        let b = hello_for("127.0.0.3", &[]);
        let h = parse_client_hello(&b).unwrap().unwrap();
        assert_eq!(h.sni, None);
    }

    #[test]
    fn incomplete_and_malformed_hellos() {
        let b = hello_for("a.example", &[]);
        for cut in [0, 3, 5, 40, b.len() - 1] {
            assert_eq!(parse_client_hello(&b[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").is_err());
        assert!(parse_client_hello(b"\x17\x03\x03\x00\x01\x00").is_err());
        let mut junk = b"\x16\x03\x01\x00\x20".to_vec();
        junk.extend([0x01, 0x00, 0x00, 0x1c]);
        junk.extend([0xff; 28]);
        assert!(parse_client_hello(&junk).is_err());
    }

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
