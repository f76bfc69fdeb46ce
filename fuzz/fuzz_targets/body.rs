//! The JSON-RPC/MCP body reader: never panics, and a body it reads has no key any parser would
//! read differently (every message's protocol keys are spelled exactly).
#![no_main]
use guard::mcp::wire::{check_keys, parse_body, read_json, ENVELOPE_KEYS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = parse_body(data) {
        assert!(!body.messages.is_empty());
        let v = read_json(data).expect("a body parse_body read is JSON read_json reads");
        let items = match v {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        for item in items.iter().filter_map(|i| i.as_object()) {
            check_keys(item, ENVELOPE_KEYS).expect("protocol keys spelled exactly");
        }
    }
});
