//! As root, the in-process enforcement suites (`tests/mcp.rs`, `tests/tls.rs`) run once more as
//! uid 65534 with no capabilities at all, so that they can never come to need root unnoticed.
//! Their test executables and the peer scripts are copied to a directory that user can read
//! (the checkout may be closed to other users).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{repo_root, run_tests};

/// The suites that must pass without root.
const SUITES: &[&str] = &["mcp", "tls"];
const NOBODY: &str = "65534";

/// Runs [`SUITES`] as uid 65534; returns (ok, passed, failed).
pub fn run(filters: &[&String]) -> Result<(bool, u64, u64)> {
    let exes = build()?;
    let dir = std::env::temp_dir().join(format!("guard-unprivileged-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let result = run_in(&dir, &exes, filters);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, exes: &[PathBuf], filters: &[&String]) -> Result<(bool, u64, u64)> {
    let scripts = dir.join("peers");
    fs::create_dir_all(&scripts)?;
    for d in [dir, &scripts] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    for e in fs::read_dir(repo_root().join("tests/peers"))? {
        let e = e?;
        if e.file_type()?.is_file() {
            let to = scripts.join(e.file_name());
            fs::copy(e.path(), &to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o644))?;
        }
    }
    let (mut ok, mut passed, mut failed) = (true, 0, 0);
    for exe in exes {
        let copy = dir.join(exe.file_name().unwrap());
        fs::copy(exe, &copy).with_context(|| format!("copying {}", exe.display()))?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
        eprintln!("xtask: {} as uid {NOBODY}, no capabilities", copy.display());
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(&copy)
            .args(filters)
            .current_dir(dir)
            .env("HOME", dir)
            .env("GUARD_TEST_SCRIPTS", &scripts)
            .env_remove("RUST_BACKTRACE");
        let (o, p, f, _) = run_tests(&mut cmd)?;
        ok &= o;
        passed += p;
        failed += f;
    }
    Ok((ok, passed, failed))
}

/// Builds the suites' test executables; their paths.
fn build() -> Result<Vec<PathBuf>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root()).args([
        "test",
        "--package",
        "guard",
        "--no-run",
        "--message-format=json",
    ]);
    for s in SUITES {
        cmd.args(["--test", s]);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the in-process suites")?;
    if !out.status.success() {
        bail!("building the in-process suites failed");
    }
    let exes: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let exe = l.split("\"executable\":\"").nth(1)?.split('"').next()?;
            let name = l.split("\"name\":\"").nth(1)?.split('"').next()?;
            let guard_test = l.contains("\"kind\":[\"test\"]") && l.contains("/guard#");
            (guard_test && SUITES.contains(&name)).then(|| PathBuf::from(exe))
        })
        .collect();
    if exes.len() != SUITES.len() {
        bail!("expected the test executables of {SUITES:?}, found {exes:?}");
    }
    Ok(exes)
}
