//! C++: exceptions through patched functions, and `pthread_cancel` of a thread blocked
//! inside one.

use std::time::Duration;

use crate::harness::*;
use crate::parked::{background, wait_busy};

fn blocked_tid(line: &str) -> u32 {
    line.strip_prefix("BLOCKED ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a BLOCKED line: {line:?}"))
}

/// Proves, in a g++ target: C++ exceptions thrown by and through replaced functions (old
/// and new versions, with destructors to run on the way) are caught by their callers across
/// 10 apply/revert cycles, with no wrong result and no destructor skipped; and a thread
/// blocked in `read()` inside a replaced function (old, then new version) can be cancelled
/// with `pthread_cancel`: its cleanup (the guard's destructor of the version it ran) runs,
/// it joins as PTHREAD_CANCELED, and the transition it was blocking then completes.
#[test]
fn cxx_exceptions_and_pthread_cancel() {
    let dir = TempDir::new("cxx");
    let exe = dir.join("cxx");
    let src = fixture("cxx.cpp");
    cc(
        "g++",
        &[
            "-O2",
            "-g",
            "-pthread",
            "-o",
            exe.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    );
    let mut defs = Vec::new();
    for (short, mangled) in [
        ("risky", "_Z5riskyi"),
        ("relay", "_Z5relayi"),
        ("blocker_fn", "_Z10blocker_fni"),
    ] {
        let s = describe(&exe, mangled);
        defs.push(format!("-DSZ_{short}={}", s.size));
        defs.push(format!("-DSUM_{short}={:#x}ULL", s.checksum));
    }
    let fix = dir.join("fix-cxx.so");
    build_patch("cxx_fix.cpp", &fix, &defs);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let pid = t.pid_arg();

    // A thread blocked in the old blocker_fn holds the apply; cancelling it lets it finish.
    t.send("block");
    let tid = blocked_tid(&t.wait_line("BLOCKED", Duration::from_secs(5)));
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
    wait_busy(&t, tid);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        t.status().transition.is_some(),
        "the apply completed with a thread inside blocker_fn"
    );
    t.send("cancel");
    assert_eq!(
        t.wait_line("CANCELED", Duration::from_secs(10)),
        "CANCELED 1 cleaned=1",
        "cancelling a thread inside the old blocker_fn"
    );
    expect_completed(&apply.join().unwrap());

    // Now a thread blocked in the new blocker_fn, cancelled.
    t.send("block");
    t.wait_line("BLOCKED", Duration::from_secs(5));
    t.send("cancel");
    assert_eq!(
        t.wait_line("CANCELED", Duration::from_secs(10)),
        "CANCELED 1 cleaned=2",
        "cancelling a thread inside the new blocker_fn"
    );
    let s = t.stats();
    assert_eq!((s["bad"], s["dtor_missing"]), (0, 0), "{s:?}");
    let new_before = s["caught_new"];
    std::thread::sleep(Duration::from_millis(100));
    expect_completed(&t.revert("fix-cxx", "30s"));
    let s = t.stats();
    assert!(
        s["caught_new"] > new_before,
        "no exception came from the new version: {s:?}"
    );

    for _ in 0..10 {
        expect_completed(&t.apply(&fix, "30s"));
        expect_completed(&t.revert("fix-cxx", "30s"));
    }
    let s = t.stats();
    assert_eq!((s["bad"], s["dtor_missing"]), (0, 0), "{s:?}");
    assert!(
        s["caught"] > s["caught_new"] && s["caught_new"] > 0,
        "{s:?}"
    );
    eprintln!("cxx: {s:?}");
}
