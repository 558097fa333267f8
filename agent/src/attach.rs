//! The agent loaded late: `kgpatch attach` makes a fresh thread of the target `dlopen`
//! `libkgpatch_agent.so` (with `RTLD_LOCAL`, so none of its interposers takes effect) and
//! call [`kgpatch_agent_attach`], the one entry point of this mode.
//!
//! A late agent has no `pthread_create` hook and no signal-mask interposers: threads the
//! program creates later start in the `from` universe (word 0) and are moved by the
//! migration signal like every other thread; threads that block kgpatch's signals are found
//! by their `/proc` status and named by `kgpatch status`. Handlers the program installed
//! before the attach may block SIGTRAP (a `sigfillset` mask); the attach takes SIGTRAP out
//! of their masks, as the preloaded `sigaction` interposer does for handlers installed later.
//!
//! # Safety
//! [`kgpatch_agent_attach`] is called from C by the injected bootstrap thread with the
//! pointers its contract names; it reads one NUL-terminated string and writes at most
//! `err_len` bytes into `err`. The handler masks are read and written with `sigaction(2)`
//! on values this module owns.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The runtime directory the attacher asked for (the target's own environment may not name
/// the one the attacher looks in).
static RUNTIME_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The runtime directory [`kgpatch_agent_attach`] was given, if any.
pub(crate) fn runtime_dir_override() -> Option<PathBuf> {
    RUNTIME_DIR.get().cloned()
}

/// `true` when the dynamic loader loaded this library from `LD_PRELOAD` (as opposed to a
/// late `dlopen`): the variable names it. Read once by the constructor, before `main`.
pub(crate) fn preloaded() -> bool {
    std::env::var_os("LD_PRELOAD").is_some_and(|v| {
        v.to_string_lossy()
            .split([':', ' '])
            .any(|entry| entry.ends_with("libkgpatch_agent.so"))
    })
}

/// Started now.
pub const ATTACH_STARTED: c_int = 0;
/// The agent was already running in this process: nothing was done.
pub const ATTACH_ALREADY: c_int = 1;
/// The agent could not start; the message is in `err`.
pub const ATTACH_FAILED: c_int = -1;

/// Starts the agent in a process it was `dlopen`ed into. `runtime_dir` (NULL or empty: the
/// default) is where the control socket goes. Returns [`ATTACH_STARTED`],
/// [`ATTACH_ALREADY`] or [`ATTACH_FAILED`] with a NUL-terminated message in `err` (at most
/// `err_len` bytes, truncated).
///
/// # Safety
/// `runtime_dir` is NULL or a NUL-terminated string; `err` is NULL or valid for `err_len`
/// bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn kgpatch_agent_attach(
    runtime_dir: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    if crate::is_active() {
        return ATTACH_ALREADY;
    }
    if !runtime_dir.is_null() {
        // SAFETY: the caller passes a NUL-terminated string (contract above).
        let dir = unsafe { CStr::from_ptr(runtime_dir) };
        if !dir.is_empty() {
            use std::os::unix::ffi::OsStrExt;
            let _ = RUNTIME_DIR.set(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())));
        }
    }
    // A panic must not unwind into the bootstrap's C frames.
    let started = std::panic::catch_unwind(|| {
        crate::set_origin(crate::protocol::Origin::Attach);
        strip_trap_from_handler_masks();
        crate::start().map_err(|e| e.to_string())
    });
    let message = match started {
        Ok(Ok(_)) => return ATTACH_STARTED,
        Ok(Err(message)) => message,
        Err(_) => "the agent panicked while starting".to_owned(),
    };
    // SAFETY: `err` is NULL or valid for `err_len` bytes (contract above).
    unsafe { write_message(err, err_len, &message) };
    ATTACH_FAILED
}

/// Copies `message`, truncated and NUL-terminated, into `err`.
///
/// # Safety
/// `err` is NULL or valid for `err_len` bytes of writes.
unsafe fn write_message(err: *mut c_char, err_len: usize, message: &str) {
    if err.is_null() || err_len == 0 {
        return;
    }
    let n = message.len().min(err_len - 1);
    // SAFETY: `n + 1 <= err_len` bytes of `err` are writable (contract); the source is a
    // valid slice of `n` bytes that does not overlap memory the caller owns.
    unsafe {
        std::ptr::copy_nonoverlapping(message.as_ptr().cast::<c_char>(), err, n);
        *err.add(n) = 0;
    }
}

/// Takes SIGTRAP out of the mask of every handler the program installed before the attach
/// (see the module docs). A handler the program replaces at this very moment could be
/// overwritten by the one read a moment before; programs install handlers at start, long
/// before an attach, and ARCHITECTURE.md lists the window.
fn strip_trap_from_handler_masks() {
    for sig in 1..=libc::SIGRTMAX() {
        if matches!(sig, libc::SIGKILL | libc::SIGSTOP | libc::SIGTRAP) {
            continue;
        }
        let Some(mut act) = current_action(sig) else {
            continue;
        };
        if act.sa_sigaction == libc::SIG_DFL || act.sa_sigaction == libc::SIG_IGN {
            continue;
        }
        // SAFETY: `act.sa_mask` is a valid sigset.
        if unsafe { libc::sigismember(&act.sa_mask, libc::SIGTRAP) } != 1 {
            continue;
        }
        // SAFETY: as above.
        unsafe { libc::sigdelset(&mut act.sa_mask, libc::SIGTRAP) };
        // SAFETY: `act` is the handler the kernel just gave us, with one signal taken out of
        // its mask: a valid disposition for `sig`.
        let _ = unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
    }
}

/// The disposition of `sig`, or `None` when the kernel does not give it.
fn current_action(sig: c_int) -> Option<libc::sigaction> {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action only reads.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } == 0).then_some(old)
}
