//! How long kgpatch holds threads: histograms filled from signal handlers without locks or
//! allocation, read by `kgpatch status` and the benchmark. [`HANDLER`]: each migration
//! handler run (entry to return of kgpatch's action); [`HALTED`]: each stop-the-world
//! rendezvous (first signal to release: how long every thread was held).

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

const BUCKET_NS: u64 = 100;
const BUCKETS: usize = 2000; // 0..200 µs in 100 ns steps; longer ones go to the last bucket

/// A histogram of durations: 100 ns buckets up to 200 µs, longer ones in the last bucket,
/// and the exact maximum.
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

/// Percentiles of every handler run so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandlerTimes {
    /// Handler runs recorded.
    pub count: u64,
    /// Median, in nanoseconds (bucket upper bound, 100 ns resolution).
    pub p50_ns: u64,
    /// 99th percentile, in nanoseconds.
    pub p99_ns: u64,
    /// Longest, in nanoseconds.
    pub max_ns: u64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            max_ns: AtomicU64::new(0),
        }
    }

    /// Records one duration of `ns` nanoseconds. Async-signal-safe.
    pub fn record(&self, ns: u64) {
        let i = ((ns / BUCKET_NS) as usize).min(BUCKETS - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
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
                return ((i as u64 + 1) * BUCKET_NS).min(max_ns);
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
