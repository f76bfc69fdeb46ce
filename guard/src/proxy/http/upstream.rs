//! The upstream side of one client connection: HTTP/1.1 connections to the original
//! destination (plain, or TLS verified for the name the agent asked for), one per request in
//! flight, re-established when the server closes them, pooled across connections for TLS.

use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{
    body::Body,
    pool::{pool_put, pool_take, PoolKey, Sender},
};
use crate::proxy::tcp;

/// How the upstream connections of one client connection are made.
pub enum Connector {
    Plain,
    /// TLS to the original destination, verified for `name` (the SNI, or the address).
    Tls {
        name: rustls::pki_types::ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
}

/// The upstream side of one client connection: HTTP/1.1 connections to the original
/// destination, one per request in flight (an HTTP/2 client may have several), re-established
/// when the server closes them.
pub struct Upstream {
    dst: SocketAddr,
    connector: Connector,
    /// The TCP connection made before classification, used first.
    first: Option<TcpStream>,
    idle: Vec<Sender>,
    /// Where idle connections go when the client connection ends, and come from for the next
    /// one (TLS only: a new plain connection already has its upstream TCP connection).
    pool: Option<PoolKey>,
}

/// An upstream HTTP/1.1 connection's I/O, run as a task of its own until either side closes.
type ConnFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Drop for Upstream {
    fn drop(&mut self) {
        let Some(key) = &self.pool else { return };
        // Only connections with nothing in flight: a response still streaming is not reusable.
        let ready: Vec<Sender> = self
            .idle
            .drain(..)
            .filter(|s| s.is_ready() && !s.is_closed())
            .collect();
        if !ready.is_empty() {
            pool_put(key, ready);
        }
    }
}

/// Connections kept per client connection beyond the one in use.
const MAX_IDLE_UPSTREAM: usize = 4;

pub(super) type ResponseFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Incoming>, Failed>> + Send>>;

/// A request the upstream connection failed; `unsent` when it never went out (the connection had
/// closed: a kept-alive one the server had just given up), so it can be sent again.
pub(super) struct Failed {
    pub(super) msg: String,
    pub(super) unsent: Option<Request<Body>>,
}

impl Upstream {
    /// `first`: a TCP connection already made to `dst`, used first (else one is made when
    /// needed).
    pub fn new(dst: SocketAddr, connector: Connector, first: Option<TcpStream>) -> Upstream {
        Upstream {
            dst,
            connector,
            first,
            idle: Vec::new(),
            pool: None,
        }
    }

    /// Reuse idle connections of earlier client connections with this key, and leave this
    /// one's for later ones.
    pub fn pooled(mut self, key: PoolKey) -> Upstream {
        self.pool = Some(key);
        self
    }

    /// A connection for one request: a pooled one when `reuse`, else a new one.
    async fn connect(&mut self, reuse: bool) -> Result<Sender, String> {
        if let Some(s) = self.pool.as_ref().filter(|_| reuse).and_then(pool_take) {
            // The connection made before classification is not needed.
            self.first = None;
            return Ok(s);
        }
        // Errors become strings here: boxed errors crossing these awaits trip the compiler's
        // higher-ranked Send check for the spawned connection task.
        let tcp = match self.first.take() {
            Some(t) => t,
            None => tcp::connect(self.dst).await.map_err(|e| e.to_string())?,
        };
        let (sender, conn) = match &self.connector {
            Connector::Plain => handshake(tcp).await?,
            Connector::Tls { name, config } => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS to the server: {e}"))?;
                handshake(tls).await?
            }
        };
        // On the proxy thread serving this client connection: a call never changes threads.
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Picks an idle connection (or makes one) and sends `req` on it; the response is awaited
    /// by the caller, without holding the upstream lock.
    /// Sends `req` on an idle or pooled connection when `reuse`, else on a new one.
    pub(super) async fn start(
        &mut self,
        req: Request<Body>,
        reuse: bool,
    ) -> Result<ResponseFuture, String> {
        let mut sender = loop {
            match self.idle.pop() {
                _ if !reuse => break self.connect(false).await?,
                Some(s) if s.is_closed() => continue,
                Some(s) if s.is_ready() => break s,
                // Busy (a response body still streaming): keep it for later.
                Some(s) => {
                    let busy = s;
                    let fresh = self.connect(true).await?;
                    if self.idle.len() < MAX_IDLE_UPSTREAM {
                        self.idle.push(busy);
                    }
                    break fresh;
                }
                None => break self.connect(true).await?,
            }
        };
        let fut = sender.try_send_request(req);
        if self.idle.len() < MAX_IDLE_UPSTREAM {
            self.idle.push(sender);
        }
        Ok(Box::pin(async move {
            fut.await.map_err(|mut e| Failed {
                msg: e.error().to_string(),
                unsent: e.take_message(),
            })
        }))
    }
}

async fn handshake<T>(io: T) -> Result<(Sender, ConnFuture), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let conn = Box::pin(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upstream connection: {e}");
        }
    });
    Ok((sender, conn))
}
