//! HTTP in the proxy (hyper on both sides) and MCP enforcement on it: every `tools/call` is
//! decided before anything reaches the server, `tools/list` results are filtered as they stream,
//! and everything that is not MCP passes unchanged.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::{net::TcpStream, sync::mpsc};

use crate::{
    approvals::{agent_key, Approvals, Held, Verdict},
    audit::{AgentRef, Audit, Record, ServerRef},
    config::{Denial, UnknownServers},
    forward,
    identify::Connection,
    mcp::{self, Refusal, SseEvent, SseParser},
    pins::Pins,
    policy::{Caller, Decision, PolicySet, RateLimiter, ServerPolicy, ToolChange},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
/// The sending end of a re-streamed response body.
type StreamTx = mpsc::Sender<Result<Bytes, BoxError>>;

/// Largest SSE event held while incomplete, and largest JSON response inspected.
const MAX_EVENT: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body: usize,
    pub max_header: usize,
    pub header_timeout: Duration,
    pub unknown_servers: UnknownServers,
    pub denial: Denial,
    /// `audit.log_arguments`: tool-call arguments go into the audit record.
    pub log_arguments: bool,
}

/// Everything the HTTP layer needs, shared by all connections.
pub struct Enforcer {
    pub policies: RwLock<Arc<PolicySet>>,
    pub limiter: RateLimiter,
    pub pins: Pins,
    pub audit: Arc<Audit>,
    pub settings: HttpSettings,
    pub approvals: Approvals,
    /// Legacy HTTP+SSE sessions: (server, session id) -> the stream that session's answers go to.
    legacy: Mutex<HashMap<(String, String), StreamTx>>,
    /// Every address a policy's server names (literal, or resolved from its host name) -> the
    /// server. A connection to one of them is that server's whatever the agent writes in SNI,
    /// Host or path.
    named: RwLock<Arc<HashMap<SocketAddr, String>>>,
}

/// `(host, port)` of a `server.match` entry: a URL or `host:port`.
pub fn entry_host_port(entry: &str) -> Option<(String, u16)> {
    let (default_port, rest) = match entry.split_once("://") {
        Some((scheme, rest)) => (
            if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            },
            rest,
        ),
        None => (0, entry),
    };
    let authority = rest.split('/').next()?;
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h.to_string(), after.strip_prefix(':').map(str::to_string))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.to_string())),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None if default_port != 0 => default_port,
        None => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// Resolves every server's match entries to addresses (names through the system resolver).
pub async fn resolve_named(policies: &PolicySet) -> HashMap<SocketAddr, String> {
    let mut out = HashMap::new();
    for s in policies.servers() {
        for entry in s.match_entries() {
            let Some((host, port)) = entry_host_port(entry) else {
                continue;
            };
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                out.insert(
                    crate::redirect::canonical(SocketAddr::new(ip, port)),
                    s.name.clone(),
                );
                continue;
            }
            let lookup = tokio::net::lookup_host(format!("{host}:{port}"));
            match tokio::time::timeout(Duration::from_secs(3), lookup).await {
                Ok(Ok(addrs)) => {
                    for a in addrs {
                        out.entry(crate::redirect::canonical(a))
                            .or_insert_with(|| s.name.clone());
                    }
                }
                _ => tracing::warn!(
                    "{}: cannot resolve {host} (server.match of {}): matched by name only",
                    s.file,
                    s.name
                ),
            }
        }
    }
    out
}

impl Enforcer {
    pub fn new(policies: PolicySet, pins: Pins, audit: Arc<Audit>, settings: HttpSettings) -> Self {
        Enforcer {
            policies: RwLock::new(Arc::new(policies)),
            limiter: RateLimiter::new(),
            pins,
            audit,
            settings,
            approvals: Approvals::default(),
            legacy: Mutex::new(HashMap::new()),
            named: RwLock::new(Arc::new(HashMap::new())),
        }
    }

    pub fn set_named(&self, named: HashMap<SocketAddr, String>) {
        *self.named.write().unwrap() = Arc::new(named);
    }

    /// The server a policy names at this address, if any.
    pub fn named(&self, dst: SocketAddr) -> Option<String> {
        self.named
            .read()
            .unwrap()
            .get(&crate::redirect::canonical(dst))
            .cloned()
    }

    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.read().unwrap().clone()
    }

    pub fn set_policies(&self, p: PolicySet) {
        *self.policies.write().unwrap() = Arc::new(p);
    }
}

/// How the upstream connections of one client connection are made.
pub enum Connector {
    Plain,
    /// TLS to the original destination, verified for `name` (the SNI, or the address).
    Tls {
        name: rustls::pki_types::ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
}

/// The upstream side of one client connection: HTTP/1.1 connections to the original
/// destination, one per request in flight (an HTTP/2 client may have several), re-established
/// when the server closes them.
pub struct Upstream {
    dst: SocketAddr,
    connector: Connector,
    /// The TCP connection made before classification, used first.
    first: Option<TcpStream>,
    idle: Vec<Sender>,
    /// Where idle connections go when the client connection ends, and come from for the next
    /// one (TLS only: a new plain connection already has its upstream TCP connection).
    pool: Option<PoolKey>,
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// An upstream HTTP/1.1 connection's I/O, run as a task of its own until either side closes.
type ConnFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Upstream TLS connections outlive the agent connection they were made for: the next connection
/// of the same agent instance (same uid and cgroup) to the same destination, verified for the
/// same name, takes one instead of a new TCP connection and TLS handshake. Without this, every
/// new agent connection paid for two handshakes in a row. Never shared across cgroups, uids or
/// names (processes that share both can already ptrace each other); every request on it is
/// still decided for its own caller. Kept per proxy thread (the connection's I/O runs there): a
/// new connection handed to another thread makes a connection of its own.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PoolKey {
    pub dst: SocketAddr,
    pub name: String,
    pub uid: u32,
    pub cgroup_id: u64,
}

/// Idle connections kept per key, and per proxy thread in all.
const POOL_PER_KEY: usize = 4;
const POOL_TOTAL: usize = 64;
/// How long an idle connection is kept (servers close idle connections on their own too).
const POOL_IDLE: Duration = Duration::from_secs(30);

thread_local! {
    static POOL: std::cell::RefCell<HashMap<PoolKey, Vec<(Sender, Instant)>>> =
        std::cell::RefCell::new(HashMap::new());
}

fn pool_take(key: &PoolKey) -> Option<Sender> {
    // try_with: never panics, even while the thread is being torn down.
    POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.get_mut(key)?;
        let mut found = None;
        while let Some((s, at)) = list.pop() {
            if at.elapsed() < POOL_IDLE && s.is_ready() && !s.is_closed() {
                found = Some(s);
                break;
            }
        }
        if list.is_empty() {
            pool.remove(key);
        }
        found
    })
    .ok()
    .flatten()
}

/// Closes this thread's pooled connections that have been idle too long (dropping a sender
/// closes its connection) and forgets those the server closed.
fn prune(pool: &mut HashMap<PoolKey, Vec<(Sender, Instant)>>) {
    let now = Instant::now();
    pool.retain(|_, list| {
        list.retain(|(s, at)| now.duration_since(*at) < POOL_IDLE && !s.is_closed());
        !list.is_empty()
    });
}

/// Runs on every proxy thread: idle pooled connections do not outlive `POOL_IDLE` by much.
pub async fn prune_pool_forever() {
    let mut tick = tokio::time::interval(POOL_IDLE / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = POOL.try_with(|pool| prune(&mut pool.borrow_mut()));
    }
}

fn pool_put(key: &PoolKey, senders: Vec<Sender>) {
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let now = Instant::now();
        prune(&mut pool);
        let total: usize = pool.values().map(Vec::len).sum();
        let list = pool.entry(key.clone()).or_default();
        let room = POOL_TOTAL
            .saturating_sub(total)
            .min(POOL_PER_KEY.saturating_sub(list.len()));
        list.extend(senders.into_iter().take(room).map(|s| (s, now)));
        if list.is_empty() {
            pool.remove(key);
        }
    });
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let Some(key) = &self.pool else { return };
        // Only connections with nothing in flight: a response still streaming is not reusable.
        let ready: Vec<Sender> = self
            .idle
            .drain(..)
            .filter(|s| s.is_ready() && !s.is_closed())
            .collect();
        if !ready.is_empty() {
            pool_put(key, ready);
        }
    }
}

/// Connections kept per client connection beyond the one in use.
const MAX_IDLE_UPSTREAM: usize = 4;

type ResponseFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Incoming>, Failed>> + Send>>;

/// A request the upstream connection failed; `unsent` when it never went out (the connection had
/// closed: a kept-alive one the server had just given up), so it can be sent again.
struct Failed {
    msg: String,
    unsent: Option<Request<Body>>,
}

impl Upstream {
    /// `first`: a TCP connection already made to `dst`, used first (else one is made when
    /// needed).
    pub fn new(dst: SocketAddr, connector: Connector, first: Option<TcpStream>) -> Upstream {
        Upstream {
            dst,
            connector,
            first,
            idle: Vec::new(),
            pool: None,
        }
    }

    /// Reuse idle connections of earlier client connections with this key, and leave this
    /// one's for later ones.
    pub fn pooled(mut self, key: PoolKey) -> Upstream {
        self.pool = Some(key);
        self
    }

    /// A connection for one request: a pooled one when `reuse`, else a new one.
    async fn connect(&mut self, reuse: bool) -> Result<Sender, String> {
        if let Some(s) = self.pool.as_ref().filter(|_| reuse).and_then(pool_take) {
            // The connection made before classification is not needed.
            self.first = None;
            return Ok(s);
        }
        // Errors become strings here: boxed errors crossing these awaits trip the compiler's
        // higher-ranked Send check for the spawned connection task.
        let tcp = match self.first.take() {
            Some(t) => t,
            None => forward::connect(self.dst)
                .await
                .map_err(|e| e.to_string())?,
        };
        let (sender, conn) = match &self.connector {
            Connector::Plain => handshake(tcp).await?,
            Connector::Tls { name, config } => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS to the server: {e}"))?;
                handshake(tls).await?
            }
        };
        // On the proxy thread serving this client connection: a call never changes threads.
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Picks an idle connection (or makes one) and sends `req` on it; the response is awaited
    /// by the caller, without holding the upstream lock.
    /// Sends `req` on an idle or pooled connection when `reuse`, else on a new one.
    async fn start(&mut self, req: Request<Body>, reuse: bool) -> Result<ResponseFuture, String> {
        let mut sender = loop {
            match self.idle.pop() {
                _ if !reuse => break self.connect(false).await?,
                Some(s) if s.is_closed() => continue,
                Some(s) if s.is_ready() => break s,
                // Busy (a response body still streaming): keep it for later.
                Some(s) => {
                    let busy = s;
                    let fresh = self.connect(true).await?;
                    if self.idle.len() < MAX_IDLE_UPSTREAM {
                        self.idle.push(busy);
                    }
                    break fresh;
                }
                None => break self.connect(true).await?,
            }
        };
        let fut = sender.try_send_request(req);
        if self.idle.len() < MAX_IDLE_UPSTREAM {
            self.idle.push(sender);
        }
        Ok(Box::pin(async move {
            fut.await.map_err(|mut e| Failed {
                msg: e.error().to_string(),
                unsent: e.take_message(),
            })
        }))
    }
}

async fn handshake<T>(io: T) -> Result<(Sender, ConnFuture), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let conn = Box::pin(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upstream connection: {e}");
        }
    });
    Ok((sender, conn))
}

/// What a decision asks the proxy to do.
enum Outcome {
    Allow,
    Refuse(Refusal),
    Hold { rule: String, timeout_s: u64 },
}

/// Removes a held call when the request holding it ends, however it ends.
struct ForgetOnDrop<'a>(&'a Approvals, String);

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// Per-connection context.
struct Ctx {
    enf: Arc<Enforcer>,
    /// The server this connection belongs to by its destination (or SNI): every request on it is
    /// that server's, whatever its Host and path say.
    floor: Option<String>,
    conn: Connection,
    caller: Caller,
    upstream: tokio::sync::Mutex<Upstream>,
}

/// Serves HTTP on a redirected (or TLS-terminated) client connection until it closes: HTTP/2
/// when ALPN chose it, else HTTP/1.1.
pub async fn serve<C>(
    enf: Arc<Enforcer>,
    conn: Connection,
    client: C,
    upstream: Upstream,
    h2: bool,
    floor: Option<String>,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let caller = Caller {
        agent: conn.identity.agent.clone(),
        uid: conn.identity.uid,
        exe: conn.identity.exe.clone(),
        cgroup: conn.identity.cgroup.clone(),
        session: None,
    };
    let settings = enf.settings.clone();
    let ctx = Arc::new(Ctx {
        upstream: tokio::sync::Mutex::new(upstream),
        floor,
        enf,
        conn,
        caller,
    });
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let result = if h2 {
        let mut builder =
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(settings.max_header as u32);
        builder
            .serve_connection(TokioIo::new(client), service)
            .await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_timeout)
            .max_buf_size(settings.max_header.max(8192));
        builder
            .serve_connection(TokioIo::new(client), service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!("client connection: {e}");
    }
}

enum Read {
    Whole(Bytes),
    /// More than the limit: what was read, and the rest of the body still unread.
    Over {
        prefix: Bytes,
        rest: Body,
    },
    Failed(String),
}

/// Reads a body up to `max` bytes, keeping the rest unread when it is longer. Hand-rolled rather
/// than `Limited`: its boxed-error bound defeats the Send check of the spawned task.
async fn read_up_to(mut body: Body, max: usize) -> Read {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Read::Failed(e.to_string()),
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max {
                return Read::Over {
                    prefix: buf.freeze(),
                    rest: body,
                };
            }
        }
    }
    Read::Whole(buf.freeze())
}

/// `prefix` followed by the rest of `body`, streamed.
fn chain(prefix: Bytes, body: Body) -> Body {
    use futures_util::StreamExt as _;
    let head = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(prefix)) });
    let tail =
        futures_util::stream::unfold(body, |mut b| async move { b.frame().await.map(|f| (f, b)) });
    BodyExt::boxed(StreamBody::new(head.chain(tail)))
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn boxed(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// One answer event on a stream (for clients that only accept `text/event-stream`).
fn sse_response(messages: &[Value]) -> Response<Body> {
    let mut out = String::new();
    for m in messages {
        out.push_str("event: message\ndata: ");
        out.push_str(&m.to_string());
        out.push_str("\n\n");
    }
    let mut r = Response::new(full(out));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let v = v
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            v == "application/json" || v.ends_with("+json")
        })
        .unwrap_or(false)
}

fn content_type_is(headers: &HeaderMap, ct: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(ct)
        })
        .unwrap_or(false)
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `session_id` (legacy HTTP+SSE) from a request path's query.
fn query_session(uri: &http::Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "session_id" || k == "sessionId").then(|| v.to_string())
    })
}

/// Where an MCP request goes, for decisions and audit.
#[derive(Clone)]
struct Target {
    /// None: no policy matches (unknown server, let through by `unknown_servers`).
    server: Option<String>,
    host: String,
    port: u16,
    session: Option<String>,
    transport: &'static str,
}

impl Ctx {
    fn record(&self, event: &str, decision: &str, t: &Target) -> Record {
        let mut r = self.enf.audit.record(event, decision);
        r.agent = Some(AgentRef::from(&self.conn.identity));
        r.server = Some(ServerRef {
            name: t.server.clone(),
            host: t.host.clone(),
            port: t.port,
        });
        r.original_dst = Some(self.conn.original_dst.to_string());
        r.transport = Some(t.transport.into());
        r.session_id = t.session.clone();
        r
    }

    /// Writes an audit record; false (and an error log) when it cannot be written, in which case
    /// the caller fails closed.
    fn audit(&self, r: &Record) -> bool {
        match self.enf.audit.write(r) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{e:#}");
                false
            }
        }
    }

    async fn forward(&self, mut req: Request<Body>) -> Response<Body> {
        let dst = self.conn.original_dst;
        // Upstream is HTTP/1.1: an HTTP/2 request (absolute URI, :authority) becomes origin-form
        // with a Host header.
        if req.version() != http::Version::HTTP_11 && req.version() != http::Version::HTTP_10 {
            if let Some(auth) = req.uri().authority().cloned() {
                if !req.headers().contains_key(header::HOST) {
                    if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
            }
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            if let Ok(u) = pq.parse() {
                *req.uri_mut() = u;
            }
            *req.version_mut() = http::Version::HTTP_11;
        }
        match self.send(req).await {
            Ok(resp) => resp.map(boxed),
            Err(e) => {
                let mut r = self.enf.audit.record("upstream_error", "error");
                r.agent = Some(AgentRef::from(&self.conn.identity));
                r.original_dst = Some(dst.to_string());
                r.reason = Some(e.clone());
                self.audit(&r);
                text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("guard: upstream {dst} failed: {e}\n"),
                )
            }
        }
    }

    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let host_header = header_str(req.headers(), "host")
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let host = host_header
            .as_deref()
            .map(|h| {
                h.rsplit_once(':')
                    .filter(|(_, p)| p.parse::<u16>().is_ok())
                    .map_or(h, |(h, _)| h)
            })
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_else(|| self.conn.original_dst.ip().to_string());
        let policies = self.enf.policies();
        let server = policies
            .match_request(
                host_header.as_deref(),
                self.conn.original_dst,
                req.uri().path(),
            )
            .map(|s| s.name.clone())
            .or_else(|| self.floor.clone());
        let session = header_str(req.headers(), "mcp-session-id")
            .map(str::to_string)
            .or_else(|| query_session(req.uri()));
        let mut target = Target {
            server,
            host,
            port: self.conn.original_dst.port(),
            session,
            transport: "streamable-http",
        };
        if target.server.is_some() {
            // Answers guard must read (tools/list, pins) come back uncompressed.
            req.headers_mut().remove(header::ACCEPT_ENCODING);
        }
        if req.headers().contains_key(header::UPGRADE) || req.method() == Method::CONNECT {
            if target.server.is_some() {
                // A policy-named server is only reached through requests guard can read.
                let mut r = self.record("mcp_request", "deny", &target);
                r.method = Some(req.method().to_string());
                r.rule = Some("policy.server".into());
                r.reason = Some(
                    "protocol upgrades and CONNECT to a policy-named MCP server are refused".into(),
                );
                self.audit(&r);
                return text_response(
                    StatusCode::FORBIDDEN,
                    "guard: protocol upgrades to a policy-named MCP server are refused\n".into(),
                );
            }
            if req.method() == Method::CONNECT {
                // A tunnel through an HTTP proxy to a policy-named server would carry its MCP
                // past guard: refused.
                if let Some(name) = self.connect_target_named(req.uri(), &policies).await {
                    let mut r = self.record("mcp_request", "deny", &target);
                    r.method = Some("CONNECT".into());
                    r.rule = Some("policy.server".into());
                    r.reason = Some(format!(
                        "CONNECT tunnel to the policy-named MCP server {name}"
                    ));
                    self.audit(&r);
                    return text_response(
                        StatusCode::FORBIDDEN,
                        format!("guard: a CONNECT tunnel to the MCP server {name} is refused\n"),
                    );
                }
            }
            return self.forward_upgrade(req).await;
        }
        let bodyless = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
            || header_str(req.headers(), "content-length").is_some_and(|l| l.trim() != "0");
        if bodyless {
            if target.server.is_some() && has_body {
                // Nothing guard does not read reaches a policy-named server.
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "guard: a {} with a body to a policy-named MCP server is refused\n",
                        req.method()
                    ),
                );
            }
            // GET streams, DELETE, and the like: forwarded; MCP streams inspected.
            let req = req.map(boxed);
            let resp = self.forward(req).await;
            return match &target.server {
                Some(name) => {
                    self.inspect_response(resp, policies, name.clone(), &mut target)
                        .await
                }
                None => resp,
            };
        }

        // Every body is read (up to proxy.max_body) and checked for MCP, whatever its
        // Content-Type says: JSON-RPC to an unknown server must not slip past as text/plain.
        let (parts, body) = req.into_parts();
        let max = self.enf.settings.max_body;
        let bytes = match read_up_to(boxed(body), max).await {
            Read::Whole(b) => b,
            Read::Over { prefix, rest } => {
                let looks_json = prefix
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|b| *b == b'{' || *b == b'[');
                if target.server.is_none() && !looks_json {
                    // A large upload that is not JSON: not MCP, streamed on unchanged.
                    let req = Request::from_parts(parts, chain(prefix, rest));
                    return self.forward(req).await;
                }
                let mut r = self.record("limit", "deny", &target);
                r.reason = Some(format!("request body over proxy.max_body ({max} bytes)"));
                r.rule = Some("proxy.max_body".into());
                self.audit(&r);
                return text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("guard: request body exceeds proxy.max_body ({max} bytes)\n"),
                );
            }
            Read::Failed(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("guard: reading the request body: {e}\n"),
                );
            }
        };
        let parsed = mcp::parse_body(&bytes);
        let body = match (&target.server, parsed) {
            (_, Ok(b)) if target.server.is_some() || mcp::looks_like_mcp(&b) => b,
            (Some(_), Err(e)) => {
                let mut r = self.record("tool_call", "deny", &target);
                r.reason = Some(format!("malformed JSON-RPC: {e}"));
                r.rule = Some("protocol".into());
                self.audit(&r);
                let code = if matches!(e, mcp::BodyError::Json(_)) {
                    mcp::PARSE_ERROR
                } else {
                    mcp::INVALID_REQUEST
                };
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &mcp::error(&Value::Null, code, &format!("guard: {e}")),
                );
            }
            // JSON that is not MCP, to a server no policy names: not ours to judge.
            _ => {
                let req = Request::from_parts(parts, full(bytes));
                return self.forward(req).await;
            }
        };
        if target.server.is_none() {
            match self.enf.settings.unknown_servers {
                UnknownServers::Deny => return self.refuse_unknown(&parts.headers, &body, &target),
                UnknownServers::Allow | UnknownServers::Audit => {}
            }
        }
        if target.server.is_some() && self.legacy_key(&target).is_some() {
            target.transport = "sse";
        }
        let resp = match self
            .enforce(&parts.headers, &body, &target, &policies, started)
            .await
        {
            Some(answer) => return answer,
            None => {
                let req = Request::from_parts(parts, full(bytes));
                self.forward(req).await
            }
        };
        // Only an answer to a tools/list carries tool definitions; other answers (tools/call
        // results above all) stream through without being buffered or parsed.
        let lists = body
            .messages
            .iter()
            .any(|m| m.method.as_deref() == Some("tools/list"));
        match target.server.clone() {
            Some(name) if lists => {
                self.inspect_response(resp, policies, name, &mut target)
                    .await
            }
            _ => resp,
        }
    }

    /// The policy-named server a CONNECT's authority points at, by name or address.
    async fn connect_target_named(&self, uri: &http::Uri, policies: &PolicySet) -> Option<String> {
        let auth = uri.authority()?;
        let host = auth
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = auth.port_u16().unwrap_or(443);
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::lookup_host(format!("{host}:{port}")),
            )
            .await
            {
                Ok(Ok(a)) => a.collect(),
                // Cannot tell: a named host that does not resolve here is still named.
                _ => vec![],
            },
        };
        for a in &addrs {
            if let Some(n) = self.enf.named(*a) {
                return Some(n);
            }
            if let Some(s) = policies.match_sni(Some(&host), *a) {
                return Some(s.name.clone());
            }
        }
        let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        policies.match_sni(Some(&host), any).map(|s| s.name.clone())
    }

    /// Sends `req` upstream; once more on a new connection when the one it was given had closed
    /// before the request went out.
    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        let started = self.upstream.lock().await.start(req, true).await?;
        match started.await {
            Ok(resp) => Ok(resp),
            Err(Failed {
                unsent: Some(req), ..
            }) => {
                let again = self.upstream.lock().await.start(req, false).await?;
                again.await.map_err(|f| f.msg)
            }
            Err(f) => Err(f.msg),
        }
    }

    /// `Upgrade` requests (WebSocket and the like): forwarded, then spliced both ways.
    async fn forward_upgrade(&self, mut req: Request<Incoming>) -> Response<Body> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let mut resp = match self.send(req.map(boxed)).await {
            Ok(r) => r,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("guard: upstream failed: {e}\n"),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let server_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                    let mut c = TokioIo::new(c);
                    let mut s = TokioIo::new(s);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
        resp.map(boxed)
    }

    fn legacy_key(&self, t: &Target) -> Option<(String, String)> {
        let key = (t.server.clone()?, t.session.clone()?);
        self.enf
            .legacy
            .lock()
            .unwrap()
            .contains_key(&key)
            .then_some(key)
    }

    fn refuse_unknown(&self, headers: &HeaderMap, body: &mcp::Body, t: &Target) -> Response<Body> {
        let mut answers = Vec::new();
        for m in &body.messages {
            let mut r = self.record(
                if m.method.as_deref() == Some("tools/call") {
                    "tool_call"
                } else {
                    "mcp_request"
                },
                "deny",
                t,
            );
            r.method = m.method.clone();
            r.tool = m.tool().map(str::to_string);
            r.jsonrpc_id = m.id.clone();
            r.rule = Some("policy.unknown_servers".into());
            r.reason = Some(format!(
                "no policy names the MCP server {}:{}",
                t.host, t.port
            ));
            self.audit(&r);
            if let (Some(id), true) = (&m.id, m.is_request()) {
                let refusal = Refusal {
                    code: mcp::UNKNOWN_SERVER,
                    decision: "unknown_server",
                    server: format!("{}:{}", t.host, t.port),
                    tool: m.tool().map(str::to_string),
                    rule: "policy.unknown_servers".into(),
                    reason: format!("no policy names the MCP server {}:{}", t.host, t.port),
                    retry_after_s: None,
                    audit_id: r.id.clone(),
                };
                answers.push(refusal.error(id));
            }
        }
        if answers.is_empty() {
            return text_response(
                StatusCode::FORBIDDEN,
                format!(
                    "guard: no policy names the MCP server {}:{}\n",
                    t.host, t.port
                ),
            );
        }
        self.answer(headers, body.batch, answers)
    }

    /// An answer guard gives itself: JSON, or one SSE stream when the client accepts only that.
    fn answer(&self, headers: &HeaderMap, batch: bool, answers: Vec<Value>) -> Response<Body> {
        let accept = header_str(headers, "accept").unwrap_or("application/json");
        let json_ok = accept.contains("application/json")
            || accept.contains("*/*")
            || !accept.contains("text/event-stream");
        if !json_ok {
            return sse_response(&answers);
        }
        if batch {
            json_response(StatusCode::OK, &Value::Array(answers))
        } else {
            json_response(
                StatusCode::OK,
                &answers.into_iter().next().unwrap_or(Value::Null),
            )
        }
    }

    /// Decides every message of a POST. Returns the answer to give instead of forwarding, or
    /// None when the body may go to the server as it is.
    async fn enforce(
        &self,
        headers: &HeaderMap,
        body: &mcp::Body,
        t: &Target,
        policies: &Arc<PolicySet>,
        started: Instant,
    ) -> Option<Response<Body>> {
        // 2026-07-28 draft headers must agree with the body the policy reads.
        if let Some(refusal) = self.check_headers(headers, body, t) {
            return Some(refusal);
        }
        let server = t.server.as_deref().and_then(|n| policies.by_name(n));
        let mut caller = self.caller.clone();
        caller.session = t.session.clone();
        let mut refusals: Vec<(usize, Value)> = Vec::new();
        let mut first_refused: Option<String> = None;
        for (i, m) in body.messages.iter().enumerate() {
            if m.method.as_deref() != Some("tools/call") {
                continue;
            }
            let id = m.id.clone().unwrap_or(Value::Null);
            let tool = m.tool().unwrap_or("").to_string();
            let args = m.arguments();
            let mut r = self.record("tool_call", "allow", t);
            r.method = m.method.clone();
            r.tool = Some(tool.clone());
            r.jsonrpc_id = Some(id.clone());
            r.args_sha256 = Some(mcp::sha256_hex(&args));
            if self.enf.settings.log_arguments {
                r.arguments = Some(args.clone());
            }
            let refusal = match server {
                // A call with no id is a "notification" no answer can refuse, yet lenient servers
                // run it: never forwarded.
                _ if !m.is_request() => {
                    r.decision = "deny".into();
                    r.rule = Some("protocol".into());
                    let reason = "tools/call without an id is refused".to_string();
                    r.reason = Some(reason.clone());
                    Some(Refusal {
                        code: mcp::DENIED,
                        decision: "deny",
                        server: t.server.clone().unwrap_or_default(),
                        tool: Some(tool.clone()),
                        rule: "protocol".into(),
                        reason,
                        retry_after_s: None,
                        audit_id: String::new(),
                    })
                }
                None => {
                    // Unknown server let through by unknown_servers = allow | audit.
                    r.rule = Some("policy.unknown_servers".into());
                    None
                }
                Some(sp) => match self.decide(sp, &tool, &args, &caller, &mut r) {
                    Outcome::Allow => None,
                    Outcome::Refuse(x) => Some(x),
                    Outcome::Hold { rule, timeout_s } => {
                        self.hold(sp, &tool, &args, &caller, rule, timeout_s, t, &mut r)
                            .await
                    }
                },
            };
            r.latency_us = Some(started.elapsed().as_micros() as u64);
            if !self.audit(&r) {
                // No record, no call.
                return Some(text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "guard: audit log unavailable\n".into(),
                ));
            }
            if let Some(mut refusal) = refusal {
                refusal.audit_id = r.id.clone();
                first_refused.get_or_insert_with(|| tool.clone());
                let v = match self.enf.settings.denial {
                    Denial::Error => refusal.error(&id),
                    Denial::ToolResult => refusal.tool_result(&id),
                };
                refusals.push((i, v));
            }
        }
        if refusals.is_empty() {
            return None;
        }
        // Nothing of a body with a refused call is forwarded; every request in it is answered.
        let mut answers = Vec::new();
        for (i, m) in body.messages.iter().enumerate() {
            if let Some((_, v)) = refusals.iter().find(|(j, _)| *j == i) {
                answers.push(v.clone());
            } else if let (true, Some(id)) = (m.is_request(), &m.id) {
                let reason = format!(
                    "not forwarded: the batch contained a blocked call ({})",
                    first_refused.as_deref().unwrap_or("?")
                );
                let mut r = self.record("mcp_request", "deny", t);
                r.method = m.method.clone();
                r.jsonrpc_id = Some(id.clone());
                r.rule = Some("batch".into());
                r.reason = Some(reason.clone());
                self.audit(&r);
                let refusal = Refusal {
                    code: mcp::DENIED,
                    decision: "deny",
                    server: t.server.clone().unwrap_or_default(),
                    tool: m.tool().map(str::to_string),
                    rule: "batch".into(),
                    reason,
                    retry_after_s: None,
                    audit_id: r.id.clone(),
                };
                answers.push(refusal.error(id));
            }
        }
        // Legacy HTTP+SSE: the POST is accepted and the answer travels on the session's stream.
        if let Some(key) = self.legacy_key(t) {
            let tx = self.enf.legacy.lock().unwrap().get(&key).cloned();
            if let Some(tx) = tx {
                let events: Vec<Bytes> = answers
                    .iter()
                    .map(|a| Bytes::from(format!("event: message\ndata: {a}\n\n")))
                    .collect();
                drop(answers);
                for ev in events {
                    let _ = tx.send(Ok(ev)).await;
                }
                let mut resp = Response::new(full("Accepted"));
                *resp.status_mut() = StatusCode::ACCEPTED;
                return Some(resp);
            }
        }
        Some(self.answer(headers, body.batch, answers))
    }

    fn decide(
        &self,
        sp: &ServerPolicy,
        tool: &str,
        args: &Value,
        caller: &Caller,
        r: &mut Record,
    ) -> Outcome {
        let refusal = |code, decision, rule: String, reason: String, retry| Refusal {
            code,
            decision,
            server: sp.name.clone(),
            tool: Some(tool.to_string()),
            rule,
            reason,
            retry_after_s: retry,
            audit_id: String::new(),
        };
        if sp.on_tool_change == ToolChange::Block && self.enf.pins.blocked(&sp.name, tool) {
            r.decision = "tool_changed".into();
            r.rule = Some("on_tool_change".into());
            let reason = "the tool's definition changed since it was pinned".to_string();
            r.reason = Some(reason.clone());
            return Outcome::Refuse(refusal(
                mcp::TOOL_CHANGED,
                "tool_changed",
                "on_tool_change".into(),
                reason,
                None,
            ));
        }
        match sp.decide(tool, args, caller, &self.enf.limiter, Instant::now()) {
            Decision::Allow { rule } => {
                r.rule = Some(rule);
                Outcome::Allow
            }
            Decision::Deny { rule, reason } => {
                r.decision = "deny".into();
                r.rule = Some(rule.clone());
                r.reason = Some(reason.clone());
                Outcome::Refuse(refusal(mcp::DENIED, "deny", rule, reason, None))
            }
            Decision::RateLimited {
                rule,
                reason,
                retry_after_s,
            } => {
                r.decision = "rate_limited".into();
                r.rule = Some(rule.clone());
                r.reason = Some(reason.clone());
                Outcome::Refuse(refusal(
                    mcp::RATE_LIMITED,
                    "rate_limited",
                    rule,
                    reason,
                    Some(retry_after_s),
                ))
            }
            Decision::RequireApproval { rule, timeout_s } => Outcome::Hold { rule, timeout_s },
        }
    }

    /// Holds a `require_approval` call until an approver answers or the time runs out.
    #[allow(clippy::too_many_arguments)]
    async fn hold(
        &self,
        sp: &ServerPolicy,
        tool: &str,
        args: &Value,
        caller: &Caller,
        rule: String,
        timeout_s: u64,
        t: &Target,
        r: &mut Record,
    ) -> Option<Refusal> {
        let approvals = &self.enf.approvals;
        let args_sha = r.args_sha256.clone().unwrap_or_default();
        r.rule = Some(rule.clone());
        if approvals.standing(
            &agent_key(&caller.agent, caller.uid),
            &sp.name,
            tool,
            &args_sha,
        ) {
            r.reason = Some("approved earlier for identical calls (approve --for)".into());
            return None;
        }
        let (id, rx) = approvals.request(Held {
            id: String::new(),
            agent: caller.agent.clone(),
            uid: caller.uid,
            pid: self.conn.identity.pid,
            server: sp.name.clone(),
            tool: tool.to_string(),
            arguments: args.clone(),
            args_sha256: args_sha,
            requested_at: 0,
            timeout_s,
            created: None,
        });
        // An agent that goes away takes its held call with it.
        let _forget = ForgetOnDrop(approvals, id.clone());
        let mut p = self.record("approval", "pending", t);
        p.tool = Some(tool.to_string());
        p.rule = Some(rule.clone());
        p.args_sha256 = r.args_sha256.clone();
        p.jsonrpc_id = r.jsonrpc_id.clone();
        p.detail = Some(json!({ "approval_id": id, "timeout_s": timeout_s }));
        self.audit(&p);
        let verdict = tokio::time::timeout(Duration::from_secs(timeout_s), rx).await;
        let refusal = |code, decision: &'static str, reason: String| Refusal {
            code,
            decision,
            server: sp.name.clone(),
            tool: Some(tool.to_string()),
            rule: rule.clone(),
            reason,
            retry_after_s: None,
            audit_id: String::new(),
        };
        let (decision, code, reason) = match verdict {
            Ok(Ok(Verdict::Approved { by })) => {
                r.reason = Some(format!("approved by uid {by} (approval {id})"));
                return None;
            }
            Ok(Ok(Verdict::Denied { reason, .. })) => {
                ("approval_denied", mcp::APPROVAL_DENIED, reason)
            }
            Ok(Ok(Verdict::Shutdown)) | Ok(Err(_)) => (
                "approval_denied",
                mcp::APPROVAL_DENIED,
                "the guard daemon stopped before an approver answered".to_string(),
            ),
            Err(_) => {
                approvals.remove(&id);
                let mut a = self.record("approval", "timeout", t);
                a.tool = Some(tool.to_string());
                a.rule = Some(rule.clone());
                a.detail = Some(json!({ "approval_id": id }));
                self.audit(&a);
                (
                    "approval_timeout",
                    mcp::APPROVAL_TIMEOUT,
                    format!("no approver answered within {timeout_s} s"),
                )
            }
        };
        r.decision = decision.into();
        r.reason = Some(reason.clone());
        Some(refusal(code, decision, reason))
    }

    fn check_headers(
        &self,
        headers: &HeaderMap,
        body: &mcp::Body,
        t: &Target,
    ) -> Option<Response<Body>> {
        let hm = header_str(headers, "mcp-method");
        let hn = header_str(headers, "mcp-name");
        if hm.is_none() && hn.is_none() {
            return None;
        }
        let problem = if body.batch {
            Some("Mcp-Method / Mcp-Name headers cannot describe a batch".to_string())
        } else {
            let m = &body.messages[0];
            let method = m.method.as_deref().unwrap_or("");
            let name = match method {
                "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                    m.params.get("uri").and_then(Value::as_str)
                }
                _ => m.params.get("name").and_then(Value::as_str),
            };
            match (hm, hn) {
                (Some(h), _) if h != method => Some(format!(
                    "Mcp-Method header \"{h}\" does not match the body's method \"{method}\""
                )),
                (_, Some(h)) if Some(h) != name => Some(format!(
                    "Mcp-Name header \"{h}\" does not match the body's name \"{}\"",
                    name.unwrap_or("")
                )),
                _ => None,
            }
        };
        let problem = problem?;
        let m = &body.messages[0];
        let mut r = self.record("tool_call", "deny", t);
        r.method = m.method.clone();
        r.tool = m.tool().map(str::to_string);
        r.jsonrpc_id = m.id.clone();
        r.rule = Some("headers".into());
        r.reason = Some(problem.clone());
        self.audit(&r);
        let id = m.id.clone().unwrap_or(Value::Null);
        let refusal = Refusal {
            code: mcp::DENIED,
            decision: "deny",
            server: t.server.clone().unwrap_or_default(),
            tool: m.tool().map(str::to_string),
            rule: "headers".into(),
            reason: problem,
            retry_after_s: None,
            audit_id: r.id,
        };
        Some(json_response(StatusCode::BAD_REQUEST, &refusal.error(&id)))
    }

    /// Filters `tools/list` results in a response from a policy-named server, JSON or SSE,
    /// and records tool definitions for pinning. Legacy SSE endpoints are registered so guard
    /// can answer on that session's stream.
    async fn inspect_response(
        self: &Arc<Self>,
        resp: Response<Body>,
        policies: Arc<PolicySet>,
        server: String,
        t: &mut Target,
    ) -> Response<Body> {
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
        if encoded
            && (is_json(resp.headers()) || content_type_is(resp.headers(), "text/event-stream"))
        {
            // Compressed despite the request: guard cannot filter it, so it is not passed on.
            return text_response(
                StatusCode::BAD_GATEWAY,
                "guard: the MCP server answered with a Content-Encoding guard cannot inspect\n"
                    .into(),
            );
        }
        if content_type_is(resp.headers(), "text/event-stream") {
            return self
                .clone()
                .filter_stream(resp, policies, server, t.clone());
        }
        if !is_json(resp.headers()) {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        let bytes = match read_up_to(body, MAX_EVENT).await {
            Read::Whole(b) => b,
            Read::Over { .. } => {
                return text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("guard: the server's answer is over {MAX_EVENT} bytes\n"),
                )
            }
            Read::Failed(e) => {
                return text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("guard: reading the server's answer: {e}\n"),
                )
            }
        };
        let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
            return Response::from_parts(parts, full(bytes));
        };
        let changed = match &mut v {
            Value::Array(items) => {
                // Every message is filtered (no short-circuit).
                let mut changed = false;
                for m in items.iter_mut() {
                    changed |= self.filter_message(m, &policies, &server, t);
                }
                changed
            }
            m => self.filter_message(m, &policies, &server, t),
        };
        if !changed {
            return Response::from_parts(parts, full(bytes));
        }
        let out = serde_json::to_vec(&v).unwrap_or_default();
        parts.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(parts, full(out))
    }

    /// Applies policy to one server message; true when it was changed.
    fn filter_message(
        &self,
        m: &mut Value,
        policies: &PolicySet,
        server: &str,
        t: &Target,
    ) -> bool {
        let Some(tools) = mcp::tools_of(m) else {
            return false;
        };
        let Some(sp) = policies.by_name(server) else {
            return false;
        };
        let accept = sp.on_tool_change == ToolChange::Allow;
        match self.enf.pins.observe(server, tools, accept) {
            Ok(changes) => {
                for c in changes {
                    let mut r =
                        self.record("tool_changed", if accept { "allow" } else { "block" }, t);
                    r.tool = Some(c.tool.clone());
                    r.rule = Some("on_tool_change".into());
                    r.reason = Some(format!(
                        "definition hash {} differs from the pinned {}",
                        c.seen, c.pinned
                    ));
                    self.audit(&r);
                }
            }
            Err(e) => tracing::error!("tool pins for {server}: {e:#}"),
        }
        let mut caller = self.caller.clone();
        caller.session = t.session.clone();
        let pins = &self.enf.pins;
        let block_changed = sp.on_tool_change == ToolChange::Block;
        let removed = mcp::filter_tools(m, |name| {
            sp.visible(name, &caller) && !(block_changed && pins.blocked(server, name))
        });
        let mut r = self.record("tools_list", "filter", t);
        r.method = Some("tools/list".into());
        r.jsonrpc_id = m.get("id").cloned();
        r.detail = Some(json!({ "hidden": removed }));
        if !self.audit(&r) {
            // No record, no list: the agent sees no tools rather than an unaudited list.
            if let Some(tools) = m
                .get_mut("result")
                .and_then(|r| r.get_mut("tools"))
                .and_then(Value::as_array_mut)
            {
                tools.clear();
            }
            return true;
        }
        !removed.is_empty()
    }

    /// Re-streams an SSE response event by event.
    fn filter_stream(
        self: Arc<Self>,
        resp: Response<Body>,
        policies: Arc<PolicySet>,
        server: String,
        mut t: Target,
    ) -> Response<Body> {
        let (mut parts, mut body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(64);
        let me = self;
        tokio::spawn(async move {
            let mut parser = SseParser::new(MAX_EVENT);
            let mut registered: Option<(String, String)> = None;
            'read: while let Some(frame) = body.frame().await {
                let data = match frame {
                    Ok(f) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                let events = match parser.push(&data) {
                    Ok(evs) => evs,
                    Err(n) => {
                        let _ = tx
                            .send(Err(format!("guard: SSE event larger than {n} bytes").into()))
                            .await;
                        break;
                    }
                };
                for ev in events {
                    if ev.event.as_deref() == Some("endpoint") {
                        // Legacy HTTP+SSE: this stream carries the answers of the session the
                        // endpoint names.
                        if let Some(session) = ev
                            .data
                            .as_deref()
                            .and_then(|d| d.parse::<http::Uri>().ok())
                            .and_then(|u| query_session(&u))
                        {
                            let key = (server.clone(), session.clone());
                            me.enf
                                .legacy
                                .lock()
                                .unwrap()
                                .insert(key.clone(), tx.clone());
                            if let Some(old) = registered.replace(key) {
                                me.enf.legacy.lock().unwrap().remove(&old);
                            }
                            t.session = Some(session);
                            t.transport = "sse";
                        }
                    }
                    let out = me.filter_event(&ev, &policies, &server, &t);
                    if tx.send(Ok(out)).await.is_err() {
                        break 'read;
                    }
                }
            }
            let rest = parser.rest();
            if !rest.is_empty() {
                let _ = tx.send(Ok(rest)).await;
            }
            if let Some(key) = registered {
                me.enf.legacy.lock().unwrap().remove(&key);
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item.map(Frame::data), rx))
        });
        Response::from_parts(parts, StreamBody::new(stream).boxed())
    }

    fn filter_event(&self, ev: &SseEvent, policies: &PolicySet, server: &str, t: &Target) -> Bytes {
        let Some(data) = &ev.data else {
            return ev.raw.clone();
        };
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            return ev.raw.clone();
        };
        if self.filter_message(&mut v, policies, server, t) {
            ev.with_data(&v.to_string())
        } else {
            ev.raw.clone()
        }
    }
}

#[cfg(test)]
mod entry_tests {
    use super::entry_host_port;

    #[test]
    fn match_entries_to_host_and_port() {
        assert_eq!(
            entry_host_port("https://api.acedata.cloud/flux/mcp"),
            Some(("api.acedata.cloud".into(), 443))
        );
        assert_eq!(
            entry_host_port("http://Example.com:8080/mcp"),
            Some(("example.com".into(), 8080))
        );
        assert_eq!(
            entry_host_port("127.0.0.1:8000"),
            Some(("127.0.0.1".into(), 8000))
        );
        assert_eq!(entry_host_port("[::1]:3001"), Some(("::1".into(), 3001)));
        assert_eq!(
            entry_host_port("http://[::1]/mcp"),
            Some(("::1".into(), 80))
        );
        assert_eq!(entry_host_port("example.com"), None);
    }
}
