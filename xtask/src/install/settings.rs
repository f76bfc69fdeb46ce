//! What install and uninstall read: the few configuration keys they need, and what a running
//! daemon reports (`guard status --json`), both parsed by hand (xtask has no TOML or JSON
//! dependency).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use super::DEFAULT_CONFIG;

/// The few configuration keys install and uninstall need: the embedded defaults, overlaid with
/// the string values of a configuration file (`[table]` + `key = "..."`, or `table.key = "..."`).
/// The daemon itself validates the file; this only reads it.
pub struct Settings {
    pub attach_cgroup: String,
    pub bpffs: String,
    pub state_dir: String,
    pub audit_log: String,
    pub approvers_group: String,
}

impl Settings {
    pub fn load(config: Option<&Path>) -> Result<Settings> {
        let mut values = std::collections::HashMap::new();
        read_toml_strings(DEFAULT_CONFIG, &mut values);
        if let Some(c) = config {
            let text = fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            read_toml_strings(&text, &mut values);
        }
        let get = |k: &str| values.get(k).cloned().unwrap_or_default();
        Ok(Settings {
            attach_cgroup: get("scope.attach_cgroup"),
            bpffs: get("paths.bpffs"),
            state_dir: get("paths.state_dir"),
            audit_log: get("paths.audit_log"),
            approvers_group: get("guard.approvers_group"),
        })
    }
}

fn read_toml_strings(text: &str, out: &mut std::collections::HashMap<String, String>) {
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            if let Some(end) = name.find(']') {
                table = name[..end].trim().to_string();
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key: String = key
            .trim()
            .split('.')
            .map(|k| k.trim().trim_matches('"'))
            .collect::<Vec<_>>()
            .join(".");
        if let Some((value, _)) = parse_string(value.trim()) {
            let full = if table.is_empty() {
                key
            } else {
                format!("{table}.{key}")
            };
            out.insert(full, value);
        }
    }
}

/// What `guard status --json` says, when a daemon answers.
pub struct DaemonStatus {
    pub pid: Option<u32>,
    pub attach_cgroup: Option<String>,
}

pub fn daemon_status(bin: &Path, config: Option<&Path>) -> Option<DaemonStatus> {
    let mut c = Command::new(bin);
    c.env_remove("GUARD_CONFIG");
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    let out = c
        .args(["status", "--json"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(DaemonStatus {
        pid: top_level_value(&text, "pid").and_then(|v| v.parse().ok()),
        attach_cgroup: top_level_value(&text, "attach_cgroup"),
    })
}

/// A top-level scalar of a pretty-printed JSON object (`  "key": value,`), strings unquoted.
fn top_level_value(json: &str, key: &str) -> Option<String> {
    let prefix = format!("  \"{key}\": ");
    let line = json.lines().find(|l| l.starts_with(&prefix))?;
    let v = line[prefix.len()..].trim_end().trim_end_matches(',');
    if v.starts_with('"') {
        parse_string(v).map(|(s, _)| s)
    } else {
        Some(v.to_string())
    }
}

/// A quoted string (TOML basic / JSON: `"..."` with backslash escapes, or TOML literal: `'...'`)
/// at the start of `s`, and the rest after it.
fn parse_string(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    let (_, quote) = chars.next()?;
    if quote == '\'' {
        let end = s[1..].find('\'')? + 1;
        return Some((s[1..end].to_string(), &s[end + 1..]));
    }
    if quote != '"' {
        return None;
    }
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = (0..4).filter_map(|_| chars.next().map(|x| x.1)).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_keys_it_needs() {
        let mut v = std::collections::HashMap::new();
        read_toml_strings(DEFAULT_CONFIG, &mut v);
        assert_eq!(v["scope.attach_cgroup"], "guard.slice");
        assert_eq!(v["paths.bpffs"], "/sys/fs/bpf/guard");
        read_toml_strings(
            "paths.bpffs = '/sys/fs/bpf/x' # c\n[scope]\nattach_cgroup = \"a/b\\\"c\" # d\n",
            &mut v,
        );
        assert_eq!(v["paths.bpffs"], "/sys/fs/bpf/x");
        assert_eq!(v["scope.attach_cgroup"], "a/b\"c");
    }

    #[test]
    fn reads_top_level_status_values() {
        let s = "{\n  \"agents\": [\n    {\n      \"pid\": 9\n    }\n  ],\n  \"attach_cgroup\": \"/sys/fs/cgroup/guard.slice\",\n  \"pid\": 42\n}";
        assert_eq!(top_level_value(s, "pid").as_deref(), Some("42"));
        assert_eq!(
            top_level_value(s, "attach_cgroup").as_deref(),
            Some("/sys/fs/cgroup/guard.slice")
        );
        assert_eq!(top_level_value(s, "nope"), None);
    }
}
