//! Per-thread state: the universe word the stub reads, and what the driver's progress view
//! needs to know about the thread's attempts to migrate.
//!
//! Only the thread itself writes its state (from its signal handler, a quiescent point, or its
//! start hook); the driver only reads it. Every field is a plain atomic, so a signal handler can update it without
//! allocating or locking.

use crate::sync::{AtomicU64, Ordering};

/// One thread's universe state. `#[repr(C)]` with the universe word first: the agent keeps
/// this struct in initial-exec TLS, and the stub reads `fs:[offset of word]`.
#[repr(C)]
#[derive(Debug)]
pub struct ThreadState {
    word: AtomicU64,
    /// `(t << 24) | attempts`: attempts to migrate in transition `t`.
    attempts: AtomicU64,
    /// The encoded [`Blocker`] of the last attempt that failed.
    blocker: AtomicU64,
}

const ATTEMPT_BITS: u32 = 24;
const ATTEMPT_MASK: u64 = (1 << ATTEMPT_BITS) - 1;

impl ThreadState {
    /// A fresh thread: word 0 (the `from` universe of every transition).
    #[cfg(not(kgpatch_loom))]
    pub const fn new() -> ThreadState {
        ThreadState {
            word: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            blocker: AtomicU64::new(0),
        }
    }

    /// A fresh thread: word 0 (the `from` universe of every transition).
    #[cfg(kgpatch_loom)]
    pub fn new() -> ThreadState {
        ThreadState {
            word: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            blocker: AtomicU64::new(0),
        }
    }

    /// The thread's universe word.
    #[inline]
    pub fn word(&self) -> u64 {
        // Only the owner writes it; the driver reads it after an acquiring read of the gate
        // that the owner's release (leaving the gate) precedes.
        self.word.load(Ordering::Relaxed)
    }

    /// Makes this state describe a thread whose universe word is `word`, with no attempts:
    /// for registries that reuse states of exited threads. Only the owning thread calls it,
    /// before its first migration with this state.
    pub fn adopt(&self, word: u64) {
        self.attempts.store(0, Ordering::Relaxed);
        self.blocker.store(0, Ordering::Relaxed);
        self.set_word(word);
    }

    pub(crate) fn set_word(&self, value: u64) {
        self.word.store(value, Ordering::Relaxed);
    }

    /// Records a failed attempt to migrate in transition `t`.
    pub(crate) fn record_blocked(&self, t: u64, blocker: Blocker) {
        let packed = self.attempts.load(Ordering::Relaxed);
        let next = if packed >> ATTEMPT_BITS == t {
            (packed & !ATTEMPT_MASK) | ((packed & ATTEMPT_MASK) + 1).min(ATTEMPT_MASK)
        } else {
            (t << ATTEMPT_BITS) | 1
        };
        self.blocker.store(blocker.encode(), Ordering::Relaxed);
        self.attempts.store(next, Ordering::Relaxed);
    }

    /// Failed attempts in transition `t`, and the blocker of the last one.
    pub fn attempts(&self, t: u64) -> (u32, Option<Blocker>) {
        let packed = self.attempts.load(Ordering::Relaxed);
        if packed >> ATTEMPT_BITS != t {
            return (0, None);
        }
        let blocker = Blocker::decode(self.blocker.load(Ordering::Relaxed));
        ((packed & ATTEMPT_MASK) as u32, blocker)
    }
}

impl Default for ThreadState {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a thread could not migrate on its last attempt. Small and `Copy`: it is written from a
/// signal handler into one atomic word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Blocker {
    /// A frame at `depth` (0 = the interrupted pc) is inside a version of site number `site`
    /// (the index in the transition's site list) that the transition moves away from.
    Busy {
        /// Index of the site in [`crate::Transition::sites`].
        site: u32,
        /// Frame depth, 0 being the innermost.
        depth: u16,
    },
    /// The stack walk could not prove the stack clean; `reason` is the stack checker's code.
    Unreliable {
        /// A code defined by the stack checker.
        reason: u16,
    },
    /// The thread blocks the migration signal; only a quiescent point can move it.
    SignalBlocked,
}

impl Blocker {
    const TAG_BUSY: u64 = 1;
    const TAG_UNRELIABLE: u64 = 2;
    const TAG_SIGNAL_BLOCKED: u64 = 3;

    /// Packs the blocker into a non-zero word.
    pub const fn encode(self) -> u64 {
        match self {
            Blocker::Busy { site, depth } => {
                (Self::TAG_BUSY << 56) | ((depth as u64) << 32) | site as u64
            }
            Blocker::Unreliable { reason } => (Self::TAG_UNRELIABLE << 56) | reason as u64,
            Blocker::SignalBlocked => Self::TAG_SIGNAL_BLOCKED << 56,
        }
    }

    /// Unpacks a word made by [`Blocker::encode`]; `None` for 0 or garbage.
    pub const fn decode(word: u64) -> Option<Blocker> {
        match word >> 56 {
            Self::TAG_BUSY => Some(Blocker::Busy {
                site: word as u32,
                depth: (word >> 32) as u16,
            }),
            Self::TAG_UNRELIABLE => Some(Blocker::Unreliable {
                reason: word as u16,
            }),
            Self::TAG_SIGNAL_BLOCKED => Some(Blocker::SignalBlocked),
            _ => None,
        }
    }
}

#[cfg(all(test, not(kgpatch_loom)))]
mod tests {
    use super::*;

    #[test]
    fn blocker_round_trips() {
        for b in [
            Blocker::Busy { site: 0, depth: 0 },
            Blocker::Busy {
                site: u32::MAX,
                depth: u16::MAX,
            },
            Blocker::Unreliable { reason: 7 },
            Blocker::SignalBlocked,
        ] {
            assert_eq!(Blocker::decode(b.encode()), Some(b));
        }
        assert_eq!(Blocker::decode(0), None);
    }

    #[test]
    fn attempts_are_per_transition() {
        let s = ThreadState::new();
        assert_eq!(s.attempts(1), (0, None));
        s.record_blocked(1, Blocker::SignalBlocked);
        s.record_blocked(1, Blocker::Busy { site: 2, depth: 3 });
        assert_eq!(
            s.attempts(1),
            (2, Some(Blocker::Busy { site: 2, depth: 3 }))
        );
        assert_eq!(s.attempts(2), (0, None));
        s.record_blocked(2, Blocker::Unreliable { reason: 1 });
        assert_eq!(s.attempts(2), (1, Some(Blocker::Unreliable { reason: 1 })));
    }
}
