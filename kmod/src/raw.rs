//! The on-disk manifest layout, format version 1: plain `#[repr(C)]` structs and constants,
//! no logic. The C header `include/kgpatch.h` and the Rust macros in [`crate::author`] emit
//! exactly these bytes; `parse_manifest` reads them through the private `cast` module.
//!
//! # Layout
//! The manifest is the content of the module's `.kgpatch` section: a sequence of records,
//! each starting on an 8-byte boundary with a [`RecordHeader`]. A record is its header, a
//! fixed part whose layout depends on the kind, then a string blob: a fixed number of
//! NUL-terminated UTF-8 strings, then zero bytes up to `size`. Records are self-describing
//! (`size` is the whole record), so their order does not matter; the linker may leave zero
//! padding between records (8-byte words of zero), which the reader skips.
//!
//! Nothing in the manifest is a pointer: strings are inline, new functions and callbacks are
//! named by their symbol in the module's `.dynsym`, and a reference slot is the `slot` word
//! of its own [`RawRef`] record, located by its offset in the section. So the manifest reads
//! the same from the file as from memory and needs no relocation.
//!
//! All integers are little-endian (x86-64 native).

/// Name of the ELF section holding the manifest.
pub const SECTION_NAME: &str = ".kgpatch";

/// `magic` of every record: the bytes `KGPR` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KGPR");

/// The only format version this crate reads and writes.
pub const FORMAT_VERSION: u16 = 1;

/// Record kind: the patch itself (strings: name, version, description). Exactly one.
pub const KIND_MODULE: u16 = 1;
/// Record kind: the target object ([`RawTarget`]; strings: soname, build-id hex). Exactly one.
pub const KIND_TARGET: u16 = 2;
/// Record kind: one replaced function ([`RawReplace`]; strings: old symbol, file, new symbol).
pub const KIND_REPLACE: u16 = 3;
/// Record kind: one reference slot ([`RawRef`]; strings: symbol, file).
pub const KIND_REF: u16 = 4;
/// Record kind: one callback ([`RawCallback`]; strings: function symbol).
pub const KIND_CALLBACK: u16 = 5;

/// Number of strings in each kind's blob, indexed by kind (0 unused).
pub const STRING_COUNT: [usize; 6] = [0, 3, 2, 3, 2, 1];

/// `target_kind`: the main executable of the process.
pub const TARGET_EXE: u32 = 1;
/// `target_kind`: a shared library named by soname (or file name).
pub const TARGET_LIB: u32 = 2;

/// `index` value meaning "no position given".
pub const INDEX_NONE: u32 = u32::MAX;

/// `ref_kind`: a function or a variable.
pub const REF_ANY: u32 = 0;
/// `ref_kind`: must be a function (`STT_FUNC`).
pub const REF_FUNC: u32 = 1;
/// `ref_kind`: must be a variable (`STT_OBJECT`).
pub const REF_OBJECT: u32 = 2;

/// `which` of a callback: before applying; may veto.
pub const CALLBACK_PRE_APPLY: u32 = 1;
/// `which` of a callback: after applying.
pub const CALLBACK_POST_APPLY: u32 = 2;
/// `which` of a callback: before reverting.
pub const CALLBACK_PRE_REVERT: u32 = 3;
/// `which` of a callback: after reverting.
pub const CALLBACK_POST_REVERT: u32 = 4;

/// Largest record accepted (64 KiB): strings are names, not payloads.
pub const MAX_RECORD_SIZE: u32 = 64 * 1024;
/// Largest manifest section accepted (16 MiB).
pub const MAX_SECTION_SIZE: u64 = 16 * 1024 * 1024;

/// Start of every record (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`FORMAT_VERSION`].
    pub version: u16,
    /// One of the `KIND_*` constants.
    pub kind: u16,
    /// Size of the whole record in bytes, header included; a multiple of 8.
    pub size: u32,
    /// Zero.
    pub reserved: u32,
}

/// Fixed part of a [`KIND_TARGET`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawTarget {
    /// [`TARGET_EXE`] or [`TARGET_LIB`].
    pub target_kind: u32,
    /// Zero.
    pub reserved: u32,
}

/// Fixed part of a [`KIND_REPLACE`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawReplace {
    /// `st_size` the old function must have; 0 = not checked.
    pub expected_size: u64,
    /// FNV-1a-64 of the old function's bytes in the target's file; 0 = not checked.
    pub checksum: u64,
    /// Position among the candidates of the same name (and file), or [`INDEX_NONE`].
    pub index: u32,
    /// Zero.
    pub flags: u32,
}

/// Fixed part of a [`KIND_REF`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRef {
    /// The slot: zero in the file; the loader writes the symbol's runtime address here.
    pub slot: u64,
    /// Position among the candidates of the same name (and file), or [`INDEX_NONE`].
    pub index: u32,
    /// One of the `REF_*` constants.
    pub ref_kind: u32,
}

/// Fixed part of a [`KIND_CALLBACK`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCallback {
    /// One of the `CALLBACK_*` constants.
    pub which: u32,
    /// Zero.
    pub reserved: u32,
}

/// Size of the fixed part (after the header) of each kind, indexed by kind (0 unused).
pub const FIXED_SIZE: [usize; 6] = [
    0,
    0,
    core::mem::size_of::<RawTarget>(),
    core::mem::size_of::<RawReplace>(),
    core::mem::size_of::<RawRef>(),
    core::mem::size_of::<RawCallback>(),
];

/// Offset of the slot word inside a [`KIND_REF`] record.
pub const REF_SLOT_OFFSET: usize =
    core::mem::size_of::<RecordHeader>() + core::mem::offset_of!(RawRef, slot);

const _: () = {
    assert!(core::mem::size_of::<RecordHeader>() == 16);
    assert!(core::mem::size_of::<RawTarget>() == 8);
    assert!(core::mem::size_of::<RawReplace>() == 24);
    assert!(core::mem::size_of::<RawRef>() == 16);
    assert!(core::mem::size_of::<RawCallback>() == 8);
    assert!(REF_SLOT_OFFSET == 16);
};
