//! The foundation, end to end: real daemon, real eBPF attached at a cgroup each test creates, real
//! clients (curl, python) and servers on loopback addresses.

use std::{
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use guard_testkit::{process::*, read_audit, root::*, servers::*};

/// curl of `url` (10 s at most) started inside cgroup `cg`.
fn curl_in(cg: &Path, url: &str) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", url]);
    in_cgroup(&mut cmd, cg);
    cmd
}

/// An environment guarding the cgroup `guard.slice/static` (returned), with the daemon running.
fn static_cgroup_env() -> (Env, std::path::PathBuf) {
    let mut env = Env::new(r#"guarded_cgroups = ["{root}/guard.slice/static"]"#);
    let static_cg = env.cgroup("guard.slice/static");
    guard::kernel::cgroup::create(&static_cg).unwrap();
    env.start_daemon();
    (env, static_cg)
}

fn curl(url: &str) -> Vec<String> {
    ["curl", "-sS", "--max-time", "10", url]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn connections_to(env: &Env, dst: &str) -> Vec<serde_json::Value> {
    env.audit_connections()
        .into_iter()
        .filter(|r| r["original_dst"] == dst)
        .collect()
}

#[test]
fn guarded_curl_reaches_the_server_through_the_proxy() {
    let mut env = Env::new("");
    env.start_daemon();
    let server = HttpServer::start("127.0.0.2:0");
    server.watch(env.daemon_pid());
    let before = env.status();

    let out = run_ok(&mut env.exec("curl-test", &strs(&curl(&server.url()))));
    assert_eq!(out, "hello from the test server\n");

    // The server was reached once, by the daemon's upstream socket.
    assert_eq!(server.hits(), 1);
    assert_eq!(
        server.via_watched(),
        1,
        "the server's peer was not the proxy"
    );
    // The audit trail names the agent, its identity and where it was going.
    let records = connections_to(&env, &server.addr.to_string());
    assert_eq!(records.len(), 1, "audit: {:#?}", env.audit());
    let r = &records[0];
    assert_eq!(r["decision"], "pass");
    assert_eq!(r["agent"]["name"], "curl-test");
    assert_eq!(r["agent"]["comm"], "curl");
    assert_eq!(r["agent"]["uid"], 0);
    assert!(r["agent"]["cgroup"]
        .as_str()
        .unwrap()
        .contains("/agent-curl-test-"));
    assert!(r["agent"]["exe"].as_str().unwrap().ends_with("curl"));
    // Counters moved.
    let after = env.status();
    let c = |s: &serde_json::Value, k: &str| s["counters"][k].as_u64().unwrap();
    assert_eq!(c(&after, "redirected") - c(&before, "redirected"), 1);
    assert_eq!(
        c(&after, "passed_through") - c(&before, "passed_through"),
        1
    );
    assert_eq!(c(&after, "origin_missing"), 0);
    // The agent cgroup is removed once empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.status()["agents"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "agent cgroup was not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = std::fs::read_dir(env.attach_path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

const PEER_AND_FETCH: &str = r#"
import socket, sys
family, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
s.connect((host, port))
print(s.getpeername()[0], s.getpeername()[1])
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
"#;

fn peer_and_fetch(env: &Env, family: &str, host: &str, port: u16) -> String {
    let port = port.to_string();
    run_ok(&mut env.exec("py", &[PYTHON, "-c", PEER_AND_FETCH, family, host, &port]))
}

#[test]
fn ipv6_and_ipv4_mapped_connects_are_redirected_and_getpeername_shows_the_original() {
    let mut env = Env::new("");
    env.start_daemon();
    let v4 = HttpServer::start("127.0.0.2:0");
    let v6 = HttpServer::start("[::1]:0");
    v4.watch(env.daemon_pid());
    v6.watch(env.daemon_pid());

    // IPv4 from an AF_INET socket.
    let out = peer_and_fetch(&env, "4", "127.0.0.2", v4.addr.port());
    assert_eq!(
        out,
        format!("127.0.0.2 {}\nhello from the test server\n", v4.addr.port())
    );
    // IPv6.
    let out = peer_and_fetch(&env, "6", "::1", v6.addr.port());
    assert_eq!(
        out,
        format!("::1 {}\nhello from the test server\n", v6.addr.port())
    );
    // IPv4-mapped from an AF_INET6 socket (goes through connect6).
    let out = peer_and_fetch(&env, "6", "::ffff:127.0.0.2", v4.addr.port());
    assert_eq!(
        out,
        format!(
            "::ffff:127.0.0.2 {}\nhello from the test server\n",
            v4.addr.port()
        )
    );

    assert_eq!((v4.hits(), v4.via_watched()), (2, 2));
    assert_eq!((v6.hits(), v6.via_watched()), (1, 1));
    assert_eq!(connections_to(&env, &v4.addr.to_string()).len(), 2);
    assert_eq!(connections_to(&env, &v6.addr.to_string()).len(), 1);
    assert_eq!(env.counter("origin_missing"), 0);
}

#[test]
fn a_sibling_unguarded_cgroup_is_not_redirected() {
    let mut env = Env::new("");
    env.start_daemon();
    let server = HttpServer::start("127.0.0.2:0");
    server.watch(env.daemon_pid());
    // Below the attach point (the programs run for it) but not guarded.
    let sibling = env.cgroup("guard.slice/unguarded");
    guard::kernel::cgroup::create(&sibling).unwrap();
    let mut cmd = curl_in(&sibling, &server.url());
    assert_eq!(run_ok(&mut cmd), "hello from the test server\n");
    assert_eq!(server.hits(), 1);
    assert_eq!(
        server.via_watched(),
        0,
        "an unguarded process went through the proxy"
    );
    assert_eq!(env.counter("redirected"), 0);
    assert!(env.audit_connections().is_empty());

    // Control: the same command through guard exec is redirected.
    run_ok(&mut env.exec("control", &strs(&curl(&server.url()))));
    assert_eq!(server.via_watched(), 1);
}

#[test]
fn children_and_grandchildren_are_redirected() {
    let mut env = Env::new("");
    env.start_daemon();
    let server = HttpServer::start("127.0.0.2:0");
    server.watch(env.daemon_pid());
    let url = server.url();
    let script = format!(
        "curl -sS --max-time 10 {url} && sh -c 'curl -sS --max-time 10 {url} && (setsid sh -c \"curl -sS --max-time 10 {url}\")'"
    );
    let out = run_ok(&mut env.exec("family", &["sh", "-c", &script]));
    assert_eq!(
        out.matches("hello from the test server").count(),
        3,
        "{out}"
    );
    assert_eq!(server.hits(), 3);
    assert_eq!(server.via_watched(), 3);
    let records = connections_to(&env, &server.addr.to_string());
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r["agent"]["name"] == "family"));
}

#[test]
fn a_guarded_uid_is_redirected_wherever_it_runs_below_the_attach_point() {
    let mut env = Env::new(&format!("guarded_uids = [{NOBODY}]"));
    env.start_daemon();
    let server = HttpServer::start("127.0.0.2:0");
    server.watch(env.daemon_pid());
    let elsewhere = env.cgroup("guard.slice/some/where");
    guard::kernel::cgroup::create(&elsewhere).unwrap();

    // As the guarded uid: redirected.
    let mut cmd = curl_in(&elsewhere, &server.url());
    as_user(&mut cmd, NOBODY, NOBODY);
    assert_eq!(run_ok(&mut cmd), "hello from the test server\n");
    assert_eq!(server.via_watched(), 1);
    let r = &connections_to(&env, &server.addr.to_string())[0];
    assert_eq!(r["agent"]["uid"], NOBODY);

    // Root in the same cgroup: not guarded.
    let mut cmd = curl_in(&elsewhere, &server.url());
    assert_eq!(run_ok(&mut cmd), "hello from the test server\n");
    assert_eq!((server.hits(), server.via_watched()), (2, 1));
    assert_eq!(env.status()["guarded_uids"], serde_json::json!([NOBODY]));
    // A guarded uid cannot start an agent under a name of its choosing (and its grants).
    let mut cmd = env.exec("research-bot", &["true"]);
    cmd.current_dir("/");
    as_user(&mut cmd, NOBODY, NOBODY);
    let out = run(&mut cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("guarded process cannot start an agent"));
}

/// Python: `attempt(label, fn)` prints `label ok` or `label errno N`.
const PY_ATTEMPT: &str = r#"
import socket, sys
def attempt(label, fn):
    try:
        fn()
        print(label, "ok")
    except OSError as e:
        print(label, "errno", e.errno)
"#;

const UDP_PROBE: &str = r#"
dns_port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("sendto-443", lambda: u.sendto(b"quic", ("127.0.0.2", 443)))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt("sendto6-443", lambda: u6.sendto(b"quic", ("::1", 443)))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("connect-443", lambda: c.connect(("127.0.0.2", 443)))
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.settimeout(5)
attempt("dns-sendto", lambda: d.sendto(b"query", ("127.0.0.2", dns_port)))
attempt("dns-reply", lambda: d.recvfrom(100))
e = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
e.settimeout(5)
attempt("dns-connect", lambda: (e.connect(("127.0.0.2", dns_port)), e.send(b"q"), e.recv(100)))
"#;

#[test]
fn guarded_udp_is_dns_only() {
    let mut env = Env::new("");
    env.start_daemon();
    let dns = UdpCounter::start("127.0.0.2:53");
    let probe = format!("{PY_ATTEMPT}{UDP_PROBE}");
    let out = run_ok(&mut env.exec("udp", &[PYTHON, "-c", &probe, "53"]));
    assert_eq!(
        out,
        "sendto-443 errno 1\nsendto6-443 errno 1\nconnect-443 errno 1\ndns-sendto ok\ndns-reply ok\ndns-connect ok\n"
    );
    assert_eq!(dns.count.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(env.kernel_counter("refused_udp"), 3);
}

#[test]
fn guarded_dns_goes_only_to_the_listed_servers() {
    let mut env = Env::new(r#"dns_servers = ["127.0.0.12", "::1"]"#);
    env.start_daemon();
    let listed = UdpCounter::start("127.0.0.12:53");
    let other = UdpCounter::start("127.0.0.13:53");
    let probe = PY_ATTEMPT.to_string()
        + r#"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("listed", lambda: u.sendto(b"q", ("127.0.0.12", 53)))
attempt("other", lambda: u.sendto(b"q", ("127.0.0.13", 53)))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("other-connect", lambda: c.connect(("127.0.0.13", 53)))
m = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt("other-mapped", lambda: m.sendto(b"q", ("::ffff:127.0.0.13", 53)))
attempt("listed-mapped", lambda: m.sendto(b"q", ("::ffff:127.0.0.12", 53)))
"#;
    let out = run_ok(&mut env.exec("dns", &[PYTHON, "-c", &probe]));
    assert_eq!(
        out,
        "listed ok\nother errno 1\nother-connect errno 1\nother-mapped errno 1\nlisted-mapped ok\n"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while listed.count.load(std::sync::atomic::Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(listed.count.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(other.count.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(env.kernel_counter("refused_udp"), 3);
}

#[test]
fn a_guarded_process_in_a_new_network_namespace_gets_eperm() {
    let mut env = Env::new("");
    env.start_daemon();
    let probe = r#"
import socket, errno
s = socket.socket()
try:
    s.connect(("127.0.0.2", 80))
    print("connected")
except OSError as e:
    print(errno.errorcode[e.errno])
"#;
    // Unguarded in a fresh netns: the kernel's own answer (loopback is down there).
    let plain = run_ok(Command::new("unshare").args(["-n", PYTHON, "-c", probe]));
    assert_ne!(plain.trim(), "EPERM");
    let out = run_ok(&mut env.exec("netns", &["unshare", "-n", PYTHON, "-c", probe]));
    assert_eq!(out.trim(), "EPERM");
    assert_eq!(env.kernel_counter("refused_netns"), 1);
}

#[test]
fn sigkill_fails_closed_and_a_restart_reuses_the_pinned_programs() {
    let (mut env, static_cg) = static_cgroup_env();
    let server = HttpServer::start("127.0.0.2:0");
    let attached = env.attached();
    let count: usize = attached.values().map(Vec::len).sum();
    let lsm = attached["lsm_cgroup"].len();
    assert_eq!(count, guard::kernel::PROGRAMS.len() + lsm, "{attached:?}");

    let probe = format!(
        r#"
import socket, errno
try:
    s = socket.create_connection(("127.0.0.2", {}), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    print("ok" if b"hello" in data else "no answer")
except OSError as e:
    print(errno.errorcode[e.errno])
"#,
        server.addr.port()
    );
    let probe_in_static = || {
        let mut cmd = Command::new(PYTHON);
        cmd.args(["-c", &probe]);
        in_cgroup(&mut cmd, &static_cg);
        run_ok(&mut cmd).trim().to_string()
    };
    server.watch(env.daemon_pid());
    assert_eq!(probe_in_static(), "ok");
    assert_eq!((server.hits(), server.via_watched()), (1, 1));

    env.kill_daemon();
    // The pinned programs keep redirecting to a proxy that is not there: refused, never direct.
    assert_eq!(probe_in_static(), "ECONNREFUSED");
    assert_eq!(
        server.hits(),
        1,
        "a guarded connect reached the server directly"
    );
    assert_eq!(env.attached(), attached);

    env.start_daemon();
    server.watch(env.daemon_pid());
    assert_eq!(probe_in_static(), "ok");
    assert_eq!((server.hits(), server.via_watched()), (2, 2));
    // Same programs, same count: the restart reused the pinned links.
    assert_eq!(env.attached(), attached);
    assert!(
        env.daemon_log().contains("reused=11"),
        "{}",
        env.daemon_log()
    );
}

#[test]
fn two_thousand_connections_from_sixteen_concurrent_clients() {
    let mut env = Env::new("");
    env.start_daemon();
    let server = HttpServer::start("127.0.0.2:0");
    let load = format!(
        r#"
import socket, threading
ok = []
def worker():
    n = 0
    for _ in range(125):
        s = socket.create_connection(("127.0.0.2", {}), timeout=20)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        s.close()
        if b"hello" in data:
            n += 1
    ok.append(n)
threads = [threading.Thread(target=worker) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(ok))
"#,
        server.addr.port()
    );
    let out = run(
        &mut env.exec("load", &[PYTHON, "-c", &load]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2000");
    assert_eq!(server.hits(), 2000);
    let s = env.status();
    assert_eq!(s["counters"]["origin_missing"], 0);
    assert_eq!(s["counters"]["redirected"], 2000);
    assert_eq!(s["counters"]["passed_through"], 2000);
    // Every connection is accounted for: a record each up to the agent's share, the rest
    // counted in `connection_summary` records (written within a second or two).
    let dst = server.addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (written, dropped) = loop {
        let records = read_audit(&env.connections_log());
        let written = records
            .iter()
            .filter(|r| r["event"] == "connection" && r["original_dst"] == dst)
            .count() as u64;
        let dropped: u64 = records
            .iter()
            .filter(|r| r["event"] == "connection_summary" && r["agent"]["name"] == "load")
            .map(|r| r["detail"]["dropped"].as_u64().unwrap())
            .sum();
        if written + dropped >= 2000 || Instant::now() > deadline {
            break (written, dropped);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        written + dropped,
        2000,
        "{written} written, {dropped} dropped"
    );
    assert!(written >= 200, "the burst is written: {written}");
    assert_eq!(
        env.metric("guard_audit_connection_records_dropped_total "),
        dropped
    );
}

#[test]
fn a_guarded_process_cannot_bind_the_proxy_port_nor_leave_its_cgroup() {
    let mut env = Env::new("");
    env.start_daemon();
    let bind = format!(
        r#"
import socket, errno
for port in ({port}, 0):
    s = socket.socket()
    try:
        s.bind(("127.0.0.3", port))
        print("bound")
    except OSError as e:
        print(errno.errorcode[e.errno])
"#,
        port = env.port
    );
    let out = run_ok(&mut env.exec("binder", &[PYTHON, "-c", &bind]));
    assert_eq!(out, "EPERM\nbound\n");
    assert_eq!(env.kernel_counter("refused_bind"), 1);

    // A non-root agent: guard exec works for it, it is redirected, and it cannot move out.
    let server = HttpServer::start("127.0.0.2:0");
    server.watch(env.daemon_pid());
    let escape = format!(
        "echo $$ > {root}/cgroup.procs; echo $$ > {mount}/cgroup.procs; echo $$ > {attach}/cgroup.procs; cat /proc/self/cgroup | grep '^0::'; curl -sS --max-time 10 {url}",
        root = env.root.display(),
        mount = env.cg_mount.display(),
        attach = env.attach_path().display(),
        url = server.url(),
    );
    let mut cmd = env.exec("unprivileged", &["sh", "-c", &escape]);
    cmd.uid(NOBODY).gid(NOBODY).current_dir("/");
    let out = run(&mut cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stderr.matches("Permission denied").count(), 3, "{stderr}");
    assert!(
        stdout.starts_with(&format!("0::/{}/agent-unprivileged-", env.attach_rel)),
        "{stdout}"
    );
    assert!(stdout.ends_with("hello from the test server\n"), "{stdout}");
    assert_eq!(server.via_watched(), 1);
    let r = &connections_to(&env, &server.addr.to_string())[0];
    assert_eq!(r["agent"]["uid"], NOBODY);
    assert_eq!(r["agent"]["name"], "unprivileged");
}

#[test]
fn a_connection_with_no_recorded_origin_is_closed() {
    let mut env = Env::new("");
    env.start_daemon();
    // The test process is not guarded: its connection to the proxy has no origin.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", env.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n");
    let mut buf = [0u8; 64];
    let r = std::io::Read::read(&mut s, &mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "the proxy answered: {r:?}");
    assert_eq!(env.counter("origin_missing"), 1);
    let denied: Vec<_> = env
        .audit_connections()
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .collect();
    assert_eq!(denied.len(), 1);
    // A guarded process may not talk to the proxy port directly either.
    let direct = format!(
        "import socket, errno\ntry:\n socket.create_connection(('127.0.0.1', {}))\n print('connected')\nexcept OSError as e:\n print(errno.errorcode[e.errno])",
        env.port
    );
    assert_eq!(
        run_ok(&mut env.exec("direct", &[PYTHON, "-c", &direct])),
        "EPERM\n"
    );
}

#[test]
fn guard_exec_returns_the_commands_exit_status() {
    let mut env = Env::new("");
    env.start_daemon();
    let out = run(
        &mut env.exec("exit", &["sh", "-c", "exit 7"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(7));
    let out = run(
        &mut env.exec("missing", &["/nonexistent/cmd"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(127));
    // A guarded agent cannot re-enrol under another name (and take its grants).
    let out = run(
        &mut env.exec(
            "first",
            &[
                env.bin.to_str().unwrap(),
                "--config",
                env.config_path.to_str().unwrap(),
                "exec",
                "--agent",
                "second",
                "--",
                "true",
            ],
        ),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already guarded as agent `first`"));
}

#[test]
fn guard_exec_without_a_daemon_refuses_to_run_the_command() {
    let env = Env::new("");
    let marker = env.dir.join("ran");
    let out = run(
        &mut env.exec("x", &["touch", marker.to_str().unwrap()]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the guard daemon"));
    assert!(!marker.exists(), "the command ran unguarded");
}

#[test]
fn disable_is_root_only_audited_and_detaches_everything() {
    let mut env = Env::new("");
    env.start_daemon();
    let mut cmd = env.guard();
    cmd.arg("disable").uid(NOBODY).gid(NOBODY).current_dir("/");
    let out = run(&mut cmd, Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only root"));
    // The redirect's eleven, and containment's where it is on.
    let lsm = if env.status()["containment"]["state"] == "on" {
        guard::kernel::contain::LSM_PROGRAMS.len()
    } else {
        0
    };
    assert_eq!(
        env.attached().values().map(Vec::len).sum::<usize>(),
        guard::kernel::PROGRAMS.len() + lsm
    );
    assert_eq!(guard::kernel::PROGRAMS.len(), 11);

    run_ok(env.guard().arg("disable"));
    assert_eq!(env.attached().values().map(Vec::len).sum::<usize>(), 0);
    assert!(!env.pin_dir.exists());
    let events: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "disable")
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["decision"], "deny");
    assert_eq!(events[0]["actor_uid"], NOBODY);
    assert_eq!(events[1]["decision"], "fail_open");
    assert_eq!(env.status()["enforcing"], false);
    // Now nothing is redirected.
    let server = HttpServer::start("127.0.0.2:0");
    let sibling = env.cgroup("guard.slice/x");
    guard::kernel::cgroup::create(&sibling).unwrap();
    let out = run(
        &mut env.exec("after", &strs(&curl(&server.url()))),
        Duration::from_secs(20),
    );
    assert_eq!(
        out.status.code(),
        Some(125),
        "guard exec must refuse while disabled"
    );
}

/// A server on 127.0.0.2 that serves its first connection with `serve` (on a thread of its own).
fn one_connection_server(
    serve: impl FnOnce(std::net::TcpStream) + Send + 'static,
) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            serve(s);
        }
    });
    addr
}

#[test]
fn passthrough_carries_bulk_bytes_and_half_closes_intact() {
    use std::io::{Read, Write};
    let mut env = Env::new("");
    env.start_daemon();
    // An echo server that speaks no HTTP: guard splices it through.
    let addr = one_connection_server(|mut s| {
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let probe = format!(
        r#"
import hashlib, os, socket, threading
data = b"\x00binary\xff" + os.urandom(32 * 1024 * 1024)
s = socket.create_connection(("127.0.0.2", {port}))
got = []
def reader():
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        got.append(b)
t = threading.Thread(target=reader)
t.start()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
t.join()
back = b"".join(got)
print(len(back), hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest())
"#,
        port = addr.port()
    );
    let out = run_ok(&mut env.exec("bulk", &[PYTHON, "-c", &probe]));
    assert_eq!(out.trim(), format!("{} True", 32 * 1024 * 1024 + 8));
    let c = env.audit_connections();
    let r = c
        .iter()
        .find(|r| r["original_dst"] == addr.to_string())
        .unwrap();
    assert_eq!(r["transport"], "tcp");
    assert_eq!(r["rule"], "passthrough");
}

#[test]
fn a_server_that_speaks_first_is_reached_without_the_client_sending_anything() {
    use std::io::{Read, Write};
    let mut env = Env::new("");
    env.start_daemon();
    // SSH and SMTP servers greet first; their clients wait for the greeting.
    let addr = one_connection_server(|mut s| {
        let _ = s.write_all(b"SSH-2.0-guard-test\r\n");
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf) {
            let _ = s.write_all(&buf[..n]);
        }
    });
    let probe = format!(
        r#"
import socket
s = socket.create_connection(("127.0.0.2", {port}), timeout=10)
greeting = s.recv(64)
s.sendall(b"after the greeting")
print(greeting.decode().strip(), s.recv(64).decode())
"#,
        port = addr.port()
    );
    let out = run_ok(&mut env.exec("ssh-like", &[PYTHON, "-c", &probe]));
    assert_eq!(out.trim(), "SSH-2.0-guard-test after the greeting");
    let r = env
        .audit_connections()
        .into_iter()
        .find(|r| r["original_dst"] == addr.to_string())
        .unwrap();
    assert_eq!(r["transport"], "tcp");
    assert_eq!(r["rule"], "passthrough");
}

/// Loads a cgroup/connect4 program that lets every connect through unchanged, as a build of guard
/// that did not redirect would have (BPF_PROG_LOAD by hand: two instructions).
fn load_allow_all_connect4() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // r0 = 1; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0x00, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut attr = ProgLoad {
        prog_type: 18, // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"old_connect4\0\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: 10, // BPF_CGROUP_INET4_CONNECT
    };
    // SAFETY: ProgLoad is BPF_PROG_LOAD's bpf_attr; insns and license outlive the call.
    let fd = unsafe { guard::kernel::sys::sys_bpf(5, &mut attr) }
        .unwrap_or_else(|e| panic!("BPF_PROG_LOAD: {e}"));
    // SAFETY: a descriptor the kernel just gave us.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// BPF_LINK_CREATE (`prog` at `cgroup` for `attach_type`) and BPF_OBJ_PIN of the link at `pin`.
fn link_and_pin(prog: &std::os::fd::OwnedFd, cgroup: &Path, attach_type: u32, pin: &Path) {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    let cg = std::fs::File::open(cgroup).unwrap();
    // BPF_LINK_CREATE's bpf_attr: prog_fd, target_fd, attach_type, flags.
    let mut create: [u32; 4] = [
        prog.as_raw_fd() as u32,
        cg.as_raw_fd() as u32,
        attach_type,
        0,
    ];
    // SAFETY: BPF_LINK_CREATE's bpf_attr.
    let link = unsafe { guard::kernel::sys::sys_bpf(28, &mut create) }
        .unwrap_or_else(|e| panic!("BPF_LINK_CREATE: {e}"));
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    let mut attr = guard::kernel::sys::ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: link as u32,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_PIN's bpf_attr, pointing at a NUL-terminated path.
    unsafe { guard::kernel::sys::sys_bpf(6, &mut attr) }
        .unwrap_or_else(|e| panic!("BPF_OBJ_PIN: {e}"));
    // SAFETY: our descriptor; the pin keeps the link.
    unsafe { libc::close(link as i32) };
}

#[test]
fn a_restart_switches_pinned_links_running_another_build_to_this_one() {
    use std::os::fd::AsFd;
    let (mut env, static_cg) = static_cgroup_env();
    let server = HttpServer::start("127.0.0.2:0");
    let get = |cg: &Path| run_ok(&mut curl_in(cg, &server.url())).trim().to_string();
    server.watch(env.daemon_pid());
    assert_eq!(get(&static_cg), "hello from the test server");
    assert_eq!((server.hits(), server.via_watched()), (1, 1));
    let ours = env.attached();

    // What an earlier build left pinned: its connect4 lets connects through unredirected.
    let old = load_allow_all_connect4();
    guard::kernel::sys::link_update(&env.pin_dir.join("links/guard_connect4"), old.as_fd())
        .unwrap();
    let swapped = env.attached();
    // ... and one more program, which this build does not have.
    let stale = env.pin_dir.join("links/guard_retired");
    link_and_pin(&old, &env.attach_path(), 10, &stale);
    assert_eq!(env.attached()["connect4"].len(), 2);
    assert_ne!(swapped["connect4"], ours["connect4"]);
    assert_eq!(get(&static_cg), "hello from the test server");
    assert_eq!(
        (server.hits(), server.via_watched()),
        (2, 1),
        "the stand-in old program should let the connect through directly"
    );

    env.stop_daemon();
    env.start_daemon();
    server.watch(env.daemon_pid());
    // The restart put this build's program on the same link, and kept the other nine.
    assert!(
        env.daemon_log()
            .contains("newly_attached=0 reused=10 updated=1 removed=1"),
        "{}",
        env.daemon_log()
    );
    assert!(!stale.exists());
    let now = env.attached();
    assert_ne!(now["connect4"], swapped["connect4"]);
    assert_eq!(now["connect4"].len(), 1);
    for (k, ids) in &ours {
        if k != "connect4" {
            assert_eq!(&now[k], ids, "{k}");
        }
    }
    assert_eq!(get(&static_cg), "hello from the test server");
    assert_eq!((server.hits(), server.via_watched()), (3, 2));
}

#[test]
fn a_pinned_link_no_longer_attached_is_replaced_at_start() {
    use std::os::{fd::AsRawFd, fd::FromRawFd, unix::ffi::OsStrExt};
    let (mut env, static_cg) = static_cgroup_env();
    env.stop_daemon();
    // A link that is pinned but detached (as when its cgroup is removed, or by BPF_LINK_DETACH):
    // it still names its program, and guards nothing.
    let pin = env.pin_dir.join("links/guard_connect4");
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    let mut get = guard::kernel::sys::ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET's bpf_attr, pointing at a NUL-terminated path.
    let fd = unsafe { guard::kernel::sys::sys_bpf(7, &mut get) }.unwrap();
    // SAFETY: a descriptor the kernel just gave us.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut detach: [u32; 4] = [link.as_raw_fd() as u32, 0, 0, 0];
    // SAFETY: BPF_LINK_DETACH's bpf_attr (link_fd).
    unsafe { guard::kernel::sys::sys_bpf(34, &mut detach) }.unwrap();
    assert!(pin.exists());
    assert!(env.attached()["connect4"].is_empty());

    env.start_daemon();
    assert!(
        env.daemon_log()
            .contains("newly_attached=1 reused=10 updated=0"),
        "{}",
        env.daemon_log()
    );
    assert_eq!(env.attached()["connect4"].len(), 1);
    let server = HttpServer::start("127.0.0.2:0");
    server.watch(env.daemon_pid());
    assert_eq!(
        run_ok(&mut curl_in(&static_cg, &server.url())).trim(),
        "hello from the test server"
    );
    assert_eq!((server.hits(), server.via_watched()), (1, 1));
}
