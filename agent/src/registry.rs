//! The thread registry of this process: a static [`Registry`] of [`CAPACITY`] slots (the
//! state machine, its rules and its loom models live in `kgpatch-universe`). Slots are never
//! freed to the allocator, so the driver reads every thread's state without touching
//! thread-local memory that an exiting thread frees.
//!
//! A thread claims (or takes over) its slot each time it passes the gate (its start hook,
//! a migration signal, a quiescent point); a thread started through the start hook frees its
//! slot when it exits; the driver frees the slots of other threads that are gone, by the
//! exact key it read before listing `/proc/self/task`, and frees nothing when the listing
//! fails.

use kgpatch_universe::{ClaimError, Registry, Slot};

/// Threads the registry can hold. A thread beyond it cannot migrate by signal and is shown
/// as unreliable; the transition then needs `force` or a reversal.
pub const CAPACITY: usize = 8192;

static REGISTRY: Registry<CAPACITY> = Registry::new();

/// The `LIVE` slot of thread `tid`, if it has one. Async-signal-safe.
pub fn find(tid: u32) -> Option<&'static Slot> {
    REGISTRY.find(tid)
}

/// The slot of the calling thread `tid` whose TLS universe word is `word`.
/// Async-signal-safe.
pub fn claim(tid: u32, word: u64) -> Result<&'static Slot, ClaimError> {
    REGISTRY.claim(tid, word)
}

/// The calling thread `tid` exits: its slot is freed. Async-signal-safe.
pub fn release(tid: u32) {
    REGISTRY.release(tid);
}

/// Frees the slots of threads that are gone; `list` lists the living threads (called after
/// the slots' keys were read; `None` when the listing failed: nothing is freed).
pub fn reclaim(list: impl FnOnce() -> Option<Vec<u32>>) -> usize {
    REGISTRY.reclaim(list)
}
