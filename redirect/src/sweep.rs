//! The thread sweep: list the process's threads, send each a real-time signal (`tgkill`), run
//! an action on its interrupted context in the signal handler, and wait until every thread
//! has run it, exited, or is found blocking the signal, or the deadline passes.
//!
//! One facility for the whole of kgpatch: the patcher moves threads out of the bytes it
//! overwrites with it, and the agent's migration sweep runs its stack check with it.
//!
//! # Async-signal safety
//! The handler allocates nothing, takes no lock, and runs in bounded time: it reads one
//! atomic pointer to the sweep in force, runs the action, and marks the thread's slot done
//! (a linear scan of the thread list made before the signals went out). The action must be
//! async-signal-safe and idempotent (a thread can run it more than once if an old signal
//! arrives late, or run the action of a later sweep).
//!
//! # Safety
//! A sweep's shared state lives on the stack of [`Sweep::run`]. Handlers reach it through
//! `CURRENT`, counted in `INFLIGHT`: `run` clears `CURRENT` and waits for `INFLIGHT` to
//! drop to zero before it returns, so no handler uses the state (or the borrowed action)
//! after `run` returns. Both sides use `SeqCst`, so a handler either sees the pointer and is
//! counted, or sees null.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kgpatch_sys::proc::{self, Pid};
use kgpatch_sys::thread::{errno, set_errno};

use crate::error::{Error, Result};

/// OS helpers that live in [`kgpatch_sys`], re-exported under the names the rest of
/// kgpatch (and its tests) use.
pub(crate) use kgpatch_sys::futex::{wait as futex_wait, wake as futex_wake};
pub(crate) use kgpatch_sys::signal::signal_bit;
pub(crate) use kgpatch_sys::thread::gettid;

/// What a sweep runs in each thread's signal handler, on the thread's interrupted context.
pub type SweepAction<'a> = &'a (dyn Fn(&mut libc::ucontext_t) + Sync);

struct Slot {
    tid: i32,
    done: AtomicBool,
}

struct Shared<'a> {
    action: SweepAction<'a>,
    slots: &'a [Slot],
    /// Slots not yet done: the handler that takes it to zero wakes the caller, so the caller
    /// is woken once per sweep rather than once per thread.
    remaining: AtomicUsize,
}

/// How often a sweep looks for threads that block its signal.
const BLOCKED_CHECK: Duration = Duration::from_millis(10);

static CURRENT: AtomicPtr<Shared<'static>> = AtomicPtr::new(std::ptr::null_mut());
static INFLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Bumped by every handler that finished an action; `run` sleeps on it (futex).
static DONE_EVENTS: AtomicU32 = AtomicU32::new(0);
static RUN_LOCK: Mutex<()> = Mutex::new(());
/// Bit `n` set: kgpatch's handler is installed for signal `n`.
static INSTALLED: Mutex<u128> = Mutex::new(0);

/// How a sweep ended, thread by thread (thread ids as the kernel knows them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Threads that ran the action.
    pub done: Vec<i32>,
    /// Threads that exited before running it (nothing to do for them).
    pub exited: Vec<i32>,
    /// Threads that block the signal: they have not run the action.
    pub blocked: Vec<i32>,
    /// Threads that neither ran the action nor block the signal by the deadline.
    pub timed_out: Vec<i32>,
}

impl SweepReport {
    /// `true` when every living thread ran the action.
    pub fn complete(&self) -> bool {
        self.blocked.is_empty() && self.timed_out.is_empty()
    }
}

/// A thread sweep over one real-time signal.
#[derive(Debug, Clone, Copy)]
pub struct Sweep {
    signal: libc::c_int,
}

impl Sweep {
    /// Installs kgpatch's handler for `signal` (once per signal; `SA_RESTART`, so most
    /// interrupted system calls restart). Fails if the program already has a handler there.
    pub fn new(signal: libc::c_int) -> Result<Sweep> {
        if !(1..=64).contains(&signal) || signal == libc::SIGKILL || signal == libc::SIGSTOP {
            return Err(Error::BadSignal { signal });
        }
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if *installed & (1 << signal) == 0 {
            install_handler(signal)?;
            *installed |= 1 << signal;
        }
        Ok(Sweep { signal })
    }

    /// `true` if the signal is still handled by kgpatch (a program may have replaced the
    /// handler since: a sweep would then time out, or worse, run the program's handler).
    pub fn intact(&self) -> bool {
        crate::x86_64::trap::current_handler(self.signal)
            == Some(on_sweep_signal as *const () as usize)
    }

    /// The signal this sweep sends.
    pub fn signal(&self) -> libc::c_int {
        self.signal
    }

    /// Runs `action` in every thread of the process except the calling one, and waits up to
    /// `timeout` for all of them. One sweep runs at a time in the process.
    pub fn run(&self, action: SweepAction<'_>, timeout: Duration) -> Result<SweepReport> {
        let me = gettid();
        let tids: Vec<i32> = list_threads()?.into_iter().filter(|&t| t != me).collect();
        self.run_on(&tids, action, timeout)
    }

    /// Runs `action` in the threads `tids` only (the agent's later migration rounds signal
    /// just the threads not yet migrated), and waits up to `timeout` for them. The calling
    /// thread must not be among them.
    pub fn run_on(
        &self,
        tids: &[i32],
        action: SweepAction<'_>,
        timeout: Duration,
    ) -> Result<SweepReport> {
        let _one_at_a_time = RUN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id() as i32;
        let slots: Vec<Slot> = tids
            .iter()
            .map(|&tid| Slot {
                tid,
                done: AtomicBool::new(false),
            })
            .collect();
        let shared = Shared {
            action,
            slots: &slots,
            remaining: AtomicUsize::new(slots.len()),
        };
        // Lifetimes are erased for the static pointer; `run` does not return before every
        // handler has let go of it (module docs).
        CURRENT.store(
            &shared as *const Shared<'_> as *mut Shared<'static>,
            Ordering::SeqCst,
        );
        let mut report = SweepReport::default();
        let mut pending: Vec<usize> = Vec::with_capacity(slots.len());
        let count_wakeups = cost::counting_wakeups();
        for (i, slot) in slots.iter().enumerate() {
            let asleep = count_wakeups && cost::asleep(slot.tid);
            if tgkill(pid, slot.tid, self.signal) {
                cost::count_sent(self.signal);
                if asleep {
                    cost::count_wakeup(self.signal);
                }
                pending.push(i);
            } else {
                report.exited.push(slot.tid);
            }
        }
        let deadline = Instant::now() + timeout;
        let started = Instant::now();
        // Reading every pending thread's /proc status costs ~20 µs a thread: look for threads
        // that block the signal only once handlers had time to run, and then rarely.
        let mut next_blocked_check = started + BLOCKED_CHECK;
        loop {
            let events = DONE_EVENTS.load(Ordering::SeqCst);
            pending.retain(|&i| {
                let slot = &slots[i];
                if slot.done.load(Ordering::Acquire) {
                    report.done.push(slot.tid);
                    false
                } else {
                    true
                }
            });
            if pending.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= next_blocked_check || now >= deadline {
                pending.retain(|&i| {
                    let tid = slots[i].tid;
                    match thread_status(tid, self.signal) {
                        ThreadStatus::Gone => {
                            report.exited.push(tid);
                            false
                        }
                        ThreadStatus::Blocks => {
                            report.blocked.push(tid);
                            false
                        }
                        ThreadStatus::Alive => true,
                    }
                });
                next_blocked_check = now + BLOCKED_CHECK;
            }
            if pending.is_empty() {
                break;
            }
            if now >= deadline {
                report
                    .timed_out
                    .extend(pending.iter().map(|&i| slots[i].tid));
                break;
            }
            let _ = started;
            // Sleep until the last handler reports, or 1 ms passes (to look at blocked threads
            // and the deadline).
            futex_wait(&DONE_EVENTS, events, Duration::from_millis(1));
        }
        CURRENT.store(std::ptr::null_mut(), Ordering::SeqCst);
        while INFLIGHT.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        // A slot may have been marked done between the last check and the clear.
        report.timed_out.retain(|&tid| {
            !slots
                .iter()
                .any(|s| s.tid == tid && s.done.load(Ordering::Acquire))
        });
        for s in &slots {
            if s.done.load(Ordering::Acquire)
                && !report.done.contains(&s.tid)
                && !report.exited.contains(&s.tid)
            {
                report.blocked.retain(|&t| t != s.tid);
                report.done.push(s.tid);
            }
        }
        Ok(report)
    }
}

extern "C" fn on_sweep_signal(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let saved_errno = errno();
    let entered = cost::now_ns();
    INFLIGHT.fetch_add(1, Ordering::SeqCst);
    let shared = CURRENT.load(Ordering::SeqCst);
    if !shared.is_null() && !ctx.is_null() {
        // SAFETY: non-null `CURRENT` points at the `Shared` of a `run` that is waiting for
        // `INFLIGHT` to drop before it frees it (module docs); `ctx` is the kernel's ucontext
        // for this delivery, exclusively ours for the duration of the handler.
        let (shared, uc) = unsafe { (&*shared, &mut *(ctx as *mut libc::ucontext_t)) };
        let g = &uc.uc_mcontext.gregs;
        cost::record_context(
            g[libc::REG_RSP as usize] as u64,
            g[libc::REG_RIP as usize] as u64,
        );
        (shared.action)(uc);
        let me = gettid();
        if let Some(slot) = shared.slots.iter().find(|s| s.tid == me) {
            let first = !slot.done.swap(true, Ordering::AcqRel);
            if first && shared.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                DONE_EVENTS.fetch_add(1, Ordering::SeqCst);
                futex_wake(&DONE_EVENTS);
            }
        }
    }
    INFLIGHT.fetch_sub(1, Ordering::SeqCst);
    cost::record_run(cost::now_ns().saturating_sub(entered));
    set_errno(saved_errno);
}

fn install_handler(signal: libc::c_int) -> Result<()> {
    // SAFETY: a zeroed sigaction is a valid "query" argument; sigaction with a null new
    // action only reads the current disposition.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a valid out-pointer.
    if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
        return Err(Error::os("sigaction", "reading the sweep signal's handler"));
    }
    if old.sa_sigaction != libc::SIG_DFL
        && old.sa_sigaction != on_sweep_signal as *const () as usize
    {
        return Err(Error::SignalInUse { signal });
    }
    // SAFETY: zeroed is a valid starting sigaction; the fields are set below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sweep_signal as *const () as usize;
    // Not SA_ONSTACK: the action (a whole stack walk, for the agent) runs on the thread's
    // own stack, never on a small alternate signal stack the program set up for SIGSEGV.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `act.sa_mask` is a valid sigset to fill.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // glibc's SIGCANCEL must not nest in our handler: it would unwind out of it (a thread
    // cancelled while our handler interrupted its cancellable `read`), leaving `INFLIGHT`
    // up for good (the next sweep waits forever) or aborting in our non-unwinding frames.
    // Blocked here, it is delivered as the handler returns. Everything else stays open.
    kgpatch_sys::signal::add_libc_reserved(&mut act.sa_mask);
    // SAFETY: `act` is fully initialised and its handler is async-signal-safe.
    if unsafe { libc::sigaction(signal, &act, std::ptr::null_mut()) } != 0 {
        return Err(Error::os(
            "sigaction",
            "installing the sweep signal handler",
        ));
    }
    Ok(())
}

/// Sends `sig` to thread `tid`; `false` if the thread is gone.
fn tgkill(pid: i32, tid: i32, sig: libc::c_int) -> bool {
    for _attempt in 0..1000 {
        match kgpatch_sys::thread::tgkill(pid, tid, sig) {
            Ok(()) => return true,
            // The real-time signal queue is full (RLIMIT_SIGPENDING): try again shortly.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                std::thread::sleep(Duration::from_micros(50))
            }
            // ESRCH: the thread is gone.
            Err(_) => return false,
        }
    }
    // Still full: count the thread as signalled; it will time out if it never runs.
    true
}

/// The ids of every thread of the process, sorted, from /proc/self/task (fails closed:
/// a read error part-way is an error, never a short list).
pub(crate) fn list_threads() -> Result<Vec<i32>> {
    proc::tasks(Pid::This).map_err(|source| Error::Os {
        call: "/proc/self/task",
        doing: "listing the process's threads",
        source,
    })
}

enum ThreadStatus {
    Gone,
    Blocks,
    Alive,
}

fn thread_status(tid: i32, signal: libc::c_int) -> ThreadStatus {
    let quiet = crate::x86_64::trap::quiet_token();
    let status = match proc::task_status(Pid::This, tid) {
        Ok(Some(s)) => s,
        Ok(None) => return ThreadStatus::Gone,
        // Any other failure (EMFILE, ENOMEM...) proves nothing: the thread stays pending, so
        // a sweep that cannot see it times out instead of counting it as gone.
        Err(_) => return ThreadStatus::Alive,
    };
    if status.exiting() {
        return ThreadStatus::Gone;
    }
    let mask = |m: Option<u64>| m.unwrap_or(0);
    let bit = signal_bit(signal);
    // Blocked and still pending: the thread has not taken it. (Blocked but not pending is a
    // thread running our handler right now: the signal is masked during its own handler.)
    // A thread still inside our handler from an earlier sweep also shows the signal blocked
    // and pending: while any handler runs, do not conclude.
    // So does a thread inside kgpatch's SIGTRAP handler, which blocks every signal while it
    // runs (a thread hammering a function whose entry holds the int3 spends most of its time
    // there): it takes the signal when the handler returns. Only a read during which no
    // thread ran that handler concludes.
    if mask(status.sig_blk) & bit != 0
        && (mask(status.sig_pnd) | mask(status.shd_pnd)) & bit != 0
        && INFLIGHT.load(Ordering::SeqCst) == 0
        && crate::x86_64::trap::quiet_since(quiet)
    {
        ThreadStatus::Blocks
    } else {
        ThreadStatus::Alive
    }
}

/// The signals thread `tid` blocks (`SigBlk` of `/proc/self/task/<tid>/status`, bit `n-1`
/// for signal `n`), or `None` when the thread is gone or exiting. Any other failure to read
/// or parse it is an error: callers refuse rather than guess.
pub fn blocked_signals(tid: i32) -> Result<Option<u64>> {
    let status = match proc::task_status(Pid::This, tid) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(Error::Os {
                call: "/proc/self/task/<tid>/status",
                doing: "reading which signals a thread blocks",
                source,
            })
        }
    };
    if status.exiting() {
        return Ok(None);
    }
    match status.sig_blk {
        Some(mask) => Ok(Some(mask)),
        None => Err(Error::Os {
            call: "/proc/self/task/<tid>/status",
            doing: "reading which signals a thread blocks (no SigBlk line)",
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        }),
    }
}

/// Waits until every thread of the process but the caller has been seen, at least once,
/// not to be a blocker by `is_blocker(tid, blocked_set)`, or `deadline` passes. Returns the
/// threads still blockers then (empty: all settled). A thread that exits is settled. Reading
/// a thread's status fails closed: the error is returned.
///
/// Each thread is judged on its own reads, so threads that block signals only for a moment
/// (glibc does while it creates or ends a thread; a thread inside kgpatch's SIGTRAP handler
/// blocks everything) settle as soon as one read finds them unblocked.
pub fn threads_settle(
    deadline: Instant,
    is_blocker: impl Fn(i32, u64) -> bool,
) -> Result<Vec<i32>> {
    let me = gettid();
    let mut pending: Vec<i32> = list_threads()?.into_iter().filter(|&t| t != me).collect();
    loop {
        let mut still = Vec::with_capacity(pending.len());
        for &tid in &pending {
            if let Some(mask) = blocked_signals(tid)? {
                if is_blocker(tid, mask) {
                    still.push(tid);
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            return Ok(pending);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The first thread (but the caller) found blocking SIGTRAP, reading the thread list
/// afresh; `Ok(None)` if none does. A thread inside kgpatch's own SIGTRAP handler (which
/// blocks everything while it runs) does not count.
pub fn first_blocking_trap() -> Result<Option<i32>> {
    let me = gettid();
    for tid in list_threads()? {
        if tid == me {
            continue;
        }
        if blocks_trap(tid, blocked_signals(tid)?) {
            return Ok(Some(tid));
        }
    }
    Ok(None)
}

/// `true` if a thread with blocked set `blocked` (`None`: gone) blocks SIGTRAP for the
/// program's reasons, not because it runs kgpatch's SIGTRAP handler. The handler is checked
/// after the status was read: a thread in it then did not block SIGTRAP when it trapped
/// (else the kernel would have killed the process), and gets its own mask back on return.
pub fn blocks_trap(tid: i32, blocked: Option<u64>) -> bool {
    // What the handler's full `sa_mask` blocks at least (glibc's sigfillset leaves out its
    // internal signals, 32 and 33; SIGKILL and SIGSTOP cannot be blocked).
    let handler_mask = !(signal_bit(libc::SIGKILL)
        | signal_bit(libc::SIGSTOP)
        | kgpatch_sys::signal::libc_reserved());
    match blocked {
        Some(m) if m & signal_bit(libc::SIGTRAP) != 0 => {
            !(m & handler_mask == handler_mask && crate::x86_64::trap::in_handler(tid))
        }
        _ => false,
    }
}

/// The user stack pointer and pc of a thread blocked in a system call, from
/// `/proc/self/task/<tid>/syscall`; `None` while it runs (or when the kernel does not say).
pub(crate) fn parked_sp_pc(tid: i32) -> Option<(u64, u64)> {
    proc::parked(Pid::This, tid)
}

/// Where a thread that is not running stands, from `/proc/self/task/<tid>/syscall`: its
/// pc when it is blocked in the kernel, `None` while it runs (or when the kernel does not
/// say).
pub(crate) fn parked_pc(tid: i32) -> Option<u64> {
    proc::parked(Pid::This, tid).map(|(_, pc)| pc)
}

/// What kgpatch's signals cost the process's threads: per-thread handler runs and time,
/// signals sent, membarrier calls. Bumped from signal handlers with relaxed atomics only
/// (no lock, no allocation: async-signal-safe); read and reset by the agent around a
/// transition. The numbers are diagnostics: a handler that runs while [`cost::reset`] clears
/// the table may be counted in the old round or lost, never anything worse.
pub mod cost {
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

    /// One thread's counts.
    struct ThreadCost {
        tid: AtomicI32,
        runs: AtomicU64,
        total_ns: AtomicU64,
        max_ns: AtomicU64,
        /// The interrupted stack pointer and pc of its last migration handler run.
        sp: AtomicU64,
        pc: AtomicU64,
    }

    impl ThreadCost {
        const fn new() -> ThreadCost {
            ThreadCost {
                tid: AtomicI32::new(0),
                runs: AtomicU64::new(0),
                total_ns: AtomicU64::new(0),
                max_ns: AtomicU64::new(0),
                sp: AtomicU64::new(0),
                pc: AtomicU64::new(0),
            }
        }
    }
    /// Slots (a power of two); a thread probes at most [`PROBES`] of them.
    const SLOTS: usize = 8192;
    const PROBES: usize = 64;
    static TABLE: [ThreadCost; SLOTS] = [const { ThreadCost::new() }; SLOTS];
    static FULL: AtomicU64 = AtomicU64::new(0);
    /// Signals sent, by signal number.
    static SENT: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];
    static MEMBARRIERS: AtomicU64 = AtomicU64::new(0);
    /// Signals sent to sleeping threads, by signal number.
    static WAKEUPS: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];
    static COUNT_WAKEUPS: AtomicBool = AtomicBool::new(false);

    /// Makes sweeps read each thread's state before signalling it, to count wake-ups
    /// (one small `/proc` read per signal: off unless asked for).
    pub fn set_count_wakeups(on: bool) {
        COUNT_WAKEUPS.store(on, Ordering::Relaxed);
    }

    pub(crate) fn counting_wakeups() -> bool {
        COUNT_WAKEUPS.load(Ordering::Relaxed)
    }

    /// `true` if thread `tid` is asleep (state S or D) now.
    pub fn asleep(tid: i32) -> bool {
        matches!(
            kgpatch_sys::proc::task_state(kgpatch_sys::proc::Pid::This, tid),
            Ok(Some('S' | 'D'))
        )
    }

    pub(crate) fn count_wakeup(signal: libc::c_int) {
        if let Some(c) = WAKEUPS.get(signal as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Signals of number `signal` sent to sleeping threads since the last reset (counted
    /// only while [`set_count_wakeups`] is on).
    pub fn wakeups(signal: libc::c_int) -> u64 {
        WAKEUPS
            .get(signal as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Monotonic nanoseconds (`clock_gettime`, a vDSO call: async-signal-safe).
    pub(crate) fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-parameter; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn slot_of(tid: i32) -> Option<&'static ThreadCost> {
        let start = (tid as u32 as usize).wrapping_mul(0x9e37_79b9) % SLOTS;
        for k in 0..PROBES {
            let s = &TABLE[(start + k) % SLOTS];
            match s.tid.load(Ordering::Relaxed) {
                t if t == tid => return Some(s),
                0 => match s
                    .tid
                    .compare_exchange(0, tid, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => return Some(s),
                    Err(t) if t == tid => return Some(s),
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        FULL.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Records one run of one of kgpatch's handlers in the calling thread, `ns` long.
    /// Async-signal-safe.
    pub fn record_run(ns: u64) {
        if let Some(s) = slot_of(super::gettid()) {
            s.runs.fetch_add(1, Ordering::Relaxed);
            s.total_ns.fetch_add(ns, Ordering::Relaxed);
            s.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }

    /// Records where the calling thread was interrupted (its stack pointer and pc), for
    /// the skip rule of the agent's migration rounds. Async-signal-safe.
    pub fn record_context(sp: u64, pc: u64) {
        if let Some(s) = slot_of(super::gettid()) {
            s.sp.store(sp, Ordering::Relaxed);
            s.pc.store(pc, Ordering::Relaxed);
        }
    }

    /// The interrupted (sp, pc) the last handler run of `tid` recorded, if any.
    pub fn last_context(tid: i32) -> Option<(u64, u64)> {
        let start = (tid as u32 as usize).wrapping_mul(0x9e37_79b9) % SLOTS;
        (0..PROBES)
            .map(|k| &TABLE[(start + k) % SLOTS])
            .find(|s| s.tid.load(Ordering::Relaxed) == tid)
            .map(|s| (s.sp.load(Ordering::Relaxed), s.pc.load(Ordering::Relaxed)))
            .filter(|&(sp, _)| sp != 0)
    }

    pub(crate) fn count_sent(signal: libc::c_int) {
        if let Some(c) = SENT.get(signal as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one membarrier call.
    pub fn count_membarrier() {
        MEMBARRIERS.fetch_add(1, Ordering::Relaxed);
    }

    /// Signals of number `signal` sent by sweeps since the last reset.
    pub fn sent(signal: libc::c_int) -> u64 {
        SENT.get(signal as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// membarrier calls since the last reset.
    pub fn membarriers() -> u64 {
        MEMBARRIERS.load(Ordering::Relaxed)
    }

    /// The per-thread figures since the last reset.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Threads {
        /// Threads that ran a handler.
        pub interrupted: u64,
        /// Threads that ran handlers more than once.
        pub more_than_once: u64,
        /// The most runs of one thread.
        pub max_runs: u64,
        /// The most time of one thread, in total.
        pub max_thread_ns: u64,
        /// The longest single run.
        pub max_run_ns: u64,
        /// All runs' time.
        pub total_ns: u64,
        /// Some thread found no slot.
        pub full: bool,
    }

    /// Reads the per-thread table.
    pub fn threads() -> Threads {
        let mut t = Threads {
            full: FULL.load(Ordering::Relaxed) != 0,
            ..Threads::default()
        };
        for s in TABLE.iter() {
            if s.tid.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let runs = s.runs.load(Ordering::Relaxed);
            if runs == 0 {
                continue;
            }
            let total = s.total_ns.load(Ordering::Relaxed);
            t.interrupted += 1;
            t.more_than_once += u64::from(runs > 1);
            t.max_runs = t.max_runs.max(runs);
            t.max_thread_ns = t.max_thread_ns.max(total);
            t.max_run_ns = t.max_run_ns.max(s.max_ns.load(Ordering::Relaxed));
            t.total_ns += total;
        }
        t
    }

    /// Clears every count (the agent does, as a transition is requested).
    pub fn reset() {
        for s in TABLE.iter() {
            if s.tid.load(Ordering::Relaxed) != 0 {
                s.runs.store(0, Ordering::Relaxed);
                s.total_ns.store(0, Ordering::Relaxed);
                s.max_ns.store(0, Ordering::Relaxed);
                s.sp.store(0, Ordering::Relaxed);
                s.pc.store(0, Ordering::Relaxed);
                s.tid.store(0, Ordering::Relaxed);
            }
        }
        for c in SENT.iter().chain(&WAKEUPS) {
            c.store(0, Ordering::Relaxed);
        }
        MEMBARRIERS.store(0, Ordering::Relaxed);
        FULL.store(0, Ordering::Relaxed);
    }
}
