//! `[[approvals.notify]]`: approvers are told that a call waits — a webhook (JSON that Slack's
//! and Teams' incoming webhooks accept) and/or a command. The decision path only queues (a full
//! queue drops the notification and audits it); delivery runs in its own tasks, retried with a
//! bound, and every outcome is audited.

use std::{sync::Arc, time::Duration};

use hyper::body::Bytes;
use serde_json::json;

use crate::{
    audit::{Audit, Decision, Event},
    config::NotifyEntry,
    mcp::{approvals::Held, Engine},
};

/// Held calls waiting to be told, all entries together.
const QUEUE: usize = 256;
/// Deliveries one entry has in flight at once.
const IN_FLIGHT: usize = 8;
/// One try's time limit (webhook answer, command exit).
const TRY_LIMIT: Duration = Duration::from_secs(5);
/// Arguments shown in a notification, at most.
const ARGS_SHOWN: usize = 300;

/// Starts the notifier when `entries` is not empty: the engine's held calls are queued to it.
pub(super) fn start(
    entries: Vec<NotifyEntry>,
    engine: &Engine,
    audit: Arc<Audit>,
    tls: Arc<rustls::ClientConfig>,
) {
    if entries.is_empty() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Held>(QUEUE);
    let on_full = audit.clone();
    engine.approvals.on_hold(Box::new(move |h: &Held| {
        if tx.try_send(h.clone()).is_err() {
            let mut r = on_full.record(Event::ApprovalNotify, Decision::Error);
            r.reason = Some(format!(
                "{QUEUE} notifications are waiting already: approvers are not told of call {}",
                h.id
            ));
            r.detail = Some(json!({ "approval_id": h.id }));
            let _ = on_full.write(&r);
        }
    }));
    // Deliveries in flight per entry: when they are all busy the queue fills and further
    // notifications are dropped (and audited), so a flood of held calls cannot start
    // unbounded tasks, connections or processes.
    let slots: Vec<Arc<tokio::sync::Semaphore>> = entries
        .iter()
        .map(|_| Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)))
        .collect();
    let entries = Arc::new(entries);
    tokio::spawn(async move {
        while let Some(h) = rx.recv().await {
            let h = Arc::new(h);
            for (i, e) in entries.iter().enumerate() {
                let Ok(permit) = slots[i].clone().acquire_owned().await else {
                    return;
                };
                let (e, h, audit, tls) = (e.clone(), h.clone(), audit.clone(), tls.clone());
                tokio::spawn(async move {
                    deliver(e, i, h, audit, tls).await;
                    drop(permit);
                });
            }
        }
    });
}

/// One entry told of one held call: tries with backoff (1 s, 2 s, 4 s ...), then audits.
async fn deliver(
    e: NotifyEntry,
    index: usize,
    h: Arc<Held>,
    audit: Arc<Audit>,
    tls: Arc<rustls::ClientConfig>,
) {
    let text = text_of(&h);
    for kind in ["webhook", "exec"] {
        let mut last = None;
        let wanted = match kind {
            "webhook" => e.webhook.is_some(),
            _ => e.exec.is_some(),
        };
        if !wanted {
            continue;
        }
        for attempt in 0..e.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(5))).await;
            }
            let r = match kind {
                "webhook" => webhook(e.webhook.as_deref().unwrap(), &h, &text, tls.clone()).await,
                _ => exec(e.exec.as_deref().unwrap(), &h, &text).await,
            };
            match r {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(err) => last = Some(err),
            }
        }
        let target = match kind {
            "webhook" => e.webhook.clone().unwrap(),
            _ => e.exec.as_ref().unwrap()[0].clone(),
        };
        let mut r = audit.record(
            Event::ApprovalNotify,
            if last.is_none() {
                Decision::Applied
            } else {
                Decision::Error
            },
        );
        r.tool = Some(h.tool.clone());
        r.detail = Some(json!({
            "approval_id": h.id, "notify": index, "kind": kind, "target": target,
            "attempts": e.attempts, "server": h.server,
        }));
        if let Some(err) = &last {
            tracing::warn!("approval {}: telling {target} failed: {err}", h.id);
            r.reason = Some(format!("after {} attempts: {err}", e.attempts));
        }
        let _ = audit.write(&r);
    }
}

/// Agent- and server-chosen text made safe for a chat message: no control characters, no
/// Slack/Teams markup that could mention a channel or hide a link (`<`, `>`, `&` escaped).
fn safe(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i >= max {
            out.push('…');
            break;
        }
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' => out.push('\''),
            // No Markdown link or emphasis a chat client would render (Teams: [text](url)).
            '[' => out.push('('),
            ']' => out.push(')'),
            '*' | '_' | '~' => out.push(' '),
            c if c.is_control() || super::misleading(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn text_of(h: &Held) -> String {
    let agent = h.agent.clone().unwrap_or_else(|| format!("uid {}", h.uid));
    let args = serde_json::to_string(&h.arguments).unwrap_or_default();
    format!(
        "guard: agent {} (uid {}) waits for approval to call `{}` on server `{}` with {}. Approve: `guard approvals approve {}` (or `--for 10m`); deny: `guard approvals deny {} --reason TEXT`. Denied by itself in {} s.",
        safe(&agent, 64),
        h.uid,
        safe(&h.tool, 128),
        safe(&h.server, 128),
        safe(&args, ARGS_SHOWN),
        h.id,
        h.id,
        h.timeout_s
    )
}

/// The webhook body: `text` is what Slack and Teams incoming webhooks show; `guard` is the
/// same as data, for receivers that act on it.
fn body_of(h: &Held, text: &str) -> serde_json::Value {
    let args = serde_json::to_string(&h.arguments).unwrap_or_default();
    json!({
        "text": text,
        "guard": {
            "approval_id": h.id,
            "agent": h.agent,
            "uid": h.uid,
            "server": h.server,
            "tool": h.tool,
            "arguments_summary": safe(&args, ARGS_SHOWN),
            "args_sha256": h.args_sha256,
            "timeout_s": h.timeout_s,
            "approve": format!("guard approvals approve {}", h.id),
            "deny": format!("guard approvals deny {} --reason TEXT", h.id),
        }
    })
}

async fn webhook(
    url: &str,
    h: &Held,
    text: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let body = serde_json::to_vec(&body_of(h, text)).map_err(|e| e.to_string())?;
    let a = super::outbound::request(
        http::Method::POST,
        url,
        &[(http::header::CONTENT_TYPE, "application/json".into())],
        Bytes::from(body),
        tls,
        TRY_LIMIT,
        64 << 10,
    )
    .await?;
    if a.status.is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered HTTP {}", a.status))
    }
}

async fn exec(argv: &[String], h: &Held, text: &str) -> Result<(), String> {
    let agent = h.agent.clone().unwrap_or_else(|| format!("uid {}", h.uid));
    // Whole arguments only: a placeholder inside a longer argument stays as written, so agent
    // text never becomes part of a shell script.
    // Agent-chosen values: no control characters, and never read as an option.
    let value = |v: &str| {
        let v: String = v
            .chars()
            .map(|c| {
                if c.is_control() || super::misleading(c) {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        if v.starts_with('-') {
            format!(" {v}")
        } else {
            v
        }
    };
    let arg = |a: &str| match a {
        "{id}" => h.id.clone(),
        "{agent}" => value(&agent),
        "{server}" => value(&h.server),
        "{tool}" => value(&h.tool),
        "{text}" => value(text),
        a => a.to_string(),
    };
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(argv[1..].iter().map(|a| arg(a)))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("GUARD_APPROVAL_ID", &h.id)
        .env("GUARD_AGENT", value(&agent))
        .env("GUARD_SERVER", value(&h.server))
        .env("GUARD_TOOL", value(&h.tool))
        .env("GUARD_TEXT", text)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("running {}: {e}", argv[0]))?;
    match tokio::time::timeout(TRY_LIMIT, child.wait()).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("{} exited with {s}", argv[0])),
        Ok(Err(e)) => Err(format!("{}: {e}", argv[0])),
        Err(_) => Err(format!(
            "{} ran longer than {}s",
            argv[0],
            TRY_LIMIT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_text_cannot_mention_a_channel_or_break_lines() {
        let h = Held {
            id: "7".into(),
            agent: Some("bot".into()),
            uid: 1000,
            pid: 1,
            instance: 1,
            server: "files".into(),
            tool: "<!channel> del\nete".into(),
            arguments: json!({ "path": "<https://evil|click>" }),
            args_sha256: "x".into(),
            requested_at: 0,
            timeout_s: 60,
            created: None,
        };
        let t = text_of(&h);
        assert!(!t.contains('<') && !t.contains('\n'), "{t}");
        assert!(t.contains("guard approvals approve 7"), "{t}");
        let b = body_of(&h, &t);
        assert_eq!(b["guard"]["approval_id"], "7");
        assert!(b["text"].as_str().unwrap().contains("&lt;!channel&gt;"));
        assert_eq!(safe(&"x".repeat(400), 300).chars().count(), 301);
        assert!(!safe("rm \u{202e}fdp.exe", 50).contains('\u{202e}'));
        assert!(!safe("[approve](https://evil)", 50).contains('['));
    }
}
