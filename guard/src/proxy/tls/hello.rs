//! The ClientHello, read without consuming it: the SNI, the ALPN list and the highest version
//! offered. guard's own parser (one record, no extensions it does not need).

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::{
    net::canonical_addr,
    proxy::peek::{peek_until, PeekError},
};

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
    read_extensions(r.take(ext_len)?, &mut hello)?;
    Ok(Some(hello))
}

/// The extensions guard reads: server_name (0), ALPN (16), supported_versions (43).
fn read_extensions(b: &[u8], hello: &mut ClientHello) -> Result<(), String> {
    let mut exts = Reader { b };
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
    Ok(())
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
    match peek_until(client, 5 + 16_384 + 2048, deadline, parse_client_hello).await {
        Ok(h) => Ok(h),
        Err(PeekError::Closed) => Err("the client closed during the ClientHello".into()),
        Err(PeekError::Io(e)) => Err(format!("reading the ClientHello: {e}")),
        Err(PeekError::TimedOut) => {
            Err("truncated ClientHello (the client stopped sending)".into())
        }
        Err(PeekError::Full) => Err("ClientHello too long".into()),
        Err(PeekError::Invalid(e)) => Err(e),
    }
}

/// Whether `name` resolves to `dst`'s address (the domain-fronting check for passthrough).
pub async fn resolves_to(name: &str, dst: SocketAddr) -> Result<bool, String> {
    let lookup = tokio::net::lookup_host((name, dst.port()));
    let addrs = tokio::time::timeout(Duration::from_secs(5), lookup)
        .await
        .map_err(|_| format!("resolving {name} timed out"))?
        .map_err(|e| format!("resolving {name}: {e}"))?;
    let want = canonical_addr(dst).ip();
    Ok(addrs.map(|a| canonical_addr(a).ip()).any(|ip| ip == want))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};

    use super::*;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

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
}
