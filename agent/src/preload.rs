//! What the library does when it is `LD_PRELOAD`ed: start itself from a constructor,
//! interpose `pthread_create` so new threads enter the goal universe before their own code,
//! and interpose `pthread_sigmask`/`sigprocmask` so no thread can block kgpatch's signals
//! (the JVM's signal-chaining libraries do the same for theirs).
//!
//! Both are inert unless this code runs from `libkgpatch_agent.so` with the agent started: a
//! program that links the crate (the `kgpatch` CLI, tests) is not changed by them.
//!
//! # Safety
//! The interposers are `#[no_mangle]` functions with the C signatures of the glibc
//! functions they replace, so the dynamic linker binds the program's calls to them. Each
//! forwards to the real function found with `dlsym(RTLD_NEXT, ...)`, transmuted to exactly
//! that C signature, and passes the caller's pointers through unchanged, or a copy on our
//! stack of the signal mask or `sigaction` they point to with kgpatch's signals taken out.
//! `dladdr` and `dlsym` only read the loader's tables; the names they return live as long
//! as the object.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::Once;

use crate::migrate;

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreate = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartRoutine,
    *mut c_void,
) -> c_int;

/// `true` when this code was loaded as `libkgpatch_agent.so` (preloaded or dlopened).
fn loaded_as_the_agent_library() -> bool {
    // SAFETY: dladdr only reads the loader's tables; `info` is a valid out-parameter.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let me = loaded_as_the_agent_library as *const c_void;
    // SAFETY: as above.
    if unsafe { libc::dladdr(me, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    // SAFETY: dladdr gives a NUL-terminated file name that lives as long as the object.
    let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes();
    name.ends_with(b"libkgpatch_agent.so")
}

extern "C" fn on_load() {
    resolve_real_fns();
    if std::env::var_os("KGPATCH_AGENT").is_some_and(|v| v == "off") {
        return;
    }
    // Loaded late by `kgpatch attach` (or a program's own dlopen): the attach entry point
    // starts the agent, not the constructor.
    if !loaded_as_the_agent_library() || !crate::attach::preloaded() {
        return;
    }
    crate::set_origin(crate::protocol::Origin::Preload);
    if let Err(e) = crate::start() {
        eprintln!(
            "kgpatch agent: not started in pid {}: {e}",
            std::process::id()
        );
    }
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

fn real_pthread_create() -> Option<PthreadCreate> {
    let addr = real_fn(c"pthread_create", &REAL_PTHREAD_CREATE);
    // SAFETY: a non-null address dlsym gave for `pthread_create` is glibc's function, whose
    // signature `PthreadCreate` is.
    (addr != 0).then(|| unsafe { std::mem::transmute::<usize, PthreadCreate>(addr) })
}

struct Start {
    routine: StartRoutine,
    arg: *mut c_void,
}

/// The pthread key whose destructor frees the registry slot of a hooked thread when it
/// exits (by return, `pthread_exit` or cancellation: glibc runs key destructors in all
/// three). 0 until created; `u32::MAX` when it could not be created.
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);
const NO_KEY: u32 = u32::MAX;

extern "C" fn on_thread_exit(_: *mut c_void) {
    migrate::thread_exit();
}

/// The exit key, created by the first hooked thread (user context, never a signal handler).
fn exit_key() -> Option<libc::pthread_key_t> {
    static CREATE: Once = Once::new();
    CREATE.call_once(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-parameter; the destructor has the required signature.
        let rc = unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) };
        // Key 0 is a valid pthread key: store key + 1.
        let stored = if rc == 0 { key.wrapping_add(1) } else { NO_KEY };
        EXIT_KEY.store(stored, Ordering::Release);
    });
    match EXIT_KEY.load(Ordering::Acquire) {
        0 | NO_KEY => None,
        k => Some(k - 1),
    }
}

extern "C" fn start_thread(p: *mut c_void) -> *mut c_void {
    // Move the routine and its argument out, and free the box, before anything else: the
    // routine may leave by `pthread_exit` or cancellation (a forced unwind), which must not
    // cross this frame with a destructor pending.
    // SAFETY: `p` is the `Box<Start>` that `pthread_create` below leaked for this thread.
    let Start { routine, arg } = *unsafe { Box::from_raw(p.cast::<Start>()) };
    migrate::thread_start();
    if let Some(key) = exit_key() {
        // SAFETY: a key created by pthread_key_create; any non-null value makes glibc run
        // the destructor when this thread exits.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<c_void>()) };
    }
    routine(arg)
}

/// Interposed `pthread_create`: when the agent runs, the new thread first passes the gate
/// (entering the goal universe of the transition in force), then runs its start routine.
///
/// # Safety
/// The caller's contract is `pthread_create(3)`'s.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    routine: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    let Some(real) = real_pthread_create() else {
        return libc::EAGAIN;
    };
    if !crate::is_active() {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe { real(thread, attr, routine, arg) };
    }
    let start = Box::into_raw(Box::new(Start { routine, arg }));
    // SAFETY: the caller's arguments, with our start routine and its leaked context.
    let rc = unsafe { real(thread, attr, start_thread, start.cast()) };
    if rc != 0 {
        // SAFETY: the thread was not created; the box is still ours.
        drop(unsafe { Box::from_raw(start) });
    }
    rc
}

type SigmaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

/// The address of the next definition of `name` (glibc's), cached in `cache`. Resolved by
/// the library's constructor (see `on_load`), so the interposers — which a signal handler
/// may call — normally only load an atomic; a call that comes before the constructor ran
/// (another library's constructor) resolves it then, in that caller's ordinary context.
fn real_fn(name: &CStr, cache: &AtomicUsize) -> usize {
    let addr = cache.load(Ordering::Acquire);
    if addr != 0 {
        return addr;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only reads loader tables.
    let addr = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize };
    cache.store(addr, Ordering::Release);
    addr
}

static REAL_PTHREAD_CREATE: AtomicUsize = AtomicUsize::new(0);
static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);

/// Resolves every real function the interposers forward to.
fn resolve_real_fns() {
    real_fn(c"pthread_create", &REAL_PTHREAD_CREATE);
    real_fn(c"pthread_sigmask", &REAL_PTHREAD_SIGMASK);
    real_fn(c"sigprocmask", &REAL_SIGPROCMASK);
    real_fn(c"sigaction", &REAL_SIGACTION);
}

/// The signals kgpatch needs delivered — the migration signal, the redirect sweep's signal,
/// and SIGTRAP (an int3 hit with SIGTRAP blocked kills the process) — cached by
/// [`cache_signals`] when the agent starts, so the interposers (async-signal-safe by POSIX)
/// only load atomics: no environment lookup, no lock, no allocation. 0 = not cached.
static OURS: [AtomicI32; 3] = [const { AtomicI32::new(0) }; 3];

/// Caches kgpatch's signals for the interposers. Called by `start` before the agent is
/// marked active.
pub(crate) fn cache_signals(migration: c_int, sweep: c_int) {
    for (slot, sig) in OURS.iter().zip([migration, sweep, libc::SIGTRAP]) {
        slot.store(sig, Ordering::Release);
    }
}

/// `set` without kgpatch's signals, when a program blocks them (`SIG_BLOCK`/`SIG_SETMASK`).
fn without_ours(
    how: c_int,
    set: *const libc::sigset_t,
    copy: &mut libc::sigset_t,
) -> *const libc::sigset_t {
    if set.is_null() || how == libc::SIG_UNBLOCK || !crate::is_active() {
        return set;
    }
    // SAFETY: `set` is the caller's valid sigset (pthread_sigmask's contract).
    *copy = unsafe { *set };
    for sig in OURS.iter().map(|s| s.load(Ordering::Acquire)) {
        if sig > 0 {
            // SAFETY: `copy` is a valid sigset.
            unsafe { libc::sigdelset(copy, sig) };
        }
    }
    copy
}

/// Interposed `pthread_sigmask`: a thread that blocks every signal (as servers that handle
/// signals in one `sigwait` thread do) still receives kgpatch's, so patches can reach it.
///
/// # Safety
/// The caller's contract is `pthread_sigmask(3)`'s.
#[no_mangle]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let addr = real_fn(c"pthread_sigmask", &REAL_PTHREAD_SIGMASK);
    if addr == 0 {
        return libc::ENOSYS;
    }
    // SAFETY: glibc's pthread_sigmask has this signature.
    let real = unsafe { std::mem::transmute::<usize, SigmaskFn>(addr) };
    // SAFETY: a zeroed sigset is a valid value to overwrite.
    let mut copy: libc::sigset_t = unsafe { std::mem::zeroed() };
    let set = without_ours(how, set, &mut copy);
    // SAFETY: the caller's arguments, the set possibly replaced by a valid copy.
    unsafe { real(how, set, old) }
}

/// Interposed `sigprocmask`, for the same reason as [`pthread_sigmask`].
///
/// # Safety
/// The caller's contract is `sigprocmask(2)`'s.
#[no_mangle]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let addr = real_fn(c"sigprocmask", &REAL_SIGPROCMASK);
    if addr == 0 {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: glibc's sigprocmask has this signature.
    let real = unsafe { std::mem::transmute::<usize, SigmaskFn>(addr) };
    // SAFETY: as in `pthread_sigmask`.
    let mut copy: libc::sigset_t = unsafe { std::mem::zeroed() };
    let set = without_ours(how, set, &mut copy);
    // SAFETY: the caller's arguments, the set possibly replaced by a valid copy.
    unsafe { real(how, set, old) }
}

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;

/// Interposed `sigaction`: a program handler for any signal but SIGTRAP runs with SIGTRAP
/// deliverable. Programs often install handlers with `sigfillset(&sa_mask)`; such a handler
/// that calls a function while kgpatch's int3 sits on its entry would meet the int3 with
/// SIGTRAP blocked, and the kernel kills the whole process. With SIGTRAP left out of the
/// mask, kgpatch's SIGTRAP handler (which blocks every signal while it runs) sends the thread
/// on, and the program's handler continues as it would have. SIGTRAP is only ever raised by
/// an int3 or a debugger's single step, so a handler that no longer blocks it changes nothing
/// else. Done whether or not the agent is active (handlers are installed before it starts);
/// the migration and sweep signals are left as the program asks: a handler that blocks them
/// only delays a migration. A raw `rt_sigaction` system call bypasses this (ARCHITECTURE.md).
///
/// # Safety
/// The caller's contract is `sigaction(2)`'s.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let addr = real_fn(c"sigaction", &REAL_SIGACTION);
    if addr == 0 {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: glibc's sigaction has this signature.
    let real = unsafe { std::mem::transmute::<usize, SigactionFn>(addr) };
    if act.is_null() || sig == libc::SIGTRAP {
        // SAFETY: the caller's arguments, unchanged.
        return unsafe { real(sig, act, old) };
    }
    // SAFETY: `act` is the caller's valid sigaction (sigaction(2)'s contract); a copy of it
    // with one signal taken out of its mask is as valid.
    let mut copy = unsafe { *act };
    // SAFETY: `copy.sa_mask` is a valid sigset.
    unsafe { libc::sigdelset(&mut copy.sa_mask, libc::SIGTRAP) };
    // SAFETY: the caller's arguments, `act` replaced by the valid copy.
    unsafe { real(sig, &copy, old) }
}
