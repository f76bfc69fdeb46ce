//! What the enforcement core decides about a message, and the one place each kind of refusal
//! gets its JSON-RPC code, its wording, its audit decision and whether a retry can help. The
//! answer on the wire (README "Decisions on the wire") and the audit record are both derived
//! from a [`Refusal`], so they cannot disagree.

use serde_json::{json, Value};

use crate::{
    audit::{clip, Decision, MAX_HOST, MAX_TEXT},
    config::Denial,
};

/// Why guard refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Policy (or protocol) says no: -32001.
    Denied,
    /// A rate limit is exhausted: -32002, retryable after `retry_after_s`.
    RateLimited,
    /// An approver said no (or the daemon stopped while it was held): -32003.
    ApprovalDenied,
    /// Nobody answered within the approval timeout: -32004, retryable.
    ApprovalTimeout,
    /// No policy names the MCP server and `unknown_servers = "deny"`: -32005.
    UnknownServer,
    /// The tool's definition differs from its pin: -32006.
    ToolChanged,
    /// guard cannot read the message (or the server's answer) the way every peer would: -32603
    /// (JSON-RPC's internal error), and nothing of it is passed on.
    Unreadable,
}

impl RefusalKind {
    /// The JSON-RPC error code.
    pub fn code(self) -> i64 {
        match self {
            RefusalKind::Denied => -32001,
            RefusalKind::RateLimited => -32002,
            RefusalKind::ApprovalDenied => -32003,
            RefusalKind::ApprovalTimeout => -32004,
            RefusalKind::UnknownServer => -32005,
            RefusalKind::ToolChanged => -32006,
            RefusalKind::Unreadable => -32603,
        }
    }

    /// `error.data.guard.decision`.
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::Denied => "deny",
            RefusalKind::RateLimited => "rate_limited",
            RefusalKind::ApprovalDenied => "approval_denied",
            RefusalKind::ApprovalTimeout => "approval_timeout",
            RefusalKind::UnknownServer => "unknown_server",
            RefusalKind::ToolChanged => "tool_changed",
            RefusalKind::Unreadable => "unreadable",
        }
    }

    /// How the message says it: `guard: TOOL <verb>: reason`.
    pub fn verb(self) -> &'static str {
        match self {
            RefusalKind::Denied => "denied",
            RefusalKind::RateLimited => "rate limited",
            RefusalKind::ApprovalDenied => "approval denied",
            RefusalKind::ApprovalTimeout => "approval timed out",
            RefusalKind::UnknownServer => "denied (unknown MCP server)",
            RefusalKind::ToolChanged => "blocked (tool definition changed)",
            RefusalKind::Unreadable => "refused (unreadable)",
        }
    }

    /// The audit record's `decision` (an unknown server is a denial there).
    pub fn audit(self) -> Decision {
        match self {
            RefusalKind::Denied | RefusalKind::UnknownServer | RefusalKind::Unreadable => {
                Decision::Deny
            }
            RefusalKind::RateLimited => Decision::RateLimited,
            RefusalKind::ApprovalDenied => Decision::ApprovalDenied,
            RefusalKind::ApprovalTimeout => Decision::ApprovalTimeout,
            RefusalKind::ToolChanged => Decision::ToolChanged,
        }
    }

    /// Whether the same call may pass later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            RefusalKind::RateLimited | RefusalKind::ApprovalTimeout
        )
    }
}

/// A refused message: what guard answers in its place, carried in `error.data.guard`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub server: String,
    pub tool: Option<String>,
    pub rule: String,
    pub reason: String,
    pub retry_after_s: Option<u64>,
    /// The id of the audit record of this decision.
    pub audit_id: String,
}

impl Refusal {
    pub fn new(
        kind: RefusalKind,
        server: &str,
        tool: Option<&str>,
        rule: &str,
        reason: impl Into<String>,
    ) -> Refusal {
        // The agent chose the tool name (and reasons may quote it): its answer stays small.
        let reason = reason.into();
        Refusal {
            kind,
            server: clip(server, MAX_HOST + 8).into_owned(),
            tool: tool.map(|t| clip(t, 256).into_owned()),
            rule: rule.to_string(),
            reason: clip(&reason, MAX_TEXT).into_owned(),
            retry_after_s: None,
            audit_id: String::new(),
        }
    }

    pub fn message(&self) -> String {
        match &self.tool {
            Some(t) => format!("guard: {t} {}: {}", self.kind.verb(), self.reason),
            None => format!("guard: {}: {}", self.kind.verb(), self.reason),
        }
    }

    fn data(&self) -> Value {
        let mut g = json!({
            "decision": self.kind.label(),
            "server": self.server,
            "tool": self.tool,
            "rule": self.rule,
            "reason": self.reason,
            "retryable": self.kind.retryable(),
            "audit_id": self.audit_id,
        });
        if let Some(s) = self.retry_after_s {
            g["retry_after_s"] = json!(s);
        }
        json!({ "guard": g })
    }

    /// The JSON-RPC error answer.
    pub fn error(&self, id: &Value) -> Value {
        json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": { "code": self.kind.code(), "message": self.message(), "data": self.data() }
        })
    }

    /// `policy.denial = "tool_result"`: a `CallToolResult` with `isError`.
    pub fn tool_result(&self, id: &Value) -> Value {
        json!({
            "jsonrpc": "2.0",
            "id": id,
            "result": {
                "content": [{ "type": "text", "text": self.message() }],
                "isError": true,
                "_meta": self.data(),
            }
        })
    }

    /// The answer to request `id` in the configured style.
    pub fn answer(&self, id: &Value, denial: Denial) -> Value {
        match denial {
            Denial::Error => self.error(id),
            Denial::ToolResult => self.tool_result(id),
        }
    }
}

/// The decision on one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It may go to the server; `rule` says what allowed it.
    Allow { rule: String },
    /// guard answers in its place; nothing reaches the server.
    Refuse(Refusal),
    /// The decision could not be written to the audit log: nothing is forwarded, and the
    /// transport answers with its own "unavailable" error (no record, no call).
    Unaudited,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal() -> Refusal {
        let mut r = Refusal::new(
            RefusalKind::Denied,
            "flux",
            Some("flux_edit_image"),
            "tools.flux_edit_image",
            "image editing is not approved",
        );
        r.audit_id = "abc".into();
        r
    }

    #[test]
    fn denial_matches_the_contract() {
        let v = refusal().error(&json!(7));
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":7,"error":{"code":-32001,
              "message":"guard: flux_edit_image denied: image editing is not approved",
              "data":{"guard":{"decision":"deny","server":"flux","tool":"flux_edit_image",
              "rule":"tools.flux_edit_image","reason":"image editing is not approved",
              "retryable":false,"audit_id":"abc"}}}})
        );
        let mut r = refusal();
        r.kind = RefusalKind::RateLimited;
        r.retry_after_s = Some(12);
        let v = r.error(&json!("x"));
        assert_eq!(v["error"]["code"], -32002);
        assert_eq!(v["error"]["data"]["guard"]["decision"], "rate_limited");
        assert_eq!(v["error"]["data"]["guard"]["retry_after_s"], 12);
        assert_eq!(v["error"]["data"]["guard"]["retryable"], true);
        let t = refusal().answer(&json!(1), Denial::ToolResult);
        assert_eq!(t["result"]["isError"], true);
        assert!(t["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("not approved"));
    }

    #[test]
    fn each_kind_has_its_code_label_and_audit_decision() {
        use RefusalKind::*;
        let kinds = [
            Denied,
            RateLimited,
            ApprovalDenied,
            ApprovalTimeout,
            UnknownServer,
            ToolChanged,
            Unreadable,
        ];
        let codes: Vec<i64> = kinds.iter().map(|k| k.code()).collect();
        assert_eq!(
            codes,
            [-32001, -32002, -32003, -32004, -32005, -32006, -32603]
        );
        assert_eq!(UnknownServer.audit(), Decision::Deny);
        assert_eq!(ToolChanged.audit(), Decision::ToolChanged);
        let retryable: Vec<bool> = kinds.iter().map(|k| k.retryable()).collect();
        assert_eq!(retryable, [false, true, false, true, false, false, false]);
        assert_eq!(
            Refusal::new(UnknownServer, "x:1", None, "policy.unknown_servers", "r").message(),
            "guard: denied (unknown MCP server): r"
        );
    }
}
