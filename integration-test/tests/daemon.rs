//! The daemon end to end, through the kernel redirect: the Python and TypeScript SDK clients
//! under `guard exec` (which must move them into a guarded cgroup and hand them guard's CA),
//! enforced over plain HTTP and TLS; and what only a daemon does: refusing to start on invalid
//! policies and keeping the last good set on a bad reload. The in-process suites
//! (`tests/mcp.rs`, `tests/tls.rs`) cover enforcement in depth without root.

use std::time::{Duration, Instant};

use guard_testkit::{peers::*, pki::*, process::*, root::*};
use serde_json::{json, Value};

fn policy(server: &Server, name: &str) -> String {
    json!({
        "version": "1",
        "server": { "name": name, "match": [format!("127.0.0.3:{}", server.port)] },
        "default": "deny",
        "tools": { "echo": {}, "delete_file": { "action": "deny", "reason": "no deletions" } }
    })
    .to_string()
}

fn client(
    env: &Env,
    agent: &str,
    url: &str,
    transport: &str,
    list: bool,
    calls: &[(&str, &str)],
) -> ClientRun {
    let args = client_args(url, transport, list, calls);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_client(&mut env.exec(agent, &args))
}

#[test]
fn mcp_calls_are_enforced_through_the_kernel_redirect() {
    let mut env = Env::new("");
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    env.write_policy("testserver.json", &policy(&server, "testserver"));
    env.start_daemon();
    let run = client(
        &env,
        "bot",
        &server.url,
        "streamable-http",
        true,
        &[
            ("echo", r#"{"text":"hello"}"#),
            ("delete_file", r#"{"path":"/etc/passwd"}"#),
        ],
    );
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
    assert_eq!(run.text(0), "hello");
    assert_eq!(run.error(1)["code"], -32001, "{:?}", run.calls);
    assert_eq!(
        server.tools_called(),
        vec!["echo"],
        "the server saw a denied call"
    );
    // Identified by the kernel: the agent's cgroup, its uid and its executable.
    let records: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "tool_call")
        .collect();
    let allowed = records.iter().find(|r| r["tool"] == "echo").unwrap();
    assert_eq!(allowed["agent"]["name"], "bot");
    assert_eq!(allowed["agent"]["uid"], 0);
    assert!(allowed["agent"]["cgroup"]
        .as_str()
        .is_some_and(|c| c.contains("/agent-bot-")));
    assert!(allowed["agent"]["exe"]
        .as_str()
        .is_some_and(|e| e.contains("python")));
    assert!(env.kernel_counter("redirected") >= 1);
}

/// A daemon trusting a test CA upstream, with a policy for an HTTPS FastMCP server.
fn tls_setup() -> (Pki, Server, Env) {
    let mut env = Env::new("");
    let pki = Pki::new(&env.dir, "test-ca");
    let cert = pki.leaf("server", &["127.0.0.3"], false);
    let server = https_server(
        &env.dir,
        "calls.jsonl",
        "127.0.0.3",
        &cert,
        &["--json-response"],
    );
    env.write_policy("secure.json", &policy(&server, "secure"));
    env.append_config(&format!(
        "[tls]\nextra_roots = [\"{}\"]\n",
        pki.ca_pem.display()
    ));
    env.start_daemon();
    (pki, server, env)
}

#[test]
fn python_sdk_client_over_https_relies_only_on_the_variables_guard_exec_sets() {
    let (_pki, server, env) = tls_setup();
    let run = client(
        &env,
        "tls-bot",
        &server.url,
        "streamable-http",
        true,
        &[
            ("echo", r#"{"text":"over tls"}"#),
            ("delete_file", r#"{"path":"/"}"#),
        ],
    );
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
    assert_eq!(run.text(0), "over tls");
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(server.tools_called(), vec!["echo"]);
    let conn = env
        .audit_connections()
        .into_iter()
        .find(|r| r["transport"] == "tls")
        .unwrap();
    assert_eq!(conn["rule"], "tls.intercept");
}

#[test]
fn node_sdk_client_relies_only_on_the_injected_variables() {
    let (_pki, server, env) = tls_setup();
    let node_modules = peers_dir().join("node/node_modules");
    let script = script("mcp_client.mjs");
    let out = run(
        &mut env.exec(
            "node-bot",
            &[
                "node",
                script.to_str().unwrap(),
                &server.url,
                "--node-modules",
                node_modules.to_str().unwrap(),
                "--list",
                "--call",
                "echo",
                r#"{"text":"from node"}"#,
                "--call",
                "delete_file",
                r#"{"path":"/"}"#,
            ],
        ),
        Duration::from_secs(120),
    );
    let run = parse_client(&out);
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
    assert_eq!(run.text(0), "from node");
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(server.tools_called(), vec!["echo"]);
}

#[test]
fn invalid_policies_stop_the_start_and_a_bad_reload_keeps_the_last_good_set() {
    let mut env = Env::new("");
    env.write_policy(
        "bad.json",
        "{\n  \"version\": \"1\",\n  \"default\": \"maybe\"\n}\n",
    );
    let out = run(env.guard().args(["daemon"]), Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json:3:"), "{err}");
    assert!(err.contains("default"), "{err}");
    assert!(
        env.attached().values().all(Vec::is_empty),
        "programs attached despite a bad policy"
    );

    // The seed-style file works as is.
    std::fs::remove_file(env.dir.join("policies/bad.json")).unwrap();
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    env.write_policy(
        "seed.json",
        &json!({"version":"1","default":"deny","tools":{"echo":{}},
                "server": {"match": [format!("127.0.0.3:{}", server.port)]}})
        .to_string(),
    );
    env.start_daemon();
    let run1 = client(
        &env,
        "bot",
        &server.url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"seed"}"#), ("add", r#"{"a":1,"b":1}"#)],
    );
    assert_eq!(run1.text(0), "seed");
    assert_eq!(run1.error(1)["code"], -32001);

    // A broken edit is refused; the last good set stays in force.
    env.write_policy("seed.json", "{ \"version\": \"1\", \"tools\": [ }");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !env
        .audit()
        .iter()
        .any(|r| r["event"] == "policy_reload" && r["decision"] == "rejected")
    {
        assert!(
            Instant::now() < deadline,
            "no rejected reload in the audit log:\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let run2 = client(
        &env,
        "bot",
        &server.url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"still"}"#), ("add", r#"{"a":1,"b":1}"#)],
    );
    assert_eq!(run2.text(0), "still");
    assert_eq!(run2.error(1)["code"], -32001);
    assert!(env.daemon_log().contains("NOT reloaded"));
}
