//! Loom models of the universe protocol. The models live in `tests/`; run them with
//! `RUSTFLAGS="--cfg kgpatch_loom" CARGO_TARGET_DIR=target/loom cargo test -p kgpatch-loom-tests --release`.
