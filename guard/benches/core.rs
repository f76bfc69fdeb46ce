//! The enforcement core's own work per `tools/call`, with no socket and no HTTP: the request
//! body read, decided and audited (a real audit file), then the server's JSON answer read and
//! screened. What guard adds per call on top of a plain proxy hop, in one thread; the whole
//! daemon is measured by `cargo xtask bench`.
//!
//! `cargo bench -p guard --bench core` (or `-- --quick`). A benchmark only: nothing here
//! asserts a time.

use std::{hint::black_box, sync::Arc, time::Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use guard::{
    audit::Audit,
    config::Config,
    identity::Identity,
    mcp::{pins::Pins, wire, Engine, Filtered, Headers, Outcome, Settings, Target, Transport},
    policy::PolicySet,
};

const POLICY: &str = r#"{
  "version": "1",
  "server": { "name": "bench", "match": ["127.0.0.1:8000"] },
  "default": "deny",
  "tools": { "echo": {}, "other": { "action": "deny", "reason": "no" } }
}"#;

const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello world","count":3}}}"#;
const ANSWER: &[u8] = br#"{"jsonrpc":"2.0","id":17,"result":{"content":[{"type":"text","text":"hello world"}],"isError":false}}"#;

fn engine(dir: &std::path::Path) -> Engine {
    let config = Config::default();
    let policies = PolicySet::from_files(&[("bench.json".into(), POLICY.into())])
        .unwrap_or_else(|e| panic!("bench policy: {e:?}"));
    let audit = Arc::new(Audit::open(&dir.join("audit.jsonl")).expect("audit log"));
    Engine::new(
        policies,
        Pins::new(dir, &config.policy.pin_fields.0),
        audit,
        Settings {
            unknown_servers: config.policy.unknown_servers,
            denial: config.policy.denial,
            log_arguments: false,
        },
    )
}

fn caller() -> Identity {
    Identity {
        pid: 4242,
        tgid: 4242,
        uid: 1000,
        gid: 1000,
        comm: "agent".into(),
        cgroup_id: 77,
        netns_cookie: 0,
        agent: Some("bench-agent".into()),
        exe: None,
        exe_file: None,
        cgroup: Some("/guard.slice/agent-bench-1".into()),
    }
}

fn target() -> Target {
    Target {
        server: Some("bench".into()),
        host: "127.0.0.1".into(),
        port: 8000,
        original_dst: Some("127.0.0.1:8000".parse().unwrap()),
        at_destination: true,
        pin_scope: None,
        session: Some("5f1c0a".into()),
        protocol_version: Some("2025-06-18".into()),
        traceparent: None,
        command: None,
        transport: Transport::StreamableHttp,
        received: Instant::now(),
    }
}

fn core(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("guard-bench-core-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let engine = engine(&dir);
    let who = caller();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The two halves of a call, each checked: a bench of a refused call would time the wrong
    // path.
    let request = |t: &Target| {
        let body = wire::parse_body(black_box(CALL)).unwrap();
        let out = rt.block_on(engine.enforce_body(&who, t, &body, Headers::default()));
        assert_eq!(out, Outcome::Forward);
    };
    let answer = |t: &Target| {
        let out = rt.block_on(engine.filter_json(&who, t, "bench", black_box(ANSWER)));
        assert!(matches!(out, Filtered::Unchanged));
    };
    let mut g = c.benchmark_group("core");
    g.bench_function("request: read", |b| {
        b.iter(|| black_box(wire::parse_body(black_box(CALL)).is_ok()))
    });
    g.bench_function("request: read, decide, audit", |b| {
        b.iter(|| request(&target()))
    });
    g.bench_function("answer: read, screen", |b| b.iter(|| answer(&target())));
    g.bench_function("whole call", |b| {
        b.iter(|| {
            let t = target();
            request(&t);
            answer(&t);
        })
    });
    g.finish();
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, core);
criterion_main!(benches);
