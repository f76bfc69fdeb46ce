//! `cargo xtask setup | build | run | test`: everything a fresh machine needs, idempotently.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fresh;
mod install;

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

struct Pins {
    toolchain: String,
    bpf_linker: String,
    llvm_feature: String,
}

fn pins() -> Result<Pins> {
    let text = fs::read_to_string(repo_root().join("guard-ebpf/toolchain.txt"))?;
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .ok_or_else(|| anyhow!("guard-ebpf/toolchain.txt has no `{key}`"))
    };
    Ok(Pins {
        toolchain: get("toolchain")?,
        bpf_linker: get("bpf-linker")?,
        llvm_feature: get("llvm-feature")?,
    })
}

fn cache_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".cache/guard"))
}

fn setup() -> Result<()> {
    let p = pins()?;
    // 1. The pinned nightly with rust-src (for -Z build-std=core).
    let has_src = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &p.toolchain,
        ])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        eprintln!("xtask: installing {} with rust-src", p.toolchain);
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            &p.toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    // 2. bpf-linker, built against that nightly's own libLLVM (no system LLVM needed).
    let cache = cache_dir()?;
    let linker_root = cache.join(format!("bpf-linker-{}-{}", p.bpf_linker, p.toolchain));
    if !linker_root.join("bin/bpf-linker").exists() {
        let sysroot = String::from_utf8(
            Command::new("rustc")
                .args([&format!("+{}", p.toolchain), "--print", "sysroot"])
                .output()?
                .stdout,
        )?;
        let lib = PathBuf::from(sysroot.trim()).join("lib");
        let llvm = fs::read_dir(&lib)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
            .ok_or_else(|| anyhow!("no libLLVM in {}", lib.display()))?;
        let prefix = cache.join(format!("llvm-{}", p.toolchain));
        let plib = prefix.join("lib");
        fs::create_dir_all(&plib)?;
        for name in ["libLLVM.so".to_string(), llvm.clone()] {
            let link = plib.join(&name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
        }
        eprintln!(
            "xtask: building bpf-linker {} against {}",
            p.bpf_linker, llvm
        );
        status(
            Command::new("cargo")
                .env("LLVM_PREFIX", &prefix)
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    &p.bpf_linker,
                    "--locked",
                ])
                .args(["--no-default-features", "--features", &p.llvm_feature])
                .arg("--root")
                .arg(&linker_root),
        )?;
    }
    // 3. rustfmt and clippy for the host toolchain (CI checks both).
    for (probe, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let ok = Command::new("cargo")
            .args([probe, "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            status(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    // 4. The peers the integration tests drive.
    let missing: Vec<&str> = [
        ("curl", "curl"),
        ("unshare", "util-linux"),
        ("python3", "python3"),
    ]
    .iter()
    .filter(|(bin, _)| which(bin).is_none() && !Path::new("/usr/bin").join(bin).exists())
    .map(|(_, pkg)| *pkg)
    .collect();
    if !Path::new("/usr/bin/python3").exists() && !missing.contains(&"python3") {
        // Tests run python as an unprivileged user too, so it must be the system one.
        install_packages(&["python3"])?;
    }
    if !missing.is_empty() {
        install_packages(&missing)?;
    }
    test_peers()?;
    Ok(())
}

/// Step 5 of setup: the real MCP peers of tests/peers (see tests/peers/README.md): a venv made from
/// /usr/bin/python3 with tests/peers/requirements.txt, and `npm ci` of tests/peers/package-lock.json,
/// each in a directory named after a hash of its pinned files, world-readable (tests also run them
/// as uid 65534), and pointed at by the symlinks `py` and `node` in the peers directory.
/// A directory is used only once its `.guard-installed` marker holds the full hash, so a run that
/// finds every marker in place changes nothing.
fn test_peers() -> Result<()> {
    // Bump to rebuild every peer directory when this recipe changes.
    const RECIPE: &str = "test-peers v1";
    let src = repo_root().join("tests/peers");
    let dir = test_peers_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    make_world_readable(&dir)?;

    // Python: a venv of the system python3, the one every user can run.
    let reqs =
        fs::read(src.join("requirements.txt")).context("reading tests/peers/requirements.txt")?;
    let hash = peers_hash(&[RECIPE.as_bytes(), b"python", &reqs]);
    let venv = dir.join(format!("py-{}", &hash[..12]));
    if !peers_installed(&venv, &hash) {
        let python = Path::new("/usr/bin/python3");
        let has_venv = Command::new(python)
            .args(["-c", "import venv, ensurepip"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !has_venv {
            install_packages(&["python3-venv"])?;
        }
        eprintln!(
            "xtask: installing the Python test peers into {}",
            venv.display()
        );
        remove_dir_if_exists(&venv)?;
        status(Command::new(python).arg("-m").arg("venv").arg(&venv))?;
        let py = venv.join("bin/python");
        status(
            Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                ])
                .args(["--only-binary", ":all:", "-r"])
                .arg(src.join("requirements.txt")),
        )?;
        status(Command::new(&py).args(["-m", "pip", "check", "--disable-pip-version-check"]))?;
        peers_finish(&venv, &hash)?;
    }
    peers_link(&dir.join("py"), &venv)?;

    // Node: @modelcontextprotocol/server-everything and sdk, exactly as package-lock.json says.
    let package = fs::read(src.join("package.json")).context("reading tests/peers/package.json")?;
    let lock =
        fs::read(src.join("package-lock.json")).context("reading tests/peers/package-lock.json")?;
    let hash = peers_hash(&[RECIPE.as_bytes(), b"node", &package, &lock]);
    let modules = dir.join(format!("node-{}", &hash[..12]));
    if !peers_installed(&modules, &hash) {
        if which("npm").is_none() || which("node").is_none() {
            install_packages(&["nodejs", "npm"])?;
        }
        eprintln!(
            "xtask: installing the Node test peers into {}",
            modules.display()
        );
        remove_dir_if_exists(&modules)?;
        fs::create_dir_all(&modules)?;
        fs::write(modules.join("package.json"), &package)?;
        fs::write(modules.join("package-lock.json"), &lock)?;
        status(Command::new("npm").current_dir(&modules).args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--omit=dev",
        ]))?;
        peers_finish(&modules, &hash)?;
    }
    peers_link(&dir.join("node"), &modules)?;
    Ok(())
}

/// Where the test peers live: `$GUARD_TEST_PEERS`, else /opt/guard-test-peers (root, or anyone who
/// may write there), else ~/.cache/guard/test-peers. tests/peers/README.md states the same rule.
fn test_peers_dir() -> Result<PathBuf> {
    if let Some(d) = env::var_os("GUARD_TEST_PEERS").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let opt = PathBuf::from("/opt/guard-test-peers");
    let writable = |p: &Path| {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    };
    if is_root() || writable(&opt) || (!opt.exists() && writable(Path::new("/opt"))) {
        return Ok(opt);
    }
    let fallback = cache_dir()?.join("test-peers");
    eprintln!(
        "xtask: not root: the test peers go to {} (the tests look there too)",
        fallback.display()
    );
    Ok(fallback)
}

/// FNV-1a, 64 bits, over the parts (each followed by its length): names a peer directory.
fn peers_hash(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for part in parts {
        part.iter().copied().for_each(&mut eat);
        (part.len() as u64)
            .to_le_bytes()
            .into_iter()
            .for_each(&mut eat);
    }
    format!("{h:016x}")
}

fn peers_installed(dir: &Path, hash: &str) -> bool {
    fs::read_to_string(dir.join(".guard-installed")).is_ok_and(|m| m.trim() == hash)
}

/// Opens the directory to every user (tests run clients as nobody), then marks it complete.
fn peers_finish(dir: &Path, hash: &str) -> Result<()> {
    status(Command::new("chmod").arg("-R").arg("a+rX").arg(dir))?;
    let marker = dir.join(".guard-installed");
    fs::write(&marker, format!("{hash}\n"))?;
    make_world_readable(&marker)
}

fn make_world_readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut perms = fs::metadata(path)?.permissions();
    let mode = perms.mode();
    let want = mode | if path.is_dir() { 0o755 } else { 0o644 };
    if want != mode {
        perms.set_mode(want);
        fs::set_permissions(path, perms)?;
    }
    Ok(())
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Points `link` at `target` (by its name, so the directory can move), replacing it atomically.
fn peers_link(link: &Path, target: &Path) -> Result<()> {
    let name = target.file_name().unwrap();
    if fs::read_link(link).is_ok_and(|t| t.as_os_str() == name) {
        return Ok(());
    }
    let tmp = link.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))
}

fn install_packages(pkgs: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "missing test peers {pkgs:?}: install them (apt-get install {})",
            pkgs.join(" ")
        );
    }
    eprintln!("xtask: apt-get install {}", pkgs.join(" "));
    status(Command::new("apt-get").arg("update").arg("-q"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
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

/// The root suite: every test of the `guard-integration` crate needs root and real eBPF.
const ROOT_SUITE: &str = "guard-integration";

/// `cargo test` for the root suite or for everything else (the default members).
fn cargo_test(root_suite: bool) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root()).arg("test");
    if root_suite {
        cmd.args(["--package", ROOT_SUITE]);
    }
    cmd
}

/// The root tests' names (`cargo test -- --list`), filtered by `filters`.
fn root_tests(filters: &[&String]) -> Result<Vec<String>> {
    let list = cargo_test(true)
        .arg("--quiet")
        .arg("--")
        .args(filters)
        .arg("--list")
        .output()?;
    if !list.status.success() {
        bail!(
            "listing the root tests failed:\n{}",
            String::from_utf8_lossy(&list.stderr)
        );
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The binaries the root tests start (they are not part of the test build).
fn build_binaries() -> Result<()> {
    status(Command::new("cargo").current_dir(repo_root()).args([
        "build",
        "--package",
        "guard",
        "--package",
        "guard-bench",
    ]))
}

/// As root, with `fresh`, every root test alone, each in a fresh mount namespace of its own:
/// none may depend on what another test left behind.
fn test_each(fresh: bool, args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("--each runs the root tests one by one: run it as root");
    }
    build_binaries()?;
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let names = root_tests(&filters)?;
    let log = repo_root().join("target/test-each.log");
    let mut failed = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let started = std::time::Instant::now();
        let mut cmd = cargo_test(true);
        cmd.args(["--quiet", "--", "--exact", name]);
        if fresh {
            fresh::isolate(&mut cmd)?;
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

/// Every test: the default members' (unit tests and the in-process suites, no root needed),
/// then, as root, the root suite. `args`: test name filters, and other `cargo test` flags.
fn test(fresh: bool, args: &[String]) -> Result<()> {
    let (filters, extra): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| !a.starts_with('-'));
    // --no-fail-fast: one failing test binary must not hide the results of the others.
    let mut plain = cargo_test(false);
    plain
        .arg("--no-fail-fast")
        .args(&extra)
        .arg("--")
        .args(&filters);
    let (mut ok, mut passed, mut failed, _) = run_tests(&mut plain)?;
    if is_root() {
        build_binaries()?;
        let mut rooted = cargo_test(true);
        rooted
            .arg("--no-fail-fast")
            .args(&extra)
            .arg("--")
            .args(&filters);
        if fresh {
            eprintln!("xtask: the root tests run in a private mount namespace, as on a fresh machine: no bpffs mounted, empty /tmp and guard state directories");
            fresh::isolate(&mut rooted)?;
        }
        let (r_ok, r_passed, r_failed, _) = run_tests(&mut rooted)?;
        ok &= r_ok;
        passed += r_passed;
        failed += r_failed;
        // One closing line for the whole run (cargo's last line is the doc tests').
        println!("tests: {passed} passed, {failed} failed");
    } else {
        let skipped = root_tests(&filters)?;
        eprintln!();
        eprintln!("{}", "#".repeat(80));
        eprintln!(
            "# NOT ROOT: the {} tests of the root suite ({ROOT_SUITE}: real eBPF) were SKIPPED:",
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
    }
    if !ok {
        bail!("tests failed");
    }
    Ok(())
}
