//! `when` conditions on a call's `params.arguments`, compiled at load time.

use std::cmp::Ordering;

use regex::Regex;
use serde_json::{Number, Value};

use super::locate::Seg;
use super::raw::{Op, RawCond};
use crate::fold::fold_key;

/// One step of an argument path: an object key, which is also an array index when numeric.
#[derive(Debug, Clone)]
struct Step {
    key: String,
    index: Option<usize>,
}

/// A compiled condition.
#[derive(Debug)]
pub(super) struct Condition {
    /// The rule name reported when this condition fails, e.g. `tools.x.when[0]`.
    pub name: String,
    path_text: String,
    steps: Vec<Step>,
    op: Op,
    value: Value,
    regex: Option<Regex>,
    /// For `max_items` / `max_length`.
    limit: u64,
    /// For `exists`.
    want_present: bool,
}

/// A load error: where (relative to the condition) and what.
pub(super) type CondError = (Vec<Seg>, String);

impl Condition {
    pub fn compile(raw: RawCond, name: String) -> Result<Condition, CondError> {
        let steps = parse_path(&raw.path).map_err(|e| (vec!["path".into()], e))?;
        let op = raw.op;
        let value_err = |what: &str| (vec![Seg::from("value")], what.to_owned());
        let mut regex = None;
        let mut limit = 0;
        let mut want_present = true;
        let value = match (op, raw.value) {
            (Op::Exists, None) => Value::Bool(true),
            (Op::Exists, Some(Value::Bool(b))) => {
                want_present = b;
                Value::Bool(b)
            }
            (Op::Exists, Some(_)) => return Err(value_err("op \"exists\" takes true or false")),
            (_, None) => {
                return Err((
                    Vec::new(),
                    format!("op \"{}\" needs a \"value\"", op.as_str()),
                ))
            }
            (Op::Eq | Op::Neq | Op::Contains, Some(v)) => v,
            (Op::In | Op::NotIn, Some(v @ Value::Array(_))) => v,
            (Op::In | Op::NotIn, Some(_)) => {
                return Err(value_err(&format!(
                    "op \"{}\" takes an array of values",
                    op.as_str()
                )))
            }
            (
                Op::Lt | Op::Lte | Op::Gt | Op::Gte,
                Some(v @ (Value::Number(_) | Value::String(_))),
            ) => v,
            (Op::Lt | Op::Lte | Op::Gt | Op::Gte, Some(_)) => {
                return Err(value_err(&format!(
                    "op \"{}\" takes a number (or a string)",
                    op.as_str()
                )))
            }
            (Op::Regex, Some(Value::String(s))) => {
                let re = Regex::new(&s).map_err(|e| {
                    // The regex crate's message spans lines (pattern, caret, "error: ...");
                    // its last line says what is wrong.
                    let text = e.to_string();
                    let last = text.lines().rev().find(|l| !l.trim().is_empty());
                    let what = last.unwrap_or("").trim();
                    let what = what.strip_prefix("error: ").unwrap_or(what);
                    value_err(&format!("invalid regex: {what}"))
                })?;
                regex = Some(re);
                Value::String(s)
            }
            (Op::Regex, Some(_)) => return Err(value_err("op \"regex\" takes a string")),
            (Op::MaxItems | Op::MaxLength, Some(v)) => match v.as_u64() {
                Some(n) => {
                    limit = n;
                    v
                }
                None => {
                    return Err(value_err(&format!(
                        "op \"{}\" takes a non-negative integer",
                        op.as_str()
                    )))
                }
            },
        };
        Ok(Condition {
            name,
            path_text: raw.path,
            steps,
            op,
            value,
            regex,
            limit,
            want_present,
        })
    }

    /// What the path leads to in these arguments.
    fn lookup<'v>(&self, args: &'v Value) -> Lookup<'v> {
        let mut cur = args;
        for step in &self.steps {
            cur = match cur {
                Value::Object(m) => match m.get(&step.key) {
                    Some(v) => v,
                    // Not there as spelled, but a case-insensitive decoder (Go's) reads this
                    // key as the one the path names.
                    None if m.keys().any(|k| fold_key(k) == fold_key(&step.key)) => {
                        return Lookup::Unsure
                    }
                    None => return Lookup::Absent,
                },
                Value::Array(a) => match step.index.and_then(|i| a.get(i)) {
                    Some(v) => v,
                    None => return Lookup::Absent,
                },
                // A server may parse the string as JSON and find the path inside it.
                Value::String(_) => return Lookup::Unsure,
                _ => return Lookup::Absent,
            };
        }
        Lookup::Found(cur)
    }

    fn resolve<'v>(&self, args: &'v Value) -> Option<&'v Value> {
        match self.lookup(args) {
            Lookup::Found(v) => Some(v),
            _ => None,
        }
    }

    /// Whether the condition holds for these arguments. A missing path fails, except for
    /// `exists: false` — which fails too where a server could find the path after all.
    /// Negative operators hold only for a value of the policy's own JSON type (a server may
    /// coerce `"5"` to `5`), and not for a string that is the forbidden value as JSON text.
    pub fn holds(&self, args: &Value) -> bool {
        let actual = match self.lookup(args) {
            Lookup::Found(v) => v,
            Lookup::Absent => return self.absence_holds(),
            Lookup::Unsure => return false,
        };
        match self.op {
            Op::Exists => self.want_present,
            Op::Eq => json_eq(actual, &self.value),
            Op::Neq => {
                same_type(actual, &self.value)
                    && !json_eq(actual, &self.value)
                    && !as_json_text(actual).is_some_and(|v| json_eq(&v, &self.value))
            }
            Op::In => self.in_list(actual),
            Op::NotIn => {
                let list = self.value.as_array().map(Vec::as_slice).unwrap_or_default();
                list.iter().any(|v| same_type(actual, v))
                    && !self.in_list(actual)
                    && !as_json_text(actual).is_some_and(|v| self.in_list(&v))
            }
            Op::Lt => compare(actual, &self.value) == Some(Ordering::Less),
            Op::Lte => matches!(
                compare(actual, &self.value),
                Some(Ordering::Less | Ordering::Equal)
            ),
            Op::Gt => compare(actual, &self.value) == Some(Ordering::Greater),
            Op::Gte => matches!(
                compare(actual, &self.value),
                Some(Ordering::Greater | Ordering::Equal)
            ),
            Op::Regex => match (actual, &self.regex) {
                (Value::String(s), Some(re)) => re.is_match(s),
                _ => false,
            },
            Op::Contains => match (actual, &self.value) {
                (Value::String(s), Value::String(needle)) => s.contains(needle.as_str()),
                (Value::Array(items), v) => items.iter().any(|item| json_eq(item, v)),
                _ => false,
            },
            Op::MaxItems => match actual {
                Value::Array(items) => items.len() as u64 <= self.limit,
                _ => false,
            },
            Op::MaxLength => match actual {
                Value::String(s) => s.chars().count() as u64 <= self.limit,
                _ => false,
            },
        }
    }

    /// Whether a missing path satisfies the condition (only `exists: false` does).
    fn absence_holds(&self) -> bool {
        self.op == Op::Exists && !self.want_present
    }

    fn in_list(&self, actual: &Value) -> bool {
        match &self.value {
            Value::Array(list) => list.iter().any(|v| json_eq(actual, v)),
            _ => false,
        }
    }

    /// Why the call is refused when this condition fails (used when the rule has no `reason`).
    /// Never quotes the actual argument value: arguments can hold secrets.
    pub fn describe_failure(&self, args: &Value) -> String {
        let p = &self.path_text;
        let v = &self.value;
        if self.resolve(args).is_none() && !self.absence_holds() {
            return format!(
                "argument \"{p}\" is missing (required by condition {p} {} {v})",
                self.op.as_str()
            );
        }
        match self.op {
            Op::Exists if self.want_present => format!("argument \"{p}\" is required"),
            Op::Exists => format!("argument \"{p}\" must not be present"),
            Op::Eq => format!("argument \"{p}\" must equal {v}"),
            Op::Neq => format!("argument \"{p}\" must not equal {v}"),
            Op::In => format!("argument \"{p}\" must be one of {v}"),
            Op::NotIn => format!("argument \"{p}\" must not be one of {v}"),
            Op::Lt => format!("argument \"{p}\" must be less than {v}"),
            Op::Lte => format!("argument \"{p}\" must be at most {v}"),
            Op::Gt => format!("argument \"{p}\" must be greater than {v}"),
            Op::Gte => format!("argument \"{p}\" must be at least {v}"),
            Op::Regex => format!("argument \"{p}\" must be a string matching {v}"),
            Op::Contains => format!("argument \"{p}\" must contain {v}"),
            Op::MaxItems => format!("argument \"{p}\" must be an array of at most {v} items"),
            Op::MaxLength => {
                format!("argument \"{p}\" must be a string of at most {v} characters")
            }
        }
    }
}

/// Where a condition's path leads.
enum Lookup<'v> {
    Found(&'v Value),
    Absent,
    /// Absent to guard, yet a server may find it: a key that differs only in case, or a string
    /// on the way (which the server may parse as JSON).
    Unsure,
}

/// Same JSON type (numbers are one type, whatever their form).
fn same_type(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// A string's content read as JSON, when it is JSON: what a server that parses its string
/// arguments reads.
fn as_json_text(v: &Value) -> Option<Value> {
    let s = v.as_str()?.trim();
    serde_json::from_str(s).ok()
}

/// `a.b.0`, `$.a.b[0]`, `$` (the arguments themselves).
fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    let body = match path {
        "$" => return Ok(Vec::new()),
        p => p.strip_prefix("$.").unwrap_or(p),
    };
    if body.is_empty() {
        return Err("empty path (use \"$\" for the arguments object itself)".into());
    }
    let mut steps = Vec::new();
    for part in body.split('.') {
        // `name[0][1]`: a key followed by bracketed indexes.
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && rest.is_empty() {
            return Err(format!("empty segment in path \"{path}\""));
        }
        if !key.is_empty() {
            steps.push(step(key));
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .filter(|_| rest.starts_with('['))
                .ok_or_else(|| format!("malformed index in path \"{path}\""))?;
            let idx = &rest[1..close];
            if idx.parse::<usize>().is_err() {
                return Err(format!(
                    "index \"{idx}\" in path \"{path}\" is not a non-negative integer"
                ));
            }
            steps.push(step(idx));
            rest = &rest[close + 1..];
        }
    }
    Ok(steps)
}

fn step(key: &str) -> Step {
    Step {
        key: key.to_owned(),
        index: key.parse().ok(),
    }
}

/// Numbers compare by value (`1 == 1.0`), recursively inside arrays and objects.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn num_cmp(x: &Number, y: &Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return Some(a.cmp(&b));
    }
    x.as_f64()?.partial_cmp(&y.as_f64()?)
}

/// Numbers with numbers, strings with strings; anything else does not compare.
fn compare(actual: &Value, limit: &Value) -> Option<Ordering> {
    match (actual, limit) {
        (Value::Number(a), Value::Number(b)) => num_cmp(a, b),
        (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(path: &str, op: &str, value: Option<Value>) -> Condition {
        let mut raw = json!({"path": path, "op": op});
        if let Some(v) = value {
            raw["value"] = v;
        }
        let raw: RawCond = serde_json::from_value(raw).unwrap();
        Condition::compile(raw, "t".into()).unwrap()
    }

    fn holds(path: &str, op: &str, value: Value, args: Value) -> bool {
        cond(path, op, Some(value)).holds(&args)
    }

    #[test]
    fn negative_operators_fail_closed_on_another_type() {
        // A server that coerces "5" to 5 (pydantic's lax mode) would run what neq forbids.
        assert!(!holds("a", "neq", json!(5), json!({"a": "5"})));
        assert!(!holds("a", "neq", json!(true), json!({"a": "true"})));
        assert!(!holds("a", "neq", json!("0"), json!({"a": 0})));
        assert!(!holds("a", "not_in", json!([1, 2]), json!({"a": "1"})));
        assert!(!holds("a", "not_in", json!(["x"]), json!({"a": null})));
        // ... or that parses a string argument as JSON.
        assert!(!holds("a", "neq", json!("rm"), json!({"a": "\"rm\""})));
        assert!(!holds("a", "neq", json!([1]), json!({"a": "[1]"})));
        assert!(!holds("a", "not_in", json!([5]), json!({"a": " 5 "})));
        // The policy's own type, another value: holds.
        assert!(holds("a", "neq", json!(5), json!({"a": 6.0})));
        assert!(holds("a", "neq", json!("x"), json!({"a": "5"})));
        assert!(holds("a", "not_in", json!([1, "x"]), json!({"a": "y"})));
        assert!(holds("a", "not_in", json!([1, "x"]), json!({"a": 2})));
    }

    #[test]
    fn exists_false_fails_where_a_server_could_find_the_path() {
        let absent =
            |path: &str, args: Value| cond(path, "exists", Some(json!(false))).holds(&args);
        assert!(absent("force", json!({"path": "/"})));
        assert!(absent("opts.force", json!({"opts": {}})));
        assert!(absent("opts.force", json!({"opts": 5})));
        // Go's encoding/json reads `Force` (and `ſorce`... any fold) as `force`.
        assert!(!absent("force", json!({"Force": true})));
        assert!(!absent("force", json!({"FORCE": true})));
        // A string on the way: a server may parse it.
        assert!(!absent("opts.force", json!({"opts": "{\"force\": true}"})));
        // The other operators read a differently-cased key as missing: they fail anyway.
        assert!(!holds("mode", "neq", json!("x"), json!({"Mode": "y"})));
    }

    #[test]
    fn eq_and_neq() {
        assert!(holds("a", "eq", json!("x"), json!({"a": "x"})));
        assert!(!holds("a", "eq", json!("x"), json!({"a": "y"})));
        assert!(holds("a", "eq", json!(1), json!({"a": 1.0})));
        assert!(holds(
            "a",
            "eq",
            json!([1, {"b": 2}]),
            json!({"a": [1.0, {"b": 2}]})
        ));
        assert!(holds("a", "eq", Value::Null, json!({"a": null})));
        assert!(holds("a", "neq", json!("x"), json!({"a": "y"})));
        assert!(!holds("a", "neq", json!("x"), json!({"a": "x"})));
        // A missing path fails, for neq too.
        assert!(!holds("a", "neq", json!("x"), json!({})));
    }

    #[test]
    fn in_and_not_in() {
        assert!(holds("c", "in", json!(["usd", "eur"]), json!({"c": "usd"})));
        assert!(!holds(
            "c",
            "in",
            json!(["usd", "eur"]),
            json!({"c": "gbp"})
        ));
        assert!(holds("c", "not_in", json!(["admin"]), json!({"c": "user"})));
        assert!(!holds(
            "c",
            "not_in",
            json!(["admin"]),
            json!({"c": "admin"})
        ));
        assert!(!holds("c", "not_in", json!(["admin"]), json!({})));
    }

    #[test]
    fn ordering_ops() {
        let a = json!({"n": 5, "s": "b"});
        assert!(holds("n", "lt", json!(6), a.clone()));
        assert!(!holds("n", "lt", json!(5), a.clone()));
        assert!(holds("n", "lte", json!(5), a.clone()));
        assert!(!holds("n", "lte", json!(4.5), a.clone()));
        assert!(holds("n", "gt", json!(4), a.clone()));
        assert!(!holds("n", "gt", json!(5), a.clone()));
        assert!(holds("n", "gte", json!(5), a.clone()));
        assert!(!holds("n", "gte", json!(5.5), a.clone()));
        assert!(holds("n", "gt", json!(-1), a.clone()));
        assert!(holds("s", "gt", json!("a"), a.clone()));
        // Mismatched types do not compare, so the condition fails.
        assert!(!holds("s", "lt", json!(10), a.clone()));
        assert!(!holds("n", "lt", json!("z"), a));
        assert!(holds("n", "lt", json!(u64::MAX), json!({"n": -3})));
    }

    #[test]
    fn regex_op() {
        assert!(holds("b", "regex", json!("^feat/"), json!({"b": "feat/x"})));
        assert!(!holds("b", "regex", json!("^feat/"), json!({"b": "main"})));
        assert!(!holds("b", "regex", json!("."), json!({"b": 5})));
    }

    #[test]
    fn contains_op() {
        assert!(holds("q", "contains", json!("ell"), json!({"q": "hello"})));
        assert!(!holds("q", "contains", json!("xyz"), json!({"q": "hello"})));
        assert!(holds("l", "contains", json!(2), json!({"l": [1, 2.0, 3]})));
        assert!(!holds("l", "contains", json!("2"), json!({"l": [1, 2, 3]})));
        assert!(!holds("l", "contains", json!("a"), json!({"l": {"a": 1}})));
    }

    #[test]
    fn exists_op() {
        assert!(cond("a", "exists", None).holds(&json!({"a": null})));
        assert!(!cond("a", "exists", None).holds(&json!({})));
        assert!(holds("a", "exists", json!(true), json!({"a": 1})));
        assert!(holds("a", "exists", json!(false), json!({"b": 1})));
        assert!(!holds("a", "exists", json!(false), json!({"a": 1})));
    }

    #[test]
    fn max_items_and_max_length() {
        assert!(holds("ids", "max_items", json!(2), json!({"ids": [1, 2]})));
        assert!(!holds(
            "ids",
            "max_items",
            json!(2),
            json!({"ids": [1, 2, 3]})
        ));
        assert!(!holds("ids", "max_items", json!(2), json!({"ids": "ab"})));
        assert!(holds("s", "max_length", json!(3), json!({"s": "ééé"})));
        assert!(!holds("s", "max_length", json!(3), json!({"s": "abcd"})));
        assert!(!holds("s", "max_length", json!(3), json!({"s": [1]})));
    }

    #[test]
    fn paths() {
        let args = json!({"o": {"sizes": [10, 20], "0": "zero"}, "arr": [[1, 2]]});
        assert!(holds("o.sizes.1", "eq", json!(20), args.clone()));
        assert!(holds("$.o.sizes.0", "eq", json!(10), args.clone()));
        assert!(holds("o.sizes[1]", "eq", json!(20), args.clone()));
        assert!(holds("arr[0][1]", "eq", json!(2), args.clone()));
        assert!(holds("o.0", "eq", json!("zero"), args.clone()));
        assert!(!holds("o.sizes.2", "exists", json!(true), args.clone()));
        assert!(!holds("o.sizes.x", "exists", json!(true), args.clone()));
        assert!(holds("$", "exists", json!(true), args.clone()));
        assert!(cond("o.sizes.5", "exists", Some(json!(false))).holds(&args));
        // Non-object arguments: every path is missing.
        assert!(!holds("o", "exists", json!(true), Value::Null));
    }

    #[test]
    fn bad_conditions_are_load_errors() {
        let err = |path: &str, op: &str, value: Option<Value>| {
            let mut raw = json!({"path": path, "op": op});
            if let Some(v) = value {
                raw["value"] = v;
            }
            let raw: RawCond = serde_json::from_value(raw).unwrap();
            Condition::compile(raw, "t".into()).unwrap_err()
        };
        assert_eq!(err("a", "in", Some(json!(1))).0, vec![Seg::from("value")]);
        assert_eq!(
            err("a", "lt", Some(json!(true))).0,
            vec![Seg::from("value")]
        );
        assert_eq!(
            err("a", "max_items", Some(json!(-1))).0,
            vec![Seg::from("value")]
        );
        assert_eq!(
            err("a", "exists", Some(json!("yes"))).0,
            vec![Seg::from("value")]
        );
        assert!(err("a", "regex", Some(json!("(")))
            .1
            .starts_with("invalid regex"));
        assert_eq!(err("a", "eq", None).1, "op \"eq\" needs a \"value\"");
        assert_eq!(err("", "eq", Some(json!(1))).0, vec![Seg::from("path")]);
        assert_eq!(err("a..b", "eq", Some(json!(1))).0, vec![Seg::from("path")]);
        assert_eq!(err("a[x]", "eq", Some(json!(1))).0, vec![Seg::from("path")]);
    }

    #[test]
    fn failure_descriptions_do_not_leak_arguments() {
        let c = cond("task_ids", "max_items", Some(json!(10)));
        let args = json!({"task_ids": (0..11).map(|i| format!("secret{i}")).collect::<Vec<_>>()});
        let d = c.describe_failure(&args);
        assert_eq!(
            d,
            "argument \"task_ids\" must be an array of at most 10 items"
        );
        assert!(!d.contains("secret"));
        assert_eq!(
            c.describe_failure(&json!({})),
            "argument \"task_ids\" is missing (required by condition task_ids max_items 10)"
        );
    }
}
