//! Policy decision latency (README "Performance": p99 at most 5 µs with 1,000 rules).
//!
//! `cargo bench -p guard --bench policy` (or `-- --quick` for a short run). A benchmark only:
//! nothing here asserts a time.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use guard::policy::{Caller, PolicySet, RateLimiter};
use serde_json::{json, Map, Value};

const SIZES: [usize; 3] = [10, 100, 1_000];

/// A policy with `n` tool rules of four kinds (plain allow, two conditions, a regex condition,
/// deny), a grant, and optionally an `all_tools` rate limit.
fn policy(n: usize, all_tools_limit: bool) -> PolicySet {
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
    let mut doc = json!({
        "version": "1",
        "server": { "name": "bench", "match": ["127.0.0.1:8000"] },
        "default": "deny",
        "tools": tools,
        "grants": [ { "agents": ["other-bot"], "tools": { "tool_0": { "action": "deny" } } } ]
    });
    if all_tools_limit {
        // Never refuses at the bench's pace (see `bench_decide_rate_limited`): this measures
        // the counting.
        doc["all_tools"] = json!({ "rate_limit": { "max": 1_000_000, "window": 1 } });
    }
    PolicySet::from_files(&[("bench.json".to_string(), doc.to_string())])
        .unwrap_or_else(|e| panic!("bench policy does not load: {e:?}"))
}

/// The rule of kind `kind` (see `policy`) nearest the middle of `n`.
fn middle_tool(n: usize, kind: usize) -> String {
    let mid = n / 2;
    format!("tool_{}", mid - mid % 4 + kind)
}

fn caller() -> Caller {
    Caller {
        agent: Some("research-bot".into()),
        uid: 1000,
        exes: vec!["/usr/bin/python3".into()],
        cgroup: Some("/guard.slice/agent-research-bot-1".into()),
        instance: Some(0x8b1f_0c3e),
    }
}

fn bench_decide(c: &mut Criterion) {
    let who = caller();
    let args: Value =
        json!({ "mode": "fast", "options": { "count": 7 }, "query": "hello world 42" });
    let mut group = c.benchmark_group("decide");
    for n in SIZES {
        let set = policy(n, false);
        let p = set.by_name("bench").unwrap();
        let limiter = RateLimiter::new();
        for (label, kind) in [("allow", 0), ("conditions", 1), ("regex", 2), ("deny", 3)] {
            let tool = middle_tool(n, kind);
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    black_box(p.decide(
                        black_box(&tool),
                        black_box(&args),
                        &who,
                        &limiter,
                        Instant::now(),
                    ))
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("unlisted", n), &n, |b, _| {
            b.iter(|| {
                black_box(p.decide(
                    black_box("not_a_tool"),
                    black_box(&args),
                    &who,
                    &limiter,
                    Instant::now(),
                ))
            })
        });
    }
    group.finish();
}

fn bench_decide_rate_limited(c: &mut Criterion) {
    let who = caller();
    let args: Value = json!({ "mode": "fast", "options": { "count": 7 } });
    let mut group = c.benchmark_group("decide_with_all_tools_limit");
    for n in SIZES {
        let set = policy(n, true);
        let p = set.by_name("bench").unwrap();
        let limiter = RateLimiter::new();
        let tool = middle_tool(n, 1);
        // A clock that moves 2 µs a call: at most 500,000 calls in the 1 s window, so the limit
        // (1,000,000) never refuses and every call is counted (the window keeps sliding).
        let start = Instant::now();
        let mut tick: u64 = 0;
        group.bench_with_input(BenchmarkId::new("conditions", n), &n, |b, _| {
            b.iter(|| {
                tick += 2;
                black_box(p.decide(
                    black_box(&tool),
                    black_box(&args),
                    &who,
                    &limiter,
                    start + Duration::from_micros(tick),
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_decide_rate_limited);
criterion_main!(benches);
