//! Enrolment at exec: a process below the attach cgroup that executes one of the `[[agents]]`
//! executables is marked in `ENROLLING` by the `sched_process_exec` tracepoint, which runs in
//! the exec itself, before the new program's first instruction. From then on the redirect
//! treats it as guarded (its connects go to the proxy, with the mark in their origin) until the
//! daemon has moved it into an agent cgroup of its own; what it forks in between is marked
//! too. The daemon hears of each mark on `ENROL_EVENTS`.
//!
//! Tracepoints run for every task of the host: the hooks return at once for tasks outside
//! guard's attach subtree (and for the daemon), and they only ever write guard's own maps —
//! what they return changes nothing for any task.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_task,
        },
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::RawTracePointContext,
};
use guard_common::*;

use crate::programs::{config, current_exe, guard_of_current};

#[map]
static ENROL_SCOPE: Array<EnrolScope> = Array::pinned(1, 0);
#[map]
static ENROL_EXES: HashMap<ExeKey, u32> = HashMap::pinned(ENROL_EXE_ENTRIES, 0);
#[map]
pub(crate) static ENROLLING: LruHashMap<u32, Enrolling> = LruHashMap::pinned(ENROLLING_ENTRIES, 0);
#[map]
static ENROL_AT: LruHashMap<u32, u64> = LruHashMap::pinned(ENROLLING_ENTRIES, 0);
#[map]
static ENROL_EVENTS: RingBuf = RingBuf::pinned(ENROL_RING_BYTES, 0);

/// The scope, when the current task is in it: below the attach cgroup, not the daemon.
#[inline(always)]
fn in_scope() -> Option<&'static EnrolScope> {
    let s = ENROL_SCOPE.get(0)?;
    if s.ready == 0 {
        return None;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if cgroup == s.daemon_cgroup_id {
        return None;
    }
    let at = unsafe { bpf_get_current_ancestor_cgroup_id(s.attach_level as i32) };
    (at == s.attach_cgroup_id && at != 0).then_some(s)
}

/// Whether the current task is guarded already (an agent cgroup, a guarded uid): nothing to
/// enrol.
#[inline(always)]
fn guarded_already() -> bool {
    config().is_some_and(|c| guard_of_current(c).is_some())
}

/// The mark of the current process, if it has one.
#[inline(always)]
pub(crate) fn enrolling_root() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    unsafe { ENROLLING.get(&tgid) }.map(|e| e.root)
}

#[inline(always)]
fn tell(kind: u32, pid: u32, mark: &Enrolling, at: u64) {
    let ev = EnrolEvent {
        kind,
        pid,
        root: mark.root,
        uid: mark.uid,
        exe: mark.exe,
        at,
    };
    // A full ring loses the event, not the mark: the daemon also sweeps ENROLLING.
    let _ = ENROL_EVENTS.output::<EnrolEvent>(&ev, 0);
}

/// `sched_process_exec(task, old_pid, bprm)`: current runs the new program already (its
/// `mm->exe_file` is the new executable), and has not returned to user space yet.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn guard_enrol_exec(_ctx: RawTracePointContext) -> i32 {
    let Some(scope) = in_scope() else { return 0 };
    if guarded_already() {
        return 0;
    }
    let (ino, dev) = current_exe(&scope.exe);
    if ino == 0 {
        return 0;
    }
    let key = ExeKey { ino, dev, _pad0: 0 };
    if unsafe { ENROL_EXES.get(&key) }.is_none() {
        // Not an agent's executable; a marked process that runs something else stays marked
        // (it is still what the agent started).
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { ENROLLING.get(&tgid) }.is_some() {
        // Marked already: it stays what it was marked as. An agent's process not moved yet
        // that runs another agent's program (or an interpreter with other arguments) must not
        // become that agent, or no agent at all, by a new mark.
        return 0;
    }
    let mark = Enrolling {
        root: tgid,
        uid: bpf_get_current_uid_gid() as u32,
        exe: key,
    };
    // Which exec this is: a later process with this pid is another root. Written first: a
    // mark is never without it (but for a full map: then 0, an exec of no time).
    let at = unsafe { bpf_ktime_get_ns() };
    let _ = ENROL_AT.insert(&tgid, &at, 0);
    if ENROLLING.insert(&tgid, &mark, 0).is_ok() {
        tell(ENROL_EXEC, tgid, &mark, at);
    }
    0
}

/// `sched_process_fork(parent, child)`: current is the parent; the child has not run yet.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn guard_enrol_fork(ctx: RawTracePointContext) -> i32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(mark) = (unsafe { ENROLLING.get(&parent) }).copied() else {
        return 0;
    };
    let Some(scope) = in_scope() else { return 0 };
    let child: u64 = ctx.arg(1);
    if child == 0 || scope.exe.known == 0 {
        return 0;
    }
    let Ok(child_tgid) =
        (unsafe { bpf_probe_read_kernel((child + scope.exe.task_tgid as u64) as *const i32) })
    else {
        return 0;
    };
    let child_tgid = child_tgid as u32;
    if child_tgid == parent || child_tgid == 0 {
        // A thread: its process is marked already.
        return 0;
    }
    // The child is what its parent was marked as, whatever the parent does next.
    // A parent whose time is missing (an earlier build's mark, a full map) gives the child one
    // of its own: a lineage of its own, decided on its own, rather than one without a time.
    let at = match unsafe { ENROL_AT.get(&parent) }.copied() {
        Some(at) if at != 0 => at,
        _ => unsafe { bpf_ktime_get_ns() },
    };
    let _ = ENROL_AT.insert(&child_tgid, &at, 0);
    if ENROLLING.insert(&child_tgid, &mark, 0).is_ok() {
        tell(ENROL_FORK, child_tgid, &mark, at);
    }
    0
}

/// `sched_process_exit(task, ...)`: a process whose last thread ends takes its mark with it,
/// so a later process with the same pid is not taken for it. (Not its leader alone: the
/// other threads, or one that exec'd, go on as the marked process.)
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn guard_enrol_exit(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { ENROLLING.get(&tgid) }.is_none() {
        return 0;
    }
    let Some(scope) = ENROL_SCOPE.get(0) else {
        return 0;
    };
    if scope.task_signal == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    let Ok(signal) =
        (unsafe { bpf_probe_read_kernel((task + scope.task_signal as u64) as *const u64) })
    else {
        return 0;
    };
    if signal == 0 {
        return 0;
    }
    // `signal->live` counts the threads still running (decremented before this tracepoint).
    let live = unsafe { bpf_probe_read_kernel((signal + scope.signal_live as u64) as *const i32) };
    if live == Ok(0) {
        let _ = ENROLLING.remove(&tgid);
        let _ = ENROL_AT.remove(&tgid);
    }
    0
}
