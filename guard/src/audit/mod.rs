//! The audit trail: one JSON object per line ([`Record`]), written and flushed before the
//! decision it records takes effect on the wire, rotated by size.

pub mod chain;
mod record;

pub use record::{
    clip, parse_traceparent, rfc3339, AgentRef, Decision, Event, Record, ServerRef, MAX_HOST,
    MAX_TEXT,
};

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

mod flood;

use self::flood::Flood;

/// What [`Audit::observe`] calls with every record written: the record, and the line written
/// for it (its JSON object with `prev`, no newline).
type Observer = Box<dyn Fn(&Record, &[u8]) + Send + Sync>;

/// The audit trail: decision records (everything but `connection`) in the audit log, and
/// connection records in a log of their own, each with its own rotation. A flood of cheap
/// connections then rotates only connection records: it can never push decisions out.
pub struct Audit {
    decisions: Sink,
    connections: Sink,
    seq: AtomicU64,
    /// This process's id, part of every record id (read once: it is a syscall).
    pid: u32,
    /// Connection records per agent and second (the rest counted in summaries).
    flood: Mutex<Flood>,
    /// Records of requests guard refused, per agent and second (the rest counted likewise).
    refusals: Mutex<Flood>,
    health: Health,
    /// Called with every record written (the daemon's metrics count them there; OTLP export
    /// queues them).
    observers: Vec<Observer>,
}

/// One append-only JSONL file, rotated by size.
struct Sink {
    path: PathBuf,
    file: Mutex<Open>,
    rotation: Rotation,
}

struct Open {
    file: File,
    size: u64,
    /// The hash of the last line written (the chain's head; see [`chain`]).
    last: [u8; 32],
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

/// Where the two logs are and how they are kept.
#[derive(Debug, Clone)]
pub struct Settings {
    pub decisions: PathBuf,
    pub connections: PathBuf,
    pub rotation: Rotation,
    /// Connection records written per agent and second; beyond it they are counted, and a
    /// `connection_summary` record says how many were left out.
    pub connection_records_per_s: u32,
    /// Records of refused requests (denied, rate limited, over a limit, to an unreachable
    /// upstream) written per agent and second; beyond it, a `refusal_summary` counts them.
    /// Allowed calls, approvals and everything else are always written.
    pub refusal_records_per_s: u32,
}

impl Settings {
    /// `decisions`, with the connection log beside it and the defaults.
    pub fn beside(decisions: &Path) -> Settings {
        Settings {
            decisions: decisions.to_path_buf(),
            connections: connections_beside(decisions),
            rotation: Rotation::default(),
            connection_records_per_s: 20,
            refusal_records_per_s: 50,
        }
    }
}

/// The connection log's default path: `connections.jsonl` beside the audit log.
pub fn connections_beside(decisions: &Path) -> PathBuf {
    decisions.with_file_name("connections.jsonl")
}

/// Whether records can be written, for `guard status` and the metrics.
#[derive(Default)]
struct Health {
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// [`Audit::health`]: is the trail being written?
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct HealthReport {
    /// false after a failed write, true again after the next one that succeeds.
    pub ok: bool,
    pub write_failures: u64,
    pub last_error: Option<String>,
    /// Connection records left out by the per-agent limit (counted in summaries).
    pub connection_records_dropped: u64,
    /// Refusal records left out by the per-agent limit (counted in summaries).
    pub refusal_records_dropped: u64,
    /// The hash chains' heads (the last line's SHA-256): kept elsewhere, they let
    /// `guard audit verify` prove the newest records too.
    pub head: String,
    pub connections_head: String,
}

fn open_log(path: &Path) -> Result<Open> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening the audit log {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(Open {
        file,
        size,
        last: chain::head_of(path),
    })
}

impl Sink {
    fn open(path: &Path, rotation: Rotation) -> Result<Sink> {
        Ok(Sink {
            path: path.to_path_buf(),
            file: Mutex::new(open_log(path)?),
            rotation,
        })
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
        // The chain goes on in the new file.
        let last = open.last;
        *open = open_log(&self.path)?;
        open.last = last;
        Ok(())
    }

    /// Appends one record (`body`: its JSON object) as a line chained to the one before;
    /// returns once the kernel has it (one `write`), with the line (no newline).
    fn append(&self, body: &[u8]) -> Result<Vec<u8>> {
        let mut open = self.file.lock().unwrap();
        let mut line = chain::chained(&open.last, body);
        let hash = chain::hash(&line);
        line.push(b'\n');
        if open.size > 0 && open.size + line.len() as u64 > self.rotation.max_size {
            if let Err(e) = self.rotate(&mut open) {
                tracing::error!("rotating the audit log {}: {e:#}", self.path.display());
            }
        }
        open.file
            .write_all(&line)
            .with_context(|| format!("writing the audit log {}", self.path.display()))?;
        open.size += line.len() as u64;
        open.last = hash;
        line.pop();
        Ok(line)
    }

    /// The chain's head: the hash of the last line written (hex).
    fn head(&self) -> String {
        chain::hex(&self.file.lock().unwrap().last)
    }
}

impl Audit {
    /// Opens (creating, mode 0640) the audit log at `path`, with the connection log beside it
    /// and the default rotation.
    pub fn open(path: &Path) -> Result<Audit> {
        Audit::open_with(&Settings::beside(path))
    }

    pub fn open_with(s: &Settings) -> Result<Audit> {
        Ok(Audit {
            decisions: Sink::open(&s.decisions, s.rotation)?,
            connections: Sink::open(&s.connections, s.rotation)?,
            seq: AtomicU64::new(0),
            pid: std::process::id(),
            flood: Mutex::new(Flood::new(s.connection_records_per_s)),
            refusals: Mutex::new(Flood::new(s.refusal_records_per_s)),
            health: Health::default(),
            observers: Vec::new(),
        })
    }

    /// Calls `f` with every record once it is written, and the line written for it. `f` runs
    /// on the decision path: it must not block.
    pub fn observe(mut self, f: impl Fn(&Record, &[u8]) + Send + Sync + 'static) -> Audit {
        self.observers.push(Box::new(f));
        self
    }

    /// The audit log (decisions).
    pub fn path(&self) -> &Path {
        &self.decisions.path
    }

    /// The connection log.
    pub fn connections_path(&self) -> &Path {
        &self.connections.path
    }

    pub fn health(&self) -> HealthReport {
        let last_error = self.health.last_error.lock().unwrap().clone();
        HealthReport {
            ok: last_error.is_none(),
            write_failures: self.health.failures.load(Ordering::Relaxed),
            last_error,
            connection_records_dropped: self.flood.lock().unwrap().dropped_total(),
            refusal_records_dropped: self.refusals.lock().unwrap().dropped_total(),
            head: self.decisions.head(),
            connections_head: self.connections.head(),
        }
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

    /// Appends `record` as one line to its log; returns once the kernel has it (one `write`),
    /// so a crash after a decision never loses that decision's record. A connection record, or
    /// the record of a refused request, beyond its agent's share is counted instead (and Ok:
    /// the summary accounts for it; what was refused stays refused).
    pub fn write(&self, record: &Record) -> Result<()> {
        if let Some(kind) = Budget::of(record) {
            let agent = record.agent.as_ref().map(AgentRef::key).unwrap_or_default();
            let admitted = self.budget(kind).lock().unwrap().admit(&agent, record);
            match admitted {
                flood::Admit::Write(None) => {}
                flood::Admit::Write(Some(dropped)) => self.write_summary(kind, &dropped)?,
                flood::Admit::Drop => return Ok(()),
            }
        }
        self.append(record)
    }

    fn budget(&self, kind: Budget) -> &Mutex<Flood> {
        match kind {
            Budget::Connections => &self.flood,
            Budget::Requests => &self.refusals,
        }
    }

    fn append(&self, record: &Record) -> Result<()> {
        let clipped = record.clipped();
        let record = clipped.as_ref().unwrap_or(record);
        let line = serde_json::to_vec(record)?;
        let sink = match record.event {
            Event::Connection | Event::ConnectionSummary => &self.connections,
            _ => &self.decisions,
        };
        match sink.append(&line) {
            Ok(written) => {
                for f in &self.observers {
                    f(record, &written);
                }
                if self.health.last_error.lock().unwrap().take().is_some() {
                    tracing::info!("the audit log is written again");
                }
            }
            Err(e) => {
                self.health.failures.fetch_add(1, Ordering::Relaxed);
                *self.health.last_error.lock().unwrap() = Some(format!("{e:#}"));
                return Err(e);
            }
        }
        Ok(())
    }

    /// The summary record of one agent's records left out.
    fn write_summary(&self, kind: Budget, d: &flood::Dropped) -> Result<()> {
        let (event, what, then) = match kind {
            Budget::Connections => (
                Event::ConnectionSummary,
                "connection records",
                "the connections were served",
            ),
            Budget::Requests => (
                Event::RefusalSummary,
                "records of refused (or filtered) requests",
                "the requests were refused all the same",
            ),
        };
        let mut r = self.record(event, Decision::Dropped);
        r.agent = Some(d.agent.clone());
        r.reason = Some(format!(
            "{} {what} of this agent were not written (over {} a second); {then}",
            d.count, d.rate
        ));
        r.detail = Some(serde_json::json!({
            "dropped": d.count, "since": d.since, "rules": d.rules,
        }));
        self.append(&r)
    }

    /// Writes the summaries of agents whose records were left out and that have not been heard
    /// from since (called every second by the daemon).
    pub fn flush_summaries(&self) {
        for kind in [Budget::Connections, Budget::Requests] {
            let pending = self.budget(kind).lock().unwrap().take_all();
            for d in pending {
                if let Err(e) = self.write_summary(kind, &d) {
                    tracing::error!("{e:#}");
                }
            }
        }
    }
}

/// The records that count against a per-agent budget.
#[derive(Debug, Clone, Copy)]
enum Budget {
    Connections,
    /// What an agent's requests cause without a call running — refusals, filtered tools/list
    /// answers, calls held for approval and given up: the agent chooses how many there are.
    Requests,
}

impl Budget {
    fn of(r: &Record) -> Option<Budget> {
        match (r.event, r.decision) {
            (Event::Connection, _) => Some(Budget::Connections),
            (
                Event::ToolCall | Event::McpRequest | Event::Limit | Event::UpstreamError,
                Decision::Deny
                | Decision::RateLimited
                | Decision::Error
                | Decision::ToolChanged
                | Decision::ApprovalDenied
                | Decision::ApprovalTimeout,
            ) => Some(Budget::Requests),
            // Refused answers, and calls held and given up: an agent can repeat them at will.
            // A batch of tools/list requests is as many filtered answers, each one recorded.
            (Event::ToolsList, Decision::Deny | Decision::Filter) => Some(Budget::Requests),
            (Event::Approval, Decision::Pending | Decision::Timeout) => Some(Budget::Requests),
            // What the kernel refused a guarded process: as repeatable as a refused request.
            (Event::Contained, _) => Some(Budget::Requests),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_refusals_share_the_refusal_budget() {
        let r = Record::new(Event::Contained, Decision::Deny);
        assert!(matches!(Budget::of(&r), Some(Budget::Requests)));
    }

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
        let text = fs::read_to_string(audit.connections_path()).unwrap();
        let lines: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![a, b]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_flood_of_connections_never_rotates_decisions_away() {
        let dir = std::env::temp_dir().join(format!("guard-audit-flood-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut settings = Settings::beside(&dir.join("audit.jsonl"));
        // 1,000 connection records in one log would rotate this one away twice over.
        settings.rotation = Rotation {
            max_size: 64 << 10,
            keep: 1,
        };
        settings.connection_records_per_s = 5;
        let audit = Audit::open_with(&settings).unwrap();
        let mut decision = audit.record(Event::ToolCall, Decision::Deny);
        decision.tool = Some("delete_file".into());
        audit.write(&decision).unwrap();
        let agent = AgentRef {
            name: Some("flooder".into()),
            ..Default::default()
        };
        for _ in 0..1000 {
            let mut r = audit.record(Event::Connection, Decision::Pass);
            r.agent = Some(agent.clone());
            audit.write(&r).unwrap();
        }
        audit.flush_summaries();
        let decisions = fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        assert!(decisions.contains(&decision.id), "the decision is gone");
        // Only this agent's share of connection records was written, and a summary counts the
        // rest.
        let conns = fs::read_to_string(dir.join("connections.jsonl")).unwrap();
        let summaries: Vec<Record> = conns
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap())
            .filter(|r| r.event == Event::ConnectionSummary)
            .collect();
        let dropped: u64 = summaries
            .iter()
            .map(|r| r.detail.as_ref().unwrap()["dropped"].as_u64().unwrap())
            .sum();
        let written = conns.lines().count() as u64 - summaries.len() as u64;
        assert_eq!(written + dropped, 1000, "{conns}");
        assert!(dropped > 900, "{dropped}");
        assert_eq!(audit.health().connection_records_dropped, dropped);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_flood_of_refusals_is_counted_and_allowed_calls_are_always_written() {
        let dir = std::env::temp_dir().join(format!("guard-audit-refusals-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut settings = Settings::beside(&dir.join("audit.jsonl"));
        settings.refusal_records_per_s = 5;
        let audit = Audit::open_with(&settings).unwrap();
        let agent = |n: &str| AgentRef {
            name: Some(n.into()),
            ..Default::default()
        };
        let mut allowed = Vec::new();
        for i in 0..1000 {
            let mut r = audit.record(Event::ToolCall, Decision::Deny);
            r.agent = Some(agent("flooder"));
            r.rule = Some(
                if i % 2 == 0 {
                    "tools.delete_file"
                } else {
                    "protocol"
                }
                .into(),
            );
            audit.write(&r).unwrap();
            if i % 100 == 0 {
                let mut ok = audit.record(Event::ToolCall, Decision::Allow);
                ok.agent = Some(agent("flooder"));
                audit.write(&ok).unwrap();
                allowed.push(ok.id);
            }
        }
        // Another agent's refusal is its own budget's.
        let mut other = audit.record(Event::McpRequest, Decision::Deny);
        other.agent = Some(agent("other"));
        audit.write(&other).unwrap();
        audit.flush_summaries();
        let records: Vec<Record> = fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap())
            .collect();
        for id in allowed.iter().chain([&other.id]) {
            assert!(records.iter().any(|r| &r.id == id), "{id} was not written");
        }
        let denied = records
            .iter()
            .filter(|r| r.decision == Decision::Deny)
            .count() as u64;
        let summaries: Vec<&Record> = records
            .iter()
            .filter(|r| r.event == Event::RefusalSummary)
            .collect();
        let detail = |k: &str| -> u64 {
            summaries
                .iter()
                .map(|r| r.detail.as_ref().unwrap()[k].as_u64().unwrap_or(0))
                .sum()
        };
        let dropped = detail("dropped");
        assert_eq!(denied - 1 + dropped, 1000);
        assert!(dropped > 900, "{dropped}");
        let by_rule: u64 = summaries
            .iter()
            .flat_map(|r| {
                r.detail.as_ref().unwrap()["rules"]
                    .as_object()
                    .unwrap()
                    .values()
            })
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(by_rule, dropped);
        assert_eq!(audit.health().refusal_records_dropped, dropped);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_that_cannot_be_written_says_so() {
        let mut settings = Settings::beside(Path::new("/dev/full"));
        settings.connections = PathBuf::from("/dev/null");
        let audit = Audit::open_with(&settings).unwrap();
        let r = audit.record(Event::ToolCall, Decision::Allow);
        assert!(audit.write(&r).is_err(), "no record, no call");
        let h = audit.health();
        assert!(!h.ok);
        assert_eq!(h.write_failures, 1);
        assert!(h.last_error.unwrap().contains("/dev/full"));
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = std::env::temp_dir().join(format!("guard-audit-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut settings = Settings::beside(&path);
        settings.rotation = Rotation {
            max_size: 400,
            keep: 2,
        };
        let audit = Audit::open_with(&settings).unwrap();
        for _ in 0..20 {
            let r = audit.record(Event::Control, Decision::Deny);
            audit.write(&r).unwrap();
        }
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            vec![
                "audit.jsonl",
                "audit.jsonl.1",
                "audit.jsonl.2",
                "connections.jsonl"
            ]
        );
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
