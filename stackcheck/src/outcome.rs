//! What a walk concludes: [`WalkOutcome`] and the reasons a walk is not trusted.

/// The result of one stack walk.
///
/// Sizes fit [`kgpatch_universe::Blocker`](https://docs.rs/kgpatch-universe): a `Busy`
/// maps to `Blocker::Busy { site: range_id, depth }`, an `Unreliable` to
/// `Blocker::Unreliable { reason: why.code() }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkOutcome {
    /// Every frame was unwound from CFI down to the thread's outermost frame and none is in a
    /// busy range. `depth` is the number of frames walked, the outermost one included.
    Clean {
        /// Frames walked.
        depth: u16,
    },
    /// The frame at `depth` (0 = the interrupted pc) is inside the busy range `range_id`.
    /// The walk stops at the first (innermost) such frame.
    Busy {
        /// Frame index, 0 being the innermost.
        depth: u16,
        /// The frame's pc (for a caller frame, its return address).
        pc: u64,
        /// The id the caller gave the range.
        range_id: u32,
    },
    /// The walk could not prove the stack clean: frame `depth` at `pc` could not be unwound.
    Unreliable {
        /// Why.
        why: UnreliableReason,
        /// Index of the frame the walk stopped at.
        depth: u16,
        /// That frame's pc.
        pc: u64,
    },
}

impl WalkOutcome {
    /// `true` for [`WalkOutcome::Clean`].
    pub fn is_clean(&self) -> bool {
        matches!(self, WalkOutcome::Clean { .. })
    }
}

/// Why a walk is not trusted. Each has a stable [`code`](UnreliableReason::code) that fits
/// a `u16` and never changes meaning; [`UnreliableReason::describe`] turns a code back into
/// a sentence for `kgpatch status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnreliableReason {
    /// The pc lies outside every loaded object (JIT code, anonymous memory, a stub).
    UnknownCode,
    /// The pc lies in a loaded object but no `.eh_frame` entry covers it.
    NoUnwindInfo,
    /// The interrupted stack pointer is outside the thread's stack bounds (e.g. running on
    /// an alternate signal stack or a coroutine stack).
    StackPointerOutOfBounds,
    /// Unwinding needed a stack word outside the thread's stack bounds.
    ReadOutOfBounds,
    /// The CFI rule for the canonical frame address uses a register whose value is unknown
    /// in this frame, or an expression that could not be evaluated.
    CfaNotRecoverable,
    /// The CFI rule for the return address, or for a register a later rule needs, is of a
    /// kind the walker does not evaluate.
    UnsupportedRule,
    /// The unwind information is malformed, or too complex for the walker's fixed storage.
    BadUnwindInfo,
    /// The next frame's stack pointer is not above the current one: the stack would loop or
    /// run backwards.
    StackDidNotAdvance,
    /// An address computation overflowed.
    Overflow,
    /// The walk reached its depth bound before the outermost frame.
    TooDeep,
    /// Every pre-allocated walk cache was in use (too many concurrent walks).
    NoFreeCache,
}

impl UnreliableReason {
    const ALL: [UnreliableReason; 11] = [
        UnreliableReason::UnknownCode,
        UnreliableReason::NoUnwindInfo,
        UnreliableReason::StackPointerOutOfBounds,
        UnreliableReason::ReadOutOfBounds,
        UnreliableReason::CfaNotRecoverable,
        UnreliableReason::UnsupportedRule,
        UnreliableReason::BadUnwindInfo,
        UnreliableReason::StackDidNotAdvance,
        UnreliableReason::Overflow,
        UnreliableReason::TooDeep,
        UnreliableReason::NoFreeCache,
    ];

    /// The stable code (never 0).
    pub const fn code(self) -> u16 {
        match self {
            UnreliableReason::UnknownCode => 1,
            UnreliableReason::NoUnwindInfo => 2,
            UnreliableReason::StackPointerOutOfBounds => 3,
            UnreliableReason::ReadOutOfBounds => 4,
            UnreliableReason::CfaNotRecoverable => 5,
            UnreliableReason::UnsupportedRule => 6,
            UnreliableReason::BadUnwindInfo => 7,
            UnreliableReason::StackDidNotAdvance => 8,
            UnreliableReason::Overflow => 9,
            UnreliableReason::TooDeep => 10,
            UnreliableReason::NoFreeCache => 11,
        }
    }

    /// The reason a code stands for, if any.
    pub fn from_code(code: u16) -> Option<UnreliableReason> {
        Self::ALL.iter().copied().find(|r| r.code() == code)
    }

    /// A sentence saying what the code means, for people.
    pub fn describe(code: u16) -> &'static str {
        match Self::from_code(code) {
            Some(r) => r.message(),
            None => "unknown stack-check code (a newer kgpatch wrote it)",
        }
    }

    /// This reason as a sentence.
    pub const fn message(self) -> &'static str {
        match self {
            UnreliableReason::UnknownCode => {
                "a frame runs code outside every loaded object (JIT or stub code), which has no unwind information"
            }
            UnreliableReason::NoUnwindInfo => {
                "a frame runs code of a loaded object that has no .eh_frame entry for it"
            }
            UnreliableReason::StackPointerOutOfBounds => {
                "the thread's stack pointer is outside its stack (alternate signal stack or coroutine)"
            }
            UnreliableReason::ReadOutOfBounds => {
                "unwinding led outside the thread's stack"
            }
            UnreliableReason::CfaNotRecoverable => {
                "a frame's CFA rule needs a register value that is not known at that point"
            }
            UnreliableReason::UnsupportedRule => {
                "a frame's unwind rule is of a kind the stack checker does not evaluate"
            }
            UnreliableReason::BadUnwindInfo => {
                "a frame's unwind information is malformed or too complex"
            }
            UnreliableReason::StackDidNotAdvance => {
                "the stack did not move towards its base between two frames"
            }
            UnreliableReason::Overflow => "an address computation overflowed while unwinding",
            UnreliableReason::TooDeep => "the stack is deeper than the walk's depth bound",
            UnreliableReason::NoFreeCache => {
                "too many stack walks ran at once and no walk cache was free"
            }
        }
    }
}

impl core::fmt::Display for UnreliableReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_nonzero_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in UnreliableReason::ALL {
            assert_ne!(r.code(), 0);
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
            assert_eq!(UnreliableReason::from_code(r.code()), Some(r));
            assert_eq!(UnreliableReason::describe(r.code()), r.message());
        }
        assert_eq!(UnreliableReason::from_code(0), None);
        assert!(UnreliableReason::describe(999).contains("unknown"));
    }
}
