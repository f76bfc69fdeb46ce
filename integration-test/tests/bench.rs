//! `guard-bench run --quick` end to end against the debug daemon: every measurement README
//! "Performance" lists is made and written to the JSON report. No timing is asserted (targets
//! are checked by benchmarks, not timed tests): this checks that the benchmark works, not what
//! it measures.

use std::{path::PathBuf, process::Command};

use guard_testkit::root::{bin_path, require_root};
use serde_json::Value;

#[test]
fn a_quick_run_measures_everything_and_writes_the_report() {
    require_root();
    let guard = bin_path("guard");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("guard-bench-smoke-{}.json", std::process::id()));
    let run = Command::new(bin_path("guard-bench"))
        .arg("run")
        .arg("--quick")
        .arg("--guard")
        .arg(&guard)
        .arg("--out")
        .arg(&out)
        .arg("--repo")
        .arg(&repo)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("metric"), "{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    let r = &report["results"];
    // tools/call at 1, 16 and 64 clients, plain and through TLS interception; new connections
    // with a full and a resumed TLS handshake; the real servers.
    for c in ["c1", "c16", "c64"] {
        assert!(
            r["mcp_fast"][c]["guard"]["calls"].as_u64() > Some(0),
            "{c}: {r}"
        );
    }
    assert!(r["mcp_fast"]["c1"]["added_median_us"].is_number());
    assert!(
        r["mcp_fast_tls"]["c1"]["guard"]["calls"].as_u64() > Some(0),
        "{r}"
    );
    assert!(r["conn_tls_full"]["added_median_us"].is_number(), "{r}");
    assert!(r["conn_tls_resumed"]["added_median_us"].is_number(), "{r}");
    for real in ["mcp_fastmcp", "mcp_everything"] {
        assert!(
            r[real]["c1"]["guard"]["calls"].as_u64() > Some(0),
            "{real}: {r}"
        );
    }
    // connect(), passthrough throughput, RSS idle and with 1,000 held connections, decide().
    assert!(r["connect"]["added_median_us"].is_number(), "{r}");
    assert!(r["bulk"]["median_ratio"].as_f64() > Some(0.0), "{r}");
    for held in ["held_tcp", "held_mcp", "held_mcp_tls"] {
        assert!(r["rss"][held]["held_kib"].as_u64() > Some(0), "{held}: {r}");
    }
    for rules in ["10", "100", "1000"] {
        assert!(r["policy_decide"][rules].is_object(), "{rules}: {r}");
    }
    // The machine the numbers come from.
    let m = &report["machine"];
    assert!(m["cores"].as_u64() > Some(0), "{m}");
    assert!(
        m["kernel"].as_str().is_some_and(|k| k.contains("Linux")),
        "{m}"
    );
    assert!(report["notes"].as_array().is_none_or(|n| !n
        .iter()
        .any(|n| n.as_str().is_some_and(|n| n.contains("FAILED")))));
}
