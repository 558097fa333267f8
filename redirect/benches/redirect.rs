//! Cost of a call through a patch site, side by side with a direct call, and the time to
//! install a site. Not a test: it prints a table (median of several runs).
//!
//! `cargo bench -p kgpatch-redirect`

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use kgpatch_redirect::{tls::set_current_word_for_testing, PadHint};
use kgpatch_universe::{word::migrated_value, Version};

type F = extern "C" fn(i64) -> i64;

const CALLS: u64 = 2_000_000;
const RUNS: usize = 201;
const INSTALLS: usize = 300;

fn ns_per_call(f: F) -> f64 {
    let f = black_box(f);
    let start = Instant::now();
    let mut acc = 0i64;
    for i in 0..CALLS {
        acc = acc.wrapping_add(f(i as i64));
    }
    black_box(acc);
    start.elapsed().as_nanos() as f64 / CALLS as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let lib = common::asm_lib_copy("_bench");
    let p = common::patcher();
    let (entry, size) = lib.func("bench_old");
    let (new, _) = lib.func("bench_new");
    let (new_b, _) = lib.func("bench_new_b");
    let old_f = lib.f1("bench_old");
    let new_f = lib.f1("bench_new");
    let analysis = p.analyze(entry, size, PadHint::Auto).unwrap();

    // Call-cost rows: (label, setup, function to call). Runs are interleaved so drift
    // (frequency, neighbours) spreads over every row alike.
    let site = p.install(&analysis).unwrap();
    let s = site.site();
    s.begin(1, Version(new));
    s.settle();
    let mut rows: Vec<(&str, Vec<f64>)> = [
        "direct call (baseline)",
        "steady, fast path (entry jumps to new)",
        "steady, through the stub",
        "in transition, migrated (stub -> to)",
        "in transition, not migrated (stub -> from)",
    ]
    .iter()
    .map(|l| (*l, Vec::new()))
    .collect();
    for _ in 0..RUNS {
        set_current_word_for_testing(0);
        rows[0].1.push(ns_per_call(new_f));
        p.set_fast_path(entry, Some(Version(new))).unwrap();
        rows[1].1.push(ns_per_call(old_f));
        p.set_fast_path(entry, None).unwrap();
        rows[2].1.push(ns_per_call(old_f));
        // A transition from `new` to the identical `new_b`: both sides run the same body.
        s.begin(2, Version(new_b));
        set_current_word_for_testing(migrated_value(2));
        rows[3].1.push(ns_per_call(old_f));
        set_current_word_for_testing(0);
        rows[4].1.push(ns_per_call(old_f));
        s.settle_back();
    }
    s.begin(3, site.original());
    s.settle();
    p.remove(entry).unwrap();

    // "Over direct" is the median of the per-run differences: each run measures every case
    // back to back (~10 ms apart), so load from other processes mostly cancels out.
    let base = median(rows[0].1.clone());
    println!("kgpatch-redirect: ns per call, median of {RUNS} interleaved runs of {CALLS} calls");
    println!(
        "| case | ns/call (median) | over direct (median of paired differences) | ns/call (min) |"
    );
    println!("|---|---:|---:|---:|");
    for (label, v) in &rows {
        let m = median(v.clone());
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let paired = median(v.iter().zip(&rows[0].1).map(|(a, b)| a - b).collect());
        let _ = base;
        println!("| {label} | {m:.2} | {paired:+.2} | {lo:.2} |");
    }

    // Install time: the whole protocol (stub and trampoline built, int3, sync, sweep of
    // every thread, tail, sync, first byte, sync). Two idle threads stand in for a server's
    // sleeping workers; remove and reclaim are untimed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idle: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    let mut install = Vec::new();
    let mut fast = Vec::new();
    let mut remove = Vec::new();
    for i in 0..INSTALLS {
        let t0 = Instant::now();
        let site = p.install(&analysis).unwrap();
        install.push(t0.elapsed());
        let s = site.site();
        s.begin(10, Version(new));
        s.settle();
        let t0 = Instant::now();
        p.set_fast_path(entry, Some(Version(new))).unwrap();
        fast.push(t0.elapsed());
        p.set_fast_path(entry, None).unwrap();
        s.begin(11, site.original());
        s.settle();
        let t0 = Instant::now();
        p.remove(entry).unwrap();
        remove.push(t0.elapsed());
        if i % 32 == 31 {
            p.reclaim().unwrap();
        }
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in idle {
        t.join().unwrap();
    }
    println!();
    println!(
        "site writes ({INSTALLS} each, {threads} threads in the process, sync: {:?})",
        p.sync_method()
    );
    println!("| operation | p50 | p99 |");
    println!("|---|---:|---:|");
    for (label, v) in [
        ("install (int3, sweep, tail, first byte)", install),
        ("fast path on (one jump rewritten)", fast),
        ("remove (original bytes restored)", remove),
    ] {
        println!(
            "| {label} | {:.1} µs | {:.1} µs |",
            percentile(v.clone(), 0.5).as_secs_f64() * 1e6,
            percentile(v, 0.99).as_secs_f64() * 1e6
        );
    }
}
