//! MCP on the wire: JSON-RPC 2.0 messages as guard reads them from a request body (one message
//! or a batch), the rule for recognising MCP, the tool list inside a `tools/list` answer, and the
//! canonical hash of arguments and tool definitions. Transport-free: HTTP, SSE and stdio hand it
//! bytes.

use serde_json::{json, Map, Value};

/// JSON-RPC errors for requests guard cannot read.
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

/// SHA-256 of a JSON value in a canonical form (object keys sorted), as hex.
pub fn sha256_hex(v: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    canonical_json(v, &mut h);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `v` to `h` with object keys sorted, so equal values hash equally.
fn canonical_json(v: &Value, h: &mut sha2::Sha256) {
    use sha2::Digest;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                h.update(serde_json::to_string(k).unwrap().as_bytes());
                h.update(b":");
                canonical_json(&m[k], h);
                h.update(b",");
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical_json(x, h);
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
    fn hashes_are_canonical() {
        assert_eq!(
            sha256_hex(&json!({"a":1,"b":[1,2]})),
            sha256_hex(&json!({"b":[1,2],"a":1}))
        );
        assert_ne!(sha256_hex(&json!({"a":1})), sha256_hex(&json!({"a":2})));
    }
}
