//! guard: a host-level guard for AI agents.
//!
//! The data path, one module a step: [`redirect`] (the kernel side) -> [`identify`] (who, where
//! to) -> [`proxy`] (accept, and the steps after it) -> [`forward`] -> [`audit`]. The [`daemon`]
//! wires them together; [`control`] is the CLI's way in.
pub mod approvals;
pub mod audit;
pub mod cgroup;
pub mod classify;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod forward;
pub mod http;
pub mod identify;
pub mod mcp;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod tls;
