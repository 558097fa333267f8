//! No deadlock, no crash: transitions while threads churn malloc/free, dlopen/dlclose and
//! thread creation.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Proves that 200 apply/revert cycles, while 15 threads churn malloc/free, dlopen/dlclose
/// of a small library, calls to the patched function and pthread_create/join, all complete
/// (exit 0), never deadlock the process (every thread keeps making progress and all of them
/// join at the end) and never produce a wrong result. A migration handler that took a lock a
/// stopped thread holds (malloc's, the loader's) would hang here.
#[test]
fn churn_malloc_dlopen_threads_during_200_cycles() {
    let dir = TempDir::new("churn");
    let exe = dir.join("churn");
    let lib = dir.join("libchurn.so");
    let (src, lib_src) = (fixture("churn.c"), fixture("churn_lib.c"));
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-o",
            exe.to_str().unwrap(),
            src.to_str().unwrap(),
            "-lpthread",
            "-ldl",
        ],
    );
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
    let fix = dir.join("fix-churn.so");
    let mut defs = vec!["-DNAME=\"fix-churn\"".to_string(), "-DPATCH_ANSWER".into()];
    defs.extend(sym_defines(&exe, &["answer"]));
    build_patch("fix.c", &fix, &defs);

    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg(lib.as_os_str())
        .start();
    std::thread::sleep(Duration::from_millis(200));
    let mut prev = t.stats();
    let start = Instant::now();
    let mut ms = Vec::new();
    for cycle in 0..200 {
        let a = t.apply(&fix, "30s");
        assert_eq!(a.code, 0, "cycle {cycle}: {a}");
        assert!(a.text().contains("completed"), "cycle {cycle}: {a}");
        ms.extend(transition_ms(&a));
        let r = t.revert("fix-churn", "30s");
        assert_eq!(r.code, 0, "cycle {cycle}: {r}");
        ms.extend(transition_ms(&r));
        if cycle % 25 == 24 {
            let s = t.stats();
            for k in ["malloc", "dl", "calls", "spawned"] {
                assert!(
                    s[k] > prev[k],
                    "cycle {cycle}: the {k} threads made no progress: {s:?}"
                );
            }
            if s["bad"] > 0 {
                t.send("bad");
                let samples = t.wait_line("BAD", Duration::from_secs(5));
                panic!("cycle {cycle}: answer() returned neither the old nor the new result: {samples}; {s:?}");
            }
            assert_eq!(s["dlerr"], 0, "cycle {cycle}: {s:?}");
            prev = s;
        }
    }
    let elapsed = start.elapsed();
    let s = t.stats();
    if s["bad"] > 0 {
        t.send("bad");
        let samples = t.wait_line("BAD", Duration::from_secs(5));
        panic!("answer() returned neither the old nor the new result: {samples}; {s:?}");
    }
    assert_eq!((s["bad"], s["dlerr"]), (0, 0), "{s:?}");
    t.send("quit");
    t.wait_line("EXITED", Duration::from_secs(20));
    eprintln!(
        "churn: 200 cycles in {elapsed:?}; transitions {}; {s:?}",
        summary(&mut ms)
    );
}
