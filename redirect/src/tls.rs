//! The universe-word TLS slot: a [`ThreadState`] in initial-exec TLS (defined in
//! `csrc/tls.c`), at the same `%fs` offset in every thread, which the redirect stub reads.
//!
//! # Safety
//! The C slot is a zero-initialised `struct { uint64_t word, attempts, blocker; }`, which has
//! the size, alignment and bit pattern of `ThreadState::new()` (three `AtomicU64` at zero,
//! `repr(C)`). A pointer to it is valid for as long as its thread lives; the references this
//! module hands out are therefore tied to a `!Send` guard.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ops::Deref;

use kgpatch_universe::ThreadState;

use crate::error::{Error, Result};

#[repr(C)]
struct CThreadState {
    word: u64,
    attempts: u64,
    blocker: u64,
}

const _: () = assert!(std::mem::size_of::<CThreadState>() == std::mem::size_of::<ThreadState>());
const _: () = assert!(std::mem::align_of::<CThreadState>() == std::mem::align_of::<ThreadState>());

extern "C" {
    fn kgpatch_tls_current() -> *mut CThreadState;
    fn kgpatch_tls_offset() -> libc::c_long;
}

/// The calling thread's state. `!Send`: the slot dies with its thread.
#[derive(Debug)]
pub struct CurrentThreadState {
    state: &'static ThreadState,
    _not_send: PhantomData<*const ()>,
}

impl Deref for CurrentThreadState {
    type Target = ThreadState;
    fn deref(&self) -> &ThreadState {
        self.state
    }
}

/// The calling thread's [`ThreadState`] (its universe word and migration record).
pub fn current() -> CurrentThreadState {
    let ptr = current_ptr();
    // SAFETY: `ptr` is this thread's TLS slot, valid and never moved while the thread lives;
    // its layout is `ThreadState`'s (module docs). The guard is `!Send`, so the reference
    // cannot leave the thread, and a thread cannot outlive itself.
    let state = unsafe { &*ptr };
    CurrentThreadState {
        state,
        _not_send: PhantomData,
    }
}

/// The address of the calling thread's [`ThreadState`]. Async-signal-safe (one `%fs`-relative
/// address computation). Valid until the thread exits; dereferencing it from another thread is
/// the caller's responsibility.
pub fn current_ptr() -> *const ThreadState {
    // SAFETY: the C function only computes the address of an initial-exec TLS variable.
    unsafe { kgpatch_tls_current() as *const ThreadState }
}

/// The offset of the universe word from the thread pointer, in the calling thread.
pub fn offset_in_this_thread() -> i64 {
    // SAFETY: the C function only subtracts two addresses.
    unsafe { kgpatch_tls_offset() as i64 }
}

/// Checks that the slot is at the same `%fs` offset in this thread and in a fresh one, and
/// that the offset fits the stub's 32-bit displacement. Returns the offset.
pub fn checked_offset() -> Result<i32> {
    let first = offset_in_this_thread();
    let second = std::thread::spawn(offset_in_this_thread)
        .join()
        .unwrap_or(i64::MIN);
    if first != second {
        return Err(Error::TlsOffsetDiffers { first, second });
    }
    i32::try_from(first).map_err(|_| Error::TlsOffsetTooFar { offset: first })
}

/// Sets the calling thread's universe word directly, bypassing the consistency model. For
/// tests and benchmarks of the stub only; the agent moves threads with
/// `kgpatch_universe::Gate`.
#[doc(hidden)]
pub fn set_current_word_for_testing(word: u64) {
    let ptr = current_ptr() as *const std::sync::atomic::AtomicU64;
    // SAFETY: the word is the first field of this thread's slot (repr(C)), an aligned u64
    // that is only ever accessed atomically; the reference does not outlive this call.
    let atomic = unsafe { &*ptr };
    atomic.store(word, std::sync::atomic::Ordering::Release);
}
