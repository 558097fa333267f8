//! Migration of the calling thread: from the migration signal's handler, at a quiescent
//! point, and when a thread starts. Everything here is async-signal-safe: registry slots are
//! claimed with compare-and-swaps, the unwind index, busy ranges and stack map are built by
//! the driver before the sweep and only read here, and the universe word is copied into the
//! thread's TLS before it returns to its own code.
//!
//! # Safety
//! Two kinds of unsafe: access to the calling thread's own universe-word slot through
//! [`tls::current_ptr`], which is valid while the thread runs and written by that thread
//! only; and reading the registers from the `ucontext` the kernel passed to the signal
//! handler running now ([`Regs::from_ucontext`]), valid for the handler's duration.
#![allow(unsafe_code)]

use kgpatch_redirect::tls;
use kgpatch_stackcheck::{BusyRanges, Regs, UnwindIndex, WalkOutcome};
use kgpatch_universe::{Blocker, Check, Gate, Migration, Side};

use crate::registry;
use crate::stacks::StackMap;
use crate::timing;

/// The gate of this process.
pub static GATE: Gate = Gate::new();

/// `Blocker::Unreliable` code for "no mapping holds the stack pointer" (outside the stack
/// checker's own codes, which are small).
pub const NO_STACK_MAPPING: u16 = 0xff01;
/// `Blocker::Unreliable` code for "the thread registry is full".
pub const REGISTRY_FULL: u16 = 0xff02;
/// `Blocker::Unreliable` code for "the handler runs on a stack too small for a walk".
pub const SHORT_OF_STACK: u16 = 0xff03;
/// Busy-range id of kgpatch's own stubs and trampolines.
pub const OUR_CODE: u32 = u32::MAX;

/// What the handler needs, built by the driver before a sweep, read-only during it.
pub struct MigrationContext<'a> {
    /// Unwind tables of every loaded object.
    pub index: &'a UnwindIndex,
    /// Code a thread must not be in to move to `to`.
    pub leaving_from: &'a BusyRanges,
    /// Code a thread must not be in to move back to `from`.
    pub leaving_to: &'a BusyRanges,
    /// Where the stacks are.
    pub stacks: &'a StackMap,
}

fn tid() -> u32 {
    kgpatch_sys::thread::gettid() as u32
}

/// Copies the registry's word into the thread's TLS word, the one the stub reads.
pub(crate) fn publish_word(word: u64) {
    let mine = tls::current_ptr();
    // SAFETY: `current_ptr` is the calling thread's initial-exec TLS slot, alive while the
    // thread runs; only this thread writes it.
    unsafe { (*mine).adopt(word) };
}

pub(crate) fn current_word() -> u64 {
    // SAFETY: as in `publish_word`; a plain read of this thread's own slot.
    unsafe { (*tls::current_ptr()).word() }
}

/// The migration handler's action, on the interrupted context `uc`.
pub fn on_signal(uc: &libc::ucontext_t, ctx: &MigrationContext<'_>) {
    let entered = timing::now_ns();
    migrate_interrupted(uc, ctx);
    timing::HANDLER.record(timing::now_ns().saturating_sub(entered));
}

/// The stack check of the interrupted context `uc`, for a move to side `goal`.
/// Async-signal-safe.
pub fn check_interrupted(uc: &libc::ucontext_t, ctx: &MigrationContext<'_>, goal: Side) -> Check {
    // SAFETY: `uc` is the kernel's context for this signal delivery.
    let regs = unsafe { Regs::from_ucontext(uc) };
    let ranges = match goal {
        Side::To => ctx.leaving_from,
        Side::From => ctx.leaving_to,
    };
    let Some(bounds) = ctx.stacks.bounds_of(regs.rsp()) else {
        return Check::Blocked(Blocker::Unreliable {
            reason: NO_STACK_MAPPING,
        });
    };
    match ctx.index.walk(&regs, bounds, ranges) {
        WalkOutcome::Clean { .. } => Check::Clean,
        WalkOutcome::Busy {
            depth, range_id, ..
        } => Check::Blocked(Blocker::Busy {
            site: range_id,
            depth,
        }),
        WalkOutcome::Unreliable { why, .. } => {
            Check::Blocked(Blocker::Unreliable { reason: why.code() })
        }
    }
}

/// Stack the handler needs for a walk (the walker's frames and gimli's parsing).
const HANDLER_STACK: u64 = 32 * 1024;

/// `true` when the handler runs with too little stack below it for a walk: on a small
/// alternate signal stack, or near the end of the thread's stack.
fn short_of_stack(ctx: &MigrationContext<'_>) -> bool {
    let here = &ctx as *const _ as u64;
    ctx.stacks
        .room_below(here)
        .is_none_or(|room| room < HANDLER_STACK)
}

fn migrate_interrupted(uc: &libc::ucontext_t, ctx: &MigrationContext<'_>) {
    // Full or busy (a claim of this thread that the signal interrupted): retried later.
    let Ok(slot) = registry::claim(tid(), current_word()) else {
        return;
    };
    let outcome = GATE.migrate(slot.state(), |_, goal| {
        if short_of_stack(ctx) {
            return Check::Blocked(Blocker::Unreliable {
                reason: SHORT_OF_STACK,
            });
        }
        check_interrupted(uc, ctx, goal)
    });
    if matches!(outcome, Migration::Moved(_) | Migration::AlreadyThere) {
        publish_word(slot.state().word());
    }
}

/// A quiescent point: the calling thread holds no frame of any patched function here (the
/// top of a worker loop). If a transition is waiting for this thread, it moves now. Costs
/// one TLS load, one load of the gate and a compare when nothing is pending.
#[inline]
pub fn quiescent() {
    if GATE.is_settled_for(current_word()) {
        return;
    }
    quiescent_slow();
}

#[cold]
fn quiescent_slow() {
    let Ok(slot) = registry::claim(tid(), current_word()) else {
        return;
    };
    if let Migration::Moved(_) | Migration::AlreadyThere =
        GATE.migrate(slot.state(), |_, _| Check::Clean)
    {
        publish_word(slot.state().word());
    }
}

/// A thread that starts, before any of its own code: it enters the goal universe of the
/// transition in force (it has no frames that could be inside an old function).
pub fn thread_start() {
    // A new thread's TLS word is 0; a slot left under its tid by an exited thread is taken
    // over with that word.
    let Ok(slot) = registry::claim(tid(), current_word()) else {
        return;
    };
    GATE.thread_start(slot.state());
    publish_word(slot.state().word());
}

/// A thread started through the start hook exits (its start routine returned, or it called
/// `pthread_exit`, or it was cancelled): its registry slot is freed before the kernel can
/// give its tid to another thread.
pub fn thread_exit() {
    registry::release(tid());
}
