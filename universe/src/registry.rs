//! The thread registry: one [`ThreadState`] per living thread, in slots that are never freed
//! to the allocator, so the driver can read every thread's state without touching memory an
//! exiting thread frees. OS-free (the caller supplies tids and thread listings), lock-free and
//! allocation-free on the thread side, so it runs in signal handlers — and under loom.
//!
//! # The slot state machine
//! Each slot has one key word: `(generation, tid, phase)`. Phases:
//!
//! ```text
//!   FREE ──claim (CAS, generation+1)──▶ CLAIMING ──word adopted (release)──▶ LIVE
//!    ▲                                                                        │
//!    │           owner's exit, or the driver after the tid left a listing     │
//!    └──────── reset state ◀── RECLAIMING ◀──────────── (CAS on the exact key)┘
//!   LIVE ──take-over by the calling thread (CAS, generation+1)──▶ CLAIMING ──▶ LIVE
//! ```
//!
//! - A slot is visible to the driver ([`Registry::find`]) only when `LIVE`, and a thread
//!   makes it `LIVE` only after it adopted its own universe word: the driver never sees a
//!   tid with a state that is not that thread's.
//! - A thread never uses a `LIVE` slot it finds under its tid as it is: it takes it over
//!   (a new generation, its own word adopted). The slot may be left by an exited thread whose
//!   tid the kernel reused; taking it over makes it this thread's, and the new generation
//!   makes any reclaim the driver decided on the old key fail.
//! - A thread that finds its tid on a `CLAIMING` slot is interrupting its own claim (a signal
//!   handler nested in the start hook): it gets nothing and is retried later.
//! - Reclaim is a compare-and-swap of the exact key the driver read before it listed the
//!   living threads; the state is reset before the slot is `FREE` again. While a slot is
//!   `RECLAIMING` it has no owner and the driver writes its state.
//!
//! The loom models `registry_*` in `kgpatch-loom-tests` check claim, exit, tid reuse,
//! reclaim and completion against each other.

use crate::sync::{AtomicU64, Ordering};
use crate::thread::ThreadState;

const FREE: u64 = 0;
const CLAIMING: u64 = 1;
const LIVE: u64 = 2;
const RECLAIMING: u64 = 3;
const PHASE_MASK: u64 = 3;
const TID_SHIFT: u32 = 2;
const GEN_SHIFT: u32 = 34;

/// A slot's key word, as read by [`Registry::live`]; reclaim succeeds only if it is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotKey(u64);

impl SlotKey {
    fn new(generation: u64, tid: u32, phase: u64) -> SlotKey {
        SlotKey((generation << GEN_SHIFT) | (u64::from(tid) << TID_SHIFT) | phase)
    }

    fn phase(self) -> u64 {
        self.0 & PHASE_MASK
    }

    /// The thread id the key names (0 when free).
    pub fn tid(self) -> u32 {
        (self.0 >> TID_SHIFT) as u32
    }

    fn generation(self) -> u64 {
        self.0 >> GEN_SHIFT
    }

    fn next(self, tid: u32, phase: u64) -> SlotKey {
        SlotKey::new(
            (self.generation() + 1) & ((1 << (64 - GEN_SHIFT)) - 1),
            tid,
            phase,
        )
    }

    fn with_phase(self, phase: u64) -> SlotKey {
        SlotKey((self.0 & !PHASE_MASK) | phase)
    }
}

/// One thread's slot.
#[derive(Debug)]
pub struct Slot {
    key: AtomicU64,
    state: ThreadState,
}

impl Slot {
    /// A free slot.
    #[cfg(not(kgpatch_loom))]
    pub const fn new() -> Slot {
        Slot {
            key: AtomicU64::new(0),
            state: ThreadState::new(),
        }
    }

    /// A free slot.
    #[cfg(kgpatch_loom)]
    pub fn new() -> Slot {
        Slot {
            key: AtomicU64::new(0),
            state: ThreadState::new(),
        }
    }

    /// The thread's state.
    pub fn state(&self) -> &ThreadState {
        &self.state
    }

    fn key(&self) -> SlotKey {
        SlotKey(self.key.load(Ordering::Acquire))
    }

    fn cas(&self, from: SlotKey, to: SlotKey) -> bool {
        self.key
            .compare_exchange(from.0, to.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The calling thread owns the slot in `CLAIMING` under `key`: adopt its word, publish.
    fn finish_claim(&self, key: SlotKey, word: u64) -> &Slot {
        self.state.adopt(word);
        self.key.store(key.with_phase(LIVE).0, Ordering::Release);
        self
    }

    /// The slot has no owner (phase `RECLAIMING` under `key`): reset it and free it.
    fn finish_free(&self, key: SlotKey) {
        self.state.adopt(0);
        self.key
            .store(SlotKey::new(key.generation(), 0, FREE).0, Ordering::Release);
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self::new()
    }
}

/// Why [`Registry::claim`] gave no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimError {
    /// Every slot is taken.
    Full,
    /// The calling thread is in the middle of a claim already (a nested signal handler), or
    /// lost a race with the driver several times: try again at the next boundary.
    Busy,
}

/// How many compare-and-swap races a claim retries before it says [`ClaimError::Busy`].
const CLAIM_RACES: usize = 4;

/// `N` thread slots.
#[derive(Debug)]
pub struct Registry<const N: usize> {
    slots: [Slot; N],
}

impl<const N: usize> Registry<N> {
    /// An empty registry.
    #[cfg(not(kgpatch_loom))]
    pub const fn new() -> Self {
        Registry {
            slots: [const { Slot::new() }; N],
        }
    }

    /// An empty registry.
    #[cfg(kgpatch_loom)]
    pub fn new() -> Self {
        Registry {
            slots: std::array::from_fn(|_| Slot::new()),
        }
    }

    fn probe(&self, tid: u32) -> impl Iterator<Item = &Slot> {
        let start = if N == 0 { 0 } else { tid as usize % N };
        self.slots[start..].iter().chain(self.slots[..start].iter())
    }

    /// The `LIVE` slot of thread `tid`, if it has one: what the driver reads.
    /// Async-signal-safe.
    pub fn find(&self, tid: u32) -> Option<&Slot> {
        self.probe(tid).find(|s| {
            let k = s.key();
            k.phase() == LIVE && k.tid() == tid
        })
    }

    /// The slot of the calling thread `tid`, whose universe word (its TLS copy) is `word`:
    /// a `LIVE` slot under its tid is taken over (new generation, `word` adopted, attempts
    /// kept when the word is the slot's), else a free slot is claimed. The slot is `LIVE`
    /// again when this returns. Only the thread `tid` itself calls it. Async-signal-safe and
    /// bounded: loads and compare-and-swaps.
    pub fn claim(&self, tid: u32, word: u64) -> Result<&Slot, ClaimError> {
        for _ in 0..CLAIM_RACES {
            let mine = self.probe(tid).find_map(|s| {
                let k = s.key();
                (k.tid() == tid && matches!(k.phase(), CLAIMING | LIVE)).then_some((s, k))
            });
            match mine {
                Some((_, k)) if k.phase() == CLAIMING => return Err(ClaimError::Busy),
                Some((s, k)) => {
                    let claiming = k.next(tid, CLAIMING);
                    if s.cas(k, claiming) {
                        if s.state.word() == word {
                            // The slot already says what this thread runs: keep its attempts.
                            s.key.store(claiming.with_phase(LIVE).0, Ordering::Release);
                            return Ok(s);
                        }
                        return Ok(s.finish_claim(claiming, word));
                    }
                }
                None => {
                    let mut free = self.probe(tid).filter(|s| s.key().phase() == FREE);
                    let Some(s) = free.next() else {
                        return Err(ClaimError::Full);
                    };
                    let k = s.key();
                    if k.phase() == FREE {
                        let claiming = k.next(tid, CLAIMING);
                        if s.cas(k, claiming) {
                            return Ok(s.finish_claim(claiming, word));
                        }
                    }
                }
            }
        }
        Err(ClaimError::Busy)
    }

    /// The calling thread `tid` is exiting: its slot is reset and freed. Async-signal-safe.
    pub fn release(&self, tid: u32) -> bool {
        for _ in 0..CLAIM_RACES {
            let Some(s) = self.find(tid) else {
                return false;
            };
            let k = s.key();
            if k.phase() == LIVE && k.tid() == tid && s.cas(k, k.with_phase(RECLAIMING)) {
                s.finish_free(k);
                return true;
            }
        }
        false
    }

    /// The old claim (before issue 10): the tid is published (`LIVE`) before the word is
    /// adopted. Only in loom builds, so a model can show the models catch it.
    #[cfg(kgpatch_loom)]
    #[doc(hidden)]
    pub fn claim_tid_first_for_tests(&self, tid: u32, word: u64) -> Option<&Slot> {
        if let Some(s) = self.find(tid) {
            return Some(s);
        }
        let s = self.probe(tid).find(|s| {
            let k = s.key();
            k.phase() == FREE && s.cas(k, k.next(tid, LIVE))
        })?;
        s.state.adopt(word);
        Some(s)
    }

    /// The old release: the slot is freed without its state being reset. Loom builds only.
    #[cfg(kgpatch_loom)]
    #[doc(hidden)]
    pub fn release_without_reset_for_tests(&self, tid: u32) {
        if let Some(s) = self.find(tid) {
            let k = s.key();
            s.cas(k, SlotKey::new(k.generation(), 0, FREE));
        }
    }

    /// Every `LIVE` slot's key, for [`Registry::reclaim_if`].
    pub fn live(&self) -> impl Iterator<Item = (usize, SlotKey)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.key()))
            .filter(|(_, k)| k.phase() == LIVE)
    }

    /// Frees slot `index` if its key is still `key`: the caller read `key` before it listed
    /// the living threads and the listing lacked its tid, so that thread has exited. A thread
    /// that took the slot over since (a reused tid) changed the key, and keeps the slot.
    pub fn reclaim_if(&self, index: usize, key: SlotKey) -> bool {
        let Some(s) = self.slots.get(index) else {
            return false;
        };
        if key.phase() != LIVE || !s.cas(key, key.with_phase(RECLAIMING)) {
            return false;
        }
        s.finish_free(key);
        true
    }

    /// Frees the slots of threads that are gone. `list` lists the living threads now (it is
    /// called after the keys were read); when it fails (`None`) nothing is freed: fail closed.
    /// Allocates; for the driver, not for signal handlers.
    pub fn reclaim(&self, list: impl FnOnce() -> Option<Vec<u32>>) -> usize {
        let seen: Vec<(usize, SlotKey)> = self.live().collect();
        if seen.is_empty() {
            return 0;
        }
        let Some(mut alive) = list() else {
            return 0;
        };
        alive.sort_unstable();
        seen.into_iter()
            .filter(|&(i, k)| alive.binary_search(&k.tid()).is_err() && self.reclaim_if(i, k))
            .count()
    }
}

impl<const N: usize> Default for Registry<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(kgpatch_loom)))]
mod tests {
    use super::*;

    #[test]
    fn claim_find_take_over_reclaim() {
        let r: Registry<4> = Registry::new();
        assert!(r.find(5).is_none());
        let a = r.claim(5, 7).unwrap();
        assert_eq!(a.state().word(), 7);
        assert!(std::ptr::eq(r.find(5).unwrap(), a));
        // The same thread again: same slot, its word.
        assert!(std::ptr::eq(r.claim(5, 7).unwrap(), a));
        // A thread with the reused tid 5 and another word takes the slot over.
        let key = r.live().next().unwrap();
        let b = r.claim(5, 0).unwrap();
        assert!(std::ptr::eq(a, b));
        assert_eq!(b.state().word(), 0);
        // A reclaim decided on the old key fails: the slot is the new thread's.
        assert!(!r.reclaim_if(key.0, key.1));
        assert!(r.find(5).is_some());
        // Colliding tids probe to other slots.
        let c = r.claim(9, 3).unwrap();
        assert!(!std::ptr::eq(b, c));
        // A failed listing frees nothing; a listing without 5 frees its slot, reset.
        assert_eq!(r.reclaim(|| None), 0);
        assert_eq!(r.reclaim(|| Some(vec![9])), 1);
        assert!(r.find(5).is_none());
        assert!(r.release(9));
        assert!(r.find(9).is_none());
        assert_eq!(r.live().count(), 0);
    }

    #[test]
    fn full_registry_says_so() {
        let r: Registry<2> = Registry::new();
        r.claim(1, 0).unwrap();
        r.claim(2, 0).unwrap();
        assert_eq!(r.claim(3, 0).unwrap_err(), ClaimError::Full);
    }

    #[test]
    fn nested_claim_is_busy() {
        let r: Registry<2> = Registry::new();
        let s = &r.slots[1];
        assert!(s.cas(s.key(), SlotKey::new(1, 1, CLAIMING)));
        assert_eq!(r.claim(1, 0).unwrap_err(), ClaimError::Busy);
        assert!(r.find(1).is_none(), "a claiming slot is invisible");
    }
}
