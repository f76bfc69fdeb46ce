//! The policy set on disk (loaded at start, reloaded on SIGHUP, on `guard reload` and when a
//! file changes; an invalid set is refused and the last good one stays) and the rate-limit
//! counters saved across restarts.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use anyhow::Result;
use serde_json::json;

use super::Daemon;
use crate::{
    audit::{Decision, Event},
    mcp::Engine,
    policy::{bundle, PolicySet},
    proxy::named,
};

/// Where the policy set in force came from, and when: `guard status`, the metrics.
pub(super) struct PolicyState {
    /// `policy.source`, else `paths.policies`.
    pub source: String,
    pub applied_at: SystemTime,
    /// The bundle's signing time (Unix seconds); an older bundle is never applied.
    pub signed_at: Option<u64>,
    pub etag: Option<String>,
    /// The last fetch or check that failed (also audited once per distinct error).
    pub last_error: Option<String>,
}

/// `policy.source`: the key bundles must be signed with, the TLS settings for fetching, and
/// where the last good bundle is kept.
pub(super) struct Source {
    pub url: String,
    pub key: minisign::PublicKey,
    pub tls: Arc<rustls::ClientConfig>,
    pub kept: PathBuf,
    /// The signing time of the newest bundle ever applied, kept apart from the bundle: even
    /// when the kept bundle is lost, an older one is not applied again.
    pub newest: PathBuf,
    /// Wakes the poll loop at once (SIGHUP, `guard reload`).
    pub now: tokio::sync::Notify,
}

impl Source {
    pub fn new(config: &crate::config::Config) -> Result<Option<Source>> {
        let Some(url) = config.policy.source.clone() else {
            return Ok(None);
        };
        let vk = config.policy.verify_key.as_deref().unwrap_or_default();
        let text = if vk.starts_with('/') {
            std::fs::read_to_string(vk)
                .map_err(|e| anyhow::anyhow!("policy.verify_key: reading {vk}: {e}"))?
        } else {
            vk.to_string()
        };
        let key =
            bundle::public_key(&text).map_err(|e| anyhow::anyhow!("policy.verify_key: {e}"))?;
        let tls = Arc::new(crate::proxy::tls::upstream_config(&config.tls.extra_roots)?);
        Ok(Some(Source {
            url,
            key,
            tls,
            kept: config.paths.state_dir.join("policy-bundle"),
            newest: config.paths.state_dir.join("policy-bundle.signed-at"),
            now: tokio::sync::Notify::new(),
        }))
    }

    /// The last good bundle kept in the state directory, verified again (a kept bundle that no
    /// longer verifies, e.g. after a key change, is not used).
    pub fn load_kept(&self) -> Option<(PolicySet, u64)> {
        if !self.kept.exists() {
            return None;
        }
        let checked = super::bundle::read_local(&self.kept)
            .and_then(|e| bundle::verify(e, &self.key))
            .and_then(|v| {
                let set = self.compile(&v.files)?;
                Ok((set, v.signed_at))
            });
        match checked {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::error!(
                    "the kept policy bundle {} is not used: {e}",
                    self.kept.display()
                );
                None
            }
        }
    }

    /// The newest signing time applied on this host (none: never).
    pub fn newest_applied(&self) -> Option<u64> {
        std::fs::read_to_string(&self.newest)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    fn set_newest_applied(&self, at: u64) {
        if let Err(e) = super::bundle::write_durably(&self.newest, at.to_string().as_bytes()) {
            tracing::error!("writing {}: {e}", self.newest.display());
        }
    }

    /// The set of a verified bundle's files; errors name `SOURCE/FILE:line:col`.
    fn compile(&self, files: &bundle::Files) -> Result<PolicySet, String> {
        let named: Vec<(String, String)> = files
            .iter()
            .map(|(n, t)| (format!("{}/{n}", self.url.trim_end_matches('/')), t.clone()))
            .collect();
        PolicySet::from_files(&named).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            format!(
                "the bundle's policies are invalid ({} errors):\n  {}",
                list.len(),
                list.join("\n  ")
            )
        })
    }
}

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

    /// The set in force: its hash, where it came from, since when (`guard status`).
    pub(super) fn policy_status(&self) -> serde_json::Value {
        let st = self.policy_state.lock().unwrap();
        let age = st.applied_at.elapsed().map_or(0, |d| d.as_secs());
        json!({
            "sha256": self.engine.policies().sha256(),
            "source": st.source,
            "signed": self.source.is_some(),
            "signed_at": st.signed_at,
            "age_s": age,
            "servers": self.engine.policies().servers().len(),
            "last_error": st.last_error,
        })
    }

    /// Asks `policy.source` for a bundle every `policy.poll_s` (and at once when woken).
    pub(super) async fn poll_source(self: Arc<Self>) {
        let Some(src) = &self.source else { return };
        let every = std::time::Duration::from_secs(self.config.policy.poll_s);
        let mut why = "start";
        loop {
            self.fetch_bundle(src, why).await;
            tokio::select! {
                _ = tokio::time::sleep(every) => why = "poll",
                _ = src.now.notified() => why = "reload",
            }
        }
    }

    /// One fetch: a bundle that verifies, is not older than the one in force and loads is
    /// applied; anything else leaves the set in force and is audited (once per distinct error).
    async fn fetch_bundle(&self, src: &Source, why: &str) {
        let etag = self.policy_state.lock().unwrap().etag.clone();
        let outcome = match super::bundle::fetch(&src.url, etag.as_deref(), src.tls.clone()).await {
            Ok(super::bundle::Fetched::Unchanged) if etag.is_some() => Ok(None),
            Ok(super::bundle::Fetched::Unchanged) => Err(format!(
                "fetching {}: 304 Not Modified to a request without If-None-Match",
                src.url
            )),
            Ok(super::bundle::Fetched::Entries(entries, tag)) => {
                let checked = self.check_bundle(src, entries);
                if matches!(checked, Ok(None)) {
                    // The set in force, verified: the next poll asks with its ETag.
                    self.policy_state.lock().unwrap().etag = tag.clone();
                }
                checked.map(|x| x.map(|x| (x, tag)))
            }
            Err(e) => Err(format!("fetching {}: {e}", src.url)),
        };
        match outcome {
            Ok(None) => self.policy_state.lock().unwrap().last_error = None,
            Ok(Some(((set, signed_at, entries), tag))) => {
                let sha = set.sha256().to_string();
                let names: Vec<String> = set.servers().iter().map(|s| s.name.clone()).collect();
                if let Err(e) = super::bundle::keep(&src.kept, &entries) {
                    tracing::error!("keeping the policy bundle in {}: {e}", src.kept.display());
                }
                self.engine.set_policies(set);
                src.set_newest_applied(signed_at);
                {
                    let mut st = self.policy_state.lock().unwrap();
                    st.applied_at = SystemTime::now();
                    st.signed_at = Some(signed_at);
                    st.etag = tag;
                    st.last_error = None;
                }
                tracing::info!(servers = ?names, sha256 = %sha, "{why}: policy bundle from {} applied", src.url);
                let mut r = self.audit.record(Event::PolicyReload, Decision::Applied);
                r.detail = Some(json!({
                    "trigger": why, "source": src.url, "sha256": sha,
                    "signed_at": signed_at, "servers": names,
                }));
                let _ = self.audit.write(&r);
                self.refresh_named().await;
            }
            Err(e) => {
                let mut st = self.policy_state.lock().unwrap();
                if st.last_error.as_deref() == Some(e.as_str()) {
                    return;
                }
                st.last_error = Some(e.clone());
                drop(st);
                tracing::error!("{why}: policy bundle NOT applied, the set in force stays: {e}");
                let mut r = self.audit.record(Event::PolicyReload, Decision::Rejected);
                r.reason = Some(e);
                r.detail = Some(json!({
                    "trigger": why, "source": src.url,
                    "sha256": self.engine.policies().sha256(),
                }));
                let _ = self.audit.write(&r);
            }
        }
    }

    /// A fetched bundle to apply, `None` when it is the set in force already.
    #[allow(clippy::type_complexity)]
    fn check_bundle(
        &self,
        src: &Source,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<Option<(PolicySet, u64, Vec<(String, Vec<u8>)>)>, String> {
        let v = bundle::verify(entries.clone(), &src.key)?;
        if v.sha256 == self.engine.policies().sha256() {
            return Ok(None);
        }
        let in_force = self.policy_state.lock().unwrap().signed_at;
        if let Some(active) = in_force.max(src.newest_applied()) {
            if v.signed_at < active {
                return Err(format!(
                    "the bundle was signed at {} (Unix time), before the newest applied here ({active}): an old bundle is not applied again",
                    v.signed_at
                ));
            }
        }
        let set = src.compile(&v.files)?;
        Ok(Some((set, v.signed_at, entries)))
    }

    /// Loads the policy directory again; an invalid set is refused and the last good one stays.
    /// With `policy.source`, asks the source at once instead.
    pub(super) fn reload_policies(&self, why: &str) {
        if let Some(src) = &self.source {
            tracing::info!("{why}: asking {} for a policy bundle", src.url);
            src.now.notify_one();
            return;
        }
        let dir = &self.config.paths.policies;
        let mut r = self.audit.record(Event::PolicyReload, Decision::Applied);
        r.detail = Some(json!({ "trigger": why, "dir": dir.display().to_string() }));
        match load_policies(dir) {
            Ok(set) => {
                let names: Vec<String> = set.servers().iter().map(|s| s.name.clone()).collect();
                tracing::info!(servers = ?names, "{why}: policies reloaded");
                r.detail.as_mut().unwrap()["servers"] = json!(names);
                r.detail.as_mut().unwrap()["sha256"] = json!(set.sha256());
                self.engine.set_policies(set);
                self.policy_state.lock().unwrap().applied_at = SystemTime::now();
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
