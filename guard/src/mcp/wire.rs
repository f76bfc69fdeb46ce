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

/// Most messages in one MCP batch (see [`crate::mcp::Engine::enforce_body`]). JSON-RPC that is
/// not MCP, to a server no policy names, is not guard's to limit.
pub const MAX_BATCH: usize = 100;

/// One JSON-RPC message of a request body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `None` for notifications.
    pub id: Option<Value>,
    pub method: Option<String>,
    pub params: Value,
    /// An integer in the body that servers read differently ([`inexact_integer`]): policy
    /// cannot decide on what a server will read, so a governed request with one is refused.
    pub inexact: Option<String>,
}

impl Message {
    pub fn is_request(&self) -> bool {
        self.id.is_some() && self.method.is_some()
    }

    /// `params.name` of a `tools/call`.
    pub fn tool(&self) -> Option<&str> {
        self.params.get("name").and_then(Value::as_str)
    }

    /// `params._meta.traceparent` (how MCP carries W3C trace context), when it is a valid one.
    pub fn meta_traceparent(&self) -> Option<&str> {
        self.params
            .get("_meta")
            .and_then(|m| m.get("traceparent"))
            .and_then(Value::as_str)
            .filter(|v| crate::audit::parse_traceparent(v).is_some())
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
    /// Not JSON as every parser reads it the same way (see [`read_json`]).
    #[error("malformed JSON: {0}")]
    Json(String),
    /// JSON with no JSON-RPC message in it at all (no key that reads as `jsonrpc` or
    /// `method`): a plain JSON API.
    #[error("not JSON-RPC 2.0: {0}")]
    NotJsonRpc(String),
    /// A JSON-RPC message guard cannot read the way every server would.
    #[error("malformed JSON-RPC: {0}")]
    Malformed(String),
    /// Bytes a server would decode (a charset, a compression) before reading them: what guard
    /// parsed is not what the server would read.
    #[error("unreadable body: {0} (guard reads only uncompressed UTF-8)")]
    Encoding(String),
}

// The canonical rule. guard and the server must read the same message, or guard refuses it.
// Parsers differ in three ways that matter: duplicate keys (most take the last, some the
// first), case (Go's encoding/json matches a key to a field case-insensitively, with Unicode
// simple case folding), and what else they accept (NaN, Infinity, numbers beyond f64, deep
// nesting, trailing data, BOMs). guard reads a body only when no parser can read it
// differently: no key twice in one object, no two keys that fold to the same name, every key
// that folds onto a protocol key spelled exactly as that key, and strict JSON (anything serde
// refuses, others may accept: it is refused).

pub use crate::fold::fold_key;

/// Keys guard reads in a JSON-RPC message (requests and answers).
pub const ENVELOPE_KEYS: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];
/// Keys guard reads in `params`.
pub const PARAMS_KEYS: &[&str] = &["name", "arguments", "uri", "cursor", "ref", "_meta"];
/// Keys guard reads in a list result (`tools/list`, `resources/list`,
/// `resources/templates/list`, `prompts/list`) and in each of its tools.
pub const LIST_KEYS: &[&str] = &[
    "tools",
    "resources",
    "resourceTemplates",
    "prompts",
    "nextCursor",
];
/// The lists beside `tools` that answers carry: (result field, the item's key policy reads,
/// the method that answers with it).
pub const OTHER_LISTS: &[(&str, &str, &str)] = &[
    ("resources", "uri", "resources/list"),
    (
        "resourceTemplates",
        "uriTemplate",
        "resources/templates/list",
    ),
    ("prompts", "name", "prompts/list"),
];
/// Keys guard reads in a resource, template or prompt of a list.
pub const ITEM_KEYS: &[&str] = &["name", "uri", "uriTemplate"];
pub const TOOL_KEYS: &[&str] = &[
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
];

/// Refuses, in `obj`, a key that folds onto one of `keys` without being it (`Method`,
/// `paramſ`): a case-insensitive server would read it as that key.
pub fn check_keys(obj: &Map<String, Value>, keys: &[&str]) -> Result<(), String> {
    for k in obj.keys() {
        let folded = fold_key(k);
        if let Some(p) = keys.iter().find(|p| **p == folded && *p != k) {
            return Err(format!(
                "key `{}` would be read as `{p}` by case-insensitive decoders",
                k.escape_debug()
            ));
        }
    }
    Ok(())
}

/// Reads JSON the way every parser reads it, or refuses it: strict JSON (serde_json's reading,
/// nesting up to 128 levels, nothing after the value), no key twice in an object and no two
/// keys of an object that fold (see [`fold_key`]) to the same name, at any depth.
pub fn read_json(bytes: &[u8]) -> Result<Value, String> {
    use serde::de::DeserializeSeed as _;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Strict.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

/// [`read_json`]'s deserializer: a `serde_json::Value` that refuses ambiguous objects.
struct Strict;

impl<'de> serde::de::DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(n)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(Strict)? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        use serde::de::Error as _;
        let mut out = Map::new();
        // Small objects (nearly all) are checked against their keys so far, with no set and
        // no folded copies; larger ones by a set: an object of 400,000 keys must not cost
        // 10^11 comparisons.
        const SMALL: usize = 16;
        let mut folded: Option<std::collections::HashSet<String>> = None;
        while let Some(k) = map.next_key::<String>()? {
            let f = fold_key(&k);
            let twice = match &mut folded {
                Some(set) => !set.insert(f.into_owned()),
                None => {
                    let twice = out.keys().any(|e| fold_key(e) == f);
                    if !twice && out.len() + 1 >= SMALL {
                        let mut set: std::collections::HashSet<String> =
                            out.keys().map(|e| fold_key(e).into_owned()).collect();
                        set.insert(f.into_owned());
                        folded = Some(set);
                    }
                    twice
                }
            };
            if twice {
                return Err(A::Error::custom(format!(
                    "key `{}` appears twice in an object (parsers disagree on which one counts)",
                    k.escape_debug()
                )));
            }
            let v = map.next_value_seed(Strict)?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Whether a JSON value carries a JSON-RPC message: an object with a key that reads as
/// `jsonrpc` or `method`.
fn rpc_shaped(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        o.keys()
            .any(|k| matches!(&*fold_key(k), "jsonrpc" | "method"))
    })
}

/// Parses a POST body as JSON-RPC 2.0, by the canonical rule above.
pub fn parse_body(bytes: &[u8]) -> Result<Body, BodyError> {
    let v = read_json(bytes).map_err(BodyError::Json)?;
    let (batch, items) = match v {
        Value::Array(items) => (true, items),
        other => (false, vec![other]),
    };
    if !items.iter().any(rpc_shaped) {
        return Err(BodyError::NotJsonRpc("no JSON-RPC message in it".into()));
    }
    let inexact = inexact_integer(bytes);
    let mut messages = Vec::with_capacity(items.len());
    for item in items {
        let mut m = message(item).map_err(BodyError::Malformed)?;
        // (In a batch, each message is taken to hold it: the batch is refused whole anyway.)
        m.inexact = inexact.clone();
        messages.push(m);
    }
    Ok(Body { batch, messages })
}

/// The first integer literal of a JSON text (outside strings) that a double cannot hold
/// exactly, clipped to 64 characters: Python reads it exactly, JavaScript and Go's
/// `encoding/json` (into `float64` / `any`) round it, so `9007199254740993` is two different
/// numbers on two servers — and `100000000000000000001` would hash and compare as `1e20`.
/// Literals with a fraction or an exponent are read as doubles by every one of them.
pub fn inexact_integer(bytes: &[u8]) -> Option<String> {
    let n = bytes.len();
    let mut i = 0;
    while i < n {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < n {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                if bytes[i] == b'-' {
                    i += 1;
                }
                let digits = i;
                while i < n && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                let integer = !(i < n && matches!(bytes[i], b'.' | b'e' | b'E'));
                let exact = |d: &[u8]| {
                    let v: Option<u128> = std::str::from_utf8(d).ok().and_then(|s| s.parse().ok());
                    v.is_some_and(|v| (v as f64) as u128 == v && v < (1u128 << 120))
                };
                if integer && i - digits > 15 && !exact(&bytes[digits..i]) {
                    let end = i.min(start + 64);
                    return Some(String::from_utf8_lossy(&bytes[start..end]).into_owned());
                }
                while i < n && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// One message of a request body.
fn message(item: Value) -> Result<Message, String> {
    let Value::Object(mut obj) = item else {
        return Err("a message is not a JSON object".into());
    };
    check_keys(&obj, ENVELOPE_KEYS)?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err("missing \"jsonrpc\": \"2.0\"".into());
    }
    if let Some(Value::Object(params)) = obj.get("params") {
        check_keys(params, PARAMS_KEYS)?;
    }
    let method = match obj.remove("method") {
        None => None,
        Some(Value::String(m)) => Some(m),
        Some(_) => return Err("\"method\" is not a string".into()),
    };
    let id = obj
        .remove("id")
        .filter(|i| !i.is_null() || method.is_none());
    Ok(Message {
        id,
        method,
        params: obj.remove("params").unwrap_or(Value::Null),
        inexact: None,
    })
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
pub fn filter_tools(msg: &mut Value, keep: impl FnMut(&str) -> bool) -> Vec<String> {
    filter_list(msg, "tools", "name", keep).unwrap_or_default()
}

/// Removes from the list `result.<field>` the items whose `key` `keep` rejects (an item
/// without it is read as `""`); the removed names, None when `msg` holds no such list.
pub fn filter_list(
    msg: &mut Value,
    field: &str,
    key: &str,
    mut keep: impl FnMut(&str) -> bool,
) -> Option<Vec<String>> {
    let items = msg
        .get_mut("result")
        .and_then(|r| r.get_mut(field))
        .and_then(Value::as_array_mut)?;
    let mut removed = Vec::new();
    items.retain(|t| {
        let name = t.get(key).and_then(Value::as_str).unwrap_or("");
        let k = keep(name);
        if !k {
            removed.push(name.to_string());
        }
        k
    });
    Some(removed)
}

/// SHA-256 of a JSON value in a canonical form (object keys sorted), as hex.
pub fn sha256_hex(v: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Hashing(Sha256::new());
    canonical_json(v, &mut h);
    crate::hex::lower(&h.0.finalize())
}

/// Serialises straight into the hash: no string is built for a key or a scalar.
struct Hashing(sha2::Sha256);

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(&mut self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds `v` to `h` with object keys sorted, so equal values hash equally (keys and scalars
/// as serde_json writes them).
fn canonical_json(v: &Value, h: &mut Hashing) {
    use sha2::Digest;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.0.update(b"{");
            for k in keys {
                // Writing into a hash cannot fail.
                let _ = serde_json::to_writer(&mut *h, k);
                h.0.update(b":");
                canonical_json(&m[k], h);
                h.0.update(b",");
            }
            h.0.update(b"}");
        }
        Value::Array(a) => {
            h.0.update(b"[");
            for x in a {
                canonical_json(x, h);
                h.0.update(b",");
            }
            h.0.update(b"]");
        }
        other => {
            let _ = serde_json::to_writer(&mut *h, other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_servers_read_differently_are_found() {
        let f = |t: &str| inexact_integer(t.as_bytes());
        assert_eq!(
            f(r#"{"a": 9007199254740993}"#).as_deref(),
            Some("9007199254740993")
        );
        assert_eq!(
            f(r#"[100000000000000000001]"#).as_deref(),
            Some("100000000000000000001")
        );
        assert_eq!(
            f(r#"{"a": -9007199254740993}"#).as_deref(),
            Some("-9007199254740993")
        );
        // Exactly representable, or read as a double by everyone, or inside a string: fine.
        for ok in [
            r#"{"a": 9007199254740992, "b": 10000000000000000000, "c": 1e20}"#,
            r#"{"a": 1.00000000000000000001, "b": 123456789012345678901234567890e0}"#,
            r#"{"a": "9007199254740993", "k\"9007199254740993": 1}"#,
        ] {
            assert_eq!(f(ok), None, "{ok}");
        }
        assert!(f(&format!("[{}]", "9".repeat(200))).is_some_and(|n| n.len() == 64));
    }

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
            parse_body(br#"{"hello":1}"#),
            Err(BodyError::NotJsonRpc(_))
        ));
        assert!(matches!(
            parse_body(br#"{"id":1,"method":"x"}"#),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            parse_body(br#"{"jsonrpc":"2.0","method":5}"#),
            Err(BodyError::Malformed(_))
        ));
        let b = parse_body(br#"{"jsonrpc":"2.0","id":1,"method":"eth_call"}"#).unwrap();
        assert!(!looks_like_mcp(&b));
    }

    #[test]
    fn keys_that_fold_alike_are_found_in_small_and_large_objects() {
        // Objects up to 16 keys are checked against the keys so far, larger ones by a set: the
        // same answer on both sides of that switch, wherever the pair sits.
        let object = |n: usize, dup: Option<(usize, usize)>| {
            let keys: Vec<String> = (0..n)
                .map(|i| match dup {
                    Some((_, b)) if i == b => "K\u{212A}".to_string(),
                    Some((a, _)) if i == a => "kk".to_string(),
                    _ => format!("key{i}"),
                })
                .collect();
            let body: Vec<String> = keys.iter().map(|k| format!("\"{k}\":{n}")).collect();
            format!("{{{}}}", body.join(","))
        };
        for n in [2, 15, 16, 17, 40] {
            assert!(read_json(object(n, None).as_bytes()).is_ok(), "{n} keys");
            let pairs = [(0, 1), (0, n - 1), (n / 2, n - 1), (n - 2, n - 1)];
            for (a, b) in pairs.into_iter().filter(|(a, b)| a < b) {
                let text = object(n, Some((a, b)));
                let e = read_json(text.as_bytes()).unwrap_err();
                assert!(e.contains("appears twice"), "{n} keys, pair {a},{b}: {e}");
            }
        }
    }

    #[test]
    fn keys_fold_as_case_insensitive_decoders_fold_them() {
        assert_eq!(fold_key("method"), "method");
        assert_eq!(fold_key("METHOD"), "method");
        assert_eq!(fold_key("para\u{17F}"), "paras");
        assert_eq!(fold_key("\u{212A}ey"), "key");
        // Whole orbits fold to one letter, ASCII or not.
        for orbit in [
            &["k", "K", "\u{212A}"][..],
            &["s", "S", "\u{17F}"],
            &["\u{B5}", "\u{3BC}", "\u{39C}"],
            &["\u{3B8}", "\u{398}", "\u{3D1}", "\u{3F4}"],
            &["\u{3C3}", "\u{3A3}", "\u{3C2}"],
            &["\u{DF}", "\u{1E9E}"],
            &["\u{1C4}", "\u{1C5}", "\u{1C6}"],
            &["\u{13A0}", "\u{AB70}"],
            &["\u{390}", "\u{1FD3}"],
            &["\u{FB05}", "\u{FB06}"],
            &["\u{10400}", "\u{10428}"],
        ] {
            let folded: Vec<_> = orbit.iter().map(|c| fold_key(c).into_owned()).collect();
            assert!(
                folded.iter().all(|f| *f == folded[0]),
                "{orbit:?} -> {folded:?}"
            );
        }
        // Other non-ASCII letters never reach ASCII ones.
        assert_eq!(fold_key("n\u{0430}me"), "n\u{0430}me");
        assert_eq!(fold_key("\u{130}d"), "\u{130}d");
    }

    #[test]
    fn a_key_any_parser_reads_otherwise_is_refused() {
        let call = |extra: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{}}}}{extra}}}"#
            )
        };
        for (label, body) in [
            // Go reads the last key that matches case-insensitively.
            ("case", call(r#","Method":"ping""#)),
            ("long s", call(r#","param\u017f":{"name":"delete_file"}"#)),
            ("long s, raw", call(",\"param\u{17F}\":{\"name\":\"delete_file\"}")),
            ("alone", r#"{"jsonrpc":"2.0","id":1,"METHOD":"tools/call"}"#.to_string()),
            ("duplicate", call(r#","method":"ping""#)),
            ("duplicate param", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_file"}}"#.to_string()),
            ("kelvin in arguments", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"k":1,"\u212a":2}}}"#.to_string()),
            ("nested duplicate", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"p":{"x":1,"x":2}}}}"#.to_string()),
            // What Python and JS accept and serde does not.
            ("NaN", call(r#","x":NaN"#)),
            ("Infinity", call(r#","x":-Infinity"#)),
            ("huge", call(r#","x":1e400"#)),
            ("trailing data", format!("{} {{}}", call(""))),
            ("BOM", format!("\u{feff}{}", call(""))),
            ("deep", format!("{}{}{}", "[".repeat(200), call(""), "]".repeat(200))),
            ("lone surrogate", call(r#","x":"\ud800""#)),
        ] {
            assert!(parse_body(body.as_bytes()).is_err(), "{label}: {body}");
        }
        // Numbers are read correctly rounded, as other parsers read them (a fuzz target found
        // serde_json's fast path reading 4477E44 as 4.477000000000001e47).
        let v = read_json(b"4477E44").unwrap();
        assert_eq!(v.as_f64(), Some(4.477e47));
        // Keys that fold to nothing guard reads, once each, are the tool's business.
        let ok = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"Name":1,"PATH":"/x"}}}"#;
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
        // The canonical form audit trails already hold: `{"a":1,"b":[1,2,],"c":{...,},}`.
        assert_eq!(
            sha256_hex(&json!({"c":{"d\n":"x\"y"},"b":[1,2],"a":1})),
            "a8208a0b67559f1c0f79abb83d111940b2bedc3ae32f7997cc984163a4e72a4b"
        );
    }
}
