//! The policy file as written: serde types that mirror the JSON one to one.
//!
//! Everything here is strict (`deny_unknown_fields`) so that a typo is an error with a
//! `file:line:col` and a field path instead of a silently ignored rule. The checks that need more
//! than the shape of one value (regexes, selectors, cross-references) are in `compile`.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Unexpected, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::{DefaultAction, Scope, ToolChange};

/// One policy file (one MCP server).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a policy object")]
pub(super) struct RawPolicy {
    pub version: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub server: Option<RawServer>,
    #[serde(default)]
    pub default: Option<DefaultAction>,
    #[serde(default)]
    pub hide: Vec<String>,
    #[serde(default)]
    pub hide_denied: Option<bool>,
    #[serde(default)]
    pub on_tool_change: Option<ToolChange>,
    #[serde(default)]
    pub all_tools: Option<RawAllTools>,
    #[serde(default)]
    pub tools: ToolMap,
    /// Resource URI pattern -> rule.
    #[serde(default)]
    pub resources: ToolMap,
    /// Prompt name -> rule.
    #[serde(default)]
    pub prompts: ToolMap,
    /// Method name -> rule (`completion/complete`, `tasks/*`, `sampling/createMessage`, ...).
    #[serde(default)]
    pub methods: ToolMap,
    #[serde(default)]
    pub grants: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a server object {name, match}")]
pub(super) struct RawServer {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {rate_limit, limits}")]
pub(super) struct RawAllTools {
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub limits: Option<Vec<RawLimit>>,
}

/// The actions a tool rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawAction {
    Allow,
    Deny,
    RequireApproval,
}

/// A rule; `{}` allows what it names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a rule object")]
pub(super) struct RawRule {
    #[serde(default)]
    pub action: Option<RawAction>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub approval_timeout: Option<u64>,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub limits: Option<Vec<RawLimit>>,
    #[serde(default)]
    pub when: Option<Vec<RawCond>>,
}

/// `tools` (and `resources`, `prompts`, `methods`): name -> rule, in file order, duplicates kept (and reported by `compile`).
#[derive(Debug, Default)]
pub(super) struct ToolMap(pub Vec<(String, RawRule)>);

impl<'de> Deserialize<'de> for ToolMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping names to rules")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolMap, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, RawRule>()? {
                    out.push((k, v));
                }
                Ok(ToolMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `rate_limit`: `{max, window, scope}`, or the shorthand string `"10/minute"`.
#[derive(Debug)]
pub(super) struct RawRateLimit {
    pub max: u64,
    pub window: Window,
    pub scope: Option<Scope>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rate limit object {max, window, scope}"
)]
struct RawRateLimitFields {
    max: u64,
    window: Window,
    #[serde(default)]
    scope: Option<Scope>,
}

impl<'de> Deserialize<'de> for RawRateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRateLimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a rate limit object {max, window, scope} or a string like \"10/minute\"",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawRateLimit, E> {
                let bad = || {
                    E::invalid_value(
                        Unexpected::Str(s),
                        &"a rate limit like \"10/minute\" (count/second|minute|hour|day)",
                    )
                };
                let (n, unit) = s.split_once('/').ok_or_else(bad)?;
                let max = n.trim().parse::<u64>().map_err(|_| bad())?;
                let window = Window::from_name(unit.trim()).ok_or_else(bad)?;
                Ok(RawRateLimit {
                    max,
                    window,
                    scope: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawRateLimit, A::Error> {
                let f =
                    RawRateLimitFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawRateLimit {
                    max: f.max,
                    window: f.window,
                    scope: f.scope,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// PolicyLayer's spelling: `limits: [{counter, window: "minute", max, scope}]`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a limit object {counter, window, max, scope}"
)]
pub(super) struct RawLimit {
    #[serde(default)]
    pub counter: Option<String>,
    pub window: Window,
    pub max: u64,
    #[serde(default)]
    pub scope: Option<Scope>,
}

/// A window length in seconds: a positive integer, or "second" | "minute" | "hour" | "day".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window(pub u64);

const WINDOW_NAMES: &[&str] = &["second", "minute", "hour", "day"];

impl Window {
    fn from_name(s: &str) -> Option<Window> {
        Some(Window(match s {
            "second" => 1,
            "minute" => 60,
            "hour" => 3_600,
            "day" => 86_400,
            _ => return None,
        }))
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Window;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a window in seconds (a positive integer) or one of \"second\", \"minute\", \"hour\", \"day\"",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Window, E> {
                if v == 0 {
                    return Err(E::invalid_value(
                        Unexpected::Unsigned(0),
                        &"a window of at least 1 second",
                    ));
                }
                Ok(Window(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Window, E> {
                if v > 0 {
                    return self.visit_u64(v as u64);
                }
                Err(E::invalid_value(
                    Unexpected::Signed(v),
                    &"a window of at least 1 second",
                ))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Window, E> {
                Window::from_name(s).ok_or_else(|| E::unknown_variant(s, WINDOW_NAMES))
            }
        }
        d.deserialize_any(V)
    }
}

/// Condition operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Op {
    Eq,
    Neq,
    In,
    NotIn,
    Lt,
    Lte,
    Gt,
    Gte,
    Regex,
    Contains,
    Exists,
    MaxItems,
    MaxLength,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::In => "in",
            Op::NotIn => "not_in",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Regex => "regex",
            Op::Contains => "contains",
            Op::Exists => "exists",
            Op::MaxItems => "max_items",
            Op::MaxLength => "max_length",
        }
    }
}

/// `{path, op, value}`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a condition object {path, op, value}"
)]
pub(super) struct RawCond {
    pub path: String,
    pub op: Op,
    /// `Some(Value::Null)` for an explicit `null` (so `eq null` is expressible).
    #[serde(default, deserialize_with = "present")]
    pub value: Option<Value>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// An identity-specific override.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a grant object {agents, uids, exes, cgroups, tools, resources, prompts, methods, default}"
)]
pub(super) struct RawGrant {
    /// Free text, for the reader of the file.
    #[serde(default, rename = "description")]
    pub _description: Option<String>,
    #[serde(default)]
    pub agents: Option<Vec<String>>,
    #[serde(default)]
    pub uids: Option<Vec<u32>>,
    #[serde(default)]
    pub exes: Option<Vec<String>>,
    #[serde(default)]
    pub cgroups: Option<Vec<String>>,
    #[serde(default)]
    pub tools: ToolMap,
    #[serde(default)]
    pub resources: ToolMap,
    #[serde(default)]
    pub prompts: ToolMap,
    #[serde(default)]
    pub methods: ToolMap,
    #[serde(default)]
    pub default: Option<DefaultAction>,
}
