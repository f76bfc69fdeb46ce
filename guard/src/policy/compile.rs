//! From the file as written ([`RawPolicy`]) to the form decisions are made on ([`ServerPolicy`]),
//! with the checks that serde cannot do. Errors carry the field path of the offending value.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::cond::Condition;
use super::limiter::Limit;
use super::locate::{message_at, Seg};
use super::matcher::Matcher;
use super::raw::{RawAction, RawGrant, RawLimit, RawPolicy, RawRateLimit, RawRule, ToolMap};
use super::subject::{always_passes, normalize_uri, Rules};
use super::{Action, DefaultAction, Grant, Rule, ServerPolicy, ToolChange};

/// Largest accepted `max` of a rate limit: counters keep one instant per counted call.
pub(super) const MAX_LIMIT: u64 = 1_000_000;

/// Default `approval_timeout`, seconds.
pub(super) const DEFAULT_APPROVAL_TIMEOUT: u64 = 120;

/// A semantic error: the path of the offending value (of its key, with `at_key`) and what is wrong.
#[derive(Debug)]
pub(super) struct Problem {
    pub path: Vec<Seg>,
    pub at_key: bool,
    pub what: String,
}

impl Problem {
    fn new(path: Vec<Seg>, what: impl Into<String>) -> Problem {
        Problem {
            path,
            at_key: false,
            what: what.into(),
        }
    }

    /// `tools.x.action: what`.
    pub fn message(&self) -> String {
        message_at(&self.path, self.what.clone())
    }
}

fn at(base: &[Seg], more: impl IntoIterator<Item = Seg>) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more);
    p
}

pub(super) fn compile(file: &str, raw: RawPolicy) -> Result<ServerPolicy, Vec<Problem>> {
    let mut errs = Vec::new();

    if raw.version != "1" {
        errs.push(Problem::new(
            vec!["version".into()],
            format!("unsupported version \"{}\", expected \"1\"", raw.version),
        ));
    }

    let (name, matchers) = server(file, raw.server, &mut errs);
    let mut hidden = HashSet::new();
    let mut hide_all = false;
    for (i, h) in raw.hide.iter().enumerate() {
        if h.is_empty() {
            errs.push(Problem::new(
                vec!["hide".into(), i.into()],
                "empty tool name",
            ));
        } else if h == "*" {
            hide_all = true;
        } else {
            hidden.insert(h.clone());
        }
    }
    let is_hidden = |t: &str| hide_all || hidden.contains(t);

    let server_key: Arc<str> = Arc::from(name.as_str());

    let mut all_tools = Vec::new();
    if let Some(a) = raw.all_tools {
        all_tools = limits(
            &["all_tools".into()],
            "all_tools",
            a.rate_limit,
            a.limits,
            &mut errs,
        );
    }

    let rules = rules(
        &[],
        "",
        [raw.tools, raw.resources, raw.prompts, raw.methods],
        &mut errs,
    );

    let mut grants = Vec::new();
    for (gi, g) in raw.grants.into_iter().enumerate() {
        let base = vec![Seg::from("grants"), gi.into()];
        if let Some(g) = grant(&base, gi, g, &is_hidden, &mut errs) {
            grants.push(g);
        }
    }

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(ServerPolicy {
        name,
        file: file.to_owned(),
        on_tool_change: raw.on_tool_change.unwrap_or(ToolChange::Block),
        description: raw.description,
        hide_denied: raw.hide_denied.unwrap_or(true),
        default: raw.default.unwrap_or(DefaultAction::Deny),
        matchers,
        key: server_key,
        hide_all,
        hidden,
        rules,
        all_tools,
        grants,
    })
}

/// `server`: its name (default: the file's stem) and its `match` entries.
fn server(
    file: &str,
    raw: Option<super::raw::RawServer>,
    errs: &mut Vec<Problem>,
) -> (String, Vec<(String, Matcher)>) {
    let (name, match_entries) = match raw {
        Some(s) => (s.name, s.matches),
        None => (None, Vec::new()),
    };
    let name_from_file = name.is_none();
    let name = name.unwrap_or_else(|| {
        Path::new(file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    if let Err(e) = check_server_name(&name) {
        let (path, what) = if name_from_file {
            (
                Vec::new(),
                format!(
                    "the server name taken from the file name, \"{name}\", {e}; set server.name"
                ),
            )
        } else {
            (
                vec!["server".into(), "name".into()],
                format!("\"{name}\" {e}"),
            )
        };
        errs.push(Problem::new(path, what));
    }

    let mut matchers = Vec::new();
    for (i, entry) in match_entries.iter().enumerate() {
        match Matcher::parse(entry) {
            Ok(m) => matchers.push((entry.to_string(), m)),
            Err(e) => errs.push(Problem::new(
                vec!["server".into(), "match".into(), i.into()],
                e,
            )),
        }
    }

    (name, matchers)
}

fn check_server_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 128 {
        return Err("is longer than 128 bytes");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains white space or control characters");
    }
    Ok(())
}

/// The four rule maps of a policy or grant (`prefix` is `""` or `grants[i].`), each name checked
/// for what it governs.
fn rules(base: &[Seg], prefix: &str, maps: [ToolMap; 4], errs: &mut Vec<Problem>) -> Rules {
    let [tools, resources, prompts, methods] = maps;
    let map = |field: &str, noun: &str, m: ToolMap, errs: &mut Vec<Problem>| {
        let path = at(base, [field.into()]);
        tool_map(&path, &format!("{prefix}{field}"), noun, m, errs)
    };
    let tools = map("tools", "tool", tools, errs).into_iter().collect();
    let mut checked = Vec::new();
    for (pattern, rule) in map("resources", "resource pattern", resources, errs) {
        // Patterns are matched against normalised URIs: one that normalisation would change
        // could never match as written.
        // (A pattern that starts with `*` has no scheme of its own to check.)
        let literal = pattern.replace('*', "x");
        match normalize_uri(&literal) {
            _ if pattern.starts_with('*') => checked.push((pattern, rule)),
            Ok(n) if n == literal => checked.push((pattern, rule)),
            Ok(n) => errs.push(Problem {
                path: at(base, ["resources".into(), Seg::Key(pattern.clone())]),
                at_key: true,
                what: format!(
                    "\"{pattern}\" would never match: URIs are matched normalised (lower-case scheme and host, escapes decoded, no default port, duplicate slashes, query or fragment), as in \"{n}\""
                ),
            }),
            Err(e) => errs.push(Problem {
                path: at(base, ["resources".into(), Seg::Key(pattern.clone())]),
                at_key: true,
                what: format!("\"{pattern}\" is not a URI pattern: {e}"),
            }),
        }
    }
    let prompts = map("prompts", "prompt", prompts, errs)
        .into_iter()
        .collect();
    let mut known = HashMap::new();
    for (method, rule) in map("methods", "method", methods, errs) {
        let hint = match method.as_str() {
            "tools/call" => Some("govern tools under \"tools\""),
            "resources/read" | "resources/subscribe" => {
                Some("govern resources by URI under \"resources\"")
            }
            "prompts/get" => Some("govern prompts by name under \"prompts\""),
            m if always_passes(m) => Some(
                "lifecycle, list and notification methods always pass (lists are filtered by the rules of what they list)",
            ),
            _ => None,
        };
        match hint {
            Some(h) => errs.push(Problem {
                path: at(base, ["methods".into(), Seg::Key(method.clone())]),
                at_key: true,
                what: format!("\"{method}\" cannot have a method rule: {h}"),
            }),
            None => {
                known.insert(method, rule);
            }
        }
    }
    Rules {
        tools,
        resources: checked,
        prompts,
        methods: known,
    }
}

fn tool_map(
    base: &[Seg],
    prefix: &str,
    noun: &str,
    map: ToolMap,
    errs: &mut Vec<Problem>,
) -> Vec<(String, Rule)> {
    // A name listed more than once is reported at its last occurrence (where the error locator,
    // like JSON's usual "last wins", points); none of its rules is compiled.
    let mut count: HashMap<String, usize> = HashMap::new();
    for (tool, _) in &map.0 {
        *count.entry(tool.clone()).or_default() += 1;
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(map.0.len());
    for (tool, raw) in map.0 {
        let n = count[&tool];
        let k = seen.entry(tool.clone()).or_default();
        *k += 1;
        if *k < n {
            continue;
        }
        let path = at(base, [Seg::Key(tool.clone())]);
        if tool.is_empty() {
            errs.push(Problem {
                path,
                at_key: true,
                what: format!("empty {noun} name"),
            });
        } else if n > 1 {
            errs.push(Problem {
                path,
                at_key: true,
                what: format!("{noun} \"{tool}\" is listed {n} times"),
            });
        } else if let Some(rule) = rule(&path, &format!("{prefix}.{tool}"), raw, errs) {
            out.push((tool, rule));
        }
    }
    out
}

fn rule(path: &[Seg], name: &str, raw: RawRule, errs: &mut Vec<Problem>) -> Option<Rule> {
    let before = errs.len();
    let action = match raw.action {
        None | Some(RawAction::Allow) => Action::Allow,
        Some(RawAction::Deny) => Action::Deny,
        Some(RawAction::RequireApproval) => Action::RequireApproval,
    };
    let approval_timeout = match (action, raw.approval_timeout) {
        (Action::RequireApproval, None) => DEFAULT_APPROVAL_TIMEOUT,
        (Action::RequireApproval, Some(0)) => {
            errs.push(Problem::new(
                at(path, ["approval_timeout".into()]),
                "must be at least 1 second",
            ));
            0
        }
        (Action::RequireApproval, Some(t)) => t,
        (_, Some(_)) => {
            errs.push(Problem::new(
                at(path, ["approval_timeout".into()]),
                "only applies to \"action\": \"require_approval\"",
            ));
            0
        }
        (_, None) => 0,
    };
    if action == Action::Deny {
        for (field, present) in [
            ("when", raw.when.is_some()),
            ("rate_limit", raw.rate_limit.is_some()),
            ("limits", raw.limits.is_some()),
        ] {
            if present {
                errs.push(Problem::new(
                    at(path, [field.into()]),
                    "has no effect on a rule with \"action\": \"deny\"",
                ));
            }
        }
    }
    let mut when = Vec::new();
    for (i, c) in raw.when.unwrap_or_default().into_iter().enumerate() {
        let cpath = at(path, ["when".into(), i.into()]);
        match Condition::compile(c, format!("{name}.when[{i}]")) {
            Ok(c) => when.push(c),
            Err((rel, what)) => errs.push(Problem::new(at(&cpath, rel), what)),
        }
    }
    let limits = limits(path, name, raw.rate_limit, raw.limits, errs);
    (errs.len() == before).then_some(Rule {
        name: name.to_owned(),
        action,
        reason: raw.reason,
        approval_timeout,
        when,
        limits,
    })
}

fn limits(
    path: &[Seg],
    name: &str,
    rate_limit: Option<RawRateLimit>,
    list: Option<Vec<RawLimit>>,
    errs: &mut Vec<Problem>,
) -> Vec<Limit> {
    let mut out = Vec::new();
    let mut one = |lpath: Vec<Seg>,
                   lname: String,
                   max: u64,
                   window: u64,
                   scope: Option<super::Scope>,
                   label: Option<String>| {
        if max == 0 || max > MAX_LIMIT {
            errs.push(Problem::new(
                at(&lpath, ["max".into()]),
                format!("must be between 1 and {MAX_LIMIT} (use \"action\": \"deny\" to refuse every call)"),
            ));
            return;
        }
        out.push(Limit {
            name: Arc::from(lname),
            max,
            window: Duration::from_secs(window),
            scope: scope.unwrap_or_default(),
            label,
        });
    };
    if let Some(r) = rate_limit {
        one(
            at(path, ["rate_limit".into()]),
            format!("{name}.rate_limit"),
            r.max,
            r.window.0,
            r.scope,
            None,
        );
    }
    for (i, l) in list.unwrap_or_default().into_iter().enumerate() {
        one(
            at(path, ["limits".into(), i.into()]),
            format!("{name}.limits[{i}]"),
            l.max,
            l.window.0,
            l.scope,
            l.counter,
        );
    }
    out
}

/// A grant's selectors: at least one, none empty, executables as absolute paths.
fn check_selectors(base: &[Seg], g: &RawGrant, errs: &mut Vec<Problem>) {
    if g.agents.is_none() && g.uids.is_none() && g.exes.is_none() && g.cgroups.is_none() {
        errs.push(Problem::new(
            base.to_vec(),
            "a grant needs at least one selector (agents, uids, exes or cgroups); grants only ever apply to the callers they name",
        ));
    }
    let mut nonempty = |field: &str, len: Option<usize>| {
        if len == Some(0) {
            errs.push(Problem::new(
                at(base, [field.into()]),
                "an empty list matches no caller; remove the field or name someone",
            ));
        }
    };
    nonempty("agents", g.agents.as_ref().map(Vec::len));
    nonempty("uids", g.uids.as_ref().map(Vec::len));
    nonempty("exes", g.exes.as_ref().map(Vec::len));
    nonempty("cgroups", g.cgroups.as_ref().map(Vec::len));
    for (i, a) in g.agents.iter().flatten().enumerate() {
        if a.is_empty() {
            errs.push(Problem::new(
                at(base, ["agents".into(), i.into()]),
                "empty agent name",
            ));
        }
    }
    for (i, e) in g.exes.iter().flatten().enumerate() {
        if !e.starts_with('/') {
            errs.push(Problem::new(
                at(base, ["exes".into(), i.into()]),
                format!("\"{e}\" is not an absolute path"),
            ));
        }
    }
    for (i, c) in g.cgroups.iter().flatten().enumerate() {
        if c.is_empty() {
            errs.push(Problem::new(
                at(base, ["cgroups".into(), i.into()]),
                "empty cgroup path (use \"/\" for every cgroup)",
            ));
        }
    }
}

fn grant(
    base: &[Seg],
    gi: usize,
    g: RawGrant,
    is_hidden: &dyn Fn(&str) -> bool,
    errs: &mut Vec<Problem>,
) -> Option<Grant> {
    let before = errs.len();
    check_selectors(base, &g, errs);
    let tbase = at(base, ["tools".into()]);
    for (tool, _) in &g.tools.0 {
        if is_hidden(tool) {
            errs.push(Problem {
                path: at(&tbase, [Seg::Key(tool.clone())]),
                at_key: true,
                what: format!("tool \"{tool}\" is hidden by \"hide\"; grants cannot unhide it"),
            });
        }
    }
    // `"hide": ["*"]` hides every resource and prompt too.
    for (field, map) in [("resources", &g.resources), ("prompts", &g.prompts)] {
        if let Some((name, _)) = map.0.first().filter(|_| is_hidden("*")) {
            errs.push(Problem {
                path: at(base, [field.into(), Seg::Key(name.clone())]),
                at_key: true,
                what: format!("\"hide\": [\"*\"] hides every {field}; grants cannot unhide them"),
            });
        }
    }
    let rules = rules(
        base,
        &format!("grants[{gi}]."),
        [g.tools, g.resources, g.prompts, g.methods],
        errs,
    );
    let specificity = [
        g.agents.is_some(),
        g.uids.is_some(),
        g.exes.is_some(),
        g.cgroups.is_some(),
    ]
    .into_iter()
    .filter(|&listed| listed)
    .count();
    (errs.len() == before).then(|| Grant {
        default_name: format!("grants[{gi}].default"),
        agents: g.agents,
        uids: g.uids,
        exes: g.exes,
        // Stored without leading and trailing slashes: "" is the root and covers every cgroup.
        cgroups: g
            .cgroups
            .map(|v| v.iter().map(|c| c.trim_matches('/').to_owned()).collect()),
        specificity,
        rules,
        default: g.default,
    })
}
