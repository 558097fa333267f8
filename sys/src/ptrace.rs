//! Thin, typed wrappers over `ptrace(2)` for attaching to ONE thread of another process, and
//! over `/proc/<pid>/mem` for reading and writing its memory.
//!
//! Nothing here decides anything: `kgpatch-attach` sequences these calls. Every wait takes a
//! deadline (there is no unbounded wait in this module); waits poll `waitpid(WNOHANG |
//! __WALL)` with a yield, then short sleeps.
//!
//! What the kernel does if the tracer (this process) dies: the tracee is detached and resumed
//! with whatever registers it has at that instant. [`seize`] never sets
//! `PTRACE_O_EXITKILL`: an injector that dies must not take the target with it.
//!
//! # Safety
//! The `unsafe` blocks call `libc::ptrace` and `libc::waitpid` with pointers to locals that
//! outlive the call and whose sizes match what the request writes
//! (`user_regs_struct`, a `u64` signal set, an `iovec` over an owned buffer). They do not
//! touch this process's memory otherwise; what they do to the tracee is the caller's
//! responsibility.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

pub use libc::user_regs_struct as Regs;

/// A failed ptrace request or wait.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PtraceError {
    /// The request failed with this errno.
    #[error("ptrace {op} of thread {tid}: {err}")]
    Os {
        /// The request, e.g. `SEIZE`.
        op: &'static str,
        /// The thread.
        tid: i32,
        /// What the kernel said.
        err: std::io::Error,
    },
    /// The thread did not stop before the deadline.
    #[error("thread {tid} did not stop within {waited:?}")]
    Timeout {
        /// The thread.
        tid: i32,
        /// How long we waited.
        waited: Duration,
    },
}

impl PtraceError {
    /// True when the thread no longer exists (ESRCH) or was reaped.
    pub fn is_gone(&self) -> bool {
        matches!(self, PtraceError::Os { err, .. } if err.raw_os_error() == Some(libc::ESRCH))
    }
}

fn os(op: &'static str, tid: i32) -> PtraceError {
    PtraceError::Os {
        op,
        tid,
        err: std::io::Error::last_os_error(),
    }
}

/// How a traced thread stopped (or ended), as `waitpid` reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A `PTRACE_EVENT_STOP` (after `PTRACE_INTERRUPT`, or a group stop): no signal pending
    /// from the stop itself.
    Interrupt,
    /// A syscall-enter or syscall-exit stop (`SIGTRAP | 0x80`, `PTRACE_O_TRACESYSGOOD`).
    Syscall,
    /// A signal-delivery stop: the thread is about to receive this signal.
    Signal(i32),
    /// Another ptrace event stop (the event number).
    Event(i32),
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

/// `PTRACE_SEIZE` thread `tid` with `options` (never add `PTRACE_O_EXITKILL`). The thread
/// keeps running; no signal is sent.
pub fn seize(tid: i32, options: u32) -> Result<(), PtraceError> {
    // SAFETY: SEIZE takes no pointer; addr is 0 and data carries the options.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            options as usize as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("SEIZE", tid));
    }
    Ok(())
}

/// `PTRACE_INTERRUPT`: make a seized thread stop (it reports [`Stop::Interrupt`]).
pub fn interrupt(tid: i32) -> Result<(), PtraceError> {
    simple(libc::PTRACE_INTERRUPT, tid, 0, "INTERRUPT")
}

/// `PTRACE_CONT` delivering `sig` (0 for none).
pub fn cont(tid: i32, sig: i32) -> Result<(), PtraceError> {
    simple(libc::PTRACE_CONT, tid, sig, "CONT")
}

/// `PTRACE_SYSCALL`: continue until the next syscall entry or exit.
pub fn cont_syscall(tid: i32) -> Result<(), PtraceError> {
    simple(libc::PTRACE_SYSCALL, tid, 0, "SYSCALL")
}

/// `PTRACE_DETACH` delivering `sig` (0 for none).
pub fn detach(tid: i32, sig: i32) -> Result<(), PtraceError> {
    simple(libc::PTRACE_DETACH, tid, sig, "DETACH")
}

fn simple(req: libc::c_uint, tid: i32, data: i32, op: &'static str) -> Result<(), PtraceError> {
    // SAFETY: these requests take no pointer: addr is 0 and data is a signal number.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            data as usize as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os(op, tid));
    }
    Ok(())
}

/// Wait until thread `tid` (a tracee of this thread) stops or ends, for at most `timeout`.
pub fn wait_stop(tid: i32, timeout: Duration) -> Result<Stop, PtraceError> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a local the call writes one int into.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == -1 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(PtraceError::Os {
                op: "waitpid",
                tid,
                err,
            });
        }
        if r == tid {
            return Ok(decode(status));
        }
        if start.elapsed() >= timeout {
            return Err(PtraceError::Timeout {
                tid,
                waited: start.elapsed(),
            });
        }
        polls += 1;
        if polls < 2_000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn decode(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        return Stop::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return Stop::Killed(libc::WTERMSIG(status));
    }
    let sig = libc::WSTOPSIG(status);
    let event = (status >> 16) & 0xff;
    if event == libc::PTRACE_EVENT_STOP {
        Stop::Interrupt
    } else if event != 0 {
        Stop::Event(event)
    } else if sig == libc::SIGTRAP | 0x80 {
        Stop::Syscall
    } else {
        Stop::Signal(sig)
    }
}

/// `PTRACE_GETREGS`.
pub fn get_regs(tid: i32) -> Result<Regs, PtraceError> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    // SAFETY: GETREGS writes exactly one user_regs_struct into `regs`, a live local.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            &mut regs as *mut Regs as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("GETREGS", tid));
    }
    Ok(regs)
}

/// `PTRACE_SETREGS`.
pub fn set_regs(tid: i32, regs: &Regs) -> Result<(), PtraceError> {
    // SAFETY: SETREGS reads one user_regs_struct from `regs`, which outlives the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            regs as *const Regs as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("SETREGS", tid));
    }
    Ok(())
}

const NT_X86_XSTATE: usize = 0x202;
/// Larger than any XSAVE area the kernel exports today (AMX makes it ~11 KiB).
const XSTATE_MAX: usize = 32 * 1024;

/// The thread's whole FPU/SSE/AVX state (`PTRACE_GETREGSET NT_X86_XSTATE`), in the
/// kernel's user-ABI XSAVE layout, exactly as long as the kernel reported.
pub fn get_xstate(tid: i32) -> Result<Vec<u8>, PtraceError> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: GETREGSET writes at most iov_len bytes into buf (owned, XSTATE_MAX long) and
    // updates iov_len; iov is a live local.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as *mut libc::c_void,
            &mut iov as *mut libc::iovec as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("GETREGSET(NT_X86_XSTATE)", tid));
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Put back a state read by [`get_xstate`].
pub fn set_xstate(tid: i32, state: &[u8]) -> Result<(), PtraceError> {
    let mut iov = libc::iovec {
        iov_base: state.as_ptr() as *mut libc::c_void,
        iov_len: state.len(),
    };
    // SAFETY: SETREGSET only reads iov_len bytes from state, which outlives the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as *mut libc::c_void,
            &mut iov as *mut libc::iovec as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("SETREGSET(NT_X86_XSTATE)", tid));
    }
    Ok(())
}

/// The thread's blocked-signal mask (`PTRACE_GETSIGMASK`), bit `n - 1` for signal `n`.
pub fn get_sigmask(tid: i32) -> Result<u64, PtraceError> {
    let mut mask = 0u64;
    // SAFETY: GETSIGMASK writes addr (= 8) bytes into `mask`, a live u64.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid,
            8usize as *mut libc::c_void,
            &mut mask as *mut u64 as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("GETSIGMASK", tid));
    }
    Ok(mask)
}

/// `PTRACE_SETSIGMASK`. The kernel also clears the thread's "restore sigmask after this
/// syscall" flag (set by ppoll, pselect6, epoll_pwait with a mask, sigsuspend): do not use it
/// on a thread inside such a call.
pub fn set_sigmask(tid: i32, mask: u64) -> Result<(), PtraceError> {
    // SAFETY: SETSIGMASK reads addr (= 8) bytes from `mask`, a live u64.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid,
            8usize as *mut libc::c_void,
            &mask as *const u64 as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(os("SETSIGMASK", tid));
    }
    Ok(())
}

/// Another process's memory through `/proc/<pid>/mem` (needs ptrace-attach permission; works
/// while the process runs).
#[derive(Debug)]
pub struct ProcMem {
    file: File,
}

impl ProcMem {
    /// Open `/proc/<pid>/mem` for reading and writing.
    pub fn open(pid: i32) -> std::io::Result<ProcMem> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(ProcMem { file })
    }

    /// Read exactly `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }

    /// Write all of `data` at `addr` (works on read-only mappings too, as a debugger does).
    pub fn write(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, addr)
    }

    /// Read a little-endian u32 at `addr`.
    pub fn read_u32(&self, addr: u64) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// The signals that end a process by default and that a user sends by hand (SIGINT, SIGTERM,
/// SIGHUP, SIGQUIT, SIGPIPE, SIGTSTP), blocked in the calling thread for the few
/// milliseconds in which a tracee runs borrowed registers: an injector killed then would
/// leave the tracee running them. Returns the previous mask for [`restore_thread_sigmask`].
pub fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the sig* calls only write into the two locals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
            libc::SIGTSTP,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// Put back the mask [`block_termination_signals`] returned.
pub fn restore_thread_sigmask(old: &libc::sigset_t) {
    // SAFETY: `old` is a valid sigset_t; the call writes nothing (oldset is null).
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}
