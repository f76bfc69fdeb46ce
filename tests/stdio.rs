//! stdio MCP servers under `guard wrap`, without root: the real `guard` binary wraps the real
//! FastMCP server (Python SDK, stdio transport) and reaches guard's enforcement core, served
//! in this process on its stdio socket exactly as the daemon serves it
//! (`guard_testkit::inproc`). Whether a refused call ran is decided from the server's side (its
//! call log).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use guard_testkit::{inproc::*, peers::*, read_audit, wrapped::Wrapped};
use serde_json::{json, Value};

/// The policy of the FastMCP test server, over stdio (and over HTTP at `http_port`).
fn policy(http_port: u16) -> String {
    json!({
        "version": "1",
        "server": { "name": "files", "match": ["stdio:*mcp_server.py*", format!("127.0.0.3:{http_port}")] },
        "default": "deny",
        "hide": ["tool_12"],
        "tools": {
            "echo": {},
            "add": { "rate_limit": { "max": 2, "window": 60, "scope": "global" } },
            "delete_file": { "action": "deny", "reason": "deleting files is not allowed" },
            "slow": { "action": "require_approval", "approval_timeout": 30 },
            "tool_12": {}
        }
    })
    .to_string()
}

/// `guard --config ... wrap -- python mcp_server.py --transport stdio --log LOG`.
fn wrapped(g: &Guard, log: &Path) -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_guard").to_string(),
        "--config".into(),
        g.config_file().display().to_string(),
        "wrap".into(),
        "--".into(),
        peer_python().display().to_string(),
        script("mcp_server.py").display().to_string(),
        "--transport".into(),
        "stdio".into(),
        "--log".into(),
        log.display().to_string(),
    ]
}

/// The Python SDK's stdio client on `server` (a command line), with `steps` after it.
fn client(server: &[String], steps: &[&str]) -> Command {
    let mut c = Command::new(peer_python());
    c.arg(script("mcp_client.py"))
        .arg("stdio")
        .arg("--stdio-command")
        .arg(serde_json::to_string(server).unwrap())
        .arg("--timeout")
        .arg("20")
        .args(steps);
    c
}

fn calls_logged(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["tool"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_stdio_server_under_guard_wrap_is_decided_like_an_http_one() {
    let dir = TestDir::new("stdio-enforced");
    dir.write_policy("files.json", &policy(1));
    let g = Guard::start(&dir, "", "");
    let log = dir.join("calls.jsonl");
    let run = run_client(&mut client(
        &wrapped(&g, &log),
        &[
            "--list",
            "--call",
            "echo",
            r#"{"text":"hi"}"#,
            "--call",
            "delete_file",
            r#"{"path":"/etc/passwd"}"#,
            "--call",
            "tool_01",
            "{}",
        ],
    ));
    let tools = run.tools.clone().expect("a tools/list answer");
    assert!(tools.contains(&"echo".to_string()), "{tools:?}");
    assert!(!tools.contains(&"tool_12".to_string()), "hidden: {tools:?}");
    assert_eq!(
        run.calls[0]["result"]["content"][0]["text"], "hi",
        "{run:?}"
    );
    let denied = &run.calls[1]["error"];
    assert_eq!(denied["code"], -32001, "{run:?}");
    assert!(
        denied["message"]
            .as_str()
            .unwrap()
            .contains("deleting files is not allowed"),
        "{denied}"
    );
    // Not named by the policy: the default (deny).
    assert_eq!(run.calls[2]["error"]["code"], -32001, "{run:?}");
    // The server saw the allowed call only.
    assert_eq!(calls_logged(&log), vec!["echo"]);
    let audit = read_audit(&g.audit_log);
    let refused = audit
        .iter()
        .find(|r| r["tool"] == "delete_file")
        .expect("the refusal is audited");
    assert_eq!(refused["decision"], "deny");
    assert_eq!(refused["transport"], "stdio");
    // What the client's `initialize` asked for (the SDK's newest version: a date).
    assert!(
        refused["protocol_version"]
            .as_str()
            .is_some_and(|v| v.len() == 10 && v.starts_with("20")),
        "{refused}"
    );
    assert_eq!(refused["server"]["name"], "files");
    assert!(
        refused["server"]["command"]
            .as_str()
            .unwrap()
            .contains("mcp_server.py --transport stdio"),
        "{refused}"
    );
    // The agent is the wrapping process as the kernel tells it: its uid, its cgroup.
    assert_eq!(refused["agent"]["uid"], nix::unistd::getuid().as_raw());
    assert!(refused["agent"]["cgroup"].is_string(), "{refused}");
    let listed = audit
        .iter()
        .find(|r| r["event"] == "tools_list")
        .expect("the filtered list is audited");
    let hidden = listed["detail"]["hidden"].as_array().unwrap();
    assert!(hidden.contains(&json!("tool_12")), "{listed}");
    assert!(!hidden.contains(&json!("echo")), "{listed}");
}

#[test]
fn rate_limits_and_approvals_are_the_daemons_shared_with_http() {
    let dir = TestDir::new("stdio-shared");
    let log = dir.join("http-calls.jsonl");
    let http = python_server(
        &log,
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    dir.write_policy("files.json", &policy(http.port));
    let g = Guard::start(&dir, "", "");
    // One `add` over HTTP...
    let url = g.url("research-bot", &http.url);
    let args = client_args(
        &url,
        "streamable-http",
        false,
        &[("add", r#"{"a":1,"b":2}"#)],
    );
    let over_http = run_client(Command::new(peer_python()).args(&args[1..]));
    assert_eq!(
        over_http.calls[0]["result"]["structuredContent"]["result"],
        3
    );
    // ... and over stdio the same window has one left.
    let stdio_log = dir.join("stdio-calls.jsonl");
    let add = r#"{"a":2,"b":2}"#;
    let run = run_client(&mut client(
        &wrapped(&g, &stdio_log),
        &[
            "--skip-output-validation",
            "--call",
            "add",
            add,
            "--call",
            "add",
            add,
        ],
    ));
    assert_eq!(run.calls[0]["result"]["structuredContent"]["result"], 4);
    assert_eq!(run.calls[1]["error"]["code"], -32002, "{run:?}");
    assert_eq!(calls_logged(&stdio_log), vec!["add"]);
    // A call that needs approval is held in the daemon, where approvers see it.
    let approvals = &g.engine().approvals;
    std::thread::scope(|s| {
        let held = s.spawn(|| {
            run_client(&mut client(
                &wrapped(&g, &stdio_log),
                &[
                    "--skip-output-validation",
                    "--call",
                    "slow",
                    r#"{"seconds":0}"#,
                ],
            ))
        });
        let t = Instant::now();
        let id = loop {
            if let Some(h) = approvals.list().first() {
                assert_eq!(h["server"], "files");
                break h["id"].as_str().unwrap().to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no call was held");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!calls_logged(&stdio_log).contains(&"slow".to_string()));
        approvals.approve(&id, 0, None).unwrap();
        let run = held.join().unwrap();
        assert_eq!(
            run.calls[0]["result"]["content"][0]["text"], "done",
            "{run:?}"
        );
    });
    assert_eq!(calls_logged(&stdio_log), vec!["add", "slow"]);
}

#[test]
fn without_the_daemon_nothing_reaches_the_server() {
    let dir = TestDir::new("stdio-daemon-gone");
    dir.write_policy("files.json", &policy(1));
    let mut g = Guard::start(&dir, "", "");
    let log = dir.join("calls.jsonl");
    let mut w = Wrapped::start(&wrapped(&g, &log));
    w.initialize();
    assert_eq!(
        w.call(1, "echo", json!({"text": "a"}))["result"]["content"][0]["text"],
        "a"
    );
    // The daemon goes away mid-session: the next call is answered with an error, unforwarded.
    g.stop();
    std::thread::sleep(Duration::from_millis(300));
    let e = w.call(2, "echo", json!({"text": "while away"}));
    assert_eq!(e["id"], 2, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("guard daemon"),
        "{e}"
    );
    // When it is back, calls are decided (and forwarded) again.
    let g = g.restart();
    let t = Instant::now();
    let back = loop {
        let r = w.call(3, "echo", json!({"text": "back"}));
        if r.get("result").is_some() || t.elapsed() > Duration::from_secs(15) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(back["result"]["content"][0]["text"], "back", "{back}");
    let texts: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["arguments"]["text"].clone())
        .collect();
    assert!(!texts.contains(&json!("while away")), "{texts:?}");
    drop(g);
    // No daemon at all: the server is not started, and wrap says why.
    let out = Command::new(env!("CARGO_BIN_EXE_guard"))
        .args(["--config", &dir.join("guard.toml").display().to_string()])
        .args(["wrap", "--", "sh", "-c"])
        .arg(format!("echo started > {}", dir.join("started").display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the guard daemon"), "{err}");
    assert!(err.contains("was not started"), "{err}");
    assert!(!dir.join("started").exists());
}

/// A stdio server that answers `initialize`, then for each `tools/call`: `noise` first writes
/// a line that is not JSON, `dup` answers with duplicate keys, anything else answers "ok".
const FAKE_SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "initialize":
        r = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "fake", "version": "1"}}
    else:
        name = m["params"]["name"]
        open(sys.argv[1], "a").write(name + "\n")
        if name == "noise":
            print("Starting fake server...", flush=True)
        if name == "dup":
            print('{"jsonrpc":"2.0","id":%s,"result":{"content":[]},"result":{"content":[{"type":"text","text":"other"}]}}' % json.dumps(m["id"]), flush=True)
            continue
        r = {"content": [{"type": "text", "text": "ok"}]}
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"#;

#[test]
fn bad_input_either_way_is_answered_and_audited_never_forwarded() {
    let dir = TestDir::new("stdio-bad-input");
    dir.write_policy(
        "fake.json",
        &json!({"version": "1", "server": {"name": "fake", "match": ["stdio:*fake_server.py*"]}, "default": "allow"})
            .to_string(),
    );
    let g = Guard::start(&dir, r#"max_body = "2KiB""#, "");
    let script_path = dir.join("fake_server.py");
    std::fs::write(&script_path, FAKE_SERVER).unwrap();
    let log = dir.join("fake.log");
    let argv: Vec<String> = [
        env!("CARGO_BIN_EXE_guard"),
        "--config",
        &g.config_file().display().to_string(),
        "wrap",
        "--",
        &peer_python().display().to_string(),
        &script_path.display().to_string(),
        &log.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut w = Wrapped::start(&argv);
    w.initialize();
    // Not JSON: a parse error, with no id (none could be read).
    w.send("this is not json");
    let e = w.next();
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (Value::Null, json!(-32700)),
        "{e}"
    );
    // Over proxy.max_body: refused unread.
    w.send(
        &json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                   "params": {"name": "big", "arguments": {"x": "y".repeat(4096)}}})
        .to_string(),
    );
    let e = w.next();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("proxy.max_body"),
        "{e}"
    );
    // JSON-RPC guard reads differently than servers might (a duplicate key): refused.
    w.send(r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"echo","name":"dup","arguments":{}}}"#);
    let e = w.next();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("name"),
        "{e}"
    );
    // The server's noise on stdout is not passed on; its answer is.
    assert_eq!(
        w.call(7, "noise", json!({}))["result"]["content"][0]["text"],
        "ok"
    );
    // An answer guard cannot read as every client would: an error for that request instead.
    let e = w.call(8, "dup", json!({}));
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (json!(8), json!(-32603)),
        "{e}"
    );
    let seen = std::fs::read_to_string(&log).unwrap();
    assert_eq!(seen.lines().collect::<Vec<_>>(), vec!["noise", "dup"]);
    // A partial line at the end of the agent's input: refused, and wrap ends with the server.
    w.write_raw(br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"late"#);
    w.close_stdin();
    let status = w.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(!std::fs::read_to_string(&log).unwrap().contains("late"));
    let audit = read_audit(&g.audit_log);
    let reasons: Vec<String> = audit
        .iter()
        .filter(|r| r["decision"] == "deny")
        .filter_map(|r| r["reason"].as_str().map(str::to_string))
        .collect();
    for want in [
        "proxy.max_body",
        "without a newline",
        "cannot be read as every client",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want}: {reasons:#?}"
        );
    }
}

#[test]
fn mcp_config_wraps_each_format_and_the_agent_still_works() {
    let dir = TestDir::new("stdio-mcp-config");
    dir.write_policy("files.json", &policy(1));
    let g = Guard::start(&dir, "", "");
    let log = dir.join("calls.jsonl");
    let python = peer_python().display().to_string();
    let server = json!({
        "command": python,
        "args": [script("mcp_server.py").display().to_string(), "--transport", "stdio",
                 "--log", log.display().to_string()],
    });
    let mut typed = server.clone();
    typed["type"] = json!("stdio");
    let formats = [
        (
            "claude_desktop_config.json",
            json!({"mcpServers": {"files": server}}),
        ),
        (
            ".claude.json",
            json!({"numStartups": 2, "mcpServers": {"files": server},
                   "projects": {"/w": {"mcpServers": {"other": server}}}}),
        ),
        (
            "mcp.json",
            json!({"mcpServers": {"files": server, "web": {"url": "http://127.0.0.1:9/mcp"}}}),
        ),
        (
            "vscode-mcp.json",
            json!({"inputs": [], "servers": {"files": typed}}),
        ),
    ];
    let guard = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_guard"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    for (i, (name, config)) in formats.iter().enumerate() {
        let file = dir.join(name);
        let original = serde_json::to_string_pretty(config).unwrap();
        std::fs::write(&file, &original).unwrap();
        let f = file.display().to_string();
        let (code, text) = guard(&["mcp-config", "check", &f]);
        assert_eq!(code, Some(1), "{name}: {text}");
        assert!(text.contains("outside guard wrap"), "{text}");
        let (code, text) = guard(&[
            "mcp-config",
            "wrap",
            &f,
            "--guard",
            env!("CARGO_BIN_EXE_guard"),
        ]);
        assert_eq!(code, Some(0), "{name}: {text}");
        assert_eq!(
            std::fs::read_to_string(dir.join(&format!("{name}.guard-backup"))).unwrap(),
            original
        );
        let wrapped_text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            guard(&["mcp-config", "check", &f]).0,
            Some(0),
            "{wrapped_text}"
        );
        // Again: nothing changes.
        guard(&["mcp-config", "wrap", &f]);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), wrapped_text);
        // The SDK client reads the rewritten entry; guard decides its calls.
        let text = format!("via {name}");
        let mut c = Command::new(peer_python());
        c.arg(script("mcp_client.py"))
            .args(["stdio", "--stdio-config", &f, "--stdio-server", "files"])
            .arg("--stdio-env")
            .arg(format!("GUARD_CONFIG={}", g.config_file().display()))
            .args(["--skip-output-validation", "--call", "echo"])
            .arg(json!({"text": text}).to_string())
            .args(["--call", "delete_file", r#"{"path":"/x"}"#]);
        let run = run_client(&mut c);
        assert_eq!(
            run.calls[0]["result"]["content"][0]["text"],
            text.as_str(),
            "{run:?}"
        );
        assert_eq!(run.calls[1]["error"]["code"], -32001, "{run:?}");
        assert_eq!(calls_logged(&log).len(), i + 1, "{name}");
        // Unwrapped, it runs the server directly again.
        assert_eq!(guard(&["mcp-config", "unwrap", &f]).0, Some(0));
        assert_eq!(guard(&["mcp-config", "check", &f]).0, Some(1));
        let back: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(&back, config, "{name}");
    }
}

#[test]
fn the_typescript_sdk_drives_server_everything_under_guard_wrap_with_its_policy() {
    let dir = TestDir::new("stdio-everything");
    let repo_policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/everything.json");
    dir.write_policy(
        "everything.json",
        &std::fs::read_to_string(repo_policy).unwrap(),
    );
    let g = Guard::start(&dir, "", "");
    let modules = peers_dir().join("node/node_modules");
    let server = vec![
        env!("CARGO_BIN_EXE_guard").to_string(),
        "--config".into(),
        g.config_file().display().to_string(),
        "wrap".into(),
        "--".into(),
        "node".into(),
        modules
            .join("@modelcontextprotocol/server-everything/dist/index.js")
            .display()
            .to_string(),
        "stdio".into(),
    ];
    let mut c = Command::new("node");
    c.arg(script("mcp_client.mjs"))
        .arg("stdio")
        .arg("--stdio-command")
        .arg(serde_json::to_string(&server).unwrap())
        .arg("--node-modules")
        .arg(&modules)
        .args(["--timeout", "20", "--list"])
        .args(["--call", "get-sum", r#"{"a":1,"b":2}"#])
        .args(["--call", "get-env", "{}"])
        .args(["--call", "echo"])
        .arg(json!({"message": "x".repeat(1001)}).to_string());
    let run = run_client(&mut c);
    let tools = run.tools.clone().unwrap();
    // hide_denied: what the policy denies is not listed.
    assert!(tools.contains(&"get-sum".to_string()), "{tools:?}");
    assert!(!tools.contains(&"get-env".to_string()), "{tools:?}");
    assert!(
        !tools.contains(&"gzip-file-as-resource".to_string()),
        "{tools:?}"
    );
    assert_eq!(
        run.calls[0]["result"]["content"][0]["text"], "The sum of 1 and 2 is 3.",
        "{run:?}"
    );
    assert_eq!(run.calls[1]["error"]["code"], -32001, "{run:?}");
    let long = &run.calls[2]["error"];
    assert_eq!(long["code"], -32001, "{run:?}");
    assert!(
        long["message"]
            .as_str()
            .unwrap()
            .contains("1000 characters"),
        "{long}"
    );
    let audit = read_audit(&g.audit_log);
    let env = audit.iter().find(|r| r["tool"] == "get-env").unwrap();
    assert_eq!(
        (env["server"]["name"].clone(), env["transport"].clone()),
        (json!("everything"), json!("stdio"))
    );
}

#[test]
fn the_python_sdk_2_client_and_server_work_under_guard_wrap() {
    let dir = TestDir::new("stdio-mcp2");
    dir.write_policy(
        "files2.json",
        &json!({
            "version": "1",
            "server": { "name": "files2", "match": ["stdio:*mcp2_server.py*"] },
            "default": "deny",
            "tools": {
                "echo": {},
                "delete_file": { "action": "deny", "reason": "deleting files is not allowed" }
            }
        })
        .to_string(),
    );
    let g = Guard::start(&dir, "", "");
    let log = dir.join("calls.jsonl");
    let py2 = peer_python2().display().to_string();
    let mut c = Command::new(&py2);
    c.arg(script("mcp2_client.py"))
        .args(["--timeout", "20", "--print-init", "--list"])
        .args(["--call", "echo", r#"{"text":"two"}"#])
        .args(["--call", "delete_file", r#"{"path":"/x"}"#])
        .args(["--call", "add", r#"{"a":1,"b":2}"#])
        .arg("--")
        .args([env!("CARGO_BIN_EXE_guard"), "--config"])
        .arg(g.config_file())
        .args(["wrap", "--", &py2])
        .arg(script("mcp2_server.py"))
        .arg("--log")
        .arg(&log);
    let out = guard_testkit::process::run(&mut c, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // `server/discover` (2026-07-28's lifecycle) passes like `initialize`.
    assert_eq!(
        lines[0]["initialize"]["protocolVersion"], "2026-07-28",
        "{stdout}"
    );
    let tools = lines[1]["tools"].as_array().unwrap();
    assert!(tools.contains(&json!("echo")), "{stdout}");
    assert!(
        !tools.contains(&json!("add")),
        "denied by default, hidden: {stdout}"
    );
    assert_eq!(lines[2]["result"]["content"][0]["text"], "two", "{stdout}");
    assert_eq!(lines[3]["error"]["code"], -32001, "{stdout}");
    assert_eq!(lines[4]["error"]["code"], -32001, "{stdout}");
    assert_eq!(calls_logged(&log), vec!["echo"]);
}
