//! A live patcher interrupts every thread with a real-time signal. The server must carry on:
//! a storm of such signals to all its threads during load costs zero failed requests, and
//! the server still shuts down cleanly in the middle of the storm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kgpatch_examples::load::{self, LoadConfig};
use kgpatch_examples::{sys, DemoServer, ServerOptions, Stats, Variant};

/// Sends `sig` to every thread of `pid`, round after round, until `stop`; returns how many
/// signals the kernel accepted. A thread that exited meanwhile (ESRCH) is skipped.
fn storm(pid: u32, sig: i32, stop: &AtomicBool, sent: &AtomicU64) {
    let pid = pid as i32;
    while !stop.load(Ordering::Relaxed) {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for tid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            match sys::tgkill(pid, tid, sig) {
                Ok(()) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    std::thread::sleep(Duration::from_millis(1)); // queue full: let it drain
                }
                Err(e) => panic!("tgkill {pid}/{tid}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn wait_for_signals(srv: &DemoServer, sent: u64) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = srv.stats().unwrap();
        if stats.counter("signals") >= sent || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn storm_under_load(variant: Variant, restart: bool) {
    let sig = sys::sigrtmin() + 6;
    let mut srv = DemoServer::spawn(
        ServerOptions::new(variant)
            .noop_handler(sig, restart)
            .transcode_pause_us(20),
    )
    .unwrap();
    let label = format!("{} restart={restart}", variant.name());
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let mut cfg = LoadConfig::new(srv.addr());
    cfg.connections = 4;
    cfg.duration = Duration::from_millis(2000);
    let report = std::thread::scope(|s| {
        s.spawn(|| storm(srv.pid(), sig, &stop, &sent));
        let report = load::run(cfg);
        stop.store(true, Ordering::Relaxed);
        report
    });
    let sent = sent.load(Ordering::Relaxed);
    assert_eq!(report.failures, 0, "{label}: {report}");
    assert!(report.requests > 500, "{label}: {report}");
    assert!(sent > 2000, "{label}: only {sent} signals sent");
    let stats = wait_for_signals(&srv, sent);
    assert_eq!(
        stats.counter("signals"),
        sent,
        "{label}: every queued signal was handled"
    );
    assert_eq!(stats.violations(), 0, "{label}");
    // the blocking calls that return EINTR even with SA_RESTART were really interrupted,
    // so their retry paths ran
    for call in ["epoll_wait", "poll", "clock_nanosleep"] {
        assert!(
            stats.counter(&format!("eintr_{call}")) > 0,
            "{label}: {call}: {stats:?}"
        );
    }
    eprintln!(
        "{label}: {sent} signals; {:?}",
        stats
            .fields()
            .iter()
            .filter(|(k, _)| k.starts_with("eintr_"))
            .collect::<Vec<_>>()
    );

    // shut down in the middle of a new storm: clean exit
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let pid = srv.pid();
    std::thread::scope(|s| {
        s.spawn(|| storm(pid, sig, &stop, &sent));
        std::thread::sleep(Duration::from_millis(100));
        let status = srv.shutdown().unwrap();
        stop.store(true, Ordering::Relaxed);
        assert!(status.success(), "{label}: {status}");
    });
}

#[test]
fn signal_storm_with_sa_restart_loses_no_request() {
    storm_under_load(Variant::FramePointers, true);
    storm_under_load(Variant::NoFramePointers, true);
}

#[test]
fn signal_storm_without_sa_restart_loses_no_request() {
    storm_under_load(Variant::NoFramePointers, false);
}
