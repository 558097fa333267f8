//! Loom models of the universe protocol (`kgpatch-universe`): every interleaving of the real
//! site, gate and control-plane code, with 2–3 worker threads and a driver.
//!
//! The models live in `tests/models.rs` and compile only with the project's loom cfg:
//!
//! ```text
//! RUSTFLAGS="--cfg kgpatch_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test -p kgpatch-loom-tests --release
//! ```
//!
//! **Owns:** nothing but the models. **Must not touch:** the code under test.

#![deny(unsafe_code)]
