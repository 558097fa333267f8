//! The fork lock: a child of `fork` never inherits a half-done write of kgpatch's.
//!
//! Stub, trampoline and site-word memory is private (`MAP_PRIVATE`, see
//! [`memory`](crate::x86_64::memory)), like the program's text: `fork` gives the child
//! copies at the same addresses, and no later write of the parent reaches them. What is
//! left is the moment of the fork itself. Every write kgpatch makes is a sequence (the int3
//! protocol of one site; a stub, its trampoline and its site words; the site words of every
//! site of a transition and the gate), and a child that copied the address space in the
//! middle of one would keep that state forever. So:
//!
//! - every writer holds the lock exclusively ([`fork_guard`]) for the whole sequence: the
//!   patcher's install, remove and fast-path switch, and the agent around the universe
//!   calls that publish or settle site words;
//! - a `pthread_atfork` *prepare* handler, registered once when the first region of stub
//!   memory is mapped, takes it shared; the *parent* handler releases it; the *child*
//!   handler resets the child's copy (the child has one thread and holds nothing).
//!
//! A `fork` therefore waits until the write in progress is done (at most one site's text
//! write, bounded by the sweep timeout), and the child starts from a state between two
//! sequences, which is a state a thread of the parent could have seen.
//!
//! Why parking_lot's raw `RwLock`: it is locked in one function and released in another
//! (prepare and parent handlers) with no guard object in between; its `INIT` is a constant,
//! so the static needs no lazy initialisation and the uncontended paths are one
//! compare-and-swap, no allocation, no system call (every `fork` of the program pays that
//! much); it is task-fair, so a program that forks in a loop cannot starve the agent's
//! writes and a long series of writes cannot starve a fork; and `lock_shared_recursive`
//! lets a fork from a signal handler that interrupted another fork's prepare handler go
//! through while a writer waits, where a plain fair read lock would deadlock.
//!
//! A `fork` from a signal handler that interrupted the writer itself (on the agent thread,
//! while it holds the lock) does not wait — it would wait for itself. That child may start
//! from inside a write sequence: still a state the parent's threads can see at any moment
//! (int3 in place, sites published before the gate opens), which the trap handler and the
//! publication order make safe.
//!
//! # Safety
//! The handlers run in the forking thread; the child handler runs in the child, which has
//! that one thread only. They only touch the lock word and the writer's tid: no
//! allocation, no other lock, async-signal-safe. The child handler overwrites its copy of
//! the lock with the initial state while no reference to it is live.

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use parking_lot::lock_api::{RawRwLock as _, RawRwLockRecursive as _};
use parking_lot::RawRwLock;

use crate::error::{Error, Result};
use crate::sweep::gettid;

struct ForkLock {
    raw: UnsafeCell<RawRwLock>,
    /// The tid of the thread holding the lock exclusively, 0 if none.
    writer: AtomicI32,
}

// SAFETY: the raw lock is shared through `&` only (it is made of atomics and built to be
// shared); the cell is written through its pointer only in the child handler, single-threaded.
unsafe impl Sync for ForkLock {}

static LOCK: ForkLock = ForkLock {
    raw: UnsafeCell::new(RawRwLock::INIT),
    writer: AtomicI32::new(0),
};

fn raw() -> &'static RawRwLock {
    // SAFETY: the cell is only ever written by `child`, in a single-threaded child, while no
    // reference obtained here is live; everything else reads it through `&`.
    unsafe { &*LOCK.raw.get() }
}

/// Held while kgpatch writes its stub memory, site words or a patch site's text: a `fork`
/// in another thread waits until it is dropped, so no child inherits half a write.
/// Reentrant on the thread that holds it. Not `Send`: it is released where it was taken.
#[must_use = "the fork lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct ForkGuard {
    owner: bool,
    _not_send: PhantomData<*const ()>,
}

/// Takes the fork lock exclusively (see the [module docs](self)); blocks while a thread is
/// between the prepare and parent handlers of a `fork`, which is short.
pub fn fork_guard() -> ForkGuard {
    let me = gettid();
    if LOCK.writer.load(Ordering::Relaxed) == me {
        return ForkGuard {
            owner: false,
            _not_send: PhantomData,
        };
    }
    raw().lock_exclusive();
    LOCK.writer.store(me, Ordering::Relaxed);
    ForkGuard {
        owner: true,
        _not_send: PhantomData,
    }
}

impl Drop for ForkGuard {
    fn drop(&mut self) {
        if self.owner {
            LOCK.writer.store(0, Ordering::Relaxed);
            // SAFETY: this guard took the lock exclusively on this thread (it is not Send).
            unsafe { raw().unlock_exclusive() };
        }
    }
}

/// `true` when the calling thread holds the lock exclusively. Only that thread ever
/// stores its own tid, so a relaxed load cannot see it falsely.
fn held_by_me() -> bool {
    LOCK.writer.load(Ordering::Relaxed) == gettid()
}

extern "C" fn prepare() {
    if !held_by_me() {
        raw().lock_shared_recursive();
    }
}

extern "C" fn parent() {
    // Same test as in `prepare`, on the same thread: the writer's tid cannot have become
    // or stopped being ours in between (guards are taken and dropped outside fork).
    if !held_by_me() {
        // SAFETY: `prepare` took it shared on this thread.
        unsafe { raw().unlock_shared() };
    }
}

extern "C" fn child() {
    let was_writer = held_by_me();
    // SAFETY: the child has one thread, this one, and no reference to the lock is live
    // (the prepare handler returned). Its copy may record holders and waiters that exist
    // only in the parent: start afresh instead of releasing (a release could try to wake
    // them through parking_lot's tables, whose locks a vanished thread may hold).
    unsafe { LOCK.raw.get().write(RawRwLock::INIT) };
    if was_writer {
        // A fork from a signal handler interrupting the writer: its guard is still alive
        // in the child and will release the lock; keep it taken (uncontended, no waiting).
        raw().lock_exclusive();
    } else {
        LOCK.writer.store(0, Ordering::Relaxed);
    }
}

/// Registers the fork handlers, once per process. Called before the first region of stub
/// memory is mapped (nothing needs the lock before then).
///
/// This may run while the caller holds the lock exclusively: `pthread_atfork` can wait for
/// a `fork` in progress (glibc's handler-list lock), but that fork cannot be waiting for our
/// lock, because our handlers are not registered yet.
pub(crate) fn register_handlers() -> Result<()> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        // SAFETY: three `extern "C" fn()` handlers that live as long as the process.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        RESULT.store(rc, Ordering::Relaxed);
    });
    match RESULT.load(Ordering::Relaxed) {
        0 => Ok(()),
        rc => Err(Error::Os {
            call: "pthread_atfork",
            doing: "registering the fork handlers that keep children consistent",
            source: std::io::Error::from_raw_os_error(rc),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_is_reentrant_and_released() {
        {
            let _a = fork_guard();
            let _b = fork_guard();
            assert!(held_by_me());
        }
        assert!(!held_by_me());
        assert!(raw().try_lock_shared());
        // SAFETY: taken just above.
        unsafe { raw().unlock_shared() };
    }

    /// A fork while another thread is between the two halves of a guarded write sequence
    /// waits for the second half: the child sees both or neither, never the first alone.
    #[test]
    fn fork_waits_for_the_write_sequence() {
        use std::sync::atomic::AtomicU64;
        use std::sync::mpsc;
        use std::time::Duration;
        static WORD: AtomicU64 = AtomicU64::new(0);
        register_handlers().unwrap();
        let (held_tx, held) = mpsc::channel();
        let (forking_tx, forking) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            let guard = fork_guard();
            WORD.store(1, Ordering::SeqCst);
            held_tx.send(()).unwrap();
            forking.recv().unwrap();
            // Give the main thread time to reach the prepare handler; if it is slower, the
            // fork simply comes after the sequence and the child sees 2 all the same.
            std::thread::sleep(Duration::from_millis(100));
            WORD.store(2, Ordering::SeqCst);
            drop(guard);
        });
        held.recv().unwrap();
        forking_tx.send(()).unwrap();
        // SAFETY: the child only loads an atomic and calls _exit (async-signal-safe).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if WORD.load(Ordering::SeqCst) == 2 {
                0
            } else {
                1
            };
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        writer.join().unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw half a write sequence (status {status:#x})"
        );
    }
}
