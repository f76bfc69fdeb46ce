//! `guard policy check | explain | replay`: validate policies, explain a decision, re-decide
//! recorded calls under a draft; no daemon needed.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    config::Config,
    daemon::{
        self,
        control::{self, Request},
    },
    policy::{Caller, Decision, PolicySet, RateLimiter},
};

/// The policy directory the running daemon uses (it may have been given `--policies`), else
/// the configuration's.
pub(super) fn policies_dir(config: &Config) -> PathBuf {
    control::call(&config.paths.control_socket, Request::Status)
        .ok()
        .and_then(|s| s.get("policies").and_then(Value::as_str).map(PathBuf::from))
        .unwrap_or_else(|| config.paths.policies.clone())
}

/// `guard policy sign DIR --key K --out FILE`: the directory's `*.json`, checked, as a bundle.
pub(super) fn policy_sign(
    dir: &std::path::Path,
    key: &std::path::Path,
    out: &std::path::Path,
) -> Result<i32> {
    if let Err(errors) = PolicySet::load_dir(dir) {
        for e in &errors {
            eprintln!("{e}");
        }
        eprintln!(
            "{}: {} errors; no bundle was made",
            dir.display(),
            errors.len()
        );
        return Ok(1);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") || !e.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(e.path())
            .with_context(|| format!("reading {}", e.path().display()))?;
        files.push((name, text));
    }
    let sk = std::fs::read_to_string(key)
        .with_context(|| format!("reading the secret key {}", key.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let password = std::env::var("GUARD_KEY_PASSWORD").ok();
    let bundle = crate::policy::bundle::pack(&files, &sk, password, now)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &bundle)
        .and_then(|()| std::fs::rename(&tmp, out))
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: {} policy files signed, sha256 {}",
        out.display(),
        files.len(),
        crate::policy::bundle::digest(&files)
    );
    Ok(0)
}

/// `guard policy keygen PREFIX`: PREFIX.key (0600; encrypted with GUARD_KEY_PASSWORD if set)
/// and PREFIX.pub.
pub(super) fn policy_keygen(prefix: &std::path::Path) -> Result<i32> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let (sk, pk) =
        crate::policy::bundle::keygen(&std::env::var("GUARD_KEY_PASSWORD").unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = prefix.with_extension("key");
    let public = prefix.with_extension("pub");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(sk.as_bytes()))
        .with_context(|| {
            format!(
                "writing {} (an existing key is never overwritten)",
                key.display()
            )
        })?;
    std::fs::write(&public, &pk).with_context(|| format!("writing {}", public.display()))?;
    let line = pk.lines().last().unwrap_or_default();
    println!("{}: secret key (keep it off agent hosts)\n{}: public key\n\n[policy]\nverify_key = \"{line}\"", key.display(), public.display());
    Ok(0)
}

pub(super) fn policy_check(config: &Config, path: Option<PathBuf>) -> Result<i32> {
    let path = path.unwrap_or_else(|| policies_dir(config));
    let result = if path.is_dir() {
        PolicySet::load_dir(&path)
    } else {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        PolicySet::from_files(&[(path.display().to_string(), text)])
    };
    match result {
        Ok(set) => {
            let names: Vec<&str> = set.servers().iter().map(|s| s.name.as_str()).collect();
            println!(
                "{}: ok, {} server policies ({})",
                path.display(),
                names.len(),
                names.join(", ")
            );
            Ok(0)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "{}: {} errors; nothing was loaded",
                path.display(),
                errors.len()
            );
            Ok(1)
        }
    }
}

pub(super) fn policy_explain(
    dir: &std::path::Path,
    server: &str,
    tool: &str,
    caller: &Caller,
    args: &str,
    json: bool,
) -> Result<i32> {
    let args: Value = serde_json::from_str(args).context("--args is not valid JSON")?;
    let set = daemon::load_policies(dir)?;
    let Some(sp) = set.by_name(server) else {
        let names: Vec<&str> = set.servers().iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!(
            "no policy for server `{server}` in {} (known: {})",
            dir.display(),
            names.join(", ")
        );
    };
    let d = sp.explain(
        tool,
        &args,
        caller,
        &RateLimiter::new(),
        std::time::Instant::now(),
    );
    let (decision, rule, detail) = match &d {
        Decision::Allow { rule } => ("allow", rule.clone(), String::new()),
        Decision::Deny { rule, reason } => ("deny", rule.clone(), reason.clone()),
        Decision::RateLimited {
            rule,
            reason,
            retry_after_s,
        } => (
            "rate_limited",
            rule.clone(),
            format!("{reason} (retry after {retry_after_s} s)"),
        ),
        Decision::RequireApproval { rule, timeout_s } => (
            "require_approval",
            rule.clone(),
            format!("held for a human for up to {timeout_s} s"),
        ),
    };
    let visible = sp.visible(tool, caller);
    if json {
        println!(
            "{}",
            serde_json::json!({"server": sp.name, "file": sp.file, "tool": tool, "decision": decision,
                "rule": rule, "reason": detail, "listed": visible})
        );
    } else {
        println!("{server} / {tool}: {decision} (rule {rule}, {})", sp.file);
        if !detail.is_empty() {
            println!("  {detail}");
        }
        if !visible {
            println!("  not shown in tools/list to this caller");
        }
    }
    Ok(0)
}

/// How a `tool_call` was decided, or would be, as replay compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Outcome {
    Allowed,
    Denied,
    /// Held for a person (`require_approval`).
    Held,
}

/// One group of recorded calls whose outcome a draft changes (or cannot tell).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(super) struct Change {
    pub agent: String,
    pub server: String,
    pub tool: String,
    /// None: undecidable (the rule reads arguments the audit did not keep).
    pub then: Option<Outcome>,
    pub now: Option<Outcome>,
    pub rule: String,
    pub calls: usize,
}

/// What replaying recorded calls under a draft found.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(super) struct Replay {
    pub changed: Vec<Change>,
    pub undecidable: Vec<Change>,
    pub unchanged: usize,
    /// Rate-limited or pin-blocked then: windows and pins are not replayed.
    pub not_replayed: usize,
}

/// Re-decides the `tool_call` records among `records` under `set` (`unknown_allowed`: what
/// `policy.unknown_servers` does with a server no draft policy names).
pub(super) fn replay(set: &PolicySet, unknown_allowed: bool, records: &[Value]) -> Replay {
    let mut out = Replay::default();
    let mut groups: std::collections::BTreeMap<(String, String, String, String), Change> =
        Default::default();
    let limiter = RateLimiter::new();
    let now = std::time::Instant::now();
    for r in records.iter().filter(|r| r["event"] == "tool_call") {
        let then = match r["decision"].as_str().unwrap_or("") {
            "allow" | "approved" => Outcome::Allowed,
            "deny" => Outcome::Denied,
            "approval_denied" | "approval_timeout" => Outcome::Held,
            _ => {
                out.not_replayed += 1;
                continue;
            }
        };
        let s = |v: &Value| v.as_str().map(str::to_string);
        let agent = &r["agent"];
        let caller = Caller {
            agent: s(&agent["name"]),
            uid: agent["uid"].as_u64().unwrap_or(u64::MAX) as u32,
            // Replayed as if it ran the file at the path recorded.
            exes: s(&agent["exe"]).into_iter().collect(),
            cgroup: s(&agent["cgroup"]),
            instance: None,
        };
        let server = s(&r["server"]["name"]).unwrap_or_default();
        let tool = s(&r["tool"]).unwrap_or_default();
        let who = caller
            .agent
            .clone()
            .unwrap_or_else(|| format!("uid {}", caller.uid));
        let (now_is, rule) = match set.by_name(&server) {
            None => (
                Some(if unknown_allowed {
                    Outcome::Allowed
                } else {
                    Outcome::Denied
                }),
                "policy.unknown_servers".to_string(),
            ),
            Some(sp) if r.get("arguments").is_none() && sp.reads_arguments(&tool, &caller) => {
                (None, "conditions on the arguments".to_string())
            }
            Some(sp) => {
                let args = r
                    .get("arguments")
                    .cloned()
                    .unwrap_or(Value::Object(Default::default()));
                match sp.explain(&tool, &args, &caller, &limiter, now) {
                    Decision::Allow { rule } => (Some(Outcome::Allowed), rule),
                    Decision::Deny { rule, .. } => (Some(Outcome::Denied), rule),
                    Decision::RequireApproval { rule, .. } => (Some(Outcome::Held), rule),
                    Decision::RateLimited { rule, .. } => (Some(Outcome::Denied), rule),
                }
            }
        };
        if now_is == Some(then) {
            out.unchanged += 1;
            continue;
        }
        let key = (
            who.clone(),
            server.clone(),
            tool.clone(),
            format!("{then:?}{now_is:?}"),
        );
        groups
            .entry(key)
            .or_insert_with(|| Change {
                agent: who,
                server,
                tool,
                then: Some(then),
                now: now_is,
                rule,
                calls: 0,
            })
            .calls += 1;
    }
    for c in groups.into_values() {
        match c.now {
            Some(_) => out.changed.push(c),
            None => out.undecidable.push(c),
        }
    }
    out
}

pub(super) fn policy_replay(
    config: &Config,
    audit: &[PathBuf],
    dir: &std::path::Path,
    json: bool,
) -> Result<i32> {
    let set = daemon::load_policies(dir)?;
    let mut records = Vec::new();
    for f in audit {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        records.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
        );
    }
    let unknown_allowed = config.policy.unknown_servers != crate::config::UnknownServers::Deny;
    let r = replay(&set, unknown_allowed, &records);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    let word = |o: Option<Outcome>| match o {
        Some(Outcome::Allowed) => "allowed",
        Some(Outcome::Denied) => "denied",
        Some(Outcome::Held) => "held for approval",
        None => "?",
    };
    println!(
        "{} calls would change under {}:",
        r.changed.iter().map(|c| c.calls).sum::<usize>(),
        dir.display()
    );
    for c in &r.changed {
        println!(
            "  {} {} / {}: {} -> {} ({} call{}, rule {})",
            c.agent,
            c.server,
            c.tool,
            word(c.then),
            word(c.now),
            c.calls,
            if c.calls == 1 { "" } else { "s" },
            c.rule
        );
    }
    if !r.undecidable.is_empty() {
        println!("undecidable (the draft's rule reads arguments the audit did not keep; audit.log_arguments):");
        for c in &r.undecidable {
            println!(
                "  {} {} / {}: {} call(s)",
                c.agent, c.server, c.tool, c.calls
            );
        }
    }
    println!(
        "{} unchanged; {} not replayed (rate-limited or blocked by a pin then)",
        r.unchanged, r.not_replayed
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(agent: &str, tool: &str, decision: &str, args: Option<Value>) -> Value {
        let mut r = json!({"event": "tool_call", "agent": {"name": agent, "uid": 1000},
                           "server": {"name": "files"}, "tool": tool, "decision": decision});
        if let Some(a) = args {
            r["arguments"] = a;
        }
        r
    }

    #[test]
    fn a_stricter_draft_lists_exactly_the_calls_that_change() {
        let set = PolicySet::from_files(&[(
            "files.json".into(),
            json!({"version": "1", "server": {"name": "files", "match": ["127.0.0.1:1"]},
                   "default": "deny",
                   "tools": {"read": {}, "write": {"action": "require_approval"},
                             "search": {"when": [{"path": "q", "op": "max_length", "value": 3}]}}})
            .to_string(),
        )])
        .unwrap();
        let records = vec![
            call("bot", "read", "allow", None),
            call("bot", "delete", "allow", None),
            call("bot", "delete", "allow", None),
            call("bot", "write", "allow", None),
            call("bot", "search", "allow", None),
            call("bot", "search", "allow", Some(json!({"q": "long query"}))),
            call("bot", "search", "allow", Some(json!({"q": "ok"}))),
            call("bot", "read", "rate_limited", None),
            json!({"event": "connection", "decision": "pass"}),
        ];
        let r = replay(&set, false, &records);
        let changed: Vec<(&str, Option<Outcome>, usize)> = r
            .changed
            .iter()
            .map(|c| (c.tool.as_str(), c.now, c.calls))
            .collect();
        assert_eq!(
            changed,
            vec![
                ("delete", Some(Outcome::Denied), 2),
                ("search", Some(Outcome::Denied), 1),
                ("write", Some(Outcome::Held), 1),
            ]
        );
        assert_eq!(r.undecidable.len(), 1);
        assert_eq!(r.undecidable[0].tool, "search");
        assert_eq!((r.unchanged, r.not_replayed), (2, 1));
    }
}
