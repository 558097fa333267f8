//! The universe word: the per-thread `u64` the redirect stub compares with a site's
//! `migrated_value`.
//!
//! Value `2t + 1` means "this thread is in the `to` universe of transition `t`"; any other
//! value means "in `from`". A fresh thread of unknown origin holds 0. When a thread is moved
//! back by a reversal its word becomes `2t`, which no site ever publishes.

/// `migrated_value` of a site that is not in a transition. No universe word ever equals it,
/// so a steady site always sends every thread to `from` (which then equals `to`).
pub const STEADY: u64 = u64::MAX;

/// Largest transition number: `2t + 1` must stay below [`STEADY`], and the gate packs `t`
/// into the [`Gate`](crate::Gate)'s state word.
pub const MAX_TRANSITION: u64 = (1 << 40) - 1;

/// The universe word of a thread in the `to` universe of transition `t`.
#[inline]
pub const fn migrated_value(t: u64) -> u64 {
    2 * t + 1
}

/// The universe word a reversal gives a thread it moves back to `from` of transition `t`.
#[inline]
pub const fn returned_value(t: u64) -> u64 {
    2 * t
}

/// Which universe of a transition a thread (or a version) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The universe the transition moves away from (before the patch, for an apply).
    From,
    /// The universe the transition moves to.
    To,
}

impl Side {
    /// The side of a thread whose universe word is `word`, during transition `t`.
    #[inline]
    pub const fn of_word(word: u64, t: u64) -> Side {
        if word == migrated_value(t) {
            Side::To
        } else {
            Side::From
        }
    }

    /// The universe word a thread is given when it is moved to this side of transition `t`.
    #[inline]
    pub const fn word(self, t: u64) -> u64 {
        match self {
            Side::From => returned_value(t),
            Side::To => migrated_value(t),
        }
    }

    /// The other side.
    #[inline]
    pub const fn other(self) -> Side {
        match self {
            Side::From => Side::To,
            Side::To => Side::From,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_never_collides_with_steady() {
        assert!(migrated_value(MAX_TRANSITION) < STEADY);
        for t in [0, 1, 7, MAX_TRANSITION] {
            assert_eq!(Side::of_word(Side::To.word(t), t), Side::To);
            assert_eq!(Side::of_word(Side::From.word(t), t), Side::From);
            assert_eq!(Side::of_word(0, t + 1), Side::From);
            // A word from an older transition is `from` of a newer one.
            assert_eq!(Side::of_word(migrated_value(t), t + 1), Side::From);
        }
    }
}
