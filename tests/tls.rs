//! TLS interception end to end, without root (guard in-process, `guard_testkit::inproc`):
//! HTTPS MCP servers named by a policy are enforced exactly as over plain HTTP, everything else
//! passes through untouched, and a bad upstream never gets a plaintext fallback. Clients trust
//! guard's CA through the variables `guard exec` sets (the root suite checks `guard exec`
//! itself).

use std::{fs, path::Path, time::Duration};

use guard_testkit::{inproc::*, peers::*, pki::*, process::*};
use serde_json::{json, Value};

fn policy(port: u16) -> String {
    json!({
        "version": "1",
        "server": { "name": "secure", "match": [format!("127.0.0.3:{port}")] },
        "default": "deny",
        "tools": { "echo": {}, "delete_file": { "action": "deny", "reason": "no deletions" } }
    })
    .to_string()
}

struct Setup {
    // Dropped in this order: guard, the server, then the directory.
    env: Guard,
    pki: Pki,
    server: Server,
    dir: TestDir,
}

/// guard trusting a test CA upstream, with a policy for an HTTPS server on 127.0.0.3.
fn setup(proxy: &str) -> Setup {
    setup_with(proxy, false)
}

/// `setup`, the server also logging every HTTP request to `http.jsonl` in the directory.
fn setup_with(proxy: &str, http_log: bool) -> Setup {
    let dir = TestDir::new("tls");
    let pki = Pki::new(dir.path(), "test-ca");
    let cert = pki.leaf("server", &["127.0.0.3", "mcp.test"], false);
    let log = dir.join("http.jsonl").display().to_string();
    let mut args = vec!["--json-response"];
    if http_log {
        args.extend(["--http-log", &log]);
    }
    let server = https_server(dir.path(), "calls.jsonl", "127.0.0.3", &cert, &args);
    dir.write_policy("secure.json", &policy(server.port));
    let env = Guard::start(&dir, proxy, &extra_roots(&[&pki.ca_pem]));
    Setup {
        env,
        pki,
        server,
        dir,
    }
}

/// The `[tls]` table trusting `roots` upstream.
fn extra_roots(roots: &[&Path]) -> String {
    let list: Vec<String> = roots
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    format!("[tls]\nextra_roots = [{}]\n", list.join(", "))
}

/// The route `agent` takes to `host:port`.
fn route(env: &Guard, host: &str, port: u16, agent: &str) -> u16 {
    let dst = format!("{host}:{port}").parse().unwrap();
    env.route(dst, agent).port()
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

/// What a client connecting to `host:port` (through guard) with SNI `name` sees as the issuer.
fn issuer_probe(env: &Guard, host: &str, port: u16, name: &str, cafile: Option<&Path>) -> String {
    let port = route(env, host, port, "probe").to_string();
    let py = peer_python().display().to_string();
    let mut args = vec![py.as_str(), "-c", ISSUER_PROBE, host, &port, name];
    let ca;
    if let Some(c) = cafile {
        ca = c.display().to_string();
        args.push(&ca);
    }
    run_ok(&mut env.command(&args)).trim().to_string()
}

#[test]
fn python_sdk_over_https_is_enforced_with_a_guard_minted_certificate() {
    let s = setup("");
    let (env, server) = (&s.env, &s.server);
    let args = client_args(
        &env.url("tls-bot", &server.url),
        "streamable-http",
        true,
        &[
            ("echo", r#"{"text":"over tls"}"#),
            ("delete_file", r#"{"path":"/"}"#),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // No CA flags: the client relies on SSL_CERT_FILE, as guard exec sets it.
    let run = parse_client(&run(&mut env.command(&args), Duration::from_secs(120)));
    assert_eq!(run.tools.clone().unwrap(), vec!["echo"]);
    assert_eq!(run.text(0), "over tls");
    assert_eq!(run.error(1)["code"], -32001);
    assert_eq!(run.error(1)["data"]["guard"]["reason"], "no deletions");
    assert_eq!(server.tools_called(), vec!["echo"]);
    // The agent saw a certificate minted by guard.
    assert_eq!(
        issuer_probe(env, "127.0.0.3", server.port, "127.0.0.3", None),
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
fn https_to_a_host_no_policy_names_passes_through_untouched() {
    let s = setup("");
    let (env, pki, dir) = (&s.env, &s.pki, &s.dir);
    let cert = pki.leaf("localhost", &["localhost"], false);
    let plain = https_server(dir.path(), "plain.jsonl", "127.0.0.1", &cert, &[]);
    // The client sees the real server's certificate (issued by the test CA, not by guard).
    assert_eq!(
        issuer_probe(env, "127.0.0.1", plain.port, "localhost", Some(&pki.ca_pem)),
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
fn sni_that_does_not_resolve_to_the_destination_is_refused() {
    let s = setup("");
    let (env, pki, dir) = (&s.env, &s.pki, &s.dir);
    let cert = pki.leaf("elsewhere", &["localhost"], false);
    let other = https_server(dir.path(), "other.jsonl", "127.0.0.5", &cert, &[]);
    // SNI "localhost" (127.0.0.1 / ::1) while connecting to 127.0.0.5: domain fronting.
    let out = issuer_probe(env, "127.0.0.5", other.port, "localhost", Some(&pki.ca_pem));
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
fn a_named_destination_is_intercepted_whatever_the_sni() {
    let s = setup("");
    let (env, server) = (&s.env, &s.server);
    // SNI "localhost" resolves elsewhere, but the destination is the policy's server: intercepted
    // (the agent sees guard's certificate), never passed through.
    assert_eq!(
        issuer_probe(env, "127.0.0.3", server.port, "localhost", None),
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
fn an_invalid_upstream_certificate_gives_502_and_never_plaintext() {
    let dir = TestDir::new("tls-bad-upstream");
    let pki = Pki::new(dir.path(), "test-ca");
    let stranger = Pki::new(dir.path(), "stranger-ca");
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
                    dir.path(),
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
    dir.write_policy(
        "secure.json",
        &json!({"version":"1","server":{"name":"secure","match":matches},"default":"allow"})
            .to_string(),
    );
    let env = Guard::start(&dir, "", &extra_roots(&[&pki.ca_pem]));
    for (label, server) in &servers {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
        let (code, _) = env.curl_post(&server.url, &[], body);
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
fn bad_client_hellos_are_closed_cleanly_and_audited() {
    let s = setup("header_timeout_s = 2");
    let (env, server) = (&s.env, &s.server);
    let py = peer_python().display().to_string();
    let port = route(env, "127.0.0.3", server.port, "bad-tls").to_string();
    let out = run_ok(&mut env.command(&[&py, "-c", BAD_HELLOS, &port]));
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
        &env.url("after", &server.url),
        "streamable-http",
        false,
        &[("echo", r#"{"text":"fine"}"#)],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = parse_client(&run(&mut env.command(&args), Duration::from_secs(120)));
    assert_eq!(run.text(0), "fine");
}

#[test]
fn http2_and_http1_clients_are_both_enforced() {
    let s = setup("");
    let (env, server) = (&s.env, &s.server);
    let url = env.url("curl", &server.url);
    let denied = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/"}}}"#;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    for version in ["--http2", "--http1.1"] {
        let post = |body: &str| {
            let out = run_ok(&mut env.command(&[
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
                &url,
            ]));
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
fn upstream_tls_connections_are_reused_only_by_the_same_agent_instance() {
    let s = setup_with("", true);
    let (env, server, dir) = (&s.env, &s.server, &s.dir);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let curl = |url: String| {
        format!(
            "curl -sS --fail --max-time 20 -o /dev/null -H 'content-type: application/json' \
             -H 'accept: application/json, text/event-stream' --data '{init}' {url}"
        )
    };
    // One agent instance, two connections one after the other (two processes), then another
    // instance of the same agent name.
    let first = curl(env.url_instance("pool", 1, &server.url));
    let second = curl(env.url_instance("pool", 2, &server.url));
    run_ok(&mut env.command(&["sh", "-c", &format!("{first} && {first}")]));
    run_ok(&mut env.command(&["sh", "-c", &second]));
    let log = fs::read_to_string(dir.join("http.jsonl")).unwrap();
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
