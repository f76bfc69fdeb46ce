//! Enrolment without `guard exec` (`[[agents]]`): a process that executes an agent's program
//! is marked by the kernel at exec (`kernel::enrol`), so its connects are redirected from its
//! first instruction; here it is classified ([`crate::enrol::Rules`]: executable, arguments,
//! uid), moved into an agent cgroup of its own with what it forked meanwhile, and unmarked.
//! One that turns out not to be an agent (an interpreter running something else) is unmarked
//! and its redirected connections pass through untouched.
//!
//! Where the kernel cannot mark at exec (or `scope.enrolment = "events"`), the daemon enrols
//! agents from the kernel's exec events instead, after the fact: the window between an agent's
//! exec and its move is open (said at start, and in the README); without events, it scans
//! every [`SCAN_INTERVAL`]. Agents running when the daemon starts are found by a scan.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Result;
use serde_json::json;

use super::agents::{started, under, Home};

use crate::{
    audit::{Audit, Decision, Event},
    config::AgentEntry,
    enrol::{Process, Rules},
    identity::{AgentCgroup, Agents, Enrolled, Enrolments},
    kernel::{self, cgroup, enrol::Mark, exec_events::ExecEvents, procfs, Kernel},
};

/// How often the marks are swept (events lost to a full ring, processes gone) and, without
/// the exec hook, how often running processes are scanned for agents.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the executables' globs are resolved again (a new version installed).
const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);

/// How processes are enrolled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No `[[agents]]`.
    Off,
    /// Marked by the kernel at exec.
    Exec,
    /// Enrolled by the daemon from the kernel's exec events (after the exec: a window).
    Events,
    /// Found by the daemon's scans (neither hooks nor events here).
    Scan,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Exec => "exec",
            Mode::Events => "events",
            Mode::Scan => "scan",
        }
    }
}

/// Which exec a mark stems from: the root's pid and when it exec'd.
type Lineage = (u32, u64);

fn lineage(mark: &Mark) -> Lineage {
    (mark.root, mark.at)
}

/// What a marked process turned out to be, by the exec its mark stems from.
#[derive(Debug, Clone)]
enum Decided {
    Agent(AgentCgroup),
    NotAgent,
    /// An agent that could not be moved (not remembered: tried again). It stays marked, so
    /// guarded; its connections are refused meanwhile.
    Failed,
}

pub struct Enrolment {
    pub mode: Mode,
    /// Why marking at exec is not on, when it is not.
    pub why_not: Option<String>,
    entries: Vec<AgentEntry>,
    rules: RwLock<Rules>,
    kernel: Arc<Kernel>,
    agents: Arc<Agents>,
    audit: Arc<Audit>,
    cgroup_mount: PathBuf,
    attach_path: PathBuf,
    attach_rel: String,
    daemon_cgroup: String,
    next_agent: Arc<AtomicU64>,
    decided: Mutex<HashMap<Lineage, Decided>>,
    /// The exec events, until [`Enrolment::run`] reads them (`Mode::Events`).
    events: Mutex<Option<ExecEvents>>,
}

/// What [`Enrolment::new`] needs to know of the daemon.
pub struct Place {
    pub kernel: Arc<Kernel>,
    pub agents: Arc<Agents>,
    pub audit: Arc<Audit>,
    pub cgroup_mount: PathBuf,
    pub attach_path: PathBuf,
    pub attach_rel: String,
    pub daemon_cgroup: String,
    pub next_agent: Arc<AtomicU64>,
}

impl Enrolment {
    pub fn new(entries: &[AgentEntry], mode: Mode, why_not: Option<String>, at: Place) -> Self {
        let events = match mode {
            Mode::Events => ExecEvents::subscribe()
                .map_err(|e| tracing::warn!("{e:#}"))
                .ok(),
            _ => None,
        };
        Enrolment {
            events: Mutex::new(events),
            mode,
            why_not,
            entries: entries.to_vec(),
            rules: RwLock::new(Rules::resolve(entries)),
            kernel: at.kernel,
            agents: at.agents,
            audit: at.audit,
            cgroup_mount: at.cgroup_mount,
            attach_path: at.attach_path,
            attach_rel: at.attach_rel,
            daemon_cgroup: at.daemon_cgroup,
            next_agent: at.next_agent,
            decided: Mutex::new(HashMap::new()),
        }
    }

    /// The uids that may start `name` with `guard exec` (None: any).
    pub fn uids_of(&self, name: &str) -> Option<Vec<u32>> {
        self.rules
            .read()
            .unwrap()
            .uids_of(name)
            .map(<[u32]>::to_vec)
    }

    /// Writes the executables the exec hook marks.
    pub fn publish(&self) -> Result<()> {
        if self.mode == Mode::Exec {
            self.kernel
                .set_agent_exes(&self.rules.read().unwrap().files())?;
        }
        Ok(())
    }

    /// What the process marked `mark` (as `root`, or forked from it) is, and for an agent its
    /// cgroup: made now (`pid` moved into it: the root while it is still the process marked at
    /// that exec, else `pid`) unless that exec was decided already. Decided on what the kernel
    /// recorded at the exec — the file and the uid — not on what the process runs or says now;
    /// only entries with argument globs read the process, and only while it still runs that
    /// file. An agent's decision is kept; "not an agent" is not (a later exec is decided
    /// afresh).
    fn decide(&self, pid: u32, mark: &Mark) -> Decided {
        let root = mark.root;
        let key = lineage(mark);
        let mut decided = self.decided.lock().unwrap();
        // Marks that stem from the same exec share its decision, whether its root still runs
        // or not; a process that got the root's pid after it was reaped was marked at an exec
        // of its own, so it and its children are decided afresh.
        // A mark without a time (an earlier build's, or one whose time the map lost) cannot
        // say which exec it stems from: decided on its own, its decision not kept.
        let timed = mark.at != 0;
        if let Some(Decided::Agent(a)) = decided.get(&key).filter(|_| timed) {
            return Decided::Agent(a.clone());
        }
        if !timed {
            // Moved by an earlier decision on this same mark (one at connect, one from its
            // event): that agent's, not a second one's.
            let now = cgroup::cgroup_of(pid).ok();
            if let Some(a) = now.and_then(|c| self.agents.containing(&c)) {
                return Decided::Agent(a);
            }
        }
        // The root, while it is still the process marked at that exec (its pid may be another
        // process's by now, unmarked or marked at an exec of its own: neither read nor moved
        // for this one).
        let root_is_it = self
            .kernel
            .mark_of(root)
            .is_some_and(|m| lineage(&m) == key);
        let rules = self.rules.read().unwrap();
        let name = match rules.classify_exec(&mark.exe, mark.uid) {
            Some(n) => n.to_string(),
            None if rules.by_arguments(&mark.exe) => {
                let now = [root, pid]
                    .into_iter()
                    // `pid` carries (or carried, a moment ago) this mark itself.
                    .filter(|&q| q == pid || root_is_it)
                    .find_map(|q| Process::read(q).filter(|p| p.file == Some(mark.exe)));
                let Some(p) = now else {
                    // Gone, or running something else already: its arguments at the exec
                    // cannot be read any more. Kept marked (guarded; its connections refused).
                    return Decided::Failed;
                };
                match rules.classify(&p) {
                    Some(n) => n.to_string(),
                    None => return Decided::NotAgent,
                }
            }
            None => return Decided::NotAgent,
        };
        drop(rules);
        let target = if root_is_it && alive(root) { root } else { pid };
        if !alive(target) {
            // Ended before it was decided: nothing left to move (its mark is swept).
            return Decided::Failed;
        }
        match self.enrol(target, mark.uid, &name) {
            Ok(a) => {
                if timed {
                    decided.insert(key, Decided::Agent(a.clone()));
                }
                Decided::Agent(a)
            }
            Err(e) => {
                // It stays marked (guarded): tried again at the next sweep.
                tracing::warn!(pid = target, "enrolling agent {name}: {e:#}");
                Decided::Failed
            }
        }
    }

    /// Moves `pid` into a new cgroup for agent `name`, and says so in the audit trail.
    fn enrol(&self, pid: u32, uid: u32, name: &str) -> Result<AgentCgroup> {
        let home = Home {
            kernel: &self.kernel,
            attach_path: &self.attach_path,
            attach_rel: &self.attach_rel,
            next: &self.next_agent,
        };
        let (path, rel, id) = home.create(name)?;
        if let Err(e) = cgroup::move_pid(&path, pid) {
            home.undo(&path, id);
            return Err(e);
        }
        // The kernel takes an exiting process's pid without moving it: one that has ended
        // is no agent started here (and its cgroup goes unless something got into it).
        if !alive(pid) {
            home.undo(&path, id);
            anyhow::bail!("process {pid} ended before it could be moved");
        }
        let gid = procfs::ids(pid).map_or(0, |(_, g)| g);
        started(
            &self.audit,
            &self.agents,
            name,
            &rel,
            id,
            (pid, uid, gid),
            "exec-match",
            None,
        )
    }

    /// A marked process (`pid`, marked as `mark`): into its agent's cgroup when it is one,
    /// then unmarked — never unmarked before it is guarded there.
    fn settle(&self, pid: u32, mark: &Mark) {
        // An event (or a sweep's snapshot) can be older than the pid's present: a process that
        // got the pid since, or one that exec'd again, has a mark of its own, settled by its
        // own event; one with none is no agent's to move.
        if self.kernel.mark_of(pid) != Some(*mark) {
            return;
        }
        match self.decide(pid, mark) {
            Decided::Agent(a) => {
                if !cgroup::cgroup_of(pid).is_ok_and(|c| under(&c, &a.cgroup)) {
                    let path = self.cgroup_mount.join(&a.cgroup);
                    if let Err(e) = cgroup::move_pid(&path, pid) {
                        if !alive(pid) {
                            self.kernel.unmark_if(pid, mark);
                            return;
                        }
                        // Its agent's cgroup is gone (the agent ended): one of its own.
                        tracing::debug!(pid, "moving into {}: {e:#}", a.cgroup);
                        match self.enrol(pid, mark.uid, &a.name) {
                            Ok(own) if mark.at != 0 => {
                                // The rest of its lineage joins it there.
                                self.decided
                                    .lock()
                                    .unwrap()
                                    .insert(lineage(mark), Decided::Agent(own));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(pid, "enrolling agent {}: {e:#}", a.name);
                                return;
                            }
                        }
                    }
                }
                self.kernel.unmark_if(pid, mark);
            }
            Decided::Failed => {}
            Decided::NotAgent => self.kernel.unmark_if(pid, mark),
        }
    }

    /// Every mark: settled (events a full ring lost), or removed when its process is gone;
    /// decisions nothing can be settled by any more are forgotten.
    pub fn sweep(&self) {
        let marks = self.kernel.enrolling();
        for (pid, mark) in &marks {
            if alive(*pid) {
                self.settle(*pid, mark);
            } else {
                self.kernel.unmark_if(*pid, mark);
            }
        }
        // A decision is kept while a process of its lineage may still be settled: something
        // is still marked as of that exec (in this snapshot), or the agent's cgroup is still
        // there (a decision made since the snapshot has moved one there). Not by the root's
        // pid: another process may hold it by now. So at most one per agent cgroup, and the
        // marks.
        let live: std::collections::HashSet<Lineage> =
            marks.iter().map(|(_, m)| lineage(m)).collect();
        let mount = &self.cgroup_mount;
        self.decided.lock().unwrap().retain(|key, d| {
            live.contains(key) || matches!(d, Decided::Agent(a) if mount.join(&a.cgroup).exists())
        });
    }

    /// Processes below the attach cgroup that are not guarded yet and run an agent's program:
    /// enrolled, with their descendants. At start (agents that were running before), and every
    /// [`SCAN_INTERVAL`] where the kernel cannot mark at exec.
    pub fn scan(&self) {
        let rules = self.rules.read().unwrap().clone();
        let guarded_uids = self.kernel.guarded_uids();
        let mut parents: HashMap<u32, u32> = HashMap::new();
        let mut found = Vec::new();
        for pid in all_pids() {
            if let Ok((ppid, _)) = procfs::stat(pid) {
                parents.insert(pid, ppid);
            }
            if let Some(hit) = self.candidate(&rules, &guarded_uids, pid) {
                found.push(hit);
            }
        }
        for (p, name) in found {
            // A descendant of an agent found here is moved with it, not enrolled on its own.
            if self
                .agents
                .all()
                .iter()
                .any(|a| a.pid != 0 && descends(&parents, p.pid, a.pid))
            {
                continue;
            }
            if let Some(a) = self.enrol_found(&p, &name) {
                let path = self.cgroup_mount.join(&a.cgroup);
                for (&child, _) in parents.iter() {
                    if child != p.pid && descends(&parents, child, p.pid) {
                        let _ = cgroup::move_pid(&path, child);
                    }
                }
            }
        }
    }

    /// `pid`, when it is below the attach cgroup, not guarded yet, and runs an agent's program:
    /// the process and the agent's name.
    fn candidate(
        &self,
        rules: &Rules,
        guarded_uids: &[u32],
        pid: u32,
    ) -> Option<(Process, String)> {
        let rel = cgroup::cgroup_of(pid).ok()?;
        if !under(&rel, &self.attach_rel)
            || under(&rel, &self.daemon_cgroup)
            || self.agents.containing(&rel).is_some()
        {
            return None;
        }
        let p = Process::read(pid)?;
        if guarded_uids.contains(&p.uid) {
            return None;
        }
        let name = rules.classify(&p)?.to_string();
        Some((p, name))
    }

    /// Enrols a process found by a scan or an exec event.
    fn enrol_found(&self, p: &Process, name: &str) -> Option<AgentCgroup> {
        match self.enrol(p.pid, p.uid, name) {
            Ok(a) => {
                // Found while marked at an exec of its own: what it forked since (marked as of
                // that exec) joins it.
                if let Some(m) = self
                    .kernel
                    .mark_of(p.pid)
                    .filter(|m| m.root == p.pid && m.at != 0)
                {
                    self.decided
                        .lock()
                        .unwrap()
                        .insert(lineage(&m), Decided::Agent(a.clone()));
                }
                Some(a)
            }
            Err(e) => {
                tracing::warn!(pid = p.pid, "enrolling agent {name}: {e:#}");
                None
            }
        }
    }

    /// Exec events (`Mode::Events`): each process that exec'd, enrolled if it is an agent's.
    fn execs(&self, pids: Vec<u32>) {
        let rules = self.rules.read().unwrap().clone();
        let guarded_uids = self.kernel.guarded_uids();
        for pid in pids {
            if let Some((p, name)) = self.candidate(&rules, &guarded_uids, pid) {
                self.enrol_found(&p, &name);
            }
        }
    }

    /// Serves enrolment while the daemon runs: the exec hook's events, the sweep, the scan
    /// where there is no hook, the executables' globs resolved again.
    pub async fn run(self: Arc<Self>, ring: Option<aya::maps::RingBuf<aya::maps::MapData>>) {
        let mut sweep = tokio::time::interval(SCAN_INTERVAL);
        let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
        let mut fd = ring.and_then(|r| {
            // SAFETY: the ring buffer owns its map's descriptor, and the AsyncFd owns the ring
            // buffer: the descriptor stays open and the same for the AsyncFd's whole life.
            unsafe { tokio::io::unix::AsyncFd::register(r) }
                .map_err(|e| {
                    tracing::warn!(
                        "reading enrolment events: {e}; marks are swept every second instead"
                    )
                })
                .ok()
        });
        let events = self.events.lock().unwrap().take().and_then(|e| {
            // SAFETY: the AsyncFd owns the subscription, whose socket stays open and the same
            // for the AsyncFd's whole life.
            unsafe { tokio::io::unix::AsyncFd::register(e) }
                .map_err(|e| tracing::warn!("reading exec events: {e}; agents are found by scans"))
                .ok()
        });
        let mut events = events;
        loop {
            tokio::select! {
                ready = async { events.as_ref().unwrap().readable().await }, if events.is_some() => {
                    let Ok(mut ready) = ready else {
                        events = None;
                        continue;
                    };
                    let pids = match ready.get_inner().drain() {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!("exec events: {e}; agents are found by scans");
                            events = None;
                            continue;
                        }
                    };
                    ready.clear_ready();
                    if !pids.is_empty() {
                        let me = self.clone();
                        let _ = tokio::task::spawn_blocking(move || me.execs(pids)).await;
                    }
                }
                ready = async { fd.as_mut().unwrap().readable_mut().await }, if fd.is_some() => {
                    let Ok(mut ready) = ready else {
                        fd = None;
                        continue;
                    };
                    let mut events = Vec::new();
                    while let Some(item) = ready.get_inner_mut().next() {
                        if let Some(e) = kernel::enrol::parse_event(&item) {
                            events.push(e);
                        }
                    }
                    ready.clear_ready();
                    let me = self.clone();
                    // Cgroup moves and /proc reads block: off the runtime's threads.
                    let _ = tokio::task::spawn_blocking(move || {
                        for e in events {
                            me.settle(e.pid, &Mark::of_event(&e));
                        }
                    })
                    .await;
                }
                _ = sweep.tick() => {
                    let listening = events.is_some();
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        me.sweep();
                        // Without events (or with a subscription that failed), scans find
                        // agents.
                        if me.mode == Mode::Scan || (me.mode == Mode::Events && !listening) {
                            me.scan();
                        }
                    })
                    .await;
                }
                _ = resolve.tick() => {
                    if self.mode == Mode::Events {
                        // Events can be lost (an overrun): a scan now and then finds those.
                        let me = self.clone();
                        let _ = tokio::task::spawn_blocking(move || me.scan()).await;
                    }
                    let rules = Rules::resolve(&self.entries);
                    let changed = rules.files() != self.rules.read().unwrap().files();
                    *self.rules.write().unwrap() = rules;
                    if changed {
                        if let Err(e) = self.publish() {
                            tracing::warn!("updating the agents' executables: {e:#}");
                        }
                    }
                }
            }
        }
    }

    /// The `agent_start` records' counterpart for status: how enrolment works here.
    pub fn status(&self) -> serde_json::Value {
        json!({
            "mode": self.mode.as_str(),
            "why_not": self.why_not,
            "agents": self.entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
            "marked": self.kernel.enrolling().len(),
        })
    }

    /// Audits how enrolment runs (at start).
    pub fn audit_mode(&self) {
        if self.mode == Mode::Off {
            return;
        }
        let mut r = self.audit.record(Event::Control, Decision::Enforce);
        r.method = Some("enrolment".into());
        r.detail = Some(self.status());
        let _ = self.audit.write(&r);
    }
}

impl Enrolments for Enrolment {
    /// Decided now if the daemon has not yet: a connect can come before the exec event is read.
    fn agent_of(&self, pid: u32, root: u32) -> Enrolled {
        let Some(mark) = self.kernel.mark_of(pid) else {
            // Gone (or ending) since it connected: what it was cannot be told any more, and
            // what it left the connection to (a child) is refused with it.
            if !alive(pid) {
                return Enrolled::Failed;
            }
            // Settled since it connected. An agent's process sits in its agent's cgroup: that
            // says whose it is, whatever was decided (or forgotten since).
            let cg = cgroup::cgroup_of(pid).ok();
            if let Some(a) = cg.as_deref().and_then(|c| self.agents.containing(c)) {
                return Enrolled::Agent(a.name);
            }
            // Elsewhere: found not to be an agent — unless `root` has an agent decision, which
            // it may stem from (gone, or moved on since): then it cannot be told, and is refused.
            let agent_root = self
                .decided
                .lock()
                .unwrap()
                .iter()
                .any(|(k, d)| k.0 == root && matches!(d, Decided::Agent(_)));
            return if agent_root {
                Enrolled::Failed
            } else {
                Enrolled::NotAgent
            };
        };
        match self.decide(pid, &mark) {
            Decided::Agent(a) => Enrolled::Agent(a.name),
            Decided::NotAgent => Enrolled::NotAgent,
            Decided::Failed => Enrolled::Failed,
        }
    }
}

/// Still running: a zombie is not (it cannot be moved into a cgroup, and its `/proc/PID/cgroup`
/// names a removed cgroup once its agent's is gone).
fn alive(pid: u32) -> bool {
    procfs::running(pid)
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `pid` descends from `ancestor` (in `parents`: pid -> parent pid).
fn descends(parents: &HashMap<u32, u32>, mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        match parents.get(&pid) {
            Some(&p) if p == ancestor => return true,
            Some(&p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants() {
        let parents: HashMap<u32, u32> = [(10, 1), (11, 10), (12, 11), (20, 1)].into();
        assert!(descends(&parents, 12, 10));
        assert!(descends(&parents, 11, 10));
        assert!(!descends(&parents, 20, 10));
        assert!(!descends(&parents, 10, 10));
    }
}
