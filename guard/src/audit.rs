//! The audit trail (SPEC §8): one JSON object per line, written and flushed before the decision it
//! records takes effect on the wire.

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
use serde::{Deserialize, Serialize};

use crate::identify::Identity;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub ts: String,
    pub id: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jsonrpc_id: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_sha256: Option<String>,
    /// Only with `audit.log_arguments = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    pub decision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Who asked for a control-plane action (uid), for `exec`, `disable`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentRef {
    pub name: Option<String>,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

impl From<&Identity> for AgentRef {
    fn from(i: &Identity) -> Self {
        AgentRef {
            name: i.agent.clone(),
            pid: i.pid,
            tgid: i.tgid,
            uid: i.uid,
            gid: i.gid,
            comm: i.comm.clone(),
            exe: i.exe.clone(),
            cgroup: i.cgroup.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerRef {
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
}

pub struct Audit {
    path: PathBuf,
    file: Mutex<Open>,
    seq: AtomicU64,
    /// This process's id, part of every record id (read once: it is a syscall).
    pid: u32,
    rotation: Rotation,
    metrics: crate::metrics::Metrics,
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
            metrics: Default::default(),
        })
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
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
    pub fn record(&self, event: &str, decision: &str) -> Record {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Record {
            ts: rfc3339(now.as_secs(), now.subsec_micros()),
            id: format!("{:x}-{:x}-{seq:x}", now.as_micros(), self.pid),
            event: event.into(),
            decision: decision.into(),
            ..Default::default()
        }
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
        self.metrics.observe(record);
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` without a date library (civil-from-days, Howard Hinnant).
pub fn rfc3339(secs: u64, micros: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        let mut a = audit.record("connection", "pass");
        a.original_dst = Some("127.0.0.2:80".into());
        let b = audit.record("connection", "pass");
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
            let r = audit.record("connection", "pass");
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
