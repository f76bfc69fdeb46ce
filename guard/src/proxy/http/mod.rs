//! HTTP in the proxy: hyper serves the agent's connection (HTTP/1.1, or HTTP/2 when ALPN or the
//! h2c preface chose it) and every request is routed here: protocol upgrades (CONNECT tunnels
//! are refused), bodyless requests (GET streams, DELETE), and requests with a body, which go to the
//! MCP adapter ([`mcp`](self::mcp)) when they are MCP. Requests go upstream over HTTP/1.1
//! ([`upstream`]); everything that is not MCP passes unchanged.

mod body;
mod legacy;
mod mcp;
mod pool;
mod upstream;

pub use body::{Body, BoxError};
pub use pool::{prune_pool_forever, PoolKey};
pub use upstream::{Connector, Upstream};

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};

use self::{
    body::{boxed, header_str, query_session, text_response},
    legacy::Legacy,
    upstream::Failed,
};
use super::{
    fairness::{BodyBytes, Hold},
    identify::Connection,
    named::Named,
};
use crate::{
    audit::{AgentRef, Decision, Event},
    config::OtherTraffic,
    mcp::{Engine, Target, Transport},
    policy::{Among, PolicySet},
};

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body: usize,
    pub max_header: usize,
    pub header_timeout: Duration,
    /// The part of a request body guard reads must arrive within this.
    pub body_timeout: Duration,
    /// `proxy.other`: what switched protocols (WebSocket and the like) to servers no policy
    /// names are, like TCP guard cannot read: spliced, or refused.
    pub upgrades: OtherTraffic,
}

/// Requests at once on one HTTP/2 connection: its streams share the connection's slot, so one
/// connection must not become thousands of requests.
const MAX_H2_STREAMS: u32 = 32;

/// What the HTTP layer shares across connections: the enforcement core, its limits, the
/// addresses policies name, and the legacy HTTP+SSE sessions.
pub struct HttpLayer {
    pub engine: Arc<Engine>,
    pub settings: HttpSettings,
    pub named: Arc<Named>,
    legacy: Legacy,
    /// Request bodies held in memory, per agent (16 × `max_body`).
    bodies: Arc<BodyBytes>,
}

impl HttpLayer {
    pub fn new(engine: Arc<Engine>, settings: HttpSettings, named: Arc<Named>) -> HttpLayer {
        HttpLayer {
            bodies: Arc::new(BodyBytes::new(settings.max_body.saturating_mul(16))),
            engine,
            settings,
            named,
            legacy: Legacy::default(),
        }
    }
}

/// One client connection.
struct Ctx {
    http: Arc<HttpLayer>,
    /// The server this connection belongs to by its destination (or SNI): every request on it is
    /// that server's, whatever its Host and path say.
    floor: Option<String>,
    conn: Connection,
    upstream: tokio::sync::Mutex<Upstream>,
    /// The connection's place in the limits, kept by tunnels that outlive the HTTP exchange.
    hold: Hold,
}

/// Serves HTTP on a redirected (or TLS-terminated) client connection until it closes: HTTP/2
/// when `h2`, else HTTP/1.1.
pub async fn serve<C>(
    http: Arc<HttpLayer>,
    conn: Connection,
    client: C,
    upstream: Upstream,
    h2: bool,
    floor: Option<String>,
    hold: Hold,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let settings = http.settings.clone();
    let ctx = Arc::new(Ctx {
        upstream: tokio::sync::Mutex::new(upstream),
        floor,
        http,
        conn,
        hold,
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
            .max_concurrent_streams(MAX_H2_STREAMS)
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

impl Ctx {
    fn engine(&self) -> &Engine {
        &self.http.engine
    }

    /// Where a request goes: the server by its Host, destination and path (or, failing that,
    /// by the connection's destination), its MCP session; and why it must be refused, when the
    /// destination is shared by several policies and none (or more than one) fits it.
    fn target(
        &self,
        req: &Request<Incoming>,
        policies: &PolicySet,
        received: Instant,
    ) -> (Target, Option<String>) {
        // A request-target in absolute form names the server a server reads (RFC 9112 §3.2.2:
        // it wins over Host); one that disagrees with Host is refused.
        let in_target = req.uri().authority().map(|a| a.to_string());
        let host_field = header_str(req.headers(), "host").map(str::to_string);
        let mismatch = match (&in_target, &host_field) {
            (Some(t), Some(h)) => {
                let https = req.uri().scheme_str() == Some("https");
                let plain = |s: &str| {
                    let s = s.to_ascii_lowercase();
                    let default = if https { ":443" } else { ":80" };
                    s.strip_suffix(default).map(str::to_string).unwrap_or(s)
                };
                (plain(t) != plain(h)).then(|| {
                    format!(
                        "the request names {t:?} in its target and {h:?} in Host; send one name"
                    )
                })
            }
            _ => None,
        };
        let host_header = in_target.or(host_field);
        let host = host_header
            .as_deref()
            .map(|h| {
                h.rsplit_once(':')
                    .filter(|(_, p)| p.parse::<u16>().is_ok())
                    .map_or(h, |(h, _)| h)
            })
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_else(|| self.conn.original_dst.ip().to_string());
        let chosen = policies
            .match_request(
                host_header.as_deref(),
                self.conn.original_dst,
                req.uri().path(),
            )
            .map(|s| s.name.clone());
        let dst = self.conn.original_dst;
        let here = self.http.named.at(dst);
        let (server, refusal) = if here.len() > 1 {
            // A shared address: Host and path choose among its servers only, read as servers
            // read them; what fits none or several is refused, not given to whichever policy
            // was loaded first.
            match policies.choose_among(&here, host_header.as_deref(), dst, req.uri().path()) {
                Among::One(s) => (Some(s.name.clone()), None),
                // (Also over TLS: an SNI that several of them fit chose by load order.)
                Among::Unmatched => (
                    None,
                    Some(format!(
                        "several policies name {dst} ({}) and none of them covers this request's Host and path; write the path as the server's policy names it",
                        here.join(", ")
                    )),
                ),
                Among::Ambiguous(why) => (
                    None,
                    Some(format!(
                        "at {dst}: {why}; write the path as the server's policy names it"
                    )),
                ),
            }
        } else {
            // A Host naming another server never moves the request (see `Named::decide`).
            let server = self.http.named.decide(dst, chosen, self.floor.as_deref());
            (server, None)
        };
        let at_destination = server
            .as_deref()
            .is_some_and(|s| self.http.named.owns(self.conn.original_dst, s));
        let session = header_str(req.headers(), "mcp-session-id")
            .map(str::to_string)
            .or_else(|| query_session(req.uri()));
        let refusal = mismatch.or(refusal);
        let target = Target {
            server,
            host,
            port: self.conn.original_dst.port(),
            original_dst: Some(self.conn.original_dst),
            at_destination,
            pin_scope: None,
            session,
            protocol_version: header_str(req.headers(), "mcp-protocol-version")
                .map(|v| crate::audit::clip(v, 64).into_owned()),
            traceparent: header_str(req.headers(), "traceparent")
                .filter(|v| crate::audit::parse_traceparent(v).is_some())
                .map(str::to_string),
            command: None,
            transport: Transport::StreamableHttp,
            received,
        };
        (target, refusal)
    }

    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let policies = self.engine().policies();
        let (target, refusal) = self.target(&req, &policies, Instant::now());
        if let Some(reason) = refusal {
            self.engine().audit_refused(
                Event::McpRequest,
                &self.conn.identity,
                &target,
                Some(req.method().as_str()),
                "server.match",
                &reason,
            );
            return text_response(StatusCode::FORBIDDEN, format!("guard: {reason}\n"));
        }
        if target.server.is_some() {
            // Answers guard must read (tools/list, pins) come back uncompressed.
            req.headers_mut().remove(header::ACCEPT_ENCODING);
        }
        // A body, whatever the method and headers say (HTTP/2 DATA frames need neither
        // Content-Length nor Transfer-Encoding).
        let has_body = !req.body().is_end_stream()
            || req.headers().contains_key(header::TRANSFER_ENCODING)
            || header_str(req.headers(), "content-length").is_some_and(|l| l.trim() != "0");
        if req.method() == Method::CONNECT {
            // A tunnel carries whatever the agent sends next past guard's reading (TLS to a
            // named server through a proxy, a request pipelined into a catch-all server), and
            // proves nothing about where it ends: refused.
            let reason = "CONNECT tunnels are refused: guard cannot read what they carry";
            self.engine().audit_refused(
                Event::McpRequest,
                &self.conn.identity,
                &target,
                Some("CONNECT"),
                "protocol",
                reason,
            );
            return text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("guard: {reason}; connect to the server directly (guard sees it there)\n"),
            );
        }
        if req.headers().contains_key(header::UPGRADE) && !has_body {
            return self.upgrade(req, &target).await;
        }
        if req.headers().contains_key(header::UPGRADE) {
            // An upgrade with a body would be forwarded with its body unread (a server may read
            // it before it answers, or never switch): the body is read like any other, and the
            // request goes on without asking to switch.
            strip_upgrade(req.headers_mut());
        }
        let bodyless = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        // A body on a GET or DELETE to a server no policy names is read and checked like a
        // POST's; to a named one it is refused (in `bodyless`).
        if bodyless && (!has_body || target.server.is_some()) {
            return self.bodyless(req, target, has_body).await;
        }
        self.with_body(req, target).await
    }

    /// `Upgrade` requests (WebSocket and the like): forwarded and then spliced, except towards a
    /// policy-named server, which is only reached through requests guard can read.
    async fn upgrade(&self, req: Request<Incoming>, target: &Target) -> Response<Body> {
        let caller = &self.conn.identity;
        if target.server.is_none() && self.http.settings.upgrades == OtherTraffic::Deny {
            let reason = "protocol upgrades carry what guard cannot read (proxy.other = \"deny\")";
            self.engine().audit_refused(
                Event::McpRequest,
                caller,
                target,
                Some(req.method().as_str()),
                "proxy.other",
                reason,
            );
            return text_response(StatusCode::FORBIDDEN, format!("guard: {reason}\n"));
        }
        if target.server.is_some() {
            let reason = "protocol upgrades to a policy-named MCP server are refused";
            let method = req.method().to_string();
            self.engine().audit_refused(
                Event::McpRequest,
                caller,
                target,
                Some(&method),
                "policy.server",
                reason,
            );
            return text_response(
                StatusCode::FORBIDDEN,
                "guard: protocol upgrades to a policy-named MCP server are refused\n".into(),
            );
        }
        self.forward_upgrade(req).await
    }

    /// GET streams, DELETE and the like: forwarded, and MCP streams inspected. A body on them
    /// is refused towards a policy-named server (nothing guard does not read reaches it).
    async fn bodyless(
        self: &Arc<Self>,
        req: Request<Incoming>,
        mut target: Target,
        has_body: bool,
    ) -> Response<Body> {
        if target.server.is_some() && has_body {
            return text_response(
                StatusCode::BAD_REQUEST,
                format!(
                    "guard: a {} with a body to a policy-named MCP server is refused\n",
                    req.method()
                ),
            );
        }
        let resp = self.forward(req.map(boxed)).await;
        match target.server.clone() {
            Some(name) => {
                self.inspect_response(resp, name, &mut target, Vec::new())
                    .await
            }
            None => resp,
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
                let audit = self.engine().audit_log();
                let mut r = audit.record(Event::UpstreamError, Decision::Error);
                r.agent = Some(AgentRef::from(&self.conn.identity));
                r.original_dst = Some(dst.to_string());
                r.reason = Some(e.clone());
                self.engine().write(&r);
                text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("guard: upstream {dst} failed: {e}\n"),
                )
            }
        }
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

    /// Forwards an `Upgrade` request, then splices both ways once the server switches.
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
            // The tunnel outlives this HTTP connection: it keeps the connection's slots.
            let hold = self.hold.clone();
            tokio::spawn(async move {
                let _hold = hold;
                if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                    let mut c = TokioIo::new(c);
                    let mut s = TokioIo::new(s);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
        resp.map(boxed)
    }
}

/// Removes the request's wish to switch protocols: `Upgrade`, and the `upgrade` token of
/// `Connection`.
fn strip_upgrade(headers: &mut http::HeaderMap) {
    headers.remove(header::UPGRADE);
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade"))
        .map(str::to_string)
        .collect();
    headers.remove(header::CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(header::CONNECTION, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stripped_request_no_longer_asks_to_switch() {
        let mut h = http::HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        strip_upgrade(&mut h);
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(h.get(header::CONNECTION).unwrap(), "keep-alive");
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        strip_upgrade(&mut h);
        assert!(h.get(header::CONNECTION).is_none());
    }
}
