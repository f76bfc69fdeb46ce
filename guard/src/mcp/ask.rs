//! What a message asks of its peer, as policy decides it: the [`Subject`] of a client request
//! (`tools/call` a tool, `resources/read` a URI, `prompts/get` a prompt, any other method by its
//! name) or of a request a server sends a client on a stream (`sampling/createMessage`,
//! `elicitation/create`, `roots/list`, ...). Lifecycle, lists (filtered instead), notifications
//! and responses pass.

use serde_json::Value;

use super::wire::Message;
use crate::policy::{always_passes, normalize_uri, Subject};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tool,
    Resource,
    Prompt,
    Method,
}

/// An owned [`Subject`], with the method that asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    pub kind: Kind,
    /// The tool, the normalised resource URI, the prompt or the method.
    pub name: String,
    pub method: String,
}

impl Asked {
    fn new(kind: Kind, name: impl Into<String>, method: &str) -> Asked {
        Asked {
            kind,
            name: name.into(),
            method: method.to_string(),
        }
    }

    /// A request for `method` itself.
    pub fn method(method: &str) -> Asked {
        Asked::new(Kind::Method, method, method)
    }

    pub fn subject(&self) -> Subject<'_> {
        match self.kind {
            Kind::Tool => Subject::Tool(&self.name),
            Kind::Resource => Subject::Resource(&self.name),
            Kind::Prompt => Subject::Prompt(&self.name),
            Kind::Method => Subject::Method(&self.name),
        }
    }

    /// What approvals and standing approvals name: the tool, else `method name`.
    pub fn label(&self) -> String {
        match self.kind {
            Kind::Tool => self.name.clone(),
            Kind::Method => self.method.clone(),
            _ => format!("{} {}", self.method, self.name),
        }
    }
}

/// What policy must decide for one message.
#[derive(Debug, PartialEq)]
pub enum Ask {
    /// Nothing: it passes as it is.
    Pass,
    /// `subject`, its conditions reading `args`; `also` must not be denied either (the prompt
    /// or resource a `completion/complete` completes for).
    Decide {
        subject: Asked,
        args: Value,
        also: Option<Asked>,
    },
    /// A governed request guard cannot tell the subject of: refused, with this reason.
    Unreadable(String),
}

/// The decision a client's message needs.
pub fn ask(m: &Message) -> Ask {
    let Some(method) = m.method.as_deref() else {
        return Ask::Pass;
    };
    let params = &m.params;
    let decide = |subject, args| Ask::Decide {
        subject,
        args,
        also: None,
    };
    match method {
        // A name that is not a string is no tool guard can decide on, yet a lenient server
        // may coerce it into one (`tools[params.name]` in JavaScript turns ["x"] into "x").
        "tools/call" => match (m.tool(), params.get("arguments")) {
            (Some(_), Some(a)) if !a.is_object() => {
                Ask::Unreadable("tools/call whose arguments are not an object".into())
            }
            (Some(name), _) => decide(Asked::new(Kind::Tool, name, method), m.arguments()),
            (None, _) => Ask::Unreadable("tools/call without a tool name (a string)".into()),
        },
        "resources/read" | "resources/subscribe" => match resource(params.get("uri")) {
            Ok(uri) => decide(Asked::new(Kind::Resource, uri, method), params.clone()),
            Err(why) => Ask::Unreadable(format!("{method}: {why}")),
        },
        "prompts/get" => match params.get("name").and_then(Value::as_str) {
            Some(name) => decide(Asked::new(Kind::Prompt, name, method), m.arguments()),
            None => Ask::Unreadable("prompts/get without a prompt name".into()),
        },
        "completion/complete" => {
            let r = params.get("ref");
            let also = match r.and_then(|r| r.get("type")).and_then(Value::as_str) {
                Some("ref/prompt") => match r.and_then(|r| r.get("name")).and_then(Value::as_str) {
                    Some(name) => Asked::new(Kind::Prompt, name, "prompts/get"),
                    None => {
                        return Ask::Unreadable(
                            "completion/complete: ref/prompt without a name".into(),
                        )
                    }
                },
                Some("ref/resource") => match resource(r.and_then(|r| r.get("uri"))) {
                    Ok(uri) => Asked::new(Kind::Resource, uri, "resources/read"),
                    Err(why) => return Ask::Unreadable(format!("completion/complete: {why}")),
                },
                _ => {
                    return Ask::Unreadable(
                        "completion/complete without a ref/prompt or ref/resource".into(),
                    )
                }
            };
            Ask::Decide {
                subject: Asked::new(Kind::Method, method, method),
                args: params.clone(),
                also: Some(also),
            }
        }
        m if always_passes(m) => Ask::Pass,
        m => decide(Asked::new(Kind::Method, m, m), params.clone()),
    }
}

/// The decision a message from a server needs: its requests to the client (`ping` aside).
pub fn ask_server(m: &Value) -> Ask {
    let method = m.get("method").and_then(Value::as_str);
    match method {
        Some(method) if m.get("id").is_some() && method != "ping" => Ask::Decide {
            subject: Asked::new(Kind::Method, method, method),
            args: m.get("params").cloned().unwrap_or(Value::Null),
            also: None,
        },
        _ => Ask::Pass,
    }
}

fn resource(uri: Option<&Value>) -> Result<String, String> {
    match uri.and_then(Value::as_str) {
        Some(u) => normalize_uri(u),
        None => Err("no uri string".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(method: &str, params: Value) -> Message {
        Message {
            id: Some(json!(1)),
            method: Some(method.into()),
            params,
            inexact: None,
        }
    }

    fn subject(a: Ask) -> (Kind, String) {
        match a {
            Ask::Decide { subject, .. } => (subject.kind, subject.name),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_request_but_lifecycle_and_lists_is_decided() {
        let s = |m, p| subject(ask(&msg(m, p)));
        assert_eq!(
            s("tools/call", json!({"name": "x"})),
            (Kind::Tool, "x".into())
        );
        assert_eq!(
            s("resources/read", json!({"uri": "FILE:/w//etc/passwd?x"})),
            (Kind::Resource, "file:///w/etc/passwd".into())
        );
        assert_eq!(
            s("prompts/get", json!({"name": "p"})),
            (Kind::Prompt, "p".into())
        );
        assert_eq!(
            s("tasks/result", json!({})),
            (Kind::Method, "tasks/result".into())
        );
        assert_eq!(s("vendor/x", json!({})), (Kind::Method, "vendor/x".into()));
        for m in [
            "initialize",
            "ping",
            "tools/list",
            "resources/list",
            "prompts/list",
        ] {
            assert_eq!(ask(&msg(m, json!({}))), Ask::Pass, "{m}");
        }
        // A tool guard cannot name is refused, never decided as another.
        for params in [
            json!({"name": ["delete_file"]}),
            json!({"name": 5}),
            json!({}),
            json!(["delete_file"]),
            json!({"name": "x", "arguments": ["a"]}),
            json!({"name": "x", "arguments": "a"}),
        ] {
            assert!(
                matches!(ask(&msg("tools/call", params.clone())), Ask::Unreadable(_)),
                "{params}"
            );
        }
        for uri in [json!(5), json!("file:///w/../etc/passwd")] {
            assert!(matches!(
                ask(&msg("resources/read", json!({ "uri": uri }))),
                Ask::Unreadable(_)
            ));
        }
        let c = ask(&msg(
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": ""}}),
        ));
        let Ask::Decide {
            also: Some(also), ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!((also.kind, also.name.as_str()), (Kind::Prompt, "p"));
    }

    #[test]
    fn servers_requests_are_decided_their_answers_pass() {
        let a = ask_server(&json!({"jsonrpc": "2.0", "id": 3, "method": "sampling/createMessage"}));
        assert_eq!(subject(a), (Kind::Method, "sampling/createMessage".into()));
        for m in [
            json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}),
            json!({"jsonrpc": "2.0", "method": "notifications/message"}),
            json!({"jsonrpc": "2.0", "id": 3, "result": {}}),
        ] {
            assert_eq!(ask_server(&m), Ask::Pass, "{m}");
        }
    }
}
