//! The enforcing proxy: listeners on 127.0.0.1 and [::1], and for every redirected connection
//! the data path accept -> identify ([`identify`]) -> classify ([`classify`]) -> TLS
//! ([`tls`]), HTTP ([`http`], around the MCP core) or TCP passthrough ([`tcp`]) -> audit. The
//! per-connection steps are in [`connection`].

pub mod classify;
mod connection;
mod fairness;
pub mod http;
pub mod identify;
pub mod named;
mod peek;
pub mod tcp;
pub mod tls;
mod workers;

pub use fairness::PerAgent;
pub use workers::Workers;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::net::TcpListener;

use self::{http::HttpLayer, identify::Identify, named::Named, tls::Interceptor};
use crate::{
    audit::Audit,
    config::{Intercept, OtherTraffic},
};

#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub passed_through: AtomicU64,
    pub origin_missing: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub active: AtomicU64,
    pub over_capacity: AtomicU64,
    /// Connections refused because their agent held `proxy.max_connections_per_agent`.
    pub over_agent_limit: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub passed_through: u64,
    pub origin_missing: u64,
    pub upstream_failed: u64,
    pub active: u64,
    pub over_capacity: u64,
    pub over_agent_limit: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            passed_through: self.passed_through.load(Ordering::Relaxed),
            origin_missing: self.origin_missing.load(Ordering::Relaxed),
            upstream_failed: self.upstream_failed.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            over_capacity: self.over_capacity.load(Ordering::Relaxed),
            over_agent_limit: self.over_agent_limit.load(Ordering::Relaxed),
        }
    }
}

/// How connections that are not MCP over HTTP are treated, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `proxy.other`: traffic that is neither HTTP nor TLS.
    pub other: OtherTraffic,
    /// `tls.intercept`.
    pub intercept: Intercept,
    /// `proxy.header_timeout_s`, also the limit for a whole ClientHello and, towards a
    /// policy-named server, for a new connection's first bytes.
    pub header_timeout: Duration,
}

pub struct Proxy {
    pub identify: Arc<dyn Identify>,
    pub audit: Arc<Audit>,
    pub stats: Arc<Stats>,
    pub http: Arc<HttpLayer>,
    pub named: Arc<Named>,
    pub interceptor: Arc<Interceptor>,
    pub settings: Settings,
    /// One permit per connection being served (`proxy.max_connections`).
    pub capacity: Arc<tokio::sync::Semaphore>,
    /// Connections each agent holds (`proxy.max_connections_per_agent`).
    pub per_agent: Arc<PerAgent>,
    pub workers: Arc<Workers>,
}

/// Binds the proxy port on 127.0.0.1 and on [::1] (the latter is skipped, with a warning, on a
/// host without IPv6 loopback).
pub fn bind(port: u16) -> Result<Vec<std::net::TcpListener>> {
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let first = std::net::TcpListener::bind(v4)
        .with_context(|| format!("binding the proxy on {v4} (is another guard daemon running?)"))?;
    // Accepted (agent-side, always loopback) sockets inherit it.
    tcp::loopback_congestion_control(&first);
    let mut listeners = vec![first];
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
    match std::net::TcpListener::bind(v6) {
        Ok(l) => {
            tcp::loopback_congestion_control(&l);
            listeners.push(l)
        }
        // Someone else holds it: they would receive guarded IPv6 connections. Refuse to start.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(e)
                .with_context(|| format!("binding the proxy on {v6}: another process holds it"));
        }
        Err(e) => {
            tracing::warn!("not listening on {v6}: {e}; guarded IPv6 connects will be refused")
        }
    }
    Ok(listeners)
}

impl Proxy {
    /// Accepts on `listener` from the first proxy thread.
    pub fn start(self: Arc<Self>, listener: std::net::TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let me = self.clone();
        self.workers.accept_on_first(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => me.accept(l).await,
                Err(e) => tracing::error!("proxy listener on a proxy thread: {e}"),
            }
        });
        Ok(())
    }

    async fn accept(self: Arc<Self>, listener: TcpListener) {
        // Listeners are bound to one address: every connection's local address is this one.
        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => return tracing::error!("proxy listener without an address: {e}"),
        };
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Bounded: past proxy.max_connections a connection is reset, not queued.
                    let Ok(permit) = self.capacity.clone().try_acquire_owned() else {
                        self.stats.over_capacity.fetch_add(1, Ordering::Relaxed);
                        tcp::reset(stream);
                        continue;
                    };
                    let me = self.clone();
                    let served = self.workers.serve(stream, move |stream| async move {
                        me.handle(stream, peer, local, permit).await;
                    });
                    if let Err(e) = served {
                        // Closed by the failure: nothing was forwarded.
                        tracing::warn!(%peer, "handing a connection to a proxy thread: {e}");
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("proxy accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
