//! End to end: the sample patches applied to a live demo server with the agent preloaded,
//! through the `kgpatch` binary, while `kvload` checks every answer.
//!
//! Cycle counts are the (100 codec-v2 cycles per variant, 200 under churn); every
//! transition's time is collected and printed (`--nocapture` shows it).

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kgpatch_examples::load::{self, IncrSign, LoadConfig, LoadReport};
use kgpatch_examples::tools::{exit, KgpatchRun, PatchableServer};
use kgpatch_examples::{patch_path, server_path, Patch, ServerOptions, Variant};
use kgpatch_protocol::{BlockerInfo, Kind, OutcomeKind, Status, TransitionInfo};

// ---- helpers ------------------------------------------------------------------------------

fn spawn(opts: ServerOptions) -> PatchableServer {
    PatchableServer::spawn(opts).unwrap_or_else(|e| panic!("starting the server: {e}"))
}

#[track_caller]
fn must(run: KgpatchRun) -> KgpatchRun {
    assert!(run.ok(), "{run}");
    run
}

/// Load running in the background until [`Background::finish`].
struct Background {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    handle: JoinHandle<LoadReport>,
}

impl Background {
    fn start(srv: &PatchableServer, connections: usize, incr_sign: IncrSign) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let mut cfg = LoadConfig::new(srv.addr());
        cfg.connections = connections;
        cfg.duration = Duration::from_secs(600);
        cfg.negative_incr = incr_sign != IncrSign::Applied;
        cfg.incr_sign = incr_sign;
        cfg.phase = Some(Arc::clone(&phase));
        cfg.key_prefix = format!("bg{}", srv.pid());
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || load::run_until(cfg, &flag));
        // let every connection get going
        std::thread::sleep(Duration::from_millis(100));
        Background {
            stop,
            phase,
            handle,
        }
    }

    fn next_phase(&self) {
        self.phase.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the load thread panicked")
    }
}

/// `INCR <fresh key> -5` on a fresh connection: -5 with the fix, 5 with the planted bug.
fn incr_minus_five(srv: &PatchableServer) -> i64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let key = format!("probe{}", N.fetch_add(1, Ordering::Relaxed));
    let answer = srv.request(&format!("INCR {key} -5")).unwrap();
    answer
        .strip_prefix("INT ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("INCR answered {answer:?}"))
}

/// `INCR k -5` on `n` connections opened together: connections go to the workers round
/// robin, so `n` = workers probes every worker.
fn incr_minus_five_on_every_worker(srv: &PatchableServer, workers: usize) -> Vec<i64> {
    let mut clients: Vec<_> = (0..workers).map(|_| srv.connect().unwrap()).collect();
    clients
        .iter_mut()
        .enumerate()
        .map(|(i, c)| {
            let answer = c
                .request(&format!("INCR everyw{}x{i} -5", srv.pid()))
                .unwrap();
            let _ = c.request(&format!("DEL everyw{}x{i}", srv.pid()));
            answer.strip_prefix("INT ").unwrap().parse().unwrap()
        })
        .collect()
}

/// `kgpatch status --json`, read into the protocol's type.
fn status(srv: &PatchableServer) -> Status {
    let run = must(srv.status_json().unwrap());
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

fn patch_names(srv: &PatchableServer) -> Vec<String> {
    status(srv).patches.into_iter().map(|p| p.name).collect()
}

/// How the last transition ended.
fn last_result(srv: &PatchableServer) -> Option<OutcomeKind> {
    status(srv).last.map(|o| o.result)
}

/// Median, p90 and max of transition times in ms.
fn summary(mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return "no transitions".into();
    }
    ms.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    format!(
        "{} transitions: median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        ms.len(),
        at(0.5),
        at(0.9),
        ms[ms.len() - 1]
    )
}

/// Applies and reverts `patch` `cycles` times; returns each transition's reported time.
fn cycles(srv: &PatchableServer, patch: Patch, cycles: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(2 * cycles);
    for i in 0..cycles {
        let a = srv.apply(patch, &["--timeout", "10s"]).unwrap();
        assert!(a.ok(), "cycle {i}: {a}");
        times.push(a.transition_ms().unwrap_or_else(|| panic!("{a}")));
        let r = srv.revert(patch.name(), &["--timeout", "10s"]).unwrap();
        assert!(r.ok(), "cycle {i}: {r}");
        times.push(r.transition_ms().unwrap_or_else(|| panic!("{r}")));
    }
    times
}

// ---- fix-incr -------------------------------------------------------------------------------

#[test]
fn fix_incr_applies_and_reverts_under_load() {
    let workers = 4;
    let srv = spawn(ServerOptions::new(Variant::NoFramePointers).workers(workers as u32));
    assert_eq!(incr_minus_five(&srv), 5, "the planted bug");
    assert_eq!(srv.stats().unwrap().bug_probe(), Some(7));
    // negative INCRs in the load: each answer must be exactly one of the two semantics
    let bg = Background::start(&srv, 4, IncrSign::Either);
    std::thread::sleep(Duration::from_millis(300));

    bg.next_phase(); // 1: applying
    let apply = must(srv.apply(Patch::FixIncr, &["--timeout", "10s"]).unwrap());
    let outcome = apply.outcome().unwrap_or_else(|| panic!("{apply}"));
    assert_eq!(
        (outcome.kind, outcome.patch.as_str(), outcome.result),
        (Kind::Apply, "fix-incr", OutcomeKind::Completed),
        "{apply}"
    );
    bg.next_phase(); // 2: applied
    assert_eq!(incr_minus_five(&srv), -5, "the fix is visible to a client");
    assert_eq!(
        incr_minus_five_on_every_worker(&srv, workers),
        vec![-5; workers],
        "every worker runs the fix"
    );
    assert_eq!(srv.stats().unwrap().bug_probe(), Some(-7));
    assert_eq!(patch_names(&srv), ["fix-incr"]);
    // a strict load: only the fixed semantics pass
    let mut strict = LoadConfig::new(srv.addr());
    strict.connections = workers;
    strict.duration = Duration::from_millis(300);
    strict.negative_incr = true;
    strict.incr_sign = IncrSign::Applied;
    let strict = load::run(strict);
    assert_eq!(strict.failures, 0, "fixed semantics everywhere: {strict}");

    bg.next_phase(); // 3: reverting
    let revert = must(srv.revert("fix-incr", &["--timeout", "10s"]).unwrap());
    let outcome = revert.outcome().unwrap_or_else(|| panic!("{revert}"));
    assert_eq!(
        (outcome.kind, outcome.patch.as_str(), outcome.result),
        (Kind::Revert, "fix-incr", OutcomeKind::Completed),
        "{revert}"
    );
    bg.next_phase(); // 4: reverted
    assert_eq!(incr_minus_five(&srv), 5, "the bug is back after revert");
    assert_eq!(
        incr_minus_five_on_every_worker(&srv, workers),
        vec![5; workers]
    );
    assert!(patch_names(&srv).is_empty());
    std::thread::sleep(Duration::from_millis(200));

    let report = bg.finish();
    println!(
        "fix-incr: apply {:?} ms, revert {:?} ms\n{report}",
        apply.transition_ms(),
        revert.transition_ms()
    );
    assert_eq!(report.failures, 0, "{report}");
    assert_eq!(report.phases.len(), 5, "{report}");
    assert!(report.phases.iter().all(|p| p.requests > 0), "{report}");
    assert_eq!(srv.stats().unwrap().violations(), 0);
}

// ---- codec-v2: the consistency rule -------------------------------------------------------

/// `kv_transcode`'s pause between encode and decode in the codec-v2 test: a migration
/// signal lands inside it most of the time (the workers spend most of each request there).
const PAUSE_US: u32 = 50;

fn codec_v2_cycles(variant: Variant) {
    let srv = spawn(
        ServerOptions::new(variant)
            .workers(4)
            .transcode_pause_us(PAUSE_US),
    );
    let bg = Background::start(&srv, 4, IncrSign::Applied);
    let before = srv.stats().unwrap();
    assert_eq!(before.get("codec"), Some("1"));
    // phase 0: no patching, for the latency baseline of the same run
    std::thread::sleep(Duration::from_millis(500));
    bg.next_phase();
    // one cycle by hand: the new format is live in between
    must(srv.apply(Patch::CodecV2, &[]).unwrap());
    assert_eq!(srv.stats().unwrap().get("codec"), Some("2"));
    must(srv.revert("codec-v2", &[]).unwrap());
    assert_eq!(srv.stats().unwrap().get("codec"), Some("1"));
    let t0 = Instant::now();
    let times = cycles(&srv, Patch::CodecV2, 100);
    let wall = t0.elapsed();
    let report = bg.finish();
    assert_eq!(report.phases.len(), 2, "{report}");
    let stats = srv.stats().unwrap();
    println!(
        "codec-v2 x100 on {} (pause {PAUSE_US} µs): {} in {wall:?}\n{report}\n\
         (phase 0: no patching; phase 1: apply/revert cycles) violations={}",
        variant.name(),
        summary(times),
        stats.violations()
    );
    assert_eq!(stats.violations(), 0, "{stats:?}");
    assert_eq!(report.failures, 0, "{report}");
    assert!(report.requests > 1000, "{report}");
    assert_eq!(stats.get("codec"), Some("1"));
    assert!(patch_names(&srv).is_empty());
}

#[test]
fn codec_v2_100_cycles_under_load_fp() {
    codec_v2_cycles(Variant::FramePointers);
}

#[test]
fn codec_v2_100_cycles_under_load_nofp() {
    codec_v2_cycles(Variant::NoFramePointers);
}

/// The negative control: without the common caller, a thread may switch universe between
/// `kv_encode` and `kv_decode` (inside `kv_transcode`'s pause) and fail the round trip. This
/// shows that the codec-v2 test above can fail, and why the patch replaces `kv_transcode`.
#[test]
fn codec_pair_only_breaks_the_invariant() {
    let srv = spawn(
        ServerOptions::new(Variant::NoFramePointers)
            .workers(4)
            .transcode_pause_us(200),
    );
    let bg = Background::start(&srv, 4, IncrSign::Applied);
    let mut tripped_after = None;
    for i in 0..30 {
        must(srv.apply(Patch::CodecPairOnly, &[]).unwrap());
        must(srv.revert("codec-pair-only", &[]).unwrap());
        if srv.stats().unwrap().violations() > 0 {
            tripped_after = Some(i + 1);
            break;
        }
    }
    let report = bg.finish();
    let stats = srv.stats().unwrap();
    println!(
        "codec-pair-only: violations={} after {tripped_after:?} cycles; load: {} failed of {}",
        stats.violations(),
        report.failures,
        report.requests
    );
    assert!(
        tripped_after.is_some(),
        "30 apply/revert cycles of the pair-only patch never mixed versions: {stats:?}"
    );
    // the load saw the server's refusals
    assert!(report.failures > 0, "{report}");
    assert!(report
        .failure_samples
        .iter()
        .any(|s| s.contains("ERR invariant")));
}

// ---- stacking -----------------------------------------------------------------------------------

/// Patches stack, also on the same functions: `codec-pair-only` on top of `codec-v2`
/// replaces `kv_encode`/`kv_decode` a second time. With codec-v2's `kv_transcode` beneath
/// (it calls its own codec directly) the pair on top cannot split a round trip, so even this
/// stack never trips the invariant. Reverts come out top first; a server with patches still
/// applied shuts down cleanly.
#[test]
fn stacked_patches_come_out_in_order() {
    let mut srv = spawn(
        ServerOptions::new(Variant::FramePointers)
            .workers(4)
            .transcode_pause_us(PAUSE_US),
    );
    let bg = Background::start(&srv, 4, IncrSign::Either);
    must(srv.apply(Patch::FixIncr, &[]).unwrap());
    for i in 0..10 {
        must(srv.apply(Patch::CodecV2, &[]).unwrap());
        must(srv.apply(Patch::CodecPairOnly, &[]).unwrap());
        assert_eq!(
            patch_names(&srv),
            ["fix-incr", "codec-v2", "codec-pair-only"],
            "cycle {i}"
        );
        assert_eq!(srv.stats().unwrap().get("codec"), Some("2"));
        let out_of_order = srv.revert("codec-v2", &[]).unwrap();
        assert_eq!(
            out_of_order.code,
            Some(exit::NO_SUCH_PATCH),
            "{out_of_order}"
        );
        assert_eq!(
            out_of_order.json().unwrap().error().unwrap().kind,
            "no_such_patch"
        );
        assert!(out_of_order.stderr.contains("not on top"), "{out_of_order}");
        must(srv.revert("codec-pair-only", &[]).unwrap());
        assert_eq!(
            srv.stats().unwrap().get("codec"),
            Some("2"),
            "codec-v2 still live"
        );
        must(srv.revert("codec-v2", &[]).unwrap());
        assert_eq!(srv.stats().unwrap().get("codec"), Some("1"));
    }
    assert_eq!(patch_names(&srv), ["fix-incr"]);
    assert_eq!(incr_minus_five(&srv), -5);
    let report = bg.finish();
    assert_eq!(report.failures, 0, "{report}");
    assert_eq!(srv.stats().unwrap().violations(), 0);
    // fix-incr and codec-v2 stay applied through a clean shutdown
    must(srv.apply(Patch::CodecV2, &[]).unwrap());
    let status = srv.shutdown().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        srv.output().iter().any(|l| l.starts_with("STOPPED")),
        "{:?}",
        srv.output()
    );
}

// ---- a thread parked in an old function -----------------------------------------------------

/// A pending thread that a frame of a replaced function blocks, from `kgpatch status
/// --json`: (tid, thread name, blocking function, the transition object).
struct Parked {
    tid: u64,
    name: String,
    function: String,
    transition: TransitionInfo,
}

fn parked_blocker(srv: &PatchableServer) -> Option<Parked> {
    let tr = status(srv).transition?;
    tr.pending.iter().find_map(|th| match &th.blocker {
        Some(BlockerInfo::Busy { function, .. }) => Some(Parked {
            tid: u64::from(th.tid),
            name: th.name.clone(),
            function: function.clone(),
            transition: tr.clone(),
        }),
        _ => None,
    })
}

/// Waits until a busy thread is pending and, with `sole`, is the only pending one (the
/// others may take a sweep or two to move on a loaded machine).
fn wait_for_parked(srv: &PatchableServer, within: Duration, sole: bool) -> Parked {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = parked_blocker(srv) {
            let pending = found.transition.pending.len();
            if !sole || pending == 1 {
                return found;
            }
        }
        assert!(
            Instant::now() < deadline,
            "status never showed a thread blocked by a busy frame (sole={sole}): {:?}",
            status(srv)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn parked_thread_blocks_until_deadline_then_force_completes() {
    let srv = spawn(ServerOptions::new(Variant::NoFramePointers).workers(2));
    let worker0 = srv
        .threads()
        .unwrap()
        .into_iter()
        .find(|(_, n)| n == "kv-worker-0")
        .expect("kv-worker-0")
        .0 as u64;
    // the first connection goes to kv-worker-0, which sleeps inside kv_slow_path
    let mut parked = srv.connect().unwrap();
    parked.send("SLOW 6000").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let pid = srv.pid().to_string();
    let module = patch_path(Patch::SlowPath, Variant::NoFramePointers);
    let module = module.to_str().unwrap();

    // 1. the deadline reverses the transition
    let args = ["apply", &pid, module, "--timeout", "1s"];
    let t0 = Instant::now();
    let child = srv.spawn_kgpatch(&args).unwrap();
    let first = wait_for_parked(&srv, Duration::from_secs(5), true);
    let tr = &first.transition;
    assert_eq!(
        (first.tid, first.name.as_str()),
        (worker0, "kv-worker-0"),
        "{tr:?}"
    );
    assert_eq!(tr.patch, "slow-path");
    assert_eq!(tr.kind, Kind::Apply);
    // the other worker serves meanwhile
    assert_eq!(srv.request("PING").unwrap(), "PONG");
    let run = srv.wait(child, &args).unwrap();
    assert_eq!(run.code, Some(exit::INCOMPLETE), "{run}");
    assert!(run.stdout.contains("reversed"), "{run}");
    assert!(t0.elapsed() >= Duration::from_secs(1), "{run}");
    assert!(patch_names(&srv).is_empty());
    assert_eq!(last_result(&srv), Some(OutcomeKind::Reversed));

    // 2. --keep-pending leaves it pending past the deadline; force completes it
    let args = [
        "apply",
        &pid,
        module,
        "--timeout",
        "300ms",
        "--keep-pending",
    ];
    let child = srv.spawn_kgpatch(&args).unwrap();
    assert_eq!(
        wait_for_parked(&srv, Duration::from_secs(5), false).tid,
        worker0
    );
    std::thread::sleep(Duration::from_millis(500));
    let second = parked_blocker(&srv).expect("still pending after the deadline");
    let tr = &second.transition;
    assert_eq!(second.tid, worker0, "{tr:?}");
    assert_eq!(tr.remaining_ms, 0, "{tr:?}");
    assert!(!tr.reversed, "{tr:?}");
    assert!(tr.left_pending, "{tr:?}");
    // the waiting apply returns at its deadline, saying the transition is left pending
    let run = srv.wait(child, &args).unwrap();
    assert_eq!(run.code, Some(exit::INCOMPLETE), "{run}");
    assert!(run.stderr.contains("left pending"), "{run}");
    let force = must(srv.kgpatch(&["force", &pid]).unwrap());
    assert!(force.stderr.contains("WARNING"), "{force}");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while patch_names(&srv).is_empty() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(last_result(&srv), Some(OutcomeKind::Completed));
    assert_eq!(patch_names(&srv), ["slow-path"]);

    // the parked request finishes normally in the old body; new calls run the new one
    let slept: u64 = parked
        .read_line()
        .unwrap()
        .strip_prefix("SLEPT ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(slept >= 6000, "{slept}");
    let answer = srv.request("SLOW 20").unwrap();
    let slept: u64 = answer.strip_prefix("SLEPT ").unwrap().parse().unwrap();
    assert!(
        (20..1000).contains(&slept),
        "the new kv_slow_path sleeps: {answer}"
    );
    must(srv.revert("slow-path", &[]).unwrap());
    assert_eq!(srv.request("PING").unwrap(), "PONG");
    assert_eq!(srv.stats().unwrap().violations(), 0);
    // checked last, so that a wrong name does not hide the behaviour above: the JSON
    // carries the bare symbol.
    for p in [&first, &second] {
        assert!(
            p.function == "kv_slow_path",
            "status names the function that blocks the thread: {:?}",
            p.transition
        );
    }
}

// ---- threads that block signals ---------------------------------------------------------------

#[test]
fn workers_blocking_every_signal_still_migrate() {
    let workers = 2;
    let srv = spawn(
        ServerOptions::new(Variant::NoFramePointers)
            .workers(workers as u32)
            .block_signals_in_workers(),
    );
    let bit = |sig: i32| 1u64 << (sig - 1);
    let migration = libc::SIGRTMAX() - 7;
    let mut seen = 0;
    for (tid, name) in srv.threads().unwrap() {
        if !name.starts_with("kv-worker-") {
            continue;
        }
        seen += 1;
        let blocked = srv.blocked_signals(tid).unwrap();
        println!("{name}: SigBlk {blocked:016x}");
        assert_eq!(
            blocked & bit(migration),
            0,
            "{name}: the migration signal SIGRTMAX-7 stays deliverable ({blocked:#x})"
        );
        // Everything else the worker asked for is blocked: all signals but the migration
        // signal, the redirect sweep's SIGRTMAX-8 and SIGTRAP (kgpatch's), SIGKILL and
        // SIGSTOP (unblockable) and glibc's internal 32 and 33 (never blocked by glibc).
        let deliverable = [
            migration,
            libc::SIGRTMAX() - 8,
            libc::SIGTRAP,
            libc::SIGKILL,
            libc::SIGSTOP,
            32,
            33,
        ];
        let expected = deliverable.iter().fold(u64::MAX, |m, &s| m & !bit(s));
        assert_eq!(blocked, expected, "{name}: {blocked:#x} vs {expected:#x}");
    }
    assert_eq!(seen, workers);
    let bg = Background::start(&srv, 4, IncrSign::Either);
    let apply = must(srv.apply(Patch::FixIncr, &["--timeout", "10s"]).unwrap());
    assert_eq!(
        incr_minus_five_on_every_worker(&srv, workers),
        vec![-5; workers]
    );
    let revert = must(srv.revert("fix-incr", &["--timeout", "10s"]).unwrap());
    assert_eq!(
        incr_minus_five_on_every_worker(&srv, workers),
        vec![5; workers]
    );
    let report = bg.finish();
    println!(
        "blocked signals: apply {:?} ms, revert {:?} ms; {report}",
        apply.transition_ms(),
        revert.transition_ms()
    );
    assert_eq!(report.failures, 0, "{report}");
}

// ---- churn ------------------------------------------------------------------------------------

#[test]
fn churn_and_200_cycles() {
    let mut srv = spawn(ServerOptions::new(Variant::NoFramePointers).churn(15));
    let bg = Background::start(&srv, 2, IncrSign::Applied);
    let before = srv.stats().unwrap();
    let t0 = Instant::now();
    let times = cycles(&srv, Patch::CodecV2, 200);
    let wall = t0.elapsed();
    let report = bg.finish();
    let after = srv.stats().unwrap();
    println!(
        "churn 15, codec-v2 x200: {} in {wall:?}; churn rounds {} dlopens {} ephemeral threads {}\n{report}",
        summary(times),
        after.counter("churn_rounds") - before.counter("churn_rounds"),
        after.counter("dlopens") - before.counter("dlopens"),
        after.counter("ephemeral_threads") - before.counter("ephemeral_threads"),
    );
    assert_eq!(report.failures, 0, "{report}");
    assert_eq!(after.violations(), 0, "{after:?}");
    for key in ["churn_rounds", "dlopens", "ephemeral_threads"] {
        assert!(after.counter(key) > before.counter(key), "{key}: {after:?}");
    }
    assert_eq!(srv.request("PING").unwrap(), "PONG");
    assert!(patch_names(&srv).is_empty());
    assert!(srv.is_running());
    let status = srv.shutdown().unwrap();
    assert!(
        status.success(),
        "clean shutdown after the cycles: {status}"
    );
}

// ---- refused modules ----------------------------------------------------------------------

/// The runtime address of `symbol` (in `file`, for a static) in process `pid`.
fn runtime_address(pid: u32, variant: Variant, symbol: &str, file: Option<&str>) -> (u64, u64) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let base = maps
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[2] == "00000000" && std::path::Path::new(f[5]) == exe)
                .then(|| u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap())
        })
        .expect("the executable's first mapping");
    let d = kgpatch_kmod::describe_symbol(server_path(variant), symbol, file)
        .unwrap()
        .remove(0);
    (base + d.address, d.size)
}

fn code_bytes(pid: u32, (address, size): (u64, u64)) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0; size as usize];
    mem.read_exact_at(&mut buf, address).unwrap();
    buf
}

#[test]
fn wrong_target_modules_are_refused() {
    for variant in Variant::ALL {
        let srv = spawn(ServerOptions::new(variant));
        let pid = srv.pid();
        let functions = [
            runtime_address(pid, variant, "kv_parse_amount", Some("proto.c")),
            runtime_address(pid, variant, "kv_encode", None),
        ];
        let before: Vec<Vec<u8>> = functions.iter().map(|&f| code_bytes(pid, f)).collect();
        let threads = srv.threads().unwrap().len();

        let run = srv.apply(Patch::WrongTarget, &[]).unwrap();
        assert_eq!(
            run.code,
            Some(exit::BAD_MODULE),
            "{}: {run}",
            variant.name()
        );
        assert!(run.stderr.contains("build-id"), "{run}");
        let run = srv.apply(Patch::MissingLibrary, &[]).unwrap();
        assert_eq!(
            run.code,
            Some(exit::BAD_MODULE),
            "{}: {run}",
            variant.name()
        );
        assert!(run.stderr.contains("libkvmissing.so.1"), "{run}");
        println!("{}: {}", variant.name(), run.stderr.trim_end());

        let after: Vec<Vec<u8>> = functions.iter().map(|&f| code_bytes(pid, f)).collect();
        assert_eq!(before, after, "code bytes unchanged");
        assert_eq!(srv.request("PING").unwrap(), "PONG");
        assert_eq!(incr_minus_five(&srv), 5, "still the original code");
        assert!(patch_names(&srv).is_empty());
        assert!(status(&srv).transition.is_none());
        assert_eq!(srv.threads().unwrap().len(), threads);
        // and the right module still applies afterwards
        must(srv.apply(Patch::FixIncr, &[]).unwrap());
        assert_ne!(
            code_bytes(pid, functions[0]),
            before[0],
            "the site is written"
        );
        must(srv.revert("fix-incr", &[]).unwrap());
    }
}

// ---- EINTR ------------------------------------------------------------------------------------

#[test]
fn server_carries_on_through_migration_signals() {
    // no --install-noop-handler: the only handlers are the agent's
    let srv = spawn(ServerOptions::new(Variant::NoFramePointers));
    let before = srv.stats().unwrap();
    let bg = Background::start(&srv, 4, IncrSign::Either);
    let times = cycles(&srv, Patch::FixIncr, 20);
    let report = bg.finish();
    let after = srv.stats().unwrap();
    let eintr: Vec<(String, u64)> = after
        .fields()
        .iter()
        .filter(|(k, _)| k.starts_with("eintr_"))
        .map(|(k, _)| (k.clone(), after.counter(k) - before.counter(k)))
        .collect();
    println!(
        "EINTR during 40 transitions ({}): {eintr:?}\n{report}",
        summary(times)
    );
    assert_eq!(report.failures, 0, "{report}");
    assert_eq!(after.violations(), 0);
    let total: u64 = eintr.iter().map(|(_, n)| n).sum();
    assert!(
        total > 0,
        "the migration signal interrupted no blocking call: {eintr:?}"
    );
    // read/write/accept are non-blocking here and the cond wait restarts: only the sleeping
    // calls see EINTR
    for k in [
        "eintr_read",
        "eintr_write",
        "eintr_accept",
        "eintr_cond_timedwait",
    ] {
        assert_eq!(after.counter(k), before.counter(k), "{k}");
    }
    assert_eq!(srv.request("PING").unwrap(), "PONG");
}

#[test]
fn sample_modules_carry_their_names_and_targets() {
    for p in Patch::ALL {
        for v in Variant::ALL {
            let path = patch_path(p, v);
            let m = kgpatch_kmod::inspect(&path).unwrap();
            assert_eq!(m.name, p.name(), "{}", path.display());
            if p == Patch::MissingLibrary {
                continue;
            }
            // wrong-target carries the other binary's build-id, every other one its own
            let built_for = match (p, v) {
                (Patch::WrongTarget, Variant::FramePointers) => Variant::NoFramePointers,
                (Patch::WrongTarget, Variant::NoFramePointers) => Variant::FramePointers,
                _ => v,
            };
            let id = kgpatch_kmod::file_build_id(server_path(built_for)).unwrap();
            assert_eq!(m.target.build_id, id, "{}", path.display());
        }
    }
    let codec = kgpatch_kmod::inspect(patch_path(Patch::CodecV2, Variant::FramePointers)).unwrap();
    let mut replaced: Vec<&str> = codec
        .functions
        .iter()
        .map(|f| f.old.name.as_str())
        .collect();
    replaced.sort_unstable();
    assert_eq!(replaced, ["kv_decode", "kv_encode", "kv_transcode"]);
}

// ---- attach -------------------------------------------------------------------------------

/// Issue 12: the demo server started WITHOUT the agent, under the checked load: `kgpatch
/// attach`, then 100 fix-incr apply/revert cycles; no request fails. The attach report
/// gives the borrowed thread's pause; the load's phase 1 (only the attach) shows the
/// server's workers answering requests while it ran.
#[test]
fn attach_to_a_server_started_without_the_agent_then_100_cycles_under_load() {
    let workers = 4;
    let srv = PatchableServer::spawn_without_agent(
        ServerOptions::new(Variant::NoFramePointers).workers(workers as u32),
    )
    .unwrap_or_else(|e| panic!("starting the server: {e}"));
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", srv.pid())).unwrap();
    assert!(
        !maps.contains("libkgpatch_agent.so"),
        "the agent is already there"
    );
    let bg = Background::start(&srv, 4, IncrSign::Either);
    std::thread::sleep(Duration::from_millis(300));

    bg.next_phase(); // 1: attaching
    let attach = must(srv.attach().unwrap());
    bg.next_phase(); // 2: patching
    let report: serde_json::Value = serde_json::from_str(&attach.stdout).unwrap();
    assert_eq!(report["already"], false, "{attach}");
    let pause_us = report["pause_us"].as_u64().unwrap();
    let total_us = report["total_us"].as_u64().unwrap();
    let agent = status(&srv).agent.map(|a| a.origin);
    assert_eq!(agent, Some(kgpatch_protocol::Origin::Attach));

    let times = cycles(&srv, Patch::FixIncr, 100);
    assert_eq!(
        incr_minus_five(&srv),
        5,
        "the bug is back after the last revert"
    );
    let again = must(srv.attach().unwrap());
    assert!(again.stdout.contains("\"already\": true"), "{again}");
    let load = bg.finish();
    println!(
        "attach: borrowed thread paused {pause_us} µs, attach took {total_us} µs; \
         fix-incr x100 after attach: {}\n{load}\n(phase 0: before; 1: during attach; 2: cycles)",
        summary(times)
    );
    assert_eq!(load.failures, 0, "{load}");
    assert_eq!(load.phases.len(), 3, "{load}");
    assert!(
        load.phases[1].requests > 0,
        "no request was answered while the attach ran: {load}"
    );
    assert!(patch_names(&srv).is_empty());
}
