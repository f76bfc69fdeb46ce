//! Answers from a policy-named server, on their way back to the agent: `tools/list` results lose
//! the tools this caller may not see, and every tool definition seen is checked against its pin.
//! Transport-free: the HTTP adapter hands over JSON bodies and SSE event data.

use serde_json::{json, Value};

use super::{enforce::Engine, enforce::Target, wire};
use crate::{
    audit::{Decision, Event},
    identity::Identity,
    policy::ToolChange,
};

/// A JSON answer after filtering.
#[derive(Debug, Clone, PartialEq)]
pub enum Filtered {
    /// Nothing to change: pass the bytes on as they are.
    Unchanged,
    /// The answer to pass on instead.
    Changed(Vec<u8>),
}

impl Engine {
    /// Filters an `application/json` answer (one message or a batch) of `server`.
    pub fn filter_json(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        bytes: &[u8],
    ) -> Filtered {
        let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
            return Filtered::Unchanged;
        };
        let changed = match &mut v {
            Value::Array(items) => {
                // Every message is filtered (no short-circuit).
                let mut changed = false;
                for m in items.iter_mut() {
                    changed |= self.filter_message(caller, t, server, m);
                }
                changed
            }
            m => self.filter_message(caller, t, server, m),
        };
        if changed {
            Filtered::Changed(serde_json::to_vec(&v).unwrap_or_default())
        } else {
            Filtered::Unchanged
        }
    }

    /// Filters the data of one SSE event; `Some(new data)` when it changed.
    pub fn filter_event_data(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        data: &str,
    ) -> Option<String> {
        let mut v = serde_json::from_str::<Value>(data).ok()?;
        self.filter_message(caller, t, server, &mut v)
            .then(|| v.to_string())
    }

    /// Applies policy to one message from `server`; true when it was changed. A `tools/list`
    /// result is pinned, filtered and audited; when its record cannot be written, the agent
    /// sees no tools rather than an unaudited list.
    pub fn filter_message(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        m: &mut Value,
    ) -> bool {
        let Some(tools) = wire::tools_of(m) else {
            return false;
        };
        let policies = self.policies();
        let Some(sp) = policies.by_name(server) else {
            return false;
        };
        let accept = sp.on_tool_change == ToolChange::Allow;
        match self.pins.observe(server, tools, accept) {
            Ok(changes) => {
                for c in changes {
                    let decision = if accept {
                        Decision::Allow
                    } else {
                        Decision::Block
                    };
                    let mut r = self.record(Event::ToolChanged, decision, caller, t);
                    r.tool = Some(c.tool.clone());
                    r.rule = Some("on_tool_change".into());
                    r.reason = Some(format!(
                        "definition hash {} differs from the pinned {}",
                        c.seen, c.pinned
                    ));
                    self.write(&r);
                }
            }
            Err(e) => tracing::error!("tool pins for {server}: {e:#}"),
        }
        let mut policy_caller = caller.caller();
        policy_caller.session = t.session.clone();
        let block_changed = sp.on_tool_change == ToolChange::Block;
        let removed = wire::filter_tools(m, |name| {
            sp.visible(name, &policy_caller) && !(block_changed && self.pins.blocked(server, name))
        });
        let mut r = self.record(Event::ToolsList, Decision::Filter, caller, t);
        r.method = Some("tools/list".into());
        r.jsonrpc_id = m.get("id").cloned();
        r.detail = Some(json!({ "hidden": removed }));
        if !self.write(&r) {
            if let Some(tools) = m
                .get_mut("result")
                .and_then(|r| r.get_mut("tools"))
                .and_then(Value::as_array_mut)
            {
                tools.clear();
            }
            return true;
        }
        !removed.is_empty()
    }
}
