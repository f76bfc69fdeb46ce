//! The control socket: a versioned, line-delimited JSON protocol between the `guard` CLI and the
//! daemon. The daemon authenticates every caller with `SO_PEERCRED`, never with anything the
//! caller says about itself.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

pub const PROTOCOL_VERSION: u32 = 1;
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Move the caller into a new guarded agent cgroup.
    Exec {
        agent: String,
    },
    Status,
    /// Emergency fail-open: unpin and detach everything.
    Disable,
    /// Reload the policies now (root).
    Reload,
    /// Held calls (root or approvers).
    ApprovalsList,
    /// Release a held call; `for_s` also approves identical calls from that agent for so long.
    Approve {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_s: Option<u64>,
    },
    /// Refuse a held call.
    Deny {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Exec { .. } => "exec",
            Request::Status => "status",
            Request::Disable => "disable",
            Request::Reload => "reload",
            Request::ApprovalsList => "approvals_list",
            Request::Approve { .. } => "approve",
            Request::Deny { .. } => "deny",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl Response {
    pub fn ok(result: Value) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            error: Some(msg.into()),
            result: None,
        }
    }
}

/// The kernel's word on who is calling: `SO_PEERCRED` (uid, gid, and the pid at connect time)
/// and a pidfd of that very process (`SO_PEERPIDFD`). A pid alone can be recycled — the caller
/// exits, another process gets its number — so whatever is read or done by pid is trusted
/// only while the pidfd says the caller is still alive ([`Peer::alive`]).
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pidfd: Option<Arc<std::os::fd::OwnedFd>>,
}

impl Peer {
    /// A peer without a process to check (tests of the handlers).
    pub fn unchecked(pid: u32, uid: u32, gid: u32) -> Peer {
        Peer {
            pid,
            uid,
            gid,
            pidfd: None,
        }
    }

    /// The peer of `stream`: its credentials and a pidfd of the process that connected.
    pub(crate) fn of(stream: &UnixStream) -> Result<Peer> {
        use std::os::fd::AsRawFd as _;
        let cred = stream.peer_cred()?;
        let pid = cred.pid().unwrap_or(0) as u32;
        let pidfd = peer_pidfd(stream.as_raw_fd(), pid);
        Ok(Peer {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd: pidfd.map(Arc::new),
        })
    }

    /// Whether the process that connected is still alive, so that `pid` still names it. False
    /// when it is gone (or no pidfd could be had for it).
    pub fn alive(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let Some(fd) = &self.pidfd else {
            return false;
        };
        // A pidfd polls readable once its process has exited. Polling needs no permission,
        // where pidfd_send_signal(0) needs kill rights the daemon lacks for other users (no
        // CAP_KILL in the unit).
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }

    /// `f(pid)` — reading /proc, moving the process — trusted only if the caller is alive
    /// before and after it (then `pid` was the caller's all along).
    pub fn by_pid<T>(&self, f: impl FnOnce(u32) -> Result<T>) -> Result<T> {
        let gone = || {
            anyhow!(
                "the calling process (pid {}) is gone: nothing was done",
                self.pid
            )
        };
        if !self.alive() {
            return Err(gone());
        }
        let out = f(self.pid)?;
        if !self.alive() {
            return Err(gone());
        }
        Ok(out)
    }
}

/// A pidfd of the process at the other end of `fd`: `SO_PEERPIDFD` (Linux 6.5), which names the
/// process that connected even if its pid was recycled since; on older kernels `pidfd_open` of
/// the `SO_PEERCRED` pid, right after accept (a weaker check: the caller could be gone already).
fn peer_pidfd(fd: i32, pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd, out pointer and length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 && pidfd >= 0 {
        // SAFETY: the kernel just gave us this descriptor.
        return Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) });
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOPROTOOPT) {
        // The peer is gone (ESRCH, EINVAL): no pidfd, so no action by pid.
        return None;
    }
    // SAFETY: pidfd_open has no memory-safety preconditions.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: the kernel just gave us this descriptor.
    (r >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// Sends one request and waits for its answer (blocking; the CLI is single-threaded so that
/// `guard exec` can move itself and exec).
pub fn call(socket: &Path, request: Request) -> Result<Value> {
    let mut stream = StdUnixStream::connect(socket).map_err(|e| {
        anyhow!(
            "cannot reach the guard daemon at {}: {e}. Is it running? (start it with `guard daemon` as root, or `systemctl start guard`)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(&RequestEnvelope {
        v: PROTOCOL_VERSION,
        request,
    })?;
    line.push(b'\n');
    // A daemon that refuses the connection answers before it reads (and closes): its answer
    // is still there to read when the write finds the socket closed.
    let written = stream.write_all(&line);
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the daemon's answer")?;
    if reply.is_empty() {
        written.context("sending the request to the daemon")?;
        bail!("the guard daemon closed the control connection without answering");
    }
    let resp: Response =
        serde_json::from_str(&reply).context("the daemon's answer is not valid")?;
    if resp.ok {
        Ok(resp.result.unwrap_or(Value::Null))
    } else {
        Err(anyhow!(resp.error.unwrap_or_else(|| "refused".into())))
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        peer: Peer,
        request: Request,
    ) -> impl std::future::Future<Output = Response> + Send;
}

/// Binds the control socket: refuses when another daemon answers on it, replaces a stale file,
/// and makes it connectable by every user (`guard exec` is for everyone; each request is
/// authorised on its own).
pub fn bind(path: &Path) -> Result<UnixListener> {
    bind_socket(path, "the control socket")
}

/// Binds a daemon socket every user may connect to (each caller is authorised by
/// `SO_PEERCRED`): refuses when another daemon answers on it, replaces a stale file.
pub(crate) fn bind_socket(path: &Path, what: &str) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            bail!(
                "another guard daemon is already answering on {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {what} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// How much of the daemon the control socket may take: every request is short (a line in, a
/// line out), so a connection has a deadline, one uid a few at once, and all of them together
/// a fixed number of file descriptors — never the proxy's. Root has its own share: no other
/// uid can keep the operator from `approve`, `deny`, `disable` or `reload`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections of uids other than root served at once: beyond, answered with an error and
    /// closed at once (no descriptor is held for them).
    pub total: usize,
    /// Connections one uid (root too) has open at once: beyond, answered with an error and
    /// closed at once.
    pub per_uid: usize,
    /// The whole exchange (request line, handling, answer) must end within this.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 64,
            per_uid: 8,
            deadline: Duration::from_secs(10),
        }
    }
}

/// One uid's open control connections, given back on drop.
struct UidSlot {
    counts: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap();
        if let Some(n) = c.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.uid);
            }
        }
    }
}

pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    serve_with(listener, handler, Limits::default()).await
}

pub async fn serve_with<H: Handler>(listener: UnixListener, handler: Arc<H>, limits: Limits) {
    let open = Arc::new(Semaphore::new(limits.total));
    let per_uid: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("control connection without credentials: {e}");
                continue;
            }
        };
        let slot = {
            let mut counts = per_uid.lock().unwrap();
            let n = counts.entry(peer.uid).or_default();
            if *n < limits.per_uid {
                *n += 1;
                Some(UidSlot {
                    counts: per_uid.clone(),
                    uid: peer.uid,
                })
            } else {
                None
            }
        };
        let permit = match peer.uid {
            0 => None,
            _ => open.clone().try_acquire_owned().ok(),
        };
        let refusal = match (&slot, &permit) {
            (None, _) => Some(format!(
                "uid {} has {} control connections open already; try again when they end",
                peer.uid, limits.per_uid
            )),
            (Some(_), None) if peer.uid != 0 => Some(format!(
                "the daemon serves {} control connections already; try again in a moment",
                limits.total
            )),
            _ => None,
        };
        if let Some(msg) = refusal {
            // Answered without reading and closed now: a refused caller holds nothing.
            let mut out = serde_json::to_vec(&Response::err(msg)).unwrap_or_default();
            out.push(b'\n');
            let _ = stream.try_write(&out);
            continue;
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let (_permit, _slot) = (permit, slot);
            match tokio::time::timeout(limits.deadline, serve_one(stream, peer, handler)).await {
                Ok(Err(e)) => tracing::debug!("control connection: {e:#}"),
                Err(_) => tracing::debug!(
                    "control connection closed: no complete exchange within {:?}",
                    limits.deadline
                ),
                Ok(Ok(())) => {}
            }
        });
    }
}

async fn serve_one<H: Handler>(stream: UnixStream, peer: Peer, handler: Arc<H>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<RequestEnvelope>(&line) {
        Ok(env) if env.v != PROTOCOL_VERSION => Response::err(format!(
            "control protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION}); use the guard CLI of the same release",
            env.v
        )),
        Ok(env) => handler.handle(peer, env.request).await,
        Err(e) => Response::err(format!("malformed control request: {e}")),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let line = serde_json::to_string(&RequestEnvelope {
            v: 1,
            request: Request::Exec {
                agent: "bot".into(),
            },
        })
        .unwrap();
        assert_eq!(line, r#"{"v":1,"op":"exec","agent":"bot"}"#);
        let env: RequestEnvelope = serde_json::from_str(r#"{"v":1,"op":"status"}"#).unwrap();
        assert_eq!(env.request, Request::Status);
        assert!(serde_json::from_str::<RequestEnvelope>(r#"{"v":1,"op":"rm -rf"}"#).is_err());
    }

    #[test]
    fn a_peer_is_alive_until_it_exits_even_unreaped() {
        use std::os::fd::FromRawFd as _;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // SAFETY: pidfd_open has no memory-safety preconditions.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        assert!(fd >= 0);
        let peer = Peer {
            // SAFETY: the kernel just gave us this descriptor.
            pidfd: Some(Arc::new(unsafe {
                std::os::fd::OwnedFd::from_raw_fd(fd as i32)
            })),
            ..Peer::unchecked(child.id(), 0, 0)
        };
        assert!(peer.alive());
        assert!(peer.by_pid(Ok).is_ok());
        child.kill().unwrap();
        // A zombie is gone too: its pid is about to be free for another process.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while peer.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!peer.alive());
        let err = peer.by_pid(Ok).unwrap_err();
        assert!(format!("{err}").contains("is gone"), "{err}");
        child.wait().unwrap();
        assert!(!Peer::unchecked(1, 0, 0).alive());
    }

    struct Echo;

    impl Handler for Echo {
        async fn handle(&self, peer: Peer, _request: Request) -> Response {
            Response::ok(serde_json::json!({ "uid": peer.uid }))
        }
    }

    #[tokio::test]
    async fn the_control_socket_takes_few_descriptors_and_no_idle_caller() {
        let dir = std::env::temp_dir().join(format!("guard-control-limits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let limits = Limits {
            total: 6,
            per_uid: 3,
            deadline: Duration::from_millis(500),
        };
        let server = tokio::spawn(serve_with(bind(&path).unwrap(), Arc::new(Echo), limits));
        let request = |path: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || call(&path, Request::Status))
        };
        // Three idle connections of this uid: a fourth is refused at once, not queued.
        let idle: Vec<StdUnixStream> = (0..3)
            .map(|_| StdUnixStream::connect(&path).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = request(path.clone())
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("control connections open already"), "{e}");
        // The idle ones are closed at the deadline; then calls are served again.
        tokio::time::sleep(Duration::from_millis(700)).await;
        for mut c in idle {
            let mut buf = [0u8; 16];
            use std::io::Read as _;
            assert_eq!(
                c.read(&mut buf).unwrap_or(0),
                0,
                "an idle connection stayed open"
            );
        }
        let ok = request(path.clone()).await.unwrap().unwrap();
        assert_eq!(ok["uid"], u32::from(nix::unistd::getuid()));
        server.abort();
        // Callers other than root together hold at most `total` connections: the next is
        // refused at once (root has its own share).
        let path2 = dir.join("d.sock");
        let limits = Limits {
            total: 2,
            per_uid: 10,
            deadline: Duration::from_millis(500),
        };
        let server = tokio::spawn(serve_with(bind(&path2).unwrap(), Arc::new(Echo), limits));
        let idle: Vec<StdUnixStream> = (0..2)
            .map(|_| StdUnixStream::connect(&path2).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = request(path2.clone()).await.unwrap();
        if nix::unistd::getuid().is_root() {
            assert!(third.is_ok(), "{third:?}");
        } else {
            let e = third.unwrap_err().to_string();
            assert!(e.contains("serves 2 control connections"), "{e}");
        }
        drop(idle);
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
