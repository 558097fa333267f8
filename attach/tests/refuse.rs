//! Refusals leave the target exactly as it was: memory maps, every thread's signal state
//! and registers (read by our own seize of each thread, before and after).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kgpatch_attach::{attach, AttachError, AttachOptions};
use kgpatch_sys::proc::{self, Pid};
use kgpatch_sys::ptrace;

use crate::harness::{fixtures, snapshot, Target};

/// Threads of a "read" target never wake up by themselves, so their registers are stable.
fn quiet_target(extra: &[&str]) -> Target {
    Target::start(&fixtures().target, "read", 4, extra)
}

fn opts() -> AttachOptions {
    let mut o = AttachOptions::new(&fixtures().standin);
    o.timeout = Duration::from_secs(5);
    o
}

#[test]
fn already_traced() {
    let mut t = quiet_target(&[]);
    let before = snapshot(t.pid);
    // a tracer of our own on the main thread (what gdb or strace would be)
    ptrace::seize(t.pid, 0).unwrap();
    let e = attach(t.pid, &opts()).unwrap_err();
    assert!(matches!(e, AttachError::AlreadyTraced { .. }), "{e}");
    assert!(e.to_string().contains("already traced"), "{e}");
    ptrace::interrupt(t.pid).unwrap();
    assert_eq!(
        ptrace::wait_stop(t.pid, Duration::from_secs(5)).unwrap(),
        ptrace::Stop::Interrupt
    );
    ptrace::detach(t.pid, 0).unwrap();
    assert_eq!(snapshot(t.pid), before);
    assert_eq!(t.stats().eintr, 0);
    t.quit();
}

#[test]
fn static_binary() {
    let Some(exe) = &fixtures().target_static else {
        eprintln!("SKIPPED static_binary: `cc -static` failed here (no static libc)");
        return;
    };
    let mut t = Target::start(exe, "read", 3, &[]);
    let before = snapshot(t.pid);
    let e = attach(t.pid, &opts()).unwrap_err();
    assert!(matches!(e, AttachError::CannotLoad { .. }), "{e}");
    assert!(e.to_string().contains("static"), "{e}");
    assert_eq!(snapshot(t.pid), before);
    t.stats();
    t.quit();
}

#[test]
fn seccomp_filter() {
    let mut t = quiet_target(&["seccomp"]);
    let before = snapshot(t.pid);
    let e = attach(t.pid, &opts()).unwrap_err();
    assert!(matches!(e, AttachError::Seccomp { mode: 2, .. }), "{e}");
    assert!(e.to_string().contains("mmap"), "names the syscalls: {e}");
    assert_eq!(snapshot(t.pid), before);
    t.stats();
    t.quit();
}

#[test]
fn agent_not_visible() {
    let t = quiet_target(&[]);
    let before = snapshot(t.pid);
    let mut o = opts();
    o.agent_path = PathBuf::from("/nonexistent/kgpatch/libkgpatch_agent.so");
    let e = attach(t.pid, &o).unwrap_err();
    assert!(matches!(e, AttachError::AgentNotVisible { .. }), "{e}");
    assert_eq!(snapshot(t.pid), before);
    t.quit();
}

/// The agent exists for us but not in the target's mount namespace.
#[test]
fn agent_hidden_by_mount_namespace() {
    let fx = fixtures();
    let hidden = crate::harness::dir().join("hidden");
    std::fs::create_dir_all(&hidden).unwrap();
    let so = hidden.join("libstandin.so");
    std::fs::copy(&fx.standin, &so).unwrap();
    let script = format!(
        "mount -t tmpfs none {} && exec {} read 3",
        hidden.display(),
        fx.target.display()
    );
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED agent_hidden_by_mount_namespace: unshare --mount not permitted here");
        return;
    }
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = snapshot(pid);
    let mut o = opts();
    o.agent_path = so.clone();
    assert!(so.exists(), "visible to us");
    let e = attach(pid, &o).unwrap_err();
    assert!(matches!(e, AttachError::AgentNotVisible { .. }), "{e}");
    assert!(e.to_string().contains(&format!("/proc/{pid}/root")), "{e}");
    assert_eq!(snapshot(pid), before);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn target_exits_during_attach() {
    let fx = fixtures();
    let rt = crate::harness::runtime("exits");
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..24u64 {
        let t = Target::start(&fx.target, "nanosleep", 3, &[]);
        let pid = t.pid;
        let delay = Duration::from_micros(i * 250);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY-free: kill(2) through the command line tool keeps this test safe code
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        });
        let mut o = opts();
        o.runtime_dir = Some(rt.clone());
        let start = Instant::now();
        let r = attach(pid, &o);
        assert!(start.elapsed() < Duration::from_secs(8), "attach hung");
        let kind = match &r {
            Ok(_) => "ok".to_string(),
            Err(AttachError::TargetExited { .. }) => "exited".into(),
            Err(AttachError::NoSuchProcess { .. }) => "no such process".into(),
            Err(e) => panic!("target killed during attach gave: {e}"),
        };
        *seen.entry(kind).or_default() += 1;
        killer.join().unwrap();
        drop(t);
    }
    eprintln!("killed during attach: {seen:?}");
    assert!(seen.contains_key("exited"), "{seen:?}");
}

#[test]
fn zombie_target() {
    let mut t = quiet_target(&[]);
    let pid = t.pid;
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    // not reaped yet: a zombie
    assert!(crate::harness::eventually(5, || {
        proc::task_state(Pid::Other(pid), pid).is_ok_and(|s| s == Some('Z'))
    }));
    let e = attach(pid, &opts()).unwrap_err();
    assert!(matches!(e, AttachError::TargetExited { .. }), "{e}");
    let _ = t.child.wait();
}

const CHILD_ENV: &str = "KGPATCH_ATTACH_TEST_CHILD";

/// Run by `no_permission` as uid 65534: attach to the pid in the environment, print the
/// outcome.
#[test]
#[ignore = "helper: run by no_permission as another user"]
fn permission_child() {
    let Ok(v) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (pid, agent) = v.split_once(':').unwrap();
    let r = attach(pid.parse().unwrap(), &AttachOptions::new(agent));
    match r {
        Ok(_) => println!("RESULT ok"),
        Err(e @ AttachError::Permission { .. }) => println!("RESULT permission {e}"),
        Err(e) => println!("RESULT other {e}"),
    }
}

#[test]
fn no_permission() {
    if proc::status(Pid::This).unwrap().uid.unwrap()[1] != 0 {
        eprintln!("SKIPPED no_permission: needs root to run the injector as another user");
        return;
    }
    let mut t = quiet_target(&[]);
    let before = snapshot(t.pid);
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The test binary may sit where uid 65534 cannot reach it (a checkout under a 0700
    // directory, as CI's is): run a copy from a world-readable directory.
    let dir = std::env::temp_dir().join(format!("kgpatch-attach-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("tests");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&exe)
        .args([
            "--ignored",
            "--exact",
            "refuse::permission_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}:{}", t.pid, fixtures().standin.display()),
        )
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.find("RESULT").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("child said {text} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(line.starts_with("RESULT permission"), "{line}");
    assert!(line.contains("CAP_SYS_PTRACE"), "says what to do: {line}");
    assert_eq!(snapshot(t.pid), before);
    t.stats();
    t.quit();
}

/// A process started with the agent preloaded: attach says "already" and touches nothing.
#[test]
fn preloaded_agent_is_a_no_op() {
    let so = crate::success::real_agent();
    let rt = crate::harness::runtime("preloaded");
    std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut child = Command::new(&fixtures().target)
        .args(["read", "3"])
        .env("LD_PRELOAD", &so)
        .env("KGPATCH_RUNTIME_DIR", &rt)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    let before = snapshot(pid);
    let r = attach(pid, &AttachOptions::new(&so)).unwrap();
    assert!(r.already, "{r:?}");
    assert_eq!(r.tid, 0, "no thread was borrowed");
    assert_eq!(snapshot(pid), before);
    let _ = child.kill();
    let _ = child.wait();
}
