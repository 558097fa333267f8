//! The live process: enumerating loaded objects (through [`kgpatch_sys::objects`], the one
//! `dl_iterate_phdr` walker), opening a module
//! (`dlopen(RTLD_NOW | RTLD_LOCAL)`), filling its slots, running its callbacks, closing it;
//! pinning a library that holds patch sites (`dlopen(RTLD_NOLOAD)`, [`Pin`]).
//!
//! # Safety
//! This module holds the crate's OS-facing `unsafe`. Memory is read only inside ranges the
//! loader reports as mapped: notes of loaded objects while `dl_iterate_phdr` holds the
//! loader lock, and the module's own `.kgpatch` section, which
//! [`ModuleFile::read`] checked lies in a writable `PT_LOAD` of the module and which stays
//! mapped while the `Loaded` handle is open. Module code (callbacks) is called only after
//! every slot is filled; opening a module is `unsafe` because its initialisers run.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kgpatch_sys::objects::{self, Object};

use crate::elf::ModuleFile;
use crate::error::KmodError;
use crate::manifest::Manifest;
use crate::resolve::{resolve_against, LoadedObject, ResolveOptions, Resolved};

/// The note type of a GNU build-id (`<elf.h>`; libc does not export it).
const NT_GNU_BUILD_ID: u32 = 3;

/// Parses ELF notes (4-byte aligned) and returns the GNU build-id descriptor.
fn build_id_from_notes(mut notes: &[u8]) -> Option<Vec<u8>> {
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let ntype = word(notes, 8)?;
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        if ntype == NT_GNU_BUILD_ID && notes.get(12..12 + namesz)? == b"GNU\0" {
            return Some(notes[name_end..name_end + descsz].to_vec());
        }
        notes = &notes[desc_end..];
    }
    None
}

/// The address of the agent's runtime table (`struct kgpatch_runtime`), 0 until
/// [`set_runtime`].
static RUNTIME: AtomicU64 = AtomicU64::new(0);

/// The data symbol a module exports to receive the runtime table's address.
pub const RUNTIME_SYMBOL: &str = "kgpatch__runtime";

/// Records the address of the runtime table (shadow variables) that [`Loaded::resolve`]
/// writes into each module's `kgpatch__runtime` word. The agent calls it once at start.
pub fn set_runtime(table: u64) {
    RUNTIME.store(table, Ordering::Release);
}

/// Serializes `Loaded::open` and `Loaded::close`.
static OPEN_LOCK: Mutex<()> = Mutex::new(());

/// The GNU build-id of a loaded object, from its `PT_NOTE` segments.
fn build_id_of(object: &Object<'_>) -> Option<Vec<u8>> {
    let phdrs = object.phdrs();
    for note in phdrs.iter().filter(|p| p.p_type == libc::PT_NOTE) {
        // Only read notes that lie inside a loaded segment of this object.
        let inside = phdrs.iter().any(|l| {
            l.p_type == libc::PT_LOAD
                && note.p_vaddr >= l.p_vaddr
                && note.p_vaddr.checked_add(note.p_memsz) <= l.p_vaddr.checked_add(l.p_filesz)
        });
        if !inside || note.p_memsz > 1 << 20 {
            continue;
        }
        let addr = object.bias().wrapping_add(note.p_vaddr) as *const u8;
        // SAFETY: `[addr, addr + p_memsz)` lies in a file-backed part of a PT_LOAD of this
        // object (checked above), mapped and readable while the object is loaded, which the
        // loader lock held during the walk guarantees.
        let bytes = unsafe { std::slice::from_raw_parts(addr, note.p_memsz as usize) };
        if let Some(id) = build_id_from_notes(bytes) {
            return Some(id);
        }
    }
    None
}

/// The objects loaded in this process, the executable first (its file is `/proc/self/exe`,
/// which names the running image even if its path was replaced or deleted).
pub fn loaded_objects() -> Vec<LoadedObject> {
    let mut objects = Vec::new();
    objects::for_each(|o| {
        let name = o.name().to_string_lossy().into_owned();
        let file = if o.is_main() {
            PathBuf::from("/proc/self/exe")
        } else {
            PathBuf::from(&name)
        };
        objects.push(LoadedObject {
            name,
            file,
            bias: o.bias(),
            is_main: o.is_main(),
            build_id: build_id_of(o),
        });
        ControlFlow::Continue(())
    });
    objects
}

fn dlerror_message() -> String {
    // SAFETY: `dlerror` returns NULL or a NUL-terminated string valid until the next dl*
    // call on this thread; we copy it at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: non-null `dlerror` result, see above.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

/// A patch module opened in this process with `dlopen(RTLD_NOW | RTLD_LOCAL)`.
///
/// Dropping it does not unload the module (its code may be patched in); call
/// [`Loaded::close`] after the patch is reverted.
#[derive(Debug)]
pub struct Loaded {
    handle: NonNull<c_void>,
    module: ModuleFile,
    bias: u64,
    resolved: Option<Resolved>,
}

// SAFETY: a dlopen handle is process-wide and may be used from any thread; the other fields
// are owned data.
unsafe impl Send for Loaded {}

impl Loaded {
    /// Reads and validates the module file, then `dlopen`s it (`RTLD_NOW | RTLD_LOCAL`) and
    /// checks that the mapped manifest equals the file's. A module already loaded in this
    /// process (same path or same file) is refused: two handles would share one set of
    /// slots.
    ///
    /// # Safety
    /// `dlopen` runs the module's initialisers (C constructors, `.init_array`). The module
    /// must be trusted code, and must not run code at load time that needs its reference
    /// slots (they are empty until [`Loaded::resolve`]).
    pub unsafe fn open(path: impl AsRef<Path>) -> Result<Loaded, KmodError> {
        let path = path.as_ref();
        let module = ModuleFile::read(path)?;
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| KmodError::Dlopen {
            path: path.to_owned(),
            message: "the path contains a NUL byte".into(),
        })?;
        // A relative path without '/' would make dlopen search the library path.
        let cpath = if path.as_os_str().as_bytes().contains(&b'/') {
            cpath
        } else {
            CString::new([b"./", path.as_os_str().as_bytes()].concat()).unwrap_or(cpath)
        };
        // One open at a time, so that the already-loaded check below is not raced.
        let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `cpath` is NUL-terminated; RTLD_NOLOAD only looks the object up (by name
        // and by file identity), it loads and runs nothing.
        let existing = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if !existing.is_null() {
            // SAFETY: drops the reference RTLD_NOLOAD just took.
            unsafe { libc::dlclose(existing) };
            return Err(KmodError::AlreadyLoaded {
                path: path.to_owned(),
            });
        }
        // SAFETY: `cpath` is NUL-terminated; the caller vouched for the module's initialisers.
        let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        let Some(handle) = NonNull::new(handle) else {
            return Err(KmodError::Dlopen {
                path: path.to_owned(),
                message: dlerror_message(),
            });
        };
        // SAFETY: `handle` is the live handle just opened.
        let Some(bias) = (unsafe { objects::handle_bias(handle.as_ptr()) }) else {
            let message = dlerror_message();
            // SAFETY: closing the handle we just opened; nothing of it is in use.
            unsafe { libc::dlclose(handle.as_ptr()) };
            return Err(KmodError::Dlopen {
                path: path.to_owned(),
                message,
            });
        };
        let loaded = Loaded {
            handle,
            module,
            bias,
            resolved: None,
        };
        // The object dlopen mapped must be the file we read: same manifest bytes, and the
        // same build-id in memory as on disk (the file could be replaced in between).
        let mapped_id = loaded_objects()
            .into_iter()
            .find(|o| !o.is_main && o.bias == bias)
            .and_then(|o| o.build_id);
        let same_build = match (&mapped_id, &loaded.module.build_id) {
            (Some(memory), Some(file)) => memory == file,
            _ => true,
        };
        if !same_build || loaded.live_section() != loaded.module.section_bytes {
            // SAFETY: as above; the module's code is not in use.
            unsafe { libc::dlclose(handle.as_ptr()) };
            return Err(KmodError::ModuleChanged {
                path: path.to_owned(),
            });
        }
        Ok(loaded)
    }

    /// A copy of the mapped `.kgpatch` section.
    fn live_section(&self) -> Vec<u8> {
        let addr = self.bias.wrapping_add(self.module.section_vaddr) as *const u8;
        // SAFETY: `ModuleFile::read` checked the section lies inside a file-backed part of a
        // writable PT_LOAD of the module, which is mapped while the handle is open.
        unsafe { std::slice::from_raw_parts(addr, self.module.section_bytes.len()) }.to_vec()
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.module.manifest
    }

    /// The module as read from its file.
    pub fn module(&self) -> &ModuleFile {
        &self.module
    }

    /// The module's load bias.
    pub fn bias(&self) -> u64 {
        self.bias
    }

    /// The last successful resolution.
    pub fn resolved(&self) -> Option<&Resolved> {
        self.resolved.as_ref()
    }

    /// The current value of each reference slot, in manifest order (0 = empty).
    pub fn slot_values(&self) -> Vec<u64> {
        let section = self.live_section();
        self.module
            .manifest
            .references
            .iter()
            .map(|r| {
                let at = r.slot_offset as usize;
                section
                    .get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes)
            })
            .collect()
    }

    /// Resolves the module against the objects loaded in this process and, only if every
    /// function and reference resolved and checked, fills every slot. On error nothing was
    /// written. Resolving again with the same outcome writes nothing.
    pub fn resolve(&mut self, opts: ResolveOptions) -> Result<&Resolved, KmodError> {
        let objects = loaded_objects();
        let resolved = resolve_against(&self.module, self.bias, &objects, opts)?;
        if self.resolved.as_ref() == Some(&resolved) {
            // Already filled with these values (new code may be running): write nothing.
            return Ok(self.resolved.insert(resolved));
        }
        let start = self.bias.wrapping_add(self.module.section_vaddr);
        let end = start.wrapping_add(self.module.section_bytes.len() as u64);
        for slot in &resolved.slots {
            // `resolve_against` computed every slot address inside the section at an
            // 8-aligned offset; re-check before writing through it.
            assert!(
                slot.slot_address >= start
                    && slot.slot_address.wrapping_add(8) <= end
                    && slot.slot_address % 8 == 0,
                "slot address outside the module's manifest"
            );
            // SAFETY: the slot is an 8-aligned word inside the mapped, writable `.kgpatch`
            // section of this module (checked above and by `ModuleFile::read`); the module's
            // code accesses it only through volatile reads.
            let word = unsafe { AtomicU64::from_ptr(slot.slot_address as *mut u64) };
            word.store(slot.value, Ordering::Release);
        }
        self.fill_runtime();
        Ok(self.resolved.insert(resolved))
    }

    /// Writes the runtime table's address into the module's `kgpatch__runtime` word, if it
    /// exports one that is an 8-byte, 8-aligned object inside a writable loaded segment
    /// (anything else is left alone).
    fn fill_runtime(&self) {
        let table = RUNTIME.load(Ordering::Acquire);
        let Some(export) = self.module.exports.get(RUNTIME_SYMBOL) else {
            return;
        };
        let writable = self.module.loads.iter().any(|l| {
            l.flags & object::elf::PF_W != 0
                && export.value >= l.vaddr
                && export.value.checked_add(8) <= l.vaddr.checked_add(l.memsz)
        });
        if table == 0
            || export.kind != object::elf::STT_OBJECT
            || export.size != 8
            || export.value % 8 != 0
            || !writable
        {
            return;
        }
        let addr = self.bias.wrapping_add(export.value);
        // SAFETY: an 8-aligned, 8-byte object of this open module inside one of its writable
        // PT_LOAD segments (checked above), mapped while the handle is open; the module reads
        // it only through volatile or atomic loads (kgpatch.h).
        let word = unsafe { AtomicU64::from_ptr(addr as *mut u64) };
        word.store(table, Ordering::Release);
    }

    fn callback_address(&self, symbol: &str, role: &str) -> Result<u64, KmodError> {
        if self.resolved.is_none() {
            return Err(KmodError::NotResolved {
                name: self.module.manifest.name.clone(),
            });
        }
        Ok(self
            .bias
            .wrapping_add(self.module.function_export(symbol, role)?))
    }

    /// Runtime address of a function the module exports.
    pub fn function_address(&self, symbol: &str) -> Result<u64, KmodError> {
        Ok(self
            .bias
            .wrapping_add(self.module.function_export(symbol, "function")?))
    }

    /// Runs the pre-apply callback, if any. A nonzero return is a veto.
    pub fn pre_apply(&self) -> Result<(), KmodError> {
        let Some(symbol) = &self.module.manifest.callbacks.pre_apply else {
            return Ok(());
        };
        let addr = self.callback_address(symbol, "pre-apply")?;
        let mut buf = [0u8; 512];
        // SAFETY: `addr` is an exported function of this open module, declared by the
        // author as `int f(char *msg, size_t cap)`; its slots are filled.
        let f = unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(*mut c_char, usize) -> c_int>(
                addr as usize,
            )
        };
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let code = unsafe { f(buf.as_mut_ptr().cast::<c_char>(), buf.len()) };
        if code == 0 {
            return Ok(());
        }
        let last = buf.len() - 1;
        buf[last] = 0;
        let message = CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Err(KmodError::Vetoed {
            name: self.module.manifest.name.clone(),
            code,
            message,
        })
    }

    fn run_void(&self, symbol: &Option<String>, role: &str) -> Result<(), KmodError> {
        let Some(symbol) = symbol else {
            return Ok(());
        };
        let addr = self.callback_address(symbol, role)?;
        // SAFETY: an exported function of this open module, declared `void f(void)`.
        let f = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn()>(addr as usize) };
        // SAFETY: the module is loaded and its slots are filled.
        unsafe { f() };
        Ok(())
    }

    /// Runs the post-apply callback, if any.
    pub fn post_apply(&self) -> Result<(), KmodError> {
        self.run_void(&self.module.manifest.callbacks.post_apply, "post-apply")
    }

    /// Runs the pre-revert callback, if any.
    pub fn pre_revert(&self) -> Result<(), KmodError> {
        self.run_void(&self.module.manifest.callbacks.pre_revert, "pre-revert")
    }

    /// Runs the post-revert callback, if any.
    pub fn post_revert(&self) -> Result<(), KmodError> {
        self.run_void(&self.module.manifest.callbacks.post_revert, "post-revert")
    }

    /// Bytes the module maps: the sum of its `PT_LOAD` segments' `p_memsz`, each widened to
    /// whole pages as the kernel maps them.
    pub fn mapped_bytes(&self) -> u64 {
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as u64,
            _ => 4096,
        };
        self.module.loads.iter().fold(0u64, |sum, l| {
            let start = l.vaddr & !(page - 1);
            let end = l.vaddr.saturating_add(l.memsz).saturating_add(page - 1) & !(page - 1);
            sum.saturating_add(end.saturating_sub(start))
        })
    }

    /// Unloads the module (`dlclose`).
    ///
    /// # Safety
    /// No thread may execute, or later call, code of the module: the patch must be reverted
    /// and every thread seen outside the module's functions and stubs.
    pub unsafe fn close(self) -> Result<(), KmodError> {
        let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the handle came from dlopen and is closed once (this consumes `self`); the
        // caller guarantees nothing runs the module's code.
        let rc = unsafe { libc::dlclose(self.handle.as_ptr()) };
        if rc != 0 {
            return Err(KmodError::Dlclose {
                path: self.module.path.clone(),
                message: dlerror_message(),
            });
        }
        Ok(())
    }
}

/// A reference to a loaded library, taken with `dlopen(RTLD_NOLOAD | RTLD_NOW)`: while it
/// is held the library stays mapped even if the program `dlclose`s its own handles (the
/// loader unmaps an object when its last reference goes). kgpatch pins every library that
/// holds a patch site, so that patched code cannot be unmapped under its jump.
#[derive(Debug)]
pub struct Pin {
    handle: NonNull<c_void>,
    name: PathBuf,
    bias: u64,
}

// SAFETY: a dlopen handle is process-wide and may be used from any thread.
unsafe impl Send for Pin {}

impl Pin {
    /// Pins the object whose loaded segments hold `addr`. `Ok(None)` for the executable,
    /// which is never unloaded. An address no loaded object holds, or an object that is
    /// unloaded meanwhile, is an error.
    pub fn object_at(addr: u64) -> Result<Option<Pin>, KmodError> {
        // (is the executable, name, bias) of the object whose PT_LOAD holds `addr`.
        let mut found: Option<(bool, CString, u64)> = None;
        objects::for_each(|o| {
            if !o.holds(addr) {
                return ControlFlow::Continue(());
            }
            found = Some((o.is_main(), o.name().to_owned(), o.bias()));
            ControlFlow::Break(())
        });
        let unloaded = |name: &Path, message: String| KmodError::Dlopen {
            path: name.to_owned(),
            message,
        };
        let Some((is_main, cname, bias)) = found else {
            return Err(unloaded(
                Path::new(&format!("{addr:#x}")),
                "no loaded object holds this address any more".into(),
            ));
        };
        if is_main {
            return Ok(None);
        }
        let name = PathBuf::from(std::ffi::OsStr::from_bytes(cname.as_bytes()));
        let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `cname` is NUL-terminated; RTLD_NOLOAD only takes a reference to an
        // object already loaded: it maps nothing and runs no initialiser.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        let Some(handle) = NonNull::new(handle) else {
            return Err(unloaded(
                &name,
                format!(
                    "it was unloaded before kgpatch could pin it ({})",
                    dlerror_message()
                ),
            ));
        };
        // SAFETY: `handle` is the live handle just taken.
        let pinned_bias = unsafe { objects::handle_bias(handle.as_ptr()) };
        if pinned_bias != Some(bias) {
            // Another object of that name, loaded after ours went away: not the one we want.
            // SAFETY: drops the reference RTLD_NOLOAD just took; the object stays as it was.
            unsafe { libc::dlclose(handle.as_ptr()) };
            return Err(unloaded(
                &name,
                "it was unloaded and loaded again elsewhere before kgpatch could pin it".into(),
            ));
        }
        Ok(Some(Pin { handle, name, bias }))
    }

    /// The loader's name of the pinned object.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The pinned object's load bias.
    pub fn bias(&self) -> u64 {
        self.bias
    }

    /// Drops the reference. If the program has `dlclose`d the object meanwhile, this was the
    /// last one: the loader runs its destructors and unmaps it now.
    ///
    /// # Safety
    /// Nothing of kgpatch may still lead into the object: no patch site in it, and no stub
    /// or trampoline a thread may still run that jumps into it.
    pub unsafe fn release(self) -> Result<(), KmodError> {
        let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the handle came from dlopen and is closed once (this consumes `self`); the
        // caller guarantees nothing of ours leads into the object.
        let rc = unsafe { libc::dlclose(self.handle.as_ptr()) };
        if rc != 0 {
            return Err(KmodError::Dlclose {
                path: self.name,
                message: dlerror_message(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::build_id_from_notes;

    #[test]
    fn notes_parse_and_refuse_garbage() {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_ne_bytes());
        n.extend_from_slice(&3u32.to_ne_bytes());
        n.extend_from_slice(&3u32.to_ne_bytes());
        n.extend_from_slice(b"GNU\0");
        n.extend_from_slice(&[1, 2, 3, 0]);
        assert_eq!(build_id_from_notes(&n), Some(vec![1, 2, 3]));
        n[4] = 200; // descriptor runs past the end
        assert_eq!(build_id_from_notes(&n), None);
        assert_eq!(build_id_from_notes(&[0xff; 12]), None);
    }
}
