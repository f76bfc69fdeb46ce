//! Containment where the kernel runs no BPF LSM programs: `guard exec` confines the command it
//! is about to exec with seccomp and, if asked, Landlock, which every process it starts
//! inherits and none can undo. Less than the LSM programs (nothing is audited; path Unix
//! sockets and descriptors received from outside stay open), and only for agents started with
//! `guard exec`:
//!
//! - a seccomp filter: socket families other than IPv4/IPv6 (the cgroup `sock_create` program
//!   decides those, and audits), Unix and netlink route are refused at `socket()` and
//!   `socketpair()`; io_uring (which makes sockets without `socket()`) and typing into the
//!   terminal (`TIOCSTI`, `TIOCLINUX`) are refused; with `scope.userns = "deny"`, new user
//!   namespaces too;
//! - with `scope.exec_confinement = "landlock"`, a Landlock domain (ABI 2+): a process in it
//!   may ptrace (attach, `/proc/PID/mem`, `process_vm_*`, `pidfd_getfd`, and READ modes:
//!   `/proc/PID/fd`, `environ`) only processes of its own domain or one nested in it, so the
//!   agent reaches its own children and nothing else; with ABI 6+ it may not signal processes
//!   outside either, nor connect to abstract Unix sockets outside (unless those are allowed).
//!
//! Both need `no_new_privs`: set-user-ID programs run without their privileges under it. Before
//! ABI 6 the domain has to handle a file access right, and such a domain forbids mount
//! operations, which sandboxes inside an agent (bubblewrap) need; from ABI 6 it handles only
//! scopes, and mounts work.

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// What `guard exec` applies, as the daemon tells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confinement {
    /// Enter a Landlock domain (process isolation; no mount operations inside).
    pub landlock: bool,
    /// Refuse abstract Unix sockets outside the agent (Landlock ABI 6+).
    pub abstract_unix: bool,
    /// Refuse new user namespaces.
    pub userns_deny: bool,
}

const SYS_LANDLOCK_CREATE_RULESET: libc::c_long = 444;
const SYS_LANDLOCK_RESTRICT_SELF: libc::c_long = 446;
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
/// Making block devices: restricted in the domain without any rule, which takes nothing from a
/// process that could not make them anyway (it needs CAP_MKNOD in the initial namespace).
const LANDLOCK_ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
const LANDLOCK_ACCESS_FS_REFER: u64 = 1 << 13;
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;

/// The Landlock ABI version of this kernel; None when Landlock is not enabled.
pub fn landlock_abi() -> Option<u32> {
    // SAFETY: the version query reads no memory.
    let r = unsafe {
        libc::syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (r > 0).then_some(r as u32)
}

/// Confines the calling thread (and what it execs) as `c` says. Call right before exec.
pub fn apply(c: &Confinement) -> Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    if c.landlock {
        landlock(c).context("entering a Landlock domain")?;
    }
    seccomp(c).context("installing the seccomp filter")?;
    Ok(())
}

fn landlock(c: &Confinement) -> Result<()> {
    let abi = match landlock_abi() {
        None => {
            bail!("Landlock is not enabled in this kernel (boot with `lsm=` listing `landlock`)")
        }
        // ABI 1 refuses every rename and link across directories in a domain.
        Some(1) => bail!("Landlock ABI 1 (Linux 5.13-5.18) would break renames across directories"),
        Some(abi) => abi,
    };
    // struct landlock_ruleset_attr: handled_access_fs, handled_access_net (ABI 4), scoped
    // (ABI 6); the size says which fields the kernel reads. With scopes (ABI 6+) the domain
    // handles no file access at all; before, it handles making block devices (which needs
    // CAP_MKNOD anyway) and REFER, granted beneath `/`: a domain that handles any file right
    // refuses REFER (renames and links across directories) unless a rule grants it.
    let (fs, scoped, size) = if abi >= 6 {
        let mut scoped = LANDLOCK_SCOPE_SIGNAL;
        if c.abstract_unix {
            scoped |= LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET;
        }
        (0, scoped, 24)
    } else {
        let size = if abi >= 4 { 16 } else { 8 };
        (
            LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_REFER,
            0,
            size,
        )
    };
    let attr: [u64; 3] = [fs, 0, scoped];
    // SAFETY: attr is valid for `size` bytes.
    let fd = unsafe { libc::syscall(SYS_LANDLOCK_CREATE_RULESET, attr.as_ptr(), size, 0u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("landlock_create_ruleset");
    }
    let fd = fd as i32;
    let result = (|| -> Result<()> {
        if fs & LANDLOCK_ACCESS_FS_REFER != 0 {
            grant_refer_beneath_root(fd)?;
        }
        // SAFETY: fd is the ruleset just made.
        if unsafe { libc::syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0u32) } != 0 {
            return Err(std::io::Error::last_os_error()).context("landlock_restrict_self");
        }
        Ok(())
    })();
    // SAFETY: fd is ours, closed once.
    unsafe { libc::close(fd) };
    result
}

/// A rule granting REFER beneath `/` (`struct landlock_path_beneath_attr`, packed).
fn grant_refer_beneath_root(ruleset: i32) -> Result<()> {
    const SYS_LANDLOCK_ADD_RULE: libc::c_long = 445;
    const LANDLOCK_RULE_PATH_BENEATH: u32 = 1;
    // SAFETY: a constant C string; the descriptor is closed below.
    let root = unsafe { libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if root < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /");
    }
    let mut attr = [0u8; 12];
    attr[..8].copy_from_slice(&LANDLOCK_ACCESS_FS_REFER.to_ne_bytes());
    attr[8..].copy_from_slice(&root.to_ne_bytes());
    // SAFETY: attr is the 12-byte packed struct the call reads.
    let r = unsafe {
        libc::syscall(
            SYS_LANDLOCK_ADD_RULE,
            ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            attr.as_ptr(),
            0u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: root is ours, closed once.
    unsafe { libc::close(root) };
    if r != 0 {
        return Err(err).context("landlock_add_rule (REFER beneath /)");
    }
    Ok(())
}

// Classic BPF, as seccomp reads it.
/// BPF_LD | BPF_W | BPF_ABS
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JGE_K: u16 = 0x05 | 0x30;
const BPF_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// `struct seccomp_data`: nr, arch, instruction pointer, then six 64-bit arguments (low words
/// first on little-endian machines).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg(n: u32) -> u32 {
    16 + 8 * n
}

#[cfg(target_arch = "x86_64")]
mod arch {
    pub const AUDIT_ARCH: u32 = 0xc000_003e;
    pub const NR_SOCKET: u32 = 41;
    pub const NR_SOCKETPAIR: u32 = 53;
    pub const NR_IOCTL: u32 = 16;
    pub const NR_CLONE: u32 = 56;
    pub const NR_UNSHARE: u32 = 272;
    pub const NR_CLONE3: u32 = 435;
    /// x32 system calls: the same numbers with this bit, refused outright.
    pub const X32_BIT: u32 = 0x4000_0000;
}

#[cfg(target_arch = "aarch64")]
mod arch {
    pub const AUDIT_ARCH: u32 = 0xc000_00b7;
    pub const NR_SOCKET: u32 = 198;
    pub const NR_SOCKETPAIR: u32 = 199;
    pub const NR_IOCTL: u32 = 29;
    pub const NR_CLONE: u32 = 220;
    pub const NR_UNSHARE: u32 = 97;
    pub const NR_CLONE3: u32 = 435;
    pub const X32_BIT: u32 = u32::MAX;
}

const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_NETLINK: u32 = 16;
const NETLINK_ROUTE: u32 = 0;
const CLONE_NEWUSER: u32 = 0x1000_0000;
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;
// The same numbers on every architecture (the generic table).
const NR_IO_URING_SETUP: u32 = 425;
const NR_IO_URING_ENTER: u32 = 426;
const NR_IO_URING_REGISTER: u32 = 427;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A jump target, resolved when the program is finished.
#[derive(Clone, Copy)]
enum To {
    Next,
    Label(&'static str),
}

struct Asm {
    insns: Vec<(Insn, To, To)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn op(&mut self, code: u16, k: u32) {
        self.insns.push((
            Insn {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            To::Next,
            To::Next,
        ));
    }

    fn jump(&mut self, code: u16, k: u32, t: To, f: To) {
        self.insns.push((
            Insn {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            t,
            f,
        ));
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }

    fn finish(self) -> Vec<Insn> {
        let at = |name: &str| {
            self.labels
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, i)| *i)
                .unwrap_or_else(|| panic!("no label {name}"))
        };
        self.insns
            .iter()
            .enumerate()
            .map(|(i, (insn, t, f))| {
                let rel = |to: &To| match to {
                    To::Next => 0,
                    To::Label(l) => {
                        let d = at(l) - i - 1;
                        u8::try_from(d).expect("a seccomp jump beyond 255 instructions")
                    }
                };
                Insn {
                    jt: rel(t),
                    jf: rel(f),
                    ..*insn
                }
            })
            .collect()
    }
}

/// The filter for `c` (see the module documentation).
pub fn filter(c: &Confinement) -> Vec<Insn> {
    use arch::*;
    use To::*;
    let mut a = Asm {
        insns: Vec::new(),
        labels: Vec::new(),
    };
    a.op(BPF_LD_W_ABS, OFF_ARCH);
    a.jump(BPF_JEQ_K, AUDIT_ARCH, Next, Label("enosys"));
    a.op(BPF_LD_W_ABS, OFF_NR);
    a.jump(BPF_JGE_K, X32_BIT, Label("enosys"), Next);
    a.jump(BPF_JEQ_K, NR_SOCKET, Label("socket"), Next);
    a.jump(BPF_JEQ_K, NR_SOCKETPAIR, Label("socketpair"), Next);
    a.jump(BPF_JEQ_K, NR_IOCTL, Label("ioctl"), Next);
    // io_uring makes sockets (IORING_OP_SOCKET) without socket(2): "not implemented", so
    // runtimes fall back to plain system calls.
    a.jump(BPF_JEQ_K, NR_IO_URING_SETUP, Label("enosys"), Next);
    a.jump(BPF_JEQ_K, NR_IO_URING_ENTER, Label("enosys"), Next);
    a.jump(BPF_JEQ_K, NR_IO_URING_REGISTER, Label("enosys"), Next);
    if c.userns_deny {
        a.jump(BPF_JEQ_K, NR_UNSHARE, Label("flags"), Next);
        a.jump(BPF_JEQ_K, NR_CLONE, Label("flags"), Next);
        // clone3 passes its flags in memory a filter cannot read: "not implemented" makes the
        // C library fall back to clone.
        a.jump(BPF_JEQ_K, NR_CLONE3, Label("enosys"), Next);
    }
    a.op(BPF_RET_K, SECCOMP_RET_ALLOW);

    a.label("socket");
    a.op(BPF_LD_W_ABS, off_arg(0));
    a.jump(BPF_JEQ_K, AF_UNIX, Label("allow"), Next);
    // IPv4 and IPv6: the cgroup sock_create program decides (and audits).
    a.jump(BPF_JEQ_K, AF_INET, Label("allow"), Next);
    a.jump(BPF_JEQ_K, AF_INET6, Label("allow"), Next);
    a.jump(BPF_JEQ_K, AF_NETLINK, Next, Label("eafnosupport"));
    a.op(BPF_LD_W_ABS, off_arg(2));
    a.jump(
        BPF_JEQ_K,
        NETLINK_ROUTE,
        Label("allow"),
        Label("eprotonosupport"),
    );

    a.label("socketpair");
    a.op(BPF_LD_W_ABS, off_arg(0));
    a.jump(BPF_JEQ_K, AF_UNIX, Label("allow"), Label("eafnosupport"));

    // Typing into a terminal (TIOCSTI) or pasting its selection (TIOCLINUX) would have the
    // user's unguarded shell run what the agent wrote.
    a.label("ioctl");
    a.op(BPF_LD_W_ABS, off_arg(1));
    a.jump(BPF_JEQ_K, TIOCSTI, Label("eperm"), Next);
    a.jump(BPF_JEQ_K, TIOCLINUX, Label("eperm"), Label("allow"));

    if c.userns_deny {
        a.label("flags");
        a.op(BPF_LD_W_ABS, off_arg(0));
        a.jump(BPF_JSET_K, CLONE_NEWUSER, Label("eperm"), Label("allow"));
    }
    a.label("allow");
    a.op(BPF_RET_K, SECCOMP_RET_ALLOW);
    a.label("eperm");
    a.op(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32);
    a.label("eafnosupport");
    a.op(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32);
    a.label("eprotonosupport");
    a.op(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPROTONOSUPPORT as u32);
    a.label("enosys");
    a.op(BPF_RET_K, SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    a.finish()
}

fn seccomp(c: &Confinement) -> Result<()> {
    let insns = filter(c);
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const Insn,
    }
    let prog = SockFprog {
        len: insns.len() as u16,
        filter: insns.as_ptr(),
    };
    const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
    // SAFETY: prog points at `insns`, alive for the call; the kernel copies the filter.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            0u32,
            &prog as *const SockFprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("seccomp(SECCOMP_SET_MODE_FILTER)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` on a system call as seccomp would (the subset of classic BPF it uses).
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_RET_K => return i.k,
                BPF_JEQ_K | BPF_JGE_K | BPF_JSET_K => {
                    let yes = match i.code {
                        BPF_JEQ_K => acc == i.k,
                        BPF_JGE_K => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += usize::from(if yes { i.jt } else { i.jf });
                }
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    const EAFNOSUPPORT: u32 = SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32;
    const EPROTONOSUPPORT: u32 = SECCOMP_RET_ERRNO | libc::EPROTONOSUPPORT as u32;
    const EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn socket(p: &[Insn], family: u64, ty: u64, protocol: u64) -> u32 {
        run(
            p,
            arch::AUDIT_ARCH,
            arch::NR_SOCKET,
            [family, ty, protocol, 0, 0, 0],
        )
    }

    #[test]
    fn sockets_outside_the_few_families_are_refused() {
        let p = filter(&Confinement {
            landlock: true,
            abstract_unix: true,
            userns_deny: false,
        });
        assert_eq!(socket(&p, 1, 1, 0), SECCOMP_RET_ALLOW);
        assert_eq!(
            socket(&p, 2, 3, 1),
            SECCOMP_RET_ALLOW,
            "inet: the cgroup program's"
        );
        assert_eq!(socket(&p, 10, 2, 0), SECCOMP_RET_ALLOW);
        assert_eq!(socket(&p, 16, 3, 0), SECCOMP_RET_ALLOW);
        assert_eq!(socket(&p, 16, 3, 9), EPROTONOSUPPORT, "netlink audit");
        assert_eq!(socket(&p, 17, 3, 0), EAFNOSUPPORT, "packet");
        assert_eq!(socket(&p, 40, 1, 0), EAFNOSUPPORT, "vsock");
        // The family's high word is not read by the kernel either.
        assert_eq!(socket(&p, (1 << 32) | 17, 3, 0), EAFNOSUPPORT);
        let call = |nr, args| run(&p, arch::AUDIT_ARCH, nr, args);
        assert_eq!(
            call(arch::NR_SOCKETPAIR, [1, 1, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            call(arch::NR_SOCKETPAIR, [30, 1, 0, 0, 0, 0]),
            EAFNOSUPPORT,
            "tipc"
        );
        for nr in [NR_IO_URING_SETUP, NR_IO_URING_ENTER, NR_IO_URING_REGISTER] {
            assert_eq!(call(nr, [0; 6]), ENOSYS);
        }
        assert_eq!(call(arch::NR_IOCTL, [0, TIOCSTI as u64, 0, 0, 0, 0]), EPERM);
        assert_eq!(
            call(arch::NR_IOCTL, [0, TIOCLINUX as u64, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            call(arch::NR_IOCTL, [0, 0x5401, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW,
            "TCGETS"
        );
        // Other system calls, other architectures.
        assert_eq!(run(&p, arch::AUDIT_ARCH, 0, [0; 6]), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, 0x4000_0003, 102, [17, 3, 0, 0, 0, 0]), ENOSYS);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            run(
                &p,
                arch::AUDIT_ARCH,
                41 | arch::X32_BIT,
                [17, 3, 0, 0, 0, 0]
            ),
            ENOSYS
        );
        // User namespaces are allowed unless denied.
        assert_eq!(
            run(
                &p,
                arch::AUDIT_ARCH,
                arch::NR_UNSHARE,
                [CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]
            ),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&p, arch::AUDIT_ARCH, arch::NR_CLONE3, [0; 6]),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn user_namespaces_can_be_denied() {
        let p = filter(&Confinement {
            landlock: false,
            abstract_unix: false,
            userns_deny: true,
        });
        let call = |nr, flags: u64| run(&p, arch::AUDIT_ARCH, nr, [flags, 0, 0, 0, 0, 0]);
        assert_eq!(
            call(arch::NR_UNSHARE, CLONE_NEWUSER as u64 | 0x4000_0000),
            EPERM
        );
        assert_eq!(
            call(arch::NR_UNSHARE, 0x0002_0000),
            SECCOMP_RET_ALLOW,
            "CLONE_NEWNS"
        );
        assert_eq!(call(arch::NR_CLONE, CLONE_NEWUSER as u64 | 17), EPERM);
        assert_eq!(
            call(arch::NR_CLONE, 0x0001_1200 | 17),
            SECCOMP_RET_ALLOW,
            "fork"
        );
        assert_eq!(call(arch::NR_CLONE3, 0), ENOSYS);
        assert_eq!(socket(&p, 17, 3, 0), EAFNOSUPPORT);
    }
}
