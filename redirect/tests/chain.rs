//! The SIGTRAP handler hands traps that are not kgpatch's to the handler the program had
//! (or to the default action). Each case runs in a child process (the test binary again),
//! because the order of handler installation matters and the default action kills.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

fn run_child(test: &str, env: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .output()
        .unwrap()
}

static PROGRAM_TRAPS: AtomicU32 = AtomicU32::new(0);

extern "C" fn program_handler(_sig: libc::c_int) {
    PROGRAM_TRAPS.fetch_add(1, Ordering::SeqCst);
}

fn int3() {
    // SAFETY: a breakpoint; the handlers under test resume after it.
    unsafe { std::arch::asm!("int3") };
}

#[test]
fn a_foreign_trap_reaches_the_programs_handler() {
    if std::env::var_os("KGPATCH_CHAIN_CHILD").is_some() {
        // SAFETY: installing a plain handler that only bumps an atomic.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = program_handler as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()),
                0
            );
        }
        crate::common::patcher();
        int3();
        int3();
        assert_eq!(PROGRAM_TRAPS.load(Ordering::SeqCst), 2);
        return;
    }
    let out = run_child(
        "chain::a_foreign_trap_reaches_the_programs_handler",
        "KGPATCH_CHAIN_CHILD",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_foreign_trap_without_handler_keeps_the_default_action() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os("KGPATCH_DFL_CHILD").is_some() {
        crate::common::patcher();
        // Core dumps off: the default action of SIGTRAP dumps core.
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setting a resource limit of this process.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
        int3();
        panic!("survived a breakpoint nobody handles");
    }
    let out = run_child(
        "chain::a_foreign_trap_without_handler_keeps_the_default_action",
        "KGPATCH_DFL_CHILD",
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTRAP),
        "child was not killed by SIGTRAP: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_replaced_handler_is_detected() {
    if std::env::var_os("KGPATCH_REPLACED_CHILD").is_some() {
        let p = crate::common::patcher();
        assert!(p.handlers_intact());
        // SAFETY: installing a plain handler that only bumps an atomic.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = program_handler as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()),
                0
            );
        }
        assert!(!p.handlers_intact());
        return;
    }
    let out = run_child(
        "chain::a_replaced_handler_is_detected",
        "KGPATCH_REPLACED_CHILD",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
