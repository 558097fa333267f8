//! The server's sources under AddressSanitizer, LeakSanitizer and UBSan: load, signals,
//! churn, CANCEL, a parked SLOW and open connections, then SHUTDOWN — a clean exit means no
//! memory error, no undefined behaviour and no leak (the sanitizers would change the status).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kgpatch_examples::load::{self, LoadConfig};
use kgpatch_examples::{server_source_dir, sys, DemoServer, ServerOptions, Variant};

fn build_asan(out: &Path) {
    let sources = ["main.c", "proto.c", "store.c", "compact.c", "churn.c"];
    let status = Command::new("cc")
        .current_dir(server_source_dir())
        .args(["-std=gnu11", "-O1", "-g", "-fno-omit-frame-pointer"])
        .args([
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
        ])
        .args(["-pthread", "-Wall", "-Wextra", "-Werror"])
        .args(sources)
        .arg("-ldl")
        .arg("-o")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "building the sanitizer variant failed");
}

#[test]
fn sanitizers_see_nothing() {
    let dir = std::env::temp_dir().join(format!("kvasan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("kvserver-asan");
    build_asan(&exe);
    let sig = sys::sigrtmin() + 6;
    let mut srv = DemoServer::spawn(
        ServerOptions::new(Variant::FramePointers)
            .program(&exe)
            .churn(2)
            .noop_handler(sig, true)
            .env("ASAN_OPTIONS", "detect_leaks=1:exitcode=23")
            .env("UBSAN_OPTIONS", "print_stacktrace=1:exitcode=24")
            .startup_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let mut cfg = LoadConfig::new(srv.addr());
    cfg.connections = 3;
    cfg.duration = Duration::from_millis(700);
    cfg.max_value_len = 2048;
    let report = load::run(cfg);
    assert_eq!(report.failures, 0, "{report}");
    for (tid, _) in srv.threads().unwrap() {
        for _ in 0..20 {
            let _ = sys::tgkill(srv.pid() as i32, tid, sig);
        }
    }
    assert_eq!(srv.request("CANCEL 20").unwrap(), "CANCELLED cleanup=1");
    assert_eq!(srv.request("INCR n -3").unwrap(), "INT 3");
    let mut open = srv.connect().unwrap();
    assert_eq!(open.request("SET kept value").unwrap(), "OK");
    let mut parked = srv.connect().unwrap();
    parked.send("SLOW 30000").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let status = srv.shutdown().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "a sanitizer reported something: see stderr above"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
