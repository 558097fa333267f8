//! Writing a patch module in Rust: macros that emit manifest records into the `.kgpatch`
//! section of a `cdylib`, with the same bytes as `include/kgpatch.h` emits from C.
//!
//! ```no_run
//! use kgpatch_kmod::{callback, patch_module, reference, replace};
//!
//! patch_module! {
//!     name: "fix-overflow",
//!     version: "1",
//!     description: "clamp the counter",
//!     target: library("libfoo.so.1"),
//! }
//! // A slot the loader fills with the address of the target's `static int limit` in limit.c.
//! reference!(static LIMIT: *const i32 = "limit", file = "limit.c");
//! reference!(static LOG: unsafe extern "C" fn(i32) = "log_value");
//!
//! #[no_mangle]
//! pub extern "C" fn fixed_bump(x: i32) -> i32 {
//!     // SAFETY: the loader filled both slots before this function became reachable.
//!     unsafe { (LOG.get())(x); x.min(*LIMIT.get()) }
//! }
//! replace!(old = "bump", file = "counter.c", new = fixed_bump, size = 23, checksum = 0x1234_5678_9abc_def0);
//!
//! #[no_mangle]
//! pub extern "C" fn check(msg: *mut std::ffi::c_char, cap: usize) -> std::ffi::c_int {
//!     0 // nothing to veto
//! }
//! callback!(pre_apply = check);
//! # fn main() {}
//! ```
//!
//! New functions and callbacks must be `#[no_mangle] pub extern "C"` so that the module's
//! `.dynsym` names them. Give them names the target does not export (the loader finds the
//! module's own definition, but calls inside the module to an interposed name would go to
//! the executable's).
//!
//! # Safety
//! The record types are `Sync` statics that the loader writes from outside Rust: only the
//! slot word of a [`Slot`], once, before any code of the module can read it. Reads of a slot
//! are volatile. See the `SAFETY` comments on each `unsafe` item.

#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::marker::PhantomData;

use crate::raw::{self, RawCallback, RawReplace, RawTarget, RecordHeader};

/// A manifest record as a `static`: header, fixed part `F`, `N` string bytes.
///
/// The zero-sized `UnsafeCell` makes every record interior-mutable, so that all records land
/// in one writable `.kgpatch` section (slot records must be writable; mixing read-only and
/// writable statics in one named section is refused by the toolchain).
#[doc(hidden)]
#[repr(C, align(8))]
pub struct Record<F, const N: usize> {
    header: RecordHeader,
    fixed: F,
    strings: [u8; N],
    _writable: UnsafeCell<()>,
}

// SAFETY: nothing ever writes through `_writable` (it is zero-sized); the other fields are
// plain integers read only by the loader from outside Rust.
unsafe impl<F: Sync, const N: usize> Sync for Record<F, N> {}

impl<F, const N: usize> Record<F, N> {
    #[doc(hidden)]
    pub const fn new(kind: u16, fixed: F, strings: [u8; N]) -> Self {
        Record {
            header: header::<Self>(kind),
            fixed,
            strings,
            _writable: UnsafeCell::new(()),
        }
    }
}

const fn header<T>(kind: u16) -> RecordHeader {
    let size = core::mem::size_of::<T>();
    assert!(size % 8 == 0 && size <= raw::MAX_RECORD_SIZE as usize);
    RecordHeader {
        magic: raw::MAGIC,
        version: raw::FORMAT_VERSION,
        kind,
        size: size as u32,
        reserved: 0,
    }
}

/// A reference slot: a pointer-sized word the loader sets to the runtime address of a
/// target symbol before any new function can run. `T` is the pointer type (`*const i32`,
/// `unsafe extern "C" fn(i32) -> i32`, ...). Declare it with [`reference!`](crate::reference).
#[repr(C, align(8))]
pub struct Slot<T, const N: usize> {
    header: RecordHeader,
    slot: UnsafeCell<usize>,
    index: u32,
    ref_kind: u32,
    strings: [u8; N],
    _type: PhantomData<T>,
}

// SAFETY: the slot word is written once by the loader, before any code of the module that
// reads it can run (the loader fills slots before it makes a new function reachable);
// afterwards it is only read.
unsafe impl<T, const N: usize> Sync for Slot<T, N> {}

impl<T: Copy, const N: usize> Slot<T, N> {
    #[doc(hidden)]
    pub const fn new(index: u32, ref_kind: u32, strings: [u8; N]) -> Self {
        assert!(
            core::mem::size_of::<T>() == core::mem::size_of::<usize>(),
            "a kgpatch reference slot must be pointer-sized (a raw pointer or fn pointer)"
        );
        Slot {
            header: header::<Self>(raw::KIND_REF),
            slot: UnsafeCell::new(0),
            index,
            ref_kind,
            strings,
            _type: PhantomData,
        }
    }

    /// The address the loader wrote, or `None` when the slot is still empty.
    pub fn try_get(&self) -> Option<T> {
        // SAFETY: the slot is a valid, aligned word of this static; the loader's write
        // happened before this module's code could run (see the `Sync` impl).
        let word = unsafe { core::ptr::read_volatile(self.slot.get()) };
        if word == 0 {
            return None;
        }
        // SAFETY: `T` is pointer-sized (asserted in `new`) and non-zero; the loader wrote the
        // address of a symbol of the kind the author declared, so it is a valid `T`.
        Some(unsafe { core::mem::transmute_copy::<usize, T>(&word) })
    }

    /// The address the loader wrote. Aborts the process if the slot is empty, which the
    /// loader rules out (it fills every slot before any new function is reachable).
    pub fn get(&self) -> T {
        match self.try_get() {
            Some(v) => v,
            None => std::process::abort(),
        }
    }
}

/// Total length of `parts` joined as NUL-terminated strings.
#[doc(hidden)]
pub const fn strings_len(parts: &[&str]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < parts.len() {
        n += parts[i].len() + 1;
        i += 1;
    }
    n
}

/// `parts` joined as NUL-terminated strings. Refuses (at compile time) a part containing NUL.
#[doc(hidden)]
pub const fn strings<const N: usize>(parts: &[&str]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    let mut i = 0;
    while i < parts.len() {
        let b = parts[i].as_bytes();
        let mut j = 0;
        while j < b.len() {
            assert!(b[j] != 0, "kgpatch manifest strings must not contain NUL");
            out[at] = b[j];
            at += 1;
            j += 1;
        }
        at += 1;
        i += 1;
    }
    assert!(at == N);
    out
}

#[doc(hidden)]
pub const fn target(kind: u32) -> RawTarget {
    RawTarget {
        target_kind: kind,
        reserved: 0,
    }
}

#[doc(hidden)]
pub const fn replace(size: u64, checksum: u64, index: u32) -> RawReplace {
    RawReplace {
        expected_size: size,
        checksum,
        index,
        flags: 0,
    }
}

#[doc(hidden)]
pub const fn callback(which: u32) -> RawCallback {
    RawCallback { which, reserved: 0 }
}

/// Emits one record. Internal.
#[doc(hidden)]
#[macro_export]
macro_rules! __kgpatch_record {
    ($kind:expr, $fixed_ty:ty, $fixed:expr, [$($s:expr),* $(,)?]) => {
        const _: () = {
            #[used]
            #[link_section = ".kgpatch"]
            static RECORD: $crate::author::Record<
                $fixed_ty,
                { $crate::author::strings_len(&[$($s),*]) },
            > = $crate::author::Record::new($kind, $fixed, $crate::author::strings(&[$($s),*]));
        };
    };
}

/// `$x`, or `$default` when absent. Internal.
#[doc(hidden)]
#[macro_export]
macro_rules! __kgpatch_or {
    ($default:expr;) => {
        $default
    };
    ($default:expr; $x:expr) => {
        $x
    };
}

/// Declares the patch and its target. Once per module.
///
/// ```ignore
/// patch_module! { name: "fix", version: "1", description: "…", target: executable }
/// patch_module! { name: "fix", version: "1", description: "…", target: library("libfoo.so.1"),
///                 build_id: "3f1c…" }
/// ```
#[macro_export]
macro_rules! patch_module {
    (name: $name:expr, version: $version:expr, description: $desc:expr,
     target: executable $(, build_id: $bid:expr)? $(,)?) => {
        $crate::patch_module!(@emit $name, $version, $desc,
            $crate::raw::TARGET_EXE, "", $crate::__kgpatch_or!(""; $($bid)?));
    };
    (name: $name:expr, version: $version:expr, description: $desc:expr,
     target: library($soname:expr) $(, build_id: $bid:expr)? $(,)?) => {
        $crate::patch_module!(@emit $name, $version, $desc,
            $crate::raw::TARGET_LIB, $soname, $crate::__kgpatch_or!(""; $($bid)?));
    };
    (@emit $name:expr, $version:expr, $desc:expr, $tkind:expr, $soname:expr, $bid:expr) => {
        $crate::__kgpatch_record!($crate::raw::KIND_MODULE, (), (), [$name, $version, $desc]);
        $crate::__kgpatch_record!(
            $crate::raw::KIND_TARGET,
            $crate::raw::RawTarget,
            $crate::author::target($tkind),
            [$soname, $bid]
        );
    };
}

/// Replaces a function of the target with `new` (a `#[no_mangle] pub extern "C" fn` of the
/// module). `file` (the `STT_FILE` of a local symbol) and `index` (position among the
/// same-named candidates) are optional, in that order. `size` and `checksum` come from
/// `kgpatch_kmod::describe_symbol`; 0 means "not checked", which the loader refuses unless
/// told to allow it.
///
/// ```ignore
/// replace!(old = "parse", new = fixed_parse, size = 120, checksum = 0x0123_4567_89ab_cdef);
/// replace!(old = "helper", file = "b.c", index = 0, new = fixed_helper, size = 9, checksum = 0x1);
/// ```
#[macro_export]
macro_rules! replace {
    (old = $old:expr, $(file = $file:expr,)? $(index = $index:expr,)? new = $new:ident,
     size = $size:expr, checksum = $sum:expr $(,)?) => {
        const _: () = {
            // The new function must exist in this crate.
            let _ = $new;
        };
        $crate::__kgpatch_record!(
            $crate::raw::KIND_REPLACE,
            $crate::raw::RawReplace,
            $crate::author::replace(
                $size,
                $sum,
                $crate::__kgpatch_or!($crate::raw::INDEX_NONE; $($index)?),
            ),
            [$old, $crate::__kgpatch_or!(""; $($file)?), stringify!($new)]
        );
    };
}

/// Declares a reference slot `static NAME: Slot<T, _>` filled with the runtime address of a
/// target symbol (function or variable, global or local). Read it with `NAME.get()`.
/// Optional, in this order: `file = "x.c"`, `index = n`, `kind = function|variable`.
///
/// ```ignore
/// reference!(static COUNTER: *mut u64 = "counter", file = "stats.c");
/// reference!(static HELPER: unsafe extern "C" fn(i32) -> i32 = "helper", kind = function);
/// ```
#[macro_export]
macro_rules! reference {
    ($vis:vis static $slot:ident : $ty:ty = $sym:expr $(, file = $file:expr)?
     $(, index = $index:expr)? $(, kind = $kind:ident)? $(,)?) => {
        #[used]
        #[link_section = ".kgpatch"]
        $vis static $slot: $crate::author::Slot<
            $ty,
            { $crate::author::strings_len(&[$sym, $crate::__kgpatch_or!(""; $($file)?)]) },
        > = $crate::author::Slot::new(
            $crate::__kgpatch_or!($crate::raw::INDEX_NONE; $($index)?),
            $crate::__kgpatch_ref_kind!($($kind)?),
            $crate::author::strings(&[$sym, $crate::__kgpatch_or!(""; $($file)?)]),
        );
    };
}

/// Maps `function` / `variable` / nothing to a `REF_*` constant. Internal.
#[doc(hidden)]
#[macro_export]
macro_rules! __kgpatch_ref_kind {
    () => {
        $crate::raw::REF_ANY
    };
    (function) => {
        $crate::raw::REF_FUNC
    };
    (variable) => {
        $crate::raw::REF_OBJECT
    };
}

/// Declares a callback: `callback!(pre_apply = f)`, `post_apply`, `pre_revert`,
/// `post_revert`. `f` is a `#[no_mangle] pub extern "C" fn`; `pre_apply` has the signature
/// `extern "C" fn(msg: *mut c_char, cap: usize) -> c_int` (nonzero vetoes, with a
/// NUL-terminated reason written to `msg`), the others `extern "C" fn()`.
#[macro_export]
macro_rules! callback {
    (pre_apply = $f:ident) => {
        $crate::callback!(@emit $crate::raw::CALLBACK_PRE_APPLY, $f);
    };
    (post_apply = $f:ident) => {
        $crate::callback!(@emit $crate::raw::CALLBACK_POST_APPLY, $f);
    };
    (pre_revert = $f:ident) => {
        $crate::callback!(@emit $crate::raw::CALLBACK_PRE_REVERT, $f);
    };
    (post_revert = $f:ident) => {
        $crate::callback!(@emit $crate::raw::CALLBACK_POST_REVERT, $f);
    };
    (@emit $which:expr, $f:ident) => {
        const _: () = {
            let _ = $f;
        };
        $crate::__kgpatch_record!(
            $crate::raw::KIND_CALLBACK,
            $crate::raw::RawCallback,
            $crate::author::callback($which),
            [stringify!($f)]
        );
    };
}

/// `int ctor(void *obj, void *shadow_data, void *ctor_data)` of a shadow variable: 0 keeps
/// the new shadow.
pub type ShadowCtor = Option<
    unsafe extern "C" fn(
        *mut core::ffi::c_void,
        *mut core::ffi::c_void,
        *mut core::ffi::c_void,
    ) -> core::ffi::c_int,
>;
/// `void dtor(void *obj, void *shadow_data)` of a shadow variable.
pub type ShadowDtor = Option<unsafe extern "C" fn(*mut core::ffi::c_void, *mut core::ffi::c_void)>;

/// The agent's runtime table (`struct kgpatch_runtime` in `kgpatch.h`; keep the two in
/// step). The agent defines the one instance; members are only ever added at the end, and
/// `size` says which exist. See docs/authoring-shadow.md.
#[repr(C)]
pub struct Runtime {
    /// Layout version, 1.
    pub version: u32,
    /// `size_of::<Runtime>()` of the agent that made it.
    pub size: u32,
    /// The shadow of (obj, id), or NULL. Lock-free.
    pub shadow_get: extern "C" fn(*mut core::ffi::c_void, u64) -> *mut core::ffi::c_void,
    /// A new zeroed shadow of `size` bytes, run through ctor; NULL if it exists, the table
    /// is full, `size` > 1 MiB or ctor refused.
    pub shadow_alloc: extern "C" fn(
        *mut core::ffi::c_void,
        u64,
        usize,
        ShadowCtor,
        *mut core::ffi::c_void,
    ) -> *mut core::ffi::c_void,
    /// The shadow if there is one, else as `shadow_alloc`.
    pub shadow_get_or_alloc: extern "C" fn(
        *mut core::ffi::c_void,
        u64,
        usize,
        ShadowCtor,
        *mut core::ffi::c_void,
    ) -> *mut core::ffi::c_void,
    /// Frees the shadow of (obj, id), after dtor saw it.
    pub shadow_free: extern "C" fn(*mut core::ffi::c_void, u64, ShadowDtor),
    /// Frees every shadow of id, each after dtor saw it.
    pub shadow_free_all: extern "C" fn(u64, ShadowDtor),
    /// How many shadows exist.
    pub shadow_count: extern "C" fn() -> usize,
}

// `kgpatch.h` checks the same size.
const _: () = assert!(core::mem::size_of::<Runtime>() == 56);

/// The word a module exports as `kgpatch__runtime` (declare it with
/// [`shadow_runtime!`](crate::shadow_runtime)); the loader writes the agent's [`Runtime`]
/// address into it when it fills the slots. Empty (every call NULL / a no-op) before that.
#[repr(transparent)]
pub struct RuntimeWord(core::sync::atomic::AtomicPtr<Runtime>);

impl RuntimeWord {
    #[doc(hidden)]
    pub const fn new() -> Self {
        RuntimeWord(core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()))
    }

    /// The table, once the loader filled the word.
    pub fn runtime(&self) -> Option<&'static Runtime> {
        let p = self.0.load(core::sync::atomic::Ordering::Acquire);
        // SAFETY: the loader writes only the address of the agent's `static` table, which
        // lives as long as the process.
        unsafe { p.as_ref() }
    }

    /// Fills the word by hand (for tests of code that uses it; the loader does it in a
    /// patch module).
    pub fn set(&self, table: &'static Runtime) {
        self.0.store(
            table as *const Runtime as *mut Runtime,
            core::sync::atomic::Ordering::Release,
        );
    }

    /// `kgpatch_shadow_get`.
    pub fn shadow_get(&self, obj: *mut core::ffi::c_void, id: u64) -> *mut core::ffi::c_void {
        self.runtime()
            .map_or(core::ptr::null_mut(), |r| (r.shadow_get)(obj, id))
    }

    /// `kgpatch_shadow_alloc`.
    pub fn shadow_alloc(
        &self,
        obj: *mut core::ffi::c_void,
        id: u64,
        size: usize,
        ctor: ShadowCtor,
        ctor_data: *mut core::ffi::c_void,
    ) -> *mut core::ffi::c_void {
        self.runtime().map_or(core::ptr::null_mut(), |r| {
            (r.shadow_alloc)(obj, id, size, ctor, ctor_data)
        })
    }

    /// `kgpatch_shadow_get_or_alloc`.
    pub fn shadow_get_or_alloc(
        &self,
        obj: *mut core::ffi::c_void,
        id: u64,
        size: usize,
        ctor: ShadowCtor,
        ctor_data: *mut core::ffi::c_void,
    ) -> *mut core::ffi::c_void {
        self.runtime().map_or(core::ptr::null_mut(), |r| {
            (r.shadow_get_or_alloc)(obj, id, size, ctor, ctor_data)
        })
    }

    /// `kgpatch_shadow_free`.
    pub fn shadow_free(&self, obj: *mut core::ffi::c_void, id: u64, dtor: ShadowDtor) {
        if let Some(r) = self.runtime() {
            (r.shadow_free)(obj, id, dtor)
        }
    }

    /// `kgpatch_shadow_free_all`.
    pub fn shadow_free_all(&self, id: u64, dtor: ShadowDtor) {
        if let Some(r) = self.runtime() {
            (r.shadow_free_all)(id, dtor)
        }
    }

    /// `kgpatch_shadow_count`.
    pub fn shadow_count(&self) -> usize {
        self.runtime().map_or(0, |r| (r.shadow_count)())
    }
}

impl Default for RuntimeWord {
    fn default() -> Self {
        Self::new()
    }
}

/// Declares the module's `kgpatch__runtime` word (once per module) as
/// `static KGPATCH_RUNTIME: RuntimeWord`; use its `shadow_*` methods:
///
/// ```no_run
/// kgpatch_kmod::shadow_runtime!();
/// #[no_mangle]
/// pub extern "C" fn fixed(obj: *mut core::ffi::c_void) -> i32 {
///     let seen = KGPATCH_RUNTIME.shadow_get_or_alloc(obj, 1, 8, None, core::ptr::null_mut());
///     if seen.is_null() { -1 } else { 0 }
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! shadow_runtime {
    () => {
        /// Filled by the kgpatch loader with the agent's runtime table.
        #[export_name = "kgpatch__runtime"]
        pub static KGPATCH_RUNTIME: $crate::author::RuntimeWord =
            $crate::author::RuntimeWord::new();
    };
}

#[cfg(test)]
mod runtime_tests {
    use super::{Runtime, RuntimeWord, ShadowCtor, ShadowDtor};
    use core::ffi::c_void;
    use std::sync::atomic::{AtomicU64, Ordering};

    static CALLS: AtomicU64 = AtomicU64::new(0);
    const HIT: *mut c_void = 0x1000 as *mut c_void;

    extern "C" fn get(obj: *mut c_void, id: u64) -> *mut c_void {
        CALLS.fetch_add(1, Ordering::Relaxed);
        if obj as usize == 8 && id == 3 {
            HIT
        } else {
            core::ptr::null_mut()
        }
    }
    extern "C" fn alloc(
        o: *mut c_void,
        id: u64,
        n: usize,
        _: ShadowCtor,
        _: *mut c_void,
    ) -> *mut c_void {
        CALLS.fetch_add(1, Ordering::Relaxed);
        (o as usize + id as usize + n) as *mut c_void
    }
    extern "C" fn free(_: *mut c_void, _: u64, _: ShadowDtor) {
        CALLS.fetch_add(1, Ordering::Relaxed);
    }
    extern "C" fn free_all(_: u64, _: ShadowDtor) {
        CALLS.fetch_add(1, Ordering::Relaxed);
    }
    extern "C" fn count() -> usize {
        42
    }
    static TABLE: Runtime = Runtime {
        version: 1,
        size: core::mem::size_of::<Runtime>() as u32,
        shadow_get: get,
        shadow_alloc: alloc,
        shadow_get_or_alloc: alloc,
        shadow_free: free,
        shadow_free_all: free_all,
        shadow_count: count,
    };

    #[test]
    fn empty_word_answers_null_and_a_filled_one_delegates() {
        let word = RuntimeWord::new();
        assert_eq!(core::mem::size_of::<RuntimeWord>(), 8);
        assert!(word.shadow_get(8 as *mut c_void, 3).is_null());
        assert!(word
            .shadow_alloc(8 as *mut c_void, 3, 8, None, core::ptr::null_mut())
            .is_null());
        word.shadow_free_all(3, None);
        assert_eq!((word.shadow_count(), CALLS.load(Ordering::Relaxed)), (0, 0));
        word.set(&TABLE);
        assert_eq!(word.shadow_get(8 as *mut c_void, 3), HIT);
        assert!(word.shadow_get(8 as *mut c_void, 4).is_null());
        assert_eq!(
            word.shadow_get_or_alloc(8 as *mut c_void, 3, 5, None, core::ptr::null_mut()) as usize,
            16
        );
        word.shadow_free(8 as *mut c_void, 3, None);
        word.shadow_free_all(3, None);
        assert_eq!(
            (word.shadow_count(), CALLS.load(Ordering::Relaxed)),
            (42, 5)
        );
    }
}
