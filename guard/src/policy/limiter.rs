//! Sliding-window rate-limit state, shared by every connection of the proxy.
//!
//! Each counter keeps the instants of the calls it counted within its window (a sliding log), so
//! a window really slides: a call is counted for exactly `window` after it was made, whatever the
//! calendar says. Counters are keyed by (server, rule, scope key), so a reloaded policy keeps the
//! counts of the rules it did not change.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Caller, Scope};

/// One compiled rate limit.
#[derive(Debug, Clone)]
pub(super) struct Limit {
    /// The rule name, e.g. `tools.x.rate_limit` or `all_tools.limits[0]`.
    pub name: Arc<str>,
    pub max: u64,
    pub window: Duration,
    pub scope: Scope,
    /// PolicyLayer's `counter` label, if any (shown in the reason).
    pub label: Option<String>,
}

impl Limit {
    pub fn reason(&self, retry_after_s: u64) -> String {
        let scope = match self.scope {
            Scope::Session => "per agent instance",
            Scope::Agent => "per agent",
            Scope::Uid => "per uid",
            Scope::Global => "in total",
        };
        let label = match &self.label {
            Some(l) => format!(" ({l})"),
            None => String::new(),
        };
        format!(
            "rate limit{label} of {} calls per {}s {scope} reached; retry in {retry_after_s}s",
            self.max,
            self.window.as_secs()
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ScopeKey {
    Session(String),
    Agent(String),
    Uid(u32),
    Global,
}

impl ScopeKey {
    fn of(scope: Scope, caller: &Caller) -> ScopeKey {
        let by_agent = || match &caller.agent {
            Some(a) => ScopeKey::Agent(a.clone()),
            None => ScopeKey::Uid(caller.uid),
        };
        match scope {
            // Per agent instance: an MCP session id is the client's word, and a new session
            // would start a new count. Within the caller's own name and uid, so an instance
            // number names no one else's budget.
            Scope::Session => match caller.instance {
                Some(i) => {
                    let who = match &caller.agent {
                        Some(a) => format!("agent:{a}"),
                        None => format!("uid:{}", caller.uid),
                    };
                    ScopeKey::Session(format!("{who}/uid:{}/instance:{i}", caller.uid))
                }
                None => by_agent(),
            },
            Scope::Agent => by_agent(),
            Scope::Uid => ScopeKey::Uid(caller.uid),
            Scope::Global => ScopeKey::Global,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    server: Arc<str>,
    rule: Arc<str>,
    scope: ScopeKey,
}

#[derive(Debug, Default)]
struct Counter {
    window: Duration,
    hits: VecDeque<Instant>,
}

impl Counter {
    fn prune(&mut self, now: Instant) {
        while let Some(&t) = self.hits.front() {
            if now.saturating_duration_since(t) >= self.window {
                self.hits.pop_front();
            } else {
                break;
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    counters: HashMap<Key, Counter>,
    ops: u64,
}

/// A counter as saved in the state directory, with wall-clock times (instants do not survive
/// a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedCounter {
    pub server: String,
    pub rule: String,
    /// `session:ID`, `agent:NAME`, `uid:N` or `global`.
    pub scope: String,
    pub window_ms: u64,
    /// Milliseconds since the Unix epoch of each counted call still in the window.
    pub hits_ms: Vec<u64>,
}

impl ScopeKey {
    fn encode(&self) -> String {
        match self {
            ScopeKey::Session(s) => format!("session:{s}"),
            ScopeKey::Agent(a) => format!("agent:{a}"),
            ScopeKey::Uid(u) => format!("uid:{u}"),
            ScopeKey::Global => "global".into(),
        }
    }

    fn decode(s: &str) -> Option<ScopeKey> {
        if s == "global" {
            return Some(ScopeKey::Global);
        }
        let (kind, v) = s.split_once(':')?;
        match kind {
            "session" => Some(ScopeKey::Session(v.into())),
            "agent" => Some(ScopeKey::Agent(v.into())),
            "uid" => v.parse().ok().map(ScopeKey::Uid),
            _ => None,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often (in consuming calls) counters with nothing left in their window are dropped.
const SWEEP_EVERY: u64 = 4096;

/// Sliding-window rate-limit state (interior mutability; `Send + Sync`; share it with `Arc`).
#[derive(Default)]
pub struct RateLimiter {
    inner: Mutex<Inner>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("counters", &self.len())
            .finish()
    }
}

/// A limit that refused a call.
pub(super) struct Exceeded<'a> {
    pub limit: &'a Limit,
    pub retry_after_s: u64,
}

impl RateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live counters (for status output and tests).
    pub fn len(&self) -> usize {
        self.lock().counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every count.
    pub fn clear(&self) {
        self.lock().counters.clear();
    }

    /// Drops counters with no call left in their window.
    pub fn sweep(&self, now: Instant) {
        let mut inner = self.lock();
        inner.counters.retain(|_, c| {
            c.prune(now);
            !c.hits.is_empty()
        });
    }

    /// How many calls were counted since start: a change means the state is worth saving.
    pub fn generation(&self) -> u64 {
        self.lock().ops
    }

    /// Every live counter, with wall-clock times (`now` and `wall` are the same moment).
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> Vec<SavedCounter> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for (k, c) in inner.counters.iter_mut() {
            c.prune(now);
            if c.hits.is_empty() {
                continue;
            }
            out.push(SavedCounter {
                server: k.server.to_string(),
                rule: k.rule.to_string(),
                scope: k.scope.encode(),
                window_ms: c.window.as_millis() as u64,
                hits_ms: c
                    .hits
                    .iter()
                    .map(|h| unix_ms(wall - now.saturating_duration_since(*h)))
                    .collect(),
            });
        }
        out
    }

    /// Puts saved counters back (calls older than their window are dropped).
    pub fn restore(&self, saved: &[SavedCounter], now: Instant, wall: SystemTime) {
        let wall_ms = unix_ms(wall);
        let mut inner = self.lock();
        for s in saved {
            let Some(scope) = ScopeKey::decode(&s.scope) else {
                continue;
            };
            let window = Duration::from_millis(s.window_ms);
            let mut hits: VecDeque<Instant> = s
                .hits_ms
                .iter()
                .filter(|ms| **ms <= wall_ms && wall_ms - **ms < s.window_ms)
                .filter_map(|ms| now.checked_sub(Duration::from_millis(wall_ms - ms)))
                .collect();
            if hits.is_empty() {
                continue;
            }
            hits.make_contiguous().sort();
            let key = Key {
                server: s.server.as_str().into(),
                rule: s.rule.as_str().into(),
                scope,
            };
            inner.counters.insert(key, Counter { window, hits });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent across a panic elsewhere (each update is one push), so a
        // poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks every limit for this caller; when all pass and `consume` is set, counts the call
    /// against each of them (all or nothing). When some refuse, reports the one that frees up
    /// last, since the call can only pass when all of them do.
    pub(super) fn check<'a>(
        &self,
        server: &Arc<str>,
        limits: impl Iterator<Item = &'a Limit> + Clone,
        caller: &Caller,
        now: Instant,
        consume: bool,
    ) -> Result<(), Exceeded<'a>> {
        let key = |l: &Limit| Key {
            server: server.clone(),
            rule: l.name.clone(),
            scope: ScopeKey::of(l.scope, caller),
        };
        let mut inner = self.lock();
        let mut worst: Option<Exceeded<'a>> = None;
        for limit in limits.clone() {
            let Some(counter) = inner.counters.get_mut(&key(limit)) else {
                continue;
            };
            counter.window = limit.window;
            counter.prune(now);
            let n = counter.hits.len() as u64;
            if n >= limit.max {
                // The count drops below max once the (n - max + 1) oldest calls have left.
                let pivot = counter.hits[(n - limit.max) as usize];
                let free_at = pivot + limit.window;
                let wait = free_at.saturating_duration_since(now);
                let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
                if worst.as_ref().is_none_or(|w| secs > w.retry_after_s) {
                    worst = Some(Exceeded {
                        limit,
                        retry_after_s: secs,
                    });
                }
            }
        }
        if let Some(w) = worst {
            return Err(w);
        }
        if consume {
            for limit in limits {
                let counter = inner.counters.entry(key(limit)).or_default();
                counter.window = limit.window;
                counter.hits.push_back(now);
            }
            inner.ops += 1;
            if inner.ops.is_multiple_of(SWEEP_EVERY) {
                inner.counters.retain(|_, c| {
                    c.prune(now);
                    !c.hits.is_empty()
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;

    #[test]
    fn counters_survive_a_snapshot_and_restore() {
        let lim = RateLimiter::new();
        let limit = Limit {
            name: "tools.add.rate_limit".into(),
            max: 2,
            window: Duration::from_secs(60),
            scope: Scope::Agent,
            label: None,
        };
        let server: Arc<str> = "s".into();
        let caller = Caller {
            agent: Some("bot".into()),
            ..Default::default()
        };
        let t0 = Instant::now();
        assert!(lim
            .check(&server, std::iter::once(&limit), &caller, t0, true)
            .is_ok());
        assert!(lim
            .check(&server, std::iter::once(&limit), &caller, t0, true)
            .is_ok());
        let wall = SystemTime::now();
        let saved = lim.snapshot(t0, wall);
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].scope, "agent:bot");
        // A new process: a later instant, the same wall clock moved on by 5 s.
        let fresh = RateLimiter::new();
        let t1 = Instant::now() + Duration::from_secs(5);
        fresh.restore(&saved, t1, wall + Duration::from_secs(5));
        let e = fresh
            .check(&server, std::iter::once(&limit), &caller, t1, true)
            .expect_err("the restored count still refuses");
        assert!((54..=56).contains(&e.retry_after_s), "{}", e.retry_after_s);
        // Calls older than the window are not restored.
        let later = RateLimiter::new();
        later.restore(&saved, t1, wall + Duration::from_secs(61));
        assert!(later.is_empty());
    }
}
