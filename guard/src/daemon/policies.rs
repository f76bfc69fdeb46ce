//! The policy set on disk (loaded at start, reloaded on SIGHUP, on `guard reload` and when a
//! file changes; an invalid set is refused and the last good one stays) and the rate-limit
//! counters saved across restarts.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::Daemon;
use crate::{
    audit::{Decision, Event},
    mcp::Engine,
    policy::PolicySet,
    proxy::named,
};

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
pub(super) fn policy_fingerprint(dir: &Path) -> Vec<(String, u64, i64)> {
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
pub(super) fn restore_rate_limits(engine: &Engine, state_dir: &Path) {
    let path = state_dir.join("rate-limits.json");
    let Ok(data) = std::fs::read(&path) else {
        return;
    };
    match serde_json::from_slice::<Vec<crate::policy::SavedCounter>>(&data) {
        Ok(saved) => {
            engine.limiter.restore(
                &saved,
                std::time::Instant::now(),
                std::time::SystemTime::now(),
            );
            tracing::info!(counters = saved.len(), "restored rate-limit counters");
        }
        Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
    }
}

impl Daemon {
    /// Re-resolves the addresses the policies' servers name (names move).
    pub(super) async fn refresh_named(&self) {
        let named = named::resolve(&self.engine.policies()).await;
        self.named.set(named);
    }

    /// Writes the rate-limit counters to the state directory (atomically: temp file + rename).
    pub(super) fn save_rate_limits(&self) {
        let saved = self
            .engine
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
    pub(super) fn reload_policies(&self, why: &str) {
        let dir = &self.config.paths.policies;
        let mut r = self.audit.record(Event::PolicyReload, Decision::Applied);
        r.detail = Some(json!({ "trigger": why, "dir": dir.display().to_string() }));
        match load_policies(dir) {
            Ok(set) => {
                let names: Vec<String> = set.servers().iter().map(|s| s.name.clone()).collect();
                tracing::info!(servers = ?names, "{why}: policies reloaded");
                r.detail.as_mut().unwrap()["servers"] = json!(names);
                self.engine.set_policies(set);
            }
            Err(e) => {
                tracing::error!(
                    "{why}: policies NOT reloaded, the last good set stays in force:\n{e:#}"
                );
                r.decision = Decision::Rejected;
                r.reason = Some(format!("{e:#}"));
            }
        }
        let _ = self.audit.write(&r);
    }
}
