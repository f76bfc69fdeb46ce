//! `cargo xtask uninstall`: stop the daemon, unpin its programs, remove the attach cgroup, then
//! the installed files (and with `--purge` the configuration, state and audit logs).

use std::{
    fs,
    io::ErrorKind,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::{
    cgroup2_mount, is_host, is_root,
    settings::{daemon_status, Settings},
    status, systemd_running, under, with_sudo, BIN, CONFIG, PURGED, UNIT, UNIT_WANTS,
};

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

    remove_files(&root)?;
    remove_data(&root, &settings, a.purge)?;
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

/// Step 5 of uninstall: the binary and the unit.
fn remove_files(root: &Path) -> Result<()> {
    for rel in [BIN, UNIT, UNIT_WANTS] {
        let p = under(root, rel);
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            eprintln!("xtask: removed {}", p.display());
        }
    }
    if is_host(root) && systemd_running() {
        let _ = Command::new("systemctl").arg("daemon-reload").status();
        let _ = Command::new("systemctl")
            .args(["reset-failed", "guard.service"])
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

/// Step 6 of uninstall: configuration, state and audit logs, kept unless `purge`.
fn remove_data(root: &Path, settings: &Settings, purge: bool) -> Result<()> {
    let elsewhere: Vec<&String> = [&settings.state_dir, &settings.audit_log]
        .into_iter()
        .filter(|p| {
            Path::new(p).exists()
                && !PURGED
                    .iter()
                    .any(|d| Path::new(p).starts_with(under(root, d)))
        })
        .collect();
    if purge {
        for d in PURGED {
            let p = under(root, d);
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
            .map(|d| under(root, d))
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
