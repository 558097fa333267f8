//! What a transition costs the target, as `status --json` reports it (`last.cost`), and the
//! skip rule: a thread asleep inside a patched function, found busy, is not woken by every
//! migration round while it has not run since (only every few rounds), and the transition
//! still completes — the thread migrates once it has left the function.

use std::time::Duration;

use kgpatch_protocol::OutcomeKind;

use crate::harness::*;
use crate::parked::background;

/// Rounds a parked thread may be spared in a row (agent/src/timing.rs, MAX_SKIPPED).
const MAX_SKIPPED: u64 = 4;

#[test]
fn a_sleeping_thread_inside_a_patched_function_is_not_woken_every_round() {
    let dir = TempDir::new("cost");
    let exe = build_fixture(&dir, "gcc", "sleeper.c", "sleeper");
    let fix = dir.join("fix-held.so");
    build_patch("sleeper_fix.c", &fix, &sym_defines(&exe, &["held_fn"]));
    const IDLE: u64 = 3;
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg(IDLE.to_string())
        .start();
    let pid = t.pid_arg();
    t.send("hold");
    let line = t.wait_line("HELD", Duration::from_secs(5));
    let tid: u32 = line["HELD ".len()..].trim().parse().unwrap();
    let apply = background(
        &t,
        &[
            "apply",
            &pid,
            fix.to_str().unwrap(),
            "--timeout",
            "30s",
            "--json",
        ],
    );
    crate::parked::wait_busy(&t, tid);
    // About 20 more rounds (50 ms apart once the backoff is at its cap) with the holder
    // asleep inside held_fn.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        t.status().transition.is_some(),
        "the apply completed while a thread slept inside held_fn"
    );
    t.send("release");
    assert_eq!(
        t.wait_line("RELEASED", Duration::from_secs(5)),
        "RELEASED 101",
        "the holder finishes the old body it was in"
    );
    let out = apply.join().unwrap();
    expect_completed(&out);
    let o = out.outcome();
    assert_eq!(o.result, OutcomeKind::Completed);
    let c = o.cost.expect("the outcome carries its cost");
    eprintln!("cost: {c:?}");
    assert!(c.rounds >= 10, "{c:?}");
    // Every other thread (the idle ones and the main thread, all asleep outside held_fn) is
    // signalled once and migrates. The holder: once in the first round, then at most every
    // (MAX_SKIPPED + 1)th round while it sleeps inside held_fn, and up to twice after it
    // left (its first signal then may come while it is still on its way out).
    let others = IDLE + 1;
    let holder_max = 1 + c.rounds.div_ceil(MAX_SKIPPED + 1) + 2;
    assert!(
        c.migration_signals <= others + holder_max,
        "{} migration signals in {} rounds: more than the skip rule allows ({others} + {holder_max}); {c:?}",
        c.migration_signals,
        c.rounds
    );
    assert!(c.skipped >= c.rounds / 2, "{c:?}");
    // The signals that did go out to sleeping threads are counted as wake-ups.
    assert!(c.wakeups >= others, "{c:?}");
    assert!(
        c.wakeups <= c.migration_signals + c.text_sweep_signals,
        "{c:?}"
    );
    assert!(c.threads_interrupted > others, "{c:?}");
    assert!(
        c.max_interrupts >= 2 && c.max_thread_handler_ns > 0,
        "{c:?}"
    );
    assert!(c.agent_cpu_us > 0, "{c:?}");
    // The human status shows it.
    let text = t.kg(&["status", &pid]);
    assert!(text.stdout.contains("cost:"), "{}", text.stdout);
    // The holder runs the new code from now on: the process is patched and consistent.
    let s = t.status();
    assert_eq!(s.patches.len(), 1, "{s:#?}");
}
