//! `server.match` entries: which connections and requests a policy governs.
//!
//! An entry is a URL (`http[s]://host[:port]/path`: host, port (80/443 by scheme) and a path
//! prefix), `host:port` (a name or an IP literal, IPv6 in brackets), or `stdio:COMMAND-GLOB`, a
//! glob (`*` matches anything) over the command line of a stdio server `guard wrap` starts (its
//! arguments joined by single spaces). Names are compared with the
//! request's `Host` header (or the TLS SNI name); IP literals also with the connection's original
//! destination. The `Host` header and SNI are chosen by the agent while the original destination
//! is not, so a match on the destination address takes precedence over one on the name.

use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// Lower case, without a trailing dot.
    Name(String),
    Ip(IpAddr),
}

/// One `server.match` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Matcher {
    /// A network endpoint (URL or `host:port`).
    Net(Endpoint),
    /// `stdio:GLOB`: stdio servers by their command line.
    Stdio(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    host: Host,
    port: u16,
    /// `Some` for URL entries: the path prefix, without a trailing `/` (`""` for the root).
    path: Option<String>,
}

/// How well a matcher fits; greater is better. Compared as a tuple: matched by destination
/// address, is a URL entry, length of its path prefix.
pub(super) type Score = (bool, bool, usize);

impl Matcher {
    pub fn parse(entry: &str) -> Result<Matcher, String> {
        if let Some(glob) = entry.strip_prefix("stdio:") {
            if glob.trim().is_empty() {
                return Err(format!(
                    "\"{entry}\": a stdio entry needs a command glob, e.g. \"stdio:*server-filesystem*\""
                ));
            }
            return Ok(Matcher::Stdio(glob.to_string()));
        }
        Endpoint::parse(entry).map(Matcher::Net)
    }

    /// How well this entry fits a stdio server's command line: the number of literal (non-`*`)
    /// bytes of its glob, so the more specific entry wins. None: not a stdio entry, or no match.
    pub fn score_stdio(&self, command: &str) -> Option<usize> {
        match self {
            Matcher::Stdio(g) if super::subject::glob(g, command) => {
                Some(g.bytes().filter(|b| *b != b'*').count())
            }
            _ => None,
        }
    }

    fn net(&self) -> Option<&Endpoint> {
        match self {
            Matcher::Net(e) => Some(e),
            Matcher::Stdio(_) => None,
        }
    }

    pub fn score_request(&self, host: Option<&str>, dst: SocketAddr, path: &str) -> Option<Score> {
        self.net()?.score_request(host, dst, path)
    }

    pub fn score_at(
        &self,
        host: Option<&str>,
        dst: SocketAddr,
        path: &str,
        fold: bool,
    ) -> Option<Score> {
        self.net()?.score_at(host, dst, path, fold)
    }

    pub fn score_sni(&self, sni: Option<&str>, dst: SocketAddr) -> Option<Score> {
        self.net()?.score_sni(sni, dst)
    }
}

impl Endpoint {
    fn parse(entry: &str) -> Result<Endpoint, String> {
        let lower = entry.to_ascii_lowercase();
        let scheme = if lower.starts_with("https://") {
            Some(("https://".len(), 443))
        } else if lower.starts_with("http://") {
            Some(("http://".len(), 80))
        } else if lower.contains("://") {
            return Err(format!(
                "\"{entry}\": only http:// and https:// URLs (and stdio:COMMAND-GLOB) are supported"
            ));
        } else {
            None
        };
        match scheme {
            Some((skip, default_port)) => {
                let rest = &entry[skip..];
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                let (authority, tail) = rest.split_at(end);
                if authority.contains('@') {
                    return Err(format!("\"{entry}\": user info is not allowed in a URL"));
                }
                let (host, port) = split_host_port(authority)
                    .ok_or_else(|| format!("\"{entry}\": bad host or port"))?;
                let port = match port {
                    Some(p) => p,
                    None => default_port,
                };
                let path = tail.split(['?', '#']).next().unwrap_or("");
                Ok(Endpoint {
                    host: parse_host(host).ok_or_else(|| format!("\"{entry}\": bad host"))?,
                    port,
                    path: Some(path.trim_end_matches('/').to_owned()),
                })
            }
            None => {
                let bad = || {
                    format!("\"{entry}\": expected a URL (http[s]://host[:port]/path), host:port or stdio:COMMAND-GLOB")
                };
                let (host, port) = split_host_port(entry).ok_or_else(bad)?;
                Ok(Endpoint {
                    host: parse_host(host).ok_or_else(bad)?,
                    port: port.ok_or_else(bad)?,
                    path: None,
                })
            }
        }
    }

    /// A request: `Host` header (if any), original destination, request target.
    pub fn score_request(&self, host: Option<&str>, dst: SocketAddr, path: &str) -> Option<Score> {
        if let Some(prefix) = &self.path {
            if !path_has_prefix(request_path(path), prefix) {
                return None;
            }
        }
        let plen = self.path.as_ref().map_or(0, |p| p.len() + 1);
        let is_url = self.path.is_some();
        if self.matches_dst(dst) {
            return Some((true, is_url, plen));
        }
        let (h, p) = split_host_port(host?.trim())?;
        let port = p.unwrap_or(dst.port());
        (port == self.port && self.host_is(h)).then_some((false, is_url, plen))
    }

    /// A request to `dst`, an address this entry's server is known to have (its IP, or what its
    /// name resolves to): the path must fit and the port be the destination's; the score says
    /// whether the entry names the destination itself or the `Host` header. `fold`: the path
    /// compared without regard to ASCII case (as Express routes by default).
    pub fn score_at(
        &self,
        host: Option<&str>,
        dst: SocketAddr,
        path: &str,
        fold: bool,
    ) -> Option<Score> {
        if self.port != dst.port() {
            return None;
        }
        if let Some(prefix) = &self.path {
            let fits = match fold {
                true => path_has_prefix(&path.to_ascii_lowercase(), &prefix.to_ascii_lowercase()),
                false => path_has_prefix(path, prefix),
            };
            if !fits {
                return None;
            }
        }
        let plen = self.path.as_ref().map_or(0, |p| p.len() + 1);
        let named = self.matches_dst(dst)
            || host
                .and_then(|h| split_host_port(h.trim()))
                .is_some_and(|(h, p)| p.unwrap_or(dst.port()) == self.port && self.host_is(h));
        Some((named, self.path.is_some(), plen))
    }

    /// A TLS ClientHello: SNI name (if any) and original destination.
    pub fn score_sni(&self, sni: Option<&str>, dst: SocketAddr) -> Option<Score> {
        if self.matches_dst(dst) {
            return Some((true, false, 0));
        }
        (dst.port() == self.port && self.host_is(sni?)).then_some((false, false, 0))
    }

    fn matches_dst(&self, dst: SocketAddr) -> bool {
        matches!(self.host, Host::Ip(ip) if ip == dst.ip().to_canonical() && self.port == dst.port())
    }

    fn host_is(&self, h: &str) -> bool {
        let h = h.strip_suffix('.').unwrap_or(h);
        match &self.host {
            Host::Name(n) => n.eq_ignore_ascii_case(h),
            Host::Ip(ip) => h.parse::<IpAddr>().is_ok_and(|x| x.to_canonical() == *ip),
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`. `None` when malformed.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']')?;
        let host = &rest[..close];
        let after = &rest[close + 1..];
        if after.is_empty() {
            return Some((host, None));
        }
        return Some((host, Some(parse_port(after.strip_prefix(':')?)?)));
    }
    match s.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => None, // a bare IPv6 address needs brackets
        Some((h, p)) => Some((h, Some(parse_port(p)?))),
        None => Some((s, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok().filter(|&p| p != 0)
}

fn parse_host(h: &str) -> Option<Host> {
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(Host::Ip(ip.to_canonical()));
    }
    let h = h.strip_suffix('.').unwrap_or(h);
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then(|| Host::Name(h.to_ascii_lowercase()))
}

/// The path of a request target (origin form or absolute form), without query or fragment.
pub(super) fn request_path(target: &str) -> &str {
    let mut t = target;
    let lower_scheme = t.get(..8).map(|s| s.to_ascii_lowercase());
    let skip = match lower_scheme.as_deref() {
        Some(s) if s.starts_with("http://") => Some(7),
        Some("https://") => Some(8),
        _ => None,
    };
    if let Some(skip) = skip {
        let rest = &t[skip..];
        t = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    t.split(['?', '#']).next().unwrap_or("")
}

/// Segment-aware: `/flux/mcp` covers `/flux/mcp` and `/flux/mcp/x`, not `/flux/mcpx`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Endpoint {
        match Matcher::parse(s).unwrap() {
            Matcher::Net(e) => e,
            Matcher::Stdio(g) => panic!("{s}: a stdio entry ({g})"),
        }
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_entries() {
        let u = m("HTTPS://API.Example.com/flux/mcp/");
        assert_eq!(u.host, Host::Name("api.example.com".into()));
        assert_eq!(u.port, 443);
        assert_eq!(u.path.as_deref(), Some("/flux/mcp"));
        assert_eq!(m("http://h").port, 80);
        assert_eq!(m("http://h:8080/").path.as_deref(), Some(""));
        assert_eq!(m("http://[::1]:9/x").host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(m("127.0.0.1:8000").port, 8000);
        assert_eq!(m("[::1]:8000").host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(m("localhost:3001").host, Host::Name("localhost".into()));
        for bad in [
            "localhost",
            "::1:80",
            "ftp://x/",
            "http://u@h/",
            "h:0",
            "h:70000",
            "h:x",
            "http://:80/",
            "bad host:80",
        ] {
            assert!(Matcher::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_matching() {
        let u = m("https://api.example.com/flux/mcp");
        let d = sa("93.184.216.34:443");
        assert!(u
            .score_request(Some("api.example.com"), d, "/flux/mcp")
            .is_some());
        assert!(u
            .score_request(Some("API.example.com."), d, "/flux/mcp/x?y=1")
            .is_some());
        assert!(u
            .score_request(Some("api.example.com:443"), d, "/flux/mcp")
            .is_some());
        assert!(u
            .score_request(Some("api.example.com:8443"), d, "/flux/mcp")
            .is_none());
        assert!(u
            .score_request(Some("api.example.com"), d, "/flux/mcpx")
            .is_none());
        assert!(u
            .score_request(Some("api.example.com"), d, "/other")
            .is_none());
        assert!(u.score_request(None, d, "/flux/mcp").is_none());
        assert!(u
            .score_request(None, d, "https://api.example.com/flux/mcp")
            .is_none());
        assert!(u
            .score_request(
                Some("api.example.com"),
                d,
                "http://api.example.com/flux/mcp"
            )
            .is_some());
        // The Host header's port defaults to the destination port.
        assert!(u
            .score_request(Some("api.example.com"), sa("1.2.3.4:80"), "/flux/mcp")
            .is_none());

        let ip = m("127.0.0.1:8000");
        assert_eq!(
            ip.score_request(Some("whatever"), sa("127.0.0.1:8000"), "/mcp"),
            Some((true, false, 0))
        );
        assert_eq!(
            ip.score_request(None, sa("[::ffff:127.0.0.1]:8000"), "/mcp"),
            Some((true, false, 0))
        );
        assert_eq!(
            ip.score_request(Some("127.0.0.1:8000"), sa("10.0.0.1:8000"), "/"),
            Some((false, false, 0))
        );
        assert!(ip.score_request(None, sa("127.0.0.1:8001"), "/").is_none());

        let v6 = m("[::1]:3001");
        assert!(v6
            .score_request(Some("[::1]:3001"), sa("10.0.0.1:3001"), "/")
            .is_some());
        assert!(v6.score_request(None, sa("[::1]:3001"), "/").is_some());
    }

    #[test]
    fn sni_matching() {
        let u = m("https://api.example.com/flux/mcp");
        assert!(u
            .score_sni(Some("api.example.com"), sa("1.2.3.4:443"))
            .is_some());
        assert!(u
            .score_sni(Some("api.example.com"), sa("1.2.3.4:8443"))
            .is_none());
        assert!(u
            .score_sni(Some("other.example.com"), sa("1.2.3.4:443"))
            .is_none());
        assert!(u.score_sni(None, sa("1.2.3.4:443")).is_none());
        let ip = m("127.0.0.1:8443");
        assert!(ip.score_sni(None, sa("127.0.0.1:8443")).is_some());
    }
}
