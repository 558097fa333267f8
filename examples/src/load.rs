//! A closed-loop load generator for the demo server.
//!
//! Each connection is a thread that sends one request, waits for the answer, checks it, and
//! sends the next (optionally paced to a target rate). Every answer is validated against a
//! model of what the server must hold: each connection owns its keys, so the expected value
//! of every `GET` and `INCR` is known exactly. An `ERR ...`, a wrong value, a timeout or a
//! broken connection counts as a failure (the connection is then re-established).
//!
//! Latency is measured per request from just before the send to the end of the answer, so
//! with pacing it does not include the time a late request waited for its slot.
//!
//! # Phases
//! A caller that changes the server while the load runs (applies a patch, reverts it) can
//! set [`LoadConfig::phase`] to a shared counter and bump it at each step: every request is
//! attributed to the phase current when it was sent, and [`LoadReport::phases`] has the
//! requests, failures and latency of each, so "latency while patching" and "latency when
//! idle" come from one run.
//!
//! # INCR semantics
//! The planted bug changes what `INCR k -n` does. [`LoadConfig::incr_sign`] says which
//! semantics the model expects; [`IncrSign::Either`] accepts an answer that matches either
//! (the sign applied or ignored), for a server that is being patched and reverted while the
//! load runs. The model still checks every answer exactly against one of the two.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Client;

/// What load to generate.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The server.
    pub addr: SocketAddr,
    /// Concurrent connections, one thread each.
    pub connections: usize,
    /// How long to run.
    pub duration: Duration,
    /// Total requests per second over all connections; `None`: as fast as answers come.
    pub rate: Option<f64>,
    /// Distinct string keys per connection (and as many counters).
    pub keys_per_connection: usize,
    /// Values are 1..=`max_value_len` bytes (letters, digits and inner spaces).
    pub max_value_len: usize,
    /// Also send negative `INCR` amounts (these fail on a server with the planted bug).
    pub negative_incr: bool,
    /// Seeds the per-connection operation mix.
    pub seed: u64,
    /// Prefixed to every key, so several runs against one server do not collide.
    pub key_prefix: String,
    /// A request unanswered for this long is a failure.
    pub request_timeout: Duration,
    /// Failures kept verbatim in [`LoadReport::failure_samples`].
    pub max_failure_samples: usize,
    /// What `INCR k -n` must do (only matters with [`LoadConfig::negative_incr`]).
    pub incr_sign: IncrSign,
    /// The phase each request belongs to (see the module docs); `None`: one phase, 0.
    pub phase: Option<Arc<AtomicUsize>>,
}

/// Which `INCR` semantics the load's model expects for a negative amount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IncrSign {
    /// `INCR k -5` subtracts 5 (correct; the server with `fix-incr` applied).
    #[default]
    Applied,
    /// `INCR k -5` adds 5 (the planted bug of the unpatched server).
    Ignored,
    /// Either, answer by answer (a server being patched while the load runs).
    Either,
}

impl LoadConfig {
    /// Four connections for five seconds, unpaced, 64 keys each, values up to 64 bytes.
    pub fn new(addr: SocketAddr) -> LoadConfig {
        LoadConfig {
            addr,
            connections: 4,
            duration: Duration::from_secs(5),
            rate: None,
            keys_per_connection: 64,
            max_value_len: 64,
            negative_incr: false,
            seed: 0x6b67_7061_7463_6821,
            key_prefix: format!("load{}", std::process::id()),
            request_timeout: Duration::from_secs(10),
            max_failure_samples: 20,
            incr_sign: IncrSign::Applied,
            phase: None,
        }
    }
}

/// Latency percentiles in microseconds. As JSON: `{"p50":..,"p99":..,"p99.9":..,"max":..}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Latency {
    /// Median.
    #[serde(rename = "p50")]
    pub p50_us: u64,
    /// 99th percentile.
    #[serde(rename = "p99")]
    pub p99_us: u64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p999_us: u64,
    /// Slowest request.
    #[serde(rename = "max")]
    pub max_us: u64,
}

impl Latency {
    /// `{"p50":..,"p99":..,"p99.9":..,"max":..}` (microseconds).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain numbers serialise")
    }

    /// Percentiles of `samples` (microseconds; sorted in place). Nearest-rank method.
    pub fn from_samples(samples: &mut [u64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let r = (q * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        Latency {
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            p999_us: rank(0.999),
            max_us: samples[samples.len() - 1],
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests whose answer was wrong, an error, or missing.
    pub failures: u64,
    /// Connections used.
    pub connections: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latency of every request (failed ones included).
    pub latency: Latency,
    /// The first few failures, described.
    pub failure_samples: Vec<String>,
    /// Per phase (index = the value of [`LoadConfig::phase`] when the request was sent):
    /// requests, failures and latency. Always at least one entry after a run.
    pub phases: Vec<PhaseReport>,
}

/// What the requests of one phase did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseReport {
    /// Requests sent in this phase.
    pub requests: u64,
    /// Of which failed.
    pub failures: u64,
    /// Their latency.
    pub latency: Latency,
}

impl LoadReport {
    /// Requests per second.
    pub fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }

    /// One JSON object (stable keys, for scripts): `requests`, `failures`, `connections`,
    /// `elapsed_s` (to the millisecond), `throughput_rps` (to 0.1), `latency_us`,
    /// `failure_samples`, `phases` (each `requests`, `failures`, `latency_us`).
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Phase {
            requests: u64,
            failures: u64,
            latency_us: Latency,
        }
        #[derive(serde::Serialize)]
        struct Report<'a> {
            requests: u64,
            failures: u64,
            connections: usize,
            elapsed_s: f64,
            throughput_rps: f64,
            latency_us: Latency,
            failure_samples: &'a [String],
            phases: Vec<Phase>,
        }
        let report = Report {
            requests: self.requests,
            failures: self.failures,
            connections: self.connections,
            elapsed_s: (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            throughput_rps: (self.throughput() * 10.0).round() / 10.0,
            latency_us: self.latency,
            failure_samples: &self.failure_samples,
            phases: self
                .phases
                .iter()
                .map(|p| Phase {
                    requests: p.requests,
                    failures: p.failures,
                    latency_us: p.latency,
                })
                .collect(),
        };
        serde_json::to_string(&report).expect("numbers and strings serialise")
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests    {} ({:.0}/s over {:.2} s, {} connections)",
            self.requests,
            self.throughput(),
            self.elapsed.as_secs_f64(),
            self.connections
        )?;
        writeln!(f, "failures    {}", self.failures)?;
        write!(
            f,
            "latency µs  p50 {}  p99 {}  p99.9 {}  max {}",
            self.latency.p50_us, self.latency.p99_us, self.latency.p999_us, self.latency.max_us
        )?;
        if self.phases.len() > 1 {
            for (i, p) in self.phases.iter().enumerate() {
                write!(
                    f,
                    "\n  phase {i}: {} requests, {} failed, µs p50 {}  p99 {}  p99.9 {}  max {}",
                    p.requests,
                    p.failures,
                    p.latency.p50_us,
                    p.latency.p99_us,
                    p.latency.p999_us,
                    p.latency.max_us
                )?;
            }
        }
        for s in &self.failure_samples {
            write!(f, "\n  failure: {s}")?;
        }
        Ok(())
    }
}

/// Runs the load for `cfg.duration` and reports.
pub fn run(cfg: LoadConfig) -> LoadReport {
    run_until(cfg, &AtomicBool::new(false))
}

/// Runs the load until `cfg.duration` has passed or `stop` becomes true, whichever is first
/// (the end-to-end tests run load in the background while they patch).
pub fn run_until(cfg: LoadConfig, stop: &AtomicBool) -> LoadReport {
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let results: Vec<ConnResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.connections)
            .map(|i| {
                let cfg = &cfg;
                std::thread::Builder::new()
                    .name(format!("kvload-{i}"))
                    .spawn_scoped(s, move || connection(cfg, i, deadline, stop))
                    .expect("spawning a load thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a load thread panicked"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut report = LoadReport {
        connections: cfg.connections,
        elapsed,
        ..LoadReport::default()
    };
    let phases = results
        .iter()
        .map(|r| r.latencies.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut by_phase: Vec<Vec<u64>> = vec![Vec::new(); phases];
    let mut failures_by_phase = vec![0u64; phases];
    for r in results {
        report.requests += r.requests;
        report.failures += r.failures;
        for (p, lat) in r.latencies.iter().enumerate() {
            by_phase[p].extend_from_slice(lat);
        }
        for (p, f) in r.failures_by_phase.iter().enumerate() {
            failures_by_phase[p] += f;
        }
        for f in r.failure_samples {
            if report.failure_samples.len() < cfg.max_failure_samples {
                report.failure_samples.push(f);
            }
        }
    }
    let mut all: Vec<u64> = by_phase.iter().flatten().copied().collect();
    report.latency = Latency::from_samples(&mut all);
    report.phases = by_phase
        .into_iter()
        .zip(failures_by_phase)
        .map(|(mut lat, failures)| PhaseReport {
            requests: lat.len() as u64,
            failures,
            latency: Latency::from_samples(&mut lat),
        })
        .collect();
    report
}

struct ConnResult {
    requests: u64,
    failures: u64,
    /// Per phase.
    latencies: Vec<Vec<u64>>,
    /// Per phase.
    failures_by_phase: Vec<u64>,
    failure_samples: Vec<String>,
}

impl ConnResult {
    /// Records one request of `phase`.
    fn record(&mut self, phase: usize, us: u64) {
        if self.latencies.len() <= phase {
            self.latencies.resize_with(phase + 1, Vec::new);
            self.failures_by_phase.resize(phase + 1, 0);
        }
        self.latencies[phase].push(us);
        self.requests += 1;
    }
}

/// splitmix64: small, fast, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the model knows about a key.
#[derive(Clone, Debug, PartialEq)]
enum Known {
    Absent,
    Value(String),
    Int(i64),
    /// A request on it failed in flight: accept what the server says next.
    Unknown,
}

fn value(rng: &mut Rng, max_len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let len = 1 + rng.below(max_len.max(1) as u64) as usize;
    (0..len)
        .map(|i| {
            // inner spaces only: the server trims leading ones and a trailing '\r'
            if i > 0 && i + 1 < len && rng.below(8) == 0 {
                ' '
            } else {
                ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char
            }
        })
        .collect()
}

fn connection(cfg: &LoadConfig, index: usize, deadline: Instant, stop: &AtomicBool) -> ConnResult {
    let mut res = ConnResult {
        requests: 0,
        failures: 0,
        latencies: vec![Vec::with_capacity(1 << 16)],
        failures_by_phase: vec![0],
        failure_samples: Vec::new(),
    };
    let current_phase = || cfg.phase.as_ref().map_or(0, |p| p.load(Ordering::Relaxed));
    let fail = |res: &mut ConnResult, phase: usize, what: String| {
        res.failures += 1;
        if res.failures_by_phase.len() <= phase {
            res.latencies.resize_with(phase + 1, Vec::new);
            res.failures_by_phase.resize(phase + 1, 0);
        }
        res.failures_by_phase[phase] += 1;
        if res.failure_samples.len() < cfg.max_failure_samples {
            res.failure_samples.push(what);
        }
    };
    let mut rng = Rng(cfg.seed ^ (index as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let keys = cfg.keys_per_connection.max(1);
    let mut strings = vec![Known::Absent; keys];
    let mut counters = vec![Known::Absent; keys];
    // keys from an earlier run with the same prefix would break the model: start clean
    let mut dirty: HashMap<String, ()> = HashMap::new();
    let interval = cfg
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(cfg.connections as f64 / r));
    let start = Instant::now();
    let mut client: Option<Client> = None;
    let mut sent: u64 = 0;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Some(iv) = interval {
            let slot = start + iv.mul_f64(sent as f64);
            let now = Instant::now();
            if slot > now {
                std::thread::sleep((slot - now).min(deadline.saturating_duration_since(now)));
                continue;
            }
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => match Client::connect(cfg.addr) {
                Ok(mut c) => {
                    let _ = c.set_timeout(Some(cfg.request_timeout));
                    client.insert(c)
                }
                Err(e) => {
                    let phase = current_phase();
                    res.record(phase, 0);
                    sent += 1;
                    fail(&mut res, phase, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let k = rng.below(keys as u64) as usize;
        let op = rng.below(10);
        let (request, slot, expect): (String, &mut Known, Expect) = if op < 4 {
            let v = value(&mut rng, cfg.max_value_len);
            let key = format!("{}:c{index}:s{k}", cfg.key_prefix);
            let req = format!("SET {key} {v}");
            (req, &mut strings[k], Expect::Set(v))
        } else if op < 8 {
            let key = format!("{}:c{index}:s{k}", cfg.key_prefix);
            (format!("GET {key}"), &mut strings[k], Expect::Get)
        } else {
            let amount = if cfg.negative_incr {
                rng.below(2001) as i64 - 1000
            } else {
                1 + rng.below(1000) as i64
            };
            let key = format!("{}:c{index}:n{k}", cfg.key_prefix);
            let req = format!("INCR {key} {amount}");
            (req, &mut counters[k], Expect::Incr(amount))
        };
        if dirty.len() < 2 * keys {
            // first touch of each key: DEL it so the model's "Absent" is true
            let key = request.split(' ').nth(1).unwrap_or_default().to_string();
            if let std::collections::hash_map::Entry::Vacant(e) = dirty.entry(key.clone()) {
                e.insert(());
                match c.request_io(&format!("DEL {key}")) {
                    Ok(a) if a == "DELETED" || a == "NOT_FOUND" => {}
                    Ok(a) => fail(
                        &mut res,
                        current_phase(),
                        format!("DEL {key}: answered {a:?}"),
                    ),
                    Err(e) => {
                        fail(&mut res, current_phase(), format!("DEL {key}: {e}"));
                        client = None;
                        continue;
                    }
                }
            }
        }
        let phase = current_phase();
        let t0 = Instant::now();
        let answer = c.request_io(&request);
        let us = t0.elapsed().as_micros() as u64;
        res.record(phase, us);
        sent += 1;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                fail(&mut res, phase, format!("{request}: {e}"));
                *slot = Known::Unknown;
                client = None;
                continue;
            }
        };
        if let Err(why) = check(&expect, slot, &answer, cfg.incr_sign) {
            fail(&mut res, phase, format!("{request}: {why}"));
        }
    }
    res
}

enum Expect {
    Set(String),
    Get,
    Incr(i64),
}

/// Checks `answer` against the model and updates the model; Err describes a mismatch.
fn check(expect: &Expect, slot: &mut Known, answer: &str, sign: IncrSign) -> Result<(), String> {
    match expect {
        Expect::Set(v) => {
            if answer == "OK" {
                *slot = Known::Value(v.clone());
                Ok(())
            } else {
                *slot = Known::Unknown;
                Err(format!("expected OK, got {answer:?}"))
            }
        }
        Expect::Get => {
            let got = if answer == "NOT_FOUND" {
                Some(Known::Absent)
            } else {
                answer
                    .strip_prefix("VALUE ")
                    .map(|v| Known::Value(v.to_string()))
            };
            match (got, &*slot) {
                (Some(g), Known::Unknown) => {
                    *slot = g;
                    Ok(())
                }
                (Some(g), want) if g == *want => Ok(()),
                (Some(g), want) => {
                    let msg = format!("expected {want:?}, got {answer:?}");
                    *slot = g;
                    Err(msg)
                }
                (None, want) => Err(format!("expected {want:?}, got {answer:?}")),
            }
        }
        Expect::Incr(amount) => {
            let got: Option<i64> = answer.strip_prefix("INT ").and_then(|n| n.parse().ok());
            let base = match slot {
                Known::Absent => Some(0i64),
                Known::Int(n) => Some(*n),
                Known::Value(_) | Known::Unknown => None,
            };
            let applied = base.and_then(|b| b.checked_add(*amount));
            let ignored = base.and_then(|b| b.checked_add(amount.checked_abs()?));
            let want = match sign {
                IncrSign::Applied => applied,
                IncrSign::Ignored => ignored,
                IncrSign::Either if got.is_some() && got == ignored => ignored,
                IncrSign::Either => applied,
            };
            match (got, want) {
                (Some(g), Some(w)) if g == w => {
                    *slot = Known::Int(g);
                    Ok(())
                }
                (Some(g), None) if *slot == Known::Unknown => {
                    *slot = Known::Int(g);
                    Ok(())
                }
                (Some(g), w) => {
                    *slot = Known::Int(g);
                    Err(format!("expected INT {w:?}, got {answer:?}"))
                }
                (None, w) => {
                    *slot = Known::Unknown;
                    Err(format!("expected INT {w:?}, got {answer:?}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn check_applied(e: &Expect, slot: &mut Known, answer: &str) -> Result<(), String> {
        check(e, slot, answer, IncrSign::Applied)
    }

    #[test]
    fn incr_sign_models() {
        let mut n = Known::Int(10);
        assert!(check(&Expect::Incr(-3), &mut n, "INT 13", IncrSign::Ignored).is_ok());
        assert!(check(&Expect::Incr(-3), &mut n, "INT 10", IncrSign::Ignored).is_err());
        let mut n = Known::Int(10);
        assert!(check(&Expect::Incr(-3), &mut n, "INT 7", IncrSign::Either).is_ok());
        assert!(check(&Expect::Incr(-3), &mut n, "INT 10", IncrSign::Either).is_ok());
        assert!(check(&Expect::Incr(-3), &mut n, "INT 9", IncrSign::Either).is_err());
        assert!(check(&Expect::Incr(2), &mut n, "INT 11", IncrSign::Either).is_ok());
    }

    #[test]
    fn phases_split_requests() {
        let mut r = ConnResult {
            requests: 0,
            failures: 0,
            latencies: vec![Vec::new()],
            failures_by_phase: vec![0],
            failure_samples: Vec::new(),
        };
        r.record(0, 5);
        r.record(2, 7);
        assert_eq!(r.latencies, vec![vec![5], vec![], vec![7]]);
        assert_eq!(r.failures_by_phase, vec![0, 0, 0]);
        assert_eq!(r.requests, 2);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let l = Latency::from_samples(&mut v);
        assert_eq!(
            l,
            Latency {
                p50_us: 500,
                p99_us: 990,
                p999_us: 999,
                max_us: 1000
            }
        );
        assert_eq!(Latency::from_samples(&mut []), Latency::default());
        assert_eq!(Latency::from_samples(&mut [7]).p999_us, 7);
    }

    #[test]
    fn model_catches_wrong_answers() {
        let mut slot = Known::Absent;
        assert!(check_applied(&Expect::Get, &mut slot, "NOT_FOUND").is_ok());
        assert!(check_applied(&Expect::Set("a b".into()), &mut slot, "OK").is_ok());
        assert!(check_applied(&Expect::Get, &mut slot, "VALUE a b").is_ok());
        assert!(check_applied(&Expect::Get, &mut slot, "VALUE a").is_err());
        assert!(check_applied(&Expect::Get, &mut slot, "ERR invariant").is_err());
        let mut n = Known::Absent;
        assert!(check_applied(&Expect::Incr(5), &mut n, "INT 5").is_ok());
        assert!(
            check_applied(&Expect::Incr(-7), &mut n, "INT 12").is_err(),
            "the planted bug"
        );
        assert_eq!(
            n,
            Known::Int(12),
            "the model follows the server after a mismatch"
        );
        assert!(check_applied(&Expect::Incr(1), &mut n, "INT 13").is_ok());
        let mut u = Known::Unknown;
        assert!(check_applied(&Expect::Incr(1), &mut u, "INT 40").is_ok());
        assert!(check_applied(&Expect::Set("x".into()), &mut u, "ERR invariant").is_err());
    }

    #[test]
    fn json_is_escaped_and_keeps_its_keys() {
        let r = LoadReport {
            failure_samples: vec!["GET \"k\"\n\u{1}".into()],
            requests: 7,
            elapsed: Duration::from_micros(1_234_567),
            latency: Latency {
                p50_us: 1,
                p99_us: 2,
                p999_us: 3,
                max_us: 4,
            },
            phases: vec![PhaseReport::default()],
            ..LoadReport::default()
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["failure_samples"][0], "GET \"k\"\n\u{1}");
        assert_eq!(v["requests"], 7);
        assert_eq!(v["elapsed_s"], 1.235);
        assert_eq!(v["latency_us"]["p99.9"], 3);
        assert_eq!(v["latency_us"]["max"], 4);
        assert_eq!(v["phases"][0]["latency_us"]["p50"], 0);
    }
}
