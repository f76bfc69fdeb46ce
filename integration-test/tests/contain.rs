//! Containment, end to end: the daemon's per-cgroup BPF LSM programs against non-root guarded
//! agents and real unguarded processes of the same uid beside them (outside the attach cgroup).
//! Each refusal is checked against the same attempt made by an unguarded process, which works.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use guard_testkit::{process::*, root::*, servers::*};

/// Python: `attempt(label, fn)` prints `label ok` or `label errno N`.
const PY_ATTEMPT: &str = r#"
import ctypes, os, socket, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def attempt(label, fn):
    try:
        r = fn()
        print(label, "ok")
        return r
    except OSError as e:
        print(label, "errno", e.errno)
def check(r):
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
"#;

/// Every way of reaching into process `argv[1]` (or, with `child`, into a child this script
/// starts): ptrace attach through gdb, writing `/proc/PID/mem`, `process_vm_writev`,
/// `pidfd_getfd`.
const PROCESS_ACCESS: &str = r#"
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
target = sys.argv[1]
if target == "child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    pid = child.pid
else:
    pid = int(target)
# A writable address of the target (its maps are readable without ATTACH); every write puts
# back the byte that is there.
addr = 0x10000
try:
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split()
        if parts[1].startswith("rw"):
            addr = int(parts[0].split("-")[0], 16)
            break
except PermissionError:
    # Confined by Landlock, even the maps of a process outside are out of reach (READ mode).
    print("maps refused")
gdb = subprocess.run(["gdb", "-q", "-nx", "-batch", "-p", str(pid), "-ex", "detach"],
                     capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, DEBUGINFOD_URLS="", HOME="/tmp"))
out = gdb.stdout + gdb.stderr
print("gdb", "refused" if "ptrace: Operation not permitted" in out
      else ("attached" if gdb.returncode == 0 else "failed " + out[-300:].replace("\n", " ")))
def mem():
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        f.seek(addr)
        b = f.read(1)
        f.seek(addr)
        f.write(b)
attempt("proc-mem", mem)
buf = ctypes.create_string_buffer(1)
def vm():
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 1)
    remote = iovec(addr, 1)
    check(libc.syscall(310, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
    check(libc.syscall(311, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
attempt("process-vm-writev", vm)
def getfd():
    pidfd = os.pidfd_open(pid)
    fd = check(libc.syscall(438, pidfd, 0, 0))
    os.close(fd)
attempt("pidfd-getfd", getfd)
attempt("environ", lambda: open(f"/proc/{pid}/environ", "rb").read())
attempt("fd-reopen", lambda: open(f"/proc/{pid}/fd/1", "wb").close())
import signal
attempt("signal", lambda: os.kill(pid, signal.SIGCONT))
# Renames across directories keep working in a confined agent (Landlock's REFER).
import tempfile
d = tempfile.mkdtemp()
os.mkdir(d + "/a"); os.mkdir(d + "/b")
open(d + "/a/f", "w").close()
attempt("rename", lambda: os.rename(d + "/a/f", d + "/b/f"))
if target == "child":
    child.kill()
"#;

/// A process of uid `uid` started in cgroup `cg` (killed when dropped; the Env's Drop kills
/// whatever is left in its subtree too).
struct Proc(Child);

impl Proc {
    fn start(cg: &Path, uid: u32, args: &[&str]) -> Proc {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        in_cgroup(&mut cmd, cg);
        as_user(&mut cmd, uid, uid);
        Proc(spawn(&mut cmd).unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An unguarded cgroup beside the attach cgroup.
fn outside(env: &Env) -> PathBuf {
    let cg = env.cgroup("outside");
    guard::kernel::cgroup::create(&cg).unwrap();
    cg
}

/// `code` (after [`PY_ATTEMPT`]) run as NOBODY: guarded (`agent` Some) or in cgroup `cg`.
fn python_as_nobody(
    env: &Env,
    agent: Option<&str>,
    cg: &Path,
    code: &str,
    args: &[&str],
) -> String {
    let script = format!("{PY_ATTEMPT}\n{code}");
    let mut full = vec![PYTHON, "-c", script.as_str()];
    full.extend_from_slice(args);
    let mut cmd = match agent {
        Some(a) => env.exec(a, &full),
        None => {
            let mut c = Command::new(full[0]);
            c.args(&full[1..]);
            in_cgroup(&mut c, cg);
            c
        }
    };
    cmd.current_dir("/");
    as_user(&mut cmd, NOBODY, NOBODY);
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn contained(env: &Env, what: &str) -> Vec<serde_json::Value> {
    // The daemon writes them as the kernel reports them: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<_> = env
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "contained" && r["detail"]["what"] == what)
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Containment as the started daemon reports it.
struct State {
    /// The BPF LSM programs run (everything is refused and audited).
    lsm: bool,
    /// What is refused (`covers`: with `partial`, what `guard exec` confines its agents with).
    covers: Vec<String>,
}

impl State {
    fn covers(&self, what: &str) -> bool {
        self.covers.iter().any(|c| c == what)
    }

    /// Whether `what` is refused here; if not, the test says so (the daemon's reason printed).
    fn holds(&self, what: &str, env: &Env) -> bool {
        if self.covers(what) {
            return true;
        }
        eprintln!(
            "not tested on this kernel: containment does not cover {what} here: {}",
            env.status()["containment"]["reason"]
        );
        false
    }
}

/// An environment whose daemon contains as much as this kernel allows: the BPF LSM programs,
/// or else `guard exec`'s own confinement at its fullest.
fn contain_env(scope: &str) -> Env {
    Env::new(&format!("exec_confinement = \"landlock\"\n{scope}"))
}

/// Starts the daemon and reads its containment state.
fn started(env: &mut Env) -> State {
    env.start_daemon();
    let c = env.status()["containment"].clone();
    State {
        lsm: c["state"] == "on",
        covers: c["covers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[test]
fn no_process_outside_the_agent_can_be_reached_and_its_own_children_can() {
    let mut env = contain_env("");
    let state = started(&mut env);
    if !state.holds("process_access", &env) {
        return;
    }
    let out_cg = outside(&env);
    let victim = Proc::start(&out_cg, NOBODY, &["sleep", "120"]);
    let pid = victim.pid().to_string();

    // An unguarded process of the same uid (no Yama here): everything works.
    let free = python_as_nobody(&env, None, &out_cg, PROCESS_ACCESS, &[&pid]);
    for line in [
        "gdb attached",
        "proc-mem ok",
        "process-vm-writev ok",
        "pidfd-getfd ok",
        "environ ok",
        "fd-reopen ok",
        "signal ok",
        "rename ok",
    ] {
        assert!(free.contains(line), "unguarded: {free}");
    }

    let guarded = python_as_nobody(&env, Some("reacher"), &out_cg, PROCESS_ACCESS, &[&pid]);
    let mut refused = vec![
        "gdb refused",
        "proc-mem errno 13",
        "process-vm-writev errno 1",
        "pidfd-getfd errno 1",
        "environ errno 13",
        "fd-reopen errno 13",
        "rename ok",
    ];
    if state.covers("signal") {
        refused.push("signal errno 1");
    }
    for line in refused {
        assert!(guarded.contains(line), "guarded, outside target: {guarded}");
    }
    let own = python_as_nobody(&env, Some("reacher"), &out_cg, PROCESS_ACCESS, &["child"]);
    for line in [
        "gdb attached",
        "proc-mem ok",
        "process-vm-writev ok",
        "pidfd-getfd ok",
        "environ ok",
        "fd-reopen ok",
        "signal ok",
        "rename ok",
    ] {
        assert!(own.contains(line), "guarded, own child: {own}");
    }
    if !state.lsm {
        // Landlock refused them (guard exec's confinement): not audited.
        return;
    }
    let records = contained(&env, "process_access");
    assert!(!records.is_empty(), "audit: {:#?}", env.audit());
    assert!(records.iter().all(|r| r["agent"]["name"] == "reacher"));
    assert!(records
        .iter()
        .any(|r| r["detail"]["target_pid"] == victim.pid()));
    assert!(
        env.status()["containment"]["refused"]["process_access"]
            .as_u64()
            .unwrap()
            >= 4
    );
}

/// An unguarded helper: on the Unix socket `argv[1]`, hands every client a descriptor over
/// SCM_RIGHTS — a TCP socket it connected to `argv[2]:argv[3]` ("socket"), or a pipe ("pipe").
const FD_HELPER: &str = r#"
import array, os, socket, sys
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen()
while True:
    c, _ = srv.accept()
    what = c.recv(16)
    if what == b"socket":
        t = socket.create_connection((host, port))
        fd = t.fileno()
    else:
        r, w = os.pipe()
        os.write(w, b"through a pipe")
        fd = r
    c.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    c.close()
"#;

const FD_TAKER: &str = r#"
import array
def take(what):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.send(what)
    fds = array.array("i")
    msg, anc, flags, _ = s.recvmsg(1, socket.CMSG_LEN(4))
    for level, kind, data in anc:
        fds.frombytes(data[:4])
    print(what.decode(), "received" if fds else "none", "truncated" if flags & socket.MSG_CTRUNC else "")
    return fds[0] if fds else None
fd = take(b"socket")
if fd is not None:
    t = socket.socket(fileno=fd)
    attempt("send", lambda: t.sendall(b"GET /borrowed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
p = take(b"pipe")
if p is not None:
    print("pipe says", os.read(p, 100).decode())
"#;

/// A TCP server that records what every connection sent (the helper connects for each taker;
/// only a request through the handed-over socket arrives as bytes).
fn recording_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                let mut chunk = [0u8; 4096];
                while let Ok(n) = conn.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    g.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
        }
    });
    (addr, got)
}

fn borrowed_requests(got: &std::sync::Mutex<Vec<u8>>) -> usize {
    String::from_utf8_lossy(&got.lock().unwrap())
        .matches("GET /borrowed")
        .count()
}

#[test]
fn a_socket_made_outside_the_agent_does_not_reach_it() {
    let dir = std::env::temp_dir().join(format!("guard-contain-fd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let path = dir.join("helper.sock");
    let path_s = path.display().to_string();
    // The helper's socket is allow-listed: what is tested is the descriptor it hands over.
    let mut env = contain_env(&format!("unix_allow = [\"{path_s}\"]"));
    if !started(&mut env).holds("foreign_socket", &env) {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let (server, got) = recording_server();
    let out_cg = outside(&env);
    let port = server.port().to_string();
    let _helper = Proc::start(
        &out_cg,
        NOBODY,
        &[PYTHON, "-c", FD_HELPER, &path_s, "127.0.0.2", &port],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the helper did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Unguarded, the socket arrives and carries a request to the server.
    let free = python_as_nobody(&env, None, &out_cg, FD_TAKER, &[&path_s]);
    assert!(free.contains("socket received"), "unguarded: {free}");
    assert!(
        free.contains("pipe says through a pipe"),
        "unguarded: {free}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while borrowed_requests(&got) < 1 {
        assert!(
            Instant::now() < deadline,
            "the unguarded request did not arrive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Guarded: the socket is held back (MSG_CTRUNC), the pipe arrives.
    let guarded = python_as_nobody(&env, Some("borrower"), &out_cg, FD_TAKER, &[&path_s]);
    assert!(
        guarded.contains("socket none truncated"),
        "guarded: {guarded}"
    );
    assert!(
        guarded.contains("pipe says through a pipe"),
        "guarded: {guarded}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        borrowed_requests(&got),
        1,
        "a borrowed socket reached the server"
    );
    let records = contained(&env, "foreign_socket");
    assert!(!records.is_empty(), "audit: {:#?}", env.audit());
    assert_eq!(records[0]["agent"]["name"], "borrower");
    assert_eq!(records[0]["detail"]["family"], "AF_INET");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An unguarded HTTP relay on a Unix socket (what socat would be) to a TCP server.
const UNIX_RELAY: &str = r#"
import os, socket, sys, threading
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(socket.AF_UNIX)
if path.startswith("@"):
    srv.bind("\0" + path[1:])
else:
    srv.bind(path)
    os.chmod(path, 0o777)
srv.listen()
def pump(a, b):
    while True:
        d = a.recv(65536)
        if not d:
            break
        b.sendall(d)
    b.shutdown(socket.SHUT_WR)
while True:
    c, _ = srv.accept()
    t = socket.create_connection((host, port))
    threading.Thread(target=pump, args=(c, t), daemon=True).start()
    threading.Thread(target=pump, args=(t, c), daemon=True).start()
"#;

const UNIX_CLIENT: &str = r#"
def fetch(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect("\0" + path[1:] if path.startswith("@") else path)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    print("body", data.split(b"\r\n\r\n", 1)[1].decode().strip())
for p in sys.argv[1:]:
    attempt(p, lambda: fetch(p))
# A listener of the agent's own.
own = socket.socket(socket.AF_UNIX)
own.bind("\0guard-test-own-" + str(os.getpid()))
own.listen()
attempt("own", lambda: socket.socket(socket.AF_UNIX).connect("\0guard-test-own-" + str(os.getpid())))
# Datagrams to an outside listener go through unix_may_send.
attempt("dgram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", "\0" + sys.argv[-1][1:]))
"#;

/// An unguarded datagram listener on abstract name `argv[1]`.
const UNIX_DGRAM: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + sys.argv[1][1:])
while True:
    s.recv(100)
"#;

fn unix_env(
    dir: &Path,
    scope: &str,
) -> (Env, State, HttpServer, Vec<Proc>, String, String, String) {
    let mut env = contain_env(scope);
    let state = started(&mut env);
    let server = HttpServer::start("127.0.0.2:0");
    let out_cg = outside(&env);
    let port = server.addr.port().to_string();
    let path = dir.join("relay.sock").display().to_string();
    // An earlier environment's relay left its socket file behind.
    let _ = std::fs::remove_file(&path);
    let abs = format!("@guard-test-relay-{}", env.name);
    let dgram = format!("@guard-test-dgram-{}", env.name);
    let procs = vec![
        Proc::start(
            &out_cg,
            NOBODY,
            &[PYTHON, "-c", UNIX_RELAY, &path, "127.0.0.2", &port],
        ),
        Proc::start(
            &out_cg,
            NOBODY,
            &[PYTHON, "-c", UNIX_RELAY, &abs, "127.0.0.2", &port],
        ),
        Proc::start(&out_cg, NOBODY, &[PYTHON, "-c", UNIX_DGRAM, &dgram]),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&path).exists() {
        assert!(Instant::now() < deadline, "the relay did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    (env, state, server, procs, path, abs, dgram)
}

#[test]
fn unix_sockets_outside_the_agent_are_refused_audited_and_allowed_by_scope() {
    let dir = std::env::temp_dir().join(format!("guard-contain-unix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();

    let (env, state, server, procs, path, abs, dgram) = unix_env(&dir, "");
    if !state.covers("unix_connect") && !state.holds("abstract_unix_connect", &env) {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let out_cg = env.cgroup("outside");
    let args = [path.as_str(), abs.as_str(), dgram.as_str()];
    // Unguarded: the relay reaches the server, by path and by abstract name.
    let free = python_as_nobody(&env, None, &out_cg, UNIX_CLIENT, &args);
    assert!(
        free.contains(&format!("body hello from the test server\n{path} ok")),
        "{free}"
    );
    assert!(free.contains(&format!("{abs} ok")), "{free}");
    assert!(free.contains("dgram ok"), "{free}");
    let hits = server.hits();
    assert!(hits >= 2);

    let guarded = python_as_nobody(&env, Some("relayed"), &out_cg, UNIX_CLIENT, &args);
    assert!(guarded.contains("own ok"), "{guarded}");
    if state.lsm {
        assert!(guarded.contains(&format!("{path} errno 13")), "{guarded}");
        assert!(guarded.contains(&format!("{abs} errno 13")), "{guarded}");
        assert!(guarded.contains("dgram errno 13"), "{guarded}");
        assert_eq!(server.hits(), hits, "the relay carried a guarded request");
        let records = contained(&env, "unix_connect");
        let paths: Vec<&str> = records
            .iter()
            .filter_map(|r| r["detail"]["path"].as_str())
            .collect();
        assert!(paths.contains(&path.as_str()), "{records:#?}");
        assert!(paths.contains(&abs.as_str()), "{records:#?}");
        assert!(paths.contains(&dgram.as_str()), "{records:#?}");
        assert!(records.iter().all(|r| r["agent"]["name"] == "relayed"));
    } else {
        // Landlock's scope: abstract names outside the agent are refused (EPERM), not audited;
        // listeners by path stay reachable without BPF LSM.
        assert!(guarded.contains(&format!("{abs} errno 1")), "{guarded}");
        assert!(guarded.contains("dgram errno 1"), "{guarded}");
        assert!(guarded.contains(&format!("{path} ok")), "{guarded}");
        assert_eq!(
            server.hits(),
            hits + 1,
            "only the path relay carried a request"
        );
    }
    // guard's own control socket stays reachable from inside.
    let mut cmd = env.exec(
        "asks",
        &[
            env.bin.to_str().unwrap(),
            "--config",
            env.config_path.to_str().unwrap(),
            "status",
        ],
    );
    cmd.current_dir("/");
    as_user(&mut cmd, NOBODY, NOBODY);
    assert!(run_ok(&mut cmd).contains("containment:  "));
    drop(procs);
    drop(env);

    // scope.unix = "allow" restores it.
    let (env, state, server, _procs, path, abs, dgram) = unix_env(&dir, r#"unix = "allow""#);
    assert!(!state.covers("abstract_unix_connect"));
    let out_cg = env.cgroup("outside");
    let args = [path.as_str(), abs.as_str(), dgram.as_str()];
    let guarded = python_as_nobody(&env, Some("relayed"), &out_cg, UNIX_CLIENT, &args);
    assert!(guarded.contains(&format!("{path} ok")), "{guarded}");
    assert!(guarded.contains(&format!("{abs} ok")), "{guarded}");
    assert!(guarded.contains("dgram ok"), "{guarded}");
    assert!(server.hits() >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}

const FAMILIES: &str = r#"
try:
    # Root of its own user and network namespace may let anyone make ping sockets there.
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 0")
except OSError as e:
    print("ping_group_range", e.errno)
attempt("tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("udp", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
attempt("netlink-route", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("ping", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
attempt("raw-icmp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("raw-icmp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("vsock", lambda: socket.socket(40, socket.SOCK_STREAM))
attempt("netlink-audit", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9))
params = ctypes.create_string_buffer(120)
attempt("io_uring", lambda: os.close(check(libc.syscall(425, 4, params))))
"#;

/// `unshare -U -r -n -m python3 -c FAMILIES`, guarded or not, as NOBODY.
fn families_in_userns(env: &Env, agent: Option<&str>) -> std::process::Output {
    let script = format!("{PY_ATTEMPT}\n{FAMILIES}");
    // -m as well: a mount namespace, whose making mounts (Landlock ABI 6+ domains allow it).
    let args = [
        "unshare",
        "-U",
        "-r",
        "-n",
        "-m",
        PYTHON,
        "-c",
        script.as_str(),
    ];
    let mut cmd = match agent {
        Some(a) => env.exec(a, &args),
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            in_cgroup(&mut c, &env.cgroup("outside"));
            c
        }
    };
    cmd.current_dir("/");
    as_user(&mut cmd, NOBODY, NOBODY);
    run(&mut cmd, Duration::from_secs(30))
}

#[test]
fn raw_ping_and_other_sockets_are_refused_at_creation_also_in_a_user_namespace() {
    let mut env = contain_env("");
    let state = started(&mut env);
    let lsm = state.lsm;
    outside(&env);
    // Unguarded, root of its own user and network namespace makes raw, ping and packet sockets.
    let free = families_in_userns(&env, None);
    let free = String::from_utf8_lossy(&free.stdout).into_owned();
    for ok in ["ping ok", "raw-icmp ok", "raw-icmp6 ok", "packet ok"] {
        assert!(free.contains(ok), "unguarded: {free}");
    }

    let out = families_in_userns(&env, Some("unshared"));
    let guarded = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{guarded}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ok in ["tcp ok", "udp ok", "unix ok", "netlink-route ok"] {
        assert!(guarded.contains(ok), "guarded: {guarded}");
    }
    // IPv4 and IPv6 sockets other than TCP and UDP: refused with or without BPF LSM (the
    // cgroup sock_create program, audited); the other families by the LSM program, or by
    // guard exec's seccomp filter (not audited).
    let mut refused = vec!["ping errno 13", "raw-icmp errno 13", "raw-icmp6 errno 13"];
    assert!(free.contains("io_uring ok"), "unguarded: {free}");
    if state.holds("socket_family", &env) {
        // Answered as by a kernel without them, so programs that probe go on without.
        refused.extend([
            "packet errno 97",
            "vsock errno 97",
            "netlink-audit errno 93",
        ]);
        if !lsm {
            // guard exec's filter: io_uring makes sockets without socket(2).
            refused.push("io_uring errno 38");
        }
    }
    for r in &refused {
        assert!(guarded.contains(r), "guarded: {guarded}");
    }
    let records = contained(&env, "socket_family");
    let audited = if lsm { refused.len() } else { 3 };
    assert!(records.len() >= audited, "{records:#?}");
    assert!(records.iter().all(|r| r["agent"]["name"] == "unshared"));
    let families: Vec<&str> = records
        .iter()
        .filter_map(|r| r["detail"]["family"].as_str())
        .collect();
    let mut want = vec!["AF_INET", "AF_INET6"];
    if lsm {
        want.extend(["AF_PACKET", "AF_VSOCK", "AF_NETLINK"]);
    }
    for f in want {
        assert!(families.contains(&f), "{records:#?}");
    }
    assert!(
        env.status()["containment"]["refused"]["socket_family"]
            .as_u64()
            .unwrap()
            >= audited as u64
    );
    drop(env);

    // scope.userns = "deny": no namespace at all.
    let mut env = contain_env(r#"userns = "deny""#);
    let state = started(&mut env);
    if !state.holds("user_namespace", &env) {
        return;
    }
    outside(&env);
    let out = families_in_userns(&env, Some("unshared"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if state.lsm {
        assert!(!contained(&env, "user_namespace").is_empty());
    }
    // Unguarded processes keep them.
    assert!(families_in_userns(&env, None).status.success());
}

/// `guard daemon` as the test's Env would start it, expected to refuse: its exit and output.
fn refused_start(env: &Env) -> (std::process::ExitStatus, String) {
    let mut cmd = env.guard();
    cmd.arg("daemon")
        .env("GUARD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    in_cgroup(&mut cmd, &env.cgroup("daemon"));
    let mut child = Proc(spawn(&mut cmd).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut out = String::new();
            use std::io::Read as _;
            let _ = child.0.stderr.take().unwrap().read_to_string(&mut out);
            let _ = child.0.stdout.take().unwrap().read_to_string(&mut out);
            return (status, out);
        }
        assert!(Instant::now() < deadline, "the daemon started");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn containment_says_whether_it_is_on_and_why_not() {
    let mut env = Env::new("");
    if started(&mut env).lsm {
        let attached = env.attached();
        assert_eq!(
            attached["lsm_cgroup"].len(),
            guard::kernel::contain::LSM_PROGRAMS.len(),
            "{attached:?}"
        );
        let metrics = env.metrics();
        assert!(
            metrics.contains("guard_containment{state=\"on\"} 1"),
            "{metrics}"
        );
        // A restart keeps the same links and programs: no moment without containment.
        env.stop_daemon();
        assert_eq!(env.attached(), attached);
        assert!(started(&mut env).lsm);
        assert_eq!(env.attached(), attached);
        env.stop_daemon();
        drop(env);
        // `require` starts where the kernel has it.
        let mut env = Env::new(r#"containment = "require""#);
        assert!(started(&mut env).lsm);
    } else {
        // Off, loudly: the reason in status, metrics, `guard status` and the start record.
        let status = env.status();
        assert_eq!(status["containment"]["state"], "off");
        let reason = status["containment"]["reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(reason.len() > 20, "{reason}");
        assert!(env.attached()["lsm_cgroup"].is_empty());
        let metrics = env.metrics();
        for state in ["off\"} 1", "on\"} 0", "partial\"} 0"] {
            let line = format!("guard_containment{{state=\"{state}");
            assert!(metrics.contains(&line), "{line}: {metrics}");
        }
        let text = run_ok(env.guard().arg("status"));
        assert!(
            text.contains(&format!("containment:     OFF: {reason}")),
            "{text}"
        );
        assert!(env.daemon_log().contains("CONTAINMENT IS OFF"));
        let start = env
            .audit()
            .into_iter()
            .find(|r| r["event"] == "daemon_start")
            .unwrap();
        assert_eq!(start["detail"]["containment"]["state"], "off");
        // The redirect is enforced all the same, and guard exec confines nothing.
        let server = HttpServer::start("127.0.0.2:0");
        server.watch(env.daemon_pid());
        let out =
            run_ok(&mut env.exec("curl", &["curl", "-sS", "--max-time", "10", &server.url()]));
        assert_eq!(out, "hello from the test server\n");
        assert_eq!(server.via_watched(), 1);
        let nnp = run_ok(&mut env.exec("sh", &["sh", "-c", "grep NoNewPrivs /proc/self/status"]));
        assert!(nnp.contains("0"), "{nnp}");
        drop(env);

        // With scope.exec_confinement: partial, said as loudly.
        let mut env = contain_env("");
        let state = started(&mut env);
        assert!(state.covers("socket_family") && state.covers("process_access"));
        let status = env.status();
        assert_eq!(status["containment"]["state"], "partial");
        let reason = status["containment"]["reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(reason.contains("Landlock"), "{reason}");
        assert!(env
            .metrics()
            .contains("guard_containment{state=\"partial\"} 1"));
        let text = run_ok(env.guard().arg("status"));
        assert!(
            text.contains(&format!("containment:     PARTIAL: {reason}")),
            "{text}"
        );
        assert!(env.daemon_log().contains("CONTAINMENT IS PARTIAL"));
        let start = env
            .audit()
            .into_iter()
            .find(|r| r["event"] == "daemon_start")
            .unwrap();
        assert_eq!(start["detail"]["containment"]["state"], "partial");
        let nnp = run_ok(&mut env.exec("sh", &["sh", "-c", "grep NoNewPrivs /proc/self/status"]));
        assert!(nnp.contains("1"), "{nnp}");
        drop(env);
        // `require` refuses to start, before attaching anything.
        let env = Env::new(r#"containment = "require""#);
        let (status, out) = refused_start(&env);
        assert!(!status.success());
        assert!(out.contains("containment is required"), "{out}");
        assert!(guard::kernel::attached_programs(&env.attach_path())
            .map(|a| a.values().all(Vec::is_empty))
            .unwrap_or(true));
    }

    // `off`: nothing of containment attached, and said so.
    let mut env = Env::new(r#"containment = "off""#);
    env.start_daemon();
    let status = env.status();
    assert_eq!(status["containment"]["state"], "off");
    assert!(status["containment"]["reason"]
        .as_str()
        .unwrap()
        .contains("scope.containment"));
    assert!(env.attached()["lsm_cgroup"].is_empty());
    let text = run_ok(env.guard().arg("status"));
    assert!(text.contains("containment:     OFF"), "{text}");
}

#[test]
fn guard_exec_does_not_hand_inherited_sockets_to_the_command() {
    let mut env = Env::new("");
    started(&mut env);
    // Descriptor 3 is a socket made outside the guard (a socketpair of this test), 4 a file.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let file = std::fs::File::open("/etc/hostname").unwrap();
    use std::os::fd::AsRawFd as _;
    let (sock_fd, file_fd) = (a.as_raw_fd(), file.as_raw_fd());
    let mut cmd = env.exec(
        "inherits",
        &[
            "sh",
            "-c",
            "ls -l /proc/self/fd/3 /proc/self/fd/4 2>&1; true",
        ],
    );
    // SAFETY: dup2 and fcntl only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // dup2 onto itself keeps close-on-exec: cleared explicitly.
            if libc::dup2(sock_fd, 3) < 0
                || libc::dup2(file_fd, 4) < 0
                || libc::fcntl(3, libc::F_SETFD, 0) < 0
                || libc::fcntl(4, libc::F_SETFD, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run(&mut cmd, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not passing inherited socket descriptor 3"),
        "{stderr}{stdout}"
    );
    assert!(!stdout.contains("socket:["), "{stdout}");
    assert!(stdout.contains("/etc/hostname"), "{stdout}");
}

const TERMINAL: &str = r#"
import fcntl, pty, termios
m, s = pty.openpty()
os.setsid()
fcntl.ioctl(s, termios.TIOCSCTTY, 0)
attempt("tiocsti", lambda: fcntl.ioctl(s, termios.TIOCSTI, b"x"))
"#;

#[test]
fn a_guarded_process_cannot_type_into_a_terminal() {
    let mut env = contain_env("");
    let state = started(&mut env);
    let out_cg = outside(&env);
    let legacy = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
        .map(|v| v.trim() == "1")
        .unwrap_or(true);
    if legacy {
        let free = python_as_nobody(&env, None, &out_cg, TERMINAL, &[]);
        assert!(free.contains("tiocsti ok"), "unguarded: {free}");
    }
    if !state.holds("terminal_injection", &env) {
        return;
    }
    let guarded = python_as_nobody(&env, Some("typist"), &out_cg, TERMINAL, &[]);
    assert!(guarded.contains("tiocsti errno 1"), "guarded: {guarded}");
    if state.lsm {
        assert!(!contained(&env, "terminal_injection").is_empty());
    }
}
