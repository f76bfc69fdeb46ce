//! `guard daemon`: sets up the kernel side, runs the proxy and the control socket, keeps agent
//! cgroups tidy.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::{
    audit::{AgentRef, Audit},
    cgroup,
    config::{Config, UdpMode},
    control::{self, Handler, Peer, Request, Response},
    http::{Enforcer, HttpSettings},
    identify::{AgentCgroup, Agents, Identity},
    pins::Pins,
    policy::PolicySet,
    proxy::{self, Proxy, Stats},
    redirect::{self, Kernel, Settings},
    tls::{CaFiles, Interceptor},
};

const REAP_INTERVAL: Duration = Duration::from_millis(200);

pub struct Daemon {
    enforcer: Arc<Enforcer>,
    saved_generation: AtomicU64,
    policies_fingerprint: Mutex<Vec<(String, u64, i64)>>,
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
    next_agent: AtomicU64,
    started: Instant,
}

/// Agent names end up in cgroup names, audit records and policy grants.
pub fn valid_agent_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `agent-NAME-N` -> (NAME, N)
pub fn parse_agent_dir(dir: &str) -> Option<(String, u64)> {
    let rest = dir.strip_prefix("agent-")?;
    let (name, n) = rest.rsplit_once('-')?;
    let n = n.parse().ok()?;
    valid_agent_name(name).then(|| (name.to_string(), n))
}

/// Every proxied connection holds two descriptors: lift the soft limit to the hard one (a
/// default soft limit of 1024 would cap guard at ~500 agent connections).
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
    }
}

pub fn run(config: Config, config_source: String) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("guard daemon must run as root: it loads eBPF programs and manages cgroups");
    }
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (daemon, control_listener) = start(config, config_source).await?;
        Arc::new(daemon).serve(control_listener).await
    })
}

async fn start(
    config: Config,
    config_source: String,
) -> Result<(Daemon, tokio::net::UnixListener)> {
    let cgroup_mount = cgroup::cgroup2_mount()?;
    let attach_rel = config.attach_cgroup_rel().to_string();
    let attach_path = cgroup_mount.join(&attach_rel);
    if attach_rel.is_empty() {
        tracing::warn!(
            "attaching at the cgroup v2 root ({}): every process on this host runs guard's programs",
            cgroup_mount.display()
        );
    }
    cgroup::create(&attach_path)?;
    let daemon_cgroup = cgroup::cgroup_of(std::process::id())?;
    let daemon_cgroup_id = cgroup::cgroup_id(&cgroup_mount.join(&daemon_cgroup))?;
    if under(&daemon_cgroup, &attach_rel) {
        let procs = std::fs::read_to_string(cgroup_mount.join(&daemon_cgroup).join("cgroup.procs"))
            .unwrap_or_default();
        if procs.lines().count() > 1 {
            tracing::warn!(
                "the daemon's cgroup /{daemon_cgroup} holds other processes; they are never guarded. Run the daemon in a cgroup of its own (systemd does)"
            );
        }
    }
    std::fs::create_dir_all(&config.paths.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.paths.state_dir.display()
        )
    })?;
    let audit = Arc::new(Audit::open_rotating(
        &config.paths.audit_log,
        crate::audit::Rotation {
            max_size: config.audit.max_size.0,
            keep: config.audit.keep,
        },
    )?);
    // Invalid policies stop the start, before anything is attached.
    let policies = load_policies(&config.paths.policies)?;
    let listeners = proxy::bind(config.proxy.listen_port).await?;
    let listen: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let control_listener = control::bind(&config.paths.control_socket)?;

    let settings = Settings {
        proxy_port: config.proxy.listen_port,
        udp_mode: match config.scope.udp {
            UdpMode::DnsOnly => guard_common::UDP_DNS_ONLY,
            UdpMode::Allow => guard_common::UDP_ALLOW,
            UdpMode::Deny => guard_common::UDP_DENY,
        },
        daemon_cgroup_id,
        host_netns_cookie: redirect::own_netns_cookie()?,
        attach_level: cgroup::level(&attach_rel),
    };
    let mut kernel = Kernel::load(&config.paths.bpffs, settings)?;
    kernel.set_uids(&config.scope.guarded_uids)?;
    kernel.set_exempt(&config.scope.exempt)?;
    let dns = config
        .scope
        .dns_server_addrs(Path::new("/etc/resolv.conf"))?;
    if let Some(d) = &dns {
        tracing::info!(servers = ?d, "guarded DNS only to these servers (scope.dns_servers)");
    }
    kernel.set_dns_servers(dns.as_deref())?;

    // The guarded-cgroup map becomes: configured cgroups + agent cgroups still in use.
    let agents = Arc::new(Agents::default());
    let mut want: Vec<u64> = Vec::new();
    for g in &config.scope.guarded_cgroups {
        let rel = g.trim_matches('/');
        if !under(rel, &attach_rel) {
            tracing::warn!(
                "guarded cgroup /{rel} is outside the attach point /{attach_rel}: its processes run no guard program (set scope.attach_cgroup = \"/\" for host-wide enrolment)"
            );
        }
        match cgroup::cgroup_id(&cgroup_mount.join(rel)) {
            Ok(id) => want.push(id),
            Err(e) => tracing::warn!("guarded cgroup /{rel} is not usable: {e:#}"),
        }
    }
    let mut next_agent = 1;
    for entry in std::fs::read_dir(&attach_path)?.flatten() {
        let dir = entry.file_name().to_string_lossy().into_owned();
        let Some((name, n)) = parse_agent_dir(&dir) else {
            continue;
        };
        next_agent = next_agent.max(n + 1);
        let path = entry.path();
        if cgroup::populated(&path).unwrap_or(false) {
            let id = cgroup::cgroup_id(&path)?;
            want.push(id);
            agents.insert(AgentCgroup {
                name,
                cgroup: format!("{attach_rel}/{dir}")
                    .trim_start_matches('/')
                    .to_string(),
                id,
            });
        } else if let Err(e) = cgroup::remove(&path) {
            tracing::warn!("removing empty agent cgroup {}: {e}", path.display());
        }
    }
    for id in kernel.guarded_cgroups() {
        if !want.contains(&id) {
            kernel.unguard_cgroup(id)?;
        }
    }
    for id in &want {
        kernel.guard_cgroup(*id)?;
    }

    let done = kernel.attach(&attach_path)?;
    let kernel = Arc::new(kernel);
    tracing::info!(
        attach = %attach_path.display(),
        newly_attached = done.attached,
        reused = done.reused,
        updated = done.updated,
        removed = done.removed,
        proxy = ?listen,
        "guard is enforcing"
    );
    let mut r = audit.record("daemon_start", "enforce");
    r.detail = Some(json!({
        "config": config_source,
        "attach_cgroup": attach_path.display().to_string(),
        "programs_attached": done.attached,
        "programs_reused": done.reused,
        "programs_updated": done.updated,
        "stale_links_removed": done.removed,
        "pid": std::process::id(),
    }));
    audit.write(&r)?;

    let stats = Arc::new(Stats::default());
    let enforcer = Arc::new(Enforcer::new(
        policies,
        Pins::new(&config.paths.state_dir),
        audit.clone(),
        HttpSettings {
            max_body: config.proxy.max_body.0 as usize,
            max_header: 64 * 1024,
            header_timeout: Duration::from_secs(config.proxy.header_timeout_s),
            unknown_servers: config.policy.unknown_servers,
            denial: config.policy.denial,
            log_arguments: config.audit.log_arguments,
        },
    ));
    let interceptor = Arc::new(
        Interceptor::load(
            &CaFiles::new(&config.paths.state_dir),
            &config.tls.extra_roots,
        )
        .context("setting up TLS interception")?,
    );
    restore_rate_limits(&enforcer, &config.paths.state_dir);
    enforcer.set_named(crate::http::resolve_named(&enforcer.policies()).await);
    let proxy = Arc::new(Proxy {
        capacity: Arc::new(tokio::sync::Semaphore::new(
            config.proxy.max_connections.max(1),
        )),
        interceptor,
        intercept: config.tls.intercept,
        kernel: kernel.clone(),
        agents: agents.clone(),
        audit: audit.clone(),
        stats: stats.clone(),
        enforcer: enforcer.clone(),
        other: config.proxy.other,
        workers: Arc::new(proxy::Workers::start(config.proxy.threads)?),
    });
    for l in listeners {
        proxy.clone().start(l)?;
    }
    let daemon = Daemon {
        saved_generation: AtomicU64::new(enforcer.limiter.generation()),
        enforcer,
        policies_fingerprint: Mutex::new(policy_fingerprint(&config.paths.policies)),
        config,
        config_source,
        cgroup_mount,
        attach_rel,
        attach_path,
        daemon_cgroup,
        kernel,
        agents,
        audit,
        stats,
        listen,
        disabled: AtomicBool::new(false),
        next_agent: AtomicU64::new(next_agent),
        started: Instant::now(),
    };
    Ok((daemon, control_listener))
}

/// How often the policy directory is checked for changes (SIGHUP reloads at once).
const POLICY_POLL: Duration = Duration::from_secs(2);
/// How often changed rate-limit counters are saved (also on a clean stop).
const RATE_LIMIT_SAVE: Duration = Duration::from_secs(1);
/// How often the host names of `server.match` entries are resolved again.
const NAMED_REFRESH: Duration = Duration::from_secs(60);

/// The policy set of `dir`; a missing directory is an empty set (every MCP server unknown).
pub fn load_policies(dir: &Path) -> Result<PolicySet> {
    if !dir.exists() {
        tracing::warn!(
            "policy directory {} does not exist: no MCP server is known (policy.unknown_servers applies to all)",
            dir.display()
        );
        return PolicySet::from_files(&[]).map_err(|_| anyhow::anyhow!("empty policy set"));
    }
    PolicySet::load_dir(dir).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!(
            "invalid policies in {} ({} errors):\n  {}",
            dir.display(),
            list.len(),
            list.join("\n  ")
        )
    })
}

/// Names, sizes and modification times of the policy files: a change means a reload.
fn policy_fingerprint(dir: &Path) -> Vec<(String, u64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut v: Vec<(String, u64, i64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                m.size(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
            ))
        })
        .collect();
    v.sort();
    v
}

/// Puts back the rate-limit counters of the previous run, so a restart does not reset limits.
fn restore_rate_limits(enforcer: &Enforcer, state_dir: &Path) {
    let path = state_dir.join("rate-limits.json");
    let Ok(data) = std::fs::read(&path) else {
        return;
    };
    match serde_json::from_slice::<Vec<crate::policy::SavedCounter>>(&data) {
        Ok(saved) => {
            enforcer.limiter.restore(
                &saved,
                std::time::Instant::now(),
                std::time::SystemTime::now(),
            );
            tracing::info!(counters = saved.len(), "restored rate-limit counters");
        }
        Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
    }
}

/// Whether cgroup `rel` is `base` or below it (both relative to the mount).
fn under(rel: &str, base: &str) -> bool {
    let rel = rel.trim_matches('/');
    let base = base.trim_matches('/');
    base.is_empty() || rel == base || rel.starts_with(&format!("{base}/"))
}

impl Daemon {
    async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) -> Result<()> {
        if let Some(addr) = self.config.metrics.addr() {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics.listen {addr}"))?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
            tokio::spawn(self.clone().serve_metrics(l));
        }
        // Control last: a daemon that answers `status` serves everything else already.
        tokio::spawn(control::serve(listener, self.clone()));
        tokio::spawn(self.clone().reap());
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
                    let generation = self.enforcer.limiter.generation();
                    if generation != self.saved_generation.swap(generation, Ordering::SeqCst) {
                        self.save_rate_limits();
                    }
                }
                _ = watch.tick() => {
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
        let held = self.enforcer.approvals.shutdown();
        if held > 0 {
            tracing::info!("{held} held calls denied: the daemon is stopping");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.save_rate_limits();
        let mut r = self.audit.record("daemon_stop", "enforce");
        r.reason = Some(sig.into());
        let _ = self.audit.write(&r);
        let _ = std::fs::remove_file(&self.config.paths.control_socket);
        Ok(())
    }

    async fn serve_metrics(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
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

    fn render_metrics(&self) -> String {
        let k = self.kernel.counters();
        let p = self.stats.snapshot();
        let kc = |n: &str| k.get(n).copied().unwrap_or(0);
        let refused: u64 = k
            .iter()
            .filter(|(n, _)| n.starts_with("refused_"))
            .map(|(_, v)| v)
            .sum();
        self.audit.metrics().render(
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
                    self.enforcer.approvals.len() as u64,
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
            ],
        )
    }

    /// Re-resolves the addresses the policies' servers name (names move).
    async fn refresh_named(&self) {
        let named = crate::http::resolve_named(&self.enforcer.policies()).await;
        self.enforcer.set_named(named);
    }

    /// Writes the rate-limit counters to the state directory (atomically: temp file + rename).
    fn save_rate_limits(&self) {
        let saved = self
            .enforcer
            .limiter
            .snapshot(std::time::Instant::now(), std::time::SystemTime::now());
        let path = self.config.paths.state_dir.join("rate-limits.json");
        let tmp = path.with_extension("json.tmp");
        let result = serde_json::to_vec(&saved)
            .map_err(anyhow::Error::from)
            .and_then(|data| std::fs::write(&tmp, data).map_err(Into::into))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(Into::into));
        if let Err(e) = result {
            tracing::error!("saving rate-limit counters to {}: {e:#}", path.display());
        }
    }

    /// Loads the policy directory again; an invalid set is refused and the last good one stays.
    fn reload_policies(&self, why: &str) {
        let dir = &self.config.paths.policies;
        let mut r = self.audit.record("policy_reload", "applied");
        r.detail = Some(json!({ "trigger": why, "dir": dir.display().to_string() }));
        match load_policies(dir) {
            Ok(set) => {
                let names: Vec<String> = set.servers().iter().map(|s| s.name.clone()).collect();
                tracing::info!(servers = ?names, "{why}: policies reloaded");
                r.detail.as_mut().unwrap()["servers"] = json!(names);
                self.enforcer.set_policies(set);
            }
            Err(e) => {
                tracing::error!(
                    "{why}: policies NOT reloaded, the last good set stays in force:\n{e:#}"
                );
                r.decision = "rejected".into();
                r.reason = Some(format!("{e:#}"));
            }
        }
        let _ = self.audit.write(&r);
    }

    /// Removes agent cgroups once their last process is gone.
    async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        loop {
            tick.tick().await;
            for a in self.agents.all() {
                let path = self.cgroup_mount.join(&a.cgroup);
                if cgroup::populated(&path).unwrap_or(false) {
                    continue;
                }
                self.agents.remove(a.id);
                if let Err(e) = self.kernel.unguard_cgroup(a.id) {
                    tracing::warn!("unguarding {}: {e:#}", a.cgroup);
                }
                if let Err(e) = cgroup::remove(&path) {
                    tracing::warn!("removing {}: {e}", path.display());
                }
                let mut r = self.audit.record("agent_exit", "enforce");
                r.detail = Some(json!({"agent": a.name, "cgroup": format!("/{}", a.cgroup)}));
                let _ = self.audit.write(&r);
            }
        }
    }

    fn exec(&self, peer: Peer, agent: String) -> Result<serde_json::Value> {
        if !valid_agent_name(&agent) {
            bail!("invalid agent name `{agent}`: use 1-64 letters, digits, `_`, `.` or `-`, starting with a letter or digit");
        }
        if self.disabled.load(Ordering::SeqCst) {
            bail!("guard is disabled on this host (guard disable); restart the daemon to enforce again");
        }
        let caller_cgroup = cgroup::cgroup_of(peer.pid)?;
        let current = self.agents.containing(&caller_cgroup);
        if current.is_none() && self.is_guarded(&peer) {
            // A process guarded by uid or by a configured cgroup must not pick a name (and the
            // grants that come with it).
            bail!("a guarded process cannot start an agent under a name of its choosing");
        }
        if let Some(current) = current {
            // A guarded agent must not re-enrol under another name (and another name's grants).
            if current.name != agent {
                bail!(
                    "this process is already guarded as agent `{}`; it cannot become `{agent}`",
                    current.name
                );
            }
            return Ok(
                json!({"agent": agent, "cgroup": format!("/{}", current.cgroup), "moved": false}),
            );
        }
        let n = self.next_agent.fetch_add(1, Ordering::SeqCst);
        let dir = format!("agent-{agent}-{n}");
        let rel = format!("{}/{dir}", self.attach_rel)
            .trim_start_matches('/')
            .to_string();
        let path = self.attach_path.join(&dir);
        cgroup::create(&path)?;
        let id = cgroup::cgroup_id(&path)?;
        // Guarded before the process arrives, so not one connect slips through.
        let moved = self
            .kernel
            .guard_cgroup(id)
            .and_then(|()| cgroup::move_pid(&path, peer.pid));
        if let Err(e) = moved {
            let _ = self.kernel.unguard_cgroup(id);
            let _ = cgroup::remove(&path);
            return Err(e);
        }
        self.agents.insert(AgentCgroup {
            name: agent.clone(),
            cgroup: rel.clone(),
            id,
        });
        let mut r = self.audit.record("agent_start", "enforce");
        r.actor_uid = Some(peer.uid);
        r.agent = Some(AgentRef::from(&Identity {
            pid: peer.pid,
            tgid: peer.pid,
            uid: peer.uid,
            gid: peer.gid,
            agent: Some(agent.clone()),
            cgroup: Some(format!("/{rel}")),
            exe: std::fs::read_link(format!("/proc/{}/exe", peer.pid))
                .ok()
                .map(|p| p.display().to_string()),
            comm: std::fs::read_to_string(format!("/proc/{}/comm", peer.pid))
                .unwrap_or_default()
                .trim()
                .to_string(),
            ..Default::default()
        }));
        self.audit.write(&r)?;
        Ok(
            json!({"agent": agent, "cgroup": format!("/{rel}"), "cgroup_id": id, "moved": true,
                  "ca_bundle": CaFiles::new(&self.config.paths.state_dir).bundle}),
        )
    }

    fn status(&self) -> Result<serde_json::Value> {
        let programs = if self.disabled.load(Ordering::SeqCst) {
            Default::default()
        } else {
            redirect::attached_programs(&self.attach_path)?
        };
        let attached: usize = programs.values().map(|v| v.len()).sum();
        let agents = self.agents.all();
        let guarded: Vec<serde_json::Value> = self
            .kernel
            .guarded_cgroups()
            .into_iter()
            .map(|id| {
                let agent = agents.iter().find(|a| a.id == id);
                json!({
                    "id": id,
                    "cgroup": agent.map(|a| format!("/{}", a.cgroup)),
                    "agent": agent.map(|a| a.name.clone()),
                })
            })
            .collect();
        let mut uids = self.kernel.guarded_uids();
        uids.sort_unstable();
        let kernel = self.kernel.counters();
        let proxy = self.stats.snapshot();
        let refused: u64 = kernel
            .iter()
            .filter(|(k, _)| k.starts_with("refused_"))
            .map(|(_, v)| v)
            .sum();
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "config": self.config_source,
            "enforcing": !self.disabled.load(Ordering::SeqCst),
            "cgroup_mount": self.cgroup_mount.display().to_string(),
            "attach_cgroup": self.attach_path.display().to_string(),
            "daemon_cgroup": format!("/{}", self.daemon_cgroup),
            "pin_dir": self.config.paths.bpffs.display().to_string(),
            "policies": self.config.paths.policies.display().to_string(),
            "programs": programs,
            "programs_attached": attached,
            "proxy": self.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "audit_log": self.audit.path().display().to_string(),
            "guarded_cgroups": guarded,
            "guarded_uids": uids,
            "agents": agents,
            "counters": {
                "redirected": kernel.get("redirected").copied().unwrap_or(0),
                "passed_through": proxy.passed_through,
                "origin_missing": proxy.origin_missing,
                "refused": refused,
                "kernel": kernel,
                "proxy": proxy,
            },
        }))
    }

    /// Root, or a member of `guard.approvers_group` (by the caller's real groups, from /proc).
    fn may_approve(&self, peer: &Peer) -> std::result::Result<(), String> {
        // An agent must never answer its own (or another agent's) held calls.
        if self.is_guarded(peer) {
            return Err("a guarded process cannot answer approvals".into());
        }
        if peer.uid == 0 {
            return Ok(());
        }
        let group = &self.config.guard.approvers_group;
        let gid = match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => g.gid.as_raw(),
            _ => {
                return Err(format!(
                    "only root may answer approvals (the approvers group `{group}` does not exist)"
                ))
            }
        };
        let mut groups = vec![peer.gid];
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", peer.pid)) {
            if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Groups:")) {
                groups.extend(
                    line.split_whitespace()
                        .filter_map(|g| g.parse::<u32>().ok()),
                );
            }
        }
        if groups.contains(&gid) {
            Ok(())
        } else {
            Err(format!(
                "only root and members of `{group}` may answer approvals (you are uid {})",
                peer.uid
            ))
        }
    }

    /// The kernel's rule, seen from here: a guarded uid, or a cgroup (or ancestor) in the
    /// guarded set. Unknown means guarded.
    fn is_guarded(&self, peer: &Peer) -> bool {
        if self.kernel.guarded_uids().contains(&peer.uid) {
            return true;
        }
        let Ok(rel) = cgroup::cgroup_of(peer.pid) else {
            return true;
        };
        let guarded = self.kernel.guarded_cgroups();
        let mut path = self.cgroup_mount.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path.push(part);
            match cgroup::cgroup_id(&path) {
                Ok(id) if guarded.contains(&id) => return true,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        false
    }

    fn answer(
        &self,
        peer: Peer,
        id: &str,
        approve: Option<Option<u64>>,
        deny: Option<Option<String>>,
    ) -> Result<serde_json::Value> {
        let approvals = &self.enforcer.approvals;
        if peer.uid != 0 && approvals.uid_of(id) == Some(peer.uid) {
            // Any unguarded process of the agent's own user could otherwise approve its calls.
            let mut r = self.audit.record("control", "deny");
            r.actor_uid = Some(peer.uid);
            r.method = Some("approve".into());
            r.reason = Some("an approver cannot answer calls of their own uid".into());
            self.audit.write(&r)?;
            bail!(
                "you cannot answer a call made by your own uid ({}); ask another approver",
                peer.uid
            );
        }
        let (held, decision, detail) = match (approve, deny) {
            (Some(for_s), _) => {
                let standing = for_s.map(Duration::from_secs);
                let held = approvals.approve(id, peer.uid, standing)?;
                (
                    held,
                    "approved",
                    json!({ "approval_id": id, "for_s": for_s }),
                )
            }
            (None, Some(reason)) => {
                let reason =
                    reason.unwrap_or_else(|| format!("denied by an approver (uid {})", peer.uid));
                let held = approvals.deny(id, peer.uid, reason.clone())?;
                (
                    held,
                    "denied",
                    json!({ "approval_id": id, "reason": reason }),
                )
            }
            _ => bail!("nothing to answer"),
        };
        let mut r = self.audit.record("approval", decision);
        r.actor_uid = Some(peer.uid);
        r.tool = Some(held.tool.clone());
        r.server = Some(crate::audit::ServerRef {
            name: Some(held.server.clone()),
            host: String::new(),
            port: 0,
        });
        r.args_sha256 = Some(held.args_sha256.clone());
        r.detail = Some(detail);
        self.audit.write(&r)?;
        Ok(json!({ "id": id, "decision": decision, "tool": held.tool, "server": held.server }))
    }

    fn disable(&self, peer: Peer) -> Result<serde_json::Value> {
        let mut r = self.audit.record("disable", "fail_open");
        r.actor_uid = Some(peer.uid);
        if peer.uid != 0 {
            r.decision = "deny".into();
            r.reason = Some("only root may disable guard".into());
            self.audit.write(&r)?;
            bail!("only root may disable guard (you are uid {})", peer.uid);
        }
        // Audited before it takes effect.
        r.reason = Some("guard disable: every program detached, every pin removed".into());
        self.audit.write(&r)?;
        self.disabled.store(true, Ordering::SeqCst);
        let removed = redirect::unpin_all(&self.config.paths.bpffs)?;
        tracing::warn!("guard disabled by uid {}: {} pins removed; nothing is enforced until the daemon restarts", peer.uid, removed.len());
        Ok(json!({"removed": removed}))
    }
}

impl Handler for Daemon {
    async fn handle(&self, peer: Peer, request: Request) -> Response {
        let op = request.op();
        let allowed = match &request {
            Request::Exec { .. } | Request::Status => Ok(()),
            // disable() checks and audits its own refusals.
            Request::Disable => Ok(()),
            Request::Reload => {
                if peer.uid == 0 {
                    Ok(())
                } else {
                    Err(format!("only root may {op} (you are uid {})", peer.uid))
                }
            }
            Request::ApprovalsList | Request::Approve { .. } | Request::Deny { .. } => {
                self.may_approve(&peer)
            }
        };
        if let Err(why) = allowed {
            let mut r = self.audit.record("control", "deny");
            r.actor_uid = Some(peer.uid);
            r.method = Some(op.into());
            r.reason = Some(why.clone());
            let _ = self.audit.write(&r);
            return Response::err(why);
        }
        let result = match request {
            Request::Exec { agent } => self.exec(peer, agent),
            Request::Status => self.status(),
            Request::Disable => self.disable(peer),
            Request::Reload => {
                self.reload_policies(&format!("guard reload by uid {}", peer.uid));
                self.refresh_named().await;
                Ok(json!({ "reloaded": true }))
            }
            Request::ApprovalsList => Ok(json!({ "held": self.enforcer.approvals.list() })),
            Request::Approve { id, for_s } => self.answer(peer, &id, Some(for_s), None),
            Request::Deny { id, reason } => self.answer(peer, &id, None, Some(reason)),
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }
}

/// `guard disable` when no daemon answers: root unpins directly, and says so in the audit log.
pub fn disable_offline(config: &Config) -> Result<Vec<String>> {
    if !nix::unistd::geteuid().is_root() {
        bail!("only root may disable guard");
    }
    let audit = Audit::open(&config.paths.audit_log)?;
    let mut r = audit.record("disable", "fail_open");
    r.actor_uid = Some(0);
    r.reason = Some("guard disable (daemon not running): every pin removed".into());
    audit.write(&r)?;
    redirect::unpin_all(Path::new(&config.paths.bpffs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names() {
        assert!(valid_agent_name("research-bot"));
        assert!(valid_agent_name("a.b_c-1"));
        assert!(!valid_agent_name(""));
        assert!(!valid_agent_name("-x"));
        assert!(!valid_agent_name("a/b"));
        assert!(!valid_agent_name("../x"));
        assert!(!valid_agent_name(&"a".repeat(65)));
    }

    #[test]
    fn agent_dirs() {
        assert_eq!(parse_agent_dir("agent-bot-3"), Some(("bot".into(), 3)));
        assert_eq!(
            parse_agent_dir("agent-research-bot-12"),
            Some(("research-bot".into(), 12))
        );
        assert_eq!(parse_agent_dir("agent-bot"), None);
        assert_eq!(parse_agent_dir("other"), None);
    }

    #[test]
    fn under_attach_point() {
        assert!(under("guard.slice/agent-a-1", "guard.slice"));
        assert!(under("guard.slice", "guard.slice"));
        assert!(!under("guard.slicex", "guard.slice"));
        assert!(under("anything", ""));
    }
}
