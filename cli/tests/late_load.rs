//! The agent loaded late (issue 12): a target started without `LD_PRELOAD` `dlopen`s
//! `libkgpatch_agent.so` with `RTLD_LOCAL` — what `kgpatch attach`'s bootstrap thread does —
//! and calls `kgpatch_agent_attach`. The agent then serves apply and revert as a preloaded
//! one does, with no `pthread_create`/`sigprocmask` interposer in effect; a second call is a
//! no-op that says so; the socket goes to the runtime directory the caller named.

use std::time::Duration;

use crate::harness::*;

#[test]
fn an_agent_dlopened_late_patches_like_a_preloaded_one() {
    let dir = TempDir::new("late-load");
    let exe = build_target(&dir, "target", &[]);
    let fix = dir.join("fix-late.so");
    let mut defs = vec!["-DNAME=\"fix-late\"".to_string(), "-DPATCH_ANSWER".into()];
    defs.extend(sym_defines(&exe, &["answer"]));
    build_patch("fix.c", &fix, &defs);

    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg("4")
        .no_agent()
        .start();
    t.kg(&["status", &t.pid_arg()])
        .expect(3, "runs no kgpatch agent");

    let rt = dir.runtime_dir();
    let late = format!("late {} {}", agent_so().display(), rt.display());
    t.send(&late);
    let line = t.wait_line("LATE", Duration::from_secs(20));
    assert!(
        line.starts_with("LATE 0"),
        "the late agent did not start: {line}"
    );
    assert!(
        rt.join(format!("{}.sock", t.pid())).exists(),
        "no socket in the runtime directory the attach named"
    );
    let origin = t.status().agent.map(|a| a.origin);
    assert_eq!(
        origin,
        Some(kgpatch_protocol::Origin::Attach),
        "status: how it came in"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    assert!(
        maps.contains("libkgpatch_agent.so"),
        "the agent is not mapped"
    );

    for cycle in 0..20 {
        let a = t.apply(&fix, "30s");
        assert_eq!(a.code, 0, "cycle {cycle}: {a}");
        assert!(a.text().contains("completed"), "cycle {cycle}: {a}");
        let r = t.revert("fix-late", "30s");
        assert_eq!(r.code, 0, "cycle {cycle}: {r}");
    }
    let st = t.stats();
    assert_eq!(st["bad"], 0, "{st:?}");
    assert!(st["a_old"] > 0 && st["a_new"] > 0, "{st:?}");

    t.send(&late);
    let again = t.wait_line("LATE", Duration::from_secs(20));
    assert!(
        again.starts_with("LATE 1"),
        "a second attach was not a no-op: {again}"
    );
    assert!(t.alive());
    eprintln!(
        "late-loaded agent: 20 apply/revert cycles, {} calls, 0 bad",
        st["calls"]
    );
}
