//! C++: exceptions thrown in either version reach the caller's catch, backtrace() from
//! inside each version shows the caller, and pthread_cancel of a thread blocked inside a
//! patched function completes.

use kgpatch_redirect::PadHint;
use kgpatch_universe::{word::migrated_value, Version};

use crate::common::{cxx_lib, in_universe, patcher, Lib};

fn f_int(lib: &Lib, name: &str) -> extern "C" fn(i32) -> i32 {
    let (addr, _) = lib.func(name);
    // SAFETY: the fixture's function takes and returns an int.
    unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(addr as usize) }
}

/// The return addresses recorded by the fixture's last backtrace().
fn frames(lib: &Lib) -> Vec<u64> {
    let count = lib.addr("cxx_frame_count") as *const i32;
    let frames = lib.addr("cxx_frames") as *const u64;
    // SAFETY: the fixture's globals, written by the call that just returned on this thread.
    unsafe {
        (0..(*count).max(0) as usize)
            .map(|i| *frames.add(i))
            .collect()
    }
}

fn in_range(lib: &Lib, name: &str, pcs: &[u64]) -> bool {
    let (start, size) = lib.func(name);
    pcs.iter().any(|&pc| pc > start && pc <= start + size)
}

#[test]
fn exceptions_and_backtraces_cross_both_versions() {
    let lib = cxx_lib();
    let p = patcher();
    let (entry, size) = lib.func("cxx_target");
    let (v2, _) = lib.func("cxx_target_v2");
    let caller = f_int(lib, "cxx_caller");
    let site = p
        .install(&p.analyze(entry, size, PadHint::Auto).unwrap())
        .unwrap();

    // Old version, through the trampoline.
    assert_eq!(caller(-5), -5);
    assert_eq!(caller(3), 9);
    assert_eq!(caller(7), 17);
    let pcs = frames(lib);
    assert!(in_range(lib, "cxx_target", &pcs), "{pcs:x?}");
    assert!(in_range(lib, "cxx_caller", &pcs), "old version: {pcs:x?}");

    // New version, for a migrated thread; old for the others.
    site.site().begin(2, Version(v2));
    let (thrown, plain, pcs) = in_universe(migrated_value(2), move || {
        let lib = cxx_lib();
        let caller = f_int(lib, "cxx_caller");
        (caller(-5), caller(3), {
            caller(7);
            frames(lib)
        })
    });
    assert_eq!((thrown, plain), (-505, 100006));
    assert!(in_range(lib, "cxx_target_v2", &pcs), "{pcs:x?}");
    assert!(in_range(lib, "cxx_caller", &pcs), "new version: {pcs:x?}");
    assert_eq!(in_universe(0, move || caller(-6)), -6);
    site.site().settle_back();
    p.remove(entry).unwrap();
}

#[test]
fn cancelling_a_thread_blocked_in_a_patched_function_completes() {
    let lib = cxx_lib();
    let p = patcher();
    let (entry, size) = lib.func("cxx_blocking");
    let (v2, _) = lib.func("cxx_blocking_v2");
    let (cancel_addr, _) = lib.func("cxx_cancel_blocked");
    // SAFETY: int cxx_cancel_blocked(int fd, unsigned sleep_us).
    let cancel: extern "C" fn(i32, u32) -> i32 =
        unsafe { std::mem::transmute(cancel_addr as usize) };
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);

    let site = p
        .install(&p.analyze(entry, size, PadHint::Auto).unwrap())
        .unwrap();
    // Original version (the fixture's thread has universe word 0).
    assert_eq!(cancel(fds[0], 30_000), 1);
    // New version, steady.
    site.site().begin(3, Version(v2));
    site.site().settle();
    p.set_fast_path(entry, Some(Version(v2))).unwrap();
    assert_eq!(cancel(fds[0], 30_000), 1);
    p.set_fast_path(entry, None).unwrap();
    assert_eq!(cancel(fds[0], 30_000), 1);
    site.site().begin(4, site.original());
    site.site().settle();
    p.remove(entry).unwrap();
    // SAFETY: closing our own descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// A thread blocked in a cancellable `read` is cancelled while kgpatch's sweep handler runs
/// on it: glibc's SIGCANCEL must wait until our handler returns, then cancel the thread as
/// usual. Before the fix it nested in our handler and unwound out of it: the child aborted
/// in our non-unwinding frames (the rare SIGABRT of the cxx tests) or, when the unwind got
/// through, the sweep's in-flight count stayed up and the next sweep spun forever (the rare
/// hang beside `cancelling_a_thread_blocked_in_a_patched_function_completes`).
#[test]
fn a_cancellation_during_our_handler_waits_for_it_to_return() {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::time::{Duration, Instant};
    if std::env::var_os("KGPATCH_CXX_CHILD").is_none() {
        return crate::common::in_child(
            "cxx::a_cancellation_during_our_handler_waits_for_it_to_return",
            "KGPATCH_CXX_CHILD",
            "1",
        );
    }
    // Without the fix the sweep below never returns: fail instead of hanging.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(30));
        eprintln!("the sweep never returned: a cancellation unwound out of our handler");
        std::process::exit(3);
    });
    let lib = cxx_lib();
    let start: extern "C" fn(i32) -> i32 =
        // SAFETY: int cxx_start_reader(int fd).
        unsafe { std::mem::transmute(lib.addr("cxx_start_reader") as usize) };
    let cancel: extern "C" fn() -> i32 =
        // SAFETY: int cxx_cancel_reader(void).
        unsafe { std::mem::transmute(lib.addr("cxx_cancel_reader") as usize) };
    let join: extern "C" fn() -> i32 =
        // SAFETY: int cxx_join_reader(void).
        unsafe { std::mem::transmute(lib.addr("cxx_join_reader") as usize) };
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let tid = start(fds[0]);
    assert!(tid > 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while kgpatch_sys::proc::parked(kgpatch_sys::proc::Pid::This, tid).is_none() {
        assert!(
            Instant::now() < deadline,
            "the reader never blocked in read"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    static INSIDE: AtomicI32 = AtomicI32::new(0);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    let action = |_: &mut libc::ucontext_t| {
        if kgpatch_sys::thread::gettid() != tid {
            return;
        }
        INSIDE.store(tid, Ordering::SeqCst);
        // Bounded: the test thread releases us right after it cancelled the thread.
        let until = Instant::now() + Duration::from_secs(2);
        while !RELEASE.load(Ordering::SeqCst) && Instant::now() < until {
            std::hint::spin_loop();
        }
    };
    let sweep = *patcher().sweep();
    let canceller = std::thread::spawn(move || {
        while INSIDE.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        assert_eq!(cancel(), 0);
        // Give SIGCANCEL time to be delivered (it would be, at once, if not blocked).
        std::thread::sleep(Duration::from_millis(50));
        RELEASE.store(true, Ordering::SeqCst);
    });
    let report = sweep
        .run_on(&[tid], &action, Duration::from_secs(5))
        .unwrap();
    canceller.join().unwrap();
    assert_eq!(report.done, vec![tid], "{report:?}");
    assert_eq!(join(), 1, "the reader was not cancelled");
    // The next sweep is not held up by a count the cancellation left behind.
    let again = sweep.run(&|_| {}, Duration::from_secs(5)).unwrap();
    assert!(again.timed_out.is_empty(), "{again:?}");
    // SAFETY: closing our own descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}
