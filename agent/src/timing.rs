//! How long kgpatch holds threads: histograms filled from signal handlers without locks or
//! allocation, read by `kgpatch status` and the benchmark. [`HANDLER`]: each migration
//! handler run (entry to return of kgpatch's action); [`HALTED`]: each stop-the-world
//! rendezvous (first signal to release: how long every thread was held).
//!
//! It also keeps what one transition costs the target ([`TransitionCost`]: signals, handler
//! runs per thread, the agent's CPU) and the skip rule that spares a parked thread a
//! migration signal that could not move it ([`decide`]).
//!
//! # Safety
//! The only unsafe is `clock_gettime` into a `timespec` on the caller's stack
//! (async-signal-safe, writes nothing else).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

const BUCKET_NS: u64 = 100;
/// Linear buckets: 0..200 µs in 100 ns steps.
const LINEAR: usize = 2000;
const LINEAR_END: u64 = LINEAR as u64 * BUCKET_NS;
/// Beyond, 32 buckets per power of two (about 2 % wide) up to 2^40 ns (18 minutes).
const SUB: u64 = 32;
const FIRST_POW: u32 = 18; // 2^18 ns > LINEAR_END
const BUCKETS: usize = LINEAR + ((40 - FIRST_POW as usize + 1) * SUB as usize);

fn bucket_of(ns: u64) -> usize {
    if ns < LINEAR_END {
        return (ns / BUCKET_NS) as usize;
    }
    let pow = (63 - ns.leading_zeros()).clamp(FIRST_POW - 1, 40);
    let sub = (ns >> (pow - 5)) & (SUB - 1);
    (LINEAR + (pow + 1 - FIRST_POW) as usize * SUB as usize + sub as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in nanoseconds.
fn bucket_end(i: usize) -> u64 {
    if i < LINEAR {
        return (i as u64 + 1) * BUCKET_NS;
    }
    let k = (i - LINEAR) as u64;
    let pow = k / SUB + FIRST_POW as u64 - 1;
    let sub = k % SUB;
    (1u64 << pow) + ((sub + 1) << (pow - 5))
}

/// A histogram of durations: 100 ns buckets up to 200 µs, then about 2 % wide ones, and
/// the exact maximum.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    max_ns: AtomicU64,
}

/// Migration handler runs.
pub static HANDLER: Histogram = Histogram::new();
/// Stop-the-world holds.
pub static HALTED: Histogram = Histogram::new();

/// Monotonic nanoseconds. Async-signal-safe (`clock_gettime` is a vDSO call).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub use kgpatch_protocol::HandlerTimes;

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            max_ns: AtomicU64::new(0),
        }
    }

    /// Records one duration of `ns` nanoseconds. Async-signal-safe.
    pub fn record(&self, ns: u64) {
        self.counts[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The percentiles so far.
    pub fn snapshot(&self) -> HandlerTimes {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        percentiles(&counts, self.max_ns.load(Ordering::Relaxed))
    }
}

fn percentiles(counts: &[u64], max_ns: u64) -> HandlerTimes {
    let count: u64 = counts.iter().sum();
    let at = |q: f64| {
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_end(i).min(max_ns);
            }
        }
        max_ns
    };
    if count == 0 {
        return HandlerTimes::default();
    }
    HandlerTimes {
        count,
        p50_ns: at(0.50),
        p99_ns: at(0.99),
        max_ns,
    }
}

/// CPU time of the calling thread, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; the per-thread CPU clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How many times thread `tid` has been scheduled in (third field of
/// `/proc/self/task/<tid>/schedstat`); `None` when it cannot be read.
fn times_scheduled(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_ascii_whitespace().nth(2)?.parse().ok()
}

/// Where a thread parked in a system call stood when the skip rule last spared it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Watch {
    sp: u64,
    pc: u64,
    /// Times scheduled in, when it was first spared.
    scheduled: u64,
    /// Rounds spared in a row.
    skipped: u32,
}

/// Rounds a parked thread may be spared in a row; the next one signals it again.
pub(crate) const MAX_SKIPPED: u32 = 4;

/// What the skip rule does with one pending thread this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Signal it (and forget any watch).
    Signal,
    /// Spare it this round, watching it as given.
    Skip(Watch),
}

/// The skip rule for one thread still not on the goal side. Skipping a signal only delays
/// a migration (a thread moves only after a clean walk in its own handler), so the rule
/// needs to be right about cost, never about consistency:
/// - `final_round` (the deadline is near, or the check is lifted by force): signal.
/// - `parked` (its `(sp, pc)` in `/proc/self/task/<tid>/syscall`) and `scheduled` (times
///   scheduled in) must both be known, else signal.
/// - Watched already: spare it while it is parked at the same `(sp, pc)` and has not been
///   scheduled since it was first spared, at most [`MAX_SKIPPED`] rounds in a row.
/// - Not watched: spare it if it was signalled in the last round (`last_handler` is where
///   that handler found it, and the thread is still pending, so that check failed) and it
///   is parked there again: same sp, pc the same or 2 bytes on (the `syscall` instruction
///   the kernel rewinds to when it restarts the call).
pub(crate) fn decide(
    watch: Option<Watch>,
    last_handler: Option<(u64, u64)>,
    parked: Option<(u64, u64)>,
    scheduled: Option<u64>,
    final_round: bool,
) -> Decision {
    if final_round {
        return Decision::Signal;
    }
    let (Some((sp, pc)), Some(scheduled)) = (parked, scheduled) else {
        return Decision::Signal;
    };
    match watch {
        Some(w) => {
            if w.sp == sp && w.pc == pc && w.scheduled == scheduled && w.skipped < MAX_SKIPPED {
                Decision::Skip(Watch {
                    skipped: w.skipped + 1,
                    ..w
                })
            } else {
                Decision::Signal
            }
        }
        None => match last_handler {
            Some((hsp, hpc)) if hsp == sp && (pc == hpc || pc == hpc.wrapping_add(2)) => {
                Decision::Skip(Watch {
                    sp,
                    pc,
                    scheduled,
                    skipped: 1,
                })
            }
            _ => Decision::Signal,
        },
    }
}

/// What one transition costs so far, kept by the driver from the request on.
#[derive(Debug, Default)]
pub(crate) struct TransitionCost {
    cpu_start_ns: u64,
    /// Agent CPU spent meanwhile on other work (status requests).
    cpu_excluded_ns: u64,
    traps_start: u64,
    rounds: u64,
    skipped: u64,
    /// Threads signalled in the last migration round.
    signalled: Vec<i32>,
    /// Threads the skip rule spares, by tid.
    watches: Vec<(i32, Watch)>,
    /// `KGPATCH_SKIP_RULE=off`: every pending thread is signalled every round (to measure
    /// what the rule saves).
    rule_off: bool,
}

fn traps_taken() -> u64 {
    use kgpatch_redirect::x86_64::trap::TRAP_COUNTS;
    TRAP_COUNTS.sent_on.load(Ordering::Relaxed) + TRAP_COUNTS.reexecuted.load(Ordering::Relaxed)
}

impl TransitionCost {
    /// Starts counting, as a transition is requested: clears the process's counters.
    pub(crate) fn begin() -> TransitionCost {
        kgpatch_redirect::sweep::cost::reset();
        TransitionCost {
            cpu_start_ns: thread_cpu_ns(),
            traps_start: traps_taken(),
            rule_off: std::env::var_os("KGPATCH_SKIP_RULE").is_some_and(|v| v == "off"),
            ..TransitionCost::default()
        }
    }

    /// Takes `ns` of agent CPU spent on other work out of the transition's cost.
    pub(crate) fn exclude_cpu(&mut self, ns: u64) {
        self.cpu_excluded_ns += ns;
    }

    /// Forgets every watch (the goal changed, or the check was lifted).
    pub(crate) fn forget(&mut self) {
        self.watches.clear();
        self.signalled.clear();
    }

    /// The threads of `pending` to signal this round; the rest are spared (skip rule).
    pub(crate) fn select(&mut self, pending: Vec<i32>, final_round: bool) -> Vec<i32> {
        self.rounds += 1;
        let mut out = Vec::with_capacity(pending.len());
        let mut watches = Vec::new();
        for tid in pending {
            let watch = self
                .watches
                .iter()
                .find(|(t, _)| *t == tid)
                .map(|&(_, w)| w);
            let was_signalled = self.signalled.contains(&tid);
            // Reading /proc costs agent CPU: only for threads the rule could spare.
            let d = if self.rule_off || final_round || (watch.is_none() && !was_signalled) {
                Decision::Signal
            } else {
                let last = was_signalled
                    .then(|| kgpatch_redirect::sweep::cost::last_context(tid))
                    .flatten();
                let parked = kgpatch_sys::proc::parked(kgpatch_sys::proc::Pid::This, tid);
                let scheduled = parked.and_then(|_| times_scheduled(tid));
                decide(watch, last, parked, scheduled, final_round)
            };
            match d {
                Decision::Signal => out.push(tid),
                Decision::Skip(w) => {
                    self.skipped += 1;
                    watches.push((tid, w));
                }
            }
        }
        self.watches = watches;
        self.signalled = out.clone();
        out
    }

    /// The cost of the transition, now that it is over.
    pub(crate) fn finish(&self, migration: libc::c_int, text: libc::c_int) -> Cost {
        use kgpatch_redirect::sweep::cost;
        let threads = cost::threads();
        Cost {
            migration_signals: cost::sent(migration),
            text_sweep_signals: cost::sent(text),
            sigtraps: traps_taken().saturating_sub(self.traps_start),
            membarriers: cost::membarriers(),
            wakeups: cost::wakeups(migration) + cost::wakeups(text),
            skipped: self.skipped,
            rounds: self.rounds,
            threads_interrupted: threads.interrupted,
            threads_interrupted_more_than_once: threads.more_than_once,
            max_interrupts: threads.max_runs,
            max_thread_handler_ns: threads.max_thread_ns,
            max_handler_ns: threads.max_run_ns,
            total_handler_ns: threads.total_ns,
            agent_cpu_us: thread_cpu_ns()
                .saturating_sub(self.cpu_start_ns)
                .saturating_sub(self.cpu_excluded_ns)
                / 1000,
            table_full: threads.full,
        }
    }
}

pub use kgpatch_protocol::Cost;

#[cfg(test)]
mod tests {
    use super::*;

    const SP: u64 = 0x7fff_0000_1000;
    const PC: u64 = 0x7f00_0000_2000;

    #[test]
    fn skip_rule_spares_a_thread_parked_where_its_check_failed() {
        // Signalled last round, parked again where the handler found it (the kernel rewound
        // the pc to the `syscall` instruction for the restart: /proc shows it 2 bytes on).
        let d = decide(None, Some((SP, PC)), Some((SP, PC + 2)), Some(7), false);
        let Decision::Skip(w) = d else {
            panic!("{d:?}")
        };
        assert_eq!(w.skipped, 1);
        // Not scheduled since: spared again, up to MAX_SKIPPED rounds in a row.
        let mut w = w;
        for round in 2..=MAX_SKIPPED {
            match decide(Some(w), None, Some((SP, PC + 2)), Some(7), false) {
                Decision::Skip(next) => {
                    assert_eq!(next.skipped, round);
                    w = next;
                }
                other => panic!("round {round}: {other:?}"),
            }
        }
        // Then it is signalled again, so nothing waits forever.
        assert_eq!(
            decide(Some(w), None, Some((SP, PC + 2)), Some(7), false),
            Decision::Signal
        );
    }

    #[test]
    fn skip_rule_signals_a_thread_that_ran_moved_or_is_unknown() {
        let w = match decide(None, Some((SP, PC)), Some((SP, PC)), Some(7), false) {
            Decision::Skip(w) => w,
            other => panic!("{other:?}"),
        };
        // Scheduled since it was spared: its stack may have changed.
        assert_eq!(
            decide(Some(w), None, Some((SP, PC)), Some(8), false),
            Decision::Signal
        );
        // Parked elsewhere.
        assert_eq!(
            decide(Some(w), None, Some((SP - 64, PC)), Some(7), false),
            Decision::Signal
        );
        assert_eq!(
            decide(Some(w), None, Some((SP, PC + 9)), Some(7), false),
            Decision::Signal
        );
        // Running (no syscall line), or schedstat unreadable.
        assert_eq!(
            decide(Some(w), None, None, Some(7), false),
            Decision::Signal
        );
        assert_eq!(
            decide(Some(w), None, Some((SP, PC)), None, false),
            Decision::Signal
        );
        // The deadline (or force): always signalled.
        assert_eq!(
            decide(Some(w), None, Some((SP, PC)), Some(7), true),
            Decision::Signal
        );
        // Never signalled before, or parked somewhere else than its failed check.
        assert_eq!(
            decide(None, None, Some((SP, PC)), Some(7), false),
            Decision::Signal
        );
        assert_eq!(
            decide(None, Some((SP, PC)), Some((SP + 8, PC)), Some(7), false),
            Decision::Signal
        );
        assert_eq!(
            decide(None, Some((SP, PC)), Some((SP, PC + 4)), Some(7), false),
            Decision::Signal
        );
    }

    #[test]
    fn buckets_bound_their_values() {
        let mut last = 0;
        for ns in (0..2_000_000u64)
            .step_by(37)
            .chain([1 << 30, 1 << 35, u64::MAX / 2])
        {
            let i = bucket_of(ns);
            assert!(i < BUCKETS);
            assert!(i >= last || ns < 2_000_000, "buckets grow with values");
            last = i;
            if ns < (1 << 40) {
                assert!(
                    bucket_end(i) > ns,
                    "{ns} in bucket {i} ending {}",
                    bucket_end(i)
                );
                assert!(
                    bucket_end(i) <= ns + ns / 16 + BUCKET_NS,
                    "{ns}: bucket too wide"
                );
            }
        }
    }

    #[test]
    fn percentiles_of_known_values() {
        let h = Histogram::new();
        for i in 1..=100u64 {
            h.record(i * 1_000);
        }
        h.record(5_000_000);
        let t = h.snapshot();
        assert_eq!(t.count, 101);
        assert_eq!(t.p50_ns, 51_100, "upper bound of the 51st value's bucket");
        assert_eq!(t.p99_ns, 100_100);
        assert_eq!(t.max_ns, 5_000_000);
    }
}
