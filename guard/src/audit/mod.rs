//! The audit trail: one JSON object per line ([`Record`]), written and flushed before the
//! decision it records takes effect on the wire, rotated by size.

mod record;

pub use record::{rfc3339, AgentRef, Decision, Event, Record, ServerRef};

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};

/// What [`Audit::observe`] calls with every record written.
type Observer = Box<dyn Fn(&Record) + Send + Sync>;

pub struct Audit {
    path: PathBuf,
    file: Mutex<Open>,
    seq: AtomicU64,
    /// This process's id, part of every record id (read once: it is a syscall).
    pid: u32,
    rotation: Rotation,
    /// Called with every record written (the daemon's metrics count them there).
    observer: Option<Observer>,
}

struct Open {
    file: File,
    size: u64,
}

/// Rotate when the log exceeds `max_size` bytes; keep `keep` old files (`audit.jsonl.1` newest).
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_size: u64,
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_size: 100 << 20,
            keep: 5,
        }
    }
}

fn open_log(path: &Path) -> Result<Open> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening the audit log {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(Open { file, size })
}

impl Audit {
    /// Opens (creating, mode 0640) the append-only log at `path`, rotated by size.
    pub fn open(path: &Path) -> Result<Audit> {
        Audit::open_rotating(path, Rotation::default())
    }

    pub fn open_rotating(path: &Path, rotation: Rotation) -> Result<Audit> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Audit {
            path: path.to_path_buf(),
            file: Mutex::new(open_log(path)?),
            seq: AtomicU64::new(0),
            pid: std::process::id(),
            rotation,
            observer: None,
        })
    }

    /// Calls `f` with every record once it is written.
    pub fn observe(mut self, f: impl Fn(&Record) + Send + Sync + 'static) -> Audit {
        self.observer = Some(Box::new(f));
        self
    }

    /// `audit.jsonl` -> `.1` -> `.2` ... (the oldest beyond `keep` is removed), then a new file.
    fn rotate(&self, open: &mut Open) -> Result<()> {
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        let _ = fs::remove_file(name(self.rotation.keep));
        for i in (1..self.rotation.keep).rev() {
            let _ = fs::rename(name(i), name(i + 1));
        }
        if self.rotation.keep > 0 {
            fs::rename(&self.path, name(1))?;
        } else {
            fs::remove_file(&self.path)?;
        }
        *open = open_log(&self.path)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new record with its time and a unique id filled in.
    pub fn record(&self, event: Event, decision: Decision) -> Record {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut r = Record::new(event, decision);
        r.ts = rfc3339(now.as_secs(), now.subsec_micros());
        r.id = format!("{:x}-{:x}-{seq:x}", now.as_micros(), self.pid);
        r
    }

    /// Appends `record` as one line; returns once the kernel has it (one `write`), so a crash
    /// after a decision never loses that decision's record.
    pub fn write(&self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut open = self.file.lock().unwrap();
        if open.size > 0 && open.size + line.len() as u64 > self.rotation.max_size {
            if let Err(e) = self.rotate(&mut open) {
                tracing::error!("rotating the audit log {}: {e:#}", self.path.display());
            }
        }
        open.file
            .write_all(&line)
            .with_context(|| format!("writing the audit log {}", self.path.display()))?;
        open.size += line.len() as u64;
        drop(open);
        if let Some(f) = &self.observer {
            f(record);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(1_795_000_000, 12), "2026-11-18T11:06:40.000012Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn records_are_lines_with_unique_ids() {
        let dir = std::env::temp_dir().join(format!("guard-audit-test-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let audit = Audit::open(&path).unwrap();
        let mut a = audit.record(Event::Connection, Decision::Pass);
        a.original_dst = Some("127.0.0.2:80".into());
        let b = audit.record(Event::Connection, Decision::Pass);
        assert_ne!(a.id, b.id);
        audit.write(&a).unwrap();
        audit.write(&b).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![a, b]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = std::env::temp_dir().join(format!("guard-audit-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let audit = Audit::open_rotating(
            &path,
            Rotation {
                max_size: 400,
                keep: 2,
            },
        )
        .unwrap();
        for _ in 0..20 {
            let r = audit.record(Event::Connection, Decision::Pass);
            audit.write(&r).unwrap();
        }
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, vec!["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]);
        for f in &files {
            let len = fs::metadata(dir.join(f)).unwrap().len();
            assert!(len <= 400, "{f} has {len} bytes");
            // Whole records only.
            for line in fs::read_to_string(dir.join(f)).unwrap().lines() {
                serde_json::from_str::<Record>(line).unwrap();
            }
        }
        fs::remove_dir_all(dir).unwrap();
    }
}
