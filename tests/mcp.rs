//! MCP enforcement end to end, without root: guard's real proxy and enforcement core in this
//! process (`guard_testkit::inproc`), the Python MCP SDK's client and FastMCP server,
//! `@modelcontextprotocol/server-everything`, and curl. Every client reaches its server through
//! a route that stands for one agent's connects to it, as the kernel redirect does (the root
//! suite, `integration-test/`, drives the same path through real eBPF).

use std::time::Duration;

use guard_testkit::{inproc::*, peers::*, process::*, servers::HttpServer};
use serde_json::{json, Value};

/// The policy the tests enforce on the FastMCP test server.
fn policy(name: &str, port: u16) -> String {
    json!({
        "version": "1",
        "server": { "name": name, "match": [format!("127.0.0.3:{port}")] },
        "default": "deny",
        "hide": ["tool_12"],
        "tools": {
            "echo": {},
            "add": { "rate_limit": { "max": 2, "window": 3 } },
            "delete_file": { "action": "deny", "reason": "deleting files is not allowed" },
            "fetch_tasks": { "when": [ { "path": "task_ids", "op": "max_items", "value": 3 } ],
                             "reason": "at most 3 tasks per call" },
            "tool_01": {}, "tool_02": {}, "tool_03": {}, "tool_04": {}, "tool_05": {},
            "tool_12": {}
        },
        "grants": [ { "agents": ["admin-bot"], "tools": { "delete_file": {} } } ]
    })
    .to_string()
}

/// What the default caller may see with [`policy`].
const VISIBLE: &[&str] = &[
    "echo",
    "add",
    "fetch_tasks",
    "tool_01",
    "tool_02",
    "tool_03",
    "tool_04",
    "tool_05",
];

struct Setup {
    // Dropped in this order: guard, the server, then the directory.
    env: Guard,
    server: Server,
    _dir: TestDir,
}

/// guard enforcing [`policy`] on a FastMCP server started with `server_args`.
fn setup(server_args: &[&str]) -> Setup {
    setup_with(server_args, "")
}

/// [`setup`] with `proxy` lines in the configuration's `[proxy]` table.
fn setup_with(server_args: &[&str], proxy: &str) -> Setup {
    let dir = TestDir::new("mcp");
    let mut args = vec!["--host", "127.0.0.3", "--port", "0"];
    args.extend_from_slice(server_args);
    let server = python_server(&dir.join("calls.jsonl"), &args);
    dir.write_policy("testserver.json", &policy("testserver", server.port));
    let env = Guard::start(&dir, proxy, "");
    Setup {
        env,
        server,
        _dir: dir,
    }
}

/// The Python SDK client as `agent`, through guard, to `url`.
fn client(
    env: &Guard,
    agent: &str,
    url: &str,
    transport: &str,
    list: bool,
    calls: &[(&str, &str)],
) -> ClientRun {
    let args = client_args(&env.url(agent, url), transport, list, calls);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_client(&mut env.command(&args))
}

fn tool_calls(env: &Guard) -> Vec<Value> {
    env.audit()
        .into_iter()
        .filter(|r| r["event"] == "tool_call")
        .collect()
}

/// The route `agent` takes to the FastMCP server of `s` (for raw sockets).
fn route_port(s: &Setup, agent: &str) -> u16 {
    let dst = format!("127.0.0.3:{}", s.server.port).parse().unwrap();
    s.env.route(dst, agent).port()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn visible() -> Vec<String> {
    sorted(VISIBLE.iter().map(|s| s.to_string()).collect())
}

#[test]
fn allowed_and_denied_calls_over_streamable_http_json() {
    let s = setup(&["--transport", "streamable-http", "--json-response"]);
    let run = client(
        &s.env,
        "bot",
        &s.server.url,
        "streamable-http",
        false,
        &[
            ("echo", r#"{"text":"hello"}"#),
            ("delete_file", r#"{"path":"/etc/passwd"}"#),
        ],
    );
    // Allowed: exactly the server's result.
    assert_eq!(run.text(0), "hello");
    assert_eq!(run.result(0)["isError"], false);
    // Denied: -32001 with the policy's reason, never reaching the server.
    let e = run.error(1);
    assert_eq!(e["code"], -32001, "{e}");
    assert_eq!(
        e["message"],
        "guard: delete_file denied: deleting files is not allowed"
    );
    let g = &e["data"]["guard"];
    assert_eq!(g["decision"], "deny");
    assert_eq!(g["server"], "testserver");
    assert_eq!(g["tool"], "delete_file");
    assert_eq!(g["rule"], "tools.delete_file");
    assert_eq!(g["retryable"], false);
    assert_eq!(
        s.server.tools_called(),
        vec!["echo"],
        "the server saw a denied call"
    );

    // The audit records name agent, server, tool, decision and rule.
    let records = tool_calls(&s.env);
    let allowed = records
        .iter()
        .find(|r| r["tool"] == "echo")
        .expect("echo audited");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["agent"]["name"], "bot");
    assert_eq!(allowed["server"]["name"], "testserver");
    assert_eq!(allowed["rule"], "tools.echo");
    assert_eq!(allowed["transport"], "streamable-http");
    assert!(allowed["args_sha256"].as_str().unwrap().len() == 64);
    assert!(allowed["session_id"].is_string(), "{allowed}");
    let denied = records.iter().find(|r| r["tool"] == "delete_file").unwrap();
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["reason"], "deleting files is not allowed");
    assert_eq!(g["audit_id"], denied["id"]);
}

#[test]
fn the_same_policy_holds_over_json_sse_and_legacy_sse() {
    for (server_args, transport) in [
        (
            vec!["--transport", "streamable-http", "--json-response"],
            "streamable-http",
        ),
        (vec!["--transport", "streamable-http"], "streamable-http"),
        (vec!["--transport", "sse"], "sse"),
    ] {
        let mut args = server_args.clone();
        args.extend(["--page-size", "5"]);
        let s = setup(&args);
        let run = client(
            &s.env,
            "bot",
            &s.server.url,
            transport,
            true,
            &[
                ("echo", r#"{"text":"hi"}"#),
                ("delete_file", r#"{"path":"x"}"#),
                ("slow", r#"{"seconds":0}"#),
            ],
        );
        let label = format!("{server_args:?}");
        // tools/list: hidden and denied tools are gone, across pages.
        assert_eq!(sorted(run.tools.clone().unwrap()), visible(), "{label}");
        assert_eq!(run.text(0), "hi", "{label}");
        assert_eq!(run.error(1)["code"], -32001, "{label}");
        assert_eq!(run.error(2)["code"], -32001, "{label}: default deny");
        assert_eq!(run.error(2)["data"]["guard"]["rule"], "default", "{label}");
        assert_eq!(s.server.tools_called(), vec!["echo"], "{label}");
        let lists: Vec<Value> = s
            .env
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "tools_list")
            .collect();
        assert!(!lists.is_empty(), "{label}: tools/list not audited");
        if transport == "sse" {
            assert!(
                tool_calls(&s.env).iter().all(|r| r["transport"] == "sse"),
                "{label}"
            );
        }
    }
}

#[test]
fn rate_limits_slide() {
    let s = setup(&["--transport", "streamable-http", "--json-response"]);
    let add = r#"{"a":1,"b":2}"#;
    let run = client(
        &s.env,
        "bot",
        &s.server.url,
        "streamable-http",
        false,
        &[("add", add), ("add", add), ("add", add)],
    );
    assert_eq!(run.text(0), "3");
    assert_eq!(run.text(1), "3");
    let e = run.error(2);
    assert_eq!(e["code"], -32002, "{e}");
    let retry = e["data"]["guard"]["retry_after_s"]
        .as_u64()
        .expect("retry_after_s");
    assert!((1..=3).contains(&retry), "{retry}");
    assert_eq!(e["data"]["guard"]["retryable"], true);
    assert_eq!(s.server.tools_called().len(), 2);
    // After the window slides, calls pass again.
    std::thread::sleep(Duration::from_secs(retry + 1));
    let run = client(
        &s.env,
        "bot",
        &s.server.url,
        "streamable-http",
        false,
        &[("add", add)],
    );
    assert_eq!(run.text(0), "3");
    assert_eq!(s.server.tools_called().len(), 3);
}

#[test]
fn conditions_and_grants() {
    let s = setup(&["--transport", "streamable-http"]);
    let run = client(
        &s.env,
        "bot",
        &s.server.url,
        "streamable-http",
        true,
        &[
            ("fetch_tasks", r#"{"task_ids":[1,2]}"#),
            ("fetch_tasks", r#"{"task_ids":[1,2,3,4,5]}"#),
            ("delete_file", r#"{"path":"/tmp/x"}"#),
        ],
    );
    assert_eq!(run.text(0), "2");
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(
        run.error(1)["data"]["guard"]["reason"],
        "at most 3 tasks per call"
    );
    assert_eq!(run.error(2)["code"], -32001);
    assert!(!run
        .tools
        .as_ref()
        .unwrap()
        .contains(&"delete_file".to_string()));
    // Another agent, named by a grant: the same tool is allowed and listed.
    let run = client(
        &s.env,
        "admin-bot",
        &s.server.url,
        "streamable-http",
        true,
        &[("delete_file", r#"{"path":"/tmp/x"}"#)],
    );
    assert_eq!(run.text(0), "deleted /tmp/x");
    assert!(run
        .tools
        .as_ref()
        .unwrap()
        .contains(&"delete_file".to_string()));
    assert_eq!(s.server.tools_called(), vec!["fetch_tasks", "delete_file"]);
    let r = tool_calls(&s.env)
        .into_iter()
        .find(|r| r["agent"]["name"] == "admin-bot")
        .unwrap();
    assert_eq!(r["rule"], "grants[0].tools.delete_file");
}

#[test]
fn batches_headers_unknown_servers_and_malformed_bodies() {
    let s = setup_with(
        &["--transport", "streamable-http", "--json-response"],
        "max_body = \"2KiB\"",
    );
    let url = &s.server.url;
    // A batch with one denied call: nothing is forwarded; every request is answered.
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a"}}},
                   {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/"}}}]"#;
    let (code, body) = s.env.curl_post(url, &[], batch);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[1]["id"], 2);
    assert_eq!(arr[1]["error"]["code"], -32001);
    assert_eq!(
        arr[1]["error"]["data"]["guard"]["rule"],
        "tools.delete_file"
    );
    assert_eq!(arr[0]["id"], 1);
    assert_eq!(arr[0]["error"]["data"]["guard"]["rule"], "batch");
    assert!(
        s.server.calls().is_empty(),
        "part of a refused batch reached the server"
    );

    // Mcp-Name that disagrees with the body: refused before the policy is even asked.
    let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/"}}}"#;
    let (code, body) = s
        .env
        .curl_post(url, &["Mcp-Method: tools/call", "Mcp-Name: echo"], call);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Mcp-Name header"), "{body}");
    assert!(s.server.calls().is_empty());

    // Malformed JSON to a policy-named server: a parse error, nothing forwarded.
    let (code, body) = s.env.curl_post(url, &[], "{\"jsonrpc\":\"2.0\",");
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        -32700
    );

    // Over proxy.max_body: 413.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{}"}}}}}}"#,
        "x".repeat(4096)
    );
    let (code, body) = s.env.curl_post(url, &[], &big);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("max_body"));

    // An MCP server no policy names: -32005 under the default unknown_servers = "deny".
    let other = python_server(
        &s._dir.join("other.jsonl"),
        &["--host", "127.0.0.4", "--port", "0", "--json-response"],
    );
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (code, body) = s.env.curl_post(&other.url, &[], init);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32005, "{v}");
    // The daemon kept serving: a normal call still works.
    let run = client(
        &s.env,
        "bot",
        url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"still here"}"#)],
    );
    assert_eq!(run.text(0), "still here");
}

#[test]
fn slow_headers_are_cut_off_and_others_are_served() {
    let s = setup_with(
        &["--transport", "streamable-http", "--json-response"],
        "header_timeout_s = 1",
    );
    let slow = format!(
        r#"
import socket, time
s = socket.create_connection(("127.0.0.3", {}))
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\n")
start = time.time()
s.settimeout(10)
try:
    data = s.recv(4096)
    print("closed" if not data or b"408" in data else "answered", round(time.time() - start))
except OSError as e:
    print("error", e)
"#,
        route_port(&s, "slowloris")
    );
    let python = peer_python().display().to_string();
    let mut slow_cmd = s.env.command(&[&python, "-c", &slow]);
    let handle = std::thread::spawn(move || run(&mut slow_cmd, Duration::from_secs(30)));
    let run1 = client(
        &s.env,
        "bot",
        &s.server.url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"ok"}"#)],
    );
    assert_eq!(run1.text(0), "ok");
    let out = handle.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("closed"), "{text}");
    let secs: u64 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(secs <= 5, "the slow client was held {secs} s");
}

#[test]
fn a_changed_tool_definition_is_blocked() {
    let dir = TestDir::new("pins");
    let log = dir.join("calls.jsonl");
    let v1 = python_server(
        &log,
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    let port = v1.port.to_string();
    dir.write_policy("testserver.json", &policy("testserver", v1.port));
    let mut env = Guard::start(&dir, "", "");
    let run1 = client(
        &env,
        "bot",
        &v1.url,
        "streamable-http",
        true,
        &[("echo", r#"{"text":"one"}"#)],
    );
    assert_eq!(run1.text(0), "one");
    drop(v1);
    // The same server comes back with a poisoned description for echo.
    let v2 = python_server(
        &dir.join("calls2.jsonl"),
        &[
            "--host",
            "127.0.0.3",
            "--port",
            &port,
            "--json-response",
            "--variant",
            "2",
        ],
    );
    let run2 = client(
        &env,
        "bot",
        &v2.url,
        "streamable-http",
        true,
        &[("echo", r#"{"text":"two"}"#), ("add", r#"{"a":1,"b":1}"#)],
    );
    assert_eq!(run2.error(0)["code"], -32006, "{:?}", run2.calls);
    assert_eq!(run2.text(1), "2");
    assert_eq!(
        v2.tools_called(),
        vec!["add"],
        "the blocked call reached the server"
    );
    // A restarted guard still blocks it, before any tools/list.
    env = env.restart();
    let run3 = client(
        &env,
        "bot",
        &v2.url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"three"}"#)],
    );
    assert_eq!(run3.error(0)["code"], -32006, "{:?}", run3.calls);
    let changed: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "tool_changed")
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0]["tool"], "echo");
}

#[test]
fn server_everything_is_enforced() {
    let dir = TestDir::new("everything");
    let port = free_port();
    let server = everything_server(port, &dir.join("calls.jsonl"));
    dir.write_policy(
        "everything.json",
        &json!({
            "version": "1",
            "server": { "name": "everything", "match": [format!("127.0.0.1:{port}")] },
            "default": "deny",
            "tools": { "echo": {}, "get-sum": { "action": "deny", "reason": "no arithmetic today" } }
        })
        .to_string(),
    );
    let env = Guard::start(&dir, "", "");
    let run = client(
        &env,
        "bot",
        &server.url,
        "streamable-http",
        true,
        &[
            ("echo", r#"{"message":"hi"}"#),
            ("get-sum", r#"{"a":1,"b":2}"#),
        ],
    );
    assert!(run.text(0).contains("hi"), "{:?}", run.calls);
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(
        run.error(1)["data"]["guard"]["reason"],
        "no arithmetic today"
    );
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
}

#[test]
fn non_mcp_http_passes_unchanged() {
    let dir = TestDir::new("plain");
    let env = Guard::start(&dir, "", "");
    let server = HttpServer::start("127.0.0.2:0");
    // The proxy runs in this process: its upstream sockets are this process's.
    server.watch(std::process::id());
    // A JSON POST that is not JSON-RPC, to a server no policy names: forwarded as it is.
    let url = env.url("curl", &server.url());
    let out = run_ok(&mut env.command(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-H",
        "content-type: application/json",
        "--data",
        "{\"hello\":1}",
        &url,
    ]));
    assert_eq!(out, "hello from the test server\n");
    assert_eq!(server.via_watched(), 1);
    let c = env.audit_connections();
    assert_eq!(c.last().unwrap()["transport"], "http");
}

#[test]
fn smuggling_attempts_are_refused() {
    let s = setup(&["--transport", "streamable-http", "--json-response"]);
    let url = &s.server.url;
    let routed = s.env.url("curl", url);
    let denied = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/"}}}"#;
    // HTTP/2 with prior knowledge (h2c) is parsed and enforced like HTTP/1.1.
    let (_, out) = s
        .env
        .curl_post_with("curl", &["--http2-prior-knowledge"], &[], denied, url);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], -32001, "{out}");
    // A protocol upgrade towards a policy-named server is refused.
    let out = run_ok(&mut s.env.command(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        &routed,
    ]));
    assert_eq!(out, "403");
    // A body on a GET to a policy-named server is refused.
    let out = run_ok(&mut s.env.command(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "GET",
        "--data",
        denied,
        &routed,
    ]));
    assert_eq!(out, "400");
    // Raw bytes that are neither HTTP nor TLS never reach a policy-named server.
    let raw = format!(
        "import socket\ns = socket.create_connection(('127.0.0.3', {}), timeout=10)\ns.sendall(b'\\x00\\x01 not http')\ntry:\n    print('closed' if not s.recv(100) else 'answered')\nexcept ConnectionResetError:\n    print('closed')",
        route_port(&s, "raw")
    );
    let py = peer_python().display().to_string();
    assert_eq!(
        run_ok(&mut s.env.command(&[&py, "-c", &raw])).trim(),
        "closed",
        "{:#?}",
        s.env.audit_connections()
    );
    // Request lines servers accept but a method list would miss: leading CRLF, an unusual method
    // first, then the call on the same keep-alive connection.
    let raw_http = r#"
import socket, sys
body = sys.argv[2].encode()
def call(prefix):
    s = socket.create_connection(("127.0.0.3", int(sys.argv[1])), timeout=10)
    req = prefix + b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    s.sendall(req)
    data = b""
    while b"-3200" not in data and b"result" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print("denied" if b"-32001" in data else "NOT DENIED " + data[:200].decode(errors="replace"))
call(b"\r\n\r\n")
call(b"PROPFIND /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
"#;
    let port = route_port(&s, "raw-http").to_string();
    let out = run_ok(&mut s.env.command(&[&py, "-c", raw_http, &port, denied]));
    assert_eq!(out, "denied\ndenied\n");
    // Host and path chosen to miss the policy's entries: the destination still names the server.
    let spoofed = format!("http://127.0.0.3:{}/MCP", s.server.port);
    let (_, out) = s
        .env
        .curl_post(&spoofed, &["Host: elsewhere.example"], denied);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], -32001, "{out}");
    // A tools/call without an id, and keys that differ only in case, are refused.
    let no_id =
        r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_file","arguments":{}}}"#;
    let (code, body) = s.env.curl_post(url, &[], no_id);
    assert!(
        code == 200 && body.contains("-32001") && body.contains("without an id"),
        "{code} {body}"
    );
    let (code, _) = s.env.curl_post(
        url,
        &[],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}"#,
    );
    assert_eq!(code, 400);
    assert!(
        s.server.calls().is_empty(),
        "a smuggled call reached the server: {:?}",
        s.server.calls()
    );
    let refused: Vec<Value> = s
        .env
        .audit()
        .into_iter()
        .filter(|r| r["rule"] == "policy.server" && r["decision"] == "deny")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");

    // JSON-RPC to an unknown server is recognised whatever its Content-Type.
    let other = python_server(
        &s._dir.join("other.jsonl"),
        &["--host", "127.0.0.4", "--port", "0", "--json-response"],
    );
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let other_url = s.env.url("curl", &other.url);
    let out = run_ok(&mut s.env.command(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-H",
        "content-type: text/plain",
        "--data",
        init,
        &other_url,
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], -32005, "{out}");
}

/// `guard policy replay` on a session this guard recorded, against a stricter draft: exactly
/// the calls the draft decides otherwise are listed, and an argument condition on arguments the
/// audit did not keep is undecidable.
#[test]
fn policy_replay_lists_exactly_the_calls_a_stricter_draft_changes() {
    let s = setup(&["--transport", "streamable-http", "--json-response"]);
    client(
        &s.env,
        "bot",
        &s.server.url,
        "streamable-http",
        false,
        &[
            ("echo", r#"{"text":"a"}"#),
            ("echo", r#"{"text":"b"}"#),
            ("add", r#"{"a":1,"b":2}"#),
            ("delete_file", r#"{"path":"/x"}"#),
            ("tool_01", "{}"),
        ],
    );
    let draft = s.env.dir.join("draft");
    std::fs::create_dir_all(&draft).unwrap();
    let mut strict: Value = serde_json::from_str(&policy("testserver", s.server.port)).unwrap();
    // add is now denied, tool_01 needs a person, echo gets a condition on its argument.
    strict["tools"]["add"] = json!({ "action": "deny" });
    strict["tools"]["tool_01"] = json!({ "action": "require_approval" });
    strict["tools"]["echo"] =
        json!({ "when": [ { "path": "text", "op": "max_length", "value": 5 } ] });
    std::fs::write(draft.join("testserver.json"), strict.to_string()).unwrap();
    let out = run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_guard"))
            .arg("--config")
            .arg(s.env.config_file())
            .args(["policy", "replay", "--json", "--audit"])
            .arg(&s.env.audit_log)
            .arg("--policies")
            .arg(&draft),
    );
    let r: Value = serde_json::from_str(&out).unwrap();
    let changed: Vec<(String, String, u64)> = r["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["tool"].as_str().unwrap().to_string(),
                c["now"].as_str().unwrap().to_string(),
                c["calls"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changed,
        vec![
            ("add".to_string(), "denied".to_string(), 1),
            ("tool_01".to_string(), "held".to_string(), 1)
        ],
        "{r:#}"
    );
    assert_eq!(r["undecidable"][0]["tool"], "echo", "{r:#}");
    assert_eq!(r["undecidable"][0]["calls"], 2, "{r:#}");
    // delete_file: denied then and now.
    assert_eq!(r["unchanged"], 1, "{r:#}");
}
