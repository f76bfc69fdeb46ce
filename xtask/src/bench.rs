//! `cargo xtask bench [--quick]`: builds guard and guard-bench in release, then runs guard-bench
//! (root) against the release daemon. It prints a table of guard's cost against the direct path
//! and writes target/bench/results.json. See README "Performance".

use std::process::Command;

use anyhow::{bail, Result};

pub fn bench(args: &[String]) -> Result<()> {
    if !super::is_root() {
        bail!(
            "cargo xtask bench needs root: it loads guard's eBPF programs (into a cgroup subtree of \
             its own) and creates cgroups. Nothing was built or run; use `sudo cargo xtask bench`."
        );
    }
    super::setup()?;
    super::setup::bench_peers()?;
    let root = super::repo_root();
    super::status(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "guard",
        "--package",
        "guard-bench",
    ]))?;
    let release = root.join("target/release");
    super::status(
        Command::new(release.join("guard-bench"))
            .current_dir(&root)
            .arg("run")
            .arg("--guard")
            .arg(release.join("guard"))
            .arg("--out")
            .arg(root.join("target/bench/results.json"))
            .arg("--repo")
            .arg(&root)
            .args(args),
    )
}
