//! kgpatch-kmod integration tests: real ELF fixtures built with gcc (and a Rust cdylib built
//! with cargo), loaded into this test process.

#[path = "it/c_module.rs"]
mod c_module;
#[path = "it/common.rs"]
mod common;
#[path = "it/errors.rs"]
mod errors;
#[path = "it/example_kv.rs"]
mod example_kv;
#[path = "it/exe.rs"]
mod exe;
#[path = "it/format.rs"]
mod format;
#[path = "it/rust_module.rs"]
mod rust_module;

/// Serializes the tests that read or write the fixture's `kgfix_counter`.
pub static COUNTER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
