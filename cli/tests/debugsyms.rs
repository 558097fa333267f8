//! Symbols beyond a binary's own `.symtab` (issue 14): a static function of a stripped
//! binary patched through its separate debug file (found by build-id, and by
//! `.gnu_debuglink` with its CRC), a thread parked in a split function's `f.cold` piece
//! blocking `f`'s transition, and a C++ member function patched by its demangled name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;
use crate::parked::{background, busy_blocker, parked_tid};

/// `splitsym.c` built `-O2 -g` (`full`), its debug part (`full.debug`, from
/// `objcopy --only-keep-debug`), and a stripped copy with a `.gnu_debuglink` to it
/// (`stripped`), all in `dir`.
fn build_split(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let full = dir.join("full");
    let debug = dir.join("full.debug");
    let stripped = dir.join("stripped");
    let src = fixture("splitsym.c");
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-Wall",
            "-o",
            full.to_str().unwrap(),
            src.to_str().unwrap(),
            "-lpthread",
        ],
    );
    let (f, d, s) = (
        full.to_str().unwrap(),
        debug.to_str().unwrap(),
        stripped.to_str().unwrap(),
    );
    cc("objcopy", &["--only-keep-debug", f, d]);
    cc(
        "objcopy",
        &["--strip-all", &format!("--add-gnu-debuglink={d}"), f, s],
    );
    (full, debug, stripped)
}

/// The patch of `secret` (a static of splitsym.c), sized and summed from the unstripped
/// build (the same code at the same addresses as the stripped one).
fn secret_patch(dir: &TempDir, full: &Path, name: &str) -> PathBuf {
    let d = kgpatch_kmod::describe_symbol(full, "secret", Some("splitsym.c")).unwrap();
    assert_eq!(d.len(), 1, "{d:?}");
    let out = dir.join(&format!("{name}.so"));
    build_patch(
        "splitsym_fix.c",
        &out,
        &[
            format!("-DNAME=\"{name}\""),
            "-DPATCH_SECRET".into(),
            format!("-DSZ_secret={}", d[0].size),
            format!("-DSUM_secret={:#x}ULL", d[0].checksum.unwrap()),
        ],
    );
    out
}

/// `kgpatch describe` with `KGPATCH_DEBUG_DIRS`.
fn describe_with_dirs(dirs: &Path, runtime: &Path, args: &[&str]) -> Out {
    let mut cmd = kgpatch_cmd(runtime, args);
    cmd.env("KGPATCH_DEBUG_DIRS", dirs);
    run_limited(cmd, Duration::from_secs(60))
}

/// Applies `fix` to `t` (expected to complete), checks every worker runs the new
/// `secret`, reverts, checks the old one again; no wrong result throughout.
fn apply_check_revert(t: &mut Target, fix: &Path, name: &str) {
    expect_completed(&t.apply(fix, "20s"));
    let st = t.stats();
    assert_eq!(
        (st["bad"], st["last"]),
        (0, 2),
        "new secret() after apply: {st:?}"
    );
    expect_completed(&t.revert(name, "20s"));
    let st = t.stats();
    assert_eq!(
        (st["bad"], st["last"]),
        (0, 1),
        "old secret() after revert: {st:?}"
    );
}

/// A static function of a stripped binary, named only by its separate debug file installed
/// under `<debug dir>/.build-id/xx/yyyy.debug`: without the debug directory the apply is
/// refused and the process untouched; with it (`KGPATCH_DEBUG_DIRS` of the target, whose
/// agent resolves) the function is patched live and reverted; `describe` names the file.
#[test]
fn static_function_of_stripped_binary_by_build_id() {
    let dir = TempDir::new("dbg-buildid");
    let (full, debug, stripped) = build_split(dir.path());
    let id = build_id(&stripped);
    let dbg = dir.join("debug");
    let installed = dbg
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(&debug, &installed).unwrap();
    // The debuglink copy next to the binary must not be what is found: move it away.
    std::fs::rename(&debug, dir.join("elsewhere.debug")).unwrap();
    assert!(
        kgpatch_kmod::describe_symbol(&stripped, "secret", None)
            .unwrap()
            .is_empty(),
        "the stripped build names no static function by itself"
    );
    let fix = secret_patch(&dir, &full, "fix-secret");

    let out = describe_with_dirs(
        &dbg,
        &dir.runtime_dir(),
        &[
            "describe",
            stripped.to_str().unwrap(),
            "secret",
            "--file",
            "splitsym.c",
        ],
    );
    out.expect(0, &format!("from debug file {}", installed.display()));

    // Without the debug directory: refused, nothing changed.
    {
        let mut t = Spawn::new(&stripped, &dir.runtime_dir())
            .env("KGPATCH_DEBUG_DIRS", dir.join("empty"))
            .arg("2")
            .start();
        let out = t.apply(&fix, "5s");
        assert_ne!(out.code, 0, "{out}");
        assert!(
            out.text().contains("no matching separate debug file"),
            "{out}"
        );
        let s = t.status();
        assert!(s.patches.is_empty() && s.transition.is_none(), "{s:#?}");
        let st = t.stats();
        assert_eq!((st["bad"], st["last"]), (0, 1), "{st:?}");
    }

    let mut t = Spawn::new(&stripped, &dir.runtime_dir())
        .env("KGPATCH_DEBUG_DIRS", &dbg)
        .arg("2")
        .start();
    apply_check_revert(&mut t, &fix, "fix-secret");
}

/// The same found by `.gnu_debuglink` only (the file at the build-id path of the debug
/// directory is another build's, with another build-id): a file of that name whose CRC32 differs (another build's debug file, in the binary's own
/// directory, looked at first) is passed over, and the right one in `.debug/` is used.
#[test]
fn static_function_of_stripped_binary_by_debuglink() {
    let dir = TempDir::new("dbg-link");
    let (full, debug, stripped) = build_split(dir.path());
    let fix = secret_patch(&dir, &full, "fix-secret-link");
    let bin = dir.join("bin");
    std::fs::create_dir_all(bin.join(".debug")).unwrap();
    let exe = bin.join("stripped");
    std::fs::copy(&stripped, &exe).unwrap();
    let right = bin.join(".debug").join("full.debug");
    std::fs::copy(&debug, &right).unwrap();
    // Another build (-O1: other code, other addresses) with the same debuglink name.
    let other = dir.join("other");
    let src = fixture("splitsym.c");
    cc(
        "gcc",
        &[
            "-O1",
            "-g",
            "-o",
            other.to_str().unwrap(),
            src.to_str().unwrap(),
            "-lpthread",
        ],
    );
    let wrong = bin.join("full.debug");
    cc(
        "objcopy",
        &[
            "--only-keep-debug",
            other.to_str().unwrap(),
            wrong.to_str().unwrap(),
        ],
    );
    // The debug directory holds, at the stripped binary's build-id path, a debug file whose
    // own build-id is another's: passed over too.
    let empty = dir.join("decoy");
    let id = build_id(&exe);
    let decoy = empty
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(decoy.parent().unwrap()).unwrap();
    std::fs::copy(&wrong, &decoy).unwrap();

    let out = describe_with_dirs(
        &empty,
        &dir.runtime_dir(),
        &[
            "describe",
            exe.to_str().unwrap(),
            "secret",
            "--file",
            "splitsym.c",
        ],
    );
    out.expect(0, &format!("from debug file {}", right.display()));

    let mut t = Spawn::new(&exe, &dir.runtime_dir())
        .env("KGPATCH_DEBUG_DIRS", &empty)
        .arg("2")
        .start();
    apply_check_revert(&mut t, &fix, "fix-secret-link");
}

/// A thread whose frame is in `coldy.cold` (the piece gcc -O2 split off `coldy`) is inside
/// `coldy`: it blocks `coldy`'s transition (status names `coldy`; a 1 s deadline reverses
/// it), and the transition completes once it leaves. `describe` lists the piece.
#[test]
fn thread_in_cold_part_blocks_the_transition() {
    let dir = TempDir::new("cold");
    let (full, _, _) = build_split(dir.path());
    let nm = std::process::Command::new("nm")
        .arg(&full)
        .output()
        .unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    assert!(
        nm.lines().any(|l| l.ends_with(" coldy.cold")),
        "gcc made no coldy.cold:\n{nm}"
    );
    let d = kgpatch_kmod::describe_symbol(&full, "coldy", None).unwrap();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        d[0].parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["coldy.cold"],
        "{d:?}"
    );
    let fix = dir.join("fix-coldy.so");
    build_patch(
        "splitsym_fix.c",
        &fix,
        &[
            "-DNAME=\"fix-coldy\"".into(),
            "-DPATCH_COLDY".into(),
            format!("-DSZ_coldy={}", d[0].size),
            format!("-DSUM_coldy={:#x}ULL", d[0].checksum.unwrap()),
        ],
    );
    let mut t = Spawn::new(&full, &dir.runtime_dir()).arg("2").start();
    let pid = t.pid_arg();
    let fix_s = fix.to_str().unwrap();

    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    let apply = background(&t, &["apply", &pid, fix_s, "--timeout", "1s", "--json"]);
    let s = t.status_until(Duration::from_secs(10), |s| busy_blocker(s, tid).is_some());
    let (function, _) = busy_blocker(&s, tid).unwrap();
    assert!(
        function.contains("coldy"),
        "blocked by {function:?}, not coldy"
    );
    apply.join().unwrap().expect(4, "reversed");
    let before = t.stats();
    let st = t.stats();
    assert_eq!(st["bad"], 0, "{st:?}");
    assert!(
        st["c_old"] > before["c_old"] && st["c_new"] == before["c_new"],
        "only old coldy after the reversal: {before:?} then {st:?}"
    );

    // Leaving the cold part lets the transition complete; the parked call ends in the old
    // body (101), the next one runs the new (300).
    let apply = background(&t, &["apply", &pid, fix_s, "--timeout", "30s", "--json"]);
    t.status_until(Duration::from_secs(10), |s| busy_blocker(s, tid).is_some());
    t.send("unpark");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 101"
    );
    expect_completed(&apply.join().unwrap());
    let st = t.stats();
    assert_eq!(st["bad"], 0, "{st:?}");
    assert!(st["c_new"] > 0, "{st:?}");
    t.send("park");
    assert_eq!(
        t.wait_line("UNPARKED", Duration::from_secs(5)),
        "UNPARKED 300"
    );
}

/// A C++ member function patched by its demangled name (`shop::Counter::bump(int)` in the
/// manifest); `describe shop::Counter::bump` lists both overloads, demangled; the other
/// overload is untouched; an entry naming only `shop::Counter::bump` would be ambiguous.
#[test]
fn cxx_member_function_by_demangled_name() {
    let dir = TempDir::new("cxxsym");
    let exe = build_fixture(&dir, "g++", "cxxsym.cpp", "cxxsym");
    let out = kgpatch(
        &dir.runtime_dir(),
        &[
            "describe",
            exe.to_str().unwrap(),
            "shop::Counter::bump",
            "--json",
        ],
    );
    out.expect_code(0);
    let d: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let demangled: Vec<&str> = d.iter().map(|v| v["demangled"].as_str().unwrap()).collect();
    assert_eq!(
        demangled,
        ["shop::Counter::bump(int)", "shop::Counter::bump(long, int)"],
        "{out}"
    );
    let one = &d[0];
    let fix = dir.join("fix-cxx.so");
    build_patch(
        "cxxsym_fix.c",
        &fix,
        &[
            format!("-DSZ_bump={}", one["size"]),
            format!("-DSUM_bump={}ULL", one["checksum"].as_str().unwrap()),
        ],
    );
    let text = kgpatch(
        &dir.runtime_dir(),
        &[
            "describe",
            exe.to_str().unwrap(),
            "shop::Counter::bump(int)",
        ],
    );
    text.expect(0, "demangled: shop::Counter::bump(int)");

    let amb = dir.join("fix-cxx-amb.so");
    build_patch(
        "cxxsym_fix.c",
        &amb,
        &[
            "-DALL_OVERLOADS".into(),
            format!("-DSZ_bump={}", one["size"]),
            format!("-DSUM_bump={}ULL", one["checksum"].as_str().unwrap()),
        ],
    );

    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("2").start();
    let out = t.apply(&amb, "5s");
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.text().contains("_ZN4shop7Counter4bumpEli"),
        "the refusal lists the overloads: {out}"
    );
    assert!(t.status().patches.is_empty());
    expect_completed(&t.apply(&fix, "20s"));
    let st = t.stats();
    assert_eq!(
        (st["bad"], st["last"], st["other_new"]),
        (0, 2, 0),
        "{st:?}"
    );
    expect_completed(&t.revert("fix-cxx-bump", "20s"));
    let st = t.stats();
    assert_eq!(
        (st["bad"], st["last"], st["other_new"]),
        (0, 1, 0),
        "{st:?}"
    );
}
