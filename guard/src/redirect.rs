//! The kernel side, seen from the daemon: loading guard's eBPF programs, attaching them with
//! pinned links (reused on restart), and the maps that say who is guarded and where their
//! connections were going.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode,
    },
    Ebpf, EbpfLoader,
};
use guard_common::{
    ClientKey, Config as KConfig, ExemptPorts, Origin, AF_INET, AF_INET6, COUNTERS, COUNTER_NAMES,
    EXEMPT_MAX_PORTS,
};

use crate::config::ExemptRule;

/// The compiled eBPF object (built by build.rs from guard-ebpf).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// Every program, the kernel attach type it is for, and its `BPF_PROG_QUERY` attach type number
/// (enum bpf_attach_type in the kernel's uapi).
pub const PROGRAMS: &[(&str, &str, u32)] = &[
    ("guard_connect4", "connect4", 10),
    ("guard_connect6", "connect6", 11),
    ("guard_sendmsg4", "sendmsg4", 14),
    ("guard_sendmsg6", "sendmsg6", 15),
    ("guard_getpeername4", "getpeername4", 29),
    ("guard_getpeername6", "getpeername6", 30),
    ("guard_sock_ops", "sock_ops", 3),
    ("guard_post_bind4", "post_bind4", 12),
    ("guard_post_bind6", "post_bind6", 13),
    ("guard_sock_release", "sock_release", 34),
];

/// What the programs need to know, written into the config map.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub proxy_port: u16,
    pub udp_mode: u32,
    pub daemon_cgroup_id: u64,
    pub host_netns_cookie: u64,
    pub attach_level: u32,
}

pub struct Kernel {
    pin_dir: PathBuf,
    config: Array<MapData, KConfig>,
    cgroups: Mutex<HashMap<MapData, u64, u32>>,
    uids: Mutex<HashMap<MapData, u32, u32>>,
    by_client: Mutex<HashMap<MapData, ClientKey, Origin>>,
    exempt_v4: Mutex<LpmTrie<MapData, [u8; 4], ExemptPorts>>,
    exempt_v6: Mutex<LpmTrie<MapData, [u8; 16], ExemptPorts>>,
    dns_servers: Mutex<HashMap<MapData, [u32; 4], u32>>,
    dns_restrict: Mutex<Array<MapData, u32>>,
    counters: PerCpuArray<MapData, u64>,
    /// Kept so the freshly loaded programs stay valid until attached and pinned.
    ebpf: Ebpf,
}

/// Mounts bpffs at the parent of `pin_dir` when that directory is not on a bpffs yet, then creates
/// `pin_dir` (mode 0700).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let on_bpffs = || -> Result<bool> {
        let info = fs::read_to_string("/proc/self/mountinfo")?;
        let mounts = crate::cgroup::mounts_of(&info, "bpf");
        Ok(pin_dir.ancestors().any(|a| mounts.iter().any(|m| m == a)))
    };
    if !on_bpffs()? {
        let parent = pin_dir.parent().ok_or_else(|| {
            anyhow!(
                "the bpffs pin directory {} has no parent",
                pin_dir.display()
            )
        })?;
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        // Two daemons starting at once on a fresh host would otherwise both mount, and the
        // second bpffs would hide the first one's pins (a restart would not find them). The
        // lock is on the mount point's directory, as the unit's ExecStartPre takes it.
        let dir =
            fs::File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
        let _lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", parent.display()))?;
        // Whoever held the lock before may have mounted it.
        if !on_bpffs()? {
            nix::mount::mount(
                Some("bpf"),
                parent,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                Some("mode=700"),
            )
            .with_context(|| format!("mounting bpffs at {}", parent.display()))?;
            tracing::info!(at = %parent.display(), "mounted bpffs");
        }
    }
    use std::os::unix::fs::DirBuilderExt as _;
    for sub in ["links", "progs"] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pin_dir.join(sub))
            .with_context(|| format!("creating {}", pin_dir.display()))?;
    }
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
}

impl Kernel {
    /// Loads the object with its maps pinned under `pin_dir` (reusing pinned maps from an earlier
    /// run), and writes `settings`. Programs are not attached yet: see [`Kernel::attach`].
    pub fn load(pin_dir: &Path, settings: Settings) -> Result<Kernel> {
        ensure_bpffs(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .context("loading guard's eBPF object (needs root, and a kernel with BPF and BTF)")?;
        let mut config: Array<MapData, KConfig> = take_map(&mut ebpf, guard_common::MAP_CONFIG)?;
        let kconfig = KConfig {
            host_netns_cookie: settings.host_netns_cookie,
            daemon_cgroup_id: settings.daemon_cgroup_id,
            proxy_port: settings.proxy_port,
            _pad0: 0,
            udp_mode: settings.udp_mode,
            attach_level: settings.attach_level,
            ready: 1,
        };
        config
            .set(0, kconfig, 0)
            .context("writing the config map")?;
        Ok(Kernel {
            pin_dir: pin_dir.to_path_buf(),
            config,
            cgroups: Mutex::new(take_map(&mut ebpf, guard_common::MAP_GUARDED_CGROUPS)?),
            uids: Mutex::new(take_map(&mut ebpf, guard_common::MAP_GUARDED_UIDS)?),
            by_client: Mutex::new(take_map(&mut ebpf, guard_common::MAP_ORIGIN_BY_CLIENT)?),
            exempt_v4: Mutex::new(take_map(&mut ebpf, guard_common::MAP_EXEMPT_V4)?),
            exempt_v6: Mutex::new(take_map(&mut ebpf, guard_common::MAP_EXEMPT_V6)?),
            dns_servers: Mutex::new(take_map(&mut ebpf, guard_common::MAP_DNS_SERVERS)?),
            dns_restrict: Mutex::new(take_map(&mut ebpf, guard_common::MAP_DNS_RESTRICT)?),
            counters: take_map(&mut ebpf, guard_common::MAP_COUNTERS)?,
            ebpf,
        })
    }

    pub fn config(&self) -> Result<KConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Attaches every program at `cgroup` with a pinned link. A pinned link from an earlier run
    /// keeps enforcing (no gap, no duplicate); when its program is not this build's (an upgrade),
    /// the link is switched to this build's program atomically (`BPF_LINK_UPDATE`): connects are
    /// never unguarded in between.
    pub fn attach(&mut self, cgroup: &Path) -> Result<Attached> {
        let cg = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut done = Attached::default();
        let cgroup_id = crate::cgroup::cgroup_id(cgroup)?;
        for (name, _, _) in PROGRAMS {
            let pin = self.pin_dir.join("links").join(name);
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
            match prog {
                aya::programs::Program::CgroupSockAddr(p) => load_once(p.load())?,
                aya::programs::Program::CgroupSock(p) => load_once(p.load())?,
                aya::programs::Program::SockOps(p) => load_once(p.load())?,
                _ => bail!("program {name} has an unexpected type"),
            }
            // The program each link runs is pinned beside it: its tag tells whether it is this
            // build's (listing programs by id would need CAP_SYS_ADMIN, which the unit drops).
            let prog_pin = self.pin_dir.join("progs").join(name);
            if pin.exists() {
                let on = link_cgroup_id(&pin)
                    .with_context(|| format!("reading pinned link {}", pin.display()))?;
                if on != cgroup_id {
                    // Detached (its cgroup was removed) or attached elsewhere (the attach
                    // cgroup changed): it guards nothing here. Replaced by a new link below.
                    tracing::warn!(
                        program = name,
                        link_cgroup_id = on,
                        "pinned link not attached at the attach cgroup: replaced"
                    );
                    unpin_link(&pin)?;
                }
            }
            if pin.exists() {
                let link = FdLink::from(
                    PinnedLink::from_pin(&pin)
                        .with_context(|| format!("reusing pinned link {}", pin.display()))?,
                );
                let running = link
                    .info()
                    .with_context(|| format!("reading pinned link {}", pin.display()))?
                    .program_id();
                let pinned = aya::programs::ProgramInfo::from_pin(&prog_pin).ok();
                let ours = prog.info()?.tag();
                // No program pin (a build from before they were pinned), or not the one the
                // link runs: not known to be this build's, so it is replaced.
                if pinned.is_some_and(|p| p.id() == running && p.tag() == ours) {
                    done.reused += 1;
                    continue;
                }
                link_update(&pin, prog.fd()?.as_fd())
                    .with_context(|| format!("updating pinned link {}", pin.display()))?;
                pin_program(prog, &prog_pin)?;
                tracing::info!(
                    program = name,
                    "pinned link switched to this build's program"
                );
                done.updated += 1;
                continue;
            }
            let link: FdLink = match prog {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single)?;
                    p.take_link(id)?.try_into()?
                }
                aya::programs::Program::CgroupSock(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single)?;
                    p.take_link(id)?.try_into()?
                }
                aya::programs::Program::SockOps(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single)?;
                    p.take_link(id)?.try_into()?
                }
                _ => bail!("program {name} has an unexpected type"),
            };
            link.pin(&pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
            pin_program(prog, &prog_pin)?;
            done.attached += 1;
        }
        // Links (and programs) an earlier build pinned that this one does not have: detached.
        for dir in ["links", "progs"] {
            for entry in fs::read_dir(self.pin_dir.join(dir))? {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !PROGRAMS.iter().any(|(p, _, _)| *p == name) {
                    unpin_link(&path)
                        .with_context(|| format!("removing stale pin {}", path.display()))?;
                    tracing::info!(pin = %path.display(), "stale pin of an earlier build removed");
                    done.removed += usize::from(dir == "links");
                }
            }
        }
        Ok(done)
    }

    pub fn guard_cgroup(&self, id: u64) -> Result<()> {
        self.cgroups.lock().unwrap().insert(id, 1, 0)?;
        Ok(())
    }

    pub fn unguard_cgroup(&self, id: u64) -> Result<()> {
        match self.cgroups.lock().unwrap().remove(&id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn guarded_cgroups(&self) -> Vec<u64> {
        self.cgroups
            .lock()
            .unwrap()
            .keys()
            .filter_map(|k| k.ok())
            .collect()
    }

    /// Makes the guarded-uid map exactly `uids`.
    pub fn set_uids(&self, uids: &[u32]) -> Result<()> {
        let mut map = self.uids.lock().unwrap();
        let want: BTreeSet<u32> = uids.iter().copied().collect();
        let have: Vec<u32> = map.keys().filter_map(|k| k.ok()).collect();
        for uid in have.iter().filter(|u| !want.contains(u)) {
            map.remove(uid)?;
        }
        for uid in &want {
            map.insert(uid, 1, 0)?;
        }
        Ok(())
    }

    pub fn guarded_uids(&self) -> Vec<u32> {
        self.uids
            .lock()
            .unwrap()
            .keys()
            .filter_map(|k| k.ok())
            .collect()
    }

    /// Makes the exempt tries exactly `rules`.
    pub fn set_exempt(&self, rules: &[ExemptRule]) -> Result<()> {
        let entries = exempt_entries(rules)?;
        let mut v4 = self.exempt_v4.lock().unwrap();
        let mut v6 = self.exempt_v6.lock().unwrap();
        let old4: Vec<_> = v4.keys().filter_map(|k| k.ok()).collect();
        for k in old4 {
            v4.remove(&k)?;
        }
        let old6: Vec<_> = v6.keys().filter_map(|k| k.ok()).collect();
        for k in old6 {
            v6.remove(&k)?;
        }
        for (rule, ports) in entries {
            match rule.addr {
                IpAddr::V4(a) => v4.insert(&Key::new(rule.prefix as u32, a.octets()), ports, 0)?,
                IpAddr::V6(a) => v6.insert(&Key::new(rule.prefix as u32, a.octets()), ports, 0)?,
            }
        }
        Ok(())
    }

    /// `scope.dns_servers`: with `Some`, guarded DNS (UDP port 53 under `dns-only`) may only go
    /// to these addresses; with `None`, to any. The list is written before the switch is turned
    /// on, and emptied only after it is turned off.
    pub fn set_dns_servers(&self, servers: Option<&[IpAddr]>) -> Result<()> {
        let mut map = self.dns_servers.lock().unwrap();
        let mut restrict = self.dns_restrict.lock().unwrap();
        let want: BTreeSet<[u32; 4]> = servers.unwrap_or(&[]).iter().map(|a| dns_key(*a)).collect();
        if want.len() > guard_common::DNS_SERVER_ENTRIES as usize {
            bail!(
                "scope.dns_servers lists {} addresses; at most {}",
                want.len(),
                guard_common::DNS_SERVER_ENTRIES
            );
        }
        if servers.is_none() {
            restrict.set(0, 0, 0)?;
        }
        let have: Vec<[u32; 4]> = map.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !want.contains(*k)) {
            map.remove(k)?;
        }
        for k in &want {
            map.insert(k, 1, 0)?;
        }
        if servers.is_some() {
            restrict.set(0, 1, 0)?;
        }
        Ok(())
    }

    /// Takes (reads and deletes) the origin of a connection accepted from `client`.
    pub fn take_origin(&self, client: SocketAddr) -> Option<Origin> {
        let key = client_key(client);
        let mut map = self.by_client.lock().unwrap();
        let origin = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(origin)
    }

    /// Kernel counters summed over CPUs, by name.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for i in 0..COUNTERS {
            let total = self
                .counters
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            out.insert(COUNTER_NAMES[i as usize].to_string(), total);
        }
        out
    }
}

/// What [`Kernel::attach`] did, program by program.
#[derive(Debug, Default, Clone, Copy)]
pub struct Attached {
    /// New links (nothing was pinned).
    pub attached: usize,
    /// Pinned links already running this build's program.
    pub reused: usize,
    /// Pinned links switched from another build's program to this one's.
    pub updated: usize,
    /// Pinned links of programs this build does not have, detached.
    pub removed: usize,
}

/// Pins `prog` at `pin`, replacing what was pinned there.
fn pin_program(prog: &mut aya::programs::Program, pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
    }
    prog.pin(pin)
        .with_context(|| format!("pinning program {}", pin.display()))
}

/// The descriptor of the bpf object pinned at `pin` (`BPF_OBJ_GET`).
fn obj_get(pin: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut get = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: ObjAttr is BPF_OBJ_GET's bpf_attr, pointing at a NUL-terminated path.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut get) }.context("BPF_OBJ_GET")?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The id of the cgroup the pinned cgroup link at `pin` is attached to; 0 when it is detached
/// (aya's `LinkInfo` does not expose it).
fn link_cgroup_id(pin: &Path) -> Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let link = obj_get(pin)?;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned, at 16) the union whose cgroup
    // member starts with cgroup_id.
    let mut info = [0u64; 8];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: InfoByFd is BPF_OBJ_GET_INFO_BY_FD's bpf_attr; info outlives the call and has
    // the length given.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info[2])
}

/// `union bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
pub struct ObjAttr {
    /// A pointer to a NUL-terminated path in bpffs.
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
}

/// `BPF_LINK_UPDATE`: the pinned link at `pin` runs `prog` from now on (aya keeps this call to
/// itself for cgroup links).
pub fn link_update(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let link = obj_get(pin)?;
    // union bpf_attr, BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut upd = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: LinkUpdate is BPF_LINK_UPDATE's bpf_attr.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut upd) }.context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// The `bpf(2)` syscall with `attr` (its size given to the kernel); returns what the call
/// returns (a new fd for the commands that make one).
///
/// # Safety
/// `attr` must be the `union bpf_attr` member `cmd` reads, and every pointer in it valid for the
/// call.
pub unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller's promise; the kernel reads (and for some commands writes back) at
    // most size_of::<T>() bytes of attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn load_once(r: Result<(), aya::programs::ProgramError>) -> Result<()> {
    match r {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => {
            Err(anyhow::Error::new(e).context("loading a program into the kernel (verifier)"))
        }
    }
}

/// One trie entry per distinct prefix, each carrying the ports of every prefix that contains it,
/// because an LPM lookup returns only the longest matching prefix.
pub fn exempt_entries(rules: &[ExemptRule]) -> Result<Vec<(ExemptRule, ExemptPorts)>> {
    let mut prefixes: Vec<ExemptRule> = Vec::new();
    for r in rules {
        let p = ExemptRule { port: None, ..*r };
        if !prefixes.contains(&p) {
            prefixes.push(p);
        }
    }
    let mut out = Vec::new();
    for p in prefixes {
        let mut ports = ExemptPorts::default();
        let mut list: BTreeSet<u16> = BTreeSet::new();
        for r in rules.iter().filter(|r| r.covers(&p)) {
            match r.port {
                None => ports.all = 1,
                Some(port) => {
                    list.insert(port);
                }
            }
        }
        if ports.all == 0 {
            if list.len() > EXEMPT_MAX_PORTS {
                bail!(
                    "scope.exempt: {p} has {} ports; at most {EXEMPT_MAX_PORTS} ports per address range",
                    list.len()
                );
            }
            for (i, port) in list.iter().enumerate() {
                ports.ports[i] = *port;
            }
            ports.count = list.len() as u32;
        }
        out.push((p, ports));
    }
    Ok(out)
}

/// The origin map key for a client address as `accept()` reports it.
pub fn client_key(client: SocketAddr) -> ClientKey {
    match canonical(client) {
        SocketAddr::V4(a) => ClientKey {
            family: AF_INET,
            port: a.port(),
            addr: [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0],
        },
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ClientKey {
                family: AF_INET6,
                port: a.port(),
                addr: [w(0), w(4), w(8), w(12)],
            }
        }
    }
}

/// `addr` as `DNS_SERVERS` keys it: IPv6 (IPv4 as IPv4-mapped), four words in network order.
fn dns_key(addr: IpAddr) -> [u32; 4] {
    let o = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// `::ffff:a.b.c.d` as the IPv4 address it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The destination an origin records, canonical (IPv4-mapped becomes IPv4).
pub fn original_dst(o: &Origin) -> SocketAddr {
    let port = u16::from_be(o.dst_port);
    let addr = if o.family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(o.dst_addr[0].to_ne_bytes()))
    } else {
        let mut b = [0u8; 16];
        for (i, w) in o.dst_addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    };
    canonical(SocketAddr::new(addr, port))
}

/// Programs attached directly at a cgroup, by attach type (`BPF_PROG_QUERY`).
pub fn attached_programs(cgroup: &Path) -> Result<BTreeMap<String, Vec<u32>>> {
    let cg = fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut out = BTreeMap::new();
    for (_, attach, attach_type) in PROGRAMS {
        let ids = prog_query(cg.as_fd().as_raw_fd(), *attach_type)
            .with_context(|| format!("querying {attach} programs at {}", cgroup.display()))?;
        out.insert(attach.to_string(), ids);
    }
    Ok(out)
}

fn prog_query(fd: i32, attach_type: u32) -> std::io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = [0u32; 64];
    // union bpf_attr, query member: target_fd, attach_type, query_flags, attach_flags,
    // prog_ids (u64 pointer), prog_cnt. The rest must be zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr for BPF_PROG_QUERY; ids outlives the call. The kernel
    // writes prog_cnt back into attr.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) }?;
    let cnt = u32::from_ne_bytes(attr[24..28].try_into().unwrap()) as usize;
    Ok(ids[..cnt.min(ids.len())].to_vec())
}

/// Unpinning and dropping the last reference detaches the program (a pin that is not a link, a
/// program pin say, is just removed).
fn unpin_link(pin: &Path) -> Result<()> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => drop(link.unpin()?),
        Err(_) => fs::remove_file(pin)?,
    }
    Ok(())
}

/// Removes every pin under `pin_dir` (links first, which detaches the programs, then maps) and the
/// directory itself. Used by `guard disable` and by uninstall.
pub fn unpin_all(pin_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let links = pin_dir.join("links");
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            let p = e.path();
            unpin_link(&p)?;
            removed.push(p.display().to_string());
        }
        let _ = fs::remove_dir(&links);
    }
    if let Ok(entries) = fs::read_dir(pin_dir.join("progs")) {
        for e in entries.flatten() {
            fs::remove_file(e.path())?;
            removed.push(e.path().display().to_string());
        }
        let _ = fs::remove_dir(pin_dir.join("progs"));
    }
    if let Ok(entries) = fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            fs::remove_file(e.path())?;
            removed.push(e.path().display().to_string());
        }
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}

/// The netns cookie of the calling process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn own_netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, out pointer and length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (Linux 5.14+)");
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(s: &[&str]) -> Vec<ExemptRule> {
        s.iter().map(|r| ExemptRule::parse(r).unwrap()).collect()
    }

    #[test]
    fn narrower_prefixes_inherit_broader_ports() {
        let e = exempt_entries(&rules(&[
            "10.0.0.0/8:443",
            "10.1.0.0/16:80",
            "10.1.0.0/16:81",
        ]))
        .unwrap();
        assert_eq!(e.len(), 2);
        let narrow = &e.iter().find(|(r, _)| r.prefix == 16).unwrap().1;
        assert_eq!(narrow.count, 3);
        assert!(narrow.contains(443) && narrow.contains(80) && narrow.contains(81));
        assert!(!narrow.contains(22));
        let wide = &e.iter().find(|(r, _)| r.prefix == 8).unwrap().1;
        assert!(wide.contains(443) && !wide.contains(80));
    }

    #[test]
    fn all_ports_wins() {
        let e = exempt_entries(&rules(&["10.0.0.0/8", "10.1.0.0/16:80"])).unwrap();
        assert!(e.iter().all(|(_, p)| p.all == 1));
        let e = exempt_entries(&rules(&["::1", "10.0.0.1"])).unwrap();
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn too_many_ports_is_an_error() {
        let many: Vec<String> = (1..=17).map(|p| format!("10.0.0.1:{p}")).collect();
        let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        assert!(exempt_entries(&rules(&many)).is_err());
    }

    #[test]
    fn client_keys_are_canonical() {
        let v4: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        assert_eq!(client_key(v4), client_key(mapped));
        let k = client_key(v4);
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.port, 4000);
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        let v6 = client_key("[::1]:5".parse().unwrap());
        assert_eq!(v6.family, AF_INET6);
        assert_eq!(v6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn origin_destinations() {
        let mut o = Origin {
            family: AF_INET,
            dst_port: 8080u16.to_be(),
            ..Default::default()
        };
        o.dst_addr[0] = u32::from_ne_bytes([127, 0, 0, 2]);
        assert_eq!(original_dst(&o), "127.0.0.2:8080".parse().unwrap());
        o.family = AF_INET6;
        o.dst_addr = [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([127, 0, 0, 2]),
        ];
        assert_eq!(original_dst(&o), "127.0.0.2:8080".parse().unwrap());
        o.dst_addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert_eq!(original_dst(&o), "[::1]:8080".parse().unwrap());
    }
}
