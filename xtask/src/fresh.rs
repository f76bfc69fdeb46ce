//! A fresh machine's conditions for the root tests, on any machine: each `cargo test` the root
//! run starts gets a private mount namespace in which no bpffs is mounted (not even at
//! /sys/fs/bpf), guard's default state directories, where they exist, are hidden under empty
//! ones, and the temporary directory (`TMPDIR`) is a new, empty one. What earlier runs left on
//! the host (bpffs mounted by a daemon, pins, test directories, a CA in /var/lib/guard) then
//! cannot make a test pass that would fail on a new machine. The host's mounts are untouched,
//! and every bpffs mounted inside (with the pins on it) goes away with the namespace. (/tmp
//! itself is not covered over: the checkout may live there.)

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

/// guard's default state directories (README "Configuration"): hidden when they exist.
const STATE_DIRS: &[&str] = &[
    "/run/guard",
    "/var/lib/guard",
    "/var/log/guard",
    "/etc/guard",
];

/// A new, empty temporary directory for one isolated run (world-writable, sticky, like /tmp:
/// tests run processes as other users); removed when dropped.
pub struct FreshTmp(PathBuf);

impl FreshTmp {
    pub fn new() -> Result<FreshTmp> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!(
            "guard-fresh-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777))?;
        Ok(FreshTmp(dir))
    }
}

impl Drop for FreshTmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Makes `cmd` start in a fresh private mount namespace with `tmp` as its temporary directory
/// (see the module documentation).
pub fn isolate(cmd: &mut Command, tmp: &FreshTmp) -> Result<()> {
    cmd.env("TMPDIR", &tmp.0);
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    // Deepest first, each once per time it is mounted (a second bpffs may sit on the first).
    let mut bpf: Vec<PathBuf> = mounts_of(&info, "bpf");
    bpf.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let bpf: Vec<CString> = bpf.iter().map(|p| cstr(p)).collect();
    let mut tmpfs: Vec<(CString, CString)> = Vec::new();
    for d in STATE_DIRS {
        if Path::new(d).is_dir() {
            tmpfs.push((cstr(Path::new(d)), c"mode=755".into()));
        }
    }
    let root = c"/";
    let tmpfs_type = c"tmpfs";
    // SAFETY: between fork and exec only system calls, on strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done in here propagates back to the host.
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for p in &bpf {
                check(libc::umount2(p.as_ptr(), libc::MNT_DETACH))?;
            }
            for (dir, opts) in &tmpfs {
                check(libc::mount(
                    tmpfs_type.as_ptr(),
                    dir.as_ptr(),
                    tmpfs_type.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    opts.as_ptr().cast(),
                ))?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Mount points of filesystems of type `fstype`, once per mount, in mountinfo order. (guard's
/// `kernel::cgroup` has the same reader; xtask cannot use it: it builds before guard can, since
/// it installs what guard's eBPF build needs.)
fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            (fields.get(sep + 1) == Some(&fstype)).then(|| PathBuf::from(unescape(fields[4])))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `isolate` works here (root, and a kernel that lets us make mount namespaces).
pub fn check() -> Result<()> {
    let out = {
        let tmp = FreshTmp::new()?;
        let mut c = Command::new("true");
        isolate(&mut c, &tmp)?;
        c.output()
    };
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => anyhow::bail!(
            "a fresh mount namespace for the root tests failed: {}",
            o.status
        ),
        Err(e) => Err(e).context("making a fresh mount namespace for the root tests"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root (CI): inside, no bpffs is mounted and the temporary directory is empty,
    /// whatever the host has.
    #[test]
    fn the_namespace_has_no_bpffs_and_an_empty_tmpdir() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: a mount namespace cannot be made; nothing to check");
            return;
        }
        let tmp = FreshTmp::new().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("grep -c ' - bpf ' /proc/self/mountinfo; ls -A \"$TMPDIR\" | wc -l");
        isolate(&mut cmd, &tmp).unwrap();
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n0\n");
    }

    #[test]
    fn finds_every_bpffs_mount_even_stacked() {
        let info = "\
24 1 0:21 / /sys rw - sysfs sysfs rw
30 24 0:26 / /sys/fs/bpf rw - bpf bpf rw,mode=700
31 30 0:27 / /sys/fs/bpf rw - bpf bpf rw,mode=700
40 1 0:30 / /my\\040pins rw - bpf bpf rw
";
        assert_eq!(
            mounts_of(info, "bpf"),
            vec![
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/my pins")
            ]
        );
    }
}
