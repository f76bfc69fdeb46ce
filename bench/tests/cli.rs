//! guard-bench's command line (no root needed): the subcommands and the options `cargo xtask
//! bench` and the root suite pass are there. The measurements themselves run in the root suite
//! (`integration-test/tests/bench.rs`).

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_guard-bench"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn run_takes_what_xtask_and_the_root_suite_pass() {
    let top = help(&[]);
    assert!(top.contains("run"), "{top}");
    // The worker is internal (hidden from the top help) but must still parse its spec argument.
    let worker = help(&["worker"]);
    assert!(worker.contains("<SPEC>"), "{worker}");
    let run = help(&["run"]);
    for flag in ["--quick", "--guard", "--out", "--repo", "--only"] {
        assert!(run.contains(flag), "{flag} missing:\n{run}");
    }
}
