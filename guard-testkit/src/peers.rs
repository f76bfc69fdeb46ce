//! The real MCP peers `cargo xtask setup` installs (tests/peers/README.md): the Python SDK's
//! FastMCP server and client, and `@modelcontextprotocol/server-everything`.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

/// The peers directory: `$GUARD_TEST_PEERS`, else /opt/guard-test-peers, else
/// ~/.cache/guard/test-peers (the rule xtask's setup follows).
pub fn peers_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GUARD_TEST_PEERS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let opt = PathBuf::from("/opt/guard-test-peers");
    if opt.join("py").exists() {
        return opt;
    }
    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/guard/test-peers")
}

pub fn peer_python() -> PathBuf {
    let p = peers_dir().join("py/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// The Python of the 2.x SDK's venv (`tests/peers/requirements-mcp2.txt`).
pub fn peer_python2() -> PathBuf {
    let p = peers_dir().join("py2/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// The peer scripts, copied where every user can read them (the checkout may be private).
pub fn script(name: &str) -> PathBuf {
    // `GUARD_TEST_SCRIPTS`: a copy of tests/peers (xtask runs suites as uid 65534 from one, since
    // the checkout may be closed to other users).
    let dir = std::env::var_os("GUARD_TEST_SCRIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers"));
    let src = dir.join(name);
    static CLEAN: std::sync::Once = std::sync::Once::new();
    CLEAN.call_once(|| {
        // Copies left by earlier test processes that are gone.
        for e in fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("guard-test-peers-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    });
    let dir = std::env::temp_dir().join(format!("guard-test-peers-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let dst = dir.join(name);
    if !dst.exists() {
        let part = dir.join(format!("{name}.part-{:?}", std::thread::current().id()));
        fs::copy(&src, &part).unwrap();
        fs::set_permissions(&part, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&part, &dst).unwrap();
    }
    dst
}

/// A running peer server; killed (by pid) on drop.
pub struct Server {
    pub url: String,
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

impl Server {
    /// The calls the server received (its `--log`): one JSON object per tools/call.
    pub fn calls(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn tools_called(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter_map(|c| c["tool"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tests/peers/mcp_server.py` with `args` and waits for its `READY <url>` line.
pub fn python_server(log: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new(peer_python());
    cmd.arg(script("mcp_server.py"))
        .arg("--log")
        .arg(log)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_file(log));
    start(cmd, log)
}

/// Starts `tests/peers/mcp_server.mjs` (the TypeScript SDK's McpServer, Streamable HTTP) with
/// `args` and waits for its `READY <url>` line. It logs the calls it runs like the Python one.
pub fn ts_server(log: &Path, args: &[&str]) -> Server {
    let node_modules = peers_dir().join("node/node_modules");
    let mut cmd = Command::new("node");
    cmd.arg(script("mcp_server.mjs"))
        .arg("--log")
        .arg(log)
        .args(args)
        .arg("--node-modules")
        .arg(&node_modules)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_file(log));
    start(cmd, log)
}

/// Starts the Go test server (tests/peers/mcp_server.go, built by `cargo xtask setup`; decodes
/// with encoding/json) with `args` and waits for its `READY <url>` line.
pub fn go_server(log: &Path, args: &[&str]) -> Server {
    let bin = peers_dir().join("go/mcp_server_go");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask setup`",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.arg("--log")
        .arg(log)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_file(log));
    start(cmd, log)
}

/// Starts `@modelcontextprotocol/server-everything` (Streamable HTTP) on 127.0.0.1:`port`.
pub fn everything_server(port: u16, log: &Path) -> Server {
    let node_modules = peers_dir().join("node/node_modules");
    assert!(
        node_modules.exists(),
        "{} is missing: run `cargo xtask setup`",
        node_modules.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(script("everything_http.mjs"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--node-modules")
        .arg(&node_modules)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_file(log));
    start(cmd, log)
}

/// The peer's own logs go next to its call log (`<log>.stderr`), not into the test output.
fn stderr_file(log: &Path) -> Stdio {
    let path = log.with_extension("stderr");
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit())
}

fn start(mut cmd: Command, log: &Path) -> Server {
    let mut child = crate::process::spawn(&mut cmd).expect("starting an MCP peer");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("READY ") {
                let _ = tx.send(url.trim().to_string());
                return;
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(u) => u,
        Err(_) => {
            let _ = child.kill();
            panic!("the MCP peer {cmd:?} did not get ready");
        }
    };
    let port = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|hp| hp.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("port in READY url");
    Server {
        url,
        port,
        log: log.to_path_buf(),
        child,
    }
}

/// Output of `mcp_client.py`: the tool list (if asked) and one entry per call.
#[derive(Debug, Default)]
pub struct ClientRun {
    pub tools: Option<Vec<String>>,
    pub calls: Vec<Value>,
    /// The texts of the sampling requests the client answered (`--sampling`).
    pub samplings: Vec<Value>,
    pub stderr: String,
}

impl ClientRun {
    pub fn result(&self, i: usize) -> &Value {
        &self.calls[i]["result"]
    }

    pub fn error(&self, i: usize) -> &Value {
        &self.calls[i]["error"]
    }

    /// The text of a successful call's first content item.
    pub fn text(&self, i: usize) -> String {
        self.calls[i]["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("call {i} has no text result: {}", self.calls[i]))
            .to_string()
    }
}

/// Arguments for `mcp_client.py`.
pub fn client_args(url: &str, transport: &str, list: bool, calls: &[(&str, &str)]) -> Vec<String> {
    let mut v = vec![
        peer_python().display().to_string(),
        script("mcp_client.py").display().to_string(),
        url.to_string(),
        "--transport".to_string(),
        transport.to_string(),
    ];
    if list {
        v.push("--list".into());
    }
    for (tool, args) in calls {
        v.push("--call".into());
        v.push(tool.to_string());
        v.push(args.to_string());
    }
    v
}

/// Runs `mcp_client.py` (`cmd`: a command made from [`client_args`]) and parses its output.
pub fn run_client(cmd: &mut Command) -> ClientRun {
    parse_client(&crate::process::run(cmd, Duration::from_secs(120)))
}

pub fn parse_client(out: &std::process::Output) -> ClientRun {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "mcp_client failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let mut run = ClientRun {
        stderr,
        ..Default::default()
    };
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let Some(t) = v.get("tools").and_then(Value::as_array) {
            run.tools = Some(
                t.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            );
        } else if v.get("call").is_some() {
            run.calls.push(v);
        } else if let Some(s) = v.get("sampling") {
            run.samplings.push(s.clone());
        }
    }
    run
}
