//! What the report says about the machine and the run: the machine description, the source
//! revision, the load average and the daemon's CPU time.

use std::{
    fs,
    path::Path,
    process::Command,
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};

use crate::run::Opts;

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    guard::audit::rfc3339(d.as_secs(), d.subsec_micros())
}

/// The machine, the guard build and the mode of this run, for the report's header.
pub fn machine(opts: &Opts) -> Map<String, Value> {
    let cpuinfo = read_trim("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem = read_trim("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let version = Command::new(&opts.guard)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut m = Map::new();
    m.insert("date".into(), json!(now_rfc3339()));
    m.insert("cores".into(), json!(cores));
    m.insert("cpu".into(), json!(model));
    m.insert(
        "kernel".into(),
        json!(format!(
            "{} {}",
            read_trim("/proc/sys/kernel/ostype"),
            read_trim("/proc/sys/kernel/osrelease")
        )),
    );
    m.insert("memory".into(), json!(mem));
    m.insert(
        "clocksource".into(),
        json!(read_trim(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        )),
    );
    m.insert("guard".into(), json!(format!("{version} (release)")));
    m.insert("guard_source".into(), json!(source_revision(&opts.repo)));
    m.insert("loadavg_at_start".into(), json!(loadavg()));
    m.insert(
        "mode".into(),
        json!(if opts.quick { "quick" } else { "full" }),
    );
    m
}

/// The commit the benchmarked source is at, and whether guard's sources differ from it.
fn source_revision(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let changed = [
        "status",
        "--porcelain",
        "--",
        "guard",
        "guard-common",
        "guard-ebpf",
    ];
    if git(&changed).is_some_and(|s| !s.is_empty()) {
        format!("{head} + uncommitted changes in guard sources")
    } else {
        head
    }
}

/// CPU time the daemon's threads have used so far, in ns (`/proc/<pid>/task/*/schedstat`).
pub fn cpu_ns(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
