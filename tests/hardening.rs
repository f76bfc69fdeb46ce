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
    // guard may answer (or reset) before the whole request is written: what it answered counts.
    let _ = s.write_all(request);
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
        // An upgrade request with a body: forwarded unread, once.
        (
            "Upgrade with a body",
            post_with(
                "/mcp",
                &["Content-Type: application/json", "Connection: Upgrade", "Upgrade: websocket"],
                DELETE.as_bytes(),
            ),
        ),
        // A GET with a body: "bodyless", once.
        (
            "GET with a body",
            [
                format!(
                    "GET /mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    DELETE.len()
                )
                .as_bytes(),
                DELETE.as_bytes(),
            ]
            .concat(),
        ),
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
    // Refused by the HTTP layer (a status, no JSON-RPC error): over max_body with nothing but
    // blanks in what guard read (Go's decoder skips them), and a CONNECT that is a request.
    let blanks = [vec![b' '; (4 << 20) + 10], DELETE.as_bytes().to_vec()].concat();
    let connect = format!(
        "CONNECT /mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{DELETE}",
        DELETE.len()
    );
    let statuses = [
        (
            "blanks over max_body",
            post("/mcp", "text/plain", &blanks),
            "413",
        ),
        ("CONNECT with a body", connect.into_bytes(), "405"),
        (
            "a CONNECT tunnel",
            b"CONNECT 127.0.0.9:443 HTTP/1.1\r\nHost: 127.0.0.9:443\r\n\r\n".to_vec(),
            "405",
        ),
    ];
    for (label, request, status) in &statuses {
        for (name, s) in &trio.servers {
            let answer = raw_request(g.route(Trio::addr(s), "attacker"), request);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{label} to {name}: {answer}"
            );
        }
    }
    // Request lines guard does not serve, which a lenient server may read as a request: refused
    // at the connection (nothing answers), whatever the server would have made of them.
    let lines = [
        "POST /mcp HTTP/2.0",
        "POST /mcp HTTP/0.9",
        "POST /mcp RTSP/1.0",
        "POST  /mcp HTTP/1.1",
        "POST /mcp  HTTP/1.1",
    ];
    for line in lines {
        // The same request, its request line replaced.
        let request = post("/mcp", "application/json", DELETE.as_bytes());
        let line_end = request.iter().position(|c| *c == b'\r').unwrap();
        let request = [line.as_bytes(), &request[line_end..]].concat();
        for (name, s) in &trio.servers {
            let answer = raw_request(g.route(Trio::addr(s), "attacker"), &request);
            assert!(!answer.contains("deleted"), "{line} to {name}: {answer}");
        }
    }
    assert_eq!(trio.forbidden_runs(), Vec::<String>::new());
    let refused = g
        .audit()
        .into_iter()
        .filter(|r| r["rule"] == "policy.unknown_servers" && r["decision"] == "deny")
        .count();
    assert!(refused >= payloads.len() * 3, "{:#?}", g.audit());
    let lines_refused = g
        .audit_connections()
        .into_iter()
        .filter(|r| r["transport"] == "http-like" && r["rule"] == "policy.unknown_servers")
        .count();
    assert_eq!(
        lines_refused,
        lines.len() * 3,
        "{:#?}",
        g.audit_connections()
    );
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

fn post_with(path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// `data` compressed by the system's gzip.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn bodies_a_server_would_decode_never_run_a_denied_call() {
    let dir = TestDir::new("encoded");
    // The TypeScript SDK behind express.json(), as createMcpExpressApp sets it up: it decodes
    // the charset the Content-Type names and inflates compressed bodies.
    let ts = |host: &str| {
        ts_server(
            &dir.join(&format!("ts-{host}.jsonl")),
            &[
                "--host",
                host,
                "--port",
                "0",
                "--json-response",
                "--stateless",
                "--express",
            ],
        )
    };
    let (named, unknown, bare) = (ts("127.0.0.10"), ts("127.0.0.11"), ts("127.0.0.12"));
    dir.write_policy("ts.json", &policy("ts", Trio::addr(&named)));
    let g = Guard::start(&dir, "", "");
    // `tools/call` in UTF-7: guard's reading of the bytes sees an unknown method.
    let utf7 = DELETE.replace("tools/call", "+AHQAbwBvAGwAcw-/call");
    // ... and the whole body, down to its first brace: nothing in it looks like JSON.
    let utf7_all = format!("+AHs-{}", &utf7[1..]).into_bytes();
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        (
            "UTF-7",
            post_with(
                "/mcp",
                &["Content-Type: application/json; charset=utf-7"],
                utf7.as_bytes(),
            ),
        ),
        (
            "gzip",
            post_with(
                "/mcp",
                &["Content-Type: application/json", "Content-Encoding: gzip"],
                &gzip(DELETE.as_bytes()),
            ),
        ),
    ];
    // Each one runs the call on a server reached directly: the attack is real.
    for (label, request) in &payloads {
        let answer = raw_request(Trio::addr(&bare), request);
        assert!(
            answer.contains("deleted /etc/passwd"),
            "{label} direct: {answer}"
        );
    }
    assert_eq!(bare.calls().len(), payloads.len());
    let two_types = post_with(
        "/mcp",
        &[
            "Content-Type: application/json",
            "Content-Type: application/json; charset=utf-7",
        ],
        utf7.as_bytes(),
    );
    // UTF-7 sent as text (the SDK's transport wants application/json; servers that ignore the
    // Content-Type, or body-parser with `type: "*/*"` before a handler of one's own, do not).
    let utf7_text = post_with(
        "/mcp",
        &["Content-Type: text/plain; charset=utf-7"],
        &utf7_all,
    );
    let more = [
        ("two Content-Types", two_types),
        ("UTF-7 as text", utf7_text),
    ];
    for (label, request) in payloads.iter().chain(more.iter()) {
        for (who, s) in [("named", &named), ("unknown", &unknown)] {
            let answer = raw_request(g.route(Trio::addr(s), "attacker"), request);
            // guard's own refusal: -32700 (named: unreadable), -32603 (unknown: unreadable).
            assert!(
                answer.contains("\"code\":-32700") || answer.contains("\"code\":-32603"),
                "{label} to {who}: {answer}"
            );
        }
    }
    assert_eq!(named.calls(), Vec::<Value>::new());
    assert_eq!(unknown.calls(), Vec::<Value>::new());
    // UTF-8, said or not, still runs what the policy allows.
    let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"plain"}}}"#;
    let request = post_with(
        "/mcp",
        &["Content-Type: application/json; charset=UTF-8"],
        echo.as_bytes(),
    );
    let answer = raw_request(g.route(Trio::addr(&named), "agent"), &request);
    assert!(answer.contains("plain"), "{answer}");
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

/// A server that switches every request to an echo tunnel (101), one thread per connection.
fn upgrading_server(host: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{host}:0")).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let _ = c.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
                );
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
            });
        }
    });
    addr
}

#[test]
fn an_upgraded_tunnel_keeps_its_connection_slot() {
    let dir = TestDir::new("tunnel-slots");
    let g = Guard::start(&dir, "max_connections_per_agent = 3", "");
    let server = upgrading_server("127.0.0.13");
    let route = g.route(server, "tunneller");
    let tunnel = || {
        let mut s = TcpStream::connect(route).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A refused connection may be reset before the request is written.
        let _ = s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        );
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            got.push(b[0]);
        }
        (s, String::from_utf8_lossy(&got).into_owned())
    };
    let mut open = Vec::new();
    for i in 0..3 {
        let (mut s, head) = tunnel();
        assert!(head.starts_with("HTTP/1.1 101"), "tunnel {i}: {head}");
        s.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping");
        open.push(s);
    }
    // Three tunnels open: the agent's share is taken, a fourth connection is refused.
    let (_, head) = tunnel();
    assert!(!head.contains("101"), "a fourth tunnel: {head}");
    let over = g
        .audit_connections()
        .into_iter()
        .filter(|r| r["rule"] == "proxy.max_connections_per_agent")
        .count();
    assert_eq!(over, 1, "{:#?}", g.audit_connections());
    // Closed tunnels give their slots back.
    drop(open);
    let started = Instant::now();
    loop {
        let (_, head) = tunnel();
        if head.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slots never came back: {head}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(g);
    // Under proxy.other = "deny", a tunnel guard cannot read is refused like TCP it cannot.
    let g = Guard::start(&dir, "other = \"deny\"", "");
    let route = g.route(server, "tunneller");
    let answer = raw_request(
        route,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: echo\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
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
fn one_request_costs_at_most_a_few_small_records() {
    let dir = TestDir::new("amplification");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    trio.name_all(&dir);
    let g = Guard::start(&dir, "", "");
    let url = &trio.servers[0].1.url;
    let echo = |i: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"b{i}"}}}}}}"#
        )
    };
    // A batch of 101: refused whole, one record, nothing run.
    let batch = format!("[{}]", (0..101).map(echo).collect::<Vec<_>>().join(","));
    let before = g.audit_decisions().len();
    let (code, answer) = g.curl_post(url, &[], &batch);
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("at most 100"), "{answer}");
    assert_eq!(
        g.audit_decisions().len(),
        before + 1,
        "{:#?}",
        &g.audit_decisions()[before..]
    );
    assert!(trio.servers[0].1.calls().is_empty());
    // Allowed calls in a batch that is not forwarded (it holds a refused one) have no "allow"
    // record: each is refused as part of the batch.
    let mixed = format!("[{},{},{DELETE}]", echo(1), echo(2));
    let before = g.audit_decisions().len();
    let (code, answer) = g.curl_post(url, &[], &mixed);
    assert_eq!(code, 200, "{answer}");
    let new = g.audit_decisions()[before..].to_vec();
    assert_eq!(new.len(), 3, "{new:#?}");
    assert!(new.iter().all(|r| r["decision"] == "deny"), "{new:#?}");
    assert!(trio.servers[0].1.calls().is_empty());
    // A HEAD gets the server's own bodiless answer (the TS SDK's 405), not a refused "answer".
    let head = run_ok(&mut g.command(&[
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        "-I",
        &g.url("curl", &trio.servers[1].1.url),
    ]));
    assert_eq!(head, "405");
    // JSON-RPC that is not MCP, to a server no policy names, is not guard's to limit.
    let plain = HttpServer::start("127.0.0.9:0");
    let eth = (0..150)
        .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"eth_blockNumber"}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let (code, answer) = g.curl_post(&plain.url(), &[], &format!("[{eth}]"));
    assert_eq!(
        (code, answer.as_str()),
        (200, "hello from the test server\n")
    );
    // A tool name of 100 KB: its record and its answer stay small.
    let name = "x".repeat(100_000);
    let call = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{name}","arguments":{{}}}}}}"#
    );
    let before = std::fs::metadata(&g.audit_log).unwrap().len();
    let (_, answer) = g.curl_post(url, &[], &call);
    assert!(
        answer.len() < 8 << 10,
        "an answer of {} bytes",
        answer.len()
    );
    let grown = std::fs::metadata(&g.audit_log).unwrap().len() - before;
    assert!(grown < 8 << 10, "the audit log grew by {grown} bytes");
}

#[test]
fn conditions_hold_only_for_what_the_server_reads() {
    let dir = TestDir::new("condition-types");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    // add may not take 5 (neq) nor 6 or 7 (not_in); fetch_tasks may not ask for task 13.
    for (name, s) in &trio.servers {
        let p = json!({
            "version": "1",
            "server": { "name": name, "match": [Trio::addr(s).to_string()] },
            "default": "deny",
            "tools": {
                "add": { "when": [
                    { "path": "a", "op": "neq", "value": 5 },
                    { "path": "b", "op": "not_in", "value": [6, 7] }
                ] },
                "fetch_tasks": { "when": [ { "path": "task_ids", "op": "not_in", "value": [[13]] } ] }
            }
        });
        dir.write_policy(&format!("{name}.json"), &p.to_string());
    }
    let g = Guard::start(&dir, "", "");
    let call = |tool: &str, args: Value| {
        json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":args}})
            .to_string()
    };
    // Each passed guard's old reading (another type than the policy's is "not equal"), and
    // FastMCP coerces or parses it into the forbidden value.
    let payloads = [
        call("add", json!({"a": "5", "b": 1})),
        call("add", json!({"a": 1, "b": "6"})),
        call("add", json!({"a": 1, "b": " 7"})),
        call("fetch_tasks", json!({"task_ids": "[13]"})),
    ];
    for (name, s) in &trio.servers {
        for body in &payloads {
            let (code, answer) = g.curl_post(&s.url, &[], body);
            assert!(code == 200 || code == 400, "{name}: {code} {answer}");
            assert!(answer.contains("-32001"), "{name}: {body} -> {answer}");
        }
        assert_eq!(
            s.calls(),
            Vec::<Value>::new(),
            "{name} ran a forbidden call"
        );
    }
    // The policy's own types, allowed values: run.
    let (_, answer) = g.curl_post(
        &trio.servers[0].1.url,
        &[],
        &call("add", json!({"a": 2, "b": 3})),
    );
    assert!(answer.contains('5'), "{answer}");
    assert_eq!(trio.servers[0].1.calls().len(), 1);
}

#[test]
fn the_destination_decides_which_policy_applies() {
    let dir = TestDir::new("destination");
    // Strict policies that name their servers by a host name (`localhost`, which resolves to
    // the address they listen on), ...
    let trio = Trio::start(&dir, ["127.0.0.1", "127.0.0.1", "127.0.0.1"]);
    for (name, s) in &trio.servers {
        let by_name = policy(name, Trio::addr(s)).replace("127.0.0.1:", "localhost:");
        dir.write_policy(&format!("{name}.json"), &by_name);
    }
    // ... and a lax policy, by another name only, on each one's port: a Host naming it took the
    // request.
    for (name, s) in &trio.servers {
        let lax = json!({
            "version": "1",
            "server": { "name": format!("lax-{name}"), "match": [format!("lax.invalid:{}", s.port)] },
            "default": "allow"
        });
        dir.write_policy(&format!("lax-{name}.json"), &lax.to_string());
    }
    let g = Guard::start(&dir, "", "");
    // FastMCP refuses a Host it does not serve (DNS-rebinding protection); the TS SDK and Go
    // servers take any.
    for (name, s) in &trio.servers[1..] {
        let host = format!("Host: lax.invalid:{}", s.port);
        let (_, answer) = g.curl_post(&s.url, &[&host], DELETE);
        assert!(
            answer.contains("-32001") && answer.contains("no deletions"),
            "{name}: {answer}"
        );
        assert_eq!(s.calls(), Vec::<Value>::new(), "{name} ran a denied call");
    }
    // The lax policy still applies where its name is the destination's: nowhere here, so the
    // plain allowed call runs under the strict policy's rule.
    let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"strict"}}}"#;
    let (_, answer) = g.curl_post(&trio.servers[2].1.url, &[], echo);
    assert!(answer.contains("strict"), "{answer}");
    let last = g.audit_decisions().pop().unwrap();
    assert_eq!(last["server"]["name"], "go", "{last}");
}

#[test]
fn a_batch_that_is_refused_asks_nobody_for_approval() {
    let dir = TestDir::new("batch-approval");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    let (name, s) = &trio.servers[1];
    let p = json!({
        "version": "1",
        "server": { "name": name, "match": [Trio::addr(s).to_string()] },
        "tools": {
            "echo": { "action": "require_approval", "approval_timeout": 60 },
            "delete_file": { "action": "deny", "reason": "no deletions" }
        }
    });
    dir.write_policy("ts.json", &p.to_string());
    let g = Guard::start(&dir, "", "");
    let echo = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#;
    let delete = DELETE.replace(r#""id":1"#, r#""id":2"#);
    // Answered at once, not after the 60 s hold: nothing is held.
    let (code, answer) = g.curl_post(&s.url, &[], &format!("[{echo},{delete}]"));
    assert_eq!(code, 200, "{answer}");
    assert!(
        answer.contains("no deletions") && answer.contains("batch"),
        "{answer}"
    );
    assert!(
        g.audit_decisions().iter().all(|r| r["event"] != "approval"),
        "{:#?}",
        g.audit_decisions()
    );
    let echo_record = g
        .audit_decisions()
        .into_iter()
        .find(|r| r["tool"] == "echo")
        .unwrap();
    assert_eq!(echo_record["rule"], "batch");
    assert!(s.calls().is_empty());
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

/// What a server logged beside tool calls: `{"resource": uri}`, `{"prompt": name}`,
/// `{"completion": name}` lines, as `kind:name`.
fn served(s: &Server) -> Vec<String> {
    s.calls()
        .iter()
        .filter_map(|c| {
            ["resource", "prompt", "completion"].iter().find_map(|k| {
                c.get(*k)
                    .and_then(Value::as_str)
                    .map(|v| format!("{k}:{v}"))
            })
        })
        .collect()
}

#[test]
fn every_method_is_decided_by_policy() {
    let dir = TestDir::new("methods");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    for (name, s) in &trio.servers[..2] {
        let p = json!({
            "version": "1",
            "server": { "name": name, "match": [Trio::addr(s).to_string()] },
            "default": "deny",
            "tools": { "echo": {} },
            "resources": {
                "file:///public/*": {},
                "secret://*": { "action": "deny", "reason": "no secrets" }
            },
            "prompts": { "greet": {} },
            "methods": { "completion/complete": {} }
        });
        dir.write_policy(&format!("{name}.json"), &p.to_string());
    }
    let g = Guard::start(&dir, "", "");
    let rpc = |method: &str, params: Value| {
        json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string()
    };
    let complete = |name: &str| {
        rpc(
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": name}, "argument": {"name": "name", "value": "b"}}),
        )
    };
    let refused = [
        rpc("resources/read", json!({"uri": "secret://token"})),
        // A template's instance, and spellings that read as the same URI.
        rpc("resources/read", json!({"uri": "secret://vault/k1"})),
        rpc("resources/read", json!({"uri": "SECRET://token"})),
        rpc("resources/read", json!({"uri": "file:///public/../secret"})),
        rpc("resources/subscribe", json!({"uri": "secret://token"})),
        rpc(
            "prompts/get",
            json!({"name": "exfiltrate", "arguments": {"target": "x"}}),
        ),
        // Completing a prompt the caller may not get tells what it takes.
        complete("exfiltrate"),
        rpc("tasks/get", json!({"taskId": "t1"})),
        // No id: a notification nobody could refuse, never forwarded.
        r#"{"jsonrpc":"2.0","method":"resources/read","params":{"uri":"secret://token"}}"#.into(),
    ];
    for (name, s) in &trio.servers[..2] {
        for body in &refused {
            let (_, answer) = g.curl_post(&s.url, &[], body);
            assert!(answer.contains("-32001"), "{name}: {body} -> {answer}");
        }
        assert_eq!(
            served(s),
            Vec::<String>::new(),
            "{name} served a refused request"
        );
        let (_, answer) = g.curl_post(
            &s.url,
            &[],
            &rpc(
                "resources/read",
                json!({"uri": "file:///public/readme.txt"}),
            ),
        );
        assert!(answer.contains("public readme"), "{name}: {answer}");
        let (_, answer) = g.curl_post(
            &s.url,
            &[],
            &rpc(
                "prompts/get",
                json!({"name": "greet", "arguments": {"name": "bob"}}),
            ),
        );
        assert!(answer.contains("Say hello to bob"), "{name}: {answer}");
        let (_, answer) = g.curl_post(&s.url, &[], &complete("greet"));
        assert!(answer.contains("b-done"), "{name}: {answer}");
        assert_eq!(
            served(s),
            [
                "resource:file:///public/readme.txt",
                "prompt:greet",
                "completion:greet"
            ],
            "{name}"
        );
        // Lists show only what this caller may use.
        let (_, answer) = g.curl_post(&s.url, &[], &rpc("resources/list", json!({})));
        assert!(
            answer.contains("readme.txt") && !answer.contains("secret://token"),
            "{name}: {answer}"
        );
        let (_, answer) = g.curl_post(&s.url, &[], &rpc("resources/templates/list", json!({})));
        assert!(
            answer.contains("resourceTemplates") && !answer.contains("vault"),
            "{name}: {answer}"
        );
        let (_, answer) = g.curl_post(&s.url, &[], &rpc("prompts/list", json!({})));
        assert!(
            answer.contains("greet") && !answer.contains("exfiltrate"),
            "{name}: {answer}"
        );
    }
    let audit = g.audit_decisions();
    let denied_read = audit.iter().find(|r| {
        r["event"] == "mcp_request" && r["method"] == "resources/read" && r["decision"] == "deny"
    });
    assert!(
        denied_read.is_some_and(|r| r["rule"] == "resources.secret://*"),
        "{audit:#?}"
    );
    let filtered = audit
        .iter()
        .find(|r| r["method"] == "prompts/list")
        .expect("prompts/list audited");
    assert_eq!(
        filtered["detail"]["hidden"],
        json!(["exfiltrate"]),
        "{filtered}"
    );
}

/// A server's request to the client on the stream of a call: FastMCP and the TS SDK server each
/// ask the Python SDK client's model (sampling/createMessage) from the tool `ask_model`.
#[test]
fn a_servers_requests_to_the_client_are_decided_by_policy() {
    let dir = TestDir::new("server-requests");
    let py = python_server(
        &dir.join("py.jsonl"),
        &["--host", "127.0.0.3", "--port", "0", "--ask-model"],
    );
    let ts = ts_server(
        &dir.join("ts.jsonl"),
        &["--host", "127.0.0.4", "--port", "0", "--ask-model"],
    );
    for (name, s) in [("fastmcp", &py), ("ts-sdk", &ts)] {
        let p = json!({
            "version": "1",
            "server": { "name": name, "match": [Trio::addr(s).to_string()] },
            "default": "allow",
            "methods": { "sampling/createMessage": { "action": "deny", "reason": "no sampling" } },
            "grants": [ { "agents": ["trusted"], "methods": { "sampling/createMessage": {} } } ]
        });
        dir.write_policy(&format!("{name}.json"), &p.to_string());
    }
    let g = Guard::start(&dir, "", "");
    for (name, s) in [("fastmcp", &py), ("ts-sdk", &ts)] {
        let ask = |agent: &str| {
            let mut args = client_args(
                &g.url(agent, &s.url),
                "streamable-http",
                false,
                &[("ask_model", r#"{"question":"2+2?"}"#)],
            );
            args.extend([
                "--sampling".to_string(),
                "four".to_string(),
                "--timeout".into(),
                "20".into(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_client(&mut g.command(&args))
        };
        // Denied: the client's model is never asked; the server's wait times out.
        let run = ask("bot");
        assert!(run.samplings.is_empty(), "{name}: {:?}", run.samplings);
        assert!(
            run.text(0).contains("sampling failed"),
            "{name}: {}",
            run.text(0)
        );
        // A grant lets it through for one agent.
        let run = ask("trusted");
        assert_eq!(run.samplings, [json!("2+2?")], "{name}");
        assert_eq!(run.text(0), "model said: four", "{name}");
    }
    let records: Vec<Value> = g
        .audit_decisions()
        .into_iter()
        .filter(|r| r["method"] == "sampling/createMessage")
        .collect();
    let decisions: Vec<&str> = records
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["deny", "allow", "deny", "allow"],
        "{records:#?}"
    );
    assert_eq!(records[0]["rule"], "methods.sampling/createMessage");
    assert_eq!(records[0]["detail"]["direction"], "server_to_client");
}

/// Tool pins cover every field a client shows or acts on, and come only from the server's own
/// address: an agent's listener answering for the server's name neither poisons nor clears them.
#[test]
fn pins_come_only_from_the_server_itself() {
    let dir = TestDir::new("pins-origin");
    let port = free_port().to_string();
    let start = |variant: &str, log: &str| {
        python_server(
            &dir.join(log),
            &[
                "--host",
                "127.0.0.3",
                "--port",
                &port,
                "--json-response",
                "--stateless",
                "--variant",
                variant,
            ],
        )
    };
    let p = json!({
        "version": "1",
        "server": { "name": "fastmcp", "match": [format!("127.0.0.3:{port}"), format!("pinned.invalid:{port}")] },
        "default": "allow"
    });
    dir.write_policy("fastmcp.json", &p.to_string());
    let g = Guard::start(&dir, "", "");
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}"#;
    let v1 = start("1", "v1.jsonl");
    let (_, original) = g.curl_post(&v1.url, &[], list);
    assert!(original.contains("\"echo\""), "{original}");
    drop(v1);
    // Only the title and annotations change (a "read-only" claim): that is a changed tool.
    let v3 = start("3", "v3.jsonl");
    // (A blocked tool is not listed.)
    let (_, answer) = g.curl_post(&v3.url, &[], list);
    assert!(
        answer.contains("\"add\"") && !answer.contains("\"echo\""),
        "{answer}"
    );
    let (_, answer) = g.curl_post(&v3.url, &[], echo);
    assert!(answer.contains("-32006"), "{answer}");
    // The agent's own listener, on the server's port at another address, answers tools/list
    // with the original definitions under the server's name: the block stays.
    let own = ScriptedMcp::start(
        &format!("127.0.0.6:{port}"),
        "application/json",
        move |id| original.replacen("\"id\":1", &format!("\"id\":{id}"), 1),
    );
    let host = format!("Host: pinned.invalid:{port}");
    let (_, answer) = g.curl_post(&own.url(), &[&host], list);
    assert!(answer.contains("\"add\""), "{answer}");
    let (_, answer) = g.curl_post(&v3.url, &[], echo);
    assert!(answer.contains("-32006"), "{answer}");
    assert!(v3.tools_called().is_empty(), "the blocked echo ran");
    let lists: Vec<Value> = g
        .audit_decisions()
        .into_iter()
        .filter(|r| r["event"] == "tools_list")
        .collect();
    assert_eq!(
        lists.last().unwrap()["detail"]["pinned"],
        false,
        "{lists:#?}"
    );
}

/// 9007199254740993 is that number to Python (and to guard's old reading) but 9007199254740992
/// to JavaScript: a `neq` on the latter let the TS SDK server run it. An integer servers read
/// differently is refused in any governed request.
#[test]
fn numbers_are_decided_as_every_server_reads_them() {
    let dir = TestDir::new("numbers");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    for (name, s) in &trio.servers {
        let p = json!({
            "version": "1",
            "server": { "name": name, "match": [Trio::addr(s).to_string()] },
            "default": "deny",
            "tools": { "add": { "when": [ { "path": "a", "op": "neq", "value": 9007199254740992u64 } ] } }
        });
        dir.write_policy(&format!("{name}.json"), &p.to_string());
    }
    let g = Guard::start(&dir, "", "");
    let call = |a: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"add","arguments":{{"a":{a},"b":0}}}}}}"#
        )
    };
    for (name, s) in &trio.servers {
        for a in [
            "9007199254740993",
            "100000000000000000001",
            "-9007199254740995",
        ] {
            let (_, answer) = g.curl_post(&s.url, &[], &call(a));
            assert!(
                answer.contains("-32001") && answer.contains("read differently"),
                "{name}: {a} -> {answer}"
            );
        }
        assert_eq!(
            s.calls(),
            Vec::<Value>::new(),
            "{name} ran a call guard could not read alike"
        );
    }
    // Exactly representable numbers are decided as before.
    let ts = &trio.servers[1].1;
    let (_, answer) = g.curl_post(&ts.url, &[], &call("9007199254740992"));
    assert!(answer.contains("-32001"), "{answer}");
    let (_, answer) = g.curl_post(&ts.url, &[], &call("10000000000000000000"));
    assert!(answer.contains("10000000000000000000"), "{answer}");
}

/// `approve --for` covers one agent instance (of one uid), not every process with the agent's
/// name; `session`-scoped limits count per agent instance, so a new MCP session id starts no
/// new budget.
#[test]
fn standing_approvals_and_session_limits_bind_the_agent_instance() {
    let dir = TestDir::new("instance");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    for (name, s) in &trio.servers[..2] {
        let p = json!({
            "version": "1",
            "server": { "name": name, "match": [Trio::addr(s).to_string()] },
            "tools": {
                "echo": { "action": "require_approval", "approval_timeout": 30 },
                "add": { "rate_limit": { "max": 1, "window": 600, "scope": "session" } }
            }
        });
        dir.write_policy(&format!("{name}.json"), &p.to_string());
    }
    let g = Guard::start(&dir, "", "");
    let post = |n: u64, url: &str, headers: &[&str], body: &str| {
        let url = g.url_instance("bot", n, url);
        let args = guard_testkit::curl::post_args(&[], headers, body, &url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        guard_testkit::curl::parse(&run_ok(&mut g.command(&args))).1
    };
    let echo = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"once"}}}"#;
    let add = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let approvals = &g.engine().approvals;
    let wait_held = || {
        let t = Instant::now();
        loop {
            if let Some(h) = approvals.list().first() {
                return h["id"].as_str().unwrap().to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no call was held");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    for (name, s) in &trio.servers[..2] {
        std::thread::scope(|sc| {
            // Instance 1 is approved for 10 minutes of identical calls.
            let first = sc.spawn(|| post(1, &s.url, &[], echo));
            approvals
                .approve(&wait_held(), 0, Some(Duration::from_secs(600)))
                .unwrap();
            assert!(first.join().unwrap().contains("once"), "{name}");
            assert!(
                post(1, &s.url, &[], echo).contains("once"),
                "{name}: not covered"
            );
            // Instance 2 of the same agent name is asked again (and denied here).
            let second = sc.spawn(|| post(2, &s.url, &[], echo));
            approvals
                .deny(&wait_held(), 0, "not this one".into())
                .unwrap();
            let answer = second.join().unwrap();
            assert!(
                answer.contains("-32003") && answer.contains("not this one"),
                "{name}: {answer}"
            );
        });
        assert_eq!(s.tools_called(), ["echo", "echo"], "{name}");
        // One add per instance, whatever session id the agent sends.
        assert!(
            post(1, &s.url, &["Mcp-Session-Id: s1"], add).contains('3'),
            "{name}"
        );
        let again = post(1, &s.url, &["Mcp-Session-Id: s2"], add);
        assert!(
            again.contains("-32002"),
            "{name}: a new session reset the limit: {again}"
        );
        assert!(
            post(2, &s.url, &["Mcp-Session-Id: s1"], add).contains('3'),
            "{name}"
        );
        assert_eq!(s.tools_called(), ["echo", "echo", "add", "add"], "{name}");
    }
}

/// Two policies share each server's address by path. A path that fits neither, or that fits
/// one only once decoded as the server decodes it, went to the policy loaded first (the lax
/// one); FastMCP (Starlette decodes `%6D` to `m`) and the TS SDK server (any path) then ran
/// the call the strict policy denies.
#[test]
fn a_shared_address_is_decided_by_the_path_as_servers_read_it() {
    let dir = TestDir::new("shared-path");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    for (name, s) in &trio.servers[..2] {
        let base = format!("http://{}", Trio::addr(s));
        let lax = json!({
            "version": "1",
            "server": { "name": format!("a-lax-{name}"), "match": [format!("{base}/other")] },
            "default": "allow"
        });
        dir.write_policy(&format!("a-lax-{name}.json"), &lax.to_string());
        let strict = policy(name, Trio::addr(s)).replace(
            &format!("\"{}\"", Trio::addr(s)),
            &format!("\"{base}/mcp\""),
        );
        dir.write_policy(&format!("b-{name}.json"), &strict);
    }
    let g = Guard::start(&dir, "", "");
    for (name, s) in &trio.servers[..2] {
        let base = format!("http://{}", Trio::addr(s));
        let mut paths = vec!["/%6Dcp", "//mcp", "/other/../mcp"];
        if *name == "ts-sdk" {
            paths.push("/elsewhere");
        }
        for path in paths {
            let url = format!("{base}{path}");
            let (code, answer) = g.curl_post_with("curl", &["--path-as-is"], &[], DELETE, &url);
            assert_eq!(code, 403, "{name} {path}: {answer}");
        }
        // As written, the strict policy decides.
        let (_, answer) = g.curl_post(&format!("{base}/mcp"), &[], DELETE);
        assert!(answer.contains("no deletions"), "{name}: {answer}");
        assert_eq!(s.calls(), Vec::<Value>::new(), "{name} ran a denied call");
        let echo = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"ok"}}}"#;
        let (_, answer) = g.curl_post(&format!("{base}/mcp"), &[], echo);
        assert!(answer.contains("ok"), "{name}: {answer}");
    }
    let refused = g
        .audit_decisions()
        .into_iter()
        .filter(|r| r["rule"] == "server.match")
        .count();
    assert!(refused >= 6, "{refused}");
}

/// Spellings a server reads as a denied resource: a query or fragment (FastMCP's template
/// matching ignores them), and what URL parsers canonicalise.
#[test]
fn resource_uris_are_decided_as_servers_resolve_them() {
    let dir = TestDir::new("uri-spellings");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    for (name, s) in &trio.servers[..2] {
        let p = json!({
            "version": "1",
            "server": { "name": name, "match": [Trio::addr(s).to_string()] },
            "default": "allow",
            "resources": { "secret://vault/k1": { "action": "deny", "reason": "not k1" } }
        });
        dir.write_policy(&format!("{name}.json"), &p.to_string());
    }
    let g = Guard::start(&dir, "", "");
    let read = |uri: &str| {
        json!({"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": uri}})
            .to_string()
    };
    for (name, s) in &trio.servers[..2] {
        for uri in [
            "secret://vault/k1?x=1",
            "secret://vault/k1#frag",
            "SECRET://VAULT/k1",
            "secret://vault/%6b1",
            "secret://vault//k1",
            "secret://vault/x/../k1",
        ] {
            let (_, answer) = g.curl_post(&s.url, &[], &read(uri));
            assert!(answer.contains("-32001"), "{name}: {uri} -> {answer}");
        }
        assert_eq!(
            served(s),
            Vec::<String>::new(),
            "{name} served the denied entry"
        );
        let (_, answer) = g.curl_post(&s.url, &[], &read("secret://vault/k2"));
        assert!(answer.contains("vault entry k2"), "{name}: {answer}");
    }
}

/// A request line naming one server in absolute form and `Host` another: servers read the
/// request line (RFC 9112), guard refuses the disagreement.
#[test]
fn a_target_and_host_that_disagree_are_refused() {
    let dir = TestDir::new("absolute-form");
    let trio = Trio::start(&dir, ["127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    trio.name_all(&dir);
    let g = Guard::start(&dir, "", "");
    let (_, go) = &trio.servers[2];
    let dst = Trio::addr(go);
    let route = g.route(dst, "curl");
    let request = format!(
        "POST http://elsewhere.invalid:{}/mcp HTTP/1.1\r\nHost: {dst}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{DELETE}",
        dst.port(),
        DELETE.len()
    );
    let answer = raw_request(route, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("in its target"), "{answer}");
    assert!(go.calls().is_empty());
}
