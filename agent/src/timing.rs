//! How long kgpatch holds threads: histograms filled from signal handlers without locks or
//! allocation, read by `kgpatch status` and the benchmark. [`HANDLER`]: each migration
//! handler run (entry to return of kgpatch's action); [`HALTED`]: each stop-the-world
//! rendezvous (first signal to release: how long every thread was held).
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

#[cfg(test)]
mod tests {
    use super::*;

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
