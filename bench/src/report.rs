//! The table (`metric | direct | nginx | guard | added/ratio | target | result`) and the JSON
//! document. The nginx column is the plain reverse-proxy hop, where it was measured.

use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Miss,
    /// No target: for context.
    Info,
    /// Could not be measured in this run (the reason is in the guard column).
    NotMeasured,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Miss => "MISS",
            Verdict::Info => "-",
            Verdict::NotMeasured => "not measured",
        }
    }

    pub fn of(ok: bool) -> Verdict {
        if ok {
            Verdict::Pass
        } else {
            Verdict::Miss
        }
    }
}

pub struct Row {
    pub metric: String,
    pub direct: String,
    /// The same through nginx (empty where nginx was not measured).
    pub nginx: String,
    pub guard: String,
    pub delta: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Default)]
pub struct Report {
    pub machine: Map<String, Value>,
    pub rows: Vec<Row>,
    /// Detailed numbers, by measurement.
    pub results: Map<String, Value>,
    pub notes: Vec<String>,
}

pub fn us(ns: u64) -> String {
    let v = ns as f64 / 1000.0;
    if v >= 100.0 {
        format!("{v:.0} µs")
    } else if v >= 10.0 {
        format!("{v:.1} µs")
    } else {
        format!("{v:.2} µs")
    }
}

/// A signed difference in µs.
pub fn added_us(guard_ns: u64, direct_ns: u64) -> String {
    let d = guard_ns as f64 - direct_ns as f64;
    let v = d / 1000.0;
    let body = if v.abs() >= 100.0 {
        format!("{v:+.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:+.1}")
    } else {
        format!("{v:+.2}")
    };
    format!("{body} µs")
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    /// An informational row of two times (ns) and what guard adds.
    pub fn timed(&mut self, metric: impl Into<String>, direct_ns: u64, guard_ns: u64) {
        self.row(
            metric,
            us(direct_ns),
            us(guard_ns),
            added_us(guard_ns, direct_ns),
            "",
            Verdict::Info,
        );
    }

    pub fn row(
        &mut self,
        metric: impl Into<String>,
        direct: impl Into<String>,
        guard: impl Into<String>,
        delta: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            direct: direct.into(),
            nginx: String::new(),
            guard: guard.into(),
            delta: delta.into(),
            target: target.into(),
            verdict,
        });
    }

    /// A row with the nginx column filled.
    #[allow(clippy::too_many_arguments)]
    pub fn row_nginx(
        &mut self,
        metric: impl Into<String>,
        direct: impl Into<String>,
        nginx: impl Into<String>,
        guard: impl Into<String>,
        delta: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        self.row(metric, direct, guard, delta, target, verdict);
        if let Some(r) = self.rows.last_mut() {
            r.nginx = nginx.into();
        }
    }

    /// The report as text: the machine, the table, the targets met and missed, the notes.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out.push_str("guard-bench: what guard costs, against the same work done directly\n");
        for (k, v) in &self.machine {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("  {k}: {v}\n"));
        }
        out.push('\n');
        out.push_str(&self.table());
        out.push('\n');
        out.push_str(&self.summary());
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }

    /// The rows as a table: a header, a rule, then one line a row, each column as wide as its
    /// widest cell (the metric and the result left-aligned, the numbers right-aligned).
    fn table(&self) -> String {
        let header = [
            "metric",
            "direct",
            "nginx",
            "guard",
            "added/ratio",
            "target",
            "result",
        ];
        let cells: Vec<[&str; 7]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.metric.as_str(),
                    r.direct.as_str(),
                    r.nginx.as_str(),
                    r.guard.as_str(),
                    r.delta.as_str(),
                    r.target.as_str(),
                    r.verdict.as_str(),
                ]
            })
            .collect();
        let mut width = header.map(|h| h.chars().count());
        for c in &cells {
            for (w, s) in width.iter_mut().zip(c) {
                *w = (*w).max(s.chars().count());
            }
        }
        let mut out = line(header, width);
        out.push_str(
            &width
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("-|-"),
        );
        out.push('\n');
        for c in cells {
            out.push_str(&line(c, width));
        }
        out
    }

    /// The line counting the targets met and naming those missed.
    fn summary(&self) -> String {
        let missed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Miss)
            .map(|r| r.metric.as_str())
            .collect();
        let passed = self
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Pass)
            .count();
        if missed.is_empty() {
            format!("targets: {passed} met, none missed\n")
        } else {
            format!(
                "targets: {passed} met, {} MISSED: {}\n",
                missed.len(),
                missed.join("; ")
            )
        }
    }

    pub fn json(&self) -> Value {
        let table: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "metric": r.metric, "direct": r.direct, "nginx": r.nginx, "guard": r.guard,
                    "added_or_ratio": r.delta, "target": r.target, "result": r.verdict.as_str(),
                })
            })
            .collect();
        json!({
            "machine": self.machine,
            "table": table,
            "results": self.results,
            "notes": self.notes,
        })
    }
}

/// One table line: the cells padded to `width`, the metric and the result on the left.
fn line(cols: [&str; 7], width: [usize; 7]) -> String {
    let mut s = String::new();
    for (i, (c, w)) in cols.iter().zip(width).enumerate() {
        let pad = w - c.chars().count();
        if i == 0 {
            s.push_str(c);
            s.push_str(&" ".repeat(pad));
        } else {
            s.push_str(" | ");
            if i == cols.len() - 1 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
    }
    s.trim_end().to_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(us(42_000), "42.0 µs");
        assert_eq!(us(1_234_000), "1234 µs");
        assert_eq!(added_us(150_000, 50_000), "+100 µs");
        assert_eq!(added_us(1_000, 3_500), "-2.50 µs");
        let mut r = Report::default();
        r.row("m", "1", "2", "+1", "<= 1", Verdict::Miss);
        let t = r.text();
        assert!(t.contains("MISS") && t.contains("1 MISSED: m"), "{t}");
    }
}
