//! Attacks a prompt-injected agent would try, each class against the Python SDK's FastMCP, the
//! TypeScript SDK's McpServer and a Go server decoding with encoding/json, through guard's real
//! proxy in this process (no root). Every test is decided from the server side — did the denied
//! tool run? — or, for answers, from what a real client was shown.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use guard_testkit::{
    inproc::*,
    peers::*,
    process::*,
    servers::{HttpServer, ScriptedMcp},
};
use serde_json::{json, Value};

/// The three servers, stateless (a tools/call needs no initialize), JSON answers.
struct Trio {
    servers: Vec<(&'static str, Server)>,
}

impl Trio {
    /// FastMCP on `hosts[0]`, the TypeScript server on `hosts[1]`, the Go server on `hosts[2]`.
    fn start(dir: &TestDir, hosts: [&str; 3]) -> Trio {
        let log = |n: &str| dir.join(&format!("{n}-{}.jsonl", hosts[0]));
        let common = ["--port", "0"];
        let py = python_server(
            &log("py"),
            &[
                &["--host", hosts[0], "--json-response", "--stateless"][..],
                &common,
            ]
            .concat(),
        );
        let ts = ts_server(
            &log("ts"),
            &[
                &["--host", hosts[1], "--json-response", "--stateless"][..],
                &common,
            ]
            .concat(),
        );
        let go = go_server(&log("go"), &[&["--host", hosts[2]][..], &common].concat());
        Trio {
            servers: vec![("fastmcp", py), ("ts-sdk", ts), ("go", go)],
        }
    }

    fn addr(s: &Server) -> SocketAddr {
        let host = s
            .url
            .split("://")
            .nth(1)
            .unwrap()
            .split(':')
            .next()
            .unwrap();
        format!("{host}:{}", s.port).parse().unwrap()
    }

    /// A policy per server: echo and add allowed, fetch_tasks at most 3 ids, delete_file denied,
    /// secret_tool hidden.
    fn name_all(&self, dir: &TestDir) {
        for (name, s) in &self.servers {
            dir.write_policy(&format!("{name}.json"), &policy(name, Trio::addr(s)));
        }
    }

    /// What each server ran that the policy forbids: delete_file at all, fetch_tasks with more
    /// than 3 ids.
    fn forbidden_runs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, s) in &self.servers {
            for c in s.calls() {
                let ids = c["arguments"]["task_ids"].as_array().map_or(0, Vec::len);
                if c["tool"] == "delete_file" || (c["tool"] == "fetch_tasks" && ids > 3) {
                    out.push(format!("{name} ran {c}"));
                }
            }
        }
        out
    }
}

fn policy(name: &str, addr: SocketAddr) -> String {
    json!({
        "version": "1",
        "server": { "name": name, "match": [addr.to_string()] },
        "default": "deny",
        "hide": ["secret_tool"],
        "tools": {
            "echo": {}, "add": {},
            "fetch_tasks": { "when": [ { "path": "task_ids", "op": "max_items", "value": 3 } ],
                             "reason": "at most 3 tasks per call" },
            "delete_file": { "action": "deny", "reason": "no deletions" }
        }
    })
    .to_string()
}

const DELETE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/etc/passwd"}}}"#;

#[test]
fn parser_differentials_never_run_a_denied_call() {
    let dir = TestDir::new("differentials");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    trio.name_all(&dir);
    let g = Guard::start(&dir, "", "");
    // Each reads as an allowed call to guard's old, ASCII-only, last-key reading, and as a
    // forbidden one to some server.
    let payloads = [
        // Go folds U+017F (long s) to "s": it reads these params.
        ("long s", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}},"param\u017f":{"name":"delete_file","arguments":{"path":"/etc/passwd"}}}"#),
        ("long s, raw", "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"text\":\"hi\"}},\"param\u{17F}\":{\"name\":\"delete_file\",\"arguments\":{\"path\":\"/\"}}}"),
        // ... and these arguments, past the condition.
        ("arguments", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fetch_tasks","arguments":{"task_ids":[1]},"argument\u017f":{"task_ids":[1,2,3,4,5,6]}}}"#),
        // U+212A (Kelvin) inside the arguments: two keys a Go struct reads as one.
        ("kelvin", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fetch_tasks","arguments":{"task_ids":[1],"tas\u212a_ids":[1,2,3,4,5,6]}}}"#),
        // Duplicates: first-key parsers read delete_file.
        ("duplicate", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_file","name":"echo","arguments":{"path":"/","text":"x"}}}"#),
    ];
    for (label, body) in payloads {
        let (code, answer) = g.curl_post(&trio.servers[2].1.url, &[], body);
        assert_eq!(code, 400, "{label} to go: {answer}");
        for (name, s) in &trio.servers {
            let (code, answer) = g.curl_post(&s.url, &[], body);
            assert_eq!(code, 400, "{label} to {name}: {answer}");
            let v: Value = serde_json::from_str(&answer).unwrap();
            assert!(
                [-32600, -32700].contains(&v["error"]["code"].as_i64().unwrap()),
                "{label} to {name}: {v}"
            );
        }
    }
    assert_eq!(trio.forbidden_runs(), Vec::<String>::new());
    // The allowed call in plain words still runs everywhere.
    let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"plain"}}}"#;
    for (name, s) in &trio.servers {
        let (code, answer) = g.curl_post(&s.url, &[], echo);
        assert!(
            code == 200 && answer.contains("plain"),
            "{name}: {code} {answer}"
        );
    }
}

/// A raw HTTP/1.1 request through `route` (`Connection: close`): the whole answer.
fn raw_request(route: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(route).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn post(path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

#[test]
fn unreadable_bodies_to_servers_no_policy_names_are_refused() {
    let dir = TestDir::new("unread");
    // No policy names these: every one is an unknown server (the named one at another of its
    // addresses, say), and unknown_servers = "deny".
    let trio = Trio::start(&dir, ["127.0.0.6", "127.0.0.7", "127.0.0.8"]);
    let g = Guard::start(&dir, "", "");
    let utf16: Vec<u8> = {
        let mut v = vec![0xff, 0xfe];
        v.extend(DELETE.encode_utf16().flat_map(u16::to_le_bytes));
        v
    };
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        // Go's Decoder reads the first value and ignores the rest.
        ("trailing data", post("/mcp", "application/json", format!("{DELETE} x").as_bytes())),
        // Python's json accepts NaN.
        (
            "NaN",
            post(
                "/mcp",
                "application/json",
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/etc/passwd","n":NaN}}}"#,
            ),
        ),
        // Python's json detects and decodes UTF-16.
        ("UTF-16", post("/mcp", "application/json", &utf16)),
        // A request line longer than guard's classifier reads.
        (
            "long request line",
            post(&format!("/mcp?{}", "a".repeat(9000)), "application/json", DELETE.as_bytes()),
        ),
    ];
    for (label, request) in &payloads {
        for (name, s) in &trio.servers {
            let route = g.route(Trio::addr(s), "attacker");
            let answer = raw_request(route, request);
            // guard's own refusal (-32603: unreadable; -32005: unknown server), never the
            // server's answer.
            assert!(
                answer.contains("\"code\":-32603") || answer.contains("\"code\":-32005"),
                "{label} to {name}: {answer}"
            );
        }
    }
    assert_eq!(trio.forbidden_runs(), Vec::<String>::new());
    let refused = g
        .audit()
        .into_iter()
        .filter(|r| r["rule"] == "policy.unknown_servers" && r["decision"] == "deny")
        .count();
    assert!(refused >= payloads.len() * 3, "{:#?}", g.audit());
    // Plain JSON that is no JSON-RPC still passes to servers no policy names.
    let plain = HttpServer::start("127.0.0.9:0");
    let out = run_ok(&mut g.command(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"hello":1}"#,
        &g.url("curl", &plain.url()),
    ]));
    assert_eq!(out, "hello from the test server\n");
}

const HIDDEN_LIST: &str = r#"{"jsonrpc":"2.0","id":ID,"result":{"tools":[
  {"name":"echo","inputSchema":{"type":"object"}},
  {"name":"secret_tool","description":"never to be seen","inputSchema":{"type":"object"}}]}EXTRA}"#;

/// What the Python and the TypeScript SDK clients list through guard from `url`.
fn listed(g: &Guard, url: &str) -> Vec<(String, String)> {
    let url = g.url("lister", url);
    let py = client_args(&url, "streamable-http", true, &[]);
    let node_modules = peers_dir().join("node/node_modules");
    let ts_script = script("mcp_client.mjs");
    let ts: Vec<String> = vec![
        "node".into(),
        ts_script.display().to_string(),
        url.clone(),
        "--node-modules".into(),
        node_modules.display().to_string(),
        "--list".into(),
    ];
    [("python", py), ("ts", ts)]
        .into_iter()
        .map(|(who, args)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run(&mut g.command(&args), Duration::from_secs(60));
            (
                who.to_string(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
        .collect()
}

#[test]
fn answers_guard_cannot_read_never_reach_the_client_unfiltered() {
    let dir = TestDir::new("answers");
    fn with(extra: &'static str) -> impl Fn(&str) -> String + Send + Sync + 'static {
        move |id: &str| HIDDEN_LIST.replace("ID", id).replace("EXTRA", extra)
    }
    let sse = |id: &str| {
        let data = with(r#","x":NaN"#)(id).replace('\n', "");
        format!("event: message\ndata: {data}\n\n")
    };
    let servers = [
        // Both SDKs read "application/json-seq" as JSON (contains / starts with).
        ScriptedMcp::start("127.0.0.3:0", "application/json-seq", with("")),
        // Python's client (pydantic) reads NaN; serde cannot.
        ScriptedMcp::start("127.0.0.4:0", "application/json", with(r#","x":NaN"#)),
        // ... in an event stream too.
        ScriptedMcp::start("127.0.0.5:0", "text/event-stream", sse),
        // Clients disagree which of the two this is.
        ScriptedMcp::start(
            "127.0.0.6:0",
            "application/json; text/event-stream",
            with(""),
        ),
    ];
    for (i, s) in servers.iter().enumerate() {
        dir.write_policy(&format!("s{i}.json"), &policy(&format!("s{i}"), s.addr));
    }
    let g = Guard::start(&dir, "", "");
    for s in &servers {
        for (who, out) in listed(&g, &s.url()) {
            assert!(
                !out.contains("secret_tool"),
                "{who} saw a hidden tool from {}: {out}",
                s.url()
            );
        }
    }
    let refused = g
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "tools_list" && r["decision"] == "deny")
        .count();
    assert!(refused >= 3, "{:#?}", g.audit());
}

#[test]
fn one_agent_cannot_take_the_connections_of_another() {
    let dir = TestDir::new("fairness");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    trio.name_all(&dir);
    let g = Guard::start(
        &dir,
        "max_connections = 8\nmax_connections_per_agent = 4\nheader_timeout_s = 2",
        "",
    );
    let py = &trio.servers[0].1;
    let hog = g.route(Trio::addr(py), "hog");
    // The hog opens every connection the proxy has, and says nothing on them.
    let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(hog).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    // Another agent is still served.
    let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"served"}}}"#;
    let (code, answer) = g.curl_post_with("other", &[], &[], echo, &py.url);
    assert!(code == 200 && answer.contains("served"), "{code} {answer}");
    let over: Vec<Value> = g
        .audit_connections()
        .into_iter()
        .filter(|r| r["rule"] == "proxy.max_connections_per_agent")
        .collect();
    assert_eq!(over.len(), 4, "{over:#?}");
    assert!(
        over.iter().all(|r| r["agent"]["name"] == "hog"),
        "{over:#?}"
    );
    // Towards a policy-named server, a silent connection is closed after the header timeout
    // (from accept), not after minutes.
    let started = Instant::now();
    let mut silent = held.into_iter().next().unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 16];
    let _ = silent.read(&mut b);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a silent connection to a named server was held {:?}",
        started.elapsed()
    );
}

#[test]
fn a_flood_of_connections_never_erases_a_decision() {
    let dir = TestDir::new("flood");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    trio.name_all(&dir);
    // Small logs: 1,500 connection records in the audit log would rotate it away many times.
    let g = Guard::start(
        &dir,
        "",
        "[audit]\nmax_size = \"64KiB\"\nkeep = 1\nconnection_records_per_s = 5",
    );
    let (_, answer) = g.curl_post(&trio.servers[0].1.url, &[], DELETE);
    let denied = serde_json::from_str::<Value>(&answer).unwrap()["error"]["data"]["guard"]
        ["audit_id"]
        .as_str()
        .unwrap()
        .to_string();
    let plain = HttpServer::start("127.0.0.9:0");
    let route = g.route(plain.addr, "flooder");
    for _ in 0..1500 {
        drop(TcpStream::connect(route).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    g.flush_audit();
    let decisions = g.audit_decisions();
    assert!(
        decisions.iter().any(|r| r["id"] == denied.as_str()),
        "the decision was rotated away"
    );
    // The flooder's connections beyond its share are counted, not written.
    let dropped: u64 = g
        .audit()
        .iter()
        .filter(|r| r["event"] == "connection_summary" && r["agent"]["name"] == "flooder")
        .map(|r| r["detail"]["dropped"].as_u64().unwrap())
        .sum();
    assert!(dropped > 1000, "{dropped} dropped");
}

#[test]
fn no_audit_record_means_no_call() {
    let dir = TestDir::new("no-record");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    trio.name_all(&dir);
    let conns = format!(
        "[audit]\nconnections_log = \"{}\"",
        dir.join("connections.jsonl").display()
    );
    let g = Guard::start_logging_to(&dir, std::path::Path::new("/dev/full"), "", &conns);
    let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"unrecorded"}}}"#;
    for (name, s) in &trio.servers {
        let (code, answer) = g.curl_post(&s.url, &[], echo);
        assert_eq!(code, 503, "{name}: {answer}");
        assert!(s.calls().is_empty(), "{name} ran an unrecorded call");
    }
    let h = g.engine().audit_log().health();
    assert!(!h.ok && h.write_failures >= 3, "{h:?}");
}
