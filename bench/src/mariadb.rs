//! Section 5: MariaDB under its real benchmark (issue 13). One `mariadbd` (Debian's, on a
//! throw-away data directory) with the benchmark's agent preloaded, `sysbench
//! oltp_read_write` on 16 connections, and interleaved rounds of four modes, each round one
//! `sysbench run` of the same length:
//!
//! - **none**: no CLI calls;
//! - **control**: every [`PERIOD`], two `kgpatch status <pid>` — the same number of CLI
//!   processes, socket connections and agent-thread wake-ups per cycle as the kgpatch loop,
//!   patching nothing;
//! - **kgpatch**: every [`PERIOD`], `kgpatch apply` of the equivalent patch
//!   (`db/patches/mariadb_time.c` with `EQUIVALENT`: `my_hrtime` and `my_interval_timer`,
//!   both reached on every query, replaced by bodies computing the same) and `kgpatch
//!   revert` of it;
//! - **stop-the-world**: the same loop with `--stop-the-world` (the `bench-baseline` agent
//!   halts every thread at once and switches them together).
//!
//! One server serves every mode, so all four see the same warm buffer pool and the same
//! agent (the bench's build with the baseline compiled in: its kgpatch path is the production
//! one, the feature only adds the stop-the-world branch). Modes rotate from round to round,
//! so none always runs first. Per round: TPS, p95/p99 from sysbench's own latency histogram,
//! max, errors, reconnects, and every transition's time as the agent measured it; per mode the
//! median over rounds, and ratios against `none` and `control`. Before the rounds a warm-up
//! run carries the process's first (cold) apply and its revert: the "single applies".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kgpatch_db::{build_patch, describe, MariaDb, MariaDbOptions, Sysbench, SysbenchReport};
use kgpatch_examples::tools::Tools;
use kgpatch_protocol::{OutcomeKind, StatusOutput};
use serde_json::{json, Value};

use crate::agent::Built;
use crate::median;

/// sysbench connections.
const CONNECTIONS: u32 = 16;
/// sysbench tables and rows per table (fits the 128 MiB buffer pool: CPU-bound, where what
/// patching costs shows).
const TABLES: u32 = 8;
const TABLE_SIZE: u32 = 10_000;
/// One loop cycle (apply + revert, or two status calls) starts every PERIOD.
const PERIOD: Duration = Duration::from_millis(250);
/// The patch's name (`NAME` of the module).
const PATCH: &str = "mariadb-equivalent";
/// Target: kgpatch's p99 against the control's.
const TARGET_P99_VS_CONTROL: f64 = 1.03;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    None,
    Control,
    Kgpatch,
    StopTheWorld,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::None, Mode::Control, Mode::Kgpatch, Mode::StopTheWorld];

    fn key(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Control => "control",
            Mode::Kgpatch => "kgpatch",
            Mode::StopTheWorld => "stop_the_world",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::None => "none (no CLI calls)",
            Mode::Control => "control (2 × `status` per cycle)",
            Mode::Kgpatch => "kgpatch apply/revert loop",
            Mode::StopTheWorld => "stop-the-world apply/revert loop",
        }
    }
}

/// The `kgpatch` CLI pointed at the server's agent.
struct Cli<'a> {
    kgpatch: &'a Path,
    runtime_dir: &'a Path,
    pid: String,
    module: String,
}

/// How one CLI command ended.
struct CliRun {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    wall_ms: f64,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> CliRun {
        let t0 = Instant::now();
        let out = Command::new(self.kgpatch)
            .env("KGPATCH_RUNTIME_DIR", self.runtime_dir)
            .env_remove("KGPATCH_LOG")
            .args(args)
            .stdin(Stdio::null())
            .output();
        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        match out {
            Ok(out) => CliRun {
                ok: out.status.success(),
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                wall_ms,
            },
            Err(e) => CliRun {
                ok: false,
                code: None,
                stdout: String::new(),
                stderr: format!("cannot run {}: {e}", self.kgpatch.display()),
                wall_ms,
            },
        }
    }

    /// `kgpatch apply|revert ... --json`: the agent's transition time in ms if it completed,
    /// else why not (one line).
    fn transition(&self, apply: bool, stw: bool, stats: &mut LoopStats) -> Result<f64, String> {
        let mut args = if apply {
            vec!["apply", &self.pid, &self.module]
        } else {
            vec!["revert", &self.pid, PATCH]
        };
        args.extend(["--json", "--timeout", "20s"]);
        if stw {
            args.push("--stop-the-world");
        }
        let run = self.run(&args);
        stats.cli_calls += 1;
        stats.cli_wall_ms.push(run.wall_ms);
        let outcome = StatusOutput::parse(&run.stdout)
            .ok()
            .and_then(|s| s.outcome().cloned());
        match outcome {
            Some(o) if run.ok && o.result == OutcomeKind::Completed => Ok(o.elapsed_ms_f64()),
            Some(o) => Err(format!("{} exit {:?}: {}", args[0], run.code, o.message)),
            None => Err(format!(
                "{}: {}{}",
                args.join(" "),
                run.stdout.trim(),
                run.stderr.trim()
            )),
        }
    }

    /// One cycle of `mode`'s loop. `Err` only when the patch could not be taken out again
    /// (the bench then stops: it never leaves the server patched).
    fn cycle(&self, mode: Mode, stats: &mut LoopStats) -> Result<(), String> {
        match mode {
            Mode::None => {}
            Mode::Control => {
                for _ in 0..2 {
                    let run = self.run(&["status", &self.pid]);
                    stats.cli_calls += 1;
                    stats.cli_wall_ms.push(run.wall_ms);
                    if !run.ok {
                        stats
                            .failures
                            .push(format!("status: {}", run.stderr.trim()));
                    }
                }
                stats.cycles += 1;
            }
            Mode::Kgpatch | Mode::StopTheWorld => {
                let stw = mode == Mode::StopTheWorld;
                match self.transition(true, stw, stats) {
                    Ok(ms) => stats.apply_ms.push(ms),
                    Err(e) => {
                        // Not applied (refused or reversed): nothing to take out.
                        stats.failures.push(e);
                        return Ok(());
                    }
                }
                let mut tries = 0;
                loop {
                    match self.transition(false, stw, stats) {
                        Ok(ms) => {
                            stats.revert_ms.push(ms);
                            break;
                        }
                        Err(e) => {
                            stats.failures.push(e.clone());
                            tries += 1;
                            if tries == 5 {
                                return Err(format!("the patch could not be reverted: {e}"));
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
                stats.cycles += 1;
            }
        }
        Ok(())
    }
}

/// What one mode's loop did in one round.
#[derive(Default)]
struct LoopStats {
    cycles: u64,
    cli_calls: u64,
    cli_wall_ms: Vec<f64>,
    apply_ms: Vec<f64>,
    revert_ms: Vec<f64>,
    failures: Vec<String>,
}

/// A `sysbench run` in the background, killed if the bench unwinds before waiting for it.
struct Running(Option<Child>);

impl Running {
    fn finish(mut self) -> SysbenchReport {
        let child = self.0.take().expect("finished once");
        Sysbench::finish(child).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One round: a `sysbench run` of `secs`, with `mode`'s loop running beside it.
struct Round {
    mode: Mode,
    report: SysbenchReport,
    stats: LoopStats,
    /// mariadbd's CPU time (user + system, every thread, the agent's included) in the round.
    server_cpu_ms: f64,
    /// The agent thread's CPU time in the round.
    agent_cpu_ms: f64,
}

impl Round {
    /// The server's CPU per transaction, µs.
    fn cpu_per_txn_us(&self) -> f64 {
        self.server_cpu_ms * 1000.0 / self.report.transactions.max(1) as f64
    }
    fn p95(&self) -> f64 {
        self.report.percentile(95.0).unwrap_or(f64::NAN)
    }
    fn p99(&self) -> f64 {
        self.report.percentile(99.0).unwrap_or(f64::NAN)
    }
}

/// mariadbd's CPU time so far, ms (USER_HZ = 100).
fn server_cpu_ms(pid: u32) -> f64 {
    kgpatch_sys::proc::cpu_ticks(kgpatch_sys::proc::Pid::Other(pid as i32)).unwrap_or(0) as f64
        * 10.0
}

/// The CPU time so far of mariadbd's `kgpatch-agent` thread, ms (0 if not found).
fn agent_cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "kgpatch-agent")
        })
        .and_then(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .and_then(|stat| kgpatch_sys::proc::parse_stat_cpu_ticks(&stat))
        .map_or(0.0, |ticks| ticks as f64 * 10.0)
}

fn round(cli: &Cli, sb: &Sysbench, mode: Mode, secs: Duration) -> Round {
    let pid: u32 = cli.pid.parse().expect("a pid");
    let cpu0 = server_cpu_ms(pid);
    let agent0 = agent_cpu_ms(pid);
    let running = Running(Some(
        sb.start_histogram(CONNECTIONS, secs)
            .unwrap_or_else(|e| panic!("{e}")),
    ));
    let end = Instant::now() + secs;
    let mut stats = LoopStats::default();
    // The first cycle one period in (sysbench is connecting), then one every PERIOD; a cycle
    // that overruns its period delays the next, none is skipped to catch up.
    let mut next = Instant::now() + PERIOD;
    if mode != Mode::None {
        loop {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            if Instant::now() >= end {
                break;
            }
            if let Err(e) = cli.cycle(mode, &mut stats) {
                panic!("{} round: {e}", mode.key());
            }
            next = (next + PERIOD).max(Instant::now());
        }
    }
    let report = running.finish();
    Round {
        mode,
        report,
        stats,
        server_cpu_ms: server_cpu_ms(pid) - cpu0,
        agent_cpu_ms: agent_cpu_ms(pid) - agent0,
    }
}

/// Medians over rounds of one mode.
struct Summary {
    rounds: usize,
    tps: f64,
    p95: f64,
    p99: f64,
    max: f64,
    ignored: u64,
    reconnects: u64,
    cycles: u64,
    cli_calls: u64,
    cli_wall: f64,
    cpu_per_txn_us: f64,
    /// The agent thread's CPU per transition (median over rounds), ms.
    agent_cpu_per_transition_ms: f64,
    transitions: usize,
    transition_ms: f64,
    apply_ms: f64,
    revert_ms: f64,
    failures: Vec<String>,
}

fn summarize(rounds: &[&Round]) -> Summary {
    let med =
        |f: &dyn Fn(&Round) -> f64| median(&mut rounds.iter().map(|r| f(r)).collect::<Vec<_>>());
    let all = |f: &dyn Fn(&LoopStats) -> &Vec<f64>| {
        rounds
            .iter()
            .flat_map(|r| f(&r.stats).iter().copied())
            .collect::<Vec<f64>>()
    };
    let mut transitions = all(&|s| &s.apply_ms);
    transitions.extend(all(&|s| &s.revert_ms));
    Summary {
        rounds: rounds.len(),
        tps: med(&|r| r.report.tps),
        p95: med(&|r| r.p95()),
        p99: med(&|r| r.p99()),
        max: med(&|r| r.report.max_ms),
        ignored: rounds.iter().map(|r| r.report.ignored_errors).sum(),
        reconnects: rounds.iter().map(|r| r.report.reconnects).sum(),
        cycles: rounds.iter().map(|r| r.stats.cycles).sum(),
        cli_calls: rounds.iter().map(|r| r.stats.cli_calls).sum(),
        cli_wall: median(&mut all(&|s| &s.cli_wall_ms)),
        cpu_per_txn_us: med(&|r| r.cpu_per_txn_us()),
        agent_cpu_per_transition_ms: med(&|r| {
            let n = r.stats.apply_ms.len() + r.stats.revert_ms.len();
            if n == 0 {
                f64::NAN
            } else {
                r.agent_cpu_ms / n as f64
            }
        }),
        transitions: transitions.len(),
        transition_ms: median(&mut transitions),
        apply_ms: median(&mut all(&|s| &s.apply_ms)),
        revert_ms: median(&mut all(&|s| &s.revert_ms)),
        failures: rounds
            .iter()
            .flat_map(|r| r.stats.failures.iter().cloned())
            .collect(),
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b
}

fn x(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.3}×")
    }
}

/// Runs the section; its JSON (`{"skipped": why}` when MariaDB or sysbench is missing).
pub fn run(built: &Built, quick: bool) -> Value {
    let (rounds, secs, warm) = if quick {
        (1, Duration::from_secs(5), Duration::from_secs(3))
    } else {
        (5, Duration::from_secs(20), Duration::from_secs(10))
    };
    println!(
        "\n## 5. MariaDB under sysbench oltp_read_write ({CONNECTIONS} connections, {TABLES} × {TABLE_SIZE} rows; \
         {rounds} interleaved round(s) × 4 modes × {} s; a loop cycle every {} ms; medians over rounds)\n",
        secs.as_secs(),
        PERIOD.as_millis()
    );
    if let Err(e) = kgpatch_db::require() {
        println!("skipped: {e}");
        return json!({"skipped": e.to_string()});
    }
    let t0 = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "kgpatch-bench: mariadb {what} at {:.1} s",
            t0.elapsed().as_secs_f64()
        )
    };
    let tools = Tools::get().unwrap_or_else(|e| panic!("{e}"));
    phase("tools ready");
    let mut db = MariaDb::start(
        &MariaDbOptions::default()
            .env("LD_PRELOAD", &built.agent_so)
            .env("KGPATCH_RUNTIME_DIR", &built.runtime_dir),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    crate::agent::Agent::connect(built, db.pid()); // the agent listens
    phase("server up");

    let bin = Path::new(kgpatch_db::MARIADBD);
    let functions = ["my_hrtime", "my_interval_timer"]
        .map(|f| describe(tools.kgpatch(), bin, f).unwrap_or_else(|e| panic!("{e}")));
    let module: PathBuf = db.dir().join("mariadb-equivalent.so");
    build_patch(
        "mariadb_time.c",
        &module,
        &[format!("NAME=\"{PATCH}\""), "EQUIVALENT".into()],
        &functions,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    phase("patch built");
    let sb = Sysbench::prepare(&db, TABLES, TABLE_SIZE).unwrap_or_else(|e| panic!("{e}"));
    phase("tables loaded");
    let cli = Cli {
        kgpatch: tools.kgpatch(),
        runtime_dir: &built.runtime_dir,
        pid: db.pid().to_string(),
        module: module.to_str().expect("a UTF-8 temp path").to_owned(),
    };

    // Warm-up (buffer pool, sysbench's statements), carrying the single applies: the
    // process's first apply (cold: symbol resolution, unwind index) and its revert.
    let running = Running(Some(
        sb.start_histogram(CONNECTIONS, warm)
            .unwrap_or_else(|e| panic!("{e}")),
    ));
    std::thread::sleep(warm / 3);
    let mut single = LoopStats::default();
    let first_apply = cli.transition(true, false, &mut single);
    let first_revert = match &first_apply {
        Ok(_) => {
            std::thread::sleep(warm / 3);
            cli.transition(false, false, &mut single)
        }
        Err(e) => Err(format!("not reverted: the apply failed ({e})")),
    };
    let warm_report = running.finish();
    let first_apply = first_apply.unwrap_or_else(|e| panic!("the first apply: {e}"));
    let first_revert = first_revert.unwrap_or_else(|e| panic!("the first revert: {e}"));
    let single_apply_wall = single.cli_wall_ms[0];

    let mut done: Vec<Round> = Vec::new();
    for r in 0..rounds {
        for k in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(k + r) % Mode::ALL.len()];
            let one = round(&cli, &sb, mode, secs);
            eprintln!(
                "kgpatch-bench: mariadb round {} {:<14} {:>7.1} tps  p95 {:>6.2}  p99 {:>6.2}  max {:>7.2} ms  {} cycles  {} failures",
                r + 1,
                mode.key(),
                one.report.tps,
                one.p95(),
                one.p99(),
                one.report.max_ms,
                one.stats.cycles,
                one.stats.failures.len()
            );
            done.push(one);
        }
    }
    phase("rounds done");
    let agent_status = crate::agent::Agent::connect(built, db.pid()).status();
    let threads = kgpatch_sys::proc::status(kgpatch_sys::proc::Pid::Other(db.pid() as i32))
        .ok()
        .and_then(|s| s.threads)
        .unwrap_or(0);
    let bad_tables = sb.check_tables(&db).unwrap_or_else(|e| panic!("{e}"));
    let alive = db.alive();
    let shutdown = db.stop(Duration::from_secs(60));
    let clean_shutdown = matches!(&shutdown, Ok(s) if s.success());
    phase("server stopped");

    let of = |mode: Mode| done.iter().filter(|r| r.mode == mode).collect::<Vec<_>>();
    let sums: Vec<(Mode, Summary)> = Mode::ALL.iter().map(|&m| (m, summarize(&of(m)))).collect();
    let get = |m: Mode| &sums.iter().find(|(k, _)| *k == m).expect("every mode").1;
    let (none, control) = (get(Mode::None), get(Mode::Control));
    // Paired: in each round, the mode's p99 over the control's of the same round.
    let paired = |mode: Mode| {
        let (a, b) = (of(mode), of(Mode::Control));
        median(
            &mut a
                .iter()
                .zip(&b)
                .map(|(m, c)| m.p99() / c.p99())
                .collect::<Vec<_>>(),
        )
    };

    println!("| mode | TPS | p95 (ms) | p99 (ms) | max (ms) | server CPU per txn (µs) | errors | reconnects | deadlocks retried | cycles | CLI calls (median wall ms) | transitions | transition median (ms): all / apply / revert |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (mode, s) in &sums {
        println!(
            "| {} | {:.1} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} ({}) | {} | {} / {} / {} |",
            mode.label(),
            s.tps,
            ms(s.p95),
            ms(s.p99),
            ms(s.max),
            s.cpu_per_txn_us,
            s.failures.len(),
            s.reconnects,
            s.ignored,
            s.cycles,
            s.cli_calls,
            ms(s.cli_wall),
            s.transitions,
            ms(s.transition_ms),
            ms(s.apply_ms),
            ms(s.revert_ms)
        );
    }
    println!("\n| mode | TPS ×none | p95 ×none | p99 ×none | max ×none | TPS ×control | p95 ×control | p99 ×control | max ×control | p99 ×control, paired (median of per-round ratios) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mode, s) in &sums {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.key(),
            x(ratio(s.tps, none.tps)),
            x(ratio(s.p95, none.p95)),
            x(ratio(s.p99, none.p99)),
            x(ratio(s.max, none.max)),
            x(ratio(s.tps, control.tps)),
            x(ratio(s.p95, control.p95)),
            x(ratio(s.p99, control.p99)),
            x(ratio(s.max, control.max)),
            x(paired(*mode))
        );
    }
    let kg = ratio(get(Mode::Kgpatch).p99, control.p99);
    let stw = ratio(get(Mode::StopTheWorld).p99, control.p99);
    let met = kg <= TARGET_P99_VS_CONTROL;
    println!(
        "\nTarget kgpatch p99 ≤ {TARGET_P99_VS_CONTROL}× control: {} ({}; paired {}); stop-the-world {} (paired {}).",
        if met { "met" } else { "**missed**" },
        x(kg),
        x(paired(Mode::Kgpatch)),
        x(stw),
        x(paired(Mode::StopTheWorld))
    );
    println!(
        "Single applies (warm-up run, {} s): the first apply {} ms (CLI {} ms), its revert {} ms; warm-up {:.1} tps.",
        warm.as_secs(),
        ms(first_apply),
        ms(single_apply_wall),
        ms(first_revert),
        warm_report.tps
    );
    println!(
        "After the rounds: mariadbd {}, CHECK TABLE {}, SIGTERM shutdown {}.",
        if alive { "alive" } else { "DEAD" },
        if bad_tables.is_empty() {
            "clean".to_owned()
        } else {
            format!("FAILED on {bad_tables:?}")
        },
        match &shutdown {
            Ok(s) if s.success() => "clean".to_owned(),
            Ok(s) => format!("exit {s}"),
            Err(e) => e.to_string(),
        }
    );
    let (h, held) = (&agent_status.handler, &agent_status.halted);
    let kg_transitions = get(Mode::Kgpatch).transitions + 2; // + the single apply and revert
    println!(
        "mariadbd: {threads} threads at the end. kgpatch's migration handler: {} runs over {kg_transitions} transitions \
         ({:.1} per transition), p50 / p99 / max {:.1} / {:.1} / {:.1} µs; stop-the-world hold p50 / p99 / max {:.2} / {:.2} / {:.2} ms ({} rendezvous).",
        h.count,
        h.count as f64 / kg_transitions as f64,
        crate::us(h.p50_ns),
        crate::us(h.p99_ns),
        crate::us(h.max_ns),
        crate::us(held.p50_ns) / 1000.0,
        crate::us(held.p99_ns) / 1000.0,
        crate::us(held.max_ns) / 1000.0,
        held.count
    );
    // The server CPU a transition costs beyond the control's CLI calls: the extra CPU per
    // transaction, times the transactions of a round, over the transitions of a round.
    let extra_cpu = |mode: Mode| {
        let s = get(mode);
        let txns = median(
            &mut of(mode)
                .iter()
                .map(|r| r.report.transactions as f64)
                .collect::<Vec<_>>(),
        );
        (s.cpu_per_txn_us - control.cpu_per_txn_us) / 1000.0 * txns
            / (s.transitions as f64 / s.rounds as f64)
    };
    println!(
        "mariadbd CPU beyond the control, per transition (from CPU per transaction): kgpatch ≈ {} ms, stop-the-world ≈ {} ms; \
         of it the agent thread's (10 ms ticks, median over rounds): {} ms and {} ms.",
        ms(extra_cpu(Mode::Kgpatch)),
        ms(extra_cpu(Mode::StopTheWorld)),
        ms(get(Mode::Kgpatch).agent_cpu_per_transition_ms),
        ms(get(Mode::StopTheWorld).agent_cpu_per_transition_ms)
    );
    for (mode, s) in &sums {
        for f in s.failures.iter().take(5) {
            println!("  {} failure: {f}", mode.key());
        }
    }

    let mode_json = |mode: Mode, s: &Summary| {
        json!({
            "median": {
                "tps": s.tps, "p95_ms": s.p95, "p99_ms": s.p99, "max_ms": s.max,
            },
            "vs_none": {
                "tps": ratio(s.tps, none.tps), "p95": ratio(s.p95, none.p95),
                "p99": ratio(s.p99, none.p99), "max": ratio(s.max, none.max),
            },
            "vs_control": {
                "tps": ratio(s.tps, control.tps), "p95": ratio(s.p95, control.p95),
                "p99": ratio(s.p99, control.p99), "max": ratio(s.max, control.max),
                "p99_paired": paired(mode),
            },
            "errors": s.failures.len(),
            "failures": s.failures,
            "reconnects": s.reconnects,
            "ignored_errors": s.ignored,
            "cycles": s.cycles,
            "cli_calls": s.cli_calls,
            "cli_wall_median_ms": s.cli_wall,
            "server_cpu_per_txn_us": s.cpu_per_txn_us,
            "agent_cpu_per_transition_ms": s.agent_cpu_per_transition_ms,
            "transitions": s.transitions,
            "transition_median_ms": s.transition_ms,
            "apply_median_ms": s.apply_ms,
            "revert_median_ms": s.revert_ms,
            "rounds": of(mode).iter().map(|r| json!({
                "tps": r.report.tps, "transactions": r.report.transactions,
                "p95_ms": r.p95(), "p99_ms": r.p99(), "max_ms": r.report.max_ms,
                "sysbench_p99_ms": r.report.percentile_ms,
                "ignored_errors": r.report.ignored_errors, "reconnects": r.report.reconnects,
                "cycles": r.stats.cycles, "cli_calls": r.stats.cli_calls,
                "apply_ms": r.stats.apply_ms, "revert_ms": r.stats.revert_ms,
                "failures": r.stats.failures.len(),
                "server_cpu_ms": r.server_cpu_ms,
                "agent_cpu_ms": r.agent_cpu_ms,
            })).collect::<Vec<_>>(),
            "rounds_run": s.rounds,
        })
    };
    let mut modes = json!({});
    for (mode, s) in &sums {
        modes[mode.key()] = mode_json(*mode, s);
    }
    json!({
        "config": {
            "connections": CONNECTIONS, "tables": TABLES, "table_size": TABLE_SIZE,
            "rounds": rounds, "round_seconds": secs.as_secs(),
            "cycle_period_ms": PERIOD.as_millis() as u64,
            "control": "two `kgpatch status <pid>` per cycle",
            "patch": "db/patches/mariadb_time.c EQUIVALENT (my_hrtime, my_interval_timer)",
        },
        "modes": modes,
        "targets": {
            "kgpatch_p99_vs_control": kg,
            "kgpatch_p99_vs_control_paired": paired(Mode::Kgpatch),
            "kgpatch_p99_vs_control_target": TARGET_P99_VS_CONTROL,
            "met": met,
            "stop_the_world_p99_vs_control": stw,
            "stop_the_world_p99_vs_control_paired": paired(Mode::StopTheWorld),
        },
        "single_applies": {
            "first_apply_ms": first_apply,
            "first_apply_cli_wall_ms": single_apply_wall,
            "first_revert_ms": first_revert,
            "warmup_tps": warm_report.tps,
        },
        "agent": {
            "threads_at_end": threads,
            "migration_handler": crate::times_json(h),
            "migration_handler_runs_per_kgpatch_transition": h.count as f64 / kg_transitions as f64,
            "stop_the_world_hold": crate::times_json(held),
            "server_cpu_per_transition_beyond_control_ms": {
                "kgpatch": extra_cpu(Mode::Kgpatch),
                "stop_the_world": extra_cpu(Mode::StopTheWorld),
            },
        },
        "after": {
            "alive": alive,
            "check_table_failures": bad_tables,
            "clean_shutdown": clean_shutdown,
        },
    })
}
