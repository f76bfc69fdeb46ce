//! Prometheus metrics, derived from the audit records (every decision is one; the audit log
//! hands each record written to [`Metrics::observe`]) plus the daemon's counters, served on a
//! loopback address (`metrics.listen`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{atomic::Ordering, Arc, Mutex},
};

use super::Daemon;
use crate::audit::{Decision, Event, Record};

/// Upper bounds (µs) of the decision latency histogram.
const BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000, 10_000_000,
];

#[derive(Default)]
struct Inner {
    /// (event, server, tool, decision) -> count
    decisions: BTreeMap<(Event, String, String, Decision), u64>,
    /// (event) -> bucket counts, sum µs, count
    latency: BTreeMap<Event, ([u64; BUCKETS_US.len()], u64, u64)>,
    /// how (`exec-match`, `guard-exec`) -> agents enrolled
    enrolled: BTreeMap<String, u64>,
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
        if r.event == Event::AgentStart {
            let how = r
                .detail
                .as_ref()
                .and_then(|d| d.get("enrolled"))
                .and_then(|h| h.as_str())
                .unwrap_or("unknown");
            *inner.enrolled.entry(how.to_string()).or_default() += 1;
        }
        *inner
            .decisions
            .entry((r.event, server, tool, r.decision))
            .or_default() += 1;
        if let Some(us) = r.latency_us {
            let e = inner
                .latency
                .entry(r.event)
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
                esc(event.as_str()),
                esc(server),
                esc(tool),
                esc(decision.as_str())
            );
        }
        out.push_str("# HELP guard_decision_latency_seconds Time from accepting a request to its decision.\n");
        out.push_str("# TYPE guard_decision_latency_seconds histogram\n");
        for (event, (buckets, sum, count)) in &inner.latency {
            for (i, b) in BUCKETS_US.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "guard_decision_latency_seconds_bucket{{event=\"{}\",le=\"{}\"}} {}",
                    esc(event.as_str()),
                    *b as f64 / 1e6,
                    buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "guard_decision_latency_seconds_bucket{{event=\"{}\",le=\"+Inf\"}} {count}",
                esc(event.as_str())
            );
            let _ = writeln!(
                out,
                "guard_decision_latency_seconds_sum{{event=\"{}\"}} {}",
                esc(event.as_str()),
                *sum as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "guard_decision_latency_seconds_count{{event=\"{}\"}} {count}",
                esc(event.as_str())
            );
        }
        out.push_str("# HELP guard_agents_enrolled_total Agents enrolled, by how (exec-match: [[agents]] at exec; guard-exec).\n");
        out.push_str("# TYPE guard_agents_enrolled_total counter\n");
        for (how, n) in &inner.enrolled {
            let _ = writeln!(
                out,
                "guard_agents_enrolled_total{{how=\"{}\"}} {n}",
                esc(how)
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

/// Serves `/metrics` until the daemon stops.
pub(super) async fn serve(daemon: Arc<Daemon>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let me = daemon.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let me = me.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            (200, me.render_metrics())
                        } else {
                            (404, "see /metrics\n".to_string())
                        };
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Daemon {
    /// The OTLP export's counters (zero while `[otel]` is off), by signal.
    fn render_otel(&self, out: &mut String) {
        type Counter = fn(&super::otel::Stats) -> &std::sync::atomic::AtomicU64;
        type Family = (&'static str, &'static str, [(&'static str, Counter); 2]);
        let families: [Family; 2] = [
            (
                "guard_otel_dropped_total",
                "Records not exported over OTLP (queue full or export failed); the audit log has them.",
                [("logs", |s| &s.logs_dropped), ("spans", |s| &s.spans_dropped)],
            ),
            (
                "guard_otel_exported_total",
                "Records the OTLP collector accepted.",
                [("logs", |s| &s.logs_exported), ("spans", |s| &s.spans_exported)],
            ),
        ];
        for (name, help, signals) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (signal, counter) in signals {
                let n = self
                    .otel
                    .as_ref()
                    .map_or(0, |o| counter(&o.stats).load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}{{signal=\"{signal}\"}} {n}");
            }
        }
    }

    // Long (about 90 lines) on purpose: a flat list, one metric after another, in the order
    // the /metrics page shows them.
    fn render_metrics(&self) -> String {
        let k = self.kernel.counters();
        let p = self.stats.snapshot();
        let kc = |n: &str| k.get(n).copied().unwrap_or(0);
        let audit = self.audit.health();
        let refused: u64 = k
            .iter()
            .filter(|(n, _)| n.starts_with("refused_"))
            .map(|(_, v)| v)
            .sum();
        let mut out = self.metrics.render(
            &[
                (
                    "guard_redirected_total",
                    "Guarded connects rewritten to the proxy (kernel).",
                    kc("redirected"),
                ),
                (
                    "guard_refused_total",
                    "Guarded socket operations refused in the kernel (netns, UDP, bind, direct).",
                    refused,
                ),
                (
                    "guard_exempt_total",
                    "Guarded connects left alone by scope.exempt.",
                    kc("exempt"),
                ),
                (
                    "guard_connections_accepted_total",
                    "Connections accepted by the proxy.",
                    p.accepted,
                ),
                (
                    "guard_connections_passed_total",
                    "Connections forwarded (passthrough, HTTP or TLS).",
                    p.passed_through,
                ),
                (
                    "guard_origin_missing_total",
                    "Accepted connections with no recorded origin (closed).",
                    p.origin_missing,
                ),
                (
                    "guard_upstream_failed_total",
                    "Upstream connects that failed.",
                    p.upstream_failed,
                ),
                (
                    "guard_connections_over_agent_limit_total",
                    "Connections refused: their agent held proxy.max_connections_per_agent.",
                    p.over_agent_limit,
                ),
                (
                    "guard_audit_write_failures_total",
                    "Audit records that could not be written (their calls were refused).",
                    audit.write_failures,
                ),
                (
                    "guard_audit_connection_records_dropped_total",
                    "Connection records left out under a flood (counted in connection_summary records).",
                    audit.connection_records_dropped,
                ),
                (
                    "guard_audit_refusal_records_dropped_total",
                    "Records of refused requests left out under a flood (counted in refusal_summary records).",
                    audit.refusal_records_dropped,
                ),
            ],
            &[
                (
                    "guard_connections_active",
                    "Connections open through the proxy.",
                    p.active,
                ),
                (
                    "guard_approvals_pending",
                    "Calls held for a human.",
                    self.engine.approvals.len() as u64,
                ),
                (
                    "guard_agents",
                    "Agent cgroups alive.",
                    self.agents.all().len() as u64,
                ),
                (
                    "guard_enforcing",
                    "1 while guard enforces, 0 after guard disable.",
                    u64::from(!self.disabled.load(Ordering::SeqCst)),
                ),
                (
                    "guard_audit_ok",
                    "1 while the audit trail is written, 0 after a failed write (calls are refused).",
                    u64::from(audit.ok),
                ),
            ],
        );
        {
            let st = self.policy_state.lock().unwrap();
            let age = st.applied_at.elapsed().map_or(0, |d| d.as_secs());
            out.push_str("# HELP guard_policy_info The policy set in force: its hash (the manifest's SHA-256) and source.\n# TYPE guard_policy_info gauge\n");
            let _ = writeln!(
                out,
                "guard_policy_info{{sha256=\"{}\",source=\"{}\"}} 1",
                self.engine.policies().sha256(),
                st.source
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            );
            self.render_otel(&mut out);
            let _ = writeln!(out, "# HELP guard_policy_age_seconds Seconds since the policy set in force was applied.\n# TYPE guard_policy_age_seconds gauge\nguard_policy_age_seconds {age}");
        }
        out.push_str("# HELP guard_containment 1 for the containment state in force (on; partial: guard exec confines its agents itself; off: see guard status for why).\n");
        out.push_str("# TYPE guard_containment gauge\n");
        for state in ["on", "partial", "off"] {
            let _ = writeln!(
                out,
                "guard_containment{{state=\"{state}\"}} {}",
                u64::from(self.containment.state == state)
            );
        }
        out.push_str("# HELP guard_contained_total What the kernel refused guarded processes (containment), by kind.\n");
        out.push_str("# TYPE guard_contained_total counter\n");
        for (what, n) in self.kernel.contain_counters() {
            let _ = writeln!(out, "guard_contained_total{{what=\"{what}\"}} {n}");
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
        let mut r = Record::new(Event::ToolCall, Decision::Deny);
        r.tool = Some("rm \"x\"".into());
        r.server = Some(ServerRef {
            name: Some("files".into()),
            ..Default::default()
        });
        r.latency_us = Some(120);
        m.observe(&r);
        m.observe(&r);
        let mut started = Record::new(Event::AgentStart, Decision::Enforce);
        started.detail = Some(serde_json::json!({"enrolled": "exec-match"}));
        m.observe(&started);
        let text = m.render(
            &[("guard_redirected_total", "Redirected connects.", 5)],
            &[],
        );
        assert!(text.contains(
            "guard_decisions_total{event=\"tool_call\",server=\"files\",tool=\"rm \\\"x\\\"\",decision=\"deny\"} 2"
        ), "{text}");
        assert!(
            text.contains("guard_agents_enrolled_total{how=\"exec-match\"} 1"),
            "{text}"
        );
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
