//! Prometheus metrics, derived from the audit records (every decision is one) plus the daemon's
//! counters, served on a loopback address.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

use crate::audit::Record;

/// Upper bounds (µs) of the decision latency histogram.
const BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000, 10_000_000,
];

#[derive(Default)]
struct Inner {
    /// (event, server, tool, decision) -> count
    decisions: BTreeMap<(String, String, String, String), u64>,
    /// (event) -> bucket counts, sum µs, count
    latency: BTreeMap<String, ([u64; BUCKETS_US.len()], u64, u64)>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Label values are quoted with `\`, `"` and newlines escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn observe(&self, r: &Record) {
        let server = r
            .server
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_default();
        let tool = r.tool.clone().unwrap_or_default();
        let mut inner = self.inner.lock().unwrap();
        *inner
            .decisions
            .entry((r.event.clone(), server, tool, r.decision.clone()))
            .or_default() += 1;
        if let Some(us) = r.latency_us {
            let e = inner
                .latency
                .entry(r.event.clone())
                .or_insert(([0; BUCKETS_US.len()], 0, 0));
            for (i, b) in BUCKETS_US.iter().enumerate() {
                if us <= *b {
                    e.0[i] += 1;
                }
            }
            e.1 += us;
            e.2 += 1;
        }
    }

    /// The text exposition format; `gauges` and `counters` are added as they are.
    pub fn render(&self, counters: &[(&str, &str, u64)], gauges: &[(&str, &str, u64)]) -> String {
        let inner = self.inner.lock().unwrap();
        let mut out = String::new();
        out.push_str("# HELP guard_decisions_total Decisions written to the audit trail, by event, server, tool and decision.\n");
        out.push_str("# TYPE guard_decisions_total counter\n");
        for ((event, server, tool, decision), n) in &inner.decisions {
            let _ = writeln!(
                out,
                "guard_decisions_total{{event=\"{}\",server=\"{}\",tool=\"{}\",decision=\"{}\"}} {n}",
                esc(event),
                esc(server),
                esc(tool),
                esc(decision)
            );
        }
        out.push_str("# HELP guard_decision_latency_seconds Time from accepting a request to its decision.\n");
        out.push_str("# TYPE guard_decision_latency_seconds histogram\n");
        for (event, (buckets, sum, count)) in &inner.latency {
            for (i, b) in BUCKETS_US.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "guard_decision_latency_seconds_bucket{{event=\"{}\",le=\"{}\"}} {}",
                    esc(event),
                    *b as f64 / 1e6,
                    buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "guard_decision_latency_seconds_bucket{{event=\"{}\",le=\"+Inf\"}} {count}",
                esc(event)
            );
            let _ = writeln!(
                out,
                "guard_decision_latency_seconds_sum{{event=\"{}\"}} {}",
                esc(event),
                *sum as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "guard_decision_latency_seconds_count{{event=\"{}\"}} {count}",
                esc(event)
            );
        }
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::ServerRef;

    #[test]
    fn renders_decisions_and_latency() {
        let m = Metrics::default();
        let r = Record {
            event: "tool_call".into(),
            decision: "deny".into(),
            tool: Some("rm \"x\"".into()),
            server: Some(ServerRef {
                name: Some("files".into()),
                ..Default::default()
            }),
            latency_us: Some(120),
            ..Default::default()
        };
        m.observe(&r);
        m.observe(&r);
        let text = m.render(
            &[("guard_redirected_total", "Redirected connects.", 5)],
            &[],
        );
        assert!(text.contains(
            "guard_decisions_total{event=\"tool_call\",server=\"files\",tool=\"rm \\\"x\\\"\",decision=\"deny\"} 2"
        ), "{text}");
        assert!(
            text.contains(
                "guard_decision_latency_seconds_bucket{event=\"tool_call\",le=\"0.00025\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "guard_decision_latency_seconds_bucket{event=\"tool_call\",le=\"0.0001\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains("guard_decision_latency_seconds_count{event=\"tool_call\"} 2"));
        assert!(text.contains("guard_redirected_total 5"));
    }
}
