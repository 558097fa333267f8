//! Smoke test of `kgpatch-bench --only mariadb --quick`: one round of each mode against a
//! real mariadbd under sysbench. It checks that the section runs and that its bookkeeping
//! holds (every mode ran, every transition completed, no sysbench error or reconnect, the
//! server alive and its tables clean after), never the timing targets: those stay in the
//! bench.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_mariadb_section_runs_every_mode_and_leaves_the_server_clean() {
    let dir = std::env::temp_dir().join(format!("kgpatch-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kgpatch-bench"))
        .args(["--only", "mariadb", "--quick", "--json"])
        .arg(&json_path)
        .output()
        .expect("kgpatch-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let m = &report["mariadb"];
    assert!(m["skipped"].is_null(), "section skipped: {}", m["skipped"]);
    for key in ["none", "control", "kgpatch", "stop_the_world"] {
        let mode = &m["modes"][key];
        assert_eq!(mode["rounds_run"], 1, "{key}: {mode}");
        assert_eq!(mode["errors"], 0, "{key}: {}", mode["failures"]);
        assert_eq!(mode["reconnects"], 0, "{key}");
        assert!(mode["median"]["tps"].as_f64().unwrap() > 0.0, "{key}");
        let p95 = mode["median"]["p95_ms"].as_f64().unwrap();
        let p99 = mode["median"]["p99_ms"].as_f64().unwrap();
        let max = mode["median"]["max_ms"].as_f64().unwrap();
        assert!(
            0.0 < p95 && p95 <= p99 && p99 <= max + 0.01,
            "{key}: {mode}"
        );
        let cycles = mode["cycles"].as_u64().unwrap();
        let calls = mode["cli_calls"].as_u64().unwrap();
        let transitions = mode["transitions"].as_u64().unwrap();
        match key {
            "none" => assert_eq!((cycles, calls, transitions), (0, 0, 0)),
            "control" => {
                assert!(cycles > 0);
                assert_eq!((calls, transitions), (2 * cycles, 0));
            }
            _ => {
                assert!(cycles > 0, "{key}: no cycle");
                assert_eq!((calls, transitions), (2 * cycles, 2 * cycles), "{key}");
                assert!(mode["transition_median_ms"].as_f64().unwrap() > 0.0);
            }
        }
    }
    assert!(m["single_applies"]["first_apply_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(m["after"]["alive"], true);
    assert_eq!(m["after"]["check_table_failures"], Value::Array(vec![]));
    assert_eq!(m["after"]["clean_shutdown"], true);
    assert!(m["targets"]["kgpatch_p99_vs_control"].as_f64().unwrap() > 0.0);
    assert!(
        stdout.contains("| kgpatch apply/revert loop |") && stdout.contains("Target kgpatch p99"),
        "{stdout}"
    );
}
