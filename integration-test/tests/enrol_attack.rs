//! Attacks on enrolment without `guard exec` (`[[agents]]`), from an attack review. Each test
//! asserts the secure behaviour, so a failing test is a finding. Whether a connect went direct
//! is decided by the server, as in `enrol.rs`: under `proxy.other = "deny"` nothing a guarded
//! process sends reaches it, so every connection it counts came past guard. The two tests marked
//! `ignore` are known holes, kept to show them (README "Enrolment"): an interpreter agent that
//! rewrites its own arguments before the daemon reads them, and the reparented descendants of an
//! agent that ran before the daemon.

use std::{path::PathBuf, time::Duration};

use guard_integration::enrol::{self, *};
use guard_testkit::{process::*, root::*};

/// `prog HOST PORT MODE [ARGS...]`: the attacks. `plain-prog` is a copy (another file: not an
/// agent) that the agent execs into.
/// What the attacks need beyond [`CONNECT_C`] (first: `_GNU_SOURCE` goes before any include).
const PRELUDE: &str = "#define _GNU_SOURCE\n#include <linux/sched.h>\n#include <pthread.h>\n#include <signal.h>\n#include <stdint.h>\n#include <stdio.h>\n#include <sys/syscall.h>\n";

const PROGRAM: &str = r#"
static const char *host;
static int port;
static char portstr[16];
static char **args;

static int hit(void) { return connect_send(host, port) == 0 ? 0 : 1; }

static void *late_hit(void *x) {
    (void)x;
    usleep(400000);
    _exit(hit());
    return 0;
}

static void *exec_plain(void *x) {
    (void)x;
    char *a[] = {args[4], (char *)host, portstr, "late", NULL};
    execv(args[4], a);
    _exit(127);
    return 0;
}

int main(int argc, char **argv) {
    args = argv;
    host = argv[1];
    port = atoi(argv[2]);
    snprintf(portstr, sizeof portstr, "%d", port);
    const char *mode = argc > 3 ? argv[3] : "once";
    pthread_t t;
    if (!strcmp(mode, "once"))
        return hit();
    if (!strcmp(mode, "late")) {
        usleep(300000);
        return hit();
    }
    if (!strcmp(mode, "hold")) {
        usleep(500000);
        return 0;
    }
    if (!strcmp(mode, "every")) {
        for (;;) {
            hit();
            usleep(200000);
        }
    }
    /* The process the agent executable started exits at once; its child connects later. */
    if (!strcmp(mode, "orphan")) {
        if (fork() == 0) {
            usleep(400000);
            return hit();
        }
        _exit(0);
    }
    /* Only the leader thread exits; another thread of the same process connects later. */
    if (!strcmp(mode, "leader")) {
        pthread_create(&t, 0, late_hit, 0);
        syscall(SYS_exit, 0);
    }
    /* Runs something else at once: "a marked process that runs something else stays marked". */
    if (!strcmp(mode, "execplain")) {
        char *a[] = {argv[4], (char *)host, portstr, "late", NULL};
        execv(argv[4], a);
        return 127;
    }
    /* A thread other than the leader execs: the leader dies in de_thread. */
    if (!strcmp(mode, "threadexec")) {
        pthread_create(&t, 0, exec_plain, 0);
        for (;;)
            pause();
    }
    /* Hides the argument that made it an agent. */
    if (!strcmp(mode, "rewrite")) {
        for (int i = 4; i < argc; i++)
            memset(argv[i], 'x', strlen(argv[i]));
        usleep(300000);
        return hit();
    }
    /* First not an agent (classified so by its connect), then execs the agent itself. */
    if (!strcmp(mode, "reexec")) {
        hit();
        usleep(500000);
        char *a[] = {argv[4], (char *)host, portstr, "late", "agent_marker", NULL};
        execv(argv[4], a);
        return 127;
    }
    if (!strcmp(mode, "vfork")) {
        pid_t c = vfork();
        if (c == 0)
            _exit(hit());
        return waited(c);
    }
    if (!strcmp(mode, "cloneparent")) {
        struct clone_args ca;
        memset(&ca, 0, sizeof ca);
        ca.flags = CLONE_PARENT;
        pid_t c = syscall(SYS_clone3, &ca, sizeof ca);
        if (c == 0)
            _exit(hit());
        if (c < 0) {
            perror("clone3");
            return 2;
        }
        usleep(800000);
        return 0;
    }
    /* guard exec --agent NAME from the agent: at once, or once it was moved. */
    if (!strcmp(mode, "guardexec") || !strcmp(mode, "guardexec_late")) {
        if (!strcmp(mode, "guardexec_late"))
            usleep(300000);
        char *a[] = {argv[4], "--config", argv[5], "exec", "--agent", argv[6], "--",
                     argv[7], (char *)host, portstr, "late", NULL};
        execv(argv[4], a);
        return 127;
    }
    /* A grandchild reparented away from the agent, running the plain program that connects
       every 200 ms. */
    if (!strcmp(mode, "daemonize")) {
        if (fork() == 0) {
            if (fork() == 0) {
                char *a[] = {argv[4], (char *)host, portstr, "every", NULL};
                execv(argv[4], a);
                _exit(127);
            }
            _exit(0);
        }
        for (;;)
            pause();
    }
    /* (run as the plain program) An agent that is enrolled and exits, then a new agent
       process with the same pid (clone3 set_tid: what a pid wrap-around gives anyone). */
    if (!strcmp(mode, "reuse")) {
        pid_t a = fork();
        if (a == 0) {
            char *x[] = {argv[4], (char *)host, portstr, "hold", NULL};
            execv(argv[4], x);
            _exit(127);
        }
        waited(a);
        struct clone_args ca;
        memset(&ca, 0, sizeof ca);
        pid_t tid[1] = {a};
        ca.set_tid = (uintptr_t)tid;
        ca.set_tid_size = 1;
        ca.exit_signal = SIGCHLD;
        pid_t c = syscall(SYS_clone3, &ca, sizeof ca);
        if (c == 0) {
            char *x[] = {argv[4], (char *)host, portstr, "late", NULL};
            execv(argv[4], x);
            _exit(127);
        }
        if (c < 0) {
            perror("clone3 set_tid");
            return 2;
        }
        fprintf(stderr, "first %d, second %d\n", a, c);
        return waited(c);
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
"#;

/// The agent `agent-prog` and its copy `plain-prog` (another file: not an agent).
fn setup(agents: &str) -> (Env, PathBuf, PathBuf) {
    enrol::setup(
        "",
        &format!("{PRELUDE}{CONNECT_C}{PROGRAM}"),
        "plain-prog",
        agents,
    )
}

fn not_agent_passes(env: &Env) -> usize {
    env.audit_connections()
        .iter()
        .filter(|r| r["rule"] == "enrol.not_an_agent")
        .count()
}

const CPROG: &str = "[[agents]]\nname = \"cprog\"\nexe = [\"{dir}/agent-prog\"]\n\n[[agents]]\nname = \"other\"\nexe = [\"/nonexistent/other\"]\n";
const INTERP: &str =
    "[[agents]]\nname = \"interp\"\nexe = [\"{dir}/agent-prog\"]\nargv = [\"*agent_marker*\"]\n";

/// Runs `script` in the plain shell, waits `settle` for what it left behind, and returns the
/// direct connections the server saw.
fn direct(env: &Env, server: &Counter, script: &str, settle: Duration) -> usize {
    let _ = shell(env, script).status().unwrap();
    std::thread::sleep(settle);
    server.seen()
}

fn evidence(env: &Env) -> String {
    format!(
        "agent_start cprog: {}, interp: {}, other: {}; not-an-agent passes: {}",
        agent_starts(env, "cprog").len(),
        agent_starts(env, "interp").len(),
        agent_starts(env, "other").len(),
        not_agent_passes(env)
    )
}

// ---- escaping the mark before the move ----------------------------------------------------

/// `runs` agents run `./agent-prog HOST PORT MODE ARGS` (`{plain}`: the copy's path) from a
/// plain shell, each given `settle` to do what it does later: none connects directly.
fn none_direct(mode: &str, args: &str, runs: usize, settle: Duration) {
    let (mut env, _, plain) = setup(CPROG);
    env.start_daemon();
    let server = Counter::start();
    let args = args.replace("{plain}", &plain.display().to_string());
    for _ in 0..runs {
        direct(
            &env,
            &server,
            &format!("./agent-prog 127.0.0.3 {} {mode} {args}", server.port),
            settle,
        );
    }
    assert_eq!(
        server.seen(),
        0,
        "{mode}: direct connects of {runs}: {}",
        evidence(&env)
    );
}

#[test]
fn a_child_whose_agent_parent_exits_at_once_stays_guarded() {
    none_direct("orphan", "", 10, Duration::from_millis(600));
}

#[test]
fn a_thread_that_outlives_the_leader_stays_guarded() {
    none_direct("leader", "", 10, Duration::from_millis(600));
}

#[test]
fn an_agent_that_execs_another_program_at_once_stays_guarded() {
    none_direct("execplain", "{plain}", 5, Duration::from_millis(100));
}

/// `plain-prog` is an agent too, by its arguments, which the exec below does not give it.
const CPROG_AND_INTERP: &str = "[[agents]]\nname = \"cprog\"\nexe = [\"{dir}/agent-prog\"]\n\n[[agents]]\nname = \"interp\"\nexe = [\"{dir}/plain-prog\"]\nargv = [\"*agent_marker*\"]\n";

#[test]
fn an_agent_that_execs_another_agents_interpreter_at_once_stays_that_agent() {
    // Before its move, an agent runs a program that is another entry's executable, with
    // arguments that make it no agent: a new mark there would have it decided "not an agent"
    // and let go. It stays marked as what it was, and becomes that agent.
    let (mut env, _, plain) = setup(CPROG_AND_INTERP);
    env.start_daemon();
    let server = Counter::start();
    let runs = 10;
    for _ in 0..runs {
        direct(
            &env,
            &server,
            &format!(
                "./agent-prog 127.0.0.3 {} execplain {}",
                server.port,
                plain.display()
            ),
            Duration::from_millis(100),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.seen(),
        0,
        "direct connects of {runs}: {}",
        evidence(&env)
    );
    assert_eq!(
        agent_starts(&env, "cprog").len(),
        runs,
        "{}",
        evidence(&env)
    );
    assert!(
        agent_starts(&env, "interp").is_empty(),
        "{}",
        evidence(&env)
    );
}

#[test]
fn an_agent_whose_thread_execs_another_program_stays_guarded() {
    none_direct("threadexec", "{plain}", 10, Duration::from_millis(100));
}

#[test]
fn vfork_and_clone_parent_children_are_guarded() {
    let (mut env, _, _) = setup(CPROG);
    env.start_daemon();
    let server = Counter::start();
    for mode in ["vfork", "cloneparent"] {
        for _ in 0..20 {
            direct(
                &env,
                &server,
                &format!("./agent-prog 127.0.0.3 {} {mode}", server.port),
                Duration::ZERO,
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            server.seen(),
            0,
            "{mode}: direct connects: {}",
            evidence(&env)
        );
    }
}

// ---- classification read from /proc at decision time --------------------------------------

#[test]
#[ignore = "known hole: argv is read from /proc, which the process may rewrite first"]
fn an_interpreter_agent_that_hides_its_argument_stays_guarded() {
    let (mut env, _, _) = setup(INTERP);
    env.start_daemon();
    let server = Counter::start();
    for _ in 0..10 {
        direct(
            &env,
            &server,
            &format!(
                "./agent-prog 127.0.0.3 {} rewrite agent_marker",
                server.port
            ),
            Duration::ZERO,
        );
    }
    assert_eq!(
        server.seen(),
        0,
        "direct connects of 10: {}",
        evidence(&env)
    );
}

#[test]
fn a_process_first_not_an_agent_that_then_execs_the_agent_is_guarded() {
    let (mut env, prog, _) = setup(INTERP);
    env.start_daemon();
    let server = Counter::start();
    run_ok(&mut shell(
        &env,
        &format!(
            "./agent-prog 127.0.0.3 {} reexec {}",
            server.port,
            prog.display()
        ),
    ));
    // The first connect (not an agent yet) passes through, by design.
    eventually("the not-an-agent connect", Duration::from_secs(5), || {
        server.seen() >= 1
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.seen(),
        1,
        "the agent it became connected directly: {}",
        evidence(&env)
    );
    assert_eq!(agent_starts(&env, "interp").len(), 1, "{}", evidence(&env));
}

#[test]
fn a_new_agent_with_a_dead_agents_pid_is_guarded() {
    let (mut env, prog, _) = setup(CPROG);
    env.start_daemon();
    let server = Counter::start();
    for _ in 0..3 {
        // The launcher is the plain program (not an agent).
        let out = shell(
            &env,
            &format!(
                "./plain-prog 127.0.0.3 {} reuse {}",
                server.port,
                prog.display()
            ),
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        server.seen(),
        0,
        "direct connects of 3 agents: {}",
        evidence(&env)
    );
    assert_eq!(agent_starts(&env, "cprog").len(), 6, "{}", evidence(&env));
}

// ---- names -------------------------------------------------------------------------------

#[test]
fn an_agent_cannot_take_another_name_with_guard_exec() {
    let (mut env, _, plain) = setup(CPROG);
    env.start_daemon();
    let server = Counter::start();
    for mode in ["guardexec", "guardexec_late"] {
        for _ in 0..8 {
            direct(
                &env,
                &server,
                &format!(
                    "./agent-prog 127.0.0.3 {} {mode} {} {} other {}",
                    server.port,
                    env.bin.display(),
                    env.config_path.display(),
                    plain.display()
                ),
                Duration::ZERO,
            );
        }
        assert!(
            agent_starts(&env, "other").is_empty(),
            "{mode}: the agent became `other`: {}",
            evidence(&env)
        );
    }
    assert_eq!(server.seen(), 0, "direct connects: {}", evidence(&env));
}

// ---- the daemon down, the scan at start ----------------------------------------------------

#[test]
fn with_the_daemon_down_agents_are_not_direct_and_are_enrolled_when_it_is_back() {
    let (mut env, _, _) = setup(CPROG);
    env.start_daemon();
    let server = Counter::start();
    env.kill_daemon();
    direct(
        &env,
        &server,
        &format!("./agent-prog 127.0.0.3 {} once", server.port),
        Duration::ZERO,
    );
    assert_eq!(server.seen(), 0, "direct with the daemon killed");
    let mut c = shell(
        &env,
        &format!("exec ./agent-prog 127.0.0.3 {} every", server.port),
    );
    let mut running = spawn(&mut c).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        server.seen(),
        0,
        "an agent started while it was down is direct"
    );
    env.start_daemon();
    std::thread::sleep(Duration::from_millis(1500));
    let status = env.status();
    let _ = running.kill();
    let _ = running.wait();
    assert_eq!(
        server.seen(),
        0,
        "direct after the restart: {}",
        evidence(&env)
    );
    assert!(
        status["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["pid"] == running.id()),
        "the agent started while it was down is not enrolled: {status}"
    );
}

#[test]
#[ignore = "known hole: the scan at start follows parent links, which reparenting cuts"]
fn a_reparented_grandchild_of_an_agent_running_before_the_daemon_is_enrolled_with_it() {
    let (mut env, _, plain) = setup(CPROG);
    let server = Counter::start();
    let mut c = shell(
        &env,
        &format!(
            "exec ./agent-prog 127.0.0.3 {} daemonize {}",
            server.port,
            plain.display()
        ),
    );
    let mut agent = spawn(&mut c).unwrap();
    eventually("direct before the daemon", Duration::from_secs(5), || {
        server.seen() >= 1
    });
    env.start_daemon();
    std::thread::sleep(Duration::from_millis(500));
    let before = server.seen();
    std::thread::sleep(Duration::from_millis(1200));
    let after = server.seen();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        after,
        before,
        "the agent's reparented grandchild still connects directly: {}",
        evidence(&env)
    );
}
