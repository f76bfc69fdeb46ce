//! Answers from a policy-named server, on their way back to the agent: `tools/list` results lose
//! the tools this caller may not see, and every tool definition seen is checked against its pin.
//! An answer guard cannot read the way every client reads it (see the canonical rule in
//! [`wire`]) is refused, never passed on unfiltered. Transport-free: the HTTP adapter hands over
//! JSON bodies and SSE event data.

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
    /// No `tools/list` result in it: pass the bytes on as they are.
    Unchanged,
    /// The answer to pass on instead: guard's own serialisation of what it read and filtered.
    Changed(Vec<u8>),
    /// Unreadable (or readable differently by some client): it must not reach the agent. The
    /// refusal is audited; the reason says why.
    Refused(String),
}

/// Checks an answer's keys at every level guard reads (envelope, result, tools), by
/// [`wire::check_keys`]: a key a case-insensitive client would read as one of them must be it.
fn check_answer(m: &Value) -> Result<(), String> {
    let Some(obj) = m.as_object() else {
        return Ok(());
    };
    wire::check_keys(obj, wire::ENVELOPE_KEYS)?;
    if let Some(Value::Object(result)) = obj.get("result") {
        wire::check_keys(result, wire::LIST_KEYS)?;
        for tool in result
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = tool.as_object() {
                wire::check_keys(t, wire::TOOL_KEYS)?;
            }
        }
    }
    Ok(())
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
        let mut v = match self.read_answer(caller, t, bytes) {
            Ok(v) => v,
            Err(why) => return Filtered::Refused(why),
        };
        let lists = match &mut v {
            Value::Array(items) => {
                // Every message is filtered (no short-circuit).
                let mut lists = false;
                for m in items.iter_mut() {
                    lists |= self.filter_message(caller, t, server, m);
                }
                lists
            }
            m => self.filter_message(caller, t, server, m),
        };
        if lists {
            Filtered::Changed(serde_json::to_vec(&v).unwrap_or_default())
        } else {
            Filtered::Unchanged
        }
    }

    /// Filters the data of one SSE event: `Ok(Some(new data))` when it held a `tools/list`
    /// result, `Ok(None)` to pass it on as it is, `Err` when it must not be passed on.
    pub fn filter_event_data(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        data: &str,
    ) -> Result<Option<String>, String> {
        let mut v = self.read_answer(caller, t, data.as_bytes())?;
        Ok(self
            .filter_message(caller, t, server, &mut v)
            .then(|| v.to_string()))
    }

    /// An answer read by the canonical rule, or the audited reason it cannot be.
    fn read_answer(&self, caller: &Identity, t: &Target, bytes: &[u8]) -> Result<Value, String> {
        let read = wire::read_json(bytes).and_then(|v| {
            match &v {
                Value::Array(items) => items.iter().try_for_each(check_answer),
                m => check_answer(m),
            }?;
            Ok(v)
        });
        read.map_err(|e| {
            let why = format!("the server's answer cannot be read as every client reads it: {e}");
            let mut r = self.record(Event::ToolsList, Decision::Deny, caller, t);
            r.rule = Some("protocol".into());
            r.reason = Some(why.clone());
            self.write(&r);
            why
        })
    }

    /// Applies policy to one message from `server`; true when it holds a `tools/list` result
    /// (then it is pinned, filtered and audited). When that record cannot be written, the agent
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
        }
        true
    }
}
