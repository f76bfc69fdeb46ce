//! `cargo xtask setup | build | run | test`: everything a fresh machine needs, idempotently.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};

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
    /// Run every test; as root, including the integration tests with real eBPF.
    Test {
        /// Extra arguments for `cargo test` (after `--`: test name filters).
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
        Cmd::Test { args } => {
            setup()?;
            test(&args)
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
    Ok(())
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

fn test(args: &[String]) -> Result<()> {
    let root = repo_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--workspace", "--exclude", "guard-ebpf"]);
    let (filters, extra): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| !a.starts_with('-'));
    cmd.args(extra);
    cmd.arg("--");
    cmd.args(filters);
    if is_root() {
        // Root-only tests carry #[ignore = "needs root ..."]; root runs them all.
        cmd.arg("--include-ignored");
        status(&mut cmd)
    } else {
        let result = status(&mut cmd);
        let list = Command::new("cargo")
            .current_dir(&root)
            .args([
                "test",
                "--workspace",
                "--exclude",
                "guard-ebpf",
                "--",
                "--list",
                "--ignored",
            ])
            .output()?;
        let skipped: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_string)
            .collect();
        eprintln!();
        eprintln!(
            "################################################################################"
        );
        eprintln!(
            "# NOT ROOT: {} integration tests that need root and real eBPF were SKIPPED:",
            skipped.len()
        );
        for t in &skipped {
            eprintln!("#   {t}");
        }
        eprintln!("# Run `sudo cargo xtask test` (CI runs as root and runs them all).");
        eprintln!(
            "################################################################################"
        );
        result
    }
}
