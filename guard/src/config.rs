//! The daemon's configuration (`guard.toml`, README "Configuration"): every key optional, unknown keys refused,
//! errors located at `file:line:col`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// Where the CLI and the daemon look when neither `--config` nor `GUARD_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/guard/guard.toml";

/// The configuration `cargo xtask run` and a config-less start use: every default README
/// "Configuration" lists.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub scope: Scope,
    pub proxy: ProxySection,
    pub paths: Paths,
    pub policy: PolicySection,
    pub tls: Tls,
    pub guard: GuardSection,
    pub audit: AuditSection,
    pub metrics: MetricsSection,
    pub approvals: ApprovalsSection,
    pub otel: OtelSection,
    /// Programs that are agents: whatever executes one is guarded from its first instruction,
    /// without `guard exec` (README "Enrolment").
    pub agents: Vec<AgentEntry>,
}

/// One `[[agents]]` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent's name: its cgroups (`agent-NAME-N`), grants and audit records use it.
    pub name: String,
    /// Absolute path globs of its executables (`*` matches any run of characters, `/` too).
    pub exe: Vec<String>,
    /// For interpreters: globs of which one of the arguments must match (`*/claude-code/*`).
    #[serde(default)]
    pub argv: Vec<String>,
    /// The uids it applies to (empty: any). They are also the only uids that may
    /// `guard exec --agent NAME`.
    #[serde(default)]
    pub uids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSection {
    /// Write tool-call arguments themselves (not only their SHA-256) into the audit log.
    pub log_arguments: bool,
    /// Rotate the audit log beyond this size.
    pub max_size: ByteSize,
    /// Rotated files kept (`audit.jsonl.1` is the newest).
    pub keep: u32,
    /// Connection records go here, rotated on their own (default: `connections.jsonl` beside
    /// `paths.audit_log`): a flood of connections never rotates decisions away.
    pub connections_log: Option<PathBuf>,
    /// Connection records written per agent and second; the rest are counted in
    /// `connection_summary` records.
    pub connection_records_per_s: u32,
    /// Records of refused requests written per agent and second (burst: ten seconds' worth);
    /// the rest are counted in `refusal_summary` records.
    pub refusal_records_per_s: u32,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            log_arguments: false,
            max_size: ByteSize(100 << 20),
            keep: 5,
            connections_log: None,
            connection_records_per_s: 20,
            refusal_records_per_s: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus endpoint (`/metrics`), on a loopback address; `""` turns it off.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: "127.0.0.1:15002".into(),
        }
    }
}

impl MetricsSection {
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        if self.listen.is_empty() {
            None
        } else {
            self.listen.parse().ok()
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Scope {
    /// Where the programs attach, relative to the cgroup v2 mount.
    pub attach_cgroup: String,
    /// Cgroups (relative to the cgroup v2 mount) guarded with their descendants.
    pub guarded_cgroups: Vec<String>,
    pub guarded_uids: Vec<u32>,
    pub exempt: Vec<ExemptRule>,
    pub udp: UdpMode,
    /// With `udp = "dns-only"`: the only addresses guarded DNS may go to (IP addresses, or
    /// `"resolv.conf"` for the nameservers /etc/resolv.conf lists at start). Empty: any.
    pub dns_servers: Vec<String>,
    /// Containment (BPF LSM per cgroup): `auto` turns it on where the kernel has it and says
    /// loudly where not; `require` refuses to start without it; `off`.
    pub containment: ContainmentMode,
    /// How `[[agents]]` are found: `auto` marks them in the kernel at exec (the exec hooks),
    /// else from the kernel's exec events (the proc connector); `events`, from the events only
    /// (a window between exec and enrolment: README "Enrolment").
    pub enrolment: EnrolmentMode,
    /// Unix sockets a guarded process may connect to: `allow-listed` (its own agent's
    /// listeners, guard's control socket, `unix_allow`) or `allow` (any).
    pub unix: UnixMode,
    /// Bound names of Unix listeners any guarded process may reach: paths (both as written and
    /// with symlinks resolved) or `@name` for the abstract namespace.
    pub unix_allow: Vec<String>,
    /// Whether guarded processes may create user namespaces.
    pub userns: UsernsMode,
    /// Where BPF LSM containment cannot be on: what `guard exec` confines its command with
    /// itself (`off`, `seccomp`, or `landlock`: seccomp and a Landlock domain).
    pub exec_confinement: ExecConfinement,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ExecConfinement {
    Off,
    Seccomp,
    Landlock,
}

/// Listeners that keep logging and name resolution working under `scope.unix = "allow-listed"`
/// (the README says why each is here). None of them runs commands or makes connections for
/// its client.
pub const DEFAULT_UNIX_ALLOW: &[&str] = &[
    // systemd-journald: syslog(3), sd_journal_print, and services' stdout to the journal.
    "/dev/log",
    "/run/systemd/journal/dev-log",
    "/run/systemd/journal/socket",
    "/run/systemd/journal/stdout",
    // glibc's name service cache (getpwnam, getaddrinfo through nscd); glibc falls back when
    // refused, slower.
    "/run/nscd/socket",
    "/var/run/nscd/socket",
    // systemd-resolved's varlink API (nss-resolve's getaddrinfo).
    "/run/systemd/resolve/io.systemd.Resolve",
    // systemd's user database (nss-systemd's getpwnam for dynamic and homed users).
    "/run/systemd/userdb/io.systemd.Multiplexer",
];

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ContainmentMode {
    Auto,
    Require,
    Off,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EnrolmentMode {
    Auto,
    Events,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UnixMode {
    AllowListed,
    Allow,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UsernsMode {
    Allow,
    Deny,
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            attach_cgroup: "guard.slice".into(),
            guarded_cgroups: vec![],
            guarded_uids: vec![],
            exempt: vec![],
            udp: UdpMode::DnsOnly,
            dns_servers: vec![],
            containment: ContainmentMode::Auto,
            enrolment: EnrolmentMode::Auto,
            unix: UnixMode::AllowListed,
            unix_allow: DEFAULT_UNIX_ALLOW.iter().map(|s| s.to_string()).collect(),
            userns: UsernsMode::Allow,
            exec_confinement: ExecConfinement::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UdpMode {
    DnsOnly,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    pub listen_port: u16,
    pub max_body: ByteSize,
    pub other: OtherTraffic,
    /// A client must send a request's headers within this many seconds (slowloris).
    pub header_timeout_s: u64,
    /// ... and the part of its body guard reads (up to `max_body`) within this many more.
    pub body_timeout_s: u64,
    /// Connections served at once; more are reset.
    pub max_connections: usize,
    /// Connections one agent (one agent name, else one uid) may hold at once; more are refused,
    /// so that no agent's connections, busy or silent, take the slots of another.
    pub max_connections_per_agent: usize,
    /// Threads serving connections (each connection stays on one); 0: one per CPU.
    pub threads: usize,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen_port: 15001,
            max_body: ByteSize(4 << 20),
            other: OtherTraffic::Pass,
            header_timeout_s: 30,
            body_timeout_s: 60,
            max_connections: 10_000,
            max_connections_per_agent: 1_000,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtherTraffic {
    Pass,
    Deny,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Paths {
    pub bpffs: PathBuf,
    pub control_socket: PathBuf,
    /// Where `guard wrap` sessions reach the daemon (stdio MCP servers' messages).
    pub stdio_socket: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub policies: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            bpffs: "/sys/fs/bpf/guard".into(),
            control_socket: "/run/guard/guard.sock".into(),
            stdio_socket: "/run/guard/stdio.sock".into(),
            state_dir: "/var/lib/guard".into(),
            audit_log: "/var/log/guard/audit.jsonl".into(),
            policies: "/etc/guard/policies".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    pub unknown_servers: UnknownServers,
    pub denial: Denial,
    /// The fields of a tool definition its pin covers.
    pub pin_fields: PinFields,
    /// Where signed policy bundles come from (`https://.../bundle.tar.gz`, `http://...`, a
    /// bundle file or an unpacked bundle directory); `paths.policies` is then not read.
    pub source: Option<String>,
    /// The minisign public key bundles must be signed with: its `RW...` line or a `.pub` file.
    pub verify_key: Option<String>,
    /// How often the source is asked for a new bundle (seconds).
    pub poll_s: u64,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            unknown_servers: UnknownServers::Deny,
            denial: Denial::Error,
            pin_fields: PinFields::default(),
            source: None,
            verify_key: None,
            poll_s: 60,
        }
    }
}

/// `policy.pin_fields`: a non-empty list of tool definition fields, `name` among them.
#[derive(Debug, Clone, PartialEq)]
pub struct PinFields(pub Vec<String>);

/// Every field a client shows the model or acts on: the default `policy.pin_fields`.
pub const DEFAULT_PIN_FIELDS: &[&str] = &[
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
];

/// The fields a pin can cover.
const TOOL_FIELDS: &[&str] = &[
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
    "icons",
    "_meta",
];

impl Default for PinFields {
    fn default() -> Self {
        PinFields(DEFAULT_PIN_FIELDS.iter().map(|f| f.to_string()).collect())
    }
}

impl<'de> Deserialize<'de> for PinFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Vec::<String>::deserialize(d)?;
        if let Some(bad) = v.iter().find(|f| !TOOL_FIELDS.contains(&f.as_str())) {
            return Err(D::Error::custom(format!(
                "\"{bad}\" is not a tool definition field (one of {})",
                TOOL_FIELDS.join(", ")
            )));
        }
        if !v.iter().any(|f| f == "name") {
            return Err(D::Error::custom(
                "pin_fields must include \"name\" (and should include every field clients show the model)",
            ));
        }
        Ok(PinFields(v))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownServers {
    Deny,
    Allow,
    Audit,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    Error,
    ToolResult,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    pub intercept: Intercept,
    pub extra_roots: Vec<PathBuf>,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            intercept: Intercept::Mcp,
            extra_roots: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Intercept {
    Mcp,
    All,
}

/// `[approvals]`: who hears that a call waits.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalsSection {
    pub notify: Vec<NotifyEntry>,
}

/// One `[[approvals.notify]]`: a webhook (a JSON POST Slack's and Teams' incoming webhooks
/// accept) and/or a command, told of every held call.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NotifyEntry {
    pub webhook: Option<String>,
    /// argv; an argument that is exactly `{id}`, `{agent}`, `{server}`, `{tool}` or `{text}`
    /// is replaced (never inside a longer argument: no shell injection), and the environment
    /// has GUARD_APPROVAL_ID, GUARD_AGENT, GUARD_SERVER, GUARD_TOOL, GUARD_TEXT.
    pub exec: Option<Vec<String>>,
    /// Tries per notification (with backoff) before the failure is audited.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

fn default_attempts() -> u32 {
    3
}

/// `[otel]`: OTLP export of audit records (logs) and decided requests (spans). Off (no
/// endpoint) by default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtelSection {
    /// `http(s)://host:port` of the collector (gRPC: as is; HTTP: the base URL, each signal
    /// under `/v1/traces` and `/v1/logs`); "" turns export off.
    pub endpoint: String,
    pub protocol: OtelProtocol,
    /// Records waiting for export at most; more are dropped (`guard_otel_dropped_total`).
    pub queue: usize,
    /// One export request's time limit.
    pub timeout_s: u64,
    /// Sent with every export (e.g. the collector's `authorization`).
    pub headers: std::collections::BTreeMap<String, String>,
    /// Resource attributes beside service.name, service.version and host.name (e.g.
    /// `"deployment.environment.name" = "prod"`).
    pub resource: std::collections::BTreeMap<String, String>,
}

impl Default for OtelSection {
    fn default() -> Self {
        OtelSection {
            endpoint: String::new(),
            protocol: OtelProtocol::Grpc,
            queue: 4096,
            timeout_s: 5,
            headers: Default::default(),
            resource: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtelProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    Http,
}

impl OtelProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OtelProtocol::Grpc => "grpc",
            OtelProtocol::Http => "http",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GuardSection {
    pub approvers_group: String,
}

impl Default for GuardSection {
    fn default() -> Self {
        GuardSection {
            approvers_group: "guard-approvers".into(),
        }
    }
}

/// A size such as `4MiB`, `512KiB`, `100kB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not a size: write a number with an optional unit, like \"4MiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            u => {
                return Err(format!(
                    "unknown size unit `{u}` (use B, KiB, MiB, GiB, kB, MB or GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The `scope.dns_servers` entry that stands for the nameservers /etc/resolv.conf lists.
pub const RESOLV_CONF: &str = "resolv.conf";

impl Scope {
    /// `scope.dns_servers` as addresses (None: not set, DNS to any address), reading
    /// `resolv_conf` for the `"resolv.conf"` entry.
    pub fn dns_server_addrs(&self, resolv_conf: &Path) -> Result<Option<Vec<IpAddr>>> {
        if self.dns_servers.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for d in &self.dns_servers {
            if d == RESOLV_CONF {
                let text = std::fs::read_to_string(resolv_conf).with_context(|| {
                    format!("reading {} (scope.dns_servers)", resolv_conf.display())
                })?;
                let found = nameservers(&text);
                if found.is_empty() {
                    bail!(
                        "scope.dns_servers names \"{RESOLV_CONF}\", but {} lists no nameserver: \
                         list the DNS servers' addresses instead",
                        resolv_conf.display()
                    );
                }
                out.extend(found);
            } else {
                out.push(
                    d.parse()
                        .with_context(|| format!("scope.dns_servers: {d:?}"))?,
                );
            }
        }
        Ok(Some(out))
    }
}

/// The `nameserver` addresses of a resolv.conf (a scope id such as `%eth0` dropped).
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// One `scope.exempt` entry: `CIDR` or `CIDR:port` (IPv6 with a port: `[CIDR]:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExemptRule {
    pub addr: IpAddr,
    pub prefix: u8,
    /// None: every port.
    pub port: Option<u16>,
}

impl ExemptRule {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{s}` is not \"CIDR\" or \"CIDR:port\": {why}");
        let (cidr, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(|| bad("missing `]`"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad("expected `:port` after `]`"))?,
                ),
            };
            (inner, port)
        } else if s.matches(':').count() == 1 {
            let (c, p) = s.split_once(':').unwrap();
            (c, Some(p))
        } else {
            (s, None)
        };
        let (addr, prefix) = match cidr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (cidr, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("the address does not parse"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad(&format!("the prefix length must be 0 to {max}")))?,
            None => max,
        };
        let port = match port {
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("the port must be 1 to 65535"))?,
            ),
            None => None,
        };
        // Canonical form: host bits cleared, IPv4-mapped IPv6 as IPv4.
        let (addr, prefix) = match addr {
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() && prefix >= 96 => {
                (IpAddr::V4(a.to_ipv4_mapped().unwrap()), prefix - 96)
            }
            a => (a, prefix),
        };
        Ok(ExemptRule {
            addr: mask(addr, prefix),
            prefix,
            port,
        })
    }

    /// Whether `self`'s prefix contains all of `other`'s.
    pub fn covers(&self, other: &ExemptRule) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.prefix <= other.prefix
            && mask(other.addr, self.prefix) == self.addr
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix as u32)
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix as u32)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl<'de> Deserialize<'de> for ExemptRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ExemptRule::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ExemptRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.port) {
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}/{}]:{p}", self.prefix),
            (a, Some(p)) => write!(f, "{a}/{}:{p}", self.prefix),
            (a, None) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Invalid {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Raw form used only to find where a semantically bad value sits.
#[derive(Deserialize, Default)]
struct Located {
    #[serde(default)]
    scope: Option<LocatedScope>,
    #[serde(default)]
    agents: Option<Vec<LocatedAgent>>,
}

#[derive(Deserialize, Default)]
struct LocatedAgent {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    exe: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
struct LocatedScope {
    #[serde(default)]
    attach_cgroup: Option<Spanned<String>>,
    #[serde(default)]
    guarded_cgroups: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    exempt: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    dns_servers: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    unix_allow: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    guarded_uids: Option<Vec<Spanned<i64>>>,
}

fn check_otel(o: &OtelSection) -> Result<(), (&'static str, String)> {
    if o.endpoint.is_empty() {
        return Ok(());
    }
    let uri = o
        .endpoint
        .parse::<http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    let Some(uri) = uri else {
        return Err((
            "endpoint",
            format!(
                "otel.endpoint: {:?} is not an http(s)://host:port URL",
                o.endpoint
            ),
        ));
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err((
            "endpoint",
            "otel.endpoint: no credentials in the URL (guard status shows it to every user); use otel.headers".into(),
        ));
    }
    if o.protocol == OtelProtocol::Grpc && uri.path().len() > 1 {
        return Err(("endpoint", format!("otel.endpoint: {:?}: a gRPC endpoint has no path (OTLP/HTTP does: protocol = \"http\")", o.endpoint)));
    }
    if o.queue == 0 || o.queue > 1_000_000 {
        return Err(("queue", "otel.queue: 1 to 1000000 records".into()));
    }
    if o.timeout_s == 0 || o.timeout_s > 120 {
        return Err(("timeout_s", "otel.timeout_s: 1 to 120 seconds".into()));
    }
    for (k, v) in &o.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err((
                "headers",
                format!("otel.headers: {k:?} is not a header name"),
            ));
        }
        if http::HeaderValue::from_str(v).is_err() {
            return Err((
                "headers",
                format!("otel.headers.{k}: not a valid header value"),
            ));
        }
    }
    if o.resource.keys().any(|k| k.is_empty()) {
        return Err((
            "resource",
            "otel.resource: an attribute needs a name".into(),
        ));
    }
    Ok(())
}

/// A `scope.unix_allow` entry as the kernel holds a bound name: a path's bytes, or for `@name`
/// a NUL then the name's; None with why it cannot be one.
pub fn unix_name(entry: &str) -> Result<Vec<u8>, String> {
    let bytes = if let Some(abs) = entry.strip_prefix('@') {
        if abs.is_empty() {
            return Err("`@` needs an abstract name after it".into());
        }
        let mut b = vec![0u8];
        b.extend_from_slice(abs.as_bytes());
        b
    } else if entry.starts_with('/') {
        if entry.contains('\0') {
            return Err("a path has no NUL byte".into());
        }
        entry.as_bytes().to_vec()
    } else {
        return Err(format!(
            "{entry:?} is neither an absolute path nor `@name` (an abstract socket)"
        ));
    };
    // A path also needs its terminating NUL within sun_path.
    let max = guard_common::UNIX_PATH_MAX - usize::from(bytes[0] != 0);
    if bytes.len() > max {
        return Err(format!(
            "{entry:?} is longer than a Unix socket name can be ({max} bytes)"
        ));
    }
    Ok(bytes)
}

impl Config {
    /// Where and how the audit trail is written.
    pub fn audit_settings(&self) -> crate::audit::Settings {
        let decisions = self.paths.audit_log.clone();
        crate::audit::Settings {
            connections: self
                .audit
                .connections_log
                .clone()
                .unwrap_or_else(|| crate::audit::connections_beside(&decisions)),
            decisions,
            rotation: crate::audit::Rotation {
                max_size: self.audit.max_size.0,
                keep: self.audit.keep,
            },
            connection_records_per_s: self.audit.connection_records_per_s,
            refusal_records_per_s: self.audit.refusal_records_per_s,
        }
    }

    /// Parses `text`; `path` only names the file in errors.
    pub fn parse(path: &str, text: &str) -> Result<Config, ConfigError> {
        let at = |offset: usize, message: String| {
            let (line, col) = line_col(text, offset);
            ConfigError::Invalid {
                path: path.to_string(),
                line,
                col,
                message,
            }
        };
        // Values serde accepts but guard does not, reported at the value itself (serde alone
        // would point at the enclosing array).
        let located: Located = toml::from_str(text).unwrap_or_default();
        let scope = located.scope.unwrap_or_default();
        if let Some(a) = &scope.attach_cgroup {
            check_cgroup_path(a.get_ref(), true)
                .map_err(|m| at(a.span().start, format!("scope.attach_cgroup: {m}")))?;
        }
        for g in scope.guarded_cgroups.iter().flatten() {
            check_cgroup_path(g.get_ref(), false)
                .map_err(|m| at(g.span().start, format!("scope.guarded_cgroups: {m}")))?;
        }
        for e in scope.exempt.iter().flatten() {
            ExemptRule::parse(e.get_ref())
                .map_err(|m| at(e.span().start, format!("scope.exempt: {m}")))?;
        }
        for d in scope.dns_servers.iter().flatten() {
            let v = d.get_ref();
            if v != RESOLV_CONF && v.parse::<std::net::IpAddr>().is_err() {
                return Err(at(
                    d.span().start,
                    format!(
                        "scope.dns_servers: {v:?} is neither an IP address nor \"{RESOLV_CONF}\""
                    ),
                ));
            }
        }
        for u in scope.guarded_uids.iter().flatten() {
            if *u.get_ref() == 0 {
                return Err(at(
                    u.span().start,
                    "scope.guarded_uids: uid 0 cannot be guarded (root can detach guard's programs, and the daemon runs as root)".into(),
                ));
            }
        }
        for u in scope.unix_allow.iter().flatten() {
            unix_name(u.get_ref())
                .map_err(|m| at(u.span().start, format!("scope.unix_allow: {m}")))?;
        }
        let mut names = std::collections::BTreeSet::new();
        for a in located.agents.iter().flatten() {
            if let Some(n) = &a.name {
                let v = n.get_ref();
                if !crate::daemon::valid_agent_name(v) {
                    return Err(at(n.span().start, format!("agents.name: `{v}` is not an agent name: use 1-64 letters, digits, `_`, `.` or `-`, starting with a letter or digit")));
                }
                if !names.insert(v.clone()) {
                    return Err(at(n.span().start, format!("agents.name: `{v}` is named by two [[agents]] entries; give each agent one entry")));
                }
            }
            for e in a.exe.iter().flatten() {
                if !e.get_ref().starts_with('/') {
                    return Err(at(
                        e.span().start,
                        format!(
                            "agents.exe: {:?} is not an absolute path (glob)",
                            e.get_ref()
                        ),
                    ));
                }
            }
            if a.exe.as_ref().is_some_and(|e| e.is_empty()) {
                let offset = a.name.as_ref().map_or(0, |n| n.span().start);
                return Err(at(
                    offset,
                    "agents.exe: an agent needs at least one executable".into(),
                ));
            }
        }
        let config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            at(offset, e.message().trim_end().to_string())
        })?;
        if let Some(src) = &config.policy.source {
            let offset = text.find("source").unwrap_or(0);
            if config.policy.verify_key.is_none() {
                return Err(at(offset, "policy.source: a source needs policy.verify_key (the minisign public key bundles are signed with; `guard policy keygen` makes a pair)".into()));
            }
            let remote = src.starts_with("https://") || src.starts_with("http://");
            if !remote && !src.starts_with('/') {
                return Err(at(
                    offset,
                    format!(
                        "policy.source: {src:?} is neither an http(s):// URL nor an absolute path"
                    ),
                ));
            }
        }
        for n in &config.approvals.notify {
            let offset = text.find("notify").unwrap_or(0);
            if n.webhook.is_none() && n.exec.is_none() {
                return Err(at(
                    offset,
                    "approvals.notify: an entry needs `webhook = URL` or `exec = [argv]`".into(),
                ));
            }
            if let Some(w) = &n.webhook {
                if !(w.starts_with("https://") || w.starts_with("http://"))
                    || w.parse::<http::Uri>().is_err()
                {
                    return Err(at(
                        offset,
                        format!("approvals.notify.webhook: {w:?} is not an http(s):// URL"),
                    ));
                }
            }
            if let Some(argv) = &n.exec {
                if !argv.first().is_some_and(|a| a.starts_with('/')) {
                    return Err(at(offset, "approvals.notify.exec: the first element must be an absolute path (the daemon runs it as root, not through a shell or PATH)".into()));
                }
            }
            if n.attempts == 0 || n.attempts > 10 {
                return Err(at(offset, "approvals.notify.attempts: 1 to 10".into()));
            }
        }
        check_otel(&config.otel).map_err(|(key, m)| {
            let section = text.find("[otel]").unwrap_or(0);
            let offset = text[section..].find(key).map_or(section, |o| section + o);
            at(offset, m)
        })?;
        if config.policy.poll_s == 0 {
            let offset = text.find("poll_s").unwrap_or(0);
            return Err(at(
                offset,
                "policy.poll_s: must be at least 1 (seconds)".into(),
            ));
        }
        if !config.metrics.listen.is_empty() {
            let ok = config
                .metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(false);
            if !ok {
                let offset = text.find("listen").unwrap_or(0);
                return Err(at(
                    offset,
                    format!(
                        "metrics.listen: `{}` is not a loopback address:port (metrics are served on loopback only; \"\" turns them off)",
                        config.metrics.listen
                    ),
                ));
            }
        }
        Ok(config)
    }

    /// Loads `path`, or the default file, or the embedded defaults when neither exists.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let name = path.display().to_string();
                Ok((Config::parse(&name, &text)?, name))
            }
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => Ok((
                Config::parse("<embedded default config>", EMBEDDED_DEFAULT)?,
                "<embedded default config>".into(),
            )),
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn attach_cgroup_rel(&self) -> &str {
        self.scope.attach_cgroup.trim_matches('/')
    }
}

/// A cgroup path relative to the cgroup v2 mount: no `..`, no empty components.
fn check_cgroup_path(p: &str, allow_root: bool) -> Result<(), String> {
    let trimmed = p.trim_matches('/');
    if trimmed.is_empty() {
        return if allow_root {
            Ok(())
        } else {
            Err("`/` (the whole host) cannot be a guarded cgroup; list the cgroups to guard".into())
        };
    }
    for c in trimmed.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!(
                "`{p}` is not a cgroup path below the cgroup v2 mount (no `..`, `.` or `//`)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_the_spec_default() {
        let c = Config::parse("default.toml", EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.scope.attach_cgroup, "guard.slice");
        assert_eq!(c.proxy.listen_port, 15001);
        assert_eq!(c.proxy.max_body, ByteSize(4 * 1024 * 1024));
        assert_eq!(c.scope.udp, UdpMode::DnsOnly);
        assert_eq!(c.paths.bpffs, PathBuf::from("/sys/fs/bpf/guard"));
        assert_eq!(c.policy.unknown_servers, UnknownServers::Deny);
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("x.toml", "").unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let text = r#"
[scope]
attach_cgroup = "/"
guarded_cgroups = ["user.slice/user-1000.slice"]
guarded_uids = [1000, 1001]
exempt = ["10.0.0.0/8", "192.168.1.1:5432", "[fd00::/8]:443", "::1"]
udp = "deny"

[proxy]
listen_port = 16001
max_body = "512KiB"
other = "deny"

[paths]
bpffs = "/sys/fs/bpf/g2"

[policy]
unknown_servers = "audit"
denial = "tool_result"

[tls]
intercept = "all"
extra_roots = ["/etc/ssl/extra.pem"]

[guard]
approvers_group = "sec"
"#;
        let c = Config::parse("g.toml", text).unwrap();
        assert_eq!(c.attach_cgroup_rel(), "");
        assert_eq!(c.scope.guarded_uids, vec![1000, 1001]);
        assert_eq!(c.scope.udp, UdpMode::Deny);
        assert_eq!(c.proxy.max_body, ByteSize(512 * 1024));
        assert_eq!(c.proxy.other, OtherTraffic::Deny);
        assert_eq!(c.policy.denial, Denial::ToolResult);
        assert_eq!(c.tls.intercept, Intercept::All);
        assert_eq!(c.scope.exempt.len(), 4);
        assert_eq!(c.scope.exempt[1].port, Some(5432));
        assert_eq!(c.scope.exempt[2].prefix, 8);
        assert_eq!(c.scope.exempt[2].port, Some(443));
        assert_eq!(c.scope.exempt[3].prefix, 128);
    }

    fn err(text: &str) -> String {
        Config::parse("guard.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn otel_is_checked() {
        let e = err("[otel]\nendpoint = \"collector:4317\"\n");
        assert!(e.contains("otel.endpoint") && e.contains(":2:"), "{e}");
        let e = err("[otel]\nendpoint = \"http://c:4317/v1\"\n");
        assert!(e.contains("gRPC endpoint has no path"), "{e}");
        let e = err("[otel]\nendpoint = \"https://u:secret@c:4317\"\n");
        assert!(e.contains("no credentials"), "{e}");
        let e = err("[otel]\nendpoint = \"http://c:4317\"\nqueue = 0\n");
        assert!(e.contains("otel.queue") && e.contains(":3:"), "{e}");
        let e = err("[otel]\nendpoint = \"http://c:4318\"\nprotocol = \"thrift\"\n");
        assert!(e.contains("`thrift`") && e.contains(":3:"), "{e}");
        let c = Config::parse(
            "t",
            "[otel]\nendpoint = \"http://c:4318\"\nprotocol = \"http\"\nheaders = { authorization = \"Bearer x\" }\n",
        )
        .unwrap();
        assert_eq!(c.otel.protocol, OtelProtocol::Http);
        assert_eq!(c.otel.queue, 4096);
        assert_eq!(Config::default().otel.endpoint, "");
    }

    #[test]
    fn notify_entries_are_checked() {
        let e = err("[[approvals.notify]]\nattempts = 2\n");
        assert!(
            e.contains("needs `webhook = URL` or `exec = [argv]`"),
            "{e}"
        );
        let e = err("[[approvals.notify]]\nwebhook = \"hooks.slack.com/x\"\n");
        assert!(e.contains("not an http(s):// URL"), "{e}");
        let e = err("[[approvals.notify]]\nexec = [\"notify-send\", \"{text}\"]\n");
        assert!(e.contains("absolute path"), "{e}");
        let c = Config::parse(
            "guard.toml",
            "[[approvals.notify]]\nwebhook = \"https://hooks.example/x\"\n[[approvals.notify]]\nexec = [\"/usr/bin/notify-send\", \"guard\", \"{text}\"]\n",
        )
        .unwrap();
        assert_eq!(c.approvals.notify.len(), 2);
        assert_eq!(c.approvals.notify[0].attempts, 3);
    }

    #[test]
    fn a_policy_source_needs_a_key_and_a_url_or_path() {
        let e = err("[policy]\nsource = \"https://p.example/b.tar.gz\"\n");
        assert!(
            e.starts_with("guard.toml:2:1: policy.source: a source needs policy.verify_key"),
            "{e}"
        );
        let e = err("[policy]\nsource = \"ftp://x\"\nverify_key = \"RW\"\n");
        assert!(
            e.contains("neither an http(s):// URL nor an absolute path"),
            "{e}"
        );
        let e = err("[policy]\npoll_s = 0\n");
        assert!(e.starts_with("guard.toml:2:1: policy.poll_s"), "{e}");
        let c = Config::parse(
            "guard.toml",
            "[policy]\nsource = \"/srv/bundle.tar.gz\"\nverify_key = \"RW\"\npoll_s = 5\n",
        )
        .unwrap();
        assert_eq!(c.policy.poll_s, 5);
    }

    #[test]
    fn unknown_key_is_located() {
        let e = err("[scope]\nudp = \"allow\"\nattach = \"x\"\n");
        assert!(
            e.starts_with("guard.toml:3:1: unknown field `attach`"),
            "{e}"
        );
        assert!(e.contains("attach_cgroup"), "names the valid keys: {e}");
    }

    #[test]
    fn unknown_section_is_located() {
        let e = err("[proxy]\nlisten_port = 1\n\n[proxxy]\n");
        assert!(
            e.starts_with("guard.toml:4:2: unknown field `proxxy`"),
            "{e}"
        );
    }

    #[test]
    fn bad_pin_fields_are_located() {
        let e = err("[policy]\npin_fields = [\"name\", \"descripton\"]\n");
        assert!(e.starts_with("guard.toml:2:14:"), "{e}");
        assert!(e.contains("not a tool definition field"), "{e}");
        let e = err("[policy]\npin_fields = [\"description\"]\n");
        assert!(e.contains("must include \"name\""), "{e}");
    }

    #[test]
    fn bad_enum_value_is_located() {
        let e = err("[scope]\nguarded_uids = [1000, 0]\n");
        assert!(
            e.contains(":2:23:") && e.contains("uid 0 cannot be guarded"),
            "{e}"
        );
        let e = err("[scope]\n  udp = \"quic\"\n");
        assert!(e.starts_with("guard.toml:2:9:"), "{e}");
        assert!(e.contains("dns-only"), "{e}");
    }

    #[test]
    fn agents_are_named_once_by_absolute_executables() {
        let ok = Config::parse(
            "guard.toml",
            "[[agents]]\nname = \"claude\"\nexe = [\"/usr/bin/claude\"]\nuids = [1000]\n",
        )
        .unwrap();
        assert_eq!(ok.agents[0].name, "claude");
        assert_eq!(ok.agents[0].uids, vec![1000]);
        assert!(ok.agents[0].argv.is_empty());
        let e = err("[[agents]]\nname = \"a/b\"\nexe = [\"/x\"]\n");
        assert!(
            e.starts_with("guard.toml:2:8:") && e.contains("not an agent name"),
            "{e}"
        );
        let e = err("[[agents]]\nname = \"a\"\nexe = [\"x\"]\n");
        assert!(
            e.starts_with("guard.toml:3:8:") && e.contains("absolute"),
            "{e}"
        );
        let e = err("[[agents]]\nname = \"a\"\nexe = []\n");
        assert!(e.contains("at least one executable"), "{e}");
        let e = err(
            "[[agents]]\nname = \"a\"\nexe = [\"/x\"]\n[[agents]]\nname = \"a\"\nexe = [\"/y\"]\n",
        );
        assert!(
            e.starts_with("guard.toml:5:8:") && e.contains("two [[agents]]"),
            "{e}"
        );
        let e = err("[[agents]]\nname = \"a\"\n");
        assert!(e.contains("exe"), "{e}");
    }

    #[test]
    fn wrong_type_is_located() {
        let e = err("[proxy]\nlisten_port = \"15001\"\n");
        assert!(e.starts_with("guard.toml:2:15:"), "{e}");
        let e = err("[proxy]\nlisten_port = 70000\n");
        assert!(e.starts_with("guard.toml:2:15:"), "{e}");
    }

    #[test]
    fn dns_servers_are_addresses_or_resolv_conf() {
        let c = Config::parse(
            "guard.toml",
            "[scope]\ndns_servers = [\"127.0.0.53\", \"resolv.conf\", \"fd00::1\"]\n",
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("guard-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n",
        )
        .unwrap();
        let got = c.scope.dns_server_addrs(&resolv).unwrap().unwrap();
        let want: Vec<IpAddr> = ["127.0.0.53", "10.0.0.2", "fe80::1", "fd00::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        // Not set: DNS to any address.
        assert_eq!(Scope::default().dns_server_addrs(&resolv).unwrap(), None);
        // resolv.conf named but listing none: refused with what to do.
        std::fs::write(&resolv, "search example.com\n").unwrap();
        let e = c.scope.dns_server_addrs(&resolv).unwrap_err().to_string();
        assert!(e.contains("lists no nameserver"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let e = err("[scope]\ndns_servers = [\"10.0.0.2\", \"dns.example\"]\n");
        assert!(e.starts_with("guard.toml:2:28: scope.dns_servers:"), "{e}");
    }

    #[test]
    fn bad_exempt_is_located() {
        let e = err("[scope]\nexempt = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n");
        assert!(e.starts_with("guard.toml:2:25: scope.exempt:"), "{e}");
        assert!(e.contains("prefix length"), "{e}");
        let e = err("[scope]\nexempt = [\"example.com\"]\n");
        assert!(e.contains("does not parse"), "{e}");
    }

    #[test]
    fn bad_size_is_located() {
        let e = err("[proxy]\nmax_body = \"4 parsecs\"\n");
        assert!(e.starts_with("guard.toml:2:12:"), "{e}");
        assert!(e.contains("unknown size unit"), "{e}");
    }

    #[test]
    fn bad_cgroup_path_is_located() {
        let e = err("[scope]\nguarded_cgroups = [\"a\", \"../etc\"]\n");
        assert!(
            e.starts_with("guard.toml:2:25: scope.guarded_cgroups:"),
            "{e}"
        );
        let e = err("[scope]\nguarded_cgroups = [\"/\"]\n");
        assert!(e.contains("whole host"), "{e}");
    }

    #[test]
    fn syntax_error_is_located() {
        let e = err("[scope\n");
        assert!(e.starts_with("guard.toml:1:"), "{e}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/guard.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/guard.toml: cannot read"), "{e}");
    }

    #[test]
    fn exempt_rules() {
        let r = ExemptRule::parse("10.1.2.3/8").unwrap();
        assert_eq!(r.addr, "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(r.port, None);
        let r = ExemptRule::parse("::ffff:10.0.0.1").unwrap();
        assert_eq!(r.addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(r.prefix, 32);
        assert!(ExemptRule::parse("10.0.0.0/8:0").is_err());
        assert!(ExemptRule::parse("[::1]:x").is_err());
        let wide = ExemptRule::parse("10.0.0.0/8").unwrap();
        let narrow = ExemptRule::parse("10.1.0.0/16:80").unwrap();
        assert!(wide.covers(&narrow));
        assert!(!narrow.covers(&wide));
        assert_eq!(narrow.to_string(), "10.1.0.0/16:80");
    }

    #[test]
    fn metrics_only_on_loopback() {
        assert!(Config::parse("g.toml", "[metrics]\nlisten = \"127.0.0.1:9000\"\n").is_ok());
        assert!(Config::parse("g.toml", "[metrics]\nlisten = \"\"\n")
            .unwrap()
            .metrics
            .addr()
            .is_none());
        let e = err("[metrics]\nlisten = \"0.0.0.0:9000\"\n");
        assert!(e.starts_with("guard.toml:2:1: metrics.listen"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("4MiB").unwrap(), ByteSize(4 << 20));
        assert_eq!(ByteSize::parse("100").unwrap(), ByteSize(100));
        assert_eq!(ByteSize::parse("2kB").unwrap(), ByteSize(2000));
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }
}
