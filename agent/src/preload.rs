//! What the library does when it is `LD_PRELOAD`ed: start itself from a constructor,
//! interpose `pthread_create` so new threads enter the goal universe before their own code,
//! and interpose `pthread_sigmask`/`sigprocmask` so no thread can block kgpatch's signals
//! (the JVM's signal-chaining libraries do the same for theirs).
//!
//! Both are inert unless this code runs from `libkgpatch_agent.so` with the agent started: a
//! program that links the crate (the `kgpatch` CLI, tests) is not changed by them.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

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
    if std::env::var_os("KGPATCH_AGENT").is_some_and(|v| v == "off") {
        return;
    }
    if !loaded_as_the_agent_library() {
        return;
    }
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
    static REAL: OnceLock<usize> = OnceLock::new();
    let addr = real_fn(c"pthread_create", &REAL);
    // SAFETY: a non-null address dlsym gave for `pthread_create` is glibc's function, whose
    // signature `PthreadCreate` is.
    (addr != 0).then(|| unsafe { std::mem::transmute::<usize, PthreadCreate>(addr) })
}

struct Start {
    routine: StartRoutine,
    arg: *mut c_void,
}

extern "C" fn start_thread(p: *mut c_void) -> *mut c_void {
    // SAFETY: `p` is the `Box<Start>` that `pthread_create` below leaked for this thread.
    let start = unsafe { Box::from_raw(p.cast::<Start>()) };
    migrate::thread_start();
    (start.routine)(start.arg)
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

fn real_fn(name: &CStr, cache: &'static OnceLock<usize>) -> usize {
    *cache.get_or_init(|| {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only reads loader tables.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
    })
}

/// The signals kgpatch needs delivered: the migration signal, the redirect sweep's signal,
/// and SIGTRAP (an int3 hit with SIGTRAP blocked kills the process).
fn ours() -> [c_int; 3] {
    [
        crate::migration_signal(),
        kgpatch_redirect::PatcherConfig::default().sweep_signal,
        libc::SIGTRAP,
    ]
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
    for sig in ours() {
        // SAFETY: `copy` is a valid sigset.
        unsafe { libc::sigdelset(copy, sig) };
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
    static REAL: OnceLock<usize> = OnceLock::new();
    let addr = real_fn(c"pthread_sigmask", &REAL);
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
    static REAL: OnceLock<usize> = OnceLock::new();
    let addr = real_fn(c"sigprocmask", &REAL);
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
