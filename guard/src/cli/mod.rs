//! The `guard` command line (README "Commands").

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod approvals;
mod audit;
mod ca;
mod exec;
mod mcp_config;
mod policy;
mod status;
mod watch;

use crate::{
    config::Config,
    daemon::{
        self,
        control::{self, Request},
    },
    policy::Caller,
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
    /// Run a stdio MCP server behind guard: every message between the agent (this command's
    /// stdin and stdout) and CMD is decided by the daemon first.
    Wrap {
        /// The policy to apply (default: the `stdio:` match entry that fits CMD's command line).
        #[arg(long)]
        server: Option<String>,
        /// The server's command, after `--`.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Put the stdio MCP servers of an agent's config file under `guard wrap` (Claude Desktop,
    /// Claude Code, Cursor, VS Code).
    #[command(subcommand, name = "mcp-config")]
    McpConfig(McpConfigCmd),
}

#[derive(Subcommand, Debug)]
pub enum McpConfigCmd {
    /// Rewrite every stdio server entry to run under `guard wrap` (the file as it was is kept
    /// as FILE.guard-backup; running it again changes nothing).
    Wrap {
        file: PathBuf,
        /// The guard binary the entries run (default: this one).
        #[arg(long)]
        guard: Option<PathBuf>,
    },
    /// Undo `wrap`: every entry runs its server directly again.
    Unwrap { file: PathBuf },
    /// List the stdio server entries that do not run under `guard wrap`; exit 1 if any.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
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
    /// The held calls in an interactive terminal view: arrow keys choose, `a` approves, `d`
    /// denies with a reason, `f` approves for a duration, `q` quits.
    Watch,
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
    /// Re-decide the recorded tool calls of audit files under a draft policy set and list
    /// what would change (by agent, server and tool).
    Replay {
        /// Audit files (JSONL, as the daemon writes them).
        #[arg(long = "audit", required = true, num_args = 1..)]
        audit: Vec<PathBuf>,
        /// The draft policy directory (default: the running daemon's, else paths.policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make a signed policy bundle (`policy.source`) of a directory's *.json files, after
    /// checking they load. The key is a minisign secret key (GUARD_KEY_PASSWORD if encrypted).
    Sign {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Where the bundle goes (default: bundle.tar.gz).
        #[arg(long, short = 'o', default_value = "bundle.tar.gz")]
        out: PathBuf,
    },
    /// Make a minisign key pair for signing bundles: PREFIX.key (secret, mode 0600) and
    /// PREFIX.pub (its last line is policy.verify_key).
    Keygen { prefix: PathBuf },
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
        /// The connection log (one record per connection) instead of the decisions.
        #[arg(long)]
        connections: bool,
    },
    /// Check the audit trail's hash chain (each record names the hash of the one before):
    /// FILES in order, oldest first, or the audit log and the connection log with their
    /// rotated files. Exit 1 at the first broken link, with its file and line.
    Verify {
        files: Vec<PathBuf>,
        /// The head a copy kept elsewhere says the chain had (`guard status --json`:
        /// audit.head): the newest record (of the audit log, or of the last FILE) must hash
        /// to it.
        #[arg(long)]
        head: Option<String>,
    },
}

/// Ends this process by `sig`, as the server it wrapped ended (its parent sees the same
/// status); 128 + `sig` if the signal does not kill.
fn die_of(sig: i32) -> i32 {
    // SAFETY: resetting a disposition and raising a signal on ourselves.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    128 + sig
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
        Cmd::Exec { agent, cmd } => return exec::exec(&config.0, agent, cmd),
        Cmd::Status { json } => status::status(&config.0, json).map(|()| 0),
        Cmd::Disable => status::disable(&config.0).map(|()| 0),
        Cmd::Policy(PolicyCmd::Check { path }) => policy::policy_check(&config.0, path),
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
                // Explained as if the caller ran the file at that path.
                exes: exe.into_iter().collect(),
                cgroup,
                instance: None,
            };
            let dir = policies.unwrap_or_else(|| policy::policies_dir(&config.0));
            policy::policy_explain(&dir, &server, &tool, &caller, &args, json)
        }
        Cmd::Policy(PolicyCmd::Replay {
            audit,
            policies,
            json,
        }) => {
            let dir = policies.unwrap_or_else(|| policy::policies_dir(&config.0));
            policy::policy_replay(&config.0, &audit, &dir, json)
        }
        Cmd::Policy(PolicyCmd::Sign { dir, key, out }) => policy::policy_sign(&dir, &key, &out),
        Cmd::Policy(PolicyCmd::Keygen { prefix }) => policy::policy_keygen(&prefix),
        Cmd::Ca(cmd) => ca::ca(&config.0, cmd).map(|()| 0),
        Cmd::Approvals(cmd) => approvals::approvals(&config.0, cmd).map(|()| 0),
        Cmd::Reload => control::call(&config.0.paths.control_socket, Request::Reload).map(|_| {
            println!(
                "policies reloaded (see the daemon's log or `guard audit tail` for the outcome)"
            );
            0
        }),
        Cmd::Wrap { server, cmd } => {
            let o = crate::stdio::wrap::Options {
                socket: config.0.paths.stdio_socket.clone(),
                server,
                command: cmd,
            };
            return match crate::stdio::wrap::run(o) {
                Ok(crate::stdio::wrap::Exit::Code(c)) => c,
                Ok(crate::stdio::wrap::Exit::Signal(sig)) => die_of(sig),
                Err(e) => {
                    eprintln!("guard wrap: {e:#}");
                    EXIT_GUARD_FAILED
                }
            };
        }
        Cmd::McpConfig(cmd) => mcp_config::run(cmd),
        Cmd::Audit(AuditCmd::Tail {
            follow,
            json,
            lines,
            connections,
        }) => {
            let path = if connections {
                config.0.audit_settings().connections
            } else {
                config.0.paths.audit_log.clone()
            };
            audit::audit_tail(&path, follow, json, lines).map(|()| 0)
        }
        Cmd::Audit(AuditCmd::Verify { files, head }) => {
            let logs = if files.is_empty() {
                let s = config.0.audit_settings();
                // The decisions last: --head is the audit log's.
                vec![
                    crate::audit::chain::files_of(&s.connections),
                    crate::audit::chain::files_of(&s.decisions),
                ]
            } else {
                vec![files]
            };
            audit::verify(&logs, head.as_deref())
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("guard: {e:#}");
            1
        }
    }
}
