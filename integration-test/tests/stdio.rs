//! stdio MCP servers under `guard wrap` with the real daemon and real eBPF: an agent started by
//! `guard exec` runs `guard wrap -- SERVER`, the daemon decides every line, a held call is
//! released with the `guard approvals` command, a daemon killed mid-session leaves nothing
//! reaching the server, and the stdio server's own connections are redirected like the agent's
//! (it runs in the agent's cgroup). The in-process suite (`tests/stdio.rs`) covers the wire in
//! depth without root.

use std::time::{Duration, Instant};

use guard_testkit::{peers::*, process::*, root::*, wrapped::Wrapped};
use serde_json::{json, Value};

/// `guard --config CFG wrap -- SERVER...`, as an agent's MCP config would start it.
fn wrap_argv(env: &Env, server: &[String]) -> Vec<String> {
    let mut v = vec![
        env.bin.display().to_string(),
        "--config".into(),
        env.config_path.display().to_string(),
        "wrap".into(),
        "--".into(),
    ];
    v.extend(server.iter().cloned());
    v
}

/// The agent: `guard exec --agent bot -- guard wrap -- SERVER...`, driven line by line.
fn agent(env: &Env, server: &[String]) -> Wrapped {
    let argv = wrap_argv(env, server);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    Wrapped::spawn(env.exec("bot", &argv))
}

fn fastmcp_stdio(log: &std::path::Path) -> Vec<String> {
    vec![
        peer_python().display().to_string(),
        script("mcp_server.py").display().to_string(),
        "--transport".into(),
        "stdio".into(),
        "--log".into(),
        log.display().to_string(),
    ]
}

fn calls_logged(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn tools_logged(log: &std::path::Path) -> Vec<String> {
    calls_logged(log)
        .iter()
        .filter_map(|v| v["tool"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn guard_wrap_is_decided_by_the_daemon_released_by_the_approvals_command_and_fails_closed() {
    let mut env = Env::new("");
    env.write_policy(
        "files.json",
        &json!({
            "version": "1",
            "server": { "name": "files", "match": ["stdio:*mcp_server.py*"] },
            "default": "deny",
            "tools": {
                "echo": {},
                "delete_file": { "action": "deny", "reason": "deleting files is not allowed" },
                "slow": { "action": "require_approval", "approval_timeout": 60 }
            }
        })
        .to_string(),
    );
    env.start_daemon();
    let log = env.dir.join("calls.jsonl");
    let mut w = agent(&env, &fastmcp_stdio(&log));
    w.initialize();
    let r = w.call(1, "echo", json!({"text": "hi"}));
    assert_eq!(r["result"]["content"][0]["text"], "hi", "{r}");
    let r = w.call(2, "delete_file", json!({"path": "/etc/passwd"}));
    assert_eq!(r["error"]["code"], -32001, "{r}");
    // Held in the daemon; released by an approver with the command line.
    w.send_call(3, "slow", json!({"seconds": 0}));
    let t = Instant::now();
    let id = loop {
        let out = run_ok(env.guard().args(["approvals", "list", "--json"]));
        let held: Vec<Value> = serde_json::from_str(&out).unwrap();
        if let Some(h) = held.first() {
            assert_eq!(h["server"], "files", "{h}");
            assert_eq!(h["tool"], "slow", "{h}");
            break h["id"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no call was held");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(w.next_within(Duration::from_millis(300)).is_none());
    assert!(!tools_logged(&log).contains(&"slow".to_string()));
    run_ok(env.guard().args(["approvals", "approve", &id]));
    let r = w.next();
    assert_eq!(r["id"], 3, "{r}");
    assert_eq!(r["result"]["content"][0]["text"], "done", "{r}");
    assert_eq!(tools_logged(&log), vec!["echo", "slow"]);
    // Audited by the daemon, with the agent as the kernel tells it.
    let refused = env
        .audit_decisions()
        .into_iter()
        .find(|r| r["tool"] == "delete_file")
        .expect("the refusal is audited");
    assert_eq!(refused["transport"], "stdio", "{refused}");
    assert_eq!(refused["agent"]["name"], "bot", "{refused}");
    assert!(
        refused["agent"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.contains("/agent-bot-")),
        "{refused}"
    );
    assert!(
        refused["server"]["command"]
            .as_str()
            .is_some_and(|c| c.contains("mcp_server.py --transport stdio")),
        "{refused}"
    );
    // The daemon is killed mid-session (no clean shutdown): the next call is answered with an
    // error by guard wrap, and the server never receives it.
    env.kill_daemon();
    let r = w.call(4, "echo", json!({"text": "while away"}));
    assert_eq!(r["id"], 4, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("guard daemon")),
        "{r}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let texts: Vec<Value> = calls_logged(&log)
        .iter()
        .map(|c| c["arguments"]["text"].clone())
        .collect();
    assert!(!texts.contains(&json!("while away")), "{texts:?}");
    // Still nothing gets through while it is away.
    let r = w.call(5, "echo", json!({"text": "still away"}));
    assert!(r["error"].is_object(), "{r}");
    assert_eq!(tools_logged(&log), vec!["echo", "slow"]);
}

/// A stdio server whose tool `reach` runs the command line given as its first argument (the
/// Python SDK client, over HTTP) and answers with that command's output: the server's own
/// network traffic, started from a tool call as a real server's would be.
const REACHING_SERVER: &str = r#"
import json, subprocess, sys
argv = json.loads(sys.argv[1])
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "initialize":
        r = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "reach", "version": "1"}}
    else:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        r = {"content": [{"type": "text", "text": out.stdout}]}
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"#;

#[test]
fn a_stdio_servers_own_connections_are_redirected_like_the_agents() {
    let mut env = Env::new("");
    let http_log = env.dir.join("http-calls.jsonl");
    let http = python_server(
        &http_log,
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    env.write_policy(
        "web.json",
        &json!({
            "version": "1",
            "server": { "name": "web", "match": [format!("127.0.0.3:{}", http.port)] },
            "default": "deny",
            "tools": {
                "echo": {},
                "delete_file": { "action": "deny", "reason": "no deletions over the network" }
            }
        })
        .to_string(),
    );
    env.write_policy(
        "reach.json",
        &json!({
            "version": "1",
            "server": { "name": "reach", "match": ["stdio:*reach.py*"] },
            "default": "deny",
            "tools": { "reach": {} }
        })
        .to_string(),
    );
    env.start_daemon();
    let script_path = env.dir.join("reach.py");
    std::fs::write(&script_path, REACHING_SERVER).unwrap();
    let client = client_args(
        &http.url,
        "streamable-http",
        false,
        &[
            ("echo", r#"{"text":"from the server"}"#),
            ("delete_file", r#"{"path":"/"}"#),
        ],
    );
    let server = vec![
        peer_python().display().to_string(),
        script_path.display().to_string(),
        serde_json::to_string(&client).unwrap(),
    ];
    let redirected = env.kernel_counter("redirected");
    let mut w = agent(&env, &server);
    w.initialize();
    let r = w.call(1, "reach", json!({}));
    let text = r["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    let calls: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("call").is_some())
        .collect();
    assert_eq!(calls.len(), 2, "{text}");
    assert_eq!(
        calls[0]["result"]["content"][0]["text"], "from the server",
        "{text}"
    );
    // The refusal comes from guard: the connection went through the proxy.
    assert_eq!(calls[1]["error"]["code"], -32001, "{text}");
    assert!(
        calls[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no deletions over the network")),
        "{text}"
    );
    assert_eq!(
        http.tools_called(),
        vec!["echo"],
        "the server saw a denied call"
    );
    assert!(env.kernel_counter("redirected") > redirected);
    // Attributed to the agent that started the stdio server.
    let over_http = env
        .audit_decisions()
        .into_iter()
        .find(|r| r["tool"] == "delete_file")
        .expect("the HTTP refusal is audited");
    assert_eq!(over_http["transport"], "streamable-http", "{over_http}");
    assert_eq!(over_http["agent"]["name"], "bot", "{over_http}");
    assert!(
        over_http["agent"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.contains("/agent-bot-")),
        "{over_http}"
    );
}
