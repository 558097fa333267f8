//! The atomics every shared word of this crate is made of: std's in normal builds, loom's
//! when built with `RUSTFLAGS="--cfg kgpatch_loom"` so the loom models in
//! `kgpatch-loom-tests` explore every interleaving of the real code (crossbeam's pattern; a
//! project-specific cfg so dependencies that check `cfg(loom)` are left alone).

#[cfg(kgpatch_loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(kgpatch_loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
