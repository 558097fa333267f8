//! Memory that goes away (issue 10, items 1 and 5): a reverted module's constants that the
//! program still points to, and a patched library that the program dlcloses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

/// Builds `strings.c` and its patch `strings_fix.c`.
fn strings_setup(dir: &TempDir) -> (PathBuf, PathBuf) {
    let exe = dir.join("strings");
    let src = fixture("strings.c");
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
    let fix = dir.join("fix-strings.so");
    build_patch("strings_fix.c", &fix, &sym_defines(&exe, &["label"]));
    (exe, fix)
}

/// Regression test for issue 10 item 1 (a reverted module was dlclosed while the program
/// still pointed into it; callers faulted in strlen, 3 of 5 runs of 20 cycles). Proves that
/// 200 apply/revert cycles of a patch whose replacement returns a string constant of its
/// module, with 8 threads keeping and re-reading every pointer it returned (some from
/// before the last revert, and one kept for good), crash nothing and read no wrong string;
/// and that `status` shows the reverted module as still mapped, with its size.
#[test]
fn module_constants_stay_valid_after_revert() {
    let dir = TempDir::new("lifetime-strings");
    let (exe, fix) = strings_setup(&dir);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).start();
    let mut prev = t.stats();
    for cycle in 0..200 {
        let a = t.apply(&fix, "30s");
        assert_eq!(a.code, 0, "cycle {cycle}: {a}");
        assert!(a.text().contains("completed"), "cycle {cycle}: {a}");
        let r = t.revert("fix-strings", "30s");
        assert_eq!(r.code, 0, "cycle {cycle}: {r}");
        assert!(r.text().contains("completed"), "cycle {cycle}: {r}");
        assert!(
            t.alive(),
            "cycle {cycle}: the target died after the revert: {:?}",
            t.death()
        );
        if cycle % 20 == 19 {
            let s = t.stats();
            assert_eq!(s["bad"], 0, "cycle {cycle}: a wrong string was read: {s:?}");
            assert!(s["calls"] > prev["calls"], "cycle {cycle}: stalled: {s:?}");
            prev = s;
        }
    }
    let s = t.stats();
    assert_eq!(s["bad"], 0, "{s:?}");
    assert!(
        s["new"] > 0 && s["sticky"] == 1,
        "the patch never ran: {s:?}"
    );
    let st = t.status();
    assert!(st.patches.is_empty(), "{st:#?}");
    // One mapping, reused by every apply, listed with its size.
    assert_eq!(st.retired.len(), 1, "{st:#?}");
    let r = &st.retired[0];
    assert_eq!(
        (r.name.as_str(), r.how.as_str()),
        ("fix-strings", "reverted")
    );
    assert!(r.mapped_bytes >= 4096, "{r:?}");
    assert!(
        maps_file(t.pid(), &fix),
        "the reverted module is not mapped"
    );
    let human = t.kg(&["status", &t.pid_arg()]);
    human.expect(0, "reverted modules still mapped");
    assert!(human.stdout.contains("fix-strings"), "{human}");
    t.send("quit");
    t.wait_line("EXITED", Duration::from_secs(20));
    eprintln!("module_constants_stay_valid_after_revert: 200 cycles, 0 crashes, {s:?}");
}

/// Builds `unload.c`, `libunload.so` (soname `libunload.so`) and `unload_fix.c`.
fn unload_setup(dir: &TempDir) -> (PathBuf, PathBuf, PathBuf) {
    let exe = dir.join("unload");
    let lib = dir.join("libunload.so");
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-o",
            exe.to_str().unwrap(),
            fixture("unload.c").to_str().unwrap(),
            "-ldl",
        ],
    );
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libunload.so",
            "-o",
            lib.to_str().unwrap(),
            fixture("unload_lib.c").to_str().unwrap(),
        ],
    );
    let fix = dir.join("fix-unload.so");
    build_patch("unload_fix.c", &fix, &sym_defines(&lib, &["unload_value"]));
    (exe, lib, fix)
}

/// Sends `cmd` and returns the answer line starting with `prefix`.
#[track_caller]
fn ask(t: &mut Target, cmd: &str, prefix: &str) -> String {
    t.send(cmd);
    t.wait_line(prefix, Duration::from_secs(10))
}

#[track_caller]
fn open(t: &mut Target) -> u64 {
    let line = ask(t, "open", "OPENED ");
    let fnaddr = line.trim_start_matches("OPENED fn=0x");
    let addr = u64::from_str_radix(fnaddr, 16).unwrap_or(0);
    assert_ne!(addr, 0, "the program could not dlopen its library: {line}");
    addr
}

#[track_caller]
fn call(t: &mut Target, x: i32) -> i64 {
    let line = ask(t, &format!("call {x}"), "VALUE ");
    line["VALUE ".len()..].trim().parse().unwrap()
}

#[track_caller]
fn mapped(t: &mut Target) -> bool {
    ask(t, "mapped", "MAPPED ") == "MAPPED 1"
}

/// Whether `/proc/<pid>/maps` maps `file`.
fn maps_file(pid: u32, file: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let file = std::fs::canonicalize(file).unwrap();
    maps.lines()
        .any(|l| l.split_whitespace().nth(5) == Some(file.to_str().unwrap()))
}

const OLD_4: i64 = 4 * 2 + 1;
const NEW_4: i64 = 4 * 3 + 5;

/// Regression test for issue 10 item 5 (a patched library that the program dlcloses was
/// unmapped under the patch: a later dlopen at the same address ran the old code while
/// status listed the patch). Proves that while patched the library stays mapped when the
/// program dlcloses it (kgpatch holds a reference), that a later dlopen finds the same
/// mapping and runs the patched code, and that after the revert the reference is released:
/// the program's own dlclose (or the revert, when the program had already closed it) then
/// unmaps the library.
#[test]
fn patched_library_stays_mapped_until_revert() {
    let dir = TempDir::new("lifetime-dlclose");
    let (exe, lib, fix) = unload_setup(&dir);
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg(lib.as_os_str())
        .start();
    let f = open(&mut t);
    assert_eq!(call(&mut t, 4), OLD_4);
    expect_completed(&t.apply(&fix, "30s"));
    assert_eq!(call(&mut t, 4), NEW_4);

    ask(&mut t, "close", "CLOSED rc=0");
    assert!(
        mapped(&mut t),
        "the program's dlclose unmapped a library that holds a patched function"
    );
    assert_eq!(open(&mut t), f, "the library moved while patched");
    assert_eq!(
        call(&mut t, 4),
        NEW_4,
        "a dlopen after the program's dlclose runs the old code while the patch is applied"
    );
    let st = t.status();
    assert_eq!(st.patches.len(), 1, "{st:#?}");
    assert!(
        st.pinned
            .iter()
            .any(|p| p.library.ends_with("libunload.so") && p.sites.len() == 1),
        "{st:#?}"
    );
    t.kg(&["unload", &t.pid_arg(), "fix-unload"])
        .expect(refusal_code("busy"), "revert it first");

    // The program holds its handle over the revert: its dlclose then unmaps the library.
    expect_completed(&t.revert("fix-unload", "30s"));
    assert_eq!(call(&mut t, 4), OLD_4);
    assert!(mapped(&mut t));
    ask(&mut t, "close", "CLOSED rc=0");
    assert!(
        !mapped(&mut t),
        "after the revert kgpatch still holds the library"
    );

    // The program closes it while patched: the revert releases the last reference.
    let f2 = open(&mut t);
    expect_completed(&t.apply(&fix, "30s"));
    assert_eq!(call(&mut t, 4), NEW_4);
    ask(&mut t, "close", "CLOSED rc=0");
    assert!(mapped(&mut t));
    expect_completed(&t.revert("fix-unload", "30s"));
    assert!(
        !mapped(&mut t),
        "the revert did not release kgpatch's reference to the library"
    );
    // Loaded again (anywhere), it runs its own code.
    let f3 = open(&mut t);
    assert_eq!(call(&mut t, 4), OLD_4, "fn {f3:#x} (was {f2:#x})");
    let st = t.status();
    assert!(st.pinned.is_empty(), "{st:#?}");

    // The reverted module stays mapped; another file with its patch name is refused.
    assert_eq!(st.retired.len(), 1, "{st:#?}");
    assert!(maps_file(t.pid(), &fix));
    let copy = dir.join("fix-unload-copy.so");
    std::fs::copy(&fix, &copy).unwrap();
    t.apply(&copy, "30s")
        .expect_refused("bad_module", "is still mapped");
    t.kg(&["unload", &t.pid_arg(), "no-such-patch"])
        .expect(refusal_code("no_such_patch"), "no reverted module");
    // The explicit, loud unload.
    t.kg(&["unload", &t.pid_arg(), "fix-unload"])
        .expect(0, "WARNING");
    assert!(!maps_file(t.pid(), &fix), "unload left the module mapped");
    let st = t.status();
    assert!(st.retired.is_empty(), "{st:#?}");
    expect_completed(&t.apply(&copy, "30s"));
    assert_eq!(call(&mut t, 4), NEW_4);
    expect_completed(&t.revert("fix-unload", "30s"));
    assert_eq!(call(&mut t, 4), OLD_4);
    assert!(t.alive());
}

/// Regression test for issue 10 item 5 (revert wrote its 5 saved bytes into an unrelated
/// mapping that had replaced the patched library, and reported success). Proves that when
/// something else is mapped over a patched function, `kgpatch revert` refuses with one
/// sentence (exit 1), writes nothing (the page's content is unchanged, byte for byte), and
/// leaves the patch listed.
#[test]
fn revert_never_writes_over_foreign_memory() {
    let dir = TempDir::new("lifetime-squat");
    let (exe, lib, fix) = unload_setup(&dir);
    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .arg(lib.as_os_str())
        .start();
    let f = open(&mut t);
    expect_completed(&t.apply(&fix, "30s"));
    assert_eq!(call(&mut t, 4), NEW_4);
    assert_eq!(
        ask(&mut t, &format!("squat {f:#x}"), "SQUATTED "),
        "SQUATTED 1"
    );
    let before = ask(&mut t, &format!("sum {f:#x}"), "SUM ");
    assert!(before.ends_with("fill=1"), "{before}");
    let r = t.revert("fix-unload", "30s");
    let after = ask(&mut t, &format!("sum {f:#x}"), "SUM ");
    assert_eq!(
        after, before,
        "kgpatch wrote into memory that is no longer the patched function:\n{r}"
    );
    r.expect(1, "no longer");
    assert!(t.alive());
    let st = t.status();
    assert_eq!(st.patches.len(), 1, "{st:#?}");
    assert!(st.transition.is_none(), "{st:#?}");
}
