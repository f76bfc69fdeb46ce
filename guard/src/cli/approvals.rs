//! `guard approvals list | approve | deny | watch`.

use anyhow::Result;
use serde_json::Value;

use super::ApprovalsCmd;
use crate::{
    config::Config,
    daemon::control::{self, Request},
};

pub(super) fn approvals(config: &Config, cmd: ApprovalsCmd) -> Result<()> {
    let socket = &config.paths.control_socket;
    match cmd {
        ApprovalsCmd::List { json } => {
            let v = control::call(socket, Request::ApprovalsList)?;
            let held = v
                .get("held")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&held)?);
                return Ok(());
            }
            if held.is_empty() {
                println!("no calls are waiting for approval");
            }
            for h in held {
                let s = |k: &str| h.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
                let n = |k: &str| h.get(k).and_then(Value::as_u64).unwrap_or(0);
                println!(
                    "[{}] agent {} (uid {}, pid {})  server {}  tool {}  waiting {} s, {} s left",
                    s("id"),
                    s("agent"),
                    n("uid"),
                    n("pid"),
                    s("server"),
                    s("tool"),
                    n("age_s"),
                    n("remaining_s")
                );
                let args =
                    serde_json::to_string_pretty(h.get("arguments").unwrap_or(&Value::Null))?;
                for line in args.lines() {
                    println!("    {line}");
                }
            }
        }
        ApprovalsCmd::Approve { id, for_ } => {
            let for_s = match for_ {
                Some(d) => Some(crate::mcp::approvals::parse_duration(&d)?.as_secs()),
                None => None,
            };
            let v = control::call(
                socket,
                Request::Approve {
                    id: id.clone(),
                    for_s,
                },
            )?;
            println!(
                "approved {id} ({} on {}){}",
                v["tool"].as_str().unwrap_or("?"),
                v["server"].as_str().unwrap_or("?"),
                for_s
                    .map(|s| format!("; identical calls from this agent pass for {s} s"))
                    .unwrap_or_default()
            );
        }
        ApprovalsCmd::Watch => super::watch::watch(socket)?,
        ApprovalsCmd::Deny { id, reason } => {
            let v = control::call(
                socket,
                Request::Deny {
                    id: id.clone(),
                    reason,
                },
            )?;
            println!(
                "denied {id} ({} on {})",
                v["tool"].as_str().unwrap_or("?"),
                v["server"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
