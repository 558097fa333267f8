//! Reliable, async-signal-safe stack walks of an interrupted thread.
//!
//! **Owns:** the unwind index (built from `.eh_frame_hdr`/`.eh_frame` of every object
//! `dl_iterate_phdr` reports — executable, libraries, vdso — before a transition, read-only
//! during it) and the walk itself: from an interrupted register context and the thread's
//! stack bounds to [`WalkOutcome::Clean`], [`WalkOutcome::Busy`] or
//! [`WalkOutcome::Unreliable`].
//!
//! **Must not touch:** machine code, universe words, signals. A walk allocates nothing,
//! takes no lock, reads memory only inside the stack bounds it is given (and the unwind
//! sections of loaded objects), and stops after [`MAX_FRAMES`] frames.
//!
//! # Use
//! ```
//! use kgpatch_stackcheck::{BusyRanges, Regs, StackBounds, UnwindIndex, WalkOutcome};
//!
//! // Before the transition (allocates):
//! let index = UnwindIndex::build().unwrap();
//! let bounds = StackBounds::of_current_thread().unwrap();
//! let ranges = BusyRanges::from_pairs([(0x1000..0x2000, 0)]).unwrap();
//!
//! // In the migration signal handler: `Regs::from_ucontext(uc)`; here, our own stack.
//! let mut frames = [0u64; 64];
//! let (outcome, n) = index.walk_current(bounds, &ranges, &mut frames);
//! assert!(matches!(outcome, WalkOutcome::Clean { .. }), "{outcome:?}");
//! // This runs on a main thread: the outermost frame is `_start`, in the executable
//! // (which the loader names "").
//! let outermost = index.object_for(frames[n - 1] - 1).unwrap();
//! assert_eq!(outermost.name, "");
//! ```
//!
//! In a signal handler, the outcome maps onto the universe's blocker:
//! ```
//! # use kgpatch_stackcheck::{UnreliableReason, WalkOutcome};
//! fn blocker(o: WalkOutcome) -> Option<(u32, u16, u16)> {
//!     match o {
//!         WalkOutcome::Clean { .. } => None,
//!         WalkOutcome::Busy { range_id, depth, .. } => Some((range_id, depth, 0)),
//!         WalkOutcome::Unreliable { why, .. } => Some((0, 0, why.code())),
//!     }
//! }
//! # assert_eq!(blocker(WalkOutcome::Clean { depth: 3 }), None);
//! # assert_eq!(UnreliableReason::describe(UnreliableReason::TooDeep.code()),
//! #            UnreliableReason::TooDeep.message());
//! ```
//!
//! # Reliability rules
//! - Every frame is unwound from DWARF CFI; nothing is guessed. A pc outside every object
//!   ([`UnreliableReason::UnknownCode`]) or with no FDE
//!   ([`UnreliableReason::NoUnwindInfo`]) ends the walk as unreliable.
//! - The walk is clean only when it reaches a frame whose CFI marks the return address
//!   undefined: glibc's `_start` and the child side of `clone3`/`clone` do
//!   (`.cfi_undefined rip`), so every thread's outermost frame does.
//! - Signal frames (`__restore_rt`, whose CIE has the `S` augmentation) are unwound
//!   through with their CFI expressions, restoring the interrupted registers.
//! - The stack pointer must rise strictly from frame to frame; arithmetic is checked.
//! - The set of loaded objects can change: [`UnwindIndex::is_current`] says so; rebuild
//!   between attempts, never during a walk.
//!
//! Why gimli and not framehop: see the crate README (framehop falls back to
//! frame pointers silently).

#![deny(unsafe_code)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod bounds;
mod cache;
mod index;
mod outcome;
mod ranges;
mod walk;
pub mod x86_64;

pub use bounds::{
    current_thread_bounds, register_current_thread, BoundsError, LiveStack, StackBounds,
    StackReader,
};
pub use cache::WalkCache;
pub use index::{objects_stamp, IndexError, IndexOptions, ObjectInfo, ObjectsStamp, UnwindIndex};
pub use outcome::{UnreliableReason, WalkOutcome};
pub use ranges::{BusyRange, BusyRanges, RangesError};
pub use walk::MAX_FRAMES;
pub use x86_64::{Reg, Regs};

// The agent shares one index among all threads' signal handlers.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<UnwindIndex>();
    send_sync::<BusyRanges>();
};
