//! `guard policy check | explain`: validate policies and explain a decision, no daemon needed.

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
