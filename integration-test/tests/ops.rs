//! Human approvals, the control plane's authorisation, metrics and state that survives a
//! restart — with the real daemon, eBPF and the Python MCP SDK.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use guard_testkit::{peers::*, process::*, root::*};
use serde_json::{json, Value};

/// A uid/gid that is neither root nor in the approvers group.
const OUTSIDER: u32 = 65533;

fn setup() -> (Env, Server) {
    setup_with("")
}

/// [`setup`] with more configuration tables.
fn setup_with(tables: &str) -> (Env, Server) {
    // The approvers group is `nogroup` (gid 65534), so uid 65534 (nobody) is an approver.
    let mut env = Env::configured(
        "",
        "",
        &format!("[guard]\napprovers_group = \"nogroup\"\n\n{tables}"),
    );
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    env.write_policy(
        "held.json",
        &json!({
            "version": "1",
            "server": { "name": "held", "match": [format!("127.0.0.3:{}", server.port)] },
            "default": "deny",
            "tools": {
                "echo": {},
                "delete_file": { "action": "require_approval", "approval_timeout": 60 },
                "add": { "action": "require_approval", "approval_timeout": 2 },
                "fetch_tasks": { "rate_limit": { "max": 2, "window": 120 } }
            }
        })
        .to_string(),
    );
    env.start_daemon();
    (env, server)
}

/// Runs the Python client in the background; join to get its output.
fn client_bg(env: &Env, calls: &[(&str, &str)]) -> thread::JoinHandle<ClientRun> {
    let args = client_args(
        &format!("http://127.0.0.3:{}/mcp", env_server_port(env)),
        "streamable-http",
        false,
        calls,
    );
    let args: Vec<String> = args;
    let mut cmd = env.exec(
        "held-bot",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    thread::spawn(move || parse_client(&run(&mut cmd, Duration::from_secs(120))))
}

/// The port of the server the policy names (read back from the policy file).
fn env_server_port(env: &Env) -> u16 {
    let p: Value =
        serde_json::from_str(&std::fs::read_to_string(env.dir.join("policies/held.json")).unwrap())
            .unwrap();
    p["server"]["match"][0]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn held(env: &Env) -> Vec<Value> {
    let out = run_ok(env.guard().args(["approvals", "list", "--json"]));
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn wait_held(env: &Env, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = held(env);
        if h.len() >= n {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "no held call appeared:\n{}",
            env.daemon_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn held_calls_are_approved_denied_or_time_out() {
    let (env, server) = setup();
    // Approved: the client gets the server's result.
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/tmp/a"}"#)]);
    let h = wait_held(&env, 1);
    assert_eq!(h[0]["tool"], "delete_file");
    assert_eq!(h[0]["agent"], "held-bot");
    assert_eq!(h[0]["arguments"], json!({"path": "/tmp/a"}));
    assert!(h[0]["remaining_s"].as_u64().unwrap() <= 60);
    let human = run_ok(env.guard().args(["approvals", "list"]));
    assert!(
        human.contains("tool delete_file") && human.contains("\"path\": \"/tmp/a\""),
        "{human}"
    );
    run_ok(
        env.guard()
            .args(["approvals", "approve", h[0]["id"].as_str().unwrap()]),
    );
    let run1 = c.join().unwrap();
    assert_eq!(run1.text(0), "deleted /tmp/a");

    // Denied: -32003 with the reason.
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/etc"}"#)]);
    let h = wait_held(&env, 1);
    run_ok(env.guard().args([
        "approvals",
        "deny",
        h[0]["id"].as_str().unwrap(),
        "--reason",
        "not /etc",
    ]));
    let run2 = c.join().unwrap();
    assert_eq!(run2.error(0)["code"], -32003);
    assert_eq!(run2.error(0)["data"]["guard"]["reason"], "not /etc");

    // Nobody answers: -32004 at the timeout (2 s for `add`).
    let started = Instant::now();
    let c = client_bg(&env, &[("add", r#"{"a":1,"b":2}"#)]);
    let run3 = c.join().unwrap();
    assert_eq!(run3.error(0)["code"], -32004);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(held(&env).is_empty());

    // --for: the next identical call of the same agent instance (one `guard exec`) passes
    // without a prompt; a different call, or the same one from another instance, is held.
    let identical = ("delete_file", r#"{"path":"/tmp/b"}"#);
    let c = client_bg(&env, &[identical, identical]);
    let h = wait_held(&env, 1);
    run_ok(env.guard().args([
        "approvals",
        "approve",
        h[0]["id"].as_str().unwrap(),
        "--for",
        "1m",
    ]));
    let run4 = c.join().unwrap();
    assert_eq!(run4.text(0), "deleted /tmp/b");
    assert_eq!(run4.text(1), "deleted /tmp/b");
    for other in [("delete_file", r#"{"path":"/tmp/c"}"#), identical] {
        let c = client_bg(&env, &[other]);
        let h = wait_held(&env, 1);
        assert_eq!(
            h[0]["arguments"],
            serde_json::from_str::<Value>(other.1).unwrap()
        );
        run_ok(
            env.guard()
                .args(["approvals", "deny", h[0]["id"].as_str().unwrap()]),
        );
        assert_eq!(c.join().unwrap().error(0)["code"], -32003);
    }

    assert_eq!(
        server.tools_called(),
        vec!["delete_file", "delete_file", "delete_file"],
        "only approved calls reached the server"
    );
    let approvals: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "approval")
        .collect();
    let decisions: Vec<&str> = approvals
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    for d in ["pending", "approved", "denied", "timeout"] {
        assert!(decisions.contains(&d), "{d} not audited: {decisions:?}");
    }
    assert!(approvals
        .iter()
        .any(|r| r["decision"] == "approved" && r["actor_uid"] == 0));
}

fn as_uid(env: &Env, uid: u32, args: &[&str]) -> std::process::Output {
    let mut cmd: Command = env.guard();
    cmd.args(args).current_dir("/");
    as_user(&mut cmd, uid, uid);
    run(&mut cmd, Duration::from_secs(20))
}

/// A webhook receiver: logs each POST body as a line of `log`, answers 200.
const HOOK: &str = r#"
import http.server, sys
log = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
        with open(log, 'ab') as f:
            f.write(body + b'\n')
        self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers()
        self.wfile.write(b'ok')
    def log_message(self, *a): pass
s = http.server.HTTPServer(('127.0.0.1', 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

struct Hook(std::process::Child);

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn approvers_are_told_of_held_calls_by_webhook_and_command() {
    use std::io::BufRead as _;
    let dir = std::env::temp_dir().join(format!("guard-hook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hook.py"), HOOK).unwrap();
    let mut child = spawn(
        Command::new("python3")
            .arg(dir.join("hook.py"))
            .arg(dir.join("hook.log"))
            .stdout(std::process::Stdio::piped()),
    )
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let hook = Hook(child);
    let port: u16 = line.trim().parse().unwrap();
    let closed = free_port();
    let (env, server) = setup_with(&format!(
        r#"[[approvals.notify]]
webhook = "http://127.0.0.1:{port}/hook"
exec = ["/bin/sh", "-c", 'printf "%s %s\n" "$GUARD_APPROVAL_ID" "$GUARD_TOOL" >> {out}', "{{tool}}"]

[[approvals.notify]]
webhook = "http://127.0.0.1:{closed}/nobody"
attempts = 2
"#,
        out = dir.join("exec.log").display()
    ));
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/tmp/<!channel>"}"#)]);
    let h = wait_held(&env, 1);
    let id = h[0]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let got = std::fs::read_to_string(dir.join("hook.log")).unwrap_or_default();
        if let Some(l) = got.lines().next() {
            break serde_json::from_str::<Value>(l).unwrap();
        }
        assert!(Instant::now() < deadline, "the webhook heard nothing");
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body["guard"]["approval_id"], id.as_str());
    assert_eq!(body["guard"]["tool"], "delete_file");
    assert_eq!(body["guard"]["agent"], "held-bot");
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("guard approvals approve {id}")),
        "{text}"
    );
    assert!(
        text.contains("&lt;!channel&gt;") && !text.contains("<!channel>"),
        "{text}"
    );
    let exec_log = loop {
        let got = std::fs::read_to_string(dir.join("exec.log")).unwrap_or_default();
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "the command did not run");
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(exec_log, format!("{id} delete_file\n"));
    // Being told did not decide anything: the call waits until an approver answers.
    assert_eq!(held(&env).len(), 1);
    assert!(server.tools_called().is_empty());
    run_ok(env.guard().args(["approvals", "approve", &id]));
    assert_eq!(c.join().unwrap().text(0), "deleted /tmp/<!channel>");
    // The unreachable webhook: tried twice, the failure audited.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let notes: Vec<Value> = env
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "approval_notify")
            .collect();
        let failed = notes.iter().find(|r| r["decision"] == "error");
        if let Some(f) = failed {
            assert_eq!(f["detail"]["approval_id"], id.as_str());
            assert!(
                f["reason"]
                    .as_str()
                    .unwrap()
                    .starts_with("after 2 attempts"),
                "{f}"
            );
            let ok = notes.iter().filter(|r| r["decision"] == "applied").count();
            assert_eq!(ok, 2, "the webhook and the command delivered: {notes:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed notification audited: {notes:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmux server of the test's own (its own socket), killed at the end.
struct Tmux(String);

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.0]);
        c
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "watch"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        run_ok(self.cmd().args(["send-keys", "-t", "watch"]).args(keys));
    }

    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if s.contains(what) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "`{what}` not on the screen:\n{s}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

#[test]
fn approvals_watch_approves_and_denies_held_calls_in_a_terminal() {
    let (env, server) = setup();
    let tmux = Tmux(format!("guard-test-{}", std::process::id()));
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/tmp/watched"}"#)]);
    wait_held(&env, 1);
    run_ok(
        tmux.cmd()
            .args(["new-session", "-d", "-s", "watch", "-x", "160", "-y", "40"])
            .arg(format!(
                "{} --config {} approvals watch",
                env.bin.display(),
                env.config_path.display()
            )),
    );
    let screen = tmux.wait_for("delete_file");
    assert!(
        screen.contains("held-bot") && screen.contains("/tmp/watched"),
        "{screen}"
    );
    tmux.keys(&["a"]);
    assert_eq!(c.join().unwrap().text(0), "deleted /tmp/watched");
    tmux.wait_for("approved");

    // `d` with a reason typed at the prompt.
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/etc"}"#)]);
    tmux.wait_for("/etc");
    tmux.keys(&["d"]);
    tmux.wait_for("reason");
    tmux.keys(&["-l", "not etc"]);
    tmux.keys(&["Enter"]);
    let run2 = c.join().unwrap();
    assert_eq!(run2.error(0)["code"], -32003);
    assert_eq!(run2.error(0)["data"]["guard"]["reason"], "not etc");
    tmux.wait_for("no calls are waiting");
    tmux.keys(&["q"]);
    assert_eq!(
        server.tools_called(),
        vec!["delete_file"],
        "only the approved call ran"
    );
}

#[test]
fn only_root_and_approvers_may_steer_the_daemon() {
    let (env, _server) = setup();
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/x"}"#)]);
    let id = wait_held(&env, 1)[0]["id"].as_str().unwrap().to_string();

    for args in [
        vec!["approvals", "approve", id.as_str()],
        vec!["approvals", "list"],
        vec!["reload"],
        vec!["disable"],
    ] {
        let out = as_uid(&env, OUTSIDER, &args);
        assert!(
            !out.status.success(),
            "{args:?} was allowed for uid {OUTSIDER}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("only root"), "{args:?}: {err}");
    }
    // A guarded process — even root — cannot answer held calls (an agent approving itself).
    let bin = env.bin.display().to_string();
    let cfg = env.config_path.display().to_string();
    let out = run(
        &mut env.exec(
            "self-approver",
            &[&bin, "--config", &cfg, "approvals", "approve", &id],
        ),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("guarded process cannot answer"));
    // Still held, still enforcing.
    assert_eq!(held(&env).len(), 1);
    assert_eq!(env.status()["enforcing"], true);
    let refusals: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| (r["event"] == "control" || r["event"] == "disable") && r["decision"] == "deny")
        .collect();
    assert_eq!(refusals.len(), 5, "{refusals:#?}");
    assert_eq!(
        refusals
            .iter()
            .filter(|r| r["actor_uid"] == OUTSIDER)
            .count(),
        4
    );

    // A member of the approvers group may answer, but not reload.
    let out = as_uid(&env, NOBODY, &["approvals", "approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.join().unwrap().text(0), "deleted /x");
    let out = as_uid(&env, NOBODY, &["reload"]);
    assert!(!out.status.success());
    let approved = env
        .audit()
        .into_iter()
        .find(|r| r["event"] == "approval" && r["decision"] == "approved")
        .unwrap();
    assert_eq!(approved["actor_uid"], NOBODY);
}

#[test]
fn metrics_follow_decisions() {
    let (env, _server) = setup();
    let allowed =
        r#"guard_decisions_total{event="tool_call",server="held",tool="echo",decision="allow"}"#;
    let denied =
        r#"guard_decisions_total{event="tool_call",server="held",tool="slow",decision="deny"}"#;
    let before = (
        env.metric(allowed),
        env.metric(denied),
        env.metric("guard_redirected_total"),
    );
    let run1 = client_bg(
        &env,
        &[("echo", r#"{"text":"m"}"#), ("slow", r#"{"seconds":0}"#)],
    )
    .join()
    .unwrap();
    assert_eq!(run1.text(0), "m");
    assert_eq!(run1.error(1)["code"], -32001);
    let after = (
        env.metric(allowed),
        env.metric(denied),
        env.metric("guard_redirected_total"),
    );
    assert_eq!(after.0, before.0 + 1);
    assert_eq!(after.1, before.1 + 1);
    assert!(after.2 > before.2);
    let text = env.metrics();
    assert!(
        text.contains("guard_decision_latency_seconds_count{event=\"tool_call\"}"),
        "{text}"
    );
    assert!(text.contains("guard_enforcing 1"));
}

#[test]
fn rate_limits_survive_a_restart_and_held_calls_are_answered_at_shutdown() {
    let (mut env, server) = setup();
    let run1 = client_bg(
        &env,
        &[
            ("fetch_tasks", r#"{"task_ids":[1]}"#),
            ("fetch_tasks", r#"{"task_ids":[2]}"#),
        ],
    )
    .join()
    .unwrap();
    assert_eq!(run1.text(0), "1");
    assert_eq!(run1.text(1), "1");
    // A held call when the daemon stops gets an answer, not a hang.
    let c = client_bg(&env, &[("delete_file", r#"{"path":"/y"}"#)]);
    wait_held(&env, 1);
    env.stop_daemon();
    let held_run = c.join().unwrap();
    assert_eq!(held_run.error(0)["code"], -32003, "{:?}", held_run.calls);
    assert!(held_run.error(0)["data"]["guard"]["reason"]
        .as_str()
        .unwrap()
        .contains("stopped"));

    env.start_daemon();
    let run2 = client_bg(&env, &[("fetch_tasks", r#"{"task_ids":[3]}"#)])
        .join()
        .unwrap();
    assert_eq!(
        run2.error(0)["code"],
        -32002,
        "the counter was lost in the restart: {:?}",
        run2.calls
    );
    // Also across a crash (the counters are saved every second).
    thread::sleep(Duration::from_millis(1500));
    env.kill_daemon();
    env.start_daemon();
    let run3 = client_bg(&env, &[("fetch_tasks", r#"{"task_ids":[4]}"#)])
        .join()
        .unwrap();
    assert_eq!(run3.error(0)["code"], -32002);
    assert_eq!(server.tools_called(), vec!["fetch_tasks", "fetch_tasks"]);
}

/// A small tmpfs for a test's audit log, unmounted (and removed) on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &std::path::Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=755"),
                "guard-test",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn an_audit_log_that_cannot_be_written_refuses_calls_and_says_so() {
    // Guarded by its cgroup, not by `guard exec` (which itself needs the audit log).
    let mut env = Env::new(r#"guarded_cgroups = ["{root}/guard.slice/static"]"#);
    let static_cg = env.cgroup("guard.slice/static");
    guard::kernel::cgroup::create(&static_cg).unwrap();
    let post = |url: &str, body: &str| {
        let args = guard_testkit::curl::post_args(&[], &[], body, url);
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..]);
        in_cgroup(&mut cmd, &static_cg);
        guard_testkit::curl::parse(&run_ok(&mut cmd))
    };
    let fs = SmallFs::mount(&env.dir.join("log"), "256k");
    env.set_audit_log(&fs.0.join("audit.jsonl"));
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &[
            "--host",
            "127.0.0.3",
            "--port",
            "0",
            "--json-response",
            "--stateless",
        ],
    );
    env.write_policy(
        "s.json",
        &json!({"version":"1","server":{"name":"s","match":[format!("127.0.0.3:{}", server.port)]},
                "default":"deny","tools":{"echo":{}}})
        .to_string(),
    );
    env.start_daemon();
    let echo = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#;
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    assert_eq!(post(&server.url, init).0, 200);
    assert_eq!(env.status()["audit"]["ok"], true);
    // The disk fills up: the log's last page first (a write into it would need no new page),
    // then the rest.
    let log = fs.0.join("audit.jsonl");
    let len = std::fs::metadata(&log).unwrap().len() as usize;
    // A JSON line of exactly the bytes left in the page (a page more when too few are left).
    let mut pad = 4096 - len % 4096;
    if pad < 11 {
        pad += 4096;
    }
    let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(pad - 11));
    assert_eq!(line.len(), pad);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
        .unwrap();
    let filler = fs.0.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .output();
    let (code, body) = post(&server.url, echo);
    assert_eq!(code, 503, "{body}");
    assert!(server.tools_called().is_empty(), "an unrecorded call ran");
    let status = env.status();
    assert_eq!(status["audit"]["ok"], false, "{status:#}");
    assert!(status["audit"]["write_failures"].as_u64().unwrap() >= 1);
    assert_eq!(env.metric("guard_audit_ok"), 0);
    assert!(env.metric("guard_audit_write_failures_total") >= 1);
    let text = run_ok(env.guard().arg("status"));
    assert!(text.contains("audit:           FAILING"), "{text}");
    // Room again: calls are recorded, and so served.
    std::fs::remove_file(&filler).unwrap();
    let (code, body) = post(&server.url, echo);
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.tools_called(), vec!["echo"]);
    assert_eq!(env.status()["audit"]["ok"], true);
}

/// The pid-recycling attack on `guard exec`: a process connects to the control socket and
/// exits; its pid goes to a victim (an unguarded process); then the request is sent on the
/// dead process's connection. The daemon must not move the victim.
const RECYCLE: &str = r#"
import os, socket, sys, time
path = sys.argv[1]
a, b = socket.socketpair()
caller = os.fork()
if caller == 0:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socket.send_fds(a, [b"x"], [s.fileno()])
    os._exit(0)
_, fds, _, _ = socket.recv_fds(b, 1, 1)
os.waitpid(caller, 0)
conn = socket.socket(fileno=fds[0])
victim = None
for _ in range(200):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(caller - 1))
    v = os.fork()
    if v == 0:
        time.sleep(60)
        os._exit(0)
    if v == caller:
        victim = v
        break
    os.kill(v, 9)
    os.waitpid(v, 0)
if victim is None:
    print("no-recycle")
    sys.exit(0)
conn.sendall(b'{"v":1,"op":"exec","agent":"hijack"}\n')
print("answer", conn.recv(4096).decode().strip())
print("victim", open(f"/proc/{victim}/cgroup").read().strip())
os.kill(victim, 9)
os.waitpid(victim, 0)
"#;

#[test]
fn a_recycled_pid_never_moves_another_process() {
    let mut env = Env::new("");
    env.start_daemon();
    let out = run_ok(Command::new(PYTHON).args(["-c", RECYCLE]).arg(&env.socket));
    assert!(
        !out.contains("no-recycle"),
        "the pid was not recycled: {out}"
    );
    let victim = out
        .lines()
        .find_map(|l| l.strip_prefix("victim "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        !victim.contains("agent-hijack"),
        "the victim was moved: {out}"
    );
    let answer = out.lines().find_map(|l| l.strip_prefix("answer ")).unwrap();
    let v: Value = serde_json::from_str(answer).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("gone"), "{v}");
    assert!(env
        .attach_path()
        .read_dir()
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().starts_with("agent-hijack")));
}

/// Removes a directory on drop (the test's, also when it fails).
struct RmDir(std::path::PathBuf);

impl Drop for RmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An `exes` grant is decided on the file the kernel executed (device and inode at connect),
/// compared with the granted path as the daemon sees it. A non-root agent that bind-mounts
/// another file over the granted path in its own user and mount namespace runs that file under
/// the granted name: /proc/PID/exe names the granted path, the kernel's record does not.
#[test]
fn an_exes_grant_holds_only_for_the_granted_file() {
    let mut env = Env::configured("", "", "");
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &[
            "--host",
            "127.0.0.3",
            "--port",
            "0",
            "--json-response",
            "--stateless",
        ],
    );
    let curl = std::fs::canonicalize("/usr/bin/curl").unwrap();
    let curl = curl.to_str().unwrap();
    env.write_policy(
        "exes.json",
        &json!({
            "version": "1",
            "server": { "name": "exes", "match": [format!("127.0.0.3:{}", server.port)] },
            "default": "deny",
            "tools": { "echo": {} },
            "grants": [ { "exes": [curl], "tools": { "delete_file": {} } } ]
        })
        .to_string(),
    );
    env.start_daemon();
    let url = format!("http://127.0.0.3:{}/mcp", server.port);
    let call = |path: &str| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "delete_file", "arguments": {"path": path}}})
        .to_string()
    };
    let curl_args = |bin: &str, path: &str| -> Vec<String> {
        [
            bin,
            "-s",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json, text/event-stream",
            "-d",
            &call(path),
            &url,
        ]
        .map(String::from)
        .to_vec()
    };
    // The granted file, run by a non-root agent: the grant applies.
    let args = curl_args(curl, "/granted");
    let mut cmd = env.exec(
        "exe-bot",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    as_user(&mut cmd, OUTSIDER, OUTSIDER);
    let out = run_ok(&mut cmd);
    assert!(
        out.contains("deleted /granted"),
        "{out}\n{}",
        env.daemon_log()
    );
    // A copy of it (another file) mounted over the granted path in the agent's namespaces.
    let scratch = RmDir(std::path::PathBuf::from(format!(
        "/tmp/guard-exes-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&scratch.0).unwrap();
    std::fs::set_permissions(
        &scratch.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let copy = scratch.0.join("curl");
    let quoted: Vec<String> = curl_args(curl, "/borrowed")
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let script = format!(
        "cp {curl} {copy} && mount --bind {copy} {curl} && exec {}",
        quoted.join(" "),
        copy = copy.display()
    );
    let mut cmd = env.exec(
        "exe-bot",
        &["unshare", "-U", "-m", "-r", "sh", "-c", &script],
    );
    as_user(&mut cmd, OUTSIDER, OUTSIDER);
    let out = run_ok(&mut cmd);
    assert!(out.contains("-32001"), "{out}");
    assert_eq!(
        server.tools_called(),
        ["delete_file"],
        "the borrowed name ran a call only the granted file may make"
    );
}
