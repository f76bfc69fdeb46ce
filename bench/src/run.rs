//! One benchmark run: set up, measure each thing directly and through guard (same client code,
//! same server, same run; the sides alternate direct/guard/guard/direct to cancel drift), tear
//! down, print the table and write the JSON.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::{
    env::{self, BenchEnv},
    machine::{self, loadavg},
    measure::{Bench, Targets},
    policy,
    report::{Report, Verdict},
    servers::Servers,
    upstreams::{self, mcp_policy, RealPeer, Upstream},
    worker,
};

pub struct Opts {
    pub guard: PathBuf,
    pub out: PathBuf,
    pub quick: bool,
    pub repo: PathBuf,
    /// The daemon's RLIMIT_NOFILE soft limit; None: this process's (raised to its hard limit).
    pub daemon_nofile: Option<u64>,
    /// Run only these groups of measurements (None: all); see `GROUPS`.
    pub only: Option<Vec<String>>,
}

/// The groups of measurements `--only` selects from.
pub const GROUPS: &[&str] = &[
    "policy", "mcp", "echo", "conn", "tls", "real", "connect", "contain", "enrol", "stdio", "bulk",
    "rss",
];

impl Opts {
    fn wants(&self, group: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|g| g == group))
    }
}

fn tls_available(guard: &Path) -> bool {
    Command::new(guard)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim_start().starts_with("ca "))
        })
        .unwrap_or(false)
}

pub fn run(opts: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "guard-bench must run as root: it loads eBPF programs and creates cgroups \
             (run `sudo cargo xtask bench`)"
        );
    }
    let started = Instant::now();
    worker::raise_nofile();
    let mount = guard::kernel::cgroup::cgroup2_mount()?;
    env::remove_stale(&mount);

    let mut rep = Report {
        machine: machine::machine(opts),
        ..Default::default()
    };
    // In-process, before anything else runs.
    if opts.wants("policy") {
        policy::rows(&mut rep, opts.quick)?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    env::install_signal_teardown(&rt);
    // The servers keep running on the runtime's threads after block_on returns.
    let servers = rt.block_on(Servers::start())?;
    let mut setup = prepare(opts, &mount, &servers, &mut rep)?;

    let nginx = if opts.wants("mcp") {
        match crate::nginx::Nginx::start(
            &setup.env.dir.join("nginx"),
            &setup.env.cgroup("nginx"),
            servers.mcp,
        ) {
            Ok(n) => Some(n),
            Err(e) => {
                rep.notes.push(format!("nginx not measured: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let mut b = Bench {
        env: &mut setup.env,
        started,
        daemon: setup.daemon,
        quick: opts.quick,
        rep,
        nginx,
    };
    let measured = measure(
        opts,
        &mut b,
        &servers,
        &setup.real,
        setup.idle_kib,
        setup.tls,
    );
    let mut rep = collect(b, &measured);
    // The real servers (in the `peers` cgroup) stop before the environment's teardown removes
    // its cgroups.
    drop(setup.real);
    drop(setup.env);
    env::teardown();
    rt.shutdown_timeout(Duration::from_secs(2));

    finish(opts, &mut rep, started)?;
    measured
}

/// What `prepare` set up: the environment with its daemon running, and the upstreams.
struct Setup {
    env: BenchEnv,
    /// The real MCP servers that started.
    real: Vec<RealPeer>,
    daemon: u32,
    /// The daemon's RSS before any load, KiB.
    idle_kib: u64,
    /// Whether this guard intercepts TLS (it has `guard ca` and made its CA).
    tls: bool,
}

/// The benchmark environment, the real upstreams and their policies, and the daemon.
fn prepare(opts: &Opts, mount: &Path, servers: &Servers, rep: &mut Report) -> Result<Setup> {
    let mut env = BenchEnv::new(&opts.guard, mount, &servers.tls_ca_pem)?;
    env.daemon_nofile = opts.daemon_nofile;
    eprintln!(
        "guard-bench: cgroups under {}, pins in {}, proxy port {}",
        env.root.display(),
        env.pin_dir.display(),
        env.port
    );
    let real = if opts.wants("real") {
        upstreams::start_real(&env, &opts.repo, &mut rep.notes)
    } else {
        Vec::new()
    };
    env.write_policy("bench-fast.json", &mcp_policy("bench-fast", servers.mcp))?;
    env.write_policy(
        "bench-fast-tls.json",
        &mcp_policy("bench-fast-tls", servers.tls_mcp),
    )?;
    for r in &real {
        env.write_policy(&format!("{}.json", r.key), &mcp_policy(r.key, r.up.addr))?;
    }
    env.write_policy("bench-stdio.json", &crate::upstreams::stdio_policy())?;
    let daemon = env.start_daemon()?;
    let nofile = env::nofile(daemon).unwrap_or(0);
    rep.machine.insert("daemon_nofile".into(), json!(nofile));
    if nofile < 2_100 {
        rep.notes.push(format!(
            "the daemon may open only {nofile} files: each guarded connection takes two \
             (agent side and upstream)"
        ));
    }
    thread::sleep(Duration::from_secs(1));
    let (idle_kib, _) = env::rss_kib(daemon)?;
    let tls = tls_available(&opts.guard) && env.guard_ca().exists();
    Ok(Setup {
        env,
        real,
        daemon,
        idle_kib,
        tls,
    })
}

/// Every selected group of measurements through the daemon, in order (`rss` last: it restarts
/// the daemon).
fn measure(
    opts: &Opts,
    b: &mut Bench,
    servers: &Servers,
    real: &[RealPeer],
    idle_kib: u64,
    tls: bool,
) -> Result<()> {
    let fast = Upstream::local_via_nginx(servers.mcp, "/mcp");
    let fast_sse = Upstream::local_via_nginx(servers.mcp, "/mcp-sse");
    let fast_tls = Upstream::local(servers.tls_mcp);
    if opts.wants("mcp") {
        b.mcp(
            "mcp_fast",
            "fast upstream",
            &fast,
            // One client for 15 s a round (30 s a side): the tail shows stalls.
            &[(1, None, 15.0), (16, None, 1.0), (64, None, 1.0)],
            false,
            Some(Targets {
                median_us: 100,
                p99_us: Some(1000),
            }),
        )?;
        b.mcp(
            "mcp_fast_sse",
            "fast upstream, SSE answers",
            &fast_sse,
            &[(1, None, 15.0), (16, None, 1.0), (64, None, 1.0)],
            false,
            None,
        )?;
        sse_row(b);
    }
    if opts.wants("echo") {
        b.echo_rtt(servers.echo)?;
    }
    if opts.wants("conn") {
        b.per_connection(
            "conn_plain",
            "new connection per call, plain HTTP",
            &fast,
            1000,
            None,
            None,
        )?;
    }
    if opts.wants("tls") {
        measure_tls(b, &fast_tls, tls)?;
    }
    measure_real(b, real)?;
    if opts.wants("connect") {
        b.connect(servers.accept)?;
    }
    if opts.wants("contain") {
        b.containment(servers.accept)?;
    }
    if opts.wants("enrol") {
        b.enrolment()?;
    }
    if opts.wants("stdio") {
        b.stdio()?;
    }
    if opts.wants("bulk") {
        b.bulk(servers.sink, servers.relay)?;
    }
    if opts.wants("rss") {
        b.rss(idle_kib, servers, tls.then_some(&fast_tls))?;
    }
    Ok(())
}

/// The SSE answer path's daemon CPU per call against the JSON path's (target: 1.5x).
fn sse_row(b: &mut Bench) {
    let cpu = |k: &str| b.rep.results[k]["daemon_cpu_us_per_call"].as_f64();
    let (Some(json), Some(sse)) = (cpu("mcp_fast"), cpu("mcp_fast_sse")) else {
        return;
    };
    let ratio = sse / json.max(0.001);
    b.rep.row(
        "daemon CPU per tools/call, SSE answers against JSON answers",
        "-",
        format!("{sse:.1} / {json:.1} µs"),
        format!("{ratio:.2}x"),
        "<= 1.5x",
        Verdict::of(ratio <= 1.5),
    );
}

/// The TLS interception group, or a row saying why it was not measured.
fn measure_tls(b: &mut Bench, fast_tls: &Upstream, tls: bool) -> Result<()> {
    if !tls {
        b.rep.row(
            "tools/call through TLS interception",
            "-",
            "no TLS interception in this guard (no `guard ca`)",
            "",
            "<= +300 µs (resumed)",
            Verdict::NotMeasured,
        );
        return Ok(());
    }
    b.mcp(
        "mcp_fast_tls",
        "TLS intercepted, fast upstream",
        fast_tls,
        &[(1, Some(3000), 60.0), (16, None, 1.0)],
        true,
        Some(Targets {
            median_us: 300,
            p99_us: None,
        }),
    )?;
    b.per_connection(
        "conn_tls_full",
        "new TLS connection per call, full handshake",
        fast_tls,
        400,
        Some(false),
        None,
    )?;
    b.per_connection(
        "conn_tls_resumed",
        "new TLS connection per call, resumed session",
        fast_tls,
        1000,
        Some(true),
        Some(300),
    )
}

/// The real MCP servers that started (for information: no targets).
fn measure_real(b: &mut Bench, real: &[RealPeer]) -> Result<()> {
    for r in real {
        b.mcp(
            r.key,
            r.label,
            &r.up,
            &[(1, Some(400), 3.0), (16, None, 1.5)],
            false,
            None,
        )?;
        let d50 = b.rep.results[r.key]["c1"]["direct"]["latency"]["p50_us"]
            .as_f64()
            .unwrap_or(0.0);
        if d50 > 30_000.0 {
            b.rep.notes.push(format!(
                "{}: {:.0} ms a call even directly: the server writes the response head \
                 and body in two sends without TCP_NODELAY, so the body waits for the client's \
                 delayed ACK (Nagle, ~40 ms); the same with and without guard",
                r.label,
                d50 / 1000.0
            ));
        }
    }
    Ok(())
}

/// The report, with the daemon's counters, the audit log's size and, when the measurements
/// failed, why (and the daemon's log on stderr).
fn collect(b: Bench, measured: &Result<()>) -> Report {
    let status = b.env.status().ok();
    let mut rep = b.rep;
    if let Some(s) = status {
        rep.results
            .insert("daemon_counters".into(), s["counters"].clone());
    }
    if let Ok(meta) = fs::metadata(b.env.audit_log()) {
        rep.results
            .insert("audit_log_bytes".into(), json!(meta.len()));
    }
    if let Err(e) = measured {
        eprintln!("guard-bench: daemon log:\n{}", b.env.daemon_log());
        rep.notes.push(format!("run FAILED: {e:#}"));
    }
    rep
}

/// After teardown: the end of the machine description, the table on stdout and the JSON file
/// (nothing when interrupted).
fn finish(opts: &Opts, rep: &mut Report, started: Instant) -> Result<()> {
    if env::interrupted() {
        bail!("interrupted: nothing reported");
    }
    let load_end = loadavg();
    rep.machine.insert("loadavg_at_end".into(), json!(load_end));
    rep.machine.insert(
        "run_seconds".into(),
        json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
    );
    let load1: f64 = load_end
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if load1 > 2.5 {
        rep.notes.push(format!(
            "load average {load_end} at the end (this run alone makes about 2): other work on \
             the machine skews these numbers"
        ));
    }
    print!("{}", rep.text());
    if let Some(dir) = opts.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&opts.out, serde_json::to_string_pretty(&rep.json())? + "\n")
        .with_context(|| format!("writing {}", opts.out.display()))?;
    println!("results: {}", opts.out.display());
    Ok(())
}
