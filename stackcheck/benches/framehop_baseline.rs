//! framehop (0.16, `MustNotAllocateDuringUnwind`) set up the way the design brief's
//! prototype did — modules from `dl_iterate_phdr`, `.eh_frame_hdr`/`.eh_frame` read from
//! process memory — as a speed baseline. Not used by the crate: framehop silently falls
//! back to frame pointers where CFI is missing (see the crate README).

use std::ffi::c_void;
use std::ops::Range;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, MustNotAllocateDuringUnwind, Unwinder};

/// The framehop unwinder type used.
pub type Fh = UnwinderX86_64<&'static [u8], MustNotAllocateDuringUnwind>;
/// Its cache.
pub type FhCache = CacheX86_64<MustNotAllocateDuringUnwind>;

const PT_LOAD: u32 = 1;
const PT_GNU_EH_FRAME: u32 = 0x6474_e550;
const PF_X: u32 = 1;

/// Builds a framehop unwinder over every loaded object.
pub fn build() -> Fh {
    let mut unwinder = Fh::new();
    // SAFETY: the callback only uses data as the &mut Fh passed here.
    unsafe { libc::dl_iterate_phdr(Some(add), (&mut unwinder as *mut Fh).cast()) };
    unwinder
}

unsafe extern "C" fn add(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> i32 {
    // SAFETY: dl_iterate_phdr passes a valid info; data is the &mut Fh from build().
    let (info, unwinder) = unsafe { (&*info, &mut *data.cast::<Fh>()) };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: dlpi_phdr points to dlpi_phnum headers.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let bias = info.dlpi_addr;
    let loads: Vec<Range<u64>> = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| p.p_vaddr..p.p_vaddr + p.p_memsz)
        .collect();
    let Some(text) = phdrs
        .iter()
        .find(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0)
    else {
        return 0;
    };
    let Some(hdr) = phdrs.iter().find(|p| p.p_type == PT_GNU_EH_FRAME) else {
        return 0;
    };
    // SAFETY: PT_GNU_EH_FRAME lies in a loaded segment of this object.
    let hdr_bytes: &'static [u8] = unsafe {
        std::slice::from_raw_parts((bias + hdr.p_vaddr) as *const u8, hdr.p_memsz as usize)
    };
    // eh_frame_ptr: version, eh_frame_ptr_enc (pcrel|sdata4 expected), ...
    if hdr_bytes.len() < 8 || hdr_bytes[1] != 0x1b {
        return 0;
    }
    let rel = i32::from_le_bytes(hdr_bytes[4..8].try_into().unwrap()) as i64;
    let eh_svma = (hdr.p_vaddr as i64 + 4 + rel) as u64;
    let Some(seg) = loads.iter().find(|r| r.contains(&eh_svma)) else {
        return 0;
    };
    // SAFETY: [eh_svma, seg.end) lies inside a loaded segment of this object.
    let eh_bytes: &'static [u8] = unsafe {
        std::slice::from_raw_parts((bias + eh_svma) as *const u8, (seg.end - eh_svma) as usize)
    };
    let start = loads.iter().map(|r| r.start).min().unwrap();
    let end = loads.iter().map(|r| r.end).max().unwrap();
    let module = Module::new(
        String::new(),
        bias + start..bias + end,
        bias,
        ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: Some(text.p_vaddr..text.p_vaddr + text.p_memsz),
            eh_frame_hdr_svma: Some(hdr.p_vaddr..hdr.p_vaddr + hdr.p_memsz),
            eh_frame_hdr: Some(hdr_bytes),
            eh_frame_svma: Some(eh_svma..seg.end),
            eh_frame: Some(eh_bytes),
            ..Default::default()
        },
    );
    unwinder.add_module(module);
    0
}

/// Walks the calling thread from this function with framehop; returns the frame count.
#[inline(never)]
pub fn walk_here(unwinder: &Fh, cache: &mut FhCache, lo: u64, hi: u64) -> usize {
    let (rip, rsp, rbp): (u64, u64, u64);
    // SAFETY: copies registers into outputs; rsp and rbp are never operands.
    unsafe {
        std::arch::asm!("lea {0}, [rip]", "mov {1}, rsp", "mov {2}, rbp",
            out(reg) rip, out(reg) rsp, out(reg) rbp, options(nomem, nostack, preserves_flags));
    }
    let mut read = |addr: u64| {
        if addr < rsp.saturating_sub(128) || addr < lo || addr.checked_add(8).is_none_or(|e| e > hi)
        {
            return Err(());
        }
        // SAFETY: inside this thread's live stack.
        Ok(unsafe { std::ptr::read_unaligned(addr as *const u64) })
    };
    let mut it = unwinder.iter_frames(rip, UnwindRegsX86_64::new(rip, rsp, rbp), cache, &mut read);
    let mut n = 0;
    while let Ok(Some(_)) = it.next() {
        n += 1;
        if n == 512 {
            break;
        }
    }
    std::hint::black_box(&rsp);
    n
}
