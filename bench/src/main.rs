//! `kgpatch-bench`: the numbers behind kgpatch's claims, measured side by side in one run and
//! printed as tables (and written as JSON).
//!
//! 1. Time from the start of a transition to its completion, for 8, 64, 256 and 1024 threads
//!    (half busy in user code, together keeping one of the two cores computing; half asleep
//!    in futex/epoll/nanosleep): kgpatch against the stop-the-world baseline.
//! 2. How long each thread is interrupted: kgpatch's migration handler (entry to return)
//!    against the stop-the-world hold.
//! 3. The demo server's request latency under closed-loop load: no patching; an apply/revert
//!    loop with kgpatch; the same loop stop-the-world.
//! 4. The idle agent's CPU and memory, and the unwind index's size.
//! 5. MariaDB under sysbench: none, a control loop, kgpatch, stop-the-world (`mariadb.rs`).
//!
//! The redirect crate's per-call overhead has its own bench: `cargo bench -p kgpatch-redirect`.
//!
//! Usage: `cargo run --release -p kgpatch-bench -- [--quick] [--json PATH]`.
//!
//! The stop-the-world baseline is compiled only into an agent built with kgpatch-agent's
//! `bench-baseline` feature; the production library refuses it. So the bench does not
//! preload the library next to its binary: it builds its own, `cargo build --release -p
//! kgpatch-agent --features bench-baseline --target-dir <target>/bench-agent`, and preloads
//! `<target>/bench-agent/release/libkgpatch_agent.so` (a separate target directory, so that
//! cargo's feature unification never turns the feature on in the production build).

#![deny(unsafe_code)]

mod agent;
mod attach;
mod cost;
mod mariadb;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kgpatch_examples::load::{LoadConfig, LoadReport};
use kgpatch_examples::{patch_path, DemoServer, Patch, ServerOptions, Variant};
use kgpatch_protocol::{HandlerTimes, OnTimeout, OutcomeKind, Request};
use kgpatch_sys::proc;
use serde_json::{json, Value};

use agent::{Agent, Built};

struct Options {
    quick: bool,
    json: PathBuf,
    threads: Option<Vec<usize>>,
    only: Option<String>,
}

fn options() -> Options {
    let mut opts = Options {
        quick: false,
        json: PathBuf::from("target/kgpatch-bench.json"),
        threads: None,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = args.next().map(PathBuf::from).unwrap_or(opts.json),
            "--threads" => {
                opts.threads = args
                    .next()
                    .map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect())
            }
            "--only" => opts.only = args.next(),
            "-h" | "--help" => {
                println!("usage: kgpatch-bench [--quick] [--json PATH] [--threads 8,64,...] [--only migration|latency|idle|attach|cost|mariadb]");
                std::process::exit(0);
            }
            other => {
                eprintln!("kgpatch-bench: unknown argument `{other}` (try --help)");
                std::process::exit(2);
            }
        }
    }
    opts
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The benchmark target with `n` threads and the agent preloaded.
struct Target {
    child: Child,
    agent: Agent,
}

impl Target {
    fn start(built: &Built, n: usize) -> Target {
        let mut child = Command::new(env!("KGPATCH_BENCH_TARGET"))
            .arg(n.to_string())
            .env("LD_PRELOAD", &built.agent_so)
            .env("KGPATCH_RUNTIME_DIR", &built.runtime_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the benchmark target starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .expect("the target says READY");
        assert!(line.starts_with("READY"), "target said {line:?}");
        let agent = Agent::connect(built, child.id());
        Target { child, agent }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One apply + revert; the two transitions' times in milliseconds (None if one reversed).
fn cycle(agent: &Agent, module: &Path, name: &str, stw: bool) -> Option<(f64, f64)> {
    let apply = agent.transition(Request::Apply {
        module: module.to_owned(),
        timeout_ms: Some(10_000),
        on_timeout: OnTimeout::Reverse,
        stop_the_world: stw,
    });
    let revert = agent.transition(Request::Revert {
        patch: name.to_owned(),
        timeout_ms: Some(10_000),
        on_timeout: OnTimeout::Reverse,
        stop_the_world: stw,
    });
    match (apply, revert) {
        (Some(a), Some(r))
            if a.result == OutcomeKind::Completed && r.result == OutcomeKind::Completed =>
        {
            Some((a.elapsed_us as f64 / 1000.0, r.elapsed_us as f64 / 1000.0))
        }
        _ => None,
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn times_json(t: &HandlerTimes) -> Value {
    json!({"count": t.count, "p50_us": us(t.p50_ns), "p99_us": us(t.p99_ns), "max_us": us(t.max_ns)})
}

fn migration(built: &Built, opts: &Options) -> Value {
    let default: &[usize] = if opts.quick {
        &[8, 64]
    } else {
        &[8, 64, 256, 1024]
    };
    let counts = opts.threads.as_deref().unwrap_or(default);
    let reps = if opts.quick { 3 } else { 7 };
    let module = Path::new(env!("KGPATCH_BENCH_PATCH"));
    println!("\n## 1-2. Transition time and per-thread interruption ({reps} apply+revert cycles each, median)\n");
    println!("| threads | kgpatch (ms) | stop-the-world (ms) | kgpatch handler p50 / p99 / max (µs) | stop-the-world hold p50 / p99 / max (µs) |");
    println!("|---:|---:|---:|---|---|");
    let mut rows = Vec::new();
    for &n in counts {
        let mut row = json!({"threads": n});
        let mut cells = Vec::new();
        let mut times = Vec::new();
        for stw in [false, true] {
            // A fresh process per mode: its histograms then hold this mode only.
            let target = Target::start(built, n);
            cycle(&target.agent, module, "bench-leaf", stw); // warm up (index, caches)
            let mut samples = Vec::new();
            let mut failed = 0;
            for _ in 0..reps {
                match cycle(&target.agent, module, "bench-leaf", stw) {
                    Some((a, r)) => samples.extend([a, r]),
                    None => failed += 1,
                }
            }
            let status = target.agent.status();
            let m = median(&mut samples);
            let held = if stw { status.halted } else { status.handler };
            cells.push(if failed > 0 {
                format!("{m:.2} ({failed} reversed)")
            } else {
                format!("{m:.2}")
            });
            times.push(format!(
                "{:.1} / {:.1} / {:.1}",
                us(held.p50_ns),
                us(held.p99_ns),
                us(held.max_ns)
            ));
            let key = if stw { "stop_the_world" } else { "kgpatch" };
            row[key] = json!({
                "median_ms": m,
                "samples_ms": samples,
                "reversed": failed,
                "interruption": times_json(&held),
                "unwind_index_bytes": status.unwind_index_bytes,
            });
        }
        println!(
            "| {n} | {} | {} | {} | {} |",
            cells[0], cells[1], times[0], times[1]
        );
        rows.push(row);
    }
    Value::Array(rows)
}

fn latency(built: &Built, opts: &Options) -> Value {
    let secs = if opts.quick { 3 } else { 10 };
    let runs = if opts.quick { 1 } else { 3 };
    println!("\n## 3. Demo server request latency under closed-loop load ({secs} s per run, median of {runs} runs, 4 connections)\n");
    println!("| mode | requests | failed | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | transitions | p99.9 / no patching |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let variant = Variant::NoFramePointers;
    let module = patch_path(Patch::FixIncr, variant);
    let mut out = Vec::new();
    let mut base_p999 = f64::NAN;
    for (label, mode) in [
        ("no patching", None),
        ("kgpatch apply/revert loop", Some(false)),
        ("stop-the-world loop", Some(true)),
    ] {
        let mut reports = Vec::new();
        let mut cycles = 0u64;
        for _ in 0..runs {
            let server = DemoServer::spawn(
                ServerOptions::new(variant)
                    .env("LD_PRELOAD", &built.agent_so)
                    .env("KGPATCH_RUNTIME_DIR", &built.runtime_dir),
            )
            .expect("the demo server starts");
            let agent = Agent::connect(built, server.pid());
            let stop = AtomicBool::new(false);
            let mut cfg = LoadConfig::new(server.addr());
            cfg.connections = 4;
            cfg.duration = Duration::from_secs(secs);
            let report: LoadReport = std::thread::scope(|s| {
                let load = s.spawn(|| kgpatch_examples::load::run(cfg));
                if let Some(stw) = mode {
                    let end = Instant::now() + Duration::from_secs(secs);
                    while Instant::now() < end && !load.is_finished() {
                        if cycle(&agent, &module, "fix-incr", stw).is_some() {
                            cycles += 2;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                stop.store(true, Ordering::Relaxed);
                load.join().expect("the load generator finishes")
            });
            reports.push(report);
        }
        let med = |f: fn(&LoadReport) -> u64| {
            median(&mut reports.iter().map(|r| f(r) as f64).collect::<Vec<_>>())
        };
        let p999 = med(|r| r.latency.p999_us);
        if mode.is_none() {
            base_p999 = p999;
        }
        let row = json!({
            "mode": label,
            "requests": med(|r| r.requests),
            "failed": reports.iter().map(|r| r.failures).sum::<u64>(),
            "p50_us": med(|r| r.latency.p50_us),
            "p99_us": med(|r| r.latency.p99_us),
            "p999_us": p999,
            "max_us": med(|r| r.latency.max_us),
            "transitions": cycles,
            "p999_ratio": p999 / base_p999,
        });
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            row["requests"],
            row["failed"],
            row["p50_us"],
            row["p99_us"],
            row["p999_us"],
            row["max_us"],
            cycles,
            p999 / base_p999
        );
        out.push(row);
    }
    Value::Array(out)
}

fn idle(built: &Built) -> Value {
    println!("\n## 4. The idle agent (a process asleep in read(2), 3 s)\n");
    let measure = |preload: bool| {
        let mut cmd = Command::new(env!("KGPATCH_BENCH_TARGET"));
        // No worker threads: the main thread asleep in read(2), and the agent's thread.
        cmd.arg("0").stdin(Stdio::piped()).stdout(Stdio::piped());
        if preload {
            cmd.env("LD_PRELOAD", &built.agent_so)
                .env("KGPATCH_RUNTIME_DIR", &built.runtime_dir);
        }
        let mut child = cmd.spawn().expect("target starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .expect("READY");
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(300));
        let ticks_of = |pid: u32| proc::cpu_ticks(proc::Pid::Other(pid as i32)).unwrap_or(0);
        let t0 = ticks_of(pid);
        std::thread::sleep(Duration::from_secs(3));
        let ticks = ticks_of(pid) - t0;
        let status = proc::status(proc::Pid::Other(pid as i32)).unwrap_or_default();
        let rss = status.vm_rss_kib.unwrap_or(0);
        let threads = status.threads.unwrap_or(0);
        let _ = child.stdin.take().map(|mut s| s.flush());
        let _ = child.kill();
        let _ = child.wait();
        (ticks, rss, threads)
    };
    let (_, rss_plain, _) = measure(false);
    let (ticks, rss_agent, threads) = measure(true);
    let hz = 100.0; // USER_HZ
    let cpu_pct = ticks as f64 / hz / 3.0 * 100.0;
    println!("| | value |\n|---|---:|");
    println!("| CPU of the idle agent over 3 s | {cpu_pct:.2} % ({ticks} ticks) |");
    println!("| RSS without the agent | {rss_plain} KiB |");
    println!(
        "| RSS with the agent | {rss_agent} KiB (+{} KiB, {threads} threads) |",
        rss_agent.saturating_sub(rss_plain)
    );
    json!({"cpu_percent": cpu_pct, "rss_plain_kib": rss_plain, "rss_agent_kib": rss_agent, "rss_delta_kib": rss_agent.saturating_sub(rss_plain)})
}

fn main() {
    let opts = options();
    let built = Built::ensure();
    println!(
        "# kgpatch-bench ({} cores, {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if opts.quick { "quick" } else { "full" }
    );
    let wanted = |name: &str| opts.only.as_deref().is_none_or(|o| o == name);
    let mut report = json!({});
    if wanted("migration") {
        report["migration"] = migration(&built, &opts);
    }
    if wanted("latency") {
        report["latency"] = latency(&built, &opts);
    }
    if wanted("idle") {
        report["idle"] = idle(&built);
    }
    if wanted("attach") {
        report["attach"] = attach::run(opts.quick, opts.threads.as_deref());
    }
    if wanted("cost") {
        report["cost"] = cost::run(&built, opts.quick, opts.threads.as_deref());
    }
    if wanted("mariadb") {
        report["mariadb"] = mariadb::run(&built, opts.quick);
    }
    if let Some(dir) = opts.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &opts.json,
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write the JSON report");
    println!("\nJSON: {}", opts.json.display());
}
