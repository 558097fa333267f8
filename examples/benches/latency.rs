//! Closed-loop latency of the demo server: p50/p99/p99.9/max and throughput, median of
//! several runs, each configuration side by side in one run.
//!
//! ```text
//! cargo bench -p kgpatch-examples --bench latency
//! KGPATCH_AGENT_SO=/path/libkgpatch_agent.so cargo bench -p kgpatch-examples --bench latency
//! ```
//! Rows: each server variant as built (the baseline), and — when `KGPATCH_AGENT_SO` names
//! the agent's cdylib — the same variant with the agent preloaded and idle. Environment:
//! `KVBENCH_RUNS` (default 3), `KVBENCH_SECS` (default 2), `KVBENCH_CONNECTIONS` (default 4).

use std::time::Duration;

use kgpatch_examples::load::{self, LoadConfig, LoadReport};
use kgpatch_examples::{DemoServer, ServerOptions, Variant};

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = env_num("KVBENCH_RUNS", 3).max(1);
    let secs: f64 = env_num("KVBENCH_SECS", 2.0);
    let connections: usize = env_num("KVBENCH_CONNECTIONS", 4);
    let agent = std::env::var_os("KGPATCH_AGENT_SO");
    let mut configs: Vec<(String, ServerOptions)> = Vec::new();
    for v in Variant::ALL {
        configs.push((format!("{} baseline", v.name()), ServerOptions::new(v)));
        if let Some(so) = &agent {
            configs.push((
                format!("{} + agent (idle)", v.name()),
                ServerOptions::new(v).env("LD_PRELOAD", so),
            ));
        }
    }
    println!(
        "closed loop, {connections} connections, {secs} s per run, median of {runs} runs (latency in µs)"
    );
    println!(
        "{:<24} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "server", "req/s", "p50", "p99", "p99.9", "max", "failures"
    );
    for (label, opts) in configs {
        let mut reports: Vec<LoadReport> = Vec::new();
        for _ in 0..runs {
            let srv = match DemoServer::spawn(opts.clone()) {
                Ok(s) => s,
                Err(e) => {
                    println!("{label:<24} cannot start: {e}");
                    break;
                }
            };
            let mut cfg = LoadConfig::new(srv.addr());
            cfg.connections = connections;
            cfg.duration = Duration::from_secs_f64(secs);
            reports.push(load::run(cfg));
        }
        if reports.is_empty() {
            continue;
        }
        let pick = |f: fn(&LoadReport) -> u64| median(reports.iter().map(f).collect());
        println!(
            "{:<24} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9}",
            label,
            pick(|r| r.throughput() as u64),
            pick(|r| r.latency.p50_us),
            pick(|r| r.latency.p99_us),
            pick(|r| r.latency.p999_us),
            pick(|r| r.latency.max_us),
            reports.iter().map(|r| r.failures).sum::<u64>(),
        );
    }
}
