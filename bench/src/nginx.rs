//! The plain reverse-proxy hop guard is compared with: Debian's nginx (installed by `cargo xtask
//! bench`), in a cgroup of its own (its CPU is that cgroup's), with a config made for this run:
//! keep-alive connections to the upstream, no access log, one worker per CPU. It forwards to the
//! same in-process upstream the direct and the guarded sides call.

use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::env::{in_cgroup, track, untrack};

pub const BIN: &str = "/usr/sbin/nginx";

/// A running nginx (master and workers), stopped on drop.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    cgroup: PathBuf,
}

fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"# guard-bench: a plain reverse-proxy hop, the baseline guard is compared with.
daemon off;
master_process on;
worker_processes auto;
user nobody nogroup;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    upstream up {{
        server {upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    keepalive_requests 1000000;
    server {{
        listen {listen} reuseport;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// Starts nginx in `cgroup`, listening on a free port of 127.0.0.9, and waits until it
    /// accepts.
    pub fn start(dir: &Path, cgroup: &Path, upstream: SocketAddr) -> Result<Nginx> {
        if !Path::new(BIN).exists() {
            bail!("{BIN} is missing: `cargo xtask bench` installs it (package nginx-light)");
        }
        fs::create_dir_all(dir)?;
        // A free port: bound, read, released (nginx binds it a moment later).
        let addr = TcpListener::bind("127.0.0.9:0")?.local_addr()?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config(dir, addr, upstream))?;
        let mut cmd = Command::new(BIN);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?);
        in_cgroup(&mut cmd, cgroup);
        let child = cmd.spawn().context("starting nginx")?;
        track(child.id());
        let mut n = Nginx {
            child,
            addr,
            cgroup: cgroup.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(st)) = n.child.try_wait() {
                bail!(
                    "nginx exited ({st}): {}{}",
                    fs::read_to_string(dir.join("stderr.log")).unwrap_or_default(),
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {addr} within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }

    /// The CPU time of everything in nginx's cgroup (master and workers), ns.
    pub fn cpu_ns(&self) -> u64 {
        fs::read_to_string(self.cgroup.join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .map_or(0, |us| us * 1000)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown of the master and its workers.
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack(self.child.id());
        // Workers the master left behind go with the cgroup.
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
    }
}
