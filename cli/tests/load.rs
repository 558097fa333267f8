//! Apply and revert under load; the encode/decode pair that must change together.

use crate::harness::*;

/// Proves that 50 apply/revert cycles of a two-function patch, with 4 threads calling both
/// functions in tight loops, each exit 0; that no call ever returns anything but the old or
/// the new result; and that after each apply every thread runs the new code, after each
/// revert the old.
#[test]
fn apply_revert_under_load() {
    let dir = TempDir::new("load");
    let exe = build_target(&dir, "target", &[]);
    let fix = dir.join("fix-load.so");
    let mut defs = vec![
        "-DNAME=\"fix-load\"".to_string(),
        "-DPATCH_ANSWER".into(),
        "-DPATCH_SCALE".into(),
    ];
    defs.extend(sym_defines(&exe, &["answer", "scale"]));
    build_patch("fix.c", &fix, &defs);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let (mut apply_ms, mut revert_ms) = (Vec::new(), Vec::new());
    let before = t.stats();
    assert_eq!(before["last_old"], 4, "{before:?}");
    for cycle in 0..50 {
        let a = t.apply(&fix, "10s");
        expect_completed(&a);
        apply_ms.extend(transition_ms(&a));
        let s = t.stats();
        assert_eq!(
            s["bad"], 0,
            "cycle {cycle}: wrong results after apply: {s:?}"
        );
        assert_eq!(
            s["last_new"], 4,
            "cycle {cycle}: apply completed but not every worker runs the new code: {s:?}"
        );
        let r = t.revert("fix-load", "10s");
        expect_completed(&r);
        revert_ms.extend(transition_ms(&r));
        let s = t.stats();
        assert_eq!(
            s["bad"], 0,
            "cycle {cycle}: wrong results after revert: {s:?}"
        );
        assert_eq!(
            s["last_old"], 4,
            "cycle {cycle}: revert completed but a worker still runs the new code: {s:?}"
        );
    }
    let end = t.stats();
    assert_eq!(end["bad"], 0, "{end:?}");
    assert!(end["a_new"] > 0 && end["s_new"] > 0, "{end:?}");
    assert!(
        end["calls"] > before["calls"],
        "the workers stopped: {end:?}"
    );
    assert!(t.alive());
    let st = t.status();
    assert!(st.patches.is_empty() && st.transition.is_none(), "{st:#?}");
    eprintln!(
        "apply_revert_under_load: apply {}; revert {}; calls {} (new answers {})",
        summary(&mut apply_ms),
        summary(&mut revert_ms),
        end["calls"],
        end["a_new"]
    );
}

/// Builds `pair.c` and its patch (with or without the common caller).
fn pair_setup(dir: &TempDir, with_caller: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let exe = dir.join("pair");
    let src = fixture("pair.c");
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
    let fix = dir.join("fix-pair.so");
    let mut defs = vec!["-DNAME=\"fix-pair\"".to_string()];
    let mut syms = vec!["encode", "decode"];
    if with_caller {
        defs.push("-DWITH_CALLER".into());
        syms.push("transcode");
    }
    defs.extend(sym_defines(&exe, &syms));
    build_patch("pair_fix.c", &fix, &defs);
    (exe, fix)
}

/// Proves the consistency rule for functions that must change together: a patch that
/// replaces encode, decode and their common caller, applied and reverted 100 times while 4
/// threads check `decode(encode(x)) == x` on every call, never lets a thread mix an old and
/// a new half (0 violations).
#[test]
fn pair_with_common_caller_never_mixes() {
    let dir = TempDir::new("pair");
    let (exe, fix) = pair_setup(&dir, true);
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .args(["4", "300"])
        .start();
    let mut ms = Vec::new();
    for cycle in 0..100 {
        let a = t.apply(&fix, "10s");
        expect_completed(&a);
        ms.extend(transition_ms(&a));
        let r = t.revert("fix-pair", "10s");
        expect_completed(&r);
        ms.extend(transition_ms(&r));
        if cycle % 25 == 0 {
            let s = t.stats();
            assert_eq!(s["bad"], 0, "cycle {cycle}: encode/decode mixed: {s:?}");
        }
    }
    let s = t.stats();
    assert_eq!(s["bad"], 0, "encode/decode mixed: {s:?}");
    assert!(s["calls"] > 0);
    eprintln!(
        "pair_with_common_caller_never_mixes: transitions {}, {} calls checked",
        summary(&mut ms),
        s["calls"]
    );
}

/// The control of the test above, so it is known to be able to fail: the same patch without
/// the common caller lets threads switch between encode and decode, and the target sees
/// violations.
#[test]
fn pair_without_common_caller_mixes() {
    let dir = TempDir::new("pair-bad");
    let (exe, fix) = pair_setup(&dir, false);
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .args(["4", "300"])
        .start();
    let mut bad = 0;
    for _ in 0..30 {
        expect_completed(&t.apply(&fix, "10s"));
        expect_completed(&t.revert("fix-pair", "10s"));
        bad = t.stats()["bad"];
        if bad > 0 {
            break;
        }
    }
    assert!(
        bad > 0,
        "30 cycles of a pair patch without its caller never mixed versions: the pair test above cannot fail"
    );
}
