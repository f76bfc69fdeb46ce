//! Which policy-named server an address belongs to: every address a policy's `server.match`
//! names, literally or through its host name (resolved at start, at every reload and every
//! 60 s). A connection to one of them is that server's, whatever the agent writes in SNI,
//! `Host` or path.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::{net::canonical_addr, policy::PolicySet};

/// The current address -> servers map (in policy order), swapped whole when it is resolved
/// again.
#[derive(Default)]
pub struct Named {
    map: RwLock<Arc<HashMap<SocketAddr, Vec<String>>>>,
}

impl Named {
    pub fn set(&self, named: HashMap<SocketAddr, Vec<String>>) {
        *self.map.write().unwrap() = Arc::new(named);
    }

    /// The (first) server a policy names at this address, if any.
    pub fn get(&self, dst: SocketAddr) -> Option<String> {
        self.map
            .read()
            .unwrap()
            .get(&canonical_addr(dst))
            .and_then(|v| v.first().cloned())
    }

    /// The servers policies name at `dst`, in policy order.
    pub fn at(&self, dst: SocketAddr) -> Vec<String> {
        self.map
            .read()
            .unwrap()
            .get(&canonical_addr(dst))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `dst` is one of `server`'s own addresses (what its `server.match` names,
    /// literally or through its host name): only answers from there are the server's own.
    pub fn owns(&self, dst: SocketAddr, server: &str) -> bool {
        self.map
            .read()
            .unwrap()
            .get(&canonical_addr(dst))
            .is_some_and(|v| v.iter().any(|s| s == server))
    }

    /// The server a request (or TLS connection) to `dst` belongs to. The destination
    /// decides: what the agent wrote (`chosen`, by Host, SNI or path) may choose among the
    /// servers policies name at `dst`, never move a request to a server elsewhere, nor away
    /// from `floor` (the server its TLS connection was taken for); else `floor`, else the
    /// first server at `dst`.
    pub fn decide(
        &self,
        dst: SocketAddr,
        chosen: Option<String>,
        floor: Option<&str>,
    ) -> Option<String> {
        let map = self.map.read().unwrap();
        let here = map.get(&canonical_addr(dst)).map_or(&[][..], Vec::as_slice);
        match chosen {
            Some(c) if here.contains(&c) => Some(c),
            Some(c) if here.is_empty() && floor.is_none_or(|f| f == c) => Some(c),
            _ => floor.map(str::to_string).or_else(|| here.first().cloned()),
        }
    }
}

/// `(host, port)` of a `server.match` entry: a URL or `host:port`.
pub fn entry_host_port(entry: &str) -> Option<(String, u16)> {
    let (default_port, rest) = match entry.split_once("://") {
        Some((scheme, rest)) => (
            if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            },
            rest,
        ),
        None => (0, entry),
    };
    let authority = rest.split('/').next()?;
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h.to_string(), after.strip_prefix(':').map(str::to_string))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.to_string())),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None if default_port != 0 => default_port,
        None => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// Resolves every server's match entries to addresses (names through the system resolver).
pub async fn resolve(policies: &PolicySet) -> HashMap<SocketAddr, Vec<String>> {
    let mut out: HashMap<SocketAddr, Vec<String>> = HashMap::new();
    let mut add = |a: SocketAddr, name: &str| {
        let names = out.entry(canonical_addr(a)).or_default();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    };
    for s in policies.servers() {
        for entry in s.match_entries() {
            let Some((host, port)) = entry_host_port(entry) else {
                continue;
            };
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                add(SocketAddr::new(ip, port), &s.name);
                continue;
            }
            let lookup = tokio::net::lookup_host(format!("{host}:{port}"));
            match tokio::time::timeout(Duration::from_secs(3), lookup).await {
                Ok(Ok(addrs)) => {
                    for a in addrs {
                        add(a, &s.name);
                    }
                }
                _ => tracing::warn!(
                    "{}: cannot resolve {host} (server.match of {}): matched by name only",
                    s.file,
                    s.name
                ),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::entry_host_port;

    #[test]
    fn match_entries_to_host_and_port() {
        assert_eq!(
            entry_host_port("https://api.acedata.cloud/flux/mcp"),
            Some(("api.acedata.cloud".into(), 443))
        );
        assert_eq!(
            entry_host_port("http://Example.com:8080/mcp"),
            Some(("example.com".into(), 8080))
        );
        assert_eq!(
            entry_host_port("127.0.0.1:8000"),
            Some(("127.0.0.1".into(), 8000))
        );
        assert_eq!(entry_host_port("[::1]:3001"), Some(("::1".into(), 3001)));
        assert_eq!(
            entry_host_port("http://[::1]/mcp"),
            Some(("::1".into(), 80))
        );
        assert_eq!(entry_host_port("example.com"), None);
    }
}
