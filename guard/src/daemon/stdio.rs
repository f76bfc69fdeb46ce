//! The stdio socket: where `guard wrap` sessions reach the daemon. Each connection is one
//! session; the caller is who `SO_PEERCRED` says (checked alive by its pidfd while /proc is
//! read), never what it says of itself, and the server's command line it reports must be its
//! own command line's tail. Then [`crate::stdio::session::run`] serves it. Sessions are long:
//! unlike the control socket there is no deadline, but one uid holds a bounded number.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
};

use super::control::Peer;
use crate::{
    config::UnknownServers,
    identity::{Agents, ExeFile, Identity},
    kernel::{cgroup, procfs},
    mcp::Engine,
    proxy::identify::{attributed, Seen},
    stdio::{
        proto::{self, encode, read_frame, Hello, Kind, Welcome},
        session::{self, Session},
    },
};

/// Sessions one uid may hold at once, by default.
pub const PER_UID: usize = 256;

/// What sessions share.
pub struct Stdio {
    pub engine: Arc<Engine>,
    pub agents: Arc<Agents>,
    /// `proxy.max_body`.
    pub max_body: usize,
    /// Sessions one uid holds at once (an agent host runs a few servers per agent).
    pub per_uid: usize,
}

/// Binds the stdio socket (every user may connect: each session is the caller's own).
pub fn bind(path: &Path) -> Result<UnixListener> {
    super::control::bind_socket(path, "the stdio socket")
}

/// One uid's open sessions, given back on drop.
struct Slot(Arc<Mutex<HashMap<u32, usize>>>, u32);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.0.lock().unwrap();
        if let Some(n) = c.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.1);
            }
        }
    }
}

pub async fn serve(listener: UnixListener, stdio: Arc<Stdio>) {
    let counts: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("stdio socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(peer) = Peer::of(&stream) else {
            continue;
        };
        let slot = {
            let mut c = counts.lock().unwrap();
            let n = c.entry(peer.uid).or_default();
            (*n < stdio.per_uid).then(|| {
                *n += 1;
                Slot(counts.clone(), peer.uid)
            })
        };
        let stdio = stdio.clone();
        tokio::spawn(async move {
            let Some(_slot) = slot else {
                let why = format!(
                    "uid {} has {} guard wrap sessions open already; end some first",
                    peer.uid, stdio.per_uid
                );
                refuse(stream, why).await;
                return;
            };
            if let Err(e) = stdio.session(stream, peer).await {
                tracing::debug!("stdio session: {e:#}");
            }
        });
    }
}

/// Answers a session with a refusal and closes it.
async fn refuse(mut stream: UnixStream, why: String) {
    let w = Welcome {
        ok: false,
        error: Some(why),
        ..Welcome::default()
    };
    let payload = serde_json::to_vec(&w).unwrap_or_default();
    let _ = stream.write_all(&encode(Kind::Welcome, 0, &payload)).await;
}

impl Stdio {
    async fn session(&self, mut stream: UnixStream, peer: Peer) -> Result<()> {
        let hello = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream))
            .await
            .map_err(|_| anyhow!("no hello within 10 s"))??;
        let hello: Hello = match hello {
            Some(f) if f.kind == Kind::Hello => serde_json::from_slice(&f.payload)?,
            _ => bail!("the session did not start with a hello"),
        };
        if hello.v != proto::VERSION {
            let why = format!(
                "guard wrap speaks stdio protocol {} and this daemon {}: use the guard of the same release",
                hello.v,
                proto::VERSION
            );
            refuse(stream, why).await;
            return Ok(());
        }
        let (caller, argv) = match peer.by_pid(|pid| wrapper(&self.agents, &peer, pid)) {
            Ok(x) => x,
            Err(e) => {
                refuse(stream, format!("{e:#}")).await;
                return Ok(());
            }
        };
        if hello.command.is_empty() || !argv.ends_with(&hello.command) {
            let why = "the server command guard wrap reports is not its own command line's".into();
            refuse(stream, why).await;
            return Ok(());
        }
        let command = hello.command.join(" ");
        let policies = self.engine.policies();
        let server = match session::resolve(&policies, hello.server.as_deref(), &command) {
            Ok(s) => s,
            Err(why) => {
                refuse(stream, why).await;
                return Ok(());
            }
        };
        let deny = self.engine.settings.unknown_servers == UnknownServers::Deny;
        let welcome = Welcome {
            ok: true,
            error: None,
            start: server.is_some() || !deny,
            server,
            max_body: self.max_body,
        };
        let payload = serde_json::to_vec(&welcome)?;
        stream
            .write_all(&encode(Kind::Welcome, 0, &payload))
            .await?;
        let s = Arc::new(Session::new(
            self.engine.clone(),
            caller,
            hello.server,
            command,
            self.max_body,
        ));
        let (rd, wr) = stream.into_split();
        // Buffered: one read per frame (or several), not three.
        let rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
        session::run(s, rd, wr).await?;
        Ok(())
    }
}

/// The wrapping process `pid` as the daemon sees it, and its command line. Its cgroup and uid
/// are the agent's (wrap runs where the agent started it); its executable is guard's own, so
/// the executable grants are decided on is the one of the process that started it.
fn wrapper(agents: &Agents, peer: &Peer, pid: u32) -> Result<(Identity, Vec<String>)> {
    let (ppid, name) = procfs::stat(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let name = name.as_bytes();
    let mut comm = [0u8; 16];
    let n = name.len().min(15);
    comm[..n].copy_from_slice(&name[..n]);
    let rel = cgroup::cgroup_of(pid)?;
    let id = cgroup::cgroup_id(&cgroup::cgroup2_mount()?.join(&rel))?;
    let mut who = attributed(
        agents,
        Seen {
            pid,
            tgid: pid,
            uid: peer.uid,
            gid: peer.gid,
            comm: &comm,
            cgroup_id: id,
            agent_cgroup_id: id,
        },
    );
    let parent_exe = format!("/proc/{ppid}/exe");
    who.exe = std::fs::read_link(&parent_exe)
        .ok()
        .map(|p| p.display().to_string());
    who.exe_file = std::fs::metadata(&parent_exe).ok().map(|m| ExeFile {
        dev: m.dev(),
        ino: m.ino(),
    });
    let argv = procfs::argv(pid).with_context(|| format!("reading /proc/{pid}/cmdline"))?;
    Ok((who, argv))
}
