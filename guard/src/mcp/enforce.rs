//! The enforcement core: every MCP message guard reads, from any transport, is decided here.
//! [`Engine::enforce`] decides one message; [`Engine::enforce_body`] a request body (one message
//! or a batch, which is forwarded whole or not at all). Decisions are audited here, before the
//! adapter acts on them. No HTTP, no sockets: the HTTP, SSE and stdio adapters hand it parsed
//! messages and turn its [`Outcome`] into their own answers.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{
    approvals::{Approvals, Held, Verdict as Approval},
    ask::{self, Ask, Asked, Kind},
    pins::Pins,
    verdict::{Refusal, RefusalKind, Verdict},
    wire::{self, Body, Message},
};
use crate::{
    audit::{AgentRef, Audit, Decision, Event, Record, ServerRef},
    config::{Denial, UnknownServers},
    identity::Identity,
    policy::{self, PolicySet, RateLimiter, ServerPolicy, ToolChange},
};

/// How the core answers, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub unknown_servers: UnknownServers,
    pub denial: Denial,
    /// `audit.log_arguments`: tool-call arguments go into the audit record.
    pub log_arguments: bool,
}

/// The transport a message came over, as the audit trail names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP (POST, JSON or SSE answers, GET streams).
    StreamableHttp,
    /// Legacy HTTP+SSE (answers travel on the session's event stream).
    Sse,
    /// Newline-delimited JSON-RPC on a server's stdin and stdout (`guard wrap`).
    Stdio,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::StreamableHttp => "streamable-http",
            Transport::Sse => "sse",
            Transport::Stdio => "stdio",
        }
    }
}

/// Where a message goes, for decisions and audit.
#[derive(Debug, Clone)]
pub struct Target {
    /// The policy-named server; None: no policy matches (an unknown server).
    pub server: Option<String>,
    pub host: String,
    pub port: u16,
    /// The connection's original destination, when the transport has one.
    pub original_dst: Option<SocketAddr>,
    /// The destination is one of the server's own addresses (not, say, a listener of the
    /// agent's that a `Host` header names the server to): only then do its answers pin tools
    /// or clear blocks.
    pub at_destination: bool,
    /// Whose pins its answers are checked against and update: None, the server's own;
    /// `Some(scope)`, a set of their own (`guard wrap` sessions: one per agent, else uid,
    /// since the agent picks the command that answers, and must not pin or unblock tools
    /// for others).
    pub pin_scope: Option<String>,
    pub session: Option<String>,
    /// The client's `MCP-Protocol-Version` (stdio: what its `initialize` asked for).
    pub protocol_version: Option<String>,
    /// The request's W3C `traceparent` header, validated (a message's `params._meta`
    /// one wins).
    pub traceparent: Option<String>,
    /// A stdio server's command line (arguments joined by spaces).
    pub command: Option<String>,
    pub transport: Transport,
    /// When the request carrying the message arrived (the decision latency counts from here).
    pub received: Instant,
}

impl Target {
    /// The pin set of `server` for this target (see [`Target::pin_scope`]).
    pub fn pins_of(&self, server: &str) -> String {
        match &self.pin_scope {
            Some(scope) => format!("{server}@{scope}"),
            None => server.to_string(),
        }
    }

    /// `host:port` (a stdio server: `stdio:COMMAND`), for unknown servers.
    pub fn address(&self) -> String {
        match (&self.command, self.transport) {
            (Some(c), Transport::Stdio) => format!("stdio:{c}"),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// What to do with a request body.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every message may go to the server as it is.
    Forward,
    /// Nothing is forwarded; these are the answers, one per request in the body (a JSON-RPC
    /// batch when `batch`). Empty when the body held only notifications.
    Answer { batch: bool, answers: Vec<Value> },
    /// The request is refused as a whole, before any message is decided (its `Mcp-Method` /
    /// `Mcp-Name` headers disagree with the body): a client error carrying this answer.
    Reject(Value),
    /// A decision could not be audited: nothing is forwarded (no record, no call).
    Unaudited,
}

/// The `Mcp-Method` / `Mcp-Name` values a transport carried beside the body (2026-07-28 draft).
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    pub method: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// Everything decisions need, shared by every connection and transport.
pub struct Engine {
    policies: RwLock<Arc<PolicySet>>,
    pub limiter: RateLimiter,
    pub pins: Pins,
    pub approvals: Approvals,
    pub(super) audit: Arc<Audit>,
    pub settings: Settings,
}

/// Removes a held call when the request holding it ends, however it ends.
struct ForgetOnDrop<'a>(&'a Approvals, String);

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// What the policy said, before approvals.
enum Step {
    Allow { rule: String },
    Refuse(Refusal),
    Hold { rule: String, timeout_s: u64 },
}

impl Engine {
    pub fn new(policies: PolicySet, pins: Pins, audit: Arc<Audit>, settings: Settings) -> Engine {
        Engine {
            policies: RwLock::new(Arc::new(policies)),
            limiter: RateLimiter::new(),
            pins,
            approvals: Approvals::default(),
            audit,
            settings,
        }
    }

    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.read().unwrap().clone()
    }

    pub fn set_policies(&self, p: PolicySet) {
        *self.policies.write().unwrap() = Arc::new(p);
    }

    pub fn audit_log(&self) -> &Audit {
        &self.audit
    }

    /// A new record about `caller`'s message to `t`.
    pub fn record(
        &self,
        event: Event,
        decision: Decision,
        caller: &Identity,
        t: &Target,
    ) -> Record {
        let mut r = self.audit.record(event, decision);
        r.policy = Some(self.policies.read().unwrap().sha256().to_string());
        r.agent = Some(AgentRef::from(caller));
        r.server = Some(ServerRef {
            name: t.server.clone(),
            host: t.host.clone(),
            port: t.port,
            command: t.command.clone(),
        });
        r.original_dst = t.original_dst.map(|d| d.to_string());
        r.transport = Some(t.transport.as_str().into());
        r.session_id = t.session.clone();
        r.protocol_version = t.protocol_version.clone();
        r.traceparent = t.traceparent.clone();
        r
    }

    /// Writes `r`; false (and an error log) when it cannot be written: the caller fails closed.
    pub fn write(&self, r: &Record) -> bool {
        match self.audit.write(r) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{e:#}");
                false
            }
        }
    }

    /// Decides a whole request body: the unknown-server rule first, then the headers, then every
    /// message. A body with one refused message is not forwarded at all; each of its requests is
    /// answered (the refused ones with their refusal, the others with a "batch" refusal).
    pub async fn enforce_body(
        &self,
        caller: &Identity,
        t: &Target,
        body: &Body,
        headers: Headers<'_>,
    ) -> Outcome {
        if body.messages.len() > wire::MAX_BATCH {
            return self.refuse_oversize(caller, t, body);
        }
        if t.server.is_none() && self.settings.unknown_servers == UnknownServers::Deny {
            return self.refuse_unknown(caller, t, body);
        }
        if let Some(answer) = self.check_headers(caller, t, body, headers) {
            return Outcome::Reject(answer);
        }
        let mut refused: Vec<(usize, Value)> = Vec::new();
        // The records of allowed calls wait until the whole body is decided: a call that is not
        // forwarded (its batch holds a refused one) has no "allow" record, only its "batch" one.
        let mut allowed: Vec<(usize, Box<Record>)> = Vec::new();
        // A batch that will not be forwarded holds no call for a person to approve in vain.
        let may_hold = !body
            .messages
            .iter()
            .any(|m| body.messages.len() > 1 && self.would_refuse(caller, t, m));
        for (i, m) in body.messages.iter().enumerate() {
            match self.judge(caller, t, m, may_hold).await {
                Judged::Allow { record, .. } => allowed.extend(record.map(|r| (i, r))),
                Judged::Refuse(refusal) => {
                    let id = m.id.clone().unwrap_or(Value::Null);
                    refused.push((i, refusal.answer(&id, self.settings.denial)));
                }
                Judged::Unaudited => return Outcome::Unaudited,
            }
        }
        let Some(first) = refused.first().map(|(i, _)| *i) else {
            if allowed.iter().all(|(_, r)| self.write(r)) {
                return Outcome::Forward;
            }
            return Outcome::Unaudited;
        };
        self.refuse_batch(caller, t, body, first, refused, allowed)
    }

    /// Decides one message. Only `tools/call`s are decided (and audited); every other message
    /// is allowed as it is.
    pub async fn enforce(&self, caller: &Identity, t: &Target, m: &Message) -> Verdict {
        match self.judge(caller, t, m, true).await {
            Judged::Allow {
                rule,
                record: Some(r),
            } => match self.write(&r) {
                true => Verdict::Allow { rule },
                false => Verdict::Unaudited,
            },
            Judged::Allow { rule, record: None } => Verdict::Allow { rule },
            Judged::Refuse(x) => Verdict::Refuse(x),
            Judged::Unaudited => Verdict::Unaudited,
        }
    }

    /// Whether the policy refuses this message as it stands (no rate-limit budget spent, no
    /// approval asked): for a batch, which is then refused whole.
    fn would_refuse(&self, caller: &Identity, t: &Target, m: &Message) -> bool {
        let (asked, args, also) = match ask::ask(m) {
            Ask::Pass => return false,
            Ask::Unreadable(_) => return true,
            _ if m.inexact.is_some() => return true,
            Ask::Decide {
                subject,
                args,
                also,
            } => (subject, args, also),
        };
        if !m.is_request() {
            return true;
        }
        let policies = self.policies();
        let Some(sp) = t.server.as_deref().and_then(|n| policies.by_name(n)) else {
            return false;
        };
        if asked.kind == Kind::Tool
            && sp.on_tool_change == ToolChange::Block
            && self.pins.blocked(&t.pins_of(&sp.name), &asked.name)
        {
            return true;
        }
        let policy_caller = caller.caller(sp.grant_exes());
        let now = Instant::now();
        let refuses = |s: &Asked, args: &Value| {
            matches!(
                sp.explain_on(s.subject(), args, &policy_caller, &self.limiter, now),
                policy::Decision::Deny { .. } | policy::Decision::RateLimited { .. }
            )
        };
        also.is_some_and(|a| refuses(&a, &Value::Null)) || refuses(&asked, &args)
    }

    /// [`Engine::enforce`], with an allowed call's record handed back unwritten (a refusal's
    /// is written: it stands whatever else happens). `may_hold`: false in a batch that will be
    /// refused, where a call that needs approval is refused with it instead of held.
    ///
    /// Long (about 90 lines) on purpose: the record is filled in as the decision is made (rule,
    /// reason, hold), so that every way out writes one record that says what happened.
    async fn judge(&self, caller: &Identity, t: &Target, m: &Message, may_hold: bool) -> Judged {
        let (asked, args, also, mut unreadable) = match ask::ask(m) {
            Ask::Pass => {
                return Judged::Allow {
                    rule: "method".into(),
                    record: None,
                }
            }
            Ask::Unreadable(why) => {
                let method = m.method.clone().unwrap_or_default();
                (Asked::method(&method), Value::Null, None, Some(why))
            }
            Ask::Decide {
                subject,
                args,
                also,
            } => (subject, args, also, None),
        };
        if let Some(n) = m.inexact.as_deref().filter(|_| unreadable.is_none()) {
            unreadable = Some(format!(
                "the integer {n} is read differently by servers (exactly by Python, rounded by JavaScript and Go): policy cannot decide on it; send it as a string"
            ));
        }
        let policies = self.policies();
        let server = t.server.as_deref().and_then(|n| policies.by_name(n));
        let id = m.id.clone().unwrap_or(Value::Null);
        let event = match asked.kind {
            Kind::Tool => Event::ToolCall,
            _ => Event::McpRequest,
        };
        let mut r = self.record(event, Decision::Allow, caller, t);
        r.method = m.method.clone();
        r.tool = Some(asked.name.clone());
        r.jsonrpc_id = Some(id);
        if let Some(tp) = m.meta_traceparent() {
            r.traceparent = Some(tp.to_string());
        }
        r.args_sha256 = Some(wire::sha256_hex(&args));
        if self.settings.log_arguments {
            r.arguments = Some(args.clone());
        }
        let protocol = |reason: String| {
            let server = t.server.as_deref().unwrap_or_default();
            Some(Refusal::new(
                RefusalKind::Denied,
                server,
                Some(&asked.name),
                "protocol",
                reason,
            ))
        };
        let refusal = match server {
            _ if unreadable.is_some() => protocol(unreadable.unwrap_or_default()),
            // A request with no id is a "notification" no answer can refuse, yet lenient
            // servers run it: never forwarded.
            _ if !m.is_request() => protocol(format!("{} without an id is refused", asked.method)),
            None => {
                // An unknown server let through by unknown_servers = allow | audit.
                r.rule = Some("policy.unknown_servers".into());
                None
            }
            Some(sp) => {
                let q = Question {
                    sp,
                    asked: &asked,
                    args: &args,
                    also: also.as_ref(),
                    may_hold,
                };
                self.settle(caller, t, q, &mut r).await
            }
        };
        if let Some(x) = &refusal {
            stamp(&mut r, x);
        }
        r.latency_us = Some(t.received.elapsed().as_micros() as u64);
        match refusal {
            Some(_) if !self.write(&r) => Judged::Unaudited,
            Some(mut x) => {
                x.audit_id = r.id;
                Judged::Refuse(x)
            }
            None => Judged::Allow {
                rule: r.rule.clone().unwrap_or_default(),
                record: Some(Box::new(r)),
            },
        }
    }

    /// Decides `q` for `caller`, holding it for approval when the policy says so (and `q` may
    /// be held): the refusal, if any. `r`, the request's record, gets the rule and reason.
    pub(super) async fn settle(
        &self,
        caller: &Identity,
        t: &Target,
        q: Question<'_>,
        r: &mut Record,
    ) -> Option<Refusal> {
        let policy_caller = caller.caller(q.sp.grant_exes());
        let pins = t.pins_of(&q.sp.name);
        let refusal = match self.decide(q.sp, q.asked, q.args, q.also, &policy_caller, &pins) {
            Step::Allow { rule } => {
                r.rule = Some(rule);
                None
            }
            Step::Refuse(x) => Some(x),
            Step::Hold { .. } if !q.may_hold => Some(Refusal::new(
                RefusalKind::Denied,
                &q.sp.name,
                Some(&q.asked.name),
                "batch",
                "not held for approval: the batch contained a blocked call",
            )),
            Step::Hold { rule, timeout_s } => {
                let held = Hold {
                    sp: q.sp,
                    asked: q.asked,
                    args: q.args,
                    args_sha256: r.args_sha256.clone().unwrap_or_default(),
                    jsonrpc_id: r.jsonrpc_id.clone(),
                    rule: &rule,
                    timeout_s,
                };
                let (refusal, why) = self.hold(caller, t, held).await;
                r.reason = why;
                r.rule = Some(rule);
                refusal
            }
        };
        if let Some(x) = &refusal {
            stamp(r, x);
        }
        refusal
    }

    /// The policy's word on a request: pins first (tools), then what `also` names must not be
    /// denied, then [`ServerPolicy::decide_on`].
    fn decide(
        &self,
        sp: &ServerPolicy,
        asked: &Asked,
        args: &Value,
        also: Option<&Asked>,
        caller: &policy::Caller,
        pins: &str,
    ) -> Step {
        let refusal = |kind, rule: &str, reason: String| {
            Step::Refuse(Refusal::new(
                kind,
                &sp.name,
                Some(&asked.name),
                rule,
                reason,
            ))
        };
        if asked.kind == Kind::Tool
            && sp.on_tool_change == ToolChange::Block
            && self.pins.blocked(pins, &asked.name)
        {
            return refusal(
                RefusalKind::ToolChanged,
                "on_tool_change",
                "the tool's definition changed since it was pinned".into(),
            );
        }
        let now = Instant::now();
        if let Some(a) = also {
            // Completing a prompt's or resource's arguments tells what it takes: not for a
            // caller who may not use it.
            let d = sp.explain_on(a.subject(), &Value::Null, caller, &self.limiter, now);
            if let policy::Decision::Deny { rule, reason } = d {
                return refusal(RefusalKind::Denied, &rule, reason);
            }
        }
        match sp.decide_on(asked.subject(), args, caller, &self.limiter, now) {
            policy::Decision::Allow { rule } => Step::Allow { rule },
            policy::Decision::Deny { rule, reason } => refusal(RefusalKind::Denied, &rule, reason),
            policy::Decision::RateLimited {
                rule,
                reason,
                retry_after_s,
            } => {
                let mut x = Refusal::new(
                    RefusalKind::RateLimited,
                    &sp.name,
                    Some(&asked.name),
                    &rule,
                    reason,
                );
                x.retry_after_s = Some(retry_after_s);
                Step::Refuse(x)
            }
            policy::Decision::RequireApproval { rule, timeout_s } => Step::Hold { rule, timeout_s },
        }
    }
}

/// What [`Engine::settle`] decides: `asked` of `sp`, its conditions reading `args`; `also`
/// must not be denied either; `may_hold`: false where a call needing approval is refused.
pub(super) struct Question<'a> {
    pub sp: &'a ServerPolicy,
    pub asked: &'a Asked,
    pub args: &'a Value,
    pub also: Option<&'a Asked>,
    pub may_hold: bool,
}

/// A refusal's decision, rule and reason in its record.
fn stamp(r: &mut Record, x: &Refusal) {
    r.decision = x.kind.audit();
    r.rule = Some(x.rule.clone());
    r.reason = Some(x.reason.clone());
}

/// One message judged, its record not yet written when it is allowed.
enum Judged {
    Allow {
        rule: String,
        record: Option<Box<Record>>,
    },
    Refuse(Refusal),
    Unaudited,
}

/// A `require_approval` request being held.
struct Hold<'a> {
    pub sp: &'a ServerPolicy,
    pub asked: &'a Asked,
    pub args: &'a Value,
    pub args_sha256: String,
    pub jsonrpc_id: Option<Value>,
    pub rule: &'a str,
    pub timeout_s: u64,
}

impl Engine {
    /// Holds a `require_approval` call until an approver answers or the time runs out. Returns
    /// the refusal (None: approved) and what the call's record should give as its reason.
    async fn hold(
        &self,
        caller: &Identity,
        t: &Target,
        h: Hold<'_>,
    ) -> (Option<Refusal>, Option<String>) {
        let approvals = &self.approvals;
        let label = h.asked.label();
        let tool = label.as_str();
        let who = (caller.agent_key(), caller.uid, caller.cgroup_id);
        if approvals.standing((&who.0, who.1, who.2), &h.sp.name, tool, &h.args_sha256) {
            let why = "approved earlier for identical calls (approve --for)";
            return (None, Some(why.into()));
        }
        let requested = approvals.request(Held {
            id: String::new(),
            agent: caller.agent.clone(),
            uid: caller.uid,
            pid: caller.pid,
            instance: caller.cgroup_id,
            server: h.sp.name.clone(),
            tool: tool.to_string(),
            arguments: h.args.clone(),
            args_sha256: h.args_sha256.clone(),
            requested_at: 0,
            timeout_s: h.timeout_s,
            created: None,
        });
        let (id, rx) = match requested {
            Ok(r) => r,
            Err(e) => {
                // Not a person's answer: a retryable refusal, not an approval denied.
                let reason = format!("not held for approval: {e}; try again later");
                let mut refusal = Refusal::new(
                    RefusalKind::RateLimited,
                    &h.sp.name,
                    Some(tool),
                    "approvals.capacity",
                    reason,
                );
                refusal.retry_after_s = Some(5);
                return (Some(refusal), None);
            }
        };
        // An agent that goes away takes its held call with it.
        let _forget = ForgetOnDrop(approvals, id.clone());
        let mut p = self.record(Event::Approval, Decision::Pending, caller, t);
        p.tool = Some(tool.to_string());
        p.rule = Some(h.rule.to_string());
        p.args_sha256 = Some(h.args_sha256.clone());
        p.jsonrpc_id = h.jsonrpc_id.clone();
        p.detail = Some(json!({ "approval_id": id, "timeout_s": h.timeout_s }));
        self.write(&p);
        let answer = tokio::time::timeout(Duration::from_secs(h.timeout_s), rx).await;
        let (kind, reason) = match answer {
            Ok(Ok(Approval::Approved { by })) => {
                return (None, Some(format!("approved by uid {by} (approval {id})")));
            }
            Ok(Ok(Approval::Denied { reason, .. })) => (RefusalKind::ApprovalDenied, reason),
            Ok(Ok(Approval::Shutdown)) | Ok(Err(_)) => (
                RefusalKind::ApprovalDenied,
                "the guard daemon stopped before an approver answered".to_string(),
            ),
            Err(_) => {
                approvals.remove(&id);
                let mut a = self.record(Event::Approval, Decision::Timeout, caller, t);
                a.tool = Some(tool.to_string());
                a.rule = Some(h.rule.to_string());
                a.detail = Some(json!({ "approval_id": id }));
                self.write(&a);
                (
                    RefusalKind::ApprovalTimeout,
                    format!("no approver answered within {} s", h.timeout_s),
                )
            }
        };
        let refusal = Refusal::new(kind, &h.sp.name, Some(tool), h.rule, reason.clone());
        (Some(refusal), Some(reason))
    }

    /// `Mcp-Method` / `Mcp-Name` (2026-07-28 draft) must agree with the body the policy reads:
    /// a mismatch is an evasion attempt, refused (and audited) before anything is decided.
    fn check_headers(
        &self,
        caller: &Identity,
        t: &Target,
        body: &Body,
        h: Headers<'_>,
    ) -> Option<Value> {
        if h.method.is_none() && h.name.is_none() {
            return None;
        }
        let m = &body.messages[0];
        let problem = if body.batch {
            "Mcp-Method / Mcp-Name headers cannot describe a batch".to_string()
        } else {
            let method = m.method.as_deref().unwrap_or("");
            let name = match method {
                "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                    m.params.get("uri").and_then(Value::as_str)
                }
                _ => m.params.get("name").and_then(Value::as_str),
            };
            match (h.method, h.name) {
                (Some(hm), _) if hm != method => format!(
                    "Mcp-Method header \"{hm}\" does not match the body's method \"{method}\""
                ),
                (_, Some(hn)) if Some(hn) != name => format!(
                    "Mcp-Name header \"{hn}\" does not match the body's name \"{}\"",
                    name.unwrap_or("")
                ),
                _ => return None,
            }
        };
        let mut r = self.record(Event::ToolCall, Decision::Deny, caller, t);
        r.method = m.method.clone();
        r.tool = m.tool().map(str::to_string);
        r.jsonrpc_id = m.id.clone();
        r.rule = Some("headers".into());
        r.reason = Some(problem.clone());
        self.write(&r);
        let mut refusal = Refusal::new(
            RefusalKind::Denied,
            t.server.as_deref().unwrap_or_default(),
            m.tool(),
            "headers",
            problem,
        );
        refusal.audit_id = r.id;
        Some(refusal.error(&m.id.clone().unwrap_or(Value::Null)))
    }
}
