//! Signal frames further out on a thread's stack: the contexts a thread will return to when
//! the signal handlers it is running return.
//!
//! A thread interrupted inside the bytes a patch site overwrites by a program's signal
//! handler is not *at* those bytes while the handler runs: the pc it will go back to lies in
//! the kernel's signal frame on its stack, and `rt_sigreturn` restores it later. The sweep
//! that moves threads out of the overwritten bytes sees only the innermost context, so this
//! module looks further out: it scans the stack above a stack pointer for the kernel's
//! `rt_sigframe`s and reports the interrupted pc of each.
//!
//! # How a frame is recognised
//! On x86-64 the kernel builds every signal frame the same way (`arch/x86/kernel/signal.c`):
//! `pretcode` (the handler's `sa_restorer`, which the kernel requires), then the
//! `ucontext` and the `siginfo`, with the FPU state 64-byte aligned just above. A word on the
//! stack counts as a frame only if it equals the restorer of a handler installed in the
//! process (glibc's `__restore_rt`, or another a program gave) **and** the words around it
//! look exactly as the kernel writes them: `uc_link` 0, only known `uc_flags`, the user code
//! segment in `cs`, bit 1 of `rflags` set, a signal number in `si_signo`, the FPU-state
//! pointer 64-byte aligned right above the frame.
//!
//! # Soundness
//! The scan is used to *refuse*, never to change memory: a frame it finds (even a stale copy
//! of an old frame left in a live buffer) only makes the caller wait and try again, or give
//! up with an error, so a false positive costs a retry and never corrupts anything. It can
//! miss a frame that lies more than [`MAX_SCAN`] bytes above the stack pointer, above an
//! unreadable page, or whose handler's `sa_restorer` was replaced since the frame was built
//! (docs/ARCHITECTURE.md, "Our signals and the program's").
//!
//! # Async-signal safety
//! Memory is read with `pread` from `/proc/self/mem` (one system call, which fails instead
//! of faulting where nothing is mapped) into a 512-byte buffer on the caller's stack, only
//! up to the end of the writable mapping that held the stack pointer in a snapshot taken
//! before the sweep; nothing allocates, no lock is taken, and the scan
//! stops after [`MAX_SCAN`] bytes and [`MAX_REGIONS`] stacks.
//!
//! # Safety
//! The unsafe is `sigaction` queries into stack-owned structures and `pread` into a buffer
//! of ours, bounded by its length. Stack memory is never dereferenced: it is copied through
//! `/proc/self/mem`, which fails instead of faulting on an unmapped page.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// How far above a stack pointer the scan looks for signal frames.
pub const MAX_SCAN: u64 = 512 * 1024;
/// How many distinct stacks (the thread's stack, an alternate signal stack) a scan follows.
pub const MAX_REGIONS: usize = 4;
/// `SA_RESTORER` (x86-64; the libc crate does not export it for glibc).
const SA_RESTORER: libc::c_int = 0x0400_0000;
/// How many distinct `sa_restorer` addresses are looked for.
const MAX_RESTORERS: usize = 8;

/// Words of a frame read for the checks: up to and including `si_signo`.
const FRAME_WORDS: usize = 40;
/// Offsets (in 8-byte words) in the kernel's `rt_sigframe`, from `pretcode`.
const UC_FLAGS: usize = 1;
const UC_LINK: usize = 2;
/// `uc_mcontext.gregs` starts at word 6; `REG_RSP` is 15, `REG_RIP` 16, `REG_EFL` 17,
/// `REG_CSGSFS` 18; the FPU-state pointer follows the 23 registers.
const GREGS: usize = 6;
const FPSTATE: usize = GREGS + 23;
/// `si_signo`, the first field of the `siginfo` after the 304-byte `ucontext`.
const SIGNO: usize = 39;
/// Where the FPU state may lie above the frame (456 bytes on the kernels seen; a margin for
/// others).
const FPSTATE_MIN: u64 = 440;
const FPSTATE_MAX: u64 = 640;

/// What a scan needs, read before a sweep (this allocates): the `sa_restorer`s of the
/// handlers installed in the process, and the writable mappings (where stacks are), so a
/// scan stops at the end of the stack it is on.
#[derive(Debug, Clone)]
pub struct Restorers {
    addrs: [u64; MAX_RESTORERS],
    n: usize,
    /// Sorted, disjoint `[start, end)` of the writable mappings of `/proc/self/maps`.
    writable: Vec<(u64, u64)>,
    /// An open `/proc/self/mem` (the code writer's), read with `pread`.
    mem_fd: i32,
}

impl Restorers {
    /// Reads every signal's disposition (64 `sigaction` queries) and keeps the distinct
    /// restorers of installed handlers, and reads `/proc/self/maps` (if that fails, scans
    /// are bounded by [`MAX_SCAN`] alone).
    /// `mem_fd` is an open `/proc/self/mem`, kept open while the scans run.
    pub fn current(mem_fd: i32) -> Restorers {
        let mut r = Restorers {
            addrs: [0; MAX_RESTORERS],
            n: 0,
            writable: writable_mappings(),
            mem_fd,
        };
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            if let Some(addr) = restorer_of(sig) {
                r.add(addr);
            }
        }
        r
    }

    fn add(&mut self, addr: u64) {
        if addr == 0 || self.addrs[..self.n].contains(&addr) || self.n == MAX_RESTORERS {
            return;
        }
        self.addrs[self.n] = addr;
        self.n += 1;
    }

    fn contains(&self, word: u64) -> bool {
        word != 0 && self.addrs[..self.n].contains(&word)
    }

    /// Where a scan from `sp` ends: the end of the writable mapping that held `sp` when the
    /// snapshot was taken, at most [`MAX_SCAN`] above it. A mapping made since is scanned
    /// for [`MAX_SCAN`] (reads stop at the first unreadable page anyway).
    fn scan_end(&self, sp: u64) -> u64 {
        let cap = sp.saturating_add(MAX_SCAN);
        let i = self.writable.partition_point(|&(start, _)| start <= sp);
        match i.checked_sub(1).map(|i| self.writable[i]) {
            Some((_, end)) if sp < end => end.min(cap),
            _ => cap,
        }
    }
}

/// The writable mappings of the process, sorted, adjacent ones merged (none when the maps
/// cannot be read: every scan is then capped at [`MAX_SCAN`]).
fn writable_mappings() -> Vec<(u64, u64)> {
    let maps = kgpatch_sys::proc::maps(kgpatch_sys::proc::Pid::This).unwrap_or_default();
    let mut v: Vec<(u64, u64)> = Vec::new();
    for m in maps.iter().filter(|m| m.write) {
        match v.last_mut() {
            Some(last) if last.1 == m.start => last.1 = m.end,
            _ => v.push((m.start, m.end)),
        }
    }
    v
}

fn restorer_of(sig: libc::c_int) -> Option<u64> {
    // SAFETY: zeroed is a valid sigaction to receive a disposition.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads; `old` is a valid out-pointer.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return None;
    }
    if old.sa_sigaction == libc::SIG_DFL || old.sa_sigaction == libc::SIG_IGN {
        return None;
    }
    if old.sa_flags & SA_RESTORER == 0 {
        return None;
    }
    old.sa_restorer.map(|f| f as usize as u64)
}

/// What a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// No signal frame above the stack pointer holds a pc the predicate accepts.
    Clear,
    /// A signal frame holds such a pc.
    Inside,
    /// The stack could not be read at the stack pointer itself (the caller must assume the
    /// worst).
    Unreadable,
}

/// Reads words at `addr` into `buf` through the process's `/proc/self/mem` (`mem_fd`);
/// how many whole words were read (0 on error). Async-signal-safe (one `pread`). The kernel
/// fails (EIO) instead of faulting where nothing is mapped. `pread` is used rather than
/// `process_vm_readv` because a seccomp filter for services (systemd's `@system-service`)
/// allows it: the writer already needs that file.
fn read_words(mem_fd: i32, addr: u64, buf: &mut [u64]) -> usize {
    let Ok(offset) = libc::off64_t::try_from(addr) else {
        return 0;
    };
    // SAFETY: `buf` is ours, writable, `size_of_val(buf)` bytes long; pread writes at most
    // that many bytes into it.
    let n = unsafe {
        libc::pread64(
            mem_fd,
            buf.as_mut_ptr().cast(),
            std::mem::size_of_val(buf),
            offset,
        )
    };
    if n <= 0 {
        0
    } else {
        n as usize / 8
    }
}

/// `true` if the words of a candidate frame at `at` are what the kernel writes.
fn plausible(at: u64, f: &[u64; FRAME_WORDS]) -> bool {
    let rflags = f[GREGS + libc::REG_EFL as usize];
    let csgsfs = f[GREGS + libc::REG_CSGSFS as usize];
    let fpstate = f[FPSTATE];
    let signo = f[SIGNO] as u32;
    f[UC_LINK] == 0
        && f[UC_FLAGS] & !0x7 == 0
        && csgsfs & 0xffff == 0x33
        && rflags & 0x2 != 0
        && (1..=64).contains(&signo)
        && fpstate % 64 == 0
        && fpstate
            .checked_sub(at)
            .is_some_and(|d| (FPSTATE_MIN..=FPSTATE_MAX).contains(&d))
}

/// Scans the stack above `sp` (the stack pointer of a thread's innermost context, or of a
/// thread parked in the kernel) for signal frames whose interrupted pc `inside` accepts.
/// Follows a frame's interrupted stack pointer when it lies on another stack (a handler on
/// an alternate signal stack). Async-signal-safe; reads only through `pread`.
pub fn scan(sp: u64, restorers: &Restorers, inside: &dyn Fn(u64) -> bool) -> Scan {
    let mut regions: [u64; MAX_REGIONS] = [0; MAX_REGIONS];
    regions[0] = sp;
    let mut n_regions = 1;
    let mut r = 0;
    let mut buf = [0u64; 64];
    let mut first = true;
    while r < n_regions {
        let start = regions[r] & !7;
        let end = restorers.scan_end(start);
        r += 1;
        let mut at = start;
        while at < end {
            let want = (((end - at) / 8) as usize).min(buf.len());
            if want == 0 {
                break;
            }
            let got = read_words(restorers.mem_fd, at, &mut buf[..want]);
            if got == 0 {
                if first {
                    return Scan::Unreadable;
                }
                break;
            }
            first = false;
            for (i, &word) in buf[..got].iter().enumerate() {
                if !restorers.contains(word) {
                    continue;
                }
                let frame_at = at + 8 * i as u64;
                let mut frame = [0u64; FRAME_WORDS];
                if read_words(restorers.mem_fd, frame_at, &mut frame) != FRAME_WORDS
                    || !plausible(frame_at, &frame)
                {
                    continue;
                }
                let pc = frame[GREGS + libc::REG_RIP as usize];
                if inside(pc) {
                    return Scan::Inside;
                }
                // The interrupted context ran on another stack (this frame is on an
                // alternate signal stack): scan that one too.
                let outer_sp = frame[GREGS + libc::REG_RSP as usize];
                let on_a_scanned_stack = regions[..n_regions]
                    .iter()
                    .any(|&s| (s..s.saturating_add(MAX_SCAN)).contains(&outer_sp));
                if !on_a_scanned_stack && n_regions < MAX_REGIONS {
                    regions[n_regions] = outer_sp;
                    n_regions += 1;
                }
            }
            if got < want {
                break;
            }
            at += 8 * got as u64;
        }
    }
    Scan::Clear
}

/// Thread ids recorded by signal handlers (no allocation): the threads a sweep found with a
/// signal frame inside the bytes being overwritten.
#[derive(Debug)]
pub struct Found {
    tids: [AtomicI32; 16],
    n: AtomicUsize,
}

impl Default for Found {
    fn default() -> Self {
        Found {
            tids: std::array::from_fn(|_| AtomicI32::new(0)),
            n: AtomicUsize::new(0),
        }
    }
}

impl Found {
    /// Records `tid` (async-signal-safe; beyond 16 threads only the count grows).
    pub fn record(&self, tid: i32) {
        let i = self.n.fetch_add(1, Ordering::AcqRel);
        if let Some(slot) = self.tids.get(i) {
            slot.store(tid, Ordering::Release);
        }
    }

    /// The recorded ids (a thread may appear twice), and forgets them.
    pub fn take(&self) -> Vec<i32> {
        let n = self.n.swap(0, Ordering::AcqRel).min(self.tids.len());
        let mut v: Vec<i32> = self.tids[..n]
            .iter()
            .map(|t| t.swap(0, Ordering::AcqRel))
            .filter(|&t| t != 0)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}
