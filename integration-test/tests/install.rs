//! Installation: dist/guard.service passes `systemd-analyze verify`, and `cargo xtask install`
//! into a staging root gives a daemon that enforces with the unit's capabilities only, which
//! `cargo xtask uninstall` then stops and removes completely (pins, cgroups, binary, unit),
//! keeping the configuration and the audit log.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use guard_testkit::{process::*, root::*, servers::*};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn unit_text() -> String {
    fs::read_to_string(repo().join("dist/guard.service")).unwrap()
}

/// The value of a unit setting (all its lines, space-joined).
fn unit_setting(unit: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo xtask ARGS...` from the repository (builds xtask when needed).
fn xtask(args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo()).arg("xtask").args(args);
    run(&mut cmd, Duration::from_secs(600))
}

fn xtask_ok(args: &[&str]) -> String {
    let out = xtask(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "cargo xtask {args:?} failed with {}\nstdout: {}\nstderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
    );
    stderr
}

/// A staging root below the temporary directory, removed on drop.
struct Staging(PathBuf);

impl Staging {
    fn new() -> Staging {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "guard-install-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // guard exec runs the installed binary as an unprivileged user.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Staging(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The installed daemon, started by hand; killed on drop if uninstall did not stop it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A unit command line (`ExecStart=`, `ExecStartPre=`): its prefix characters (`+`, `-`, ...)
/// and its arguments, unquoted the way systemd does (single and double quotes, backslash
/// escapes, whitespace between words).
fn unit_command(line: &str) -> (String, Vec<String>) {
    let line = line.trim_start();
    let prefix: String = line.chars().take_while(|c| "+-!:@|".contains(*c)).collect();
    let mut args = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = line[prefix.len()..].chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if let Some(w) = cur.take() {
                    args.push(w);
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.get_or_insert_with(String::new);
            }
            (Some(q), c) if c == q => quote = None,
            (_, '\\') => {
                let next = chars.next().expect("a unit line ends in a backslash");
                cur.get_or_insert_with(String::new).push(next);
            }
            (_, c) => cur.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {line}");
    args.extend(cur);
    (prefix, args)
}

/// Every line of a unit setting (`ExecStartPre=` may come several times), in order.
fn unit_lines(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// systemd starts a service's commands with an environment of its own (not the caller's): a
/// fixed PATH plus the unit's `Environment=` assignments.
fn service_environment(unit: &str, cmd: &mut Command) {
    cmd.env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for assignment in unit_lines(unit, "Environment") {
        for word in unit_command(&assignment).1 {
            let (k, v) = word.split_once('=').expect("Environment= takes KEY=VALUE");
            cmd.env(k, v);
        }
    }
}

/// `cmd` confined as the unit confines the daemon: the unit's capability bounding set, no new
/// privileges, its resource limits, umask and environment.
fn confine(unit: &str, cmd: Command) -> Command {
    let caps: Vec<String> = unit_setting(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg("--bounding-set")
        .arg(format!("-all,{}", caps.join(",")));
    if unit_setting(unit, "NoNewPrivileges") == "yes" {
        wrapped.arg("--no-new-privs");
    }
    wrapped
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    service_environment(unit, &mut wrapped);
    let limit = |key: &str| -> Option<u64> {
        let v = unit_setting(unit, key);
        (!v.is_empty()).then(|| {
            if v == "infinity" {
                libc::RLIM_INFINITY
            } else {
                v.parse().unwrap_or_else(|_| panic!("{key}={v}"))
            }
        })
    };
    let nofile = limit("LimitNOFILE");
    let memlock = limit("LimitMEMLOCK");
    let umask = u32::from_str_radix(&unit_setting(unit, "UMask"), 8).ok();
    // SAFETY: only async-signal-safe calls (setrlimit, umask) between fork and exec.
    unsafe {
        wrapped.pre_exec(move || {
            for (res, v) in [
                (libc::RLIMIT_NOFILE, nofile),
                (libc::RLIMIT_MEMLOCK, memlock),
            ] {
                if let Some(v) = v {
                    // Up to the hard limit this test runs with: raising that needs
                    // CAP_SYS_RESOURCE, which systemd has and a test may not.
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(res, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let v = v.min(lim.rlim_max);
                    lim.rlim_cur = v;
                    lim.rlim_max = v;
                    if libc::setrlimit(res, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if let Some(m) = umask {
                libc::umask(m as libc::mode_t);
            }
            Ok(())
        });
    }
    wrapped
}

/// The unit's `ExecStartPre=` steps, run as systemd runs them before every start: `+` with full
/// privileges, others confined like the daemon; a failure fails the start unless `-`.
fn run_start_pre(unit: &str) {
    for line in unit_lines(unit, "ExecStartPre") {
        let (prefix, args) = unit_command(&line);
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..]);
        let mut cmd = if prefix.contains('+') {
            service_environment(unit, &mut cmd);
            cmd
        } else {
            confine(unit, cmd)
        };
        let out = run(&mut cmd, Duration::from_secs(60));
        assert!(
            out.status.success() || prefix.contains('-'),
            "ExecStartPre={line} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Starts the installed daemon as the unit would: first its `ExecStartPre=` steps, then its
/// `ExecStart=` command line (absolute paths that exist below the staging root taken from
/// there), confined like the unit, in its own cgroup. Waits until it answers.
fn start_installed(env: &Env, stage: &Staging, log_path: &Path) -> (Daemon, serde_json::Value) {
    let unit = unit_text();
    run_start_pre(&unit);
    let exec_start = unit_lines(&unit, "ExecStart");
    assert_eq!(exec_start.len(), 1, "one ExecStart= line");
    let (_, args) = unit_command(&exec_start[0]);
    let staged = |a: &String| -> String {
        let p = stage.0.join(a.trim_start_matches('/'));
        if a.starts_with('/') && p.exists() {
            p.display().to_string()
        } else {
            a.clone()
        }
    };
    let args: Vec<String> = args.iter().map(staged).collect();
    assert_eq!(
        Path::new(&args[0]),
        env.bin.as_path(),
        "ExecStart= runs the installed binary"
    );
    let mut daemon_cmd = Command::new(&args[0]);
    daemon_cmd.args(&args[1..]);
    let mut cmd = confine(&unit, daemon_cmd);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    cmd.env_remove("GUARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    in_cgroup(&mut cmd, &env.cgroup("daemon"));
    let mut daemon = Daemon(spawn(&mut cmd).expect("starting the installed daemon"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            panic!(
                "the installed daemon exited with {s}:\n{}",
                fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        if let Some(status) = env.try_status() {
            return (daemon, status);
        }
        assert!(
            Instant::now() < deadline,
            "no answer within 30 s:\n{}",
            fs::read_to_string(log_path).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unit_command_lines_are_split_as_systemd_splits_them() {
    assert_eq!(
        unit_command(r#"+/bin/sh -c 'a || b "c"' x\ y"#),
        (
            "+".to_string(),
            vec![
                "/bin/sh".to_string(),
                "-c".into(),
                r#"a || b "c""#.into(),
                "x y".into()
            ]
        )
    );
    assert_eq!(unit_command("-/bin/true").0, "-");
    // The unit's own pre-start steps parse (and run a program that exists).
    for line in unit_lines(&unit_text(), "ExecStartPre") {
        let (_, args) = unit_command(&line);
        assert!(Path::new(&args[0]).exists(), "{line}");
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    // verify insists that the binary exists: point ExecStart at the one just built.
    let unit = unit_text();
    assert!(unit.contains("ExecStart=/usr/local/bin/guard "));
    let stage = Staging::new();
    let path = stage.path("guard.service");
    fs::write(
        &path,
        unit.replace("/usr/local/bin/guard", bin_path("guard").to_str().unwrap()),
    )
    .unwrap();
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // Unknown keys, capabilities or syscall groups are only warnings: none may name the unit.
    assert!(
        !text.contains("guard.service"),
        "systemd-analyze verify complains:\n{text}"
    );

    // The sandbox stays tight (2.9 when written; 10 is fully exposed).
    let out = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
            .arg(&path),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 4.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The settings the daemon depends on (README "Installation" explains each).
    for (key, value) in [
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "always"),
        ("RuntimeDirectory", "guard"),
        ("StateDirectory", "guard"),
        ("LogsDirectory", "guard"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/sys/fs/cgroup /sys/fs/bpf"),
    ] {
        assert_eq!(unit_setting(&unit, key), value, "{key}=");
    }
    for absent in [
        "Delegate",
        "PrivateNetwork",
        "ProtectControlGroups",
        "PrivateUsers",
    ] {
        assert!(
            !unit.lines().any(|l| l.starts_with(&format!("{absent}="))),
            "{absent}= breaks the daemon"
        );
    }
    assert!(unit_setting(&unit, "SystemCallFilter")
        .split(' ')
        .any(|s| s == "bpf"));
}

#[test]
fn install_start_and_uninstall_in_a_staging_root() {
    // Test-only cgroups, pins, socket, state, audit log and port (the harness's configuration).
    let mut env = Env::new("");
    let stage = Staging::new();
    let config_text = fs::read_to_string(&env.config_path).unwrap();
    let installed_bin = stage.path("usr/local/bin/guard");
    let installed_config = stage.path("etc/guard/guard.toml");
    let policies = stage.path("etc/guard/policies");
    let unit = stage.path("etc/systemd/system/guard.service");
    let started = Instant::now();
    let built = bin_path("guard");

    let install = [
        "install",
        "--root",
        stage.arg(),
        "--config",
        env.config_path.to_str().unwrap(),
        "--binary",
        built.to_str().unwrap(),
        "--no-start",
    ];
    xtask_ok(&install);
    let build_time = started.elapsed();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(fs::read(&installed_bin).unwrap(), fs::read(&built).unwrap());
    assert_eq!(mode(&installed_bin), 0o755);
    assert_eq!(fs::read_to_string(&installed_config).unwrap(), config_text);
    assert_eq!(mode(&installed_config), 0o644);
    assert_eq!(fs::read_to_string(&unit).unwrap(), unit_text());
    for e in fs::read_dir(repo().join("policies")).unwrap().flatten() {
        let name = e.file_name();
        if e.path().extension().is_some_and(|x| x == "json") {
            assert_eq!(
                fs::read(policies.join(&name)).unwrap(),
                fs::read(e.path()).unwrap(),
                "{name:?}"
            );
        } else {
            assert!(!policies.join(&name).exists(), "{name:?} is not a policy");
        }
    }

    // A second install is harmless: the configuration and policies are kept as edited.
    let edited = format!("{config_text}\n# edited by the operator\n");
    fs::write(&installed_config, &edited).unwrap();
    fs::write(policies.join("everything.json"), "{\"version\": \"1\"}\n").unwrap();
    let second = xtask_ok(&install);
    assert!(second.contains("kept"), "{second}");
    assert_eq!(fs::read_to_string(&installed_config).unwrap(), edited);
    assert_eq!(
        fs::read_to_string(policies.join("everything.json")).unwrap(),
        "{\"version\": \"1\"}\n"
    );
    assert!(installed_bin.exists());

    // Start the installed daemon by hand as the unit would: its own cgroup, the unit's
    // capability bounding set and no new privileges; it loads the installed policies.
    fs::remove_dir_all(env.dir.join("policies")).unwrap();
    std::os::unix::fs::symlink(&policies, env.dir.join("policies")).unwrap();
    env.bin = installed_bin.clone();
    env.config_path = installed_config.clone();
    let log_path = env.dir.join("daemon.log");
    let daemon_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let (mut daemon, status) = start_installed(&env, &stage, &log_path);
    let pid = daemon.0.id();
    assert_eq!(status["pid"], pid);
    let proc_status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        proc_status.contains("NoNewPrivs:\t1"),
        "the daemon runs as the unit would"
    );

    // It enforces: every program attached at the test's attach cgroup, and a guarded curl of an
    // unprivileged user goes through the proxy, attributed down to its executable (that needs
    // CAP_SYS_PTRACE, which the unit keeps for this).
    let attached: usize = env.attached().values().map(Vec::len).sum();
    assert!(attached > 0);
    assert_eq!(status["programs_attached"], attached);
    assert_eq!(status["enforcing"], true);
    assert_eq!(
        status["attach_cgroup"],
        env.attach_path().display().to_string()
    );
    let server = HttpServer::start("127.0.0.2:0");
    let url = server.url();
    let mut curl = env.exec(
        "install-test",
        &["curl", "-sS", "--max-time", "10", url.as_str()],
    );
    as_user(&mut curl, NOBODY, NOBODY);
    assert_eq!(run_ok(&mut curl), "hello from the test server\n");
    let record = env
        .audit_connections()
        .into_iter()
        .find(|r| r["original_dst"] == server.addr.to_string())
        .unwrap_or_else(|| panic!("no connection record:\n{:#?}", env.audit()));
    assert_eq!(record["decision"], "pass");
    assert_eq!(record["agent"]["uid"], NOBODY);
    assert!(
        record["agent"]["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("/curl")),
        "{record:#}"
    );
    // Restarted (as systemd does: SIGTERM, start), it reuses the pinned links with these
    // capabilities too.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let stopped = daemon.0.wait().unwrap();
    assert!(stopped.success(), "{stopped}:\n{}", daemon_log());
    assert!(env.pin_dir.join("links").exists());
    (daemon, _) = start_installed(&env, &stage, &log_path);
    assert!(
        daemon_log().contains("newly_attached=0 reused=11 updated=0"),
        "{}",
        daemon_log()
    );
    assert_eq!(env.status()["programs_attached"], attached);

    // An empty agent cgroup left by a daemon that died: uninstall removes it too.
    let leftover = env.attach_path().join("agent-leftover-99");
    fs::create_dir(&leftover).unwrap();

    // Uninstall: stops the daemon, unpins, removes the cgroups, the binary and the unit.
    let out = xtask_ok(&[
        "uninstall",
        "--root",
        stage.arg(),
        "--config",
        installed_config.to_str().unwrap(),
    ]);
    let exited = daemon.0.try_wait().unwrap();
    assert!(
        exited.is_some_and(|s| s.success()),
        "the daemon was not stopped cleanly ({exited:?}):\n{out}\n{}",
        daemon_log()
    );
    assert!(
        !env.pin_dir.exists(),
        "pins left: {:?}\n{out}",
        fs::read_dir(&env.pin_dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    assert!(!leftover.exists(), "{out}");
    assert!(
        !env.attach_path().exists(),
        "the attach cgroup is left:\n{out}"
    );
    assert!(!installed_bin.exists());
    assert!(!unit.exists());
    // Kept: configuration, policies, audit log (with the stop and the disable in it).
    assert_eq!(fs::read_to_string(&installed_config).unwrap(), edited);
    assert!(policies.join("example-flux.json").exists());
    let events: Vec<String> = env
        .audit()
        .iter()
        .filter_map(|r| r["event"].as_str().map(String::from))
        .collect();
    for e in ["daemon_start", "daemon_stop", "disable"] {
        assert!(events.iter().any(|x| x == e), "no {e} in {events:?}");
    }
    // Nothing of guard's is attached anywhere below the test's cgroup any more.
    assert!(env.root.exists());
    for e in fs::read_dir(&env.root).unwrap().flatten() {
        if e.path().is_dir() {
            let left = guard::kernel::attached_programs(&e.path()).unwrap();
            assert!(
                left.values().all(Vec::is_empty),
                "{}: {left:?}",
                e.path().display()
            );
        }
    }

    // Uninstalling again is harmless; --purge then removes the configuration too.
    xtask_ok(&[
        "uninstall",
        "--root",
        stage.arg(),
        "--config",
        installed_config.to_str().unwrap(),
    ]);
    assert!(installed_config.exists());
    let purge_config = env.dir.join("purge.toml");
    fs::copy(&installed_config, &purge_config).unwrap();
    let out = xtask_ok(&[
        "uninstall",
        "--root",
        stage.arg(),
        "--config",
        purge_config.to_str().unwrap(),
        "--purge",
    ]);
    assert!(!stage.path("etc/guard").exists(), "{out}");
    assert!(
        env.audit_log.exists(),
        "the audit log is not below the root"
    );
    eprintln!(
        "install test: first install {build_time:?}, all {:?}",
        started.elapsed()
    );
}
