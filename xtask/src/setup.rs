//! `cargo xtask setup`: the pinned eBPF toolchain, bpf-linker, rustfmt and clippy, and the test
//! peers (system packages, a Python venv, Node modules), each installed only when missing.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{is_root, repo_root, status, which};

pub(crate) struct Pins {
    pub(crate) toolchain: String,
    bpf_linker: String,
    llvm_feature: String,
}

pub(crate) fn pins() -> Result<Pins> {
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

pub(crate) fn cache_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".cache/guard"))
}

/// Every step, in order; each one checks first and changes nothing when its part is in place.
pub fn setup() -> Result<()> {
    let p = pins()?;
    rust_src(&p)?;
    bpf_linker(&p)?;
    host_components()?;
    system_packages()?;
    test_peers()?;
    Ok(())
}

/// Step 1 of setup: the pinned nightly with rust-src (for -Z build-std=core).
fn rust_src(p: &Pins) -> Result<()> {
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
    Ok(())
}

/// Step 2 of setup: bpf-linker, built against that nightly's own libLLVM (no system LLVM needed).
fn bpf_linker(p: &Pins) -> Result<()> {
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
    Ok(())
}

/// Step 3 of setup: rustfmt and clippy for the host toolchain (CI checks both).
fn host_components() -> Result<()> {
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
    Ok(())
}

/// Step 4 of setup: the peers the integration tests drive (curl, unshare, python3, tmux).
fn system_packages() -> Result<()> {
    let missing: Vec<&str> = [
        ("curl", "curl"),
        ("unshare", "util-linux"),
        ("python3", "python3"),
        // `guard approvals watch` is driven in a terminal by the tests.
        ("tmux", "tmux"),
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

    // Python: venvs of the system python3, the one every user can run: the 1.x SDK (`py`) and
    // the 2.x SDK (`py2`; both are the package `mcp`, so each has its own venv).
    python_venv(&src, &dir, RECIPE, "requirements.txt", "py")?;
    python_venv(&src, &dir, RECIPE, "requirements-mcp2.txt", "py2")?;

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
    go_peer(&src, &dir, RECIPE)
}

/// The Go test server (tests/peers/mcp_server.go, standard library only), built with Debian's
/// Go (installed when missing) into `go-<hash>/mcp_server_go`, pointed at by the link `go`.
/// A venv named `<link>-<hash>` of tests/peers/`reqs`, installed unless its marker says it is,
/// and the symlink `link` to it.
fn python_venv(src: &Path, dir: &Path, recipe: &str, reqs_file: &str, link: &str) -> Result<()> {
    let reqs = fs::read(src.join(reqs_file))
        .with_context(|| format!("reading tests/peers/{reqs_file}"))?;
    // The 1.x venv keeps the hash it always had (no reinstall on machines that have it).
    let hash = match link {
        "py" => peers_hash(&[recipe.as_bytes(), b"python", &reqs]),
        _ => peers_hash(&[recipe.as_bytes(), link.as_bytes(), &reqs]),
    };
    let venv = dir.join(format!("{link}-{}", &hash[..12]));
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
            "xtask: installing the Python test peers ({reqs_file}) into {}",
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
                .arg(src.join(reqs_file)),
        )?;
        status(Command::new(&py).args(["-m", "pip", "check", "--disable-pip-version-check"]))?;
        peers_finish(&venv, &hash)?;
    }
    peers_link(&dir.join(link), &venv)
}

fn go_peer(src: &Path, dir: &Path, recipe: &str) -> Result<()> {
    let code = fs::read(src.join("mcp_server.go")).context("reading tests/peers/mcp_server.go")?;
    let hash = peers_hash(&[recipe.as_bytes(), b"go", &code]);
    let out = dir.join(format!("go-{}", &hash[..12]));
    if !peers_installed(&out, &hash) {
        if which("go").is_none() {
            install_packages(&["golang-go"])?;
        }
        eprintln!("xtask: building the Go test server into {}", out.display());
        remove_dir_if_exists(&out)?;
        let build = out.join("src");
        fs::create_dir_all(&build)?;
        fs::write(build.join("mcp_server.go"), &code)?;
        fs::write(build.join("go.mod"), "module guardtestpeers\n\ngo 1.19\n")?;
        status(
            Command::new("go")
                .current_dir(&build)
                .args(["build", "-o"])
                .arg(out.join("mcp_server_go"))
                .arg(".")
                // No network: the server needs only the standard library.
                .env("GOFLAGS", "-mod=mod")
                .env("GOPROXY", "off")
                .env("CGO_ENABLED", "0"),
        )?;
        remove_dir_if_exists(&build)?;
        peers_finish(&out, &hash)?;
    }
    peers_link(&dir.join("go"), &out)
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

/// What `cargo xtask bench` needs beyond the test peers: Debian's nginx, the plain
/// reverse-proxy hop guard is compared with, and perf for profiles. Installing nginx would start
/// the system's nginx on port 80; a `policy-rc.d` that refuses keeps it from starting (the bench
/// runs its own, on loopback, with a config of its own).
pub fn bench_peers() -> Result<()> {
    let mut missing = Vec::new();
    if !Path::new("/usr/sbin/nginx").exists() {
        missing.push("nginx-light");
    }
    if which("perf").is_none() {
        missing.push("linux-perf");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    // Someone else's policy-rc.d stays as it is (and decides).
    let ours = !policy.exists();
    if ours && is_root() {
        use std::os::unix::fs::PermissionsExt as _;
        fs::write(
            policy,
            "#!/bin/sh\n# guard xtask: no service starts while it installs\nexit 101\n",
        )?;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))?;
    }
    let installed = install_packages(&missing);
    if ours {
        let _ = fs::remove_file(policy);
    }
    installed
}
