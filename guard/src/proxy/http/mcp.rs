//! The HTTP adapter around the MCP core: a request body is read (up to `proxy.max_body`), parsed,
//! and when it is MCP decided by [`crate::mcp::Engine::enforce_body`]; the outcome becomes a forwarded
//! request or guard's own answer (JSON, an SSE event, or — legacy HTTP+SSE — an event on the
//! session's stream). Answers that can carry tool definitions are filtered on the way back,
//! JSON whole and SSE event by event.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    body::{
        boxed, chain, content_type_is, full, header_str, is_json, json_response, query_session,
        read_up_to, sse_response, text_response, Body, BoxError, Read,
    },
    Ctx,
};
use crate::{
    audit::Event,
    mcp::{sse::SseParser, wire, Filtered, Headers, Outcome, Target, Transport},
};

/// Largest SSE event held while incomplete, and largest JSON response inspected.
const MAX_EVENT: usize = 64 << 20;

/// A request body that was not read whole.
enum Unread {
    /// Too long, and not MCP: what was read, and the rest still to come.
    Stream(Bytes, Body),
    /// Refused: the answer to give.
    Refused(Response<Body>),
}

impl Ctx {
    /// A request with a body. Every body is read (up to `proxy.max_body`) and checked for MCP,
    /// whatever its Content-Type says: JSON-RPC to an unknown server must not slip past as
    /// text/plain.
    pub(super) async fn with_body(
        self: Arc<Self>,
        req: Request<Incoming>,
        mut target: Target,
    ) -> Response<Body> {
        let caller = &self.conn.identity;
        let (parts, body) = req.into_parts();
        let bytes = match self.read_body(&target, body).await {
            Ok(b) => b,
            Err(Unread::Stream(prefix, rest)) => {
                // A large upload that is not JSON, to no named server: not MCP, streamed on.
                return self
                    .forward(Request::from_parts(parts, chain(prefix, rest)))
                    .await;
            }
            Err(Unread::Refused(resp)) => return resp,
        };
        let body = match (&target.server, wire::parse_body(&bytes)) {
            (_, Ok(b)) if target.server.is_some() || wire::looks_like_mcp(&b) => b,
            (Some(_), Err(e)) => {
                let answer = self.engine().refuse_malformed(caller, &target, &e);
                return json_response(StatusCode::BAD_REQUEST, &answer);
            }
            // JSON that is not MCP, to a server no policy names: not ours to judge.
            _ => return self.forward(Request::from_parts(parts, full(bytes))).await,
        };
        if self.legacy_stream(&target).is_some() {
            target.transport = Transport::Sse;
        }
        let headers = Headers {
            method: header_str(&parts.headers, "mcp-method"),
            name: header_str(&parts.headers, "mcp-name"),
        };
        let outcome = self
            .engine()
            .enforce_body(caller, &target, &body, headers)
            .await;
        let resp = match outcome {
            Outcome::Forward => self.forward(Request::from_parts(parts, full(bytes))).await,
            Outcome::Reject(answer) => return json_response(StatusCode::BAD_REQUEST, &answer),
            Outcome::Unaudited => {
                return text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "guard: audit log unavailable\n".into(),
                )
            }
            Outcome::Answer { answers, .. } if answers.is_empty() => {
                // Notifications only, to an unknown server: nothing to answer them with.
                return text_response(
                    StatusCode::FORBIDDEN,
                    format!(
                        "guard: no policy names the MCP server {}\n",
                        target.address()
                    ),
                );
            }
            Outcome::Answer { batch, answers } => {
                return self.deliver(&parts.headers, &target, batch, answers).await
            }
        };
        // Only an answer to a tools/list carries tool definitions; other answers (tools/call
        // results above all) stream through without being buffered or parsed.
        let lists = body
            .messages
            .iter()
            .any(|m| m.method.as_deref() == Some("tools/list"));
        match target.server.clone() {
            Some(name) if lists => self.inspect_response(resp, name, &mut target).await,
            _ => resp,
        }
    }

    /// Reads a request body up to `proxy.max_body`. Longer: streamed on unread when it cannot be
    /// MCP (not JSON, to no named server), else refused with 413 (audited).
    async fn read_body(&self, target: &Target, body: Incoming) -> Result<Bytes, Unread> {
        let max = self.http.settings.max_body;
        match read_up_to(boxed(body), max).await {
            Read::Whole(b) => Ok(b),
            Read::Over { prefix, rest } => {
                let looks_json = prefix
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|b| *b == b'{' || *b == b'[');
                if target.server.is_none() && !looks_json {
                    return Err(Unread::Stream(prefix, rest));
                }
                let reason = format!("request body over proxy.max_body ({max} bytes)");
                self.engine().audit_refused(
                    Event::Limit,
                    &self.conn.identity,
                    target,
                    None,
                    "proxy.max_body",
                    &reason,
                );
                Err(Unread::Refused(text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("guard: request body exceeds proxy.max_body ({max} bytes)\n"),
                )))
            }
            Read::Failed(e) => Err(Unread::Refused(text_response(
                StatusCode::BAD_REQUEST,
                format!("guard: reading the request body: {e}\n"),
            ))),
        }
    }

    /// The stream of a legacy HTTP+SSE session this request belongs to.
    fn legacy_stream(&self, t: &Target) -> Option<super::legacy::StreamTx> {
        self.http
            .legacy
            .stream(t.server.as_deref()?, t.session.as_deref()?)
    }

    /// guard's own answers: on a legacy session's stream (the POST is then accepted with 202),
    /// else in the response.
    async fn deliver(
        &self,
        headers: &HeaderMap,
        t: &Target,
        batch: bool,
        answers: Vec<Value>,
    ) -> Response<Body> {
        if let Some(tx) = self.legacy_stream(t) {
            for a in &answers {
                let ev = Bytes::from(format!("event: message\ndata: {a}\n\n"));
                let _ = tx.send(Ok(ev)).await;
            }
            let mut resp = Response::new(full("Accepted"));
            *resp.status_mut() = StatusCode::ACCEPTED;
            return resp;
        }
        json_or_sse(headers, batch, answers)
    }

    /// Filters `tools/list` results in a response from a policy-named server, JSON or SSE, and
    /// records tool definitions for pinning. Legacy SSE endpoints are registered so guard can
    /// answer on that session's stream.
    pub(super) async fn inspect_response(
        self: &Arc<Self>,
        resp: Response<Body>,
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
            return self.clone().filter_stream(resp, server, t.clone());
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
        match self
            .engine()
            .filter_json(&self.conn.identity, t, &server, &bytes)
        {
            Filtered::Unchanged => Response::from_parts(parts, full(bytes)),
            Filtered::Changed(out) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, full(out))
            }
        }
    }

    /// Re-streams an SSE response event by event, each one filtered.
    fn filter_stream(
        self: Arc<Self>,
        resp: Response<Body>,
        server: String,
        mut t: Target,
    ) -> Response<Body> {
        let (mut parts, mut body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(64);
        let me = self;
        tokio::spawn(async move {
            let mut parser = SseParser::new(MAX_EVENT);
            let mut registered: Option<String> = None;
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
                            me.http.legacy.register(&server, &session, tx.clone());
                            if let Some(old) = registered.replace(session.clone()) {
                                me.http.legacy.unregister(&server, &old);
                            }
                            t.session = Some(session);
                            t.transport = Transport::Sse;
                        }
                    }
                    let out = match ev.data.as_deref().and_then(|d| {
                        me.engine()
                            .filter_event_data(&me.conn.identity, &t, &server, d)
                    }) {
                        Some(data) => ev.with_data(&data),
                        None => ev.raw.clone(),
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        break 'read;
                    }
                }
            }
            let rest = parser.rest();
            if !rest.is_empty() {
                let _ = tx.send(Ok(rest)).await;
            }
            if let Some(session) = registered {
                me.http.legacy.unregister(&server, &session);
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item.map(Frame::data), rx))
        });
        Response::from_parts(parts, StreamBody::new(stream).boxed())
    }
}

/// guard's answers as JSON, or as one SSE stream when the client accepts only that.
fn json_or_sse(headers: &HeaderMap, batch: bool, answers: Vec<Value>) -> Response<Body> {
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
