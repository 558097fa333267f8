//! The walk: from a register context to a [`WalkOutcome`].

use crate::bounds::{LiveStack, StackBounds, StackReader};
use crate::cache::WalkCache;
use crate::index::UnwindIndex;
use crate::outcome::{UnreliableReason as Why, WalkOutcome};
use crate::ranges::BusyRanges;
use crate::x86_64::{capture_caller, step, Regs, Step};

/// The most frames a walk visits before giving up as [`Why::TooDeep`].
pub const MAX_FRAMES: u16 = 256;

/// Bytes below the interrupted stack pointer a walk may still read: the SysV red zone,
/// where an epilogue's CFI may still point at registers it already popped.
const RED_ZONE: u64 = 128;

impl UnwindIndex {
    /// Walks the stack of an interrupted thread and says whether it is clean of `ranges`.
    ///
    /// Async-signal-safe: allocates nothing, takes no lock (it borrows one of the index's
    /// pre-allocated caches with an atomic flag, see
    /// [`IndexOptions::cache_slots`](crate::IndexOptions)), reads memory only inside
    /// `bounds` (and not below `regs.rsp() - 128`), and visits at most [`MAX_FRAMES`]
    /// frames.
    pub fn walk(&self, regs: &Regs, bounds: StackBounds, ranges: &BusyRanges) -> WalkOutcome {
        self.walk_frames(regs, bounds, ranges, &mut []).0
    }

    /// [`UnwindIndex::walk`], also writing each visited frame's pc into `frames` (as many
    /// as fit). Returns the outcome and the number of frames visited.
    pub fn walk_frames(
        &self,
        regs: &Regs,
        bounds: StackBounds,
        ranges: &BusyRanges,
        frames: &mut [u64],
    ) -> (WalkOutcome, usize) {
        let Some(mut guard) = self.pool.acquire() else {
            return (unreliable(Why::NoFreeCache, 0, regs.rip()), 0);
        };
        self.walk_live(guard.cache(), regs, bounds, ranges, frames)
    }

    /// [`UnwindIndex::walk_frames`] with a cache the caller owns (e.g. one per thread),
    /// instead of one from the index's pool.
    pub fn walk_live(
        &self,
        cache: &mut WalkCache,
        regs: &Regs,
        bounds: StackBounds,
        ranges: &BusyRanges,
        frames: &mut [u64],
    ) -> (WalkOutcome, usize) {
        let sp = regs.rsp();
        if !bounds.contains(sp) {
            return (unreliable(Why::StackPointerOutOfBounds, 0, regs.rip()), 0);
        }
        let mut mem = LiveStack::new(bounds.raise_lo(sp.saturating_sub(RED_ZONE)));
        self.walk_with(cache, regs, &mut mem, ranges, frames)
    }

    /// The walk over any [`StackReader`]: the reader alone decides which addresses may be
    /// read (tests serve a fake stack from a buffer).
    pub fn walk_with<M: StackReader>(
        &self,
        cache: &mut WalkCache,
        regs: &Regs,
        mem: &mut M,
        ranges: &BusyRanges,
        frames: &mut [u64],
    ) -> (WalkOutcome, usize) {
        let mut regs = *regs;
        let mut exact = true;
        for depth in 0..MAX_FRAMES {
            let pc = regs.rip();
            if let Some(slot) = frames.get_mut(usize::from(depth)) {
                *slot = pc;
            }
            let seen = usize::from(depth) + 1;
            // A return address points after its call; the call itself is at pc - 1 (it
            // may be the last instruction of its function).
            let lookup = if exact { Some(pc) } else { pc.checked_sub(1) };
            let Some(lookup) = lookup else {
                return (unreliable(Why::UnknownCode, depth, pc), seen);
            };
            if let Some(range_id) = ranges.find(lookup) {
                return (
                    WalkOutcome::Busy {
                        depth,
                        pc,
                        range_id,
                    },
                    seen,
                );
            }
            match step(self, cache, lookup, &mut regs, mem) {
                Ok(Step::Outermost) => return (WalkOutcome::Clean { depth: depth + 1 }, seen),
                Ok(Step::Caller { exact: e }) => exact = e,
                Err(why) => return (unreliable(why, depth, pc), seen),
            }
        }
        (
            unreliable(Why::TooDeep, MAX_FRAMES, regs.rip()),
            usize::from(MAX_FRAMES),
        )
    }

    /// Walks the calling thread's own stack from here (this function is frame 0). From a
    /// signal handler, the walk passes through the kernel's signal frame into the
    /// interrupted code. Same guarantees as [`UnwindIndex::walk`].
    #[inline(never)]
    pub fn walk_current(
        &self,
        bounds: StackBounds,
        ranges: &BusyRanges,
        frames: &mut [u64],
    ) -> (WalkOutcome, usize) {
        let mut raw = [0u64; 4];
        capture_caller(&mut raw);
        let regs = Regs::from_capture(&raw);
        let r = self.walk_frames(&regs, bounds, ranges, frames);
        // Keep this frame alive (no tail call) while the walk reads it.
        core::hint::black_box(&raw);
        r
    }

    /// [`UnwindIndex::walk_current`] with a cache the caller owns.
    #[inline(never)]
    pub fn walk_current_in(
        &self,
        cache: &mut WalkCache,
        bounds: StackBounds,
        ranges: &BusyRanges,
        frames: &mut [u64],
    ) -> (WalkOutcome, usize) {
        let mut raw = [0u64; 4];
        capture_caller(&mut raw);
        let regs = Regs::from_capture(&raw);
        let r = self.walk_live(cache, &regs, bounds, ranges, frames);
        core::hint::black_box(&raw);
        r
    }
}

fn unreliable(why: Why, depth: u16, pc: u64) -> WalkOutcome {
    WalkOutcome::Unreliable { why, depth, pc }
}
