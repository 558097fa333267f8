//! System calls interrupted by the migration signal: which return EINTR (a table), and that
//! C and Rust std programs carry on correctly through transitions.

use std::time::Duration;

use crate::harness::*;

const CALLS: [&str; 8] = [
    "read",
    "cond",
    "futex",
    "accept",
    "nanosleep",
    "epoll",
    "poll",
    "select",
];
/// Restarted under `SA_RESTART` (signal(7)): never EINTR. `cond` is pthread_cond_wait,
/// which never returns EINTR and must not wake up spuriously either.
const RESTARTED: [&str; 4] = ["read", "cond", "futex", "accept"];
/// Never restarted: EINTR on every interrupting signal, as with any signal (documented in
/// the agent's docs and README).
const EINTR_ALWAYS: [&str; 4] = ["nanosleep", "epoll", "poll", "select"];

fn patch_answer(dir: &TempDir, exe: &std::path::Path, name: &str) -> std::path::PathBuf {
    let fix = dir.join(&format!("{name}.so"));
    let mut defs = vec![format!("-DNAME=\"{name}\""), "-DPATCH_ANSWER".into()];
    defs.extend(sym_defines(exe, &["answer"]));
    build_patch("fix.c", &fix, &defs);
    fix
}

/// Proves what the migration signal does to blocked system calls during 20 apply/revert
/// cycles: read, pthread_cond_wait, a raw futex wait and accept (restarted under
/// SA_RESTART) never return EINTR or any other way; nanosleep, epoll_wait, poll and select
/// return EINTR (the documented behaviour); the worker calling the patched function sees
/// only old or new results. Prints the table.
#[test]
fn eintr_table_during_transitions() {
    let dir = TempDir::new("eintr");
    let exe = dir.join("syscalls");
    let src = fixture("syscalls.c");
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-o",
            exe.to_str().unwrap(),
            src.to_str().unwrap(),
            "-lpthread",
        ],
    );
    let fix = patch_answer(&dir, &exe, "fix-eintr");
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).start();
    let before = t.stats();
    const CYCLES: u64 = 20;
    for _ in 0..CYCLES {
        expect_completed(&t.apply(&fix, "10s"));
        expect_completed(&t.revert("fix-eintr", "10s"));
    }
    let s = t.stats();
    let mut table = format!(
        "EINTR during {} transitions (one migration signal per thread each, at least):\n| call | EINTR | other returns |\n|---|---|---|\n",
        2 * CYCLES
    );
    for c in CALLS {
        let (e, o) = (
            s[&format!("{c}_eintr")] - before[&format!("{c}_eintr")],
            s[&format!("{c}_other")] - before[&format!("{c}_other")],
        );
        table.push_str(&format!("| {c} | {e} | {o} |\n"));
    }
    eprintln!("{table}");
    for c in RESTARTED {
        assert_eq!(
            (s[&format!("{c}_eintr")], s[&format!("{c}_other")]),
            (0, 0),
            "{c} returned while it should have restarted:\n{table}"
        );
    }
    for c in EINTR_ALWAYS {
        let e = s[&format!("{c}_eintr")];
        assert!(e >= 1, "{c} never returned EINTR:\n{table}");
        assert_eq!(s[&format!("{c}_other")], 0, "{c}:\n{table}");
    }
    assert_eq!(s["bad"], 0, "{s:?}");
    assert!(s["calls"] > before["calls"], "{s:?}");
}

/// Proves a Rust std program keeps working through 20 apply/revert cycles of a patch to
/// one of its functions: `std::thread::sleep` never ends early, a Condvar queue loses and
/// reorders nothing, a pipe read and `stdin().read_line` get every byte and line in order,
/// and the patched function returns old or new results only.
#[test]
fn rust_std_program_through_transitions() {
    let dir = TempDir::new("rust-std");
    let exe = dir.join("std_target");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let src = fixture("std_target.rs");
    cc(
        &rustc,
        &[
            "-O",
            "--edition",
            "2021",
            "-o",
            exe.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    );
    let fix = patch_answer(&dir, &exe, "fix-rust");
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).start();
    std::thread::sleep(Duration::from_millis(100));
    let before = t.stats();
    let mut sent = 0;
    for _ in 0..20 {
        sent += 1;
        t.send(&format!("line {sent}"));
        expect_completed(&t.apply(&fix, "10s"));
        sent += 1;
        t.send(&format!("line {sent}"));
        expect_completed(&t.revert("fix-rust", "10s"));
    }
    let s = t.stats();
    for k in ["short_sleeps", "cv_bad", "pipe_bad", "lines_bad", "bad"] {
        assert_eq!(s[k], 0, "{k}: {s:?}");
    }
    assert_eq!(s["lines"], sent, "stdin lines lost: {s:?}");
    for k in ["sleeps", "cv_msgs", "pipe_bytes", "calls"] {
        assert!(s[k] > before[k], "the {k} thread stopped: {s:?}");
    }
    assert!(t.alive());
    eprintln!("rust std program: {s:?}");
}

/// Proves the migration signal's handler fits the alternate signal stacks programs really
/// install: worker threads with an 8 KiB `sigaltstack` above a guard page (what Rust's std
/// sets up in every thread, and C servers with a SIGSEGV handler) survive apply/revert
/// cycles, and their results stay old-or-new.
#[test]
fn small_sigaltstack_survives_transitions() {
    let dir = TempDir::new("altstack");
    let exe = build_target(&dir, "target", &[]);
    let fix = dir.join("fix-alt.so");
    let mut defs = vec![
        "-DNAME=\"fix-alt\"".to_string(),
        "-DPATCH_ANSWER".into(),
        "-DPATCH_SCALE".into(),
    ];
    defs.extend(sym_defines(&exe, &["answer", "scale"]));
    build_patch("fix.c", &fix, &defs);
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .args(["4", "altstack"])
        .start();
    for cycle in 0..5 {
        let a = t.apply(&fix, "10s");
        assert!(
            t.alive(),
            "cycle {cycle}: the target died during apply:\n{a}"
        );
        expect_completed(&a);
        let r = t.revert("fix-alt", "10s");
        assert!(
            t.alive(),
            "cycle {cycle}: the target died during revert:\n{r}"
        );
        expect_completed(&r);
    }
    let s = t.stats();
    assert_eq!((s["bad"], s["last_old"]), (0, 4), "{s:?}");
}
