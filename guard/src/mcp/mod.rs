//! The MCP enforcement core, shared by every transport: the wire format ([`wire`]), the
//! decisions ([`Engine::enforce`], [`Engine::enforce_body`]) and what they answer
//! ([`verdict`]) on what each message asks ([`ask`]), the filtering of answers ([`Engine::filter_message`]), SSE framing ([`sse`]),
//! tool pinning ([`pins`]) and held calls ([`approvals`]). Nothing here touches a socket or
//! knows HTTP: the proxy's HTTP adapter (and a stdio one) are thin layers around it.

pub mod approvals;
pub mod ask;
mod enforce;
mod filter;
pub mod pins;
mod refuse;
pub mod sse;
pub mod verdict;
pub mod wire;

pub use enforce::{Engine, Headers, Outcome, Settings, Target, Transport};
pub use filter::{EventData, Filtered};
pub use verdict::{Refusal, RefusalKind, Verdict};
