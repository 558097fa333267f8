//! Hammer: four threads call a function in tight loops while the main thread installs,
//! switches and removes its site over and over. No crash, no wrong value, no lost call.
//!
//! Two workers stay in `from` (word 0) and two in `to` of transition `T`. Every result must be
//! the old or the new value; and a `from` worker whose whole call fell outside the window in
//! which the site was settled to the new version must have got the old one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kgpatch_redirect::{tls::set_current_word_for_testing, PadHint};
use kgpatch_universe::{word::migrated_value, Version};

use crate::common::{asm_lib_copy, patcher};

/// Rounds of install / switch / remove. Each round rewrites the site's text at least
/// twice (install, remove) and every fourth round four more times (fast path on and off).
/// 10,000 in release builds; 1,000 in debug builds, where the suite must stay short (on
/// two shared cores a round costs ~20 ms: the sweep waits for four spinning threads to be
/// scheduled). `KGPATCH_HAMMER_ROUNDS` overrides it.
const ROUNDS: usize = if cfg!(debug_assertions) {
    1_000
} else {
    10_000
};

fn rounds() -> usize {
    std::env::var("KGPATCH_HAMMER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS)
}
const THREADS: usize = 4;
const T: u64 = 5;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
/// Odd while the site may send threads in `from` to the new version (between a settle to
/// the new version and the settle back to the original); even otherwise.
static WINDOW: AtomicU64 = AtomicU64::new(0);

fn hammer(tag: &str, name: &str) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lib = asm_lib_copy(tag);
    let p = patcher();
    let (entry, size) = lib.func(name);
    let (v2, _) = lib.func("asm_multi_v2");
    let f = lib.f1(name);
    let calls = lib.f1("asm_calls_get");
    let analysis = p.analyze(entry, size, PadHint::Auto).unwrap();
    let before = crate::common::bytes(entry - 16, size + 16);

    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let calls_before = calls(0);
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let stop = stop.clone();
            let wrong = wrong.clone();
            std::thread::spawn(move || {
                let word = if i % 2 == 0 { 0 } else { migrated_value(T) };
                set_current_word_for_testing(word);
                let mut n = 0u64;
                let mut new_seen = 0u64;
                let mut strict = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = n as i64;
                    let before = WINDOW.load(Ordering::SeqCst);
                    let r = f(x);
                    let after = WINDOW.load(Ordering::SeqCst);
                    if r == x + 1000 {
                        new_seen += 1;
                    } else if r != x + 1 {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    // A thread in `from` whose whole call ran with the window closed must
                    // have run the original.
                    if word == 0 && before == after && before % 2 == 0 {
                        strict += 1;
                        if r != x + 1 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                (n, new_seen, word, strict)
            })
        })
        .collect();

    let started = Instant::now();
    let mut rewrites = 0u64;
    let rounds = rounds();
    for round in 0..rounds {
        let site = p.install(&analysis).unwrap();
        let s = site.site();
        s.begin(T, Version(v2));
        if round % 4 == 0 {
            WINDOW.fetch_add(1, Ordering::SeqCst);
            s.settle();
            p.set_fast_path(entry, Some(Version(v2))).unwrap();
            p.set_fast_path(entry, None).unwrap();
            s.begin(T + 1, site.original());
            s.settle();
            WINDOW.fetch_add(1, Ordering::SeqCst);
            rewrites += 2;
        } else {
            s.settle_back();
        }
        p.remove(entry).unwrap();
        rewrites += 2;
        if round % 64 == 63 {
            p.reclaim().unwrap();
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u64, u64, u64, u64)> =
        workers.into_iter().map(|w| w.join().unwrap()).collect();
    let total: u64 = results.iter().map(|r| r.0).sum();
    let calls_after = calls(0);
    let stats = p.stats();
    eprintln!(
        "hammer {name}: {rounds} rounds, {rewrites} text rewrites in {elapsed:?}; {total} calls; \
         per thread (calls, new, word, strictly checked) {results:?}; moved so far {}, traps sent on {}, late traps {}",
        stats.moved, stats.traps_sent_on, stats.traps_reexecuted
    );
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "wrong results");
    assert_eq!(
        (calls_after - calls_before) as u64,
        total,
        "lost or doubled calls"
    );
    assert!(results.iter().all(|r| r.0 > 0), "a worker never ran");
    // Migrated workers saw the new version; workers in `from` may too, but only inside the
    // settled window (checked strictly above).
    assert!(
        results.iter().any(|r| r.2 != 0 && r.1 > 0),
        "the new version never ran"
    );
    assert_eq!(crate::common::bytes(entry - 16, size + 16), before);
}

#[test]
fn hammer_several_instructions_in_the_site() {
    hammer("_hammer_multi", "asm_multi");
}

#[test]
fn hammer_single_byte_nop_pad() {
    hammer("_hammer_pad", "asm_padded");
}
