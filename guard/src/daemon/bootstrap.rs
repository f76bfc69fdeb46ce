//! Starting the daemon: the attach point, the audit log, the policies (an invalid set stops the
//! start before anything is attached), the listeners, the kernel side, the agent cgroups a
//! previous run left, and the proxy around the enforcement core ([`assemble`], which tests use
//! too, around an [`Identify`] of their own).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::json;

use super::{
    agents::{parse_agent_dir, under},
    control,
    enrol::{Enrolment, Mode, Place},
    metrics::Metrics,
    policies::{load_policies, policy_fingerprint, restore_rate_limits},
    Daemon,
};
use crate::{
    audit::{Audit, Decision, Event},
    config::{Config, EnrolmentMode, UdpMode},
    identity::{AgentCgroup, Agents, Enrolments},
    kernel::{self, cgroup, Attached, Kernel, Settings},
    mcp::{self, pins::Pins, Engine},
    policy::PolicySet,
    proxy::{
        self,
        http::{HttpLayer, HttpSettings},
        identify::{Identify, KernelIdentify},
        named::{self, Named},
        tls::{CaFiles, Interceptor},
        PerAgent, Proxy, Stats, Workers,
    },
};

/// Where the daemon attaches, and where it runs itself.
struct AttachPoint {
    cgroup_mount: PathBuf,
    attach_rel: String,
    attach_path: PathBuf,
    daemon_cgroup: String,
    daemon_cgroup_id: u64,
}

fn attach_point(config: &Config) -> Result<AttachPoint> {
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
    Ok(AttachPoint {
        cgroup_mount,
        attach_rel,
        attach_path,
        daemon_cgroup,
        daemon_cgroup_id,
    })
}

/// Loads the programs and fills the maps the configuration describes (not attached yet).
fn load_kernel(config: &Config, at: &AttachPoint) -> Result<Kernel> {
    let settings = Settings {
        proxy_port: config.proxy.listen_port,
        udp_mode: match config.scope.udp {
            UdpMode::DnsOnly => guard_common::UDP_DNS_ONLY,
            UdpMode::Allow => guard_common::UDP_ALLOW,
            UdpMode::Deny => guard_common::UDP_DENY,
        },
        daemon_cgroup_id: at.daemon_cgroup_id,
        host_netns_cookie: kernel::sys::own_netns_cookie()?,
        attach_level: cgroup::level(&at.attach_rel),
    };
    let kernel = Kernel::load(&config.paths.bpffs, settings)?;
    kernel.set_uids(&config.scope.guarded_uids)?;
    kernel.set_exempt(&config.scope.exempt)?;
    let dns = config
        .scope
        .dns_server_addrs(Path::new("/etc/resolv.conf"))?;
    if let Some(d) = &dns {
        tracing::info!(servers = ?d, "guarded DNS only to these servers (scope.dns_servers)");
    }
    kernel.set_dns_servers(dns.as_deref())?;
    Ok(kernel)
}

/// Makes the guarded-cgroup map exactly: the configured cgroups plus the agent cgroups of an
/// earlier run that still hold processes (registered in `agents`; empty ones are removed).
/// Returns the next free agent number.
fn adopt_agents(
    kernel: &Kernel,
    config: &Config,
    at: &AttachPoint,
    agents: &Agents,
) -> Result<u64> {
    let mut want: Vec<u64> = Vec::new();
    for g in &config.scope.guarded_cgroups {
        let rel = g.trim_matches('/');
        if !under(rel, &at.attach_rel) {
            tracing::warn!(
                "guarded cgroup /{rel} is outside the attach point /{}: its processes run no guard program (set scope.attach_cgroup = \"/\" for host-wide enrolment)",
                at.attach_rel
            );
        }
        match cgroup::cgroup_id(&at.cgroup_mount.join(rel)) {
            Ok(id) => want.push(id),
            Err(e) => tracing::warn!("guarded cgroup /{rel} is not usable: {e:#}"),
        }
    }
    let mut next_agent = 1;
    for entry in std::fs::read_dir(&at.attach_path)?.flatten() {
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
                cgroup: format!("{}/{dir}", at.attach_rel)
                    .trim_start_matches('/')
                    .to_string(),
                id,
                pid: cgroup::procs(&path).first().copied().unwrap_or(0),
                how: "adopted".into(),
                ..Default::default()
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
    Ok(next_agent)
}

/// The `daemon_start` record: what was attached, reused, switched and removed.
fn audit_start(
    audit: &Audit,
    source: &str,
    at: &AttachPoint,
    done: &Attached,
    containment: &super::contain::Containment,
) -> Result<()> {
    let mut r = audit.record(Event::DaemonStart, Decision::Enforce);
    r.detail = Some(json!({
        "config": source,
        "attach_cgroup": at.attach_path.display().to_string(),
        "programs_attached": done.attached,
        "programs_reused": done.reused,
        "programs_updated": done.updated,
        "stale_links_removed": done.removed,
        "containment": containment,
        "pid": std::process::id(),
    }));
    audit.write(&r)
}

/// The enforcing part of a daemon, as its configuration describes it.
pub struct Enforcement {
    pub engine: Arc<Engine>,
    pub proxy: Arc<Proxy>,
    pub named: Arc<Named>,
}

/// Builds the enforcement core, restores its rate-limit counters, resolves the addresses the
/// policies name, and puts the proxy (with its threads) around it. Nothing is listening yet:
/// hand listeners to [`Proxy::start`].
pub async fn assemble(
    config: &Config,
    policies: PolicySet,
    audit: Arc<Audit>,
    identify: Arc<dyn Identify>,
) -> Result<Enforcement> {
    let state_dir = &config.paths.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let engine = Arc::new(Engine::new(
        policies,
        Pins::new(state_dir, &config.policy.pin_fields.0),
        audit.clone(),
        mcp::Settings {
            unknown_servers: config.policy.unknown_servers,
            denial: config.policy.denial,
            log_arguments: config.audit.log_arguments,
        },
    ));
    restore_rate_limits(&engine, state_dir);
    let interceptor = Interceptor::load(&CaFiles::new(state_dir), &config.tls.extra_roots)
        .context("setting up TLS interception")?;
    let named = Arc::new(Named::default());
    named.set(named::resolve(&engine.policies()).await);
    let header_timeout = Duration::from_secs(config.proxy.header_timeout_s);
    let http = HttpLayer::new(
        engine.clone(),
        HttpSettings {
            max_body: config.proxy.max_body.0 as usize,
            max_header: 64 * 1024,
            header_timeout,
            body_timeout: Duration::from_secs(config.proxy.body_timeout_s.max(1)),
            upgrades: config.proxy.other,
        },
        named.clone(),
    );
    let proxy = Arc::new(Proxy {
        identify,
        audit,
        stats: Arc::new(Stats::default()),
        http: Arc::new(http),
        named: named.clone(),
        interceptor: Arc::new(interceptor),
        settings: proxy::Settings {
            other: config.proxy.other,
            intercept: config.tls.intercept,
            header_timeout,
        },
        capacity: Arc::new(tokio::sync::Semaphore::new(
            config.proxy.max_connections.max(1),
        )),
        per_agent: Arc::new(PerAgent::new(config.proxy.max_connections_per_agent)),
        workers: Arc::new(Workers::start(config.proxy.threads)?),
    });
    Ok(Enforcement {
        engine,
        proxy,
        named,
    })
}

/// Marking agents at exec, where `[[agents]]` names any: on where the kernel can (raw
/// tracepoints, executables identified), else said loudly and left to the daemon's scans.
/// Without `[[agents]]`, an earlier run's hooks are removed.
fn start_enrolment(
    kernel: &mut Kernel,
    config: &Config,
    at: &AttachPoint,
) -> Result<(Mode, Option<String>)> {
    if config.agents.is_empty() {
        kernel.stop_enrol()?;
        return Ok((Mode::Off, None));
    }
    let attach_id = cgroup::cgroup_id(&at.attach_path)?;
    let why = match config.scope.enrolment {
        EnrolmentMode::Events => "scope.enrolment = \"events\"".to_string(),
        EnrolmentMode::Auto => match kernel.start_enrol(attach_id, at.daemon_cgroup_id) {
            Ok(()) => {
                tracing::info!(
                    "[[agents]]: marked at exec by the kernel, guarded from their first instruction"
                );
                return Ok((Mode::Exec, None));
            }
            Err(e) => format!("the kernel cannot mark them at exec: {e:#}"),
        },
    };
    let _ = kernel.stop_enrol();
    match kernel::exec_events::ExecEvents::subscribe() {
        Ok(_) => {
            tracing::warn!(
                "[[agents]] are enrolled from the kernel's exec events ({why}): an agent's connects between its exec and its enrolment (usually under a millisecond) are NOT guarded"
            );
            Ok((Mode::Events, Some(why)))
        }
        Err(e) => {
            let why = format!("{why}; no exec events either: {e:#}");
            tracing::warn!(
                "[[agents]] are found by scans every {} s ({why}): an agent's connects until it is found are NOT guarded",
                super::enrol::SCAN_INTERVAL.as_secs()
            );
            Ok((Mode::Scan, Some(why)))
        }
    }
}

/// The daemon's Unix sockets, bound before anything is attached.
pub(super) struct Sockets {
    pub control: tokio::net::UnixListener,
    pub stdio: tokio::net::UnixListener,
}

pub(super) async fn start(config: Config, config_source: String) -> Result<(Daemon, Sockets)> {
    let at = attach_point(&config)?;
    // Before anything is attached: a state directory that cannot be made stops the start.
    let state_dir = &config.paths.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let counted = metrics.clone();
    let otel = super::otel::Otel::start(&config.otel, &config.tls.extra_roots)?;
    let mut audit =
        Audit::open_with(&config.audit_settings())?.observe(move |r, _| counted.observe(r));
    if let Some(o) = otel.clone() {
        audit = audit.observe(move |r, line| o.queue(r, line));
    }
    let audit = Arc::new(audit);
    // Invalid policies stop the start, before anything is attached. With policy.source the
    // last good bundle kept is in force until the source answers (none: no server is known).
    let source = super::policies::Source::new(&config)?;
    let (policies, signed_at, policy_source) = match &source {
        None => (
            load_policies(&config.paths.policies)?,
            None,
            config.paths.policies.display().to_string(),
        ),
        Some(src) => match src.load_kept() {
            Some((set, at)) => (set, Some(at), src.url.clone()),
            None => (crate::policy::PolicySet::empty(), None, src.url.clone()),
        },
    };
    let listeners = proxy::bind(config.proxy.listen_port)?;
    let listen: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let control_listener = control::bind(&config.paths.control_socket)?;
    let stdio_listener = super::stdio::bind(&config.paths.stdio_socket)?;

    let mut kernel = load_kernel(&config, &at)?;
    let agents = Arc::new(Agents::default());
    let next_agent = adopt_agents(&kernel, &config, &at, &agents)?;
    // Before the redirect is attached: under `require`, a kernel without containment stops
    // the start here.
    let containment = super::contain::start(&mut kernel, &config, &at.attach_path)?;
    let contained = kernel.take_contained();
    let done = kernel.attach(&at.attach_path)?;
    // After the redirect, before the scan for agents already running: no exec in between goes
    // unmarked.
    let (enrol_mode, why_not) = start_enrolment(&mut kernel, &config, &at)?;
    let enrol_events = kernel.take_enrol_events();
    let kernel = Arc::new(kernel);
    let next_agent = Arc::new(AtomicU64::new(next_agent));
    let enrol = Arc::new(Enrolment::new(
        &config.agents,
        enrol_mode,
        why_not,
        Place {
            kernel: kernel.clone(),
            agents: agents.clone(),
            audit: audit.clone(),
            cgroup_mount: at.cgroup_mount.clone(),
            attach_path: at.attach_path.clone(),
            attach_rel: at.attach_rel.clone(),
            daemon_cgroup: at.daemon_cgroup.clone(),
            next_agent: next_agent.clone(),
        },
    ));
    enrol.publish()?;
    tracing::info!(
        attach = %at.attach_path.display(),
        newly_attached = done.attached,
        reused = done.reused,
        updated = done.updated,
        removed = done.removed,
        proxy = ?listen,
        "guard is enforcing"
    );
    audit_start(&audit, &config_source, &at, &done, &containment)?;
    enrol.audit_mode();
    if enrol_mode != Mode::Off {
        // Agents that were running before the daemon, and marks an earlier run left.
        enrol.sweep();
        enrol.scan();
    }

    let identify = Arc::new(KernelIdentify {
        kernel: kernel.clone(),
        agents: agents.clone(),
        enrol: (enrol_mode != Mode::Off).then(|| enrol.clone() as Arc<dyn Enrolments>),
    });
    let Enforcement {
        engine,
        proxy,
        named,
    } = assemble(&config, policies, audit.clone(), identify).await?;
    for l in listeners {
        proxy.clone().start(l)?;
    }
    let daemon = Daemon {
        saved_generation: AtomicU64::new(engine.limiter.generation()),
        stats: proxy.stats.clone(),
        engine,
        named,
        metrics,
        otel,
        policies_fingerprint: Mutex::new(policy_fingerprint(&config.paths.policies)),
        policy_state: Mutex::new(super::policies::PolicyState {
            source: policy_source,
            applied_at: std::time::SystemTime::now(),
            signed_at,
            etag: None,
            last_error: None,
        }),
        source: source.map(Arc::new),
        config,
        config_source,
        cgroup_mount: at.cgroup_mount,
        attach_rel: at.attach_rel,
        attach_path: at.attach_path,
        daemon_cgroup: at.daemon_cgroup,
        kernel,
        agents,
        audit,
        listen,
        disabled: AtomicBool::new(false),
        next_agent,
        enrol,
        enrol_events: Mutex::new(enrol_events),
        started: Instant::now(),
        containment,
        contained: Mutex::new(contained),
    };
    let sockets = Sockets {
        control: control_listener,
        stdio: stdio_listener,
    };
    Ok((daemon, sockets))
}
