//! A patch site's three words, exactly as the machine-code redirect stub reads them, and the
//! order in which they are published.
//!
//! The stub (built by `kgpatch-redirect`) is, in effect:
//!
//! ```text
//! mov r11, fs:[UNIVERSE_OFFSET]
//! cmp r11, [site.migrated_value]
//! je  [site.to]
//! jmp [site.from]
//! ```
//!
//! (redirect emits it branch-free, `mov r11, [from]; cmove r11, [to]; jmp r11`, with the
//! same loads in the same order). [`select`] is the definition of that stub in Rust; the
//! redirect crate tests its machine code against it.
//!
//! Publication order (proven by the loom models):
//! - **begin**: write `to`, then `migrated_value = 2t+1` (release). `from` already holds the
//!   current version. A thread that sees `2t+1` therefore sees the new `to`. (The gate opens
//!   only after every site is published, and a thread reaches `2t+1` only through the gate,
//!   so this order is also implied by the gate's release; it is kept so a site is correct on
//!   its own.)
//! - **settle** (completion): write `from = to`, then `migrated_value = STEADY` (release). A
//!   migrated thread that sees `STEADY` goes to `from`, which already equals `to`.
//! - **settle back** (a reversal's completion): write `to = from`, then `STEADY`. No thread
//!   holds `2t+1` any more, so every thread already goes to `from`.

use crate::sync::{AtomicU64, Ordering};
use crate::word::{migrated_value, STEADY};

/// One body of a function: its entry address (the original through its trampoline, or a
/// replacement from a patch module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

/// The words of one patch site. `#[repr(C)]` because machine code reads it: `migrated_value`
/// at offset 0, `from` at 8, `to` at 16.
#[repr(C)]
#[derive(Debug)]
pub struct Site {
    migrated_value: AtomicU64,
    from: AtomicU64,
    to: AtomicU64,
}

/// Byte offsets of the site words, for the stub's memory operands.
pub mod offsets {
    /// Offset of `migrated_value`.
    pub const MIGRATED_VALUE: usize = 0;
    /// Offset of `from`.
    pub const FROM: usize = 8;
    /// Offset of `to`.
    pub const TO: usize = 16;
}

/// A snapshot of a site's words, for tests and diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteWords {
    /// `2t+1` during transition `t`, [`STEADY`] otherwise.
    pub migrated_value: u64,
    /// Entry of the version threads in `from` run.
    pub from: u64,
    /// Entry of the version threads in `to` run.
    pub to: u64,
}

impl Site {
    /// A steady site whose every thread runs `current`.
    pub fn new_steady(current: Version) -> Site {
        Site {
            migrated_value: AtomicU64::new(STEADY),
            from: AtomicU64::new(current.0),
            to: AtomicU64::new(current.0),
        }
    }

    /// Publishes the start of transition `t` towards `to`. The site must be steady.
    pub fn begin(&self, t: u64, to: Version) {
        debug_assert_eq!(self.migrated_value.load(Ordering::Relaxed), STEADY);
        self.to.store(to.0, Ordering::Relaxed);
        self.migrated_value
            .store(migrated_value(t), Ordering::Release);
    }

    /// Publishes the completion of a transition: every thread now runs `to`.
    pub fn settle(&self) {
        let to = self.to.load(Ordering::Relaxed);
        self.from.store(to, Ordering::Relaxed);
        self.migrated_value.store(STEADY, Ordering::Release);
    }

    /// The wrong completion order, `STEADY` before `from = to`: kept only so the loom models
    /// can show that they catch it.
    #[cfg(kgpatch_loom)]
    #[doc(hidden)]
    pub fn settle_wrong_order(&self) {
        let to = self.to.load(Ordering::Relaxed);
        self.migrated_value.store(STEADY, Ordering::Release);
        self.from.store(to, Ordering::Release);
    }

    /// Publishes the completion of a reversed transition: every thread now runs `from`.
    pub fn settle_back(&self) {
        let from = self.from.load(Ordering::Relaxed);
        self.to.store(from, Ordering::Relaxed);
        self.migrated_value.store(STEADY, Ordering::Release);
    }

    /// The version every thread runs when the site is steady; `None` during a transition.
    pub fn steady_version(&self) -> Option<Version> {
        let m = self.migrated_value.load(Ordering::Acquire);
        (m == STEADY).then(|| Version(self.from.load(Ordering::Relaxed)))
    }

    /// A snapshot of the three words (not atomic as a whole).
    pub fn words(&self) -> SiteWords {
        let migrated_value = self.migrated_value.load(Ordering::Acquire);
        SiteWords {
            migrated_value,
            from: self.from.load(Ordering::Acquire),
            to: self.to.load(Ordering::Acquire),
        }
    }
}

/// Which version a thread whose universe word is `universe_word` runs when it enters `site`:
/// what the redirect stub does, as Rust.
#[inline]
pub fn select(universe_word: u64, site: &Site) -> Version {
    // Loads in the stub's order; x86 loads are acquire loads.
    if universe_word == site.migrated_value.load(Ordering::Acquire) {
        Version(site.to.load(Ordering::Acquire))
    } else {
        Version(site.from.load(Ordering::Acquire))
    }
}

#[cfg(all(test, not(kgpatch_loom)))]
mod tests {
    use super::*;
    use crate::word::returned_value;

    #[test]
    fn layout_matches_the_stub() {
        assert_eq!(std::mem::size_of::<Site>(), 24);
        let s = Site::new_steady(Version(1));
        let base = &s as *const Site as usize;
        assert_eq!(
            &s.migrated_value as *const _ as usize - base,
            offsets::MIGRATED_VALUE
        );
        assert_eq!(&s.from as *const _ as usize - base, offsets::FROM);
        assert_eq!(&s.to as *const _ as usize - base, offsets::TO);
    }

    #[test]
    fn select_follows_the_transition() {
        let s = Site::new_steady(Version(10));
        assert_eq!(select(0, &s), Version(10));
        assert_eq!(select(STEADY - 1, &s), Version(10));
        s.begin(3, Version(20));
        assert_eq!(select(migrated_value(3), &s), Version(20));
        assert_eq!(select(returned_value(3), &s), Version(10));
        assert_eq!(select(migrated_value(2), &s), Version(10));
        s.settle();
        assert_eq!(s.steady_version(), Some(Version(20)));
        assert_eq!(select(migrated_value(3), &s), Version(20));
        assert_eq!(select(0, &s), Version(20));
        s.begin(4, Version(10));
        assert_eq!(s.steady_version(), None);
        s.settle_back();
        assert_eq!(s.steady_version(), Some(Version(20)));
        assert_eq!(select(migrated_value(4), &s), Version(20));
    }
}
