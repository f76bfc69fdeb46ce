//! Idle upstream TLS connections kept per proxy thread for the next connection of the same agent
//! instance (see [`PoolKey`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::body::Body;

/// The sending half of one upstream HTTP/1.1 connection (what the pool keeps).
pub(super) type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// Upstream TLS connections outlive the agent connection they were made for: the next connection
/// of the same agent instance (same uid and cgroup) to the same destination, verified for the
/// same name, takes one instead of a new TCP connection and TLS handshake. Without this, every
/// new agent connection paid for two handshakes in a row. Never shared across cgroups, uids or
/// names (processes that share both can already ptrace each other); every request on it is
/// still decided for its own caller. Kept per proxy thread (the connection's I/O runs there): a
/// new connection handed to another thread makes a connection of its own.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PoolKey {
    pub dst: SocketAddr,
    pub name: String,
    pub uid: u32,
    pub cgroup_id: u64,
}

/// Idle connections kept per key, and per proxy thread in all.
const POOL_PER_KEY: usize = 4;
const POOL_TOTAL: usize = 64;
/// How long an idle connection is kept (servers close idle connections on their own too).
const POOL_IDLE: Duration = Duration::from_secs(30);

thread_local! {
    static POOL: std::cell::RefCell<HashMap<PoolKey, Vec<(Sender, Instant)>>> =
        std::cell::RefCell::new(HashMap::new());
}

pub(super) fn pool_take(key: &PoolKey) -> Option<Sender> {
    // try_with: never panics, even while the thread is being torn down.
    POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.get_mut(key)?;
        let mut found = None;
        while let Some((s, at)) = list.pop() {
            if at.elapsed() < POOL_IDLE && s.is_ready() && !s.is_closed() {
                found = Some(s);
                break;
            }
        }
        if list.is_empty() {
            pool.remove(key);
        }
        found
    })
    .ok()
    .flatten()
}

/// Closes this thread's pooled connections that have been idle too long (dropping a sender
/// closes its connection) and forgets those the server closed.
fn prune(pool: &mut HashMap<PoolKey, Vec<(Sender, Instant)>>) {
    let now = Instant::now();
    pool.retain(|_, list| {
        list.retain(|(s, at)| now.duration_since(*at) < POOL_IDLE && !s.is_closed());
        !list.is_empty()
    });
}

/// Runs on every proxy thread: idle pooled connections do not outlive `POOL_IDLE` by much.
pub async fn prune_pool_forever() {
    let mut tick = tokio::time::interval(POOL_IDLE / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = POOL.try_with(|pool| prune(&mut pool.borrow_mut()));
    }
}

pub(super) fn pool_put(key: &PoolKey, senders: Vec<Sender>) {
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let now = Instant::now();
        prune(&mut pool);
        let total: usize = pool.values().map(Vec::len).sum();
        let list = pool.entry(key.clone()).or_default();
        let room = POOL_TOTAL
            .saturating_sub(total)
            .min(POOL_PER_KEY.saturating_sub(list.len()));
        list.extend(senders.into_iter().take(room).map(|s| (s, now)));
        if list.is_empty() {
            pool.remove(key);
        }
    });
}
