//! Field offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`), for the one walk the
//! eBPF programs make through kernel memory: from the connecting task to its executable's inode
//! ([`guard_common::ExeOffsets`]). Layouts differ between kernel builds, and aya's Rust programs
//! carry no CO-RE relocations, so the daemon finds the offsets and writes them to the config map.
//!
//! Only what that needs of the format (kernel `Documentation/bpf/btf.rst`): the type section's
//! records, struct and union members (anonymous ones searched through), names.

use anyhow::{anyhow, bail, Context as _, Result};
use guard_common::{ContainOffsets, ExeOffsets};

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// `size_or_type`: the referenced type of typedefs and modifiers.
    refers: u32,
    /// (name, type, offset) of a struct's or union's members.
    members: Vec<(u32, u32, u32)>,
}

pub struct Btf {
    /// By type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| anyhow!("BTF truncated at byte {at}"))
}

impl Btf {
    pub fn parse(b: &[u8]) -> Result<Btf> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != 0xeb9f {
            bail!("not little-endian BTF");
        }
        let hdr = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let section = |off: usize, len: usize| {
            b.get(hdr + off..hdr + off + len)
                .ok_or_else(|| anyhow!("BTF section out of bounds"))
        };
        let tb = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            refers: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < tb.len() {
            let name = u32_at(tb, at)?;
            let info = u32_at(tb, at + 4)?;
            let refers = u32_at(tb, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push((u32_at(tb, m)?, u32_at(tb, m + 4)?, u32_at(tb, m + 8)?));
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // enum, func_proto
                15 | 19 => vlen * 12, // datasec, enum64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                k => bail!("unknown BTF kind {k}"),
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                kind_flag: info >> 31 == 1,
                refers,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    /// `id` through typedefs and modifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.refers
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The byte offset of `member` in `struct name` (searching anonymous members).
    pub fn offset(&self, name: &str, member: &str) -> Result<u32> {
        let s = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT
                    && !t.members.is_empty()
                    && self.name(t.name) == name.as_bytes()
            })
            .ok_or_else(|| anyhow!("no struct {name} in the kernel's BTF"))?;
        self.find(s, member.as_bytes(), 0, 0)
            .ok_or_else(|| anyhow!("no member {member} in struct {name}"))
    }

    fn find(&self, t: &Type, member: &[u8], base_bits: u32, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for &(name, ty, off) in &t.members {
            let bits = base_bits + if t.kind_flag { off & 0xff_ffff } else { off };
            let n = self.name(name);
            if n == member {
                return bits.is_multiple_of(8).then_some(bits / 8);
            }
            if n.is_empty() {
                let inner = self.resolve(ty)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some(o) = self.find(inner, member, bits, depth + 1) {
                        return Some(o);
                    }
                }
            }
        }
        None
    }
}

/// The offsets of this kernel, from `/sys/kernel/btf/vmlinux`.
pub fn exe_offsets() -> Result<ExeOffsets> {
    let path = "/sys/kernel/btf/vmlinux";
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    exe_offsets_of(&Btf::parse(&bytes).with_context(|| format!("parsing {path}"))?)
}

pub fn exe_offsets_of(btf: &Btf) -> Result<ExeOffsets> {
    Ok(ExeOffsets {
        task_mm: btf.offset("task_struct", "mm")?,
        mm_exe_file: btf.offset("mm_struct", "exe_file")?,
        file_inode: btf.offset("file", "f_inode")?,
        inode_ino: btf.offset("inode", "i_ino")?,
        inode_sb: btf.offset("inode", "i_sb")?,
        sb_dev: btf.offset("super_block", "s_dev")?,
        known: 1,
        task_tgid: btf.offset("task_struct", "tgid")?,
    })
}

/// `task_struct.signal` and `signal_struct.live`, for the enrolment exit hook.
pub fn signal_offsets() -> Result<(u32, u32)> {
    let path = "/sys/kernel/btf/vmlinux";
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let btf = Btf::parse(&bytes).with_context(|| format!("parsing {path}"))?;
    Ok((
        btf.offset("task_struct", "signal")?,
        btf.offset("signal_struct", "live")?,
    ))
}

/// The containment programs' offsets of this kernel.
pub fn contain_offsets() -> Result<ContainOffsets> {
    let path = "/sys/kernel/btf/vmlinux";
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    contain_offsets_of(&Btf::parse(&bytes).with_context(|| format!("parsing {path}"))?)
}

pub fn contain_offsets_of(btf: &Btf) -> Result<ContainOffsets> {
    Ok(ContainOffsets {
        task_cgroups: btf.offset("task_struct", "cgroups")?,
        task_real_cred: btf.offset("task_struct", "real_cred")?,
        task_tgid: btf.offset("task_struct", "tgid")?,
        css_set_dfl_cgrp: btf.offset("css_set", "dfl_cgrp")?,
        cgroup_level: btf.offset("cgroup", "level")?,
        cgroup_ancestors: btf.offset("cgroup", "ancestors")?,
        cgroup_kn: btf.offset("cgroup", "kn")?,
        kernfs_node_id: btf.offset("kernfs_node", "id")?,
        cred_uid: btf.offset("cred", "uid")?,
        file_inode: btf.offset("file", "f_inode")?,
        file_private_data: btf.offset("file", "private_data")?,
        inode_mode: btf.offset("inode", "i_mode")?,
        socket_sk: btf.offset("socket", "sk")?,
        sock_family: btf.offset("sock", "__sk_common")?
            + btf.offset("sock_common", "skc_family")?,
        sock_cgrp_data: btf.offset("sock", "sk_cgrp_data")?
            + btf.offset("sock_cgroup_data", "cgroup")?,
        sock_uid: btf.offset("sock", "sk_uid")?,
        unix_sock_addr: btf.offset("unix_sock", "addr")?,
        unix_address_len: btf.offset("unix_address", "len")?,
        unix_address_name: btf.offset("unix_address", "name")?,
        _pad0: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernels_offsets_are_found() {
        let Ok(bytes) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            panic!("guard needs a kernel with BTF (/sys/kernel/btf/vmlinux)");
        };
        let btf = Btf::parse(&bytes).unwrap();
        let o = exe_offsets_of(&btf).unwrap();
        // Fields no build puts first.
        assert!(
            o.task_mm > 0 && o.mm_exe_file > 0 && o.file_inode > 0,
            "{o:?}"
        );
        assert!(o.inode_sb > 0 && o.sb_dev > 0, "{o:?}");
        let c = contain_offsets_of(&btf).unwrap();
        assert!(c.task_cgroups > 0 && c.css_set_dfl_cgrp > 0 && c.cgroup_ancestors > 0);
        assert!(c.sock_cgrp_data > 0 && c.unix_sock_addr > 0 && c.unix_address_name > 0);
        assert!(btf.offset("task_struct", "no_such_member").is_err());
        assert!(btf.offset("no_such_struct", "mm").is_err());
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
    }
}
