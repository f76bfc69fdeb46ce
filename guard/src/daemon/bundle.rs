//! `policy.source`: fetching signed policy bundles (HTTP(S) with ETag / If-None-Match, a bundle
//! file, or an unpacked bundle directory). What comes back is checked by
//! [`crate::policy::bundle::verify`]; nothing here trusts the source.

use std::{path::Path, sync::Arc, time::Duration};

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
        return get(source, etag, tls).await;
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
    let headers: Vec<(http::HeaderName, String)> = etag
        .map(|t| (http::header::IF_NONE_MATCH, t.to_string()))
        .into_iter()
        .collect();
    let a = super::outbound::request(
        http::Method::GET,
        url,
        &headers,
        Bytes::new(),
        tls,
        FETCH_TIMEOUT,
        MAX_BUNDLE,
    )
    .await?;
    if a.status == http::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::Unchanged);
    }
    if a.status != http::StatusCode::OK {
        return Err(format!("{url} answered HTTP {}", a.status));
    }
    let tag = a
        .headers
        .get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Fetched::Entries(bundle::unpack(&a.body)?, tag))
}

/// Writes a verified bundle's entries as a directory (`dir`, replaced atomically): the last
/// good set a restarted daemon starts from when the source is out of reach.
pub(super) fn keep(dir: &Path, entries: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let tmp = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for (name, data) in entries {
        let mut f = std::fs::File::create(tmp.join(name))?;
        std::io::Write::write_all(&mut f, data)?;
        // On disk before the rename makes it the kept bundle: a crash leaves the old one or
        // the whole new one.
        f.sync_all()?;
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    sync_parent(dir)
}

/// Writes `data` to `path` durably: a temporary file synced, renamed over `path`, the
/// directory synced (the newest signing time must survive a crash, or rollback reopens).
pub(super) fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}
