//! The gate: one process-wide word that says which transition is in force and which way it
//! goes, and through which every thread-side operation passes.
//!
//! State word layout: bit 0 = a transition is open, bit 1 = it is reversed (goal = `from`),
//! bit 2 = forced (threads move without a stack check), bits 3..23 = threads inside a
//! migration right now ("in flight"), bits 24.. = `t`.
//!
//! A thread's universe word is written only by the thread itself, at a boundary. Even
//! `force` works that way: it only lifts the stack check, so a forced thread still changes
//! universe between two requests, never in the middle of one.
//!
//! Why the in-flight count: a thread reads the goal, checks its stack, then writes its word.
//! If the driver reversed the transition in between and then saw every word on the `from`
//! side, it could settle the sites while that thread is about to write `2t+1` — and the
//! thread would then run one site's old `to` and another's settled `from`: a mix. Every
//! thread-side operation therefore enters with a read-modify-write on the state word and leaves
//! with another; the driver reads the state with a read-modify-write too (which always sees
//! the latest value) and completes only when nobody is in flight and every word is on the goal
//! side. All orderings are acquire/release on one location, which loom models exactly.
//!
//! No operation here waits: a thread-side operation is a bounded sequence of atomic steps,
//! and [`Gate::try_complete`] returns `false` rather than wait for a thread in flight.

use crate::sync::{AtomicU64, Ordering};
use crate::thread::{Blocker, ThreadState};
use crate::word::{Side, MAX_TRANSITION};

const OPEN: u64 = 1;
const REVERSED: u64 = 2;
const FORCED: u64 = 4;
const IN_FLIGHT_SHIFT: u32 = 3;
const IN_FLIGHT_ONE: u64 = 1 << IN_FLIGHT_SHIFT;
const IN_FLIGHT_MASK: u64 = ((1 << 20) - 1) << IN_FLIGHT_SHIFT;
const T_SHIFT: u32 = 24;

/// What a stack check said about the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// No frame is inside a version the transition moves away from.
    Clean,
    /// The thread may not migrate now, for this reason.
    Blocked(Blocker),
}

/// What a thread-side operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// No transition is open.
    Idle,
    /// The thread was already on the goal side.
    AlreadyThere,
    /// The thread moved to the goal side.
    Moved(Side),
    /// The check refused; the attempt was recorded.
    Blocked(Blocker),
}

/// A decoded view of the gate's state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateState {
    /// The open transition and the side it moves threads to, if any.
    pub open: Option<(u64, Side)>,
    /// Threads inside a migration at the moment of the read.
    pub in_flight: u64,
    /// Threads move without a stack check.
    pub forced: bool,
}

impl GateState {
    fn decode(word: u64) -> GateState {
        let open = (word & OPEN != 0).then(|| {
            let goal = if word & REVERSED != 0 {
                Side::From
            } else {
                Side::To
            };
            (word >> T_SHIFT, goal)
        });
        GateState {
            open,
            in_flight: (word & IN_FLIGHT_MASK) >> IN_FLIGHT_SHIFT,
            forced: word & FORCED != 0,
        }
    }
}

/// The process-wide transition gate. See the module docs for the protocol.
#[derive(Debug)]
pub struct Gate {
    state: AtomicU64,
}

impl Gate {
    /// A closed gate: no transition in force.
    #[cfg(not(kgpatch_loom))]
    pub const fn new() -> Gate {
        Gate {
            state: AtomicU64::new(0),
        }
    }

    /// A closed gate: no transition in force.
    #[cfg(kgpatch_loom)]
    pub fn new() -> Gate {
        Gate {
            state: AtomicU64::new(0),
        }
    }

    /// Fast path of a quiescent point: `true` when the thread whose word is `word` has
    /// nothing to do (no transition open, or already on its goal side). One load and compare
    /// in the common case where nothing is pending.
    #[inline]
    pub fn is_settled_for(&self, word: u64) -> bool {
        let s = self.state.load(Ordering::Relaxed);
        if s & OPEN == 0 {
            return true;
        }
        let t = s >> T_SHIFT;
        let goal = if s & REVERSED != 0 {
            Side::From
        } else {
            Side::To
        };
        Side::of_word(word, t) == goal
    }

    /// Moves the calling thread to the goal side if `check` (run only when a move is
    /// needed, and told which side the thread would move to) says its stack is clean.
    /// Called by the thread itself: from the migration signal's handler or a quiescent point.
    /// When the transition is forced the check is skipped.
    pub fn migrate(&self, me: &ThreadState, check: impl FnOnce(u64, Side) -> Check) -> Migration {
        let entered = GateState::decode(self.enter());
        let outcome = match entered.open {
            None => Migration::Idle,
            Some((t, goal)) if Side::of_word(me.word(), t) == goal => Migration::AlreadyThere,
            Some((t, goal)) => match if entered.forced {
                Check::Clean
            } else {
                check(t, goal)
            } {
                Check::Clean => {
                    me.set_word(goal.word(t));
                    Migration::Moved(goal)
                }
                Check::Blocked(why) => {
                    me.record_blocked(t, why);
                    Migration::Blocked(why)
                }
            },
        };
        self.leave();
        outcome
    }

    /// A new thread, before it runs any user code: it has no frames, so it enters the goal
    /// universe of the transition in force (and keeps word 0 when there is none).
    pub fn thread_start(&self, me: &ThreadState) -> Migration {
        self.migrate(me, |_, _| Check::Clean)
    }

    fn enter(&self) -> u64 {
        self.state.fetch_add(IN_FLIGHT_ONE, Ordering::Acquire)
    }

    fn leave(&self) {
        self.state.fetch_sub(IN_FLIGHT_ONE, Ordering::Release);
    }

    /// The current state (a plain load: for views, not for decisions).
    pub fn state(&self) -> GateState {
        GateState::decode(self.state.load(Ordering::Acquire))
    }

    /// Opens transition `t` towards `to`. The caller must have published every site with
    /// [`crate::Site::begin`] first: this release is what makes those words visible to the
    /// threads that pass the gate.
    pub(crate) fn open(&self, t: u64) {
        debug_assert!(t <= MAX_TRANSITION && t > 0);
        let prev = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |s| {
                Some((s & IN_FLIGHT_MASK) | (t << T_SHIFT) | OPEN)
            })
            .unwrap_or_else(|s| s);
        debug_assert_eq!(prev & OPEN, 0, "a transition is already open");
    }

    /// Turns the open transition around: from now on threads move back to `from`, with
    /// their stack checked again (a reversal lifts `force`).
    pub(crate) fn reverse(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |s| {
                Some((s ^ REVERSED) & !FORCED)
            });
    }

    /// From now on threads move to the goal side at their next boundary without a check.
    pub(crate) fn force(&self) {
        self.state.fetch_or(FORCED, Ordering::AcqRel);
    }

    /// Closes the gate after the sites were settled.
    pub(crate) fn close(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |s| {
                Some(s & IN_FLIGHT_MASK)
            });
    }

    /// `true` when nobody is in flight and every one of `threads` is on the goal side of the
    /// open transition. Never waits.
    pub(crate) fn try_complete<'a>(
        &self,
        threads: impl IntoIterator<Item = &'a ThreadState>,
    ) -> bool {
        // A read-modify-write reads the latest state: every thread that left before it
        // released its word to us.
        let s = GateState::decode(self.state.fetch_add(0, Ordering::AcqRel));
        let Some((t, goal)) = s.open else {
            return false;
        };
        s.in_flight == 0
            && threads
                .into_iter()
                .all(|th| Side::of_word(th.word(), t) == goal)
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}
