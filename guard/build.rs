//! Builds the eBPF programs (guard-ebpf) with the pinned nightly and the bpf-linker that
//! `cargo xtask setup` installs, and leaves the object in OUT_DIR for `include_bytes!`.
use std::{env, fs, path::PathBuf};

fn pin(text: &str, key: &str) -> anyhow::Result<String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .ok_or_else(|| anyhow::anyhow!("guard-ebpf/toolchain.txt has no `{key}`"))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-check-cfg=cfg(fuzzing)");
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        // The fuzz targets (fuzz/, built by cargo-fuzz with sanitizers) exercise parsers only:
        // no eBPF object, so none of the eBPF toolchain under their flags.
        let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("guard");
        fs::write(out, b"")?;
        return Ok(());
    }
    let pins_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../guard-ebpf/toolchain.txt");
    println!("cargo:rerun-if-changed={pins_file}");
    println!("cargo:rerun-if-changed=../guard-common/src");
    let pins = fs::read_to_string(pins_file)?;
    let toolchain = pin(&pins, "toolchain")?;
    let linker = pin(&pins, "bpf-linker")?;
    // Where `cargo xtask setup` installs bpf-linker: first on PATH for the eBPF build.
    if let Some(home) = env::var_os("HOME") {
        let bin = PathBuf::from(home)
            .join(".cache/guard")
            .join(format!("bpf-linker-{linker}-{toolchain}"))
            .join("bin");
        if bin.join("bpf-linker").exists() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut paths = vec![bin];
            paths.extend(env::split_paths(&path));
            env::set_var("PATH", env::join_paths(paths)?);
        } else {
            println!(
                "cargo:warning=bpf-linker {linker} for {toolchain} is not installed: run `cargo xtask setup`"
            );
        }
    }
    let ebpf = aya_build::Package {
        name: "guard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../guard-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain))
}
