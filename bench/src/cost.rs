//! `--only cost`: what one transition costs the target, counter by counter (the `cost` of
//! each transition's outcome): the demo server with N workers, idle and under closed-loop
//! load, `fix-incr` applied and reverted `cycles` times; per row the median over the
//! transitions, the first apply apart from the later ones (the first pays for symbol
//! resolution and the unwind index).

use std::time::Duration;

use kgpatch_examples::load::LoadConfig;
use kgpatch_examples::{patch_path, DemoServer, Patch, ServerOptions, Variant};
use kgpatch_protocol::{Cost, OnTimeout, Outcome, Request};
use serde_json::{json, Value};

use crate::agent::{Agent, Built};
use crate::median;

fn transition(agent: &Agent, req: Request) -> Option<Outcome> {
    agent.transition(req)
}

/// One apply and one revert; their outcomes.
fn cycle(agent: &Agent, module: &std::path::Path) -> Vec<Outcome> {
    let apply = transition(
        agent,
        Request::Apply {
            module: module.to_owned(),
            timeout_ms: Some(10_000),
            on_timeout: OnTimeout::Reverse,
            stop_the_world: false,
        },
    );
    let revert = transition(
        agent,
        Request::Revert {
            patch: "fix-incr".into(),
            timeout_ms: Some(10_000),
            on_timeout: OnTimeout::Reverse,
            stop_the_world: false,
        },
    );
    apply.into_iter().chain(revert).collect()
}

type Field = (&'static str, fn(&Cost) -> f64);

const FIELDS: &[Field] = &[
    ("migration signals", |c| c.migration_signals as f64),
    ("spared", |c| c.skipped as f64),
    ("rounds", |c| c.rounds as f64),
    ("text-sweep signals", |c| c.text_sweep_signals as f64),
    ("SIGTRAPs", |c| c.sigtraps as f64),
    ("membarriers", |c| c.membarriers as f64),
    ("wake-ups", |c| c.wakeups as f64),
    ("threads interrupted", |c| c.threads_interrupted as f64),
    ("more than once", |c| {
        c.threads_interrupted_more_than_once as f64
    }),
    ("max interrupts / thread", |c| c.max_interrupts as f64),
    ("max handler µs / thread", |c| {
        c.max_thread_handler_ns as f64 / 1000.0
    }),
    ("agent CPU µs", |c| c.agent_cpu_us as f64),
];

fn row(label: &str, costs: &[Cost]) -> (String, Value) {
    let mut cells = Vec::new();
    let mut obj = json!({"rows": label, "transitions": costs.len()});
    for (name, f) in FIELDS {
        let mut v: Vec<f64> = costs.iter().map(f).collect();
        let m = median(&mut v);
        obj[*name] = json!(m);
        cells.push(if m.fract() == 0.0 {
            format!("{m:.0}")
        } else {
            format!("{m:.1}")
        });
    }
    (
        format!("| {label} | {} | {} |", costs.len(), cells.join(" | ")),
        obj,
    )
}

pub fn run(built: &Built, quick: bool, threads: Option<&[usize]>) -> Value {
    let cycles = if quick { 5 } else { 15 };
    let counts = threads.unwrap_or(&[8, 64]);
    let variant = Variant::NoFramePointers;
    let module = patch_path(Patch::FixIncr, variant);
    println!("\n## Cost per transition (demo server, `fix-incr` applied and reverted {cycles} times; median per transition)\n");
    let header: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
    println!(
        "| workers, load, transitions | n | {} |",
        header.join(" | ")
    );
    println!("|---|---:|{}", "---:|".repeat(FIELDS.len()));
    let mut out = Vec::new();
    for &n in counts {
        for loaded in [false, true] {
            let mut server_opts = ServerOptions::new(variant)
                .arg("--workers")
                .arg(n.to_string())
                .env("LD_PRELOAD", &built.agent_so)
                .env("KGPATCH_RUNTIME_DIR", &built.runtime_dir);
            // `KGPATCH_SKIP_RULE=off kgpatch-bench --only cost`: the numbers without the rule.
            if let Some(v) = std::env::var_os("KGPATCH_SKIP_RULE") {
                server_opts = server_opts.env("KGPATCH_SKIP_RULE", v);
            }
            let server = DemoServer::spawn(server_opts).expect("the demo server starts");
            let agent = Agent::connect(built, server.pid());
            let outcomes: Vec<Outcome> = std::thread::scope(|s| {
                // Long enough for every cycle (each is a few ms plus a 20 ms pause).
                let load = loaded.then(|| {
                    let mut cfg = LoadConfig::new(server.addr());
                    cfg.connections = 4;
                    cfg.duration = Duration::from_secs(3);
                    s.spawn(move || kgpatch_examples::load::run(cfg))
                });
                if load.is_some() {
                    std::thread::sleep(Duration::from_millis(300));
                }
                let mut all = Vec::new();
                for _ in 0..cycles {
                    all.extend(cycle(&agent, &module));
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Some(l) = load {
                    let _ = l.join();
                }
                all
            });
            let costs: Vec<(usize, Cost)> = outcomes
                .iter()
                .enumerate()
                .filter_map(|(i, o)| o.cost.map(|c| (i, c)))
                .collect();
            let first: Vec<Cost> = costs.iter().filter(|(i, _)| *i == 0).map(|c| c.1).collect();
            let applies: Vec<Cost> = costs
                .iter()
                .filter(|(i, _)| *i > 0 && i % 2 == 0)
                .map(|c| c.1)
                .collect();
            let reverts: Vec<Cost> = costs
                .iter()
                .filter(|(i, _)| i % 2 == 1)
                .map(|c| c.1)
                .collect();
            let load = if loaded { "load" } else { "idle" };
            let mut rows = Vec::new();
            for (what, set) in [
                ("first apply", &first),
                ("later applies", &applies),
                ("reverts", &reverts),
            ] {
                let (line, obj) = row(&format!("{n}, {load}, {what}"), set);
                println!("{line}");
                rows.push(obj);
            }
            out.push(json!({"workers": n, "loaded": loaded, "rows": rows}));
        }
    }
    Value::Array(out)
}
