//! Who is behind an accepted connection and where it was going. The proxy asks an [`Identify`]:
//! the daemon's is [`KernelIdentify`], which takes the origin the kernel recorded at `connect()`
//! from the origin map by the client's address (with the executable's device and inode, read by
//! the kernel at `connect()`) and adds attribution (agent name, executable path, cgroup path)
//! read at accept time. Tests give the proxy one of their own, so the real proxy
//! runs without eBPF.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    identity::{Agents, ExeFile, Identity},
    kernel::{self, Kernel},
};

/// A redirected connection, identified.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    pub identity: Identity,
}

/// The seam between the proxy and whatever knows where its connections were redirected from.
pub trait Identify: Send + Sync + 'static {
    /// The connection accepted from `client` on the listener at `local`. None: it did not come
    /// through the redirect (or its record is gone), and must be closed.
    fn identify(&self, client: SocketAddr, local: SocketAddr) -> Option<Connection>;
}

/// Identification by the kernel's origin map (the daemon's).
pub struct KernelIdentify {
    pub kernel: Arc<Kernel>,
    pub agents: Arc<Agents>,
}

impl Identify for KernelIdentify {
    fn identify(&self, client: SocketAddr, _local: SocketAddr) -> Option<Connection> {
        identify(&self.kernel, &self.agents, client)
    }
}

/// Takes the origin of `client` from the kernel. None: the connection did not come through the
/// redirect (or its entry is gone), and must be closed.
fn identify(kernel: &Kernel, agents: &Agents, client: SocketAddr) -> Option<Connection> {
    let origin = kernel.take_origin(client)?;
    let comm_len = origin
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(origin.comm.len());
    let cgroup = kernel::cgroup::cgroup_of(origin.tgid).ok();
    let agent = agents
        .get(origin.cgroup_id)
        .or_else(|| cgroup.as_deref().and_then(|c| agents.containing(c)))
        .map(|a| a.name);
    let identity = Identity {
        pid: origin.pid,
        tgid: origin.tgid,
        uid: origin.uid,
        gid: origin.gid,
        comm: String::from_utf8_lossy(&origin.comm[..comm_len]).into_owned(),
        cgroup_id: origin.cgroup_id,
        netns_cookie: origin.netns_cookie,
        agent,
        exe: std::fs::read_link(format!("/proc/{}/exe", origin.tgid))
            .ok()
            .map(|p| p.display().to_string()),
        exe_file: ExeFile::from_kernel(origin.exe_dev, origin.exe_ino),
        cgroup: cgroup.map(|c| format!("/{c}")),
    };
    Some(Connection {
        client,
        original_dst: kernel::original_dst(&origin),
        identity,
    })
}
