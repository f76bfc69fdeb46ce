//! `guard mcp-config wrap | unwrap | check FILE`: the stdio servers of an agent's MCP config
//! put under `guard wrap` (and back). The formats: Claude Desktop's
//! `claude_desktop_config.json`, Claude Code's `.mcp.json` and Cursor's `mcp.json`
//! (`mcpServers`), Claude Code's `~/.claude.json` (`mcpServers` and `projects.*.mcpServers`),
//! VS Code's `mcp.json` (`servers`) and `settings.json` (`mcp.servers`). A stdio entry is one
//! with a `command` (and no `type`, or `type` `stdio`); others (`url`: HTTP servers, which the
//! redirect already governs) are left alone.
//!
//! The file is edited in place, not re-serialised: only the `command` and `args` values of the
//! entries change, every other byte (key order, formatting, other settings) stays as it was.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use serde_json::{json, Value};

use super::McpConfigCmd;

pub fn run(cmd: McpConfigCmd) -> Result<i32> {
    match cmd {
        McpConfigCmd::Wrap { file, guard } => {
            let guard = match guard {
                Some(g) => g,
                None => std::env::current_exe().context("finding this guard binary")?,
            };
            let n = rewrite(&file, |text| wrap(text, &guard.display().to_string()))?;
            println!(
                "{}: {n} stdio server(s) now run under guard wrap",
                file.display()
            );
            Ok(0)
        }
        McpConfigCmd::Unwrap { file } => {
            let n = rewrite(&file, unwrap)?;
            println!("{}: {n} stdio server(s) run directly again", file.display());
            Ok(0)
        }
        McpConfigCmd::Check { file, json } => {
            let text = read(&file)?;
            let outside = check(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            if json {
                let v: Vec<Value> = outside
                    .iter()
                    .map(|e| json!({"entry": e.path, "command": e.command}))
                    .collect();
                println!("{}", Value::Array(v));
            } else if outside.is_empty() {
                println!(
                    "{}: every stdio server runs under guard wrap",
                    file.display()
                );
            } else {
                for e in &outside {
                    println!(
                        "{}: {} runs `{}` outside guard wrap",
                        file.display(),
                        e.path,
                        e.command.join(" ")
                    );
                }
                println!(
                    "run `guard mcp-config wrap {}` to wrap them",
                    file.display()
                );
            }
            Ok(if outside.is_empty() { 0 } else { 1 })
        }
    }
}

fn read(file: &Path) -> Result<String> {
    fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// Applies `edit` to the file; when it changes anything, the old text goes to
/// `FILE.guard-backup` first and the new one replaces the file atomically (its mode kept).
/// Returns how many entries changed.
fn rewrite(file: &Path, edit: impl Fn(&str) -> Result<(String, usize), String>) -> Result<usize> {
    let text = read(file)?;
    let (out, n) = edit(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    if n == 0 {
        return Ok(0);
    }
    let backup = sibling(file, "guard-backup");
    fs::write(&backup, &text).with_context(|| format!("writing {}", backup.display()))?;
    let tmp = sibling(file, "guard-tmp");
    fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
    if let Ok(md) = fs::metadata(file) {
        let _ = fs::set_permissions(&tmp, md.permissions());
    }
    fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))?;
    Ok(n)
}

fn sibling(file: &Path, ext: &str) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{ext}"));
    file.with_file_name(name)
}

/// A JSON value's place in the text, and its members when it is an object.
struct Node {
    start: usize,
    end: usize,
    members: Vec<(String, Node)>,
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, n)| n)
    }
}

/// Where each value is, for a text that is valid JSON (checked first, so the scan can trust
/// its structure).
fn scan(text: &str) -> Result<(Value, Node), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "not valid JSON at line {}, column {}: {e} (comments and trailing commas are not supported: remove them first)",
            e.line(),
            e.column()
        )
    })?;
    let b = text.as_bytes();
    let mut i = 0;
    let node = value(text, b, &mut i);
    Ok((v, node))
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn string_end(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn value(text: &str, b: &[u8], i: &mut usize) -> Node {
    skip_ws(b, i);
    let start = *i;
    let mut members = Vec::new();
    match b.get(*i) {
        Some(b'{') => {
            *i += 1;
            loop {
                skip_ws(b, i);
                if b.get(*i) == Some(&b'}') {
                    *i += 1;
                    break;
                }
                if b.get(*i) == Some(&b',') {
                    *i += 1;
                    continue;
                }
                let kend = string_end(b, *i);
                let key: String = serde_json::from_str(&text[*i..kend]).unwrap_or_default();
                *i = kend;
                skip_ws(b, i);
                *i += 1; // ':'
                let v = value(text, b, i);
                members.push((key, v));
            }
        }
        Some(b'[') => {
            *i += 1;
            loop {
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b']') | None => {
                        *i += 1;
                        break;
                    }
                    Some(b',') => *i += 1,
                    _ => {
                        value(text, b, i);
                    }
                }
            }
        }
        Some(b'"') => *i = string_end(b, *i),
        _ => {
            while *i < b.len()
                && !matches!(b[*i], b',' | b'}' | b']')
                && !b[*i].is_ascii_whitespace()
            {
                *i += 1;
            }
        }
    }
    Node {
        start,
        end: *i,
        members,
    }
}

/// One stdio server entry.
struct Entry<'a> {
    /// `mcpServers.NAME`, `projects./p.mcpServers.NAME`, `servers.NAME`.
    path: String,
    node: &'a Node,
    value: &'a Value,
}

/// Every stdio server entry of a config, or why the file is none.
fn entries<'a>(v: &'a Value, root: &'a Node) -> Result<Vec<Entry<'a>>, String> {
    let mut lists: Vec<(String, &Value, &Node)> = Vec::new();
    for key in ["mcpServers", "servers"] {
        if let (Some(lv), Some(ln)) = (v.get(key), root.get(key)) {
            lists.push((key.to_string(), lv, ln));
        }
    }
    if let (Some(mv), Some(mn)) = (v.get("mcp"), root.get("mcp")) {
        if let (Some(lv), Some(ln)) = (mv.get("servers"), mn.get("servers")) {
            lists.push(("mcp.servers".into(), lv, ln));
        }
    }
    if let (Some(Value::Object(projects)), Some(pn)) = (v.get("projects"), root.get("projects")) {
        for (name, p) in projects {
            if let (Some(lv), Some(ln)) = (
                p.get("mcpServers"),
                pn.get(name).and_then(|n| n.get("mcpServers")),
            ) {
                lists.push((format!("projects.{name}.mcpServers"), lv, ln));
            }
        }
    }
    if lists.is_empty() {
        return Err(
            "no MCP server list in it (mcpServers, servers, mcp.servers or projects.*.mcpServers)"
                .into(),
        );
    }
    let mut out = Vec::new();
    for (at, lv, ln) in lists {
        let Value::Object(servers) = lv else {
            return Err(format!("{at} is not an object"));
        };
        for (name, e) in servers {
            let stdio = e.get("command").is_some_and(Value::is_string)
                && e.get("type").is_none_or(|t| t == "stdio");
            if let (true, Some(node)) = (stdio, ln.get(name)) {
                out.push(Entry {
                    path: format!("{at}.{name}"),
                    node,
                    value: e,
                });
            }
        }
    }
    Ok(out)
}

/// The argv an entry runs: `command`, then `args`.
fn argv(e: &Value) -> Result<Vec<String>, String> {
    let mut v = vec![e["command"].as_str().unwrap_or_default().to_string()];
    match e.get("args") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for x in a {
                let s = x
                    .as_str()
                    .ok_or_else(|| format!("an argument that is not a string: {x}"))?;
                v.push(s.to_string());
            }
        }
        Some(other) => return Err(format!("args is not a list: {other}")),
    }
    Ok(v)
}

/// The server's argv when `argv` runs it under `guard wrap` (the wrap's own options skipped).
fn wrapped_server(argv: &[String]) -> Option<&[String]> {
    let exe = Path::new(&argv[0]).file_name()?.to_str()?;
    if exe != "guard" {
        return None;
    }
    let wrap = argv.iter().position(|a| a == "wrap")?;
    let dashes = wrap + argv[wrap..].iter().position(|a| a == "--")?;
    let server = &argv[dashes + 1..];
    (!server.is_empty()).then_some(server)
}

/// Replaces the spans of `edits` (start, end, text) in `text`.
fn splice(text: &str, mut edits: Vec<(usize, usize, String)>) -> String {
    edits.sort_by_key(|(s, _, _)| std::cmp::Reverse(*s));
    let mut out = text.to_string();
    for (s, e, t) in edits {
        out.replace_range(s..e, &t);
    }
    out
}

/// The edits that make an entry run `new` (its `command` and `args`).
fn set_argv(e: &Entry<'_>, new: &[String]) -> Vec<(usize, usize, String)> {
    let command = e.node.get("command").expect("a stdio entry has a command");
    let args = serde_json::to_string(&new[1..]).unwrap_or_default();
    let mut edits = vec![(
        command.start,
        command.end,
        serde_json::to_string(&new[0]).unwrap_or_default(),
    )];
    match e.node.get("args") {
        Some(a) => edits.push((a.start, a.end, args)),
        None => edits.push((command.end, command.end, format!(", \"args\": {args}"))),
    }
    edits
}

/// Puts every stdio entry not yet under `guard wrap` under it: the text and how many changed.
pub fn wrap(text: &str, guard: &str) -> Result<(String, usize), String> {
    let (v, root) = scan(text)?;
    let mut edits = Vec::new();
    let mut n = 0;
    for e in entries(&v, &root)? {
        let run = argv(e.value).map_err(|x| format!("{}: {x}", e.path))?;
        if wrapped_server(&run).is_some() {
            continue;
        }
        let mut new = vec![guard.to_string(), "wrap".into(), "--".into()];
        new.extend(run);
        edits.extend(set_argv(&e, &new));
        n += 1;
    }
    Ok((splice(text, edits), n))
}

/// Undoes [`wrap`]: every entry under `guard wrap` runs its server directly again.
pub fn unwrap(text: &str) -> Result<(String, usize), String> {
    let (v, root) = scan(text)?;
    let mut edits = Vec::new();
    let mut n = 0;
    for e in entries(&v, &root)? {
        let run = argv(e.value).map_err(|x| format!("{}: {x}", e.path))?;
        if let Some(server) = wrapped_server(&run) {
            edits.extend(set_argv(&e, server));
            n += 1;
        }
    }
    Ok((splice(text, edits), n))
}

/// A stdio entry outside `guard wrap`.
#[derive(Debug)]
pub struct Outside {
    pub path: String,
    pub command: Vec<String>,
}

/// The stdio entries that do not run under `guard wrap`.
pub fn check(text: &str) -> Result<Vec<Outside>, String> {
    let (v, root) = scan(text)?;
    let mut out = Vec::new();
    for e in entries(&v, &root)? {
        let run = argv(e.value).map_err(|x| format!("{}: {x}", e.path))?;
        if wrapped_server(&run).is_none() {
            out.push(Outside {
                path: e.path,
                command: run,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAUDE_CODE: &str = r#"{
  "numStartups": 3,
  "mcpServers": {
    "fs": { "command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/work"], "env": {"A": "1"} },
    "web": { "type": "http", "url": "http://127.0.0.1:9000/mcp" }
  },
  "projects": {
    "/home/u/p": { "mcpServers": { "git": { "type": "stdio", "command": "uvx", "args": ["mcp-server-git"] } }, "x": [1, 2] }
  },
  "zLast": "kept \"as is\""
}
"#;

    #[test]
    fn wrap_changes_only_command_and_args_and_unwrap_undoes_it() {
        let (out, n) = wrap(CLAUDE_CODE, "/usr/bin/guard").unwrap();
        assert_eq!(n, 2);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["mcpServers"]["fs"]["command"], "/usr/bin/guard");
        assert_eq!(
            v["mcpServers"]["fs"]["args"],
            json!([
                "wrap",
                "--",
                "npx",
                "-y",
                "@modelcontextprotocol/server-filesystem",
                "/work"
            ])
        );
        assert_eq!(v["mcpServers"]["fs"]["env"]["A"], "1");
        assert_eq!(v["mcpServers"]["web"]["url"], "http://127.0.0.1:9000/mcp");
        let git = &v["projects"]["/home/u/p"]["mcpServers"]["git"];
        assert_eq!(git["args"], json!(["wrap", "--", "uvx", "mcp-server-git"]));
        // Everything else is byte for byte what it was, key order included.
        assert!(out.starts_with("{\n  \"numStartups\": 3,\n  \"mcpServers\": {\n"));
        assert!(out.ends_with("\"zLast\": \"kept \\\"as is\\\"\"\n}\n"));
        // Idempotent.
        assert_eq!(wrap(&out, "/usr/bin/guard").unwrap(), (out.clone(), 0));
        assert!(check(&out).unwrap().is_empty());
        let (back, n) = unwrap(&out).unwrap();
        assert_eq!(n, 2);
        let (a, b): (Value, Value) = (
            serde_json::from_str(&back).unwrap(),
            serde_json::from_str(CLAUDE_CODE).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(check(&back).unwrap().len(), 2);
    }

    #[test]
    fn every_format_is_found_and_check_lists_what_is_outside() {
        let desktop = r#"{"mcpServers": {"a": {"command": "python", "args": ["s.py"]}}}"#;
        let cursor = r#"{"mcpServers": {"a": {"command": "node"}, "b": {"url": "https://x/mcp"}}}"#;
        let vscode = r#"{"inputs": [], "servers": {"a": {"type": "stdio", "command": "uvx", "args": ["m"]}, "h": {"type": "http", "url": "http://h/mcp"}}}"#;
        let settings =
            r#"{"editor.tabSize": 2, "mcp": {"servers": {"a": {"command": "deno", "args": []}}}}"#;
        for (text, path) in [
            (desktop, "mcpServers.a"),
            (cursor, "mcpServers.a"),
            (vscode, "servers.a"),
            (settings, "mcp.servers.a"),
        ] {
            let outside = check(text).unwrap();
            assert_eq!(outside.len(), 1, "{text}");
            assert_eq!(outside[0].path, path);
            let (w, n) = wrap(text, "/opt/guard/bin/guard").unwrap();
            assert_eq!(n, 1, "{text}");
            assert!(check(&w).unwrap().is_empty(), "{w}");
            serde_json::from_str::<Value>(&w).unwrap();
        }
        // An entry without args gets them.
        let (w, _) = wrap(cursor, "guard").unwrap();
        let v: Value = serde_json::from_str(&w).unwrap();
        assert_eq!(v["mcpServers"]["a"]["args"], json!(["wrap", "--", "node"]));
        // Not a config, not JSON (comments), a bad entry: errors that say so.
        assert!(check(r#"{"a": 1}"#)
            .unwrap_err()
            .contains("no MCP server list"));
        assert!(check("{ // c\n}").unwrap_err().contains("comments"));
        let bad = r#"{"mcpServers": {"a": {"command": "x", "args": [1]}}}"#;
        assert!(wrap(bad, "guard").unwrap_err().contains("mcpServers.a"));
    }
}
