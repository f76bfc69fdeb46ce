//! guard's real proxy and enforcement core, in the test's own process, without eBPF or root.
//!
//! [`Guard::start`] assembles exactly what the daemon assembles (`guard::daemon::assemble`:
//! engine, pins, CA, named addresses, proxy threads) from a configuration, around an
//! [`Identify`] of the test's: *routes*. A route is a listener on the destination's own IP
//! address (another port) that stands for one (destination, agent) pair, the way the kernel
//! redirect stands for every guarded connect: a client that connects to the route is, to the
//! proxy, that agent connecting to that destination. [`Guard::url`] turns a server's URL into
//! the route's, so a real client reaches the real server through guard.

use std::{
    collections::HashMap,
    fs,
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, RwLock},
};

use guard::{
    audit::Audit,
    config::Config,
    daemon::{assemble, load_policies, Enforcement},
    identity::Identity,
    mcp::Engine,
    proxy::identify::{Connection, Identify},
};

pub use crate::AuditLog;
use crate::{curl, process::run_ok};

/// A directory for one test (policies, state, audit log, peer logs), removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "guard-inproc-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("policies")).unwrap();
        TestDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    pub fn write_policy(&self, name: &str, text: &str) {
        fs::write(self.0.join("policies").join(name), text).unwrap();
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The identity a route gives its connections: agent `name`, instance `n` (its own cgroup id),
/// the test's uid.
pub fn agent_identity(name: &str, instance: u64) -> Identity {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut id: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        id = (id ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Identity {
        pid: std::process::id(),
        tgid: std::process::id(),
        uid,
        gid,
        comm: name.chars().take(15).collect(),
        cgroup_id: id.wrapping_add(instance),
        netns_cookie: 0,
        agent: Some(name.to_string()),
        exe: None,
        exe_file: None,
        cgroup: Some(format!("/guard.slice/agent-{name}-{instance}")),
    }
}

struct Route {
    dst: SocketAddr,
    identity: Identity,
}

/// The test's [`Identify`]: which destination and agent each route listener stands for.
#[derive(Default)]
struct Routes {
    by_listener: RwLock<HashMap<SocketAddr, Route>>,
    /// (destination, agent, instance) -> its listener, so a route is made once.
    by_key: Mutex<HashMap<(SocketAddr, String, u64), SocketAddr>>,
}

impl Identify for Routes {
    fn identify(&self, client: SocketAddr, local: SocketAddr) -> Option<Connection> {
        let routes = self.by_listener.read().unwrap();
        let route = routes.get(&local)?;
        Some(Connection {
            client,
            original_dst: route.dst,
            identity: route.identity.clone(),
            pass: false,
        })
    }
}

/// guard in-process: see the module documentation.
pub struct Guard {
    pub dir: PathBuf,
    pub audit_log: PathBuf,
    pub connections_log: PathBuf,
    /// System roots plus guard's CA, as `guard exec` gives agents.
    pub ca_bundle: PathBuf,
    /// `paths.stdio_socket`: where `guard wrap` (with [`Guard::config_file`]) reaches it.
    pub stdio_socket: PathBuf,
    config_text: String,
    enforcement: Option<Enforcement>,
    /// Ends the thread serving the stdio socket.
    stdio_stop: Option<tokio::sync::oneshot::Sender<()>>,
    routes: Arc<Routes>,
    _rt: tokio::runtime::Runtime,
}

impl Guard {
    /// Starts guard with the policies in `dir/policies`, `proxy` lines in its `[proxy]` table
    /// (`max_body = "2KiB"`) and `other` whole tables (`[tls]\nextra_roots = [...]`).
    pub fn start(dir: &TestDir, proxy: &str, other: &str) -> Guard {
        Guard::start_logging_to(dir, &dir.join("audit.jsonl"), proxy, other)
    }

    /// [`Guard::start`], with the audit log at `audit_log` (`/dev/full`: a log that cannot be
    /// written).
    pub fn start_logging_to(dir: &TestDir, audit_log: &Path, proxy: &str, other: &str) -> Guard {
        let d = dir.path();
        let config_text = format!(
            r#"[paths]
state_dir = "{state}"
audit_log = "{audit}"
policies = "{policies}"
control_socket = "{d}/unused.sock"
stdio_socket = "{d}/stdio.sock"
bpffs = "{d}/unused-bpffs"

[proxy]
threads = 1
{proxy}

{other}
"#,
            state = d.join("state").display(),
            audit = audit_log.display(),
            policies = d.join("policies").display(),
            d = d.display(),
        );
        Guard::with_config(d, config_text)
    }

    fn with_config(dir: &Path, config_text: String) -> Guard {
        let path = dir.join("guard.toml");
        fs::write(&path, &config_text).unwrap();
        let config = Config::parse(&path.display().to_string(), &config_text)
            .unwrap_or_else(|e| panic!("the test's configuration is invalid: {e}\n{config_text}"));
        let policies = load_policies(&config.paths.policies).unwrap();
        let audit = Arc::new(Audit::open_with(&config.audit_settings()).unwrap());
        let routes = Arc::new(Routes::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let identify: Arc<dyn Identify> = routes.clone();
        let enforcement = rt
            .block_on(assemble(&config, policies, audit, identify))
            .unwrap();
        let stdio_stop = serve_stdio(&config, enforcement.engine.clone());
        Guard {
            stdio_socket: config.paths.stdio_socket.clone(),
            stdio_stop: Some(stdio_stop),
            dir: dir.to_path_buf(),
            audit_log: config.paths.audit_log.clone(),
            connections_log: config.audit_settings().connections,
            ca_bundle: config.paths.state_dir.join("ca-bundle.pem"),
            config_text,
            enforcement: Some(enforcement),
            routes,
            _rt: rt,
        }
    }

    /// A new guard on the same directory and configuration (state and pins kept), as a
    /// restarted daemon would be.
    pub fn restart(mut self) -> Guard {
        self.stop();
        let (dir, text) = (self.dir.clone(), self.config_text.clone());
        drop(self);
        Guard::with_config(&dir, text)
    }

    /// The configuration file this guard runs with (`guard --config FILE wrap ...`).
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("guard.toml")
    }

    /// Stops serving (the stdio socket and the proxy), as a daemon that died would;
    /// [`Guard::restart`] starts it again.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stdio_stop.take() {
            let _ = stop.send(());
        }
        if let Some(e) = self.enforcement.take() {
            e.proxy.workers.stop();
        }
    }

    fn enforcement(&self) -> &Enforcement {
        self.enforcement.as_ref().expect("guard is running")
    }

    /// Writes the pending `connection_summary` records now (the daemon does every second).
    pub fn flush_audit(&self) {
        self.engine().audit_log().flush_summaries();
    }

    pub fn engine(&self) -> &Engine {
        &self.enforcement().engine
    }

    /// The route for `agent` (instance 1) to `dst`.
    pub fn route(&self, dst: SocketAddr, agent: &str) -> SocketAddr {
        self.route_instance(dst, agent, 1)
    }

    /// The route for instance `n` of `agent` to `dst`, made on first use: a listener on `dst`'s
    /// IP address whose connections the proxy takes for that agent's connects to `dst`.
    pub fn route_instance(&self, dst: SocketAddr, agent: &str, n: u64) -> SocketAddr {
        let key = (dst, agent.to_string(), n);
        let mut by_key = self.routes.by_key.lock().unwrap();
        if let Some(l) = by_key.get(&key) {
            return *l;
        }
        let listener = std::net::TcpListener::bind(SocketAddr::new(dst.ip(), 0))
            .unwrap_or_else(|e| panic!("a route listener on {}: {e}", dst.ip()));
        let local = listener.local_addr().unwrap();
        self.routes.by_listener.write().unwrap().insert(
            local,
            Route {
                dst,
                identity: agent_identity(agent, n),
            },
        );
        self.enforcement().proxy.clone().start(listener).unwrap();
        by_key.insert(key, local);
        local
    }

    /// `url` (`scheme://host:port/...`) with its port replaced by the route's for `agent`.
    pub fn url(&self, agent: &str, url: &str) -> String {
        self.url_instance(agent, 1, url)
    }

    pub fn url_instance(&self, agent: &str, n: u64, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = authority.rsplit_once(':').expect("a URL with a port");
        let dst = format!("{host}:{port}")
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap();
        let route = self.route_instance(dst, agent, n);
        format!("{scheme}://{host}:{}{path}", route.port())
    }

    /// A command for a client: it trusts guard's CA the way `guard exec` makes agents trust it.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        for v in guard::cli::CA_VARIABLES {
            c.env(v, &self.ca_bundle);
        }
        c
    }

    /// A JSON POST from curl (MCP's Accept header, `flags` first) to `url` through `agent`'s
    /// route, returning (status, body).
    pub fn curl_post_with(
        &self,
        agent: &str,
        flags: &[&str],
        headers: &[&str],
        body: &str,
        url: &str,
    ) -> (u16, String) {
        let url = self.url(agent, url);
        let args = curl::post_args(flags, headers, body, &url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl::parse(&run_ok(&mut self.command(&args)))
    }

    pub fn curl_post(&self, url: &str, headers: &[&str], body: &str) -> (u16, String) {
        self.curl_post_with("curl", &[], headers, body, url)
    }
}

/// Serves `paths.stdio_socket` as the daemon does, on a thread of its own, until told to stop.
fn serve_stdio(config: &Config, engine: Arc<Engine>) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let path = config.paths.stdio_socket.clone();
    let stdio = Arc::new(guard::daemon::stdio::Stdio {
        engine,
        agents: Arc::new(guard::identity::Agents::default()),
        max_body: config.proxy.max_body.0 as usize,
        per_uid: guard::daemon::stdio::PER_UID,
    });
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let at = path.clone();
        rt.block_on(async move {
            let listener = guard::daemon::stdio::bind(&at).unwrap();
            let _ = ready_tx.send(());
            tokio::select! {
                _ = guard::daemon::stdio::serve(listener, stdio) => {}
                _ = stopped => {}
            }
        });
        let _ = std::fs::remove_file(&path);
    });
    ready.recv().unwrap();
    stop
}

impl crate::AuditLog for Guard {
    fn audit_log(&self) -> &Path {
        &self.audit_log
    }

    fn connections_log(&self) -> PathBuf {
        self.connections_log.clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}
