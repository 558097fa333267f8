//! Shadow variables: data patch A attaches to live objects survives A's revert and is read
//! by patch B, through 100 cycles with 8 threads calling the patched function; free_all
//! with a destructor frees exactly what was allocated.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Proves that shadows made by one module are seen by the next (the table lives in the
/// agent), that `get_or_alloc` runs the constructor once per object however many patches
/// and threads race on it, that a reader never sees a wrong shadow, and that `free_all`
/// with a destructor visits each shadow once and leaves the table empty.
#[test]
fn shadows_survive_patches_through_100_cycles_with_8_threads() {
    let dir = TempDir::new("shadow");
    let exe = build_fixture(&dir, "gcc", "shadow.c", "shadow");
    let sums = sym_defines(&exe, &["touch"]);
    let module = |name: &str, switch: &str| {
        let out = dir.join(&format!("{name}.so"));
        let mut defs = vec![format!("-DNAME=\"{name}\""), format!("-D{switch}")];
        defs.extend(sums.iter().cloned());
        build_patch("shadow_fix.c", &out, &defs);
        out
    };
    let (a, b, c) = (
        module("shadow-a", "SHADOW_A"),
        module("shadow-b", "SHADOW_B"),
        module("shadow-c", "SHADOW_C"),
    );

    let mut t = Spawn::new(&exe, &dir.runtime_dir()).start();
    let start = Instant::now();
    let mut ms = Vec::new();
    let mut step = |what: &str, out: Out| {
        assert_eq!(out.code, 0, "{what}: {out}");
        expect_completed(&out);
        ms.extend(transition_ms(&out));
        std::thread::sleep(Duration::from_millis(2));
    };
    for cycle in 0..100 {
        // A makes shadows; B, stacked over A, reads them; then B alone after A's revert.
        step("apply A", t.apply(&a, "30s"));
        step("apply B over A", t.apply(&b, "30s"));
        step("revert B", t.revert("shadow-b", "30s"));
        step("revert A", t.revert("shadow-a", "30s"));
        step("apply B", t.apply(&b, "30s"));
        step("revert B", t.revert("shadow-b", "30s"));
        if cycle % 20 == 19 {
            let s = t.stats();
            assert_eq!(
                (s["r4"], s["r7"], s["ctor_bad"]),
                (0, 0, 0),
                "cycle {cycle}: {s:?}"
            );
        }
    }
    let elapsed = start.elapsed();
    let s = t.stats();
    // A ran 100 times while every thread touched all 64 objects: each got one shadow, its
    // constructor ran once, and B (in a later module) found it.
    assert_eq!(s["ctor"], 64, "{s:?}");
    assert_eq!((s["r4"], s["r7"], s["ctor_bad"]), (0, 0, 0), "{s:?}");
    // r3: B found no shadow. A ran for milliseconds before B ever did, time for every
    // thread to touch all 64 objects many times, so B always finds one.
    assert!(s["r1"] > 0 && s["r2"] > 0 && s["r3"] == 0, "{s:?}");

    let out = t.apply(&c, "30s");
    expect_completed(&out);
    let s = t.stats();
    assert_eq!(
        (s["before"], s["dtor"], s["dtor_bad"], s["after"]),
        (64, 64, 0, 0),
        "{s:?}"
    );
    let out = t.revert("shadow-c", "30s");
    expect_completed(&out);
    t.send("quit");
    t.wait_line("EXITED", Duration::from_secs(20));
    eprintln!(
        "shadow: 100 cycles (600 transitions) in {elapsed:?}; transitions {}; {s:?}",
        summary(&mut ms)
    );
}
