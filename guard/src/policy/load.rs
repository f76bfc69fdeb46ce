//! Policy files to a [`PolicySet`]: every `*.json` of a directory in name order (or one file),
//! parsed, compiled and checked against each other (no two servers with one name or one
//! `server.match` entry). Every error names `file:line:col` and the field.

use std::path::Path;

use super::{
    compile, locate, locate::Seg, matcher::Matcher, raw, PolicyError, PolicySet, ServerPolicy,
};

impl PolicySet {
    /// Loads every `*.json` in `dir` (in name order; names starting with `.` skipped). All the
    /// errors are returned, not just the first.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyError>> {
        let whole = |message: String| {
            vec![PolicyError {
                file: dir.display().to_string(),
                line: 0,
                col: 0,
                message,
            }]
        };
        let entries = std::fs::read_dir(dir).map_err(|e| whole(format!("cannot read: {e}")))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| whole(format!("cannot read: {e}")))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            // Follows symlinks; a dangling one or a directory is not a policy.
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for name in names {
            let path = dir.join(&name);
            match read_text(&path) {
                Ok(text) => files.push((path.display().to_string(), text)),
                Err(e) => errors.push(e),
            }
        }
        match PolicySet::from_files(&files) {
            Ok(set) if errors.is_empty() => Ok(set),
            Ok(_) => Err(errors),
            Err(mut more) => {
                errors.append(&mut more);
                Err(errors)
            }
        }
    }

    /// Loads a directory ([`load_dir`](Self::load_dir)) or a single file.
    pub fn load(path: &Path) -> Result<PolicySet, Vec<PolicyError>> {
        if path.is_dir() {
            return PolicySet::load_dir(path);
        }
        let text = read_text(path).map_err(|e| vec![e])?;
        PolicySet::from_files(&[(path.display().to_string(), text)])
    }

    /// Builds a set from (file name, text) pairs, in that order. The file name is used in errors
    /// and, through its stem, as the default server name.
    pub fn from_files(files: &[(String, String)]) -> Result<PolicySet, Vec<PolicyError>> {
        let mut set = PolicySet {
            sha256: super::bundle::digest(files),
            ..PolicySet::default()
        };
        let mut errors = Vec::new();
        // Where each matcher was first seen: (server index, entry).
        let mut seen_matchers: Vec<(usize, Matcher)> = Vec::new();
        for (file, text) in files {
            let policy = match parse_file(file, text) {
                Ok(p) => p,
                Err(mut e) => {
                    errors.append(&mut e);
                    continue;
                }
            };
            let err_at = |path: Vec<Seg>, what: String| {
                let (off, _) = locate::locate(text, &path, false);
                let (line, col) = locate::line_col(text, off);
                PolicyError {
                    file: file.clone(),
                    line,
                    col,
                    message: locate::message_at(&path, what),
                }
            };
            if let Some(&other) = set.by_name.get(&policy.name) {
                let has_name = locate::locate(text, &["server".into(), "name".into()], false).1;
                let path = if has_name {
                    vec!["server".into(), "name".into()]
                } else {
                    Vec::new()
                };
                errors.push(err_at(
                    path,
                    format!(
                        "duplicate server name \"{}\" (also in {})",
                        policy.name, set.servers[other].file
                    ),
                ));
                continue;
            }
            let mut clash = false;
            for (i, (entry, m)) in policy.matchers.iter().enumerate() {
                if let Some((other, _)) = seen_matchers.iter().find(|(_, x)| x == m) {
                    let o = &set.servers[*other];
                    errors.push(err_at(
                        vec!["server".into(), "match".into(), i.into()],
                        format!(
                            "\"{entry}\" is already matched by server \"{}\" ({})",
                            o.name, o.file
                        ),
                    ));
                    clash = true;
                }
            }
            if clash {
                continue;
            }
            let idx = set.servers.len();
            seen_matchers.extend(policy.matchers.iter().map(|(_, m)| (idx, m.clone())));
            set.by_name.insert(policy.name.clone(), idx);
            set.servers.push(policy);
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }
}

fn read_text(path: &Path) -> Result<String, PolicyError> {
    let err = |message: String| PolicyError {
        file: path.display().to_string(),
        line: 0,
        col: 0,
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| err(format!("not valid UTF-8: {e}")))
}

/// Parses and compiles one file; errors carry `file:line:col`.
fn parse_file(file: &str, text: &str) -> Result<ServerPolicy, Vec<PolicyError>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: raw::RawPolicy = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) => return Err(vec![serde_error(file, text, e)]),
    };
    if let Err(e) = de.end() {
        let (line, col) = serde_position(text, &e);
        return Err(vec![PolicyError {
            file: file.to_owned(),
            line,
            col,
            message: serde_message(&e),
        }]);
    }
    compile::compile(file, raw).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| {
                let (off, _) = locate::locate(text, &p.path, p.at_key);
                let (line, col) = locate::line_col(text, off);
                PolicyError {
                    file: file.to_owned(),
                    line,
                    col,
                    message: p.message(),
                }
            })
            .collect()
    })
}

/// serde_json's message without its " at line L column C" suffix. serde quotes names with
/// backticks: they become double quotes (`unknown variant "block"`), except around the
/// offending value of "invalid type/value" messages, where serde already says what it is
/// (`invalid type: integer 5`, `invalid type: string "5"`).
fn serde_message(e: &serde_json::Error) -> String {
    let mut s = e.to_string();
    if e.line() != 0 {
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        if s.ends_with(&suffix) {
            s.truncate(s.len() - suffix.len());
        }
    }
    if s.starts_with("invalid type") || s.starts_with("invalid value") {
        s.replace('`', "")
    } else {
        s.replace('`', "\"")
    }
}

/// serde_json's position (line, byte column) as (line, character column).
fn serde_position(text: &str, e: &serde_json::Error) -> (usize, usize) {
    if e.line() == 0 {
        return (1, 1);
    }
    locate::line_col(text, locate::offset_of(text, e.line(), e.column()))
}

fn serde_error(
    file: &str,
    text: &str,
    e: serde_path_to_error::Error<serde_json::Error>,
) -> PolicyError {
    let mut path = Vec::new();
    for seg in e.path().iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => path.push(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    let inner = e.into_inner();
    let what = serde_message(&inner);
    // For a value of the wrong shape, point at the start of the value (serde_json points past
    // it); for an unknown field, at its key. Syntax errors keep serde_json's position.
    let (line, col) = match inner.classify() {
        serde_json::error::Category::Data => {
            let unknown_field = what.starts_with("unknown field");
            match locate::locate(text, &path, unknown_field) {
                (off, true) => locate::line_col(text, off),
                (_, false) => serde_position(text, &inner),
            }
        }
        _ => serde_position(text, &inner),
    };
    PolicyError {
        file: file.to_owned(),
        line,
        col,
        message: locate::message_at(&path, what),
    }
}
