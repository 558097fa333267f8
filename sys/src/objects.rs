//! The objects loaded in this process, from the dynamic loader (`dl_iterate_phdr`): the one
//! walker kgpatch has. Each object is shown to a closure while the loader holds its lock, so
//! its program headers and name are valid for the call; the closure copies what it keeps.
//! Program-header constants are libc's (`libc::PT_LOAD`, `libc::PT_GNU_EH_FRAME`,
//! `libc::PF_X`...).
//!
//! Not async-signal-safe: the loader takes a lock (and a closure that allocates may meet a
//! lock the interrupted code holds). Never call it from a signal handler.
//!
//! # Safety
//! The `unsafe` here is the loader's contract: `dl_iterate_phdr` passes a valid
//! `dl_phdr_info` of `size` bytes per object, whose `dlpi_phdr` points at `dlpi_phnum`
//! program headers and whose `dlpi_name` is null or NUL-terminated, all valid until the
//! callback returns; [`Object`] borrows them for that call only (its lifetime cannot
//! escape the closure). The counters `dlpi_adds`/`dlpi_subs` are read only when `size`
//! says the loader's struct has them. A panic in the closure is caught before it would
//! unwind through the loader's C frames, and resumed once the walk returned.

#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// A snapshot of the loader's object-set counters (`dlpi_adds`, `dlpi_subs`): equal
/// stamps mean no object was loaded or unloaded in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ObjectsStamp {
    /// Objects loaded since start.
    pub adds: u64,
    /// Objects unloaded since start.
    pub subs: u64,
}

/// One loaded object, as the loader reports it during [`for_each`].
#[derive(Clone, Copy)]
pub struct Object<'a> {
    info: &'a libc::dl_phdr_info,
    size: usize,
    index: usize,
}

impl<'a> Object<'a> {
    /// The object's name as the loader knows it: empty for the executable, the path it was
    /// loaded from for a library, `linux-vdso.so.1` for the vdso.
    pub fn name(&self) -> &'a CStr {
        if self.info.dlpi_name.is_null() {
            return c"";
        }
        // SAFETY: non-null `dlpi_name` is NUL-terminated and valid during the callback
        // (module docs), which `'a` cannot outlive.
        unsafe { CStr::from_ptr(self.info.dlpi_name) }
    }

    /// The load bias: the object's addresses are its ELF virtual addresses plus this.
    pub fn bias(&self) -> u64 {
        self.info.dlpi_addr
    }

    /// Its program headers.
    pub fn phdrs(&self) -> &'a [libc::Elf64_Phdr] {
        if self.info.dlpi_phdr.is_null() || self.info.dlpi_phnum == 0 {
            return &[];
        }
        // SAFETY: `dlpi_phnum` headers at `dlpi_phdr`, valid during the callback.
        unsafe {
            std::slice::from_raw_parts(self.info.dlpi_phdr, usize::from(self.info.dlpi_phnum))
        }
    }

    /// `true` for the first object reported, the executable.
    pub fn is_main(&self) -> bool {
        self.index == 0
    }

    /// The position of the object in the walk (0: the executable).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The loader's counters, if its `dl_phdr_info` is new enough to carry them.
    pub fn stamp(&self) -> Option<ObjectsStamp> {
        let needed = std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8;
        (self.size >= needed).then_some(ObjectsStamp {
            adds: self.info.dlpi_adds,
            subs: self.info.dlpi_subs,
        })
    }

    /// `true` if one of the object's `PT_LOAD` segments holds `addr`.
    pub fn holds(&self, addr: u64) -> bool {
        self.phdrs().iter().any(|l| {
            let start = self.bias().wrapping_add(l.p_vaddr);
            l.p_type == libc::PT_LOAD && addr >= start && addr - start < l.p_memsz
        })
    }
}

impl std::fmt::Debug for Object<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("name", &self.name())
            .field("bias", &format_args!("{:#x}", self.bias()))
            .field("phdrs", &self.phdrs().len())
            .finish()
    }
}

struct Walk<'f> {
    visit: &'f mut dyn FnMut(&Object<'_>) -> ControlFlow<()>,
    index: usize,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

unsafe extern "C" fn visit_one(
    info: *mut libc::dl_phdr_info,
    size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut Walk` `for_each` passed, alive and not otherwise borrowed
    // during the walk; `info` is valid for the callback (module docs).
    let (walk, info) = unsafe { (&mut *data.cast::<Walk<'_>>(), &*info) };
    let object = Object {
        info,
        size,
        index: walk.index,
    };
    walk.index += 1;
    match catch_unwind(AssertUnwindSafe(|| (walk.visit)(&object))) {
        Ok(ControlFlow::Continue(())) => 0,
        Ok(ControlFlow::Break(())) => 1,
        Err(panic) => {
            walk.panic = Some(panic);
            1
        }
    }
}

/// Shows every loaded object to `visit`, the executable first, in the loader's order, until
/// `visit` breaks. Holds the loader's lock meanwhile: `visit` must not `dlopen`/`dlclose`.
pub fn for_each(mut visit: impl FnMut(&Object<'_>) -> ControlFlow<()>) {
    let mut walk = Walk {
        visit: &mut visit,
        index: 0,
        panic: None,
    };
    // SAFETY: `visit_one` follows the callback contract and uses `data` only as the `Walk`
    // passed here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit_one), (&mut walk as *mut Walk<'_>).cast()) };
    if let Some(panic) = walk.panic {
        resume_unwind(panic);
    }
}

/// The load bias of the object behind a `dlopen` handle (glibc's `struct link_map` starts
/// with `l_addr`, the bias; `RTLD_DI_LINKMAP` hands it out). `None` if `dlinfo` fails.
/// A handle's object is the walked object with the same bias: that is how a pin is checked
/// to hold the object that was seen, not another one loaded later under the same name.
///
/// # Safety
/// `handle` must be a live handle returned by `dlopen` and not yet closed.
pub unsafe fn handle_bias(handle: *mut c_void) -> Option<u64> {
    let mut map: *mut c_void = std::ptr::null_mut();
    // SAFETY: `handle` is live (caller); RTLD_DI_LINKMAP stores a `struct link_map *` into
    // the pointer we pass.
    let rc = unsafe {
        libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut c_void).cast::<c_void>(),
        )
    };
    if rc != 0 || map.is_null() {
        return None;
    }
    // SAFETY: a link map starts with `l_addr` (<link.h>) and stays valid while the handle
    // is open.
    Some(unsafe { map.cast::<u64>().read() })
}

/// The loader's current object-set counters (from the first object; default when the
/// loader does not keep them). Takes the loader's lock; not for signal handlers.
pub fn stamp() -> ObjectsStamp {
    let mut stamp = ObjectsStamp::default();
    for_each(|o| {
        if let Some(s) = o.stamp() {
            stamp = s;
        }
        ControlFlow::Break(())
    });
    stamp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_comes_first_and_libc_holds_getpid() {
        let mut names = Vec::new();
        let mut main_holds_us = false;
        let mut libc_of_getpid = None;
        let here = the_executable_comes_first_and_libc_holds_getpid as fn() as usize as u64;
        let getpid = libc::getpid as unsafe extern "C" fn() -> libc::pid_t as usize as u64;
        for_each(|o| {
            names.push(o.name().to_string_lossy().into_owned());
            if o.is_main() {
                main_holds_us = o.holds(here);
                assert!(o.name().is_empty());
                assert!(o
                    .phdrs()
                    .iter()
                    .any(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0));
            }
            if o.holds(getpid) {
                libc_of_getpid = Some(o.name().to_string_lossy().into_owned());
            }
            ControlFlow::Continue(())
        });
        assert!(main_holds_us, "{names:?}");
        assert!(names.len() >= 3, "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("linux-vdso")),
            "{names:?}"
        );
        assert!(libc_of_getpid.unwrap().contains("libc.so"));
    }

    #[test]
    fn break_stops_the_walk_and_the_stamp_moves_with_dlopen() {
        let mut seen = 0;
        for_each(|_| {
            seen += 1;
            ControlFlow::Break(())
        });
        assert_eq!(seen, 1);
        // A system library this test binary does not link: loading it moves `adds`.
        let name = c"libresolv.so.2";
        // SAFETY: RTLD_NOLOAD only looks the object up.
        let loaded = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        assert!(
            loaded.is_null(),
            "libresolv is already loaded: pick another library"
        );
        let before = stamp();
        assert!(before.adds > 0);
        // SAFETY: a system library whose initialisers only set up its own state.
        let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "libresolv.so.2 cannot be loaded");
        let after = stamp();
        // SAFETY: our own handle, closed once.
        unsafe { libc::dlclose(h) };
        assert!(after.adds > before.adds, "{before:?} {after:?}");
    }

    #[test]
    fn a_handle_has_the_bias_the_walk_shows() {
        let mut libc_bias = None;
        let getpid = libc::getpid as unsafe extern "C" fn() -> libc::pid_t as usize as u64;
        for_each(|o| {
            if o.holds(getpid) {
                libc_bias = Some(o.bias());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        // SAFETY: RTLD_NOLOAD only takes a reference on the loaded libc.
        let h = unsafe { libc::dlopen(c"libc.so.6".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        assert!(!h.is_null());
        // SAFETY: `h` is live until the dlclose below.
        let bias = unsafe { handle_bias(h) };
        // SAFETY: our own handle, closed once.
        unsafe { libc::dlclose(h) };
        assert_eq!(bias, libc_bias);
        assert!(bias.is_some_and(|b| b != 0));
    }

    #[test]
    #[should_panic(expected = "from the visitor")]
    fn a_panic_in_the_visitor_comes_out_of_for_each() {
        for_each(|_| panic!("from the visitor"));
    }
}
