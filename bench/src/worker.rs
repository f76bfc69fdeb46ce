//! The load generators. `guard-bench worker SPEC` runs one of them and prints its result as one
//! JSON line on stdout. The parent starts the same worker in a guarded cgroup and in an unguarded
//! one, so both sides run identical code; only the cgroup differs.
//!
//! Kinds (`SPEC` is a JSON object with `"kind"`):
//! - `mcp`: MCP clients over HTTP/1.1 keep-alive (`initialize`, `tools/list`, then timed
//!   `tools/call`s), `concurrency` connections, until `calls` calls or `secs` seconds; over TLS
//!   when the spec has `"tls": {"ca": PEM file}`;
//! - `mcp_conn`: a new connection for every `tools/call` (connect, TLS handshake when `tls`:
//!   `"resume": true` resumes the previous session, `false` makes a full handshake every time,
//!   HTTP/1.1, one call, close), timed as a whole;
//! - `connect`: the `connect()` syscall alone, `iters` times, blocking socket, closed with RST;
//! - `bulk`: `bytes` bytes over one connection to a sink that acknowledges the count;
//! - `echo_rtt`: 64-byte messages echoed back, one at a time, over one connection (not HTTP: a
//!   passthrough relay through guard), `iters` round trips timed one by one;
//! - `stdio`: a stdio MCP server started from `command` (argv), `initialize`, then `iters`
//!   `tools/call`s one at a time, each round trip timed (newline-delimited JSON-RPC on pipes);
//! - `hold_tcp` / `hold_mcp`: open `n` connections (bytes echoed / `initialize` and one
//!   `tools/call` each, over TLS with `tls`), print `{"held": n}`, keep them open until stdin
//!   closes.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream as StdTcpStream},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{client::conn::http1, header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stats::Summary;

/// The protocol version the client offers (FastMCP of mcp 1.30 and the bench responder accept it).
pub const PROTOCOL: &str = "2025-06-18";

pub fn main(spec: &str) -> Result<()> {
    let spec: Value = serde_json::from_str(spec).context("worker spec is not JSON")?;
    raise_nofile();
    // As `guard exec` confines an agent where containment is partial (no BPF LSM).
    if let Some(c) = spec.get("confine").filter(|c| !c.is_null()) {
        let c: guard::kernel::confine::Confinement = serde_json::from_value(c.clone())?;
        guard::kernel::confine::apply(&c).context("confining the worker as guard exec would")?;
    }
    let kind = spec["kind"].as_str().unwrap_or("");
    let out = match kind {
        "spawn" => spawn_times(&spec)?,
        "mcp" => runtime()?.block_on(mcp_load(&spec))?,
        "mcp_conn" => runtime()?.block_on(mcp_per_connection(&spec))?,
        "connect" => connect_times(&spec)?,
        "stdio" => stdio_times(&spec)?,
        "bulk" => bulk(&spec)?,
        "echo_rtt" => echo_rtt(&spec)?,
        "hold_tcp" => hold_tcp(&spec)?,
        "hold_mcp" => runtime()?.block_on(hold_mcp(&spec))?,
        _ => bail!("unknown worker kind {kind:?}"),
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}")?;
    stdout.flush()?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: the client side is the same on both sides, and leaves the other core to the
    // server (direct) or to server and proxy (guarded).
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Soft RLIMIT_NOFILE up to the hard limit (1,000 held connections need more than 1,024).
pub fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn addr(spec: &Value) -> Result<SocketAddr> {
    spec["addr"]
        .as_str()
        .ok_or_else(|| anyhow!("spec has no addr"))?
        .parse()
        .context("bad addr")
}

/// The client side of TLS: trust one CA (the upstream's for the direct side, guard's for the
/// guarded side), HTTP/1.1, session resumption on or off.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl TlsClient {
    pub fn from_spec(spec: &Value, addr: SocketAddr) -> Result<Option<TlsClient>> {
        let tls = &spec["tls"];
        let Some(ca) = tls["ca"].as_str() else {
            return Ok(None);
        };
        use rustls::pki_types::{pem::PemObject as _, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {ca}"))? {
            roots.add(cert.with_context(|| format!("a certificate in {ca}"))?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if tls["resume"] == json!(false) {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Some(TlsClient {
            config: Arc::new(config),
            name: rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
        }))
    }
}

/// A connection (TCP, then TLS when `tls`) carrying one MCP client; also says whether the TLS
/// handshake resumed a session.
pub async fn mcp_connect(
    addr: SocketAddr,
    path: &str,
    tls: Option<&TlsClient>,
) -> Result<(McpClient, bool)> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let authority = addr.to_string();
    match tls {
        None => Ok((McpClient::over(tcp, &authority, path).await?, false)),
        Some(t) => {
            let stream = tokio_rustls::TlsConnector::from(t.config.clone())
                .connect(t.name.clone(), tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr}"))?;
            let resumed =
                stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            Ok((McpClient::over(stream, &authority, path).await?, resumed))
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One MCP client on one HTTP/1.1 keep-alive connection, over any byte stream (plain TCP today;
/// a TLS stream plugs in the same way).
pub struct McpClient {
    sender: http1::SendRequest<Full<Bytes>>,
    authority: String,
    path: String,
    session: Option<String>,
    next_id: u64,
}

impl McpClient {
    pub async fn over<S>(io: S, authority: &str, path: &str) -> Result<McpClient>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(McpClient {
            sender,
            authority: authority.to_string(),
            path: path.to_string(),
            session: None,
            next_id: 1,
        })
    }

    async fn post(&mut self, body: String) -> Result<(StatusCode, hyper::HeaderMap, Bytes)> {
        self.sender.ready().await.context("connection closed")?;
        let mut req = Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .header("mcp-protocol-version", PROTOCOL);
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s.as_str());
        }
        let resp = self
            .sender
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await
            .context("sending the request")?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// `initialize` (keeps the session id), then `notifications/initialized`.
    pub async fn initialize(&mut self) -> Result<()> {
        let id = self.id();
        let body = json!({
            "jsonrpc": "2.0", "id": id, "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": { "name": "guard-bench", "version": env!("CARGO_PKG_VERSION") }
            }
        });
        let (status, headers, bytes) = self.post(body.to_string()).await?;
        if status != StatusCode::OK {
            bail!(
                "initialize: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let v: Value = message(&bytes).context("initialize answer")?;
        if v.get("result").is_none() {
            bail!("initialize refused: {v}");
        }
        self.session = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        let (status, _, bytes) = self.post(note.to_string()).await?;
        if !status.is_success() {
            bail!(
                "notifications/initialized: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(())
    }

    /// `tools/list`; returns the tool names.
    pub async fn list(&mut self) -> Result<Vec<String>> {
        let id = self.id();
        let body = json!({ "jsonrpc": "2.0", "id": id, "method": "tools/list", "params": {} });
        let (status, _, bytes) = self.post(body.to_string()).await?;
        let v: Value =
            message(&bytes).with_context(|| format!("tools/list: HTTP {status}: not JSON"))?;
        let tools = v["result"]["tools"]
            .as_array()
            .ok_or_else(|| anyhow!("tools/list failed: {v}"))?;
        Ok(tools
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect())
    }

    /// One `tools/call`; an error unless the tool answered with `isError: false`.
    pub async fn call(&mut self, tool: &str, args: &str) -> Result<()> {
        let id = self.id();
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{args}}}}}"#
        );
        let (status, _, bytes) = self.post(body).await?;
        if status == StatusCode::OK && contains(&bytes, br#""isError":false"#) {
            return Ok(());
        }
        // Servers that leave `isError` out (server-everything): a result that is not an error.
        let v: Value = message(&bytes).unwrap_or(Value::Null);
        if status == StatusCode::OK
            && v["result"].is_object()
            && v["result"]["isError"] != json!(true)
        {
            return Ok(());
        }
        bail!(
            "tools/call {tool}: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        )
    }
}

async fn mcp_load(spec: &Value) -> Result<Value> {
    let addr = addr(spec)?;
    let path = spec["path"].as_str().unwrap_or("/mcp").to_string();
    let conc = spec["concurrency"].as_u64().unwrap_or(1).max(1) as usize;
    let warmup = spec["warmup"].as_u64().unwrap_or(0);
    let calls = spec["calls"].as_i64().unwrap_or(i64::MAX);
    let secs = spec["secs"].as_f64().unwrap_or(600.0);
    let tool = spec["tool"].as_str().unwrap_or("echo").to_string();
    let args = spec["args"].to_string();

    let tls = TlsClient::from_spec(spec, addr)?;
    // Every client sets up at once: a server may close a connection idle for a few seconds
    // (uvicorn: 5 s) while the others would still be warming up one after the other.
    let mut setups = Vec::with_capacity(conc);
    for _ in 0..conc {
        let (path, tool, args, tls) = (path.clone(), tool.clone(), args.clone(), tls.clone());
        setups.push(tokio::spawn(async move {
            let (mut c, _) = mcp_connect(addr, &path, tls.as_ref()).await?;
            c.initialize().await?;
            let tools = c.list().await?;
            if !tools.contains(&tool) {
                bail!("tools/list does not offer {tool}: {tools:?}");
            }
            for _ in 0..warmup {
                c.call(&tool, &args).await?;
            }
            Ok(c)
        }));
    }
    let mut clients = Vec::with_capacity(conc);
    for s in setups {
        clients.push(s.await??);
    }
    let remaining = Arc::new(AtomicI64::new(calls));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::with_capacity(conc);
    for mut c in clients {
        let (remaining, tool, args) = (remaining.clone(), tool.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            while Instant::now() < deadline && remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
                let t = Instant::now();
                c.call(&tool, &args).await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = all.len();
    // Drift check: the median of each quarter of the calls, in the order they were made (with
    // one client; with more, the tasks' samples are concatenated).
    let quarters: Vec<f64> = all
        .chunks(n.div_ceil(4).max(1))
        .map(|c| Summary::of(&mut c.to_vec()).p50 as f64 / 1000.0)
        .collect();
    Ok(json!({
        "latency": Summary::of(&mut all).to_json(),
        "p50_us_by_quarter": quarters,
        "samples_ns": all,
        "calls": n,
        "secs": elapsed,
        "calls_per_s": n as f64 / elapsed,
    }))
}

/// A new connection for every call: connect, (TLS,) one `tools/call`, close; timed as a whole.
async fn mcp_per_connection(spec: &Value) -> Result<Value> {
    let addr = addr(spec)?;
    let path = spec["path"].as_str().unwrap_or("/mcp").to_string();
    let warmup = spec["warmup"].as_u64().unwrap_or(0);
    let calls = spec["calls"].as_u64().unwrap_or(1000);
    let tool = spec["tool"].as_str().unwrap_or("echo").to_string();
    let args = spec["args"].to_string();
    let tls = TlsClient::from_spec(spec, addr)?;
    let mut samples = Vec::with_capacity(calls as usize);
    let mut resumed = 0u64;
    let start = Instant::now();
    for i in 0..warmup + calls {
        let t = Instant::now();
        let (mut c, r) = mcp_connect(addr, &path, tls.as_ref()).await?;
        c.call(&tool, &args).await?;
        drop(c);
        let dt = t.elapsed().as_nanos() as u64;
        if i >= warmup {
            samples.push(dt);
            resumed += u64::from(r);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "latency": Summary::of(&mut samples).to_json(),
        "samples_ns": samples,
        "calls": calls,
        "secs": secs,
        "resumed": resumed,
    }))
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Times the `connect()` syscall itself: socket creation and close are outside the timed part.
/// fork + exec of `/bin/true`, waited for, `iters` times after `warmup`.
fn spawn_times(spec: &Value) -> Result<Value> {
    let iters = spec["iters"].as_u64().unwrap_or(500);
    let warmup = spec["warmup"].as_u64().unwrap_or(20);
    let mut samples = Vec::with_capacity(iters as usize);
    for i in 0..warmup + iters {
        let t = Instant::now();
        let status = std::process::Command::new("/bin/true")
            .status()
            .context("running /bin/true")?;
        let dt = t.elapsed();
        if !status.success() {
            bail!("/bin/true (iteration {i}): {status}");
        }
        if i >= warmup {
            samples.push(dt.as_nanos() as u64);
        }
    }
    Ok(json!({ "latency": Summary::of(&mut samples).to_json(), "samples_ns": samples }))
}

fn connect_times(spec: &Value) -> Result<Value> {
    let SocketAddr::V4(a) = addr(spec)? else {
        bail!("connect: IPv4 address expected");
    };
    let iters = spec["iters"].as_u64().unwrap_or(1000);
    let warmup = spec["warmup"].as_u64().unwrap_or(100);
    let pause = Duration::from_micros(spec["pause_us"].as_u64().unwrap_or(0));
    let sa = sockaddr_in(a);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let mut samples = Vec::with_capacity(iters as usize);
    for i in 0..warmup + iters {
        // SAFETY: plain socket syscalls on a descriptor this loop owns; the structs outlive them.
        let (r, dt, err) = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let t = Instant::now();
            let r = libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let dt = t.elapsed();
            let err = std::io::Error::last_os_error();
            // RST on close: no TIME_WAIT left behind by thousands of connects.
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::close(fd);
            (r, dt, err)
        };
        if r != 0 {
            bail!("connect to {a} (iteration {i}): {err}");
        }
        if i >= warmup {
            samples.push(dt.as_nanos() as u64);
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(json!({ "latency": Summary::of(&mut samples).to_json(), "samples_ns": samples }))
}

/// Sends `bytes` bytes (not HTTP, not TLS: guard passes them through) and waits for the sink to
/// acknowledge how many it got.
fn bulk(spec: &Value) -> Result<Value> {
    let addr = addr(spec)?;
    let total = spec["bytes"].as_u64().unwrap_or(1 << 30);
    let limit = Duration::from_secs(spec["timeout_s"].as_u64().unwrap_or(30));
    let buf = vec![0xa5u8; 256 << 10];
    let start = Instant::now();
    let mut s = StdTcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_write_timeout(Some(limit))?;
    s.set_read_timeout(Some(limit))?;
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).context("sending")?;
        left -= n as u64;
        if start.elapsed() > limit {
            bail!("bulk transfer took longer than {limit:?}");
        }
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).context("reading the sink's count")?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(ack);
    if got != total {
        bail!("sink got {got} of {total} bytes");
    }
    Ok(json!({ "bytes": total, "secs": secs, "mib_per_s": total as f64 / secs / 1048576.0 }))
}

fn echo_rtt(spec: &Value) -> Result<Value> {
    let addr = addr(spec)?;
    let iters = spec["iters"].as_u64().unwrap_or(1000);
    let warmup = spec["warmup"].as_u64().unwrap_or(100);
    let mut s = StdTcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Not HTTP, not TLS: guard relays it unchanged.
    let msg = [0xa5u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(iters as usize);
    for i in 0..warmup + iters {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reading the echo")?;
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(json!({ "latency": Summary::of(&mut samples).to_json(), "samples_ns": samples }))
}

/// Opens `n` connections with `open`, tolerating failures (the daemon may run out of file
/// descriptors: that is a result, not a crash); stops after 5 failures.
struct Opened<T> {
    conns: Vec<T>,
    failed: usize,
    first_error: Option<String>,
}

impl<T> Opened<T> {
    fn new(n: usize) -> Self {
        Opened {
            conns: Vec::with_capacity(n),
            failed: 0,
            first_error: None,
        }
    }

    /// Records one attempt; false when it is time to stop trying.
    fn record(&mut self, i: usize, r: Result<T>) -> bool {
        match r {
            Ok(c) => self.conns.push(c),
            Err(e) => {
                self.failed += 1;
                self.first_error
                    .get_or_insert_with(|| format!("connection {i}: {e:#}"));
            }
        }
        self.failed < 5
    }

    /// Tells the parent how many are held, then keeps them until released.
    fn hold(self, secs: f64) -> Result<Value> {
        let held = self.conns.len();
        let line = json!({ "held": held, "failed": self.failed,
                           "first_error": self.first_error, "secs": secs });
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
        drop(stdout);
        wait_for_release();
        drop(self.conns);
        Ok(json!({ "released": held }))
    }
}

/// Blocks until the parent closes our stdin (or it reaches a bounded wait).
fn wait_for_release() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn hold_tcp(spec: &Value) -> Result<Value> {
    let addr = addr(spec)?;
    let n = spec["n"].as_u64().unwrap_or(1000) as usize;
    let start = Instant::now();
    let mut opened = Opened::new(n);
    for i in 0..n {
        let one = || -> Result<StdTcpStream> {
            let mut s = StdTcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            // Not HTTP, not TLS: guard classifies it as other traffic and passes it through.
            s.write_all(b"hold\n")?;
            let mut echo = [0u8; 5];
            s.read_exact(&mut echo).context("reading the echo")?;
            Ok(s)
        };
        if !opened.record(i, one()) {
            break;
        }
    }
    opened.hold(start.elapsed().as_secs_f64())
}

async fn hold_mcp(spec: &Value) -> Result<Value> {
    let addr = addr(spec)?;
    let path = spec["path"].as_str().unwrap_or("/mcp").to_string();
    let n = spec["n"].as_u64().unwrap_or(1000) as usize;
    let tool = spec["tool"].as_str().unwrap_or("echo").to_string();
    let args = spec["args"].to_string();
    let tls = TlsClient::from_spec(spec, addr)?;
    let start = Instant::now();
    let mut opened = Opened::new(n);
    for i in 0..n {
        let one = async {
            let (mut c, _) = mcp_connect(addr, &path, tls.as_ref()).await?;
            c.initialize().await?;
            c.call(&tool, &args).await?;
            Ok(c)
        };
        let one = tokio::time::timeout(Duration::from_secs(3), one)
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within 3 s")));
        if !opened.record(i, one) {
            break;
        }
    }
    // Blocks this (only) runtime thread: the idle connections need nothing until released.
    opened.hold(start.elapsed().as_secs_f64())
}

/// `stdio`: round trips of `tools/call` to a stdio server (see the module documentation).
fn stdio_times(spec: &Value) -> Result<Value> {
    use std::io::BufRead as _;
    let argv: Vec<String> = serde_json::from_value(spec["command"].clone())?;
    let iters = spec["iters"].as_u64().unwrap_or(2000);
    let warmup = spec["warmup"].as_u64().unwrap_or(200);
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {argv:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    let mut round_trip = |msg: &str, line: &mut String| -> Result<()> {
        stdin.write_all(msg.as_bytes())?;
        stdin.flush()?;
        line.clear();
        if stdout.read_line(line)? == 0 {
            bail!("the stdio server closed its output");
        }
        Ok(())
    };
    let init = format!(
        "{}\n",
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {},
            "clientInfo": {"name": "guard-bench", "version": "1"}}})
    );
    round_trip(&init, &mut line)?;
    // `notifications/initialized` has no answer: it goes ahead of the first call.
    let initialized = "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n";
    let mut samples = Vec::with_capacity(iters as usize);
    let started = Instant::now();
    let mut timed = Duration::ZERO;
    for i in 0..warmup + iters {
        let first = if i == 0 { initialized } else { "" };
        let call = first.to_string() + &format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"text\":\"hello\"}}}}}}\n",
            i + 1
        );
        let t = Instant::now();
        round_trip(&call, &mut line)?;
        let dt = t.elapsed();
        if !line.contains("\"result\"") {
            bail!("call {i}: not a result: {}", line.trim());
        }
        if i >= warmup {
            samples.push(dt.as_nanos() as u64);
            timed += dt;
        }
    }
    let _ = started;
    drop(stdin);
    let _ = child.wait();
    Ok(json!({ "samples_ns": samples, "calls": iters, "secs": timed.as_secs_f64() }))
}

/// `guard-bench stdio-server`: a stdio MCP server that answers at once (`initialize`,
/// `tools/list` with one tool, `tools/call` with the text it was given), so that what a round
/// trip costs is the path, not the server.
pub fn stdio_server() -> Result<()> {
    use std::io::BufRead as _;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let Ok(m) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(id) = m.get("id") else { continue };
        let result = match m["method"].as_str().unwrap_or("") {
            "initialize" => json!({"protocolVersion": m["params"]["protocolVersion"],
                "capabilities": {"tools": {}}, "serverInfo": {"name": "bench-stdio", "version": "1"}}),
            "tools/list" => json!({"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}),
            _ => json!({"content": [{"type": "text", "text": m["params"]["arguments"]["text"]}]}),
        };
        let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// The JSON-RPC message of an answer: the body, or the data of its SSE events (a
/// `text/event-stream` answer).
fn message(bytes: &[u8]) -> serde_json::Result<Value> {
    if !(bytes.starts_with(b"event:") || bytes.starts_with(b"data:")) {
        return serde_json::from_slice(bytes);
    }
    let text = String::from_utf8_lossy(bytes);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    serde_json::from_str(&data.join("\n"))
}
