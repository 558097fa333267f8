//! Patch modules: the manifest format, authoring macros, reading and validating a module,
//! and resolving its symbols in a live process.
//!
//! **Owns:** the versioned `#[repr(C)]` manifest layout, its checked parser, symbol lookup in
//! the target (`.symtab`, else `.dynsym`), and filling the module's reference slots.
//!
//! **Must not touch:** machine code of the target, universe words, threads. Resolution is
//! all-or-nothing and changes nothing in the process but the module's own reference slots.
//!
//! Status: planned (see the kmod issue).
