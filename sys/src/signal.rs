//! Signal sets as the kernel shows them in `/proc` (`SigBlk`, `SigPnd`, `SigCgt`...: bit
//! `n - 1` for signal `n`), and the signals glibc keeps for itself. Signal numbers and
//! `si_code` values (`SI_KERNEL`, ...) are libc's: use `libc::*`, never a copy.

/// A set of signals 1..=64 as a `/proc` status mask: bit `n - 1` for signal `n`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SigMask(pub u64);

impl SigMask {
    /// `true` if `signal` is in the set.
    pub fn has(self, signal: libc::c_int) -> bool {
        self.0 & signal_bit(signal) != 0
    }
}

/// The bit of `signal` in a `/proc` status mask (`SigBlk`...). Async-signal-safe.
pub fn signal_bit(signal: libc::c_int) -> u64 {
    1u64 << ((signal - 1) & 63)
}

/// The kernel's first real-time signal. glibc reserves the ones between it and
/// `SIGRTMIN()` (32 and 33 for NPTL: thread cancellation and `setxid`).
pub const KERNEL_SIGRTMIN: libc::c_int = 32;

/// The mask of the real-time signals glibc keeps for itself (`sigfillset` leaves them out,
/// so a handler's full `sa_mask` does not block them). Async-signal-safe
/// (`SIGRTMIN()` reads a variable).
pub fn libc_reserved() -> u64 {
    (KERNEL_SIGRTMIN..libc::SIGRTMIN()).fold(0, |m, s| m | signal_bit(s))
}

/// Adds the signals glibc keeps for itself ([`libc_reserved`]: SIGCANCEL, SIGSETXID) to
/// `set`, for a handler's `sa_mask`: glibc's `sigaddset` refuses them, but `sigaction` passes
/// the mask to the kernel as it is. Blocked while kgpatch's handler runs, glibc's SIGCANCEL
/// handler cannot nest in ours and leave it by unwinding (an asynchronous `pthread_cancel`,
/// or a deferred one of a thread blocked in a cancellable system call, does exactly that);
/// the cancellation is delivered when our handler returns.
#[allow(unsafe_code)]
pub fn add_libc_reserved(set: &mut libc::sigset_t) {
    let word = set as *mut libc::sigset_t as *mut u64;
    // SAFETY: on x86-64 Linux `sigset_t` is 1024 bits in 8-byte words, 8-byte aligned; its
    // first word is the kernel's sigset (bit `n - 1` for signal `n`), the part `sigaction`
    // hands to the kernel. `set` is a valid exclusive reference.
    unsafe { *word |= libc_reserved() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_follow_the_proc_layout() {
        assert_eq!(signal_bit(1), 1);
        assert_eq!(signal_bit(libc::SIGTRAP), 1 << 4);
        assert_eq!(signal_bit(64), 1 << 63);
        assert!(SigMask(0x10).has(libc::SIGTRAP));
        assert!(!SigMask(0x10).has(libc::SIGINT));
    }

    #[test]
    fn glibc_reserves_32_and_33() {
        assert_eq!(libc_reserved(), signal_bit(32) | signal_bit(33));
    }

    #[test]
    #[allow(unsafe_code)]
    fn reserved_signals_can_be_added_to_a_set() {
        // SAFETY: a zeroed sigset is valid input to sigemptyset and sigismember.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::sigemptyset(&mut set) };
        add_libc_reserved(&mut set);
        // SAFETY: as above.
        let member = |s| unsafe { libc::sigismember(&set, s) };
        assert_eq!((member(32), member(33), member(libc::SIGINT)), (1, 1, 0));
    }

    /// Blocks every signal glibc lets a program block, in the calling thread.
    #[allow(unsafe_code)]
    fn block_every_signal() {
        // SAFETY: a zeroed sigset is valid input to sigfillset, and pthread_sigmask only
        // reads it; the mask affects only the calling (test) thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        }
    }

    /// A full sigset from glibc, blocked in a real thread, shows in `/proc` as every bit
    /// but the reserved ones (SIGKILL and SIGSTOP cannot be blocked).
    #[test]
    fn a_filled_set_blocks_all_but_the_reserved_signals() {
        let mask = std::thread::spawn(|| {
            block_every_signal();
            crate::proc::task_status(crate::proc::Pid::This, crate::thread::gettid())
                .unwrap()
                .unwrap()
                .sig_blk
                .unwrap()
        })
        .join()
        .unwrap();
        let cannot = signal_bit(libc::SIGKILL) | signal_bit(libc::SIGSTOP);
        assert_eq!(mask, !(cannot | libc_reserved()));
    }
}
