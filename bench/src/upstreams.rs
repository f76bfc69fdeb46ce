//! The MCP upstreams the benchmark calls: the in-process fast servers and the real MCP servers of
//! tests/peers (started in the `peers` cgroup when installed), and the policies that admit them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

use crate::env::{BenchEnv, Peer};

fn peers_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GUARD_TEST_PEERS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let opt = PathBuf::from("/opt/guard-test-peers");
    if opt.join("py").exists() {
        return opt;
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/guard/test-peers"))
        .unwrap_or(opt)
}

/// An MCP server to call: where, and the arguments its `echo` tool takes.
pub struct Upstream {
    pub addr: SocketAddr,
    pub path: String,
    pub args: Value,
    /// Also measured through the nginx hop (`Bench::nginx`).
    pub via_nginx: bool,
}

/// The `echo` tool's arguments: the text under `key` (servers name the argument differently).
fn echo_args(key: &str) -> Value {
    json!({ key: "hello from guard-bench" })
}

impl Upstream {
    /// One of the in-process servers (`Servers`), at `/mcp`.
    /// The same at `path`, compared with the nginx hop too.
    pub fn local_via_nginx(addr: SocketAddr, path: &str) -> Upstream {
        Upstream {
            path: path.into(),
            via_nginx: true,
            ..Upstream::local(addr)
        }
    }

    pub fn local(addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            path: "/mcp".into(),
            args: echo_args("text"),
            via_nginx: false,
        }
    }
}

/// A real MCP server from tests/peers, in the `peers` cgroup; parses its `READY <url>` line.
fn start_peer(
    env: &BenchEnv,
    program: &Path,
    args: &[&str],
    log: &str,
    echo_args: Value,
) -> Result<(Peer, Upstream)> {
    if program.is_absolute() && !program.exists() {
        bail!(
            "{} is missing: the test peers are not installed (cargo xtask setup)",
            program.display()
        );
    }
    let mut cmd = Command::new(program);
    cmd.args(args);
    let peer = Peer::start(
        cmd,
        &env.cgroup("peers"),
        "READY ",
        &env.dir.join(log),
        Duration::from_secs(60),
    )?;
    let url = peer.first_line["READY ".len()..].trim().to_string();
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("unexpected READY url {url}"))?;
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, "mcp"));
    let addr: SocketAddr = hostport.parse().context("READY url address")?;
    Ok((
        peer,
        Upstream {
            addr,
            path: format!("/{path}"),
            args: echo_args,
            via_nginx: false,
        },
    ))
}

/// A policy for the MCP server `name` at `addr`: its `echo` tool allowed, nothing else.
pub fn mcp_policy(name: &str, addr: SocketAddr) -> String {
    json!({
        "version": "1",
        "server": { "name": name, "match": [addr.to_string()] },
        "default": "deny",
        "tools": { "echo": {} }
    })
    .to_string()
}

/// The policy of the stdio rows' server (`guard-bench stdio-server` under `guard wrap`).
pub fn stdio_policy() -> String {
    json!({
        "version": "1",
        "server": { "name": "bench-stdio", "match": ["stdio:*guard-bench stdio-server"] },
        "default": "deny",
        "tools": { "echo": {} }
    })
    .to_string()
}

/// A real MCP server that started, kept running until the run ends.
pub struct RealPeer {
    /// Its results' key (and policy file name).
    pub key: &'static str,
    pub label: &'static str,
    /// Dropping it stops the server.
    _peer: Peer,
    pub up: Upstream,
}

/// A real MCP server to try: how to start it and what its `echo` tool takes.
struct Candidate {
    key: &'static str,
    label: &'static str,
    program: PathBuf,
    args: Vec<String>,
    echo: Value,
}

fn candidates(repo: &Path) -> [Candidate; 2] {
    let peers = peers_dir();
    let script = |name: &str| repo.join("tests/peers").join(name);
    let fastmcp_script = script("mcp_server.py");
    let everything_script = script("everything_http.mjs");
    let node_modules = peers.join("node/node_modules");
    [
        Candidate {
            key: "mcp_fastmcp",
            label: "FastMCP (Python SDK)",
            program: peers.join("py/bin/python"),
            args: vec![
                fastmcp_script.to_string_lossy().into_owned(),
                "--json-response".into(),
            ],
            echo: echo_args("text"),
        },
        Candidate {
            key: "mcp_everything",
            label: "server-everything (TypeScript SDK)",
            program: PathBuf::from("node"),
            args: vec![
                everything_script.to_string_lossy().into_owned(),
                "--json-response".into(),
                "--node-modules".into(),
                node_modules.to_string_lossy().into_owned(),
            ],
            echo: echo_args("message"),
        },
    ]
}

/// Starts each real MCP server of tests/peers; one that cannot start (not installed) is left out
/// with a note, so that the rest of the run still measures.
pub fn start_real(env: &BenchEnv, repo: &Path, notes: &mut Vec<String>) -> Vec<RealPeer> {
    let mut real = Vec::new();
    for c in candidates(repo) {
        let mut args = c.args;
        args.extend(["--host", "127.0.0.3", "--port", "0"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match start_peer(env, &c.program, &args, &format!("{}.log", c.key), c.echo) {
            Ok((peer, up)) => real.push(RealPeer {
                key: c.key,
                label: c.label,
                _peer: peer,
                up,
            }),
            Err(e) => notes.push(format!("{} upstream not measured: {e:#}", c.label)),
        }
    }
    real
}
