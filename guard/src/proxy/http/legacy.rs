//! Legacy HTTP+SSE (2024-11-05): a GET opens an event stream whose first `endpoint` event names
//! the URI for the session's POSTs, and the answers to those POSTs travel on the stream. guard
//! keeps each session's stream here, so that its own answers (refusals) go where the client
//! waits for them.

use std::{collections::HashMap, sync::Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::body::BoxError;

/// The sending end of a re-streamed response body.
pub(super) type StreamTx = mpsc::Sender<Result<Bytes, BoxError>>;

/// (server, session id) -> the stream that session's answers go to.
#[derive(Default)]
pub(super) struct Legacy {
    sessions: Mutex<HashMap<(String, String), StreamTx>>,
}

impl Legacy {
    /// The stream of `server`'s `session` now goes to `tx` (a reconnect replaces the old one).
    pub(super) fn register(&self, server: &str, session: &str, tx: StreamTx) {
        self.sessions
            .lock()
            .unwrap()
            .insert((server.to_string(), session.to_string()), tx);
    }

    pub(super) fn unregister(&self, server: &str, session: &str) {
        self.sessions
            .lock()
            .unwrap()
            .remove(&(server.to_string(), session.to_string()));
    }

    /// The stream of a session, if it is a legacy one.
    pub(super) fn stream(&self, server: &str, session: &str) -> Option<StreamTx> {
        self.sessions
            .lock()
            .unwrap()
            .get(&(server.to_string(), session.to_string()))
            .cloned()
    }
}
