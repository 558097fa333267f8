//! The unwind index: every loaded object's code ranges and `.eh_frame_hdr`/`.eh_frame`,
//! found with `dl_iterate_phdr` (kgpatch-sys's walker) and read in place from process memory.
//!
//! # Safety
//! Section data is borrowed from the objects' mappings (no copy, so the index costs a few
//! hundred bytes per object). The borrow is made while `dl_iterate_phdr` holds the loader
//! lock, and it stays valid for the index's whole life because the index **pins** every
//! object it borrows from: right after the iteration it takes a `dlopen(name, RTLD_NOLOAD)`
//! reference on each named object (checked to be the same object: its link map's load bias
//! is the indexed one), then checks that the loader unloaded nothing in between
//! (`dlpi_subs` unchanged; otherwise it lets go and starts again). A program's `dlclose`
//! then only drops its own reference: the object stays mapped until the index is dropped,
//! which releases the pins. An object that cannot be pinned keeps its code ranges but not
//! its unwind data, so a walk through it is unreliable rather than a read of unmapped
//! memory. The main program and the vdso are never unmapped and need no pin.
//! [`UnwindIndex::is_current`] still says when objects came or went (a new object's code is
//! not indexed until a rebuild).

#![allow(unsafe_code)]

use std::ops::ControlFlow;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use gimli::{BaseAddresses, EhFrame, EhFrameHdr, EndianSlice, LittleEndian, ParsedEhFrameHdr};

use crate::cache::CachePool;

/// The reader type over mapped section bytes.
pub(crate) type Slice = EndianSlice<'static, LittleEndian>;

use libc::{PF_R, PF_X, PT_GNU_EH_FRAME, PT_LOAD};

/// Why the index could not be built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexError {
    /// `dl_iterate_phdr` reported no object with code.
    #[error("dl_iterate_phdr reported no loaded object with executable code; stack checks need at least the main program")]
    NoObjects,
    /// Objects were unloaded while the index pinned them, every time it tried.
    #[error("the program kept unloading libraries while the unwind index pinned them; try again when it is quieter")]
    ObjectsChanging,
}

/// Options for [`UnwindIndex::build_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexOptions {
    /// How many walk caches to pre-allocate for [`UnwindIndex::walk`]: the number of walks
    /// that can run at the same time (e.g. signal handlers of different threads). A walk
    /// that finds none free is [`Unreliable`](crate::UnreliableReason::NoFreeCache).
    pub cache_slots: usize,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions { cache_slots: 16 }
    }
}

pub use kgpatch_sys::objects::ObjectsStamp;

/// What the index knows about one loaded object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The loader's name for it (`""` for the main program, `linux-vdso.so.1` for the vdso).
    pub name: String,
    /// Load bias (`dlpi_addr`).
    pub bias: u64,
    /// Its executable segments.
    pub code: Vec<Range<u64>>,
    /// `.eh_frame_hdr` bytes, 0 when the object has no `PT_GNU_EH_FRAME` (its code then
    /// always walks as [`NoUnwindInfo`](crate::UnreliableReason::NoUnwindInfo)).
    pub eh_frame_hdr_len: u64,
}

/// Parsed unwind sections of one object.
pub(crate) struct EhData {
    pub(crate) hdr: ParsedEhFrameHdr<Slice>,
    pub(crate) eh_frame: EhFrame<Slice>,
    pub(crate) bases: BaseAddresses,
}

pub(crate) struct Module {
    pub(crate) info: ObjectInfo,
    pub(crate) eh: Option<EhData>,
}

#[derive(Clone, Copy, Debug)]
struct CodeRange {
    start: u64,
    end: u64,
    module: usize,
}

static NEXT_INDEX_ID: AtomicU32 = AtomicU32::new(1);

/// Unwind information for every object loaded in this process, built before a transition
/// and read-only during it. Walks run against it (see [`UnwindIndex::walk`]).
pub struct UnwindIndex {
    id: u32,
    /// `dlopen(RTLD_NOLOAD)` handles of the objects whose sections are borrowed; closed
    /// when the index is dropped (nothing borrowed has a destructor that reads it).
    pins: Pins,
    modules: Vec<Module>,
    code: Vec<CodeRange>,
    stamp: ObjectsStamp,
    pub(crate) pool: CachePool,
}

impl std::fmt::Debug for UnwindIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnwindIndex")
            .field("id", &self.id)
            .field("objects", &self.modules.len())
            .field("stamp", &self.stamp)
            .finish()
    }
}

impl UnwindIndex {
    /// Indexes every loaded object, with default options. Allocates; not for signal
    /// handlers.
    pub fn build() -> Result<UnwindIndex, IndexError> {
        UnwindIndex::build_with(IndexOptions::default())
    }

    /// Indexes every loaded object, and pins each one (see the module docs).
    pub fn build_with(options: IndexOptions) -> Result<UnwindIndex, IndexError> {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            let mut found = Found::default();
            iterate_objects(&mut found);
            let pins = pin_objects(&mut found.modules);
            if objects_stamp().subs != found.stamp.subs {
                // Something was unloaded between the iteration and the pins: a borrowed
                // slice may already dangle. Drop the pins and look again.
                drop(pins);
                continue;
            }
            return UnwindIndex::from_found(found, pins, options);
        }
        Err(IndexError::ObjectsChanging)
    }

    fn from_found(
        found: Found,
        pins: Pins,
        options: IndexOptions,
    ) -> Result<UnwindIndex, IndexError> {
        let mut code = Vec::new();
        for (i, m) in found.modules.iter().enumerate() {
            for r in &m.info.code {
                code.push(CodeRange {
                    start: r.start,
                    end: r.end,
                    module: i,
                });
            }
        }
        if code.is_empty() {
            return Err(IndexError::NoObjects);
        }
        code.sort_by_key(|c| c.start);
        Ok(UnwindIndex {
            id: NEXT_INDEX_ID.fetch_add(1, Ordering::Relaxed).max(1),
            pins,
            modules: found.modules,
            code,
            stamp: found.stamp,
            pool: CachePool::new(options.cache_slots),
        })
    }

    /// How many objects the index holds a `dlopen` reference on.
    pub fn pinned(&self) -> usize {
        self.pins.0.len()
    }

    /// A number unique to this index among those built in this process (cache entries are
    /// tagged with it, so a [`WalkCache`](crate::WalkCache) can be reused across indexes).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The loader's counters when the index was built.
    pub fn stamp(&self) -> ObjectsStamp {
        self.stamp
    }

    /// `true` if no object was loaded or unloaded since the index was built. Cheap (one
    /// `dl_iterate_phdr` call that stops at the first object) but takes the loader's lock:
    /// call it between attempts, never from a signal handler.
    pub fn is_current(&self) -> bool {
        objects_stamp() == self.stamp
    }

    /// The indexed objects.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectInfo> {
        self.modules.iter().map(|m| &m.info)
    }

    /// The object whose code contains `addr`, if any.
    pub fn object_for(&self, addr: u64) -> Option<&ObjectInfo> {
        self.module_for(addr).map(|m| &m.info)
    }

    /// Heap bytes this index holds, walk caches included (section data is not copied and
    /// not counted).
    pub fn heap_bytes(&self) -> usize {
        let modules = self.modules.capacity() * std::mem::size_of::<Module>()
            + self
                .modules
                .iter()
                .map(|m| m.info.name.capacity() + m.info.code.capacity() * 16)
                .sum::<usize>();
        modules + self.code.capacity() * std::mem::size_of::<CodeRange>() + self.pool.heap_bytes()
    }

    /// The module whose executable code contains `addr`. No allocation.
    #[inline]
    pub(crate) fn module_for(&self, addr: u64) -> Option<&Module> {
        let i = self.code.partition_point(|c| c.start <= addr);
        let c = self.code.get(i.checked_sub(1)?)?;
        (addr < c.end).then(|| &self.modules[c.module])
    }
}

/// `dlopen` handles, closed when dropped.
#[derive(Default)]
struct Pins(Vec<usize>);

impl Drop for Pins {
    fn drop(&mut self) {
        for &h in &self.0 {
            // SAFETY: `h` is a handle our own dlopen returned and nobody else closes; the
            // index that borrowed from its object is being dropped with it.
            unsafe { libc::dlclose(h as *mut libc::c_void) };
        }
    }
}

/// Takes a reference on every named object of `modules`; an object that cannot be pinned
/// (no name the loader knows, or the name finds another object) loses its unwind data.
/// Must not run under `dl_iterate_phdr` (dlopen takes the loader's other lock).
fn pin_objects(modules: &mut [Module]) -> Pins {
    let mut pins = Pins::default();
    for m in modules.iter_mut() {
        let name = &m.info.name;
        if name.is_empty() || name.starts_with("linux-vdso") || name.starts_with("linux-gate") {
            continue;
        }
        match pin(name, m.info.bias) {
            Some(h) => pins.0.push(h),
            None => m.eh = None,
        }
    }
    pins
}

/// A `dlopen(RTLD_NOLOAD)` handle on the loaded object `name` whose load bias is `bias`.
fn pin(name: &str, bias: u64) -> Option<usize> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; RTLD_NOLOAD never loads anything, it only takes a
    // reference on an object that is already loaded.
    let h = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
    if h.is_null() {
        return None;
    }
    // SAFETY: `h` is the live handle just taken.
    let same = unsafe { kgpatch_sys::objects::handle_bias(h) } == Some(bias);
    if !same {
        // SAFETY: our own handle, closed once.
        unsafe { libc::dlclose(h) };
        return None;
    }
    Some(h as usize)
}

/// The loader's current object-set counters. Takes the loader's lock; not for signal
/// handlers.
pub fn objects_stamp() -> ObjectsStamp {
    kgpatch_sys::objects::stamp()
}

#[derive(Default)]
struct Found {
    modules: Vec<Module>,
    stamp: ObjectsStamp,
}

/// Records every object. Runs with the loader lock held, so no object can be unmapped
/// while its sections are parsed.
fn iterate_objects(found: &mut Found) {
    kgpatch_sys::objects::for_each(|o| {
        if o.is_main() {
            if let Some(s) = o.stamp() {
                found.stamp = s;
            }
        }
        let name = o.name().to_string_lossy().into_owned();
        if let Some(m) = module_from(name, o.bias(), o.phdrs()) {
            found.modules.push(m);
        }
        ControlFlow::Continue(())
    });
}

/// Borrows `len` bytes of a loaded object's readable segment at `addr`.
///
/// # Safety
/// `[addr, addr+len)` must lie inside a readable `PT_LOAD` segment of an object that stays
/// loaded as long as the slice is used (see the module docs).
unsafe fn mapped(addr: u64, len: u64) -> &'static [u8] {
    // SAFETY: per the caller's guarantee.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) }
}

fn module_from(name: String, bias: u64, phdrs: &[libc::Elf64_Phdr]) -> Option<Module> {
    let segments: Vec<(Range<u64>, u32)> = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .filter_map(|p| {
            let start = bias.checked_add(p.p_vaddr)?;
            Some((start..start.checked_add(p.p_memsz)?, p.p_flags))
        })
        .collect();
    let code: Vec<Range<u64>> = segments
        .iter()
        .filter(|(r, flags)| flags & PF_X != 0 && r.start < r.end)
        .map(|(r, _)| r.clone())
        .collect();
    if code.is_empty() {
        return None;
    }
    // The readable segment holding [addr, addr+len), and its end.
    let readable_end = |addr: u64, len: u64| -> Option<u64> {
        segments
            .iter()
            .find(|(r, f)| {
                f & PF_R != 0
                    && r.start <= addr
                    && addr.checked_add(len).is_some_and(|e| e <= r.end)
            })
            .map(|(r, _)| r.end)
    };
    let mut eh = None;
    let mut eh_frame_hdr_len = 0;
    if let Some(p) = phdrs.iter().find(|p| p.p_type == PT_GNU_EH_FRAME) {
        let hdr_addr = bias.wrapping_add(p.p_vaddr);
        if readable_end(hdr_addr, p.p_memsz).is_some() && p.p_memsz >= 4 {
            eh_frame_hdr_len = p.p_memsz;
            // SAFETY: the range was just checked to lie inside a readable PT_LOAD segment
            // of this object, which is loaded (dl_iterate_phdr holds the loader lock).
            let hdr_bytes = unsafe { mapped(hdr_addr, p.p_memsz) };
            eh = eh_data(hdr_addr, hdr_bytes, &readable_end);
        }
    }
    Some(Module {
        info: ObjectInfo {
            name,
            bias,
            code,
            eh_frame_hdr_len,
        },
        eh,
    })
}

fn eh_data(
    hdr_addr: u64,
    hdr_bytes: &'static [u8],
    readable_end: &dyn Fn(u64, u64) -> Option<u64>,
) -> Option<EhData> {
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr);
    let hdr = EhFrameHdr::new(hdr_bytes, LittleEndian)
        .parse(&bases, 8)
        .ok()?;
    hdr.table()?;
    let eh_frame_addr = hdr.eh_frame_ptr().direct().ok()?;
    // .eh_frame's length is not recorded anywhere loaded; it ends at the latest at the end
    // of its segment, and every lookup starts from an FDE pointer of the hdr table.
    let end = readable_end(eh_frame_addr, 1)?;
    // SAFETY: [eh_frame_addr, end) lies inside one readable PT_LOAD segment of this object
    // (readable_end found it), which is loaded while the index is current.
    let eh_frame_bytes = unsafe { mapped(eh_frame_addr, end - eh_frame_addr) };
    let mut eh_frame = EhFrame::new(eh_frame_bytes, LittleEndian);
    eh_frame.set_address_size(8);
    Some(EhData {
        hdr,
        eh_frame,
        bases: bases.set_eh_frame(eh_frame_addr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_main_program_libc_and_vdso() {
        let index = UnwindIndex::build().unwrap();
        let here = indexes_main_program_libc_and_vdso as fn() as usize as u64;
        let main = index.object_for(here).expect("test binary indexed");
        assert!(main.eh_frame_hdr_len > 0);
        let libc_fn = libc::getpid as unsafe extern "C" fn() -> libc::pid_t as usize as u64;
        let libc_obj = index.object_for(libc_fn).expect("libc indexed");
        assert!(libc_obj.name.contains("libc"), "{}", libc_obj.name);
        assert!(libc_obj.eh_frame_hdr_len > 0);
        assert!(index.objects().any(|o| o.name.contains("vdso")));
        assert!(index.is_current());
        assert!(index.object_for(0x10).is_none());
        assert!(index.pinned() > 0, "libc at least is pinned");
        let libc_again = UnwindIndex::build().unwrap();
        assert_eq!(libc_again.pinned(), index.pinned());
        drop(libc_again);
        assert!(
            index.is_current(),
            "dropping an index's pins unloads nothing still used"
        );
    }
}
