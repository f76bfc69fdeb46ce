//! guard: a host-level guard for AI agents. `ARCHITECTURE.md` at the repository's root describes
//! the data path and which module may call which.
//!
//! The data path, one module a step: [`kernel`] (the eBPF redirect) -> [`proxy`] (accept,
//! identify, classify, TLS, HTTP, TCP passthrough) -> [`mcp`] (the transport-free enforcement
//! core, which asks [`policy`]) -> [`audit`]; [`stdio`] is the other adapter around the core
//! (`guard wrap`: stdio MCP servers). [`identity`] says who a caller is, [`enrol`] which
//! processes are agents; [`daemon`]
//! wires everything together and serves the control socket; [`cli`] is the command line.
pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod enrol;
pub mod fold;
pub mod hex;
pub mod identity;
pub mod kernel;
pub mod mcp;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod stdio;
