//! Where each thread's stack is, for the stack walk in the migration handler: a snapshot of
//! the process's mappings taken by the driver before each sweep, searched (binary search, no
//! allocation) for the mapping that holds the interrupted stack pointer.
//!
//! Why not `pthread_getattr_np` per thread: it allocates (not allowed in the handler), and
//! threads that existed before the agent, or were not created through the start hook, never
//! ran it. The mapping that holds `rsp` is the thread's stack for every glibc thread (one
//! mapping each, its guard page a separate one) and for the main thread (`[stack]`).

#![allow(unsafe_code)]

use kgpatch_stackcheck::StackBounds;

/// Readable, writable private mappings, sorted by start: (start, end, is the main thread's
/// grow-down `[stack]`).
#[derive(Debug, Default)]
pub struct StackMap {
    maps: Vec<(u64, u64, bool)>,
}

impl StackMap {
    /// Reads `/proc/self/maps`.
    pub fn snapshot() -> std::io::Result<StackMap> {
        let mut maps: Vec<(u64, u64, bool)> =
            kgpatch_sys::proc::maps(kgpatch_sys::proc::Pid::This)?
                .iter()
                .filter(|m| m.read && m.write)
                .map(|m| (m.start, m.end, m.is_main_stack()))
                .collect();
        maps.sort_unstable();
        Ok(StackMap { maps })
    }

    fn mapping_of(&self, addr: u64) -> Option<(u64, u64, bool)> {
        let i = self.maps.partition_point(|m| m.0 <= addr).checked_sub(1)?;
        let m = self.maps[i];
        (addr < m.1).then_some(m)
    }

    /// Bytes of stack below `sp` in its mapping; unbounded for the main thread's `[stack]`,
    /// which the kernel grows on demand; `None` outside every mapping. Async-signal-safe.
    pub fn room_below(&self, sp: u64) -> Option<u64> {
        let (lo, _, grows) = self.mapping_of(sp)?;
        Some(if grows { u64::MAX } else { sp - lo })
    }

    /// The bounds of the mapping that holds `rsp`. Async-signal-safe.
    pub fn bounds_of(&self, rsp: u64) -> Option<StackBounds> {
        let (lo, hi, _) = self.mapping_of(rsp)?;
        // SAFETY: the range is a readable mapping that holds the stack pointer of the thread
        // that walks it, from its own signal handler: the thread's stack cannot be unmapped
        // while the thread runs on it, and the walk ends before the handler returns.
        Some(unsafe { StackBounds::new_unchecked(lo, hi) })
    }
}
