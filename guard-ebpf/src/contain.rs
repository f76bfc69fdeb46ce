//! Containment: BPF LSM programs attached per cgroup (`BPF_LSM_CGROUP`) at the attach cgroup,
//! so they run only for processes below it, and refuse only guarded ones. They close what the
//! redirect cannot see: another process's memory or descriptors, sockets made outside the
//! guard, Unix sockets to unguarded helpers, socket families the redirect does not hook, and
//! (by choice) user namespaces.
//!
//! Which cgroup's programs run (kernel `bpf_lsm_find_cgroup_shim`): for hooks whose first
//! argument is a socket, the socket's; for all others, current's. Every hook here is one of
//! those two kinds on purpose: `ptrace_access_check`, `file_receive`, `socket_create` and
//! `userns_create` run by current, the Unix ones by the connecting (guarded) socket.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_probe_read_kernel,
            bpf_set_retval,
        },
    },
    macros::{lsm_cgroup, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::LsmContext,
};
use guard_common::*;

use crate::programs::{
    config, guard_of_current, Guard, ALLOW, GUARDED_CGROUPS, GUARDED_UIDS, REFUSE,
};

#[map]
static CONTAIN_CONFIG: Array<ContainConfig> = Array::pinned(1, 0);
/// `scope.unix_allow` and guard's control socket: bound names (zero padded) any guarded process
/// may connect to.
#[map]
static UNIX_ALLOW: HashMap<[u8; UNIX_PATH_MAX], u32> = HashMap::pinned(UNIX_ALLOW_ENTRIES, 0);
#[map]
static CONTAINED: RingBuf = RingBuf::pinned(CONTAINED_RING_BYTES, 0);
#[map]
static CONTAIN_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(CONTAIN_KINDS, 0);

const EPERM: i32 = 1;
const EACCES: i32 = 13;
const ENOPROTOOPT: i32 = 92;
const EPROTONOSUPPORT: i32 = 93;
const EAFNOSUPPORT: i32 = 97;

/// Set by checks made only to decide what to show (`/proc/PID/stat`'s wchan, say), never by
/// those that hand over memory, descriptors or other process state.
const PTRACE_MODE_NOAUDIT: u32 = 0x04;
const PTRACE_MODE_ATTACH: u32 = 0x02;
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_NETLINK: i32 = 16;
const AF_INET6: i32 = 10;
const SOCK_STREAM: i32 = 1;
const SOCK_DGRAM: i32 = 2;
const SOCK_TYPE_MASK: i32 = 0xf;
const IPPROTO_TCP: i32 = 6;
const IPPROTO_UDP: i32 = 17;
const IPPROTO_MPTCP: i32 = 262;
const NETLINK_ROUTE: i32 = 0;

/// A `T` at `base + off` in kernel memory; zero when `base` is 0 or the read fails.
#[inline(always)]
fn rd<T: Default>(base: u64, off: u32) -> T {
    let mut v = T::default();
    if base != 0 {
        let r = unsafe {
            bpf_probe_read_kernel(
                &mut v as *mut T as *mut c_void,
                core::mem::size_of::<T>() as u32,
                (base + off as u64) as *const c_void,
            )
        };
        if r != 0 {
            v = T::default();
        }
    }
    v
}

#[inline(always)]
fn rd64(base: u64, off: u32) -> u64 {
    rd(base, off)
}

#[inline(always)]
fn rd32(base: u64, off: u32) -> u32 {
    rd(base, off)
}

#[inline(always)]
fn rd16(base: u64, off: u32) -> u16 {
    rd(base, off)
}

#[inline(always)]
fn contain_config() -> Option<&'static ContainConfig> {
    let c = CONTAIN_CONFIG.get(0)?;
    if c.ready == 0 {
        return None;
    }
    Some(c)
}

/// The current task, if it is guarded, with whom it is guarded as and the configs.
#[inline(always)]
fn guarded() -> Option<(&'static Config, &'static ContainConfig, Guard)> {
    let cfg = config()?;
    let cc = contain_config()?;
    let g = guard_of_current(cfg)?;
    Some((cfg, cc, g))
}

/// The id of `cgroup`'s ancestor at `level` (itself at its own level); 0 if it has none there
/// or the kernel could not be read.
#[inline(always)]
fn cgroup_ancestor(o: &ContainOffsets, cgroup: u64, level: u32) -> u64 {
    if cgroup == 0 || level >= MAX_CGROUP_DEPTH {
        return 0;
    }
    let own = rd32(cgroup, o.cgroup_level) as i32;
    if own < level as i32 {
        return 0;
    }
    let ancestor = rd64(cgroup, o.cgroup_ancestors + 8 * level);
    rd64(rd64(ancestor, o.cgroup_kn), o.kernfs_node_id)
}

/// Whether `cgroup` or an ancestor of it below the attach cgroup is guarded.
#[inline(always)]
fn under_guarded_cgroup(cfg: &Config, o: &ContainOffsets, cgroup: u64) -> bool {
    let mut level = cfg.attach_level;
    while level < MAX_CGROUP_DEPTH {
        let id = cgroup_ancestor(o, cgroup, level);
        if id == 0 {
            return false;
        }
        if unsafe { GUARDED_CGROUPS.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// The id of `cgroup` itself.
#[inline(always)]
fn cgroup_id(o: &ContainOffsets, cgroup: u64) -> u64 {
    rd64(rd64(cgroup, o.cgroup_kn), o.kernfs_node_id)
}

/// Whether `cgroup` is below the attach cgroup (as the current task is) and not the daemon's.
#[inline(always)]
fn below_attach(cfg: &Config, o: &ContainOffsets, cgroup: u64) -> bool {
    let attach = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.attach_level as i32) };
    attach != 0
        && cgroup_ancestor(o, cgroup, cfg.attach_level) == attach
        && cgroup_id(o, cgroup) != cfg.daemon_cgroup_id
}

/// Whether a task or socket with `cgroup` (a `struct cgroup *`) and `uid` belongs to the same
/// guard as the current task: below the same guarded cgroup, or (guarded by uid) of the same
/// uid below the attach cgroup, not the daemon's, and in no agent's cgroup.
#[inline(always)]
fn same_guard(cfg: &Config, o: &ContainOffsets, g: Guard, cgroup: u64, uid: u32) -> bool {
    match g {
        Guard::Cgroup { level, id } => cgroup_ancestor(o, cgroup, level) == id,
        Guard::Uid { uid: own } => {
            uid == own && below_attach(cfg, o, cgroup) && !under_guarded_cgroup(cfg, o, cgroup)
        }
    }
}

/// Whether a task with `cgroup` and `uid` is guarded at all (its own connects redirected).
#[inline(always)]
fn guarded_task(cfg: &Config, o: &ContainOffsets, cgroup: u64, uid: u32) -> bool {
    below_attach(cfg, o, cgroup)
        && (under_guarded_cgroup(cfg, o, cgroup) || unsafe { GUARDED_UIDS.get(&uid) }.is_some())
}

#[inline(always)]
fn count_only(kind: u32) {
    if let Some(c) = CONTAIN_COUNTERS.get_ptr_mut(kind) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts a refusal and reserves its report (None: the ring is full; it is counted anyway).
#[inline(always)]
fn report(kind: u32, errno: i32, guard_cgroup_id: u64, detail: [u32; 4]) -> Option<*mut Contained> {
    count_only(kind);
    let mut entry = CONTAINED.reserve::<Contained>(0)?;
    let e = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    unsafe {
        (*e).kind = kind;
        (*e).pid = pid_tgid as u32;
        (*e).tgid = (pid_tgid >> 32) as u32;
        (*e).uid = uid_gid as u32;
        (*e).gid = (uid_gid >> 32) as u32;
        (*e).errno = errno as u32;
        (*e).detail = detail;
        (*e).cgroup_id = bpf_get_current_cgroup_id();
        (*e).guard_cgroup_id = guard_cgroup_id;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*e).name_len = 0;
    }
    // Submitted by the caller once it has added what it knows; the entry is only a pointer
    // into the ring from here on.
    core::mem::forget(entry);
    Some(e)
}

#[inline(always)]
fn submit(e: *mut Contained) {
    unsafe { aya_ebpf::helpers::generated::bpf_ringbuf_submit(e as *mut c_void, 0) };
}

#[inline(always)]
fn guard_id(g: Guard) -> u64 {
    match g {
        Guard::Cgroup { id, .. } => id,
        Guard::Uid { .. } => 0,
    }
}

/// Counts and reports a refusal, and makes the call fail with `errno`. `name`: where a Unix
/// listener's bound name sits in kernel memory, and its length.
#[inline(always)]
fn refuse(kind: u32, errno: i32, g: Guard, detail: [u32; 4], name: (u64, u32)) -> i32 {
    if let Some(e) = report(kind, errno, guard_id(g), detail) {
        let mut n = name.1;
        if n > UNIX_PATH_MAX as u32 {
            n = UNIX_PATH_MAX as u32;
        }
        if name.0 != 0
            && n > 0
            && unsafe {
                bpf_probe_read_kernel(
                    (*e).name.as_mut_ptr() as *mut c_void,
                    n,
                    name.0 as *const c_void,
                )
            } == 0
        {
            unsafe { (*e).name_len = n };
        }
        submit(e);
    }
    unsafe { bpf_set_retval(-errno) };
    REFUSE
}

/// The family rule of `socket_create`, shared with the cgroup `sock_create` program (which sees
/// only IPv4 and IPv6 sockets, but runs where BPF LSM does not): Some(errno) to refuse.
#[inline(always)]
pub(crate) fn family_refusal(family: i32, ty: i32, protocol: i32) -> Option<i32> {
    let ty = ty & SOCK_TYPE_MASK;
    let allowed = match family {
        AF_UNIX => true,
        AF_INET | AF_INET6 => {
            (ty == SOCK_STREAM && (protocol == 0 || protocol == IPPROTO_TCP))
                || (ty == SOCK_DGRAM && (protocol == 0 || protocol == IPPROTO_UDP))
        }
        AF_NETLINK => protocol == NETLINK_ROUTE,
        _ => false,
    };
    if allowed {
        None
    } else if ty == SOCK_STREAM && protocol == IPPROTO_MPTCP {
        // The answer of a kernel without MPTCP: runtimes fall back to TCP.
        Some(ENOPROTOOPT)
    } else if family == AF_INET || family == AF_INET6 {
        // What an unprivileged process gets for raw sockets, say.
        Some(EACCES)
    } else if family == AF_NETLINK {
        // The answers of a kernel without that family or protocol: udev monitors, `ss` and
        // sudo's audit socket go on without.
        Some(EPROTONOSUPPORT)
    } else {
        Some(EAFNOSUPPORT)
    }
}

/// A refusal at socket creation, from either program.
#[inline(always)]
pub(crate) fn refuse_family(g: Guard, family: i32, ty: i32, protocol: i32, errno: i32) -> i32 {
    let detail = [
        family as u32,
        (ty & SOCK_TYPE_MASK) as u32,
        protocol as u32,
        0,
    ];
    if let Some(e) = report(CONTAIN_SOCKET_FAMILY, errno, guard_id(g), detail) {
        submit(e);
    }
    unsafe { bpf_set_retval(-errno) };
    REFUSE
}

/// ptrace attach, `/proc/PID/mem`, `process_vm_readv`/`writev`, `pidfd_getfd` (ATTACH modes)
/// and `/proc/PID/fd`, `environ`, `maps`, `ns` (READ modes) all ask `ptrace_may_access`:
/// refused for a target outside the current task's guard. Checks made only to decide what to
/// show (NOAUDIT: `/proc/PID/stat`'s fields, which `ps` reads) stay open.
#[lsm_cgroup(hook = "ptrace_access_check")]
pub fn guard_ptrace_access_check(ctx: LsmContext) -> i32 {
    let mode: u32 = ctx.arg(1);
    if mode & PTRACE_MODE_NOAUDIT != 0 {
        return ALLOW;
    }
    let Some((cfg, cc, g)) = guarded() else {
        return ALLOW;
    };
    let o = &cc.offsets;
    let task: u64 = ctx.arg(0);
    let cgroup = rd64(rd64(task, o.task_cgroups), o.css_set_dfl_cgrp);
    let uid = rd32(rd64(task, o.task_real_cred), o.cred_uid);
    if same_guard(cfg, o, g, cgroup, uid) {
        return ALLOW;
    }
    if mode & PTRACE_MODE_ATTACH == 0 {
        // READ modes: `htop` and `pidof` read /proc/PID/exe of every process, and `ps -l`
        // wchan; counted, not reported, so they do not crowd out the refusals that matter.
        count_only(CONTAIN_PTRACE);
        unsafe { bpf_set_retval(-EPERM) };
        return REFUSE;
    }
    let tgid = rd32(task, o.task_tgid);
    refuse(CONTAIN_PTRACE, EPERM, g, [tgid, mode, 0, 0], (0, 0))
}

/// A descriptor arriving over SCM_RIGHTS or taken with `pidfd_getfd`: a socket made outside the
/// current task's guard is refused, since the redirect never runs for it (its connects and
/// sends run the programs of the cgroup that made it).
#[lsm_cgroup(hook = "file_receive")]
pub fn guard_file_receive(ctx: LsmContext) -> i32 {
    let Some((cfg, cc, g)) = guarded() else {
        return ALLOW;
    };
    let o = &cc.offsets;
    let file: u64 = ctx.arg(0);
    let mode = rd16(rd64(file, o.file_inode), o.inode_mode);
    if mode & S_IFMT != S_IFSOCK {
        return ALLOW;
    }
    let sk = rd64(rd64(file, o.file_private_data), o.socket_sk);
    let cgroup = rd64(sk, o.sock_cgrp_data);
    let uid = rd32(sk, o.sock_uid);
    if sk != 0 && same_guard(cfg, o, g, cgroup, uid) {
        return ALLOW;
    }
    let family = rd16(sk, o.sock_family) as u32;
    refuse(CONTAIN_FOREIGN_SOCKET, EPERM, g, [family, 0, 0, 0], (0, 0))
}

/// A Unix connect or send from a guarded socket to the listener `other` (a `struct sock *`):
/// allowed to the current task's own guard, to allow-listed bound names, or with
/// `scope.unix = "allow"`.
#[inline(always)]
fn unix_peer(other: u64) -> i32 {
    let Some((cfg, cc, g)) = guarded() else {
        return ALLOW;
    };
    if cc.unix_mode == UNIX_ALLOW_ALL {
        return ALLOW;
    }
    let o = &cc.offsets;
    let cgroup = rd64(other, o.sock_cgrp_data);
    let uid = rd32(other, o.sock_uid);
    if other != 0 && same_guard(cfg, o, g, cgroup, uid) {
        return ALLOW;
    }
    // The bound name: `unix_address.len` counts `sun_family` (2 bytes) and, for a path, the
    // terminating NUL; zero padded it is the allow list's key.
    let addr = rd64(other, o.unix_sock_addr);
    let len = rd32(addr, o.unix_address_len) as i32 - 2;
    let mut n: u32 = 0;
    if addr != 0 && len > 0 {
        n = len as u32;
        if n > UNIX_PATH_MAX as u32 {
            n = UNIX_PATH_MAX as u32;
        }
    }
    let src = if addr != 0 {
        addr + o.unix_address_name as u64 + 2
    } else {
        0
    };
    let mut key = [0u8; UNIX_PATH_MAX];
    if n > 0
        && unsafe {
            bpf_probe_read_kernel(key.as_mut_ptr() as *mut c_void, n, src as *const c_void)
        } == 0
        && unsafe { UNIX_ALLOW.get(&key) }.is_some()
    {
        return ALLOW;
    }
    refuse(CONTAIN_UNIX, EACCES, g, [0; 4], (src, n))
}

#[lsm_cgroup(hook = "unix_stream_connect")]
pub fn guard_unix_stream_connect(ctx: LsmContext) -> i32 {
    let other: u64 = ctx.arg(1);
    unix_peer(other)
}

#[lsm_cgroup(hook = "unix_may_send")]
pub fn guard_unix_may_send(ctx: LsmContext) -> i32 {
    let Some(cc) = contain_config() else {
        return ALLOW;
    };
    let other: u64 = ctx.arg(1);
    unix_peer(rd64(other, cc.offsets.socket_sk))
}

/// Families and protocols the redirect and its UDP rules see (TCP, UDP), Unix (decided above)
/// and netlink route (interface and address listing); everything else (raw, ping, packet,
/// vsock, ...) is refused at creation.
#[lsm_cgroup(hook = "socket_create")]
pub fn guard_socket_create(ctx: LsmContext) -> i32 {
    let kern: i32 = ctx.arg(3);
    if kern != 0 {
        return ALLOW;
    }
    let family: i32 = ctx.arg(0);
    let ty: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let Some(errno) = family_refusal(family, ty, protocol) else {
        return ALLOW;
    };
    let Some((_, _, g)) = guarded() else {
        return ALLOW;
    };
    refuse_family(g, family, ty, protocol, errno)
}

/// Signals to unguarded processes (a Node.js process opens its debugger on SIGUSR1): refused;
/// signal 0 (is it alive?) is not a signal. Guarded processes may be signalled by other guarded
/// ones (a uid-guarded shell resumes the agents it started with `fg`): whatever they do next is
/// guarded too.
#[lsm_cgroup(hook = "task_kill")]
pub fn guard_task_kill(ctx: LsmContext) -> i32 {
    let sig: i32 = ctx.arg(2);
    if sig == 0 {
        return ALLOW;
    }
    let Some((cfg, cc, g)) = guarded() else {
        return ALLOW;
    };
    let o = &cc.offsets;
    let task: u64 = ctx.arg(0);
    let cgroup = rd64(rd64(task, o.task_cgroups), o.css_set_dfl_cgrp);
    let uid = rd32(rd64(task, o.task_real_cred), o.cred_uid);
    if same_guard(cfg, o, g, cgroup, uid) || guarded_task(cfg, o, cgroup, uid) {
        return ALLOW;
    }
    let tgid = rd32(task, o.task_tgid);
    refuse(CONTAIN_SIGNAL, EPERM, g, [tgid, sig as u32, 0, 0], (0, 0))
}

/// Typing into a terminal (TIOCSTI) or pasting its selection (TIOCLINUX): the user's unguarded
/// shell would run what the agent wrote.
#[lsm_cgroup(hook = "file_ioctl")]
pub fn guard_file_ioctl(ctx: LsmContext) -> i32 {
    let cmd: u32 = ctx.arg(1);
    if cmd != TIOCSTI && cmd != TIOCLINUX {
        return ALLOW;
    }
    let Some((_, _, g)) = guarded() else {
        return ALLOW;
    };
    refuse(CONTAIN_TERMINAL, EPERM, g, [cmd, 0, 0, 0], (0, 0))
}

#[lsm_cgroup(hook = "userns_create")]
pub fn guard_userns_create(_ctx: LsmContext) -> i32 {
    let Some((_, cc, g)) = guarded() else {
        return ALLOW;
    };
    if cc.userns_deny == 0 {
        return ALLOW;
    }
    refuse(CONTAIN_USERNS, EPERM, g, [0; 4], (0, 0))
}
