//! `cargo xtask setup | build | run | test`: everything a fresh machine needs, idempotently.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fresh;
mod fuzz;
mod install;
mod setup;
mod unprivileged;

use setup::setup;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned eBPF toolchain (nightly + rust-src), bpf-linker and the test peers.
    Setup,
    /// Build guard (and its eBPF programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the daemon in the foreground with the repo's policies and the embedded default config.
    Run {
        /// Use this configuration instead of the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run every test; as root, including the integration tests with real eBPF, each test binary
    /// in a fresh mount namespace (no bpffs mounted, empty /tmp and state directories).
    Test {
        /// The default as root, accepted for clarity: a fresh machine's mounts (see above).
        #[arg(long, conflicts_with = "host_mounts")]
        fresh: bool,
        /// As root: run with this machine's mounts as they are (for debugging a test).
        #[arg(long)]
        host_mounts: bool,
        /// As root: run every root test alone, each in a fresh mount namespace of its own.
        #[arg(long)]
        each: bool,
        /// Extra arguments for `cargo test` (after `--`: test name filters).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install guard: binary, config, policies, systemd unit; enable and start it (root).
    Install(install::InstallArgs),
    /// Stop guard, unpin its programs, remove its cgroups, binary and unit (--purge: all data).
    Uninstall(install::UninstallArgs),
    /// Fuzz the parsers guard writes itself (cargo-fuzz, pinned nightly), each for a while.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The targets (default: all of them).
        targets: Vec<String>,
    },
    /// Measure guard's cost against a direct connection (root): table + target/bench/results.json.
    Bench {
        /// Extra arguments for guard-bench (`--quick`: a short smoke run).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build { release } => {
            setup()?;
            build(release)
        }
        Cmd::Run { config } => {
            setup()?;
            build(false)?;
            let root = repo_root();
            let config = config.unwrap_or_else(|| root.join("guard/src/default.toml"));
            let mut cmd = Command::new(root.join("target/debug/guard"));
            cmd.arg("--config")
                .arg(&config)
                .arg("daemon")
                .arg("--policies")
                .arg(root.join("policies"));
            if !is_root() {
                if which("sudo").is_none() {
                    bail!("the daemon must run as root (it loads eBPF programs); run this as root");
                }
                eprintln!("xtask: the daemon needs root; running it with sudo");
                let mut s = Command::new("sudo");
                s.arg("--preserve-env=GUARD_LOG")
                    .arg(cmd.get_program())
                    .args(cmd.get_args());
                cmd = s;
            }
            status(&mut cmd)
        }
        Cmd::Test {
            fresh: _,
            host_mounts,
            each,
            args,
        } => {
            setup()?;
            let fresh = is_root() && !host_mounts;
            if fresh {
                fresh::check()?;
            }
            if each {
                return test_each(fresh, &args);
            }
            test(fresh, &args)
        }
        Cmd::Install(a) => install::install(a),
        Cmd::Uninstall(a) => install::uninstall(a),
        Cmd::Bench { args } => bench::bench(&args),
        Cmd::Fuzz { seconds, targets } => {
            setup()?;
            fuzz::fuzz(seconds, &targets)
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !s.success() {
        bail!("{:?} failed: {s}", cmd.get_program());
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root())
        .args(["build", "--package", "guard"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

/// Runs `cmd` (a `cargo test`), echoing its output, and adds up its "test result" lines.
fn run_tests(cmd: &mut Command) -> Result<(bool, u64, u64, u64)> {
    run_tests_echo(cmd, true)
}

fn run_tests_echo(cmd: &mut Command, echo: bool) -> Result<(bool, u64, u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        if echo {
            println!("{line}");
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut it = part.split_whitespace().rev();
                let (Some(word), Some(n)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match word {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    Ok((child.wait()?.success(), passed, failed, ignored))
}

/// The root suite: every test of the `guard-integration` crate (`integration-test/`) needs root
/// and real eBPF.
const ROOT_SUITE: &str = "integration-test";

/// `cargo test` of everything: the default members without root; as root the whole workspace,
/// root suite included (guard-ebpf builds for the BPF target only, from guard/build.rs). Every
/// root invocation selects the same packages, so cargo builds them once: another selection
/// unifies other features and compiles guard and its dependencies again.
fn cargo_test() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root()).arg("test");
    if is_root() {
        cmd.args(["--workspace", "--exclude", "guard-ebpf"]);
    }
    cmd
}

/// The root tests' names, read from the suite's sources (listing them through cargo would
/// build the suite), filtered like cargo filters them (a name containing any filter).
fn root_tests(filters: &[&String]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(repo_root().join(ROOT_SUITE).join("tests"))? {
        let text = fs::read_to_string(e?.path())?;
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.trim() != "#[test]" {
                continue;
            }
            let name = lines
                .find_map(|l| l.trim().strip_prefix("fn "))
                .and_then(|l| l.split('(').next());
            if let Some(n) = name {
                names.push(n.to_string());
            }
        }
    }
    names.retain(|n| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())));
    names.sort();
    names.dedup();
    Ok(names)
}

/// As root, with `fresh`, every root test alone, each in a fresh mount namespace of its own:
/// none may depend on what another test left behind.
fn test_each(fresh: bool, args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("--each runs the root tests one by one: run it as root");
    }
    status(cargo_test().arg("--no-run"))?;
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let names = root_tests(&filters)?;
    let log = repo_root().join("target/test-each.log");
    let mut failed = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let started = std::time::Instant::now();
        let mut cmd = cargo_test();
        cmd.args(["--quiet", "--", "--exact", name]);
        let tmp = fresh::FreshTmp::new()?;
        if fresh {
            fresh::isolate(&mut cmd, &tmp)?;
        }
        cmd.stderr(fs::File::options().create(true).append(true).open(&log)?);
        let (ok, passed, _, _) = run_tests_echo(&mut cmd, false)?;
        let verdict = if ok && passed > 0 { "ok" } else { "FAILED" };
        eprintln!(
            "xtask: [{}/{}] {name}: {verdict} ({:.1} s)",
            i + 1,
            names.len(),
            started.elapsed().as_secs_f64()
        );
        if verdict != "ok" {
            failed.push(name.clone());
        }
    }
    println!(
        "tests alone: {} passed, {} failed",
        names.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!(
            "failed when run alone (output in {}): {}",
            log.display(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Every test: without root the default members' (unit tests and the in-process suites); as
/// root also the in-process suites once more as uid 65534, and the root suite, in a fresh mount
/// namespace. `args`: test name filters, and other `cargo test` flags.
fn test(fresh: bool, args: &[String]) -> Result<()> {
    let (filters, extra): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| !a.starts_with('-'));
    // --no-fail-fast: one failing test binary must not hide the results of the others.
    let mut all = cargo_test();
    all.arg("--no-fail-fast")
        .args(&extra)
        .arg("--")
        .args(&filters);
    if !is_root() {
        let (ok, passed, failed, _) = run_tests(&mut all)?;
        let skipped = root_tests(&filters)?;
        eprintln!();
        eprintln!("{}", "#".repeat(80));
        eprintln!(
            "# NOT ROOT: the {} tests of the root suite ({ROOT_SUITE}/: real eBPF) were SKIPPED:",
            skipped.len()
        );
        for t in &skipped {
            eprintln!("#   {t}");
        }
        eprintln!("# Run `sudo cargo xtask test` (CI runs as root and runs them all).");
        eprintln!("{}", "#".repeat(80));
        println!(
            "tests: {passed} passed, {failed} failed, {} skipped",
            skipped.len()
        );
        if !ok {
            bail!("tests failed");
        }
        return Ok(());
    }
    let (mut ok, mut passed, mut failed) = unprivileged::run(&filters)?;
    let tmp = fresh::FreshTmp::new()?;
    if fresh {
        eprintln!("xtask: the tests run in a private mount namespace, as on a fresh machine: no bpffs mounted, an empty TMPDIR, guard's state directories empty");
        fresh::isolate(&mut all, &tmp)?;
    }
    let (a_ok, a_passed, a_failed, _) = run_tests(&mut all)?;
    ok &= a_ok;
    passed += a_passed;
    failed += a_failed;
    // One closing line for the whole run (cargo's last line is the doc tests').
    println!("tests: {passed} passed, {failed} failed");
    if !ok {
        bail!("tests failed");
    }
    Ok(())
}
