//! Attach succeeds, the target is unharmed, and nothing of the bootstrap stays behind.

use std::time::Duration;

use kgpatch_attach::{attach, AttachOptions};
use kgpatch_sys::proc::{self, Mapping, Pid};

use crate::harness::{eventually, fixtures, runtime, thread_count, Signals, Target};

/// Anonymous rwx mappings of the bootstrap's size (there must be none after an attach).
fn bootstrap_mappings(pid: i32) -> Vec<Mapping> {
    proc::maps(Pid::Other(pid))
        .unwrap()
        .into_iter()
        .filter(|m| m.read && m.write && m.exec && m.end - m.start == 0x10000 && m.path.is_empty())
        .collect()
}

fn opts(rt: &std::path::Path) -> AttachOptions {
    let mut o = AttachOptions::new(&fixtures().standin);
    o.runtime_dir = Some(rt.to_path_buf());
    o.timeout = Duration::from_secs(10);
    o
}

/// Attach to a target in `mode` with `threads` threads; returns the target's stats before
/// and after and the report.
fn attach_mode(
    mode: &str,
    threads: usize,
) -> (
    kgpatch_attach::AttachReport,
    crate::harness::Stats,
    crate::harness::Stats,
) {
    let fx = fixtures();
    let rt = runtime(&format!("{mode}{threads}"));
    let mut t = Target::start(&fx.target, mode, threads, &[]);
    let before = t.stats();
    assert!(bootstrap_mappings(t.pid).is_empty());
    let r = attach(t.pid, &opts(&rt)).unwrap_or_else(|e| panic!("attach to {mode}: {e}"));
    assert!(!r.already);
    assert!(r.tid > 0);
    let marker = rt.join(format!("attached.{}", t.pid));
    assert!(marker.exists(), "the stand-in agent did not run");
    // the bootstrap thread unmaps its page and ends
    assert!(
        eventually(5, || bootstrap_mappings(t.pid).is_empty()),
        "bootstrap mapping left: {:?}",
        bootstrap_mappings(t.pid)
    );
    assert!(
        eventually(5, || thread_count(t.pid) == threads),
        "bootstrap thread still there"
    );
    // let the borrowed thread finish a round or two
    std::thread::sleep(Duration::from_millis(450));
    let after = t.stats();
    assert!(t.alive());
    // (read-mode threads never finish a round: nobody writes their pipe)
    assert!(
        mode == "read" || after.loops > before.loops,
        "no progress after attach: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.corrupt, 0,
        "registers changed under the target: {after:?}"
    );
    // attaching again is a no-op that says so
    let again = attach(t.pid, &opts(&rt)).unwrap();
    assert!(again.already);
    assert_eq!(again.tid, 0);
    eprintln!(
        "{mode} x{threads}: thread {} syscall {:?} paused {:?}, total {:?}, stats {after:?}",
        r.tid, r.syscall, r.pause, r.total
    );
    t.quit();
    (r, before, after)
}

#[test]
fn nanosleep_restarts_transparently() {
    let (r, before, after) = attach_mode("nanosleep", 4);
    assert!(
        matches!(
            r.syscall,
            Some(libc::SYS_nanosleep | libc::SYS_clock_nanosleep)
        ),
        "a sleeping thread is preferred: {:?}",
        r.syscall
    );
    // the interrupted nanosleep goes on sleeping the rest of its time: no EINTR, no short sleep
    assert_eq!(after.eintr, before.eintr);
    assert_eq!(after.short, before.short);
}

#[test]
fn read_restarts() {
    let (r, before, after) = attach_mode("read", 3);
    assert_eq!(r.syscall, Some(libc::SYS_read));
    assert_eq!(
        after.eintr, before.eintr,
        "read is restarted (ERESTARTSYS, no handler)"
    );
}

#[test]
fn futex_with_timeout() {
    let (_r, before, after) = attach_mode("futex", 3);
    // FUTEX_WAIT with a timeout restarts through restart_syscall
    assert_eq!(after.eintr, before.eintr);
}

#[test]
fn epoll_wait_returns_eintr_once() {
    let (r, before, after) = attach_mode("epoll", 3);
    assert_eq!(r.syscall, Some(libc::SYS_epoll_wait));
    // epoll_wait is never restarted after a stop (signal(7)): the borrowed thread sees one
    // EINTR, as after a SIGSTOP/SIGCONT or a debugger attach
    assert_eq!(after.eintr, before.eintr + 1);
}

#[test]
fn busy_loop_keeps_its_registers() {
    let (r, _before, after) = attach_mode("busy", 2);
    assert_eq!(r.syscall, None, "a busy thread is borrowed in user code");
    assert_eq!(after.corrupt, 0);
}

#[test]
fn process_that_forks() {
    let (_r, _before, after) = attach_mode("fork", 3);
    assert_eq!(
        after.corrupt, 0,
        "a fork or a child's status went wrong: {after:?}"
    );
}

#[test]
fn thousand_threads() {
    let (r, _b, _a) = attach_mode("nanosleep", 1000);
    assert_eq!(r.threads, 1000);
}

#[test]
fn agent_failure_is_reported_and_cleaned_up() {
    let fx = fixtures();
    let rt = runtime("fail");
    let mut t = Target::start(&fx.target, "nanosleep", 2, &[]);
    let e = attach(t.pid, &opts(&rt)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("stand-in refuses"), "{msg}");
    assert!(eventually(5, || bootstrap_mappings(t.pid).is_empty()));
    assert!(t.alive());
    let s = t.stats();
    assert_eq!(s.eintr, 0);
    t.quit();
}

#[test]
fn missing_entry_point_is_reported() {
    let fx = fixtures();
    let mut t = Target::start(&fx.target, "nanosleep", 2, &[]);
    let o = AttachOptions::new(&fx.noentry);
    let e = attach(t.pid, &o).unwrap_err();
    assert!(
        matches!(e, kgpatch_attach::AttachError::NoEntry { .. }),
        "{e}"
    );
    assert!(eventually(5, || bootstrap_mappings(t.pid).is_empty()));
    assert!(t.alive());
    t.stats();
    t.quit();
}

#[test]
fn not_a_library_is_reported() {
    let fx = fixtures();
    let mut t = Target::start(&fx.target, "nanosleep", 2, &[]);
    let bogus = crate::harness::dir().join("libbogus.so");
    std::fs::write(&bogus, b"not an ELF file").unwrap();
    let e = attach(t.pid, &AttachOptions::new(&bogus)).unwrap_err();
    assert!(
        matches!(e, kgpatch_attach::AttachError::Dlopen { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("libbogus.so"), "{e}");
    assert!(eventually(5, || bootstrap_mappings(t.pid).is_empty()));
    assert!(t.alive());
    t.quit();
}

/// `libkgpatch_agent.so` of this build (cargo builds it into our target directory; a no-op
/// when current).
pub fn real_agent() -> std::path::PathBuf {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target_dir = tmp.parent().unwrap();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "kgpatch-agent"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir.join(profile).join("libkgpatch_agent.so")
}

#[test]
fn real_agent_answers_status_on_its_socket() {
    use std::io::{BufRead, Write};
    let so = real_agent();
    let fx = fixtures();
    let rt = runtime("real");
    std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut t = Target::start(&fx.target, "epoll", 4, &[]);
    let mut o = AttachOptions::new(&so);
    o.runtime_dir = Some(rt.clone());
    let r = attach(t.pid, &o).unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.already);
    let sock = rt.join(format!("{}.sock", t.pid));
    assert!(
        eventually(5, || sock.exists()),
        "no socket at {}",
        sock.display()
    );
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"result\""), "status answer: {line}");
    assert!(!line.contains("\"error\""), "status answer: {line}");
    assert!(eventually(5, || bootstrap_mappings(t.pid).is_empty()));
    let again = attach(t.pid, &o).unwrap();
    assert!(again.already, "second attach is a no-op");
    let st = t.stats();
    assert_eq!(st.corrupt, 0);
    eprintln!(
        "real agent: pause {:?}, total {:?}; status: {}",
        r.pause,
        r.total,
        line.trim()
    );
    t.quit();
}

/// Attach to a target built by `build` (argument: thread count), check it goes on.
fn attach_program(exe: &std::path::Path, name: &str, threads: usize) {
    let rt = runtime(name);
    let mut t = Target::start(exe, "", threads, &[]);
    let before = t.stats();
    let r = attach(t.pid, &opts(&rt)).unwrap_or_else(|e| panic!("attach to {name}: {e}"));
    assert!(rt.join(format!("attached.{}", t.pid)).exists());
    assert!(eventually(5, || bootstrap_mappings(t.pid).is_empty()));
    std::thread::sleep(Duration::from_millis(200));
    let after = t.stats();
    assert!(after.loops > before.loops, "{name} stopped making progress");
    assert!(t.alive());
    eprintln!(
        "{name}: thread {} syscall {:?} paused {:?}",
        r.tid, r.syscall, r.pause
    );
    t.quit();
}

#[test]
fn cxx_program() {
    let out = crate::harness::dir().join("cxx-target");
    std::fs::create_dir_all(crate::harness::dir()).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cxx.cpp");
    let st = std::process::Command::new("g++")
        .args(["-O1", "-pthread"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED cxx_program: g++ is not available");
        return;
    }
    attach_program(&out, "cxx", 6);
}

#[test]
fn rust_std_program() {
    let out = crate::harness::dir().join("rust-target");
    std::fs::create_dir_all(crate::harness::dir()).unwrap();
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rust_target.rs");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let st = std::process::Command::new(rustc)
        .args(["-O", "--edition", "2021"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "rustc failed");
    attach_program(&out, "rust", 7);
}

/// Many attaches into the same busy target (each a fresh copy of the stand-in, so each one
/// really injects): the riskiest case, a thread borrowed in user code, over and over.
#[test]
fn repeated_attaches_into_a_busy_target() {
    let fx = fixtures();
    let rt = runtime("repeat");
    let mut t = Target::start(&fx.target, "busy", 3, &[]);
    let mut pauses = Vec::new();
    for i in 0..40 {
        let copy = crate::harness::dir().join(format!("libstandin-r{i}.so"));
        std::fs::copy(&fx.standin, &copy).unwrap();
        let mut o = opts(&rt);
        o.agent_path = copy;
        let r = attach(t.pid, &o).unwrap_or_else(|e| panic!("attach {i}: {e}"));
        // the stand-in's static says "already" after the first start only if it is the
        // same object: each copy is a new one
        assert!(!r.already, "attach {i}");
        pauses.push(r.pause);
        assert!(
            eventually(5, || bootstrap_mappings(t.pid).is_empty()),
            "attach {i}"
        );
    }
    let s = t.stats();
    assert_eq!(s.corrupt, 0, "{s:?}");
    assert!(t.alive());
    pauses.sort();
    eprintln!(
        "40 attaches into a busy target: pause p50 {:?}, max {:?}",
        pauses[20], pauses[39]
    );
    t.quit();
}

/// The injection raises no signal: a program that ignores SIGTRAP keeps ignoring it (a
/// forced SIGTRAP — int3, single-step — that is ignored or blocked resets it to default),
/// and no disposition or mask changes.
#[test]
fn dispositions_unchanged_even_for_an_ignored_sigtrap() {
    let fx = fixtures();
    let rt = runtime("igntrap");
    let mut t = Target::start(&fx.target, "nanosleep", 3, &["igntrap"]);
    let sig = |pid: i32| Signals::of(&proc::status(Pid::Other(pid)).unwrap());
    let before = sig(t.pid);
    let trap_ignored = |s: &Signals| {
        s.ignored
            .is_some_and(|m| kgpatch_sys::signal::SigMask(m).has(libc::SIGTRAP))
    };
    assert!(trap_ignored(&before), "{before:?}");
    let r = attach(t.pid, &opts(&rt)).unwrap();
    assert!(!r.already);
    assert!(eventually(5, || bootstrap_mappings(t.pid).is_empty()));
    let after = sig(t.pid);
    assert_eq!(after, before);
    assert_eq!(t.stats().eintr, 0);
    t.quit();
}
