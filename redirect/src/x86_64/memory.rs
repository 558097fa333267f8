//! Memory for stubs, trampolines and site words, within ±2 GiB of the sites.
//!
//! A *region* is one reservation near the site, in two private anonymous mappings: code
//! pages read+exec (what the stubs and trampolines execute) and data pages read+write, not
//! executable (the site words the stubs read RIP-relative and the universe writes). No
//! page is ever writable and executable at once and no protection is ever changed, so it
//! works under `MemoryDenyWriteExecute` and `PR_SET_MDWE`. Code is written through
//! `/proc/self/mem`, which writes through a read-only mapping without changing it (as the
//! program's text is written). Regions are never unmapped; their slots are reused.
//!
//! The memory is private (`MAP_PRIVATE`), like the program's text, so a child of `fork`
//! (or of a raw `clone` without `CLONE_VM`) gets copies at the same addresses and never
//! sees a later write of the parent: its stubs keep the site words and code of the moment
//! it was forked, which point only into modules it has mapped. The [fork
//! lock](crate::fork) makes that moment fall between two of kgpatch's write sequences.
//! (An earlier design shared one memfd between a read+exec and a read+write view; children
//! then shared the parent's site words and jumped into modules they never loaded.)
//!
//! Each slot has 128 bytes of code (stub at 0, fast-path thunk at 40, trampoline at 48) and
//! 32 bytes of data (the [`kgpatch_universe::Site`] words, then the thunk's target).
//!
//! # Safety
//! Code is written with `pwrite` on `/proc/self/mem` into slots the pool handed out and no
//! thread executes yet (fresh, or reclaimed after a sweep saw every thread outside).
//! Data is written through its (RW) near address by the patcher and the universe.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

/// Bytes of code per slot.
pub const CODE_SLOT: u64 = 128;
/// Offset of the stub in a code slot.
pub const STUB: u64 = 0;
/// Offset of the fast-path thunk.
pub const THUNK: u64 = 40;
/// Offset of the trampoline.
pub const TRAMPOLINE: u64 = 48;
/// Bytes of data per slot.
pub const DATA_SLOT: u64 = 32;
/// Offset of the thunk's target word in a data slot.
pub const THUNK_TARGET: u64 = 24;

const PAGE: u64 = 4096;
const SLOTS: u64 = 128;
const CODE_BYTES: u64 = SLOTS * CODE_SLOT;
const DATA_BYTES: u64 = SLOTS * DATA_SLOT;
const REGION: u64 = CODE_BYTES + DATA_BYTES;
const LIMIT: i64 = (1 << 31) - (1 << 20);
const LOWEST: u64 = 0x10_0000;
const HIGHEST: u64 = 0x7fff_ffff_0000;

const _: () = assert!(CODE_BYTES % PAGE == 0 && DATA_BYTES % PAGE == 0);

#[derive(Debug)]
struct Region {
    near: u64,
    used: Vec<bool>,
}

/// One slot: addresses of its code and data. The `_rw` addresses are where kgpatch writes;
/// with private memory they are the near addresses themselves (code is written through
/// `/proc/self/mem`, data directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    region: usize,
    index: usize,
    /// Code, as executed.
    pub code: u64,
    /// Data, as read by the stub.
    pub data: u64,
    code_rw: u64,
    /// Data, as written by kgpatch (read+write, not executable).
    pub data_rw: u64,
}

/// All regions.
#[derive(Debug, Default)]
pub struct Pool {
    regions: Vec<Region>,
    /// `/proc/self/mem`, opened with the first region.
    mem: Option<File>,
}

fn in_reach(start: u64, reach: &[u64]) -> bool {
    reach.iter().all(|&x| {
        let lo = start as i64 - x as i64;
        let hi = (start + REGION) as i64 - x as i64;
        lo > -LIMIT && hi < LIMIT
    })
}

impl Pool {
    /// A slot whose whole region every address of `reach` can reach with a 32-bit
    /// displacement (and which can reach them).
    pub fn alloc(&mut self, reach: &[u64]) -> Result<Slot> {
        let found = self.regions.iter().enumerate().find_map(|(r, region)| {
            if !in_reach(region.near, reach) {
                return None;
            }
            region.used.iter().position(|u| !u).map(|i| (r, i))
        });
        let (region, index) = match found {
            Some(f) => f,
            None => {
                let near = reach.first().copied().unwrap_or(0);
                let mem = match self.mem.take() {
                    Some(f) => f,
                    None => open_mem()?,
                };
                let region = map_region(reach, &mem);
                self.mem = Some(mem);
                let region = region.ok_or(Error::NoMemoryNearSite { site: near })??;
                self.regions.push(region);
                (self.regions.len() - 1, 0)
            }
        };
        let r = &mut self.regions[region];
        r.used[index] = true;
        let i = index as u64;
        Ok(Slot {
            region,
            index,
            code: r.near + i * CODE_SLOT,
            data: r.near + CODE_BYTES + i * DATA_SLOT,
            code_rw: r.near + i * CODE_SLOT,
            data_rw: r.near + CODE_BYTES + i * DATA_SLOT,
        })
    }

    /// Returns a slot for reuse. The caller has made sure no thread is inside it.
    pub fn free(&mut self, slot: &Slot) {
        self.regions[slot.region].used[slot.index] = false;
    }

    /// Writes `bytes` at `offset` of the slot's code (through `/proc/self/mem`).
    pub fn write_code(&self, slot: &Slot, offset: u64, bytes: &[u8]) -> Result<()> {
        assert!(
            offset + bytes.len() as u64 <= CODE_SLOT,
            "code slot overflow"
        );
        let mem = self.mem.as_ref().ok_or(Error::Os {
            call: "open(/proc/self/mem)",
            doing: "writing stub code",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        // The destination lies inside the slot's code, mapped for the life of the process;
        // see the module docs for why no thread executes it meanwhile.
        mem.write_all_at(bytes, slot.code_rw + offset)
            .map_err(|source| Error::Os {
                call: "pwrite(/proc/self/mem)",
                doing: "writing stub code",
                source,
            })
    }

    /// Number of regions mapped.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }
}

fn open_mem() -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|source| Error::Os {
            call: "open(/proc/self/mem)",
            doing: "opening the process's memory to write stub code",
            source,
        })
}

/// Maps a new region; `None` if no free range is in reach.
fn map_region(reach: &[u64], mem: &File) -> Option<Result<Region>> {
    // Before the first region exists, so that no fork can copy one mid-write.
    if let Err(e) = crate::fork::register_handlers() {
        return Some(Err(e));
    }
    let mut near = None;
    for _attempt in 0..8 {
        let Some(candidates) = candidates(reach) else {
            return Some(Err(Error::os("/proc/self/maps", "finding room for stubs")));
        };
        if candidates.is_empty() {
            return None;
        }
        for at in candidates.into_iter().take(4) {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the reserved
            // range is ours alone.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    REGION as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED && p as u64 == at {
                near = Some(at);
                break;
            }
            if p != libc::MAP_FAILED {
                // An old kernel ignored NOREPLACE and put it elsewhere.
                // SAFETY: unmapping what we just mapped.
                unsafe { libc::munmap(p, REGION as usize) };
            }
        }
        if near.is_some() {
            break;
        }
    }
    let near = near?;
    // Fresh private pages over our own reservation: code read+exec, data read+write. A new
    // mapping, not a protection change: no exec is gained by a page that had none.
    let map = |at: u64, len: u64, prot: libc::c_int| {
        // SAFETY: MAP_FIXED over our own reservation, which nothing else uses.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        p != libc::MAP_FAILED && p as u64 == at
    };
    let mapped = map(near, CODE_BYTES, libc::PROT_READ | libc::PROT_EXEC)
        && map(
            near + CODE_BYTES,
            DATA_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
        );
    let fail = |err: Error| {
        // SAFETY: unmapping only our own reservation.
        unsafe { libc::munmap(near as *mut libc::c_void, REGION as usize) };
        Some(Err(err))
    };
    if !mapped {
        return fail(Error::os("mmap", "mapping stub memory"));
    }
    // Code is written through /proc/self/mem: make sure the kernel allows it on these pages
    // now, not when a stub is half written.
    let mut byte = [0u8; 1];
    if let Err(source) = mem
        .read_exact_at(&mut byte, near)
        .and_then(|()| mem.write_all_at(&byte, near))
    {
        return fail(Error::ProcMemRefused { source });
    }
    Some(Ok(Region {
        near,
        used: vec![false; SLOTS as usize],
    }))
}

/// Free, page-aligned region starts in reach, closest to the first reach point first.
fn candidates(reach: &[u64]) -> Option<Vec<u64>> {
    let mut used: Vec<(u64, u64, bool)> = kgpatch_sys::proc::maps(kgpatch_sys::proc::Pid::This)
        .ok()?
        .iter()
        .map(|m| (m.start, m.end, m.is_heap()))
        .collect();
    used.sort_unstable();
    let anchor = *reach.first()? as i64;
    // Window of region starts every reach point allows.
    let mut lo = LOWEST as i64;
    let mut hi = HIGHEST as i64 - REGION as i64;
    for &x in reach {
        lo = lo.max(x as i64 - LIMIT + 1);
        hi = hi.min(x as i64 + LIMIT - REGION as i64 - 1);
    }
    if lo > hi {
        return Some(Vec::new());
    }
    let mut gaps = Vec::new();
    let mut prev_end = LOWEST;
    let mut prev_heap = false;
    for &(start, end, heap) in used
        .iter()
        .chain(std::iter::once(&(HIGHEST, HIGHEST, false)))
    {
        if start > prev_end {
            // Leave a page between us and our neighbours, and room for the heap to grow.
            let gap_lo = prev_end + PAGE + if prev_heap { 256 << 20 } else { 0 };
            gaps.push((gap_lo as i64, start as i64 - PAGE as i64));
        }
        prev_end = prev_end.max(end);
        prev_heap = heap;
    }
    let mut out: Vec<u64> = gaps
        .into_iter()
        .filter_map(|(g_lo, g_hi)| {
            let first = g_lo.max(lo);
            let last = (g_hi - REGION as i64).min(hi);
            if first > last {
                return None;
            }
            let pick = anchor.clamp(first, last);
            let aligned_down = pick & !(PAGE as i64 - 1);
            let aligned = if aligned_down >= first {
                aligned_down
            } else {
                aligned_down + PAGE as i64
            };
            (aligned <= last).then_some(aligned as u64)
        })
        .collect();
    out.sort_by_key(|&a| (a as i64 - anchor).unsigned_abs());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_near_and_views_alias() {
        let mut pool = Pool::default();
        let anchor = slots_are_near_and_views_alias as *const () as u64;
        let a = pool.alloc(&[anchor]).unwrap();
        let b = pool.alloc(&[anchor]).unwrap();
        assert_eq!(pool.regions(), 1);
        assert_ne!(a.code, b.code);
        for s in [a, b] {
            assert!(((s.code as i64) - anchor as i64).abs() < LIMIT);
        }
        pool.write_code(&a, 0, &[0xC3, 0x90]).unwrap();
        // SAFETY: the near code view is readable.
        let seen = unsafe { std::slice::from_raw_parts(a.code as *const u8, 2) };
        assert_eq!(seen, &[0xC3, 0x90]);
        pool.free(&a);
        let c = pool.alloc(&[anchor]).unwrap();
        assert_eq!(c, a);
    }
}
