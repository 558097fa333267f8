//! Walk caches: the per-walk scratch space (gimli's unwind context with fixed storage) and
//! a small direct-mapped cache of unwind rules, so warm walks skip CFI parsing.
//!
//! # Safety
//! [`CachePool`] hands each cache to one walk at a time through an atomic flag
//! (`compare_exchange`, never waited on); the `UnsafeCell` inside a slot is touched only by
//! the walk that set its flag.

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

use gimli::{
    EvaluationStorage, Piece, Reader, ReaderOffset, Register, RegisterRule, UnwindContext,
    UnwindContextStorage, UnwindTableRow, Value,
};

use crate::x86_64::FastRule;

/// Fixed-size storage for gimli, so that evaluating CFI never allocates. A CFI program that
/// needs more (more than 32 register rules in one row, more than 4 nested
/// `DW_CFA_remember_state`, deeper expression stacks) fails, and the walk is unreliable.
pub(crate) struct FixedStorage;

impl<T: ReaderOffset> UnwindContextStorage<T> for FixedStorage {
    type Rules = [(Register, RegisterRule<T>); 32];
    type Stack = [UnwindTableRow<T, Self>; 4];
}

impl<R: Reader> EvaluationStorage<R> for FixedStorage {
    type Stack = [Value; 32];
    type ExpressionStack = [(R, R); 4];
    type Result = [Piece<R>; 1];
}

/// A power of two.
const RULE_SLOTS: usize = 512;

#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: u64,
    /// The index the rule was computed for; 0 = empty.
    index_id: u32,
    rule: FastRule,
}

const EMPTY: Entry = Entry {
    addr: 0,
    index_id: 0,
    rule: FastRule::OUTERMOST,
};

/// Scratch space and rule cache for walks. Allocate one before the transition and lend it
/// to walks with [`UnwindIndex::walk_with`](crate::UnwindIndex::walk_with) (for example one
/// per thread, owned by the agent's thread record); [`UnwindIndex::walk`](crate::UnwindIndex::walk)
/// uses the index's own pool instead. Entries are tagged with the index id, so one cache
/// may serve successive indexes.
pub struct WalkCache {
    pub(crate) ctx: Box<UnwindContext<usize, FixedStorage>>,
    rules: Box<[Entry; RULE_SLOTS]>,
    hits: u64,
    misses: u64,
}

impl std::fmt::Debug for WalkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalkCache")
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish()
    }
}

impl Default for WalkCache {
    fn default() -> Self {
        WalkCache::new()
    }
}

impl WalkCache {
    /// A fresh, empty cache (allocates about 30 KiB).
    pub fn new() -> WalkCache {
        WalkCache {
            ctx: Box::new(UnwindContext::new_in()),
            rules: Box::new([EMPTY; RULE_SLOTS]),
            hits: 0,
            misses: 0,
        }
    }

    /// `(hits, misses)` of the rule cache since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Heap bytes held.
    pub fn heap_bytes() -> usize {
        std::mem::size_of::<UnwindContext<usize, FixedStorage>>()
            + std::mem::size_of::<[Entry; RULE_SLOTS]>()
    }

    /// The first of the two slots `addr` may live in (Fibonacci hashing; the set is the
    /// slot and its neighbour, so two hot pcs that hash together do not evict each other).
    #[inline]
    fn set(addr: u64) -> usize {
        let h = addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - RULE_SLOTS.trailing_zeros());
        (h as usize) & !1
    }

    #[inline]
    pub(crate) fn lookup(&mut self, addr: u64, index_id: u32) -> Option<FastRule> {
        let set = Self::set(addr);
        for e in &self.rules[set..set + 2] {
            if e.index_id == index_id && e.addr == addr {
                self.hits += 1;
                return Some(e.rule);
            }
        }
        self.misses += 1;
        None
    }

    /// Splits the cache into the gimli context and an inserter, so a rule computed from a
    /// row borrowed from the context can be stored while the row is alive.
    #[inline]
    pub(crate) fn parts(&mut self) -> (&mut UnwindContext<usize, FixedStorage>, RuleSink<'_>) {
        (
            &mut self.ctx,
            RuleSink {
                rules: &mut self.rules,
            },
        )
    }
}

/// Stores rules into a [`WalkCache`].
pub(crate) struct RuleSink<'a> {
    rules: &'a mut [Entry; RULE_SLOTS],
}

impl RuleSink<'_> {
    /// Stores a rule in the first slot of its set, moving the previous occupant to the
    /// second (so the set keeps the two most recently inserted pcs).
    #[inline]
    pub(crate) fn insert(&mut self, addr: u64, index_id: u32, rule: FastRule) {
        let set = WalkCache::set(addr);
        self.rules[set + 1] = self.rules[set];
        self.rules[set] = Entry {
            addr,
            index_id,
            rule,
        };
    }
}

struct Slot {
    busy: AtomicBool,
    cache: UnsafeCell<WalkCache>,
}

// SAFETY: `cache` is only accessed through a PoolGuard, which exists only while its walk
// holds `busy` (acquired with compare_exchange, released on drop), so no two threads ever
// access the same WalkCache at once.
unsafe impl Sync for Slot {}

/// Pre-allocated caches shared by concurrent walks. Acquiring never blocks.
pub(crate) struct CachePool {
    slots: Box<[Slot]>,
}

impl CachePool {
    pub(crate) fn new(n: usize) -> CachePool {
        CachePool {
            slots: (0..n.max(1))
                .map(|_| Slot {
                    busy: AtomicBool::new(false),
                    cache: UnsafeCell::new(WalkCache::new()),
                })
                .collect(),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.len() * (std::mem::size_of::<Slot>() + WalkCache::heap_bytes())
    }

    /// A free cache, or `None` if every one is in use. Lock-free: one compare-exchange per
    /// slot tried.
    #[inline]
    pub(crate) fn acquire(&self) -> Option<PoolGuard<'_>> {
        self.slots.iter().find_map(|slot| {
            slot.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .ok()
                .map(|_| PoolGuard { slot })
        })
    }
}

/// Exclusive use of one pooled cache until dropped.
pub(crate) struct PoolGuard<'a> {
    slot: &'a Slot,
}

impl PoolGuard<'_> {
    #[inline]
    pub(crate) fn cache(&mut self) -> &mut WalkCache {
        // SAFETY: this guard holds the slot's busy flag (see `acquire`), so it is the only
        // accessor of the cell until it is dropped; the &mut borrow is tied to &mut self.
        unsafe { &mut *self.slot.cache.get() }
    }
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        self.slot.busy.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_each_slot_once() {
        let pool = CachePool::new(2);
        let a = pool.acquire();
        let b = pool.acquire();
        assert!(a.is_some() && b.is_some());
        assert!(pool.acquire().is_none());
        drop(a);
        assert!(pool.acquire().is_some());
    }

    #[test]
    fn cache_tags_rules_with_index_id() {
        let mut c = WalkCache::new();
        let (_, mut sink) = c.parts();
        sink.insert(0x1234, 7, FastRule::OUTERMOST);
        assert_eq!(c.lookup(0x1234, 7), Some(FastRule::OUTERMOST));
        assert_eq!(c.lookup(0x1234, 8), None);
        assert_eq!(c.lookup(0x1235, 7), None);
        assert_eq!(c.stats(), (1, 2));
    }

    #[test]
    fn two_pcs_of_one_set_both_stay() {
        let mut c = WalkCache::new();
        let a = 0x5555_0000_1234u64;
        let set = WalkCache::set(a);
        let b = (1u64..)
            .map(|i| a + i)
            .find(|x| WalkCache::set(*x) == set)
            .unwrap();
        let (_, mut sink) = c.parts();
        sink.insert(a, 1, FastRule::OUTERMOST);
        sink.insert(b, 1, FastRule::OUTERMOST);
        assert!(c.lookup(a, 1).is_some());
        assert!(c.lookup(b, 1).is_some());
    }
}
