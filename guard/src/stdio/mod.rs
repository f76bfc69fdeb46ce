//! MCP over stdio: `guard wrap` starts a stdio server and relays the newline-delimited JSON-RPC
//! between the agent (on its own stdin and stdout) and the server (on pipes), and the daemon
//! decides every message with the same [`crate::mcp::Engine`] the HTTP path uses — policies,
//! rate-limit windows, approvals, pins and the audit trail are the daemon's, shared by both.
//!
//! `wrap.rs` is the agent's side (an unprivileged process: the child, its pipes, signals and
//! exit status, what happens when the daemon goes away); `session.rs` the daemon's side of one
//! session (a message in, the core's outcome out); `proto.rs` the frames between them on the
//! daemon's stdio socket; `pipe.rs` wrap's own stdin and stdout, polled without blocking threads. Nothing is forwarded that the daemon has not decided.

mod pipe;
pub mod proto;
pub mod session;
pub mod wrap;
