//! Plain servers for tests: an HTTP server that records who connected (and whether that was the
//! proxy), and a UDP counter.

use std::{
    collections::HashSet,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

/// A small HTTP/1.1 server that answers every request with `hello` and records who connected:
/// the peer address, and whether that peer socket belonged to the watched process (the daemon)
/// at accept time, while the connection is certainly open.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<(SocketAddr, bool)>>>,
    watch: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(bind: &str) -> HttpServer {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let watch = Arc::new(AtomicU32::new(0));
        let (p, s, w) = (peers.clone(), stop.clone(), watch.clone());
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let peer = conn.peer_addr().unwrap();
                let pid = w.load(Ordering::SeqCst);
                let owned = pid != 0 && owned_by(peer, addr, pid);
                p.lock().unwrap().push((peer, owned));
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = "hello from the test server\n";
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes());
                });
            }
        });
        HttpServer {
            addr,
            peers,
            watch,
            stop,
            thread: Some(thread),
        }
    }

    /// Record, for every later connection, whether its peer socket is held by `pid`.
    pub fn watch(&self, pid: u32) {
        self.watch.store(pid, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    /// Connections whose peer was the watched process (the proxy).
    pub fn via_watched(&self) -> usize {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, o)| *o)
            .count()
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Socket inodes the process `pid` holds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    if let Ok(n) = n.parse() {
                        out.insert(n);
                    }
                }
            }
        }
    }
    out
}

/// Parses `/proc/net/tcp{,6}` for the inode of the socket from `local` to `remote` (a local port
/// alone is not unique: it is reused towards other destinations, and TIME_WAIT entries linger).
fn inode_of(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(file).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            if parse_proc_addr(f[1]) == Some(local) && parse_proc_addr(f[2]) == Some(remote) {
                return f[9].parse().ok();
            }
        }
    }
    None
}

fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => {
            let v = u32::from_str_radix(ip, 16).ok()?;
            std::net::Ipv4Addr::from(v.to_ne_bytes()).into()
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(b);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether the client end `peer` of a connection the server accepted belongs to process `pid`.
/// The socket must still be open: call it while the connection lives or right after (the proxy
/// keeps its upstream socket until the client side is done).
pub fn owned_by(peer: SocketAddr, server: SocketAddr, pid: u32) -> bool {
    // /proc/net/tcp is not a consistent snapshot: while other sockets come and go (parallel
    // tests) a read can skip entries, so a miss is retried before it counts.
    for _ in 0..40 {
        if let Some(inode) = inode_of(peer, server) {
            if socket_inodes(pid).contains(&inode) {
                return true;
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    if std::env::var_os("GUARD_TEST_DEBUG").is_some() {
        let port = format!(":{:04X}", peer.port());
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            for l in fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&port))
            {
                eprintln!("owned_by({peer}, {pid}): {file}: {l}");
            }
        }
        eprintln!(
            "owned_by: inode {:?}, daemon sockets {}",
            inode_of(peer, server),
            socket_inodes(pid).len()
        );
    }
    false
}

/// A UDP server that counts datagrams.
pub struct UdpCounter {
    pub addr: SocketAddr,
    pub count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpCounter {
    pub fn start(bind: &str) -> UdpCounter {
        let sock = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("binding udp {bind}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    c.fetch_add(1, Ordering::SeqCst);
                    let _ = sock.send_to(b"pong", from);
                }
            }
        });
        UdpCounter { addr, count, stop }
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A scripted MCP server for answers no real server gives: it answers `initialize` and
/// notifications like a stateless Streamable HTTP server, and every `tools/list` with
/// `content_type` and `tools_list(id)` as the body, byte for byte. (A misbehaving or malicious
/// server: its answers are what guard must not pass on unfiltered.)
pub struct ScriptedMcp {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl ScriptedMcp {
    pub fn start(
        bind: &str,
        content_type: &'static str,
        tools_list: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> ScriptedMcp {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let tools_list = Arc::new(tools_list);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let tools_list = tools_list.clone();
                thread::spawn(move || serve_scripted(conn, content_type, &*tools_list));
            }
        });
        ScriptedMcp { addr, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
}

impl Drop for ScriptedMcp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// One keep-alive connection of a [`ScriptedMcp`].
fn serve_scripted(mut conn: TcpStream, content_type: &str, tools_list: &dyn Fn(&str) -> String) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let start = head_end + 4;
        while buf.len() < start + len {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: serde_json::Value =
            serde_json::from_slice(&buf[start..start + len]).unwrap_or_default();
        buf.drain(..start + len);
        let id = body["id"].to_string();
        let (status, ct, text) = match body["method"].as_str().unwrap_or("") {
            "initialize" => (
                "200 OK",
                "application/json",
                format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"protocolVersion":"{}","capabilities":{{"tools":{{}}}},"serverInfo":{{"name":"scripted","version":"1"}}}}}}"#,
                    body["params"]["protocolVersion"]
                        .as_str()
                        .unwrap_or("2025-06-18")
                ),
            ),
            "tools/list" => ("200 OK", content_type, tools_list(&id)),
            m if m.starts_with("notifications/") => ("202 Accepted", "text/plain", String::new()),
            _ => (
                "200 OK",
                "application/json",
                format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{}}}}"#),
            ),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if conn.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
