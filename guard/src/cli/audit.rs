//! `guard audit tail`: the recent decisions, human or JSON; `guard audit verify`: the hash
//! chain.

use anyhow::{Context as _, Result};
use serde_json::Value;

pub(super) fn audit_line(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let agent = v
        .get("agent")
        .map(|a| {
            let name = a.get("name").and_then(Value::as_str).unwrap_or("-");
            format!("{name}(uid {}, pid {})", a["uid"], a["pid"])
        })
        .unwrap_or_else(|| "-".into());
    let server = v
        .get("server")
        .map(|s| {
            let name = s.get("name").and_then(Value::as_str).unwrap_or("?");
            format!(" {name}")
        })
        .unwrap_or_default();
    let mut line = format!(
        "{} {:<12} {:<13} {agent}{server}",
        s("ts"),
        s("event"),
        s("decision")
    );
    if let Some(t) = v.get("tool").and_then(Value::as_str) {
        line.push_str(&format!(" tool={t}"));
    }
    if let Some(d) = v.get("original_dst").and_then(Value::as_str) {
        line.push_str(&format!(" dst={d}"));
    }
    if let Some(r) = v.get("rule").and_then(Value::as_str) {
        line.push_str(&format!(" rule={r}"));
    }
    if let Some(r) = v.get("reason").and_then(Value::as_str) {
        line.push_str(&format!(" reason=\"{r}\""));
    }
    line
}

pub(super) fn audit_tail(
    path: &std::path::Path,
    follow: bool,
    json: bool,
    lines: usize,
) -> Result<()> {
    use std::io::{BufRead as _, Seek as _};
    let print = |l: &str| {
        if json {
            println!("{l}");
        } else {
            match serde_json::from_str::<Value>(l) {
                Ok(v) => println!("{}", audit_line(&v)),
                Err(_) => println!("{l}"),
            }
        }
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    let all: Vec<&str> = text.lines().collect();
    for l in &all[all.len().saturating_sub(lines)..] {
        print(l);
    }
    if !follow {
        return Ok(());
    }
    let mut pos = text.len() as u64;
    let mut inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path)?);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        if ino != inode || meta.len() < pos {
            // Rotated or truncated: start from the new file's beginning.
            inode = ino;
            pos = 0;
        }
        if meta.len() == pos {
            continue;
        }
        let mut f = std::fs::File::open(path)?;
        f.seek(std::io::SeekFrom::Start(pos))?;
        let mut reader = std::io::BufReader::new(f);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                break;
            }
            pos += line.len() as u64;
            print(line.trim_end());
            line.clear();
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
}

/// `guard audit verify`: each chain (a log's files, oldest first) checked; 0 when all hold
/// (and the last one's head is `head`, when given), 1 at the first broken link.
pub(super) fn verify(logs: &[Vec<std::path::PathBuf>], head: Option<&str>) -> Result<i32> {
    use crate::audit::chain::{self, Verdict};
    let mut last = None;
    for files in logs.iter().filter(|f| !f.is_empty()) {
        match chain::verify(files).context("reading the audit trail")? {
            Verdict::Intact { lines, head } => {
                println!(
                    "ok: {lines} records, {} to {}, head {head}",
                    files[0].display(),
                    files[files.len() - 1].display()
                );
                last = Some(head);
            }
            Verdict::Broken { file, line, why } => {
                eprintln!(
                    "{}:{line}: the hash chain breaks here: {why}",
                    file.display()
                );
                return Ok(1);
            }
        }
    }
    let Some(have) = last else {
        eprintln!("guard audit verify: no audit files to check");
        return Ok(1);
    };
    if let Some(want) = head {
        if have != want.trim().to_ascii_lowercase() {
            eprintln!("the newest record's hash is {have}, not {want}: records at the end were changed, added or removed");
            return Ok(1);
        }
    }
    Ok(0)
}
