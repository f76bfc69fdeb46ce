//! Tests of the policy engine through its public API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

const FLUX: &str = r#"{
  "version": "1",
  "server": { "name": "flux", "match": ["https://api.acedata.cloud/flux/mcp", "127.0.0.1:8000"] },
  "default": "deny",
  "hide": ["flux_edit_image"],
  "all_tools": { "rate_limit": { "max": 100, "window": 60 } },
  "tools": {
    "flux_get_task": {},
    "flux_generate_image": { "rate_limit": { "max": 10, "window": 60, "scope": "agent" } },
    "flux_edit_image": { "action": "deny", "reason": "image editing is not approved" },
    "flux_generate_video": { "action": "require_approval", "approval_timeout": 120 },
    "flux_get_tasks_batch": { "when": [ { "path": "task_ids", "op": "max_items", "value": 10 } ],
                              "reason": "at most 10 tasks per call" }
  },
  "grants": [ { "agents": ["research-bot"], "uids": [1001], "tools": { "flux_generate_video": {} } } ]
}"#;

fn load(files: &[(&str, &str)]) -> Result<PolicySet, Vec<PolicyError>> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    PolicySet::from_files(&files)
}

fn one(text: &str) -> PolicySet {
    match load(&[("t.json", text)]) {
        Ok(s) => s,
        Err(e) => panic!("{e:?}"),
    }
}

/// The errors of a single file `name`, as displayed.
fn errors(name: &str, text: &str) -> Vec<String> {
    match load(&[(name, text)]) {
        Ok(_) => panic!("{name} loaded, but should not"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn agent(name: &str, uid: u32) -> Caller {
    Caller {
        agent: Some(name.into()),
        uid,
        ..Caller::default()
    }
}

fn allow(rule: &str) -> Decision {
    Decision::Allow { rule: rule.into() }
}

fn deny(rule: &str, reason: &str) -> Decision {
    Decision::Deny {
        rule: rule.into(),
        reason: reason.into(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fresh temporary directory (removed by the caller).
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "guard-policy-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Clock(Instant);
impl Clock {
    fn at(&self, secs: f64) -> Instant {
        self.0 + Duration::from_secs_f64(secs)
    }
}

#[test]
fn types_are_shareable() {
    fn check<T: Send + Sync>() {}
    check::<PolicySet>();
    check::<ServerPolicy>();
    check::<RateLimiter>();
}

#[test]
fn policylayer_seed_loads_and_decides() {
    let set = match load(&[(
        "seed.json",
        r#"{"version":"1","default":"deny","tools":{"some_tool":{}}}"#,
    )]) {
        Ok(s) => s,
        Err(e) => panic!("{e:?}"),
    };
    let p = set.by_name("seed").expect("named after the file");
    assert_eq!(p.file, "seed.json");
    assert_eq!(p.on_tool_change, ToolChange::Block);
    let lim = RateLimiter::new();
    let now = Instant::now();
    let c = agent("bot", 1000);
    assert_eq!(
        p.decide("some_tool", &json!({}), &c, &lim, now),
        allow("tools.some_tool")
    );
    let d = p.decide("other_tool", &json!({}), &c, &lim, now);
    assert_eq!(d.rule(), "default");
    assert!(p.visible("some_tool", &c));
    assert!(!p.visible("other_tool", &c));
    // No `server`: found by name only, never by address.
    assert!(set
        .match_request(Some("localhost"), sa("127.0.0.1:80"), "/")
        .is_none());
    assert!(set.match_sni(Some("seed"), sa("127.0.0.1:443")).is_none());
}

#[test]
fn flux_example_decisions() {
    let set = one(FLUX);
    let p = set.by_name("flux").unwrap();
    let lim = RateLimiter::new();
    let now = Instant::now();
    let bot = agent("bot", 1000);
    let no_args = json!({});

    assert_eq!(
        p.decide("flux_get_task", &no_args, &bot, &lim, now),
        allow("tools.flux_get_task")
    );
    assert_eq!(
        p.decide("flux_edit_image", &no_args, &bot, &lim, now),
        deny("hide", "tool \"flux_edit_image\" is hidden by policy")
    );
    assert_eq!(
        p.decide("flux_generate_video", &no_args, &bot, &lim, now),
        Decision::RequireApproval {
            rule: "tools.flux_generate_video".into(),
            timeout_s: 120
        }
    );
    let ids = |n: usize| json!({ "task_ids": (0..n).collect::<Vec<_>>() });
    assert_eq!(
        p.decide("flux_get_tasks_batch", &ids(11), &bot, &lim, now),
        deny(
            "tools.flux_get_tasks_batch.when[0]",
            "at most 10 tasks per call"
        )
    );
    assert_eq!(
        p.decide("flux_get_tasks_batch", &ids(10), &bot, &lim, now),
        allow("tools.flux_get_tasks_batch")
    );
    assert_eq!(
        p.decide("flux_unknown", &no_args, &bot, &lim, now),
        deny(
            "default",
            "tool \"flux_unknown\" is not allowed by the policy of server \"flux\""
        )
    );

    // The grant needs both the agent name and the uid.
    assert_eq!(
        p.decide(
            "flux_generate_video",
            &no_args,
            &agent("research-bot", 1001),
            &lim,
            now
        ),
        allow("grants[0].tools.flux_generate_video")
    );
    assert_eq!(
        p.decide(
            "flux_generate_video",
            &no_args,
            &agent("research-bot", 1002),
            &lim,
            now
        )
        .kind(),
        "require_approval"
    );
    assert_eq!(
        p.decide(
            "flux_generate_video",
            &no_args,
            &agent("other", 1001),
            &lim,
            now
        )
        .kind(),
        "require_approval"
    );

    assert!(p.visible("flux_get_task", &bot));
    assert!(p.visible("flux_generate_video", &bot));
    assert!(p.visible("flux_get_tasks_batch", &bot));
    assert!(!p.visible("flux_edit_image", &bot));
    assert!(!p.visible("flux_unknown", &bot));
}

#[test]
fn hide_wins_over_rules_and_grants_cannot_unhide() {
    let set = one(r#"{"version":"1","default":"allow","hide":["secret"],
            "tools":{"secret":{}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let d = p.decide("secret", &json!({}), &agent("a", 1), &lim, Instant::now());
    assert_eq!(d.rule(), "hide");
    assert!(!p.visible("secret", &agent("a", 1)));
    assert!(p.visible("anything", &agent("a", 1)));

    let e = errors(
        "h.json",
        r#"{"version":"1","hide":["secret"],
  "grants":[{"agents":["a"],"tools":{"secret":{}}}]}"#,
    );
    assert_eq!(
        e,
        [
            "h.json:2:38: grants[0].tools.secret: tool \"secret\" is hidden by \"hide\"; grants cannot unhide it"
        ]
    );

    let set = one(r#"{"version":"1","default":"allow","hide":["*"]}"#);
    let p = &set.servers()[0];
    assert!(!p.visible("x", &agent("a", 1)));
    assert_eq!(
        p.decide("x", &json!({}), &agent("a", 1), &lim, Instant::now())
            .rule(),
        "hide"
    );
}

#[test]
fn hide_denied_can_be_turned_off() {
    let text = r#"{"version":"1","hide":["h"],"hide_denied":false,
        "tools":{"d":{"action":"deny"},"ok":{}}}"#;
    let set = one(text);
    let p = &set.servers()[0];
    let c = agent("a", 1);
    assert!(p.visible("d", &c));
    assert!(p.visible("unlisted", &c));
    assert!(!p.visible("h", &c), "hide always hides");
    let lim = RateLimiter::new();
    assert_eq!(
        p.decide("d", &json!({}), &c, &lim, Instant::now()),
        deny("tools.d", "tool \"d\" is denied by policy")
    );
}

#[test]
fn conditions_come_before_rate_limits_and_do_not_consume() {
    let set = one(r#"{"version":"1","tools":{"t":{
            "when":[{"path":"n","op":"lte","value":5}],
            "rate_limit":{"max":1,"window":60}}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("a", 1);
    let now = Instant::now();
    for _ in 0..3 {
        assert_eq!(
            p.decide("t", &json!({"n": 6}), &c, &lim, now),
            deny("tools.t.when[0]", "argument \"n\" must be at most 5")
        );
    }
    assert_eq!(
        p.decide("t", &json!({"n": 1}), &c, &lim, now),
        allow("tools.t")
    );
    // Now the budget is spent, but a bad call is still refused by its condition first.
    assert_eq!(
        p.decide("t", &json!({"n": 9}), &c, &lim, now).rule(),
        "tools.t.when[0]"
    );
    assert_eq!(
        p.decide("t", &json!({"n": 1}), &c, &lim, now).rule(),
        "tools.t.rate_limit"
    );
}

#[test]
fn rate_limit_comes_before_approval_and_approval_consumes() {
    let set = one(
        r#"{"version":"1","tools":{"t":{"action":"require_approval","approval_timeout":30,
            "rate_limit":{"max":1,"window":60}}}}"#,
    );
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("a", 1);
    let now = Instant::now();
    assert_eq!(
        p.decide("t", &json!({}), &c, &lim, now),
        Decision::RequireApproval {
            rule: "tools.t".into(),
            timeout_s: 30
        }
    );
    let d = p.decide("t", &json!({}), &c, &lim, now);
    assert_eq!(d.kind(), "rate_limited");
}

#[test]
fn refused_calls_do_not_consume_budget() {
    let set = one(r#"{"version":"1","default":"deny",
            "all_tools":{"rate_limit":{"max":3,"window":10}},
            "tools":{"a":{"rate_limit":{"max":1,"window":10}},"b":{},"d":{"action":"deny"}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("x", 1);
    let now = Instant::now();
    let call = |t: &str| p.decide(t, &json!({}), &c, &lim, now);
    for _ in 0..5 {
        assert_eq!(call("d").kind(), "deny");
        assert_eq!(call("unlisted").kind(), "deny");
    }
    assert_eq!(call("a"), allow("tools.a"));
    // Refused by a's own limit: all_tools is not charged either.
    assert_eq!(call("a").rule(), "tools.a.rate_limit");
    assert_eq!(call("a").rule(), "tools.a.rate_limit");
    assert_eq!(call("b"), allow("tools.b"));
    assert_eq!(call("b"), allow("tools.b"));
    let d = call("b");
    assert_eq!(d.rule(), "all_tools.rate_limit");
    assert_eq!(
        d.reason(),
        Some("rate limit of 3 calls per 10s per agent reached; retry in 10s")
    );
}

#[test]
fn default_allow_still_counts_against_all_tools() {
    let set =
        one(r#"{"version":"1","default":"allow","all_tools":{"rate_limit":{"max":1,"window":5}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("x", 1);
    let now = Instant::now();
    assert_eq!(p.decide("any", &json!({}), &c, &lim, now), allow("default"));
    assert_eq!(
        p.decide("other", &json!({}), &c, &lim, now).rule(),
        "all_tools.rate_limit"
    );
}

#[test]
fn sliding_window() {
    let set = one(r#"{"version":"1","tools":{"t":{"rate_limit":{"max":2,"window":60}}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("a", 1);
    let clock = Clock(Instant::now());
    let call = |t: f64| p.decide("t", &Value::Null, &c, &lim, clock.at(t));
    let limited = |retry: u64| Decision::RateLimited {
        rule: "tools.t.rate_limit".into(),
        reason: format!("rate limit of 2 calls per 60s per agent reached; retry in {retry}s"),
        retry_after_s: retry,
    };
    assert_eq!(call(0.0), allow("tools.t"));
    assert_eq!(call(10.0), allow("tools.t"));
    assert_eq!(call(20.0), limited(40));
    assert_eq!(call(59.5), limited(1));
    // Explaining neither consumes nor changes anything.
    for _ in 0..5 {
        assert_eq!(
            p.explain("t", &Value::Null, &c, &lim, clock.at(59.9)),
            limited(1)
        );
    }
    // The call at 0 has left the window (not a calendar reset: the one at 10 still counts).
    assert_eq!(call(60.0), allow("tools.t"));
    assert_eq!(call(61.0), limited(9));
    assert_eq!(call(69.2), limited(1));
    assert_eq!(call(70.0), allow("tools.t"));
    assert_eq!(call(70.0), limited(50));
    // Long after: everything left, and a sweep drops the counters.
    lim.sweep(clock.at(1000.0));
    assert!(lim.is_empty());
    assert_eq!(call(1000.0), allow("tools.t"));
}

#[test]
fn explain_does_not_consume() {
    let set = one(r#"{"version":"1","tools":{"t":{"rate_limit":{"max":1,"window":60}}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("a", 1);
    let now = Instant::now();
    for _ in 0..10 {
        assert_eq!(p.explain("t", &json!({}), &c, &lim, now), allow("tools.t"));
    }
    assert_eq!(p.decide("t", &json!({}), &c, &lim, now), allow("tools.t"));
    assert_eq!(
        p.explain("t", &json!({}), &c, &lim, now).kind(),
        "rate_limited"
    );
}

#[test]
fn each_scope_keeps_its_own_counters() {
    let set = one(r#"{"version":"1","tools":{
            "s":{"rate_limit":{"max":1,"window":60,"scope":"session"}},
            "a":{"rate_limit":{"max":1,"window":60,"scope":"agent"}},
            "d":{"rate_limit":{"max":1,"window":60}},
            "u":{"rate_limit":{"max":1,"window":60,"scope":"uid"}},
            "g":{"rate_limit":{"max":1,"window":60,"scope":"global"}}}}"#);
    let p = &set.servers()[0];
    let now = Instant::now();
    let who = |agent: Option<&str>, uid: u32, instance: Option<u64>| Caller {
        agent: agent.map(Into::into),
        uid,
        instance,
        ..Caller::default()
    };
    let ok = |lim: &RateLimiter, tool: &str, c: &Caller| {
        p.decide(tool, &json!({}), c, lim, now).kind() == "allow"
    };

    // session: per agent instance of the same caller (another agent with the same instance
    // number has its own count); without one, per agent.
    let lim = RateLimiter::new();
    assert!(ok(&lim, "s", &who(Some("x"), 1, Some(7))));
    assert!(!ok(&lim, "s", &who(Some("x"), 1, Some(7))));
    assert!(ok(&lim, "s", &who(Some("y"), 2, Some(7))));
    assert!(ok(&lim, "s", &who(Some("x"), 1, Some(8))));
    assert!(ok(&lim, "s", &who(Some("x"), 1, None)));
    assert!(!ok(&lim, "s", &who(Some("x"), 1, None)));

    // agent (also the default): per agent name, whatever the uid or session; no name: per uid.
    for tool in ["a", "d"] {
        let lim = RateLimiter::new();
        assert!(ok(&lim, tool, &who(Some("x"), 1, Some(1))));
        assert!(!ok(&lim, tool, &who(Some("x"), 2, Some(2))));
        assert!(ok(&lim, tool, &who(Some("y"), 1, None)));
        assert!(ok(&lim, tool, &who(None, 1, None)));
        assert!(!ok(&lim, tool, &who(None, 1, None)));
        assert!(ok(&lim, tool, &who(None, 2, None)));
    }

    // uid: per uid, whatever the agent.
    let lim = RateLimiter::new();
    assert!(ok(&lim, "u", &who(Some("x"), 1, None)));
    assert!(!ok(&lim, "u", &who(Some("y"), 1, None)));
    assert!(ok(&lim, "u", &who(Some("x"), 2, None)));

    // global: everyone together.
    let lim = RateLimiter::new();
    assert!(ok(&lim, "g", &who(Some("x"), 1, None)));
    assert!(!ok(&lim, "g", &who(Some("y"), 2, Some(3))));

    // Tools keep separate counters, and so do servers sharing one limiter.
    let lim = RateLimiter::new();
    assert!(ok(&lim, "a", &who(Some("x"), 1, None)));
    assert!(ok(&lim, "d", &who(Some("x"), 1, None)));
    let other = match load(&[(
        "other.json",
        r#"{"version":"1","tools":{"a":{"rate_limit":{"max":1,"window":60}}}}"#,
    )]) {
        Ok(s) => s,
        Err(e) => panic!("{e:?}"),
    };
    let c = who(Some("x"), 1, None);
    assert_eq!(
        other.servers()[0].decide("a", &json!({}), &c, &lim, now),
        allow("tools.a")
    );
}

#[test]
fn limits_spelling() {
    let set = one(r#"{"version":"1",
            "all_tools":{"limits":[{"counter":"all","window":"hour","max":3,"scope":"global"}]},
            "tools":{
              "x":{"limits":[{"counter":"calls","window":"minute","max":1},
                             {"window":"day","max":2,"scope":"uid"}]},
              "y":{"rate_limit":"1/second"},
              "z":{"rate_limit":{"max":1,"window":"minute"}}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("a", 1);
    let clock = Clock(Instant::now());
    let call = |tool: &str, t: f64| p.decide(tool, &json!({}), &c, &lim, clock.at(t));
    assert_eq!(call("x", 0.0), allow("tools.x"));
    let d = call("x", 1.0);
    assert_eq!(d.rule(), "tools.x.limits[0]");
    assert_eq!(
        d.reason(),
        Some("rate limit (calls) of 1 calls per 60s per agent reached; retry in 59s")
    );
    assert_eq!(call("x", 60.0), allow("tools.x"));
    // The day limit (2 per uid) is now spent: it frees up last, so it is the one reported.
    let d = call("x", 120.0);
    assert_eq!(d.rule(), "tools.x.limits[1]");
    assert!(matches!(
        d,
        Decision::RateLimited {
            retry_after_s: 86_280,
            ..
        }
    ));
    // The hourly all_tools limit (3 in total): x used 2, y gets the third.
    assert_eq!(call("y", 120.0), allow("tools.y"));
    assert_eq!(call("z", 120.0).rule(), "all_tools.limits[0]");
    assert_eq!(call("z", 3600.0), allow("tools.z"));
}

#[test]
fn grants_most_specific_wins_and_only_for_the_named() {
    let set = one(r#"{"version":"1","default":"deny",
            "tools":{"t":{"action":"deny","reason":"base"}},
            "grants":[
              {"agents":["bot"],"tools":{"t":{"action":"require_approval"}}},
              {"agents":["bot"],"uids":[1000],"tools":{"t":{}}},
              {"uids":[1000],"tools":{"t":{"action":"deny","reason":"g2"}}},
              {"uids":[1000, 2000],"tools":{"t":{"action":"deny","reason":"g3"}}},
              {"agents":["ops"],"default":"allow"},
              {"exes":["/usr/bin/python3"],"tools":{"py":{}}},
              {"cgroups":["/guard.slice/agent-bot-1"],"tools":{"cg":{}}}
            ]}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let now = Instant::now();
    let d = |tool: &str, c: &Caller| p.decide(tool, &json!({}), c, &lim, now);

    assert_eq!(d("t", &agent("bot", 1000)), allow("grants[1].tools.t"));
    assert_eq!(
        d("t", &agent("bot", 1001)),
        Decision::RequireApproval {
            rule: "grants[0].tools.t".into(),
            timeout_s: 120
        }
    );
    // Equal specificity: the first in file order.
    assert_eq!(
        d("t", &agent("other", 1000)),
        deny("grants[2].tools.t", "g2")
    );
    assert_eq!(
        d(
            "t",
            &Caller {
                uid: 1000,
                ..Caller::default()
            }
        ),
        deny("grants[2].tools.t", "g2")
    );
    assert_eq!(
        d("t", &agent("other", 2000)),
        deny("grants[3].tools.t", "g3")
    );
    assert_eq!(d("t", &agent("other", 1001)), deny("tools.t", "base"));

    // A grant default replaces the base default, not the base rules.
    assert_eq!(d("unlisted", &agent("ops", 5)), allow("grants[4].default"));
    assert_eq!(d("t", &agent("ops", 5)), deny("tools.t", "base"));
    assert_eq!(d("unlisted", &agent("bot", 5)).rule(), "default");
    assert!(p.visible("unlisted", &agent("ops", 5)));
    assert!(!p.visible("unlisted", &agent("bot", 5)));
    assert!(p.visible("t", &agent("bot", 1000)));
    assert!(!p.visible("t", &agent("other", 1000)));

    // exes: exact paths.
    let py = Caller {
        exes: vec!["/usr/bin/python3".into()],
        ..Caller::default()
    };
    assert_eq!(d("py", &py), allow("grants[5].tools.py"));
    let py3 = Caller {
        exes: vec!["/usr/bin/python3.12".into()],
        ..Caller::default()
    };
    assert_eq!(d("py", &py3).rule(), "default");

    // cgroups: the cgroup and its descendants, whole path components only.
    let in_cg = |cg: &str| Caller {
        cgroup: Some(cg.into()),
        ..Caller::default()
    };
    assert_eq!(
        d("cg", &in_cg("/guard.slice/agent-bot-1")),
        allow("grants[6].tools.cg")
    );
    assert_eq!(
        d("cg", &in_cg("/guard.slice/agent-bot-1/worker")),
        allow("grants[6].tools.cg")
    );
    assert_eq!(
        d("cg", &in_cg("/guard.slice/agent-bot-10")).rule(),
        "default"
    );
    assert_eq!(d("cg", &in_cg("/guard.slice")).rule(), "default");
    assert_eq!(d("cg", &Caller::default()).rule(), "default");
}

#[test]
fn grant_rules_have_their_own_conditions_and_limits() {
    let set = one(r#"{"version":"1",
            "tools":{"t":{"when":[{"path":"n","op":"lt","value":10}]}},
            "grants":[{"agents":["big"],"tools":{"t":{
                "when":[{"path":"n","op":"lt","value":100}],
                "rate_limit":{"max":1,"window":60}}}}]}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let now = Instant::now();
    let args = json!({"n": 50});
    assert_eq!(
        p.decide("t", &args, &agent("small", 1), &lim, now).rule(),
        "tools.t.when[0]"
    );
    assert_eq!(
        p.decide("t", &args, &agent("big", 1), &lim, now),
        allow("grants[0].tools.t")
    );
    assert_eq!(
        p.decide("t", &args, &agent("big", 1), &lim, now).rule(),
        "grants[0].tools.t.rate_limit"
    );
}

#[test]
fn condition_default_reasons() {
    let set = one(r#"{"version":"1","tools":{"t":{"when":[
            {"path":"$.mode","op":"in","value":["fast","slow"]},
            {"path":"opts.sizes.0","op":"gte","value":1}]}}}"#);
    let p = &set.servers()[0];
    let lim = RateLimiter::new();
    let now = Instant::now();
    let c = agent("a", 1);
    assert_eq!(
        p.decide("t", &json!({"mode": "turbo"}), &c, &lim, now),
        deny(
            "tools.t.when[0]",
            "argument \"$.mode\" must be one of [\"fast\",\"slow\"]"
        )
    );
    assert_eq!(
        p.decide("t", &json!({"mode": "fast"}), &c, &lim, now),
        deny(
            "tools.t.when[1]",
            "argument \"opts.sizes.0\" is missing (required by condition opts.sizes.0 gte 1)"
        )
    );
    assert_eq!(
        p.decide(
            "t",
            &json!({"mode": "fast", "opts": {"sizes": [2]}}),
            &c,
            &lim,
            now
        ),
        allow("tools.t")
    );
}

#[test]
fn server_matching() {
    let set = match load(&[
        ("flux.json", FLUX),
        (
            "cloud.json",
            r#"{"version":"1","server":{"name":"cloud",
                "match":["https://api.acedata.cloud/","localhost:8000","[::1]:9000"]}}"#,
        ),
    ]) {
        Ok(s) => s,
        Err(e) => panic!("{e:?}"),
    };
    let name = |p: Option<&ServerPolicy>| p.map(|p| p.name.clone());
    let remote = sa("203.0.113.7:443");
    let flux = Some("flux".to_string());
    let cloud = Some("cloud".to_string());
    // The longer path prefix wins.
    assert_eq!(
        name(set.match_request(Some("api.acedata.cloud"), remote, "/flux/mcp")),
        flux
    );
    assert_eq!(
        name(set.match_request(Some("API.acedata.cloud:443"), remote, "/flux/mcp/")),
        flux
    );
    assert_eq!(
        name(set.match_request(Some("api.acedata.cloud"), remote, "/other/mcp")),
        cloud
    );
    assert_eq!(
        name(set.match_request(Some("api.acedata.cloud"), sa("203.0.113.7:80"), "/flux/mcp")),
        None
    );
    // The destination address beats the Host header, which the agent chooses.
    assert_eq!(
        name(set.match_request(Some("localhost:8000"), sa("127.0.0.1:8000"), "/mcp")),
        flux
    );
    assert_eq!(
        name(set.match_request(Some("localhost:8000"), sa("10.1.1.1:8000"), "/mcp")),
        cloud
    );
    assert_eq!(
        name(set.match_request(None, sa("[::ffff:127.0.0.1]:8000"), "/")),
        flux
    );
    assert_eq!(name(set.match_request(None, sa("[::1]:9000"), "/")), cloud);
    assert_eq!(name(set.match_request(None, sa("127.0.0.1:9"), "/")), None);

    // TLS: by SNI name and port, or by destination address.
    assert_eq!(name(set.match_sni(Some("api.acedata.cloud"), remote)), flux);
    assert_eq!(
        name(set.match_sni(Some("api.acedata.cloud."), sa("203.0.113.7:8443"))),
        None
    );
    assert_eq!(name(set.match_sni(None, sa("127.0.0.1:8000"))), flux);
    assert_eq!(name(set.match_sni(Some("example.com"), remote)), None);

    assert_eq!(set.servers().len(), 2);
    assert_eq!(set.servers()[0].name, "flux");
    assert_eq!(
        set.by_name("flux")
            .unwrap()
            .match_entries()
            .collect::<Vec<_>>(),
        ["https://api.acedata.cloud/flux/mcp", "127.0.0.1:8000"]
    );
}

// ---- errors: file:line:col and field path ----

#[test]
fn error_unknown_field() {
    let text =
        "{\n  \"version\": \"1\",\n  \"tools\": {\n    \"a\": { \"actoin\": \"deny\" }\n  }\n}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:4:12: tools.a.actoin: unknown field \"actoin\", expected one of \"action\", \"reason\", \"approval_timeout\", \"rate_limit\", \"limits\", \"when\""]
    );
    let text = "{\"version\": \"1\", \"servr\": {}}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:18: servr: unknown field \"servr\", expected one of \"version\", \"description\", \"server\", \"default\", \"hide\", \"hide_denied\", \"on_tool_change\", \"all_tools\", \"tools\", \"resources\", \"prompts\", \"methods\", \"grants\""]
    );
}

#[test]
fn error_bad_enum_value() {
    // The spec's example file, with "block" for "deny".
    let text = FLUX.replace(
        r#""flux_edit_image": { "action": "deny""#,
        r#""flux_edit_image": { "action": "block""#,
    );
    assert_eq!(
        errors("flux.json", &text),
        ["flux.json:10:36: tools.flux_edit_image.action: unknown variant \"block\", expected one of \"allow\", \"deny\", \"require_approval\""]
    );
    let text = "{\"version\": \"1\",\n \"default\": \"maybe\"}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:2:13: default: unknown variant \"maybe\", expected \"allow\" or \"deny\""]
    );
    let text = "{\"version\": \"1\", \"tools\": {\"a\": {\"rate_limit\": {\"max\": 1, \"window\": 60, \"scope\": \"team\"}}}}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:82: tools.a.rate_limit.scope: unknown variant \"team\", expected one of \"session\", \"agent\", \"uid\", \"global\""]
    );
    let text = "{\"version\": \"1\", \"tools\": {\"a\": {\"when\": [{\"path\": \"x\", \"op\": \"like\", \"value\": 1}]}}}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:63: tools.a.when[0].op: unknown variant \"like\", expected one of \"eq\", \"neq\", \"in\", \"not_in\", \"lt\", \"lte\", \"gt\", \"gte\", \"regex\", \"contains\", \"exists\", \"max_items\", \"max_length\""]
    );
}

#[test]
fn error_wrong_type() {
    let text = "{\n  \"version\": \"1\",\n  \"tools\": {\n    \"a\": { \"rate_limit\": {\"max\": \"ten\", \"window\": 5} }\n  }\n}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:4:34: tools.a.rate_limit.max: invalid type: string \"ten\", expected u64"]
    );
    let text = "{\"version\": \"1\", \"tools\": {\"a\": 5}}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:33: tools.a: invalid type: integer 5, expected a rule object"]
    );
    let text = "{\"version\": 1}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:13: version: invalid type: integer 1, expected a string"]
    );
    let text = "{\"version\": \"1\",\n  \"grants\": [{\"uids\": [\"root\"]}]}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:2:24: grants[0].uids[0]: invalid type: string \"root\", expected u32"]
    );
    let text =
        "{\"version\": \"1\", \"tools\": {\"a\": {\"rate_limit\": {\"max\": 1, \"window\": 0}}}}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:69: tools.a.rate_limit.window: invalid value: integer 0, expected a window of at least 1 second"]
    );
}

#[test]
fn error_missing_field_and_syntax() {
    assert_eq!(
        errors("p.json", "{\n  \"tools\": {}\n}"),
        ["p.json:1:1: missing field \"version\""]
    );
    let text = "{\"version\": \"1\", \"tools\": {\"a\": {\"rate_limit\": {\"window\": 5}}}}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:1:48: tools.a.rate_limit: missing field \"max\""]
    );
    // Syntax errors keep serde_json's position (columns in characters).
    let text = "{\n  \"version\": \"1\",\n  \"tools\": {\"é\": {},\n  }\n}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:4:3: tools: trailing comma"]
    );
    assert_eq!(
        errors("p.json", "{\"version\": \"1\"} x"),
        ["p.json:1:18: trailing characters"]
    );
    assert_eq!(
        errors("p.json", ""),
        ["p.json:1:1: EOF while parsing a value"]
    );
}

#[test]
fn error_bad_regex() {
    let text = r#"{
  "version": "1",
  "tools": {
    "run": { "when": [ { "path": "cmd", "op": "regex", "value": "^(ls|cat" } ] }
  }
}"#;
    assert_eq!(
        errors("p.json", text),
        ["p.json:4:65: tools.run.when[0].value: invalid regex: unclosed group"]
    );
}

#[test]
fn error_grant_without_selectors() {
    let text = r#"{
  "version": "1",
  "grants": [
    { "agents": ["a"], "tools": {} },
    { "tools": { "x": {} } }
  ]
}"#;
    assert_eq!(
        errors("p.json", text),
        ["p.json:5:5: grants[1]: a grant needs at least one selector (agents, uids, exes or cgroups); grants only ever apply to the callers they name"]
    );
}

#[test]
fn error_version() {
    let text = "{\n  \"version\": \"2\",\n  \"tools\": {}\n}";
    assert_eq!(
        errors("p.json", text),
        ["p.json:2:14: version: unsupported version \"2\", expected \"1\""]
    );
}

#[test]
fn several_semantic_errors_in_one_file() {
    let text = r#"{
  "version": "1",
  "server": { "match": ["localhost", "http://h:1/x"] },
  "tools": {
    "a": { "action": "deny", "when": [] },
    "b": { "approval_timeout": 5 },
    "c": { "rate_limit": { "max": 0, "window": 1 } },
    "d": { "when": [ { "path": "x", "op": "in", "value": 3 }, { "path": "y", "op": "eq" } ] },
    "b": {}
  },
  "grants": [ { "agents": [], "exes": ["python3"] } ]
}"#;
    assert_eq!(
        errors("p.json", text),
        [
            "p.json:3:25: server.match[0]: \"localhost\": expected a URL (http[s]://host[:port]/path), host:port or stdio:COMMAND-GLOB",
            "p.json:5:38: tools.a.when: has no effect on a rule with \"action\": \"deny\"",
            "p.json:7:35: tools.c.rate_limit.max: must be between 1 and 1000000 (use \"action\": \"deny\" to refuse every call)",
            "p.json:8:58: tools.d.when[0].value: op \"in\" takes an array of values",
            "p.json:8:63: tools.d.when[1]: op \"eq\" needs a \"value\"",
            "p.json:9:5: tools.b: tool \"b\" is listed 2 times",
            "p.json:11:27: grants[0].agents: an empty list matches no caller; remove the field or name someone",
            "p.json:11:40: grants[0].exes[0]: \"python3\" is not an absolute path",
        ]
    );
}

#[test]
fn errors_across_files() {
    let a = r#"{"version":"1","server":{"name":"s","match":["127.0.0.1:1"]}}"#;
    let b = "{\"version\":\"1\",\n \"server\":{\"name\":\"s\"}}";
    let c = "{\"version\":\"1\",\n \"server\":{\"name\":\"c\",\"match\":[\"127.0.0.1:1\"]}}";
    let d = r#"{"version":"1"}"#;
    let e = match load(&[("a.json", a), ("b.json", b), ("c.json", c), ("s.json", d)]) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>(),
    };
    assert_eq!(
        e,
        [
            "b.json:2:19: server.name: duplicate server name \"s\" (also in a.json)",
            "c.json:2:32: server.match[0]: \"127.0.0.1:1\" is already matched by server \"s\" (a.json)",
            "s.json:1:1: duplicate server name \"s\" (also in a.json)",
        ]
    );
}

#[test]
fn error_display_and_fields() {
    let e = match load(&[("x.json", "{\"version\": \"3\"}")]) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    assert_eq!(
        e,
        [PolicyError {
            file: "x.json".into(),
            line: 1,
            col: 13,
            message: "version: unsupported version \"3\", expected \"1\"".into(),
        }]
    );
    let whole = PolicyError {
        file: "/nope".into(),
        line: 0,
        col: 0,
        message: "cannot read".into(),
    };
    assert_eq!(whole.to_string(), "/nope: cannot read");
}

#[test]
fn load_dir_returns_every_error_and_ignores_other_files() {
    let dir = temp_dir("errors");
    let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    w("a-good.json", r#"{"version":"1","tools":{"x":{}}}"#);
    w(
        "b-bad.json",
        "{\"version\":\"1\",\n\"tools\":{\"x\":{\"action\":\"nope\"}}}",
    );
    w(
        "c-bad.json",
        "{\"version\":\"2\",\n\"grants\":[{\"tools\":{}}]}",
    );
    w("notes.txt", "not json");
    w(".hidden.json", "not json");
    std::fs::create_dir(dir.join("sub.json")).unwrap();
    let errs = match PolicySet::load_dir(&dir) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    let d = dir.display();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            format!("{d}/b-bad.json:2:24: tools.x.action: unknown variant \"nope\", expected one of \"allow\", \"deny\", \"require_approval\""),
            format!("{d}/c-bad.json:1:12: version: unsupported version \"2\", expected \"1\""),
            format!("{d}/c-bad.json:2:11: grants[0]: a grant needs at least one selector (agents, uids, exes or cgroups); grants only ever apply to the callers they name"),
        ]
    );

    // Fixed, the directory loads; a single file loads through `load` too.
    w("b-bad.json", r#"{"version":"1"}"#);
    w("c-bad.json", r#"{"version":"1"}"#);
    let set = PolicySet::load_dir(&dir).unwrap();
    let names: Vec<&str> = set.servers().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a-good", "b-bad", "c-bad"]);
    let single = PolicySet::load(&dir.join("a-good.json")).unwrap();
    assert_eq!(single.servers()[0].name, "a-good");
    assert_eq!(PolicySet::load(&dir).unwrap().servers().len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = PolicySet::load_dir(Path::new("/nonexistent/guard/policies")).unwrap_err();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].line, 0);
}

#[test]
fn empty_directory_is_an_empty_set() {
    let dir = temp_dir("empty");
    let set = PolicySet::load_dir(&dir).unwrap();
    assert!(set.is_empty());
    assert!(set.match_sni(None, sa("127.0.0.1:1")).is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn repo_policies_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = match PolicySet::load_dir(&dir) {
        Ok(s) => s,
        Err(e) => panic!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    let lim = RateLimiter::new();
    let now = Instant::now();
    let bot = agent("bot", 1000);

    let ev = set.by_name("everything").expect("everything.json");
    assert_eq!(
        ev.decide("echo", &json!({"message": "hi"}), &bot, &lim, now),
        allow("tools.echo")
    );
    assert_eq!(
        ev.decide(
            "echo",
            &json!({"message": "x".repeat(1001)}),
            &bot,
            &lim,
            now
        )
        .rule(),
        "tools.echo.when[0]"
    );
    assert_eq!(
        ev.decide("get-sum", &json!({"a": 1, "b": 2}), &bot, &lim, now),
        allow("tools.get-sum")
    );
    assert_eq!(
        ev.decide("get-env", &json!({}), &bot, &lim, now).kind(),
        "deny"
    );
    assert!(!ev.visible("get-env", &bot));
    assert_eq!(
        ev.decide("get-env", &json!({}), &agent("ops-debug", 1000), &lim, now),
        allow("grants[0].tools.get-env")
    );
    assert_eq!(
        ev.decide("simulate-research-query", &json!({}), &bot, &lim, now)
            .kind(),
        "require_approval"
    );
    assert_eq!(
        set.match_request(Some("localhost:3001"), sa("127.0.0.1:3001"), "/mcp")
            .map(|p| p.name.as_str()),
        Some("everything")
    );

    let flux = set.by_name("flux").expect("example-flux.json");
    assert_eq!(
        flux.file,
        dir.join("example-flux.json").display().to_string()
    );
    assert_eq!(
        flux.decide("flux_edit_image", &json!({}), &bot, &lim, now)
            .rule(),
        "hide"
    );
}

const MANY: &str = r#"{
  "version": "1",
  "server": { "name": "files", "match": ["127.0.0.1:9000"] },
  "default": "deny",
  "tools": { "read": {} },
  "resources": {
    "file:///work/*": {},
    "file:///work/secrets/*": { "action": "deny", "reason": "no secrets" },
    "file:///work/big.log": { "rate_limit": "1/minute" },
    "db://*": { "action": "require_approval", "approval_timeout": 30 }
  },
  "prompts": { "summarise": {}, "leak": { "action": "deny", "reason": "no leaking" } },
  "methods": { "completion/complete": {}, "sampling/createMessage": { "action": "deny", "reason": "no sampling" } },
  "grants": [ { "agents": ["ops"], "resources": { "file:///etc/*": {} }, "prompts": { "leak": {} },
                "methods": { "sampling/createMessage": {} } } ]
}"#;

#[test]
fn resources_prompts_and_methods_are_decided() {
    let set = one(MANY);
    let sp = set.by_name("files").unwrap();
    let lim = RateLimiter::new();
    let now = Instant::now();
    let bot = agent("bot", 1000);
    let d = |s: Subject<'_>, c: &Caller| sp.decide_on(s, &Value::Null, c, &lim, now);
    assert_eq!(
        d(Subject::Resource("file:///work/a.txt"), &bot),
        allow("resources.file:///work/*")
    );
    // The longest matching pattern wins.
    assert_eq!(
        d(Subject::Resource("file:///work/secrets/key"), &bot),
        deny("resources.file:///work/secrets/*", "no secrets")
    );
    assert_eq!(
        d(Subject::Resource("file:///etc/passwd"), &bot),
        deny(
            "default",
            "resource \"file:///etc/passwd\" is not allowed by the policy of server \"files\""
        )
    );
    assert_eq!(
        d(Subject::Resource("db://users"), &bot),
        Decision::RequireApproval {
            rule: "resources.db://*".into(),
            timeout_s: 30
        }
    );
    assert_eq!(
        d(Subject::Resource("file:///work/big.log"), &bot),
        allow("resources.file:///work/big.log")
    );
    assert!(matches!(
        d(Subject::Resource("file:///work/big.log"), &bot),
        Decision::RateLimited { .. }
    ));
    assert_eq!(
        d(Subject::Prompt("summarise"), &bot),
        allow("prompts.summarise")
    );
    assert_eq!(
        d(Subject::Prompt("leak"), &bot),
        deny("prompts.leak", "no leaking")
    );
    assert!(matches!(
        d(Subject::Prompt("other"), &bot),
        Decision::Deny { .. }
    ));
    assert_eq!(
        d(Subject::Method("completion/complete"), &bot),
        allow("methods.completion/complete")
    );
    assert_eq!(
        d(Subject::Method("sampling/createMessage"), &bot),
        deny("methods.sampling/createMessage", "no sampling")
    );
    // Methods nobody named follow `default`.
    assert!(matches!(
        d(Subject::Method("tasks/get"), &bot),
        Decision::Deny { .. }
    ));
    // Grants cover every kind.
    let ops = agent("ops", 1000);
    assert_eq!(
        d(Subject::Resource("file:///etc/passwd"), &ops),
        allow("grants[0].resources.file:///etc/*")
    );
    assert_eq!(
        d(Subject::Prompt("leak"), &ops),
        allow("grants[0].prompts.leak")
    );
    assert_eq!(
        d(Subject::Method("sampling/createMessage"), &ops),
        allow("grants[0].methods.sampling/createMessage")
    );
    // Lists show what the caller may use.
    assert!(sp.visible_on(Subject::Resource("file:///work/a"), &bot));
    assert!(!sp.visible_on(Subject::Resource("file:///work/secrets/a"), &bot));
    assert!(!sp.visible_on(Subject::Prompt("leak"), &bot));
    assert!(sp.visible_on(Subject::Prompt("leak"), &ops));
}

#[test]
fn hide_everything_with_default_deny_leaves_nothing_readable() {
    let set = one(r#"{"version": "1", "default": "deny", "hide": ["*"]}"#);
    let sp = &set.servers()[0];
    let lim = RateLimiter::new();
    let c = agent("bot", 1);
    for s in [
        Subject::Tool("x"),
        Subject::Resource("file:///a"),
        Subject::Prompt("p"),
        Subject::Method("tasks/get"),
        Subject::Method("completion/complete"),
    ] {
        assert!(
            matches!(
                sp.decide_on(s, &Value::Null, &c, &lim, Instant::now()),
                Decision::Deny { .. }
            ),
            "{s:?}"
        );
        assert!(
            !sp.visible_on(s, &c) || matches!(s, Subject::Method(_)),
            "{s:?}"
        );
    }
    // ... and grants cannot reopen resources or prompts.
    let e = errors(
        "h.json",
        r#"{"version": "1", "hide": ["*"], "grants": [{"uids": [1], "resources": {"file:///*": {}}}]}"#,
    );
    assert!(e[0].contains("grants cannot unhide"), "{e:?}");
}

#[test]
fn rule_names_that_could_never_apply_are_load_errors() {
    for (rules, says) in [
        (r#""methods": {"tools/call": {}}"#, "govern tools under"),
        (r#""methods": {"initialize": {}}"#, "always pass"),
        (r#""methods": {"resources/read": {}}"#, "by URI"),
        (
            r#""resources": {"file:///a/../b": {}}"#,
            "not a URI pattern",
        ),
        (r#""resources": {"file:///a//b": {}}"#, "would never match"),
        (
            r#""resources": {"db://x?table=*": {}}"#,
            "would never match",
        ),
        (r#""resources": {"FILE:///a": {}}"#, "would never match"),
        (r#""resources": {"no scheme": {}}"#, "not a URI pattern"),
    ] {
        let text = format!(r#"{{"version": "1", {rules}}}"#);
        let e = errors("m.json", &text);
        assert!(e.iter().any(|x| x.contains(says)), "{rules}: {e:?}");
    }
    // Unknown (vendor) methods may have rules; so may "*" resource patterns.
    one(
        r#"{"version": "1", "methods": {"vendor/run": {"action": "deny"}}, "resources": {"*": {}}}"#,
    );
}

#[test]
fn a_shared_address_is_chosen_by_the_path_servers_read() {
    let set = load(&[
        (
            "a.json",
            r#"{"version":"1","server":{"name":"a","match":["http://127.0.0.1:8000/a"]}}"#,
        ),
        (
            "b.json",
            r#"{"version":"1","server":{"name":"b","match":["http://127.0.0.1:8000/b"]}}"#,
        ),
        (
            "c.json",
            r#"{"version":"1","server":{"name":"c","match":["http://c.example:8000/b"]}}"#,
        ),
    ])
    .unwrap();
    let names: Vec<String> = ["a", "b"].map(String::from).to_vec();
    let dst = sa("127.0.0.1:8000");
    let pick = |host: Option<&str>, path: &str, names: &[String]| match set
        .choose_among(names, host, dst, path)
    {
        Among::One(s) => s.name.clone(),
        Among::Unmatched => "unmatched".into(),
        Among::Ambiguous(_) => "ambiguous".into(),
    };
    assert_eq!(pick(None, "/a/mcp", &names), "a");
    assert_eq!(pick(None, "/b", &names), "b");
    assert_eq!(pick(None, "/c/mcp", &names), "unmatched");
    for dodge in [
        "/b/../a/mcp",
        "/%61/mcp",
        "//a/mcp",
        "/b/%2e%2e/a",
        "/a/%zz",
        "/A/mcp",
    ] {
        assert_eq!(pick(None, dodge, &names), "ambiguous", "{dodge}");
    }
    // Two servers that fit alike (c by Host, b by the destination; same path length) ...
    let all: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    assert_eq!(pick(Some("c.example:8000"), "/b/mcp", &all), "ambiguous");
    // ... and the Host chooses only among the servers at the address.
    assert_eq!(pick(Some("c.example:8000"), "/b/mcp", &names), "b");
}

#[test]
fn stdio_servers_match_by_command_line() {
    let set = load(&[
        (
            "fs.json",
            r#"{"version": "1", "server": {"name": "fs", "match": ["stdio:*server-filesystem*"]}, "default": "allow"}"#,
        ),
        (
            "fs-work.json",
            r#"{"version": "1", "server": {"name": "fs-work", "match": ["stdio:npx -y @modelcontextprotocol/server-filesystem /work*"]}, "default": "deny"}"#,
        ),
        (
            "web.json",
            r#"{"version": "1", "server": {"name": "web", "match": ["127.0.0.1:8080"]}, "default": "allow"}"#,
        ),
    ])
    .unwrap();
    let name = |c: &str| set.match_stdio(c).map(|s| s.name.clone());
    assert_eq!(
        name("npx -y @modelcontextprotocol/server-filesystem /home/u").as_deref(),
        Some("fs")
    );
    // The more literal entry wins.
    assert_eq!(
        name("npx -y @modelcontextprotocol/server-filesystem /work/a").as_deref(),
        Some("fs-work")
    );
    assert_eq!(name("uvx mcp-server-git"), None);
    // A stdio entry never matches network traffic, nor a network entry a command line.
    let dst: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    assert_eq!(set.match_request(None, dst, "/").unwrap().name, "web");
    assert_eq!(name("127.0.0.1:8080"), None);
    let e = errors(
        "x.json",
        r#"{"version": "1", "server": {"match": ["stdio:  "]}}"#,
    );
    assert!(e[0].contains("needs a command glob"), "{e:?}");
    // The same entry in two policies is a clash, as for addresses.
    let e = load(&[
        (
            "a.json",
            r#"{"version": "1", "server": {"match": ["stdio:*git*"]}}"#,
        ),
        (
            "b.json",
            r#"{"version": "1", "server": {"match": ["stdio:*git*"]}}"#,
        ),
    ])
    .unwrap_err();
    assert!(e[0].to_string().contains("already matched"), "{e:?}");
}
