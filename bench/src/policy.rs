//! Policy decision time: `ServerPolicy::decide` timed call by call (README "Performance": p99 at
//! most 5 µs with 1,000 rules). The policies are those of `guard/benches/policy.rs` (the criterion
//! bench): `n` tool rules of four kinds (plain allow, two conditions, a regex condition, deny) and
//! a grant; every timed round cycles through the four kinds (the rule nearest the middle) and a
//! tool no rule names.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use guard::policy::{Caller, PolicySet, RateLimiter};
use serde_json::{json, Map, Value};

use crate::{
    report::{us, Report, Verdict},
    stats::Summary,
};

pub const SIZES: [usize; 3] = [10, 100, 1_000];

fn policy(n: usize) -> Result<PolicySet> {
    let mut tools = Map::new();
    for i in 0..n {
        let rule = match i % 4 {
            0 => json!({}),
            1 => json!({ "when": [
                { "path": "mode", "op": "in", "value": ["fast", "slow"] },
                { "path": "options.count", "op": "lte", "value": 100 }
            ] }),
            2 => json!({ "when": [
                { "path": "query", "op": "regex", "value": "^[a-z0-9 ]{1,64}$" }
            ] }),
            _ => json!({ "action": "deny", "reason": "not approved" }),
        };
        tools.insert(format!("tool_{i}"), rule);
    }
    let doc = json!({
        "version": "1",
        "server": { "name": "bench", "match": ["127.0.0.1:8000"] },
        "default": "deny",
        "tools": tools,
        "grants": [ { "agents": ["other-bot"], "tools": { "tool_0": { "action": "deny" } } } ]
    });
    PolicySet::from_files(&[("bench.json".to_string(), doc.to_string())])
        .map_err(|e| anyhow!("bench policy does not load: {e:?}"))
}

fn middle_tool(n: usize, kind: usize) -> String {
    let mid = n / 2;
    format!("tool_{}", mid - mid % 4 + kind)
}

pub struct PolicyResult {
    pub rules: usize,
    pub all: Summary,
    /// (label, summary) per kind of rule.
    pub kinds: Vec<(&'static str, Summary)>,
}

/// What an `Instant::now()` pair costs here (included in every sample, not subtracted).
pub fn timer_overhead_ns() -> u64 {
    let mut v: Vec<u64> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            black_box(t.elapsed().as_nanos() as u64)
        })
        .collect();
    Summary::of(&mut v).p50
}

pub fn run(rounds: usize) -> Result<Vec<PolicyResult>> {
    let who = Caller {
        agent: Some("research-bot".into()),
        uid: 1000,
        exes: vec!["/usr/bin/python3".into()],
        cgroup: Some("/guard.slice/agent-research-bot-1".into()),
        instance: Some(0x8b1f_0c3e),
    };
    let args: Value =
        json!({ "mode": "fast", "options": { "count": 7 }, "query": "hello world 42" });
    let mut out = Vec::new();
    for n in SIZES {
        let set = policy(n)?;
        let p = set
            .by_name("bench")
            .ok_or_else(|| anyhow!("no policy named bench"))?;
        let limiter = RateLimiter::new();
        let labels = ["allow", "conditions", "regex", "deny", "unlisted"];
        let tools: Vec<String> = (0..4)
            .map(|k| middle_tool(n, k))
            .chain(std::iter::once("not_a_tool".to_string()))
            .collect();
        let mut per_kind: Vec<Vec<u64>> = vec![Vec::with_capacity(rounds); tools.len()];
        let warm_until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < warm_until {
            for t in &tools {
                black_box(p.decide(
                    black_box(t),
                    black_box(&args),
                    &who,
                    &limiter,
                    Instant::now(),
                ));
            }
        }
        for _ in 0..rounds {
            for (k, t) in tools.iter().enumerate() {
                let now = Instant::now();
                let start = Instant::now();
                black_box(p.decide(black_box(t), black_box(&args), &who, &limiter, now));
                per_kind[k].push(start.elapsed().as_nanos() as u64);
            }
        }
        let mut all: Vec<u64> = per_kind.iter().flatten().copied().collect();
        let kinds = labels
            .iter()
            .zip(per_kind.iter_mut())
            .map(|(l, v)| (*l, Summary::of(v)))
            .collect();
        out.push(PolicyResult {
            rules: n,
            all: Summary::of(&mut all),
            kinds,
        });
    }
    Ok(out)
}

/// The report's rows and results for policy decision time, measured in-process (no daemon, no
/// cgroups).
pub fn rows(rep: &mut Report, quick: bool) -> Result<()> {
    eprintln!("guard-bench: policy decision time with 10, 100 and 1,000 rules");
    let overhead = timer_overhead_ns();
    let results = run(if quick { 20_000 } else { 100_000 })?;
    let mut detail = Map::new();
    for r in &results {
        let target = r.rules == 1_000;
        rep.row(
            format!("policy decide() p50 / p99, {} rules", r.rules),
            "-",
            format!("{} / {}", us(r.all.p50), us(r.all.p99)),
            "",
            if target { "p99 <= 5 µs" } else { "" },
            if target {
                Verdict::of(r.all.p99 <= 5_000)
            } else {
                Verdict::Info
            },
        );
        let kinds: Map<String, Value> = r
            .kinds
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_json()))
            .collect();
        detail.insert(
            r.rules.to_string(),
            json!({ "all": r.all.to_json(), "by_rule_kind": kinds }),
        );
    }
    detail.insert("timer_overhead_ns".into(), json!(overhead));
    rep.results
        .insert("policy_decide".into(), Value::Object(detail));
    rep.notes.push(format!(
        "decide() samples are single calls timed with Instant (a timer pair costs {overhead} ns here, included)"
    ));
    Ok(())
}
