//! `[otel]`: the real daemon exports its decisions to an OTLP receiver built on the official
//! `opentelemetry-proto` package (tests/peers/otlp_receiver.py), over gRPC and over HTTP; a
//! client's `traceparent` (header or `params._meta`) becomes the span's parent; a receiver that
//! is down or stalls changes no decision, and what was not exported is counted.

use std::{
    io::BufRead as _,
    net::TcpListener,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use guard_testkit::{peers::*, process::*, root::*};
use serde_json::{json, Value};

/// The receiver, killed (by pid) on drop.
struct Receiver {
    child: Child,
    grpc: u16,
    http: u16,
    out: std::path::PathBuf,
}

impl Receiver {
    fn start(dir: &std::path::Path) -> Receiver {
        let out = dir.join("otlp.jsonl");
        let mut child = spawn(
            Command::new(peer_python())
                .arg(script("otlp_receiver.py"))
                .arg(&out)
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut w = line.split_whitespace();
        assert_eq!(w.next(), Some("READY"), "the receiver said {line:?}");
        let grpc = w.next().unwrap().parse().unwrap();
        let http = w.next().unwrap().parse().unwrap();
        Receiver {
            child,
            grpc,
            http,
            out,
        }
    }

    fn got(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the first item `pick` accepts.
    fn wait(&self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.got().into_iter().find(|v| pick(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got no {what}: {:#?}",
                self.got()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon exporting to `otel` (an `[otel]` table), a Python server it governs (echo allowed,
/// delete_file denied).
fn setup(otel: &str) -> (Env, Server) {
    let mut env = Env::configured("", "", otel);
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    env.write_policy(
        "files.json",
        &json!({
            "version": "1",
            "server": { "name": "files", "match": [format!("127.0.0.3:{}", server.port)] },
            "default": "deny",
            "tools": {
                "echo": {},
                "delete_file": { "action": "deny", "reason": "no deleting here" }
            }
        })
        .to_string(),
    );
    env.start_daemon();
    (env, server)
}

/// Runs the Python client as agent `otel-bot` with `extra` arguments.
fn client(env: &Env, server: &Server, calls: &[(&str, &str)], extra: &[&str]) -> ClientRun {
    let mut args = client_args(
        &format!("http://127.0.0.3:{}/mcp", server.port),
        "streamable-http",
        false,
        calls,
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_client(&mut env.exec("otel-bot", &args))
}

const T1: &str = "0af7651916cd43dd8448eb211c80319c";
const P1: &str = "b7ad6b7169203331";
const T2: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const P2: &str = "00f067aa0ba902b7";
const T3: &str = "11111111111111111111111111111111";
const P3: &str = "2222222222222222";

fn exports_decisions(protocol: &str) {
    let dir = std::env::temp_dir().join(format!("guard-otel-{protocol}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rx = Receiver::start(&dir);
    let port = if protocol == "grpc" { rx.grpc } else { rx.http };
    let (env, server) = setup(&format!(
        "[otel]\nendpoint = \"http://127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\nresource = {{ \"deployment.environment.name\" = \"test\" }}\n"
    ));
    // The trace context as an HTTP header: the allowed call's span joins it.
    let run = client(
        &env,
        &server,
        &[("echo", r#"{"text":"hi"}"#)],
        &["--header", &format!("traceparent: 00-{T1}-{P1}-01")],
    );
    assert_eq!(run.text(0), "hi");
    // In params._meta (which wins over a header): the denied call's span joins that one.
    let run = client(
        &env,
        &server,
        &[("delete_file", r#"{"path":"/etc/passwd"}"#)],
        &[
            "--header",
            &format!("traceparent: 00-{T3}-{P3}-01"),
            "--meta",
            &json!({ "traceparent": format!("00-{T2}-{P2}-01") }).to_string(),
        ],
    );
    assert!(
        run.error(0)["message"]
            .as_str()
            .is_some_and(|m| m.contains("no deleting here")),
        "{:?}",
        run.calls
    );
    assert_eq!(
        server.tools_called(),
        vec!["echo"],
        "the server ran delete_file"
    );

    let span = |tool: &'static str| {
        rx.wait(&format!("span of {tool}"), move |v| {
            v["signal"] == "span" && v["attributes"]["gen_ai.tool.name"] == tool
        })
    };
    let echo = span("echo");
    let del = span("delete_file");
    for (s, tool, decision) in [(&echo, "echo", "allow"), (&del, "delete_file", "deny")] {
        assert_eq!(s["via"], protocol);
        assert_eq!(s["name"], format!("tools/call {tool}"));
        assert_eq!(s["kind"], 2, "SPAN_KIND_SERVER: {s}");
        let a = &s["attributes"];
        assert_eq!(a["mcp.method.name"], "tools/call");
        assert_eq!(a["gen_ai.operation.name"], "execute_tool");
        assert_eq!(a["guard.decision"], decision);
        assert_eq!(a["guard.server"], "files");
        assert_eq!(a["guard.agent.name"], "otel-bot");
        assert!(
            a["guard.rule"].as_str().is_some_and(|r| !r.is_empty()),
            "{s}"
        );
        assert!(
            a["mcp.session.id"].as_str().is_some_and(|r| !r.is_empty()),
            "{s}"
        );
        assert!(
            a["mcp.protocol.version"]
                .as_str()
                .is_some_and(|r| r.starts_with("20")),
            "{s}"
        );
        assert_eq!(s["resource"]["service.name"], "guard");
        assert_eq!(s["resource"]["deployment.environment.name"], "test");
        let (start, end) = (s["start"].as_u64().unwrap(), s["end"].as_u64().unwrap());
        assert!(start > 0 && end >= start, "{s}");
    }
    assert_eq!(
        (echo["trace_id"].as_str(), echo["parent_span_id"].as_str()),
        (Some(T1), Some(P1))
    );
    assert_eq!(
        (del["trace_id"].as_str(), del["parent_span_id"].as_str()),
        (Some(T2), Some(P2))
    );
    assert_eq!(echo["status"]["code"], 0);
    assert_eq!(del["status"]["code"], 2, "STATUS_CODE_ERROR: {del}");
    assert_eq!(del["attributes"]["error.type"], "deny");

    // One log record per audit record: the line as written (prev included), its fields as
    // attributes, tied to the request's span.
    let lines = std::fs::read_to_string(&env.audit_log).unwrap();
    let line_of = |id: &str| {
        lines
            .lines()
            .find(|l| serde_json::from_str::<Value>(l).unwrap()["id"] == id)
            .unwrap_or_else(|| panic!("no audit line {id}"))
            .to_string()
    };
    for s in [&echo, &del] {
        let id = s["attributes"]["guard.audit.id"]
            .as_str()
            .unwrap()
            .to_string();
        let want = id.clone();
        let log = rx.wait(&format!("log record {id}"), move |v| {
            v["signal"] == "log" && v["attributes"]["id"] == want.as_str()
        });
        assert_eq!(log["body"], line_of(&id));
        let prev = log["attributes"]["prev"].as_str().unwrap();
        assert!(
            prev.len() == 64 && prev.bytes().all(|b| b.is_ascii_hexdigit()),
            "{log}"
        );
        assert_eq!(log["attributes"]["event"], "tool_call");
        assert_eq!(log["attributes"]["agent.name"], "otel-bot");
        assert_eq!(log["trace_id"], s["trace_id"]);
        assert_eq!(log["span_id"], s["span_id"]);
        assert_eq!(log["event_name"], "guard.audit");
    }
    assert_eq!(
        rx.wait("a warning log record", |v| v["signal"] == "log"
            && v["attributes"]["decision"] == "deny")["severity"],
        "WARN"
    );
    // Records that are no request (the daemon's start) are exported too.
    rx.wait("daemon_start", |v| {
        v["signal"] == "log" && v["attributes"]["event"] == "daemon_start"
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.metric("guard_otel_exported_total{signal=\"spans\"}") < 2 {
        assert!(Instant::now() < deadline, "{}", env.metrics());
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.metric("guard_otel_dropped_total{signal=\"logs\"}"), 0);
    assert_eq!(env.metric("guard_otel_dropped_total{signal=\"spans\"}"), 0);
    let st = env.status();
    assert_eq!(st["otel"]["protocol"], protocol);
    assert!(st["otel"]["last_error"].is_null(), "{st}");
    drop(rx);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn decisions_are_exported_over_otlp_grpc() {
    exports_decisions("grpc");
}

#[test]
fn decisions_are_exported_over_otlp_http() {
    exports_decisions("http");
}

/// A collector that accepts connections and never answers.
struct Stalled(
    Option<thread::JoinHandle<()>>,
    u16,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

impl Stalled {
    fn start() -> Stalled {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let t = thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((c, _)) = l.accept() {
                    held.push(c);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Stalled(Some(t), port, stop)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.2.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_collector_down_or_stalled_changes_no_decision_and_drops_are_counted() {
    // Down: nothing listens; every export fails at once.
    let closed = free_port();
    let (env, server) = setup(&format!(
        "[otel]\nendpoint = \"http://127.0.0.1:{closed}\"\n"
    ));
    let run = client(
        &env,
        &server,
        &[
            ("echo", r#"{"text":"a"}"#),
            ("delete_file", r#"{"path":"/x"}"#),
        ],
        &[],
    );
    assert_eq!(run.text(0), "a");
    assert!(!run.error(1).is_null(), "{:?}", run.calls);
    assert_eq!(server.tools_called(), vec!["echo"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.metric("guard_otel_dropped_total{signal=\"spans\"}") < 2 {
        assert!(
            Instant::now() < deadline,
            "no drops counted:\n{}",
            env.metrics()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(env.metric("guard_otel_dropped_total{signal=\"logs\"}") >= 2);
    assert_eq!(env.metric("guard_otel_exported_total{signal=\"logs\"}"), 0);
    let st = env.status();
    assert!(
        st["otel"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    // Every decision is in the audit log all the same.
    let calls: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "tool_call")
        .collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    drop(env);

    // Stalled: the export waits out its time limit while the queue (2 records) overflows;
    // calls are answered meanwhile, and the overflow is counted.
    let stalled = Stalled::start();
    let (env, server) = setup(&format!(
        "[otel]\nendpoint = \"http://127.0.0.1:{}\"\nqueue = 2\ntimeout_s = 60\n",
        stalled.1
    ));
    let calls: Vec<(&str, &str)> = (0..6).map(|_| ("echo", r#"{"text":"b"}"#)).collect();
    let began = Instant::now();
    let run = client(&env, &server, &calls, &[]);
    // Not a performance check: an export that held decisions would hold each call for the
    // collector's 60 s time limit.
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "calls waited for the collector: {:?}",
        began.elapsed()
    );
    for i in 0..6 {
        assert_eq!(run.text(i), "b");
    }
    assert_eq!(server.tools_called().len(), 6);
    assert!(
        env.metric("guard_otel_dropped_total{signal=\"logs\"}") >= 3,
        "{}",
        env.metrics()
    );
    assert_eq!(env.metric("guard_otel_exported_total{signal=\"logs\"}"), 0);
    drop(env);
    drop(stalled);
}
