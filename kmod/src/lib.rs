//! Patch modules: the manifest format, authoring macros (C header and Rust), reading and
//! validating a module from its file, resolving its symbols in a live process, and opening
//! and closing it there.
//!
//! **Owns:** the versioned `#[repr(C)]` manifest layout ([`raw`]), its checked parser
//! ([`parse_manifest`], all byte casts in one private `cast` module), `include/kgpatch.h`
//! and the Rust macros ([`patch_module!`], [`replace!`], [`reference!`], [`callback!`]),
//! symbol lookup in the target (`.symtab`, else `.dynsym`), the old-body checksum
//! ([`checksum`]), filling the module's reference slots, and `dlopen`/`dlclose` of modules
//! ([`Loaded`]).
//!
//! **Must not touch:** machine code of the target, universe words, threads. Resolution is
//! all-or-nothing and changes nothing in the process but the module's own reference slots.
//!
//! # Design: a manifest with no pointers
//! A patch module is a PIC shared object. Any pointer stored in its data would be a
//! relocation (`R_X86_64_RELATIVE`, or `R_X86_64_64` against a symbol for a global
//! function), so reading pointers from the file would mean applying the module's relocations
//! ourselves. The manifest avoids them instead:
//! - **strings are inline**: each record ([`raw::RecordHeader`] + a fixed part + a blob of
//!   NUL-terminated strings) carries its own names, so C string-literal concatenation and
//!   Rust `const fn`s build it at compile time;
//! - **new functions and callbacks are named by symbol**, looked up in the module's
//!   `.dynsym` (from the file, plus the module's load bias once it is `dlopen`ed);
//! - **a reference slot is a word inside its own record**, located by its offset in the
//!   section: no symbol for it, no interposition, and the module's code reads it
//!   PC-relative. The section is therefore writable (`.kgpatch`, `"aw"`), and every slot
//!   is zero in the file.
//!
//! So the manifest reads the same from the file as from memory, needs no code of the module
//! to run, and every offset and length in it is checked against the section's bounds by
//! [`parse_manifest`]. Records are self-sized and unordered; zero padding between them is
//! skipped, because linkers may align input sections.
//!
//! # Checksum
//! [`checksum::fnv1a64`] over the old function's `st_size` bytes **in the target's file**:
//! an earlier patch may already have rewritten the function's entry in memory. The loader
//! checks that the loaded image is that file (same build-id in memory and on disk).
//!
//! # Lifecycle
//! 1. [`inspect`] / [`ModuleFile::read`]: read and validate the file, run nothing.
//! 2. [`Loaded::open`]: `dlopen(RTLD_NOW | RTLD_LOCAL)`; the mapped manifest must equal the
//!    file's. Module constructors run here and must not use reference slots.
//! 3. [`Loaded::resolve`]: find the target among loaded objects ([`loaded_objects`]), check
//!    build-id, symbols, sizes and checksums, compute every address ([`resolve_against`]),
//!    then fill every slot. On any error, no slot was written.
//! 4. The redirect machinery patches the old functions to the new addresses in
//!    [`Resolved`]; callbacks run through [`Loaded::pre_apply`] and friends.
//! 5. After revert the agent keeps the module mapped (the program may still point into it);
//!    [`Loaded::close`] (`dlclose`) is for a refused apply or an explicit unload.
//!
//! [`Pin`] keeps a library that holds patch sites loaded (`dlopen(RTLD_NOLOAD)`), whatever
//! the program `dlclose`s.
//!
//! # Features
//! `loader` (default): everything above. Without it (`default-features = false`) the crate is
//! only [`raw`], [`author`] and [`checksum`], with no dependencies: what a Rust patch crate
//! needs to emit its manifest.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod author;
#[cfg(feature = "loader")]
mod cast;
pub mod checksum;
#[cfg(feature = "loader")]
pub mod debugfile;
#[cfg(feature = "loader")]
mod elf;
#[cfg(feature = "loader")]
mod encode;
#[cfg(feature = "loader")]
mod error;
#[cfg(feature = "loader")]
mod live;
#[cfg(feature = "loader")]
mod manifest;
#[cfg(feature = "loader")]
mod names;
#[cfg(feature = "loader")]
mod parse;
pub mod raw;
#[cfg(feature = "loader")]
mod resolve;

#[cfg(feature = "loader")]
pub use elf::{inspect, ModuleFile, SymKind, SymbolTable, TargetSymbol};
#[cfg(feature = "loader")]
pub use encode::encode_manifest;
#[cfg(feature = "loader")]
pub use error::{Candidate, KmodError};
#[cfg(feature = "loader")]
pub use live::{loaded_objects, set_runtime, Loaded, Pin, RUNTIME_SYMBOL};
#[cfg(feature = "loader")]
pub use manifest::{
    BuildId, Callbacks, FunctionEntry, Manifest, RefKind, Reference, SymbolSpec, Target, TargetKind,
};
#[cfg(feature = "loader")]
pub use parse::{parse_manifest, ManifestError};
#[cfg(feature = "loader")]
pub use resolve::{
    describe_symbol, file_build_id, find_target, resolve_against, LoadedObject, ResolveOptions,
    Resolved, ResolvedFunction, ResolvedSlot, SplitPart, SymbolDescription,
};
