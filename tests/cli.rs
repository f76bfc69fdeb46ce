//! The command line without a daemon (no root needed): configuration errors, `guard policy
//! check | explain`, `guard audit tail | verify`.

use std::{fs, path::PathBuf, process::Command};

fn guard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_guard"));
    c.env_remove("RUST_BACKTRACE").env_remove("GUARD_CONFIG");
    c
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("guard-cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn out(c: &mut Command) -> (i32, String, String) {
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_bad_configuration_is_refused_with_its_location() {
    let d = Dir::new("config");
    let cfg = d.write(
        "guard.toml",
        "[scope]\nudp = \"dns-only\"\nguarded_uid = [1000]\n",
    );
    for args in [
        &["daemon"][..],
        &["status"][..],
        &["exec", "--", "true"][..],
    ] {
        let (code, _, err) = out(guard().arg("--config").arg(&cfg).args(args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{}:3:1: unknown field `guarded_uid`",
                cfg.display()
            )),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("guarded_uids"),
            "the valid keys are listed: {err}"
        );
    }
    // GUARD_CONFIG is the same as --config.
    let (code, _, err) = out(guard().env("GUARD_CONFIG", &cfg).arg("status"));
    assert_eq!(code, 2, "{err}");
}

const GOOD: &str = r#"{
  "version": "1",
  "server": { "name": "files", "match": ["127.0.0.9:8000"] },
  "default": "deny",
  "hide": ["secret"],
  "tools": {
    "read": {},
    "delete": { "action": "deny", "reason": "never" },
    "batch": { "when": [ { "path": "ids", "op": "max_items", "value": 2 } ], "reason": "too many ids" }
  },
  "grants": [ { "agents": ["ops"], "tools": { "delete": {} } } ]
}
"#;

#[test]
fn policy_check_names_file_line_and_column() {
    let d = Dir::new("check");
    d.write("files.json", GOOD);
    let (code, stdout, err) = out(guard().args(["policy", "check"]).arg(&d.0));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("ok, 1 server policies (files)"), "{stdout}");

    d.write(
        "broken.json",
        "{\n  \"version\": \"1\",\n  \"tools\": { \"x\": { \"action\": \"block\" } }\n}\n",
    );
    let (code, _, err) = out(guard().args(["policy", "check"]).arg(&d.0));
    assert_eq!(code, 1);
    assert!(err.contains("broken.json:3:"), "{err}");
    assert!(err.contains("tools.x.action"), "{err}");
    assert!(err.contains("nothing was loaded"), "{err}");
    // A single file works too.
    let (code, _, _) = out(guard()
        .args(["policy", "check"])
        .arg(d.0.join("files.json")));
    assert_eq!(code, 0);
}

#[test]
fn policy_explain_gives_the_decision_and_rule() {
    let d = Dir::new("explain");
    d.write("p/files.json", GOOD);
    let dir = d.0.join("p");
    let explain = |extra: &[&str]| {
        let (code, stdout, err) = out(guard()
            .args([
                "policy",
                "explain",
                "--json",
                "--server",
                "files",
                "--policies",
            ])
            .arg(&dir)
            .args(extra));
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let v = explain(&["--tool", "read"]);
    assert_eq!(
        (v["decision"].as_str(), v["rule"].as_str()),
        (Some("allow"), Some("tools.read"))
    );
    let v = explain(&["--tool", "delete"]);
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "never");
    assert_eq!(v["listed"], false);
    let v = explain(&["--tool", "delete", "--agent", "ops"]);
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["listed"], true);
    let v = explain(&["--tool", "batch", "--args", r#"{"ids":[1,2,3]}"#]);
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "too many ids");
    let v = explain(&["--tool", "other"]);
    assert_eq!(
        (v["decision"].as_str(), v["rule"].as_str()),
        (Some("deny"), Some("default"))
    );
    let v = explain(&["--tool", "secret"]);
    assert_eq!(v["rule"], "hide");
    // Human form, and an unknown server.
    let (code, stdout, _) = out(guard()
        .args([
            "policy",
            "explain",
            "--server",
            "files",
            "--tool",
            "delete",
            "--policies",
        ])
        .arg(&dir));
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("files / delete: deny (rule tools.delete"),
        "{stdout}"
    );
    let (code, _, err) = out(guard()
        .args([
            "policy",
            "explain",
            "--server",
            "nope",
            "--tool",
            "x",
            "--policies",
        ])
        .arg(&dir));
    assert_eq!(code, 1);
    assert!(
        err.contains("no policy for server `nope`") && err.contains("files"),
        "{err}"
    );
}

#[test]
fn audit_tail_prints_recent_records() {
    let d = Dir::new("audit");
    let log = d.write(
        "audit.jsonl",
        concat!(
            r#"{"ts":"2026-11-24T10:00:00.000000Z","id":"a","event":"connection","decision":"pass","original_dst":"127.0.0.2:80"}"#,
            "\n",
            r#"{"ts":"2026-11-24T10:00:01.000000Z","id":"b","event":"tool_call","agent":{"name":"bot","pid":7,"tgid":7,"uid":1000,"gid":1000,"comm":"python3","exe":null,"cgroup":null},"server":{"name":"files","host":"127.0.0.9","port":8000},"tool":"delete","decision":"deny","rule":"tools.delete","reason":"never"}"#,
            "\n"
        ),
    );
    let cfg = d.write(
        "guard.toml",
        &format!("[paths]\naudit_log = \"{}\"\n", log.display()),
    );
    let (code, stdout, err) = out(guard()
        .arg("--config")
        .arg(&cfg)
        .args(["audit", "tail", "--json", "-n", "1"]));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["id"], "b");
    let (code, stdout, _) = out(guard().arg("--config").arg(&cfg).args(["audit", "tail"]));
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[1].contains("tool_call") && lines[1].contains("deny"),
        "{stdout}"
    );
    assert!(
        lines[1]
            .contains("bot(uid 1000, pid 7) files tool=delete rule=tools.delete reason=\"never\""),
        "{stdout}"
    );
}

#[test]
fn audit_verify_finds_the_line_a_byte_was_changed_in_across_rotations() {
    use guard::audit::{Audit, Decision, Event, Rotation, Settings};
    let d = Dir::new("verify");
    let log = d.0.join("audit.jsonl");
    let mut settings = Settings::beside(&log);
    settings.rotation = Rotation {
        max_size: 600,
        keep: 3,
    };
    let audit = Audit::open_with(&settings).unwrap();
    for i in 0..20 {
        let mut r = audit.record(Event::Control, Decision::Enforce);
        r.method = Some(format!("step-{i}"));
        audit.write(&r).unwrap();
    }
    let head = audit.health().head;
    drop(audit);
    // Reopened, the chain goes on from the last record.
    let audit = Audit::open_with(&settings).unwrap();
    let r = audit.record(Event::Control, Decision::Enforce);
    audit.write(&r).unwrap();
    let head2 = audit.health().head;
    assert_ne!(head, head2);
    drop(audit);
    let cfg = d.write(
        "guard.toml",
        &format!("[paths]\naudit_log = \"{}\"\n", log.display()),
    );
    let verify = |extra: &[&str]| {
        out(guard()
            .arg("--config")
            .arg(&cfg)
            .args(["audit", "verify"])
            .args(extra))
    };
    let (code, stdout, err) = verify(&[]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("ok:"), "{stdout}");
    assert_eq!(verify(&["--head", &head2]).0, 0);
    let (code, _, err) = verify(&["--head", &head]);
    assert_eq!(code, 1, "a stale head must not pass");
    assert!(err.contains("not"), "{err}");
    // One byte of a rotated file: the chain breaks at that line.
    let rotated = d.0.join("audit.jsonl.2");
    let mut text = fs::read(&rotated).unwrap();
    let second = text.iter().position(|b| *b == b'\n').unwrap() + 1;
    let at = second
        + text[second..]
            .windows(5)
            .position(|w| w == b"step-")
            .unwrap();
    text[at] = b'S';
    fs::write(&rotated, &text).unwrap();
    let (code, _, err) = verify(&[]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{}:2:", rotated.display())),
        "{err}"
    );
}
