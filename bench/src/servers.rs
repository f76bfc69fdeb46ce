//! The far ends, run by the parent (unguarded, outside the benchmark's attach point): a fast MCP
//! responder (the latency floor; JSON at `/mcp`, one SSE event at `/mcp-sse`), the same over
//! TLS (certificate from a CA made for this run), a listener that accepts and drops (connect),
//! a sink that counts bytes (throughput) and an echo server (held connections). The same
//! servers answer the direct and the guarded side.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

pub struct Servers {
    /// The fast MCP responder (`/mcp`).
    pub mcp: SocketAddr,
    /// The same over TLS (HTTP/1.1), with a certificate for its IP address.
    pub tls_mcp: SocketAddr,
    /// The CA (PEM) that issued the TLS responder's certificate.
    pub tls_ca_pem: String,
    /// Accepts and drops.
    pub accept: SocketAddr,
    pub sink: SocketAddr,
    pub echo: SocketAddr,
    /// A bare relay to the sink for comparison: two threads per connection doing blocking
    /// splice(2) on CUBIC sockets as guard's are, no policy, no eBPF.
    pub relay: SocketAddr,
}

impl Servers {
    /// Binds every server (each on its own loopback address) and serves them on the current
    /// runtime.
    pub async fn start() -> Result<Servers> {
        let mcp = TcpListener::bind("127.0.0.3:0").await?;
        let tls_mcp = TcpListener::bind("127.0.0.7:0").await?;
        let (tls_ca_pem, tls_config) = tls_server_config(tls_mcp.local_addr()?.ip())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
        let accept = TcpListener::bind("127.0.0.4:0").await?;
        let sink = TcpListener::bind("127.0.0.5:0").await?;
        let echo = TcpListener::bind("127.0.0.6:0").await?;
        let relay = std::net::TcpListener::bind("127.0.0.8:0")?;
        let s = Servers {
            relay: relay.local_addr()?,
            mcp: mcp.local_addr()?,
            tls_mcp: tls_mcp.local_addr()?,
            tls_ca_pem,
            accept: accept.local_addr()?,
            sink: sink.local_addr()?,
            echo: echo.local_addr()?,
        };
        tokio::spawn(serve(mcp, |s| async move { mcp_conn(s).await }));
        tokio::spawn(serve(tls_mcp, move |s| {
            let acceptor = acceptor.clone();
            async move {
                if let Ok(Ok(tls)) =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(s))
                        .await
                {
                    mcp_conn(tls).await;
                }
            }
        }));
        tokio::spawn(serve(accept, |s| async move { drop(s) }));
        tokio::spawn(serve(sink, |s| async move { sink_conn(s).await }));
        tokio::spawn(serve(echo, |s| async move { echo_conn(s).await }));
        let to = s.sink;
        std::thread::spawn(move || {
            for c in relay.incoming().flatten() {
                let _ = bare_relay(c, to);
            }
        });
        Ok(s)
    }
}

fn bare_relay(c: std::net::TcpStream, to: SocketAddr) -> std::io::Result<()> {
    let u = std::net::TcpStream::connect(to)?;
    for s in [&c, &u] {
        s.set_nodelay(true)?;
        // As guard does on loopback (see guard::forward): no BBR pacing on the relay's sends.
        guard::proxy::tcp::loopback_congestion_control(s);
    }
    let (c2, u2) = (c.try_clone()?, u.try_clone()?);
    std::thread::spawn(move || splice_blocking(&c, &u));
    std::thread::spawn(move || splice_blocking(&u2, &c2));
    Ok(())
}

/// Socket -> pipe -> socket until end of stream, then passes the half-close on.
fn splice_blocking(from: &std::net::TcpStream, to: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    const CHUNK: usize = 256 << 10;
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: valid pipe fd; a refused size is harmless.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    let splice = |a: i32, b: i32, n: usize| {
        // SAFETY: plain fds, null offsets.
        unsafe {
            libc::splice(
                a,
                std::ptr::null_mut(),
                b,
                std::ptr::null_mut(),
                n,
                libc::SPLICE_F_MOVE,
            )
        }
    };
    loop {
        let n = splice(from.as_raw_fd(), fds[1], CHUNK);
        if n <= 0 {
            break;
        }
        let mut left = n as usize;
        while left > 0 {
            let m = splice(fds[0], to.as_raw_fd(), left);
            if m <= 0 {
                left = usize::MAX;
                break;
            }
            left -= m as usize;
        }
        if left == usize::MAX {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    // SAFETY: the pipe's two fds, ours to close.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn sink_conn(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 << 10];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&total.to_le_bytes()).await;
    let _ = s.shutdown().await;
}

async fn echo_conn(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A CA made for this run and a server config presenting a leaf it issued for `ip`.
fn tls_server_config(ip: IpAddr) -> Result<(String, rustls::ServerConfig)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "guard-bench upstream CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name
        .push(DnType::CommonName, ip.to_string());
    leaf.subject_alt_names = vec![SanType::IpAddress(ip)];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_pem, cfg))
}

async fn mcp_conn<S>(s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
        let sse = req.uri().path() == "/mcp-sse";
        let r = mcp_answer(req).await;
        Ok::<_, Infallible>(if sse { as_sse(r).await } else { r })
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(s), service)
        .await;
}

/// A JSON answer as Streamable HTTP's other form: `text/event-stream` with the message as its
/// one event (`/mcp-sse`; what SDK servers such as server-everything send).
async fn as_sse(r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    if !json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut event = Vec::with_capacity(body.len() + 24);
    event.extend_from_slice(b"event: message\ndata: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(Bytes::from(event)))
}

static SESSIONS: AtomicU64 = AtomicU64::new(1);

fn reply(status: StatusCode, body: Option<&Value>) -> Response<Full<Bytes>> {
    let bytes = body
        .map(|v| Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
        .unwrap_or_default();
    let mut r = Response::new(Full::new(bytes));
    *r.status_mut() = status;
    if body.is_some() {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
    }
    r
}

/// Streamable HTTP with JSON answers: `initialize` (with a session id), notifications (202),
/// `tools/list` (one tool, `echo`), `tools/call echo`, `ping`.
async fn mcp_answer(req: Request<Incoming>) -> Response<Full<Bytes>> {
    match *req.method() {
        Method::POST => {}
        Method::DELETE => return reply(StatusCode::OK, None),
        _ => return reply(StatusCode::METHOD_NOT_ALLOWED, None),
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, None);
    };
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        let err = json!({"jsonrpc": "2.0", "id": null,
                         "error": {"code": -32700, "message": "parse error"}});
        return reply(StatusCode::BAD_REQUEST, Some(&err));
    };
    let Some(id) = msg.get("id").cloned() else {
        // A notification.
        return reply(StatusCode::ACCEPTED, None);
    };
    let result = match msg["method"].as_str().unwrap_or("") {
        "initialize" => {
            let answer = json!({"jsonrpc": "2.0", "id": id, "result": {
                "protocolVersion": msg["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "guard-bench", "version": env!("CARGO_PKG_VERSION")}
            }});
            let mut r = reply(StatusCode::OK, Some(&answer));
            let sid = format!("{:032x}", SESSIONS.fetch_add(1, Ordering::Relaxed));
            if let Ok(v) = header::HeaderValue::from_str(&sid) {
                r.headers_mut().insert("mcp-session-id", v);
            }
            return r;
        }
        "tools/list" => json!({"tools": [{
            "name": "echo",
            "description": "Echo the given text back unchanged.",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                            "required": ["text"]}
        }]}),
        "tools/call" if msg["params"]["name"] == "echo" => {
            let text = msg["params"]["arguments"]["text"].clone();
            json!({"content": [{"type": "text", "text": text}], "isError": false})
        }
        "tools/call" => json!({"content": [{"type": "text", "text": "unknown tool"}],
                               "isError": true}),
        "ping" => json!({}),
        _ => {
            let err = json!({"jsonrpc": "2.0", "id": id,
                             "error": {"code": -32601, "message": "method not found"}});
            return reply(StatusCode::OK, Some(&err));
        }
    };
    reply(
        StatusCode::OK,
        Some(&json!({"jsonrpc": "2.0", "id": id, "result": result})),
    )
}
