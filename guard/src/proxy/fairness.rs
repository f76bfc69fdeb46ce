//! Fairness between agents: each agent (its name, else its uid) holds at most
//! `proxy.max_connections_per_agent` connections at once, so that one agent's connections,
//! busy or silent, never take the slots of another.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::identity::Identity;

/// Connections held, by agent.
pub struct PerAgent {
    limit: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// What a connection holds while it is served: its place in `proxy.max_connections` and its
/// agent's slot. Shared (`Arc`) with what outlives the HTTP exchange on it — a tunnel after a
/// protocol upgrade — so that both are given back only when all of it has ended.
pub struct Held {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _slot: Slot,
}

pub type Hold = Arc<Held>;

impl Held {
    pub fn new(permit: Option<tokio::sync::OwnedSemaphorePermit>, slot: Slot) -> Hold {
        Arc::new(Held {
            _permit: permit,
            _slot: slot,
        })
    }
}

/// One connection's slot; given back when dropped.
pub struct Slot {
    of: Arc<PerAgent>,
    key: String,
}

impl PerAgent {
    pub fn new(limit: usize) -> PerAgent {
        PerAgent {
            limit: limit.max(1),
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for a connection of `who`, or None when that agent holds its limit.
    pub fn acquire(self: &Arc<Self>, who: &Identity) -> Option<Slot> {
        let key = who.agent_key();
        let mut held = self.held.lock().unwrap();
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            of: self.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.of.held.lock().unwrap();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Request bodies held in memory, by agent: each agent may have at most `limit` bytes being
/// read (or waiting to be forwarded) at once, so that one agent's connections times their
/// HTTP/2 streams times `proxy.max_body` cannot take the daemon's memory.
pub struct BodyBytes {
    limit: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// Bytes of one body, given back when dropped.
pub struct Reserved {
    of: Arc<BodyBytes>,
    key: String,
    n: usize,
}

impl BodyBytes {
    pub fn new(limit: usize) -> BodyBytes {
        BodyBytes {
            limit,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// `n` bytes for a body of `who`, or None when that agent holds its limit already.
    pub fn reserve(self: &Arc<Self>, who: &Identity, n: usize) -> Option<Reserved> {
        let key = who.agent_key();
        let mut held = self.held.lock().unwrap();
        let have = held.entry(key.clone()).or_insert(0);
        if *have + n > self.limit {
            if *have == 0 {
                held.remove(&key);
            }
            return None;
        }
        *have += n;
        Some(Reserved {
            of: self.clone(),
            key,
            n,
        })
    }
}

impl Reserved {
    /// Gives back what the body did not need (its length is known once it is read).
    pub fn shrink_to(&mut self, n: usize) {
        if n < self.n {
            let mut held = self.of.held.lock().unwrap();
            if let Some(have) = held.get_mut(&self.key) {
                *have -= self.n - n;
            }
            self.n = n;
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut held = self.of.held.lock().unwrap();
        if let Some(have) = held.get_mut(&self.key) {
            *have -= self.n;
            if *have == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str) -> Identity {
        Identity {
            agent: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn each_agent_has_its_own_body_bytes() {
        let b = Arc::new(BodyBytes::new(10));
        let (bot, other) = (agent("bot"), agent("other"));
        let six = b.reserve(&bot, 6).unwrap();
        assert!(b.reserve(&bot, 5).is_none(), "over the agent's bytes");
        let _four = b.reserve(&bot, 4).unwrap();
        assert!(
            b.reserve(&other, 10).is_some(),
            "another agent is not affected"
        );
        drop(six);
        let mut six = b.reserve(&bot, 6).unwrap();
        assert!(b.reserve(&bot, 1).is_none());
        six.shrink_to(2);
        assert!(
            b.reserve(&bot, 4).is_some(),
            "what a body did not need is given back"
        );
    }

    #[test]
    fn each_agent_has_its_own_slots() {
        let p = Arc::new(PerAgent::new(2));
        let (bot, other) = (agent("bot"), agent("other"));
        let a = p.acquire(&bot).unwrap();
        let _b = p.acquire(&bot).unwrap();
        assert!(p.acquire(&bot).is_none(), "bot holds its limit");
        assert!(p.acquire(&other).is_some(), "another agent is not affected");
        drop(a);
        assert!(
            p.acquire(&bot).is_some(),
            "a slot comes back when a connection ends"
        );
    }
}
