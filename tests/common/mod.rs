//! Harness for the root integration tests: each test gets its own cgroup subtree under the cgroup
//! v2 mount, its own bpffs pin directory, proxy port, control socket and audit log, and a real
//! `guard daemon`. Everything is torn down in `Drop`, also when the test fails.
#![allow(dead_code)]

pub mod peers;

use std::{
    collections::HashSet,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const PYTHON: &str = "/usr/bin/python3";
/// An unprivileged uid for tests that must not run as root.
pub const NOBODY: u32 = 65534;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Whether this process may load eBPF and manage cgroups. Root tests are also marked
/// `#[ignore = "needs root"]`, so a non-root `cargo test` lists them as ignored; this check only
/// guards against running them by name without root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (real eBPF): run `sudo cargo xtask test`"
    );
}

pub struct Env {
    pub name: String,
    pub cg_mount: PathBuf,
    /// `<mount>/<name>`: the test's own cgroup subtree.
    pub root: PathBuf,
    /// `<name>/guard.slice`, relative to the mount.
    pub attach_rel: String,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub audit_log: PathBuf,
    /// A copy of the guard binary that an unprivileged user can run.
    pub bin: PathBuf,
    /// Prometheus endpoint of this test's daemon (127.0.0.1).
    pub metrics_port: u16,
    daemon: Option<Child>,
    extra_config: String,
    proxy_config: String,
    other_config: String,
}

/// One copy of the guard binary per test process, in a directory every user can reach (the
/// build tree may sit below a private home). Made once, before the tests fork children from it,
/// so no child inherits it open for writing (ETXTBSY).
fn shared_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = std::env::temp_dir();
        // Copies left by earlier runs whose process is gone.
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("guard-test-bin-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("guard-test-bin-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("guard");
        let part = dir.join("guard.part");
        fs::copy(env!("CARGO_BIN_EXE_guard"), &part).unwrap();
        fs::set_permissions(&part, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&part, &bin).unwrap();
        bin
    })
    .clone()
}

/// `Command::spawn`, retried while another test thread's fork still holds an executable open
/// for writing (ETXTBSY).
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn free_port() -> u16 {
    // Free on both loopbacks at the time of asking.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

impl Env {
    /// A new environment; `scope_extra` is added to the `[scope]` table (use `{root}` for the
    /// test's cgroup path relative to the mount).
    pub fn new(scope_extra: &str) -> Env {
        Env::configured(scope_extra, "", "")
    }

    /// Like [`Env::new`], with lines for `[proxy]` and whole extra tables (`[policy]` ...).
    pub fn configured(scope_extra: &str, proxy_extra: &str, other: &str) -> Env {
        require_root();
        let cg_mount = guard::kernel::cgroup::cgroup2_mount().unwrap();
        remove_stale_cgroups(&cg_mount);
        let name = format!(
            "guard-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let root = cg_mount.join(&name);
        guard::kernel::cgroup::create(&root.join("daemon")).unwrap();
        let attach_rel = format!("{name}/guard.slice");
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = shared_binary();
        let mut env = Env {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            port: free_port(),
            metrics_port: free_port(),
            config_path: dir.join("guard.toml"),
            socket: dir.join("guard.sock"),
            audit_log: dir.join("audit.jsonl"),
            name,
            cg_mount,
            root,
            attach_rel,
            dir,
            bin,
            daemon: None,
            extra_config: scope_extra.to_string(),
            proxy_config: proxy_extra.to_string(),
            other_config: other.to_string(),
        };
        fs::create_dir_all(env.dir.join("policies")).unwrap();
        env.write_config();
        env
    }

    fn write_config(&mut self) {
        let scope_extra = self.extra_config.replace("{root}", &self.name);
        let text = format!(
            r#"[scope]
attach_cgroup = "{attach}"
{scope_extra}

[proxy]
listen_port = {port}
{proxy_extra}

[paths]
bpffs = "{pins}"
control_socket = "{socket}"
state_dir = "{dir}/state"
audit_log = "{audit}"
policies = "{dir}/policies"

[metrics]
listen = "127.0.0.1:{metrics}"

{other}
"#,
            metrics = self.metrics_port,
            proxy_extra = self.proxy_config,
            other = self.other_config,
            attach = self.attach_rel,
            port = self.port,
            pins = self.pin_dir.display(),
            socket = self.socket.display(),
            dir = self.dir.display(),
            audit = self.audit_log.display(),
        );
        fs::write(&self.config_path, text).unwrap();
        fs::set_permissions(&self.config_path, fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Appends whole tables to the configuration (before the daemon starts).
    pub fn append_config(&mut self, tables: &str) {
        self.other_config.push('\n');
        self.other_config.push_str(tables);
        self.write_config();
    }

    /// Writes `policies/<name>` (the daemon's policy directory).
    pub fn write_policy(&self, name: &str, text: &str) {
        fs::write(self.dir.join("policies").join(name), text).unwrap();
    }

    /// `<mount>/<rel>` where `rel` is relative to the test's cgroup root.
    pub fn cgroup(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn attach_path(&self) -> PathBuf {
        self.cg_mount.join(&self.attach_rel)
    }

    /// Starts the daemon in the test's `daemon` cgroup and waits until it answers.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("daemon")
            .env("GUARD_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        in_cgroup(&mut cmd, &self.cgroup("daemon"));
        let child = spawn(&mut cmd).expect("spawning guard daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "guard daemon exited with {status} at start:\n{}",
                    self.daemon_log()
                );
            }
            if self.try_status().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not answer within 30 s:\n{}",
                self.daemon_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon not running").id()
    }

    /// Stops the daemon the way systemd does (SIGTERM) and waits for it.
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = d.kill();
                    panic!("the daemon did not stop on SIGTERM:\n{}", self.daemon_log());
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The daemon's Prometheus metrics text.
    pub fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// One sample of the metrics text (0 when absent).
    pub fn metric(&self, line_prefix: &str) -> u64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn guard(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_BACKTRACE");
        c
    }

    /// `guard exec --agent AGENT -- ARGS...`
    pub fn exec(&self, agent: &str, args: &[&str]) -> Command {
        let mut c = self.guard();
        c.args(["exec", "--agent", agent, "--"]).args(args);
        c
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = self.guard().args(["status", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("guard status failed:\n{}", self.daemon_log()))
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    pub fn kernel_counter(&self, name: &str) -> u64 {
        self.status()["counters"]["kernel"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name}"))
    }

    pub fn audit(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    pub fn audit_connections(&self) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["event"] == "connection")
            .collect()
    }

    /// Programs attached at the attach cgroup, by attach type, straight from the kernel.
    pub fn attached(&self) -> std::collections::BTreeMap<String, Vec<u32>> {
        guard::kernel::attached_programs(&self.attach_path()).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon();
        // Every process left in the test's subtree was started by this test.
        let _ = fs::write(self.root.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while guard::kernel::cgroup::populated(&self.root).unwrap_or(false)
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
        }
        // Links first (detaches the programs), then maps.
        let _ = guard::kernel::unpin_all(&self.pin_dir);
        if let Err(e) = guard::kernel::cgroup::remove(&self.root) {
            eprintln!("warning: could not remove {}: {e}", self.root.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Test cgroups (`guard-test-PID-N`) of test processes that are gone, left by a run that was
/// killed before its `Drop`s ran: their processes were started by that run, and nothing of
/// another test may linger into this one. Once per test process.
fn remove_stale_cgroups(cg_mount: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for e in fs::read_dir(cg_mount).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("guard-test-")
                .and_then(|r| r.split('-').next())
            else {
                continue;
            };
            if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
                continue;
            }
            let _ = fs::write(e.path().join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while guard::kernel::cgroup::populated(&e.path()).unwrap_or(false)
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(20));
            }
            match guard::kernel::cgroup::remove(&e.path()) {
                Ok(()) => eprintln!("removed the stale test cgroup {}", e.path().display()),
                Err(err) => eprintln!("warning: stale cgroup {}: {err}", e.path().display()),
            }
        }
    });
}

/// Makes `cmd` start inside cgroup `path` (it moves itself there before exec).
pub fn in_cgroup(cmd: &mut Command, path: &Path) {
    let procs = std::ffi::CString::new(path.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd` run as `uid`/`gid` with no supplementary groups. Unlike `Command::uid`, this
/// happens in a `pre_exec` hook, so hooks registered before it (such as [`in_cgroup`]) still run
/// as root.
pub fn as_user(cmd: &mut Command, uid: u32, gid: u32) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `cmd` with a time limit; panics with its output when it takes longer.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd).unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let (o2, e2) = (out.clone(), err.clone());
    let t1 = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        *o2.lock().unwrap() = b;
    });
    let t2 = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        *e2.lock().unwrap() = b;
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = t1.join();
            let _ = t2.join();
            panic!(
                "{cmd:?} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.lock().unwrap()),
                String::from_utf8_lossy(&err.lock().unwrap())
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    t1.join().unwrap();
    t2.join().unwrap();
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs `cmd` (30 s limit) and returns its stdout; panics, with both streams, when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn python(code: &str) -> Vec<String> {
    vec![PYTHON.to_string(), "-c".to_string(), code.to_string()]
}

/// A JSON POST from a guarded `curl` (MCP's Accept header, `flags` such as `--http2` first),
/// returning (status, body).
pub fn curl_post_with(
    env: &Env,
    flags: &[&str],
    headers: &[&str],
    body: &str,
    url: &str,
) -> (u16, String) {
    let mut args: Vec<&str> = vec![
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    args.extend_from_slice(flags);
    args.extend([
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
    ]);
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", body, url]);
    let out = run_ok(&mut env.exec("curl", &args));
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

pub fn curl_post(env: &Env, url: &str, headers: &[&str], body: &str) -> (u16, String) {
    curl_post_with(env, &[], headers, body, url)
}

/// A small HTTP/1.1 server that answers every request with `hello` and records who connected:
/// the peer address, and whether that peer socket belonged to the watched process (the daemon)
/// at accept time, while the connection is certainly open.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<(SocketAddr, bool)>>>,
    watch: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(bind: &str) -> HttpServer {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let watch = Arc::new(AtomicU32::new(0));
        let (p, s, w) = (peers.clone(), stop.clone(), watch.clone());
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let peer = conn.peer_addr().unwrap();
                let pid = w.load(Ordering::SeqCst);
                let owned = pid != 0 && owned_by(peer, addr, pid);
                p.lock().unwrap().push((peer, owned));
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = "hello from the test server\n";
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes());
                });
            }
        });
        HttpServer {
            addr,
            peers,
            watch,
            stop,
            thread: Some(thread),
        }
    }

    /// Record, for every later connection, whether its peer socket is held by `pid`.
    pub fn watch(&self, pid: u32) {
        self.watch.store(pid, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    /// Connections whose peer was the watched process (the proxy).
    pub fn via_watched(&self) -> usize {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, o)| *o)
            .count()
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Socket inodes the process `pid` holds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    if let Ok(n) = n.parse() {
                        out.insert(n);
                    }
                }
            }
        }
    }
    out
}

/// Parses `/proc/net/tcp{,6}` for the inode of the socket from `local` to `remote` (a local port
/// alone is not unique: it is reused towards other destinations, and TIME_WAIT entries linger).
fn inode_of(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(file).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            if parse_proc_addr(f[1]) == Some(local) && parse_proc_addr(f[2]) == Some(remote) {
                return f[9].parse().ok();
            }
        }
    }
    None
}

fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => {
            let v = u32::from_str_radix(ip, 16).ok()?;
            std::net::Ipv4Addr::from(v.to_ne_bytes()).into()
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(b);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether the client end `peer` of a connection the server accepted belongs to process `pid`.
/// The socket must still be open: call it while the connection lives or right after (the proxy
/// keeps its upstream socket until the client side is done).
pub fn owned_by(peer: SocketAddr, server: SocketAddr, pid: u32) -> bool {
    // /proc/net/tcp is not a consistent snapshot: while other sockets come and go (parallel
    // tests) a read can skip entries, so a miss is retried before it counts.
    for _ in 0..40 {
        if let Some(inode) = inode_of(peer, server) {
            if socket_inodes(pid).contains(&inode) {
                return true;
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    if std::env::var_os("GUARD_TEST_DEBUG").is_some() {
        let port = format!(":{:04X}", peer.port());
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            for l in fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&port))
            {
                eprintln!("owned_by({peer}, {pid}): {file}: {l}");
            }
        }
        eprintln!(
            "owned_by: inode {:?}, daemon sockets {}",
            inode_of(peer, server),
            socket_inodes(pid).len()
        );
    }
    false
}

/// A UDP server that counts datagrams.
pub struct UdpCounter {
    pub addr: SocketAddr,
    pub count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpCounter {
    pub fn start(bind: &str) -> UdpCounter {
        let sock = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("binding udp {bind}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    c.fetch_add(1, Ordering::SeqCst);
                    let _ = sock.send_to(b"pong", from);
                }
            }
        });
        UdpCounter { addr, count, stop }
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
