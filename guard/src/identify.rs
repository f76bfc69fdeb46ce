//! Who is behind an accepted connection and where it was going: the origin recorded in the kernel
//! at `connect()` time, taken from the origin map by the client's address, plus attribution
//! (agent name, executable, cgroup path) read at accept time.

use std::{collections::HashMap, net::SocketAddr, sync::RwLock};

use serde::Serialize;

use crate::redirect::{self, Kernel};

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Identity {
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// Name given with `guard exec --agent`, when the cgroup is an agent cgroup.
    pub agent: Option<String>,
    /// Read from /proc at accept time: attribution only, never a basis for decisions.
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

/// A redirected connection, identified.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    pub identity: Identity,
}

/// Agent cgroups created by `guard exec`, by cgroup id.
#[derive(Default)]
pub struct Agents {
    by_id: RwLock<HashMap<u64, AgentCgroup>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentCgroup {
    pub name: String,
    /// Relative to the cgroup v2 mount.
    pub cgroup: String,
    pub id: u64,
}

impl Agents {
    pub fn insert(&self, a: AgentCgroup) {
        self.by_id.write().unwrap().insert(a.id, a);
    }

    pub fn remove(&self, id: u64) -> Option<AgentCgroup> {
        self.by_id.write().unwrap().remove(&id)
    }

    pub fn get(&self, id: u64) -> Option<AgentCgroup> {
        self.by_id.read().unwrap().get(&id).cloned()
    }

    pub fn all(&self) -> Vec<AgentCgroup> {
        let mut v: Vec<_> = self.by_id.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        v
    }

    /// The agent whose cgroup is `rel` or an ancestor of it.
    pub fn containing(&self, rel: &str) -> Option<AgentCgroup> {
        self.by_id
            .read()
            .unwrap()
            .values()
            .find(|a| rel == a.cgroup || rel.starts_with(&format!("{}/", a.cgroup)))
            .cloned()
    }
}

/// Takes the origin of `client` from the kernel. None: the connection did not come through the
/// redirect (or its entry is gone), and must be closed.
pub fn identify(kernel: &Kernel, agents: &Agents, client: SocketAddr) -> Option<Connection> {
    let origin = kernel.take_origin(client)?;
    let comm_len = origin
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(origin.comm.len());
    let cgroup = crate::cgroup::cgroup_of(origin.tgid).ok();
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
        cgroup: cgroup.map(|c| format!("/{c}")),
    };
    Some(Connection {
        client,
        original_dst: redirect::original_dst(&origin),
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_by_cgroup() {
        let agents = Agents::default();
        agents.insert(AgentCgroup {
            name: "bot".into(),
            cgroup: "guard.slice/agent-bot-1".into(),
            id: 7,
        });
        assert_eq!(agents.get(7).unwrap().name, "bot");
        assert_eq!(
            agents.containing("guard.slice/agent-bot-1/x").unwrap().id,
            7
        );
        assert!(agents.containing("guard.slice/agent-bot-10").is_none());
        assert_eq!(agents.all().len(), 1);
        agents.remove(7);
        assert!(agents.get(7).is_none());
    }
}
