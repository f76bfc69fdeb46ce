//! `guard status` and `guard disable`.

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    config::Config,
    daemon::{
        self,
        control::{self, Request},
    },
};

pub(super) fn status(config: &Config, json: bool) -> Result<()> {
    let s = control::call(&config.paths.control_socket, Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let g = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
    let c = g("counters");
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "guard {} (pid {}, up {}s): {}",
        g("version").as_str().unwrap_or("?"),
        g("pid"),
        g("uptime_s"),
        if g("enforcing").as_bool() == Some(true) {
            "enforcing"
        } else {
            "DISABLED"
        }
    );
    println!("config:          {}", g("config").as_str().unwrap_or("?"));
    println!(
        "attach point:    {}",
        g("attach_cgroup").as_str().unwrap_or("?")
    );
    println!(
        "programs:        {} attached ({})",
        g("programs_attached"),
        program_names(&g("programs"))
    );
    let contain = g("containment");
    match contain["state"].as_str() {
        Some("on") => {
            let refused = contain["refused"].as_object().map_or(String::new(), |m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            println!("containment:     on (refused: {refused})");
        }
        Some("partial") => println!(
            "containment:     PARTIAL: {}",
            contain["reason"].as_str().unwrap_or("?")
        ),
        Some(_) => println!(
            "containment:     OFF: {}",
            contain["reason"].as_str().unwrap_or("?")
        ),
        None => {}
    }
    println!(
        "proxy:           {}",
        g("proxy").as_array().map_or(String::new(), |a| a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "))
    );
    println!(
        "guarded cgroups: {}",
        guarded_cgroups(&g("guarded_cgroups"))
    );
    println!("guarded uids:    {}", g("guarded_uids"));
    let enrol = g("enrolment");
    match enrol["mode"].as_str() {
        Some("exec") => println!(
            "enrolment:       at exec, by the kernel ({} [[agents]]; {} processes being moved)",
            enrol["agents"].as_array().map_or(0, Vec::len),
            n(&enrol, "marked")
        ),
        Some("events") => println!(
            "enrolment:       FROM EXEC EVENTS (an agent is not guarded between its exec and its enrolment): {}",
            enrol["why_not"].as_str().unwrap_or("?")
        ),
        Some("scan") => println!(
            "enrolment:       SCANS ONLY, every second (an agent is not guarded until found): {}",
            enrol["why_not"].as_str().unwrap_or("?")
        ),
        _ => {}
    }
    let agents = g("agents");
    for a in agents.as_array().into_iter().flatten() {
        println!(
            "agent:           {} pid {} {} in /{} since {} ({})",
            a["name"].as_str().unwrap_or("?"),
            a["pid"],
            a["exe"].as_str().unwrap_or("-"),
            a["cgroup"].as_str().unwrap_or("?"),
            a["since"].as_str().filter(|s| !s.is_empty()).unwrap_or("-"),
            a["how"].as_str().unwrap_or("?"),
        );
    }
    println!(
        "counters:        redirected {}, passed through {}, origin missing {}, refused {}",
        n(&c, "redirected"),
        n(&c, "passed_through"),
        n(&c, "origin_missing"),
        n(&c, "refused")
    );
    println!(
        "audit log:       {}",
        g("audit_log").as_str().unwrap_or("?")
    );
    let audit = g("audit");
    if audit["ok"] == Value::Bool(false) {
        println!(
            "audit:           FAILING ({} failed writes; every call is refused until records are written again): {}",
            n(&audit, "write_failures"),
            audit["last_error"].as_str().unwrap_or("?")
        );
    } else {
        println!(
            "audit:           ok ({} failed writes, {} connection records summarised); chain head {}",
            n(&audit, "write_failures"),
            n(&audit, "connection_records_dropped"),
            audit["head"].as_str().unwrap_or("?")
        );
    }
    let otel = g("otel");
    if otel.is_object() {
        println!(
            "otel:            {} over {}: {} log records and {} spans exported, {} and {} dropped{}",
            otel["endpoint"].as_str().unwrap_or("?"),
            otel["protocol"].as_str().unwrap_or("?"),
            n(&otel["exported"], "logs"),
            n(&otel["exported"], "spans"),
            n(&otel["dropped"], "logs"),
            n(&otel["dropped"], "spans"),
            otel["last_error"]
                .as_str()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `connect4, connect6 x2, ...`: the attach types and how many programs each has.
fn program_names(programs: &Value) -> String {
    let mut names: Vec<String> = Vec::new();
    if let Some(m) = programs.as_object() {
        for (k, v) in m {
            let count = v.as_array().map_or(0, |a| a.len());
            names.push(if count == 1 {
                k.clone()
            } else {
                format!("{k} x{count}")
            });
        }
    }
    names.join(", ")
}

/// `/guard.slice/agent-bot-1 (bot), cgroup id 7`, or `none`.
fn guarded_cgroups(cgroups: &Value) -> String {
    let list: Vec<String> = cgroups
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| match e.get("cgroup").and_then(Value::as_str) {
                    Some(p) => format!(
                        "{p} ({})",
                        e.get("agent").and_then(Value::as_str).unwrap_or("")
                    ),
                    None => format!("cgroup id {}", e.get("id").unwrap_or(&Value::Null)),
                })
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

pub(super) fn disable(config: &Config) -> Result<()> {
    match control::call(&config.paths.control_socket, Request::Disable) {
        Ok(v) => {
            let n = v
                .get("removed")
                .and_then(Value::as_array)
                .map_or(0, |a| a.len());
            println!("guard disabled: {n} pins removed; guarded processes now connect directly. Restart the daemon to enforce again.");
            Ok(())
        }
        Err(e)
            if std::os::unix::net::UnixStream::connect(&config.paths.control_socket).is_err() =>
        {
            eprintln!("guard: {e:#}; unpinning directly");
            let removed =
                daemon::disable_offline(config).context("disabling without the daemon")?;
            println!("guard disabled: {} pins removed.", removed.len());
            Ok(())
        }
        Err(e) => Err(e),
    }
}
