//! Fail closed (issue 10, "fails open on errors"): an OS error during a transition blocks
//! completion instead of skipping threads; module code runs only after every check that can
//! refuse; threads that leave by `pthread_exit` or cancellation are fine under the preload;
//! the unwind data of every object a transition may walk stays mapped for its life; a panic
//! in the agent thread is caught; and thousands of short-lived threads (tids reused) during
//! 200 transitions never run a mix of versions.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kgpatch_protocol::OutcomeKind;

use crate::harness::*;
use crate::parked::{background, parked_tid, wait_busy};

/// Builds `fixtures/failclosed.c`.
fn build_failclosed(dir: &TempDir) -> PathBuf {
    let exe = dir.join("failclosed");
    let src = fixture("failclosed.c");
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-Wall",
            "-o",
            exe.to_str().unwrap(),
            src.to_str().unwrap(),
            "-lpthread",
            "-ldl",
        ],
    );
    exe
}

/// Builds `fixtures/failclosed_fix.c` as patch `name` with `switches` (e.g. `-DPARKED`), for
/// the functions `syms` of `exe`.
fn fc_patch(dir: &TempDir, exe: &Path, name: &str, switches: &[&str], syms: &[&str]) -> PathBuf {
    let out = dir.join(&format!("{name}.so"));
    let mut defs = vec![format!("-DNAME=\"{name}\"")];
    defs.extend(switches.iter().map(|s| s.to_string()));
    defs.extend(sym_defines(exe, syms));
    build_patch("failclosed_fix.c", &out, &defs);
    out
}

/// Proves that a `/proc/self/task` read error during a transition (the target lowers
/// RLIMIT_NOFILE and takes every descriptor while a thread is parked inside the old
/// function) never lets the transition complete: it waits, and its deadline reverses it.
/// Before the fix the failed listing read as "no threads", and the transition completed
/// with the parked thread never checked.
#[test]
fn fd_exhaustion_during_a_transition_never_skips_a_thread() {
    let dir = TempDir::new("fc-fds");
    let exe = build_failclosed(&dir);
    let fix = fc_patch(&dir, &exe, "fix-fc-fds", &["-DPARKED"], &["parked_fn"]);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("0").start();
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let pid = t.pid_arg();
    let apply = background(
        &t,
        &[
            "apply",
            &pid,
            fix.to_str().unwrap(),
            "--timeout",
            "4s",
            "--json",
        ],
    );
    wait_busy(&t, tid);
    // Every descriptor taken for 1.5 s: each of the agent's /proc reads fails meanwhile.
    t.send("fill 1500");
    let filled = parse_kv(&t.wait_line("FILLED", Duration::from_secs(20)));
    assert!(
        filled["emfile"] > 0,
        "the target never hit its descriptor limit: {filled:?}"
    );
    let out = apply.join().unwrap();
    let s = t.status();
    let last = s.last.as_ref().expect("the transition ended");
    assert_eq!(
        last.result,
        OutcomeKind::Reversed,
        "the transition must not complete while thread {tid} is parked in the old parked_fn: {out}\n{s:#?}"
    );
    out.expect(4, "reversed");
    assert!(s.patches.is_empty(), "{s:#?}");
    t.send("unpark");
    let unparked = t.wait_line("UNPARKED", Duration::from_secs(5));
    assert_eq!(unparked, "UNPARKED 101", "the old parked_fn ran to its end");
    assert!(t.alive());
}

/// Proves that a module's pre-apply callback runs only after every check that can refuse:
/// a module whose function cannot be patched (a loop jumps back into the bytes the site
/// would overwrite) is refused, and its callback never ran (no marker file). The control
/// module (same callback, a patchable function) writes the marker, so its absence means
/// something. Before the fix the callback ran before the redirect analysis refused.
#[test]
fn pre_apply_runs_after_every_check_that_can_refuse() {
    let dir = TempDir::new("fc-preapply");
    let exe = build_failclosed(&dir);
    let marker = dir.join("marker");
    let marker_def = format!("-DMARKER=\"{}\"", marker.display());
    let bad = fc_patch(
        &dir,
        &exe,
        "fix-fc-loopy",
        &["-DLOOPY", &marker_def],
        &["loopy"],
    );
    let t = Spawn::new(&exe, &dir.runtime_dir()).arg("0").start();
    let out = t.apply(&bad, "5s");
    assert_ne!(out.code, 0, "loopy cannot be patched: {out}");
    assert!(out.text().contains("loopy"), "{out}");
    assert!(
        !marker.exists(),
        "the pre-apply callback ran although the apply was refused: {out}"
    );
    let s = t.status();
    assert!(s.patches.is_empty() && s.transition.is_none(), "{s:#?}");

    let good = fc_patch(
        &dir,
        &exe,
        "fix-fc-marker",
        &["-DPARKED", &marker_def],
        &["parked_fn"],
    );
    expect_completed(&t.apply(&good, "10s"));
    assert!(
        marker.exists(),
        "the control module's callback writes the marker"
    );
}

/// Proves that threads started under the preload may leave by `pthread_exit` or be
/// cancelled (a forced unwind through the start hook's frame): 300 of each, idle and during
/// a transition, all joined with the right value and the process alive. Before the fix the
/// hook kept a `Box` alive across the start routine, so the forced unwind crossed an
/// `extern "C"` frame with a destructor pending.
#[test]
fn pthread_exit_and_cancel_under_the_preload() {
    let dir = TempDir::new("fc-exit");
    let exe = build_failclosed(&dir);
    let fix = fc_patch(&dir, &exe, "fix-fc-exit", &["-DPARKED"], &["parked_fn"]);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("0").start();
    t.send("exitcancel 300");
    assert_eq!(
        t.wait_line("EXITCANCEL", Duration::from_secs(60)),
        "EXITCANCEL exited=300 cancelled=300"
    );
    // During a transition: the threads start in the goal universe and free their slots.
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let pid = t.pid_arg();
    let apply = background(
        &t,
        &[
            "apply",
            &pid,
            fix.to_str().unwrap(),
            "--timeout",
            "60s",
            "--json",
        ],
    );
    wait_busy(&t, tid);
    t.send("exitcancel 300");
    assert_eq!(
        t.wait_line("EXITCANCEL", Duration::from_secs(60)),
        "EXITCANCEL exited=300 cancelled=300"
    );
    t.send("unpark");
    t.wait_line("UNPARKED", Duration::from_secs(5));
    expect_completed(&apply.join().unwrap());
    assert!(t.alive());
}

/// `true` when `/proc/<pid>/maps` maps `path`.
fn maps_file(pid: u32, path: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let path = std::fs::canonicalize(path).unwrap();
    maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
}

/// Proves that the unwind data of every object a transition may walk stays mapped for the
/// transition's life, and only that long: the target dlopens a library, a transition begins
/// (a parked thread keeps it open), the target dlcloses the library — it stays mapped while
/// the transition runs (the index pins it) — and once the transition completes the pin is
/// released and the library is unmapped. Before the fix the dlclose unmapped it at once, under
/// an index that still borrowed its `.eh_frame`.
#[test]
fn unwind_data_is_pinned_for_the_transition_and_released_after() {
    let dir = TempDir::new("fc-pin");
    let exe = build_failclosed(&dir);
    let lib = dir.join("libchurn.so");
    let lib_src = fixture("churn_lib.c");
    cc(
        "gcc",
        &[
            "-O2",
            "-shared",
            "-fPIC",
            "-o",
            lib.to_str().unwrap(),
            lib_src.to_str().unwrap(),
        ],
    );
    let fix = fc_patch(&dir, &exe, "fix-fc-pin", &["-DPARKED"], &["parked_fn"]);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("0").start();
    t.send(&format!("dlopen {}", lib.display()));
    assert_eq!(
        t.wait_line("DLOPENED", Duration::from_secs(5)),
        "DLOPENED 3"
    );
    assert!(maps_file(t.pid(), &lib));
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let pid = t.pid_arg();
    let apply = background(
        &t,
        &[
            "apply",
            &pid,
            fix.to_str().unwrap(),
            "--timeout",
            "60s",
            "--json",
        ],
    );
    wait_busy(&t, tid);
    t.send("dlclose");
    assert_eq!(
        t.wait_line("DLCLOSED", Duration::from_secs(5)),
        "DLCLOSED 0"
    );
    // Sweeps go on (the parked thread is retried) with the library closed by the program.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        maps_file(t.pid(), &lib),
        "the library was unmapped while the transition's unwind index covered it"
    );
    t.send("unpark");
    t.wait_line("UNPARKED", Duration::from_secs(5));
    expect_completed(&apply.join().unwrap());
    assert!(
        !maps_file(t.pid(), &lib),
        "the transition ended but its pin on the library was not released"
    );
    // The library can be opened again and is fresh (its constructor ran again).
    t.send(&format!("dlopen {}", lib.display()));
    assert_eq!(
        t.wait_line("DLOPENED", Duration::from_secs(5)),
        "DLOPENED 3"
    );
    assert!(t.alive());
}

/// Proves that a panic in the agent thread cannot take the process down: with the test
/// fault `KGPATCH_TEST_FAULT=panic-in-apply` the apply panics inside the agent; kgpatch gets
/// a clear refusal, `status` reports the failure, later transitions are refused with the
/// same sentence, and the target keeps running.
#[test]
fn a_panic_in_the_agent_is_caught_and_reported() {
    let dir = TempDir::new("fc-panic");
    let exe = build_failclosed(&dir);
    let fix = fc_patch(&dir, &exe, "fix-fc-panic", &["-DPARKED"], &["parked_fn"]);
    let mut t = Spawn::new(Path::new("/usr/bin/env"), &dir.runtime_dir())
        .args([
            "KGPATCH_TEST_FAULT=panic-in-apply",
            exe.to_str().unwrap(),
            "1",
        ])
        .start();
    let out = t.apply(&fix, "5s");
    assert_ne!(out.code, 0, "{out}");
    assert!(out.text().contains("internal error"), "{out}");
    assert!(t.alive(), "the panic took the process down");
    let s = t.status();
    let failure = s.agent_failure.as_deref().unwrap_or_default();
    assert!(
        failure.contains("KGPATCH_TEST_FAULT") && failure.contains("refuses further transitions"),
        "{s:#?}"
    );
    assert!(s.patches.is_empty() && s.transition.is_none(), "{s:#?}");
    let again = t.apply(&fix, "5s");
    assert_ne!(again.code, 0);
    assert!(
        again.text().contains("refuses further transitions"),
        "{again}"
    );
    let st = t.stats();
    assert_eq!(st["bad"], 0, "{st:?}");
    assert!(t.alive());
}

/// Proves that thread churn with tid reuse cannot make a thread run a version it was not
/// migrated to: 4 threads each create and join short-lived threads as fast as they can
/// (each runs 8 requests of transcode, which the patch replaces with encode and decode; a
/// mix returns a wrong value) during 200 apply/revert cycles. Every cycle completes, no
/// request ever returns a wrong value, and the process keeps creating threads.
#[test]
fn thread_churn_with_tid_reuse_during_200_transitions() {
    let dir = TempDir::new("fc-churn");
    let exe = build_failclosed(&dir);
    let fix = fc_patch(
        &dir,
        &exe,
        "fix-fc-pair",
        &["-DPAIR"],
        &["encode", "decode", "transcode"],
    );
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let start = Instant::now();
    let mut prev = t.stats();
    let mut ms = Vec::new();
    for cycle in 0..200 {
        let a = t.apply(&fix, "30s");
        assert!(
            a.code == 0 && a.text().contains("completed"),
            "cycle {cycle}: {a}"
        );
        ms.extend(transition_ms(&a));
        let r = t.revert("fix-fc-pair", "30s");
        assert_eq!(r.code, 0, "cycle {cycle}: {r}");
        ms.extend(transition_ms(&r));
        if cycle % 25 == 24 {
            let s = t.stats();
            assert_eq!(
                s["bad"], 0,
                "cycle {cycle}: a request mixed versions: {s:?}"
            );
            assert!(s["spawned"] > prev["spawned"], "cycle {cycle}: {s:?}");
            prev = s;
        }
    }
    let s = t.stats();
    assert_eq!(s["bad"], 0, "{s:?}");
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    t.send("quit");
    t.wait_line("EXITED", Duration::from_secs(20));
    eprintln!(
        "thread churn: 200 cycles in {:?}; {} threads started (pid_max {pid_max}: tids reused {}x over); transitions {}; {s:?}",
        start.elapsed(),
        s["spawned"],
        s["spawned"] / pid_max.max(1),
        summary(&mut ms)
    );
}
