//! `cargo xtask install` and `cargo xtask uninstall` (README "Installation").
//!
//! Everything is written below `--root` (default `/`), so a staging root can be installed and
//! inspected without touching the host. Only with `--root /` does install create the approvers
//! group, create the CA and talk to systemd.

use std::{
    env, fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::{build, is_root, repo_root, setup, status, which};

const BIN: &str = "usr/local/bin/guard";
const CONFIG: &str = "etc/guard/guard.toml";
const POLICIES: &str = "etc/guard/policies";
const UNIT: &str = "etc/systemd/system/guard.service";
const UNIT_WANTS: &str = "etc/systemd/system/multi-user.target.wants/guard.service";
/// Removed by `uninstall --purge` (configuration, state, audit logs).
const PURGED: [&str; 3] = ["etc/guard", "var/lib/guard", "var/log/guard"];
const DEFAULT_CONFIG: &str = include_str!("../../guard/src/default.toml");

#[derive(Args)]
pub struct InstallArgs {
    /// Install below this directory instead of `/` (a staging root: no group, CA or systemd).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Configuration to install as /etc/guard/guard.toml (default: the embedded defaults). An
    /// existing /etc/guard/guard.toml is never replaced.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Neither enable nor start the service (systemd only gets a `daemon-reload`).
    #[arg(long)]
    no_start: bool,
    /// Install this guard binary instead of building one (`cargo build --release -p guard`).
    #[arg(long, value_name = "FILE")]
    binary: Option<PathBuf>,
}

#[derive(Args)]
pub struct UninstallArgs {
    /// The root the installation is below.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The configuration the installed daemon runs with (default: ROOT/etc/guard/guard.toml).
    /// Below a staging root, the daemon, pins and cgroups are only touched with this given.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also remove /etc/guard, /var/lib/guard (state, CA) and /var/log/guard (audit logs).
    #[arg(long)]
    purge: bool,
}

/// `ROOT/rel`.
fn under(root: &Path, rel: &str) -> PathBuf {
    root.join(rel)
}

fn is_host(root: &Path) -> bool {
    root.canonicalize().is_ok_and(|r| r == Path::new("/"))
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// Runs this xtask again under sudo with `args` (for `--root /` without root).
fn with_sudo(args: Vec<std::ffi::OsString>) -> Result<()> {
    if which("sudo").is_none() {
        bail!("changing / needs root; run this as root");
    }
    eprintln!("xtask: changing / needs root; continuing with sudo");
    status(
        Command::new("sudo")
            .arg("--preserve-env=GUARD_LOG")
            .arg(env::current_exe()?)
            .args(args),
    )
}

pub fn install(a: InstallArgs) -> Result<()> {
    let root = a.root.clone();
    let binary = match &a.binary {
        Some(b) => b.clone(),
        None => {
            setup()?;
            build(true)?;
            repo_root().join("target/release/guard")
        }
    };
    if is_host(&root) && !is_root() {
        let mut args: Vec<std::ffi::OsString> = vec!["install".into(), "--binary".into()];
        args.push(binary.canonicalize()?.into());
        if let Some(c) = &a.config {
            args.push("--config".into());
            args.push(c.canonicalize()?.into());
        }
        if a.no_start {
            args.push("--no-start".into());
        }
        return with_sudo(args);
    }
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    if !version.status.success() {
        bail!("{} --version failed", binary.display());
    }
    eprintln!(
        "xtask: installing {} into {}",
        String::from_utf8_lossy(&version.stdout).trim(),
        root.display()
    );

    // The binary: replaced by a rename, so a running daemon keeps its old copy (no ETXTBSY).
    let bin = under(&root, BIN);
    install_file(&fs::read(&binary)?, &bin, 0o755)?;
    eprintln!("  {}", bin.display());

    // The configuration: never replaced.
    let config = under(&root, CONFIG);
    mkdir(config.parent().unwrap(), 0o755)?;
    if config.exists() {
        eprintln!("  {} (kept: it exists)", config.display());
    } else {
        let text = match &a.config {
            Some(c) => fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            None => DEFAULT_CONFIG.as_bytes().to_vec(),
        };
        install_file(&text, &config, 0o644)?;
        eprintln!("  {}", config.display());
    }

    // The example policies: existing files are kept.
    let policies = under(&root, POLICIES);
    mkdir(&policies, 0o755)?;
    let mut names: Vec<PathBuf> = fs::read_dir(repo_root().join("policies"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    for src in names {
        let dst = policies.join(src.file_name().unwrap());
        if dst.exists() {
            eprintln!("  {} (kept: it exists)", dst.display());
        } else {
            install_file(&fs::read(&src)?, &dst, 0o644)?;
            eprintln!("  {}", dst.display());
        }
    }

    // The unit: ours, always replaced (local changes belong in drop-ins: systemctl edit guard).
    let unit = under(&root, UNIT);
    mkdir(unit.parent().unwrap(), 0o755)?;
    install_file(
        &fs::read(repo_root().join("dist/guard.service"))?,
        &unit,
        0o644,
    )?;
    eprintln!("  {}", unit.display());

    // The installed binary validates what was installed: the configuration and the policies.
    let check = Command::new(&bin)
        .env_remove("GUARD_CONFIG")
        .arg("--config")
        .arg(&config)
        .args(["policy", "check"])
        .arg(&policies)
        .output()?;
    if !check.status.success() {
        bail!(
            "the installed configuration or policies are invalid ({} / {}):\n{}{}",
            config.display(),
            policies.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }

    let settings = Settings::load(Some(&config))?;
    if !is_host(&root) {
        eprintln!(
            "xtask: staging root: the group `{}`, the CA and the service are left to the target \
             (install there with --root /; the daemon creates its CA at first start)",
            settings.approvers_group
        );
        return Ok(());
    }

    // The approvers group.
    let group = &settings.approvers_group;
    let known = Command::new("getent")
        .args(["group", group])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if known {
        eprintln!("  group {group} (exists)");
    } else {
        status(Command::new("groupadd").args(["--system", group]))?;
        eprintln!("  group {group} (created)");
    }

    // The interception CA, once (`guard ca init` refuses to replace one; so do we).
    let guard = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.env_remove("GUARD_CONFIG")
            .arg("--config")
            .arg(&config)
            .args(args);
        c
    };
    let help = guard(&["--help"]).output()?;
    let has_ca = String::from_utf8_lossy(&help.stdout)
        .lines()
        .any(|l| l.trim_start().starts_with("ca "));
    if !has_ca {
        eprintln!("  CA: this guard has no `guard ca` yet; skipped");
    } else if guard(&["ca", "export"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success()
    {
        eprintln!("  CA: kept (it exists)");
    } else {
        status(&mut guard(&["ca", "init"]))?;
        eprintln!("  CA: created; `guard ca install` adds it to the system trust store");
    }

    if systemd_running() {
        status(Command::new("systemctl").arg("daemon-reload"))?;
        if a.no_start {
            eprintln!("xtask: installed; start it with: systemctl enable --now guard");
        } else {
            let active = Command::new("systemctl")
                .args(["is-active", "--quiet", "guard.service"])
                .status()
                .is_ok_and(|s| s.success());
            status(Command::new("systemctl").args(["enable", "--now", "guard.service"]))?;
            if active {
                // Picks up the new binary; the pinned programs enforce across the restart.
                status(Command::new("systemctl").args(["restart", "guard.service"]))?;
            }
            eprintln!("xtask: guard.service is enabled and running; `guard status` shows it");
        }
    } else {
        let running = daemon_status(&bin, Some(&config));
        if let Some(s) = &running {
            eprintln!(
                "xtask: a guard daemon (pid {}) is running: restart it to run the new binary",
                s.pid.unwrap_or(0)
            );
        }
        let mount = cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let cg = mount.join("guard-daemon");
        eprintln!(
            "xtask: systemd is not running here, so nothing was started. Start the daemon by hand, \
             in a cgroup of its own (every process in the daemon's cgroup escapes the redirect):\n\
             \n  mkdir -p {cg} /var/log/guard && sh -c 'echo $$ > {cg}/cgroup.procs && exec {bin} --config {config} daemon' >>/var/log/guard/daemon.log 2>&1 &\n",
            cg = cg.display(),
            bin = Path::new("/").join(BIN).display(),
            config = Path::new("/").join(CONFIG).display(),
        );
    }
    Ok(())
}

pub fn uninstall(a: UninstallArgs) -> Result<()> {
    let root = a.root.clone();
    if is_host(&root) && !is_root() {
        let mut args: Vec<std::ffi::OsString> = vec!["uninstall".into()];
        if let Some(c) = &a.config {
            args.push("--config".into());
            args.push(c.canonicalize()?.into());
        }
        if a.purge {
            args.push("--purge".into());
        }
        return with_sudo(args);
    }
    let bin = under(&root, BIN);
    let bin = bin.exists().then_some(bin);
    let config = match &a.config {
        Some(c) => Some(c.clone()),
        None => Some(under(&root, CONFIG)).filter(|c| c.exists()),
    };
    // Without a file the daemon runs with the embedded defaults.
    let settings = Settings::load(config.as_deref())?;
    let mut leftovers: Vec<String> = Vec::new();
    // The daemon, pins and cgroups are the host's. For a staging root they are touched only when
    // --config names the configuration a daemon runs with: its paths are the host's, and the
    // staged default configuration's are the real /sys/fs/bpf/guard, guard.slice, ...
    if is_host(&root) || a.config.is_some() {
        stop_and_detach(
            &root,
            bin.as_deref(),
            config.as_deref(),
            &settings,
            &mut leftovers,
        )?;
    } else {
        eprintln!(
            "xtask: staging root without --config: only its files are removed (name the \
             configuration a daemon runs with, --config, to stop it and remove its pins and cgroups)"
        );
    }

    // 5. The binary and the unit.
    for rel in [BIN, UNIT, UNIT_WANTS] {
        let p = under(&root, rel);
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            eprintln!("xtask: removed {}", p.display());
        }
    }
    if is_host(&root) && systemd_running() {
        let _ = Command::new("systemctl").arg("daemon-reload").status();
        let _ = Command::new("systemctl")
            .args(["reset-failed", "guard.service"])
            .stderr(Stdio::null())
            .status();
    }

    // 6. Configuration, state and audit logs: kept unless --purge.
    let elsewhere: Vec<&String> = [&settings.state_dir, &settings.audit_log]
        .into_iter()
        .filter(|p| {
            Path::new(p).exists()
                && !PURGED
                    .iter()
                    .any(|d| Path::new(p).starts_with(under(&root, d)))
        })
        .collect();
    if a.purge {
        for d in PURGED {
            let p = under(&root, d);
            if p.exists() {
                fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
                eprintln!("xtask: removed {}", p.display());
            }
        }
        for p in elsewhere {
            eprintln!("xtask: kept {p} (outside the standard directories; remove it by hand)");
        }
    } else {
        let kept: Vec<String> = PURGED
            .iter()
            .map(|d| under(&root, d))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .chain(elsewhere.into_iter().cloned())
            .collect();
        if !kept.is_empty() {
            eprintln!(
                "xtask: kept {} (uninstall --purge removes the standard directories)",
                kept.join(", ")
            );
        }
    }
    if is_host(&root) {
        eprintln!(
            "xtask: the group {} is kept (groupdel {0} removes it)",
            settings.approvers_group
        );
    }
    if !leftovers.is_empty() {
        bail!(
            "guard is uninstalled, but left behind: {}",
            leftovers.join("; ")
        );
    }
    eprintln!("xtask: guard is uninstalled");
    Ok(())
}

/// Steps 1-4 of uninstall: stop the daemon, unpin everything, remove the attach cgroup.
fn stop_and_detach(
    root: &Path,
    bin: Option<&Path>,
    config: Option<&Path>,
    settings: &Settings,
    leftovers: &mut Vec<String>,
) -> Result<()> {
    // 1. What the running daemon says (its attach point), before stopping it.
    let running = bin.and_then(|b| daemon_status(b, config));
    let mount = cgroup2_mount()?;
    let attach = match running.as_ref().and_then(|s| s.attach_cgroup.clone()) {
        Some(p) => PathBuf::from(p),
        None => mount.join(settings.attach_cgroup.trim_matches('/')),
    };

    // 2. Stop the daemon: the service when systemd runs it, else the process behind the socket.
    if is_host(root) && systemd_running() && under(root, UNIT).exists() {
        eprintln!("xtask: systemctl disable --now guard.service");
        if let Err(e) =
            status(Command::new("systemctl").args(["disable", "--now", "guard.service"]))
        {
            eprintln!("xtask: warning: {e:#}");
        }
    }
    if let Some(b) = bin {
        if let Some(pid) = daemon_status(b, config).and_then(|s| s.pid) {
            stop_process(pid)?;
        }
    }

    // 3. Unpin every link and map: the programs detach, guarded processes connect directly.
    match bin {
        Some(b) => {
            let mut c = Command::new(b);
            c.env_remove("GUARD_CONFIG");
            if let Some(cfg) = config {
                c.arg("--config").arg(cfg);
            }
            status(c.arg("disable"))?;
        }
        None => {
            // The binary is gone already (an earlier, interrupted uninstall): unpin by hand.
            // Removing the last reference to a pinned link detaches its program.
            let pins = PathBuf::from(&settings.bpffs);
            let (links, progs) = (pins.join("links"), pins.join("progs"));
            for dir in [&links, &progs, &pins] {
                for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                    if !e.file_type().is_ok_and(|t| t.is_dir()) {
                        fs::remove_file(e.path())?;
                        eprintln!("xtask: unpinned {}", e.path().display());
                    }
                }
                ignore_missing(fs::remove_dir(dir))?;
            }
        }
    }
    if Path::new(&settings.bpffs).exists() {
        leftovers.push(format!("pins in {}", settings.bpffs));
    }

    // 4. The attach cgroup and the empty agent cgroups below it (never the cgroup v2 root).
    remove_attach_cgroup(&mount, &attach, leftovers)?;

    Ok(())
}

fn remove_attach_cgroup(mount: &Path, attach: &Path, leftovers: &mut Vec<String>) -> Result<()> {
    let Ok(rel) = attach.strip_prefix(mount) else {
        bail!(
            "the attach cgroup {} is not below the cgroup v2 mount {}",
            attach.display(),
            mount.display()
        );
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("refusing the attach cgroup {}", attach.display());
    }
    if !attach.exists() {
        return Ok(());
    }
    for e in fs::read_dir(attach)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("agent-") || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if populated(&e.path()) {
            leftovers.push(format!(
                "{} still has processes (no longer guarded; remove it once they exit)",
                e.path().display()
            ));
            continue;
        }
        match remove_cgroup(&e.path()) {
            Ok(()) => eprintln!("xtask: removed {}", e.path().display()),
            Err(err) => leftovers.push(format!("{}: {err}", e.path().display())),
        }
    }
    if rel.as_os_str().is_empty() {
        // Attached at the root: there is no attach cgroup of ours to remove.
        return Ok(());
    }
    match fs::remove_dir(attach) {
        Ok(()) => eprintln!("xtask: removed {}", attach.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => leftovers.push(format!("{}: {e}", attach.display())),
    }
    Ok(())
}

/// Removes an empty cgroup and its empty children (rmdir only: a cgroup with processes stays).
fn remove_cgroup(path: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(path)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&e.path())?;
        }
    }
    ignore_missing(fs::remove_dir(path))
}

fn populated(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// SIGTERM (the daemon audits its stop and leaves the pins), then SIGKILL after 15 s.
fn stop_process(pid: u32) -> Result<()> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if pid <= 1 || comm.trim() != "guard" {
        bail!(
            "the control socket names pid {pid} ({}), which is not a guard daemon",
            comm.trim()
        );
    }
    eprintln!("xtask: stopping the guard daemon (pid {pid})");
    for (signal, wait) in [(libc::SIGTERM, 15), (libc::SIGKILL, 5)] {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e).context(format!("signalling pid {pid}"));
        }
        let deadline = Instant::now() + Duration::from_secs(wait);
        while Instant::now() < deadline {
            if !alive(pid) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    bail!("the guard daemon (pid {pid}) does not stop")
}

/// Whether `pid` runs (a zombie, waiting for its parent to reap it, has stopped).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// What `guard status --json` says, when a daemon answers.
struct DaemonStatus {
    pid: Option<u32>,
    attach_cgroup: Option<String>,
}

fn daemon_status(bin: &Path, config: Option<&Path>) -> Option<DaemonStatus> {
    let mut c = Command::new(bin);
    c.env_remove("GUARD_CONFIG");
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    let out = c
        .args(["status", "--json"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(DaemonStatus {
        pid: top_level_value(&text, "pid").and_then(|v| v.parse().ok()),
        attach_cgroup: top_level_value(&text, "attach_cgroup"),
    })
}

/// A top-level scalar of a pretty-printed JSON object (`  "key": value,`), strings unquoted.
fn top_level_value(json: &str, key: &str) -> Option<String> {
    let prefix = format!("  \"{key}\": ");
    let line = json.lines().find(|l| l.starts_with(&prefix))?;
    let v = line[prefix.len()..].trim_end().trim_end_matches(',');
    if v.starts_with('"') {
        parse_string(v).map(|(s, _)| s)
    } else {
        Some(v.to_string())
    }
}

/// A quoted string (TOML basic / JSON: `"..."` with backslash escapes, or TOML literal: `'...'`)
/// at the start of `s`, and the rest after it.
fn parse_string(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    let (_, quote) = chars.next()?;
    if quote == '\'' {
        let end = s[1..].find('\'')? + 1;
        return Some((s[1..end].to_string(), &s[end + 1..]));
    }
    if quote != '"' {
        return None;
    }
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = (0..4).filter_map(|_| chars.next().map(|x| x.1)).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The few configuration keys install and uninstall need: the embedded defaults, overlaid with
/// the string values of a configuration file (`[table]` + `key = "..."`, or `table.key = "..."`).
/// The daemon itself validates the file; this only reads it.
struct Settings {
    attach_cgroup: String,
    bpffs: String,
    state_dir: String,
    audit_log: String,
    approvers_group: String,
}

impl Settings {
    fn load(config: Option<&Path>) -> Result<Settings> {
        let mut values = std::collections::HashMap::new();
        read_toml_strings(DEFAULT_CONFIG, &mut values);
        if let Some(c) = config {
            let text = fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            read_toml_strings(&text, &mut values);
        }
        let get = |k: &str| values.get(k).cloned().unwrap_or_default();
        Ok(Settings {
            attach_cgroup: get("scope.attach_cgroup"),
            bpffs: get("paths.bpffs"),
            state_dir: get("paths.state_dir"),
            audit_log: get("paths.audit_log"),
            approvers_group: get("guard.approvers_group"),
        })
    }
}

fn read_toml_strings(text: &str, out: &mut std::collections::HashMap<String, String>) {
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            if let Some(end) = name.find(']') {
                table = name[..end].trim().to_string();
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key: String = key
            .trim()
            .split('.')
            .map(|k| k.trim().trim_matches('"'))
            .collect::<Vec<_>>()
            .join(".");
        if let Some((value, _)) = parse_string(value.trim()) {
            let full = if table.is_empty() {
                key
            } else {
                format!("{table}.{key}")
            };
            out.insert(full, value);
        }
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4].replace("\\040", " ")))
        })
        .context("no cgroup v2 filesystem is mounted (/proc/self/mountinfo)")
}

fn mkdir(dir: &Path, mode: u32) -> Result<()> {
    if !dir.is_dir() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Writes `data` to `dst` through a temporary file in the same directory and a rename.
fn install_file(data: &[u8], dst: &Path, mode: u32) -> Result<()> {
    let dir = dst.parent().unwrap();
    mkdir(dir, 0o755)?;
    let tmp = dir.join(format!(
        ".{}.xtask-{}",
        dst.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, dst).with_context(|| format!("installing {}", dst.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_keys_it_needs() {
        let mut v = std::collections::HashMap::new();
        read_toml_strings(DEFAULT_CONFIG, &mut v);
        assert_eq!(v["scope.attach_cgroup"], "guard.slice");
        assert_eq!(v["paths.bpffs"], "/sys/fs/bpf/guard");
        read_toml_strings(
            "paths.bpffs = '/sys/fs/bpf/x' # c\n[scope]\nattach_cgroup = \"a/b\\\"c\" # d\n",
            &mut v,
        );
        assert_eq!(v["paths.bpffs"], "/sys/fs/bpf/x");
        assert_eq!(v["scope.attach_cgroup"], "a/b\"c");
    }

    #[test]
    fn reads_top_level_status_values() {
        let s = "{\n  \"agents\": [\n    {\n      \"pid\": 9\n    }\n  ],\n  \"attach_cgroup\": \"/sys/fs/cgroup/guard.slice\",\n  \"pid\": 42\n}";
        assert_eq!(top_level_value(s, "pid").as_deref(), Some("42"));
        assert_eq!(
            top_level_value(s, "attach_cgroup").as_deref(),
            Some("/sys/fs/cgroup/guard.slice")
        );
        assert_eq!(top_level_value(s, "nope"), None);
    }
}
