//! Writing code other threads may be running: through `/proc/self/mem` (which writes through
//! read-only mappings without changing their protections, so no thread ever finds its page
//! non-executable), with the int3 cross-modifying-code protocol and core serialisation.
//!
//! Serialisation uses membarrier `PRIVATE_EXPEDITED_SYNC_CORE` (registered once). On kernels
//! without it, a thread sweep does the same job: every thread runs a signal handler and
//! returns from it through `rt_sigreturn`, which leaves the kernel by `iret`, a serialising
//! instruction; that is slower (a signal per thread per step) but correct.
//!
//! No unsafe here: membarrier is `kgpatch_sys::thread::SyncCore`, and code is written with
//! `pwrite` on `/proc/self/mem` through safe `File` calls; what makes those writes harmless
//! to running threads is the protocol above, not the type system.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sweep::{self, Sweep, SweepAction};

/// How cores are made to see new code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMethod {
    /// membarrier `PRIVATE_EXPEDITED_SYNC_CORE`.
    Membarrier,
    /// A signal sweep (kernels without the membarrier command).
    Sweep,
}

/// Writes code and serialises cores.
#[derive(Debug)]
pub struct CodeWriter {
    mem: File,
    method: SyncMethod,
    /// The membarrier registration, for [`SyncMethod::Membarrier`].
    sync_core: Option<kgpatch_sys::thread::SyncCore>,
    sweep: Sweep,
    timeout: Duration,
}

impl CodeWriter {
    /// Opens /proc/self/mem, checks that it accepts writes to code, and registers for
    /// membarrier core serialisation where the kernel offers it (unless `force_sweep`).
    pub fn new(
        sweep: Sweep,
        timeout: Duration,
        probe: u64,
        force_sweep: bool,
    ) -> Result<CodeWriter> {
        let mem = File::options()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .map_err(|source| Error::Os {
                call: "open(/proc/self/mem)",
                doing: "opening the process's memory to write code",
                source,
            })?;
        // Write one byte of read-only code back onto itself: the kernel tells now whether
        // it allows code writes through /proc/self/mem.
        let mut byte = [0u8; 1];
        mem.read_exact_at(&mut byte, probe)
            .map_err(|source| Error::ProcMemRefused { source })?;
        mem.write_all_at(&byte, probe)
            .map_err(|source| Error::ProcMemRefused { source })?;
        let sync_core = if force_sweep {
            None
        } else {
            kgpatch_sys::thread::SyncCore::register()
        };
        let method = if sync_core.is_some() {
            SyncMethod::Membarrier
        } else {
            SyncMethod::Sweep
        };
        Ok(CodeWriter {
            mem,
            method,
            sync_core,
            sweep,
            timeout,
        })
    }

    /// How cores are serialised.
    pub fn method(&self) -> SyncMethod {
        self.method
    }

    /// The descriptor of the writer's `/proc/self/mem` (open for the writer's life).
    pub(crate) fn mem_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.mem.as_raw_fd()
    }

    /// The sweep this writer uses.
    pub fn sweep(&self) -> &Sweep {
        &self.sweep
    }

    /// Reads `len` bytes at `addr`; fails (instead of faulting) when they are not mapped.
    pub fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem.read_exact_at(&mut buf, addr)?;
        Ok(buf)
    }

    /// Writes `bytes` at `addr` without touching protections.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_all_at(bytes, addr)
            .map_err(|source| Error::Os {
                call: "pwrite(/proc/self/mem)",
                doing: "writing code",
                source,
            })
    }

    /// Writes the int3 of [`CodeWriter::rewrite`] at `addr` once no thread blocks SIGTRAP,
    /// and serialises cores; on any failure the original first byte is back in place.
    fn write_int3(&self, addr: u64, old_first: u8) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let blockers = sweep::threads_settle(deadline, |tid, blocked| {
                sweep::blocks_trap(tid, Some(blocked))
            })?;
            if !blockers.is_empty() {
                return Err(Error::TrapBlocked { tids: blockers });
            }
            self.write(addr, &[0xCC])?;
            match sweep::first_blocking_trap() {
                Ok(None) => break,
                found => {
                    self.write(addr, &[old_first])?;
                    self.sync()?;
                    let tid = found?.unwrap_or_default();
                    if Instant::now() >= deadline {
                        return Err(Error::TrapBlocked { tids: vec![tid] });
                    }
                }
            }
        }
        if let Err(e) = self.sync() {
            self.write(addr, &[old_first])?;
            return Err(e);
        }
        Ok(())
    }

    /// Makes every core of every thread of the process serialise its instruction stream.
    pub fn sync(&self) -> Result<()> {
        match self.method {
            SyncMethod::Membarrier => {
                sweep::cost::count_membarrier();
                // `method` is Membarrier only with a registration.
                let synced = self.sync_core.as_ref().map_or_else(
                    || Err(io::Error::from(io::ErrorKind::Unsupported)),
                    |s| s.sync(),
                );
                synced.map_err(|source| Error::Os {
                    call: "membarrier",
                    doing: "serialising cores after a code write",
                    source,
                })
            }
            SyncMethod::Sweep => {
                // A thread can show the signal blocked only because it is running a handler
                // whose mask holds it (our SIGTRAP handler blocks real-time signals while it
                // sends a thread on from the int3): it takes the signal as that handler
                // returns. Threads not reached are signalled again, with backoff, until the
                // deadline; only a thread still unreached then is unreachable.
                let nothing: SweepAction<'_> = &|_| {};
                let deadline = Instant::now() + self.timeout;
                let mut report = self.sweep.run(nothing, self.timeout)?;
                let mut pause = Duration::from_millis(1);
                loop {
                    let left: Vec<i32> = report
                        .blocked
                        .iter()
                        .chain(&report.timed_out)
                        .copied()
                        .collect();
                    if left.is_empty() {
                        return Ok(());
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::ThreadsUnreachable {
                            signal: self.sweep.signal(),
                            tids: left,
                            why: "serialising cores without membarrier",
                        });
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(50));
                    let rest = deadline.saturating_duration_since(Instant::now());
                    report = self.sweep.run_on(&left, nothing, rest)?;
                }
            }
        }
    }

    /// Replaces the instruction(s) at `addr` (currently whole instructions starting at
    /// `addr`, at least `new.len()` bytes) by `new`, while other threads may execute there:
    /// int3 on the first byte, sync, `between` (e.g. moving threads out), write the tail,
    /// sync, write the first byte, sync. A thread hitting the int3 meanwhile is sent on by
    /// the SIGTRAP handler (the caller registered the address). If `between` fails, the first
    /// byte is put back and nothing else changed.
    ///
    /// A thread that runs into the int3 while it blocks SIGTRAP is killed by the kernel, with
    /// the whole process. So before the int3 is written every other thread must have been
    /// seen not blocking SIGTRAP (`/proc/self/task/*/status`, waiting up to the writer's
    /// timeout for threads that block it only for a moment), and right after it is written
    /// every thread is read again: if one blocks SIGTRAP now, the original byte goes back at
    /// once and the write starts over, until the timeout ends it with
    /// [`Error::TrapBlocked`]. A failed read of `/proc` is a refusal too (nothing written,
    /// or the first byte put back). What remains is the time between the last read and a
    /// thread's arrival at the int3 (docs/ARCHITECTURE.md, "Our signals and the program's").
    pub fn rewrite(
        &self,
        addr: u64,
        old_first: u8,
        new: &[u8],
        between: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.write_int3(addr, old_first)?;
        if let Err(e) = between() {
            self.write(addr, &[old_first])?;
            self.sync()?;
            return Err(e);
        }
        if new.len() > 1 {
            self.write(addr + 1, &new[1..])?;
            self.sync()?;
        }
        self.write(addr, &new[..1])?;
        self.sync()
    }
}
