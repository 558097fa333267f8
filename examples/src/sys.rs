//! The few system calls the helpers need that std does not wrap: sending a signal to a
//! process or to one thread (`tgkill` is kgpatch-sys's, re-exported), the run-time value of
//! `SIGRTMIN`, and a stop-flag handler for `SIGINT`/`SIGTERM`.
//!
//! These are public so that tests which interrupt the demo server (signal storms, the
//! end-to-end tests' EINTR checks) share one implementation.
//!
//! # Safety
//! Each wrapper calls one libc function with plain integer arguments; none takes or returns
//! memory, so each is sound for any argument values (the kernel validates them).
//! [`stop_flag_on`] installs a handler that does one atomic store (async-signal-safe).
#![allow(unsafe_code)]

use std::io;

/// `SIGRTMIN` as glibc reports it at run time (glibc reserves the first real-time signals
/// for itself, so this is usually 34).
pub fn sigrtmin() -> i32 {
    libc::SIGRTMIN()
}

/// `kill(pid, sig)`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `tgkill(tgid, tid, sig)`: a signal to one thread of process `tgid` (kgpatch's OS layer).
pub use kgpatch_sys::thread::tgkill;

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    // async-signal-safe: one atomic store
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Installs a handler for each of `signals` (e.g. `SIGINT`, `SIGTERM`) that only sets the
/// returned flag, with `SA_RESTART`, so a program can finish its work and report instead of
/// dying (`kvload` stops its load and prints the report).
pub fn stop_flag_on(signals: &[i32]) -> io::Result<&'static std::sync::atomic::AtomicBool> {
    for &sig in signals {
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags) to fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is a valid sigaction whose handler only performs an atomic store
        // (async-signal-safe); the old action is not asked for.
        let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&STOP)
}
