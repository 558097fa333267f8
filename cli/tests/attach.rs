//! `kgpatch attach` and `apply --attach` end to end (issue 12): targets started without
//! the agent get it injected by the CLI, then apply and revert work as with the preload;
//! `status` says the agent was attached; a second attach is a no-op that says so.

use std::time::Duration;

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

/// A process whose spare static TLS is used up (here: none reserved) cannot take the agent
/// (its initial-exec TLS needs 376 bytes of it): the attach is refused with what to do, and
/// the process runs on without the agent mapped.
#[test]
fn attach_without_spare_static_tls_is_refused_with_what_to_do() {
    let dir = TempDir::new("attach-tls");
    let exe = build_target(&dir, "target", &[]);
    agent_so();
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg("2")
        .no_agent()
        .env(
            "GLIBC_TUNABLES",
            "glibc.rtld.nns=1:glibc.rtld.optional_static_tls=0",
        )
        .start();
    let maps_before = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    let out = t.kg(&["attach", &t.pid_arg()]);
    out.expect(1, "static TLS");
    assert!(out.stderr.contains("LD_PRELOAD"), "{out}");
    let maps_after = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    assert!(
        !maps_after.contains("libkgpatch_agent.so"),
        "the agent stayed mapped"
    );
    // The bootstrap thread ran and exited: glibc keeps its stack in its stack cache and the
    // malloc arena its dlopen used; nothing else may be new (no bootstrap page, nothing
    // executable, no file).
    let before: std::collections::HashSet<&str> = maps_before.lines().collect();
    for line in maps_after.lines().filter(|l| !before.contains(l)) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 5 && !f[1].contains('x'),
            "a new mapping other than glibc's thread-stack and arena caches: {line}"
        );
    }
    assert_eq!(t.stats()["bad"], 0);
    assert!(t.alive());
    eprintln!("no spare static TLS: {}", out.stderr.trim());
}

/// After an attach, a transition held by a thread parked in the replaced function behaves as
/// with the preload: `status` names the thread, `force` completes it, the thread finishes
/// the old body it was in, revert works; `ps` lists the process as attached.
#[test]
fn after_attach_force_ps_and_a_parked_thread_work_as_with_the_preload() {
    let dir = TempDir::new("attach-force");
    let exe = build_target(&dir, "target", &[]);
    let fix = crate::parked::parked_patch(&dir, &exe, "fix-parked-attach");
    agent_so();
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg("4")
        .no_agent()
        .start();
    let pid = t.pid_arg();
    t.kg(&["attach", &pid]).expect(0, "attached the agent");
    let ps = t.kg(&["ps"]);
    ps.expect(0, "attached since");
    assert!(ps.stdout.contains(&pid), "{ps}");

    t.send("park");
    t.wait_line("PARKED", Duration::from_secs(5));
    t.kg(&[
        "apply",
        &pid,
        fix.to_str().unwrap(),
        "--timeout",
        "300ms",
        "--keep-pending",
        "--no-wait",
    ])
    .expect_code(0);
    let s = t.status_until(Duration::from_secs(10), |s| {
        s.transition.as_ref().is_none_or(|tr| tr.remaining_ms == 0)
    });
    let tr = s
        .transition
        .as_ref()
        .expect("kept pending past its deadline");
    assert!(!tr.pending.is_empty(), "{s:#?}");
    t.kg(&["force", &pid]).expect(0, "WARNING");
    let s = t.status_until(Duration::from_secs(5), |s| s.transition.is_none());
    assert_eq!(
        s.last.as_ref().map(|l| l.result),
        Some(kgpatch_protocol::OutcomeKind::Completed),
        "{s:#?}"
    );
    t.send("unpark");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 101",
        "forced, the parked thread finishes the old body it was in"
    );
    t.revert("fix-parked-attach", "30s").expect_code(0);
    assert_eq!(t.stats()["bad"], 0);
    assert!(t.alive());
}
