//! The threads that serve connections.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use anyhow::{Context as _, Result};
use tokio::net::TcpStream;

/// The threads that serve connections: each runs a single-threaded runtime, and a connection
/// lives on one of them from accept to close, its upstream connections included. A tools/call
/// then wakes one thread, never hands work between threads (on a work-stealing runtime every
/// call paid for cross-thread wake-ups: futex calls, and on a VM inter-processor interrupts).
pub struct Workers {
    workers: Vec<Worker>,
    /// Set once by [`Workers::stop`]: every thread then ends, and its runtime with all its tasks.
    stop: tokio::sync::watch::Sender<bool>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    /// Connections this thread is serving (new ones go to the least busy thread).
    active: Arc<AtomicU64>,
}

impl Workers {
    /// Starts `n` threads (0: one per CPU). They run until [`Workers::stop`] or the process
    /// exits.
    pub fn start(n: usize) -> Result<Workers> {
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a proxy thread's runtime")?;
            let handle = rt.handle().clone();
            handle.spawn(super::http::prune_pool_forever());
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("guard-proxy-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        while stopped.changed().await.is_ok() && !*stopped.borrow() {}
                    })
                })
                .context("starting a proxy thread")?;
            workers.push(Worker {
                handle,
                active: Arc::new(AtomicU64::new(0)),
            });
        }
        Ok(Workers { workers, stop })
    }

    /// Ends every thread: the connections they serve are dropped (closed) and their listeners
    /// with them. The daemon never does this (it exits); an in-process proxy in a test does.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Runs the accept loops on the first thread (which also serves connections itself while it
    /// is the least busy: then a new connection wakes one thread, not two).
    pub(super) fn accept_on_first<Fut>(&self, accept: Fut)
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.workers[0].handle.spawn(accept);
    }

    /// Runs `f(stream)` on the least busy thread (the first one on a tie: the accepting one,
    /// where `stream` already is); otherwise `stream` moves to that thread's reactor. Called on
    /// the first thread.
    pub(super) fn serve<F, Fut>(&self, stream: TcpStream, f: F) -> std::io::Result<()>
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
