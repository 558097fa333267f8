//! Our signals and the program's (issue 10, items 3 and 6): a thread that blocks SIGTRAP
//! with the raw system call makes a code write refuse instead of getting the process killed,
//! and a thread that a program's signal handler interrupted inside the bytes a site
//! overwrites (parked in that handler) makes the install wait and refuse instead of
//! returning, later, into the middle of the new jump. Each runs in a child process (its own
//! patcher with a short deadline, signal handlers and masks that must not touch the other
//! tests).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kgpatch_redirect::{Error, PadHint, Patcher, PatcherConfig};
use kgpatch_sys::thread::gettid;

use crate::common::{bytes, c_lib_copy, nested_lib};

/// Runs test `name` alone in a child process with `KGPATCH_SIGNALS_CHILD=<mode>`.
fn in_child(name: &str, mode: &str) {
    crate::common::in_child(name, "KGPATCH_SIGNALS_CHILD", mode);
}

fn child_mode() -> Option<String> {
    std::env::var("KGPATCH_SIGNALS_CHILD").ok()
}

fn short_patcher() -> Patcher {
    Patcher::new(PatcherConfig {
        sweep_timeout: Duration::from_millis(400),
        ..Default::default()
    })
    .unwrap()
}

/// The raw `rt_sigprocmask` system call (what static binaries, Go and glibc internals use;
/// the preloaded interposer never sees it).
fn raw_sigprocmask(how: libc::c_int, all: bool) {
    let set: u64 = if all { !0 } else { 0 };
    // SAFETY: rt_sigprocmask reads an 8-byte set from a live local; no old set is asked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            how,
            &set as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    assert_eq!(r, 0);
}

/// Proves item 3: a worker that blocks every signal with the raw system call and keeps
/// calling the function makes `install` refuse with `TrapBlocked` naming it, the code bytes
/// stay identical and the process lives; once it unblocks, the same analysis installs.
/// Before the fix the child was killed by SIGTRAP at the first install.
#[test]
fn a_thread_blocking_sigtrap_refuses_the_write() {
    if child_mode().is_none() {
        return in_child(
            "signals::a_thread_blocking_sigtrap_refuses_the_write",
            "trap",
        );
    }
    let p = short_patcher();
    let lib = c_lib_copy("o2", "_trapblock");
    let (entry, size) = lib.func("fx_work");
    let f = lib.f1("fx_work");
    let expected: Vec<i64> = (0..64i64).map(|x| f(x)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let unblock = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let (stop, unblock, wrong) = (stop.clone(), unblock.clone(), wrong.clone());
        let expected = expected.clone();
        std::thread::spawn(move || {
            raw_sigprocmask(libc::SIG_BLOCK, true);
            tx.send(gettid()).unwrap();
            let mut unblocked = false;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if !unblocked && unblock.load(Ordering::Relaxed) {
                    raw_sigprocmask(libc::SIG_UNBLOCK, true);
                    unblocked = true;
                    tx.send(0).unwrap();
                }
                if f(i as i64) != expected[i] {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                i = (i + 1) % expected.len();
            }
        })
    };
    let tid = rx.recv().unwrap();
    let before = bytes(entry - 16, size + 16);
    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    for _ in 0..3 {
        match p.install(&a) {
            Err(e @ Error::TrapBlocked { .. }) => {
                let Error::TrapBlocked { tids } = &e else {
                    unreachable!()
                };
                assert_eq!(tids, &vec![tid]);
                let text = e.to_string();
                assert!(
                    text.contains(&tid.to_string()) && text.contains("SIGTRAP"),
                    "{text}"
                );
                eprintln!("refused: {text}");
            }
            other => panic!("expected TrapBlocked, got {other:?}"),
        }
        assert_eq!(
            bytes(entry - 16, size + 16),
            before,
            "a refused write changed code"
        );
        assert!(p.site(entry).is_none());
    }
    unblock.store(true, Ordering::Relaxed);
    assert_eq!(rx.recv().unwrap(), 0);
    // With SIGTRAP deliverable again, the same analysis installs and removes cleanly.
    p.install(&a).unwrap();
    p.remove(entry).unwrap();
    assert_eq!(bytes(entry - 16, size + 16), before);
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert_eq!(wrong.load(Ordering::Relaxed), 0);
}

static PAGE: AtomicU64 = AtomicU64::new(0);
static PARKED_RIP: AtomicU64 = AtomicU64::new(0);
static RELEASE: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicI32 = AtomicI32::new(0);

/// The program's SIGSEGV handler: a fault on the protected page parks the thread here (in
/// the handler, its interrupted pc inside `nested_load`'s first bytes) until released, then
/// makes the page readable so the load succeeds when the handler returns.
extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext to an SA_SIGINFO handler.
    let (addr, rip) = unsafe {
        (
            (*info).si_addr() as u64,
            (*(ctx as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] as u64,
        )
    };
    let page = PAGE.load(Ordering::SeqCst);
    if page == 0 || addr & !4095 != page {
        // Not ours: die as the default action would.
        // SAFETY: restoring the default action and re-raising are async-signal-safe.
        unsafe {
            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        }
        return;
    }
    PARKED_RIP.store(rip, Ordering::SeqCst);
    PARKED.store(gettid(), Ordering::SeqCst);
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    while !RELEASE.load(Ordering::SeqCst) {
        // SAFETY: nanosleep with a valid timespec (EINTR from our sweeps is fine).
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }
    // SAFETY: the page is ours (mapped by the test); mprotect is async-signal-safe.
    unsafe { libc::mprotect(page as *mut libc::c_void, 4096, libc::PROT_READ) };
}

/// Parks a thread in the program's SIGSEGV handler with its interrupted pc at
/// `nested_load + 1` (inside the 5 bytes a site overwrites); `mask` is the handler's
/// `sa_mask`. Checks that `install` waits and refuses with `InterruptedInside` naming the
/// thread, bytes untouched, and that once the handler returned the install goes through.
/// Before the fix the install succeeded, and the released thread returned into the middle
/// of the jump (the child died, or computed garbage).
fn nested_handler_case(mask_sweep_signal: bool) {
    let p = short_patcher();
    let lib = nested_lib();
    let (entry, size) = lib.func("nested_load");
    let load: extern "C" fn(*const u8) -> i64 =
        // SAFETY: nested_load has this signature.
        unsafe { std::mem::transmute(entry as usize) };
    // SAFETY: a fresh private anonymous page, written and then protected.
    let page = unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(page, libc::MAP_FAILED);
        *(page as *mut u8) = 42;
        assert_eq!(libc::mprotect(page, 4096, libc::PROT_NONE), 0);
        page as u64
    };
    PAGE.store(page, Ordering::SeqCst);
    // SAFETY: installing an SA_SIGINFO handler for SIGSEGV in this child process only.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_segv as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if mask_sweep_signal {
            libc::sigaddset(&mut act.sa_mask, p.sweep().signal());
        }
        assert_eq!(
            libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut()),
            0
        );
    }
    let before = bytes(entry - 16, size + 16);
    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    assert_eq!(a.instruction_offsets(), vec![0, 1, 4]);

    let parked = std::thread::spawn(move || load(page as *const u8));
    let deadline = Instant::now() + Duration::from_secs(10);
    while PARKED.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the thread never faulted");
        std::thread::sleep(Duration::from_millis(1));
    }
    let tid = PARKED.load(Ordering::SeqCst);
    assert_eq!(PARKED_RIP.load(Ordering::SeqCst), entry + 1);

    match p.install(&a) {
        Err(Error::InterruptedInside { site, tids }) => {
            assert_eq!((site, tids), (entry, vec![tid]));
        }
        other => panic!("expected InterruptedInside for thread {tid}, got {other:?}"),
    }
    assert_eq!(
        bytes(entry - 16, size + 16),
        before,
        "a refused install changed code"
    );
    assert!(p.site(entry).is_none());

    RELEASE.store(true, Ordering::SeqCst);
    assert_eq!(parked.join().unwrap(), 42);
    // The handler has returned: nothing is inside the bytes any more.
    p.install(&a).unwrap();
    assert_eq!(load(page as *const u8), 42);
    p.remove(entry).unwrap();
    assert_eq!(bytes(entry - 16, size + 16), before);
}

/// Item 6, the sweep part, with a handler that lets the sweep signal in: the sweep's own
/// handler runs nested in the program's and must look past it.
#[test]
fn a_thread_in_a_nested_handler_inside_the_bytes_blocks_the_install() {
    if child_mode().is_none() {
        return in_child(
            "signals::a_thread_in_a_nested_handler_inside_the_bytes_blocks_the_install",
            "nested",
        );
    }
    nested_handler_case(false);
}

/// The same with a handler that blocks the sweep signal: the thread is parked in the kernel
/// outside the bytes, and its stack is scanned from outside.
#[test]
fn a_parked_thread_in_a_handler_masking_the_sweep_blocks_the_install() {
    if child_mode().is_none() {
        return in_child(
            "signals::a_parked_thread_in_a_handler_masking_the_sweep_blocks_the_install",
            "masked",
        );
    }
    nested_handler_case(true);
}

/// An io_uring worker (`iou-wrk-*`) is a kernel task in our thread group that blocks every
/// signal: it runs none of our code, so it must neither refuse the write (it "blocks
/// SIGTRAP") nor hold up the sweep (it never answers). Seen on MariaDB under sysbench,
/// where InnoDB's asynchronous I/O makes such workers; before the fix this install was
/// refused with `TrapBlocked` naming the worker.
#[test]
fn an_io_uring_worker_neither_refuses_nor_holds_up_the_install() {
    if child_mode().is_none() {
        return in_child(
            "signals::an_io_uring_worker_neither_refuses_nor_holds_up_the_install",
            "io_uring",
        );
    }
    use io_uring::{opcode, squeue, types, IoUring};
    use std::io::Write;
    use std::os::fd::AsRawFd;

    let mut ring = IoUring::new(8).expect("io_uring_setup (sysctl kernel.io_uring_disabled=0)");
    let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut buf = [0u8; 8];
    // IOSQE_ASYNC: an io-wq worker takes the receive and blocks in it.
    let recv = opcode::Recv::new(types::Fd(reader.as_raw_fd()), buf.as_mut_ptr(), 8)
        .build()
        .flags(squeue::Flags::ASYNC);
    // SAFETY: `buf` and `reader` outlive the operation: its completion is awaited below.
    unsafe { ring.submission().push(&recv).unwrap() };
    ring.submit().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let worker = loop {
        let found = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|&t| {
                let flags = kgpatch_sys::proc::task_flags(kgpatch_sys::proc::Pid::This, t);
                matches!(flags, Ok(Some(f)) if f & kgpatch_sys::proc::PF_IO_WORKER != 0)
            });
        if let Some(tid) = found {
            break tid;
        }
        assert!(Instant::now() < deadline, "no io_uring worker appeared");
        std::thread::sleep(Duration::from_millis(1));
    };

    let p = short_patcher();
    let lib = c_lib_copy("o2", "_iouring");
    let (entry, size) = lib.func("fx_work");
    let f = lib.f1("fx_work");
    let expected: Vec<i64> = (0..64i64).map(|x| f(x)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0usize;
            let mut wrong = 0u64;
            while !stop.load(Ordering::Relaxed) {
                wrong += u64::from(f(i as i64) != expected[i]);
                i = (i + 1) % expected.len();
            }
            wrong
        })
    };
    let before = bytes(entry - 16, size + 16);
    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    for round in 0..20 {
        p.install(&a)
            .unwrap_or_else(|e| panic!("round {round}, worker {worker} alive: {e}"));
        p.remove(entry).unwrap();
    }
    assert_eq!(bytes(entry - 16, size + 16), before);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(caller.join().unwrap(), 0, "wrong results while patching");
    writer.write_all(b"x").unwrap();
    ring.submit_and_wait(1).unwrap();
    assert_eq!(ring.completion().next().map(|c| c.result()), Some(1));
}
