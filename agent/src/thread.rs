//! The agent thread's signal mask. The agent thread is the process's guest: a signal meant
//! for the program (SIGTERM, SIGINT, SIGHUP, a timer's real-time signal) must never be
//! delivered to it. A server that blocks SIGTERM in every thread and takes it with
//! `sigwait` in one (MariaDB, PostgreSQL's postmaster, many daemons) would otherwise have it
//! handled on our thread — by its own handler or not at all — and never see it: the kernel
//! gives a process-directed signal to any thread that does not block it. The agent thread
//! is therefore created with every asynchronous signal blocked (it inherits the mask of the
//! thread that creates it, so there is no window in which it could take one). Synchronous
//! signals (faults, SIGTRAP of an int3 it might meet in a patched libc function) stay
//! deliverable: blocking those would make the kernel kill the process instead.
//!
//! # Safety
//! `pthread_sigmask` is called on sigsets this module owns and initialises.

#![allow(unsafe_code)]

/// Signals the agent thread keeps deliverable: the kernel sends them to the thread that
/// caused them.
const SYNCHRONOUS: [libc::c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// Runs `spawn` (which creates the agent thread) with exactly the asynchronous signals
/// blocked in the calling thread, so the new thread starts with that mask; the caller's mask is
/// restored afterwards (signals that arrived meanwhile are then delivered to it as usual).
pub(crate) fn with_async_signals_blocked<T>(spawn: impl FnOnce() -> T) -> T {
    // SAFETY: zeroed sigsets are valid out-parameters; sigfillset/sigdelset initialise and
    // edit a set we own.
    let mut block: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::sigfillset(&mut block) };
    for sig in SYNCHRONOUS {
        // SAFETY: as above.
        unsafe { libc::sigdelset(&mut block, sig) };
    }
    // SAFETY: valid sets; `old` receives this thread's mask. SIG_SETMASK (not SIG_BLOCK):
    // the thread that creates ours may block synchronous signals too (attach's bootstrap
    // thread blocks everything), and the agent thread must not inherit that.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &block, &mut old) } == 0;
    let result = spawn();
    if blocked {
        // SAFETY: restores the mask this thread had, read above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
    result
}
