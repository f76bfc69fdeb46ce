//! Records under a flood: each agent gets so many records of a kind a second (with a burst of
//! ten seconds' worth); the rest are counted and summarised, so that a flood of cheap
//! connections, or of requests guard refuses, costs neither the disk nor the other records.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use super::{AgentRef, Record};

/// Agents tracked at most (the least recently seen are forgotten beyond it).
const MAX_AGENTS: usize = 4096;
/// Rules counted apart in a summary at most (the rest under `other`).
const MAX_RULES: usize = 32;

struct Bucket {
    agent: AgentRef,
    tokens: f64,
    last: Instant,
    dropped: u64,
    /// When the first record counted in `dropped` was left out.
    since: Option<String>,
    /// `dropped` by the records' rule.
    rules: BTreeMap<String, u64>,
}

/// What the records left out for one agent were.
pub struct Dropped {
    pub agent: AgentRef,
    pub count: u64,
    pub since: Option<String>,
    pub rate: u32,
    pub rules: BTreeMap<String, u64>,
}

pub enum Admit {
    /// Write the record; first the summary of what was left out before it, if anything.
    Write(Option<Dropped>),
    /// Leave it out (counted).
    Drop,
}

pub struct Flood {
    rate: u32,
    buckets: HashMap<String, Bucket>,
    dropped_total: u64,
}

impl Flood {
    pub fn new(rate: u32) -> Flood {
        Flood {
            rate: rate.max(1),
            buckets: HashMap::new(),
            dropped_total: 0,
        }
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    pub fn admit(&mut self, key: &str, r: &Record) -> Admit {
        let now = Instant::now();
        let burst = f64::from(self.rate) * 10.0;
        if self.buckets.len() >= MAX_AGENTS && !self.buckets.contains_key(key) {
            // Forget the agent seen longest ago (its pending count goes with it, counted).
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let b = self
            .buckets
            .entry(key.to_string())
            .or_insert_with(|| Bucket {
                agent: r.agent.clone().unwrap_or_default(),
                tokens: burst,
                last: now,
                dropped: 0,
                since: None,
                rules: BTreeMap::new(),
            });
        b.tokens =
            (b.tokens + now.duration_since(b.last).as_secs_f64() * f64::from(self.rate)).min(burst);
        b.last = now;
        if b.tokens < 1.0 {
            b.dropped += 1;
            self.dropped_total += 1;
            b.since.get_or_insert_with(|| r.ts.clone());
            let rule = r.rule.as_deref().unwrap_or("none");
            let rule = if b.rules.len() < MAX_RULES || b.rules.contains_key(rule) {
                super::clip(rule, 128).into_owned()
            } else {
                "other".to_string()
            };
            *b.rules.entry(rule).or_default() += 1;
            return Admit::Drop;
        }
        b.tokens -= 1.0;
        Admit::Write(take(b, self.rate))
    }

    /// Every pending summary (the agent's count is reset).
    pub fn take_all(&mut self) -> Vec<Dropped> {
        let rate = self.rate;
        let out = self
            .buckets
            .values_mut()
            .filter_map(|b| take(b, rate))
            .collect();
        // Agents idle for a minute are forgotten.
        self.buckets
            .retain(|_, b| b.last.elapsed().as_secs() < 60 || b.dropped > 0);
        out
    }
}

fn take(b: &mut Bucket, rate: u32) -> Option<Dropped> {
    (b.dropped > 0).then(|| {
        let d = Dropped {
            agent: b.agent.clone(),
            count: b.dropped,
            since: b.since.take(),
            rate,
            rules: std::mem::take(&mut b.rules),
        };
        b.dropped = 0;
        d
    })
}
