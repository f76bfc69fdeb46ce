//! The daemon's own HTTP(S) requests (the policy source, approval webhooks): one request per
//! connection, a time limit, a bounded answer. HTTPS is verified against the upstream roots and
//! `tls.extra_roots`.

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;

/// An answer: status, headers, body (at most the caller's limit).
pub(super) struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// `method url` with `headers` and `body`, within `limit` (time) and `max_body` (bytes back).
pub(super) async fn request(
    method: http::Method,
    url: &str,
    headers: &[(http::HeaderName, String)],
    body: Bytes,
    tls: Arc<rustls::ClientConfig>,
    limit: Duration,
    max_body: usize,
) -> Result<Answer, String> {
    tokio::time::timeout(limit, go(method, url, headers, body, tls, max_body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", limit.as_secs())))
}

async fn go(
    method: http::Method,
    url: &str,
    headers: &[(http::HeaderName, String)],
    body: Bytes,
    tls: Arc<rustls::ClientConfig>,
    max_body: usize,
) -> Result<Answer, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("`{url}` is not an http(s):// URL")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{url}`: no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(
            http::header::USER_AGENT,
            concat!("guard/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = if https {
        let name = rustls::pki_types::ServerName::try_from(bare.clone())
            .map_err(|e| format!("host `{host}`: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        send(hyper_util::rt::TokioIo::new(tls), req).await?
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await?
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("reading the answer of {url}: {e}"))?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn send<T>(
    io: T,
    req: http::Request<Full<Bytes>>,
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
