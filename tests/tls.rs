//! TLS interception end to end: HTTPS MCP servers named by a policy are enforced exactly as over
//! plain HTTP, everything else passes through untouched, and a bad upstream never gets a
//! plaintext fallback.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{peers::*, *};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{json, Value};

/// A test CA and the server certificates it (or a stranger) signs.
struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join(format!("{name}.pem"));
        fs::write(&ca_pem, cert.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// A server certificate for `sans` (DNS names or IPs); `expired` makes it end yesterday.
    fn leaf(&self, file: &str, sans: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(10);
            params.not_after = now - time::Duration::days(1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(10);
        }
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let c = self.dir.join(format!("{file}.pem"));
        let k = self.dir.join(format!("{file}.key"));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        for p in [&c, &k, &self.ca_pem] {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
        }
        (c, k)
    }
}

fn https_server(
    env: &Env,
    log: &str,
    host: &str,
    cert: &(PathBuf, PathBuf),
    extra: &[&str],
) -> Server {
    let c = cert.0.to_str().unwrap().to_string();
    let k = cert.1.to_str().unwrap().to_string();
    let mut args = vec![
        "--host",
        host,
        "--port",
        "0",
        "--certfile",
        &c,
        "--keyfile",
        &k,
    ];
    args.extend_from_slice(extra);
    python_server(&env.dir.join(log), &args)
}

fn policy(port: u16) -> String {
    json!({
        "version": "1",
        "server": { "name": "secure", "match": [format!("127.0.0.3:{port}")] },
        "default": "deny",
        "tools": { "echo": {}, "delete_file": { "action": "deny", "reason": "no deletions" } }
    })
    .to_string()
}

/// An environment trusting `pki` upstream, with a policy for an HTTPS server on 127.0.0.3.
fn setup(extra_proxy: &str) -> (Env, Pki, Server) {
    setup_with(extra_proxy, false)
}

/// `setup`, the server also logging every HTTP request to `http.jsonl` in the env's dir.
fn setup_with(extra_proxy: &str, http_log: bool) -> (Env, Pki, Server) {
    let env0 = Env::configured("", extra_proxy, "");
    let pki = Pki::new(&env0.dir, "test-ca");
    let cert = pki.leaf("server", &["127.0.0.3", "mcp.test"], false);
    let log = env0.dir.join("http.jsonl").display().to_string();
    let mut args = vec!["--json-response"];
    if http_log {
        args.extend(["--http-log", &log]);
    }
    let server = https_server(&env0, "calls.jsonl", "127.0.0.3", &cert, &args);
    env0.write_policy("secure.json", &policy(server.port));
    let env = env0.with_tls_extra_roots(&[&pki.ca_pem]);
    (env, pki, server)
}

trait TlsEnv {
    fn with_tls_extra_roots(self, roots: &[&Path]) -> Env;
}

impl TlsEnv for Env {
    fn with_tls_extra_roots(mut self, roots: &[&Path]) -> Env {
        let list: Vec<String> = roots
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        self.append_config(&format!("[tls]\nextra_roots = [{}]\n", list.join(", ")));
        self.start_daemon();
        self
    }
}

const ISSUER_PROBE: &str = r#"
import socket, ssl, sys
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=sys.argv[4] if len(sys.argv) > 4 else None)
try:
    with socket.create_connection((host, port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=name) as t:
            issuer = dict(x[0] for x in t.getpeercert()["issuer"])
            print("issuer", issuer.get("commonName"))
except (ssl.SSLError, OSError) as e:
    print("error", type(e).__name__, e)
"#;

fn issuer_probe(env: &Env, host: &str, port: u16, name: &str, cafile: Option<&Path>) -> String {
    let port = port.to_string();
    let py = peer_python().display().to_string();
    let mut args = vec![py.as_str(), "-c", ISSUER_PROBE, host, &port, name];
    let ca;
    if let Some(c) = cafile {
        ca = c.display().to_string();
        args.push(&ca);
    }
    run_ok(&mut env.exec("probe", &args)).trim().to_string()
}

#[test]
#[ignore = "needs root and eBPF"]
fn python_sdk_over_https_is_enforced_with_a_guard_minted_certificate() {
    let (env, _pki, server) = setup("");
    let args = client_args(
        &server.url,
        "streamable-http",
        true,
        &[
            ("echo", r#"{"text":"over tls"}"#),
            ("delete_file", r#"{"path":"/"}"#),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // No CA flags: the client relies on SSL_CERT_FILE, set by guard exec.
    let run = parse_client(&run(
        &mut env.exec("tls-bot", &args),
        Duration::from_secs(120),
    ));
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
    assert_eq!(run.text(0), "over tls");
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(run.error(1)["data"]["guard"]["reason"], "no deletions");
    assert_eq!(server.tools_called(), vec!["echo"]);
    // The agent saw a certificate minted by guard.
    assert_eq!(
        issuer_probe(&env, "127.0.0.3", server.port, "127.0.0.3", None),
        "issuer guard interception CA"
    );
    let call = env
        .audit()
        .into_iter()
        .find(|r| r["event"] == "tool_call" && r["tool"] == "echo")
        .unwrap();
    assert_eq!(call["decision"], "allow");
    let conn = env
        .audit_connections()
        .into_iter()
        .find(|r| r["transport"] == "tls")
        .unwrap();
    assert_eq!(conn["detail"]["intercepted"], true);
    assert_eq!(conn["rule"], "tls.intercept");
}

#[test]
#[ignore = "needs root and eBPF"]
fn node_sdk_client_relies_only_on_the_injected_variables() {
    let (env, _pki, server) = setup("");
    let node_modules = peers_dir().join("node/node_modules");
    let script = script("mcp_client.mjs");
    let out = run(
        &mut env.exec(
            "node-bot",
            &[
                "node",
                script.to_str().unwrap(),
                &server.url,
                "--node-modules",
                node_modules.to_str().unwrap(),
                "--list",
                "--call",
                "echo",
                r#"{"text":"from node"}"#,
                "--call",
                "delete_file",
                r#"{"path":"/"}"#,
            ],
        ),
        Duration::from_secs(120),
    );
    let run = parse_client(&out);
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
    assert_eq!(run.text(0), "from node");
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(server.tools_called(), vec!["echo"]);
}

#[test]
#[ignore = "needs root and eBPF"]
fn https_to_a_host_no_policy_names_passes_through_untouched() {
    let (env, pki, _server) = setup("");
    let cert = pki.leaf("localhost", &["localhost"], false);
    let plain = https_server(&env, "plain.jsonl", "127.0.0.1", &cert, &[]);
    // The client sees the real server's certificate (issued by the test CA, not by guard).
    assert_eq!(
        issuer_probe(
            &env,
            "localhost",
            plain.port,
            "localhost",
            Some(&pki.ca_pem)
        ),
        "issuer test-ca"
    );
    let conn = env
        .audit_connections()
        .into_iter()
        .find(|r| r["original_dst"] == format!("127.0.0.1:{}", plain.port))
        .expect("the passthrough is audited");
    assert_eq!(conn["transport"], "tls");
    assert_eq!(conn["decision"], "pass");
    assert_eq!(conn["rule"], "tls.passthrough");
    assert_eq!(conn["detail"]["sni"], "localhost");
    assert_eq!(conn["detail"]["intercepted"], false);
}

#[test]
#[ignore = "needs root and eBPF"]
fn sni_that_does_not_resolve_to_the_destination_is_refused() {
    let (env, pki, _server) = setup("");
    let cert = pki.leaf("elsewhere", &["localhost"], false);
    let other = https_server(&env, "other.jsonl", "127.0.0.5", &cert, &[]);
    // SNI "localhost" (127.0.0.1 / ::1) while connecting to 127.0.0.5: domain fronting.
    let out = issuer_probe(
        &env,
        "127.0.0.5",
        other.port,
        "localhost",
        Some(&pki.ca_pem),
    );
    assert!(out.starts_with("error"), "{out}");
    let conn = env
        .audit_connections()
        .into_iter()
        .find(|r| r["original_dst"] == format!("127.0.0.5:{}", other.port))
        .unwrap();
    assert_eq!(conn["decision"], "deny");
    assert_eq!(conn["rule"], "tls.sni");
    assert!(
        conn["reason"].as_str().unwrap().contains("domain fronting"),
        "{conn}"
    );
}

#[test]
#[ignore = "needs root and eBPF"]
fn a_named_destination_is_intercepted_whatever_the_sni() {
    let (env, _pki, server) = setup("");
    // SNI "localhost" resolves elsewhere, but the destination is the policy's server: intercepted
    // (the agent sees guard's certificate), never passed through.
    assert_eq!(
        issuer_probe(&env, "127.0.0.3", server.port, "localhost", None),
        "issuer guard interception CA"
    );
    let conn = env
        .audit_connections()
        .into_iter()
        .find(|r| r["detail"]["sni"] == "localhost")
        .unwrap();
    assert_eq!(conn["detail"]["intercepted"], true, "{conn}");
}

#[test]
#[ignore = "needs root and eBPF"]
fn an_invalid_upstream_certificate_gives_502_and_never_plaintext() {
    let env = Env::new("");
    let pki = Pki::new(&env.dir, "test-ca");
    let stranger = Pki::new(&env.dir, "stranger-ca");
    let cases = [
        ("wrong-name", pki.leaf("wrong", &["other.example"], false)),
        (
            "unknown-issuer",
            stranger.leaf("stranger", &["127.0.0.3"], false),
        ),
        ("expired", pki.leaf("expired", &["127.0.0.3"], true)),
    ];
    let servers: Vec<(&str, Server)> = cases
        .iter()
        .map(|(label, cert)| {
            (
                *label,
                https_server(
                    &env,
                    &format!("{label}.jsonl"),
                    "127.0.0.3",
                    cert,
                    &["--json-response"],
                ),
            )
        })
        .collect();
    let matches: Vec<String> = servers
        .iter()
        .map(|(_, s)| format!("127.0.0.3:{}", s.port))
        .collect();
    env.write_policy(
        "secure.json",
        &json!({"version":"1","server":{"name":"secure","match":matches},"default":"allow"})
            .to_string(),
    );
    let env = env.with_tls_extra_roots(&[&pki.ca_pem]);
    for (label, server) in &servers {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
        let (code, _) = curl_post(&env, &server.url, &[], body);
        assert_eq!(code, 502, "{label}");
        assert!(server.calls().is_empty(), "{label}");
    }
    let errors: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "upstream_error")
        .collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("TLS")),
        "{errors:#?}"
    );
}

const BAD_HELLOS: &str = r#"
import socket, sys, time
port = int(sys.argv[1])
def attempt(label, data, wait):
    s = socket.create_connection(("127.0.0.3", port), timeout=15)
    s.sendall(data)
    start = time.time()
    try:
        got = s.recv(100)
        print(label, "closed" if not got else ("alert" if got[0] == 0x15 else "answered"), round(time.time() - start))
    except ConnectionResetError:
        print(label, "closed", round(time.time() - start))
    except socket.timeout:
        print(label, "hung")
attempt("garbage", b"\x16\x03\x01\x00\x20" + b"\x01\x00\x00\x1c" + b"\xff" * 28, 0)
attempt("truncated", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20, 3)
# A TLS 1.0-only ClientHello: legacy version 3.1, one CBC suite, no supported_versions.
body = b"\x03\x01" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
hs = b"\x01" + len(body).to_bytes(3, "big") + body
attempt("tls1.0", b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs, 0)
"#;

#[test]
#[ignore = "needs root and eBPF"]
fn bad_client_hellos_are_closed_cleanly_and_audited() {
    let (env, _pki, server) = setup("header_timeout_s = 2");
    let py = peer_python().display().to_string();
    let port = server.port.to_string();
    let out = run_ok(&mut env.exec("bad-tls", &[&py, "-c", BAD_HELLOS, &port]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("garbage closed"), "{out}");
    assert!(lines[1].starts_with("truncated closed"), "{out}");
    assert!(
        lines[2].starts_with("tls1.0 alert") || lines[2].starts_with("tls1.0 closed"),
        "{out}"
    );
    let denied: Vec<Value> = env
        .audit_connections()
        .into_iter()
        .filter(|r| r["transport"] == "tls" && r["decision"] == "deny")
        .collect();
    assert_eq!(denied.len(), 3, "{denied:#?}");
    // The daemon is unaffected.
    let args = client_args(
        &server.url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"fine"}"#)],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = parse_client(&run(
        &mut env.exec("after", &args),
        Duration::from_secs(120),
    ));
    assert_eq!(run.text(0), "fine");
}

#[test]
#[ignore = "needs root and eBPF"]
fn http2_and_http1_clients_are_both_enforced() {
    let (env, _pki, server) = setup("");
    let denied = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/"}}}"#;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    for version in ["--http2", "--http1.1"] {
        let post = |body: &str| {
            let out = run_ok(&mut env.exec(
                "curl",
                &[
                    "curl",
                    "-sS",
                    version,
                    "--max-time",
                    "20",
                    "-w",
                    "\n%{http_version} %{http_code}",
                    "-H",
                    "content-type: application/json",
                    "-H",
                    "accept: application/json, text/event-stream",
                    "--data",
                    body,
                    &server.url,
                ],
            ));
            let (body, status) = out.rsplit_once('\n').unwrap();
            (body.to_string(), status.to_string())
        };
        let (body, status) = post(denied);
        let want = if version == "--http2" {
            "2 200"
        } else {
            "1.1 200"
        };
        assert_eq!(status, want, "{version}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], -32001, "{version}");
        // An allowed request reaches the server over the HTTP/1.1 upstream.
        let (body, status) = post(init);
        assert_eq!(status, want, "{version}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["result"]["serverInfo"]["name"].as_str().map(|_| true),
            Some(true),
            "{version}: {v}"
        );
    }
    assert!(server.calls().is_empty());
    let alpn: Vec<Value> = env
        .audit_connections()
        .into_iter()
        .filter_map(|r| r["detail"].get("alpn_chosen").cloned())
        .collect();
    assert!(
        alpn.contains(&json!("h2")) && alpn.contains(&json!("http/1.1")),
        "{alpn:?}"
    );
}

#[test]
#[ignore = "needs root and eBPF"]
fn upstream_tls_connections_are_reused_only_by_the_same_agent_instance() {
    let (env, _pki, server) = setup_with("", true);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let curl = format!(
        "curl -sS --fail --max-time 20 -o /dev/null -H 'content-type: application/json' \
         -H 'accept: application/json, text/event-stream' --data '{init}' {}",
        server.url
    );
    // One agent instance, two connections one after the other (two processes), then another
    // instance of the same agent name.
    run_ok(&mut env.exec("pool", &["sh", "-c", &format!("{curl} && {curl}")]));
    run_ok(&mut env.exec("pool", &["sh", "-c", &curl]));
    let log = fs::read_to_string(env.dir.join("http.jsonl")).unwrap();
    let ports: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["method"] == "POST")
        .map(|r| r["client"][1].as_u64().unwrap())
        .collect();
    assert_eq!(ports.len(), 3, "{log}");
    // The second connection took the first one's upstream connection (no new handshake) ...
    assert_eq!(ports[0], ports[1], "{log}");
    // ... and another agent instance never gets it.
    assert_ne!(ports[2], ports[0], "{log}");
    let intercepted = env
        .audit_connections()
        .into_iter()
        .filter(|r| r["rule"] == "tls.intercept")
        .count();
    assert_eq!(intercepted, 3);
}
