//! Messages from a policy-named server, on their way back to the agent: list results
//! (`tools/list`, `resources/list`, `resources/templates/list`, `prompts/list`) lose what this
//! caller may not see, every tool definition seen is checked against its pin, and the server's
//! own requests to the client (`sampling/createMessage`, `elicitation/create`, `roots/list`,
//! ...) are decided by policy like the client's: a refused one never reaches the client.
//! An answer guard cannot read the way every client reads it (see the canonical rule in
//! [`wire`]) is refused, never passed on unfiltered. Transport-free: the HTTP adapter hands over
//! JSON bodies and SSE event data.

use serde_json::{json, Value};

use super::{
    ask::{self, Ask},
    enforce::{Engine, Question, Target},
    wire,
};
use crate::{
    audit::{Decision, Event},
    identity::Identity,
    policy::{normalize_uri, Subject, ToolChange},
};

/// One SSE event's data after filtering.
#[derive(Debug, Clone, PartialEq)]
pub enum EventData {
    /// Pass the event on as it is.
    Pass,
    /// Pass this data instead (a filtered list).
    Replace(String),
    /// Do not pass it on: a server's request that policy refused (audited).
    Drop,
}

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
        for (field, _, _) in wire::OTHER_LISTS {
            for item in result
                .get(*field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(i) = item.as_object() {
                    wire::check_keys(i, wire::ITEM_KEYS)?;
                }
            }
        }
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
    pub async fn filter_json(
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
                let mut kept = Vec::with_capacity(items.len());
                for mut m in std::mem::take(items) {
                    if !self.screen(caller, t, server, &m).await {
                        lists = true;
                        continue;
                    }
                    lists |= self.filter_message(caller, t, server, &mut m);
                    kept.push(m);
                }
                *items = kept;
                lists
            }
            m if !self.screen(caller, t, server, m).await => {
                let method = m.get("method").and_then(Value::as_str).unwrap_or("");
                let why =
                    format!("the server's {method} request to the client is refused by policy");
                return Filtered::Refused(why);
            }
            m => self.filter_message(caller, t, server, m),
        };
        if lists {
            Filtered::Changed(serde_json::to_vec(&v).unwrap_or_default())
        } else {
            Filtered::Unchanged
        }
    }

    /// Filters the data of one SSE event; `Err` when it cannot be read and must not be passed
    /// on (nor anything after it).
    pub async fn filter_event_data(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        data: &str,
    ) -> Result<EventData, String> {
        let mut v = self.read_answer(caller, t, data.as_bytes())?;
        if let Value::Array(items) = &v {
            // A batch of server requests on a stream: whole or not at all.
            for m in items {
                if !self.screen(caller, t, server, m).await {
                    return Ok(EventData::Drop);
                }
            }
        } else if !self.screen(caller, t, server, &v).await {
            return Ok(EventData::Drop);
        }
        let lists = match &mut v {
            // Every message of a batch is filtered (no short-circuit).
            Value::Array(items) => items.iter_mut().fold(false, |any, m| {
                self.filter_message(caller, t, server, m) | any
            }),
            m => self.filter_message(caller, t, server, m),
        };
        Ok(match lists {
            true => EventData::Replace(v.to_string()),
            false => EventData::Pass,
        })
    }

    /// Decides a request `server` sends its client (anything but `ping`; answers and
    /// notifications pass): true when it may reach the client. Decided on the `methods` rule
    /// of its method (else `default`), grants, limits and approval as for the client's requests,
    /// and audited either way; false also when its record cannot be written.
    async fn screen(&self, caller: &Identity, t: &Target, server: &str, m: &Value) -> bool {
        let Ask::Decide { subject, args, .. } = ask::ask_server(m) else {
            return true;
        };
        let policies = self.policies();
        let Some(sp) = policies.by_name(server) else {
            return true;
        };
        let mut r = self.record(Event::McpRequest, Decision::Allow, caller, t);
        r.method = Some(subject.method.clone());
        r.tool = Some(subject.name.clone());
        r.jsonrpc_id = m.get("id").cloned();
        r.args_sha256 = Some(wire::sha256_hex(&args));
        r.detail = Some(json!({ "direction": "server_to_client" }));
        let q = Question {
            sp,
            asked: &subject,
            args: &args,
            also: None,
            may_hold: true,
        };
        let refusal = self.settle(caller, t, q, &mut r).await;
        self.write(&r) && refusal.is_none()
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

    /// Applies policy to one message from `server`; true when it holds a list result (then it
    /// is filtered and audited, tools also pinned). When that record cannot be written, the
    /// agent sees an empty list rather than an unaudited one.
    pub fn filter_message(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        m: &mut Value,
    ) -> bool {
        let Some(tools) = wire::tools_of(m) else {
            return self.filter_other_lists(caller, t, server, m);
        };
        let policies = self.policies();
        let Some(sp) = policies.by_name(server) else {
            return false;
        };
        let accept = sp.on_tool_change == ToolChange::Allow;
        // An answer from elsewhere (an agent's own listener) is filtered by the pins, never
        // taken for the server's definitions.
        let pins = t.pins_of(server);
        let observed = match t.at_destination {
            true => self.pins.observe(&pins, tools, accept),
            false => Ok(Vec::new()),
        };
        match observed {
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
        let policy_caller = caller.caller(sp.grant_exes());
        let block_changed = sp.on_tool_change == ToolChange::Block;
        let removed = wire::filter_tools(m, |name| {
            sp.visible(name, &policy_caller) && !(block_changed && self.pins.blocked(&pins, name))
        });
        let mut r = self.record(Event::ToolsList, Decision::Filter, caller, t);
        r.method = Some("tools/list".into());
        r.jsonrpc_id = m.get("id").cloned();
        r.detail = Some(json!({ "hidden": removed, "pinned": t.at_destination }));
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

    /// [`Engine::filter_message`] for resources, resource templates and prompts: each item
    /// stays when the caller may use it (a resource or template by its URI as normalised, one
    /// guard cannot normalise is removed).
    fn filter_other_lists(
        &self,
        caller: &Identity,
        t: &Target,
        server: &str,
        m: &mut Value,
    ) -> bool {
        let policies = self.policies();
        let Some(sp) = policies.by_name(server) else {
            return false;
        };
        let policy_caller = caller.caller(sp.grant_exes());
        let mut any = false;
        for (field, key, method) in wire::OTHER_LISTS {
            let prompts = *field == "prompts";
            let Some(removed) = wire::filter_list(m, field, key, |name| {
                if prompts {
                    return sp.visible_on(Subject::Prompt(name), &policy_caller);
                }
                normalize_uri(name)
                    .is_ok_and(|uri| sp.visible_on(Subject::Resource(&uri), &policy_caller))
            }) else {
                continue;
            };
            any = true;
            let mut r = self.record(Event::ToolsList, Decision::Filter, caller, t);
            r.method = Some(method.to_string());
            r.jsonrpc_id = m.get("id").cloned();
            r.detail = Some(json!({ "hidden": removed }));
            if !self.write(&r) {
                if let Some(items) = m
                    .get_mut("result")
                    .and_then(|r| r.get_mut(*field))
                    .and_then(Value::as_array_mut)
                {
                    items.clear();
                }
            }
        }
        any
    }
}
