//! What an audit record says: one JSON object per line, its `event` and `decision` as enums so
//! that every writer spells them the same way.

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A redirected connection (one per connection; TLS ones say whether they were intercepted).
    Connection,
    /// How many of an agent's connection records were left out under a flood.
    ConnectionSummary,
    /// How many records of requests guard refused an agent were left out under a flood.
    RefusalSummary,
    /// A `tools/call`.
    ToolCall,
    /// A filtered `tools/list` answer.
    ToolsList,
    /// Another MCP request guard refused (unknown server, batch, upgrade, ...).
    McpRequest,
    /// A tool whose definition differs from its pin.
    ToolChanged,
    /// A held call: pending, approved, denied, timed out.
    Approval,
    /// An approver told of a held call (`[[approvals.notify]]`): applied, or error.
    ApprovalNotify,
    /// The server could not be reached or answered badly.
    UpstreamError,
    /// A request over a size limit.
    Limit,
    PolicyReload,
    /// A refused control-socket request.
    Control,
    AgentStart,
    AgentExit,
    DaemonStart,
    DaemonStop,
    /// `guard disable`.
    Disable,
    /// Something the kernel refused a guarded process (containment).
    Contained,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Connection => "connection",
            Event::Contained => "contained",
            Event::ConnectionSummary => "connection_summary",
            Event::RefusalSummary => "refusal_summary",
            Event::ToolCall => "tool_call",
            Event::ToolsList => "tools_list",
            Event::McpRequest => "mcp_request",
            Event::ToolChanged => "tool_changed",
            Event::Approval => "approval",
            Event::ApprovalNotify => "approval_notify",
            Event::UpstreamError => "upstream_error",
            Event::Limit => "limit",
            Event::PolicyReload => "policy_reload",
            Event::Control => "control",
            Event::AgentStart => "agent_start",
            Event::AgentExit => "agent_exit",
            Event::DaemonStart => "daemon_start",
            Event::DaemonStop => "daemon_stop",
            Event::Disable => "disable",
        }
    }
}

/// What was decided (or what happened), per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// connection: forwarded.
    Pass,
    /// connection: the client closed (or stayed silent) before sending anything classifiable.
    Closed,
    /// connection / upstream_error: something failed; nothing was forwarded.
    Error,
    Allow,
    Deny,
    RateLimited,
    /// tool_call refused because the tool's definition changed since it was pinned.
    ToolChanged,
    ApprovalDenied,
    ApprovalTimeout,
    /// tool_changed under `on_tool_change = "block"`.
    Block,
    /// tools_list.
    Filter,
    /// approval steps.
    Pending,
    Approved,
    Denied,
    Timeout,
    /// policy_reload.
    Applied,
    Rejected,
    /// daemon and agent lifecycle.
    Enforce,
    /// disable.
    FailOpen,
    /// connection_summary: records left out.
    Dropped,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pass => "pass",
            Decision::Closed => "closed",
            Decision::Error => "error",
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::RateLimited => "rate_limited",
            Decision::ToolChanged => "tool_changed",
            Decision::ApprovalDenied => "approval_denied",
            Decision::ApprovalTimeout => "approval_timeout",
            Decision::Block => "block",
            Decision::Filter => "filter",
            Decision::Pending => "pending",
            Decision::Approved => "approved",
            Decision::Denied => "denied",
            Decision::Timeout => "timeout",
            Decision::Applied => "applied",
            Decision::Rejected => "rejected",
            Decision::Enforce => "enforce",
            Decision::FailOpen => "fail_open",
            Decision::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub ts: String,
    pub id: String,
    pub event: Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The MCP protocol version the client speaks (`MCP-Protocol-Version`, or `initialize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// The W3C trace context the client sent (`traceparent` header or `params._meta`),
    /// validated: the exported span of this request joins that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jsonrpc_id: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_sha256: Option<String>,
    /// Only with `audit.log_arguments = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    pub decision: Decision,
    /// The hash of the policy set that decided (decision records): drift between hosts shows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Who asked for a control-plane action (uid), for `exec`, `disable`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// Longest agent-supplied text a record keeps (method and tool names, request ids, session
/// ids, reasons that quote them): one request must not become megabytes of audit log.
pub const MAX_TEXT: usize = 1024;
/// Longest host name kept (DNS names are at most 253 bytes).
pub const MAX_HOST: usize = 255;

/// `s` cut to at most `max` bytes (at a character boundary), saying how much was cut.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…[{} more bytes]", &s[..end], s.len() - end))
}

impl Record {
    /// This record with every text an agent chose clipped to [`MAX_TEXT`]; `None` when
    /// nothing is longer.
    pub fn clipped(&self) -> Option<Record> {
        let long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_TEXT);
        let id_long = self
            .jsonrpc_id
            .as_ref()
            .is_some_and(|v| v.to_string().len() > MAX_TEXT);
        let texts = [
            &self.method,
            &self.tool,
            &self.reason,
            &self.session_id,
            &self.client,
            &self.rule,
            &self.protocol_version,
        ];
        let host_long = self.server.as_ref().is_some_and(|s| {
            s.host.len() > MAX_HOST || s.command.as_ref().is_some_and(|c| c.len() > MAX_TEXT)
        });
        if !id_long && !host_long && !texts.into_iter().any(long) {
            return None;
        }
        let cut = |s: &Option<String>| s.as_deref().map(|s| clip(s, MAX_TEXT).into_owned());
        let mut r = self.clone();
        r.method = cut(&self.method);
        r.tool = cut(&self.tool);
        r.reason = cut(&self.reason);
        r.session_id = cut(&self.session_id);
        r.client = cut(&self.client);
        r.rule = cut(&self.rule);
        r.protocol_version = cut(&self.protocol_version);
        if let Some(server) = r.server.as_mut() {
            // From `Host` or SNI, which the agent writes.
            server.host = clip(&server.host, MAX_HOST).into_owned();
            server.command = server
                .command
                .as_deref()
                .map(|c| clip(c, MAX_TEXT).into_owned());
        }
        if id_long {
            let id = self
                .jsonrpc_id
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_default();
            r.jsonrpc_id = Some(serde_json::Value::String(clip(&id, MAX_TEXT).into_owned()));
        }
        Some(r)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentRef {
    pub name: Option<String>,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

impl AgentRef {
    /// The agent as limits know it (see [`Identity::agent_key`]).
    pub fn key(&self) -> String {
        crate::identity::agent_key(&self.name, self.uid)
    }
}

impl From<&Identity> for AgentRef {
    fn from(i: &Identity) -> Self {
        AgentRef {
            name: i.agent.clone(),
            pid: i.pid,
            tgid: i.tgid,
            uid: i.uid,
            gid: i.gid,
            comm: i.comm.clone(),
            exe: i.exe.clone(),
            cgroup: i.cgroup.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerRef {
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    /// A stdio server's command line (`guard wrap`), arguments joined by spaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl Record {
    /// A record with only its event and decision (`ts` and `id` empty: [`super::Audit::record`]
    /// fills them in).
    pub fn new(event: Event, decision: Decision) -> Record {
        Record {
            ts: String::new(),
            id: String::new(),
            event,
            agent: None,
            server: None,
            original_dst: None,
            client: None,
            transport: None,
            session_id: None,
            protocol_version: None,
            traceparent: None,
            jsonrpc_id: None,
            method: None,
            tool: None,
            args_sha256: None,
            policy: None,
            arguments: None,
            decision,
            rule: None,
            reason: None,
            latency_us: None,
            actor_uid: None,
            detail: None,
        }
    }
}

/// A W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`, lowercase hex) as its trace id,
/// parent span id and flags; None when `s` is not one, or names the invalid all-zero ids.
pub fn parse_traceparent(s: &str) -> Option<(u128, u64, u8)> {
    let b = s.as_bytes();
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let hex = |r: std::ops::Range<usize>| {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            .then_some(part)
    };
    // Version ff is forbidden; the fields of later versions begin as version 00's do.
    if hex(0..2)? == "ff" {
        return None;
    }
    let trace = u128::from_str_radix(hex(3..35)?, 16).ok()?;
    let parent = u64::from_str_radix(hex(36..52)?, 16).ok()?;
    let flags = u8::from_str_radix(hex(53..55)?, 16).ok()?;
    (trace != 0 && parent != 0).then_some((trace, parent, flags))
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` without a date library (civil-from-days, Howard Hinnant).
pub fn rfc3339(secs: u64, micros: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_chosen_texts_are_clipped() {
        assert_eq!(clip("short", 10), "short");
        // At a character boundary: "é" is two bytes.
        assert_eq!(clip("aé", 2), "a…[2 more bytes]");
        let mut r = Record {
            ts: String::new(),
            id: "x".into(),
            event: Event::ToolCall,
            agent: None,
            server: None,
            original_dst: None,
            client: None,
            transport: None,
            session_id: None,
            protocol_version: None,
            traceparent: None,
            jsonrpc_id: Some(serde_json::json!("1")),
            method: Some("tools/call".into()),
            tool: Some("echo".into()),
            args_sha256: None,
            policy: None,
            arguments: None,
            decision: Decision::Deny,
            rule: None,
            reason: None,
            latency_us: None,
            actor_uid: None,
            detail: None,
        };
        assert!(r.clipped().is_none());
        r.tool = Some("t".repeat(1 << 20));
        r.jsonrpc_id = Some(serde_json::json!(["i".repeat(1 << 20)]));
        r.server = Some(ServerRef {
            name: None,
            host: "h".repeat(60_000),
            port: 80,
            command: None,
        });
        let c = r.clipped().unwrap();
        assert!(serde_json::to_vec(&c).unwrap().len() < 4 * MAX_TEXT);
        assert!(c.tool.unwrap().starts_with("ttt"));
        assert_eq!(c.method.as_deref(), Some("tools/call"));
    }
}
