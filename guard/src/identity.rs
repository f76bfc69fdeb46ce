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
    /// The executable as the kernel knew it at `connect()`: what `exes` grants are decided on.
    pub exe_file: Option<ExeFile>,
    pub cgroup: Option<String>,
}

/// A file by what no namespace can change: its filesystem's device and its inode number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ExeFile {
    /// `st_dev` encoding (`makedev(major, minor)`).
    pub dev: u64,
    pub ino: u64,
}

impl ExeFile {
    /// From the kernel's encoding of a device (`major << 20 | minor`) and an inode number;
    /// None when the kernel recorded none.
    pub fn from_kernel(dev: u32, ino: u64) -> Option<ExeFile> {
        (ino != 0 && dev != 0).then(|| ExeFile {
            dev: libc::makedev(dev >> 20, dev & 0xf_ffff),
            ino,
        })
    }

    /// Whether `path`, as the daemon's own mount namespace resolves it (symbolic links
    /// followed), is this file. A bind mount in an agent's namespace changes what a path names
    /// there, not here. Where `stat` reports another device than the superblock's (btrfs
    /// subvolumes, some overlayfs files) nothing matches: on btrfs an inode number is unique only
    /// within a subvolume, which any user may create, so the superblock's device with an inode
    /// number would not tell files apart.
    pub fn is(&self, path: &str) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path).is_ok_and(|md| md.ino() == self.ino && md.dev() == self.dev)
    }
}

impl Identity {
    /// The agent as limits and approvals know it: its name, else its uid.
    pub fn agent_key(&self) -> String {
        agent_key(&self.agent, self.uid)
    }

    /// The caller as the policy engine sees it, its executable compared with the paths
    /// `exe_paths` (those a policy's grants name): only the kernel's record of it counts.
    pub fn caller<'a>(
        &self,
        exe_paths: impl IntoIterator<Item = &'a str>,
    ) -> crate::policy::Caller {
        let exes = match self.exe_file {
            Some(f) => exe_paths
                .into_iter()
                .filter(|p| f.is(p))
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        crate::policy::Caller {
            agent: self.agent.clone(),
            uid: self.uid,
            exes,
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

/// What a connection of a process marked at exec (`[[agents]]`, not moved into its agent
/// cgroup yet) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    Agent(String),
    /// Not an agent (an interpreter running something else): it passes through untouched.
    NotAgent,
    /// An agent that could not be enrolled yet: refused (fail closed).
    Failed,
}

/// Who decides what a marked process is (the daemon's enrolment).
pub trait Enrolments: Send + Sync + 'static {
    /// `pid`: the connecting process; `root`: the process marked at exec it descends from.
    fn agent_of(&self, pid: u32, root: u32) -> Enrolled;
}

/// Agent cgroups created by `guard exec`, by cgroup id.
#[derive(Default)]
pub struct Agents {
    by_id: RwLock<HashMap<u64, AgentCgroup>>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AgentCgroup {
    pub name: String,
    /// Relative to the cgroup v2 mount.
    pub cgroup: String,
    pub id: u64,
    /// The process that was enrolled (0: not known, for a cgroup found at start).
    pub pid: u32,
    /// Its executable then.
    pub exe: Option<String>,
    /// How it was enrolled: `guard-exec`, `exec-match`, or `adopted` (found at start).
    pub how: String,
    /// When (RFC 3339).
    pub since: String,
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
            ..Default::default()
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
