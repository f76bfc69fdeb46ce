//! `guard exec`: run a command guarded, as the calling user.

use std::os::unix::process::CommandExt as _;

use serde_json::Value;
use std::process::Command;

use super::{CA_VARIABLES, EXIT_GUARD_FAILED};
use crate::{
    config::Config,
    daemon::control::{self, Request},
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
    let err = command.exec();
    eprintln!("guard exec: cannot run {}: {err}", cmd[0]);
    match err.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}
