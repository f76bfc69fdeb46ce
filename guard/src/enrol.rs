//! Which processes are agents (`[[agents]]`): an executable (by path glob, resolved to the
//! files it names, so a symbolic link and its target are the same agent), optionally arguments
//! (for interpreters) and uids. Pure: the kernel side marks processes at exec by file
//! (`kernel::enrol`), the daemon moves them into agent cgroups (`daemon::enrol`); both ask
//! [`Rules::classify`] what a process is.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use guard_common::ExeKey;

use crate::{config::AgentEntry, policy::subject::glob};

/// A process as enrolment sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// The executable: its path as `/proc/PID/exe` tells, and its file.
    pub exe: PathBuf,
    pub file: Option<ExeKey>,
    /// Its arguments (`argv[0]` first).
    pub argv: Vec<String>,
    pub uid: u32,
}

impl Process {
    /// Read from /proc; None when it is gone (or not readable).
    pub fn read(pid: u32) -> Option<Process> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let md = std::fs::metadata(format!("/proc/{pid}/exe")).ok();
        let argv = crate::kernel::procfs::argv(pid)
            .ok()?
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        let (uid, _) = crate::kernel::procfs::ids(pid).ok()?;
        Some(Process {
            pid,
            exe,
            file: md.map(|m| exe_key(&m)),
            argv,
            uid,
        })
    }
}

/// A file as the kernel's hooks key it: inode number, and the device in the kernel's own
/// encoding (`major << 20 | minor`).
pub fn exe_key(md: &std::fs::Metadata) -> ExeKey {
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    ExeKey {
        ino: md.ino(),
        dev: (major << 20) | (minor & 0xf_ffff),
        _pad0: 0,
    }
}

/// One agent's rule, its globs resolved to files.
#[derive(Debug, Clone)]
pub struct Rule {
    pub entry: AgentEntry,
    pub files: BTreeSet<ExeKey>,
}

/// Every `[[agents]]` entry.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
}

impl Rules {
    /// The rules of `entries`, with the files their globs name now.
    pub fn resolve(entries: &[AgentEntry]) -> Rules {
        Rules {
            rules: entries
                .iter()
                .map(|e| Rule {
                    entry: e.clone(),
                    files: e
                        .exe
                        .iter()
                        .flat_map(|g| expand(g))
                        .filter_map(|p| std::fs::metadata(p).ok())
                        .filter(|m| m.is_file())
                        .map(|m| exe_key(&m))
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every file an agent's executable is: what the exec hook marks.
    pub fn files(&self) -> BTreeSet<ExeKey> {
        self.rules
            .iter()
            .flat_map(|r| r.files.iter().copied())
            .collect()
    }

    /// The agent `p` is, if any: the first entry whose executable it runs (by file, or by a
    /// path glob for a file that appeared since the globs were resolved), whose argument globs
    /// one of its arguments matches, and whose uids include its uid.
    pub fn classify(&self, p: &Process) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| r.matches(p))
            .map(|r| r.entry.name.as_str())
    }

    /// The agent a process is by its exec alone — the file it ran and its uid then: the
    /// first entry without argument globs that names the file and the uid.
    pub fn classify_exec(&self, exe: &ExeKey, uid: u32) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| {
                r.entry.argv.is_empty()
                    && r.files.contains(exe)
                    && (r.entry.uids.is_empty() || r.entry.uids.contains(&uid))
            })
            .map(|r| r.entry.name.as_str())
    }

    /// Whether an entry with argument globs names `exe` (its processes must be read).
    pub fn by_arguments(&self, exe: &ExeKey) -> bool {
        self.rules
            .iter()
            .any(|r| !r.entry.argv.is_empty() && r.files.contains(exe))
    }

    /// The uids that may start agent `name` with `guard exec` (None: any).
    pub fn uids_of(&self, name: &str) -> Option<&[u32]> {
        self.rules
            .iter()
            .find(|r| r.entry.name == name)
            .map(|r| r.entry.uids.as_slice())
            .filter(|u| !u.is_empty())
    }
}

impl Rule {
    fn matches(&self, p: &Process) -> bool {
        let by_file = p.file.is_some_and(|f| self.files.contains(&f));
        let path = p.exe.to_string_lossy();
        let by_path = self.entry.exe.iter().any(|g| glob(g, &path));
        if !(by_file || by_path) {
            return false;
        }
        let args_ok = self.entry.argv.is_empty()
            || p.argv
                .iter()
                .skip(1)
                .any(|a| self.entry.argv.iter().any(|g| glob(g, a)));
        args_ok && (self.entry.uids.is_empty() || self.entry.uids.contains(&p.uid))
    }
}

/// The paths an absolute glob names now: each component with a `*` is matched against the
/// entries of its directory (a `*` there stays within the component).
pub fn expand(pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    for part in pattern.split('/').filter(|p| !p.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            if part.contains('*') {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| glob(part, n))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| dir.join(n)));
            } else {
                let p = dir.join(part);
                if Path::new(&p).exists() {
                    next.push(p);
                }
            }
        }
        found = next;
        // Bounded: a glob over a huge tree does not stall the daemon.
        found.truncate(4096);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, exe: &[&str], argv: &[&str], uids: &[u32]) -> AgentEntry {
        AgentEntry {
            name: name.into(),
            exe: exe.iter().map(|s| s.to_string()).collect(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            uids: uids.to_vec(),
        }
    }

    fn process(exe: &str, argv: &[&str], uid: u32) -> Process {
        Process {
            pid: 1,
            exe: exe.into(),
            file: None,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            uid,
        }
    }

    #[test]
    fn executables_arguments_and_uids() {
        let rules = Rules {
            rules: vec![
                Rule {
                    entry: entry(
                        "claude",
                        &["/home/*/.local/share/claude/versions/*"],
                        &[],
                        &[],
                    ),
                    files: BTreeSet::new(),
                },
                Rule {
                    entry: entry("aider", &["/usr/bin/python3*"], &["*aider*"], &[1000]),
                    files: BTreeSet::new(),
                },
            ],
        };
        let claude = process(
            "/home/ann/.local/share/claude/versions/2.1.3",
            &["claude"],
            1000,
        );
        assert_eq!(rules.classify(&claude), Some("claude"));
        let aider = process(
            "/usr/bin/python3.11",
            &["python3", "/opt/aider/main.py"],
            1000,
        );
        assert_eq!(rules.classify(&aider), Some("aider"));
        // The same interpreter running something else, or as another uid: not an agent.
        let other = process("/usr/bin/python3.11", &["python3", "server.py"], 1000);
        assert_eq!(rules.classify(&other), None);
        let as_bob = process("/usr/bin/python3.11", &["python3", "aider"], 1001);
        assert_eq!(rules.classify(&as_bob), None);
        // argv[0] is the program's own name, which its caller picks: not an argument.
        let renamed = process("/usr/bin/python3.11", &["aider", "x.py"], 1000);
        assert_eq!(rules.classify(&renamed), None);
        assert_eq!(rules.uids_of("aider"), Some(&[1000][..]));
        assert_eq!(rules.uids_of("claude"), None);
    }

    #[test]
    fn a_file_matches_by_what_it_is_whatever_path_ran_it() {
        let dir = std::env::temp_dir().join(format!("guard-enrol-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("v/1.0")).unwrap();
        let bin = dir.join("v/1.0/agent");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        let link = dir.join("agent-link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&bin, &link).unwrap();
        let rules = Rules::resolve(&[entry(
            "a",
            &[&format!("{}/v/*/agent", dir.display())],
            &[],
            &[],
        )]);
        assert_eq!(
            expand(&format!("{}/v/*/agent", dir.display())),
            vec![bin.clone()]
        );
        assert_eq!(rules.files().len(), 1);
        let md = std::fs::metadata(&link).unwrap();
        let p = Process {
            pid: 1,
            exe: "/elsewhere/agent".into(),
            file: Some(exe_key(&md)),
            argv: vec![],
            uid: 0,
        };
        assert_eq!(rules.classify(&p), Some("a"));
        // By the exec alone: the file and the uid the kernel recorded.
        let key = exe_key(&md);
        assert_eq!(rules.classify_exec(&key, 1000), Some("a"));
        assert!(!rules.by_arguments(&key));
        let other = ExeKey {
            ino: key.ino + 1,
            ..key
        };
        assert_eq!(rules.classify_exec(&other, 1000), None);
        let by_args = Rules {
            rules: vec![Rule {
                entry: entry("py", &["/x"], &["*agent*"], &[]),
                files: [key].into(),
            }],
        };
        assert_eq!(by_args.classify_exec(&key, 0), None);
        assert!(by_args.by_arguments(&key));
        assert!(expand("/no/such/dir/*").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
