//! `policy.source`: fetching signed policy bundles (HTTP(S) with ETag / If-None-Match, a bundle
//! file, or an unpacked bundle directory). What comes back is checked by
//! [`crate::policy::bundle::verify`]; nothing here trusts the source.

use std::{path::Path, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;

use crate::policy::bundle::{self, MAX_BUNDLE};

/// One fetch's time limit: a slow source never holds the poll loop for long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What a source answered.
pub(super) enum Fetched {
    /// `304 Not Modified` for the ETag we sent.
    Unchanged,
    /// A bundle's entries (not yet verified) and the ETag to send next time.
    Entries(Vec<(String, Vec<u8>)>, Option<String>),
}

/// Asks `source` for its bundle; `etag` is the one of the bundle in force.
pub(super) async fn fetch(
    source: &str,
    etag: Option<&str>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Fetched, String> {
    if source.starts_with("https://") || source.starts_with("http://") {
        return tokio::time::timeout(FETCH_TIMEOUT, get(source, etag, tls))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", FETCH_TIMEOUT.as_secs())));
    }
    let path = Path::new(source).to_path_buf();
    tokio::task::spawn_blocking(move || read_local(&path))
        .await
        .map_err(|e| e.to_string())?
        .map(|e| Fetched::Entries(e, None))
}

/// A bundle file, or a directory holding `MANIFEST`, `MANIFEST.minisig` and the files.
pub(super) fn read_local(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            // Symlinks are followed as the directory loader does; the signature decides.
            let data = read_bounded(&e.path())?;
            out.push((name, data));
        }
        return Ok(out);
    }
    bundle::unpack(&read_bounded(path)?)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut data = Vec::new();
    f.take(MAX_BUNDLE as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() > MAX_BUNDLE {
        return Err(format!(
            "{}: larger than {MAX_BUNDLE} bytes",
            path.display()
        ));
    }
    Ok(data)
}

async fn get(
    url: &str,
    etag: Option<&str>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Fetched, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("policy.source: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("policy.source: no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, uri.authority().unwrap().as_str())
        .header(
            http::header::USER_AGENT,
            concat!("guard/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(tag) = etag {
        req = req.header(http::header::IF_NONE_MATCH, tag);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = if https {
        let name = rustls::pki_types::ServerName::try_from(bare.clone())
            .map_err(|e| format!("policy.source host `{host}`: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        send(hyper_util::rt::TokioIo::new(tls), req).await?
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await?
    };
    let status = resp.status();
    if status == http::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::Unchanged);
    }
    if status != http::StatusCode::OK {
        return Err(format!("{url} answered HTTP {status}"));
    }
    let tag = resp
        .headers()
        .get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(resp.into_body(), MAX_BUNDLE)
        .collect()
        .await
        .map_err(|e| format!("reading {url}: {e}"))?
        .to_bytes();
    Ok(Fetched::Entries(bundle::unpack(&body)?, tag))
}

async fn send<T>(
    io: T,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    tx.send_request(req).await.map_err(|e| format!("HTTP: {e}"))
}

/// Writes a verified bundle's entries as a directory (`dir`, replaced atomically): the last
/// good set a restarted daemon starts from when the source is out of reach.
pub(super) fn keep(dir: &Path, entries: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let tmp = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for (name, data) in entries {
        std::fs::write(tmp.join(name), data)?;
    }
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
