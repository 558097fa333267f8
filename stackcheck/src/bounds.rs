//! Stack bounds and the only code that reads stack memory.
//!
//! # Safety
//! [`StackBounds`] can only be made from a range the caller vouches for (readable for as
//! long as walks use it) or from `pthread_getattr_np` for the calling thread; [`StackReader`]
//! reads only inside it. That is the whole of this crate's memory-safety argument for
//! stack reads.

#![allow(unsafe_code)]

use std::cell::Cell;

/// The memory a walk may read, as `[lo, hi)`: a thread's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBounds {
    lo: u64,
    hi: u64,
}

/// Why the calling thread's stack bounds could not be found.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BoundsError {
    /// `pthread_getattr_np` or `pthread_attr_getstack` failed.
    #[error("pthread_getattr_np failed with error {0}; the thread's stack cannot be located, so its stack cannot be checked")]
    Pthread(i32),
    /// The reported range is empty or wraps.
    #[error("the thread's reported stack range {lo:#x}..{hi:#x} is empty or wraps; report this as a bug")]
    Empty {
        /// Low end.
        lo: u64,
        /// High end.
        hi: u64,
    },
}

impl StackBounds {
    /// Bounds `[lo, hi)` the caller vouches for.
    ///
    /// # Safety
    /// Every byte of `[lo, hi)` must be mapped readable memory for as long as any walk uses
    /// these bounds (a walk reads 8-byte words anywhere inside them).
    pub const unsafe fn new_unchecked(lo: u64, hi: u64) -> StackBounds {
        StackBounds { lo, hi }
    }

    /// The bounds of the calling thread's stack, from `pthread_getattr_np`.
    ///
    /// Not async-signal-safe (glibc allocates, and reads `/proc/self/maps` for the main
    /// thread): call it when a thread registers, keep the result (see
    /// [`register_current_thread`]) and read it from the signal handler.
    pub fn of_current_thread() -> Result<StackBounds, BoundsError> {
        let (lo, hi) = pthread_stack_of_self()?;
        if lo >= hi {
            return Err(BoundsError::Empty { lo, hi });
        }
        Ok(StackBounds { lo, hi })
    }

    /// Low end (inclusive).
    pub const fn lo(&self) -> u64 {
        self.lo
    }

    /// High end (exclusive).
    pub const fn hi(&self) -> u64 {
        self.hi
    }

    /// `true` if `addr` lies inside.
    pub const fn contains(&self, addr: u64) -> bool {
        self.lo <= addr && addr < self.hi
    }

    /// The same bounds with the low end raised to `lo` (never lowered).
    pub(crate) fn raise_lo(self, lo: u64) -> StackBounds {
        StackBounds {
            lo: self.lo.max(lo),
            hi: self.hi,
        }
    }
}

/// `pthread_getattr_np` for the calling thread: `(lo, hi)`.
fn pthread_stack_of_self() -> Result<(u64, u64), BoundsError> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_self() is always a valid thread handle for the caller; attr is
    // written by pthread_getattr_np before any use, and destroyed below on success.
    let rc = unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) };
    if rc != 0 {
        return Err(BoundsError::Pthread(rc));
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: attr was initialised by the successful pthread_getattr_np above; addr and
    // size are valid out-pointers.
    let rc = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    // SAFETY: attr is initialised and destroyed exactly once.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    if rc != 0 {
        return Err(BoundsError::Pthread(rc));
    }
    let lo = addr as u64;
    Ok((lo, lo.wrapping_add(size as u64)))
}

thread_local! {
    /// The calling thread's bounds, filled by [`register_current_thread`]. Const-initialised
    /// and without destructor, so reading it never allocates or registers anything.
    static THREAD_BOUNDS: Cell<Option<StackBounds>> = const { Cell::new(None) };
}

/// Looks up the calling thread's stack bounds and keeps them in a per-thread slot that
/// [`current_thread_bounds`] reads from a signal handler. Call it when a thread starts or
/// registers with the agent, never from a signal handler.
pub fn register_current_thread() -> Result<StackBounds, BoundsError> {
    let bounds = StackBounds::of_current_thread()?;
    THREAD_BOUNDS.with(|b| b.set(Some(bounds)));
    Ok(bounds)
}

/// The bounds [`register_current_thread`] stored for the calling thread, or `None` if it
/// never ran on this thread.
///
/// Async-signal-safe where Rust's thread-locals of this crate are static TLS (the crate is
/// linked into the executable or into a preloaded library). In a library loaded later by
/// `dlopen`, the first touch of a thread-local on a thread may allocate inside the dynamic
/// loader: the agent then keeps the bounds in its own initial-exec per-thread record.
pub fn current_thread_bounds() -> Option<StackBounds> {
    THREAD_BOUNDS.with(|b| b.get())
}

/// Reads 8-byte words of stack memory for a walk. The walk calls nothing else to read
/// memory, so an implementation that refuses an address makes the walk stop there.
pub trait StackReader {
    /// The little-endian word at `addr`, or `None` if `addr..addr+8` may not be read.
    fn read_u64(&mut self, addr: u64) -> Option<u64>;
}

/// Reads the live stack, only inside [`StackBounds`].
#[derive(Clone, Copy, Debug)]
pub struct LiveStack {
    bounds: StackBounds,
}

impl LiveStack {
    /// A reader limited to `bounds`.
    pub fn new(bounds: StackBounds) -> LiveStack {
        LiveStack { bounds }
    }
}

impl StackReader for LiveStack {
    #[inline]
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let end = addr.checked_add(8)?;
        if addr < self.bounds.lo || end > self.bounds.hi {
            return None;
        }
        // SAFETY: [addr, addr+8) lies inside the bounds, which their constructor guarantees
        // are mapped readable memory (StackBounds::new_unchecked's contract, or the calling
        // thread's own stack from pthread). read_unaligned has no alignment requirement.
        Some(unsafe { core::ptr::read_unaligned(addr as *const u64) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_stack_reads_only_inside() {
        let buf: [u64; 4] = [1, 2, 3, 4];
        let lo = buf.as_ptr() as u64;
        // SAFETY: buf outlives the reader and is 32 readable bytes.
        let b = unsafe { StackBounds::new_unchecked(lo, lo + 32) };
        let mut r = LiveStack::new(b);
        assert_eq!(r.read_u64(lo), Some(1));
        assert_eq!(r.read_u64(lo + 24), Some(4));
        assert_eq!(r.read_u64(lo + 25), None);
        assert_eq!(r.read_u64(lo - 1), None);
        assert_eq!(r.read_u64(u64::MAX - 3), None);
        assert_eq!(r.read_u64(u64::MAX), None);
    }

    #[test]
    fn own_stack_bounds_contain_a_local() {
        let x = 5u64;
        let b = register_current_thread().unwrap();
        assert!(b.contains(&x as *const u64 as u64));
        assert_eq!(current_thread_bounds(), Some(b));
        let other = std::thread::spawn(current_thread_bounds).join().unwrap();
        assert_eq!(other, None);
    }
}
