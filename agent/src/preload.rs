//! What the library does when it is `LD_PRELOAD`ed: start itself from a constructor, and
//! interpose `pthread_create` so new threads enter the goal universe before their own code.
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
    let addr = *REAL.get_or_init(|| {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only reads loader tables.
        unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) as usize }
    });
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
