//! The benchmark's own little world, as in the root suite's harness (guard-testkit `root`): a
//! cgroup subtree `<cgroup2 mount>/guard-bench-<pid>` (daemon/, direct/, peers/,
//! guard.slice/{bench,plain}), a pin directory `/sys/fs/bpf/guard-bench-<pid>`, a temporary
//! directory with config, policies, audit log and control socket, a free proxy port, and a
//! release daemon. Programs attach only at
//! `guard-bench-<pid>/guard.slice`, never higher.
//!
//! Teardown (kill what we started by pid, `cgroup.kill` on the subtree, unpin, rmdir) runs from
//! `Drop`, from SIGINT/SIGTERM/SIGHUP, and for the leftovers of a run that was SIGKILLed (the
//! next run removes `guard-bench-<pid>` entries whose process is gone).

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::TcpListener,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{mpsc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

const PREFIX: &str = "guard-bench-";
const PIN_ROOT: &str = "/sys/fs/bpf";

/// What must go when we stop, however we stop.
struct Teardown {
    root: PathBuf,
    pin_dir: PathBuf,
    dir: PathBuf,
    pids: Vec<u32>,
}

static TEARDOWN: Mutex<Option<Teardown>> = Mutex::new(None);

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal stopped the run (its measurements are then not to be reported).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

pub(crate) fn track(pid: u32) {
    if let Some(t) = TEARDOWN.lock().unwrap().as_mut() {
        t.pids.push(pid);
    }
}

pub(crate) fn untrack(pid: u32) {
    if let Some(t) = TEARDOWN.lock().unwrap().as_mut() {
        t.pids.retain(|p| *p != pid);
    }
}

/// Removes everything this run created. Idempotent; safe to call from a signal-handling thread.
pub fn teardown() {
    let Some(t) = TEARDOWN.lock().unwrap().take() else {
        return;
    };
    for pid in &t.pids {
        // Only processes we started and have not reaped yet (untracked once waited for).
        // SAFETY: kill(2) on a pid we own.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
    remove_subtree(&t.root, &t.pin_dir);
    let _ = fs::remove_dir_all(&t.dir);
}

fn remove_subtree(root: &Path, pin_dir: &Path) {
    if root.exists() {
        // Every process in the subtree was started by the benchmark.
        let _ = fs::write(root.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while guard::kernel::cgroup::populated(root).unwrap_or(false) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
    // Links first (that detaches the programs), then the maps.
    if pin_dir.exists() {
        if let Err(e) = guard::kernel::unpin_all(pin_dir) {
            eprintln!(
                "guard-bench: warning: unpinning {}: {e:#}",
                pin_dir.display()
            );
        }
    }
    if root.exists() {
        if let Err(e) = guard::kernel::cgroup::remove(root) {
            eprintln!("guard-bench: warning: removing {}: {e}", root.display());
        }
    }
}

/// Removes what earlier runs left behind when they were killed outright: `guard-bench-<pid>`
/// cgroups, pin directories and temporary directories whose process no longer exists.
pub fn remove_stale(mount: &Path) {
    let dead = |name: &str| -> Option<u32> {
        let pid: u32 = name.strip_prefix(PREFIX)?.parse().ok()?;
        (!Path::new("/proc").join(pid.to_string()).exists()).then_some(pid)
    };
    let mut pids: Vec<u32> = Vec::new();
    for base in [mount, Path::new(PIN_ROOT), &std::env::temp_dir()] {
        for e in fs::read_dir(base).into_iter().flatten().flatten() {
            if let Some(pid) = dead(&e.file_name().to_string_lossy()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    for pid in pids {
        let name = format!("{PREFIX}{pid}");
        eprintln!("guard-bench: removing leftovers of an earlier run ({name})");
        remove_subtree(&mount.join(&name), &Path::new(PIN_ROOT).join(&name));
        let _ = fs::remove_dir_all(std::env::temp_dir().join(&name));
    }
}

/// Tears down on SIGINT, SIGTERM and SIGHUP, then exits (children in our process group get the
/// terminal's SIGINT too; the cgroup.kill catches the rest).
pub fn install_signal_teardown(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
            _ = hup.recv() => {},
        }
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("guard-bench: interrupted: removing the benchmark's cgroups and pins");
        let _ = tokio::task::spawn_blocking(teardown).await;
        std::process::exit(130);
    });
}

pub struct BenchEnv {
    pub name: String,
    /// `<mount>/guard-bench-<pid>`.
    pub root: PathBuf,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    /// A private copy of the daemon binary (a concurrent rebuild cannot swap it mid-run).
    pub bin: PathBuf,
    daemon: Option<Child>,
    /// RLIMIT_NOFILE soft limit for the daemon (as a unit's `LimitNOFILE=`); None: inherited.
    pub daemon_nofile: Option<u64>,
    /// `scope.containment` of the daemon's configuration.
    containment: &'static str,
    /// Whether the configuration names an agent (`[[agents]]`: the exec hooks on).
    agents: bool,
}

fn free_port() -> Result<u16> {
    // Free on both loopbacks when asked (the proxy binds 127.0.0.1 and [::1]).
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        if TcpListener::bind(("::1", port)).is_ok() || TcpListener::bind("[::1]:0").is_err() {
            return Ok(port);
        }
    }
    bail!("no free port for the proxy")
}

impl BenchEnv {
    /// `tls_root_pem`: the CA of the benchmark's TLS upstream, for the daemon's
    /// `tls.extra_roots`.
    pub fn new(guard_bin: &Path, mount: &Path, tls_root_pem: &str) -> Result<BenchEnv> {
        let name = format!("{PREFIX}{}", std::process::id());
        let root = mount.join(&name);
        let dir = std::env::temp_dir().join(&name);
        let pin_dir = Path::new(PIN_ROOT).join(&name);
        if root.exists() || pin_dir.exists() {
            bail!("{} or {} already exists", root.display(), pin_dir.display());
        }
        *TEARDOWN.lock().unwrap() = Some(Teardown {
            root: root.clone(),
            pin_dir: pin_dir.clone(),
            dir: dir.clone(),
            pids: Vec::new(),
        });
        // From here on, Drop (or a signal) removes whatever exists of it.
        let env = BenchEnv {
            port: free_port()?,
            config: dir.join("guard.toml"),
            bin: dir.join("guard"),
            name,
            root,
            dir,
            pin_dir,
            daemon: None,
            daemon_nofile: None,
            containment: "auto",
            agents: false,
        };
        for cg in [
            "daemon",
            "direct",
            "peers",
            "nginx",
            "guard.slice/bench",
            "guard.slice/plain",
        ] {
            guard::kernel::cgroup::create(&env.root.join(cg))?;
        }
        fs::create_dir_all(env.dir.join("policies"))?;
        fs::set_permissions(&env.dir, fs::Permissions::from_mode(0o755))?;
        fs::copy(guard_bin, &env.bin)
            .with_context(|| format!("copying {}", guard_bin.display()))?;
        fs::write(env.upstream_ca(), tls_root_pem)?;
        env.write_config()?;
        Ok(env)
    }

    /// `<mount>/guard-bench-<pid>/<rel>`.
    pub fn cgroup(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The CA of the benchmark's TLS upstream (what the direct side trusts).
    pub fn upstream_ca(&self) -> PathBuf {
        self.dir.join("upstream-ca.pem")
    }

    /// guard's interception CA (what the guarded side trusts); the daemon creates it at start.
    pub fn guard_ca(&self) -> PathBuf {
        self.dir.join("state/ca/guard-ca.pem")
    }

    fn write_config(&self) -> Result<()> {
        let text = format!(
            r#"# guard-bench: programs attach at this run's own cgroup, never higher.
[scope]
attach_cgroup = "{name}/guard.slice"
guarded_cgroups = ["{name}/guard.slice/bench"]
containment = "{containment}"
# Where BPF LSM is not on: the fullest confinement guard exec applies, measured as its cost.
exec_confinement = "landlock"

[proxy]
listen_port = {port}

[paths]
bpffs = "{pins}"
control_socket = "{dir}/guard.sock"
stdio_socket = "{dir}/stdio.sock"
state_dir = "{dir}/state"
audit_log = "{dir}/audit.jsonl"
policies = "{dir}/policies"

[tls]
extra_roots = ["{dir}/upstream-ca.pem"]

# Off: the default port (15002) may belong to an installed guard.
[metrics]
listen = ""
{agents}"#,
            name = self.name,
            containment = self.containment,
            port = self.port,
            pins = self.pin_dir.display(),
            dir = self.dir.display(),
            // A program no measurement runs: the exec hooks look every exec up, and match none.
            agents = if self.agents {
                format!(
                    "\n[[agents]]\nname = \"bench-agent\"\nexe = [\"{}/bench-agent\"]\n",
                    self.dir.display()
                )
            } else {
                String::new()
            },
        );
        fs::write(&self.config, text)?;
        Ok(())
    }

    pub fn write_policy(&self, file: &str, text: &str) -> Result<()> {
        fs::write(self.dir.join("policies").join(file), text)?;
        Ok(())
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Starts the daemon in `daemon/` and waits until `guard status` answers.
    pub fn start_daemon(&mut self) -> Result<u32> {
        let log = fs::File::create(self.dir.join("daemon.log"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .env("GUARD_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        in_cgroup(&mut cmd, &self.cgroup("daemon"));
        if let Some(soft) = self.daemon_nofile {
            // SAFETY: only getrlimit/setrlimit (async-signal-safe) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut r = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    r.rlim_cur = soft.min(r.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().context("starting the guard daemon")?;
        let pid = child.id();
        track(pid);
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait()? {
                untrack(pid);
                self.daemon = None;
                bail!(
                    "guard daemon exited with {st} at start:\n{}",
                    self.daemon_log()
                );
            }
            if self.status().is_ok() {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not answer within 30 s:\n{}",
                    self.daemon_log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts the daemon with `scope.containment = mode` (`"auto"`, `"off"`).
    /// Restarts the daemon with `[[agents]]` naming a program (the exec hooks on), or none.
    pub fn restart_with_agents(&mut self, on: bool) -> Result<u32> {
        if on {
            let agent = self.dir.join("bench-agent");
            if !agent.exists() {
                fs::copy("/bin/true", &agent)?;
            }
        }
        self.agents = on;
        self.write_config()?;
        self.restart_daemon()
    }

    pub fn restart_with_containment(&mut self, mode: &'static str) -> Result<u32> {
        self.containment = mode;
        self.write_config()?;
        self.restart_daemon()
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 5 s) and starts a fresh one; the pinned
    /// programs keep redirecting in between (guarded connects are refused meanwhile).
    pub fn restart_daemon(&mut self) -> Result<u32> {
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(d.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = d.kill();
                    let _ = d.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            untrack(d.id());
        }
        self.start_daemon()
    }

    /// Fails when the daemon has exited (it is then a zombie until Drop reaps it).
    pub fn check_daemon(&self) -> Result<()> {
        let Some(d) = self.daemon.as_ref() else {
            bail!("the guard daemon is not running");
        };
        let stat = fs::read_to_string(format!("/proc/{}/stat", d.id())).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some('Z') | Some('X')) {
            bail!("the guard daemon exited:\n{}", self.daemon_log());
        }
        Ok(())
    }

    /// `guard status --json`.
    pub fn status(&self) -> Result<Value> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .args(["status", "--json"]);
        let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
        if !out.0 {
            bail!("guard status failed: {}", out.2);
        }
        serde_json::from_str(&out.1).context("guard status --json is not JSON")
    }

    /// The kernel's count of redirected connects.
    pub fn redirected(&self) -> Result<u64> {
        self.status()?["counters"]["redirected"]
            .as_u64()
            .ok_or_else(|| anyhow!("guard status has no counters.redirected"))
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
            untrack(d.id());
        }
        teardown();
    }
}

/// Makes `cmd` start inside cgroup `path` (it moves itself there before exec).
pub fn in_cgroup(cmd: &mut Command, path: &Path) {
    let procs = std::ffi::CString::new(path.join("cgroup.procs").to_string_lossy().as_bytes())
        .expect("cgroup path without NUL");
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
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

/// Runs `cmd` to completion within `limit`: (success, stdout, stderr). Killed when late.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(bool, String, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    track(child.id());
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    untrack(child.id());
    let (out, err) = (t1.join().unwrap_or_default(), t2.join().unwrap_or_default());
    match status {
        Some(s) => Ok((s.success(), out, err)),
        None => bail!(
            "{:?} did not finish within {limit:?}; stderr: {err}",
            cmd.get_program()
        ),
    }
}

/// Runs a worker (this binary, `worker SPEC`) in `cgroup` and returns its JSON result.
pub fn run_worker(cgroup: &Path, spec: &Value, limit: Duration) -> Result<Value> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("worker").arg(spec.to_string());
    in_cgroup(&mut cmd, cgroup);
    let (ok, out, err) = run_bounded(&mut cmd, limit)?;
    if !ok {
        bail!("worker {} failed: {}", spec["kind"], err.trim());
    }
    let line = out
        .lines()
        .last()
        .ok_or_else(|| anyhow!("worker {} printed nothing", spec["kind"]))?;
    serde_json::from_str(line).with_context(|| format!("worker output {line:?}"))
}

/// A worker holding connections open until released.
pub struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub held: Value,
}

impl Holder {
    /// Starts a `hold_*` worker in `cgroup` and waits (at most `limit`) until it holds them all.
    pub fn start(cgroup: &Path, spec: &Value, limit: Duration) -> Result<Holder> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("worker")
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        in_cgroup(&mut cmd, cgroup);
        let mut child = cmd.spawn().context("starting a hold worker")?;
        track(child.id());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut h = Holder {
            child,
            stdin,
            lines,
            held: Value::Null,
        };
        match h.lines.recv_timeout(limit) {
            Ok(line) => {
                h.held = serde_json::from_str(&line)
                    .with_context(|| format!("hold worker said {line:?}"))?;
                Ok(h)
            }
            Err(_) => {
                let _ = h.child.kill();
                bail!(
                    "hold worker {} did not hold its connections within {limit:?}",
                    spec["kind"]
                )
            }
        }
    }

    /// Closes its stdin: it closes every connection and exits.
    pub fn release(mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait()? {
                untrack(self.child.id());
                if !st.success() {
                    bail!("hold worker exited with {st}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("hold worker did not exit within 20 s of its release");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        untrack(self.child.id());
    }
}

/// A long-running helper process (an MCP peer) in `cgroup`, killed on drop.
pub struct Peer {
    child: Child,
    pub first_line: String,
}

impl Peer {
    /// Starts `cmd` in `cgroup` and waits (at most `limit`) for the first stdout line starting
    /// with `ready`.
    pub fn start(
        mut cmd: Command,
        cgroup: &Path,
        ready: &str,
        log: &Path,
        limit: Duration,
    ) -> Result<Peer> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log)?);
        in_cgroup(&mut cmd, cgroup);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        track(child.id());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let want = ready.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with(&want) {
                    let _ = tx.send(line);
                }
            }
        });
        let mut p = Peer {
            child,
            first_line: String::new(),
        };
        match rx.recv_timeout(limit) {
            Ok(line) => {
                p.first_line = line;
                Ok(p)
            }
            Err(_) => bail!(
                "{:?} did not print {ready:?} within {limit:?}: {}",
                cmd.get_program(),
                fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack(self.child.id());
    }
}

/// The soft "Max open files" of `pid`.
pub fn nofile(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// VmRSS and VmHWM of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok((
        field("VmRSS:").ok_or_else(|| anyhow!("no VmRSS for {pid}"))?,
        field("VmHWM:").unwrap_or(0),
    ))
}
