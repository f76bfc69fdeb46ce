//! Enrolment at exec, seen from the daemon: the scope and executables the exec hook marks by
//! (`ENROL_SCOPE`, `ENROL_EXES`), the marks (`ENROLLING`), the events (`ENROL_EVENTS`), and
//! the three tracepoint programs with links pinned beside the cgroup ones.

use std::{collections::BTreeSet, fs, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{links::FdLink, RawTracePoint},
};
use guard_common::{EnrolEvent, EnrolScope, Enrolling, ExeKey};

use super::{take_map, Kernel};

/// Program, tracepoint.
pub const ENROL_PROGRAMS: &[(&str, &str)] = &[
    ("guard_enrol_exec", "sched_process_exec"),
    ("guard_enrol_fork", "sched_process_fork"),
    ("guard_enrol_exit", "sched_process_exit"),
];

/// The enrolment maps, taken from the object at load.
pub(super) struct EnrolMaps {
    scope: Array<MapData, EnrolScope>,
    exes: std::sync::Mutex<HashMap<MapData, ExeKey, u32>>,
    marks: std::sync::Mutex<HashMap<MapData, u32, Enrolling>>,
    at: std::sync::Mutex<HashMap<MapData, u32, u64>>,
    events: Option<RingBuf<MapData>>,
}

/// A mark as the daemon reads it: [`Enrolling`], and when its root's exec was (`ENROL_AT`; 0
/// when the hooks wrote none: an earlier build's mark, or a full map).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub root: u32,
    pub uid: u32,
    pub exe: ExeKey,
    pub at: u64,
}

impl Mark {
    fn new(e: Enrolling, at: u64) -> Mark {
        Mark {
            root: e.root,
            uid: e.uid,
            exe: e.exe,
            at,
        }
    }

    /// The mark an event tells of.
    pub fn of_event(e: &EnrolEvent) -> Mark {
        Mark {
            root: e.root,
            uid: e.uid,
            exe: e.exe,
            at: e.at,
        }
    }
}

impl EnrolMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<EnrolMaps> {
        Ok(EnrolMaps {
            scope: take_map(ebpf, guard_common::MAP_ENROL_SCOPE)?,
            exes: std::sync::Mutex::new(take_map(ebpf, guard_common::MAP_ENROL_EXES)?),
            marks: std::sync::Mutex::new(take_map(ebpf, guard_common::MAP_ENROLLING)?),
            at: std::sync::Mutex::new(take_map(ebpf, guard_common::MAP_ENROL_AT)?),
            events: Some(take_map(ebpf, guard_common::MAP_ENROL_EVENTS)?),
        })
    }
}

impl Kernel {
    /// Turns marking at exec on below the attach cgroup (`attach_cgroup_id` at `attach_level`):
    /// the scope is written, then the hooks are attached with links pinned under the pin
    /// directory (a restarted daemon attaches new ones, then lets the old ones go: the hooks
    /// run twice for a moment, never not at all). Err: this kernel cannot do it (no raw
    /// tracepoints, or executables cannot be identified).
    pub fn start_enrol(&mut self, attach_cgroup_id: u64, daemon_cgroup_id: u64) -> Result<()> {
        let cfg = self.config()?;
        if cfg.exe.known == 0 {
            bail!("the kernel's executables cannot be identified (no BTF offsets, or a kernel locked down for confidentiality)");
        }
        let (task_signal, signal_live) = super::btf::signal_offsets()?;
        let scope = EnrolScope {
            attach_cgroup_id,
            daemon_cgroup_id,
            attach_level: cfg.attach_level,
            ready: 1,
            exe: cfg.exe,
            task_signal,
            signal_live,
        };
        self.enrol
            .scope
            .set(0, scope, 0)
            .context("writing the enrolment scope")?;
        for (name, tracepoint) in ENROL_PROGRAMS {
            let prog: &mut RawTracePoint = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
                .try_into()?;
            match prog.load() {
                Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => {}
                Err(e) => return Err(e).with_context(|| format!("loading {name}")),
            }
            let id = prog
                .attach(tracepoint)
                .with_context(|| format!("attaching {name} to the {tracepoint} tracepoint"))?;
            let link = FdLink::from(prog.take_link(id)?);
            let pin = self.pin_dir.join("links").join(name);
            // The new link runs already: the old one can go.
            if pin.exists() {
                super::attach::unpin_link(&pin)?;
            }
            link.pin(&pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
        }
        Ok(())
    }

    /// Turns marking at exec off: the hooks' links are removed, the marks and executables
    /// cleared.
    pub fn stop_enrol(&mut self) -> Result<()> {
        for (name, _) in ENROL_PROGRAMS {
            let pin = self.pin_dir.join("links").join(name);
            if pin.exists() {
                super::attach::unpin_link(&pin)?;
            }
        }
        let mut scope = self.enrol.scope.get(&0, 0).unwrap_or_default();
        if scope.ready != 0 {
            scope.ready = 0;
            let _ = self.enrol.scope.set(0, scope, 0);
        }
        self.set_agent_exes(&BTreeSet::new())?;
        for (pid, _) in self.enrolling() {
            self.unmark(pid);
        }
        Ok(())
    }

    /// Makes the executables the exec hook marks exactly `files`.
    pub fn set_agent_exes(&self, files: &BTreeSet<ExeKey>) -> Result<()> {
        if files.len() > guard_common::ENROL_EXE_ENTRIES as usize {
            bail!(
                "[[agents]] name {} executable files; at most {}",
                files.len(),
                guard_common::ENROL_EXE_ENTRIES
            );
        }
        let mut map = self.enrol.exes.lock().unwrap();
        let have: Vec<ExeKey> = map.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !files.contains(k)) {
            map.remove(k)?;
        }
        for k in files {
            map.insert(k, 1, 0)?;
        }
        Ok(())
    }

    /// Every marked process (pid, mark).
    pub fn enrolling(&self) -> Vec<(u32, Mark)> {
        let map = self.enrol.marks.lock().unwrap();
        map.iter()
            .filter_map(|e| e.ok())
            .map(|(pid, e)| (pid, Mark::new(e, self.at_of(pid))))
            .collect()
    }

    fn at_of(&self, pid: u32) -> u64 {
        self.enrol.at.lock().unwrap().get(&pid, 0).unwrap_or(0)
    }

    /// Whether `pid` is marked (an agent's process not moved into its cgroup yet).
    pub fn is_marked(&self, pid: u32) -> bool {
        self.mark_of(pid).is_some()
    }

    /// The mark of `pid`, if it has one.
    pub fn mark_of(&self, pid: u32) -> Option<Mark> {
        let marks = self.enrol.marks.lock().unwrap();
        self.read_mark(&marks, pid)
    }

    /// The mark of `pid` and its time, read together. Under the marks' lock (`marks`), which
    /// `unmark` holds while it removes both; the exit hook removes the mark before the time, so
    /// a time missing beside a mark still there is one the hooks never wrote (0), never one
    /// taken away by an exit in between (then the mark is gone too: None).
    fn read_mark(&self, marks: &HashMap<MapData, u32, Enrolling>, pid: u32) -> Option<Mark> {
        let e = marks.get(&pid, 0).ok()?;
        match self.at_of(pid) {
            0 => Some(Mark::new(marks.get(&pid, 0).ok()?, 0)),
            at => Some(Mark::new(e, at)),
        }
    }

    /// Removes the mark of `pid` (moved into its agent cgroup, or not an agent).
    pub fn unmark(&self, pid: u32) {
        let mut marks = self.enrol.marks.lock().unwrap();
        self.remove_mark(&mut marks, pid);
    }

    /// Removes the mark of `pid` if it is still `mark`: not a later process's that got the
    /// pid since.
    pub fn unmark_if(&self, pid: u32, mark: &Mark) {
        let mut marks = self.enrol.marks.lock().unwrap();
        if self.read_mark(&marks, pid).as_ref() == Some(mark) {
            self.remove_mark(&mut marks, pid);
        }
    }

    /// The mark and its time, both under the marks' lock (see `read_mark`).
    fn remove_mark(&self, marks: &mut HashMap<MapData, u32, Enrolling>, pid: u32) {
        let _ = marks.remove(&pid);
        let _ = self.enrol.at.lock().unwrap().remove(&pid);
    }

    /// The ring buffer the hooks report marks on (taken once).
    pub fn take_enrol_events(&mut self) -> Option<RingBuf<MapData>> {
        self.enrol.events.take()
    }
}

/// An event as the hooks wrote it; None if it is not one.
pub fn parse_event(bytes: &[u8]) -> Option<EnrolEvent> {
    if bytes.len() < std::mem::size_of::<EnrolEvent>() {
        // An earlier build's hooks (still attached while this daemon starts) wrote no time.
        if bytes.len() >= guard_common::ENROL_EVENT_V1_BYTES {
            let mut whole = [0u8; std::mem::size_of::<EnrolEvent>()];
            whole[..guard_common::ENROL_EVENT_V1_BYTES]
                .copy_from_slice(&bytes[..guard_common::ENROL_EVENT_V1_BYTES]);
            return parse_event(&whole);
        }
        return None;
    }
    // SAFETY: EnrolEvent is repr(C) plain data; the length was checked; read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const EnrolEvent) })
}

/// Whether the pinned hooks of an earlier run are there (`pin_dir`).
pub fn pinned(pin_dir: &Path) -> bool {
    ENROL_PROGRAMS
        .iter()
        .any(|(n, _)| fs::metadata(pin_dir.join("links").join(n)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: &EnrolEvent) -> Vec<u8> {
        // SAFETY: EnrolEvent is repr(C) plain data with explicit padding.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const EnrolEvent).cast::<u8>(),
                std::mem::size_of::<EnrolEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn events_of_this_build_and_the_one_before_are_read() {
        let e = EnrolEvent {
            kind: guard_common::ENROL_FORK,
            pid: 41,
            root: 40,
            uid: 1000,
            exe: ExeKey {
                ino: 7,
                dev: 8,
                _pad0: 0,
            },
            at: 123_456_789,
        };
        let whole = bytes(&e);
        assert_eq!(parse_event(&whole), Some(e));
        // The build before had no `at`: its events are read with none.
        let before = &whole[..guard_common::ENROL_EVENT_V1_BYTES];
        assert_eq!(parse_event(before), Some(EnrolEvent { at: 0, ..e }));
        assert_eq!(Mark::of_event(&e).at, 123_456_789);
        assert_eq!(
            parse_event(&whole[..guard_common::ENROL_EVENT_V1_BYTES - 1]),
            None
        );
    }
}
