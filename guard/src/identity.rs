//! Who an agent is: the identity the kernel recorded at `connect()` (or the control socket's
//! peer credentials), with the attribution read from /proc, and the registry of agent cgroups
//! that gives an identity its agent name. The proxy, the MCP core and the audit trail all speak
//! of callers in these terms.

use std::{collections::HashMap, sync::RwLock};

use serde::Serialize;

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

impl Identity {
    /// The agent as limits and approvals know it: its name, else its uid.
    pub fn agent_key(&self) -> String {
        agent_key(&self.agent, self.uid)
    }

    /// The caller as the policy engine sees it (no MCP session yet).
    pub fn caller(&self) -> crate::policy::Caller {
        crate::policy::Caller {
            agent: self.agent.clone(),
            uid: self.uid,
            exe: self.exe.clone(),
            cgroup: self.cgroup.clone(),
            instance: Some(self.cgroup_id),
        }
    }
}

/// An agent's key (see [`Identity::agent_key`]) from its name and uid.
pub fn agent_key(agent: &Option<String>, uid: u32) -> String {
    match agent {
        Some(a) => format!("agent:{a}"),
        None => format!("uid:{uid}"),
    }
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
