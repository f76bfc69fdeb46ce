//! `guard exec`: run a command guarded, as the calling user.

use std::os::unix::process::CommandExt as _;

use serde_json::Value;
use std::process::Command;

use super::{CA_VARIABLES, EXIT_GUARD_FAILED};
use crate::{
    config::Config,
    daemon::control::{self, Request},
    kernel::confine::{self, Confinement},
};

pub(super) fn exec(config: &Config, agent: Option<String>, cmd: Vec<String>) -> i32 {
    let agent = agent.unwrap_or_else(|| {
        let base = cmd[0].rsplit('/').next().unwrap_or("agent");
        let clean: String = base
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        clean
            .trim_start_matches(['_', '.', '-'])
            .chars()
            .take(64)
            .collect()
    });
    let agent = if agent.is_empty() {
        "agent".to_string()
    } else {
        agent
    };
    let reply = match control::call(
        &config.paths.control_socket,
        Request::Exec {
            agent: agent.clone(),
        },
    ) {
        Ok(v) => v,
        Err(e) => {
            // Never run the command unguarded.
            eprintln!("guard exec: {e:#}");
            return EXIT_GUARD_FAILED;
        }
    };
    let cgroup = reply.get("cgroup").and_then(Value::as_str).unwrap_or("");
    let mut command = Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .env("GUARD_AGENT", &agent)
        .env("GUARD_CGROUP", cgroup);
    // System roots plus the guard CA, where the common runtimes look, so intercepted HTTPS
    // verifies without per-agent setup.
    if let Some(bundle) = reply.get("ca_bundle").and_then(Value::as_str) {
        if std::path::Path::new(bundle).exists() {
            for var in CA_VARIABLES {
                command.env(var, bundle);
            }
        }
    }
    withhold_inherited_sockets();
    // Where the kernel runs no BPF LSM programs, the daemon asks for what a process can do to
    // itself; without it the command does not run.
    if let Some(c) = reply.get("confine").filter(|c| !c.is_null()) {
        let applied = serde_json::from_value::<Confinement>(c.clone())
            .map_err(anyhow::Error::from)
            .and_then(|c| confine::apply(&c));
        if let Err(e) = applied {
            eprintln!("guard exec: cannot confine the command as the daemon asks: {e:#}");
            return EXIT_GUARD_FAILED;
        }
    }
    let err = command.exec();
    eprintln!("guard exec: cannot run {}: {err}", cmd[0]);
    match err.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

/// Sockets this process inherited (beyond stdin, stdout and stderr) were made outside the
/// guard: the kernel runs no guard program for them, so the command does not get them (close
/// on exec), and the user is told.
fn withhold_inherited_sockets() {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        let is_socket = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .is_ok_and(|m| m.file_type().is_socket());
        if !is_socket {
            continue;
        }
        // SAFETY: fcntl on a descriptor number; at worst EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
            eprintln!("guard exec: not passing inherited socket descriptor {fd} to the guarded command (it was made outside the guard)");
        }
    }
}
