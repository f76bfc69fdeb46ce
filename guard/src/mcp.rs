//! MCP on the wire: recognising JSON-RPC 2.0 MCP messages, the answers guard gives when it blocks
//! a call (SPEC §6), `tools/list` filtering, and an incremental Server-Sent Events parser so
//! streams are inspected event by event, never buffered whole.

use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};

/// JSON-RPC error codes guard answers with.
pub const DENIED: i64 = -32001;
pub const RATE_LIMITED: i64 = -32002;
pub const APPROVAL_DENIED: i64 = -32003;
pub const APPROVAL_TIMEOUT: i64 = -32004;
pub const UNKNOWN_SERVER: i64 = -32005;
pub const TOOL_CHANGED: i64 = -32006;
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;

/// Method names (or prefixes) that only MCP uses: a JSON-RPC body with one of them is MCP.
const MCP_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/",
    "resources/",
    "prompts/",
    "completion/",
    "logging/",
    "sampling/",
    "elicitation/",
    "roots/",
    "notifications/",
    "server/discover",
    "tasks/",
];

/// One JSON-RPC message of a request body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `None` for notifications.
    pub id: Option<Value>,
    pub method: Option<String>,
    pub params: Value,
    pub raw: Value,
}

impl Message {
    pub fn is_request(&self) -> bool {
        self.id.is_some() && self.method.is_some()
    }

    /// `params.name` of a `tools/call`.
    pub fn tool(&self) -> Option<&str> {
        self.params.get("name").and_then(Value::as_str)
    }

    pub fn arguments(&self) -> Value {
        self.params
            .get("arguments")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()))
    }
}

/// A parsed request body: one message or a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    pub batch: bool,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("not JSON-RPC 2.0: {0}")]
    NotJsonRpc(String),
}

/// Parses a POST body as JSON-RPC 2.0.
pub fn parse_body(bytes: &[u8]) -> Result<Body, BodyError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| BodyError::Json(e.to_string()))?;
    let (batch, items) = match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(BodyError::NotJsonRpc("empty batch".into()));
            }
            (true, items)
        }
        other => (false, vec![other]),
    };
    let mut messages = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(obj) = &item else {
            return Err(BodyError::NotJsonRpc(
                "a message is not a JSON object".into(),
            ));
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(BodyError::NotJsonRpc("missing \"jsonrpc\": \"2.0\"".into()));
        }
        check_key_case(obj, &["jsonrpc", "id", "method", "params"])?;
        if let Some(Value::Object(params)) = obj.get("params") {
            check_key_case(params, &["name", "arguments", "uri"])?;
        }
        let method = match obj.get("method") {
            None => None,
            Some(Value::String(m)) => Some(m.clone()),
            Some(_) => return Err(BodyError::NotJsonRpc("\"method\" is not a string".into())),
        };
        let id = obj
            .get("id")
            .cloned()
            .filter(|i| !i.is_null() || method.is_none());
        messages.push(Message {
            id,
            method,
            params: obj.get("params").cloned().unwrap_or(Value::Null),
            raw: item,
        });
    }
    Ok(Body { batch, messages })
}

/// Refuses keys that differ from a protocol key only in case (`Method`, `NAME`): some servers
/// (Go's encoding/json) read them case-insensitively, so guard and the server would read
/// different calls.
fn check_key_case(obj: &Map<String, Value>, keys: &[&str]) -> Result<(), BodyError> {
    for k in obj.keys() {
        let lower = k.to_ascii_lowercase();
        if keys.contains(&lower.as_str()) && *k != lower {
            return Err(BodyError::NotJsonRpc(format!(
                "key `{k}` differs from `{lower}` only in case"
            )));
        }
    }
    Ok(())
}

pub fn is_mcp_method(method: &str) -> bool {
    MCP_METHODS.iter().any(|m| {
        if m.ends_with('/') {
            method.starts_with(m)
        } else {
            method == *m
        }
    })
}

/// Whether `body` looks like MCP: JSON-RPC 2.0 with at least one MCP method.
pub fn looks_like_mcp(body: &Body) -> bool {
    body.messages
        .iter()
        .any(|m| m.method.as_deref().is_some_and(is_mcp_method))
}

/// What guard says about a blocked call, carried in `error.data.guard`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: i64,
    pub decision: &'static str,
    pub server: String,
    pub tool: Option<String>,
    pub rule: String,
    pub reason: String,
    pub retry_after_s: Option<u64>,
    pub audit_id: String,
}

impl Refusal {
    pub fn message(&self) -> String {
        match &self.tool {
            Some(t) => format!("guard: {t} {}: {}", verb(self.decision), self.reason),
            None => format!("guard: {}: {}", verb(self.decision), self.reason),
        }
    }

    fn data(&self) -> Value {
        let mut g = json!({
            "decision": self.decision,
            "server": self.server,
            "tool": self.tool,
            "rule": self.rule,
            "reason": self.reason,
            "retryable": self.retry_after_s.is_some() || self.code == APPROVAL_TIMEOUT,
            "audit_id": self.audit_id,
        });
        if let Some(s) = self.retry_after_s {
            g["retry_after_s"] = json!(s);
        }
        json!({ "guard": g })
    }

    /// The JSON-RPC error answer (SPEC §6).
    pub fn error(&self, id: &Value) -> Value {
        json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": { "code": self.code, "message": self.message(), "data": self.data() }
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
}

fn verb(decision: &str) -> &str {
    match decision {
        "deny" => "denied",
        "rate_limited" => "rate limited",
        "approval_denied" => "approval denied",
        "approval_timeout" => "approval timed out",
        "unknown_server" => "denied (unknown MCP server)",
        "tool_changed" => "blocked (tool definition changed)",
        other => other,
    }
}

/// A plain JSON-RPC error (for malformed requests and the like).
pub fn error(id: &Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// The tools in a `tools/list` result, if `msg` is one.
pub fn tools_of(msg: &Value) -> Option<&Vec<Value>> {
    msg.get("result")?.get("tools")?.as_array()
}

/// Removes the tools `keep` rejects from a `tools/list` result; returns the removed names.
pub fn filter_tools(msg: &mut Value, mut keep: impl FnMut(&str) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    if let Some(tools) = msg
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    {
        tools.retain(|t| {
            let name = t.get("name").and_then(Value::as_str).unwrap_or("");
            let k = keep(name);
            if !k {
                removed.push(name.to_string());
            }
            k
        });
    }
    removed
}

/// One event of a `text/event-stream`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SseEvent {
    /// The event exactly as it arrived, blank-line terminator included.
    pub raw: Bytes,
    pub event: Option<String>,
    pub data: Option<String>,
    pub id: Option<String>,
}

impl SseEvent {
    /// Re-encodes the event with new `data`, keeping its `event` and `id` fields.
    pub fn with_data(&self, data: &str) -> Bytes {
        let mut out = String::new();
        if let Some(id) = &self.id {
            out.push_str(&format!("id: {id}\n"));
        }
        if let Some(e) = &self.event {
            out.push_str(&format!("event: {e}\n"));
        }
        for line in data.split('\n') {
            out.push_str(&format!("data: {line}\n"));
        }
        out.push('\n');
        Bytes::from(out)
    }
}

/// Splits a byte stream into SSE events as they complete (CRLF, LF or CR line ends).
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    max: usize,
}

impl SseParser {
    /// `max`: the largest event held while incomplete (beyond it the stream is refused).
    pub fn new(max: usize) -> Self {
        SseParser {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Feeds bytes; returns the events completed by them. Err when an event outgrows `max`.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, usize> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let raw = self.buf.split_to(end).freeze();
            events.push(parse_event(raw));
        }
        if self.buf.len() > self.max {
            return Err(self.buf.len());
        }
        Ok(events)
    }

    /// Bytes of an incomplete event left at the end of the stream.
    pub fn rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// Index just past the blank line that ends the first complete event.
fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_start = true;
    while i < b.len() {
        match b[i] {
            b'\n' | b'\r' => {
                let len = if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                if b[i] == b'\r' && i + 1 == b.len() {
                    // A CR at the very end may be the first half of CRLF: wait.
                    return None;
                }
                if line_start {
                    return Some(i + len);
                }
                line_start = true;
                i += len;
            }
            _ => {
                line_start = false;
                i += 1;
            }
        }
    }
    None
}

fn parse_event(raw: Bytes) -> SseEvent {
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut ev = SseEvent {
        raw,
        ..Default::default()
    };
    let mut data: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => data.push(value),
            "event" => ev.event = Some(value.to_string()),
            "id" => ev.id = Some(value.to_string()),
            _ => {}
        }
    }
    if !data.is_empty() {
        ev.data = Some(data.join("\n"));
    }
    ev
}

/// SHA-256 of a JSON value in a canonical form (object keys sorted), as hex.
pub fn sha256_hex(v: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    canonical(v, &mut h);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn canonical(v: &Value, h: &mut sha2::Sha256) {
    use sha2::Digest;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                h.update(serde_json::to_string(k).unwrap().as_bytes());
                h.update(b":");
                canonical(&m[k], h);
                h.update(b",");
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical(x, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        other => h.update(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_messages_and_batches() {
        let b = parse_body(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}"#).unwrap();
        assert!(!b.batch);
        let m = &b.messages[0];
        assert!(m.is_request());
        assert_eq!(m.tool(), Some("echo"));
        assert_eq!(m.arguments(), json!({"text":"hi"}));
        assert!(looks_like_mcp(&b));

        let b = parse_body(br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"a","method":"tools/list"}]"#).unwrap();
        assert!(b.batch);
        assert_eq!(b.messages.len(), 2);
        assert!(!b.messages[0].is_request());
        assert_eq!(b.messages[1].id, Some(json!("a")));
    }

    #[test]
    fn rejects_what_is_not_json_rpc() {
        assert!(matches!(parse_body(b"{nope"), Err(BodyError::Json(_))));
        assert!(matches!(parse_body(b"[]"), Err(BodyError::NotJsonRpc(_))));
        assert!(matches!(
            parse_body(br#"{"id":1,"method":"x"}"#),
            Err(BodyError::NotJsonRpc(_))
        ));
        assert!(matches!(
            parse_body(br#"{"jsonrpc":"2.0","method":5}"#),
            Err(BodyError::NotJsonRpc(_))
        ));
        let b = parse_body(br#"{"jsonrpc":"2.0","id":1,"method":"eth_call"}"#).unwrap();
        assert!(!looks_like_mcp(&b));
    }

    #[test]
    fn case_variant_keys_are_refused() {
        let smuggled = br#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}"#;
        assert!(matches!(
            parse_body(smuggled),
            Err(BodyError::NotJsonRpc(_))
        ));
        let smuggled =
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}"#;
        assert!(matches!(
            parse_body(smuggled),
            Err(BodyError::NotJsonRpc(_))
        ));
        // Other keys may use any case (arguments are the tool's business).
        let ok = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"Name":1}}}"#;
        assert!(parse_body(ok).is_ok());
    }

    #[test]
    fn mcp_methods() {
        for m in [
            "initialize",
            "tools/call",
            "tools/list",
            "notifications/initialized",
            "resources/read",
            "ping",
        ] {
            assert!(is_mcp_method(m), "{m}");
        }
        for m in ["initialized", "toolsx", "eth_call", "tools"] {
            assert!(!is_mcp_method(m), "{m}");
        }
    }

    fn refusal() -> Refusal {
        Refusal {
            code: DENIED,
            decision: "deny",
            server: "flux".into(),
            tool: Some("flux_edit_image".into()),
            rule: "tools.flux_edit_image".into(),
            reason: "image editing is not approved".into(),
            retry_after_s: None,
            audit_id: "abc".into(),
        }
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
        r.code = RATE_LIMITED;
        r.decision = "rate_limited";
        r.retry_after_s = Some(12);
        let v = r.error(&json!("x"));
        assert_eq!(v["error"]["data"]["guard"]["retry_after_s"], 12);
        assert_eq!(v["error"]["data"]["guard"]["retryable"], true);
        let t = refusal().tool_result(&json!(1));
        assert_eq!(t["result"]["isError"], true);
        assert!(t["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("not approved"));
    }

    #[test]
    fn filters_tools_lists() {
        let mut v = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"},{"name":"c"}],"nextCursor":"2"}});
        assert!(tools_of(&v).is_some());
        let removed = filter_tools(&mut v, |n| n != "b");
        assert_eq!(removed, vec!["b"]);
        assert_eq!(v["result"]["tools"], json!([{"name":"a"},{"name":"c"}]));
        assert_eq!(v["result"]["nextCursor"], "2");
        assert!(tools_of(&json!({"result":{}})).is_none());
    }

    #[test]
    fn sse_events_split_across_chunks_and_line_endings() {
        let mut p = SseParser::new(1 << 20);
        assert!(p.push(b"event: message\nda").unwrap().is_empty());
        let evs = p
            .push(b"ta: {\"a\":1}\n\nid: 5\r\ndata: x\r\ndata: y\r\n\r\n: comment\n\n")
            .unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].event.as_deref(), Some("message"));
        assert_eq!(evs[0].data.as_deref(), Some("{\"a\":1}"));
        assert_eq!(&evs[0].raw[..], b"event: message\ndata: {\"a\":1}\n\n");
        assert_eq!(evs[1].id.as_deref(), Some("5"));
        assert_eq!(evs[1].data.as_deref(), Some("x\ny"));
        assert_eq!(evs[2].data, None);
        // A CR at a chunk boundary is not taken for a blank line.
        let mut p = SseParser::new(1 << 20);
        assert!(p.push(b"data: z\r\n\r").unwrap().is_empty());
        assert_eq!(p.push(b"\n").unwrap().len(), 1);
        assert!(p.rest().is_empty());
    }

    #[test]
    fn sse_events_are_bounded() {
        let mut p = SseParser::new(8);
        assert!(p.push(b"data: 0123456789").is_err());
    }

    #[test]
    fn sse_reencoding_keeps_fields() {
        let ev = SseEvent {
            event: Some("message".into()),
            id: Some("9".into()),
            data: Some("old".into()),
            ..Default::default()
        };
        assert_eq!(
            &ev.with_data("{}")[..],
            b"id: 9\nevent: message\ndata: {}\n\n"
        );
    }

    #[test]
    fn hashes_are_canonical() {
        assert_eq!(
            sha256_hex(&json!({"a":1,"b":[1,2]})),
            sha256_hex(&json!({"b":[1,2],"a":1}))
        );
        assert_ne!(sha256_hex(&json!({"a":1})), sha256_hex(&json!({"a":2})));
    }
}
