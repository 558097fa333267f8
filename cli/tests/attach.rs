//! `kgpatch attach` and `apply --attach` end to end (issue 12): targets started without
//! the agent get it injected by the CLI, then apply and revert work as with the preload;
//! `status` says the agent was attached; a second attach is a no-op that says so.

use crate::harness::*;

#[test]
fn attach_then_patch_a_process_started_without_the_agent() {
    let dir = TempDir::new("attach-cli");
    let exe = build_target(&dir, "target", &[]);
    let fix = dir.join("fix-attach.so");
    let mut defs = vec!["-DNAME=\"fix-attach\"".to_string(), "-DPATCH_ANSWER".into()];
    defs.extend(sym_defines(&exe, &["answer"]));
    build_patch("fix.c", &fix, &defs);
    agent_so(); // built next to kgpatch, where `attach` finds it

    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg("4")
        .no_agent()
        .start();
    t.kg(&["apply", &t.pid_arg(), fix.to_str().unwrap()])
        .expect(3, "kgpatch attach");
    let out = t.kg(&["attach", &t.pid_arg()]);
    out.expect(0, "attached the agent");
    eprintln!("{}", out.stdout.trim());
    let s = t.status();
    assert_eq!(
        s.agent.map(|a| a.origin),
        Some(kgpatch_protocol::Origin::Attach),
        "{s:#?}"
    );
    for cycle in 0..20 {
        let a = t.apply(&fix, "30s");
        assert_eq!(a.code, 0, "cycle {cycle}: {a}");
        let r = t.revert("fix-attach", "30s");
        assert_eq!(r.code, 0, "cycle {cycle}: {r}");
    }
    let st = t.stats();
    assert_eq!(st["bad"], 0, "{st:?}");
    assert!(st["a_new"] > 0, "{st:?}");
    t.kg(&["attach", &t.pid_arg()]).expect(0, "already runs");
    assert!(t.alive());

    // apply --attach on a second fresh target: one command.
    let mut u = Spawn::new(&exe, &dir.runtime_dir())
        .arg("2")
        .no_agent()
        .start();
    let a = u.kg(&["apply", "--attach", &u.pid_arg(), fix.to_str().unwrap()]);
    a.expect(0, "completed");
    assert!(a.stderr.contains("attached the agent"), "{a}");
    u.revert("fix-attach", "30s").expect_code(0);
    assert_eq!(u.stats()["bad"], 0);
    assert!(u.alive());

    t.kg(&["attach", "2147483646"])
        .expect(3, "no process with pid 2147483646");
}
