//! The calling thread and signals to other threads: `gettid`, `tgkill`, errno save and
//! restore (for signal handlers), and membarrier core serialisation.
//!
//! # Safety
//! `tgkill` is a `libc::syscall` with integer arguments only (rustix has no safe `tgkill`);
//! errno is read and written through glibc's `__errno_location`, which returns the calling
//! thread's own errno slot. Nothing else here is `unsafe`.

#![allow(unsafe_code)]

use std::io;

use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};

/// The kernel id of the calling thread. Async-signal-safe (one system call).
pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// The id of the calling process (its thread group). Async-signal-safe.
pub fn getpid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// Sends `sig` to thread `tid` of thread group `pid` (one attempt). `ESRCH` means the thread
/// is gone; `EAGAIN` that the real-time signal queue is full (`RLIMIT_SIGPENDING`).
/// Async-signal-safe (one system call; the error is built from errno, no allocation).
pub fn tgkill(pid: i32, tid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: tgkill only takes integers; it reads and writes no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(errno()))
    }
}

/// The calling thread's errno. Async-signal-safe.
pub fn errno() -> libc::c_int {
    // SAFETY: `__errno_location` returns this thread's errno slot, valid for its life.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's errno (a signal handler restores the interrupted code's).
/// Async-signal-safe.
pub fn set_errno(value: libc::c_int) {
    // SAFETY: `__errno_location` returns this thread's errno slot, valid for its life.
    unsafe { *libc::__errno_location() = value }
}

/// Core serialisation across the process's threads with membarrier
/// `PRIVATE_EXPEDITED_SYNC_CORE` (after cross-modifying code).
#[derive(Debug, Clone, Copy)]
pub struct SyncCore(());

impl SyncCore {
    /// Registers the process for `PRIVATE_EXPEDITED_SYNC_CORE`; `None` when the kernel does
    /// not offer it (or refuses the registration).
    pub fn register() -> Option<SyncCore> {
        let offered = membarrier_query();
        if !offered.contains_command(MembarrierCommand::PrivateExpeditedSyncCore)
            || !offered.contains_command(MembarrierCommand::RegisterPrivateExpeditedSyncCore)
        {
            return None;
        }
        membarrier(MembarrierCommand::RegisterPrivateExpeditedSyncCore).ok()?;
        Some(SyncCore(()))
    }

    /// Makes every running thread of the process execute a core-serialising instruction
    /// before it next runs user code. Async-signal-safe (one system call).
    pub fn sync(&self) -> io::Result<()> {
        membarrier(MembarrierCommand::PrivateExpeditedSyncCore).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gettid_is_the_pid_on_the_main_thread_only() {
        // The test harness runs tests on spawned threads.
        let main_like = std::thread::spawn(gettid).join().unwrap();
        assert_ne!(main_like, getpid());
        assert_eq!(getpid() as u32, std::process::id());
        assert_ne!(gettid(), main_like);
        assert!(std::path::Path::new(&format!("/proc/self/task/{}", gettid())).exists());
    }

    #[test]
    fn tgkill_reaches_a_living_thread_and_reports_a_gone_one() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
        });
        let tid = rx.recv().unwrap();
        // Signal 0 checks the thread exists without sending anything.
        assert!(tgkill(getpid(), gettid(), 0).is_ok());
        t.join().unwrap();
        // Joined: the tid is gone (reuse within this instant is practically impossible).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match tgkill(getpid(), tid, 0) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => break,
                _ if std::time::Instant::now() > deadline => panic!("tid {tid} still alive"),
                _ => std::thread::yield_now(),
            }
        }
    }

    #[test]
    fn errno_round_trips() {
        let saved = errno();
        set_errno(libc::EINTR);
        assert_eq!(errno(), libc::EINTR);
        set_errno(saved);
        assert_eq!(errno(), saved);
    }

    #[test]
    fn sync_core_works_where_offered() {
        if let Some(s) = SyncCore::register() {
            s.sync().unwrap();
        }
    }
}
