//! One redirected connection, from accept to close: identify it, see what it speaks, and hand it
//! to TLS, HTTP or a TCP passthrough. Its audit record and counters live in a
//! [`ConnectionRecord`], which writes the record exactly once on every way out.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use super::{
    classify::{self, Kind},
    fairness::Held,
    http,
    identify::Connection,
    tcp, Proxy, Stats,
};
use crate::{
    audit::{AgentRef, Audit, Decision, Event, Record},
    config::{OtherTraffic, UnknownServers},
};

/// Why a connection ended before it was classified.
enum Ended {
    /// The upstream connect failed.
    Failed,
    /// The client closed, or stayed silent.
    Closed,
}

/// How long a new connection may stay silent, both sides, before it is closed.
const CLIENT_SILENCE: Duration = Duration::from_secs(300);

/// A connection's audit record and counters. The record is written before any byte goes
/// upstream ([`commit`](Self::commit)), or when the connection is refused
/// ([`refuse`](Self::refuse)), or — for a connection that ends any other way first (the client
/// closed, a TLS handshake failed) — when this is dropped. A committed connection counts as
/// active until this is dropped.
pub(super) struct ConnectionRecord<'a> {
    audit: &'a Audit,
    stats: &'a Stats,
    pub(super) record: Record,
    started: Instant,
    written: bool,
    active: bool,
}

impl<'a> ConnectionRecord<'a> {
    fn new(proxy: &'a Proxy, conn: &Connection, started: Instant) -> Self {
        let mut record = proxy.audit.record(Event::Connection, Decision::Pass);
        record.agent = Some(AgentRef::from(&conn.identity));
        record.original_dst = Some(conn.original_dst.to_string());
        record.client = Some(conn.client.to_string());
        record.transport = Some("tcp".into());
        ConnectionRecord {
            audit: &proxy.audit,
            stats: &proxy.stats,
            record,
            started,
            written: false,
            active: false,
        }
    }

    /// The connection is refused by `rule` (nothing is forwarded).
    pub(super) fn deny(&mut self, rule: &str, reason: impl Into<String>) {
        self.record.decision = Decision::Deny;
        self.record.rule = Some(rule.into());
        self.record.reason = Some(reason.into());
    }

    /// The connection ends without being forwarded, for `reason`.
    pub(super) fn end(&mut self, decision: Decision, reason: impl Into<String>) {
        self.record.decision = decision;
        self.record.reason = Some(reason.into());
    }

    fn write(&mut self) -> bool {
        self.written = true;
        self.record.latency_us = Some(self.started.elapsed().as_micros() as u64);
        match self.audit.write(&self.record) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{e:#}");
                false
            }
        }
    }

    /// Writes the record (before anything is forwarded) and counts the connection as passed
    /// and active. False when the record cannot be written: then nothing may be forwarded.
    pub(super) fn commit(&mut self) -> bool {
        if !self.write() {
            return false;
        }
        self.stats.passed_through.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.active = true;
        true
    }

    /// Writes the record of a refused (or failed) connection, then resets the client.
    pub(super) fn refuse(&mut self, client: TcpStream) {
        self.write();
        tcp::reset(client);
    }
}

impl Drop for ConnectionRecord<'_> {
    fn drop(&mut self) {
        if !self.written {
            self.write();
        }
        if self.active {
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Proxy {
    /// Serves one accepted connection; `permit` is its place in `proxy.max_connections`.
    pub(super) async fn handle(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let started = Instant::now();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Some(conn) = self.identify.identify(peer, local) else {
            // Not redirected by guard (or its record is gone): fail closed.
            self.stats.origin_missing.fetch_add(1, Ordering::Relaxed);
            let mut r = self.audit.record(Event::Connection, Decision::Deny);
            r.client = Some(peer.to_string());
            r.reason = Some("origin of the connection unknown: closed".into());
            if let Err(e) = self.audit.write(&r) {
                tracing::error!("{e:#}");
            }
            tracing::warn!(%peer, "connection with no recorded origin: closed");
            tcp::reset(client);
            return;
        };
        let _ = client.set_nodelay(true);
        let dst = conn.original_dst;
        let mut rec = ConnectionRecord::new(self, &conn, started);
        if conn.pass {
            // Not an agent after all (marked at exec, then classified): as if never redirected.
            rec.record.rule = Some("enrol.not_an_agent".into());
            let Some((mut client, mut upstream)) = self.go_on(client, None, dst, &mut rec).await
            else {
                return;
            };
            // Its place in proxy.max_connections is held while it lasts (descriptors).
            let _permit = permit;
            if let Err(e) = tcp::passthrough(&mut client, &mut upstream).await {
                tracing::debug!(%peer, %dst, "passthrough ended: {e}");
            }
            return;
        }
        let Some(slot) = self.per_agent.acquire(&conn.identity) else {
            self.stats.over_agent_limit.fetch_add(1, Ordering::Relaxed);
            rec.deny(
                "proxy.max_connections_per_agent",
                format!(
                    "agent {} already holds {} connections (proxy.max_connections_per_agent)",
                    conn.identity.agent_key(),
                    self.per_agent.limit()
                ),
            );
            return rec.refuse(client);
        };
        let hold = Held::new(Some(permit), slot);
        let (kind, upstream) = match self.first_bytes(&client, dst, &mut rec).await {
            Ok(k) => k,
            // The upstream connect failed: reset, as a refusal.
            Err(Ended::Failed) => return rec.refuse(client),
            // The client is gone, or was silent: its record is written as this returns.
            Err(Ended::Closed) => return,
        };
        rec.record.transport = Some(kind.as_str().into());
        if kind == Kind::Tls {
            // Its own decision (intercept, pass, or refuse).
            return self.handle_tls(client, conn, upstream, rec, hold).await;
        }
        if let Some((rule, reason)) = self.unread_refusal(kind, dst) {
            rec.deny(rule, reason);
            return rec.refuse(client);
        }
        let served = kind == Kind::Http || kind == Kind::H2c;
        let rule = if served { "http" } else { "passthrough" };
        rec.record.rule = Some(rule.into());
        let Some((mut client, mut upstream)) = self.go_on(client, upstream, dst, &mut rec).await
        else {
            return;
        };
        if served {
            let upstream = http::Upstream::new(dst, http::Connector::Plain, Some(upstream));
            // No TLS name chose a server for this connection: each request's Host and path
            // choose among the servers at the destination.
            let h2 = kind == Kind::H2c;
            http::serve(self.http.clone(), conn, client, upstream, h2, None, hold).await;
        } else if let Err(e) = tcp::passthrough(&mut client, &mut upstream).await {
            tracing::debug!(%peer, %dst, "passthrough ended: {e}");
        }
    }

    /// Why a connection guard would pass on unread is refused, if it is: an HTTP-like request
    /// line anywhere, other traffic towards a named server or under `proxy.other = "deny"`.
    fn unread_refusal(&self, kind: Kind, dst: SocketAddr) -> Option<(&'static str, &'static str)> {
        let named = self.named.get(dst).is_some();
        match kind {
            // A request line guard does not serve (another version, blanks where one space
            // goes): a lenient server may read a request in it, which guard could then neither
            // decide nor audit, whatever unknown_servers says.
            Kind::HttpLike => {
                let rule = if named {
                    "policy.server"
                } else if self.http.engine.settings.unknown_servers == UnknownServers::Deny {
                    "policy.unknown_servers"
                } else {
                    "protocol"
                };
                Some((
                    rule,
                    "a request line that is not HTTP/1.x as guard reads it (another version, or \
                     runs of blanks) is not forwarded: send HTTP/1.1 or HTTP/2",
                ))
            }
            // A server a policy names is only ever reached through enforcement: something guard
            // cannot read (neither HTTP nor TLS) is refused there whatever proxy.other says.
            Kind::Other if named => Some((
                "policy.server",
                "a policy names this MCP server, and this traffic is neither HTTP nor TLS",
            )),
            Kind::Other if self.settings.other == OtherTraffic::Deny => Some((
                "proxy.other",
                "traffic that is neither HTTP nor TLS is denied (proxy.other = \"deny\")",
            )),
            _ => None,
        }
    }

    /// What the client speaks, from its first bytes. Usually they are there already (clients
    /// write right after connecting): then the upstream connection waits until it is needed
    /// (an intercepted TLS connection may take a pooled one, a refused one needs none).
    /// Otherwise it is made while waiting, and a server that speaks first (SSH, SMTP, ...)
    /// makes the connection a plain TCP passthrough without waiting for the client.
    async fn first_bytes(
        &self,
        client: &TcpStream,
        dst: SocketAddr,
        rec: &mut ConnectionRecord<'_>,
    ) -> Result<(Kind, Option<TcpStream>), Ended> {
        if let Some(k) = classify::peek_now(client) {
            return Ok((k, None));
        }
        let Some(upstream) = self.upstream_or_connect(None, dst, rec).await else {
            return Err(Ended::Failed);
        };
        // A policy-named server is spoken to over HTTP or TLS, where the client speaks first:
        // its first bytes are due within the header timeout, not a silence allowance.
        let silence = if self.named.get(dst).is_some() {
            self.settings.header_timeout
        } else {
            CLIENT_SILENCE
        };
        let k = tokio::select! {
            k = classify::peek(client, silence) => match k {
                Ok(k) => k,
                Err(_) => {
                    // Closed (or silent) before sending anything classifiable: nothing is
                    // forwarded.
                    rec.end(Decision::Closed, "the client sent nothing guard could classify");
                    return Err(Ended::Closed);
                }
            },
            _ = upstream.readable() => Kind::Other,
        };
        Ok((k, Some(upstream)))
    }

    /// The step every connection that goes on takes: the upstream connection (`have`, or a new
    /// one), then the connection's record. None, with the client reset, when the upstream
    /// connect or the audit write fails: no audit, no traffic.
    pub(super) async fn go_on(
        &self,
        client: TcpStream,
        have: Option<TcpStream>,
        dst: SocketAddr,
        rec: &mut ConnectionRecord<'_>,
    ) -> Option<(TcpStream, TcpStream)> {
        let Some(upstream) = self.upstream_or_connect(have, dst, rec).await else {
            rec.refuse(client);
            return None;
        };
        if !rec.commit() {
            tcp::reset(client);
            return None;
        }
        Some((client, upstream))
    }

    /// The TCP connection to the original destination: `have` when one was made already, else a
    /// new one; on failure the connection's record says so.
    async fn upstream_or_connect(
        &self,
        have: Option<TcpStream>,
        dst: SocketAddr,
        rec: &mut ConnectionRecord<'_>,
    ) -> Option<TcpStream> {
        if have.is_some() {
            return have;
        }
        match tcp::connect(dst).await {
            Ok(s) => Some(s),
            Err(e) => {
                self.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
                rec.end(Decision::Error, format!("upstream {dst}: {e}"));
                None
            }
        }
    }
}
