//! What guard answers (and audits) in place of what it does not forward: refusals by the
//! transport (a size limit, an upgrade), bodies it cannot read, batches too large or holding a
//! refused call, servers no policy names. Part of the core: no transport in it.

use serde_json::Value;

use super::{
    enforce::{Engine, Outcome, Target},
    verdict::{Refusal, RefusalKind},
    wire::{self, Body, BodyError},
};
use crate::{
    audit::{Decision, Event, Record},
    identity::Identity,
};

impl Engine {
    /// Audits a request refused by its transport (an upgrade, a CONNECT tunnel, a size limit):
    /// `event` with decision deny, the `rule` and `reason`, and returns the record's id.
    pub fn audit_refused(
        &self,
        event: Event,
        caller: &Identity,
        t: &Target,
        method: Option<&str>,
        rule: &str,
        reason: &str,
    ) -> String {
        let mut r = self.record(event, Decision::Deny, caller, t);
        r.method = method.map(str::to_string);
        r.rule = Some(rule.into());
        r.reason = Some(reason.into());
        self.write(&r);
        r.id
    }

    /// The answer to a body guard could not read as JSON-RPC, sent to a policy-named server
    /// (audited; the body is not forwarded).
    pub fn refuse_malformed(&self, caller: &Identity, t: &Target, e: &BodyError) -> Value {
        let mut r = self.record(Event::ToolCall, Decision::Deny, caller, t);
        r.reason = Some(e.to_string());
        r.rule = Some("protocol".into());
        self.write(&r);
        let code = match e {
            BodyError::Json(_) | BodyError::Encoding(_) => wire::PARSE_ERROR,
            BodyError::NotJsonRpc(_) | BodyError::Malformed(_) => wire::INVALID_REQUEST,
        };
        wire::error(&Value::Null, code, &format!("guard: {e}"))
    }

    /// `unknown_servers = "deny"`, and a body to a server no policy names that guard cannot
    /// read, although some server could read JSON-RPC in it: refused (audited), never forwarded
    /// unread. The answer is a JSON-RPC error.
    pub fn refuse_unreadable(&self, caller: &Identity, t: &Target, why: &str) -> Value {
        let reason = format!(
            "guard cannot read this body ({why}) and no policy names the server {}; under \
             policy.unknown_servers = \"deny\" it is not forwarded",
            t.address()
        );
        let id = self.audit_refused(
            Event::McpRequest,
            caller,
            t,
            None,
            "policy.unknown_servers",
            &reason,
        );
        let mut refusal = Refusal::new(
            RefusalKind::Unreadable,
            &t.address(),
            None,
            "policy.unknown_servers",
            reason,
        );
        refusal.audit_id = id;
        refusal.error(&Value::Null)
    }

    /// A refusal of an answer guard could not read (see [`Engine::filter_json`]): the error
    /// each request of the body gets instead (audited already).
    pub fn unreadable_answer(&self, t: &Target, ids: &[Value], why: &str) -> Vec<Value> {
        let refusal = Refusal::new(
            RefusalKind::Unreadable,
            t.server.as_deref().unwrap_or_default(),
            None,
            "protocol",
            why,
        );
        ids.iter().map(|id| refusal.error(id)).collect()
    }

    /// A batch over [`wire::MAX_BATCH`]: each message would be decided and audited on its own,
    /// so one body of thousands of tiny requests would be thousands of records. One refusal,
    /// one record.
    pub(super) fn refuse_oversize(&self, caller: &Identity, t: &Target, body: &Body) -> Outcome {
        let reason = format!(
            "a batch of {} messages (at most {}): send fewer per request",
            body.messages.len(),
            wire::MAX_BATCH
        );
        let mut r = self.record(Event::McpRequest, Decision::Deny, caller, t);
        r.rule = Some("protocol".into());
        r.reason = Some(reason.clone());
        if !self.write(&r) {
            return Outcome::Unaudited;
        }
        let server = t.server.clone().unwrap_or_else(|| t.address());
        let mut refusal = Refusal::new(RefusalKind::Denied, &server, None, "protocol", reason);
        refusal.audit_id = r.id;
        Outcome::Reject(refusal.error(&Value::Null))
    }

    /// A batch that holds a refused message: nothing of it is forwarded, every request in it is
    /// answered — the refused ones with their refusals, the others with a "batch" refusal, each
    /// audited (an allowed call's own record becomes its refusal).
    pub(super) fn refuse_batch(
        &self,
        caller: &Identity,
        t: &Target,
        body: &Body,
        first: usize,
        refused: Vec<(usize, Value)>,
        mut allowed: Vec<(usize, Box<Record>)>,
    ) -> Outcome {
        let first_tool = body.messages[first].tool().unwrap_or("?").to_string();
        let mut answers = Vec::new();
        for (i, m) in body.messages.iter().enumerate() {
            if let Some((_, v)) = refused.iter().find(|(j, _)| *j == i) {
                answers.push(v.clone());
            } else if let (true, Some(id)) = (m.is_request(), &m.id) {
                let reason =
                    format!("not forwarded: the batch contained a blocked call ({first_tool})");
                // An allowed call's own record (tool, arguments' hash) becomes its refusal.
                let mut r = match allowed.iter().position(|(j, _)| *j == i) {
                    Some(k) => {
                        let mut r = *allowed.swap_remove(k).1;
                        r.decision = Decision::Deny;
                        r
                    }
                    None => self.record(Event::McpRequest, Decision::Deny, caller, t),
                };
                r.method = m.method.clone();
                r.jsonrpc_id = Some(id.clone());
                r.rule = Some("batch".into());
                r.reason = Some(reason.clone());
                self.write(&r);
                let mut refusal = Refusal::new(
                    RefusalKind::Denied,
                    t.server.as_deref().unwrap_or_default(),
                    m.tool(),
                    "batch",
                    reason,
                );
                refusal.audit_id = r.id;
                answers.push(refusal.error(id));
            }
        }
        Outcome::Answer {
            batch: body.batch,
            answers,
        }
    }

    /// `unknown_servers = "deny"`: every message is refused (-32005) and audited.
    pub(super) fn refuse_unknown(&self, caller: &Identity, t: &Target, body: &Body) -> Outcome {
        let reason = format!("no policy names the MCP server {}", t.address());
        let mut answers = Vec::new();
        for m in &body.messages {
            let event = if m.method.as_deref() == Some("tools/call") {
                Event::ToolCall
            } else {
                Event::McpRequest
            };
            let mut r = self.record(event, Decision::Deny, caller, t);
            r.method = m.method.clone();
            r.tool = m.tool().map(str::to_string);
            r.jsonrpc_id = m.id.clone();
            r.rule = Some("policy.unknown_servers".into());
            r.reason = Some(reason.clone());
            self.write(&r);
            if let (Some(id), true) = (&m.id, m.is_request()) {
                let mut refusal = Refusal::new(
                    RefusalKind::UnknownServer,
                    &t.address(),
                    m.tool(),
                    "policy.unknown_servers",
                    reason.clone(),
                );
                refusal.audit_id = r.id;
                answers.push(refusal.error(id));
            }
        }
        Outcome::Answer {
            batch: body.batch,
            answers,
        }
    }
}
