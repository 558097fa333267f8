//! The thread registry: one [`ThreadState`] per living thread, in static memory that is never
//! freed, so the driver can read every thread's state without touching thread-local memory
//! that an exiting thread frees.
//!
//! A thread claims a slot the first time it passes the gate (its start hook, its first
//! migration signal, or a quiescent point) with a compare-and-swap of its kernel thread id;
//! claiming and finding are lock-free and allocation-free, so they run in signal handlers.
//! The registry state is the authority the gate works on; the universe word the stub reads
//! lives in initial-exec TLS and is copied from it by the thread itself before it returns to
//! its own code, so the two never differ while the thread runs user code.
//!
//! Slots of threads that exited are reclaimed by the driver: it reads a slot's tid, then lists
//! the process's threads; a tid read before the listing and absent from it belongs to a thread
//! that is gone. (A tid reused by a new thread within that window keeps the slot: harmless,
//! since the new thread adopts it with its own word.)

use std::sync::atomic::{AtomicU32, Ordering};

use kgpatch_universe::ThreadState;

/// Threads the registry can hold. A thread beyond it cannot migrate by signal and is shown
/// as unreliable; the transition then needs `force` or a reversal.
pub const CAPACITY: usize = 8192;

/// One thread's slot.
pub struct Slot {
    tid: AtomicU32,
    state: ThreadState,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            tid: AtomicU32::new(0),
            state: ThreadState::new(),
        }
    }

    /// The thread's state.
    pub fn state(&self) -> &ThreadState {
        &self.state
    }

    /// The thread's kernel id (0 when free).
    pub fn tid(&self) -> u32 {
        self.tid.load(Ordering::Acquire)
    }
}

static SLOTS: [Slot; CAPACITY] = [const { Slot::new() }; CAPACITY];

fn probe(tid: u32) -> impl Iterator<Item = &'static Slot> {
    let start = tid as usize % CAPACITY;
    SLOTS[start..].iter().chain(SLOTS[..start].iter())
}

/// The slot of thread `tid`, if it has one. Async-signal-safe.
pub fn find(tid: u32) -> Option<&'static Slot> {
    probe(tid).find(|s| s.tid.load(Ordering::Acquire) == tid)
}

/// The slot of the calling thread `tid`, claimed if it has none; a newly claimed slot adopts
/// `word`, the thread's current universe word. `None` when the registry is full.
/// Async-signal-safe: only loads and compare-and-swaps.
pub fn claim(tid: u32, word: u64) -> Option<&'static Slot> {
    if let Some(s) = find(tid) {
        return Some(s);
    }
    let slot = probe(tid).find(|s| {
        s.tid
            .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    slot.state.adopt(word);
    Some(slot)
}

/// Every claimed slot, with its tid.
pub fn claimed() -> impl Iterator<Item = (u32, &'static Slot)> {
    SLOTS.iter().filter_map(|s| match s.tid() {
        0 => None,
        tid => Some((tid, s)),
    })
}

/// Frees the slots of threads that are gone. `list` lists the living threads now; it is called
/// after the slots' tids were read.
pub fn reclaim(list: impl FnOnce() -> Vec<u32>) -> usize {
    let seen: Vec<u32> = claimed().map(|(tid, _)| tid).collect();
    if seen.is_empty() {
        return 0;
    }
    let mut alive = list();
    alive.sort_unstable();
    let mut freed = 0;
    for tid in seen {
        if alive.binary_search(&tid).is_err() {
            if let Some(s) = find(tid) {
                if s.tid
                    .compare_exchange(tid, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    freed += 1;
                }
            }
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_find_reclaim() {
        // Use tids no real thread of this test process has.
        let (a, b) = (u32::MAX - 1, u32::MAX - 1 - CAPACITY as u32);
        assert!(find(a).is_none());
        let sa = claim(a, 7).unwrap();
        assert_eq!(sa.state().word(), 7);
        assert!(
            std::ptr::eq(claim(a, 9).unwrap(), sa),
            "a thread keeps its slot"
        );
        let sb = claim(b, 0).unwrap();
        assert!(
            !std::ptr::eq(sa, sb),
            "colliding tids probe to different slots"
        );
        assert_eq!(reclaim(|| vec![a]), 1);
        assert!(find(b).is_none());
        assert!(find(a).is_some());
        reclaim(Vec::new);
        assert!(find(a).is_none());
    }
}
