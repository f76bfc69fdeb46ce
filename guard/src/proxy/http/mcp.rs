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
        answer_type, boxed, chain, charset, full, header_str, is_empty_body, json_response,
        query_session, read_up_to, request_encoding, sse_response, text_response, AnswerType, Body,
        BoxError, Read,
    },
    Ctx,
};
use crate::proxy::fairness::Reserved;
use crate::{
    audit::Event,
    config::UnknownServers,
    mcp::{
        sse::SseParser, wire, wire::BodyError, EventData, Filtered, Headers, Outcome, Target,
        Transport,
    },
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
    ///
    /// Long (about 90 lines) on purpose: one request's whole path — read, parse, decide,
    /// answer or forward, inspect the answer — reads top to bottom here; each step calls out.
    pub(super) async fn with_body(
        self: Arc<Self>,
        req: Request<Incoming>,
        mut target: Target,
    ) -> Response<Body> {
        let caller = &self.conn.identity;
        let (parts, body) = req.into_parts();
        // Held until the request has gone on: the bytes are in memory until then.
        let mut reserved = match self.reserve_body(&target, &parts.headers) {
            Ok(r) => r,
            Err(resp) => return *resp,
        };
        let bytes = match self.read_body(&target, &parts.headers, body).await {
            Ok(b) => b,
            Err(Unread::Stream(prefix, rest)) => {
                // A large upload that is not JSON, to no named server: not MCP, streamed on.
                return self
                    .forward(Request::from_parts(parts, chain(prefix, rest)))
                    .await;
            }
            Err(Unread::Refused(resp)) => return resp,
        };
        reserved.shrink_to(bytes.len());
        // Decoded by the server before it reads them: what guard would parse is not the message.
        let parsed = request_encoding(&parts.headers, &bytes)
            .map_err(BodyError::Encoding)
            .and_then(|()| wire::parse_body(&bytes));
        let body = match (&target.server, parsed) {
            (_, Ok(b)) if target.server.is_some() || wire::looks_like_mcp(&b) => b,
            (Some(_), Err(e)) => {
                let answer = self.engine().refuse_malformed(caller, &target, &e);
                return json_response(StatusCode::BAD_REQUEST, &answer);
            }
            // Unreadable to guard, yet some server could read JSON-RPC in it: under
            // unknown_servers = "deny" it is not forwarded unread.
            (None, Err(e)) if self.refuses_unread(&e, &parts.headers, &bytes) => {
                let answer = self
                    .engine()
                    .refuse_unreadable(caller, &target, &e.to_string());
                return json_response(StatusCode::BAD_REQUEST, &answer);
            }
            // JSON that is not MCP (or not JSON at all), to a server no policy names: not ours
            // to judge.
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
        // Every answer of a policy-named server is read: lists are filtered, and any answer can
        // carry the server's own requests to the client (sampling, elicitation, roots), which
        // policy decides.
        match target.server.clone() {
            Some(name) => {
                let ids = body.messages.iter().filter_map(|m| m.id.clone()).collect();
                self.inspect_response(resp, name, &mut target, ids).await
            }
            _ => resp,
        }
    }

    /// Room for a body in the agent's share of memory: what its Content-Length says, else
    /// `proxy.max_body`. Refused (503, audited) when the agent's bodies fill its share.
    fn reserve_body(
        &self,
        target: &Target,
        headers: &HeaderMap,
    ) -> Result<Reserved, Box<Response<Body>>> {
        let max = self.http.settings.max_body;
        let n = header_str(headers, "content-length")
            .and_then(|l| l.trim().parse::<usize>().ok())
            .map_or(max, |l| l.min(max));
        if let Some(r) = self.http.bodies.reserve(&self.conn.identity, n) {
            return Ok(r);
        }
        let reason = format!(
            "this agent's request bodies being read fill its share of memory ({} bytes, 16 × \
             proxy.max_body): try again when its other requests are done",
            self.http.bodies.limit()
        );
        let answer = format!("guard: {reason}\n");
        Err(Box::new(self.refuse_limit(
            target,
            "proxy.max_body",
            &reason,
            StatusCode::SERVICE_UNAVAILABLE,
            answer,
        )))
    }

    /// A request refused by one of the proxy's limits: audited (`limit`), answered in text.
    fn refuse_limit(
        &self,
        target: &Target,
        rule: &str,
        reason: &str,
        status: StatusCode,
        answer: String,
    ) -> Response<Body> {
        let caller = &self.conn.identity;
        self.engine()
            .audit_refused(Event::Limit, caller, target, None, rule, reason);
        text_response(status, answer)
    }

    /// Reads a request body up to `proxy.max_body`. Longer: streamed on unread when it cannot be
    /// MCP (not JSON, to no named server), else refused with 413 (audited).
    async fn read_body(
        &self,
        target: &Target,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<Bytes, Unread> {
        let max = self.http.settings.max_body;
        let within = self.http.settings.body_timeout;
        let Ok(read) = tokio::time::timeout(within, read_up_to(boxed(body), max)).await else {
            // A body trickled in holds its connection's slot: it has a deadline like headers.
            let reason = format!(
                "the request body did not arrive within proxy.body_timeout_s ({}s)",
                within.as_secs()
            );
            let answer = format!("guard: {reason}\n");
            return Err(Unread::Refused(self.refuse_limit(
                target,
                "proxy.body_timeout_s",
                &reason,
                StatusCode::REQUEST_TIMEOUT,
                answer,
            )));
        };
        match read {
            Read::Whole(b) => Ok(b),
            Read::Over { prefix, rest } => {
                // Streamed on only when it cannot be JSON-RPC to any server: nor after the
                // server decodes it (a charset, two Content-Types).
                let plain = request_encoding(headers, &prefix).is_ok();
                if target.server.is_none() && plain && !could_carry_json(headers, &prefix) {
                    return Err(Unread::Stream(prefix, rest));
                }
                let reason = format!("request body over proxy.max_body ({max} bytes)");
                let answer = format!("guard: request body exceeds proxy.max_body ({max} bytes)\n");
                Err(Unread::Refused(self.refuse_limit(
                    target,
                    "proxy.max_body",
                    &reason,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    answer,
                )))
            }
            Read::Failed(e) => Err(Unread::Refused(text_response(
                StatusCode::BAD_REQUEST,
                format!("guard: reading the request body: {e}\n"),
            ))),
        }
    }

    /// Whether a body to a server no policy names, which guard could not read as JSON-RPC, is
    /// refused: under `unknown_servers = "deny"`, when it is a JSON-RPC message guard cannot
    /// read alike, or not JSON to guard but possibly JSON to a more lenient server.
    fn refuses_unread(&self, e: &BodyError, headers: &HeaderMap, bytes: &[u8]) -> bool {
        if self.engine().settings.unknown_servers != UnknownServers::Deny {
            return false;
        }
        match e {
            BodyError::Malformed(_) => true,
            BodyError::Json(_) => could_carry_json(headers, bytes),
            // Decoded by the server first: whatever the bytes look like to guard, the server
            // may read JSON-RPC in them (UTF-7 sent as text/plain, to a lenient body parser).
            BodyError::Encoding(_) => true,
            BodyError::NotJsonRpc(_) => false,
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
    /// answer on that session's stream. `ids`: the requests the response answers (none for a
    /// GET stream). An answer guard cannot read as every client would is refused: 502, with a
    /// JSON-RPC error for each request.
    pub(super) async fn inspect_response(
        self: &Arc<Self>,
        resp: Response<Body>,
        server: String,
        t: &mut Target,
        ids: Vec<Value>,
    ) -> Response<Body> {
        // No body (HEAD, 204, 304, a bare 405): nothing for a client to read or guard to filter.
        if is_empty_body(&resp) {
            return resp;
        }
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
        let kind = answer_type(resp.headers());
        // 202 and 204 carry no answer (clients read none from them: legacy HTTP+SSE answers
        // travel on the stream, notifications get none).
        let status = resp.status();
        let answers_requests = !ids.is_empty()
            && status.is_success()
            && status != StatusCode::ACCEPTED
            && status != StatusCode::NO_CONTENT;
        let refused = match kind {
            // Compressed despite the request: guard cannot filter it.
            _ if encoded && kind != AnswerType::Other => {
                Some("the server answered with a Content-Encoding guard cannot inspect")
            }
            AnswerType::Ambiguous => {
                Some("the answer's Content-Type names both JSON and an event stream")
            }
            _ if kind != AnswerType::Other && charset(resp.headers(), |_| false).is_err() => {
                Some("the answer names a charset other than UTF-8")
            }
            // A client that takes this for an answer would read it unfiltered.
            AnswerType::Other if answers_requests => {
                Some("the answer to a request has a Content-Type guard does not read")
            }
            _ => None,
        };
        if let Some(why) = refused {
            return self.refuse_unread_answer(t, &ids, why);
        }
        match kind {
            AnswerType::Sse => return self.clone().filter_stream(resp, server, t.clone(), ids),
            AnswerType::Json => {}
            _ => return resp,
        }
        let (mut parts, body) = resp.into_parts();
        let bytes = match read_up_to(body, MAX_EVENT).await {
            Read::Whole(b) => b,
            Read::Over { .. } => {
                let why = format!("the server's answer is over {MAX_EVENT} bytes");
                return self.refuse_unread_answer(t, &ids, &why);
            }
            Read::Failed(e) => {
                let why = format!("reading the server's answer: {e}");
                return self.refuse_unread_answer(t, &ids, &why);
            }
        };
        match self
            .engine()
            .filter_json(&self.conn.identity, t, &server, &bytes)
            .await
        {
            Filtered::Unchanged => Response::from_parts(parts, full(bytes)),
            Filtered::Changed(out) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, full(out))
            }
            Filtered::Refused(why) => self.refuse_answer(t, &ids, &why),
        }
    }

    /// [`Ctx::refuse_answer`] for an answer refused before the core read it: audited here.
    fn refuse_unread_answer(&self, t: &Target, ids: &[Value], why: &str) -> Response<Body> {
        let reason = format!("the answer was not passed on: {why}");
        self.engine().audit_refused(
            Event::ToolsList,
            &self.conn.identity,
            t,
            Some("tools/list"),
            "protocol",
            &reason,
        );
        self.refuse_answer(t, ids, why)
    }

    /// 502 in place of an answer guard will not pass on: a JSON-RPC error per request (a text
    /// when there are none).
    fn refuse_answer(&self, t: &Target, ids: &[Value], why: &str) -> Response<Body> {
        tracing::warn!(server = ?t.server, "answer refused: {why}");
        let answers = self.engine().unreadable_answer(t, ids, why);
        match answers.len() {
            0 => text_response(StatusCode::BAD_GATEWAY, format!("guard: {why}\n")),
            1 => json_response(StatusCode::BAD_GATEWAY, &answers[0]),
            _ => json_response(StatusCode::BAD_GATEWAY, &Value::Array(answers)),
        }
    }

    /// Re-streams an SSE response event by event, each one filtered.
    ///
    /// Long (about 100 lines) on purpose: the task's loop is one state machine (read a chunk,
    /// parse events, filter or refuse each, forward, close) that is clearer whole.
    fn filter_stream(
        self: Arc<Self>,
        resp: Response<Body>,
        server: String,
        mut t: Target,
        ids: Vec<Value>,
    ) -> Response<Body> {
        let (mut parts, mut body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(64);
        let me = self;
        tokio::spawn(async move {
            let mut parser = SseParser::new(MAX_EVENT);
            let mut registered: Option<String> = None;
            'read: loop {
                // A client gone from an idle stream ends the task now, not at the server's
                // next event: the task holds the connection's slots.
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = tx.closed() => break 'read,
                };
                let Some(frame) = frame else { break };
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
                    // Clients read only `message` events (or unnamed ones) as MCP messages.
                    let message = matches!(ev.event.as_deref(), None | Some("message"));
                    let filtered = match ev.data.as_deref() {
                        // No message in it (a priming event): nothing for a client to read.
                        Some(d) if d.trim().is_empty() => Ok(EventData::Pass),
                        Some(d) if message => {
                            me.engine()
                                .filter_event_data(&me.conn.identity, &t, &server, d)
                                .await
                        }
                        _ => Ok(EventData::Pass),
                    };
                    let out = match filtered {
                        Ok(EventData::Replace(data)) => ev.with_data(&data),
                        Ok(EventData::Pass) => ev.raw.clone(),
                        // A server's request policy refused: the client never sees it (the
                        // server's wait for an answer times out).
                        Ok(EventData::Drop) => continue,
                        Err(why) => {
                            // Not passed on: the requests get an error instead, and the stream
                            // ends (nothing after it can be trusted to be read alike).
                            for a in me.engine().unreadable_answer(&t, &ids, &why) {
                                let ev = format!("event: message\ndata: {a}\n\n");
                                let _ = tx.send(Ok(Bytes::from(ev))).await;
                            }
                            break 'read;
                        }
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        break 'read;
                    }
                }
            }
            // An incomplete event at the end is not passed on: guard could not read it.
            drop(parser);
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

/// Whether a request body guard cannot read as JSON could still be JSON to some server: it says
/// it is JSON, or it is encoded (`Content-Encoding`: some servers decode it), or it starts like
/// JSON after a byte-order mark and whitespace (servers that ignore what follows the first
/// value, or accept NaN, comments, trailing commas), or it is UTF-16/32 (Python's `json`
/// detects and decodes those).
fn could_carry_json(headers: &HeaderMap, bytes: &[u8]) -> bool {
    let says_json = headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .to_ascii_lowercase()
            .contains("json")
    });
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    let head = &bytes[..bytes.len().min(4)];
    let wide =
        head.contains(&0) || head.starts_with(&[0xff, 0xfe]) || head.starts_with(&[0xfe, 0xff]);
    let text = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    // Only whitespace so far (a prefix of a long body, say): what follows may be JSON.
    let starts_json = text
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .map_or(!text.is_empty(), |b| *b == b'{' || *b == b'[');
    says_json || encoded || wide || starts_json
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
