//! What guard's tests share: running processes ([`process`]), the real MCP peers
//! ([`peers`]), a test PKI ([`pki`]), plain servers ([`servers`]), curl ([`curl`]), guard in-process without eBPF
//! ([`inproc`]), `guard wrap` driven line by line ([`wrapped`]), and the root harness around a
//! real daemon with real eBPF ([`root`]).

pub mod curl;
pub mod inproc;
pub mod peers;
pub mod pki;
pub mod process;
pub mod root;
pub mod servers;
pub mod wrapped;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// What a guard under test has written to its audit trail: decisions in the audit log,
/// connection records in the connection log beside it.
pub trait AuditLog {
    fn audit_log(&self) -> &Path;

    fn connections_log(&self) -> PathBuf {
        guard::audit::connections_beside(self.audit_log())
    }

    /// Every record of both logs, in time order.
    fn audit(&self) -> Vec<Value> {
        let mut all = read_audit(self.audit_log());
        all.extend(read_audit(&self.connections_log()));
        all.sort_by(|a, b| a["ts"].as_str().cmp(&b["ts"].as_str()));
        all
    }

    /// The decision records alone (the audit log).
    fn audit_decisions(&self) -> Vec<Value> {
        read_audit(self.audit_log())
    }

    /// The `connection` records.
    fn audit_connections(&self) -> Vec<Value> {
        read_audit(&self.connections_log())
            .into_iter()
            .filter(|r| r["event"] == "connection")
            .collect()
    }
}

/// The records of an audit log, in order.
pub fn read_audit(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}
