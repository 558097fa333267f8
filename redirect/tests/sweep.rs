//! The thread sweep on its own, and the TLS slot.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kgpatch_redirect::{sweep::gettid, tls, Sweep};

use crate::common::patcher;

#[test]
fn every_thread_runs_the_action_and_blocked_ones_are_reported() {
    let sweep: Sweep = *patcher().sweep();
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
