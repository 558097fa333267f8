//! The in-process runtime: control socket, transition driver, migration signal handling.
//!
//! **Owns:** the agent thread, the control protocol, the thread registry, the migration
//! signal and its handler, and the thread-start hook. It joins `kgpatch-universe` (what may
//! happen), `kgpatch-stackcheck` (is this thread clean), `kgpatch-redirect` (machine code)
//! and `kgpatch-kmod` (what the patch is).
//!
//! **Must not touch:** machine code directly (through `kgpatch-redirect` only); it decides
//! nothing about consistency that `kgpatch-universe` does not decide.
//!
//! Status: planned (see the end-to-end issue).
