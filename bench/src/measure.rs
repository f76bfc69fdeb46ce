//! The measurements: where a worker runs (`Side`), how its rounds merge (`Merged`), and `Bench`,
//! which runs each measurement on both sides and adds its rows and results to the report.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use crate::{
    env::{self, BenchEnv, Holder},
    machine::cpu_ns,
    nginx::Nginx,
    report::{added_us, mib, us, Report, Verdict},
    servers::Servers,
    stats::Summary,
    upstreams::Upstream,
};

/// Where a worker runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    /// `direct/`: outside the attach point, no guard program runs.
    Direct,
    /// `guard.slice/bench`: guarded, every connect redirected to the proxy.
    Guard,
    /// `guard.slice/plain`: below the attach point but not guarded (the programs run and let
    /// the connect through).
    Plain,
    /// In `direct/` too, calling the nginx hop (`Bench::nginx`) instead of the upstream.
    Nginx,
}

impl Side {
    fn cgroup(self) -> &'static str {
        match self {
            Side::Direct | Side::Nginx => "direct",
            Side::Guard => "guard.slice/bench",
            Side::Plain => "guard.slice/plain",
        }
    }
}

/// One side's samples and totals over its rounds.
#[derive(Default)]
struct Merged {
    samples: Vec<u64>,
    calls: u64,
    secs: f64,
    /// TLS handshakes that resumed a session (`mcp_conn`).
    resumed: u64,
    /// Per round: the median of each quarter of its calls, in order (drift over a connection).
    quarters: Vec<Vec<f64>>,
}

impl Merged {
    fn add(&mut self, v: &Value) {
        if let Some(q) = v["p50_us_by_quarter"].as_array() {
            self.quarters
                .push(q.iter().filter_map(Value::as_f64).collect());
        }
        if let Some(a) = v["samples_ns"].as_array() {
            self.samples.extend(a.iter().filter_map(Value::as_u64));
        }
        self.calls += v["calls"].as_u64().unwrap_or(0);
        self.secs += v["secs"].as_f64().unwrap_or(0.0);
        self.resumed += v["resumed"].as_u64().unwrap_or(0);
    }

    fn summary(&mut self) -> Summary {
        Summary::of(&mut self.samples)
    }

    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.calls as f64 / self.secs
        } else {
            0.0
        }
    }
}

const WORKER_LIMIT: Duration = Duration::from_secs(120);

/// Added-latency targets (README "Performance") for one client.
#[derive(Clone, Copy)]
pub struct Targets {
    pub median_us: u64,
    pub p99_us: Option<u64>,
}

/// One run's measurements on one benchmark environment; each adds its rows and results to `rep`.
pub struct Bench<'a> {
    pub env: &'a mut BenchEnv,
    /// When the run started (for the progress lines).
    pub started: Instant,
    /// The daemon's pid (it changes when `hold` restarts it).
    pub daemon: u32,
    pub quick: bool,
    pub rep: Report,
    /// The plain reverse-proxy hop in front of the fast upstream, when it started.
    pub nginx: Option<Nginx>,
}

/// One concurrency level of [`Bench::mcp`]: each side's merged rounds (direct, guard, then
/// nginx when measured) and the proxies' CPU time over them (ns).
struct Level {
    m: Vec<Merged>,
    daemon_cpu: u64,
    nginx_cpu: u64,
}

/// What the levels of [`Bench::mcp`] add up to.
#[derive(Default)]
struct Totals {
    daemon_cpu: u64,
    guard_calls: u64,
    guard_secs: f64,
    nginx_cpu: u64,
    nginx_calls: u64,
}

impl Bench<'_> {
    fn progress(&self, what: &str) {
        eprintln!(
            "guard-bench: [{:5.1} s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn n(&self, full: u64) -> u64 {
        if self.quick {
            (full / 4).max(1)
        } else {
            full
        }
    }

    fn secs(&self, full: f64) -> f64 {
        if self.quick {
            full / 3.0
        } else {
            full
        }
    }

    /// Runs one worker on `side`, checking from the kernel's counter that its connections went
    /// through guard (guarded side: at least `conns` redirected) or did not (other sides).
    fn side(&self, side: Side, spec: &Value, conns: u64) -> Result<Value> {
        let before = self.env.redirected()?;
        let out = env::run_worker(&self.env.cgroup(side.cgroup()), spec, WORKER_LIMIT)?;
        self.env.check_daemon()?;
        let after = self.env.redirected()?;
        let redirected = after.saturating_sub(before);
        match side {
            Side::Guard if redirected < conns => bail!(
                "only {redirected} of the guarded worker's {conns} connections were redirected"
            ),
            Side::Direct | Side::Plain | Side::Nginx if redirected != 0 => bail!(
                "{redirected} connections of the {side:?} worker were redirected: not a direct path"
            ),
            _ => {}
        }
        Ok(out)
    }

    /// Runs `spec` on each side, in the order given and then reversed (A B B A), and merges each
    /// side's rounds.
    fn abba(&self, sides: &[Side], spec: &Value, conns: u64) -> Result<Vec<Merged>> {
        let specs: Vec<Value> = sides.iter().map(|_| spec.clone()).collect();
        self.abba_specs(sides, &specs, conns)
    }

    /// [`Bench::abba`] with a spec of its own for each side.
    fn abba_specs(&self, sides: &[Side], specs: &[Value], conns: u64) -> Result<Vec<Merged>> {
        let mut merged: Vec<Merged> = sides.iter().map(|_| Merged::default()).collect();
        let order: Vec<usize> = (0..sides.len()).chain((0..sides.len()).rev()).collect();
        for i in order {
            let out = self.side(sides[i], &specs[i], conns)?;
            merged[i].add(&out);
        }
        Ok(merged)
    }

    /// `spec` for the direct and for the guarded side; over TLS (`tls`: resume or not) each side
    /// trusts the CA it meets: the upstream's, or guard's.
    fn two_specs(&self, spec: &Value, tls: Option<bool>) -> [Value; 2] {
        let mut d = spec.clone();
        let mut g = spec.clone();
        if let Some(resume) = tls {
            d["tls"] = json!({ "ca": self.env.upstream_ca(), "resume": resume });
            g["tls"] = json!({ "ca": self.env.guard_ca(), "resume": resume });
        }
        [d, g]
    }

    /// The `connect()` syscall: spaced 0.5 ms apart, so that the daemon has finished with the
    /// previous connection (the target); and back to back, 20 µs apart, where the daemon's work
    /// on the previous connections competes for the CPUs (for information).
    pub fn connect(&mut self, target: SocketAddr) -> Result<()> {
        self.progress("connect(): direct, guarded, unguarded below the attach point");
        let iters = self.n(2000);
        let warmup = 100;
        let spec = |pause_us: u64| {
            json!({ "kind": "connect", "addr": target.to_string(),
                    "iters": iters, "warmup": warmup, "pause_us": pause_us })
        };
        let sides = [Side::Direct, Side::Guard, Side::Plain];
        let mut m = self.abba(&sides, &spec(500), iters + warmup)?;
        let (d, g, p) = (m[0].summary(), m[1].summary(), m[2].summary());
        let mut burst = self.abba(&sides[..2], &spec(20), iters + warmup)?;
        let (bd, bg) = (burst[0].summary(), burst[1].summary());
        let added = g.p50 as i64 - d.p50 as i64;
        self.rep.row(
            "connect() median",
            us(d.p50),
            us(g.p50),
            added_us(g.p50, d.p50),
            "<= +10 µs",
            Verdict::of(added <= 10_000),
        );
        self.rep.timed("connect() p99", d.p99, g.p99);
        self.rep.timed(
            "connect() median, unguarded below attach point",
            d.p50,
            p.p50,
        );
        self.rep.timed(
            "connect() median, back to back (20 µs apart)",
            bd.p50,
            bg.p50,
        );
        self.rep.results.insert(
            "connect".into(),
            json!({
                "target": target.to_string(),
                "iterations_per_side": 2 * iters,
                "spaced_500us": { "direct": d.to_json(), "guard": g.to_json(),
                                  "unguarded_below_attach": p.to_json() },
                "back_to_back_20us": { "direct": bd.to_json(), "guard": bg.to_json() },
                "added_median_us": added as f64 / 1000.0,
            }),
        );
        Ok(())
    }

    /// A stdio server's `tools/call` round trip: the server started directly, and under
    /// `guard wrap` (every line decided by the daemon), one call at a time.
    pub fn stdio(&mut self) -> Result<()> {
        self.progress("stdio: tools/call round trips, direct and under guard wrap");
        let iters = self.n(3000);
        let me = std::env::current_exe()?.display().to_string();
        let direct = vec![me.clone(), "stdio-server".to_string()];
        let mut wrapped = vec![
            self.env.bin.display().to_string(),
            "--config".into(),
            self.env.config.display().to_string(),
            "wrap".into(),
            "--".into(),
        ];
        wrapped.extend(direct.iter().cloned());
        let spec = |command: &[String]| json!({ "kind": "stdio", "command": command, "iters": iters, "warmup": 200 });
        let mut m = self.abba_specs(
            &[Side::Direct, Side::Guard],
            &[spec(&direct), spec(&wrapped)],
            0,
        )?;
        let (rd, rg) = (m[0].rate(), m[1].rate());
        let (d, g) = (m[0].summary(), m[1].summary());
        let added = g.p50 as i64 - d.p50 as i64;
        self.rep.row(
            "stdio tools/call median (guard wrap)",
            us(d.p50),
            us(g.p50),
            added_us(g.p50, d.p50),
            "<= +50 µs",
            Verdict::of(added <= 50_000),
        );
        self.rep
            .timed("stdio tools/call p99 (guard wrap)", d.p99, g.p99);
        self.rep.row(
            "stdio tools/call calls/s (guard wrap), 1 client",
            format!("{rd:.0}"),
            format!("{rg:.0}"),
            format!("{:.0} %", rg / rd * 100.0),
            "",
            Verdict::Info,
        );
        self.rep.results.insert(
            "stdio".into(),
            json!({
                "iterations_per_side": 2 * iters,
                "direct": d.to_json(), "guard": g.to_json(),
                "calls_per_s": { "direct": rd, "guard": rg },
                "added_median_us": added as f64 / 1000.0,
                "added_p99_us": (g.p99 as i64 - d.p99 as i64) as f64 / 1000.0,
            }),
        );
        Ok(())
    }

    /// What enrolment at exec (`[[agents]]`) costs every other program: fork + exec of a
    /// program that is not an agent, by an unguarded process below the attach cgroup, with the
    /// exec hooks on (an agent configured) and off, A B B A.
    pub fn enrolment(&mut self) -> Result<()> {
        self.progress("enrolment: fork+exec of a non-agent, [[agents]] on and off");
        let spawns = self.n(400);
        let spec =
            json!({ "kind": "spawn", "iters": spawns, "warmup": 20, "confine": Value::Null });
        let (mut on, mut off) = (Merged::default(), Merged::default());
        let mut mode = None;
        for round in ["on", "off", "off", "on"] {
            let want = round == "on";
            if mode != Some(want) {
                // The daemon's pid changes: what measures it later (RSS) follows.
                self.daemon = self.env.restart_with_agents(want)?;
                std::thread::sleep(std::time::Duration::from_secs(1));
                mode = Some(want);
            }
            if want {
                let status = self.env.status()?;
                let m = status["enrolment"]["mode"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                if m != "exec" {
                    self.daemon = self.env.restart_with_agents(false)?;
                    let why = status["enrolment"]["why_not"].as_str().unwrap_or("?");
                    self.rep.row(
                        "enrolment: fork+exec median (non-agent)",
                        "-",
                        format!("no exec hooks here ({m}): {why}"),
                        "",
                        "",
                        Verdict::NotMeasured,
                    );
                    return Ok(());
                }
            }
            let s = self.side(Side::Plain, &spec, 0)?;
            if want {
                on.add(&s)
            } else {
                off.add(&s)
            }
        }
        self.daemon = self.env.restart_with_agents(false)?;
        let (on, off) = (on.summary(), off.summary());
        self.rep.row(
            "enrolment: fork+exec median (non-agent)",
            format!("{} off", us(off.p50)),
            format!("{} on", us(on.p50)),
            format!("{:.2}x", on.p50 as f64 / off.p50.max(1) as f64),
            "",
            Verdict::Info,
        );
        self.rep.results.insert(
            "enrolment".into(),
            json!({ "spawns_per_side": 2 * spawns, "off": off.to_json(), "on": on.to_json(),
                    "median_ratio": on.p50 as f64 / off.p50.max(1) as f64 }),
        );
        Ok(())
    }

    /// What containment costs a guarded process: `connect()` (spaced 0.5 ms apart) and a
    /// fork + exec loop, with containment as the daemon turns it on here (BPF LSM programs; or,
    /// partial, the Landlock domain and seccomp filter `guard exec` applies, which the worker
    /// applies itself) against the same work without (LSM: after a restart with
    /// `scope.containment = "off"`).
    pub fn containment(&mut self, target: SocketAddr) -> Result<()> {
        self.progress("containment: connect() and fork+exec, containment on and off");
        let status = self.env.status()?;
        let c = &status["containment"];
        let state = c["state"].as_str().unwrap_or("off").to_string();
        if state == "off" {
            let why = c["reason"].as_str().unwrap_or("?").to_string();
            for metric in [
                "containment: connect() median",
                "containment: fork+exec median",
            ] {
                self.rep.row(
                    metric,
                    "-",
                    format!("containment is off: {why}"),
                    "",
                    "",
                    Verdict::NotMeasured,
                );
            }
            return Ok(());
        }
        let iters = self.n(2000);
        let spawns = self.n(400);
        let connect = |confine: &Value| {
            json!({ "kind": "connect", "addr": target.to_string(), "iters": iters,
                    "warmup": 100, "pause_us": 500, "confine": confine })
        };
        let spawn = |confine: &Value| json!({ "kind": "spawn", "iters": spawns, "warmup": 20, "confine": confine });
        let confine = c["confine"].clone();
        let (mut on_c, mut on_s, mut off_c, mut off_s) = (
            Merged::default(),
            Merged::default(),
            Merged::default(),
            Merged::default(),
        );
        // Partial containment is the worker's own (guard exec's) confinement: the same daemon
        // serves both sides, A B B A twice. The LSM programs go with a restart of the daemon,
        // which is given a second to settle before each measurement.
        let lsm = state == "on";
        let rounds: &[&str] = if lsm {
            &["on", "off", "off", "on"]
        } else {
            &["on", "off", "off", "on", "on", "off", "off", "on"]
        };
        let mut running = "auto";
        for &round in rounds {
            let mode = if round == "on" || !lsm { "auto" } else { "off" };
            if mode != running {
                self.daemon = self.env.restart_with_containment(mode)?;
                std::thread::sleep(std::time::Duration::from_secs(1));
                running = mode;
            }
            let conf = if round == "on" {
                confine.clone()
            } else {
                Value::Null
            };
            let c = self.side(Side::Guard, &connect(&conf), iters + 100)?;
            let s = self.side(Side::Guard, &spawn(&conf), 0)?;
            if round == "on" {
                on_c.add(&c);
                on_s.add(&s);
            } else {
                off_c.add(&c);
                off_s.add(&s);
            }
        }
        if running != "auto" {
            self.daemon = self.env.restart_with_containment("auto")?;
        }
        let (oc, os, fc, fs) = (
            on_c.summary(),
            on_s.summary(),
            off_c.summary(),
            off_s.summary(),
        );
        let ratio = |on: u64, off: u64| on as f64 / off.max(1) as f64;
        let what = if state == "on" {
            "BPF LSM programs"
        } else {
            "partial: guard exec's Landlock + seccomp"
        };
        for (metric, on, off) in [
            ("containment: connect() median", oc.p50, fc.p50),
            ("containment: fork+exec median", os.p50, fs.p50),
        ] {
            self.rep.row(
                format!("{metric} ({what})"),
                format!("{} off", us(off)),
                format!("{} on", us(on)),
                format!("x{:.3}", ratio(on, off)),
                "",
                Verdict::Info,
            );
        }
        self.rep.results.insert(
            "containment".into(),
            json!({
                "state": state,
                "connect": { "on": oc.to_json(), "off": fc.to_json(), "ratio_median": ratio(oc.p50, fc.p50) },
                "fork_exec": { "on": os.to_json(), "off": fs.to_json(), "ratio_median": ratio(os.p50, fs.p50) },
            }),
        );
        Ok(())
    }

    /// `tools/call` round trips on keep-alive connections, at each concurrency of `levels`
    /// (clients, timed calls or none, seconds); the latency targets apply to one client when
    /// `targets`. Where `up.via_nginx` and nginx runs, the same calls go through nginx as well,
    /// and `targets` also holds guard against nginx.
    pub fn mcp(
        &mut self,
        key: &str,
        label: &str,
        up: &Upstream,
        levels: &[(u64, Option<u64>, f64)],
        tls: bool,
        targets: Option<Targets>,
    ) -> Result<()> {
        let nginx = if up.via_nginx {
            self.nginx.as_ref().map(|n| n.addr)
        } else {
            None
        };
        let mut out = Map::new();
        let mut t = Totals::default();
        // With one client every call finds the daemon asleep (and wakes it twice): its CPU per
        // call is the one that shows in that latency; with more, wake-ups are shared.
        let mut one_client = None;
        for &(conc, calls, secs) in levels {
            self.progress(&format!("tools/call, {label}, {conc} client(s)"));
            let mut lv = self.mcp_level(up, nginx, conc, calls, secs, tls, targets)?;
            let per = |cpu: u64, calls: u64| cpu as f64 / 1000.0 / calls.max(1) as f64;
            let cpu = per(lv.daemon_cpu, lv.m[1].calls);
            let ncpu = lv.m.get(2).map(|n| per(lv.nginx_cpu, n.calls));
            if conc == 1 {
                one_client = Some((cpu, ncpu));
            }
            t.daemon_cpu += lv.daemon_cpu;
            t.guard_calls += lv.m[1].calls;
            t.guard_secs += lv.m[1].secs;
            t.nginx_cpu += lv.nginx_cpu;
            t.nginx_calls += lv.m.get(2).map_or(0, |n| n.calls);
            let level = self.mcp_level_rows(label, conc, &mut lv.m, targets, cpu, ncpu);
            out.insert(format!("c{conc}"), level);
        }
        let per_call = t.daemon_cpu as f64 / 1000.0 / t.guard_calls.max(1) as f64;
        out.insert("daemon_cpu_us_per_call".into(), json!(per_call));
        if t.guard_calls as f64 > 1000.0 * t.guard_secs {
            // (With a slow upstream the daemon's idle housekeeping would dominate the figure.)
            self.cpu_row(label, &t, per_call, one_client, targets.is_some(), &mut out);
        }
        self.rep.results.insert(key.into(), Value::Object(out));
        Ok(())
    }

    /// The proxies' CPU per call: guard's daemon, and nginx's workers where measured (against
    /// which the target holds guard when `target`).
    fn cpu_row(
        &mut self,
        label: &str,
        t: &Totals,
        per_call: f64,
        one_client: Option<(f64, Option<f64>)>,
        target: bool,
        out: &mut Map<String, Value>,
    ) {
        let both = |all: f64, one: Option<f64>| match one {
            Some(one) => format!("{one:.1} / {all:.1} µs"),
            None => format!("{all:.1} µs"),
        };
        let guard = both(per_call, one_client.map(|o| o.0));
        if t.nginx_calls == 0 {
            self.rep.row(
                format!("daemon CPU per tools/call (1 client / all), {label}"),
                "-",
                guard,
                "",
                "",
                Verdict::Info,
            );
            return;
        }
        let nginx_per_call = t.nginx_cpu as f64 / 1000.0 / t.nginx_calls as f64;
        out.insert("nginx_cpu_us_per_call".into(), json!(nginx_per_call));
        let ratio = per_call / nginx_per_call.max(0.001);
        out.insert("cpu_ratio_to_nginx".into(), json!(ratio));
        let (goal, verdict) = if target {
            ("<= 1.2x nginx".to_string(), Verdict::of(ratio <= 1.2))
        } else {
            (String::new(), Verdict::Info)
        };
        self.rep.row_nginx(
            format!("proxy CPU per tools/call (1 client / all), {label}"),
            "-",
            both(nginx_per_call, one_client.and_then(|o| o.1)),
            guard,
            format!("{ratio:.2}x"),
            goal,
            verdict,
        );
    }

    /// One concurrency level of [`Bench::mcp`] on every side.
    #[allow(clippy::too_many_arguments)]
    fn mcp_level(
        &self,
        up: &Upstream,
        nginx: Option<SocketAddr>,
        conc: u64,
        calls: Option<u64>,
        secs: f64,
        tls: bool,
        targets: Option<Targets>,
    ) -> Result<Level> {
        // Real servers are slow (FastMCP: 44 ms a call): a short warm-up there.
        let warmup = match (conc, targets.is_some()) {
            (1, true) => 100,
            (_, true) => 10,
            _ => 5,
        };
        let mut spec = json!({
            "kind": "mcp", "addr": up.addr.to_string(), "path": up.path,
            "concurrency": conc, "warmup": warmup,
            "tool": "echo", "args": up.args, "secs": self.secs(secs),
        });
        if let Some(c) = calls {
            spec["calls"] = json!(self.n(c));
        }
        let [d, g] = self.two_specs(&spec, tls.then_some(true));
        let mut sides = vec![Side::Direct, Side::Guard];
        let mut specs = vec![d.clone(), g];
        if let Some(n) = nginx {
            let mut ns = d;
            ns["addr"] = json!(n.to_string());
            sides.push(Side::Nginx);
            specs.push(ns);
        }
        let nginx_cpu = || self.nginx.as_ref().map_or(0, Nginx::cpu_ns);
        let (cpu0, ncpu0) = (cpu_ns(self.daemon), nginx_cpu());
        let m = self.abba_specs(&sides, &specs, conc)?;
        Ok(Level {
            m,
            daemon_cpu: cpu_ns(self.daemon).saturating_sub(cpu0),
            nginx_cpu: nginx_cpu().saturating_sub(ncpu0),
        })
    }

    /// The rows of one concurrency level of [`Bench::mcp`] (latency for one client, calls/s for
    /// all), and its results.
    fn mcp_level_rows(
        &mut self,
        label: &str,
        conc: u64,
        m: &mut [Merged],
        targets: Option<Targets>,
        cpu_per_call: f64,
        nginx_cpu_per_call: Option<f64>,
    ) -> Value {
        let (d, g) = (m[0].summary(), m[1].summary());
        let (dr, gr) = (m[0].rate(), m[1].rate());
        let n = m.get_mut(2).map(|n| (n.summary(), n.rate()));
        if conc == 1 {
            self.mcp_latency_rows(label, &d, &g, n.as_ref().map(|n| &n.0), targets);
        }
        let metric = format!(
            "tools/call calls/s, {label}, {conc} client{}",
            if conc == 1 { "" } else { "s" }
        );
        match &n {
            None => self.rep.row(
                metric,
                format!("{dr:.0}"),
                format!("{gr:.0}"),
                format!("{:.0} %", gr / dr * 100.0),
                "",
                Verdict::Info,
            ),
            Some((_, nr)) => {
                let (goal, verdict) = match targets {
                    Some(_) if conc > 1 => (">= 0.9x nginx".into(), Verdict::of(gr >= 0.9 * nr)),
                    _ => (String::new(), Verdict::Info),
                };
                self.rep.row_nginx(
                    metric,
                    format!("{dr:.0}"),
                    format!("{nr:.0} ({:.0} %)", nr / dr * 100.0),
                    format!("{gr:.0} ({:.0} %)", gr / dr * 100.0),
                    format!("{:.2}x nginx", gr / nr),
                    goal,
                    verdict,
                );
            }
        }
        let mut level = json!({
            "concurrency": conc,
            "direct": { "latency": d.to_json(), "calls": m[0].calls, "secs": m[0].secs,
                        "calls_per_s": dr },
            "guard": { "latency": g.to_json(), "calls": m[1].calls, "secs": m[1].secs,
                       "calls_per_s": gr },
            "added_median_us": (g.p50 as f64 - d.p50 as f64) / 1000.0,
            "added_p99_us": (g.p99 as f64 - d.p99 as f64) / 1000.0,
            "added_p999_us": (g.p999 as f64 - d.p999 as f64) / 1000.0,
            "p50_us_by_quarter": { "direct": m[0].quarters, "guard": m[1].quarters },
            "calls_per_s_ratio": gr / dr,
            "daemon_cpu_us_per_call": cpu_per_call,
        });
        if let (Some((ns, nr)), Some(nm)) = (&n, m.get(2)) {
            level["nginx"] = json!({
                "latency": ns.to_json(), "calls": nm.calls, "secs": nm.secs, "calls_per_s": nr,
                "added_median_us": (ns.p50 as f64 - d.p50 as f64) / 1000.0,
                "added_p99_us": (ns.p99 as f64 - d.p99 as f64) / 1000.0,
                "added_p999_us": (ns.p999 as f64 - d.p999 as f64) / 1000.0,
                "cpu_us_per_call": nginx_cpu_per_call,
            });
            level["p50_us_by_quarter"]["nginx"] = json!(nm.quarters);
            level["calls_per_s_ratio_to_nginx"] = json!(gr / nr);
        }
        level
    }

    /// One client's median, p99 and p99.9 rows, checked against `targets` where there are any
    /// (and against nginx's, where it was measured).
    fn mcp_latency_rows(
        &mut self,
        label: &str,
        d: &Summary,
        g: &Summary,
        n: Option<&Summary>,
        targets: Option<Targets>,
    ) {
        let check = |limit_us: Option<u64>, guard_ns: u64, direct_ns: u64| match limit_us {
            Some(l) => (
                format!("<= +{l} µs"),
                Verdict::of(guard_ns as i64 - direct_ns as i64 <= l as i64 * 1000),
            ),
            None => (String::new(), Verdict::Info),
        };
        let (t50, v50) = check(targets.map(|t| t.median_us), g.p50, d.p50);
        let (t99, v99) = check(targets.and_then(|t| t.p99_us), g.p99, d.p99);
        let nginx = |f: fn(&Summary) -> u64| n.map_or(String::new(), |n| us(f(n)));
        self.rep.row_nginx(
            format!("tools/call median, {label}, 1 client"),
            us(d.p50),
            nginx(|s| s.p50),
            us(g.p50),
            added_us(g.p50, d.p50),
            t50,
            v50,
        );
        self.rep.row_nginx(
            format!("tools/call p99, {label}, 1 client"),
            us(d.p99),
            nginx(|s| s.p99),
            us(g.p99),
            added_us(g.p99, d.p99),
            t99,
            v99,
        );
        let Some(n) = n else { return };
        let added = |s: &Summary, f: fn(&Summary) -> u64| f(s) as i64 - f(d) as i64;
        let (g50, n50) = (added(g, |s| s.p50), added(n, |s| s.p50));
        let (goal, verdict) = match targets {
            Some(_) => ("<= nginx +10 µs".into(), Verdict::of(g50 <= n50 + 10_000)),
            None => (String::new(), Verdict::Info),
        };
        self.rep.row_nginx(
            format!("added median against nginx's, {label}, 1 client"),
            "",
            format!("{:+.1} µs", n50 as f64 / 1000.0),
            format!("{:+.1} µs", g50 as f64 / 1000.0),
            format!("{:+.1} µs", (g50 - n50) as f64 / 1000.0),
            goal,
            verdict,
        );
        let g999 = added(g, |s| s.p999);
        let (goal, verdict) = match targets {
            Some(_) => (
                "added <= 3x added median".into(),
                Verdict::of(g999 <= 3 * g50.max(0)),
            ),
            None => (String::new(), Verdict::Info),
        };
        self.rep.row_nginx(
            format!("tools/call p99.9, {label}, 1 client"),
            us(d.p999),
            us(n.p999),
            us(g.p999),
            added_us(g.p999, d.p999),
            goal,
            verdict,
        );
    }

    /// A new connection for every `tools/call`: plain (`tls` None), or TLS with a full
    /// (`Some(false)`) or a resumed (`Some(true)`) handshake.
    pub fn per_connection(
        &mut self,
        key: &str,
        label: &str,
        up: &Upstream,
        calls: u64,
        tls: Option<bool>,
        target_us: Option<u64>,
    ) -> Result<()> {
        self.progress(&format!("tools/call, {label}"));
        let calls = self.n(calls);
        let spec = json!({
            "kind": "mcp_conn", "addr": up.addr.to_string(), "path": up.path,
            "warmup": 20, "calls": calls, "tool": "echo", "args": up.args,
        });
        let specs = self.two_specs(&spec, tls);
        let cpu0 = cpu_ns(self.daemon);
        let mut m = self.abba_specs(&[Side::Direct, Side::Guard], &specs, calls)?;
        let daemon_cpu = cpu_ns(self.daemon).saturating_sub(cpu0);
        let (d, g) = (m[0].summary(), m[1].summary());
        let added = g.p50 as i64 - d.p50 as i64;
        let (target, verdict) = match target_us {
            Some(t) => (format!("<= +{t} µs"), Verdict::of(added <= t as i64 * 1000)),
            None => (String::new(), Verdict::Info),
        };
        self.rep.row(
            format!("tools/call median, {label}"),
            us(d.p50),
            us(g.p50),
            added_us(g.p50, d.p50),
            target,
            verdict,
        );
        if tls == Some(true) {
            let want = 2 * calls;
            for (side, merged) in [("direct", &m[0]), ("guard", &m[1])] {
                if merged.resumed < want {
                    self.rep.notes.push(format!(
                        "{label}: only {} of {want} {side} handshakes resumed a session",
                        merged.resumed
                    ));
                }
            }
        }
        self.rep.results.insert(
            key.into(),
            json!({
                "calls_per_side": 2 * calls,
                "direct": d.to_json(), "guard": g.to_json(),
                "added_median_us": added as f64 / 1000.0,
                "added_p99_us": (g.p99 as f64 - d.p99 as f64) / 1000.0,
                "resumed": { "direct": m[0].resumed, "guard": m[1].resumed },
                "daemon_cpu_us_per_call": daemon_cpu as f64 / 1000.0 / (2 * calls) as f64,
            }),
        );
        Ok(())
    }

    /// The relay hop alone: small messages echoed over one guarded passthrough connection.
    pub fn echo_rtt(&mut self, echo: SocketAddr) -> Result<()> {
        self.progress("64-byte round trips over a TCP passthrough connection");
        let iters = self.n(5000);
        let spec = json!({ "kind": "echo_rtt", "addr": echo.to_string(),
                           "iters": iters, "warmup": 200 });
        let mut m = self.abba(&[Side::Direct, Side::Guard], &spec, 1)?;
        let (d, g) = (m[0].summary(), m[1].summary());
        self.rep
            .timed("64-byte round trip median, TCP passthrough", d.p50, g.p50);
        self.rep.results.insert(
            "echo_rtt".into(),
            json!({
                "round_trips_per_side": 2 * iters,
                "direct": d.to_json(), "guard": g.to_json(),
                "added_median_us": (g.p50 as f64 - d.p50 as f64) / 1000.0,
            }),
        );
        Ok(())
    }

    pub fn bulk(&mut self, sink: SocketAddr, relay: SocketAddr) -> Result<()> {
        let bytes = self.n(1 << 30);
        self.progress(&format!(
            "passthrough throughput, {} MiB per transfer",
            bytes >> 20
        ));
        let spec = |addr: SocketAddr| json!({ "kind": "bulk", "addr": addr.to_string(), "bytes": bytes, "timeout_s": 60 });
        // Three transfers each, interleaved: direct (0), guard (1), the bare relay (2), unguarded;
        // the median of each counts.
        let mut rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for which in [0, 1, 2, 2, 1, 0, 0, 1, 2] {
            let out = match which {
                0 => self.side(Side::Direct, &spec(sink), 1)?,
                1 => self.side(Side::Guard, &spec(sink), 1)?,
                _ => self.side(Side::Direct, &spec(relay), 1)?,
            };
            rates[which].push(out["mib_per_s"].as_f64().unwrap_or(0.0));
        }
        for r in rates.iter_mut() {
            r.sort_by(|a, b| a.total_cmp(b));
        }
        let (d, g, f) = (rates[0][1], rates[1][1], rates[2][1]);
        let ratio = g / d;
        self.rep.row(
            "passthrough throughput (1 connection)",
            format!("{d:.0} MiB/s"),
            format!("{g:.0} MiB/s"),
            format!("{:.0} %", ratio * 100.0),
            ">= 80 %",
            Verdict::of(ratio >= 0.80),
        );
        self.rep.row(
            "bare splice relay, no guard (for comparison)",
            format!("{d:.0} MiB/s"),
            format!("{f:.0} MiB/s"),
            format!("{:.0} %", f / d * 100.0),
            "",
            Verdict::Info,
        );
        self.rep.results.insert(
            "bulk".into(),
            json!({ "bytes_per_transfer": bytes, "direct_mib_per_s": rates[0],
                    "guard_mib_per_s": rates[1], "bare_relay_mib_per_s": rates[2],
                    "median_ratio": ratio, "bare_relay_ratio": f / d,
                    "guard_vs_bare_relay": g / f }),
        );
        Ok(())
    }

    /// On a freshly started daemon: its idle RSS, then its RSS (max of a few samples, KiB) while
    /// a hold worker keeps `n` guarded connections open.
    fn hold(&mut self, kind: &str, spec: Value, n: u64) -> Result<Value> {
        self.progress(&format!(
            "daemon RSS with {n} guarded {kind} held (fresh daemon)"
        ));
        self.daemon = self.env.restart_daemon()?;
        thread::sleep(Duration::from_secs(1));
        let (idle, _) = env::rss_kib(self.daemon)?;
        let before = self.env.redirected()?;
        let h = Holder::start(&self.env.cgroup(Side::Guard.cgroup()), &spec, WORKER_LIMIT)?;
        let held = h.held["held"].as_u64().unwrap_or(0);
        // `guard status` itself may fail while the daemon is out of file descriptors.
        match self.env.redirected() {
            Ok(after) if after.saturating_sub(before) < held => bail!(
                "only {} of the {held} held connections were redirected",
                after.saturating_sub(before)
            ),
            Ok(_) => {}
            Err(e) => self.rep.notes.push(format!(
                "guard status failed while {held} {kind} were held: {e:#}"
            )),
        }
        thread::sleep(Duration::from_millis(500));
        let (mut rss, mut hwm) = (0, 0);
        for _ in 0..5 {
            let (r, h) = env::rss_kib(self.daemon)?;
            rss = rss.max(r);
            hwm = hwm.max(h);
            thread::sleep(Duration::from_millis(100));
        }
        let active = self
            .env
            .status()
            .ok()
            .and_then(|s| s["counters"]["proxy"]["active"].as_u64());
        if active.is_some_and(|a| a < held) {
            let active = active.unwrap_or(0);
            self.rep.notes.push(format!(
                "while {held} {kind} were held the proxy counted only {active} active connections"
            ));
        }
        let secs = h.held["secs"].as_f64().unwrap_or(0.0);
        let first_error = h.held["first_error"].as_str().map(str::to_string);
        h.release()?;
        let (guard_col, verdict) = if held < n {
            self.rep.notes.push(format!(
                "{kind}: only {held} of {n} could be held (the daemon's open-file limit is {}): {}",
                env::nofile(self.daemon).map_or("?".into(), |v| v.to_string()),
                first_error.as_deref().unwrap_or("?")
            ));
            (
                format!("only {held} of {n} held, {}", mib(rss)),
                Verdict::Miss,
            )
        } else {
            (mib(rss), Verdict::of(rss <= 100 * 1024))
        };
        self.rep.row(
            format!("daemon RSS, {n} guarded {kind} held"),
            "-",
            guard_col,
            format!("+{} over idle", mib(rss.saturating_sub(idle))),
            "<= 100 MiB",
            verdict,
        );
        let out = json!({ "idle_kib": idle, "held_kib": rss, "hwm_kib": hwm, "active": active,
                          "held": held, "first_error": first_error, "open_secs": secs });
        Ok(out)
    }

    pub fn rss(
        &mut self,
        idle_kib: u64,
        servers: &Servers,
        fast_tls: Option<&Upstream>,
    ) -> Result<()> {
        let (after_load, hwm) = env::rss_kib(self.daemon)?;
        self.rep.row(
            "daemon RSS idle (fresh start)",
            "-",
            mib(idle_kib),
            "",
            "",
            Verdict::Info,
        );
        self.rep.row(
            "daemon RSS after the runs above (peak)",
            "-",
            format!("{} ({})", mib(after_load), mib(hwm)),
            "",
            "",
            Verdict::Info,
        );
        let n = 1000;
        let mut out = Map::new();
        out.insert("idle_kib".into(), json!(idle_kib));
        out.insert("after_load_kib".into(), json!(after_load));
        out.insert("after_load_hwm_kib".into(), json!(hwm));
        let tcp = json!({ "kind": "hold_tcp", "addr": servers.echo.to_string(), "n": n });
        out.insert(
            "held_tcp".into(),
            self.hold("TCP passthrough connections", tcp, n)?,
        );
        let mcp = json!({ "kind": "hold_mcp", "addr": servers.mcp.to_string(), "path": "/mcp",
                          "n": n, "tool": "echo", "args": { "text": "held" } });
        out.insert(
            "held_mcp".into(),
            self.hold("MCP sessions (HTTP keep-alive)", mcp, n)?,
        );
        if let Some(up) = fast_tls {
            let mut spec = json!({ "kind": "hold_mcp", "addr": up.addr.to_string(),
                                   "path": up.path, "n": n, "tool": "echo",
                                   "args": { "text": "held" } });
            spec["tls"] = json!({ "ca": self.env.guard_ca(), "resume": true });
            out.insert(
                "held_mcp_tls".into(),
                self.hold("MCP sessions over intercepted TLS", spec, n)?,
            );
        }
        self.rep.results.insert("rss".into(), Value::Object(out));
        Ok(())
    }
}
