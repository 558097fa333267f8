//! The thread sweep on its own, and the TLS slot.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kgpatch_redirect::{tls, Sweep};
use kgpatch_sys::thread::gettid;

use crate::common::patcher;

#[test]
fn every_thread_runs_the_action_and_blocked_ones_are_reported() {
    // The sweep signals every thread of the process, and concludes that a thread blocks the
    // signal only while no thread runs kgpatch's SIGTRAP handler: other tests' threads (and
    // their traps) in the same process would make the answer theirs.
    if std::env::var_os("KGPATCH_SWEEP_CHILD").is_none() {
        return crate::common::in_child(
            "sweep::every_thread_runs_the_action_and_blocked_ones_are_reported",
            "KGPATCH_SWEEP_CHILD",
            "1",
        );
    }
    let sweep: Sweep = *patcher().sweep();
    assert!(sweep.intact() && patcher().handlers_intact());
    for bad in [0, libc::SIGKILL, 65] {
        assert!(matches!(
            Sweep::new(bad),
            Err(kgpatch_redirect::Error::BadSignal { .. })
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for blocks in [false, false, true] {
        let stop = stop.clone();
        let tx = tx.clone();
        let signal = sweep.signal();
        threads.push(std::thread::spawn(move || {
            if blocks {
                // SAFETY: building and installing a signal mask for this thread only.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, signal);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
            }
            tx.send((gettid(), blocks)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    let ids: Vec<(i32, bool)> = (0..3).map(|_| rx.recv().unwrap()).collect();
    let ran = AtomicUsize::new(0);
    let action = |uc: &mut libc::ucontext_t| {
        // Touch the context as a real action would.
        let _pc = uc.uc_mcontext.gregs[libc::REG_RIP as usize];
        ran.fetch_add(1, Ordering::Relaxed);
    };
    let report = sweep.run(&action, Duration::from_secs(2)).unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    for (tid, blocks) in ids {
        if blocks {
            assert!(report.blocked.contains(&tid), "{report:?}");
        } else {
            assert!(report.done.contains(&tid), "{report:?}");
        }
    }
    assert!(!report.done.contains(&gettid()), "the caller is not swept");
    assert!(ran.load(Ordering::Relaxed) >= 2);
    assert!(!report.complete());
}

#[test]
fn tls_slot_is_at_one_offset_in_every_thread() {
    let here = tls::offset_in_this_thread();
    assert_eq!(i64::from(patcher().tls_offset()), here);
    let there = std::thread::spawn(tls::offset_in_this_thread)
        .join()
        .unwrap();
    assert_eq!(here, there);
    // The word the stub reads is the ThreadState's word.
    tls::set_current_word_for_testing(42);
    assert_eq!(tls::current().word(), 42);
    tls::set_current_word_for_testing(0);
    assert_eq!(tls::current().word(), 0);
}

#[test]
fn threads_exiting_during_sweeps_are_fine() {
    let sweep: Sweep = *patcher().sweep();
    let stop = Arc::new(AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::thread::spawn(|| std::hint::black_box(1 + 1))
                    .join()
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let action = |_: &mut libc::ucontext_t| {};
    let mut exited = 0;
    for _ in 0..30 {
        let report = sweep.run(&action, Duration::from_secs(10)).unwrap();
        assert!(report.timed_out.is_empty(), "{report:?}");
        exited += report.exited.len();
    }
    stop.store(true, Ordering::Relaxed);
    let spawned = spawner.join().unwrap();
    assert!(spawned > 0);
    eprintln!("{spawned} short-lived threads, {exited} seen exiting during 30 sweeps");
}

/// A thread that blocks the sweep signal while running (so its pc cannot be known) makes the
/// install fail with `ThreadsUnreachable`, and the function is left exactly as it was. In a
/// child process, to use a short deadline.
#[test]
fn an_unreachable_thread_rolls_the_install_back() {
    if std::env::var_os("KGPATCH_UNREACHABLE_CHILD").is_some() {
        let p = kgpatch_redirect::Patcher::new(kgpatch_redirect::PatcherConfig {
            sweep_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .unwrap();
        let signal = p.sweep().signal();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: building and installing a signal mask for this thread only.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, signal);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                tx.send(gettid()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tid = rx.recv().unwrap();
        let lib = crate::common::c_lib("o2");
        let (entry, size) = lib.func("fx_work");
        let f = lib.f1("fx_work");
        let before = crate::common::bytes(entry - 16, size + 16);
        let a = p
            .analyze(entry, size, kgpatch_redirect::PadHint::Auto)
            .unwrap();
        match p.install(&a) {
            Err(kgpatch_redirect::Error::ThreadsUnreachable { tids, .. }) => {
                assert_eq!(tids, vec![tid])
            }
            other => panic!("expected ThreadsUnreachable, got {other:?}"),
        }
        assert_eq!(crate::common::bytes(entry - 16, size + 16), before);
        assert_eq!(f(5), lib.f1("fx_work")(5));
        assert!(p.site(entry).is_none());
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        // With the thread gone, the same analysis installs.
        p.install(&a).unwrap();
        p.remove(entry).unwrap();
        assert_eq!(crate::common::bytes(entry - 16, size + 16), before);
        return;
    }
    crate::common::in_child(
        "sweep::an_unreachable_thread_rolls_the_install_back",
        "KGPATCH_UNREACHABLE_CHILD",
        "1",
    );
}

/// Kernels without membarrier `SYNC_CORE`: the signal-sweep fallback serialises cores. Two
/// threads call the function while its site is installed, switched and removed. In a child
/// process, which needs its own patcher.
#[test]
fn the_sweep_fallback_serialises_cores() {
    if std::env::var_os("KGPATCH_FALLBACK_CHILD").is_some() {
        let p = kgpatch_redirect::Patcher::new(kgpatch_redirect::PatcherConfig {
            force_sweep_sync: true,
            sweep_timeout: Duration::from_secs(20),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.sync_method(), kgpatch_redirect::SyncMethod::Sweep);
        let lib = crate::common::asm_lib_copy("_fallback");
        let (entry, size) = lib.func("asm_multi");
        let (v2, _) = lib.func("asm_multi_v2");
        let f = lib.f1("asm_multi");
        let stop = Arc::new(AtomicBool::new(false));
        let wrong = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (stop, wrong) = (stop.clone(), wrong.clone());
                std::thread::spawn(move || {
                    let mut x = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        let r = f(x);
                        if r != x + 1 && r != x + 1000 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        x += 1;
                    }
                })
            })
            .collect();
        let before = crate::common::bytes(entry, size);
        let a = p
            .analyze(entry, size, kgpatch_redirect::PadHint::Auto)
            .unwrap();
        for _ in 0..50 {
            let site = p.install(&a).unwrap();
            site.site().begin(1, kgpatch_universe::Version(v2));
            site.site().settle();
            p.set_fast_path(entry, Some(kgpatch_universe::Version(v2)))
                .unwrap();
            p.set_fast_path(entry, None).unwrap();
            site.site().begin(2, site.original());
            site.site().settle();
            p.remove(entry).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(wrong.load(Ordering::Relaxed), 0);
        assert_eq!(crate::common::bytes(entry, size), before);
        return;
    }
    crate::common::in_child(
        "sweep::the_sweep_fallback_serialises_cores",
        "KGPATCH_FALLBACK_CHILD",
        "1",
    );
}
