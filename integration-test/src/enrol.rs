//! What the enrolment tests share (`tests/enrol.rs`, `tests/enrol_attack.rs`): a server that
//! counts the connections whose bytes reached it, a plain shell in the attach subtree, and
//! readings of the audit trail.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use guard_testkit::{process::*, root::Env, AuditLog as _};
use serde_json::Value;

/// A TCP server on 127.0.0.3 that counts the connections whose bytes reached it. (Under
/// `proxy.other = "deny"` guard may open its upstream connection while it waits for a
/// redirected client's first bytes, but never passes them on: a connection that delivers the
/// program's bytes came past guard.)
pub struct Counter {
    pub port: u16,
    seen: Arc<AtomicUsize>,
}

impl Counter {
    pub fn start() -> Counter {
        let l = TcpListener::bind("127.0.0.3:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut c = c;
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut b = [0u8; 1];
                    if matches!(std::io::Read::read(&mut c, &mut b), Ok(1)) {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Counter { port, seen }
    }

    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

/// What the C test programs share: `connect_send(host, port)` connects, sends bytes no
/// protocol guard reads starts with (classified at once), waits for the peer, closes; the
/// connect's result. `waited(pid)`: the child's exit status. A program puts its own
/// `#define`s before it.
pub const CONNECT_C: &str = r#"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int connect_send(const char *host, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, host, &a.sin_addr);
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    if (r == 0) {
        char b;
        if (write(s, "\0\1\2\3", 4) == 4)
            (void)read(s, &b, 1);
    }
    close(s);
    return r;
}

static int waited(pid_t p) {
    int st = 0;
    waitpid(p, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
"#;

/// An environment whose daemon refuses what it cannot read, with the C program `source` built
/// at `dir/agent-prog` (gcc, with threads) and an identical copy at `dir/COPY` (another file:
/// not an agent), and `agents` (`{dir}`: the test's directory) appended.
pub fn setup(scope: &str, source: &str, copy: &str, agents: &str) -> (Env, PathBuf, PathBuf) {
    let mut env = Env::configured(scope, "other = \"deny\"", "");
    let src = env.dir.join("prog.c");
    std::fs::write(&src, source).unwrap();
    let prog = env.dir.join("agent-prog");
    run_ok(
        Command::new("gcc")
            .args(["-O2", "-pthread", "-o"])
            .arg(&prog)
            .arg(&src),
    );
    let copied = env.dir.join(copy);
    std::fs::copy(&prog, &copied).unwrap();
    let agents = agents.replace("{dir}", &env.dir.display().to_string());
    env.append_config(&format!(
        "[audit]\nconnection_records_per_s = 100000\n\n{agents}"
    ));
    guard::kernel::cgroup::create(&env.attach_path().join("shell")).unwrap();
    (env, prog, copied)
}

/// `sh -c SCRIPT` in the unguarded `shell` cgroup below the attach cgroup: a person's terminal.
pub fn shell(env: &Env, script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).current_dir(&env.dir);
    in_cgroup(&mut c, &env.attach_path().join("shell"));
    c
}

pub fn agent_starts(env: &Env, name: &str) -> Vec<Value> {
    env.audit_decisions()
        .into_iter()
        .filter(|r| r["event"] == "agent_start" && r["agent"]["name"] == name)
        .collect()
}

pub fn connections_of(env: &Env, name: &str) -> usize {
    env.audit_connections()
        .iter()
        .filter(|r| r["agent"]["name"] == name)
        .count()
}

pub fn eventually(what: &str, wait: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < wait, "{what} within {wait:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The interpreter the Python peers run, as a file (symbolic links resolved).
pub fn python_file() -> PathBuf {
    std::fs::canonicalize(guard_testkit::peers::peer_python()).unwrap()
}

/// A Python script at `dir/name` that connects to 127.0.0.3:`port` and sends bytes.
pub fn connecting_script(dir: &Path, name: &str, port: u16) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "import socket\ns = socket.create_connection(('127.0.0.3', {port}))\ns.sendall(b'\\0\\1\\2\\3')\ntry:\n    s.recv(1)\nexcept OSError:\n    pass\n"
        ),
    )
    .unwrap();
    p
}
