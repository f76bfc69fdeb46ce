//! guard-bench: what guard costs on this machine, measured against a direct connection, in one
//! run. Run it through `cargo xtask bench` (which builds guard in release first); it needs root.
//! See README "Performance" for what each number means and the targets.
//!
//! `guard-bench run` sets up its own cgroup subtree, pin directory and daemon (see `env`), runs the
//! load generators as child processes (`guard-bench worker SPEC`, see `worker`) once in a guarded
//! cgroup and once in an unguarded one, prints a table and writes the results as JSON.

mod env;
mod machine;
mod measure;
mod nginx;
mod policy;
mod report;
mod run;
mod servers;
mod stats;
mod upstreams;
mod worker;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "guard-bench",
    about = "What guard costs, against a direct connection"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole benchmark (root): set up, measure, tear down, report.
    Run {
        /// The guard binary to benchmark (a release build).
        #[arg(long, default_value = "target/release/guard")]
        guard: PathBuf,
        /// Where to write the results as JSON.
        #[arg(long, default_value = "target/bench/results.json")]
        out: PathBuf,
        /// A shorter run (a quarter of the iterations): a smoke test, not for numbers.
        #[arg(long)]
        quick: bool,
        /// The repository (for tests/peers/mcp_server.py).
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
        repo: PathBuf,
        /// Run the daemon with this RLIMIT_NOFILE soft limit, as a unit's `LimitNOFILE=` would
        /// (default: this process's, raised to its hard limit; systemd's default is 1024).
        #[arg(long)]
        daemon_nofile: Option<u64>,
        /// Only these groups of measurements (comma-separated): policy, mcp, echo, conn, tls,
        /// real, connect, contain, stdio, bulk, rss. A partial run's table is not the whole picture.
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(run::GROUPS))]
        only: Option<Vec<String>>,
    },
    /// One load generator (started by `run` inside a cgroup); SPEC is JSON.
    #[command(hide = true)]
    Worker { spec: String },
    /// A stdio MCP server that answers at once (the stdio rows' server).
    #[command(hide = true, name = "stdio-server")]
    StdioServer,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run {
            guard,
            out,
            quick,
            repo,
            daemon_nofile,
            only,
        } => {
            let r = run::run(&run::Opts {
                guard,
                out,
                quick,
                repo,
                daemon_nofile,
                only,
            });
            // Whatever happened, nothing of ours stays behind.
            env::teardown();
            r
        }
        Cmd::Worker { spec } => worker::main(&spec),
        Cmd::StdioServer => worker::stdio_server(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if env::interrupted() => {
            eprintln!("guard-bench: interrupted: nothing reported");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("guard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
