//! The SIGTRAP handler: sends a thread that hit one of kgpatch's int3 bytes on to a place
//! equivalent to the instruction being rewritten, re-executes the instruction when the int3
//! is already gone (a late trap), and hands every other trap to the handler the program had.
//!
//! It runs with every signal blocked, so no handler of the program (which might call a
//! patched function and meet the int3 with SIGTRAP blocked) nests inside it.
//!
//! # Async-signal safety
//! The handler reads a fixed table of atomics (no allocation, no lock, bounded scan), one
//! byte of code, and the saved previous disposition (written once before the handler is
//! installed).
//!
//! # Safety
//! The unsafe here is `sigaction` on stack-owned structures; the kernel's `siginfo` and
//! `ucontext`, valid for the handler's duration and the handler's alone; one volatile read
//! of the byte the thread just trapped on (mapped and readable, since the thread executed
//! it); and calling the previous handler through the address and `SA_SIGINFO` flag the
//! program itself installed, exactly as the kernel would have called it.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// How many distinct addresses the table can follow.
pub const MAX_TRAP_SITES: usize = 4096;

const INT3: u8 = 0xCC;

struct TrapSlot {
    /// The address of a byte where kgpatch puts int3 (0 = free).
    addr: AtomicU64,
    /// Where a thread that traps there goes (0 = nowhere: re-execute).
    dest: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: TrapSlot = TrapSlot {
    addr: AtomicU64::new(0),
    dest: AtomicU64::new(0),
};
static TABLE: [TrapSlot; MAX_TRAP_SITES] = [FREE; MAX_TRAP_SITES];
static USED: AtomicUsize = AtomicUsize::new(0);
static REGISTER_LOCK: Mutex<()> = Mutex::new(());

static PREV_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_FLAGS: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Counts of traps taken, for tests and diagnostics.
#[derive(Debug)]
pub struct TrapCounts {
    /// Traps on one of kgpatch's int3 bytes, sent on to the equivalent instruction.
    pub sent_on: AtomicU64,
    /// Late traps (the int3 was already gone), re-executed at the trapping address.
    pub reexecuted: AtomicU64,
    /// Traps that were not kgpatch's, handed to the program's previous disposition.
    pub chained: AtomicU64,
}

/// The process's trap counts (relaxed counters, bumped in the handler).
pub static TRAP_COUNTS: TrapCounts = TrapCounts {
    sent_on: AtomicU64::new(0),
    reexecuted: AtomicU64::new(0),
    chained: AtomicU64::new(0),
};

/// Installs the handler once, keeping the previous one to chain to.
pub fn install() -> Result<()> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    // SAFETY: zeroed is a valid sigaction to receive the old disposition.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: query only; `old` is a valid out-pointer.
    if unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut old) } != 0 {
        return Err(Error::os("sigaction", "reading the SIGTRAP handler"));
    }
    PREV_HANDLER.store(old.sa_sigaction, Ordering::SeqCst);
    PREV_FLAGS.store(old.sa_flags as usize, Ordering::SeqCst);
    // SAFETY: zeroed is a valid starting sigaction.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigtrap as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
    // Every signal waits while the trap handler runs. A program's handler nested in it
    // would run with SIGTRAP blocked (the kernel blocks a signal during its own handler),
    // and if it called a function whose entry holds our int3 the kernel would kill the
    // process (issue 10, item 6). And the handler may run on a small alternate stack (Rust
    // gives every thread 8 KiB), where a sweep's handler (a whole stack walk) delivered on
    // top of it would overflow it. The handler is short and bounded, so nothing waits long.
    // SAFETY: `act.sa_mask` is a valid sigset to fill.
    unsafe {
        libc::sigfillset(&mut act.sa_mask);
    }
    // sigfillset leaves out glibc's own signals: SIGCANCEL would unwind out of the handler.
    kgpatch_sys::signal::add_libc_reserved(&mut act.sa_mask);
    // SAFETY: `act` is initialised; the handler is async-signal-safe.
    if unsafe { libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()) } != 0 {
        return Err(Error::os("sigaction", "installing the SIGTRAP handler"));
    }
    *installed = true;
    Ok(())
}

/// `true` if SIGTRAP is still handled by kgpatch (a program may have replaced the handler
/// since; patching is then unsafe: a thread hitting an int3 would not be sent on).
pub fn intact() -> bool {
    current_handler(libc::SIGTRAP) == Some(on_sigtrap as *const () as usize)
}

/// The address of the handler in force for `signal`.
pub(crate) fn current_handler(signal: libc::c_int) -> Option<usize> {
    // SAFETY: zeroed is a valid sigaction to receive the disposition; query only.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a valid out-pointer; a null new action only reads.
    (unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } == 0)
        .then_some(old.sa_sigaction)
}

/// Follows traps at `addr` from now on, sending threads to `dest`. Reuses the slot of an
/// address already followed.
pub fn register(addr: u64, dest: u64) -> Result<()> {
    let _guard = REGISTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let used = USED.load(Ordering::Acquire);
    if let Some(slot) = TABLE[..used]
        .iter()
        .find(|s| s.addr.load(Ordering::Relaxed) == addr)
    {
        slot.dest.store(dest, Ordering::SeqCst);
        return Ok(());
    }
    if used == MAX_TRAP_SITES {
        return Err(Error::TooManySites {
            max: MAX_TRAP_SITES,
        });
    }
    TABLE[used].dest.store(dest, Ordering::SeqCst);
    TABLE[used].addr.store(addr, Ordering::SeqCst);
    USED.store(used + 1, Ordering::SeqCst);
    Ok(())
}

/// Threads running [`on_sigtrap`] right now (0 = free slot). Such a thread shows every
/// signal blocked in `/proc`, which is not the program blocking SIGTRAP: the code writer's
/// checks must not take it for one.
static IN_HANDLER: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
/// Threads in the handler that found no free slot: while non-zero, [`in_handler`] cannot
/// tell, and says no (the writer then waits or refuses: the safe side).
static IN_HANDLER_OVERFLOW: AtomicUsize = AtomicUsize::new(0);

/// Entries into the handler, ever: a reader of `/proc` that saw the same count before and
/// after its read, and no thread inside, knows no thread was in the handler meanwhile.
static ENTRIES: AtomicU64 = AtomicU64::new(0);

/// A token for [`quiet_since`]: the entry count, or `None` while some thread is inside.
pub fn quiet_token() -> Option<u64> {
    let n = ENTRIES.load(Ordering::SeqCst);
    let busy = IN_HANDLER_OVERFLOW.load(Ordering::SeqCst) != 0
        || IN_HANDLER.iter().any(|t| t.load(Ordering::SeqCst) != 0);
    (!busy).then_some(n)
}

/// `true` if no thread ran the handler between `quiet_token()` returning `token` and now.
pub fn quiet_since(token: Option<u64>) -> bool {
    token.is_some() && quiet_token() == token
}

/// `true` if thread `tid` is running kgpatch's SIGTRAP handler now (so the signals it
/// blocks are the handler's, not the program's).
pub fn in_handler(tid: i32) -> bool {
    tid != 0 && IN_HANDLER.iter().any(|t| t.load(Ordering::SeqCst) == tid)
}

/// Marks the calling thread as inside the handler until dropped. Async-signal-safe.
struct InHandler(Option<usize>);

impl InHandler {
    fn enter() -> InHandler {
        ENTRIES.fetch_add(1, Ordering::SeqCst);
        let tid = crate::sweep::gettid();
        for (i, t) in IN_HANDLER.iter().enumerate() {
            if t.compare_exchange(0, tid, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                return InHandler(Some(i));
            }
        }
        IN_HANDLER_OVERFLOW.fetch_add(1, Ordering::SeqCst);
        InHandler(None)
    }
}

impl Drop for InHandler {
    fn drop(&mut self) {
        match self.0 {
            Some(i) => IN_HANDLER[i].store(0, Ordering::SeqCst),
            None => {
                IN_HANDLER_OVERFLOW.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _inside = InHandler::enter();
    let entered = crate::sweep::cost::now_ns();
    if !info.is_null() && !ctx.is_null() {
        // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler,
        // ours alone for the duration of the handler.
        let (code, uc) = unsafe { ((*info).si_code, &mut *(ctx as *mut libc::ucontext_t)) };
        // `SI_KERNEL` is the `si_code` of a trap raised by an `int3` instruction.
        if code == libc::SI_KERNEL && redirect(uc) {
            crate::sweep::cost::record_run(crate::sweep::cost::now_ns().saturating_sub(entered));
            return;
        }
    }
    // The program's handler is not ours: a thread in it blocks what it blocks for the
    // program's reasons (and it may never return here, if it jumps out).
    drop(_inside);
    chain(sig, info, ctx);
}

/// Acts on a trap at one of our addresses; `false` if the trap is not ours.
fn redirect(uc: &mut libc::ucontext_t) -> bool {
    let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    let at = rip.wrapping_sub(1);
    let used = USED.load(Ordering::Acquire);
    let Some(slot) = TABLE[..used]
        .iter()
        .find(|s| s.addr.load(Ordering::Acquire) == at)
    else {
        return false;
    };
    // SAFETY: `at` is the address of code the thread just executed (it trapped on the byte
    // before `rip`), so it is mapped and readable; the read is volatile because another
    // thread rewrites it.
    let byte = unsafe { std::ptr::read_volatile(at as *const u8) };
    let dest = slot.dest.load(Ordering::Acquire);
    if byte == INT3 && dest != 0 {
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = dest as i64;
        TRAP_COUNTS.sent_on.fetch_add(1, Ordering::Relaxed);
    } else {
        // The int3 is gone: run whatever is there now.
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = at as i64;
        TRAP_COUNTS.reexecuted.fetch_add(1, Ordering::Relaxed);
    }
    true
}

fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    TRAP_COUNTS.chained.fetch_add(1, Ordering::Relaxed);
    let prev = PREV_HANDLER.load(Ordering::SeqCst);
    let flags = PREV_FLAGS.load(Ordering::SeqCst) as libc::c_int;
    if prev == libc::SIG_IGN {
        return;
    }
    if prev == libc::SIG_DFL {
        // Restore the default action and raise again: the signal is blocked while this
        // handler runs, so it is delivered (and kills the process with a core, as it would
        // have without kgpatch) as soon as the handler returns.
        // SAFETY: zeroed is a valid sigaction; setting SIG_DFL and raising are
        // async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            libc::raise(sig);
        }
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed this address as an SA_SIGINFO handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(prev) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed this address as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
        f(sig);
    }
}
