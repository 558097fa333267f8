//! `kgpatch force` says exactly what it can and cannot move (issue 10, item 7): a thread that
//! blocks the migration signal with the raw system call never runs the migration handler,
//! so force cannot move it. Force must name it, exit 4 (incomplete), and leave the transition
//! pending and forced; the thread moves once it unblocks the signal.

use std::time::{Duration, Instant};

use kgpatch_protocol::{BlockerInfo, OutcomeKind, Status};

use crate::harness::*;

/// The pending threads of the transition in progress, as (tid, blocks the signal).
fn pending(s: &Status) -> Vec<(u32, bool)> {
    s.transition.as_ref().map_or_else(Vec::new, |tr| {
        tr.pending
            .iter()
            .map(|th| (th.tid, th.blocker == Some(BlockerInfo::SignalBlocked)))
            .collect()
    })
}

#[test]
fn force_names_the_threads_that_block_the_migration_signal() {
    let dir = TempDir::new("force-sigblock");
    let exe = build_fixture(&dir, "gcc", "sigblock.c", "sigblock");
    let fix = dir.join("fix-answer.so");
    let mut defs = vec![
        "-DNAME=\"fix-answer\"".to_string(),
        "-DPATCH_ANSWER".to_string(),
    ];
    defs.extend(sym_defines(&exe, &["answer"]));
    build_patch("fix.c", &fix, &defs);

    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("2").start();
    let pid = t.pid_arg();
    let blocker = t.stats()["blocker"] as u32;
    assert!(blocker > 0);

    t.kg(&[
        "apply",
        &pid,
        fix.to_str().unwrap(),
        "--timeout",
        "300ms",
        "--keep-pending",
        "--no-wait",
    ])
    .expect_code(0);
    // Every other thread moves; the blocker is reported as blocking the signal.
    let s = t.status_until(Duration::from_secs(20), |s| {
        pending(s) == vec![(blocker, true)]
    });
    assert!(!s.transition.as_ref().unwrap().forced, "{s:#?}");

    let out = t.kg(&["force", &pid]);
    out.expect(4, "WARNING");
    let text = out.text();
    for needle in [
        "force cannot move 1 thread",
        &blocker.to_string(),
        "sigblocker",
        "blocks the migration signal",
        "quiescent point or when it unblocks the signal",
        "stays pending (forced)",
    ] {
        assert!(
            text.contains(needle),
            "force output lacks {needle:?}:\n{out}"
        );
    }
    assert!(!text.contains("completed"), "{out}");
    eprintln!("force with a signal-blocking thread:\n{}", out.stderr);
    let s = t.status();
    let tr = s.transition.as_ref().expect("the transition stays pending");
    assert!(tr.forced, "{s:#?}");
    assert_eq!(pending(&s), vec![(blocker, true)], "{s:#?}");
    let st = t.stats();
    assert_eq!(st["blocker_last"], 1, "the blocker moved: {st:?}");

    // Once it unblocks the signal, the pending signal moves it and the transition completes.
    t.send("unblock");
    t.wait_line("UNBLOCKED", Duration::from_secs(5));
    let s = t.status_until(Duration::from_secs(20), |s| s.transition.is_none());
    let last = s.last.as_ref().expect("an outcome");
    assert_eq!(last.result, OutcomeKind::Completed, "{s:#?}");
    assert_eq!(s.patches.len(), 1, "{s:#?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = t.stats();
        if st["blocker_last"] == 2 || Instant::now() >= deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (st["bad"], st["blocker_last"]),
        (0, 2),
        "after completion: {st:?}"
    );
    assert!(t.alive());

    // A force with nothing pending is refused with one sentence.
    t.kg(&["force", &pid])
        .expect_code(refusal_code("no_transition"));
}
