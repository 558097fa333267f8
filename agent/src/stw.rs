//! The stop-the-world baseline, for comparison only (`kgpatch apply --stop-the-world`): every
//! thread is halted at once in a signal handler (a rendezvous, as kpatch's `stop_machine`
//! does with CPUs), every stack is checked, and only if all are clean do all threads move
//! together; then all resume. It exists so the benchmark can measure what kgpatch's
//! per-thread transition saves; it is never the default.
//!
//! A halted thread waits on a futex word with a bounded timeout, so a driver that fails to
//! release it cannot hang the process.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kgpatch_redirect::Sweep;
use kgpatch_universe::{Check, Side};

use crate::migrate::{self, MigrationContext, GATE};
use crate::registry;

/// Rendezvous state, shared by the driver and every halted thread.
static ARRIVED: AtomicU32 = AtomicU32::new(0);
static BUSY: AtomicU32 = AtomicU32::new(0);
/// 0 = hold, 1 = go (migrate), 2 = retry later (do not migrate).
static RELEASE: AtomicU32 = AtomicU32::new(0);
/// The thread that drives the rendezvous; it is never halted.
static DRIVER_TID: AtomicU64 = AtomicU64::new(0);
/// 1 when the rendezvous moves threads back to `from` (a reversed transition).
static BACKWARDS: AtomicU32 = AtomicU32::new(0);

const HOLD: u32 = 0;
const GO: u32 = 1;
const RETRY: u32 = 2;
/// The longest a thread stays halted if the driver never releases it.
const MAX_HALT: Duration = Duration::from_secs(2);

/// In each thread's handler: check the stack, arrive, wait to be released, then move (or
/// not) as the driver decided.
fn halt_here(uc: &libc::ucontext_t, ctx: &MigrationContext<'_>) {
    let me = kgpatch_sys::thread::gettid() as u64;
    if me == DRIVER_TID.load(Ordering::Acquire) {
        return;
    }
    let goal = if BACKWARDS.load(Ordering::Acquire) == 1 {
        Side::From
    } else {
        Side::To
    };
    let check = migrate::check_interrupted(uc, ctx, goal);
    if check != Check::Clean {
        BUSY.fetch_add(1, Ordering::AcqRel);
    }
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    let deadline = crate::timing::now_ns() + MAX_HALT.as_nanos() as u64;
    loop {
        let r = RELEASE.load(Ordering::Acquire);
        if r != HOLD {
            if r == GO {
                let Ok(slot) = registry::claim(me as u32, migrate::current_word()) else {
                    return;
                };
                // The stack was checked at arrival and nothing ran since.
                GATE.migrate(slot.state(), |_, _| check);
                migrate::publish_word(slot.state().word());
            }
            return;
        }
        let now = crate::timing::now_ns();
        if now >= deadline {
            return;
        }
        kgpatch_sys::futex::wait(
            &RELEASE,
            HOLD,
            Duration::from_nanos((deadline - now).min(1_000_000)),
        );
    }
}

/// What one rendezvous found.
#[derive(Debug, Clone, Copy)]
pub struct Rendezvous {
    /// Threads halted.
    pub halted: u32,
    /// Of them, with a busy or unreliable stack.
    pub busy: u32,
    /// Time from the first signal to every thread halted, or to giving up.
    pub gather: Duration,
    /// Time threads were held in total (first signal to release).
    pub held: Duration,
}

/// Halts every thread but the caller, checks every stack, and if all are clean moves them
/// all to the `goal` side at once; then releases them.
pub fn rendezvous(
    sweep: &Sweep,
    ctx: &MigrationContext<'_>,
    goal: Side,
    timeout: Duration,
) -> Rendezvous {
    BACKWARDS.store(u32::from(goal == Side::From), Ordering::Release);
    ARRIVED.store(0, Ordering::Release);
    BUSY.store(0, Ordering::Release);
    RELEASE.store(HOLD, Ordering::Release);
    DRIVER_TID.store(kgpatch_sys::thread::gettid() as u64, Ordering::Release);
    // A failed listing waits for no one: the rendezvous then finds too few arrivals and
    // releases everyone unmoved.
    let others = crate::driver::live_tids().map_or(u32::MAX, |t| t.len().saturating_sub(1) as u32);
    let start = Instant::now();
    let action = |uc: &mut libc::ucontext_t| halt_here(uc, ctx);
    let mut result = Rendezvous {
        halted: 0,
        busy: 0,
        gather: Duration::ZERO,
        held: Duration::ZERO,
    };
    std::thread::scope(|s| {
        // The sweep waits for every handler to return, and handlers wait for the release:
        // it runs on a helper thread while this one decides. The helper itself is not
        // signalled (a sweep skips its caller); this thread returns from its handler at
        // once.
        let signaller = s.spawn(|| sweep.run(&action, timeout));
        let deadline = start + timeout.min(MAX_HALT / 2);
        while ARRIVED.load(Ordering::Acquire) < others && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        result.gather = start.elapsed();
        result.halted = ARRIVED.load(Ordering::Acquire);
        result.busy = BUSY.load(Ordering::Acquire);
        let go = result.halted >= others && result.busy == 0;
        RELEASE.store(if go { GO } else { RETRY }, Ordering::Release);
        kgpatch_sys::futex::wake(&RELEASE);
        result.held = start.elapsed();
        crate::timing::HALTED.record(result.held.as_nanos() as u64);
        let _ = signaller.join();
    });
    result
}
