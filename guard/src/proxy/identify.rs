//! Who is behind an accepted connection and where it was going. The proxy asks an [`Identify`]:
//! the daemon's is [`KernelIdentify`], which takes the origin the kernel recorded at `connect()`
//! from the origin map by the client's address (with the executable's device and inode, read by
//! the kernel at `connect()`) and adds attribution (agent name, executable path, cgroup path)
//! read at accept time. Tests give the proxy one of their own, so the real proxy
//! runs without eBPF.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    identity::{Agents, Enrolled, Enrolments, ExeFile, Identity},
    kernel::{self, Kernel},
};

/// A redirected connection, identified.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    pub identity: Identity,
    /// Redirected only because its process was marked at exec, and it is not an agent: passed
    /// through untouched.
    pub pass: bool,
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
    /// `[[agents]]` enrolment, where configured.
    pub enrol: Option<Arc<dyn Enrolments>>,
}

impl Identify for KernelIdentify {
    fn identify(&self, client: SocketAddr, _local: SocketAddr) -> Option<Connection> {
        identify(&self.kernel, &self.agents, self.enrol.as_deref(), client)
    }
}

/// Takes the origin of `client` from the kernel. None: the connection did not come through the
/// redirect (or its entry is gone), and must be closed.
fn identify(
    kernel: &Kernel,
    agents: &Agents,
    enrol: Option<&dyn Enrolments>,
    client: SocketAddr,
) -> Option<Connection> {
    let origin = kernel.take_origin(client)?;
    let mut identity = Identity {
        netns_cookie: origin.netns_cookie,
        exe_file: ExeFile::from_kernel(origin.exe_dev, origin.exe_ino),
        ..attributed(
            agents,
            Seen {
                pid: origin.pid,
                tgid: origin.tgid,
                uid: origin.uid,
                gid: origin.gid,
                comm: &origin.comm,
                cgroup_id: origin.cgroup_id,
                agent_cgroup_id: origin.cgroup_id,
            },
        )
    };
    let mut pass = false;
    if origin.enrolling != 0 && identity.agent.is_none() {
        // Marked at exec and not moved yet (or the move raced this connect).
        match enrol.map(|e| e.agent_of(origin.tgid, origin.enrolling)) {
            Some(Enrolled::Agent(name)) => {
                identity.agent = Some(name);
                identity.cgroup = kernel::cgroup::cgroup_of(origin.tgid)
                    .ok()
                    .map(|c| format!("/{c}"));
            }
            Some(Enrolled::NotAgent) => pass = true,
            Some(Enrolled::Failed) | None => return None,
        }
    }
    Some(Connection {
        client,
        original_dst: kernel::original_dst(&origin),
        identity,
        pass,
    })
}

/// What the kernel saw of a task (at `connect()`, or when it refused something).
pub struct Seen<'a> {
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: &'a [u8; 16],
    pub cgroup_id: u64,
    /// The agent cgroup to look the agent up by first.
    pub agent_cgroup_id: u64,
}

/// `seen` with attribution read now: the agent (by cgroup id, else by the cgroup path that
/// contains the task), the executable path and the cgroup path.
pub fn attributed(agents: &Agents, seen: Seen<'_>) -> Identity {
    let comm_len = seen
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(seen.comm.len());
    let cgroup = kernel::cgroup::cgroup_of(seen.tgid).ok();
    let agent = agents
        .get(seen.agent_cgroup_id)
        .or_else(|| cgroup.as_deref().and_then(|c| agents.containing(c)))
        .map(|a| a.name);
    Identity {
        pid: seen.pid,
        tgid: seen.tgid,
        uid: seen.uid,
        gid: seen.gid,
        comm: String::from_utf8_lossy(&seen.comm[..comm_len]).into_owned(),
        cgroup_id: seen.cgroup_id,
        agent,
        exe: std::fs::read_link(format!("/proc/{}/exe", seen.tgid))
            .ok()
            .map(|p| p.display().to_string()),
        cgroup: cgroup.map(|c| format!("/{c}")),
        ..Default::default()
    }
}
