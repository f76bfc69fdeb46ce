//! Agent cgroups: `guard exec` asks for one (`exec`: a root-owned `agent-NAME-N` below the
//! attach cgroup, guarded before the caller is moved in), and they are removed once their last
//! process is gone (`reap`).

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{bail, Result};
use serde_json::json;

use super::{control::Peer, Daemon};
use crate::{
    audit::{AgentRef, Decision, Event},
    identity::{AgentCgroup, Identity},
    kernel::cgroup,
    proxy::tls::CaFiles,
};

const REAP_INTERVAL: Duration = Duration::from_millis(200);

/// Agent names end up in cgroup names, audit records and policy grants.
pub fn valid_agent_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `agent-NAME-N` -> (NAME, N)
pub fn parse_agent_dir(dir: &str) -> Option<(String, u64)> {
    let rest = dir.strip_prefix("agent-")?;
    let (name, n) = rest.rsplit_once('-')?;
    let n = n.parse().ok()?;
    valid_agent_name(name).then(|| (name.to_string(), n))
}

/// Whether cgroup `rel` is `base` or below it (both relative to the mount).
pub(super) fn under(rel: &str, base: &str) -> bool {
    let rel = rel.trim_matches('/');
    let base = base.trim_matches('/');
    base.is_empty() || rel == base || rel.starts_with(&format!("{base}/"))
}

impl Daemon {
    /// Removes agent cgroups once their last process is gone.
    pub(super) async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        loop {
            tick.tick().await;
            for a in self.agents.all() {
                let path = self.cgroup_mount.join(&a.cgroup);
                if cgroup::populated(&path).unwrap_or(false) {
                    continue;
                }
                // Removed before it is unguarded: a process moved in meanwhile (what an agent
                // forked, settled late) keeps the cgroup, and the cgroup stays guarded.
                if let Err(e) = cgroup::remove(&path) {
                    tracing::debug!("removing {}: {e}", path.display());
                    continue;
                }
                self.agents.remove(a.id);
                if let Err(e) = self.kernel.unguard_cgroup(a.id) {
                    tracing::warn!("unguarding {}: {e:#}", a.cgroup);
                }
                let mut r = self.audit.record(Event::AgentExit, Decision::Enforce);
                r.detail = Some(json!({"agent": a.name, "cgroup": format!("/{}", a.cgroup)}));
                let _ = self.audit.write(&r);
            }
        }
    }

    // Long (about 75 lines) on purpose: every check before the move, the move, and its undo
    // read in the order they must happen.
    pub(super) fn exec(&self, peer: Peer, agent: String) -> Result<serde_json::Value> {
        if !valid_agent_name(&agent) {
            bail!("invalid agent name `{agent}`: use 1-64 letters, digits, `_`, `.` or `-`, starting with a letter or digit");
        }
        if self.disabled.load(Ordering::SeqCst) {
            bail!("guard is disabled on this host (guard disable); restart the daemon to enforce again");
        }
        if let Some(uids) = self.enrol.uids_of(&agent) {
            if !uids.contains(&peer.uid) {
                bail!(
                    "uid {} may not start agent `{agent}`: its [[agents]] entry binds the name to uid{} {}",
                    peer.uid,
                    if uids.len() == 1 { "" } else { "s" },
                    uids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
                );
            }
        }
        if self.kernel.is_marked(peer.pid) {
            // An [[agents]] process the daemon has not moved yet: it is that agent, and must
            // not pick another name (and its grants) first.
            bail!("this process is an agent's ([[agents]]) and is being enrolled; it cannot start an agent under a name of its choosing");
        }
        let caller_cgroup = peer.by_pid(cgroup::cgroup_of)?;
        let current = self.agents.containing(&caller_cgroup);
        if current.is_none() && self.is_guarded(&peer) {
            // A process guarded by uid or by a configured cgroup must not pick a name (and the
            // grants that come with it).
            bail!("a guarded process cannot start an agent under a name of its choosing");
        }
        if let Some(current) = current {
            // A guarded agent must not re-enrol under another name (and another name's grants).
            if current.name != agent {
                bail!(
                    "this process is already guarded as agent `{}`; it cannot become `{agent}`",
                    current.name
                );
            }
            return Ok(
                json!({"agent": agent, "cgroup": format!("/{}", current.cgroup), "moved": false}),
            );
        }
        let home = Home {
            kernel: &self.kernel,
            attach_path: &self.attach_path,
            attach_rel: &self.attach_rel,
            next: &self.next_agent,
        };
        let (path, rel, id) = home.create(&agent)?;
        // Guarded before the process arrives, so not one connect slips through. Moved by pid,
        // and only while the pidfd says the pid is still the caller's.
        let moved = peer.by_pid(|pid| cgroup::move_pid(&path, pid));
        if let Err(e) = moved {
            // Had the caller gone while it was moved, its pid might name another process now:
            // whatever arrived goes back to where the caller was.
            let back = self.cgroup_mount.join(&caller_cgroup);
            for pid in cgroup::procs(&path) {
                let _ = cgroup::move_pid(&back, pid);
            }
            home.undo(&path, id);
            let mut r = self.audit.record(Event::Control, Decision::Deny);
            r.actor_uid = Some(peer.uid);
            r.method = Some("exec".into());
            r.reason = Some(format!("{e:#}"));
            let _ = self.audit.write(&r);
            return Err(e);
        }
        let who = (peer.pid, peer.uid, peer.gid);
        started(
            &self.audit,
            &self.agents,
            &agent,
            &rel,
            id,
            who,
            "guard-exec",
            Some(peer.uid),
        )?;
        Ok(
            json!({"agent": agent, "cgroup": format!("/{rel}"), "cgroup_id": id, "moved": true,
                  "ca_bundle": CaFiles::new(&self.config.paths.state_dir).bundle,
                  // Without BPF LSM: what guard exec confines the command with itself.
                  "confine": self.containment.confine}),
        )
    }

    /// The kernel's rule, seen from here: a guarded uid, or a cgroup (or ancestor) in the
    /// guarded set. Unknown means guarded.
    pub(super) fn is_guarded(&self, peer: &Peer) -> bool {
        if self.kernel.guarded_uids().contains(&peer.uid) {
            return true;
        }
        let Ok(rel) = peer.by_pid(cgroup::cgroup_of) else {
            return true;
        };
        let guarded = self.kernel.guarded_cgroups();
        let mut path = self.cgroup_mount.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path.push(part);
            match cgroup::cgroup_id(&path) {
                Ok(id) if guarded.contains(&id) => return true,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// Where agent cgroups are made: `agent-NAME-N` below the attach cgroup.
pub(super) struct Home<'a> {
    pub kernel: &'a crate::kernel::Kernel,
    pub attach_path: &'a std::path::Path,
    pub attach_rel: &'a str,
    pub next: &'a std::sync::atomic::AtomicU64,
}

impl Home<'_> {
    /// A new agent cgroup for `name`, guarded before anything is moved in: (path, path
    /// relative to the mount, cgroup id).
    pub fn create(&self, name: &str) -> Result<(std::path::PathBuf, String, u64)> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let dir = format!("agent-{name}-{n}");
        let rel = format!("{}/{dir}", self.attach_rel)
            .trim_start_matches('/')
            .to_string();
        let path = self.attach_path.join(&dir);
        cgroup::create(&path)?;
        let id = cgroup::cgroup_id(&path)?;
        if let Err(e) = self.kernel.guard_cgroup(id) {
            let _ = cgroup::remove(&path);
            return Err(e);
        }
        Ok((path, rel, id))
    }

    /// Removes a cgroup [`Home::create`] made (nothing was moved in, or it was moved out).
    /// One that something got into after all stays, guarded.
    pub fn undo(&self, path: &std::path::Path, id: u64) {
        if cgroup::remove(path).is_ok() {
            let _ = self.kernel.unguard_cgroup(id);
        }
    }
}

/// Registers a new agent (`who`: its pid, uid and gid), then writes its `agent_start` record
/// (`how` it was enrolled).
#[allow(clippy::too_many_arguments)]
pub(super) fn started(
    audit: &crate::audit::Audit,
    agents: &crate::identity::Agents,
    name: &str,
    rel: &str,
    id: u64,
    (pid, uid, gid): (u32, u32, u32),
    how: &str,
    actor: Option<u32>,
) -> Result<AgentCgroup> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    let mut r = audit.record(Event::AgentStart, Decision::Enforce);
    r.actor_uid = actor;
    r.agent = Some(AgentRef::from(&Identity {
        pid,
        tgid: pid,
        uid,
        gid,
        agent: Some(name.to_string()),
        cgroup: Some(format!("/{rel}")),
        exe: exe.clone(),
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        ..Default::default()
    }));
    r.detail = Some(json!({ "enrolled": how }));
    let a = AgentCgroup {
        name: name.to_string(),
        cgroup: rel.to_string(),
        id,
        pid,
        exe,
        how: how.to_string(),
        since: r.ts.clone(),
    };
    agents.insert(a.clone());
    audit.write(&r)?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names() {
        assert!(valid_agent_name("research-bot"));
        assert!(valid_agent_name("a.b_c-1"));
        assert!(!valid_agent_name(""));
        assert!(!valid_agent_name("-x"));
        assert!(!valid_agent_name("a/b"));
        assert!(!valid_agent_name("../x"));
        assert!(!valid_agent_name(&"a".repeat(65)));
    }

    #[test]
    fn agent_dirs() {
        assert_eq!(parse_agent_dir("agent-bot-3"), Some(("bot".into(), 3)));
        assert_eq!(
            parse_agent_dir("agent-research-bot-12"),
            Some(("research-bot".into(), 12))
        );
        assert_eq!(parse_agent_dir("agent-bot"), None);
        assert_eq!(parse_agent_dir("other"), None);
    }

    #[test]
    fn under_attach_point() {
        assert!(under("guard.slice/agent-a-1", "guard.slice"));
        assert!(under("guard.slice", "guard.slice"));
        assert!(!under("guard.slicex", "guard.slice"));
        assert!(under("anything", ""));
    }
}
