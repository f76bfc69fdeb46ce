//! What one decision is about — a tool, a resource (by URI), a prompt or another MCP method —
//! and how rules are found for it: tools, prompts and methods by exact name, resources by URI
//! pattern on the normalised URI.

use std::collections::HashMap;

use super::Rule;

/// The thing a request asks the server for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// `tools/call`.
    Tool(&'a str),
    /// `resources/read` and `resources/subscribe`, by the URI as [`normalize_uri`] gives it.
    Resource(&'a str),
    /// `prompts/get`.
    Prompt(&'a str),
    /// Any other governed method, client to server (`completion/complete`, `tasks/get`, ...) or
    /// server to client (`sampling/createMessage`, `elicitation/create`, `roots/list`).
    Method(&'a str),
}

impl<'a> Subject<'a> {
    /// `"tool"`, `"resource"`, `"prompt"`, `"method"` (in reasons).
    pub fn noun(&self) -> &'static str {
        match self {
            Subject::Tool(_) => "tool",
            Subject::Resource(_) => "resource",
            Subject::Prompt(_) => "prompt",
            Subject::Method(_) => "method",
        }
    }

    pub fn name(&self) -> &'a str {
        match self {
            Subject::Tool(n) | Subject::Resource(n) | Subject::Prompt(n) | Subject::Method(n) => n,
        }
    }
}

/// Methods that always pass (lifecycle, lists — which are filtered instead — and
/// notifications): naming one in `methods` is a load error. `server/discover` is the
/// lifecycle of protocol 2026-07-28 (what `initialize` was before it).
pub fn always_passes(method: &str) -> bool {
    matches!(
        method,
        "initialize"
            | "server/discover"
            | "ping"
            | "tools/list"
            | "resources/list"
            | "resources/templates/list"
            | "prompts/list"
            | "resources/unsubscribe"
            | "logging/setLevel"
    ) || method.starts_with("notifications/")
}

/// The rules of one policy or grant, by what they govern.
#[derive(Debug, Default)]
pub(super) struct Rules {
    pub tools: HashMap<String, Rule>,
    /// URI patterns (`*` matches any run of characters), in file order.
    pub resources: Vec<(String, Rule)>,
    pub prompts: HashMap<String, Rule>,
    pub methods: HashMap<String, Rule>,
}

impl Rules {
    /// The rule for `s`. A resource takes its exact entry, else the longest pattern that matches
    /// (ties: the first in the file).
    pub fn get(&self, s: Subject<'_>) -> Option<&Rule> {
        match s {
            Subject::Tool(n) => self.tools.get(n),
            Subject::Prompt(n) => self.prompts.get(n),
            Subject::Method(n) => self.methods.get(n),
            Subject::Resource(uri) => {
                let mut best: Option<(bool, usize, &Rule)> = None;
                for (p, r) in &self.resources {
                    if !glob(p, uri) {
                        continue;
                    }
                    let score = (p == uri, p.len());
                    if best.is_none_or(|(e, l, _)| score > (e, l)) {
                        best = Some((score.0, score.1, r));
                    }
                }
                best.map(|(_, _, r)| r)
            }
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (also `/`) and
/// everything else matches itself.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen and where in `text` it started matching, to backtrack to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A URI as servers read it, so that a pattern cannot be dodged by spelling. What servers
/// canonicalise (the TS SDK with `new URL()`, FastMCP with pydantic's URL type, WHATWG rules)
/// is canonicalised here: scheme and host in lower case, percent escapes decoded, default ports
/// dropped, `file:/p`, `file:p` and `file://localhost/p` as `file:///p`, `https:h/p` as
/// `https://h/p`, runs of `/` as one. Query and fragment are not part of what is decided: servers
/// match resources without them (FastMCP ignores undeclared query parameters), so
/// `file:///a/.env?x` is `file:///a/.env`. Refused (the reason), as servers read them apart: control
/// characters, white space, backslashes, `.` and `..` segments, encoded `/`, a path encoded twice,
/// user info, and hosts that are not plain ASCII.
pub fn normalize_uri(uri: &str) -> Result<String, String> {
    if let Some(c) = uri
        .chars()
        .find(|&c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return Err(format!(
            "the URI holds {c:?}, which guard does not read as any server would"
        ));
    }
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err("the URI has no scheme".into());
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(format!("\"{scheme}\" is not a URI scheme"));
    }
    let scheme = scheme.to_ascii_lowercase();
    // Neither query nor fragment is decided on.
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let default_port = match scheme.as_str() {
        "http" | "ws" => Some("80"),
        "https" | "wss" => Some("443"),
        "ftp" => Some("21"),
        _ => None,
    };
    let (authority, path) = if scheme == "file" {
        // file:/p, file:p, file:///p, file://host/p
        match rest.strip_prefix("//") {
            Some(r) => {
                let end = r.find('/').unwrap_or(r.len());
                (Some(&r[..end]), &r[end..])
            }
            None => (Some(""), rest),
        }
    } else if default_port.is_some() {
        // Special schemes: any number of slashes before the host (https:h/p is https://h/p).
        let r = rest.trim_start_matches('/');
        let end = r.find('/').unwrap_or(r.len());
        (Some(&r[..end]), &r[end..])
    } else {
        match rest.strip_prefix("//") {
            Some(r) => {
                let end = r.find('/').unwrap_or(r.len());
                (Some(&r[..end]), &r[end..])
            }
            None => (None, rest),
        }
    };
    let authority = match authority {
        Some(a) => Some(host(a, &scheme, default_port)?),
        None => None,
    };
    let decoded = percent_decode(path)?;
    if decoded.contains('%') && percent_decode(&decoded)? != decoded {
        return Err("the URI's path is percent-encoded twice".into());
    }
    if path.to_ascii_lowercase().contains("%2f") {
        return Err(
            "the URI's path holds an encoded \"/\", which servers split differently".into(),
        );
    }
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(
            "the URI's path holds \".\" or \"..\" segments, which servers resolve differently"
                .into(),
        );
    }
    let mut out = scheme.clone();
    out.push(':');
    if let Some(a) = authority {
        out.push_str("//");
        out.push_str(&a);
    }
    let path = clean_path(&decoded);
    if scheme == "file" && !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&path);
    Ok(out)
}

/// A URI's authority as servers read it: decoded, lower case, without a default port.
fn host(a: &str, scheme: &str, default_port: Option<&str>) -> Result<String, String> {
    if a.contains('@') {
        return Err("the URI holds user info, which servers read differently".into());
    }
    let a = percent_decode(a)?.to_ascii_lowercase();
    if !a.is_ascii() || a.contains(['/', '%']) {
        return Err("the URI's host is not plain ASCII once decoded".into());
    }
    if scheme == "file" && a == "localhost" {
        return Ok(String::new());
    }
    match default_port.and_then(|d| a.strip_suffix(&format!(":{d}"))) {
        Some(h) => Ok(h.to_string()),
        None => Ok(a),
    }
}

pub(super) fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => return Err("the URI holds a malformed percent escape".into()),
            }
        }
        out.push(b[i]);
        i += 1;
    }
    let text = String::from_utf8(out).map_err(|_| "the URI's path is not UTF-8 once decoded")?;
    if text.chars().any(|c| c.is_control() || c == '\\') {
        return Err("the URI's path holds control characters or backslashes once decoded".into());
    }
    Ok(text)
}

/// The path without `.` and `..` segments (RFC 3986 §5.2.4; `..` never climbs above the root)
/// and with runs of `/` as one.
pub(super) fn clean_path(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut segs: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let trailing =
        path.len() > 1 && (path.ends_with('/') || path.ends_with("/.") || path.ends_with("/.."));
    let mut out = String::with_capacity(path.len());
    if absolute {
        out.push('/');
    }
    out.push_str(&segs.join("/"));
    if trailing && !segs.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("file:///work/*", "file:///work/a/b"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXbYbc"));
        assert!(!glob("a*b*c", "aXbY"));
        assert!(!glob("file:///work/*", "file:///etc/passwd"));
        assert!(glob("secret://*", "secret://{id}"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
    }

    #[test]
    fn uris_read_as_servers_read_them() {
        let n = |u: &str| normalize_uri(u).unwrap();
        assert_eq!(n("file:///work//etc/passwd"), "file:///work/etc/passwd");
        assert_eq!(n("FILE://HOST/a/b"), "file://host/a/b");
        assert_eq!(n("file:///a/b/"), "file:///a/b/");
        assert_eq!(n("secret://token"), "secret://token");
        assert_eq!(n("urn:x:y"), "urn:x:y");
        // Query and fragment are not decided on.
        assert_eq!(n("file:///a/.env?x=../y#f"), "file:///a/.env");
        // What the TS SDK's `new URL()` and pydantic make of them.
        for same in [
            "file:/etc/shadow",
            "file:etc/shadow",
            "file://localhost/etc/shadow",
            "file:///etc/%73hadow",
        ] {
            assert_eq!(n(same), "file:///etc/shadow", "{same}");
        }
        for same in [
            "https://internal.example:443/x",
            "https://%69nternal.example/x",
            "https:internal.example/x",
            "HTTPS:///Internal.Example/x",
        ] {
            assert_eq!(n(same), "https://internal.example/x", "{same}");
        }
        assert_eq!(n("http://h:8080/x"), "http://h:8080/x");
        for bad in [
            "file:///a\\..\\etc",
            "file:///a%00b",
            "file:///a%252e%252e/etc",
            "file:///a%zz",
            "no-scheme",
            "file:///a b",
            "file:///%ff",
            "file:///work/../etc/passwd",
            "file:///work/%2e%2e/etc",
            "notes://public/..%2Fprivate%2Fx",
            "notes://public/a%2Fb",
            "https://user@h/x",
            "https://ｉnternal.example/x",
            "https://%ef%bd%89nternal.example/x",
        ] {
            assert!(normalize_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path("/a//b/../c/."), "/a/c/");
        assert_eq!(clean_path("/"), "/");
        assert_eq!(clean_path(""), "");
        assert_eq!(clean_path("//mcp"), "/mcp");
        assert_eq!(clean_path("/mcp/"), "/mcp/");
    }
}
