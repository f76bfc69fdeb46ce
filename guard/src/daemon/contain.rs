//! Containment at start (on, or off and why: loudly, or no start under `require`) and the
//! `contained` audit records of what the kernel refused guarded processes.

use std::{path::Path, sync::Arc};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;

use super::Daemon;
use crate::{
    audit::{AgentRef, Decision, Event},
    config::{unix_name, Config, ContainmentMode, ExecConfinement, UnixMode, UsernsMode},
    kernel::{
        confine::{self, Confinement},
        contain::{bpf_lsm_active, parse_contained, ContainSettings},
        Kernel,
    },
    proxy::identify::{attributed, Seen},
};

/// Whether containment is on, and if not, why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Containment {
    /// `on` (the BPF LSM programs), `partial` (no BPF LSM: `guard exec` confines its agents
    /// with Landlock and seccomp) or `off`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Under `partial`: what `guard exec` applies, and what that covers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confine: Option<Confinement>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<&'static str>,
}

impl Containment {
    fn on() -> Containment {
        Containment {
            state: "on",
            reason: None,
            confine: None,
            covers: guard_common::CONTAIN_NAMES.to_vec(),
        }
    }

    fn off(reason: String) -> Containment {
        Containment {
            state: "off",
            reason: Some(reason),
            confine: None,
            covers: vec![],
        }
    }
}

/// Without BPF LSM: what `guard exec` confines its agents with itself, as
/// `scope.exec_confinement` says (see [`crate::kernel::confine`]); None when it says `off`.
fn partial(config: &Config, reason: &str) -> Option<Containment> {
    let wants_landlock = match config.scope.exec_confinement {
        ExecConfinement::Off => return None,
        ExecConfinement::Seccomp => false,
        ExecConfinement::Landlock => true,
    };
    // ABI 1 would refuse renames across directories: not used.
    let landlock = confine::landlock_abi().filter(|abi| wants_landlock && *abi >= 2);
    let abstract_unix = config.scope.unix == UnixMode::AllowListed
        && !config.scope.unix_allow.iter().any(|u| u.starts_with('@'));
    let confinement = Confinement {
        landlock: landlock.is_some(),
        abstract_unix: abstract_unix && landlock.is_some_and(|abi| abi >= 6),
        userns_deny: config.scope.userns == UsernsMode::Deny,
    };
    let mut covers = vec!["socket_family", "terminal_injection"];
    if landlock.is_some() {
        covers.push("process_access");
    }
    if landlock.is_some_and(|abi| abi >= 6) {
        covers.push("signal");
    }
    if confinement.abstract_unix {
        covers.push("abstract_unix_connect");
    }
    if confinement.userns_deny {
        covers.push("user_namespace");
    }
    let how = match landlock {
        Some(abi) => format!("Landlock ABI {abi} and seccomp"),
        None if wants_landlock => {
            "seccomp only (no Landlock ABI 2+ in this kernel: no process isolation)".into()
        }
        None => "seccomp (scope.exec_confinement = \"seccomp\")".into(),
    };
    Some(Containment {
        state: "partial",
        reason: Some(format!(
            "{reason}; agents started with `guard exec` are confined with {how}, covering {}: refused, not audited",
            covers.join(", ")
        )),
        confine: Some(confinement),
        covers,
    })
}

/// The bound names guarded processes may reach: `scope.unix_allow` (each path also with its
/// symlinks resolved, since a listener binds one of the two) and guard's control socket.
pub fn unix_allow_names(config: &Config) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let control = config.paths.control_socket.display().to_string();
    let stdio = config.paths.stdio_socket.display().to_string();
    for entry in config.scope.unix_allow.iter().chain([&control, &stdio]) {
        // Entries were checked when the configuration was read.
        let Ok(name) = unix_name(entry) else { continue };
        if name[0] != 0 {
            let parent = Path::new(entry)
                .parent()
                .and_then(|p| p.canonicalize().ok());
            let file = Path::new(entry).file_name();
            let real = Path::new(entry)
                .canonicalize()
                .ok()
                .or_else(|| Some(parent?.join(file?)));
            if let Some(real) = real.and_then(|r| unix_name(&r.display().to_string()).ok()) {
                if real != name {
                    out.push(real);
                }
            }
        }
        out.push(name);
    }
    out
}

/// Turns containment on at `attach` as `scope.containment` says. Under `require`, a kernel
/// without BPF LSM stops the start; under `auto` the daemon goes on with the redirect and what
/// `guard exec` can confine by itself.
pub fn start(kernel: &mut Kernel, config: &Config, attach: &Path) -> Result<Containment> {
    let why_not = match config.scope.containment {
        ContainmentMode::Off => {
            kernel.uncontain()?;
            return Ok(Containment::off("scope.containment = \"off\"".into()));
        }
        _ => match bpf_lsm_active() {
            Ok(true) => {
                let settings = ContainSettings {
                    unix_allow_all: config.scope.unix == UnixMode::Allow,
                    userns_deny: config.scope.userns == UsernsMode::Deny,
                    unix_allow: unix_allow_names(config),
                };
                match kernel.contain(attach, &settings) {
                    Ok(done) => {
                        tracing::info!(
                            attached = done.attached,
                            reused = done.reused,
                            updated = done.updated,
                            "containment is on: guarded processes cannot reach other processes, foreign sockets, unlisted Unix sockets or other socket families"
                        );
                        return Ok(Containment::on());
                    }
                    Err(e) => refused_reason(&e),
                }
            }
            Ok(false) => "BPF LSM is not active in this kernel (boot with `lsm=` listing `bpf`, e.g. lsm=lockdown,capability,landlock,bpf)".to_string(),
            Err(e) => format!("{e:#}"),
        },
    };
    // Nothing half attached stays behind.
    let _ = kernel.uncontain();
    if config.scope.containment == ContainmentMode::Require {
        bail!("containment is required (scope.containment = \"require\") but cannot be turned on: {why_not}");
    }
    match partial(config, &why_not) {
        Some(c) => {
            tracing::warn!(
                "CONTAINMENT IS PARTIAL: {}. A guarded agent can still reach Unix sockets by path and use sockets it receives from outside; processes guarded by uid or cgroup without `guard exec` get none of it",
                c.reason.as_deref().unwrap_or("")
            );
            Ok(c)
        }
        None => {
            tracing::warn!(
                "CONTAINMENT IS OFF: {why_not}. Only the redirect is enforced: a guarded agent can still use unguarded processes of its uid, sockets made outside the guard, Unix sockets to local helpers, and packet or vsock sockets (scope.exec_confinement = \"landlock\" has `guard exec` confine its agents itself)"
            );
            Ok(Containment::off(why_not))
        }
    }
}

/// Why loading or attaching the LSM programs failed, in words a person can act on.
fn refused_reason(e: &anyhow::Error) -> String {
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    }) || format!("{e:#}").contains("Operation not permitted");
    if denied {
        format!(
            "the kernel refuses BPF LSM programs: BPF_PROG_LOAD answers EPERM before verification, as kernels that forbid BPF trampolines do (fentry programs are refused the same way); use a kernel that allows them ({e:#})"
        )
    } else {
        format!("{e:#}")
    }
}

impl Daemon {
    /// Writes a `contained` record for every refusal the kernel reports, as long as the daemon
    /// runs.
    pub(super) async fn report_contained(
        self: Arc<Self>,
        ring: aya::maps::RingBuf<aya::maps::MapData>,
    ) {
        // SAFETY: the ring buffer owns its map's descriptor, and the AsyncFd owns the ring
        // buffer: the descriptor stays open and the same for the AsyncFd's whole life.
        let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("reading containment refusals: {e}; they are counted, not audited");
                return;
            }
        };
        loop {
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            let ring = ready.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(c) = parse_contained(&item) {
                    batch.push(c);
                }
            }
            ready.clear_ready();
            for c in batch {
                self.audit_contained(&c);
            }
        }
    }

    fn audit_contained(&self, c: &guard_common::Contained) {
        let what = guard_common::CONTAIN_NAMES
            .get(c.kind as usize)
            .copied()
            .unwrap_or("unknown");
        let identity = attributed(
            &self.agents,
            Seen {
                pid: c.pid,
                tgid: c.tgid,
                uid: c.uid,
                gid: c.gid,
                comm: &c.comm,
                cgroup_id: c.cgroup_id,
                agent_cgroup_id: c.guard_cgroup_id,
            },
        );
        let mut r = self.audit.record(Event::Contained, Decision::Deny);
        r.agent = Some(AgentRef::from(&identity));
        r.rule = Some(format!("containment.{what}"));
        r.reason = Some(contained_reason(c, what));
        r.detail = Some(contained_detail(c, what));
        if let Err(e) = self.audit.write(&r) {
            tracing::warn!("writing a contained record: {e:#}");
        }
    }
}

/// A Unix listener's bound name as people write it: the path, or `@name` when abstract.
pub fn unix_display(name: &[u8]) -> String {
    let name = match name.iter().rposition(|b| *b != 0) {
        Some(end) => &name[..=end],
        None => return String::new(),
    };
    match name.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => String::from_utf8_lossy(name).into_owned(),
    }
}

fn contained_detail(c: &guard_common::Contained, what: &str) -> serde_json::Value {
    let mut d = json!({"what": what, "errno": c.errno});
    match c.kind {
        guard_common::CONTAIN_PTRACE => {
            d["target_pid"] = json!(c.detail[0]);
            d["ptrace_mode"] = json!(c.detail[1]);
        }
        guard_common::CONTAIN_FOREIGN_SOCKET => d["family"] = json!(family_name(c.detail[0])),
        guard_common::CONTAIN_UNIX => {
            let n = (c.name_len as usize).min(c.name.len());
            d["path"] = json!(unix_display(&c.name[..n]));
        }
        guard_common::CONTAIN_SOCKET_FAMILY => {
            d["family"] = json!(family_name(c.detail[0]));
            d["type"] = json!(c.detail[1]);
            d["protocol"] = json!(c.detail[2]);
        }
        guard_common::CONTAIN_SIGNAL => {
            d["target_pid"] = json!(c.detail[0]);
            d["signal"] = json!(c.detail[1]);
        }
        guard_common::CONTAIN_TERMINAL => d["ioctl"] = json!(format!("{:#x}", c.detail[0])),
        _ => {}
    }
    d
}

fn contained_reason(c: &guard_common::Contained, what: &str) -> String {
    match c.kind {
        guard_common::CONTAIN_PTRACE => format!(
            "access to process {} outside the agent (ptrace, its memory or its descriptors) refused",
            c.detail[0]
        ),
        guard_common::CONTAIN_FOREIGN_SOCKET => {
            "a socket made outside the agent was not let in (SCM_RIGHTS or pidfd_getfd)".into()
        }
        guard_common::CONTAIN_UNIX => {
            let n = (c.name_len as usize).min(c.name.len());
            format!(
                "Unix socket {} is neither the agent's own nor in scope.unix_allow",
                unix_display(&c.name[..n])
            )
        }
        guard_common::CONTAIN_SOCKET_FAMILY => format!(
            "{} sockets (type {}, protocol {}) are not for guarded processes",
            family_name(c.detail[0]),
            c.detail[1],
            c.detail[2]
        ),
        guard_common::CONTAIN_USERNS => {
            "user namespaces are off for guarded processes (scope.userns = \"deny\")".into()
        }
        guard_common::CONTAIN_SIGNAL => format!(
            "signal {} to process {} outside the agent refused",
            c.detail[1], c.detail[0]
        ),
        guard_common::CONTAIN_TERMINAL => {
            "typing into a terminal (TIOCSTI/TIOCLINUX) refused".into()
        }
        _ => format!("{what} refused"),
    }
}

fn family_name(family: u32) -> String {
    match family {
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        40 => "AF_VSOCK".into(),
        38 => "AF_ALG".into(),
        n => format!("family {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_names_read_as_written() {
        assert_eq!(unix_display(b"/run/x.sock\0\0\0"), "/run/x.sock");
        assert_eq!(unix_display(b"\0abstract\0\0"), "@abstract");
        assert_eq!(unix_display(b""), "");
    }

    #[test]
    fn allow_names_include_resolved_paths_and_the_control_socket() {
        let dir = std::env::temp_dir().join(format!("guard-unix-allow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Dir(dir);
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let mut config = Config::default();
        config.scope.unix_allow = vec![
            dir.path().join("link/s.sock").display().to_string(),
            "@name".into(),
        ];
        config.paths.control_socket = "/run/guard/guard.sock".into();
        let names = unix_allow_names(&config);
        let has = |s: &str| names.contains(&unix_name(s).unwrap());
        assert!(
            has("/run/guard/stdio.sock"),
            "guard wrap reaches the daemon"
        );
        assert!(has(&dir.path().join("link/s.sock").display().to_string()));
        assert!(has(&real
            .canonicalize()
            .unwrap()
            .join("s.sock")
            .display()
            .to_string()));
        assert!(names.contains(&b"\0name".to_vec()));
        assert!(has("/run/guard/guard.sock"));
    }

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
