//! The `guard` command line (SPEC §2).

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::{
    config::Config,
    control::{self, Request},
    daemon,
};

/// Exit status of `guard exec` when guard itself fails (as env(1) and chroot(1) do).
const EXIT_GUARD_FAILED: i32 = 125;

#[derive(Parser, Debug)]
#[command(name = "guard", version, about = "A host-level guard for AI agents")]
pub struct Cli {
    /// Configuration file (default: /etc/guard/guard.toml, else the embedded defaults).
    #[arg(long, global = true, env = "GUARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the root daemon in the foreground.
    Daemon {
        /// Policy directory (overrides paths.policies).
        #[arg(long)]
        policies: Option<PathBuf>,
    },
    /// Run CMD (and everything it starts) guarded, as the calling user.
    Exec {
        /// Agent name, for policies and the audit trail (default: CMD's file name).
        #[arg(long)]
        agent: Option<String>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Programs attached, guarded cgroups and uids, counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Emergency fail-open: detach every program and remove every pin (audited; root only).
    Disable,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("GUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("guard: {e}");
            return 2;
        }
    };
    let result = match cli.command {
        Cmd::Daemon { policies } => {
            let (mut config, source) = config;
            if let Some(p) = policies {
                config.paths.policies = p;
            }
            daemon::run(config, source).map(|()| 0)
        }
        Cmd::Exec { agent, cmd } => return exec(&config.0, agent, cmd),
        Cmd::Status { json } => status(&config.0, json).map(|()| 0),
        Cmd::Disable => disable(&config.0).map(|()| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("guard: {e:#}");
            1
        }
    }
}

fn exec(config: &Config, agent: Option<String>, cmd: Vec<String>) -> i32 {
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
    let err = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("GUARD_AGENT", &agent)
        .env("GUARD_CGROUP", cgroup)
        .exec();
    eprintln!("guard exec: cannot run {}: {err}", cmd[0]);
    match err.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

fn status(config: &Config, json: bool) -> Result<()> {
    let s = control::call(&config.paths.control_socket, Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let g = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
    let c = g("counters");
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "guard {} (pid {}, up {}s): {}",
        g("version").as_str().unwrap_or("?"),
        g("pid"),
        g("uptime_s"),
        if g("enforcing").as_bool() == Some(true) {
            "enforcing"
        } else {
            "DISABLED"
        }
    );
    println!("config:          {}", g("config").as_str().unwrap_or("?"));
    println!(
        "attach point:    {}",
        g("attach_cgroup").as_str().unwrap_or("?")
    );
    let programs = g("programs");
    let mut names: Vec<String> = Vec::new();
    if let Some(m) = programs.as_object() {
        for (k, v) in m {
            let count = v.as_array().map_or(0, |a| a.len());
            names.push(if count == 1 {
                k.clone()
            } else {
                format!("{k} x{count}")
            });
        }
    }
    println!(
        "programs:        {} attached ({})",
        g("programs_attached"),
        names.join(", ")
    );
    println!(
        "proxy:           {}",
        g("proxy").as_array().map_or(String::new(), |a| a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "))
    );
    let cgroups = g("guarded_cgroups");
    let cg_list: Vec<String> = cgroups
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| match e.get("cgroup").and_then(Value::as_str) {
                    Some(p) => format!(
                        "{p} ({})",
                        e.get("agent").and_then(Value::as_str).unwrap_or("")
                    ),
                    None => format!("cgroup id {}", e.get("id").unwrap_or(&Value::Null)),
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "guarded cgroups: {}",
        if cg_list.is_empty() {
            "none".into()
        } else {
            cg_list.join(", ")
        }
    );
    println!("guarded uids:    {}", g("guarded_uids"));
    println!(
        "counters:        redirected {}, passed through {}, origin missing {}, refused {}",
        n(&c, "redirected"),
        n(&c, "passed_through"),
        n(&c, "origin_missing"),
        n(&c, "refused")
    );
    println!(
        "audit log:       {}",
        g("audit_log").as_str().unwrap_or("?")
    );
    Ok(())
}

fn disable(config: &Config) -> Result<()> {
    match control::call(&config.paths.control_socket, Request::Disable) {
        Ok(v) => {
            let n = v
                .get("removed")
                .and_then(Value::as_array)
                .map_or(0, |a| a.len());
            println!("guard disabled: {n} pins removed; guarded processes now connect directly. Restart the daemon to enforce again.");
            Ok(())
        }
        Err(e)
            if std::os::unix::net::UnixStream::connect(&config.paths.control_socket).is_err() =>
        {
            eprintln!("guard: {e:#}; unpinning directly");
            let removed =
                daemon::disable_offline(config).context("disabling without the daemon")?;
            println!("guard disabled: {} pins removed.", removed.len());
            Ok(())
        }
        Err(e) => Err(e),
    }
}
