//! A test PKI: a CA of the test's own, the server certificates it signs (valid, for another
//! name, or expired), and the FastMCP server over HTTPS with one of them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::peers::{python_server, Server};

/// A test CA and the server certificates it (or a stranger) signs.
pub struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join(format!("{name}.pem"));
        fs::write(&ca_pem, cert.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// A server certificate for `sans` (DNS names or IPs); `expired` makes it end yesterday.
    pub fn leaf(&self, file: &str, sans: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(10);
            params.not_after = now - time::Duration::days(1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(10);
        }
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let c = self.dir.join(format!("{file}.pem"));
        let k = self.dir.join(format!("{file}.key"));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        for p in [&c, &k, &self.ca_pem] {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
        }
        (c, k)
    }
}

/// The FastMCP test server over HTTPS with `cert` (certificate, key) on `host`.
pub fn https_server(
    dir: &Path,
    log: &str,
    host: &str,
    cert: &(PathBuf, PathBuf),
    extra: &[&str],
) -> Server {
    let c = cert.0.to_str().unwrap().to_string();
    let k = cert.1.to_str().unwrap().to_string();
    let mut args = vec![
        "--host",
        host,
        "--port",
        "0",
        "--certfile",
        &c,
        "--keyfile",
        &k,
    ];
    args.extend_from_slice(extra);
    python_server(&dir.join(log), &args)
}
