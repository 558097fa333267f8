//! Shared test machinery: C fixtures compiled and dlopen'ed, symbol ranges, parked threads,
//! and a signal handler that walks the thread it runs on.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kgpatch_stackcheck::{
    current_thread_bounds, register_current_thread, BusyRanges, Regs, UnwindIndex, WalkOutcome,
};
use object::{Object, ObjectSection, ObjectSymbol};

// ---------------------------------------------------------------------------------------
// Allocation counting: the handler checks that a walk allocates nothing.

struct CountingAlloc;

thread_local! {
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; the counter is a const-initialised
// thread-local Cell without destructor, which never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        THREAD_ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        THREAD_ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn thread_allocs() -> u64 {
    THREAD_ALLOCS.with(|c| c.get())
}

// ---------------------------------------------------------------------------------------
// C fixtures.

/// How a fixture library is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// -O2, no frame pointers, rbp full of junk in the leaf.
    NoFp,
    /// -O2 with frame pointers.
    Fp,
    /// Like NoFp, loaded only by the test that checks index refresh.
    Late,
}

/// A compiled and loaded fixture library.
pub struct Fixture {
    handle: usize,
    syms: HashMap<String, Range<u64>>,
    sections: HashMap<String, Range<u64>>,
}

impl Fixture {
    /// The address range of a function.
    pub fn range(&self, name: &str) -> Range<u64> {
        self.syms
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no symbol {name}"))
            .clone()
    }

    /// The address range of a section.
    pub fn section(&self, name: &str) -> Range<u64> {
        self.sections
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no section {name}"))
            .clone()
    }

    /// A function taking the stop flag.
    pub fn stop_fn(&self, name: &str) -> extern "C" fn(*const AtomicI32) -> i32 {
        let c = CString::new(name).unwrap();
        // SAFETY: handle came from a successful dlopen and is never closed.
        let p = unsafe { libc::dlsym(self.handle as *mut c_void, c.as_ptr()) };
        assert!(!p.is_null(), "dlsym {name}");
        // SAFETY: every fixture function named here has the signature int f(volatile int*).
        unsafe { std::mem::transmute::<*mut c_void, extern "C" fn(*const AtomicI32) -> i32>(p) }
    }
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stackcheck-fixtures")
}

fn compile(variant: Variant) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chain.c");
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (name, flags): (&str, &[&str]) = match variant {
        Variant::NoFp => ("chain_nofp.so", &["-fomit-frame-pointer", "-DCLOBBER_RBP"]),
        Variant::Fp => ("chain_fp.so", &["-fno-omit-frame-pointer"]),
        Variant::Late => ("chain_late.so", &["-fomit-frame-pointer", "-DCLOBBER_RBP"]),
    };
    let out = dir.join(format!("{}-{}", std::process::id(), name));
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-shared",
            "-fPIC",
            "-fasynchronous-unwind-tables",
            "-g0",
        ])
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc runs (the tests need gcc)");
    assert!(status.success(), "gcc failed for {variant:?}");
    out
}

fn load(variant: Variant) -> Fixture {
    let path = compile(variant);
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a plain C library with no constructors; RTLD_NODELETE keeps it mapped.
    let handle = unsafe {
        libc::dlopen(
            c.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    };
    assert!(!handle.is_null(), "dlopen {}", path.display());
    let mut fx = Fixture {
        handle: handle as usize,
        syms: HashMap::new(),
        sections: HashMap::new(),
    };
    let data = std::fs::read(&path).unwrap();
    // Mapped and read: the file itself is no longer needed.
    let _ = std::fs::remove_file(&path);
    let file = object::File::parse(&*data).unwrap();
    let entry = file
        .symbols()
        .find(|s| s.name() == Ok("fx_entry"))
        .unwrap()
        .address();
    let bias = fx.stop_fn("fx_entry") as usize as u64 - entry;
    for sec in file.sections() {
        if let Ok(n) = sec.name() {
            let start = bias + sec.address();
            fx.sections.insert(n.to_string(), start..start + sec.size());
        }
    }
    for s in file.symbols() {
        if let Ok(n) = s.name() {
            if n.starts_with("fx_") && s.size() > 0 {
                let start = bias + s.address();
                fx.syms.insert(n.to_string(), start..start + s.size());
            }
        }
    }
    fx
}

/// The no-frame-pointer and frame-pointer fixtures (compiled and loaded once).
pub fn fixture(variant: Variant) -> &'static Fixture {
    static FIXTURES: OnceLock<(Fixture, Fixture)> = OnceLock::new();
    let (nofp, fp) = FIXTURES.get_or_init(|| (load(Variant::NoFp), load(Variant::Fp)));
    match variant {
        Variant::NoFp => nofp,
        Variant::Fp => fp,
        Variant::Late => panic!("use load_late"),
    }
}

/// Loads a fresh fixture (for the index-refresh test).
pub fn load_late() -> Fixture {
    fixture(Variant::NoFp);
    load(Variant::Late)
}

/// Address ranges of functions in this test binary whose symbol contains `needle`.
pub fn own_function(needle: &str, known: u64, known_needle: &str) -> Range<u64> {
    static EXE: OnceLock<Vec<(String, u64, u64)>> = OnceLock::new();
    let syms = EXE.get_or_init(|| {
        let data = std::fs::read("/proc/self/exe").unwrap();
        let file = object::File::parse(&*data).unwrap();
        file.symbols()
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.address(), s.size())))
            .collect()
    });
    let find = |n: &str| {
        let hits: Vec<_> = syms.iter().filter(|s| s.0.contains(n) && s.2 > 0).collect();
        assert_eq!(hits.len(), 1, "symbols matching {n}: {hits:?}");
        hits[0]
    };
    let bias = known - find(known_needle).1;
    let s = find(needle);
    bias + s.1..bias + s.1 + s.2
}

// ---------------------------------------------------------------------------------------
// Parked threads.

/// A thread spinning inside a call chain until released.
pub struct Parked {
    /// Its kernel thread id.
    pub tid: i32,
    stop: Arc<[AtomicI32; 2]>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Parked {
    /// Starts a thread that registers its stack bounds, then runs `body(stop)`, which must
    /// set `stop[1] = 1` once parked and return when `stop[0] != 0`.
    pub fn start(body: impl FnOnce(*const AtomicI32) + Send + 'static) -> Parked {
        let stop = Arc::new([AtomicI32::new(0), AtomicI32::new(0)]);
        let tid = Arc::new(AtomicI32::new(0));
        let (s2, t2) = (stop.clone(), tid.clone());
        let handle = std::thread::spawn(move || {
            register_current_thread().unwrap();
            // SAFETY: gettid has no preconditions.
            t2.store(unsafe { libc::gettid() }, Ordering::Release);
            body(s2.as_ptr());
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while stop[1].load(Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "thread never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        Parked {
            tid: tid.load(Ordering::Acquire),
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.stop[0].store(1, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The signal handler.

/// Where the handler starts its walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// From the interrupted context in the ucontext (what the agent does).
    Interrupted,
    /// From the handler itself, through the signal frame.
    Current,
}

/// What a walk in the handler found.
#[derive(Clone, Debug)]
pub struct Walk {
    /// The outcome.
    pub outcome: WalkOutcome,
    /// The visited frames' pcs.
    pub frames: Vec<u64>,
    /// Allocations the walk made on the thread (must be 0).
    pub allocs: u64,
}

struct Request {
    index: *const UnwindIndex,
    ranges: *const BusyRanges,
    mode: Mode,
    done: AtomicBool,
    result: UnsafeCell<(Option<WalkOutcome>, usize, [u64; 128], u64)>,
}

static REQUEST: AtomicPtr<Request> = AtomicPtr::new(std::ptr::null_mut());

fn signal() -> i32 {
    libc::SIGRTMIN() + 7
}

extern "C" fn handler(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut c_void) {
    let req = REQUEST.load(Ordering::Acquire);
    if req.is_null() {
        return;
    }
    // SAFETY: the requester keeps the Request alive until it sees `done`.
    let req = unsafe { &*req };
    let Some(bounds) = current_thread_bounds() else {
        return;
    };
    // SAFETY: same lifetime argument: index and ranges outlive the request.
    let (index, ranges) = unsafe { (&*req.index, &*req.ranges) };
    let mut frames = [0u64; 128];
    let before = thread_allocs();
    let (outcome, n) = match req.mode {
        Mode::Interrupted => {
            // SAFETY: uc is the ucontext the kernel passed to this SA_SIGINFO handler.
            let regs = unsafe { Regs::from_ucontext(uc as *const libc::ucontext_t) };
            index.walk_frames(&regs, bounds, ranges, &mut frames)
        }
        Mode::Current => index.walk_current(bounds, ranges, &mut frames),
    };
    let allocs = thread_allocs() - before;
    // SAFETY: only this handler writes the result, before publishing `done`; the requester
    // reads it only after seeing `done`.
    unsafe { *req.result.get() = (Some(outcome), n, frames, allocs) };
    req.done.store(true, Ordering::Release);
}

fn install_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; we fill handler, flags and mask before use.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = handler as extern "C" fn(i32, *mut libc::siginfo_t, *mut c_void) as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: sa is fully initialised; installing a handler for our own RT signal.
        let rc = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal(), &sa, std::ptr::null_mut())
        };
        assert_eq!(rc, 0);
    });
}

/// Signals thread `tid` and returns what the handler's walk found there.
pub fn walk_thread(tid: i32, index: &UnwindIndex, ranges: &BusyRanges, mode: Mode) -> Walk {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let req = Box::new(Request {
        index,
        ranges,
        mode,
        done: AtomicBool::new(false),
        result: UnsafeCell::new((None, 0, [0; 128], 0)),
    });
    let p = &*req as *const Request as *mut Request;
    REQUEST.store(p, Ordering::Release);
    // SAFETY: plain syscall; tid is a live thread of this process (it is parked).
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal()) };
    assert_eq!(rc, 0, "tgkill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !req.done.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "the handler never reported");
        std::thread::sleep(Duration::from_micros(200));
    }
    REQUEST.store(std::ptr::null_mut(), Ordering::Release);
    // SAFETY: done was observed, so the handler finished writing and will not write again.
    let (outcome, n, frames, allocs) = unsafe { *req.result.get() };
    Walk {
        outcome: outcome.unwrap(),
        frames: frames[..n.min(128)].to_vec(),
        allocs,
    }
}

/// The index of the first frame inside `range`.
pub fn position_in(frames: &[u64], range: &Range<u64>) -> Option<usize> {
    frames
        .iter()
        .position(|pc| range.contains(pc) || range.contains(&(pc - 1)))
}

/// Asserts that `frames[at..]` starts with frames in each of `ranges`, in order (frame
/// `at` by its exact pc when `exact`, the others as return addresses).
pub fn assert_chain(frames: &[u64], at: usize, ranges: &[(&str, Range<u64>)]) {
    for (i, (name, r)) in ranges.iter().enumerate() {
        let pc = *frames
            .get(at + i)
            .unwrap_or_else(|| panic!("walk stopped before {name}: {frames:#x?}"));
        let probe = if i == 0 { pc } else { pc - 1 };
        assert!(
            r.contains(&probe),
            "frame {} should be in {name} {r:#x?}, is {pc:#x}; frames {frames:#x?}",
            at + i
        );
    }
}

/// An index built after the shared fixtures are loaded.
pub fn index() -> UnwindIndex {
    fixture(Variant::NoFp);
    UnwindIndex::build().unwrap()
}

// ---------------------------------------------------------------------------------------
// Many threads walked at once (pool contention).

const MAX_CONC: usize = 16;

struct ConcRequest {
    index: *const UnwindIndex,
    tids: [AtomicI32; MAX_CONC],
    outcomes: [UnsafeCell<Option<WalkOutcome>>; MAX_CONC],
    done: std::sync::atomic::AtomicUsize,
}

// SAFETY: each outcome cell is written by exactly one handler (the thread whose tid is at
// that index) before `done` is incremented, and read only after `done` reached the count.
unsafe impl Sync for ConcRequest {}

static CONC: AtomicPtr<ConcRequest> = AtomicPtr::new(std::ptr::null_mut());

fn conc_signal() -> i32 {
    libc::SIGRTMIN() + 8
}

extern "C" fn conc_handler(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut c_void) {
    let req = CONC.load(Ordering::Acquire);
    if req.is_null() {
        return;
    }
    // SAFETY: the requester keeps the request alive until every handler reported.
    let req = unsafe { &*req };
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    let me = unsafe { libc::gettid() };
    let Some(i) = req
        .tids
        .iter()
        .position(|t| t.load(Ordering::Relaxed) == me)
    else {
        return;
    };
    let Some(bounds) = current_thread_bounds() else {
        return;
    };
    // SAFETY: uc is this SA_SIGINFO handler's ucontext; index outlives the request.
    let (regs, index) = unsafe {
        (
            Regs::from_ucontext(uc as *const libc::ucontext_t),
            &*req.index,
        )
    };
    let o = index.walk(&regs, bounds, &BusyRanges::empty());
    // SAFETY: slot i belongs to this thread alone (see the Sync impl).
    unsafe { *req.outcomes[i].get() = Some(o) };
    req.done.fetch_add(1, Ordering::Release);
}

/// Signals every thread in `tids` at once; each walks itself with `index.walk` (the
/// pooled caches). Returns the outcomes in `tids` order.
pub fn walk_all_at_once(tids: &[i32], index: &UnwindIndex) -> Vec<WalkOutcome> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(tids.len() <= MAX_CONC);
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; handler, flags and mask are set before use.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction =
            conc_handler as extern "C" fn(i32, *mut libc::siginfo_t, *mut c_void) as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: installing a handler for our own RT signal with an initialised sigaction.
        let rc = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(conc_signal(), &sa, std::ptr::null_mut())
        };
        assert_eq!(rc, 0);
    });
    let req = Box::new(ConcRequest {
        index,
        tids: std::array::from_fn(|i| AtomicI32::new(tids.get(i).copied().unwrap_or(-1))),
        outcomes: std::array::from_fn(|_| UnsafeCell::new(None)),
        done: std::sync::atomic::AtomicUsize::new(0),
    });
    CONC.store(
        &*req as *const ConcRequest as *mut ConcRequest,
        Ordering::Release,
    );
    for &tid in tids {
        // SAFETY: plain syscall to a live thread of this process.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, conc_signal()) };
        assert_eq!(rc, 0);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while req.done.load(Ordering::Acquire) < tids.len() {
        assert!(Instant::now() < deadline, "not every handler reported");
        std::thread::sleep(Duration::from_micros(200));
    }
    CONC.store(std::ptr::null_mut(), Ordering::Release);
    (0..tids.len())
        // SAFETY: every handler has reported (done == len), none writes again.
        .map(|i| unsafe { *req.outcomes[i].get() }.unwrap())
        .collect()
}
