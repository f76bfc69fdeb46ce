//! Enrolment without `guard exec` (`[[agents]]`): programs started by a plain shell in the
//! test's attach subtree are marked by the kernel at exec and redirected from their first
//! connect, moved into agent cgroups with what they fork, and listed by `guard status`. Whether
//! a connect went direct is decided by the server: under `proxy.other = "deny"` nothing a
//! guarded process sends reaches it, so every connection it accepts came past guard.

use std::{path::PathBuf, time::Duration};

use guard_integration::enrol::{self, *};
use guard_testkit::{process::*, root::*};

/// A program whose first instruction is a connect (no interpreter start-up hides the race):
/// `prog HOST PORT [once|tree|late|every]`; `tree` connects from a grandchild, `late` after
/// 300 ms, `every` every 200 ms until killed.
const PROGRAM: &str = r#"
static int hit(const char *host, int port) { return connect_send(host, port); }

int main(int argc, char **argv) {
    const char *mode = argc > 3 ? argv[3] : "once";
    int port = atoi(argv[2]);
    if (!strcmp(mode, "tree")) {
        pid_t c = fork();
        if (c == 0) {
            pid_t g = fork();
            if (g == 0)
                return hit(argv[1], port) == 0 ? 0 : 1;
            return waited(g);
        }
        return waited(c);
    }
    if (!strcmp(mode, "late")) {
        usleep(300000);
        return hit(argv[1], port) == 0 ? 0 : 1;
    }
    if (!strcmp(mode, "every")) {
        for (;;) {
            hit(argv[1], port);
            usleep(200000);
        }
    }
    return hit(argv[1], port) == 0 ? 0 : 1;
}
"#;

fn setup(agents: &str) -> (Env, PathBuf) {
    setup_with("", agents)
}

/// [`setup`] with lines for `[scope]`; the copy is `other-prog`.
fn setup_with(scope: &str, agents: &str) -> (Env, PathBuf) {
    let (env, prog, _) = enrol::setup(
        scope,
        &format!("{CONNECT_C}{PROGRAM}"),
        "other-prog",
        agents,
    );
    (env, prog)
}

const CPROG: &str = "[[agents]]\nname = \"cprog\"\nexe = [\"{dir}/agent-prog\"]\n";

#[test]
fn an_agent_started_by_a_plain_shell_is_redirected_on_its_first_connect_1000_times() {
    let (mut env, _) = setup(CPROG);
    env.start_daemon();
    assert_eq!(
        env.status()["enrolment"]["mode"],
        "exec",
        "{}",
        env.status()
    );
    let server = Counter::start();
    let redirected = env.kernel_counter("redirected");
    let script = format!(
        "i=0; while [ $i -lt 1000 ]; do ./agent-prog 127.0.0.3 {} || exit 1; i=$((i+1)); done",
        server.port
    );
    run_ok(&mut shell(&env, &script));
    // Not one of them reached the server directly.
    assert_eq!(server.seen(), 0, "direct connects");
    assert!(env.kernel_counter("redirected") >= redirected + 1000);
    eventually("1000 connection records", Duration::from_secs(20), || {
        connections_of(&env, "cprog") >= 1000
    });
    let starts = agent_starts(&env, "cprog");
    // A process started more than once: its records say which and where.
    let mut by_pid = std::collections::HashMap::new();
    for r in &starts {
        by_pid
            .entry(r["agent"]["pid"].to_string())
            .or_insert_with(Vec::new)
            .push(r["agent"]["cgroup"].to_string());
    }
    by_pid.retain(|_, c| c.len() > 1);
    assert_eq!(starts.len(), 1000, "started more than once: {by_pid:?}");
    assert!(starts
        .iter()
        .all(|r| r["detail"]["enrolled"] == "exec-match"));
    // The same program at another path is another file: not an agent, straight through.
    run_ok(&mut shell(
        &env,
        &format!("./other-prog 127.0.0.3 {}", server.port),
    ));
    eventually(
        "the other program's connect",
        Duration::from_secs(5),
        || server.seen() == 1,
    );
}

#[test]
fn what_an_agent_forks_is_guarded_and_running_agents_are_enrolled_at_start() {
    let (mut env, _) = setup(CPROG);
    let server = Counter::start();
    // Started before the daemon: its connects go straight to the server until it is found.
    let mut early = shell(
        &env,
        &format!("exec ./agent-prog 127.0.0.3 {} every", server.port),
    );
    let mut early = spawn(&mut early).unwrap();
    eventually(
        "a direct connect before the daemon",
        Duration::from_secs(5),
        || server.seen() >= 1,
    );
    env.start_daemon();
    let status = env.status();
    let listed = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["pid"] == early.id())
        .unwrap_or_else(|| panic!("the running agent is not listed: {status}"))
        .clone();
    assert_eq!(listed["name"], "cprog");
    assert_eq!(listed["how"], "exec-match");
    assert!(listed["cgroup"].as_str().unwrap().contains("/agent-cprog-"));
    assert!(listed["exe"].as_str().unwrap().ends_with("/agent-prog"));
    let before = server.seen();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        server.seen(),
        before,
        "the enrolled agent still connects directly"
    );
    assert!(
        connections_of(&env, "cprog") >= 3,
        "{:#}",
        env.status()["counters"]
    );
    let _ = early.kill();
    let _ = early.wait();
    // A grandchild's connect, forked before the daemon could move anything: guarded.
    let before = server.seen();
    let conns = connections_of(&env, "cprog");
    run_ok(&mut shell(
        &env,
        &format!("./agent-prog 127.0.0.3 {} tree", server.port),
    ));
    eventually(
        "the grandchild's connection record",
        Duration::from_secs(5),
        || connections_of(&env, "cprog") > conns,
    );
    assert_eq!(server.seen(), before, "the grandchild connected directly");
    // A sibling that is not an agent is not guarded.
    run_ok(&mut shell(
        &env,
        &format!("./other-prog 127.0.0.3 {} tree", server.port),
    ));
    eventually(
        "the sibling's direct connect",
        Duration::from_secs(5),
        || server.seen() == before + 1,
    );
}

#[test]
fn an_interpreter_is_an_agent_by_its_arguments_and_names_are_bound_to_uids() {
    let agents = format!(
        "[[agents]]\nname = \"pyagent\"\nexe = [\"{}\"]\nargv = [\"*agent_marker*\"]\n\n[[agents]]\nname = \"bound\"\nexe = [\"/nonexistent/bound\"]\nuids = [4242]\n",
        python_file().display()
    );
    let (mut env, _) = setup(&agents);
    env.start_daemon();
    let server = Counter::start();
    let marked = connecting_script(&env.dir, "agent_marker.py", server.port);
    let plain = connecting_script(&env.dir, "plain.py", server.port);
    let py = python_file().display().to_string();
    run_ok(&mut shell(&env, &format!("{py} {}", marked.display())));
    assert_eq!(server.seen(), 0, "the agent connected directly");
    assert_eq!(agent_starts(&env, "pyagent").len(), 1);
    // The same interpreter running something else: not enrolled, its connection goes through.
    run_ok(&mut shell(&env, &format!("{py} {}", plain.display())));
    eventually("the plain script's connect", Duration::from_secs(5), || {
        server.seen() == 1
    });
    assert_eq!(agent_starts(&env, "pyagent").len(), 1);
    // A name bound to uids: root may not take it with guard exec.
    let out = env.exec("bound", &["true"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may not start agent `bound`"), "{err}");
    assert!(agent_starts(&env, "bound").is_empty());
}

#[test]
fn without_the_exec_hooks_agents_are_enrolled_from_exec_events() {
    let (mut env, _) = setup_with("enrolment = \"events\"", CPROG);
    env.start_daemon();
    let status = env.status();
    assert_eq!(status["enrolment"]["mode"], "events", "{status}");
    let server = Counter::start();
    // The window is the time to the daemon's move: a connect 300 ms after the exec is guarded.
    run_ok(&mut shell(
        &env,
        &format!("./agent-prog 127.0.0.3 {} late", server.port),
    ));
    assert_eq!(server.seen(), 0, "the agent connected directly");
    let starts = agent_starts(&env, "cprog");
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert_eq!(starts[0]["detail"]["enrolled"], "exec-match");
    eventually("its connection record", Duration::from_secs(5), || {
        connections_of(&env, "cprog") == 1
    });
    run_ok(&mut shell(
        &env,
        &format!("./other-prog 127.0.0.3 {} late", server.port),
    ));
    eventually(
        "the other program's direct connect",
        Duration::from_secs(5),
        || server.seen() == 1,
    );
}
