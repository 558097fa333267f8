//! Memory for stubs, trampolines and site words, within ±2 GiB of the sites.
//!
//! A *region* is one memfd mapped twice: near the site, code pages read+exec and data pages
//! read-only (what the stubs execute and read, RIP-relative), and anywhere, the whole of it
//! read+write (what kgpatch writes through). No page is ever writable and executable at
//! once, and no protection is ever added, so it works under `MemoryDenyWriteExecute` and
//! `PR_SET_MDWE`. Regions are never unmapped; their slots are reused.
//!
//! Each slot has 128 bytes of code (stub at 0, fast-path thunk at 40, trampoline at 48) and
//! 32 bytes of data (the [`kgpatch_universe::Site`] words, then the thunk's target).
//!
//! # Safety
//! Writes go through the RW view with `copy_nonoverlapping` into slots the pool handed out
//! and no thread executes yet (fresh, or reclaimed after a sweep saw every thread outside).

use std::fs;

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
    rw: u64,
    used: Vec<bool>,
}

/// One slot: addresses of its code and data in the near (executed) and RW (written) views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    region: usize,
    index: usize,
    /// Code, as executed.
    pub code: u64,
    /// Data, as read by the stub.
    pub data: u64,
    code_rw: u64,
    /// Data, as written by kgpatch.
    pub data_rw: u64,
}

/// All regions.
#[derive(Debug, Default)]
pub struct Pool {
    regions: Vec<Region>,
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
                let region = map_region(reach).ok_or(Error::NoMemoryNearSite { site: near })??;
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
            code_rw: r.rw + i * CODE_SLOT,
            data_rw: r.rw + CODE_BYTES + i * DATA_SLOT,
        })
    }

    /// Returns a slot for reuse. The caller has made sure no thread is inside it.
    pub fn free(&mut self, slot: &Slot) {
        self.regions[slot.region].used[slot.index] = false;
    }

    /// Writes `bytes` at `offset` of the slot's code.
    pub fn write_code(&self, slot: &Slot, offset: u64, bytes: &[u8]) {
        assert!(
            offset + bytes.len() as u64 <= CODE_SLOT,
            "code slot overflow"
        );
        // SAFETY: the destination lies inside the slot's part of the RW view, which stays
        // mapped for the life of the process; see the module docs for why no thread
        // executes it meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (slot.code_rw + offset) as *mut u8,
                bytes.len(),
            )
        };
    }

    /// Number of regions mapped.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }
}

/// Maps a new region; `None` if no free range is in reach.
fn map_region(reach: &[u64]) -> Option<Result<Region>> {
    // SAFETY: memfd_create with a static name and flags.
    let fd = unsafe { libc::memfd_create(c"kgpatch-code".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Some(Err(Error::os("memfd_create", "allocating stub memory")));
    }
    let result = map_region_fd(fd, reach);
    // SAFETY: `fd` is ours; the mappings keep the memory alive.
    unsafe { libc::close(fd) };
    result
}

fn map_region_fd(fd: libc::c_int, reach: &[u64]) -> Option<Result<Region>> {
    // SAFETY: `fd` is a fresh memfd.
    if unsafe { libc::ftruncate(fd, REGION as libc::off_t) } != 0 {
        return Some(Err(Error::os("ftruncate", "sizing stub memory")));
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
    // SAFETY: MAP_FIXED over our own reservation; file offsets within the memfd's size.
    let code = unsafe {
        libc::mmap(
            near as *mut libc::c_void,
            CODE_BYTES as usize,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    // SAFETY: as above, the data part of the reservation.
    let data = unsafe {
        libc::mmap(
            (near + CODE_BYTES) as *mut libc::c_void,
            DATA_BYTES as usize,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            CODE_BYTES as libc::off_t,
        )
    };
    // SAFETY: a fresh shared RW mapping of the memfd, anywhere.
    let rw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            REGION as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if code == libc::MAP_FAILED || data == libc::MAP_FAILED || rw == libc::MAP_FAILED {
        let err = Error::os("mmap", "mapping stub memory from a memfd");
        // SAFETY: unmapping only our own ranges.
        unsafe {
            libc::munmap(near as *mut libc::c_void, REGION as usize);
            if rw != libc::MAP_FAILED {
                libc::munmap(rw, REGION as usize);
            }
        }
        return Some(Err(err));
    }
    Some(Ok(Region {
        near,
        rw: rw as u64,
        used: vec![false; SLOTS as usize],
    }))
}

/// Free, page-aligned region starts in reach, closest to the first reach point first.
fn candidates(reach: &[u64]) -> Option<Vec<u64>> {
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    let mut used: Vec<(u64, u64, bool)> = maps
        .lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                l.ends_with("[heap]"),
            ))
        })
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
        pool.write_code(&a, 0, &[0xC3, 0x90]);
        // SAFETY: the near code view is readable.
        let seen = unsafe { std::slice::from_raw_parts(a.code as *const u8, 2) };
        assert_eq!(seen, &[0xC3, 0x90]);
        pool.free(&a);
        let c = pool.alloc(&[anchor]).unwrap();
        assert_eq!(c, a);
    }
}
