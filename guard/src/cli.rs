//! The `guard` command line (SPEC §2).

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::{
    config::Config,
    control::{self, Request},
    daemon,
    policy::{Caller, Decision, PolicySet, RateLimiter},
};

/// Variables through which `guard exec` gives agents the CA bundle.
pub const CA_VARIABLES: [&str; 4] = [
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
];

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
    /// Validate and explain policies (no daemon needed).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Read the audit trail.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The interception CA (TLS).
    #[command(subcommand)]
    Ca(CaCmd),
    /// Calls held for a human (root or members of guard.approvers_group).
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
    /// Reload the policies now (root; same as SIGHUP to the daemon).
    Reload,
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsCmd {
    /// Held calls: agent, server, tool, arguments, age, time left.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Release a held call.
    Approve {
        id: String,
        /// Also approve identical calls from the same agent for this long (90s, 10m, 1h).
        #[arg(long = "for")]
        for_: Option<String>,
    },
    /// Refuse a held call (the agent gets -32003 with the reason).
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Create the CA (key mode 0600 in paths.state_dir); refuses to replace one without --force.
    Init {
        #[arg(long)]
        force: bool,
    },
    /// Print the CA certificate (PEM).
    Export,
    /// Add the CA to the system trust store, and say what each runtime needs.
    Install,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate a policy file or directory (default: the running daemon's, else paths.policies);
    /// errors name file:line:col.
    Check { path: Option<PathBuf> },
    /// The decision and the rule for one tool call, without traffic.
    Explain {
        #[arg(long)]
        server: String,
        #[arg(long)]
        tool: String,
        #[arg(long)]
        agent: Option<String>,
        /// Caller uid (default: yours).
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        exe: Option<String>,
        #[arg(long)]
        cgroup: Option<String>,
        /// The call's arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Policy directory (default: the running daemon's, else paths.policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// The most recent decisions; -f keeps following.
    Tail {
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(long)]
        json: bool,
        /// How many records to show first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
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
        Cmd::Policy(PolicyCmd::Check { path }) => policy_check(&config.0, path),
        Cmd::Policy(PolicyCmd::Explain {
            server,
            tool,
            agent,
            uid,
            exe,
            cgroup,
            args,
            policies,
            json,
        }) => {
            let caller = Caller {
                agent,
                uid: uid.unwrap_or_else(|| nix::unistd::getuid().as_raw()),
                exe,
                cgroup,
                session: None,
            };
            let dir = policies.unwrap_or_else(|| policies_dir(&config.0));
            policy_explain(&dir, &server, &tool, &caller, &args, json)
        }
        Cmd::Ca(cmd) => ca(&config.0, cmd).map(|()| 0),
        Cmd::Approvals(cmd) => approvals(&config.0, cmd).map(|()| 0),
        Cmd::Reload => control::call(&config.0.paths.control_socket, Request::Reload).map(|_| {
            println!(
                "policies reloaded (see the daemon's log or `guard audit tail` for the outcome)"
            );
            0
        }),
        Cmd::Audit(AuditCmd::Tail {
            follow,
            json,
            lines,
        }) => audit_tail(&config.0.paths.audit_log, follow, json, lines).map(|()| 0),
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

/// The policy directory the running daemon uses (it may have been given `--policies`), else
/// the configuration's.
fn policies_dir(config: &Config) -> PathBuf {
    control::call(&config.paths.control_socket, Request::Status)
        .ok()
        .and_then(|s| s.get("policies").and_then(Value::as_str).map(PathBuf::from))
        .unwrap_or_else(|| config.paths.policies.clone())
}

fn policy_check(config: &Config, path: Option<PathBuf>) -> Result<i32> {
    let path = path.unwrap_or_else(|| policies_dir(config));
    let result = if path.is_dir() {
        PolicySet::load_dir(&path)
    } else {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        PolicySet::from_files(&[(path.display().to_string(), text)])
    };
    match result {
        Ok(set) => {
            let names: Vec<&str> = set.servers().iter().map(|s| s.name.as_str()).collect();
            println!(
                "{}: ok, {} server policies ({})",
                path.display(),
                names.len(),
                names.join(", ")
            );
            Ok(0)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "{}: {} errors; nothing was loaded",
                path.display(),
                errors.len()
            );
            Ok(1)
        }
    }
}

fn policy_explain(
    dir: &std::path::Path,
    server: &str,
    tool: &str,
    caller: &Caller,
    args: &str,
    json: bool,
) -> Result<i32> {
    let args: Value = serde_json::from_str(args).context("--args is not valid JSON")?;
    let set = daemon::load_policies(dir)?;
    let Some(sp) = set.by_name(server) else {
        let names: Vec<&str> = set.servers().iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!(
            "no policy for server `{server}` in {} (known: {})",
            dir.display(),
            names.join(", ")
        );
    };
    let d = sp.explain(
        tool,
        &args,
        caller,
        &RateLimiter::new(),
        std::time::Instant::now(),
    );
    let (decision, rule, detail) = match &d {
        Decision::Allow { rule } => ("allow", rule.clone(), String::new()),
        Decision::Deny { rule, reason } => ("deny", rule.clone(), reason.clone()),
        Decision::RateLimited {
            rule,
            reason,
            retry_after_s,
        } => (
            "rate_limited",
            rule.clone(),
            format!("{reason} (retry after {retry_after_s} s)"),
        ),
        Decision::RequireApproval { rule, timeout_s } => (
            "require_approval",
            rule.clone(),
            format!("held for a human for up to {timeout_s} s"),
        ),
    };
    let visible = sp.visible(tool, caller);
    if json {
        println!(
            "{}",
            serde_json::json!({"server": sp.name, "file": sp.file, "tool": tool, "decision": decision,
                "rule": rule, "reason": detail, "listed": visible})
        );
    } else {
        println!("{server} / {tool}: {decision} (rule {rule}, {})", sp.file);
        if !detail.is_empty() {
            println!("  {detail}");
        }
        if !visible {
            println!("  not shown in tools/list to this caller");
        }
    }
    Ok(0)
}

fn audit_line(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let agent = v
        .get("agent")
        .map(|a| {
            let name = a.get("name").and_then(Value::as_str).unwrap_or("-");
            format!("{name}(uid {}, pid {})", a["uid"], a["pid"])
        })
        .unwrap_or_else(|| "-".into());
    let server = v
        .get("server")
        .map(|s| {
            let name = s.get("name").and_then(Value::as_str).unwrap_or("?");
            format!(" {name}")
        })
        .unwrap_or_default();
    let mut line = format!(
        "{} {:<12} {:<13} {agent}{server}",
        s("ts"),
        s("event"),
        s("decision")
    );
    if let Some(t) = v.get("tool").and_then(Value::as_str) {
        line.push_str(&format!(" tool={t}"));
    }
    if let Some(d) = v.get("original_dst").and_then(Value::as_str) {
        line.push_str(&format!(" dst={d}"));
    }
    if let Some(r) = v.get("rule").and_then(Value::as_str) {
        line.push_str(&format!(" rule={r}"));
    }
    if let Some(r) = v.get("reason").and_then(Value::as_str) {
        line.push_str(&format!(" reason=\"{r}\""));
    }
    line
}

fn audit_tail(path: &std::path::Path, follow: bool, json: bool, lines: usize) -> Result<()> {
    use std::io::{BufRead as _, Seek as _};
    let print = |l: &str| {
        if json {
            println!("{l}");
        } else {
            match serde_json::from_str::<Value>(l) {
                Ok(v) => println!("{}", audit_line(&v)),
                Err(_) => println!("{l}"),
            }
        }
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    let all: Vec<&str> = text.lines().collect();
    for l in &all[all.len().saturating_sub(lines)..] {
        print(l);
    }
    if !follow {
        return Ok(());
    }
    let mut pos = text.len() as u64;
    let mut inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path)?);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        if ino != inode || meta.len() < pos {
            // Rotated or truncated: start from the new file's beginning.
            inode = ino;
            pos = 0;
        }
        if meta.len() == pos {
            continue;
        }
        let mut f = std::fs::File::open(path)?;
        f.seek(std::io::SeekFrom::Start(pos))?;
        let mut reader = std::io::BufReader::new(f);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                break;
            }
            pos += line.len() as u64;
            print(line.trim_end());
            line.clear();
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
}

fn ca(config: &Config, cmd: CaCmd) -> Result<()> {
    let files = crate::tls::CaFiles::new(&config.paths.state_dir);
    match cmd {
        CaCmd::Init { force } => {
            crate::tls::ca_init(&files, force)?;
            println!(
                "created the guard CA: {} (key {})",
                files.cert.display(),
                files.key.display()
            );
            println!("restart the daemon so it mints leaves from the new CA");
        }
        CaCmd::Export => {
            let pem = std::fs::read_to_string(&files.cert).with_context(|| {
                format!(
                    "reading {} (create it with `guard ca init`, or start the daemon)",
                    files.cert.display()
                )
            })?;
            print!("{pem}");
        }
        CaCmd::Install => {
            let pem = std::fs::read_to_string(&files.cert).with_context(|| {
                format!(
                    "reading {} (create it with `guard ca init`)",
                    files.cert.display()
                )
            })?;
            let anchors = std::path::Path::new("/usr/local/share/ca-certificates");
            std::fs::create_dir_all(anchors)?;
            let dst = anchors.join("guard-ca.crt");
            std::fs::write(&dst, pem).with_context(|| format!("writing {}", dst.display()))?;
            let status = Command::new("update-ca-certificates")
                .status()
                .context("running update-ca-certificates (package ca-certificates)")?;
            if !status.success() {
                anyhow::bail!("update-ca-certificates failed: {status}");
            }
            println!("installed {} into the system trust store", dst.display());
            println!("runtimes that do not read the system store need the CA themselves:");
            println!(
                "  Node.js:        NODE_EXTRA_CA_CERTS={}",
                files.cert.display()
            );
            println!(
                "  Python (certifi-based: requests, httpx): SSL_CERT_FILE / REQUESTS_CA_BUNDLE={}",
                files.bundle.display()
            );
            println!(
                "  Java:           keytool -importcert -cacerts -alias guard -file {}",
                files.cert.display()
            );
            println!("`guard exec` sets SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE to {} for its agents.", files.bundle.display());
        }
    }
    Ok(())
}

fn approvals(config: &Config, cmd: ApprovalsCmd) -> Result<()> {
    let socket = &config.paths.control_socket;
    match cmd {
        ApprovalsCmd::List { json } => {
            let v = control::call(socket, Request::ApprovalsList)?;
            let held = v
                .get("held")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&held)?);
                return Ok(());
            }
            if held.is_empty() {
                println!("no calls are waiting for approval");
            }
            for h in held {
                let s = |k: &str| h.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
                let n = |k: &str| h.get(k).and_then(Value::as_u64).unwrap_or(0);
                println!(
                    "[{}] agent {} (uid {}, pid {})  server {}  tool {}  waiting {} s, {} s left",
                    s("id"),
                    s("agent"),
                    n("uid"),
                    n("pid"),
                    s("server"),
                    s("tool"),
                    n("age_s"),
                    n("remaining_s")
                );
                let args =
                    serde_json::to_string_pretty(h.get("arguments").unwrap_or(&Value::Null))?;
                for line in args.lines() {
                    println!("    {line}");
                }
            }
        }
        ApprovalsCmd::Approve { id, for_ } => {
            let for_s = match for_ {
                Some(d) => Some(crate::approvals::parse_duration(&d)?.as_secs()),
                None => None,
            };
            let v = control::call(
                socket,
                Request::Approve {
                    id: id.clone(),
                    for_s,
                },
            )?;
            println!(
                "approved {id} ({} on {}){}",
                v["tool"].as_str().unwrap_or("?"),
                v["server"].as_str().unwrap_or("?"),
                for_s
                    .map(|s| format!("; identical calls from this agent pass for {s} s"))
                    .unwrap_or_default()
            );
        }
        ApprovalsCmd::Deny { id, reason } => {
            let v = control::call(
                socket,
                Request::Deny {
                    id: id.clone(),
                    reason,
                },
            )?;
            println!(
                "denied {id} ({} on {})",
                v["tool"].as_str().unwrap_or("?"),
                v["server"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
