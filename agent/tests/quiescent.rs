//! `kgpatch_agent::quiescent()` in a live process: the agent linked in as a crate
//! (`start()`), a worker that blocks the migration signal with the raw system call (so no
//! interposer can undo it) and so can only move at a quiescent point.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kgpatch_agent::protocol::{
    BlockerInfo, Client, OnTimeout, Origin, OutcomeKind, Request, Response,
};

/// The function the test patches: 3x + 7 (the patch makes it 1000 + x).
#[no_mangle]
#[inline(never)]
pub extern "C" fn kgq_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3).wrapping_add(7)
}

/// Waits until `cond` holds, polling every millisecond, for at most `deadline` (generous:
/// the machine may be loaded); panics with `what` if it never does.
fn wait_for(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "{what} (waited {deadline:?})");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn block_migration_signal_raw() {
    // SAFETY: an all-zero sigset_t is a valid (empty) set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset; the raw rt_sigprocmask bypasses any interposed wrapper.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kgpatch_agent::migration_signal());
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            &set as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            8usize,
        );
    }
}

fn build_module(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let d = kgpatch_kmod::describe_symbol(&exe, "kgq_target", None).unwrap();
    let d = d.first().expect("kgq_target in the test binary's symbols");
    let src = dir.join("q.c");
    std::fs::write(
        &src,
        format!(
            "#include \"kgpatch.h\"\n\
             KGPATCH_MODULE(\"quiescent-fix\", \"1\", \"\");\n\
             KGPATCH_TARGET_EXE();\n\
             unsigned long kgq_new(unsigned long x) {{ return 1000 + x; }}\n\
             KGPATCH_REPLACE(\"kgq_target\", kgq_new, {}, {:#x}ULL);\n",
            d.size,
            d.checksum.unwrap()
        ),
    )
    .unwrap();
    let out = dir.join("q.so");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/include");
    let ok = std::process::Command::new("gcc")
        .args(["-O2", "-shared", "-fPIC", "-I"])
        .arg(include)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap()
        .success();
    assert!(ok, "gcc failed");
    out
}

#[test]
fn a_thread_that_blocks_our_signal_moves_at_its_quiescent_point() {
    let dir = std::env::temp_dir().join(format!("kgq-{}", std::process::id()));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    std::env::set_var("KGPATCH_RUNTIME_DIR", &dir);
    let socket = kgpatch_agent::start().expect("the agent starts in this process");
    let agent = Client::at(&socket);
    let came_in = agent.status().expect("status").agent;
    assert_eq!(
        came_in.map(|a| a.origin),
        Some(Origin::Linked),
        "start() records a linked agent"
    );
    let module = build_module(&dir);

    let quiesce = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tid = Arc::new(AtomicU64::new(0));
    // Iterations of the worker's loop completed (each made one call of kgq_target).
    let rounds = Arc::new(AtomicU64::new(0));
    let worker = {
        let (quiesce, last, stop, tid, rounds) = (
            quiesce.clone(),
            last.clone(),
            stop.clone(),
            tid.clone(),
            rounds.clone(),
        );
        std::thread::spawn(move || {
            block_migration_signal_raw();
            // SAFETY: gettid has no arguments.
            tid.store(
                unsafe { libc::syscall(libc::SYS_gettid) } as u64,
                Ordering::SeqCst,
            );
            while !stop.load(Ordering::Relaxed) {
                last.store(kgq_target(1), Ordering::SeqCst);
                if quiesce.load(Ordering::Relaxed) {
                    kgpatch_agent::quiescent();
                }
                rounds.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // The worker publishes its tid before its first call: wait for the call, not the tid
    // alone.
    wait_for(
        Duration::from_secs(30),
        "the worker never ran a round",
        || rounds.load(Ordering::SeqCst) > 0,
    );
    let tid = tid.load(Ordering::SeqCst) as u32;
    assert_ne!(tid, 0);
    assert_eq!(last.load(Ordering::SeqCst), 10, "the old code runs");

    let t = match agent
        .call(&Request::Apply {
            module,
            timeout_ms: Some(20_000),
            on_timeout: OnTimeout::Reverse,
            stop_the_world: false,
        })
        .expect("the agent answers")
    {
        Response::Started { t, .. } => t,
        other => panic!("apply: {other:?}"),
    };
    // Without a quiescent point the worker cannot move: status says why.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = agent.status().expect("status");
        let tr = s.transition.expect("the transition waits for the worker");
        if let Some(th) = tr.pending.iter().find(|th| th.tid == tid) {
            if th.blocker == Some(BlockerInfo::SignalBlocked) {
                assert_eq!(tr.pending.len(), 1, "only the worker is left: {tr:?}");
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "status never named the blocked worker: {tr:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        last.load(Ordering::SeqCst),
        10,
        "the worker still runs the old code"
    );

    quiesce.store(true, Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        if let Some(o) = agent.status().expect("status").last.filter(|o| o.t == t) {
            break o;
        }
        assert!(
            Instant::now() < end,
            "the quiescent point did not complete the transition"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(outcome.result, OutcomeKind::Completed);
    // The worker moved at its quiescent point before completion; a round that starts after
    // this load calls kgq_target after it moved.
    let seen = rounds.load(Ordering::SeqCst);
    wait_for(
        Duration::from_secs(30),
        "the worker stopped running",
        || rounds.load(Ordering::SeqCst) >= seen + 2,
    );
    assert_eq!(
        last.load(Ordering::SeqCst),
        1001,
        "the worker runs the new code"
    );
    stop.store(true, Ordering::SeqCst);
    worker.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
