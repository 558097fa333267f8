//! End-to-end tests of kgpatch: real target processes (C, C++ and Rust, built by the tests
//! into temporary directories) with `libkgpatch_agent.so` preloaded, driven by the `kgpatch`
//! binary. Each test has its own runtime directory, so they run in parallel; every target is
//! killed when its test ends, passed or not.
//!
//! Run: `CARGO_TARGET_DIR=target/e2e cargo test --release -p kgpatch-cli`.

mod harness;

mod attach;
mod bad_input;
mod cost;
mod cxx;
mod debugsyms;
mod failclosed;
mod force;
mod fork;
mod frames;
mod late_load;
mod lifetime;
mod load;
mod parked;
mod shadow;
mod short;
mod signals_nested;
mod sigwait;
mod sockets;
mod stress;
mod syscalls;
