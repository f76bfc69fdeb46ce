//! Signed policy bundles (`policy.source`) with the real daemon: served by a local HTTPS server
//! (Python's http.server with ETag / If-None-Match), applied when the signature verifies and
//! every file loads; a bad signature, a valid signature over an invalid policy, an old bundle
//! served again and an unreachable source keep the set in force, each audited.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use guard::policy::bundle;
use guard_testkit::{peers::*, pki::Pki, process::*, read_audit, root::*};
use serde_json::{json, Value};

/// An HTTPS static file server: answers GET with the file and its ETag, 304 when the client's
/// If-None-Match is that ETag, and logs `path if-none-match status` per request.
const SERVER: &str = r#"
import hashlib, http.server, os, ssl, sys
root, cert, key, log, port = sys.argv[1:6]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        p = os.path.join(root, self.path.lstrip('/'))
        try:
            data = open(p, 'rb').read()
        except OSError:
            self.send_response(404); self.end_headers(); self.note(404); return
        tag = '"' + hashlib.sha256(data).hexdigest() + '"'
        if self.headers.get('If-None-Match') == tag:
            self.send_response(304); self.send_header('ETag', tag); self.end_headers(); self.note(304); return
        self.send_response(200); self.send_header('ETag', tag)
        self.send_header('Content-Length', str(len(data))); self.end_headers(); self.wfile.write(data)
        self.note(200)
    def note(self, status):
        with open(log, 'a') as f:
            f.write('%s %s %d\n' % (self.path, self.headers.get('If-None-Match') or '-', status))
    def log_message(self, *a): pass
s = http.server.HTTPServer(('127.0.0.1', int(port)), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

struct Https {
    child: Child,
    port: u16,
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server on `port` (0: any).
fn https(dir: &Path, cert: &(PathBuf, PathBuf), port: u16) -> Https {
    let script = dir.join("bundle_server.py");
    fs::write(&script, SERVER).unwrap();
    let mut child = spawn(
        Command::new("python3")
            .arg(&script)
            .arg(dir.join("www"))
            .arg(&cert.0)
            .arg(&cert.1)
            .arg(dir.join("www.log"))
            .arg(port.to_string())
            .stdout(Stdio::piped()),
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the HTTPS server's port");
    Https { child, port }
}

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(30), "{what} within 30s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn policy(port: u16, tools: Value) -> String {
    json!({
        "version": "1",
        "server": { "name": "signed", "match": [format!("127.0.0.3:{port}")] },
        "default": "deny",
        "tools": tools
    })
    .to_string()
}

/// A bundle of `files` signed with `sk` now.
fn sign(files: &[(&str, String)], sk: &str) -> Vec<u8> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    bundle::pack(&files, sk, None, now).unwrap()
}

fn rejections(env: &Env) -> Vec<Value> {
    read_audit(&env.audit_log)
        .into_iter()
        .filter(|r| r["event"] == "policy_reload" && r["decision"] == "rejected")
        .collect()
}

fn sha(env: &Env) -> String {
    env.status()["policy"]["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn signed_bundles_are_applied_and_bad_ones_keep_the_set_in_force() {
    let mut env = Env::configured("", "", "");
    let server = python_server(
        &env.dir.join("calls.jsonl"),
        &["--host", "127.0.0.3", "--port", "0", "--json-response"],
    );
    let pki = Pki::new(&env.dir, "bundle-ca");
    let cert = pki.leaf("bundle-server", &["127.0.0.1"], false);
    fs::create_dir_all(env.dir.join("www")).unwrap();
    let out = run_ok(
        env.guard()
            .arg("policy")
            .arg("keygen")
            .arg(env.dir.join("signer")),
    );
    assert!(out.contains("verify_key = \"RW"), "{out}");
    let sk = fs::read_to_string(env.dir.join("signer.key")).unwrap();

    // Bundle A, made with `guard policy sign` from a directory: echo allowed.
    let a_dir = env.dir.join("a");
    fs::create_dir_all(&a_dir).unwrap();
    fs::write(
        a_dir.join("signed.json"),
        policy(server.port, json!({ "echo": {}, "add": {} })),
    )
    .unwrap();
    let out = run_ok(
        env.guard()
            .args(["policy", "sign"])
            .arg(&a_dir)
            .arg("--key")
            .arg(env.dir.join("signer.key"))
            .arg("-o")
            .arg(env.dir.join("www/bundle.tar.gz")),
    );
    let sha_a = out.trim().rsplit(' ').next().unwrap().to_string();
    let bundle_a = fs::read(env.dir.join("www/bundle.tar.gz")).unwrap();
    let srv = https(&env.dir, &cert, 0);
    env.append_config(&format!(
        "[policy]\nsource = \"https://127.0.0.1:{}/bundle.tar.gz\"\nverify_key = \"{}\"\npoll_s = 1\n\n[tls]\nextra_roots = [\"{}\"]\n",
        srv.port,
        env.dir.join("signer.pub").display(),
        pki.ca_pem.display()
    ));
    env.start_daemon();
    eventually("bundle A applied", || sha(&env) == sha_a);
    let st = env.status();
    assert_eq!(st["policy"]["signed"], true, "{st:#}");
    assert!(st["policy"]["source"]
        .as_str()
        .unwrap()
        .starts_with("https://127.0.0.1:"));

    // A call is decided by A, and its record carries A's hash.
    let url = format!("http://127.0.0.3:{}/mcp", server.port);
    let args = client_args(
        &url,
        "streamable-http",
        false,
        &[("echo", r#"{"text":"a"}"#), ("add", r#"{"a":1,"b":2}"#)],
    );
    let run1 = parse_client(&run(
        &mut env.exec(
            "signed-bot",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        Duration::from_secs(60),
    ));
    assert_eq!(run1.text(0), "a");
    let calls: Vec<Value> = read_audit(&env.audit_log)
        .into_iter()
        .filter(|r| r["event"] == "tool_call")
        .collect();
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|r| r["policy"] == sha_a.as_str()),
        "{calls:#?}"
    );
    let m = env.metrics();
    assert!(
        m.contains(&format!("guard_policy_info{{sha256=\"{sha_a}\",source=\"https://127.0.0.1:{}/bundle.tar.gz\"}} 1", srv.port)),
        "{m}"
    );
    assert!(m.contains("guard_policy_age_seconds "), "{m}");
    // Polls after the first send the ETag and get 304.
    eventually("a conditional poll answered 304", || {
        fs::read_to_string(env.dir.join("www.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.ends_with(" 304") && !l.contains(" - "))
    });

    // A bundle signed by another key: refused, audited, A stays.
    let stranger = bundle::keygen("").unwrap().0;
    fs::write(
        env.dir.join("www/bundle.tar.gz"),
        sign(
            &[("signed.json", policy(server.port, json!({ "add": {} })))],
            &stranger,
        ),
    )
    .unwrap();
    eventually("the stranger's bundle refused", || {
        rejections(&env).iter().any(|r| {
            r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("does not verify")
        })
    });
    assert_eq!(sha(&env), sha_a);

    // Our key over a policy that does not load: refused with the file and line, A stays.
    fs::write(
        env.dir.join("www/bundle.tar.gz"),
        sign(
            &[("signed.json", "{\"version\": \"1\", \"tools\": 3}".into())],
            &sk,
        ),
    )
    .unwrap();
    eventually("the invalid policy refused", || {
        rejections(&env).iter().any(|r| {
            let why = r["reason"].as_str().unwrap_or("");
            why.contains("policies are invalid") && why.contains("/bundle.tar.gz/signed.json:1:")
        })
    });
    assert_eq!(sha(&env), sha_a);

    // A newer valid bundle B: applied (echo now denied).
    std::thread::sleep(Duration::from_millis(1100));
    let b_text = policy(server.port, json!({ "add": {} }));
    fs::write(
        env.dir.join("www/bundle.tar.gz"),
        sign(&[("signed.json", b_text.clone())], &sk),
    )
    .unwrap();
    let sha_b = bundle::digest(&[("signed.json".into(), b_text)]);
    eventually("bundle B applied", || sha(&env) == sha_b);
    let run2 = parse_client(&run(
        &mut env.exec(
            "signed-bot",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        Duration::from_secs(60),
    ));
    assert_eq!(run2.error(0)["code"], -32001, "echo is denied under B");
    assert_eq!(
        server
            .tools_called()
            .iter()
            .filter(|t| *t == "echo")
            .count(),
        1,
        "the server saw only the echo A allowed"
    );

    // A served again (validly signed, but older than B): refused, B stays.
    fs::write(env.dir.join("www/bundle.tar.gz"), &bundle_a).unwrap();
    eventually("the old bundle refused", || {
        rejections(&env).iter().any(|r| {
            r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("an old bundle is not applied again")
        })
    });
    assert_eq!(sha(&env), sha_b);

    let port = srv.port;
    // The source goes away: refused (audited once), B stays; a restart starts from B, kept.
    drop(srv);
    eventually("the unreachable source audited", || {
        rejections(&env).iter().any(|r| {
            r["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("fetching https://127.0.0.1:")
        })
    });
    std::thread::sleep(Duration::from_secs(3));
    let fetch_failures = rejections(&env)
        .iter()
        .filter(|r| r["reason"].as_str().unwrap_or("").starts_with("fetching"))
        .count();
    assert_eq!(fetch_failures, 1, "a failure that repeats is audited once");
    assert_eq!(sha(&env), sha_b);
    assert!(env.status()["policy"]["last_error"]
        .as_str()
        .unwrap()
        .contains("fetching"));
    env.stop_daemon();
    env.start_daemon();
    assert_eq!(
        sha(&env),
        sha_b,
        "the kept bundle is in force after a restart"
    );

    // The kept bundle lost (the state directory keeps only the newest signing time): the old
    // bundle A served again is still refused.
    env.stop_daemon();
    fs::remove_dir_all(env.dir.join("state/policy-bundle")).unwrap();
    fs::write(env.dir.join("www/bundle.tar.gz"), &bundle_a).unwrap();
    let _srv = https(&env.dir, &cert, port);
    env.start_daemon();
    assert_eq!(
        env.status()["policy"]["servers"],
        0,
        "nothing kept: no server known"
    );
    eventually("the old bundle refused after the kept one was lost", || {
        env.status()["policy"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("an old bundle is not applied again"))
    });
    assert_ne!(sha(&env), sha_a);
}
