//! The kernel side, seen from the daemon: loading guard's eBPF programs ([`Kernel::load`]), the
//! maps that say who is guarded and where their connections were going, attaching with pinned
//! links ([`attach`]), marking agents at exec ([`enrol`]), the raw bpf calls ([`sys`]) and cgroupfs ([`cgroup`]). Nothing here knows
//! HTTP or MCP.

mod attach;
pub mod btf;
pub mod cgroup;
pub mod confine;
pub mod contain;
pub mod enrol;
pub mod exec_events;
pub mod procfs;
pub mod sys;

pub use attach::{attached_programs, unpin_all, Attached};

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    Ebpf, EbpfLoader,
};
use guard_common::{
    ClientKey, Config as KConfig, ExeOffsets, ExemptPorts, Origin, AF_INET, AF_INET6,
    COUNTER_NAMES, EXEMPT_MAX_PORTS,
};

use crate::{config::ExemptRule, net::canonical_addr};

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
    ("guard_sock_create", "sock_create", 2),
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
    contain_config: Array<MapData, guard_common::ContainConfig>,
    unix_allow: Mutex<HashMap<MapData, [u8; guard_common::UNIX_PATH_MAX], u32>>,
    contain_counters: PerCpuArray<MapData, u64>,
    contained: Option<RingBuf<MapData>>,
    enrol: enrol::EnrolMaps,
    /// Kept so the freshly loaded programs stay valid until attached and pinned.
    ebpf: Ebpf,
}

/// Mounts bpffs at the parent of `pin_dir` when that directory is not on a bpffs yet, then creates
/// `pin_dir` (mode 0700).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let on_bpffs = || -> Result<bool> {
        let info = fs::read_to_string("/proc/self/mountinfo")?;
        let mounts = cgroup::mounts_of(&info, "bpf");
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

/// Whether the kernel is locked down for confidentiality (no reading of kernel memory by BPF),
/// as far as securityfs tells.
fn confidentiality_lockdown() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lockdown")
        .is_ok_and(|s| s.contains("[confidentiality]"))
}

impl Kernel {
    /// Loads the object with its maps pinned under `pin_dir` (reusing pinned maps from an earlier
    /// run), and writes `settings`. Programs are not attached yet: see [`Kernel::attach`].
    pub fn load(pin_dir: &Path, settings: Settings) -> Result<Kernel> {
        ensure_bpffs(pin_dir)?;
        // Executables are identified by the kernel (inode and device, read at connect) unless
        // the kernel cannot tell the offsets or refuses reading its memory.
        let exe = match btf::exe_offsets() {
            Ok(o) if !confidentiality_lockdown() => o,
            Ok(_) => {
                tracing::warn!("the kernel is locked down for confidentiality: executables are not identified, and `exes` grants never apply");
                ExeOffsets::default()
            }
            Err(e) => {
                tracing::warn!(
                    "{e:#}: executables are not identified, and `exes` grants never apply"
                );
                ExeOffsets::default()
            }
        };
        let load = |exe_read: u32| {
            EbpfLoader::new()
                .default_map_pin_directory(pin_dir)
                .override_global("EXE_READ", &exe_read, true)
                .load(EBPF_OBJECT)
        };
        let (mut ebpf, exe) = match load(exe.known) {
            Ok(e) => (e, exe),
            Err(e) if exe.known != 0 => {
                tracing::warn!("loading with executable identification failed ({e}); loading without: `exes` grants never apply");
                let e = load(0).context(
                    "loading guard's eBPF object (needs root, and a kernel with BPF and BTF)",
                )?;
                (e, ExeOffsets::default())
            }
            Err(e) => {
                return Err(e).context(
                    "loading guard's eBPF object (needs root, and a kernel with BPF and BTF)",
                )
            }
        };
        let mut config: Array<MapData, KConfig> = take_map(&mut ebpf, guard_common::MAP_CONFIG)?;
        let kconfig = KConfig {
            host_netns_cookie: settings.host_netns_cookie,
            daemon_cgroup_id: settings.daemon_cgroup_id,
            proxy_port: settings.proxy_port,
            _pad0: 0,
            udp_mode: settings.udp_mode,
            attach_level: settings.attach_level,
            ready: 1,
            exe,
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
            contain_config: take_map(&mut ebpf, guard_common::MAP_CONTAIN_CONFIG)?,
            unix_allow: Mutex::new(take_map(&mut ebpf, guard_common::MAP_UNIX_ALLOW)?),
            contain_counters: take_map(&mut ebpf, guard_common::MAP_CONTAIN_COUNTERS)?,
            contained: Some(take_map(&mut ebpf, guard_common::MAP_CONTAINED)?),
            enrol: enrol::EnrolMaps::take(&mut ebpf)?,
            ebpf,
        })
    }

    pub fn config(&self) -> Result<KConfig> {
        Ok(self.config.get(&0, 0)?)
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
        per_cpu_totals(&self.counters, &COUNTER_NAMES)
    }
}

/// A per-CPU counter array summed over CPUs, slot `i` named `names[i]`.
fn per_cpu_totals(map: &PerCpuArray<MapData, u64>, names: &[&str]) -> BTreeMap<String, u64> {
    (0..names.len() as u32)
        .map(|i| {
            let total = map
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (names[i as usize].to_string(), total)
        })
        .collect()
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
    match canonical_addr(client) {
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
    canonical_addr(SocketAddr::new(addr, port))
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
