//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs guard's fuzz targets (fuzz/, one per
//! parser guard writes itself: the request-line classifier, the ClientHello reader, the SSE
//! parser, the JSON-RPC body reader, the key canonicaliser) with cargo-fuzz on the pinned
//! nightly, each for a bounded time, and reports how many inputs each ran. cargo-fuzz is
//! installed (pinned) under ~/.cache/guard the first time. A crash stops the run and leaves its
//! input under fuzz/artifacts/.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{repo_root, setup, status};

const CARGO_FUZZ: &str = "0.13.2";
pub const TARGETS: &[&str] = &["classify", "client_hello", "sse", "body", "keys"];

pub fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let pins = setup::pins()?;
    let bin = cargo_fuzz()?;
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let fuzz_dir = repo_root().join("fuzz");
    let mut report = Vec::new();
    for t in chosen {
        if !TARGETS.contains(&t) {
            bail!("no fuzz target {t}: the targets are {}", TARGETS.join(", "));
        }
        // A corpus of its own per target, kept between runs (not in git).
        let corpus = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let out = Command::new(&bin)
            .current_dir(&fuzz_dir)
            // The cargo cargo-fuzz runs is the pinned nightly's (sanitizers need one).
            .env("RUSTUP_TOOLCHAIN", &pins.toolchain)
            .args(["run", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-max_len=4096", "-print_final_stats=1"])
            .env("CARGO_TARGET_DIR", repo_root().join("target/fuzz"))
            .stdout(Stdio::inherit())
            .output()
            .with_context(|| format!("running cargo fuzz for {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {t} failed (its input is under fuzz/artifacts/{t}/)");
        }
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|| "?".into());
        report.push(format!("{t}: {execs} inputs, no crash"));
    }
    for r in &report {
        println!("fuzz {r}");
    }
    Ok(())
}

/// cargo-fuzz at its pinned version, installed under the cache the first time.
fn cargo_fuzz() -> Result<PathBuf> {
    let root = setup::cache_dir()?.join(format!("cargo-fuzz-{CARGO_FUZZ}"));
    let bin = root.join("bin/cargo-fuzz");
    if !bin.exists() {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ}");
        status(
            Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ])
                .arg("--root")
                .arg(&root),
        )?;
    }
    Ok(bin)
}
