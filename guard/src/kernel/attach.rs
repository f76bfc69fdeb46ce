//! Attaching guard's programs at the attach cgroup with bpf links pinned under the pin
//! directory: reused by a restarted daemon, switched atomically to a new build's programs, and
//! removed by `guard disable` and uninstall.

use std::{collections::BTreeMap, fs, os::fd::AsFd, os::fd::AsRawFd, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode,
};

use super::{
    contain::{LSM_CGROUP_ATTACH_TYPE, LSM_PROGRAMS},
    sys::{link_cgroup_id, link_update, prog_query},
    Kernel, PROGRAMS,
};

/// What attaching one program did.
pub(super) enum Step {
    Attached,
    Reused,
    Updated,
}

impl Kernel {
    /// Attaches every program at `cgroup` with a pinned link. A pinned link from an earlier run
    /// keeps enforcing (no gap, no duplicate); when its program is not this build's (an upgrade),
    /// the link is switched to this build's program atomically (`BPF_LINK_UPDATE`): connects are
    /// never unguarded in between.
    pub fn attach(&mut self, cgroup: &Path) -> Result<Attached> {
        let cg = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut done = Attached::default();
        let cgroup_id = super::cgroup::cgroup_id(cgroup)?;
        for (name, _, _) in PROGRAMS {
            match self.attach_one(name, None, &cg, cgroup_id)? {
                Step::Attached => done.attached += 1,
                Step::Reused => done.reused += 1,
                Step::Updated => done.updated += 1,
            }
        }
        // Links (and programs) an earlier build pinned that this one does not have: detached.
        for dir in ["links", "progs"] {
            for entry in fs::read_dir(self.pin_dir.join(dir))? {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let known = PROGRAMS.iter().any(|(p, _, _)| *p == name)
                    || LSM_PROGRAMS.iter().any(|(p, _)| *p == name)
                    || super::enrol::ENROL_PROGRAMS.iter().any(|(p, _)| *p == name);
                if !known {
                    unpin_link(&path)
                        .with_context(|| format!("removing stale pin {}", path.display()))?;
                    tracing::info!(pin = %path.display(), "stale pin of an earlier build removed");
                    done.removed += usize::from(dir == "links");
                }
            }
        }
        Ok(done)
    }

    /// Program `name`: loaded, then its pinned link reused, switched, or made. `lsm`: the hook
    /// of a per-cgroup LSM program, and the kernel BTF it is found in.
    pub(super) fn attach_one(
        &mut self,
        name: &str,
        lsm: Option<(&str, &aya::Btf)>,
        cg: &fs::File,
        cgroup_id: u64,
    ) -> Result<Step> {
        let pin = self.pin_dir.join("links").join(name);
        // The program each link runs is pinned beside it: its tag tells whether it is this
        // build's (listing programs by id would need CAP_SYS_ADMIN, which the unit drops).
        let prog_pin = self.pin_dir.join("progs").join(name);
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
        match prog {
            aya::programs::Program::CgroupSockAddr(p) => load_once(p.load())?,
            aya::programs::Program::CgroupSock(p) => load_once(p.load())?,
            aya::programs::Program::SockOps(p) => load_once(p.load())?,
            aya::programs::Program::LsmCgroup(p) => {
                let (hook, btf) = lsm.ok_or_else(|| anyhow!("program {name} has no hook"))?;
                load_once(p.load(hook, btf))?
            }
            _ => bail!("program {name} has an unexpected type"),
        }
        if pin.exists() {
            let on = link_cgroup_id(&pin)
                .with_context(|| format!("reading pinned link {}", pin.display()))?;
            if on != cgroup_id {
                // Detached (its cgroup was removed) or attached elsewhere (the attach cgroup
                // changed): it guards nothing here. Replaced by a new link below.
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
            // No program pin (a build from before they were pinned), or not the one the link
            // runs: not known to be this build's, so it is replaced.
            if pinned.is_some_and(|p| p.id() == running && p.tag() == ours) {
                return Ok(Step::Reused);
            }
            link_update(&pin, prog.fd()?.as_fd())
                .with_context(|| format!("updating pinned link {}", pin.display()))?;
            pin_program(prog, &prog_pin)?;
            tracing::info!(
                program = name,
                "pinned link switched to this build's program"
            );
            return Ok(Step::Updated);
        }
        let link: FdLink = match prog {
            aya::programs::Program::CgroupSockAddr(p) => {
                let id = p.attach(cg, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into()?
            }
            aya::programs::Program::CgroupSock(p) => {
                let id = p.attach(cg, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into()?
            }
            aya::programs::Program::SockOps(p) => {
                let id = p.attach(cg, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into()?
            }
            aya::programs::Program::LsmCgroup(p) => {
                let id = p.attach(cg)?;
                p.take_link(id)?.into()
            }
            _ => bail!("program {name} has an unexpected type"),
        };
        link.pin(&pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
        pin_program(prog, &prog_pin)?;
        Ok(Step::Attached)
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

fn load_once(r: Result<(), aya::programs::ProgramError>) -> Result<()> {
    match r {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => {
            Err(anyhow::Error::new(e).context("loading a program into the kernel (verifier)"))
        }
    }
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
    let ids = prog_query(cg.as_fd().as_raw_fd(), LSM_CGROUP_ATTACH_TYPE)
        .with_context(|| format!("querying LSM programs at {}", cgroup.display()))?;
    out.insert("lsm_cgroup".to_string(), ids);
    Ok(out)
}

/// Unpinning and dropping the last reference detaches the program (a pin that is not a link, a
/// program pin say, is just removed).
pub(super) fn unpin_link(pin: &Path) -> Result<()> {
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
