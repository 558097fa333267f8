//! Our signals and the program's (issue 10, items 3 and 6), end to end: a target whose
//! workers block SIGTRAP behind the interposer's back is refused, never killed, and keeps
//! its code bytes; a target whose SIGUSR1 handler calls the patched function, sprayed with
//! SIGUSR1 while it is patched and unpatched 100 times, never dies and never sees a wrong
//! result.

use std::path::{Path, PathBuf};

use crate::harness::*;

fn build_nested(dir: &TempDir) -> PathBuf {
    let exe = dir.join("nested");
    let src = fixture("nested.c");
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
        ],
    );
    exe
}

fn answer_patch(dir: &TempDir, exe: &Path, name: &str) -> PathBuf {
    let fix = dir.join(&format!("{name}.so"));
    let mut defs = vec![format!("-DNAME=\"{name}\""), "-DPATCH_ANSWER".into()];
    defs.extend(sym_defines(exe, &["answer"]));
    build_patch("fix.c", &fix, &defs);
    fix
}

/// Proves item 3: two workers block every signal with the raw `rt_sigprocmask` system call
/// (the interposer cannot see it) and keep calling `answer`; `apply` is refused with one
/// sentence that names SIGTRAP and the threads, three times in a row, the target lives,
/// `answer`'s code bytes are identical after each refusal, no patch is listed, and every
/// result stays the old one. Before the fix the target was killed by SIGTRAP (exit 133) at
/// the first apply.
#[test]
fn raw_sigtrap_blockers_are_refused_never_killed() {
    let dir = TempDir::new("rawblock");
    let exe = build_nested(&dir);
    let fix = answer_patch(&dir, &exe, "fix-rawblock");
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .args(["rawblock", "2"])
        .start();
    let sym = describe(&exe, "answer");
    let before = t.code_bytes(&sym);
    let first = t.stats();
    for attempt in 0..3 {
        let out = t.apply(&fix, "10s");
        assert!(
            t.alive(),
            "attempt {attempt}: the target died during apply:\n{out}"
        );
        assert_ne!(out.code, 0, "attempt {attempt}: apply went through:\n{out}");
        let text = out.text();
        assert!(
            text.contains("block SIGTRAP") && text.contains("nothing was written"),
            "attempt {attempt}: the refusal does not say why:\n{out}"
        );
        eprintln!("refusal: {}", text.trim());
        assert_eq!(
            t.code_bytes(&sym),
            before,
            "attempt {attempt}: a refused apply changed answer's code"
        );
        let list = t.kg(&["list", &t.pid_arg()]);
        assert!(
            !list.text().contains("fix-rawblock"),
            "attempt {attempt}: the refused patch is listed:\n{list}"
        );
    }
    let s = t.stats();
    assert_eq!(s["bad"], 0, "{s:?}");
    assert!(s["calls"] > first["calls"], "the workers stopped: {s:?}");
    assert!(t.alive());
}

/// Proves item 6: the target's SIGUSR1 handler calls `answer`, a thread sprays SIGUSR1 at
/// the two workers that call it too, and the patch goes in and out 100 times: every cycle
/// completes, the target never dies, no result (in the workers or in the handler) is
/// anything but old or new, and thousands of signals were handled meanwhile. Before the
/// fix SIGUSR1 nested inside kgpatch's SIGTRAP handler, met the int3 with SIGTRAP blocked,
/// and the kernel killed the process within a few cycles.
#[test]
fn sigusr1_handler_calling_the_patched_function_during_100_cycles() {
    sigusr1_handler_cycles("usr1");
}

/// The same with a handler installed with `sigfillset(&sa_mask)` (SIGTRAP blocked while it
/// runs), as many programs install theirs. Before the preloaded `sigaction` took SIGTRAP out
/// of program handlers' masks, the handler met the int3 with SIGTRAP blocked and the kernel
/// killed the process.
#[test]
fn sigusr1_handler_masking_every_signal_during_100_cycles() {
    sigusr1_handler_cycles("usr1-masked");
}

fn sigusr1_handler_cycles(mode: &str) {
    let dir = TempDir::new(mode);
    let exe = build_nested(&dir);
    let fix = answer_patch(&dir, &exe, "fix-usr1");
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg(mode).start();
    let first = t.stats();
    const CYCLES: usize = 100;
    for cycle in 0..CYCLES {
        let a = t.apply(&fix, "20s");
        assert!(
            t.alive(),
            "cycle {cycle}: the target died during apply:\n{a}"
        );
        expect_completed(&a);
        let r = t.revert("fix-usr1", "20s");
        assert!(
            t.alive(),
            "cycle {cycle}: the target died during revert:\n{r}"
        );
        expect_completed(&r);
    }
    let s = t.stats();
    eprintln!("{CYCLES} cycles under SIGUSR1: {s:?}");
    assert_eq!((s["bad"], s["hbad"]), (0, 0), "wrong results: {s:?}");
    let handled = s["handled"] - first["handled"];
    assert!(
        handled >= 2000,
        "only {handled} SIGUSR1 handled during the cycles: {s:?}"
    );
    assert!(
        s["h_new"] > 0,
        "the handler never ran the new version: {s:?}"
    );
    assert!(t.alive());
}
