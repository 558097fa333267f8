//! Errors: why a function cannot be patched ([`Refusal`]), and what went wrong while patching
//! ([`Error`]).

use std::io;

/// Why a function's entry cannot hold a patch site. Each message is one sentence for the
/// user: what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The function is shorter than the bytes the site jump overwrites.
    #[error(
        "function at {entry:#x} is {size} bytes long but the patch site needs {needed} bytes after the entry: patch its caller instead"
    )]
    TooShort {
        /// Entry of the function.
        entry: u64,
        /// Its size from the symbol table.
        size: u64,
        /// Bytes the site needs from the patch point on (endbr64 included).
        needed: u64,
    },
    /// A branch lands inside the bytes the site overwrites (not at their start).
    #[error(
        "the branch at {from:#x} lands at {target:#x}, inside the bytes the patch site overwrites: patch its caller instead"
    )]
    BranchIntoSite {
        /// Address of the branch instruction.
        from: u64,
        /// Where it lands.
        target: u64,
    },
    /// An instruction among the overwritten ones cannot be moved into a trampoline.
    #[error(
        "the instruction `{text}` at {ip:#x} is in the bytes the patch site overwrites and cannot be relocated ({why}): patch its caller instead"
    )]
    NotRelocatable {
        /// Its address.
        ip: u64,
        /// Its disassembly.
        text: String,
        /// Why it cannot move.
        why: &'static str,
    },
    /// A RIP-relative operand among the overwritten instructions would be out of reach of
    /// the trampoline.
    #[error(
        "the instruction at {ip:#x} refers to {target:#x}, which no trampoline within ±2 GiB of the site can reach: patch its caller instead"
    )]
    RipRelativeOutOfRange {
        /// Address of the instruction.
        ip: u64,
        /// Where its operand points.
        target: u64,
    },
    /// The entry already holds a jump or a breakpoint that kgpatch did not put there.
    #[error(
        "the entry of the function at {entry:#x} already holds `{text}`, which kgpatch did not write: remove the other tool's patch or breakpoint first, or, if the function is a jump thunk, patch its target"
    )]
    ForeignPatch {
        /// Entry of the function.
        entry: u64,
        /// The instruction found at the patch point.
        text: String,
    },
    /// The bytes of the function cannot be decoded as x86-64 code.
    #[error(
        "the bytes at {ip:#x} are not a valid x86-64 instruction: check the function's address and size"
    )]
    Undecodable {
        /// Address of the bad bytes.
        ip: u64,
    },
    /// The caller said the function has a patchable-entry NOP pad, but there is none.
    #[error(
        "the function at {entry:#x} has no NOP pad of at least 5 bytes before its entry: build it with -fpatchable-function-entry=N,M (M >= 5) or do not require a pad"
    )]
    NoPad {
        /// Entry of the function.
        entry: u64,
    },
}

/// What went wrong while patching, or while setting up the patcher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The function cannot be patched.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A system call failed.
    #[error("{call} failed while {doing}: {source}")]
    Os {
        /// The system call (or file) that failed.
        call: &'static str,
        /// What kgpatch was doing.
        doing: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Writing code through /proc/self/mem is refused by the kernel.
    #[error(
        "the kernel refuses writes to code through /proc/self/mem ({source}); boot with proc_mem.force_override=always or ptrace_scope that allows it"
    )]
    ProcMemRefused {
        /// The OS error.
        source: io::Error,
    },
    /// The TLS slot is not at the same `%fs` offset in every thread.
    #[error(
        "the universe-word TLS slot is at fs:{first:#x} in one thread and fs:{second:#x} in another; load kgpatch with LD_PRELOAD or link it into the executable"
    )]
    TlsOffsetDiffers {
        /// Offset seen in the first thread.
        first: i64,
        /// Offset seen in a second thread.
        second: i64,
    },
    /// The TLS offset does not fit the stub's 32-bit displacement.
    #[error(
        "the universe-word TLS slot is at fs:{offset:#x}, too far for a 32-bit displacement; load kgpatch with LD_PRELOAD or link it into the executable"
    )]
    TlsOffsetTooFar {
        /// The offset.
        offset: i64,
    },
    /// No free address range for stubs within ±2 GiB of the site.
    #[error(
        "no free address range within ±2 GiB of {site:#x} for its redirect stub: the address space around the function is full"
    )]
    NoMemoryNearSite {
        /// The patch point.
        site: u64,
    },
    /// A signal kgpatch needs already has a handler that is not kgpatch's.
    #[error(
        "signal {signal} already has a handler that is not kgpatch's; configure another real-time signal for kgpatch"
    )]
    SignalInUse {
        /// The signal number.
        signal: i32,
    },
    /// The configured signal number is not a valid signal.
    #[error("{signal} is not a signal number kgpatch can use; configure a real-time signal (SIGRTMIN..=SIGRTMAX)")]
    BadSignal {
        /// The number given.
        signal: i32,
    },
    /// Only one patcher may exist in a process.
    #[error("a kgpatch patcher already exists in this process; use that one")]
    AlreadyExists,
    /// A site is already installed at that entry.
    #[error(
        "a patch site is already installed at {entry:#x}; use it instead of installing a second"
    )]
    AlreadyInstalled {
        /// The entry.
        entry: u64,
    },
    /// No site is installed at that entry.
    #[error("no patch site is installed at {entry:#x}")]
    NotInstalled {
        /// The entry.
        entry: u64,
    },
    /// The function changed between analysis and install.
    #[error(
        "the bytes at {entry:#x} changed since they were analysed; analyse the function again"
    )]
    Stale {
        /// The entry.
        entry: u64,
    },
    /// The site is not in the state the operation needs.
    #[error("the site at {entry:#x} {what}")]
    WrongState {
        /// The entry.
        entry: u64,
        /// What is wrong, e.g. "is in a transition: wait until it is steady".
        what: &'static str,
    },
    /// Some threads could not be checked or moved before the deadline.
    #[error(
        "threads {tids:?} could not be reached by signal {signal} in time ({why}); nothing was changed, try again or unblock the signal in those threads"
    )]
    ThreadsUnreachable {
        /// The signal used.
        signal: i32,
        /// The thread ids.
        tids: Vec<i32>,
        /// Blocked, or timed out.
        why: &'static str,
    },
    /// Threads block SIGTRAP (typically with the raw `rt_sigprocmask` system call, which the
    /// preloaded agent cannot see): one running into the int3 of a code write would be
    /// killed by the kernel together with the whole process.
    #[error(
        "threads {tids:?} block SIGTRAP, so one running into the breakpoint kgpatch writes while patching would kill the process; nothing was written: unblock SIGTRAP in those threads (or load kgpatch so that it sees their signal masks) and try again"
    )]
    TrapBlocked {
        /// The thread ids.
        tids: Vec<i32>,
    },
    /// Threads were interrupted inside the bytes a site overwrites by a signal whose handler
    /// is still running: they would return into the middle of the new jump.
    #[error(
        "threads {tids:?} were interrupted inside the bytes the patch site at {site:#x} overwrites and are still in a signal handler; nothing was changed: try again once their handlers have returned"
    )]
    InterruptedInside {
        /// The patch point.
        site: u64,
        /// The thread ids.
        tids: Vec<i32>,
    },
    /// iced-x86 could not encode generated code (a bug, or an out-of-range operand).
    #[error("encoding code for the site at {entry:#x} failed: {message}")]
    Encode {
        /// The entry.
        entry: u64,
        /// iced-x86's message.
        message: String,
    },
    /// Too many distinct addresses were patched for the trap table.
    #[error("kgpatch can track at most {max} patched addresses in one process")]
    TooManySites {
        /// The limit.
        max: usize,
    },
    /// The bytes at a site are no longer the jump kgpatch wrote there: the code was
    /// unloaded and something else mapped in its place, or loaded again with its original
    /// bytes. kgpatch writes nothing there.
    #[error(
        "the bytes at {at:#x} are no longer the jump kgpatch wrote for the function at {entry:#x} (found {}): the code there was unloaded or overwritten by something else, so kgpatch wrote nothing; check what is mapped at that address", hex(.found)
    )]
    SiteChanged {
        /// The patched function's entry.
        entry: u64,
        /// Where the bytes differ (the patch point, or the pad's jump).
        at: u64,
        /// The bytes found there.
        found: Vec<u8>,
    },
}

/// Bytes as `e9 12 34 56 78`.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Error {
    pub(crate) fn os(call: &'static str, doing: &'static str) -> Error {
        Error::Os {
            call,
            doing,
            source: io::Error::last_os_error(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
