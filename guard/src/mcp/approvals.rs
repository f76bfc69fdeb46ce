//! Human approvals: a `require_approval` call is held (the agent's request stays open) until an
//! approver answers through `guard approvals`, or its time runs out.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Result};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::identity::agent_key;

/// How a held call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Approved {
        by: u32,
    },
    Denied {
        by: u32,
        reason: String,
    },
    /// The daemon is stopping: held calls are denied, never left hanging.
    Shutdown,
}

/// What an approver sees of a held call.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Held {
    pub id: String,
    pub agent: Option<String>,
    pub uid: u32,
    pub pid: u32,
    /// The agent instance: the cgroup id its connection came from.
    pub instance: u64,
    pub server: String,
    pub tool: String,
    pub arguments: Value,
    pub args_sha256: String,
    /// Unix seconds.
    pub requested_at: u64,
    pub timeout_s: u64,
    #[serde(skip)]
    pub created: Option<Instant>,
}

struct Pending {
    held: Held,
    tx: oneshot::Sender<Verdict>,
    /// Bytes of its arguments, counted once.
    size: usize,
}

/// `approve --for`: identical calls (same agent instance of the same uid, server, tool,
/// arguments) pass until `until`. Another instance of the agent — or another process that takes
/// its name — is asked again.
struct Standing {
    agent: String,
    uid: u32,
    instance: u64,
    server: String,
    tool: String,
    args_sha256: String,
    until: Instant,
}

/// Calls one agent may have waiting for approval at once.
pub const MAX_PER_AGENT: usize = 16;
/// Calls waiting for approval at once, all agents together.
pub const MAX_HELD: usize = 256;
/// Bytes of arguments held for approval at once, all agents together ...
pub const MAX_HELD_BYTES: usize = 64 << 20;
/// ... and of one agent.
pub const MAX_HELD_BYTES_PER_AGENT: usize = 8 << 20;

/// Told of every call held (approval notifications); must not block.
pub type OnHold = Box<dyn Fn(&Held) + Send + Sync>;

#[derive(Default)]
pub struct Approvals {
    on_hold: std::sync::OnceLock<OnHold>,
    next: AtomicU64,
    pending: Mutex<HashMap<String, Pending>>,
    standing: Mutex<Vec<Standing>>,
}

impl Approvals {
    /// Whether a standing approval covers this call of `agent` (its agent key), `uid`, agent
    /// `instance` (the cgroup id its connection came from).
    pub fn standing(
        &self,
        (agent, uid, instance): (&str, u32, u64),
        server: &str,
        tool: &str,
        args_sha256: &str,
    ) -> bool {
        let now = Instant::now();
        let mut s = self.standing.lock().unwrap();
        s.retain(|a| a.until > now);
        s.iter().any(|a| {
            a.agent == agent
                && a.uid == uid
                && a.instance == instance
                && a.server == server
                && a.tool == tool
                && a.args_sha256 == args_sha256
        })
    }

    /// Holds a call; the receiver yields the verdict. Refused (why, as an error) when the agent
    /// holds [`MAX_PER_AGENT`] calls or [`MAX_HELD_BYTES_PER_AGENT`] bytes of arguments, or all
    /// agents [`MAX_HELD`] calls or [`MAX_HELD_BYTES`]: every held call is memory, an open
    /// request and a record, and no agent's held calls may take the others' room.
    pub fn request(&self, mut held: Held) -> Result<(String, oneshot::Receiver<Verdict>)> {
        let size = serde_json::to_vec(&held.arguments).map_or(0, |b| b.len());
        let mut pending = self.pending.lock().unwrap();
        let key = agent_key(&held.agent, held.uid);
        let (mut mine, mut my_bytes, mut bytes) = (0, 0, 0);
        for p in pending.values() {
            bytes += p.size;
            if agent_key(&p.held.agent, p.held.uid) == key {
                mine += 1;
                my_bytes += p.size;
            }
        }
        if mine >= MAX_PER_AGENT || my_bytes + size > MAX_HELD_BYTES_PER_AGENT {
            return Err(anyhow!(
                "agent {key} already has {mine} calls ({my_bytes} bytes of arguments) waiting for approval"
            ));
        }
        if pending.len() >= MAX_HELD || bytes + size > MAX_HELD_BYTES {
            return Err(anyhow!(
                "{} calls ({bytes} bytes of arguments) are waiting for approval already",
                pending.len()
            ));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{n}");
        held.id = id.clone();
        held.requested_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        held.created = Some(Instant::now());
        let (tx, rx) = oneshot::channel();
        let told = self.on_hold.get().map(|_| held.clone());
        pending.insert(id.clone(), Pending { held, tx, size });
        drop(pending);
        if let (Some(f), Some(h)) = (self.on_hold.get(), told) {
            f(&h);
        }
        Ok((id, rx))
    }

    /// Sets what is told of every held call (once; the daemon's notifications).
    pub fn on_hold(&self, f: OnHold) {
        let _ = self.on_hold.set(f);
    }

    /// The uid of the agent whose call is held under `id`.
    pub fn uid_of(&self, id: &str) -> Option<u32> {
        self.pending.lock().unwrap().get(id).map(|p| p.held.uid)
    }

    /// Forgets a held call (its time ran out, or the agent went away).
    pub fn remove(&self, id: &str) -> Option<Held> {
        self.pending.lock().unwrap().remove(id).map(|p| p.held)
    }

    /// The held calls, oldest first, with their age and time left.
    pub fn list(&self) -> Vec<Value> {
        let pending = self.pending.lock().unwrap();
        let mut v: Vec<&Pending> = pending.values().collect();
        v.sort_by_key(|p| p.held.created);
        v.into_iter()
            .map(|p| {
                let age = p.held.created.map(|c| c.elapsed()).unwrap_or_default();
                let mut j = serde_json::to_value(&p.held).unwrap_or(Value::Null);
                j["age_s"] = age.as_secs().into();
                j["remaining_s"] = p.held.timeout_s.saturating_sub(age.as_secs()).into();
                j
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Releases a held call; with `standing`, identical calls from the same agent pass for that long.
    pub fn approve(&self, id: &str, by: u32, standing: Option<Duration>) -> Result<Held> {
        let p = self.pending.lock().unwrap().remove(id).ok_or_else(|| {
            anyhow!("no held call with id {id} (it may have timed out or been answered)")
        })?;
        if let Some(d) = standing {
            self.standing.lock().unwrap().push(Standing {
                agent: agent_key(&p.held.agent, p.held.uid),
                uid: p.held.uid,
                instance: p.held.instance,
                server: p.held.server.clone(),
                tool: p.held.tool.clone(),
                args_sha256: p.held.args_sha256.clone(),
                until: Instant::now() + d,
            });
        }
        let _ = p.tx.send(Verdict::Approved { by });
        Ok(p.held)
    }

    pub fn deny(&self, id: &str, by: u32, reason: String) -> Result<Held> {
        let p = self.pending.lock().unwrap().remove(id).ok_or_else(|| {
            anyhow!("no held call with id {id} (it may have timed out or been answered)")
        })?;
        let _ = p.tx.send(Verdict::Denied { by, reason });
        Ok(p.held)
    }

    /// Answers every held call with [`Verdict::Shutdown`].
    pub fn shutdown(&self) -> usize {
        let drained: Vec<Pending> = self
            .pending
            .lock()
            .unwrap()
            .drain()
            .map(|(_, p)| p)
            .collect();
        let n = drained.len();
        for p in drained {
            let _ = p.tx.send(Verdict::Shutdown);
        }
        n
    }
}

/// `10m`, `90s`, `1h`, `2d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow!("`{s}` is not a duration (like 90s, 10m, 1h)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(anyhow!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tool: &str, args: &str) -> Held {
        Held {
            id: String::new(),
            agent: Some("bot".into()),
            uid: 1000,
            pid: 1,
            instance: 9,
            server: "s".into(),
            tool: tool.into(),
            arguments: serde_json::json!({}),
            args_sha256: args.into(),
            requested_at: 0,
            timeout_s: 60,
            created: None,
        }
    }

    #[test]
    fn held_calls_are_capped_per_agent_and_in_all() {
        let a = Approvals::default();
        let mut kept = Vec::new();
        for i in 0..MAX_PER_AGENT {
            kept.push(a.request(held("t", &format!("h{i}"))).unwrap());
        }
        let over = a.request(held("t", "one more")).unwrap_err().to_string();
        assert!(over.contains("already has 16 calls"), "{over}");
        // One agent's large arguments do not take the others' room.
        let mut fat = held("t", "fat");
        fat.agent = Some("fat".into());
        fat.arguments = serde_json::json!({ "x": "y".repeat(MAX_HELD_BYTES_PER_AGENT) });
        assert!(a.request(fat).is_err());
        // Another agent still has its own share.
        let mut other = held("t", "o");
        other.agent = Some("other".into());
        kept.push(a.request(other).unwrap());
        // Arguments beyond the bytes of all held calls are refused.
        let mut big = held("t", "big");
        big.agent = Some("big".into());
        big.arguments = serde_json::json!({ "x": "y".repeat(MAX_HELD_BYTES) });
        assert!(a.request(big).is_err());
        // Many agents together reach the total.
        for i in 0..MAX_HELD_BYTES / (4 << 20) {
            let mut part = held("t", &format!("part{i}"));
            part.agent = Some(format!("agent{i}"));
            part.arguments = serde_json::json!({ "x": "y".repeat((4 << 20) - 16) });
            kept.push(a.request(part).unwrap());
        }
        let mut last = held("t", "last");
        last.agent = Some("last".into());
        last.arguments = serde_json::json!({ "x": "y".repeat(1 << 20) });
        assert!(a
            .request(last)
            .unwrap_err()
            .to_string()
            .contains("waiting for approval already"));
        // A call that ends gives its place back.
        a.remove(&kept[0].0);
        assert!(a.request(held("t", "again")).is_ok());
    }

    #[tokio::test]
    async fn approve_deny_and_standing() {
        let a = Approvals::default();
        let (id, rx) = a.request(held("t", "h1")).unwrap();
        assert_eq!(a.list().len(), 1);
        a.approve(&id, 0, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(rx.await.unwrap(), Verdict::Approved { by: 0 });
        assert!(a.standing(("agent:bot", 1000, 9), "s", "t", "h1"));
        assert!(
            !a.standing(("agent:bot", 1000, 9), "s", "t", "h2"),
            "different arguments"
        );
        assert!(
            !a.standing(("agent:other", 1000, 9), "s", "t", "h1"),
            "different agent"
        );
        assert!(
            !a.standing(("agent:bot", 1001, 9), "s", "t", "h1"),
            "another uid taking the agent's name"
        );
        assert!(
            !a.standing(("agent:bot", 1000, 10), "s", "t", "h1"),
            "another instance of the agent"
        );
        assert!(a.approve(&id, 0, None).is_err(), "answered once");

        let (id, rx) = a.request(held("t", "h3")).unwrap();
        a.deny(&id, 5, "no".into()).unwrap();
        assert_eq!(
            rx.await.unwrap(),
            Verdict::Denied {
                by: 5,
                reason: "no".into()
            }
        );

        let (_, rx) = a.request(held("t", "h4")).unwrap();
        assert_eq!(a.shutdown(), 1);
        assert_eq!(rx.await.unwrap(), Verdict::Shutdown);
        assert!(a.is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 weeks").is_err());
    }
}
