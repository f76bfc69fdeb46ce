//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding and is read by both sides, so a change
//! here is a change of the kernel/userspace ABI: the daemon reuses pinned maps across restarts.
#![no_std]

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps, as pinned under the bpffs directory.
pub const MAP_CONFIG: &str = "GUARD_CONFIG";
pub const MAP_GUARDED_CGROUPS: &str = "GUARDED_CGROUPS";
pub const MAP_GUARDED_UIDS: &str = "GUARDED_UIDS";
pub const MAP_ORIGIN_BY_COOKIE: &str = "ORIGIN_BY_COOKIE";
pub const MAP_ORIGIN_BY_CLIENT: &str = "ORIGIN_BY_CLIENT";
pub const MAP_EXEMPT_V4: &str = "EXEMPT_V4";
pub const MAP_EXEMPT_V6: &str = "EXEMPT_V6";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_DNS_SERVERS: &str = "DNS_SERVERS";
pub const MAP_DNS_RESTRICT: &str = "DNS_RESTRICT";
pub const MAP_ENROL_SCOPE: &str = "ENROL_SCOPE";
pub const MAP_ENROL_EXES: &str = "ENROL_EXES";
pub const MAP_ENROLLING: &str = "ENROLLING";
/// When the exec a mark stems from was, by the marked pid (`u64`, kernel monotonic ns): with
/// the mark's root, which exec that is. A map beside `ENROLLING` (whose pinned layout stays).
pub const MAP_ENROL_AT: &str = "ENROL_AT";
pub const MAP_ENROL_EVENTS: &str = "ENROL_EVENTS";

/// Executables (`[[agents]] exe`) the exec hook marks, by file.
pub const ENROL_EXE_ENTRIES: u32 = 4_096;
/// Processes marked at exec (or forked from one) that the daemon has not moved yet.
pub const ENROLLING_ENTRIES: u32 = 16_384;
/// Bytes of the ring buffer that tells the daemon about marked processes.
pub const ENROL_RING_BYTES: u32 = 256 * 1024;
/// [`EnrolEvent::kind`].
pub const ENROL_EXEC: u32 = 1;
pub const ENROL_FORK: u32 = 2;

/// Capacity of the origin maps (LRU: an entry a guarded socket, and one a connection not yet
/// accepted by the proxy).
pub const ORIGIN_MAP_ENTRIES: u32 = 65_536;
pub const GUARDED_CGROUP_ENTRIES: u32 = 4_096;
pub const GUARDED_UID_ENTRIES: u32 = 1_024;
pub const EXEMPT_ENTRIES: u32 = 1_024;
/// `scope.dns_servers`: addresses (IPv4 as IPv4-mapped IPv6, four words in network byte order)
/// guarded processes may send DNS to, when `DNS_RESTRICT[0]` is not 0.
pub const DNS_SERVER_ENTRIES: u32 = 64;
/// Deepest cgroup level checked for a guarded ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// `scope.udp`.
pub const UDP_DNS_ONLY: u32 = 0;
pub const UDP_ALLOW: u32 = 1;
pub const UDP_DENY: u32 = 2;

/// Indexes into the per-CPU counter array.
pub const CTR_REDIRECTED: u32 = 0;
pub const CTR_EXEMPT: u32 = 1;
pub const CTR_REFUSED_NETNS: u32 = 2;
pub const CTR_REFUSED_UDP: u32 = 3;
pub const CTR_REFUSED_BIND: u32 = 4;
pub const CTR_REFUSED_PROXY_DIRECT: u32 = 5;
pub const CTR_REFUSED_NO_ROOM: u32 = 6;
pub const CTR_ESTABLISHED: u32 = 7;
pub const CTR_REFUSED_OTHER_PROTO: u32 = 8;
pub const COUNTERS: u32 = 9;
pub const COUNTER_NAMES: [&str; COUNTERS as usize] = [
    "redirected",
    "exempt",
    "refused_netns",
    "refused_udp",
    "refused_bind",
    "refused_proxy_direct",
    "refused_no_room",
    "established",
    "refused_other_protocol",
];

/// The one entry of the config array. Written by the daemon before programs are attached and on
/// every start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Netns cookie of the host (the daemon's) network namespace.
    pub host_netns_cookie: u64,
    /// The daemon's own cgroup: never guarded, so the proxy's upstream connects escape.
    pub daemon_cgroup_id: u64,
    /// Proxy port, host byte order.
    pub proxy_port: u16,
    pub _pad0: u16,
    /// One of `UDP_*`.
    pub udp_mode: u32,
    /// Level of the attach cgroup below the cgroup v2 root (root = 0): ancestors above it are not
    /// checked, since programs only run below it.
    pub attach_level: u32,
    /// Non-zero once the daemon wrote this entry; the programs do nothing guarded before.
    pub ready: u32,
    /// Where the executable's identity sits in this kernel's structures (from its BTF);
    /// `exe.known == 0`: not read.
    pub exe: ExeOffsets,
}

/// Byte offsets of the fields that lead from the current task to its executable's inode:
/// `task_struct.mm`, `mm_struct.exe_file`, `file.f_inode`, `inode.i_ino`, `inode.i_sb`,
/// `super_block.s_dev`, found in the kernel's BTF by the daemon (they differ between builds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExeOffsets {
    pub task_mm: u32,
    pub mm_exe_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub known: u32,
    /// `task_struct.tgid`: the fork hook reads the new task's.
    pub task_tgid: u32,
}

/// Where a guarded socket wanted to go and who asked, at `connect()` time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// Original destination as the socket saw it: IPv4 in `dst_addr[0]`, or the 16 bytes of an
    /// IPv6 address (possibly IPv4-mapped); network byte order.
    pub dst_addr: [u32; 4],
    /// Original destination port, network byte order.
    pub dst_port: u16,
    /// `AF_INET` or `AF_INET6`: the socket's family.
    pub family: u16,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Non-zero: guarded because its process was marked at exec (an `[[agents]]` executable)
    /// and not yet moved into its agent cgroup; the pid of the marked process (the root of
    /// what it forked).
    pub enrolling: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub comm: [u8; 16],
    /// The executable the connecting task runs, as the kernel knows it: inode number and the
    /// device of its filesystem (kernel encoding, `major << 20 | minor`); 0 when not read.
    pub exe_ino: u64,
    pub exe_dev: u32,
    pub _pad1: u32,
}

/// The client side of a redirected connection as the proxy sees it from `accept()`: canonical
/// family (IPv4-mapped IPv6 is stored as IPv4), address (network byte order) and port (host byte
/// order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub family: u16,
    pub port: u16,
    pub addr: [u32; 4],
}

/// Value of the exempt LPM tries: which ports of the prefix are exempt. The daemon folds the
/// ports of every broader prefix into each narrower one, because an LPM lookup returns only the
/// longest match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExemptPorts {
    /// Non-zero: every port.
    pub all: u32,
    pub count: u32,
    /// Host byte order; the first `count` are used.
    pub ports: [u16; EXEMPT_MAX_PORTS],
}
pub const EXEMPT_MAX_PORTS: usize = 16;

impl ExemptPorts {
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        if self.all != 0 {
            return true;
        }
        let mut i = 0;
        while i < EXEMPT_MAX_PORTS {
            if (i as u32) < self.count && self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Containment (BPF LSM, per cgroup): maps, as pinned under the bpffs directory.
pub const MAP_CONTAIN_CONFIG: &str = "CONTAIN_CONFIG";
pub const MAP_UNIX_ALLOW: &str = "UNIX_ALLOW";
pub const MAP_CONTAINED: &str = "CONTAINED";
pub const MAP_CONTAIN_COUNTERS: &str = "CONTAIN_COUNTERS";
pub const UNIX_ALLOW_ENTRIES: u32 = 256;
/// Bytes of the ring buffer that carries refusals to the daemon (a power of two, page multiple).
pub const CONTAINED_RING_BYTES: u32 = 256 * 1024;
/// `sun_path` of `struct sockaddr_un`.
pub const UNIX_PATH_MAX: usize = 108;

/// `scope.unix`.
pub const UNIX_ALLOW_LISTED: u32 = 0;
pub const UNIX_ALLOW_ALL: u32 = 1;

/// What a guarded process was refused ([`Contained::kind`], and the index of its counter).
pub const CONTAIN_PTRACE: u32 = 0;
pub const CONTAIN_FOREIGN_SOCKET: u32 = 1;
pub const CONTAIN_UNIX: u32 = 2;
pub const CONTAIN_SOCKET_FAMILY: u32 = 3;
pub const CONTAIN_USERNS: u32 = 4;
pub const CONTAIN_SIGNAL: u32 = 5;
pub const CONTAIN_TERMINAL: u32 = 6;
pub const CONTAIN_KINDS: u32 = 7;
pub const CONTAIN_NAMES: [&str; CONTAIN_KINDS as usize] = [
    "process_access",
    "foreign_socket",
    "unix_connect",
    "socket_family",
    "user_namespace",
    "signal",
    "terminal_injection",
];

/// The one entry of the containment config array (a map of its own, so the redirect's pinned
/// config keeps its layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainConfig {
    /// One of `UNIX_*`.
    pub unix_mode: u32,
    /// Non-zero: guarded processes may not create user namespaces.
    pub userns_deny: u32,
    /// Non-zero once the daemon wrote this entry; the programs refuse nothing before.
    pub ready: u32,
    pub _pad0: u32,
    pub offsets: ContainOffsets,
}

/// Byte offsets (from the kernel's BTF) of the fields the containment programs read to tell
/// whose a task, socket or listener is: its cgroup (`task_struct.cgroups` ->
/// `css_set.dfl_cgrp`, `sock.sk_cgrp_data`; then `cgroup.level`, `cgroup.ancestors[]`,
/// `cgroup.kn` -> `kernfs_node.id`) and its uid (`task_struct.real_cred` -> `cred.uid`,
/// `sock.sk_uid`), and a Unix listener's bound name (`unix_sock.addr` -> `unix_address`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainOffsets {
    pub task_cgroups: u32,
    pub task_real_cred: u32,
    pub task_tgid: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_level: u32,
    pub cgroup_ancestors: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    pub cred_uid: u32,
    pub file_inode: u32,
    pub file_private_data: u32,
    pub inode_mode: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub sock_cgrp_data: u32,
    pub sock_uid: u32,
    pub unix_sock_addr: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    pub _pad0: u32,
}

/// A refusal, as the containment programs report it to the daemon (ring buffer `CONTAINED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contained {
    /// One of `CONTAIN_*`.
    pub kind: u32,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The errno the call got.
    pub errno: u32,
    /// By kind: process access: target tgid, ptrace mode; foreign socket: its family;
    /// socket family: family, type, protocol; signal: target tgid, signal; terminal: ioctl.
    pub detail: [u32; 4],
    pub cgroup_id: u64,
    /// The guarded cgroup the refused process belongs to (0: guarded by uid).
    pub guard_cgroup_id: u64,
    pub comm: [u8; 16],
    /// Unix: the listener's bound name (`name[0] == 0`: abstract), `name_len` bytes of it.
    pub name_len: u32,
    pub name: [u8; UNIX_PATH_MAX],
}

impl Default for Contained {
    fn default() -> Self {
        Contained {
            kind: 0,
            pid: 0,
            tgid: 0,
            uid: 0,
            gid: 0,
            errno: 0,
            detail: [0; 4],
            cgroup_id: 0,
            guard_cgroup_id: 0,
            comm: [0; 16],
            name_len: 0,
            name: [0; UNIX_PATH_MAX],
        }
    }
}

/// Where the exec and fork hooks mark processes (`ENROL_SCOPE[0]`): only below the attach
/// cgroup, never the daemon's. The hooks are tracepoints, which run for every task of the
/// host: this is what keeps them to guard's subtree.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolScope {
    pub attach_cgroup_id: u64,
    pub daemon_cgroup_id: u64,
    pub attach_level: u32,
    /// Non-zero once written; the hooks mark nothing before.
    pub ready: u32,
    pub exe: ExeOffsets,
    /// `task_struct.signal` and `signal_struct.live`: the exit hook drops a mark only when
    /// the last thread of the process is gone.
    pub task_signal: u32,
    pub signal_live: u32,
}

/// An executable as the exec hook looks it up: inode number and its filesystem's device
/// (kernel encoding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeKey {
    pub ino: u64,
    pub dev: u32,
    pub _pad0: u32,
}

/// A process marked at exec, or forked from one, until the daemon moved it (`ENROLLING`, by
/// its pid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrolling {
    /// The process that ran the agent's executable (itself, for that one).
    pub root: u32,
    /// Its real uid at that exec.
    pub uid: u32,
    /// The executable it ran then: what it is decided on, whatever it runs or says later.
    pub exe: ExeKey,
}

/// What the hooks tell the daemon (ring buffer `ENROL_EVENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolEvent {
    /// `ENROL_EXEC` or `ENROL_FORK`.
    pub kind: u32,
    pub pid: u32,
    pub root: u32,
    pub uid: u32,
    pub exe: ExeKey,
    /// See [`MAP_ENROL_AT`] (0: an event of an earlier build, which had none).
    pub at: u64,
}

/// The size of an [`EnrolEvent`] of builds before `at`.
pub const ENROL_EVENT_V1_BYTES: usize = 32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, with explicit padding fields and no pointers.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ExemptPorts {}
    unsafe impl aya::Pod for super::ContainConfig {}
    unsafe impl aya::Pod for super::EnrolScope {}
    unsafe impl aya::Pod for super::ExeKey {}
    unsafe impl aya::Pod for super::Enrolling {}
}
