//! The few system calls the helpers need that std does not wrap: sending a signal to a
//! process or to one thread, and the run-time value of `SIGRTMIN`.
//!
//! These are public so that tests which interrupt the demo server (signal storms, the
//! end-to-end tests' EINTR checks) share one implementation.
//!
//! # Safety
//! Each wrapper calls one libc function with plain integer arguments; none takes or returns
//! memory, so each is sound for any argument values (the kernel validates them).

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

/// `tgkill(tgid, tid, sig)`: a signal to one thread of process `tgid`.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: the tgkill system call takes three integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::c_long::from(tgid),
            libc::c_long::from(tid),
            libc::c_long::from(sig),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
