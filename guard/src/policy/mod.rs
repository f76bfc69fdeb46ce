//! The policy engine: which MCP tool calls an agent may make (README "Policies").
//!
//! Pure: apart from [`PolicySet::load_dir`] / [`PolicySet::load`] reading the files, nothing here
//! does I/O. The proxy finds the [`ServerPolicy`] for a request ([`PolicySet::match_request`],
//! [`PolicySet::match_sni`]), asks it for a [`Decision`] on each `tools/call`
//! ([`ServerPolicy::decide`]) and filters `tools/list` ([`ServerPolicy::visible`]).
//!
//! # Files
//!
//! One JSON file per MCP server in a directory; every `*.json` is read in name order (names
//! starting with `.` are skipped, as editors' lock and backup files), other files are ignored.
//! The format is a superset of PolicyLayer's `policy.json`:
//!
//! ```json
//! {
//!   "version": "1",
//!   "server": { "name": "flux", "match": ["https://api.acedata.cloud/flux/mcp", "127.0.0.1:8000"] },
//!   "default": "deny",
//!   "hide": ["flux_edit_image"],
//!   "hide_denied": true,
//!   "on_tool_change": "block",
//!   "all_tools": { "rate_limit": { "max": 100, "window": 60 } },
//!   "tools": {
//!     "flux_get_task": {},
//!     "flux_generate_image": { "rate_limit": { "max": 10, "window": 60, "scope": "agent" } },
//!     "flux_edit_image": { "action": "deny", "reason": "image editing is not approved" },
//!     "flux_generate_video": { "action": "require_approval", "approval_timeout": 120 },
//!     "flux_get_tasks_batch": { "when": [ { "path": "task_ids", "op": "max_items", "value": 10 } ],
//!                               "reason": "at most 10 tasks per call" }
//!   },
//!   "grants": [ { "agents": ["research-bot"], "uids": [1001], "tools": { "flux_generate_video": {} } } ]
//! }
//! ```
//!
//! - `version` must be `"1"`; `description` is free text.
//! - `server.name` defaults to the file's stem. `server.match` lists URLs
//!   (`http[s]://host[:port]/path`: host, port and path prefix) and `host:port` entries (names
//!   are compared with the `Host` header or SNI, IP literals also with the original destination).
//!   **A file without `server` (as exported from PolicyLayer) matches no traffic by address**: it
//!   is found only by name ([`PolicySet::by_name`], e.g. `guard policy explain --server NAME`),
//!   until a `server.match` is added.
//! - `default`: `"allow"` | `"deny"` (default `"deny"`) for tools not listed in `tools`.
//! - A tool rule `{}` allows; `action`: `"allow"` | `"deny"` (+ `reason`) | `"require_approval"`
//!   (+ `approval_timeout` seconds, default 120).
//! - `rate_limit: {max, window, scope}`: `window` in seconds (or `"second"`, `"minute"`,
//!   `"hour"`, `"day"`), `scope` `"session"` | `"agent"` (default) | `"uid"` | `"global"`; the
//!   string `"10/minute"` is a shorthand. PolicyLayer's `limits: [{counter, window, max, scope}]`
//!   is the same thing spelled as a list (`counter` is a label). Windows slide. A tool's limits
//!   and `all_tools`' limits all apply; `all_tools`' are shared by every tool of the server.
//!   The `session` scope counts per agent instance (not per MCP session id, which the agent
//!   can renew at will to start over), and the `agent` scope falls back to the uid when the
//!   caller has no agent name.
//! - `when: [{path, op, value}]`: conditions on `params.arguments`, all of which must hold.
//!   `path` is dotted (`a.b.0`, optionally `$.`-prefixed; `a.b[0]` also works; `$` is the
//!   arguments object); ops `eq neq in not_in lt lte gt gte regex contains exists max_items
//!   max_length`. A missing path fails (but satisfies `exists: false`). Numbers compare by value;
//!   `lt`.. compare numbers with numbers and strings with strings; `regex` is unanchored.
//! - `resources` (URI pattern -> rule, `*` any run of characters, matched on the URI as
//!   [`normalize_uri`] reads it), `prompts` (name -> rule) and `methods` (method name -> rule:
//!   `completion/complete`, `tasks/*`, vendor methods, and the requests servers send clients) are
//!   rules like tools' ([`Subject`], [`ServerPolicy::decide_on`]); what none names follows
//!   `default`. Lifecycle, list and notification methods always pass (lists are filtered).
//! - `hide`: never listed, always denied (grants cannot unhide); `"*"` hides everything (every
//!   tool, resource and prompt).
//!   `hide_denied` (default true) also removes from `tools/list` the tools this caller would be
//!   denied outright (tools with conditions stay listed: arguments decide).
//! - `grants`: `{agents, uids, exes, cgroups, tools, default}`. A grant applies when every
//!   selector kind it lists matches the caller (a cgroup also covers its descendants). Of the
//!   applicable grants, the most specific (most selector kinds) with a rule for the tool wins
//!   (ties: file order) and replaces the base rule; likewise a grant `default` replaces `default`.
//!
//! Evaluation order: hide -> deny -> conditions -> rate limit -> approval -> allow. Only a call
//! that passes the rate-limit step is counted (also when it then waits for approval).

pub mod bundle;
mod compile;
mod cond;
mod limiter;
mod load;
mod locate;
mod matcher;
mod raw;
pub(crate) mod subject;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use self::cond::Condition;
use self::limiter::Limit;
pub use self::limiter::{RateLimiter, SavedCounter};
use self::matcher::Matcher;
use self::subject::Rules;
pub use self::subject::{always_passes, normalize_uri, Subject};

/// What to do when a tool's definition changes after it was first seen (README "Policies",
/// pinning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChange {
    #[default]
    Block,
    Allow,
}

/// The answer for tools no rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    Allow,
    Deny,
}

/// Whose calls a rate limit counts together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One agent instance (see [`Caller::instance`]; falls back to the agent when unknown).
    Session,
    /// One agent name (falls back to the uid when the caller has none).
    #[default]
    Agent,
    Uid,
    Global,
}

/// Who makes a call, as the proxy identified them.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// `guard exec --agent NAME`.
    pub agent: Option<String>,
    pub uid: u32,
    /// The `exes` paths of the policy (as the daemon's namespace resolves them) that are the
    /// file the caller executes, by the kernel's record of it (device and inode at connect).
    pub exes: Vec<String>,
    /// cgroup v2 path, relative to the cgroup mount (e.g. `/guard.slice/agent-bot-1`).
    pub cgroup: Option<String>,
    /// The agent instance: the cgroup id the connection came from (one `guard exec`, or one
    /// cgroup of processes). `session`-scoped limits count per instance, not per MCP session id,
    /// which the agent chooses and can renew at will.
    pub instance: Option<u64>,
}

/// The verdict on one `tools/call`. `rule` names what decided (e.g. `tools.x`, `hide`,
/// `tools.x.when[0]`, `all_tools.rate_limit`, `grants[0].tools.x`, `default`).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow {
        rule: String,
    },
    /// JSON-RPC -32001.
    Deny {
        rule: String,
        reason: String,
    },
    /// JSON-RPC -32002.
    RateLimited {
        rule: String,
        reason: String,
        retry_after_s: u64,
    },
    RequireApproval {
        rule: String,
        timeout_s: u64,
    },
}

impl Decision {
    pub fn rule(&self) -> &str {
        match self {
            Decision::Allow { rule }
            | Decision::Deny { rule, .. }
            | Decision::RateLimited { rule, .. }
            | Decision::RequireApproval { rule, .. } => rule,
        }
    }

    /// The reason, for the refusals.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Deny { reason, .. } | Decision::RateLimited { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// `"allow"`, `"deny"`, `"rate_limited"`, `"require_approval"` (for audit and explain).
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow",
            Decision::Deny { .. } => "deny",
            Decision::RateLimited { .. } => "rate_limited",
            Decision::RequireApproval { .. } => "require_approval",
        }
    }
}

/// An invalid policy: `file:line:col: field.path: what is wrong`. `line` and `col` are 1-based
/// (columns count characters); both are 0 for errors about a whole file or directory.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

impl std::error::Error for PolicyError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    RequireApproval,
}

/// A compiled rule (for a tool, resource pattern, prompt or method).
#[derive(Debug)]
struct Rule {
    name: String,
    action: Action,
    reason: Option<String>,
    approval_timeout: u64,
    when: Vec<Condition>,
    limits: Vec<Limit>,
}

#[derive(Debug)]
struct Grant {
    default_name: String,
    agents: Option<Vec<String>>,
    uids: Option<Vec<u32>>,
    exes: Option<Vec<String>>,
    /// Without leading/trailing slashes.
    cgroups: Option<Vec<String>>,
    specificity: usize,
    rules: Rules,
    default: Option<DefaultAction>,
}

impl Grant {
    fn applies(&self, c: &Caller) -> bool {
        fn named(list: &Option<Vec<String>>, who: &Option<String>) -> bool {
            match list {
                None => true,
                Some(l) => who.as_ref().is_some_and(|w| l.iter().any(|x| x == w)),
            }
        }
        named(&self.agents, &c.agent)
            && self.uids.as_ref().is_none_or(|u| u.contains(&c.uid))
            && self
                .exes
                .as_ref()
                .is_none_or(|l| l.iter().any(|x| c.exes.contains(x)))
            && match &self.cgroups {
                None => true,
                Some(list) => c.cgroup.as_deref().is_some_and(|cg| {
                    let cg = cg.trim_matches('/');
                    list.iter().any(|g| {
                        g.is_empty()
                            || cg == g
                            || (cg.starts_with(g.as_str()) && cg.as_bytes()[g.len()] == b'/')
                    })
                }),
            }
    }
}

/// What governs one tool for one caller.
enum Resolved<'a> {
    Rule(&'a Rule),
    Default(DefaultAction, &'a str),
}

/// The policy for one MCP server (one file).
#[derive(Debug)]
pub struct ServerPolicy {
    pub name: String,
    /// The file it was loaded from (as named to the loader).
    pub file: String,
    pub on_tool_change: ToolChange,
    pub description: Option<String>,
    pub hide_denied: bool,
    /// The base `default` (before grants).
    pub default: DefaultAction,
    matchers: Vec<(String, Matcher)>,
    key: Arc<str>,
    hide_all: bool,
    hidden: HashSet<String>,
    rules: Rules,
    all_tools: Vec<Limit>,
    grants: Vec<Grant>,
}

impl ServerPolicy {
    /// The `server.match` entries as written.
    pub fn match_entries(&self) -> impl Iterator<Item = &str> {
        self.matchers.iter().map(|(s, _)| s.as_str())
    }

    /// Every executable path the grants name (decisions compare the caller's executable
    /// with these; see [`Caller::exes`]).
    pub fn grant_exes(&self) -> impl Iterator<Item = &str> {
        self.grants
            .iter()
            .flat_map(|g| g.exes.iter().flatten())
            .map(String::as_str)
    }

    /// The tools the base policy names (not grants), in no particular order.
    pub fn tool_names(&self) -> impl Iterator<Item = &str> {
        self.rules.tools.keys().map(String::as_str)
    }

    /// Whether `hide` hides `tool` (from everyone).
    pub fn is_hidden(&self, tool: &str) -> bool {
        self.hides(Subject::Tool(tool))
    }

    /// Whether `hide` hides `s` from everyone: tools by name, and with `"*"` also every resource
    /// and prompt.
    pub fn hides(&self, s: Subject<'_>) -> bool {
        match s {
            Subject::Tool(t) => self.hide_all || self.hidden.contains(t),
            Subject::Resource(_) | Subject::Prompt(_) => self.hide_all,
            Subject::Method(_) => false,
        }
    }

    /// Pure decision for one `tools/call`; counts the call against its rate limits when it
    /// passes them. `args` is `params.arguments` (anything else, e.g. `Null`, has no fields).
    pub fn decide(
        &self,
        tool: &str,
        args: &Value,
        caller: &Caller,
        limiter: &RateLimiter,
        now: Instant,
    ) -> Decision {
        self.evaluate(Subject::Tool(tool), args, caller, limiter, now, true)
    }

    /// [`decide`](Self::decide) for any subject. `args` is what conditions read:
    /// `params.arguments` for tools and prompts, `params` for resources and methods.
    pub fn decide_on(
        &self,
        s: Subject<'_>,
        args: &Value,
        caller: &Caller,
        limiter: &RateLimiter,
        now: Instant,
    ) -> Decision {
        self.evaluate(s, args, caller, limiter, now, true)
    }

    /// [`explain`](Self::explain) for any subject.
    pub fn explain_on(
        &self,
        s: Subject<'_>,
        args: &Value,
        caller: &Caller,
        limiter: &RateLimiter,
        now: Instant,
    ) -> Decision {
        self.evaluate(s, args, caller, limiter, now, false)
    }

    /// Same as [`decide`](Self::decide), without consuming rate-limit budget
    /// (for `guard policy explain`).
    pub fn explain(
        &self,
        tool: &str,
        args: &Value,
        caller: &Caller,
        limiter: &RateLimiter,
        now: Instant,
    ) -> Decision {
        self.evaluate(Subject::Tool(tool), args, caller, limiter, now, false)
    }

    /// Whether the decision on `tool` for `caller` reads the call's arguments (a rule with
    /// conditions that is not a plain deny): without them it cannot be made again.
    pub fn reads_arguments(&self, tool: &str, caller: &Caller) -> bool {
        if self.hides(Subject::Tool(tool)) {
            return false;
        }
        match self.resolve(Subject::Tool(tool), caller) {
            Resolved::Rule(r) => r.action != Action::Deny && !r.when.is_empty(),
            Resolved::Default(..) => false,
        }
    }

    /// Whether `tools/list` should show `tool` to this caller: not hidden, and (with
    /// `hide_denied`) not denied to them outright.
    pub fn visible(&self, tool: &str, caller: &Caller) -> bool {
        self.visible_on(Subject::Tool(tool), caller)
    }

    /// Whether a list (`tools/list`, `resources/list`, `resources/templates/list`,
    /// `prompts/list`) should show `s` to this caller.
    pub fn visible_on(&self, s: Subject<'_>, caller: &Caller) -> bool {
        if self.hides(s) {
            return false;
        }
        if !self.hide_denied {
            return true;
        }
        match self.resolve(s, caller) {
            Resolved::Rule(r) => r.action != Action::Deny,
            Resolved::Default(d, _) => d == DefaultAction::Allow,
        }
    }

    fn resolve<'a>(&'a self, s: Subject<'_>, caller: &Caller) -> Resolved<'a> {
        let mut rule: Option<(usize, &Rule)> = None;
        let mut default: Option<(usize, DefaultAction, &str)> = None;
        for g in &self.grants {
            let found = g.rules.get(s);
            if !(found.is_some() || g.default.is_some()) || !g.applies(caller) {
                continue;
            }
            if let Some(r) = found {
                if rule.is_none_or(|(s, _)| g.specificity > s) {
                    rule = Some((g.specificity, r));
                }
            }
            if let Some(d) = g.default {
                if default.is_none_or(|(s, _, _)| g.specificity > s) {
                    default = Some((g.specificity, d, &g.default_name));
                }
            }
        }
        if let Some((_, r)) = rule {
            return Resolved::Rule(r);
        }
        if let Some(r) = self.rules.get(s) {
            return Resolved::Rule(r);
        }
        match default {
            Some((_, d, name)) => Resolved::Default(d, name),
            None => Resolved::Default(self.default, "default"),
        }
    }

    fn evaluate(
        &self,
        s: Subject<'_>,
        args: &Value,
        caller: &Caller,
        limiter: &RateLimiter,
        now: Instant,
        consume: bool,
    ) -> Decision {
        let (noun, what) = (s.noun(), s.name());
        // 1. hide
        if self.hides(s) {
            return Decision::Deny {
                rule: "hide".into(),
                reason: format!("{noun} \"{what}\" is hidden by policy"),
            };
        }
        let (rule, default_name) = match self.resolve(s, caller) {
            Resolved::Rule(r) => (Some(r), ""),
            Resolved::Default(DefaultAction::Allow, name) => (None, name),
            Resolved::Default(DefaultAction::Deny, name) => {
                return Decision::Deny {
                    rule: name.to_owned(),
                    reason: format!(
                        "{noun} \"{what}\" is not allowed by the policy of server \"{}\"",
                        self.name
                    ),
                };
            }
        };
        // 2. deny
        if let Some(r) = rule {
            if r.action == Action::Deny {
                return Decision::Deny {
                    rule: r.name.clone(),
                    reason: r
                        .reason
                        .clone()
                        .unwrap_or_else(|| format!("{noun} \"{what}\" is denied by policy")),
                };
            }
            // 3. conditions
            for c in &r.when {
                if !c.holds(args) {
                    return Decision::Deny {
                        rule: c.name.clone(),
                        reason: r.reason.clone().unwrap_or_else(|| c.describe_failure(args)),
                    };
                }
            }
        }
        // 4. rate limits: the rule's and (for tools) all_tools', all or nothing.
        let rule_limits = rule.map_or(&[][..], |r| &r.limits[..]);
        let shared = match s {
            Subject::Tool(_) => &self.all_tools[..],
            _ => &[][..],
        };
        if !rule_limits.is_empty() || !shared.is_empty() {
            let limits = rule_limits.iter().chain(shared.iter());
            if let Err(e) = limiter.check(&self.key, limits, caller, now, consume) {
                return Decision::RateLimited {
                    rule: e.limit.name.to_string(),
                    reason: e.limit.reason(e.retry_after_s),
                    retry_after_s: e.retry_after_s,
                };
            }
        }
        // 5. approval, 6. allow
        match rule {
            Some(r) if r.action == Action::RequireApproval => Decision::RequireApproval {
                rule: r.name.clone(),
                timeout_s: r.approval_timeout,
            },
            Some(r) => Decision::Allow {
                rule: r.name.clone(),
            },
            None => Decision::Allow {
                rule: default_name.to_owned(),
            },
        }
    }
}

/// Which server, of those policies name at one address, a request belongs to.
#[derive(Debug)]
pub enum Among<'a> {
    One(&'a ServerPolicy),
    /// No entry of theirs fits the request's path (and `Host`).
    Unmatched,
    /// Two servers fit alike, or the path reads differently written and decoded: why.
    Ambiguous(String),
}

/// Every loaded policy, in load order.
#[derive(Debug, Default)]
pub struct PolicySet {
    servers: Vec<ServerPolicy>,
    by_name: HashMap<String, usize>,
    /// [`bundle::digest`] of the files it was loaded from: what hosts compare.
    sha256: String,
}

impl PolicySet {
    /// A set with no policy (every MCP server is unknown).
    pub fn empty() -> PolicySet {
        PolicySet {
            sha256: bundle::digest(&[]),
            ..PolicySet::default()
        }
    }

    pub fn servers(&self) -> &[ServerPolicy] {
        &self.servers
    }

    /// The hash of the files this set was loaded from (the manifest's SHA-256).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn by_name(&self, name: &str) -> Option<&ServerPolicy> {
        self.by_name.get(name).map(|&i| &self.servers[i])
    }

    /// The policy for a request: `Host` header (if any), the connection's original destination
    /// and the request target. A match on the destination address beats one on the `Host`
    /// header (which the agent chooses); then a URL entry beats `host:port`, and a longer path
    /// prefix a shorter one; remaining ties go to the first in load order.
    pub fn match_request(
        &self,
        host: Option<&str>,
        dst: SocketAddr,
        path: &str,
    ) -> Option<&ServerPolicy> {
        self.best(|m| m.score_request(host, dst, path))
    }

    /// Which of `names` — the servers policies name at the destination `dst` — a request there
    /// belongs to, by its `Host` and path: the best-fitting entry (one naming the destination
    /// or the `Host`, then a URL entry, then the longer path prefix). The path is read as
    /// servers read it (percent-decoded, without dot segments and duplicate slashes); when
    /// that reading and the path as written fit different servers, or two servers fit alike,
    /// the request is ambiguous.
    pub fn choose_among(
        &self,
        names: &[String],
        host: Option<&str>,
        dst: SocketAddr,
        target: &str,
    ) -> Among<'_> {
        let raw = matcher::request_path(target);
        let Ok(decoded) = subject::percent_decode(raw) else {
            return Among::Ambiguous(format!(
                "the path {raw:?} holds a percent escape servers read differently"
            ));
        };
        let clean = subject::clean_path(&decoded);
        let pick = |path: &str, fold: bool| -> Result<Option<&ServerPolicy>, String> {
            let mut best: Option<(matcher::Score, &ServerPolicy)> = None;
            let mut tied: Option<&str> = None;
            for s in self.servers.iter().filter(|s| names.contains(&s.name)) {
                let score = s
                    .matchers
                    .iter()
                    .filter_map(|(_, m)| m.score_at(host, dst, path, fold))
                    .max();
                let Some(sc) = score else { continue };
                match best {
                    Some((b, _)) if sc < b => {}
                    Some((b, other)) if sc == b => tied = Some(&other.name),
                    _ => {
                        best = Some((sc, s));
                        tied = None;
                    }
                }
            }
            match (best, tied) {
                (Some((_, s)), Some(other)) => Err(format!(
                    "the servers \"{}\" and \"{other}\" fit the request alike",
                    s.name
                )),
                (best, _) => Ok(best.map(|(_, s)| s)),
            }
        };
        // As written, as decoded and normalised, and without regard to case (servers route
        // each way): one answer, or the request is ambiguous.
        let (as_written, as_read, folded) =
            match (pick(raw, false), pick(&clean, false), pick(&clean, true)) {
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Among::Ambiguous(e),
                (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            };
        let same = |x: Option<&ServerPolicy>, y: Option<&ServerPolicy>| match (x, y) {
            (Some(x), Some(y)) => std::ptr::eq(x, y),
            (None, None) => true,
            _ => false,
        };
        if !same(as_written, as_read) {
            return Among::Ambiguous(format!(
                "the path {raw:?} reads as {clean:?} once decoded and normalised, which another server's policy covers"
            ));
        }
        if !same(as_read, folded) {
            return Among::Ambiguous(format!(
                "the path {raw:?} fits another server's policy when case is ignored, as some servers route"
            ));
        }
        match as_read {
            Some(s) => Among::One(s),
            None => Among::Unmatched,
        }
    }

    /// The policy for a stdio server `guard wrap` starts, by its command line (arguments
    /// joined by single spaces) against the `stdio:GLOB` entries: the entry with the most
    /// literal characters wins, ties go to the first in load order.
    /// Whether policy `name` matches stdio servers by their command lines (`stdio:` entries)
    /// and `command` matches none of them.
    pub fn stdio_mismatch(&self, name: &str, command: &str) -> bool {
        let Some(s) = self.by_name(name) else {
            return false;
        };
        let mut stdio = s
            .matchers
            .iter()
            .filter(|(_, m)| matches!(m, Matcher::Stdio(_)))
            .peekable();
        stdio.peek().is_some() && !stdio.any(|(_, m)| m.score_stdio(command).is_some())
    }

    pub fn match_stdio(&self, command: &str) -> Option<&ServerPolicy> {
        let mut best: Option<(usize, &ServerPolicy)> = None;
        for s in &self.servers {
            for (_, m) in &s.matchers {
                if let Some(sc) = m.score_stdio(command) {
                    if best.is_none_or(|(b, _)| sc > b) {
                        best = Some((sc, s));
                    }
                }
            }
        }
        best.map(|(_, s)| s)
    }

    /// The policy for a TLS connection: SNI name (if any) and original destination (paths are
    /// not known yet: per request, use [`match_request`](Self::match_request)).
    pub fn match_sni(&self, sni: Option<&str>, dst: SocketAddr) -> Option<&ServerPolicy> {
        self.best(|m| m.score_sni(sni, dst))
    }

    fn best(&self, score: impl Fn(&Matcher) -> Option<matcher::Score>) -> Option<&ServerPolicy> {
        let mut best: Option<(matcher::Score, &ServerPolicy)> = None;
        for s in &self.servers {
            for (_, m) in &s.matchers {
                if let Some(sc) = score(m) {
                    if best.is_none_or(|(b, _)| sc > b) {
                        best = Some((sc, s));
                    }
                }
            }
        }
        best.map(|(_, s)| s)
    }
}
