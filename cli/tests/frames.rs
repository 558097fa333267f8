//! Targets with and without frame pointers patch, revert and block alike: the stack check
//! unwinds -O2 code through `.eh_frame` as well as through frame pointers.

use std::time::Duration;

use crate::harness::*;
use crate::parked::{background, parked_patch, parked_tid, wait_blocked_in_parked_fn, wait_busy};

fn patch_revert_and_block(name: &str, flags: &[&str], frame_pointer: bool) {
    let dir = TempDir::new(name);
    let exe = build_target(&dir, "target", flags);
    // The build is what it claims: frame setup at the entry of park_wait or not.
    let sym = describe(&exe, "park_wait");
    let file = std::fs::read(&exe).unwrap();
    // PIE: link-time addresses of .text equal file offsets for gcc's default layout.
    let body = &file[sym.address as usize..(sym.address + sym.size) as usize];
    // `push rbp` first and `mov rbp, rsp` (48 89 e5) among the next few instructions.
    let has_fp = body[0] == 0x55 && body[..16].windows(3).any(|w| w == [0x48, 0x89, 0xe5]);
    assert_eq!(
        has_fp,
        frame_pointer,
        "{name}: park_wait starts {:02x?}",
        &body[..8]
    );

    let fix = parked_patch(&dir, &exe, "fix-frames");
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let pid = t.pid_arg();
    for _ in 0..10 {
        expect_completed(&t.apply(&fix, "10s"));
        let s = t.stats();
        assert_eq!((s["bad"], s["last_new"]), (0, 4), "{name}: {s:?}");
        expect_completed(&t.revert("fix-frames", "10s"));
        let s = t.stats();
        assert_eq!((s["bad"], s["last_old"]), (0, 4), "{name}: {s:?}");
    }
    // A thread inside parked_fn, two frames below it: the walk must get through park_wait
    // and libc's nanosleep to see it.
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
    let (_, depth) = wait_busy(&t, tid);
    assert!(depth >= 2, "{name}: depth {depth}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        t.status().transition.is_some(),
        "{name}: completed with a thread in parked_fn"
    );
    t.send("unpark");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 101"
    );
    expect_completed(&apply.join().unwrap());
    // And back, blocked by the new body this time.
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let revert = background(
        &t,
        &["revert", &pid, "fix-frames", "--timeout", "30s", "--json"],
    );
    wait_blocked_in_parked_fn(&t, tid);
    t.send("unpark");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 201"
    );
    expect_completed(&revert.join().unwrap());
    let s = t.stats();
    assert_eq!((s["bad"], s["last_old"]), (0, 4), "{name}: {s:?}");
}

/// Proves a Debian-style build (-O2, no frame pointers: gcc's default) patches, reverts and
/// is blocked by a thread two frames below a replaced function, found through `.eh_frame`.
#[test]
fn debian_style_no_frame_pointer() {
    patch_revert_and_block("nofp", &["-fomit-frame-pointer"], false);
}

/// Proves the same for a build with frame pointers.
#[test]
fn with_frame_pointer() {
    patch_revert_and_block("fp", &["-fno-omit-frame-pointer"], true);
}
