//! The daemon's side of one `guard wrap` session: each line the agent or the server wrote
//! arrives as a frame, is decided by the enforcement core exactly as an HTTP body or answer
//! would be, and goes back as what wrap must do with it ([`Kind::Forward`], [`Kind::ToAgent`],
//! ...). A decision that waits (a call held for approval) does not hold up the lines after it:
//! every decision is polled once at once, and only one that is still pending runs on its own,
//! so the order of lines is kept wherever nothing waits.

use std::{future::Future, io, pin::Pin, sync::Arc, task::Poll, time::Instant};

use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    sync::mpsc,
    task::JoinSet,
};

use super::proto::{self, encode, read_frame_limited, Frame, Kind, Problem};
use crate::{
    audit::Event,
    identity::Identity,
    mcp::{wire, Engine, Filtered, Headers, Outcome, RefusalKind, Target, Transport},
    policy::PolicySet,
};

/// One session: who wraps which server.
pub struct Session {
    pub engine: Arc<Engine>,
    /// The wrapping process, as the daemon sees it.
    pub caller: Identity,
    /// `--server NAME`, if given.
    pub server: Option<String>,
    /// The server's command line, arguments joined by spaces.
    pub command: String,
    /// `proxy.max_body`.
    pub max_body: usize,
    /// Ids of the server's requests passed to the agent and not answered yet: the only
    /// answers from the agent that reach the server (once each). An agent does not answer a
    /// request it was never shown (one held for approval, say).
    pub asked: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The protocol version the agent's `initialize` asked for (audit and spans).
    pub protocol: std::sync::Mutex<Option<String>>,
}

/// Answers queued for a session's socket; beyond, its frames are not read until it reads.
const ANSWERS_QUEUED: usize = 256;
/// Server requests a session remembers at most (answered ones are forgotten).
const MAX_ASKED: usize = 1024;

/// Which policy governs a stdio server: the one named by `--server`, else the best `stdio:`
/// entry matching its command line. Err: `--server` names no policy.
pub fn resolve(
    policies: &PolicySet,
    server: Option<&str>,
    command: &str,
) -> Result<Option<String>, String> {
    match server {
        // A policy that says which command lines are its server is not put on another.
        Some(n) if policies.stdio_mismatch(n, command) => Err(format!(
            "the policy of \"{n}\" names its stdio servers by command line, and `{command}` is not one of them (guard wrap --server {n})"
        )),
        Some(n) if policies.by_name(n).is_some() => Ok(Some(n.to_string())),
        Some(n) => {
            let names: Vec<&str> = policies.servers().iter().map(|s| s.name.as_str()).collect();
            Err(format!(
                "no policy names the server \"{n}\" (guard wrap --server {n}); the loaded ones are: {}",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ))
        }
        None => Ok(policies.match_stdio(command).map(|s| s.name.clone())),
    }
}

impl Session {
    pub fn new(
        engine: Arc<Engine>,
        caller: Identity,
        server: Option<String>,
        command: String,
        max_body: usize,
    ) -> Session {
        Session {
            engine,
            caller,
            server,
            command,
            max_body,
            asked: Default::default(),
            protocol: Default::default(),
        }
    }

    /// Where this session's messages go, for decisions and audit: resolved again for every
    /// message, so a reload that removes or renames the policy is seen at once (a policy
    /// that is gone makes the server unknown, never ungoverned).
    fn target(&self) -> Target {
        let policies = self.engine.policies();
        let server = resolve(&policies, self.server.as_deref(), &self.command)
            .ok()
            .flatten();
        Target {
            server,
            host: "stdio".into(),
            port: 0,
            original_dst: None,
            // The stdout of the command the agent started: its lists are that command's
            // definitions, pinned for this principal's sessions only (the agent picks it).
            at_destination: true,
            pin_scope: Some(format!("stdio-{}", self.caller.agent_key())),
            session: None,
            protocol_version: self.protocol.lock().unwrap().clone(),
            traceparent: None,
            command: Some(self.command.clone()),
            transport: Transport::Stdio,
            received: Instant::now(),
        }
    }

    /// What to do with one frame from wrap: the frame to answer with.
    async fn handle(self: Arc<Self>, f: Frame) -> Vec<u8> {
        let t = self.target();
        match f.kind {
            Kind::FromAgent => self.agent_line(&t, f.seq, &f.payload).await,
            Kind::FromServer => self.server_line(&t, f.seq, &f.payload).await,
            Kind::Problem => self.problem(&t, f.seq, &f.payload),
            other => encode(
                Kind::Drop,
                f.seq,
                format!("guard: unexpected frame {other:?}").as_bytes(),
            ),
        }
    }

    /// A line from the agent: decided as an HTTP request body is (one message or a batch,
    /// forwarded whole or not at all). What guard cannot read is never forwarded.
    async fn agent_line(&self, t: &Target, seq: u64, line: &[u8]) -> Vec<u8> {
        let engine = &self.engine;
        if line.len() > self.max_body {
            return self.over_max(t, seq, line.len());
        }
        let body = match wire::parse_body(line) {
            Ok(b) => b,
            Err(e) => {
                let answer = engine.refuse_malformed(&self.caller, t, &e);
                return to_agent(seq, &answer);
            }
        };
        if let Some(v) = body
            .messages
            .iter()
            .filter(|m| m.method.as_deref() == Some("initialize"))
            .find_map(|m| m.params.get("protocolVersion").and_then(Value::as_str))
        {
            *self.protocol.lock().unwrap() = Some(crate::audit::clip(v, 64).into_owned());
        }
        if let Some(why) = self.unasked_answer(&body) {
            engine.audit_refused(Event::McpRequest, &self.caller, t, None, "protocol", &why);
            return encode(Kind::Drop, seq, format!("guard: {why}").as_bytes());
        }
        match engine
            .enforce_body(&self.caller, t, &body, Headers::default())
            .await
        {
            Outcome::Forward => encode(Kind::Forward, seq, b""),
            Outcome::Answer { answers, .. } if answers.is_empty() => encode(
                Kind::Drop,
                seq,
                b"guard: a notification was refused (no answer can carry a refusal)",
            ),
            Outcome::Answer { batch, answers } => match batch {
                true => to_agent(seq, &Value::Array(answers)),
                false => to_agent(seq, &answers.into_iter().next().unwrap_or(Value::Null)),
            },
            Outcome::Reject(answer) => to_agent(seq, &answer),
            Outcome::Unaudited => {
                let errors: Vec<Value> = body
                    .messages
                    .iter()
                    .filter_map(|m| m.id.as_ref())
                    .map(|id| {
                        wire::error(
                            id,
                            RefusalKind::Unreadable.code(),
                            "guard: the audit log cannot be written, so nothing is forwarded; try again later",
                        )
                    })
                    .collect();
                match (body.batch, errors.len()) {
                    (_, 0) => encode(Kind::Drop, seq, b"guard: the audit log cannot be written"),
                    (true, _) => to_agent(seq, &Value::Array(errors)),
                    (false, _) => to_agent(seq, &errors[0]),
                }
            }
        }
    }

    /// A line from the server: filtered as an HTTP answer is (lists, pins, the server's own
    /// requests decided). One guard cannot read as every client would never reaches the agent:
    /// an answer to a request becomes an error for it, a refused server request gets an error
    /// back, anything else is dropped (and audited).
    async fn server_line(&self, t: &Target, seq: u64, line: &[u8]) -> Vec<u8> {
        let server = t.server.clone().unwrap_or_default();
        match self
            .engine
            .filter_json(&self.caller, t, &server, line)
            .await
        {
            Filtered::Unchanged => {
                self.remember_requests(line);
                encode(Kind::Pass, seq, b"")
            }
            Filtered::Changed(bytes) => {
                self.remember_requests(&bytes);
                encode(Kind::ToAgent, seq, &bytes)
            }
            Filtered::Refused(why) => self.refused_from_server(t, seq, line, &why),
        }
    }

    /// The ids of the server's requests in `line` (passed to the agent), remembered.
    fn remember_requests(&self, line: &[u8]) {
        // Answers and notifications, most of what a server writes, name no method with an id.
        if !line.windows(8).any(|w| w == b"\"method\"") {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let items = match v {
            Value::Array(items) => items,
            one => vec![one],
        };
        let mut asked = self.asked.lock().unwrap();
        for m in &items {
            if let (Some(id), Some(_)) = (m.get("id").filter(|i| !i.is_null()), m.get("method")) {
                if asked.len() < MAX_ASKED {
                    asked.insert(id.to_string());
                }
            }
        }
    }

    /// Why the agent's answers in `body` do not go to the server, if they do not: one answers
    /// a request the server did not send it (or one answered already).
    fn unasked_answer(&self, body: &wire::Body) -> Option<String> {
        let answers: Vec<&Value> = body
            .messages
            .iter()
            .filter(|m| m.method.is_none())
            .filter_map(|m| m.id.as_ref())
            .collect();
        if answers.is_empty() {
            return None;
        }
        let mut asked = self.asked.lock().unwrap();
        let keys: Vec<String> = answers.iter().map(|id| id.to_string()).collect();
        if let Some(k) = keys.iter().find(|k| !asked.contains(*k)) {
            return Some(format!(
                "an answer to {k}, which the server did not ask the agent (or was answered already), is not passed on"
            ));
        }
        for k in &keys {
            asked.remove(k);
        }
        None
    }

    /// What becomes of a server's line that is not passed on (already audited): its ids are
    /// read leniently, only to say which request the error is for.
    fn refused_from_server(&self, t: &Target, seq: u64, line: &[u8], why: &str) -> Vec<u8> {
        let v: Option<Value> = serde_json::from_slice(line).ok();
        let id_of = |m: &Value| m.get("id").filter(|id| !id.is_null()).cloned();
        let is_request = |m: &Value| m.get("method").is_some();
        match &v {
            // The server's own request, refused: it gets an error, the agent never sees it.
            Some(m) if m.is_object() && is_request(m) => match id_of(m) {
                Some(id) => {
                    let e = wire::error(&id, RefusalKind::Denied.code(), &format!("guard: {why}"));
                    encode(Kind::ToServer, seq, e.to_string().as_bytes())
                }
                None => encode(Kind::Drop, seq, format!("guard: {why}").as_bytes()),
            },
            Some(m) if m.is_object() => match id_of(m) {
                Some(id) => {
                    let e = self.engine.unreadable_answer(t, &[id], why);
                    to_agent(seq, &e[0])
                }
                None => encode(Kind::Drop, seq, format!("guard: {why}").as_bytes()),
            },
            Some(Value::Array(items)) => {
                let ids: Vec<Value> = items
                    .iter()
                    .filter(|m| !is_request(m))
                    .filter_map(id_of)
                    .collect();
                match ids.is_empty() {
                    true => encode(Kind::Drop, seq, format!("guard: {why}").as_bytes()),
                    false => {
                        let errors = self.engine.unreadable_answer(t, &ids, why);
                        to_agent(seq, &Value::Array(errors))
                    }
                }
            }
            _ => encode(Kind::Drop, seq, format!("guard: {why}").as_bytes()),
        }
    }

    /// An agent's line over `proxy.max_body`: wrap did not read it whole, so nothing of it is
    /// forwarded. Audited; the agent gets an error (with no id: it was not read).
    fn over_max(&self, t: &Target, seq: u64, len: usize) -> Vec<u8> {
        let reason = format!(
            "a message over proxy.max_body ({} bytes; {len} read) is not forwarded",
            self.max_body
        );
        self.engine.audit_refused(
            Event::Limit,
            &self.caller,
            t,
            None,
            "proxy.max_body",
            &reason,
        );
        let e = wire::error(
            &Value::Null,
            wire::INVALID_REQUEST,
            &format!("guard: {reason}"),
        );
        to_agent(seq, &e)
    }

    /// A line wrap could not hand over whole (see [`Problem`]).
    fn problem(&self, t: &Target, seq: u64, payload: &[u8]) -> Vec<u8> {
        let Ok(p) = serde_json::from_slice::<Problem>(payload) else {
            return encode(Kind::Drop, seq, b"guard: an unreadable problem report");
        };
        let (from_agent, over) = (p.from == "agent", p.what == "over_max");
        if from_agent && over {
            return self.over_max(t, seq, p.bytes);
        }
        let reason = match (from_agent, over) {
            (true, _) => format!(
                "the agent's input ended inside a message ({} bytes without a newline): not forwarded",
                p.bytes
            ),
            (false, true) => format!(
                "the server wrote a line over {} bytes: not passed on",
                proto::MAX_FRAME
            ),
            (false, false) => format!(
                "the server's output ended inside a message ({} bytes without a newline): not passed on",
                p.bytes
            ),
        };
        let (event, rule) = match (from_agent, over) {
            (false, true) => (Event::Limit, "stdio.max_line"),
            _ => (Event::McpRequest, "protocol"),
        };
        self.engine
            .audit_refused(event, &self.caller, t, None, rule, &reason);
        if from_agent {
            let e = wire::error(
                &Value::Null,
                wire::INVALID_REQUEST,
                &format!("guard: {reason}"),
            );
            return to_agent(seq, &e);
        }
        encode(Kind::Drop, seq, format!("guard: {reason}").as_bytes())
    }
}

fn to_agent(seq: u64, v: &Value) -> Vec<u8> {
    encode(Kind::ToAgent, seq, v.to_string().as_bytes())
}

/// Polls `f` once: its output if it is ready at once.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

/// Serves one session until wrap closes it: frames in from `read`, answers out on `write`.
/// Decisions still waiting when it ends (held calls) are dropped with it: the agent that
/// asked is gone.
pub async fn run<R, W>(session: Arc<Session>, mut read: R, mut write: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Bounded: a client that does not read its answers stops being read, instead of making
    // the daemon keep them.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(ANSWERS_QUEUED);
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(frame) = rx.recv().await {
            // Whatever else is ready goes in the same write.
            buf.clear();
            buf.extend_from_slice(&frame);
            while let Ok(more) = rx.try_recv() {
                buf.extend_from_slice(&more);
            }
            write.write_all(&buf).await?;
        }
        write.shutdown().await
    });
    let mut waiting = JoinSet::new();
    let ended = loop {
        // An agent's line is at most proxy.max_body (wrap reads no more of it); a problem
        // report is a few bytes; a server's line may be up to a frame.
        let limits = |k: Kind| match k {
            Kind::FromAgent => session.max_body,
            Kind::Problem => 4096,
            _ => proto::MAX_FRAME,
        };
        let frame = match read_frame_limited(&mut read, limits).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        while waiting.try_join_next().is_some() {}
        let mut decided = Box::pin(session.clone().handle(frame));
        match poll_once(&mut decided).await {
            Poll::Ready(out) => {
                if tx.send(out).await.is_err() {
                    break Ok(());
                }
            }
            Poll::Pending => {
                let tx = tx.clone();
                waiting.spawn(async move {
                    let _ = tx.send(decided.await).await;
                });
            }
        }
    };
    waiting.abort_all();
    drop(tx);
    let _ = writer.await;
    ended
}
