//! The stress knobs the end-to-end tests use: churn threads, CANCEL, blocked signals.

use std::time::Duration;

use kgpatch_examples::load::{self, LoadConfig};
use kgpatch_examples::{sys, DemoServer, ServerOptions, Variant};

#[test]
fn churn_threads_run_beside_load() {
    let mut srv = DemoServer::spawn(ServerOptions::new(Variant::NoFramePointers).churn(3)).unwrap();
    let names: Vec<String> = srv.threads().unwrap().into_iter().map(|(_, n)| n).collect();
    for i in 0..3 {
        assert!(names.contains(&format!("kv-churn-{i}")), "{names:?}");
    }
    let mut cfg = LoadConfig::new(srv.addr());
    cfg.connections = 2;
    cfg.duration = Duration::from_millis(800);
    let report = load::run(cfg);
    assert_eq!(report.failures, 0, "{report}");
    let stats = srv.stats().unwrap();
    assert_eq!(stats.counter("threads"), 12, "{stats:?}");
    for key in ["churn_rounds", "dlopens", "ephemeral_threads"] {
        assert!(stats.counter(key) > 0, "{key}: {stats:?}");
    }
    assert_eq!(stats.violations(), 0);
    assert!(srv.shutdown().unwrap().success());
}

#[test]
fn cancel_unwinds_through_kv_slow_path() {
    for v in Variant::ALL {
        let srv = crate::start(v);
        assert_eq!(
            srv.request("CANCEL 100").unwrap(),
            "CANCELLED cleanup=1",
            "{}",
            v.name()
        );
        assert!(srv
            .request("CANCEL 0")
            .unwrap()
            .starts_with("ERR usage: CANCEL"));
        assert_eq!(srv.request("PING").unwrap(), "PONG");
    }
}

#[test]
fn workers_can_block_every_signal() {
    let sig = sys::sigrtmin() + 6;
    let mut srv = DemoServer::spawn(
        ServerOptions::new(Variant::FramePointers)
            .workers(2)
            .block_signals_in_workers()
            .noop_handler(sig, true),
    )
    .unwrap();
    let bit = 1u64 << (sig - 1);
    for (tid, name) in srv.threads().unwrap() {
        let blocked = srv.blocked_signals(tid).unwrap();
        if name.starts_with("kv-worker-") {
            assert_ne!(blocked & bit, 0, "{name} blocks the RT signal");
        } else {
            assert_eq!(blocked, 0, "{name}");
        }
    }
    // a signal sent to a blocking worker stays pending: the handler never runs
    let worker = srv
        .threads()
        .unwrap()
        .into_iter()
        .find(|(_, n)| n == "kv-worker-0")
        .unwrap()
        .0;
    sys::tgkill(srv.pid() as i32, worker, sig).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.stats().unwrap().counter("signals"), 0);
    // SIGTERM reaches a thread that does not block it
    assert!(srv.terminate().unwrap().success());
}
