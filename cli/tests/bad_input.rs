//! Bad input: each is refused with a clear message and the expected exit code, and the
//! target is untouched (code bytes of every function a case aims at, the modules mapped,
//! the patch stack, and a health check, compared before and after).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kgpatch_protocol::Status;

use crate::harness::*;
use crate::parked::{parked_patch, parked_tid, wait_busy};

/// The functions whose code a case could change, and their live bytes.
struct Snapshot(Vec<(String, Vec<u8>)>);

fn functions(exe: &Path) -> Vec<(String, Sym)> {
    let mut v: Vec<(String, Sym)> = ["answer", "scale", "parked_fn", "tiny"]
        .iter()
        .map(|n| (n.to_string(), describe(exe, n)))
        .collect();
    for (i, d) in kgpatch_kmod::describe_symbol(exe, "helper", None)
        .unwrap()
        .iter()
        .enumerate()
    {
        v.push((
            format!("helper#{i}"),
            Sym {
                address: d.address,
                size: d.size,
                checksum: d.checksum.unwrap(),
            },
        ));
    }
    assert_eq!(v.len(), 6, "two static helpers: {v:?}");
    v
}

fn snapshot(t: &Target, fns: &[(String, Sym)]) -> Snapshot {
    Snapshot(
        fns.iter()
            .map(|(n, s)| (n.clone(), t.code_bytes(s)))
            .collect(),
    )
}

/// Mappings of files in `dir` other than the target itself (patch modules left loaded).
fn mapped_modules(t: &Target, dir: &Path) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    let exe = std::fs::canonicalize(t.exe()).unwrap();
    let mut v: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| Path::new(p).starts_with(dir) && Path::new(p) != exe)
        .map(str::to_owned)
        .collect();
    v.dedup();
    v
}

/// Asserts the target is as it was: same code bytes, no module mapped, no patch, no
/// transition, every worker on the old code, the helpers answering.
#[track_caller]
fn assert_untouched(
    case: &str,
    t: &mut Target,
    fns: &[(String, Sym)],
    before: &Snapshot,
    dir: &Path,
) {
    let after = snapshot(t, fns);
    for ((n, b), (_, a)) in before.0.iter().zip(&after.0) {
        assert_eq!(b, a, "{case}: the code of {n} changed");
    }
    // Reverted modules stay mapped on purpose (module lifetime, ARCHITECTURE.md); status
    // lists them. Any other module mapped is one a refused request left behind.
    let s: Status = t.status();
    let retired: Vec<String> = s
        .retired
        .iter()
        .map(|r| r.module.display().to_string())
        .collect();
    let mut left = mapped_modules(t, dir);
    left.retain(|m| !retired.contains(m));
    assert_eq!(left, Vec::<String>::new(), "{case}: a module stayed mapped");
    assert!(s.patches.is_empty(), "{case}: {s:#?}");
    assert!(s.transition.is_none(), "{case}: {s:#?}");
    health(case, t);
}

#[track_caller]
fn health(case: &str, t: &mut Target) {
    let s1 = t.stats();
    let s2 = t.stats();
    assert!(t.alive(), "{case}: the target died");
    assert!(
        s2["calls"] > s1["calls"],
        "{case}: the workers stopped: {s2:?}"
    );
    assert_eq!((s2["bad"], s2["last_old"]), (0, 4), "{case}: {s2:?}");
    t.send("helpers");
    assert_eq!(
        t.wait_line("HELPERS", Duration::from_secs(5)),
        "HELPERS 14 18",
        "{case}"
    );
    t.send("tiny");
    assert_eq!(
        t.wait_line("TINY", Duration::from_secs(5)),
        "TINY 0",
        "{case}"
    );
}

/// The file offset and size of section `name` of a 64-bit ELF file.
fn elf_section(data: &[u8], name: &str) -> (usize, usize) {
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(sh(shstrndx) + 0x18);
    (0..shnum)
        .find(|&i| {
            let n = strtab + u32_at(sh(i));
            data[n..].starts_with(name.as_bytes()) && data[n + name.len()] == 0
        })
        .map(|i| (u64_at(sh(i) + 0x18), u64_at(sh(i) + 0x20)))
        .unwrap_or_else(|| panic!("no section {name}"))
}

/// A copy of `module` whose first manifest record claims format version `version`.
fn with_manifest_version(module: &Path, out: &Path, version: u16) {
    let mut data = std::fs::read(module).unwrap();
    let (off, size) = elf_section(&data, ".kgpatch");
    assert!(size >= 16);
    assert_eq!(
        &data[off..off + 4],
        &0x5250474bu32.to_le_bytes(),
        "record magic"
    );
    assert_eq!(u16::from_le_bytes([data[off + 4], data[off + 5]]), 1);
    data[off + 4..off + 6].copy_from_slice(&version.to_le_bytes());
    std::fs::write(out, data).unwrap();
}

fn module(dir: &TempDir, exe: &Path, name: &str, defs: &[&str], syms: &[&str]) -> PathBuf {
    let out = dir.join(&format!("{name}.so"));
    let mut d: Vec<String> = vec![format!("-DNAME=\"{name}\"")];
    d.extend(defs.iter().map(|s| s.to_string()));
    d.extend(sym_defines(exe, syms));
    build_patch("fix.c", &out, &d);
    out
}

/// Proves that every kind of bad input is refused with a clear message and the documented
/// exit code, and leaves the target untouched: not a patch module (random bytes; an ELF
/// without a manifest; a missing file), a wrong manifest version, a wrong target (a library
/// not loaded; another build-id; a rebuilt target whose checksum differs), a missing symbol,
/// an ambiguous local symbol, an unpatchable 3-byte function, a vetoing pre-apply callback,
/// a revert of a patch not on top, a second transition while one runs, a pid without agent
/// and a pid that does not exist.
#[test]
fn bad_input_is_refused_and_target_untouched() {
    let dir = TempDir::new("bad");
    let exe = build_target(&dir, "target", &[]);
    let fns = functions(&exe);

    let junk = dir.join("junk.so");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&junk, bytes).unwrap();
    let plain = dir.join("plain.so");
    let plain_src = fixture("churn_lib.c");
    cc(
        "gcc",
        &[
            "-O2",
            "-shared",
            "-fPIC",
            "-o",
            plain.to_str().unwrap(),
            plain_src.to_str().unwrap(),
        ],
    );
    let good_a = module(&dir, &exe, "fix-a", &["-DPATCH_ANSWER"], &["answer"]);
    let good_b = module(&dir, &exe, "fix-b", &["-DPATCH_SCALE"], &["scale"]);
    let badver = dir.join("fix-ver.so");
    with_manifest_version(&good_a, &badver, 2);
    let wrong_lib = module(
        &dir,
        &exe,
        "fix-lib",
        &["-DPATCH_ANSWER", "-DTARGET_LIB=\"libnotloaded.so.7\""],
        &["answer"],
    );
    let wrong_bid = module(
        &dir,
        &exe,
        "fix-bid",
        &[
            "-DPATCH_ANSWER",
            "-DBUILD_ID=\"00112233445566778899aabbccddeeff00112233\"",
        ],
        &["answer"],
    );
    assert_ne!(build_id(&exe), "00112233445566778899aabbccddeeff00112233");
    let wrong_sum = dir.join("fix-sum.so");
    build_patch(
        "fix.c",
        &wrong_sum,
        &[
            "-DNAME=\"fix-sum\"".into(),
            "-DPATCH_ANSWER".into(),
            format!("-DSZ_answer={}", describe(&exe, "answer").size),
            "-DSUM_answer=0x0123456789abcdefULL".into(),
        ],
    );
    let missing = module(&dir, &exe, "fix-missing", &["-DPATCH_MISSING"], &[]);
    let ambiguous = module(&dir, &exe, "fix-helper", &["-DPATCH_HELPER"], &[]);
    let tiny = module(&dir, &exe, "fix-tiny", &["-DPATCH_TINY"], &["tiny"]);
    let veto = module(
        &dir,
        &exe,
        "fix-veto",
        &["-DPATCH_ANSWER", "-DVETO"],
        &["answer"],
    );
    let parked = parked_patch(&dir, &exe, "fix-parked");

    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let pid = t.pid_arg();
    let original = snapshot(&t, &fns);
    assert_untouched("at start", &mut t, &fns, &original, dir.path());

    let nowhere = dir.join("no-such-module.so");
    let cases: [(&str, &Path, &str, &str); 12] = [
        ("random bytes", &junk, "bad_module", "ELF"),
        (
            "ELF without manifest",
            &plain,
            "bad_module",
            "no .kgpatch section",
        ),
        (
            "missing file",
            &nowhere,
            "failed",
            "cannot read the patch module",
        ),
        (
            "manifest version 2",
            &badver,
            "bad_module",
            "format version 2",
        ),
        (
            "library not loaded",
            &wrong_lib,
            "bad_module",
            "libnotloaded.so.7, which is not loaded",
        ),
        ("wrong build-id", &wrong_bid, "bad_module", "build-id"),
        ("wrong checksum", &wrong_sum, "bad_module", "checksum"),
        ("missing symbol", &missing, "bad_module", "no_such_function"),
        (
            "ambiguous local symbol",
            &ambiguous,
            "bad_module",
            "ambiguous",
        ),
        ("3-byte function", &tiny, "unpatchable", "patch site needs"),
        (
            "pre-apply veto",
            &veto,
            "vetoed",
            "the e2e veto callback says no",
        ),
        (
            "build-id case again, to check nothing piled up",
            &wrong_bid,
            "bad_module",
            "build-id",
        ),
    ];
    let mut report = String::new();
    for (case, module, kind, needle) in cases {
        let out = t.apply(module, "5s");
        out.expect_refused(kind, needle);
        let msg = out.stderr.lines().last().unwrap_or("").to_string();
        assert!(msg.starts_with("kgpatch: "), "{case}: {out}");
        report.push_str(&format!("  {case}: {msg}\n"));
        assert_untouched(case, &mut t, &fns, &original, dir.path());
    }
    // The stop-the-world baseline is compiled only into the bench's own agent (feature
    // `bench-baseline`): the production library the tests preload refuses it, apply and
    // revert alike, and changes nothing.
    for args in [
        vec!["apply", &pid, good_a.to_str().unwrap(), "--stop-the-world"],
        vec!["revert", &pid, "fix-a", "--stop-the-world"],
    ] {
        let out = t.kg(&[&args[..], &["--timeout", "5s"][..]].concat());
        assert_ne!(out.code, 0, "the production agent ran the baseline: {out}");
        assert!(
            out.stderr
                .contains("built without the stop-the-world baseline"),
            "{out}"
        );
        report.push_str(&format!(
            "  {} --stop-the-world: {}\n",
            args[0],
            out.stderr.trim()
        ));
        assert_untouched("stop-the-world", &mut t, &fns, &original, dir.path());
    }

    // The ambiguity names both candidates.
    let out = t.apply(&ambiguous, "5s");
    assert!(
        out.stderr.contains("amb_a.c") && out.stderr.contains("amb_b.c"),
        "{out}"
    );

    // A revert of a patch that is not on top; the byte check sees a real patch.
    expect_completed(&t.apply(&good_a, "10s"));
    assert_ne!(
        snapshot(&t, &fns).0[0].1,
        original.0[0].1,
        "apply left answer's bytes as they were"
    );
    expect_completed(&t.apply(&good_b, "10s"));
    let stacked = snapshot(&t, &fns);
    let out = t.revert("fix-a", "5s");
    out.expect_refused("no_such_patch", "fix-a");
    report.push_str(&format!("  revert not on top: {}\n", out.stderr.trim()));
    let s = t.status();
    assert_eq!(s.patches.len(), 2, "{s:#?}");
    assert!(s.transition.is_none());
    assert_eq!(
        snapshot(&t, &fns).0,
        stacked.0,
        "a refused revert changed code"
    );
    let out = t.revert("fix-unknown", "5s");
    out.expect_refused("no_such_patch", "fix-unknown");
    report.push_str(&format!(
        "  revert of an unknown patch: {}\n",
        out.stderr.trim()
    ));
    expect_completed(&t.revert("fix-b", "10s"));
    expect_completed(&t.revert("fix-a", "10s"));
    assert_untouched("after reverting both", &mut t, &fns, &original, dir.path());

    // A second transition while one runs.
    t.send("park");
    let tid = parked_tid(&t.wait_line("PARKED", Duration::from_secs(5)));
    t.kg(&[
        "apply",
        &pid,
        parked.to_str().unwrap(),
        "--timeout",
        "30s",
        "--keep-pending",
        "--no-wait",
    ])
    .expect_code(0);
    wait_busy(&t, tid);
    let during = snapshot(&t, &fns);
    let tr_before = t.status().transition.unwrap();
    let out = t.apply(&good_b, "5s");
    out.expect_refused("busy", "in progress");
    report.push_str(&format!("  second transition: {}\n", out.stderr.trim()));
    let tr_after = t
        .status()
        .transition
        .expect("the first transition still runs");
    assert_eq!(
        (tr_after.t, &tr_after.patch, tr_after.reversed),
        (tr_before.t, &tr_before.patch, false)
    );
    assert_eq!(
        snapshot(&t, &fns).0,
        during.0,
        "the refused apply changed code"
    );
    t.send("unpark");
    t.wait_line("UNPARKED", Duration::from_secs(5));
    t.status_until(Duration::from_secs(10), |s| s.transition.is_none());
    expect_completed(&t.revert("fix-parked", "10s"));
    assert_untouched(
        "after the parked patch",
        &mut t,
        &fns,
        &original,
        dir.path(),
    );

    // A pid without an agent, and a pid that does not exist.
    let mut plain_target = Spawn::new(&exe, &dir.runtime_dir())
        .arg("1")
        .no_agent()
        .start();
    let out = plain_target.kg(&["status", &plain_target.pid_arg()]);
    out.expect(3, "runs no kgpatch agent");
    report.push_str(&format!("  no agent: {}\n", out.stderr.trim()));
    plain_target
        .kg(&["apply", &plain_target.pid_arg(), good_a.to_str().unwrap()])
        .expect(3, "runs no kgpatch agent");
    assert!(plain_target.alive());
    let out = t.kg(&["status", "2147483646"]);
    out.expect(3, "no process with pid 2147483646");
    report.push_str(&format!("  no such pid: {}\n", out.stderr.trim()));
    assert_untouched("at the end", &mut t, &fns, &original, dir.path());
    eprintln!("bad input messages:\n{report}");
}

/// `kgpatch <args>` run as user `nobody` (through `setpriv`), against the agents of
/// `runtime_dir`.
fn kgpatch_as_nobody(runtime_dir: &Path, args: &[&str]) -> Out {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(kgpatch_exe())
        .args(args)
        .env("KGPATCH_RUNTIME_DIR", runtime_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    run_limited(cmd, Duration::from_secs(30))
}

/// Proves a client of another uid cannot control the agent: the agent serves only from a
/// runtime directory no other user can enter (checked as any user); through the 0700
/// directory another uid gets "permission denied" (exit 3); with the directory and socket
/// opened up, the agent itself refuses it (SO_PEERCRED check, exit 1); either way nothing
/// changes. The last two need root (to run a client as `nobody`).
#[test]
fn other_uid_is_refused() {
    let dir = TempDir::new("uid");
    let exe = build_target(&dir, "target", &[]);
    {
        // A runtime directory others can enter: the agent binds no socket in it.
        use std::os::unix::fs::PermissionsExt;
        let open = dir.path().join("open-rt");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut t = Spawn::new(&exe, &open).arg("1").start();
        t.kg(&["status", &t.pid_arg()])
            .expect(3, "runs no kgpatch agent");
        assert!(
            std::fs::read_dir(&open).unwrap().next().is_none(),
            "the agent put a socket in a directory others can enter"
        );
        assert!(t.alive(), "the target died of the refused directory");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Printed with --nocapture; the directory check above ran all the same.
        eprintln!(
            "other_uid_is_refused: not root, so no client can be run as another user: only the runtime-directory check ran"
        );
        return;
    }
    let fix = module(&dir, &exe, "fix-a", &["-DPATCH_ANSWER"], &["answer"]);
    let fns = functions(&exe);
    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("4").start();
    let pid = t.pid_arg();
    let original = snapshot(&t, &fns);
    // nobody must be able to read the module for `apply` to get as far as the socket.
    let public = std::env::temp_dir().join(format!("kgpatch-e2e-uid-{}.so", std::process::id()));
    std::fs::copy(&fix, &public).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(public.clone());

    let out = kgpatch_as_nobody(&dir.runtime_dir(), &["status", &pid]);
    out.expect(3, "permission denied");
    let out = kgpatch_as_nobody(
        &dir.runtime_dir(),
        &["apply", &pid, public.to_str().unwrap()],
    );
    out.expect(3, "permission denied");
    eprintln!("other uid, 0700 directory: {}", out.stderr.trim());
    assert_untouched("other uid (directory)", &mut t, &fns, &original, dir.path());

    // Open the directories and the socket to everyone: now the agent's own check answers.
    use std::os::unix::fs::PermissionsExt;
    let sock = dir.runtime_dir().join(format!("{pid}.sock"));
    for (p, mode) in [
        (dir.path().to_owned(), 0o711),
        (dir.runtime_dir(), 0o711),
        (sock, 0o777),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = kgpatch_as_nobody(
        &dir.runtime_dir(),
        &["apply", &pid, public.to_str().unwrap()],
    );
    out.expect(refusal_code("bad_request"), "permission denied");
    eprintln!("other uid, open socket: {}", out.stderr.trim());
    kgpatch_as_nobody(&dir.runtime_dir(), &["status", &pid])
        .expect(refusal_code("bad_request"), "own user or root");
    assert_untouched(
        "other uid (peer check)",
        &mut t,
        &fns,
        &original,
        dir.path(),
    );
    // root may.
    expect_completed(&t.apply(&fix, "10s"));
}
