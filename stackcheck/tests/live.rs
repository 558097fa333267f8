//! Real threads parked in known call chains, walked by a signal handler running on them.

use std::hint::black_box;
use std::ops::Range;
use std::sync::atomic::{AtomicI32, Ordering};

use kgpatch_stackcheck::{
    BusyRanges, IndexOptions, StackBounds, UnreliableReason, UnwindIndex, WalkOutcome, MAX_FRAMES,
};

use crate::support::{
    assert_chain, fixture, index, load_late, own_function, position_in, walk_all_at_once,
    walk_thread, Mode, Parked, Variant,
};

fn c_chain(variant: Variant) -> Vec<(&'static str, Range<u64>)> {
    let fx = fixture(variant);
    ["fx_leaf", "fx_c", "fx_b", "fx_a", "fx_entry"]
        .into_iter()
        .map(|n| (n, fx.range(n)))
        .collect()
}

fn park_c(variant: Variant, entry: &str) -> Parked {
    let f = fixture(variant).stop_fn(entry);
    let f = f as usize;
    Parked::start(move |stop| {
        // SAFETY: f is the fixture function looked up above, of this exact type.
        let f: extern "C" fn(*const AtomicI32) -> i32 = unsafe { std::mem::transmute(f) };
        black_box(f(stop));
    })
}

fn check_c_chain(variant: Variant) {
    let index = index();
    let chain = c_chain(variant);
    let t = park_c(variant, "fx_entry");

    // The agent's path: walk the interrupted context.
    let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Interrupted);
    assert!(w.outcome.is_clean(), "{:?} {:#x?}", w.outcome, w.frames);
    assert_eq!(w.allocs, 0, "the walk allocated");
    assert_chain(&w.frames, 0, &chain);
    // It ends in libc's clone3 child path (start_thread's caller).
    let last = *w.frames.last().unwrap();
    let obj = index
        .object_for(last - 1)
        .expect("outermost frame in a known object");
    assert!(
        obj.name.contains("libc.so"),
        "outermost frame in {}",
        obj.name
    );
    let WalkOutcome::Clean { depth } = w.outcome else {
        unreachable!()
    };
    assert_eq!(usize::from(depth), w.frames.len());

    // A busy range on the chain is reported at its depth.
    let busy = BusyRanges::from_pairs([(chain[2].1.clone(), 42)]).unwrap();
    let w = walk_thread(t.tid, &index, &busy, Mode::Interrupted);
    match w.outcome {
        WalkOutcome::Busy {
            depth: 2,
            pc,
            range_id: 42,
        } => assert!(chain[2].1.contains(&(pc - 1))),
        o => panic!("expected Busy at depth 2, got {o:?}"),
    }
    // The interrupted pc itself.
    let busy = BusyRanges::from_pairs([(chain[0].1.clone(), 7)]).unwrap();
    let w = walk_thread(t.tid, &index, &busy, Mode::Interrupted);
    assert!(
        matches!(
            w.outcome,
            WalkOutcome::Busy {
                depth: 0,
                range_id: 7,
                ..
            }
        ),
        "{:?}",
        w.outcome
    );

    // A range not on the chain: clean.
    let unused = fixture(variant).range("fx_unused");
    let other = BusyRanges::from_pairs([(unused, 1)]).unwrap();
    let w = walk_thread(t.tid, &index, &other, Mode::Interrupted);
    assert!(w.outcome.is_clean(), "{:?}", w.outcome);

    // From the handler itself: through the kernel's signal frame (__restore_rt).
    let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Current);
    assert!(w.outcome.is_clean(), "{:?} {:#x?}", w.outcome, w.frames);
    assert_eq!(w.allocs, 0, "the walk allocated");
    let k = position_in(&w.frames, &chain[0].1).expect("leaf found after the signal frame");
    assert!(k >= 2, "handler frames come first");
    assert_chain(&w.frames, k, &chain);
    let restorer = index
        .object_for(w.frames[k - 1] - 1)
        .expect("restorer in a known object");
    assert!(
        restorer.name.contains("libc.so"),
        "signal frame in {}",
        restorer.name
    );
    let busy = BusyRanges::from_pairs([(chain[3].1.clone(), 3)]).unwrap();
    let w = walk_thread(t.tid, &index, &busy, Mode::Current);
    match w.outcome {
        WalkOutcome::Busy {
            depth, range_id: 3, ..
        } => assert_eq!(usize::from(depth), k + 3),
        o => panic!("expected Busy, got {o:?}"),
    }
}

#[test]
fn c_without_frame_pointers_walks_exactly() {
    check_c_chain(Variant::NoFp);
}

#[test]
fn c_with_frame_pointers_walks_exactly() {
    check_c_chain(Variant::Fp);
}

#[inline(never)]
fn rust_leaf(stop: *const AtomicI32) {
    // SAFETY: stop points to the parked thread's [AtomicI32; 2], alive while it runs.
    let s = unsafe { std::slice::from_raw_parts(stop, 2) };
    s[1].store(1, Ordering::Release);
    while s[0].load(Ordering::Acquire) == 0 {
        std::hint::spin_loop();
    }
}

#[inline(never)]
fn rust_chain_c(stop: *const AtomicI32, x: u64) -> u64 {
    let mut v = [0u64; 8];
    v[(x & 7) as usize] = x;
    rust_leaf(black_box(stop));
    black_box(v)[1].wrapping_mul(3).wrapping_add(x)
}

#[inline(never)]
fn rust_chain_b(stop: *const AtomicI32, x: u64) -> u64 {
    black_box(rust_chain_c(stop, x + 1)) + 7
}

#[inline(never)]
fn rust_chain_a(stop: *const AtomicI32, x: u64) -> u64 {
    black_box(rust_chain_b(stop, x ^ 5)).wrapping_sub(1)
}

#[test]
fn rust_chain_walks_exactly() {
    let known = rust_chain_a as fn(*const AtomicI32, u64) -> u64 as usize as u64;
    let range = |n| own_function(n, known, "rust_chain_a");
    let chain = [
        ("rust_leaf", range("live9rust_leaf")),
        ("rust_chain_c", range("rust_chain_c")),
        ("rust_chain_b", range("rust_chain_b")),
        ("rust_chain_a", range("rust_chain_a")),
    ];
    let index = index();
    let t = Parked::start(|stop| {
        black_box(rust_chain_a(stop, 3));
    });
    let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Interrupted);
    assert!(w.outcome.is_clean(), "{:?} {:#x?}", w.outcome, w.frames);
    assert_eq!(w.allocs, 0);
    assert_chain(&w.frames, 0, &chain);

    let busy = BusyRanges::from_pairs([(chain[1].1.clone(), 9)]).unwrap();
    let w = walk_thread(t.tid, &index, &busy, Mode::Interrupted);
    assert!(
        matches!(
            w.outcome,
            WalkOutcome::Busy {
                depth: 1,
                range_id: 9,
                ..
            }
        ),
        "{:?}",
        w.outcome
    );
    let unused = range("rust_unused_fn");
    let w = walk_thread(
        t.tid,
        &index,
        &BusyRanges::from_pairs([(unused, 1)]).unwrap(),
        Mode::Interrupted,
    );
    assert!(w.outcome.is_clean(), "{:?}", w.outcome);
}

#[inline(never)]
fn rust_unused_fn(x: u64) -> u64 {
    black_box(x) * 11
}

#[test]
fn code_without_unwind_info_in_a_loaded_object_is_unreliable() {
    let index = index();
    let t = park_c(Variant::NoFp, "fx_nocfi_entry");
    let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Interrupted);
    let nocfi = fixture(Variant::NoFp).range("fx_nocfi");
    match w.outcome {
        WalkOutcome::Unreliable {
            why: UnreliableReason::NoUnwindInfo,
            depth: 0,
            pc,
        } => {
            assert!(nocfi.contains(&pc))
        }
        o => panic!("expected NoUnwindInfo at depth 0, got {o:?}"),
    }
    // The same frame inside a busy range is Busy: a range check needs no unwind info.
    let busy = BusyRanges::from_pairs([(nocfi, 5)]).unwrap();
    let w = walk_thread(t.tid, &index, &busy, Mode::Interrupted);
    assert!(
        matches!(
            w.outcome,
            WalkOutcome::Busy {
                depth: 0,
                range_id: 5,
                ..
            }
        ),
        "{:?}",
        w.outcome
    );
}

/// pause-spin code in an anonymous mapping: `movl $1, 4(%rdi); 1: pause; cmpl $0, (%rdi);
/// je 1b; ret`.
const SPIN_CODE: [u8; 15] = [
    0xc7, 0x47, 0x04, 0x01, 0x00, 0x00, 0x00, // mov dword [rdi+4], 1
    0xf3, 0x90, // pause
    0x83, 0x3f, 0x00, // cmp dword [rdi], 0
    0x74, 0xf9, // je -7
    0xc3, // ret
];

#[test]
fn jit_code_outside_every_object_is_unreliable() {
    // SAFETY: a fresh private anonymous mapping, written then made read+exec before use.
    let code = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(SPIN_CODE.as_ptr(), p.cast::<u8>(), SPIN_CODE.len());
        assert_eq!(
            libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
        p as usize
    };
    let index = index();
    let t = Parked::start(move |stop| {
        // SAFETY: the mapping holds a complete function of this signature.
        let f: extern "C" fn(*const AtomicI32) = unsafe { std::mem::transmute(code) };
        f(stop);
        black_box(());
    });
    let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Interrupted);
    let jit = code as u64..code as u64 + SPIN_CODE.len() as u64;
    match w.outcome {
        WalkOutcome::Unreliable {
            why: UnreliableReason::UnknownCode,
            depth: 0,
            pc,
        } => {
            assert!(jit.contains(&pc))
        }
        o => panic!("expected UnknownCode at depth 0, got {o:?}"),
    }
    // From the handler: clean through the signal frame, then stuck at the JIT frame.
    let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Current);
    match w.outcome {
        WalkOutcome::Unreliable {
            why: UnreliableReason::UnknownCode,
            depth,
            pc,
        } => {
            assert!(depth >= 2 && jit.contains(&pc), "{:?}", w.outcome)
        }
        o => panic!("expected UnknownCode, got {o:?}"),
    }
    drop(t);
    // SAFETY: the thread that ran the code has been joined.
    unsafe { libc::munmap(code as *mut libc::c_void, 4096) };
}

#[test]
fn an_object_loaded_after_the_index_is_noticed_and_a_rebuilt_index_walks_it() {
    let before = UnwindIndex::build().unwrap();
    let late = load_late();
    assert!(!before.is_current(), "dlopen must change the object stamp");
    let f = late.stop_fn("fx_entry") as usize;
    let t = Parked::start(move |stop| {
        // SAFETY: f is the fixture's fx_entry.
        let f: extern "C" fn(*const AtomicI32) -> i32 = unsafe { std::mem::transmute(f) };
        black_box(f(stop));
    });
    let w = walk_thread(t.tid, &before, &BusyRanges::empty(), Mode::Interrupted);
    assert!(
        matches!(
            w.outcome,
            WalkOutcome::Unreliable {
                why: UnreliableReason::UnknownCode,
                depth: 0,
                ..
            }
        ),
        "{:?}",
        w.outcome
    );
    let after = UnwindIndex::build().unwrap();
    let w = walk_thread(t.tid, &after, &BusyRanges::empty(), Mode::Interrupted);
    assert!(w.outcome.is_clean(), "{:?}", w.outcome);
    assert!(late.range("fx_leaf").contains(&w.frames[0]));
}

#[inline(never)]
fn recurse(n: u32, index: &UnwindIndex, bounds: StackBounds) -> (WalkOutcome, usize) {
    if n == 0 {
        let mut frames = [0u64; 4];
        return index.walk_current(bounds, &BusyRanges::empty(), &mut frames);
    }
    let r = recurse(black_box(n - 1), index, bounds);
    black_box(r)
}

#[test]
fn plain_thread_walks_clean_and_a_deep_one_stops_at_the_bound() {
    let index = index();
    let bounds = StackBounds::of_current_thread().unwrap();
    let (o, _) = recurse(10, &index, bounds);
    assert!(o.is_clean(), "{o:?}");
    let (o, n) = recurse(u32::from(MAX_FRAMES) + 10, &index, bounds);
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::TooDeep,
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(n, usize::from(MAX_FRAMES));
}

#[test]
fn a_stack_pointer_outside_the_bounds_is_unreliable() {
    let index = index();
    let bounds = StackBounds::of_current_thread().unwrap();
    let regs = kgpatch_stackcheck::Regs::new(
        rust_unused_fn as fn(u64) -> u64 as usize as u64,
        bounds.hi() + 64,
        0,
    );
    assert!(matches!(
        index.walk(&regs, bounds, &BusyRanges::empty()),
        WalkOutcome::Unreliable {
            why: UnreliableReason::StackPointerOutOfBounds,
            depth: 0,
            ..
        }
    ));
}

#[inline(never)]
fn busy_worker(stop: *const AtomicI32) {
    // SAFETY: stop points to the parked thread's [AtomicI32; 2], alive while it runs.
    let s = unsafe { std::slice::from_raw_parts(stop, 2) };
    s[1].store(1, Ordering::Release);
    let mut acc = 0u64;
    while s[0].load(Ordering::Acquire) == 0 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer. (Served by the vdso.)
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        // SAFETY: plain syscalls without arguments that matter.
        acc = acc.wrapping_add(unsafe { libc::getppid() } as u64);
        acc = acc.wrapping_add(black_box(format!("{}", ts.tv_nsec)).len() as u64);
        std::hint::spin_loop();
    }
    black_box(acc);
}

#[test]
fn a_thread_interrupted_anywhere_in_ordinary_code_walks_clean() {
    // Rust code, libc, the vdso, the allocator, syscall returns: wherever the signal lands
    // the walk must reach the outermost frame.
    let index = index();
    let worker = own_function(
        "live11busy_worker",
        busy_worker as fn(*const AtomicI32) as usize as u64,
        "live11busy_worker",
    );
    let t = Parked::start(busy_worker);
    let mut leaves = std::collections::HashSet::new();
    for _ in 0..200 {
        let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Interrupted);
        assert!(w.outcome.is_clean(), "{:?} {:#x?}", w.outcome, w.frames);
        assert_eq!(w.allocs, 0);
        assert!(
            position_in(&w.frames, &worker).is_some(),
            "{:#x?}",
            w.frames
        );
        leaves.insert(w.frames[0]);
        std::thread::sleep(std::time::Duration::from_micros(300));
    }
    assert!(
        leaves.len() > 5,
        "interrupted at only {} places",
        leaves.len()
    );
}

#[inline(never)]
fn sleeper(stop: *const AtomicI32, how: u32) {
    // SAFETY: stop points to the parked thread's [AtomicI32; 2], alive while it runs.
    let s = unsafe { std::slice::from_raw_parts(stop, 2) };
    s[1].store(1, Ordering::Release);
    while s[0].load(Ordering::Acquire) == 0 {
        match how {
            0 => std::thread::sleep(std::time::Duration::from_millis(20)), // nanosleep
            1 => std::thread::park_timeout(std::time::Duration::from_millis(20)), // futex
            _ => {
                let mut p = libc::pollfd {
                    fd: -1,
                    events: 0,
                    revents: 0,
                };
                // SAFETY: one valid pollfd (a negative fd is ignored): a 20 ms sleep in poll.
                black_box(unsafe { libc::poll(&mut p, 1, 20) });
            }
        }
    }
}

#[test]
fn threads_sleeping_in_syscalls_walk_clean() {
    // The common case on a server: the signal wakes a thread blocked in the kernel; the
    // interrupted pc is in libc's syscall wrapper.
    let index = index();
    let known = sleeper as fn(*const AtomicI32, u32) as usize as u64;
    let body = own_function("live7sleeper", known, "live7sleeper");
    for how in 0..3u32 {
        let t = Parked::start(move |stop| sleeper(stop, how));
        for _ in 0..20 {
            let w = walk_thread(t.tid, &index, &BusyRanges::empty(), Mode::Interrupted);
            assert!(
                w.outcome.is_clean(),
                "blocker {how}: {:?} {:#x?}",
                w.outcome,
                w.frames
            );
            assert!(position_in(&w.frames, &body).is_some(), "{:#x?}", w.frames);
            let leaf = index.object_for(w.frames[0]).map(|o| o.name.clone());
            assert!(leaf.is_some(), "interrupted pc in a known object");
            let busy = BusyRanges::from_pairs([(body.clone(), 1)]).unwrap();
            let w = walk_thread(t.tid, &index, &busy, Mode::Interrupted);
            assert!(
                matches!(w.outcome, WalkOutcome::Busy { range_id: 1, .. }),
                "{:?}",
                w.outcome
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

#[test]
fn many_threads_walk_at_once_from_the_shared_pool() {
    fixture(Variant::NoFp);
    let threads: Vec<Parked> = (0..6).map(|_| park_c(Variant::NoFp, "fx_entry")).collect();
    let tids: Vec<i32> = threads.iter().map(|t| t.tid).collect();
    // Enough caches: every walk is clean.
    let index = UnwindIndex::build_with(IndexOptions { cache_slots: 6 }).unwrap();
    for _ in 0..8 {
        for o in walk_all_at_once(&tids, &index) {
            assert!(o.is_clean(), "{o:?}");
        }
    }
    // One cache: walks that overlap another may find none free, and say so; never wrong.
    let index = UnwindIndex::build_with(IndexOptions { cache_slots: 1 }).unwrap();
    let mut clean = 0;
    for _ in 0..8 {
        for o in walk_all_at_once(&tids, &index) {
            match o {
                WalkOutcome::Clean { .. } => clean += 1,
                WalkOutcome::Unreliable {
                    why: UnreliableReason::NoFreeCache,
                    depth: 0,
                    ..
                } => {}
                o => panic!("{o:?}"),
            }
        }
    }
    assert!(clean > 0);
}
