//! Containment, seen from the daemon: whether the kernel runs BPF LSM programs at all, the
//! containment config and Unix allow list, and attaching the per-cgroup LSM programs with pinned
//! links like the redirect's (reused, switched atomically, removed when turned off).

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use guard_common::{ContainConfig, Contained, CONTAIN_NAMES, UNIX_ALLOW_ENTRIES, UNIX_PATH_MAX};

use super::{attach::Step, Kernel};

/// Every containment program and the LSM hook it is for. At most 10 distinct hooks can be
/// attached per cgroup host-wide (`CGROUP_LSM_NUM`): guard takes eight.
pub const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("guard_ptrace_access_check", "ptrace_access_check"),
    ("guard_file_receive", "file_receive"),
    ("guard_unix_stream_connect", "unix_stream_connect"),
    ("guard_unix_may_send", "unix_may_send"),
    ("guard_socket_create", "socket_create"),
    ("guard_userns_create", "userns_create"),
    ("guard_task_kill", "task_kill"),
    ("guard_file_ioctl", "file_ioctl"),
];

/// `BPF_PROG_QUERY` attach type of per-cgroup LSM programs (`BPF_LSM_CGROUP`).
pub const LSM_CGROUP_ATTACH_TYPE: u32 = 43;

/// What the containment programs are told.
#[derive(Debug, Clone)]
pub struct ContainSettings {
    pub unix_allow_all: bool,
    pub userns_deny: bool,
    /// Bound names (as [`crate::config::unix_name`] makes them) any guarded process may reach.
    pub unix_allow: Vec<Vec<u8>>,
}

/// `LSM_ID_BPF` of the `lsm_list_modules` syscall (uapi `linux/lsm.h`).
const LSM_ID_BPF: u64 = 110;
const SYS_LSM_LIST_MODULES: libc::c_long = 461;

/// Whether BPF LSM is among the kernel's active LSMs; Err says why it could not be told.
/// Asked of `lsm_list_modules` (6.8+), else of securityfs's `lsm` file.
pub fn bpf_lsm_active() -> Result<bool> {
    let mut ids = [0u64; 32];
    let mut size = std::mem::size_of_val(&ids) as u32;
    // SAFETY: the buffer and its size are valid for the call, which writes at most `size` bytes.
    let r = unsafe {
        libc::syscall(
            SYS_LSM_LIST_MODULES,
            ids.as_mut_ptr(),
            &mut size as *mut u32,
            0u32,
        )
    };
    if r >= 0 {
        return Ok(ids.iter().take(r as usize).any(|&id| id == LSM_ID_BPF));
    }
    let path = "/sys/kernel/security/lsm";
    match fs::read_to_string(path) {
        Ok(list) => Ok(list.trim().split(',').any(|l| l == "bpf")),
        Err(e) => Err(anyhow!(
            "cannot tell the active LSMs: lsm_list_modules failed ({}) and {path}: {e}",
            std::io::Error::last_os_error()
        )),
    }
}

impl Kernel {
    /// Writes the containment config and allow list, then attaches the LSM programs at `cgroup`
    /// with pinned links. Before this, and with the config not ready, the programs refuse
    /// nothing.
    pub fn contain(&mut self, cgroup: &Path, settings: &ContainSettings) -> Result<Attached> {
        let offsets = super::btf::contain_offsets()
            .context("finding the containment programs' fields in the kernel's BTF")?;
        self.set_unix_allow(&settings.unix_allow)?;
        let config = ContainConfig {
            unix_mode: if settings.unix_allow_all {
                guard_common::UNIX_ALLOW_ALL
            } else {
                guard_common::UNIX_ALLOW_LISTED
            },
            userns_deny: u32::from(settings.userns_deny),
            ready: 1,
            _pad0: 0,
            offsets,
        };
        self.contain_config
            .set(0, config, 0)
            .context("writing the containment config map")?;
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let cg = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let cgroup_id = super::cgroup::cgroup_id(cgroup)?;
        let mut done = Attached::default();
        for (name, hook) in LSM_PROGRAMS {
            let step = self
                .attach_one(name, Some((hook, &btf)), &cg, cgroup_id)
                .with_context(|| format!("attaching {name} ({hook})"))?;
            match step {
                Step::Attached => done.attached += 1,
                Step::Reused => done.reused += 1,
                Step::Updated => done.updated += 1,
            }
        }
        Ok(done)
    }

    /// Detaches the containment programs (containment off, or it failed part way).
    pub fn uncontain(&self) -> Result<usize> {
        let mut removed = 0;
        for (name, _) in LSM_PROGRAMS {
            for dir in ["links", "progs"] {
                let pin = self.pin_dir.join(dir).join(name);
                if pin.exists() {
                    super::attach::unpin_link(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                    removed += usize::from(dir == "links");
                }
            }
        }
        Ok(removed)
    }

    fn set_unix_allow(&self, names: &[Vec<u8>]) -> Result<()> {
        let mut map = self.unix_allow.lock().unwrap();
        let mut want = std::collections::BTreeSet::new();
        for n in names {
            if n.is_empty() || n.len() > UNIX_PATH_MAX {
                bail!(
                    "a Unix socket name of {} bytes cannot be allow-listed",
                    n.len()
                );
            }
            let mut key = [0u8; UNIX_PATH_MAX];
            key[..n.len()].copy_from_slice(n);
            want.insert(key);
        }
        if want.len() > UNIX_ALLOW_ENTRIES as usize {
            bail!(
                "scope.unix_allow names {} sockets; at most {UNIX_ALLOW_ENTRIES}",
                want.len()
            );
        }
        // Added before the old ones go, so nothing allowed in both is refused in between.
        for k in &want {
            map.insert(k, 1, 0)?;
        }
        let have: Vec<[u8; UNIX_PATH_MAX]> = map.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !want.contains(*k)) {
            map.remove(k)?;
        }
        Ok(())
    }

    /// The ring buffer the containment programs report refusals on (taken once).
    pub fn take_contained(&mut self) -> Option<RingBuf<MapData>> {
        self.contained.take()
    }

    /// Containment refusals by kind, summed over CPUs.
    pub fn contain_counters(&self) -> BTreeMap<String, u64> {
        super::per_cpu_totals(&self.contain_counters, &CONTAIN_NAMES)
    }
}

pub use super::attach::Attached;

/// A ring buffer record as the programs wrote it; None if it is not one.
pub fn parse_contained(bytes: &[u8]) -> Option<Contained> {
    if bytes.len() < std::mem::size_of::<Contained>() {
        return None;
    }
    // SAFETY: Contained is repr(C) plain data; the length was checked; read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Contained) })
}
