//! The control socket's requests, answered: status, approvals (list, approve, deny), reload and
//! the emergency `disable`, each authorised by the caller's kernel credentials.

use std::{sync::atomic::Ordering, time::Duration};

use anyhow::{bail, Result};
use serde_json::json;

use super::{
    control::{Handler, Peer, Request, Response},
    Daemon,
};
use crate::{
    audit::{Audit, Decision, Event, ServerRef},
    config::Config,
    kernel,
};

impl Daemon {
    fn status(&self) -> Result<serde_json::Value> {
        let programs = if self.disabled.load(Ordering::SeqCst) {
            Default::default()
        } else {
            kernel::attached_programs(&self.attach_path)?
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
            "policy": self.policy_status(),
            "programs": programs,
            "programs_attached": attached,
            "proxy": self.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "audit_log": self.audit.path().display().to_string(),
            "connections_log": self.audit.connections_path().display().to_string(),
            // No record, no call: while this is not ok, every decision is refused.
            "audit": self.audit.health(),
            "otel": self.otel.as_ref().map(|o| o.status()),
            "guarded_cgroups": guarded,
            "guarded_uids": uids,
            "agents": agents,
            "enrolment": self.enrol.status(),
            "containment": {
                "state": self.containment.state,
                "reason": self.containment.reason,
                "covers": self.containment.covers,
                "confine": self.containment.confine,
                "refused": self.kernel.contain_counters(),
            },
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
        // The groups of the caller's process (not of whatever has its pid now).
        let status = peer.by_pid(|pid| Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?));
        if let Ok(status) = status {
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

    fn answer(
        &self,
        peer: Peer,
        id: &str,
        approve: Option<Option<u64>>,
        deny: Option<Option<String>>,
    ) -> Result<serde_json::Value> {
        let approvals = &self.engine.approvals;
        if peer.uid != 0 && approvals.uid_of(id) == Some(peer.uid) {
            // Any unguarded process of the agent's own user could otherwise approve its calls.
            let mut r = self.audit.record(Event::Control, Decision::Deny);
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
                    Decision::Approved,
                    json!({ "approval_id": id, "for_s": for_s }),
                )
            }
            (None, Some(reason)) => {
                let reason =
                    reason.unwrap_or_else(|| format!("denied by an approver (uid {})", peer.uid));
                let held = approvals.deny(id, peer.uid, reason.clone())?;
                (
                    held,
                    Decision::Denied,
                    json!({ "approval_id": id, "reason": reason }),
                )
            }
            _ => bail!("nothing to answer"),
        };
        let mut r = self.audit.record(Event::Approval, decision);
        r.actor_uid = Some(peer.uid);
        r.tool = Some(held.tool.clone());
        r.server = Some(ServerRef {
            name: Some(held.server.clone()),
            host: String::new(),
            port: 0,
            command: None,
        });
        r.args_sha256 = Some(held.args_sha256.clone());
        r.detail = Some(detail);
        self.audit.write(&r)?;
        Ok(json!({ "id": id, "decision": decision, "tool": held.tool, "server": held.server }))
    }

    fn disable(&self, peer: Peer) -> Result<serde_json::Value> {
        let mut r = self.audit.record(Event::Disable, Decision::FailOpen);
        r.actor_uid = Some(peer.uid);
        if peer.uid != 0 {
            r.decision = Decision::Deny;
            r.reason = Some("only root may disable guard".into());
            self.audit.write(&r)?;
            bail!("only root may disable guard (you are uid {})", peer.uid);
        }
        // Audited before it takes effect.
        r.reason = Some("guard disable: every program detached, every pin removed".into());
        self.audit.write(&r)?;
        self.disabled.store(true, Ordering::SeqCst);
        let removed = kernel::unpin_all(&self.config.paths.bpffs)?;
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
            let mut r = self.audit.record(Event::Control, Decision::Deny);
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
            Request::ApprovalsList => Ok(json!({ "held": self.engine.approvals.list() })),
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
    let audit = Audit::open_with(&config.audit_settings())?;
    let mut r = audit.record(Event::Disable, Decision::FailOpen);
    r.actor_uid = Some(0);
    r.reason = Some("guard disable (daemon not running): every pin removed".into());
    audit.write(&r)?;
    kernel::unpin_all(&config.paths.bpffs)
}
