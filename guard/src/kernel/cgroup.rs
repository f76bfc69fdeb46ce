//! cgroup v2 plumbing: finding the mount, creating agent cgroups, moving processes, ids.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_mount(&info, "cgroup2").ok_or_else(|| {
        anyhow!(
            "no cgroup v2 filesystem is mounted (see /proc/self/mountinfo); guard needs cgroup v2"
        )
    })
}

/// Mount point of the first filesystem of type `fstype` in a mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mounts_of(mountinfo, fstype).into_iter().next()
}

/// Every mount point of filesystems of type `fstype` in a mountinfo text.
pub fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
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
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// The kernel's cgroup id is the inode number of the cgroup's directory on cgroup2.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading cgroup {}", path.display()))?
        .ino())
}

/// The cgroup v2 path (relative to the mount, no leading `/`) of process `pid`.
pub fn cgroup_of(pid: u32) -> Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    parse_proc_cgroup(&text).ok_or_else(|| anyhow!("process {pid} has no cgroup v2 entry"))
}

pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/').to_string())
}

/// Depth below the cgroup v2 root: `""` is 0, `"a"` is 1, `"a/b"` is 2.
pub fn level(rel: &str) -> u32 {
    let t = rel.trim_matches('/');
    if t.is_empty() {
        0
    } else {
        t.split('/').count() as u32
    }
}

/// Creates `path` (and missing parents) owned by the caller (root), mode 0755, so that only root
/// can move processes in or out.
pub fn create(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .with_context(|| format!("creating cgroup {}", path.display()))
}

pub fn move_pid(path: &Path, pid: u32) -> Result<()> {
    let procs = path.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    f.write_all(pid.to_string().as_bytes())
        .with_context(|| format!("moving process {pid} into {}", path.display()))
}

/// The processes in the cgroup itself (not below it).
pub fn procs(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether any process is left in the cgroup or below it.
pub fn populated(path: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(path.join("cgroup.events"))?;
    Ok(events.lines().any(|l| l.trim() == "populated 1"))
}

/// Removes an empty cgroup (and its empty children).
pub fn remove(path: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove(&e.path())?;
            }
        }
    }
    match fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
26 30 0:24 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:5 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        assert_eq!(
            find_mount(HYBRID, "cgroup2").unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            find_mount(UNIFIED, "cgroup2").unwrap(),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            find_mount(UNIFIED, "bpf").unwrap(),
            PathBuf::from("/sys/fs/bpf")
        );
        assert_eq!(find_mount(HYBRID, "bpf"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "1 2 0:1 / /mnt/a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(line, "cgroup2").unwrap(),
            PathBuf::from("/mnt/a b")
        );
    }

    #[test]
    fn proc_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/guard.slice/agent-a-1\n";
        assert_eq!(parse_proc_cgroup(text).unwrap(), "guard.slice/agent-a-1");
        assert_eq!(parse_proc_cgroup("0::/\n").unwrap(), "");
        assert_eq!(parse_proc_cgroup("1:cpu:/\n"), None);
    }

    #[test]
    fn levels() {
        assert_eq!(level(""), 0);
        assert_eq!(level("/"), 0);
        assert_eq!(level("guard.slice"), 1);
        assert_eq!(level("/a/b/"), 2);
    }
}
