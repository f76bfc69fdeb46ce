//! The audit trail as a hash chain: every line begins with `"prev"`, the SHA-256 (hex) of the
//! line before it (without its newline), in the same log and across its rotations; the first
//! line a log ever had names 64 zeros. Editing, inserting or removing a line breaks the link
//! after it, which [`verify`] finds. (The newest line has no successor: its hash is the
//! chain's head, which `guard status` shows, so that it can be kept elsewhere.)

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

/// The `prev` of a log's first line.
pub const GENESIS: [u8; 32] = [0; 32];

pub fn hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

pub fn hex(h: &[u8; 32]) -> String {
    crate::hex::lower(h)
}

/// `body` (one serialized record, a JSON object) as the line that chains to `prev`.
pub fn chained(prev: &[u8; 32], body: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(body.len() + 76);
    line.extend_from_slice(b"{\"prev\":\"");
    crate::hex::push(&mut line, prev);
    line.push(b'"');
    match body.get(1..) {
        Some(rest) if rest.first() != Some(&b'}') => {
            line.push(b',');
            line.extend_from_slice(rest);
        }
        _ => line.push(b'}'),
    }
    line
}

/// The hash of the last line of `path` (None: no such file, or it is empty). Only the end of
/// the file is read (logs run to `audit.max_size`).
pub fn last_line_hash(path: &Path) -> Option<[u8; 32]> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = fs::File::open(path).ok()?;
    let md = f.metadata().ok()?;
    // A device (a test's /dev/full, /dev/null) has no lines: reading one may never end.
    if !md.is_file() {
        return None;
    }
    let len = md.len();
    let mut want = 64u64 << 10;
    loop {
        let from = len.saturating_sub(want);
        f.seek(SeekFrom::Start(from)).ok()?;
        let mut tail = Vec::new();
        (&mut f).take(len - from).read_to_end(&mut tail).ok()?;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if body.is_empty() {
            return None;
        }
        match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => return Some(hash(&body[i + 1..])),
            None if from == 0 => return Some(hash(body)),
            None => want *= 4,
        }
    }
}

/// Where the chain of a log continues from when it is opened: its last line, else the last
/// line of its newest rotated file, else the start.
pub fn head_of(path: &Path) -> [u8; 32] {
    last_line_hash(path)
        .or_else(|| last_line_hash(&PathBuf::from(format!("{}.1", path.display()))))
        .unwrap_or(GENESIS)
}

/// A log and its rotated files, oldest first (`audit.jsonl.N` ... `.1`, then `audit.jsonl`).
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = Vec::new();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    if let (Some(dir), Some(name)) = (path.parent(), name) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = f
                .strip_prefix(&name)
                .and_then(|r| r.strip_prefix('.'))
                .and_then(|n| n.parse().ok())
            {
                rotated.push((n, e.path()));
            }
        }
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every link holds: the number of lines, and the head (the last line's hash).
    Intact { lines: usize, head: String },
    /// The first broken link: the line (1-based) after which the chain breaks, in `file`, and
    /// why.
    Broken {
        file: PathBuf,
        line: usize,
        why: String,
    },
}

/// Checks the chain through `files`, in order (oldest first). The first line's `prev` is taken
/// as it is (what came before it may be rotated away); every later line, also across files,
/// must name the hash of the one before it.
pub fn verify(files: &[PathBuf]) -> std::io::Result<Verdict> {
    let mut prev: Option<([u8; 32], PathBuf, usize)> = None;
    let mut lines = 0;
    for file in files {
        let f = fs::File::open(file)?;
        for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
            let line = line?;
            let n = i + 1;
            let named = prev_of(&line);
            match (&prev, named) {
                (_, None) => {
                    return Ok(Verdict::Broken {
                        file: file.clone(),
                        line: n,
                        why: "this line is not a chained record (no \"prev\" first)".into(),
                    })
                }
                (Some((h, pf, pn)), Some(p)) if p != hex(h) => {
                    // Line pn (or this line's `prev`) is not what was written.
                    return Ok(Verdict::Broken {
                        file: pf.clone(),
                        line: *pn,
                        why: format!(
                            "the record at this line was changed, or the one after it ({}:{n}) was, or a record between them was removed or added",
                            file.display()
                        ),
                    });
                }
                _ => {}
            }
            prev = Some((hash(&line), file.clone(), n));
            lines += 1;
        }
    }
    Ok(Verdict::Intact {
        lines,
        head: prev.map_or_else(|| hex(&GENESIS), |(h, _, _)| hex(&h)),
    })
}

/// The `prev` a line begins with, as written.
fn prev_of(line: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(b"{\"prev\":\"")?;
    let hex = rest.get(..64)?;
    (rest.get(64) == Some(&b'"') && hex.iter().all(u8::is_ascii_hexdigit))
        .then(|| String::from_utf8_lossy(hex).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_chain(path: &Path, prev: [u8; 32], n: usize) -> [u8; 32] {
        let mut h = prev;
        let mut text = Vec::new();
        for i in 0..n {
            let line = chained(
                &h,
                format!("{{\"ts\":\"{i}\",\"event\":\"control\"}}").as_bytes(),
            );
            h = hash(&line);
            text.extend_from_slice(&line);
            text.push(b'\n');
        }
        fs::write(path, text).unwrap();
        h
    }

    #[test]
    fn a_changed_byte_breaks_the_chain_at_its_line_across_rotations() {
        let dir = std::env::temp_dir().join(format!("guard-chain-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        let h = write_chain(&dir.join("audit.jsonl.2"), GENESIS, 3);
        let h = write_chain(&dir.join("audit.jsonl.1"), h, 3);
        let head = write_chain(&log, h, 2);
        let files = files_of(&log);
        assert_eq!(files.len(), 3);
        assert!(files[0].ends_with("audit.jsonl.2"));
        assert_eq!(
            verify(&files).unwrap(),
            Verdict::Intact {
                lines: 8,
                head: hex(&head)
            }
        );
        assert_eq!(head_of(&log), head);
        // A last line longer than the tail first read.
        let long = dir.join("long.jsonl");
        let big = chained(
            &GENESIS,
            format!("{{\"x\":\"{}\"}}", "a".repeat(200_000)).as_bytes(),
        );
        fs::write(&long, [&b"{\"prev\":1}\n"[..], &big, b"\n"].concat()).unwrap();
        assert_eq!(last_line_hash(&long), Some(hash(&big)));
        // Not a file: no lines (and no endless read).
        assert_eq!(last_line_hash(Path::new("/dev/zero")), None);
        // One byte of the second line of the rotated `.1`.
        let rotated = dir.join("audit.jsonl.1");
        let mut text = fs::read(&rotated).unwrap();
        let second = text.iter().position(|b| *b == b'\n').unwrap() + 1;
        let at = second
            + text[second..]
                .windows(7)
                .position(|w| w == b"control")
                .unwrap();
        text[at] = b'C';
        fs::write(&rotated, &text).unwrap();
        match verify(&files).unwrap() {
            Verdict::Broken { file, line, .. } => {
                assert_eq!((file, line), (rotated.clone(), 2));
            }
            v => panic!("{v:?}"),
        }
        // A line removed at a file boundary is found too.
        let h = write_chain(&rotated, hash(b"not the last line of .2"), 3);
        write_chain(&log, h, 2);
        match verify(&files).unwrap() {
            Verdict::Broken { file, line, .. } => assert_eq!((file, line), (files[0].clone(), 3)),
            v => panic!("{v:?}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn chained_lines() {
        let l = chained(&GENESIS, b"{\"a\":1}");
        assert!(l.starts_with(b"{\"prev\":\"0000"));
        assert!(l.ends_with(b"\",\"a\":1}"));
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["a"], 1);
        assert_eq!(prev_of(&l).unwrap(), hex(&GENESIS));
        let e = chained(&GENESIS, b"{}");
        assert!(serde_json::from_slice::<serde_json::Value>(&e).is_ok());
        assert_eq!(prev_of(b"{\"ts\":1}"), None);
    }
}
