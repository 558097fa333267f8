//! A thread parked inside an old function: it blocks the transition, `status` names it, the
//! deadline reverses the transition, `force` completes it, and leaving lets it complete.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kgpatch_protocol::{BlockerInfo, OutcomeKind, Status};

use crate::harness::*;

/// The tid named in a `PARKED <tid>` line.
pub fn parked_tid(line: &str) -> u32 {
    line.strip_prefix("PARKED ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a PARKED line: {line:?}"))
}

/// The blocker `status` shows for thread `tid`, if it is pending and blocked inside a
/// function: (function, depth).
pub fn busy_blocker(s: &Status, tid: u32) -> Option<(String, u16)> {
    let tr = s.transition.as_ref()?;
    let th = tr.pending.iter().find(|th| th.tid == tid)?;
    match &th.blocker {
        Some(BlockerInfo::Busy { function, depth }) => Some((function.clone(), *depth)),
        _ => None,
    }
}

/// The failed migration attempts `status` counts for pending thread `tid`.
fn attempts(s: &Status, tid: u32) -> Option<u32> {
    let tr = s.transition.as_ref()?;
    tr.pending
        .iter()
        .find(|th| th.tid == tid)
        .map(|th| th.attempts)
}

/// Builds the patch that replaces `parked_fn` (and `answer`, `scale`) for target `exe`.
pub fn parked_patch(dir: &TempDir, exe: &Path, name: &str) -> PathBuf {
    let fix = dir.join(&format!("{name}.so"));
    let mut defs = vec![
        format!("-DNAME=\"{name}\""),
        "-DPATCH_PARKED".into(),
        "-DPATCH_ANSWER".into(),
        "-DPATCH_SCALE".into(),
    ];
    defs.extend(sym_defines(exe, &["parked_fn", "answer", "scale"]));
    build_patch("fix.c", &fix, &defs);
    fix
}

/// Runs `kgpatch <args>` for `t` on another thread; join it for the result.
pub fn background(t: &Target, args: &[&str]) -> std::thread::JoinHandle<Out> {
    let cmd = t.kg_cmd(args);
    std::thread::spawn(move || run_limited(cmd, Duration::from_secs(60)))
}

/// Waits until `status` shows thread `tid` blocked inside a function; returns the function
/// as named by `status` and the frame depth.
#[track_caller]
pub fn wait_busy(t: &Target, tid: u32) -> (String, u16) {
    let s = t.status_until(Duration::from_secs(10), |s| busy_blocker(s, tid).is_some());
    busy_blocker(&s, tid).unwrap()
}

/// `wait_busy`, and the function named must be `parked_fn`.
#[track_caller]
pub fn wait_blocked_in_parked_fn(t: &Target, tid: u32) -> u16 {
    let (function, depth) = wait_busy(t, tid);
    assert!(
        function.contains("parked_fn"),
        "status names {function:?}, not parked_fn, as the blocker of thread {tid}"
    );
    depth
}

/// Proves that a thread parked inside an old function blocks completion: `status --json`
/// shows that tid blocked inside a function, two or more frames down; with `--timeout 1s` the transition is
/// reversed (exit 4) and the process runs the old code; with `--keep-pending` the
/// transition stays past its deadline and `kgpatch force` completes it; and a transition
/// waiting on a parked thread completes (exit 0) once the thread leaves.
#[test]
fn parked_thread_blocks_until_deadline_force_or_leave() {
    let dir = TempDir::new("parked");
    let exe = build_target(&dir, "target", &[]);
    let fix = parked_patch(&dir, &exe, "fix-parked");
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let pid = t.pid_arg();
    let fix_s = fix.to_str().unwrap();

    // 1. The deadline reverses the transition.
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let apply = background(&t, &["apply", &pid, fix_s, "--timeout", "1s", "--json"]);
    let (_, depth) = wait_busy(&t, tid);
    assert!(
        depth >= 2,
        "parked_fn is below park_wait and nanosleep, not at depth {depth}"
    );
    let out = apply.join().unwrap();
    out.expect(4, "reversed");
    let s = t.status();
    assert!(s.patches.is_empty() && s.transition.is_none(), "{s:#?}");
    assert_eq!(s.last.as_ref().unwrap().result, OutcomeKind::Reversed);
    let st = t.stats();
    assert_eq!(
        (st["bad"], st["last_old"]),
        (0, 4),
        "old code after the reversal: {st:?}"
    );

    // 2. --keep-pending: the deadline passes, the transition stays; force completes it.
    t.kg(&[
        "apply",
        &pid,
        fix_s,
        "--timeout",
        "300ms",
        "--keep-pending",
        "--no-wait",
    ])
    .expect_code(0);
    // Wait for the deadline to pass (or for the transition to end, which is the bug).
    let s = t.status_until(Duration::from_secs(10), |s| {
        s.transition.as_ref().is_none_or(|tr| tr.remaining_ms == 0)
    });
    let tr = s
        .transition
        .as_ref()
        .expect("the transition is kept pending past its deadline");
    assert!(!tr.reversed && tr.remaining_ms == 0, "{s:#?}");
    assert!(busy_blocker(&s, tid).is_some(), "{s:#?}");
    t.kg(&["force", &pid]).expect(0, "WARNING");
    let s = t.status_until(Duration::from_secs(5), |s| s.transition.is_none());
    assert_eq!(
        s.last.as_ref().unwrap().result,
        OutcomeKind::Completed,
        "{s:#?}"
    );
    assert_eq!(s.patches.len(), 1, "{s:#?}");
    let st = t.stats();
    assert_eq!(
        (st["bad"], st["last_new"]),
        (0, 4),
        "new code after force: {st:?}"
    );
    // Forced, the parked thread finishes the old body it was in.
    t.send("unpark");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 101"
    );

    // 3. A parked thread (now in the new body) holds the revert until it leaves.
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let revert = background(
        &t,
        &["revert", &pid, "fix-parked", "--timeout", "30s", "--json"],
    );
    wait_blocked_in_parked_fn(&t, tid);
    // Let the driver check the parked thread again a few times (each a failed attempt):
    // the revert must still wait.
    let seen = attempts(&t.status(), tid).unwrap_or(0);
    let s = t.status_until(Duration::from_secs(10), |s| {
        s.transition.is_none() || attempts(s, tid).is_some_and(|a| a >= seen + 3)
    });
    assert!(
        s.transition.is_some(),
        "the revert completed with a thread inside the new parked_fn"
    );
    t.send("unpark");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 201"
    );
    let out = revert.join().unwrap();
    expect_completed(&out);
    let st = t.stats();
    assert_eq!((st["bad"], st["last_old"]), (0, 4), "{st:?}");
    eprintln!(
        "parked: blocker depth {depth}; revert waited {:?} for the parked thread",
        out.elapsed
    );
}

/// Proves `status --json` names the function that blocks a thread, by its symbol, while a
/// patch is being applied (`parked_fn`, the function the parked thread is inside) and
/// while it is being reverted.
#[test]
fn status_names_the_blocking_function() {
    let dir = TempDir::new("named");
    let exe = build_target(&dir, "target", &[]);
    let fix = parked_patch(&dir, &exe, "fix-named");
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("2").start();
    let pid = t.pid_arg();
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
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
    let (function, _) = wait_busy(&t, tid);
    t.send("unpark");
    expect_completed(&apply.join().unwrap());
    assert!(
        function.contains("parked_fn"),
        "while applying, status names {function:?}, not parked_fn, as the blocker of thread {tid}"
    );
    t.wait_line("UNPARKED", Duration::from_secs(5));
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let revert = background(
        &t,
        &["revert", &pid, "fix-named", "--timeout", "30s", "--json"],
    );
    let depth = wait_blocked_in_parked_fn(&t, tid);
    assert!(depth >= 2, "{depth}");
    t.send("unpark");
    expect_completed(&revert.join().unwrap());
}
