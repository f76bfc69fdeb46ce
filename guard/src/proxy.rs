//! The enforcing proxy's front: listeners on 127.0.0.1 and [::1], and for every redirected
//! connection the data path accept -> identify -> forward -> audit.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    audit::{AgentRef, Audit},
    classify::{self, Kind},
    config::{Intercept, OtherTraffic},
    forward,
    http::{self, Enforcer},
    identify::{self, Agents},
    redirect::Kernel,
    tls::{self, Interceptor},
};

#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub passed_through: AtomicU64,
    pub origin_missing: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub active: AtomicU64,
    pub over_capacity: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub passed_through: u64,
    pub origin_missing: u64,
    pub upstream_failed: u64,
    pub active: u64,
    pub over_capacity: u64,
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
        }
    }
}

/// How long a new connection may stay silent, both sides, before it is closed.
const CLIENT_SILENCE: Duration = Duration::from_secs(300);

/// The threads that serve connections: each runs a single-threaded runtime, and a connection
/// lives on one of them from accept to close, its upstream connections included. A tools/call
/// then wakes one thread, never hands work between threads (on a work-stealing runtime every
/// call paid for cross-thread wake-ups: futex calls, and on a VM inter-processor interrupts).
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    /// Connections this thread is serving (new ones go to the least busy thread).
    active: Arc<AtomicU64>,
}

impl Workers {
    /// Starts `n` threads (0: one per CPU). They run until the process exits.
    pub fn start(n: usize) -> Result<Workers> {
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a proxy thread's runtime")?;
            let handle = rt.handle().clone();
            handle.spawn(crate::http::prune_pool_forever());
            std::thread::Builder::new()
                .name(format!("guard-proxy-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .context("starting a proxy thread")?;
            workers.push(Worker {
                handle,
                active: Arc::new(AtomicU64::new(0)),
            });
        }
        Ok(Workers { workers })
    }

    /// Runs the accept loops on the first thread (which also serves connections itself while it
    /// is the least busy: then a new connection wakes one thread, not two).
    fn accept_on_first<Fut>(&self, accept: Fut)
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.workers[0].handle.spawn(accept);
    }

    /// Runs `f(stream)` on the least busy thread (the first one on a tie: the accepting one,
    /// where `stream` already is); otherwise `stream` moves to that thread's reactor. Called on
    /// the first thread.
    fn serve<F, Fut>(&self, stream: TcpStream, f: F) -> std::io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (i, w) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.active.load(Ordering::Relaxed))
            .expect("at least one proxy thread");
        let active = w.active.clone();
        active.fetch_add(1, Ordering::Relaxed);
        if i == 0 {
            tokio::spawn(async move {
                let _done = Decrement(active);
                f(stream).await
            });
            return Ok(());
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                active.fetch_sub(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        w.handle.spawn(async move {
            let _done = Decrement(active);
            match TcpStream::from_std(std) {
                Ok(s) => f(s).await,
                Err(e) => tracing::warn!("moving a connection to a proxy thread: {e}"),
            }
        });
        Ok(())
    }
}

struct Decrement(Arc<AtomicU64>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Proxy {
    pub kernel: Arc<Kernel>,
    pub agents: Arc<Agents>,
    pub audit: Arc<Audit>,
    pub stats: Arc<Stats>,
    pub enforcer: Arc<Enforcer>,
    pub other: OtherTraffic,
    pub interceptor: Arc<Interceptor>,
    pub intercept: Intercept,
    /// One permit per connection being served (`proxy.max_connections`).
    pub capacity: Arc<tokio::sync::Semaphore>,
    pub workers: Arc<Workers>,
}

/// Binds the proxy port on 127.0.0.1 and on [::1] (the latter is skipped, with a warning, on a
/// host without IPv6 loopback).
pub async fn bind(port: u16) -> Result<Vec<TcpListener>> {
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut listeners = vec![TcpListener::bind(v4).await.with_context(|| {
        format!("binding the proxy on {v4} (is another guard daemon running?)")
    })?];
    // Accepted (agent-side, always loopback) sockets inherit it.
    forward::loopback_congestion_control(&listeners[0]);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
    match TcpListener::bind(v6).await {
        Ok(l) => {
            forward::loopback_congestion_control(&l);
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
    /// Accepts on `listener` (bound on another runtime) from the first proxy thread.
    pub fn start(self: Arc<Self>, listener: TcpListener) -> Result<()> {
        let listener = listener.into_std()?;
        let me = self.clone();
        self.workers.accept_on_first(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => me.serve(l).await,
                Err(e) => tracing::error!("proxy listener on a proxy thread: {e}"),
            }
        });
        Ok(())
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Bounded: past proxy.max_connections a connection is reset, not queued.
                    let Ok(permit) = self.capacity.clone().try_acquire_owned() else {
                        self.stats.over_capacity.fetch_add(1, Ordering::Relaxed);
                        forward::reset(stream);
                        continue;
                    };
                    let me = self.clone();
                    let served = self.workers.serve(stream, move |stream| async move {
                        me.handle(stream, peer).await;
                        drop(permit);
                    });
                    if let Err(e) = served {
                        // Closed by the failure: nothing was forwarded.
                        tracing::warn!(%peer, "handing a connection to a proxy thread: {e}");
                    }
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
        // What the client speaks, from its first bytes. Usually they are there already (clients
        // write right after connecting): then the upstream connection waits until it is needed
        // (an intercepted TLS connection may take a pooled one, a refused one needs none).
        // Otherwise it is made while waiting, and a server that speaks first (SSH, SMTP, ...)
        // makes the connection a plain TCP passthrough without waiting for the client.
        let (kind, upstream) = match classify::peek_now(&client) {
            Some(k) => (k, None),
            None => {
                let Some(upstream) = self
                    .upstream_or_connect(None, dst, &mut record, started)
                    .await
                else {
                    forward::reset(client);
                    return;
                };
                let k = tokio::select! {
                    k = classify::peek(&client, CLIENT_SILENCE) => match k {
                        Ok(k) => k,
                        Err(_) => {
                            // Closed (or silent) before sending anything classifiable: nothing
                            // is forwarded.
                            record.decision = "closed".into();
                            record.reason =
                                Some("the client sent nothing guard could classify".into());
                            record.latency_us = Some(started.elapsed().as_micros() as u64);
                            self.write_audit(&record);
                            return;
                        }
                    },
                    _ = upstream.readable() => Kind::Other,
                };
                (k, Some(upstream))
            }
        };
        record.transport = Some(kind.as_str().into());
        if kind == Kind::Tls {
            // Its own decision (intercept, pass, or refuse) and its own record.
            return self
                .handle_tls(client, conn, upstream, record, started)
                .await;
        }
        // A server a policy names is only ever reached through enforcement: something guard
        // cannot read (neither HTTP nor TLS) is refused there whatever proxy.other says.
        let named = kind == Kind::Other && self.enforcer.named(dst).is_some();
        let deny_other = kind == Kind::Other && (self.other == OtherTraffic::Deny || named);
        if deny_other {
            record.decision = "deny".into();
            if named {
                record.rule = Some("policy.server".into());
                record.reason = Some(
                    "a policy names this MCP server, and this traffic is neither HTTP nor TLS"
                        .into(),
                );
            } else {
                record.rule = Some("proxy.other".into());
                record.reason = Some(
                    "traffic that is neither HTTP nor TLS is denied (proxy.other = \"deny\")"
                        .into(),
                );
            }
        } else {
            let rule = if kind == Kind::Other {
                "passthrough"
            } else {
                "http"
            };
            record.rule = Some(rule.into());
        }
        if deny_other {
            record.latency_us = Some(started.elapsed().as_micros() as u64);
            self.write_audit(&record);
            forward::reset(client);
            return;
        }
        let Some((client, mut upstream)) = self
            .go_on(client, upstream, dst, &mut record, started)
            .await
        else {
            return;
        };
        if kind == Kind::Http || kind == Kind::H2c {
            let upstream = http::Upstream::new(dst, http::Connector::Plain, Some(upstream));
            let floor = self.enforcer.named(dst);
            http::serve(
                self.enforcer.clone(),
                conn,
                client,
                upstream,
                kind == Kind::H2c,
                floor,
            )
            .await;
        } else {
            let mut client = client;
            if let Err(e) = forward::passthrough(&mut client, &mut upstream).await {
                tracing::debug!(%peer, %dst, "passthrough ended: {e}");
            }
        }
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// The step every connection that goes on takes: the upstream connection (`have`, or a new
    /// one), the connection's audit record, the counters (the caller decrements `active` when
    /// done). None, with the client reset, when the upstream connect or the audit write fails:
    /// no audit, no traffic.
    async fn go_on(
        &self,
        client: TcpStream,
        have: Option<TcpStream>,
        dst: SocketAddr,
        record: &mut crate::audit::Record,
        started: Instant,
    ) -> Option<(TcpStream, TcpStream)> {
        let Some(upstream) = self.upstream_or_connect(have, dst, record, started).await else {
            forward::reset(client);
            return None;
        };
        record.latency_us = Some(started.elapsed().as_micros() as u64);
        if !self.write_audit(record) {
            forward::reset(client);
            return None;
        }
        self.stats.passed_through.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        Some((client, upstream))
    }

    /// The TCP connection to the original destination: `have` when one was made already, else a
    /// new one; on failure the connection's record says so (the caller resets the client).
    async fn upstream_or_connect(
        &self,
        have: Option<TcpStream>,
        dst: SocketAddr,
        record: &mut crate::audit::Record,
        started: Instant,
    ) -> Option<TcpStream> {
        if have.is_some() {
            return have;
        }
        match forward::connect(dst).await {
            Ok(s) => Some(s),
            Err(e) => {
                self.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
                record.decision = "error".into();
                record.reason = Some(format!("upstream {dst}: {e}"));
                record.latency_us = Some(started.elapsed().as_micros() as u64);
                self.write_audit(record);
                None
            }
        }
    }

    /// TLS: intercept when a policy names the server (or `tls.intercept = "all"`), else pass
    /// the bytes through once the SNI is known to belong to the destination.
    async fn handle_tls(
        &self,
        client: TcpStream,
        conn: identify::Connection,
        upstream: Option<TcpStream>,
        mut record: crate::audit::Record,
        started: Instant,
    ) {
        let dst = conn.original_dst;
        let deny = |record: &mut crate::audit::Record, rule: &str, reason: String| {
            record.decision = "deny".into();
            record.rule = Some(rule.into());
            record.reason = Some(reason);
            record.latency_us = Some(started.elapsed().as_micros() as u64);
        };
        let hello =
            match tls::peek_client_hello(&client, self.enforcer.settings.header_timeout).await {
                Ok(h) => h,
                Err(e) => {
                    deny(&mut record, "tls", format!("no valid TLS ClientHello: {e}"));
                    self.write_audit(&record);
                    forward::reset(client);
                    return;
                }
            };
        let sni = hello.sni.clone();
        let policies = self.enforcer.policies();
        // By SNI, else by destination: an address a policy's server resolves to is that
        // server's whatever SNI (or none) the agent sends.
        let server = policies
            .match_sni(sni.as_deref(), dst)
            .map(|s| s.name.clone())
            .or_else(|| self.enforcer.named(dst));
        let intercept = server.is_some() || self.intercept == Intercept::All;
        record.server = Some(crate::audit::ServerRef {
            name: server.clone(),
            host: sni.clone().unwrap_or_else(|| dst.ip().to_string()),
            port: dst.port(),
        });
        record.detail = Some(serde_json::json!({
            "sni": sni, "alpn": hello.alpn, "intercepted": intercept,
        }));
        if !intercept {
            // Passthrough: the SNI must be a name of the destination (no domain fronting).
            if let Some(name) = &sni {
                match tls::resolves_to(name, dst).await {
                    Ok(true) => {}
                    Ok(false) => {
                        deny(&mut record, "tls.sni", format!("SNI {name} does not resolve to the destination {} (domain fronting)", dst.ip()));
                        self.write_audit(&record);
                        forward::reset(client);
                        return;
                    }
                    Err(e) => {
                        deny(
                            &mut record,
                            "tls.sni",
                            format!("SNI {name} could not be checked against the destination: {e}"),
                        );
                        self.write_audit(&record);
                        forward::reset(client);
                        return;
                    }
                }
            }
            record.rule = Some("tls.passthrough".into());
            let Some((mut client, mut upstream)) = self
                .go_on(client, upstream, dst, &mut record, started)
                .await
            else {
                return;
            };
            let _ = forward::passthrough(&mut client, &mut upstream).await;
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let name = sni
            .clone()
            .unwrap_or_else(|| crate::redirect::canonical(dst).ip().to_string());
        let accepted = match self.interceptor.server_config(&name) {
            Ok(cfg) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(client))
                    .await
                    .map_err(|_| "TLS handshake with the agent timed out".to_string())
                    .and_then(|r| {
                        r.map_err(|e| format!("TLS handshake with the agent failed: {e}"))
                    })
            }
            Err(e) => Err(format!("minting a certificate for {name}: {e:#}")),
        };
        let tls_client = match accepted {
            Ok(s) => s,
            Err(reason) => {
                deny(&mut record, "tls", reason);
                self.write_audit(&record);
                return;
            }
        };
        let alpn_h2 = tls_client.get_ref().1.alpn_protocol() == Some(b"h2");
        let server_name = match tls::server_name(sni.as_deref(), crate::redirect::canonical(dst)) {
            Ok(n) => n,
            Err(e) => {
                deny(&mut record, "tls", format!("{e:#}"));
                self.write_audit(&record);
                return;
            }
        };
        record.rule = Some("tls.intercept".into());
        record.detail.as_mut().unwrap()["alpn_chosen"] =
            serde_json::json!(if alpn_h2 { "h2" } else { "http/1.1" });
        record.latency_us = Some(started.elapsed().as_micros() as u64);
        if !self.write_audit(&record) {
            return;
        }
        self.stats.passed_through.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let pool = http::PoolKey {
            dst,
            name: server_name.to_str().into_owned(),
            uid: conn.identity.uid,
            cgroup_id: conn.identity.cgroup_id,
        };
        let upstream = http::Upstream::new(
            dst,
            http::Connector::Tls {
                name: server_name,
                config: self.interceptor.upstream(),
            },
            upstream,
        )
        .pooled(pool);
        http::serve(
            self.enforcer.clone(),
            conn,
            tls_client,
            upstream,
            alpn_h2,
            server,
        )
        .await;
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
