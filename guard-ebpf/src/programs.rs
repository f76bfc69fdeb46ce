use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_task,
            bpf_get_netns_cookie, bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use guard_common::*;

pub(crate) const ALLOW: i32 = 1;
pub(crate) const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;
/// 127.0.0.1 as it sits in `user_ip4` (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[map]
static GUARD_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
pub(crate) static GUARDED_CGROUPS: HashMap<u64, u32> = HashMap::pinned(GUARDED_CGROUP_ENTRIES, 0);
#[map]
pub(crate) static GUARDED_UIDS: HashMap<u32, u32> = HashMap::pinned(GUARDED_UID_ENTRIES, 0);
#[map]
static ORIGIN_BY_COOKIE: LruHashMap<u64, Origin> = LruHashMap::pinned(ORIGIN_MAP_ENTRIES, 0);
#[map]
static ORIGIN_BY_CLIENT: LruHashMap<ClientKey, Origin> = LruHashMap::pinned(ORIGIN_MAP_ENTRIES, 0);
#[map]
static EXEMPT_V4: LpmTrie<[u8; 4], ExemptPorts> = LpmTrie::pinned(EXEMPT_ENTRIES, 0);
#[map]
static EXEMPT_V6: LpmTrie<[u8; 16], ExemptPorts> = LpmTrie::pinned(EXEMPT_ENTRIES, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(guard_common::COUNTERS, 0);
#[map]
static DNS_SERVERS: HashMap<[u32; 4], u32> = HashMap::pinned(DNS_SERVER_ENTRIES, 0);
#[map]
static DNS_RESTRICT: Array<u32> = Array::pinned(1, 0);

/// 1 when the daemon lets the programs read kernel memory for the executable's identity (set
/// at load: a kernel locked down for confidentiality has no bpf_probe_read_kernel, and with 0
/// the verifier never sees the call).
#[no_mangle]
static EXE_READ: u32 = 0;

/// The current task's executable: (inode number, device of its filesystem), or zeros.
#[inline(always)]
pub(crate) fn current_exe(o: &ExeOffsets) -> (u64, u32) {
    if unsafe { read_volatile(&EXE_READ) } == 0 || o.known == 0 {
        return (0, 0);
    }
    let read = |base: u64, off: u32| -> Option<u64> {
        if base == 0 {
            return None;
        }
        unsafe { bpf_probe_read_kernel((base + off as u64) as *const u64) }.ok()
    };
    let task = unsafe { bpf_get_current_task() };
    let inode = read(task, o.task_mm)
        .and_then(|mm| read(mm, o.mm_exe_file))
        .and_then(|file| read(file, o.file_inode));
    let Some(inode) = inode.filter(|&i| i != 0) else {
        return (0, 0);
    };
    let ino = read(inode, o.inode_ino).unwrap_or(0);
    let dev = read(inode, o.inode_sb)
        .filter(|&sb| sb != 0)
        .and_then(|sb| unsafe { bpf_probe_read_kernel((sb + o.sb_dev as u64) as *const u32) }.ok())
        .unwrap_or(0);
    (ino, dev)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn config() -> Option<&'static Config> {
    let c = GUARD_CONFIG.get(0)?;
    if c.ready == 0 {
        return None;
    }
    Some(c)
}

/// Whom a guarded process is guarded as: the outermost guarded cgroup among its ancestors (at
/// `level`), or its uid.
#[derive(Clone, Copy)]
pub(crate) enum Guard {
    Cgroup { level: u32, id: u64 },
    Uid { uid: u32 },
}

/// Decided from identities a process cannot forge: its cgroup (or an ancestor) and its uid.
#[inline(always)]
pub(crate) fn guard_of_current(cfg: &Config) -> Option<Guard> {
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if cgroup == cfg.daemon_cgroup_id {
        return None;
    }
    let mut level = cfg.attach_level;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            // Past the current cgroup's own level.
            break;
        }
        if unsafe { GUARDED_CGROUPS.get(&id) }.is_some() {
            return Some(Guard::Cgroup { level, id });
        }
        level += 1;
    }
    let uid = bpf_get_current_uid_gid() as u32;
    if unsafe { GUARDED_UIDS.get(&uid) }.is_some() {
        return Some(Guard::Uid { uid });
    }
    None
}

/// Guarded by cgroup or uid, or marked at exec and not moved into its agent cgroup yet.
#[inline(always)]
fn is_guarded(cfg: &Config) -> bool {
    guard_of_current(cfg).is_some() || crate::enrol::enrolling_root().is_some()
}

#[inline(always)]
fn user_port(ctx: *mut bpf_sock_addr) -> u16 {
    // Network byte order in the low 16 bits; convert to host order.
    let p = unsafe { read_volatile(addr_of!((*ctx).user_port)) };
    u16::from_be(p as u16)
}

#[inline(always)]
fn set_user_port(ctx: *mut bpf_sock_addr, port: u16) {
    unsafe { write_volatile(addr_of_mut!((*ctx).user_port), port.to_be() as u32) };
}

#[inline(always)]
fn read_ip6(ctx: *mut bpf_sock_addr) -> [u32; 4] {
    // Word by word: the verifier accepts only 4-byte accesses to user_ip6 on older kernels.
    unsafe {
        [
            read_volatile(addr_of!((*ctx).user_ip6[0])),
            read_volatile(addr_of!((*ctx).user_ip6[1])),
            read_volatile(addr_of!((*ctx).user_ip6[2])),
            read_volatile(addr_of!((*ctx).user_ip6[3])),
        ]
    }
}

#[inline(always)]
fn write_ip6(ctx: *mut bpf_sock_addr, a: [u32; 4]) {
    unsafe {
        write_volatile(addr_of_mut!((*ctx).user_ip6[0]), a[0]);
        write_volatile(addr_of_mut!((*ctx).user_ip6[1]), a[1]);
        write_volatile(addr_of_mut!((*ctx).user_ip6[2]), a[2]);
        write_volatile(addr_of_mut!((*ctx).user_ip6[3]), a[3]);
    }
}

#[inline(always)]
fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[inline(always)]
fn exempt_v4(addr: u32, port: u16) -> bool {
    let key = Key::new(32, addr.to_ne_bytes());
    match EXEMPT_V4.get(&key) {
        Some(p) => p.contains(port),
        None => false,
    }
}

#[inline(always)]
fn exempt_v6(addr: &[u32; 4], port: u16) -> bool {
    let mut data = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        data[i * 4] = b[0];
        data[i * 4 + 1] = b[1];
        data[i * 4 + 2] = b[2];
        data[i * 4 + 3] = b[3];
        i += 1;
    }
    let key = Key::new(128, data);
    match EXEMPT_V6.get(&key) {
        Some(p) => p.contains(port),
        None => false,
    }
}

/// `a` (as in `user_ip4`) as the IPv4-mapped IPv6 address `DNS_SERVERS` is keyed by.
#[inline(always)]
fn mapped4(a: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), a]
}

/// With `scope.dns_servers` set, DNS only to those servers (else to any address).
#[inline(always)]
fn dns_server_allowed(addr: &[u32; 4]) -> bool {
    match DNS_RESTRICT.get(0) {
        Some(r) if *r != 0 => unsafe { DNS_SERVERS.get(addr) }.is_some(),
        _ => true,
    }
}

/// The UDP (and other non-TCP) policy for a guarded socket sending to `addr` (IPv6 or
/// IPv4-mapped) port `port`.
#[inline(always)]
fn datagram_allowed(cfg: &Config, protocol: u32, addr: &[u32; 4], port: u16) -> bool {
    match cfg.udp_mode {
        UDP_ALLOW => true,
        UDP_DNS_ONLY => protocol == IPPROTO_UDP && port == DNS_PORT && dns_server_allowed(addr),
        _ => false,
    }
}

#[inline(always)]
fn record_origin(
    ctx: &SockAddrContext,
    cfg: &Config,
    family: u16,
    addr: [u32; 4],
    port_be: u16,
) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let (exe_ino, exe_dev) = current_exe(&cfg.exe);
    let origin = Origin {
        dst_addr: addr,
        dst_port: port_be,
        family,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        enrolling: crate::enrol::enrolling_root().unwrap_or(0),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        exe_ino,
        exe_dev,
        _pad1: 0,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIGIN_BY_COOKIE.insert(&cookie, &origin, 0).is_ok()
}

/// Shared decision for connect4/connect6 once the destination is known in v4 or v6 form.
enum Verdict {
    Allow,
    Refuse,
    Redirect,
}

#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    cfg: &Config,
    v4: Option<u32>,
    v6: &[u32; 4],
    port: u16,
) -> Verdict {
    let sa = ctx.sock_addr;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != cfg.host_netns_cookie {
        count(CTR_REFUSED_NETNS);
        return Verdict::Refuse;
    }
    let ty = unsafe { (*sa).type_ };
    let protocol = unsafe { (*sa).protocol };
    if ty != SOCK_STREAM || protocol != IPPROTO_TCP {
        if ty == SOCK_DGRAM && protocol == IPPROTO_UDP {
            let addr = match v4 {
                Some(a) => mapped4(a),
                None => *v6,
            };
            if datagram_allowed(cfg, protocol, &addr, port) {
                return Verdict::Allow;
            }
            count(CTR_REFUSED_UDP);
        } else {
            if cfg.udp_mode == UDP_ALLOW {
                return Verdict::Allow;
            }
            count(CTR_REFUSED_OTHER_PROTO);
        }
        return Verdict::Refuse;
    }
    let exempt = match v4 {
        Some(a) => {
            if a == LOOPBACK4 && port == cfg.proxy_port {
                // Talking to the proxy directly would let an agent pick any origin it likes.
                count(CTR_REFUSED_PROXY_DIRECT);
                return Verdict::Refuse;
            }
            exempt_v4(a, port)
        }
        None => {
            if v6 == &[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])] && port == cfg.proxy_port {
                count(CTR_REFUSED_PROXY_DIRECT);
                return Verdict::Refuse;
            }
            exempt_v6(v6, port)
        }
    };
    if exempt {
        count(CTR_EXEMPT);
        return Verdict::Allow;
    }
    Verdict::Redirect
}

#[cgroup_sock_addr(connect4)]
pub fn guard_connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    if !is_guarded(cfg) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let addr = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let port = user_port(sa);
    match decide(&ctx, cfg, Some(addr), &[0; 4], port) {
        Verdict::Allow => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect => {
            if !record_origin(&ctx, cfg, AF_INET, [addr, 0, 0, 0], port.to_be()) {
                count(CTR_REFUSED_NO_ROOM);
                return REFUSE;
            }
            unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4) };
            set_user_port(sa, cfg.proxy_port);
            count(CTR_REDIRECTED);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn guard_connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    if !is_guarded(cfg) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let addr = read_ip6(sa);
    let port = user_port(sa);
    let mapped = is_v4_mapped(&addr);
    let v4 = if mapped { Some(addr[3]) } else { None };
    match decide(&ctx, cfg, v4, &addr, port) {
        Verdict::Allow => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect => {
            if !record_origin(&ctx, cfg, AF_INET6, addr, port.to_be()) {
                count(CTR_REFUSED_NO_ROOM);
                return REFUSE;
            }
            if mapped {
                // An IPv6 socket reaching IPv4: keep it IPv4-mapped so the socket can connect.
                write_ip6(sa, [addr[0], addr[1], addr[2], LOOPBACK4]);
            } else {
                write_ip6(sa, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
            }
            set_user_port(sa, cfg.proxy_port);
            count(CTR_REDIRECTED);
            ALLOW
        }
    }
}

#[inline(always)]
fn sendmsg_allowed(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    if !is_guarded(cfg) {
        return ALLOW;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != cfg.host_netns_cookie {
        count(CTR_REFUSED_NETNS);
        return REFUSE;
    }
    let sa = ctx.sock_addr;
    let protocol = unsafe { (*sa).protocol };
    let port = user_port(sa);
    let addr = if v6 {
        read_ip6(sa)
    } else {
        mapped4(unsafe { read_volatile(addr_of!((*sa).user_ip4)) })
    };
    if datagram_allowed(cfg, protocol, &addr, port) {
        ALLOW
    } else {
        count(CTR_REFUSED_UDP);
        REFUSE
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn guard_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg_allowed(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn guard_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg_allowed(&ctx, true)
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(origin) = (unsafe { ORIGIN_BY_COOKIE.get(&cookie) }) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    if v6 {
        if origin.family != AF_INET6 {
            return ALLOW;
        }
        write_ip6(sa, origin.dst_addr);
    } else {
        if origin.family != AF_INET {
            return ALLOW;
        }
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), origin.dst_addr[0]) };
    }
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), origin.dst_port as u32) };
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn guard_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn guard_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

/// Named apart from its section: a function called `sockops` clashes with the ELF section name.
#[sock_ops]
pub fn guard_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(origin) = (unsafe { ORIGIN_BY_COOKIE.get(&cookie) }) else {
        return 1;
    };
    let origin = *origin;
    let local6 = ctx.local_ip6();
    let key = if ctx.family() == AF_INET as u32 {
        ClientKey {
            family: AF_INET,
            port: ctx.local_port() as u16,
            addr: [ctx.local_ip4(), 0, 0, 0],
        }
    } else if is_v4_mapped(&local6) {
        ClientKey {
            family: AF_INET,
            port: ctx.local_port() as u16,
            addr: [local6[3], 0, 0, 0],
        }
    } else {
        ClientKey {
            family: AF_INET6,
            port: ctx.local_port() as u16,
            addr: local6,
        }
    };
    // Handed to the proxy, which takes it after accept(); the cookie entry stays for getpeername
    // until the socket is released.
    if ORIGIN_BY_CLIENT.insert(&key, &origin, 0).is_ok() {
        count(CTR_ESTABLISHED);
    }
    1
}

#[cgroup_sock(sock_release)]
pub fn guard_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIGIN_BY_COOKIE.remove(&cookie);
    ALLOW
}

#[inline(always)]
fn post_bind(ctx: &SockContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    let port = unsafe { (*ctx.sock).src_port } as u16;
    if port != cfg.proxy_port || !is_guarded(cfg) {
        return ALLOW;
    }
    // A guarded process holding the proxy port could receive other agents' redirected traffic
    // while the daemon is down.
    count(CTR_REFUSED_BIND);
    REFUSE
}

#[cgroup_sock(post_bind4)]
pub fn guard_post_bind4(ctx: SockContext) -> i32 {
    post_bind(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn guard_post_bind6(ctx: SockContext) -> i32 {
    post_bind(&ctx)
}

/// IPv4 and IPv6 sockets a guarded process creates: raw, ping (ICMP) and protocols other than
/// TCP and UDP are refused (the same rule as the LSM `socket_create` program, which also covers
/// the other families, where the kernel runs BPF LSM).
#[cgroup_sock(sock_create)]
pub fn guard_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (family, ty, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let Some(errno) = crate::contain::family_refusal(family as i32, ty as i32, protocol as i32)
    else {
        return ALLOW;
    };
    let Some(cfg) = config() else { return ALLOW };
    let Some(g) = guard_of_current(cfg) else {
        return ALLOW;
    };
    crate::contain::refuse_family(g, family as i32, ty as i32, protocol as i32, errno)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
