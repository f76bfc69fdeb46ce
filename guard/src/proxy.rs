//! The enforcing proxy's front: listeners on 127.0.0.1 and [::1], and for every redirected
//! connection the data path accept -> identify -> forward -> audit.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    audit::{AgentRef, Audit},
    classify::{self, Kind},
    config::OtherTraffic,
    forward,
    http::{self, Enforcer},
    identify::{self, Agents},
    redirect::Kernel,
};

#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub passed_through: AtomicU64,
    pub origin_missing: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub active: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub passed_through: u64,
    pub origin_missing: u64,
    pub upstream_failed: u64,
    pub active: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            passed_through: self.passed_through.load(Ordering::Relaxed),
            origin_missing: self.origin_missing.load(Ordering::Relaxed),
            upstream_failed: self.upstream_failed.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
        }
    }
}

pub struct Proxy {
    pub kernel: Arc<Kernel>,
    pub agents: Arc<Agents>,
    pub audit: Arc<Audit>,
    pub stats: Arc<Stats>,
    pub enforcer: Arc<Enforcer>,
    pub other: OtherTraffic,
}

/// Binds the proxy port on 127.0.0.1 and on [::1] (the latter is skipped, with a warning, on a
/// host without IPv6 loopback).
pub async fn bind(port: u16) -> Result<Vec<TcpListener>> {
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut listeners = vec![TcpListener::bind(v4).await.with_context(|| {
        format!("binding the proxy on {v4} (is another guard daemon running?)")
    })?];
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
    match TcpListener::bind(v6).await {
        Ok(l) => listeners.push(l),
        Err(e) => {
            tracing::warn!("not listening on {v6}: {e}; guarded IPv6 connects will be refused")
        }
    }
    Ok(listeners)
}

impl Proxy {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.handle(stream, peer).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("proxy accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Some(conn) = identify::identify(&self.kernel, &self.agents, peer) else {
            // Not redirected by guard (or its record is gone): fail closed.
            self.stats.origin_missing.fetch_add(1, Ordering::Relaxed);
            let mut r = self.audit.record("connection", "deny");
            r.client = Some(peer.to_string());
            r.reason = Some("origin of the connection unknown: closed".into());
            self.write_audit(&r);
            tracing::warn!(%peer, "connection with no recorded origin: closed");
            forward::reset(client);
            return;
        };
        let _ = client.set_nodelay(true);
        let dst = conn.original_dst;
        let mut record = self.audit.record("connection", "pass");
        record.agent = Some(AgentRef::from(&conn.identity));
        record.original_dst = Some(dst.to_string());
        record.client = Some(peer.to_string());
        record.transport = Some("tcp".into());
        let mut upstream = match forward::connect(dst).await {
            Ok(s) => s,
            Err(e) => {
                self.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
                record.decision = "error".into();
                record.reason = Some(format!("upstream {dst}: {e}"));
                record.latency_us = Some(started.elapsed().as_micros() as u64);
                self.write_audit(&record);
                forward::reset(client);
                return;
            }
        };
        // What the client speaks, from its first bytes; a server that speaks first (SSH, SMTP,
        // ...) makes it a plain TCP passthrough without waiting for the client.
        let kind = tokio::select! {
            k = classify::peek(&client) => match k {
                Ok(k) => k,
                Err(_) => {
                    // Closed before sending anything: nothing was decided but the connection.
                    record.reason = Some("client closed before sending anything".into());
                    record.latency_us = Some(started.elapsed().as_micros() as u64);
                    self.write_audit(&record);
                    return;
                }
            },
            _ = upstream.readable() => Kind::Other,
        };
        record.transport = Some(kind.as_str().into());
        let deny_other = kind == Kind::Other && self.other == OtherTraffic::Deny;
        if deny_other {
            record.decision = "deny".into();
            record.rule = Some("proxy.other".into());
            record.reason = Some(
                "traffic that is neither HTTP nor TLS is denied (proxy.other = \"deny\")".into(),
            );
        } else {
            record.rule = Some(
                match kind {
                    Kind::Http => "http",
                    _ => "passthrough",
                }
                .into(),
            );
        }
        record.latency_us = Some(started.elapsed().as_micros() as u64);
        if !self.write_audit(&record) || deny_other {
            // No audit, no traffic.
            forward::reset(client);
            return;
        }
        self.stats.passed_through.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        if kind == Kind::Http {
            http::serve(self.enforcer.clone(), conn, client, upstream).await;
        } else {
            let mut client = client;
            if let Err(e) = forward::passthrough(&mut client, &mut upstream).await {
                tracing::debug!(%peer, %dst, "passthrough ended: {e}");
            }
        }
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }

    fn write_audit(&self, r: &crate::audit::Record) -> bool {
        match self.audit.write(r) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{e:#}");
                false
            }
        }
    }
}
