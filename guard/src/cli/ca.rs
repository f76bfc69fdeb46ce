//! `guard ca init | export | install`: the interception CA.

use std::process::Command;

use anyhow::{Context as _, Result};

use super::CaCmd;
use crate::config::Config;

pub(super) fn ca(config: &Config, cmd: CaCmd) -> Result<()> {
    let files = crate::proxy::tls::CaFiles::new(&config.paths.state_dir);
    match cmd {
        CaCmd::Init { force } => {
            crate::proxy::tls::ca_init(&files, force)?;
            println!(
                "created the guard CA: {} (key {})",
                files.cert.display(),
                files.key.display()
            );
            println!("restart the daemon so it mints leaves from the new CA");
        }
        CaCmd::Export => {
            let pem = std::fs::read_to_string(&files.cert).with_context(|| {
                format!(
                    "reading {} (create it with `guard ca init`, or start the daemon)",
                    files.cert.display()
                )
            })?;
            print!("{pem}");
        }
        CaCmd::Install => {
            let pem = std::fs::read_to_string(&files.cert).with_context(|| {
                format!(
                    "reading {} (create it with `guard ca init`)",
                    files.cert.display()
                )
            })?;
            let anchors = std::path::Path::new("/usr/local/share/ca-certificates");
            std::fs::create_dir_all(anchors)?;
            let dst = anchors.join("guard-ca.crt");
            std::fs::write(&dst, pem).with_context(|| format!("writing {}", dst.display()))?;
            let status = Command::new("update-ca-certificates")
                .status()
                .context("running update-ca-certificates (package ca-certificates)")?;
            if !status.success() {
                anyhow::bail!("update-ca-certificates failed: {status}");
            }
            println!("installed {} into the system trust store", dst.display());
            println!("runtimes that do not read the system store need the CA themselves:");
            println!(
                "  Node.js:        NODE_EXTRA_CA_CERTS={}",
                files.cert.display()
            );
            println!(
                "  Python (certifi-based: requests, httpx): SSL_CERT_FILE / REQUESTS_CA_BUNDLE={}",
                files.bundle.display()
            );
            println!(
                "  Java:           keytool -importcert -cacerts -alias guard -file {}",
                files.cert.display()
            );
            println!("`guard exec` sets SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE to {} for its agents.", files.bundle.display());
        }
    }
    Ok(())
}
