//! x86-64 patch sites, trampolines and redirect stubs.
//!
//! **Owns:** every byte of machine code kgpatch reads or writes: analysis of a function's
//! entry, trampolines for original versions, per-site redirect stubs, the cross-modifying-code
//! protocol for live text writes, the SIGTRAP handler, the universe-word TLS slot, and the
//! thread sweep the agent reuses.
//!
//! **Must not touch:** the consistency model (which version a thread may run is decided by
//! `kgpatch-universe`; this crate only implements `select` in machine code).
//!
//! Status: planned (see the redirect issue).
