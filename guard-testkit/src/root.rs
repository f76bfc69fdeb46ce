//! The root harness: each test gets its own cgroup subtree under the cgroup v2 mount, its own
//! bpffs pin directory, proxy port, control socket and audit log, and a real `guard daemon`
//! with real eBPF. Everything is torn down in `Drop`, also when the test fails.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::process::{free_port, in_cgroup, run_ok, spawn};
pub use crate::AuditLog;

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

/// A binary of this workspace, built beside the test that asks for it (`cargo xtask test`
/// builds `guard` and `guard-bench` before the root tests), or where `GUARD_BIN_DIR` says.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("GUARD_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        // target/<profile>/deps/<test> -> target/<profile>
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.to_path_buf()))
            .expect("the test executable's directory"),
    };
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run the root tests with `cargo xtask test` (or `cargo build -p {name}` first)",
        bin.display()
    );
    bin
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
        fs::copy(bin_path("guard"), &part).unwrap();
        fs::set_permissions(&part, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&part, &bin).unwrap();
        bin
    })
    .clone()
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
stdio_socket = "{dir}/stdio.sock"
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

    /// Moves the audit log (before the daemon starts); the connection log goes beside it.
    pub fn set_audit_log(&mut self, path: &Path) {
        self.audit_log = path.to_path_buf();
        self.write_config();
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

    /// Starts the daemon in the test's `daemon` cgroup and waits until it answers. A port
    /// picked free may be taken by another test's connection before the daemon binds it
    /// (ephemeral ports churn while tests connect by the thousand): then with new ports.
    pub fn start_daemon(&mut self) {
        for _ in 0..3 {
            match self.try_start_daemon() {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") => {
                    self.port = free_port();
                    self.metrics_port = free_port();
                    self.write_config();
                }
                Err(log) => panic!("guard daemon exited at start:\n{log}"),
            }
        }
        panic!("no free ports for the daemon:\n{}", self.daemon_log());
    }

    fn try_start_daemon(&mut self) -> Result<(), String> {
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
                self.daemon = None;
                let log = self.daemon_log();
                // The next attempt's log starts afresh.
                let _ = fs::remove_file(self.dir.join("daemon.log"));
                return Err(format!("(exit {status})\n{log}"));
            }
            if self.try_status().is_some() {
                return Ok(());
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

    /// Programs attached at the attach cgroup, by attach type, straight from the kernel.
    pub fn attached(&self) -> std::collections::BTreeMap<String, Vec<u32>> {
        guard::kernel::attached_programs(&self.attach_path()).unwrap()
    }
}

impl crate::AuditLog for Env {
    fn audit_log(&self) -> &Path {
        &self.audit_log
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
        for path in stale(cg_mount) {
            let _ = fs::write(path.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while guard::kernel::cgroup::populated(&path).unwrap_or(false)
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(20));
            }
            match guard::kernel::cgroup::remove(&path) {
                Ok(()) => eprintln!("removed the stale test cgroup {}", path.display()),
                Err(err) => eprintln!("warning: stale cgroup {}: {err}", path.display()),
            }
        }
        // Its pins too: links (the exec hooks are tracepoints, attached until unpinned), maps.
        for path in stale(Path::new("/sys/fs/bpf")) {
            let _ = guard::kernel::unpin_all(&path);
        }
    });
}

/// Entries `guard-test-PID-N` of `dir` whose test process (PID) is gone.
fn stale(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("guard-test-")
                .and_then(|r| r.split('-').next())
                .is_some_and(|pid| {
                    pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()
                })
        })
        .map(|e| e.path())
        .collect()
}

impl Env {
    /// A JSON POST from a guarded `curl` (MCP's Accept header, `flags` such as `--http2`
    /// first), returning (status, body).
    pub fn curl_post_with(
        &self,
        flags: &[&str],
        headers: &[&str],
        body: &str,
        url: &str,
    ) -> (u16, String) {
        let args = crate::curl::post_args(flags, headers, body, url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::curl::parse(&run_ok(&mut self.exec("curl", &args)))
    }

    pub fn curl_post(&self, url: &str, headers: &[&str], body: &str) -> (u16, String) {
        self.curl_post_with(&[], headers, body, url)
    }
}
