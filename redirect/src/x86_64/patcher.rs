//! The patcher: installs patch sites, switches their fast path, removes them, and reclaims
//! their memory.
//!
//! # Safety
//! The unsafe here is plain stores into the site-word data of slots handed out by
//! [`memory`](super::memory): those pages are read+write, mapped for the life of the
//! process, and the slots are aligned and sized for the words; fresh site words are written
//! before any stub that reads them is reachable, and words other threads read are reached
//! only as atomics.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kgpatch_universe::{NewSite, Site, Version};

use super::analysis::{analyze_bytes, PadHint, SiteAnalysis, JMP32_LEN};
use super::encode;
use super::memory::{self, Pool, Slot};
use super::sigframe;
use super::text::{CodeWriter, SyncMethod};
use super::trap;
use super::unwind::{self, Registered};
use crate::error::{Error, Refusal, Result};
use crate::sweep::{self, Sweep, SweepAction};
use crate::tls;

static ALIVE: AtomicBool = AtomicBool::new(false);

/// How [`Patcher::sweep_all`] looks at contexts further out than the innermost: the pcs that
/// count, the restorers of signal frames, where handlers record threads found, and the site
/// (for the error).
type Outer<'a> = (
    &'a dyn Fn(u64) -> bool,
    &'a sigframe::Restorers,
    &'a sigframe::Found,
    u64,
);

/// How the patcher is set up.
#[derive(Debug, Clone, Copy)]
pub struct PatcherConfig {
    /// The real-time signal of the thread sweep (moving threads out of overwritten bytes,
    /// checking stub memory is unused). Pick one the program does not use.
    pub sweep_signal: libc::c_int,
    /// How long a sweep waits for every thread.
    pub sweep_timeout: Duration,
    /// Serialise cores with a signal sweep even where membarrier `SYNC_CORE` exists (the
    /// fallback for kernels without it; for tests).
    pub force_sweep_sync: bool,
}

impl Default for PatcherConfig {
    fn default() -> Self {
        PatcherConfig {
            sweep_signal: libc::SIGRTMAX() - 8,
            sweep_timeout: Duration::from_secs(2),
            force_sweep_sync: false,
        }
    }
}

/// A patch site as the rest of kgpatch sees it. `Copy`: the memory it points to is never
/// unmapped.
#[derive(Debug, Clone, Copy)]
pub struct SiteHandle {
    entry: u64,
    site: &'static Site,
    original: Version,
    stub: u64,
}

impl SiteHandle {
    /// The patched function's entry (the universe's `SiteKey`).
    pub fn entry(&self) -> u64 {
        self.entry
    }
    /// The site words the stub reads (for [`kgpatch_universe::Universe`]).
    pub fn site(&self) -> &'static Site {
        self.site
    }
    /// The original version: the trampoline.
    pub fn original(&self) -> Version {
        self.original
    }
    /// The redirect stub's address.
    pub fn stub(&self) -> u64 {
        self.stub
    }
    /// The site as the universe takes it.
    pub fn new_site(&self) -> NewSite<&'static Site> {
        NewSite {
            key: self.entry,
            site: self.site,
            original: self.original,
        }
    }
}

/// What a code range of kgpatch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// A redirect stub (and its fast-path thunk).
    Stub,
    /// A trampoline to an original version.
    Trampoline,
}

/// A range of code kgpatch generated. A pc inside one counts as busy for migration: the
/// stub may already have read the thread's old universe word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The site's entry.
    pub entry: u64,
    /// Stub or trampoline.
    pub kind: CodeKind,
    /// `false` once the site was removed (memory not yet reclaimed).
    pub live: bool,
}

/// Counters, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Threads moved out of overwritten bytes into a trampoline.
    pub moved: u64,
    /// Traps on our int3 that were sent on.
    pub traps_sent_on: u64,
    /// Late traps re-executed.
    pub traps_reexecuted: u64,
    /// Sites installed, ever.
    pub installed: u64,
    /// Slots reclaimed, ever.
    pub reclaimed: u64,
}

struct Record {
    analysis: SiteAnalysis,
    slot: Slot,
    handle: SiteHandle,
    tramp_len: u64,
    unwind: Registered,
}

struct Retired {
    slot: Slot,
    entry: u64,
    tramp_len: u64,
    _unwind: Registered,
}

struct Inner {
    pool: Pool,
    sites: BTreeMap<u64, Record>,
    retired: Vec<Retired>,
    installed: u64,
    reclaimed: u64,
}

/// Installs and removes patch sites. One per process.
pub struct Patcher {
    config: PatcherConfig,
    tls_offset: i32,
    writer: CodeWriter,
    moved: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Patcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patcher")
            .field("tls_offset", &self.tls_offset)
            .field("sync", &self.writer.method())
            .finish_non_exhaustive()
    }
}

/// The original pc in the overwritten bytes → where its copy is in the trampoline.
pub fn moved_pc(
    pc: u64,
    patch_point: u64,
    len: u64,
    tramp: u64,
    map: &[(u64, u64)],
) -> Option<u64> {
    if pc < patch_point || pc >= patch_point + len {
        return None;
    }
    map.iter()
        .find(|&&(o, _)| patch_point + o == pc)
        .map(|&(_, t)| tramp + t)
}

impl Patcher {
    /// Sets up patching in this process: checks the TLS slot, installs the SIGTRAP and sweep
    /// handlers, checks that /proc/self/mem accepts code writes, and registers for
    /// membarrier core serialisation.
    pub fn new(config: PatcherConfig) -> Result<Patcher> {
        if ALIVE.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyExists);
        }
        let made = Self::make(config);
        if made.is_err() {
            ALIVE.store(false, Ordering::SeqCst);
        }
        made
    }

    fn make(config: PatcherConfig) -> Result<Patcher> {
        let tls_offset = tls::checked_offset()?;
        let sweep = Sweep::new(config.sweep_signal)?;
        trap::install()?;
        let probe = tls::offset_in_this_thread as *const () as u64;
        let writer = CodeWriter::new(sweep, config.sweep_timeout, probe, config.force_sweep_sync)?;
        Ok(Patcher {
            config,
            tls_offset,
            writer,
            moved: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                pool: Pool::default(),
                sites: BTreeMap::new(),
                retired: Vec::new(),
                installed: 0,
                reclaimed: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The universe word's offset from `%fs`.
    pub fn tls_offset(&self) -> i32 {
        self.tls_offset
    }

    /// How code writes are made visible to every core.
    pub fn sync_method(&self) -> SyncMethod {
        self.writer.method()
    }

    /// The thread sweep (the agent reuses it for migration).
    pub fn sweep(&self) -> &Sweep {
        self.writer.sweep()
    }

    /// `true` if kgpatch's SIGTRAP and sweep handlers are both still installed. A program
    /// that called `sigaction` for either since [`Patcher::new`] broke patching; the agent
    /// reports it (or interposes `sigaction`).
    pub fn handlers_intact(&self) -> bool {
        trap::intact() && self.writer.sweep().intact()
    }

    /// The configuration.
    pub fn config(&self) -> &PatcherConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        Stats {
            moved: self.moved.load(Ordering::Relaxed),
            traps_sent_on: trap::TRAP_COUNTS.sent_on.load(Ordering::Relaxed),
            traps_reexecuted: trap::TRAP_COUNTS.reexecuted.load(Ordering::Relaxed),
            installed: inner.installed,
            reclaimed: inner.reclaimed,
        }
    }

    /// Decides where the site of the function at `entry` (`size` bytes, from its symbol)
    /// goes, or why it cannot have one.
    pub fn analyze(&self, entry: u64, size: u64, pad: PadHint) -> Result<SiteAnalysis> {
        // Held while reading, so no rewrite of ours (int3 in place) is seen half-way.
        let inner = self.lock();
        if inner.sites.contains_key(&entry) {
            return Err(Error::AlreadyInstalled { entry });
        }
        let code = self
            .writer
            .read(entry, size as usize)
            .map_err(|_| Refusal::Undecodable { ip: entry })?;
        let before = [16u64, 5]
            .iter()
            .find_map(|&n| self.writer.read(entry.checked_sub(n)?, n as usize).ok())
            .unwrap_or_default();
        drop(inner);
        Ok(analyze_bytes(entry, &code, &before, pad)?)
    }

    /// Installs the site: the stub in place, steady at the original version (the
    /// trampoline), threads inside the overwritten bytes moved to the trampoline.
    pub fn install(&self, a: &SiteAnalysis) -> Result<SiteHandle> {
        let mut inner = self.lock();
        // Stub memory, site words and text are written as one sequence no fork splits.
        let _fork = crate::fork_guard();
        let entry = a.entry;
        if inner.sites.contains_key(&entry) {
            return Err(Error::AlreadyInstalled { entry });
        }
        self.check_unchanged(a)?;
        let mut reach = a.reach.clone();
        reach.extend(a.pad_jump);
        let slot = inner.pool.alloc(&reach)?;
        // Until the site's jump is written nothing points at the slot: on an error before
        // that, it can be reused at once.
        let tramp = match self.fill_slot(&inner.pool, a, &slot) {
            Ok(t) => t,
            Err(e) => {
                inner.pool.free(&slot);
                return Err(e);
            }
        };
        let tramp_addr = slot.code + memory::TRAMPOLINE;
        let stub_addr = slot.code + memory::STUB;
        let site = init_site(&slot, Version(tramp_addr));
        let unwind = match register_generated(a, &slot, &tramp) {
            Ok(u) => u,
            Err(e) => {
                inner.pool.free(&slot);
                return Err(e);
            }
        };
        let handle = SiteHandle {
            entry,
            site,
            original: Version(tramp_addr),
            stub: stub_addr,
        };
        let tramp_len = tramp.code.len() as u64;
        match self.write_site(a, stub_addr, tramp_addr, &tramp.map) {
            Ok(()) => {
                inner.installed += 1;
                let record = Record {
                    analysis: a.clone(),
                    slot,
                    handle,
                    tramp_len,
                    unwind,
                };
                inner.sites.insert(entry, record);
                Ok(handle)
            }
            Err(e) => {
                // Threads may have trapped into the stub meanwhile: reclaim it later.
                inner.retired.push(Retired {
                    slot,
                    entry,
                    tramp_len,
                    _unwind: unwind,
                });
                Err(e)
            }
        }
    }

    /// Refuses an analysis whose bytes (at the patch point, and in the pad when it uses
    /// one) are no longer what the function holds.
    fn check_unchanged(&self, a: &SiteAnalysis) -> Result<()> {
        let now = self.writer.read(a.patch_point, a.original.len()).ok();
        let pad_now = a.pad_jump.and_then(|j| self.writer.read(j, JMP32_LEN).ok());
        if now.as_deref() != Some(&a.original[..])
            || (a.pad_jump.is_some() && pad_now.as_deref() != Some(&a.pad_original[..]))
        {
            return Err(Error::Stale { entry: a.entry });
        }
        Ok(())
    }

    /// Encodes the stub, trampoline and fast-path thunk for `slot` and writes them into it.
    fn fill_slot(&self, pool: &Pool, a: &SiteAnalysis, slot: &Slot) -> Result<encode::Trampoline> {
        let (tramp, stub, thunk) = self.build(a, slot)?;
        pool.write_code(slot, memory::STUB, &stub)?;
        pool.write_code(slot, memory::TRAMPOLINE, &tramp.code)?;
        pool.write_code(slot, memory::THUNK, &thunk)?;
        Ok(tramp)
    }

    fn build(
        &self,
        a: &SiteAnalysis,
        slot: &Slot,
    ) -> Result<(encode::Trampoline, Vec<u8>, Vec<u8>)> {
        let entry = a.entry;
        let p = a.patch_point;
        let tramp_addr = slot.code + memory::TRAMPOLINE;
        let tramp = encode::trampoline(&a.instructions, p, tramp_addr, p + a.original.len() as u64)
            .map_err(
                |e| match a.instructions.iter().find(|i| i.is_ip_rel_memory_operand()) {
                    Some(i) => Error::Refused(Refusal::RipRelativeOutOfRange {
                        ip: i.ip(),
                        target: i.ip_rel_memory_address(),
                    }),
                    None => Error::Encode {
                        entry,
                        message: e.to_string(),
                    },
                },
            )?;
        if tramp.code.len() as u64 > memory::CODE_SLOT - memory::TRAMPOLINE {
            return Err(Error::Encode {
                entry,
                message: format!(
                    "trampoline of {} bytes does not fit its slot",
                    tramp.code.len()
                ),
            });
        }
        let stub =
            encode::stub(slot.code + memory::STUB, slot.data, self.tls_offset).map_err(|e| {
                Error::Encode {
                    entry,
                    message: e.to_string(),
                }
            })?;
        if stub.len() as u64 > memory::THUNK {
            return Err(Error::Encode {
                entry,
                message: format!("stub of {} bytes does not fit its slot", stub.len()),
            });
        }
        let thunk =
            encode::jmp_through(slot.code + memory::THUNK, slot.data + memory::THUNK_TARGET)
                .map_err(|e| Error::Encode {
                    entry,
                    message: e.to_string(),
                })?;
        Ok((tramp, stub, thunk))
    }

    /// Writes the jump(s) of a fresh site, moving threads out of the overwritten bytes.
    fn write_site(
        &self,
        a: &SiteAnalysis,
        stub: u64,
        tramp: u64,
        map: &[(u64, u64)],
    ) -> Result<()> {
        let p = a.patch_point;
        let ovl = a.original.len() as u64;
        let entry_jump: Vec<u8> = match a.pad_jump {
            Some(j) => {
                let long = encode::jmp32(j, stub).ok_or(Error::NoMemoryNearSite { site: p })?;
                // Nothing executes the pad (it is before the entry): a plain write will do.
                self.writer.write(j, &long)?;
                self.writer.sync()?;
                encode::jmp8(p, j)
                    .ok_or(Error::NoMemoryNearSite { site: p })?
                    .to_vec()
            }
            None => encode::jmp32(p, stub)
                .ok_or(Error::NoMemoryNearSite { site: p })?
                .to_vec(),
        };
        let moved = AtomicUsize::new(0);
        let found = sigframe::Found::default();
        let restorers = sigframe::Restorers::current(self.writer.mem_fd());
        let inside = |pc: u64| (p..p + ovl).contains(&pc);
        // A context further out (a program's handler interrupted the thread there) at `p`
        // itself is harmless: it returns to the start of the new jump.
        let outer_inside = |pc: u64| pc > p && pc < p + ovl;
        let result = self.refuse_sweep_blockers(&inside).and_then(|()| {
            self.writer.rewrite(p, a.original[0], &entry_jump, || {
                let action = |uc: &mut libc::ucontext_t| {
                    let rip = &mut uc.uc_mcontext.gregs[libc::REG_RIP as usize];
                    if let Some(to) = moved_pc(*rip as u64, p, ovl, tramp, map) {
                        *rip = to as i64;
                        moved.fetch_add(1, Ordering::Relaxed);
                    }
                    let sp = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as u64;
                    if sigframe::scan(sp, &restorers, &outer_inside) != sigframe::Scan::Clear {
                        found.record(sweep::gettid());
                    }
                };
                self.sweep_all(
                    &action,
                    inside,
                    (&outer_inside, &restorers, &found, p),
                    "moving threads out of the bytes a patch site overwrites",
                )
            })
        });
        self.moved
            .fetch_add(moved.load(Ordering::Relaxed) as u64, Ordering::Relaxed);
        if result.is_err() {
            if let Some(j) = a.pad_jump {
                self.writer.write(j, &a.pad_original)?;
                self.writer.sync()?;
            }
        }
        result
    }

    /// Refuses, before anything is written, when a thread blocks the sweep signal while it
    /// might stand in the bytes about to be overwritten: it runs (its pc cannot be known), or
    /// it is parked in the kernel at a pc `inside` them. Threads that block it only for a
    /// moment settle within the sweep timeout.
    fn refuse_sweep_blockers(&self, inside: &dyn Fn(u64) -> bool) -> Result<()> {
        let signal = self.writer.sweep().signal();
        let bit = sweep::signal_bit(signal);
        let deadline = std::time::Instant::now() + self.config.sweep_timeout;
        // SIGTRAP first: the int3 write refuses on it anyway, and it is the reason to give
        // for a thread that blocks every signal.
        let blockers = sweep::threads_settle(deadline, |tid, blocked| {
            sweep::blocks_trap(tid, Some(blocked))
        })?;
        if !blockers.is_empty() {
            return Err(Error::TrapBlocked { tids: blockers });
        }
        let blockers = sweep::threads_settle(deadline, |tid, blocked| {
            blocked & bit != 0 && sweep::parked_pc(tid).is_none_or(|pc| parked_in(inside, pc))
        })?;
        if blockers.is_empty() {
            return Ok(());
        }
        Err(Error::ThreadsUnreachable {
            signal,
            tids: blockers,
            why: "they block it while running, so kgpatch cannot see whether they stand in the bytes it would overwrite",
        })
    }

    /// Runs `action` in every thread until each has run it or is parked in the kernel at a
    /// pc that `busy` rejects (such a thread is not signalled at all: [`threads_to_signal`];
    /// one that blocks the signal, typically in sigwait or a futex, is checked the same way
    /// after the sweep), and no thread has a signal frame further out whose interrupted pc `outer`
    /// accepts (the action records those in `found`; for parked threads their stack is
    /// scanned from here). Threads it could not settle are sent the signal again until the
    /// deadline.
    fn sweep_all(
        &self,
        action: SweepAction<'_>,
        busy: impl Fn(u64) -> bool,
        (outer, restorers, found, site): Outer<'_>,
        why: &'static str,
    ) -> Result<()> {
        let deadline = std::time::Instant::now() + self.config.sweep_timeout;
        // Threads once found with a frame inside the bytes: one that is awake (so unreadable)
        // when the deadline comes is still refused for that reason, the one that says what to
        // wait for, not as merely unreachable.
        let mut seen_inside: Vec<i32> = Vec::new();
        loop {
            let tids = threads_to_signal(&busy, outer, restorers)?;
            let report = self
                .writer
                .sweep()
                .run_on(&tids, action, self.config.sweep_timeout)?;
            // Every handler of the run has returned (`run` waits for them).
            let mut nested = found.take();
            let mut stuck = Vec::new();
            for &tid in report.blocked.iter().chain(&report.timed_out) {
                // Gone: nothing to wait for. A status that cannot be read proves nothing:
                // the thread stays among those checked below (fail closed).
                let status = kgpatch_sys::proc::task_status(kgpatch_sys::proc::Pid::This, tid);
                if matches!(status, Ok(None)) {
                    continue;
                }
                match sweep::parked_sp_pc(tid) {
                    None => stuck.push(tid),
                    Some((_, pc)) if parked_in(&busy, pc) => stuck.push(tid),
                    Some((sp, pc)) => {
                        // Parked outside: its stack does not change while it sleeps. A
                        // frame further out inside the bytes, or a stack that cannot be
                        // read, keeps it; so does waking up meanwhile.
                        if sigframe::scan(sp, restorers, outer) != sigframe::Scan::Clear {
                            nested.push(tid);
                        } else if sweep::parked_sp_pc(tid) != Some((sp, pc)) {
                            stuck.push(tid);
                        }
                    }
                }
            }
            if stuck.is_empty() && nested.is_empty() {
                return Ok(());
            }
            seen_inside.extend(&nested);
            seen_inside.sort_unstable();
            seen_inside.dedup();
            if std::time::Instant::now() >= deadline {
                nested.extend(stuck.iter().filter(|t| seen_inside.contains(t)));
                if !nested.is_empty() {
                    nested.sort_unstable();
                    nested.dedup();
                    return Err(Error::InterruptedInside { site, tids: nested });
                }
                return Err(Error::ThreadsUnreachable {
                    signal: self.writer.sweep().signal(),
                    tids: stuck,
                    why,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Points the site's entry straight at `version` (the zero-check fast path), or back at
    /// the stub with `None`. The site must be steady at `version`; call this with `None`
    /// before beginning a transition on the site. Refuses with [`Error::SiteChanged`],
    /// writing nothing, when the bytes at the site are no longer a jump kgpatch wrote.
    pub fn set_fast_path(&self, entry: u64, version: Option<Version>) -> Result<()> {
        let inner = self.lock();
        let _fork = crate::fork_guard();
        let rec = inner
            .sites
            .get(&entry)
            .ok_or(Error::NotInstalled { entry })?;
        if let Some(v) = version {
            if rec.handle.site.steady_version() != Some(v) {
                return Err(Error::WrongState {
                    entry,
                    what: "is not steady at that version: finish the transition first",
                });
            }
        }
        // Never a blind write: the site must still hold a jump of ours.
        let current = self.check_own_jump(rec)?;
        let at = rec.analysis.pad_jump.unwrap_or(rec.analysis.patch_point);
        let target = version.map_or(rec.handle.stub, |v| v.0);
        let bytes = match encode::jmp32(at, target) {
            Some(b) => b,
            None => {
                let word = rec.slot.data_rw + memory::THUNK_TARGET;
                // SAFETY: the thunk's target word lies in this slot's RW data view, mapped
                // for the life of the process; it is an aligned u64 read by the thunk's
                // 64-bit load, so an atomic store keeps it whole.
                let atomic = unsafe { &*(word as *const AtomicU64) };
                atomic.store(target, Ordering::Release);
                encode::jmp32(at, rec.slot.code + memory::THUNK)
                    .ok_or(Error::NoMemoryNearSite { site: at })?
            }
        };
        if current[..] == bytes[..] {
            return Ok(());
        }
        self.writer.rewrite(at, current[0], &bytes, || Ok(()))
    }

    fn read_site(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        self.writer.read(at, len).map_err(|source| Error::Os {
            call: "pread(/proc/self/mem)",
            doing: "reading a patch site",
            source,
        })
    }

    /// Checks that the site of `rec` still holds a jump kgpatch wrote: at the jump's place
    /// (the patch point, or the pad) a `jmp rel32` to the stub, to the fast-path thunk, or
    /// straight to the version the site is steady at; with a pad, the entry's `jmp rel8` to
    /// the pad. Returns the 5 bytes of the jump. Anything else means the code was unloaded
    /// and something else mapped there, or it was loaded again with its original bytes:
    /// [`Error::SiteChanged`], and the caller writes nothing.
    fn check_own_jump(&self, rec: &Record) -> Result<Vec<u8>> {
        let a = &rec.analysis;
        let entry = a.entry;
        let at = a.pad_jump.unwrap_or(a.patch_point);
        let current = self.read_site(at, JMP32_LEN)?;
        let steady = rec.handle.site.steady_version().map(|v| v.0);
        let ours = [
            Some(rec.handle.stub),
            Some(rec.slot.code + memory::THUNK),
            steady,
        ]
        .into_iter()
        .flatten()
        .filter_map(|target| encode::jmp32(at, target))
        .any(|jump| current[..] == jump[..]);
        if !ours {
            return Err(Error::SiteChanged {
                entry,
                at,
                found: current,
            });
        }
        if let Some(j) = a.pad_jump {
            let p = a.patch_point;
            let short = self.read_site(p, a.jump_len)?;
            if encode::jmp8(p, j).is_none_or(|jump| short[..] != jump[..]) {
                return Err(Error::SiteChanged {
                    entry,
                    at: p,
                    found: short,
                });
            }
        }
        Ok(current)
    }

    /// Removes the site at `entry`, restoring the function's original bytes exactly. The site
    /// must be steady at its original version. Its memory is reclaimed later by
    /// [`Patcher::reclaim`].
    ///
    /// Refuses with [`Error::SiteChanged`], writing nothing, when the bytes at the site are
    /// no longer kgpatch's jump (the code was unloaded and something else mapped there, or
    /// it was loaded again): the saved originals are written only over the jump they
    /// replaced. The check and the write are made under the patcher's lock; a program that
    /// unmaps the code in the microseconds between them races with its own threads too.
    pub fn remove(&self, entry: u64) -> Result<()> {
        let mut inner = self.lock();
        let _fork = crate::fork_guard();
        let rec = inner
            .sites
            .get(&entry)
            .ok_or(Error::NotInstalled { entry })?;
        if rec.handle.site.steady_version() != Some(rec.handle.original) {
            return Err(Error::WrongState {
                entry,
                what: "is not steady at its original version: revert its patches first",
            });
        }
        // Never a blind write: the originals go back only over a jump of ours.
        let jump = self.check_own_jump(rec)?;
        let a = &rec.analysis;
        let p = a.patch_point;
        match a.pad_jump {
            Some(j) => {
                // The entry's short jump first (threads then run the original entry), then
                // the pad, which nothing reaches any more.
                let entry_now = self.read_site(p, a.jump_len)?;
                self.writer
                    .rewrite(p, entry_now[0], &a.original[..a.jump_len], || Ok(()))?;
                self.writer
                    .rewrite(j, jump[0], &a.pad_original, || Ok(()))?;
                trap::register(j, 0)?;
            }
            None => self
                .writer
                .rewrite(p, jump[0], &a.original[..a.jump_len], || Ok(()))?,
        }
        trap::register(p, 0)?;
        let rec = inner.sites.remove(&entry).expect("checked above");
        inner.retired.push(Retired {
            slot: rec.slot,
            entry,
            tramp_len: rec.tramp_len,
            _unwind: rec.unwind,
        });
        Ok(())
    }

    /// Frees the memory of removed sites once a sweep saw every thread outside it. Returns
    /// how many slots were freed (0 if some thread was still inside, or unreachable).
    pub fn reclaim(&self) -> Result<usize> {
        let mut inner = self.lock();
        if inner.retired.is_empty() {
            return Ok(0);
        }
        let ranges: Vec<(u64, u64)> = inner
            .retired
            .iter()
            .map(|r| (r.slot.code, r.slot.code + memory::CODE_SLOT))
            .collect();
        let inside = |pc: u64| ranges.iter().any(|&(s, e)| (s..e).contains(&pc));
        let busy = AtomicBool::new(false);
        let found = sigframe::Found::default();
        let restorers = sigframe::Restorers::current(self.writer.mem_fd());
        let action = |uc: &mut libc::ucontext_t| {
            if inside(uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64) {
                busy.store(true, Ordering::Relaxed);
            }
            // A context further out in the memory (a program's handler interrupted the
            // thread in a stub) would return into it after it is reused.
            let sp = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as u64;
            if sigframe::scan(sp, &restorers, &inside) != sigframe::Scan::Clear {
                busy.store(true, Ordering::Relaxed);
            }
        };
        let swept = self.sweep_all(
            &action,
            inside,
            (&inside, &restorers, &found, 0),
            "checking stub memory is unused",
        );
        if busy.load(Ordering::Relaxed) || swept.is_err() {
            return Ok(0);
        }
        let retired = std::mem::take(&mut inner.retired);
        let n = retired.len();
        for r in retired {
            inner.pool.free(&r.slot);
            // Dropping `r` deregisters its unwind info.
        }
        inner.reclaimed += n as u64;
        Ok(n)
    }

    /// The handle of the site at `entry`.
    pub fn site(&self, entry: u64) -> Option<SiteHandle> {
        self.lock().sites.get(&entry).map(|r| r.handle)
    }

    /// Every range of code kgpatch generated that a thread may be in: live sites' stubs and
    /// trampolines, and those of removed sites not yet reclaimed.
    pub fn code_ranges(&self) -> Vec<CodeRange> {
        let inner = self.lock();
        let live = inner
            .sites
            .values()
            .map(|r| (r.slot, r.handle.entry, r.tramp_len, true));
        let dead = inner
            .retired
            .iter()
            .map(|r| (r.slot, r.entry, r.tramp_len, false));
        live.chain(dead)
            .flat_map(|(slot, entry, tramp_len, live)| {
                [
                    CodeRange {
                        start: slot.code + memory::STUB,
                        end: slot.code + memory::TRAMPOLINE,
                        entry,
                        kind: CodeKind::Stub,
                        live,
                    },
                    CodeRange {
                        start: slot.code + memory::TRAMPOLINE,
                        end: slot.code + memory::TRAMPOLINE + tramp_len,
                        entry,
                        kind: CodeKind::Trampoline,
                        live,
                    },
                ]
            })
            .collect()
    }
}

impl Drop for Patcher {
    fn drop(&mut self) {
        ALIVE.store(false, Ordering::SeqCst);
    }
}

/// `true` if a thread parked in the kernel at `pc` (its `syscall` file) is, or may come
/// back, where `busy` rejects: at `pc`, or at `pc - 2` — the `syscall` instruction the
/// kernel rewinds to when any signal interrupts the call and it restarts. A thread parked
/// just after a `syscall` that lies inside the overwritten bytes is inside them: spared a
/// move, it later restarted into the middle of the new jump (SIGSEGV).
fn parked_in(busy: &dyn Fn(u64) -> bool, pc: u64) -> bool {
    busy(pc) || busy(pc.wrapping_sub(2))
}

/// The threads (but the caller) a sweep must signal: every one except those parked in the
/// kernel (`/proc/self/task/<tid>/syscall`) at a pc `busy` rejects not, with no signal frame
/// further out whose pc `outer` accepts, and still parked at the same place after that scan.
/// Such a thread needs no signal: it is not in the bytes, and with the int3 in place (or the
/// site's memory retired) it cannot newly enter them; its stack does not change while it
/// sleeps (the same reasoning `sweep_all` applies to threads that block the signal). Sparing
/// it saves waking a sleeping thread (docs/PERFORMANCE.md, "Cost per transition"). A thread
/// whose file cannot be read is signalled.
fn threads_to_signal(
    busy: &dyn Fn(u64) -> bool,
    outer: &dyn Fn(u64) -> bool,
    restorers: &sigframe::Restorers,
) -> Result<Vec<i32>> {
    let me = sweep::gettid();
    let spared = |tid: i32| match sweep::parked_sp_pc(tid) {
        Some((sp, pc)) if !parked_in(busy, pc) => {
            sigframe::scan(sp, restorers, outer) == sigframe::Scan::Clear
                && sweep::parked_sp_pc(tid) == Some((sp, pc))
        }
        _ => false,
    };
    Ok(sweep::list_threads()?
        .into_iter()
        .filter(|&t| t != me && !spared(t))
        .collect())
}

/// Registers the unwind information of a filled slot's stub and trampoline, and the trap
/// addresses (patch point, and pad jump) that send a thread to its stub. Nothing is left
/// registered on error.
fn register_generated(
    a: &SiteAnalysis,
    slot: &Slot,
    tramp: &encode::Trampoline,
) -> Result<Registered> {
    let stub_addr = slot.code + memory::STUB;
    let tramp_addr = slot.code + memory::TRAMPOLINE;
    let offsets: Vec<u64> = tramp
        .map
        .iter()
        .map(|&(_, t)| t)
        .chain(std::iter::once(tramp.jump_back))
        .collect();
    let unwind = Registered::new(&[
        unwind::Range {
            start: stub_addr,
            len: memory::TRAMPOLINE,
            steps: Vec::new(),
        },
        unwind::Range {
            start: tramp_addr,
            len: tramp.code.len() as u64,
            steps: unwind::trampoline_steps(&a.instructions, &offsets),
        },
    ])?;
    // On an error `unwind` is dropped here, which deregisters it.
    trap::register(a.patch_point, stub_addr)?;
    if let Some(j) = a.pad_jump {
        trap::register(j, stub_addr)?;
    }
    Ok(unwind)
}

/// Writes fresh site words into a slot no thread reads yet, and returns them.
fn init_site(slot: &Slot, original: Version) -> &'static Site {
    const _: () = assert!(memory::THUNK_TARGET + 8 <= memory::DATA_SLOT);
    const _: () = assert!(std::mem::size_of::<Site>() as u64 <= memory::THUNK_TARGET);
    let ptr = slot.data_rw as *mut Site;
    // SAFETY: the slot's data lies in the RW view, mapped for the life of the process,
    // aligned (32-byte slots in a page-aligned mapping) and large enough for a `Site` (24
    // bytes); no thread reads it yet (fresh or reclaimed slot), so the plain write races
    // with nobody; the thunk's target word (`THUNK_TARGET`, 24) follows it in the same
    // 32-byte slot. `Site` is made of atomics, so shared references to it are sound forever.
    unsafe {
        ptr.write(Site::new_steady(original));
        ((slot.data_rw + memory::THUNK_TARGET) as *mut u64).write(0);
        &*ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_pc_maps_instruction_starts_only() {
        let map = [(0, 0), (1, 1), (3, 7)];
        assert_eq!(moved_pc(0x100, 0x100, 5, 0x9000, &map), Some(0x9000));
        assert_eq!(moved_pc(0x103, 0x100, 5, 0x9000, &map), Some(0x9007));
        assert_eq!(moved_pc(0x102, 0x100, 5, 0x9000, &map), None);
        assert_eq!(moved_pc(0x105, 0x100, 5, 0x9000, &map), None);
        assert_eq!(moved_pc(0xff, 0x100, 5, 0x9000, &map), None);
    }
}
