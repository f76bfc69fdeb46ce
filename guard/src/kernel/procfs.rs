//! What /proc says of a process, read the one way: its parent and command name (`stat`, where
//! the name may hold spaces and parentheses), its arguments (`cmdline`), its real uid and gid
//! (`status`). Attribution and enrolment read these; none of it is a basis for deciding who is
//! guarded (the kernel's records are).

use std::io;

/// (parent pid, command name) from `/proc/PID/stat`.
pub fn stat(pid: u32) -> io::Result<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no parent pid"),
        )
    })
}

fn parse_stat(stat: &str) -> Option<(u32, String)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_string();
    // After the name: state, then the parent pid.
    let ppid = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ppid, name))
}

/// Whether `pid` is a process that still runs: one of its threads is neither a zombie nor dead.
/// A zombie keeps its `/proc` entry until it is reaped, but it can no longer be moved between
/// cgroups; a leader that ended while its other threads run shows as a zombie too, and its
/// process does run.
pub fn running(pid: u32) -> bool {
    let live = |stat: &str| parse_state(stat).is_some_and(|c| !matches!(c, 'Z' | 'X' | 'x'));
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) if live(&s) => true,
        Ok(_) => std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| live(&s))),
    }
}

fn parse_state(stat: &str) -> Option<char> {
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The arguments `/proc/PID/cmdline` holds, as exec'd (`argv[0]` first).
pub fn argv(pid: u32) -> io::Result<Vec<String>> {
    Ok(split_argv(&std::fs::read(format!("/proc/{pid}/cmdline"))?))
}

fn split_argv(b: &[u8]) -> Vec<String> {
    if b.is_empty() {
        return Vec::new();
    }
    b.strip_suffix(&[0])
        .unwrap_or(b)
        .split(|c| *c == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The real (uid, gid) from `/proc/PID/status`: who started it.
pub fn ids(pid: u32) -> io::Result<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let real = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    match (real("Uid:"), real("Gid:")) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/status has no Uid or Gid"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_names_with_spaces_and_parentheses() {
        assert_eq!(
            parse_stat("42 (a b) c)) S 7 42 42 0"),
            Some((7, "a b) c)".to_string()))
        );
        assert_eq!(parse_stat("42 (x"), None);
        assert_eq!(parse_state("42 (a) b) Z 7 42"), Some('Z'));
        assert_eq!(parse_state("42 (a)"), None);
        assert!(running(std::process::id()));
        assert!(!running(u32::MAX));
    }

    #[test]
    fn argv_as_execd() {
        assert_eq!(
            split_argv(b"python3\0x.py\0\0y\0"),
            ["python3", "x.py", "", "y"]
        );
        assert!(split_argv(b"").is_empty());
        let me = std::process::id();
        assert!(!argv(me).unwrap().is_empty());
        let (uid, _) = ids(me).unwrap();
        assert_eq!(uid, nix::unistd::getuid().as_raw());
        assert_eq!(stat(me).unwrap().0, nix::unistd::getppid().as_raw() as u32);
    }
}
