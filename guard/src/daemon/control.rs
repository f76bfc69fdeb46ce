//! The control socket: a versioned, line-delimited JSON protocol between the `guard` CLI and the
//! daemon. The daemon authenticates every caller with `SO_PEERCRED`, never with anything the
//! caller says about itself.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
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

/// The kernel's word on who is calling.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
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
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the daemon's answer")?;
    if reply.is_empty() {
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
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, handler).await {
                tracing::debug!("control connection: {e:#}");
            }
        });
    }
}

async fn serve_one<H: Handler>(stream: UnixStream, handler: Arc<H>) -> Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        pid: cred.pid().unwrap_or(0) as u32,
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await??;
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
}
