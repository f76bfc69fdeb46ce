//! `cargo xtask install` and `cargo xtask uninstall` (README "Installation").
//!
//! Everything is written below `--root` (default `/`), so a staging root can be installed and
//! inspected without touching the host. Only with `--root /` does install create the approvers
//! group, create the CA and talk to systemd. This file holds install and what both share;
//! `uninstall` and `settings` (the configuration keys and the daemon's status) the rest.

mod settings;
mod uninstall;

use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::{build, is_root, repo_root, setup, status, which};
use settings::{daemon_status, Settings};
pub use uninstall::{uninstall, UninstallArgs};

const BIN: &str = "usr/local/bin/guard";
const CONFIG: &str = "etc/guard/guard.toml";
const POLICIES: &str = "etc/guard/policies";
const UNIT: &str = "etc/systemd/system/guard.service";
const UNIT_WANTS: &str = "etc/systemd/system/multi-user.target.wants/guard.service";
/// Removed by `uninstall --purge` (configuration, state, audit logs).
const PURGED: [&str; 3] = ["etc/guard", "var/lib/guard", "var/log/guard"];
const DEFAULT_CONFIG: &str = include_str!("../../../guard/src/default.toml");

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
    let config = install_config(&root, a.config.as_deref())?;
    let policies = install_policies(&root)?;
    install_unit(&root)?;
    check_installed(&bin, &config, &policies)?;

    let settings = Settings::load(Some(&config))?;
    if !is_host(&root) {
        eprintln!(
            "xtask: staging root: the group `{}`, the CA and the service are left to the target \
             (install there with --root /; the daemon creates its CA at first start)",
            settings.approvers_group
        );
        return Ok(());
    }
    approvers_group(&settings.approvers_group)?;
    interception_ca(&bin, &config)?;
    if systemd_running() {
        start_service(a.no_start)
    } else {
        print_manual_start(&bin, &config);
        Ok(())
    }
}

/// The configuration, `given` or the embedded defaults: never replaced.
fn install_config(root: &Path, given: Option<&Path>) -> Result<PathBuf> {
    let config = under(root, CONFIG);
    mkdir(config.parent().unwrap(), 0o755)?;
    if config.exists() {
        eprintln!("  {} (kept: it exists)", config.display());
    } else {
        let text = match given {
            Some(c) => fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            None => DEFAULT_CONFIG.as_bytes().to_vec(),
        };
        install_file(&text, &config, 0o644)?;
        eprintln!("  {}", config.display());
    }
    Ok(config)
}

/// The example policies: existing files are kept.
fn install_policies(root: &Path) -> Result<PathBuf> {
    let policies = under(root, POLICIES);
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
    Ok(policies)
}

/// The unit: ours, always replaced (local changes belong in drop-ins: systemctl edit guard).
fn install_unit(root: &Path) -> Result<()> {
    let unit = under(root, UNIT);
    mkdir(unit.parent().unwrap(), 0o755)?;
    install_file(
        &fs::read(repo_root().join("dist/guard.service"))?,
        &unit,
        0o644,
    )?;
    eprintln!("  {}", unit.display());
    Ok(())
}

/// The installed binary validates what was installed: the configuration and the policies.
fn check_installed(bin: &Path, config: &Path, policies: &Path) -> Result<()> {
    let check = Command::new(bin)
        .env_remove("GUARD_CONFIG")
        .arg("--config")
        .arg(config)
        .args(["policy", "check"])
        .arg(policies)
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
    Ok(())
}

/// The approvers group, unless it exists.
fn approvers_group(group: &str) -> Result<()> {
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
    Ok(())
}

/// The interception CA, once (`guard ca init` refuses to replace one; so do we).
fn interception_ca(bin: &Path, config: &Path) -> Result<()> {
    let guard = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.env_remove("GUARD_CONFIG")
            .arg("--config")
            .arg(config)
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
    Ok(())
}

/// Under systemd: reload the units, then (unless `no_start`) enable and start the service, or
/// restart it when it runs.
fn start_service(no_start: bool) -> Result<()> {
    status(Command::new("systemctl").arg("daemon-reload"))?;
    if no_start {
        eprintln!("xtask: installed; start it with: systemctl enable --now guard");
        return Ok(());
    }
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
    Ok(())
}

/// Without systemd nothing is started: how to start the daemon by hand (and whether one runs).
fn print_manual_start(bin: &Path, config: &Path) {
    let running = daemon_status(bin, Some(config));
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
