//! Reliable, async-signal-safe stack walks of an interrupted thread.
//!
//! **Owns:** the unwind index (built from `.eh_frame`/`.eh_frame_hdr` of every loaded object
//! before a transition, read-only during it) and the walk itself: from an interrupted register
//! context and the thread's stack bounds to `Clean`, `Busy { depth, pc, range }` or
//! `Unreliable { why }`.
//!
//! **Must not touch:** machine code, universe words, signals. A walk allocates nothing, takes
//! no lock, and reads memory only inside the stack bounds and known code.
//!
//! Status: planned (see the stackcheck issue).
