//! Forked children while the parent is patched (issue 10, item 2): a child of fork must
//! never crash and never change universe without a boundary, whatever the parent's later
//! transitions do.

use std::time::Duration;

use crate::harness::*;

/// Builds `forker.c` and the answer/scale patch of `fix.c` for it.
fn fork_setup(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let exe = dir.join("forker");
    let src = fixture("forker.c");
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
    let fix = dir.join("fix-fork.so");
    let mut defs = vec![
        "-DNAME=\"fix-fork\"".to_string(),
        "-DPATCH_ANSWER".into(),
        "-DPATCH_SCALE".into(),
    ];
    defs.extend(sym_defines(&exe, &["answer", "scale"]));
    build_patch("fix.c", &fix, &defs);
    (exe, fix)
}

/// 100 apply/revert cycles on a parent that forks children all the while (each lives about
/// a second, calls both patched functions in every request from its main thread and from a
/// thread it creates, and checks they agree and never change version). Returns the final
/// STATS, or `None` when `mdwe` was asked for and the kernel refused `PR_SET_MDWE`.
fn fork_during_cycles(
    name: &str,
    mdwe: bool,
    raw_clone: bool,
) -> Option<std::collections::HashMap<String, u64>> {
    let dir = TempDir::new(name);
    let (exe, fix) = fork_setup(&dir);
    let mut spawn = Spawn::new(&exe, &dir.runtime_dir());
    if mdwe {
        spawn = spawn.arg("mdwe");
    }
    if raw_clone {
        spawn = spawn.arg("clone");
    }
    let mut t = spawn.start();
    let first = t.stats();
    if mdwe && first["mdwe"] != 1 {
        eprintln!(
            "{name}: SKIPPED: the kernel refused prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)"
        );
        return None;
    }
    let mut ms = Vec::new();
    for cycle in 0..100 {
        let a = t.apply(&fix, "10s");
        assert!(
            a.code == 0 && a.text().contains("completed"),
            "cycle {cycle}: apply failed:\n{a}\nchildren so far: {:?}",
            t.stats()
        );
        ms.extend(transition_ms(&a));
        if cycle % 5 == 0 {
            // Stay applied until a child is forked, so some children start on new code.
            let before = t.stats()["children"];
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while t.stats()["children"] == before && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let r = t.revert("fix-fork", "10s");
        assert!(
            r.code == 0 && r.text().contains("completed"),
            "cycle {cycle}: revert failed:\n{r}\nchildren so far: {:?}",
            t.stats()
        );
        ms.extend(transition_ms(&r));
    }
    t.send("drain 999999");
    let line = t.wait_line("STATS seq=999999 ", Duration::from_secs(60));
    let s = parse_kv(&line);
    assert!(t.alive(), "the parent died");
    eprintln!(
        "{name}: 100 cycles, transitions {}; children {} (ok {} of which ran new code {}), \
         crashed {} (first signal {}), mixed {}, switched {}, wrong {}, hung {}, other {}",
        summary(&mut ms),
        s["children"],
        s["ok"] + s["ok_new"],
        s["ok_new"],
        s["crashed"],
        s["first_signal"],
        s["mixed"],
        s["switched"],
        s["wrong"],
        s["hung"],
        s["other"]
    );
    Some(s)
}

fn assert_children_unharmed(s: &std::collections::HashMap<String, u64>) {
    assert_eq!(s["crashed"], 0, "forked children crashed: {s:?}");
    assert_eq!(s["hung"], 0, "forked children hung: {s:?}");
    assert_eq!(
        s["mixed"] + s["switched"] + s["wrong"],
        0,
        "forked children changed universe without a boundary: {s:?}"
    );
    assert_eq!(s["other"], 0, "fork, waitpid or a child failed: {s:?}");
    assert!(
        s["children"] >= 20,
        "too few children to prove anything: {s:?}"
    );
    assert_eq!(s["ok"] + s["ok_new"], s["children"], "{s:?}");
    assert!(
        s["ok_new"] > 0,
        "no child ever ran the new version (forked while applied): {s:?}"
    );
}

/// Regression test for issue 10 item 2 (children SIGSEGV after the parent's next apply):
/// children forked throughout 100 apply/revert cycles of the parent never crash, never
/// hang, and never change version inside a request or between requests (they have no
/// boundary), in their main thread or in a thread they create.
#[test]
fn forked_children_survive_parent_cycles() {
    let s = fork_during_cycles("fork", false, false).expect("no MDWE asked for");
    assert_children_unharmed(&s);
}

/// The same under `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)` (W^X enforced by the
/// kernel in the parent and every child): stub memory never needs a write+exec mapping nor
/// an exec gain, in the parent or in a child.
#[test]
fn forked_children_survive_parent_cycles_with_mdwe() {
    if let Some(s) = fork_during_cycles("fork-mdwe", true, false) {
        assert_eq!(s["mdwe"], 1);
        assert_children_unharmed(&s);
    }
}

/// Children made by the raw `clone` system call without `CLONE_VM` (no atfork handler
/// runs in them) are as safe: kgpatch's memory is private, so the kernel's copy is all a
/// child needs, and no later write of the parent reaches it.
#[test]
fn raw_clone_children_survive_parent_cycles() {
    let s = fork_during_cycles("fork-clone", false, true).expect("no MDWE asked for");
    assert_children_unharmed(&s);
}
