//! `guard daemon`: started by [`bootstrap`] (kernel side, proxy, enforcement core), then it
//! serves the control socket ([`control`], answered by [`admin`]) and the metrics ([`metrics`]),
//! keeps agent cgroups tidy ([`agents`]), enrols `[[agents]]` at exec ([`enrol`]), reloads policies and saves rate-limit state
//! ([`policies`]) until SIGTERM.

mod admin;
mod agents;
mod bootstrap;
mod bundle;
mod contain;
pub mod control;
mod enrol;
mod metrics;
mod notify;
mod otel;
mod outbound;
mod policies;
pub mod stdio;

pub use admin::disable_offline;
pub use agents::{parse_agent_dir, valid_agent_name};
pub use bootstrap::{assemble, Enforcement};
pub use policies::load_policies;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::policies::policy_fingerprint;

use crate::{
    audit::{Audit, Decision, Event},
    config::Config,
    identity::Agents,
    kernel::Kernel,
    mcp::Engine,
    proxy::{named::Named, Stats},
};

pub struct Daemon {
    engine: Arc<Engine>,
    named: Arc<Named>,
    metrics: Arc<metrics::Metrics>,
    /// `[otel]`: the export, when an endpoint is configured.
    otel: Option<Arc<otel::Otel>>,
    saved_generation: AtomicU64,
    policies_fingerprint: Mutex<Vec<(String, u64, i64)>>,
    policy_state: Mutex<policies::PolicyState>,
    /// `policy.source`: signed bundles instead of `paths.policies`.
    source: Option<Arc<policies::Source>>,
    config: Config,
    config_source: String,
    cgroup_mount: PathBuf,
    attach_rel: String,
    attach_path: PathBuf,
    daemon_cgroup: String,
    kernel: Arc<Kernel>,
    agents: Arc<Agents>,
    audit: Arc<Audit>,
    stats: Arc<Stats>,
    listen: Vec<SocketAddr>,
    disabled: AtomicBool,
    next_agent: Arc<AtomicU64>,
    /// `[[agents]]`: processes enrolled at exec.
    enrol: Arc<enrol::Enrolment>,
    /// The exec hook's events, until [`Daemon::serve`] starts reading them.
    enrol_events: Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
    started: Instant,
    containment: contain::Containment,
    /// The containment programs' refusals, until [`Daemon::serve`] starts reading them.
    contained: Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
}

/// Every proxied connection holds two descriptors: lift the soft limit to the hard one (a
/// default soft limit of 1024 would cap guard at ~500 agent connections), and say so when even
/// that is short of `proxy.max_connections` (with the control socket's fixed share, files and
/// maps besides).
fn raise_nofile(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => tracing::warn!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}"),
        }
    }
    let needed = 2 * max_connections as u64 + control::Limits::default().total as u64 + 256;
    if limit < needed {
        tracing::warn!(
            "RLIMIT_NOFILE is {limit}: proxy.max_connections = {max_connections} needs about {needed} descriptors; raise LimitNOFILE (systemd) or lower proxy.max_connections"
        );
    }
}

pub fn run(config: Config, config_source: String) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("guard daemon must run as root: it loads eBPF programs and manages cgroups");
    }
    raise_nofile(config.proxy.max_connections);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (daemon, listeners) = bootstrap::start(config, config_source).await?;
        Arc::new(daemon).serve(listeners).await
    })
}

/// Characters that change how text around them is shown (bidi overrides and isolates,
/// zero-width ones): agent text shown to approvers goes without them.
pub fn misleading(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// How often the policy directory is checked for changes (SIGHUP reloads at once).
const POLICY_POLL: Duration = Duration::from_secs(2);
/// How often changed rate-limit counters are saved (also on a clean stop).
const RATE_LIMIT_SAVE: Duration = Duration::from_secs(1);
/// How often the host names of `server.match` entries are resolved again.
const NAMED_REFRESH: Duration = Duration::from_secs(60);

impl Daemon {
    async fn serve(self: Arc<Self>, listeners: bootstrap::Sockets) -> Result<()> {
        if let Some(addr) = self.config.metrics.addr() {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics.listen {addr}"))?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
            tokio::spawn(metrics::serve(self.clone(), l));
        }
        tokio::spawn(stdio::serve(
            listeners.stdio,
            Arc::new(stdio::Stdio {
                engine: self.engine.clone(),
                agents: self.agents.clone(),
                max_body: self.config.proxy.max_body.0 as usize,
                per_uid: stdio::PER_UID,
            }),
        ));
        // Control last: a daemon that answers `status` serves everything else already.
        tokio::spawn(control::serve(listeners.control, self.clone()));
        tokio::spawn(self.clone().reap());
        match crate::proxy::tls::upstream_config(&self.config.tls.extra_roots) {
            Ok(tls) => notify::start(
                self.config.approvals.notify.clone(),
                &self.engine,
                self.audit.clone(),
                Arc::new(tls),
            ),
            Err(e) => tracing::error!(
                "approvals.notify: no TLS settings, nobody is told of held calls: {e:#}"
            ),
        }
        if self.source.is_some() {
            tokio::spawn(self.clone().poll_source());
        }
        if let Some(ring) = self.contained.lock().unwrap().take() {
            tokio::spawn(self.clone().report_contained(ring));
        }
        if self.enrol.mode != enrol::Mode::Off {
            let ring = self.enrol_events.lock().unwrap().take();
            tokio::spawn(self.enrol.clone().run(ring));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut watch = tokio::time::interval(POLICY_POLL);
        let mut persist = tokio::time::interval(RATE_LIMIT_SAVE);
        let mut resolve = tokio::time::interval(NAMED_REFRESH);
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    self.reload_policies("SIGHUP");
                    self.refresh_named().await;
                }
                _ = resolve.tick() => self.refresh_named().await,
                _ = persist.tick() => {
                    self.audit.flush_summaries();
                    let generation = self.engine.limiter.generation();
                    if generation != self.saved_generation.swap(generation, Ordering::SeqCst) {
                        self.save_rate_limits();
                    }
                }
                _ = watch.tick(), if self.source.is_none() => {
                    let fp = policy_fingerprint(&self.config.paths.policies);
                    let changed = *self.policies_fingerprint.lock().unwrap() != fp;
                    if changed {
                        *self.policies_fingerprint.lock().unwrap() = fp;
                        self.reload_policies("file change");
                        self.refresh_named().await;
                    }
                }
            }
        };
        tracing::info!("{sig}: stopping; the pinned programs keep guarded connects away from the network until the daemon is back");
        // Held calls get an answer (denied), never a hang.
        let held = self.engine.approvals.shutdown();
        if held > 0 {
            tracing::info!("{held} held calls denied: the daemon is stopping");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.save_rate_limits();
        let mut r = self.audit.record(Event::DaemonStop, Decision::Enforce);
        r.reason = Some(sig.into());
        let _ = self.audit.write(&r);
        if let Some(o) = &self.otel {
            // What is queued (daemon_stop included) goes out, within a bound.
            o.flush(Duration::from_secs(3)).await;
        }
        let _ = std::fs::remove_file(&self.config.paths.control_socket);
        let _ = std::fs::remove_file(&self.config.paths.stdio_socket);
        Ok(())
    }
}
