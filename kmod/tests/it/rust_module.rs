//! The Rust patch module (a cdylib built with cargo from tests/fixtures/rust_patch.rs).

use std::ffi::c_void;

use kgpatch_kmod::author::{Runtime, ShadowCtor, ShadowDtor};
use kgpatch_kmod::{inspect, Loaded, RefKind, ResolveOptions, TargetKind};

use crate::c_module::{fixture_bias, link_value};
use crate::common::{fixtures, load_fixture_lib, rust_module};

#[test]
fn rust_module_inspects_resolves_and_runs() {
    let _guard = crate::COUNTER_LOCK.lock().unwrap();
    let f = load_fixture_lib();
    let path = rust_module();
    let m = inspect(path).unwrap();
    assert_eq!(m.name, "rust-fix");
    assert_eq!(m.description, "compute() rewritten in Rust");
    assert_eq!(
        m.target.kind,
        TargetKind::Library {
            soname: "libkgfix.so.1".into()
        }
    );
    assert_eq!(m.functions[0].new_symbol, "kgfix_rust_new_compute");
    assert_eq!(m.functions[0].expected_size, Some(f.compute.size));
    assert_eq!(m.functions[0].checksum, f.compute.checksum);
    let kinds: Vec<_> = m.references.iter().map(|r| r.kind).collect();
    assert_eq!(kinds.len(), 3);
    assert!(kinds.contains(&RefKind::Function) && kinds.contains(&RefKind::Variable));
    assert_eq!(
        m.callbacks.post_revert.as_deref(),
        Some("kgfix_rust_post_revert")
    );

    // The runtime table the loader writes into the module's `kgpatch__runtime` word.
    extern "C" fn count() -> usize {
        42
    }
    extern "C" fn get(_: *mut c_void, _: u64) -> *mut c_void {
        std::ptr::null_mut()
    }
    extern "C" fn alloc(
        _: *mut c_void,
        _: u64,
        _: usize,
        _: ShadowCtor,
        _: *mut c_void,
    ) -> *mut c_void {
        std::ptr::null_mut()
    }
    extern "C" fn free(_: *mut c_void, _: u64, _: ShadowDtor) {}
    extern "C" fn free_all(_: u64, _: ShadowDtor) {}
    static TABLE: Runtime = Runtime {
        version: 1,
        size: std::mem::size_of::<Runtime>() as u32,
        shadow_get: get,
        shadow_alloc: alloc,
        shadow_get_or_alloc: alloc,
        shadow_free: free,
        shadow_free_all: free_all,
        shadow_count: count,
    };
    kgpatch_kmod::set_runtime(&TABLE as *const Runtime as u64);

    // SAFETY: the Rust fixture has no initialisers that use slots.
    let mut loaded = unsafe { Loaded::open(path) }.unwrap();
    assert!(loaded.slot_values().iter().all(|&v| v == 0));
    let r = loaded.resolve(ResolveOptions::default()).unwrap().clone();
    let bias = fixture_bias();
    for slot in &r.slots {
        assert_eq!(
            slot.value,
            bias + link_value(&f.lib, &slot.symbol.name, slot.symbol.file.as_deref())
        );
    }
    assert_eq!(
        loaded.slot_values(),
        r.slots.iter().map(|s| s.value).collect::<Vec<_>>()
    );
    // new compute(x) = helper_b(x) * scale + 1000
    // SAFETY: `extern "C" fn(i32) -> i32`, slots filled.
    let new: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(r.functions[0].new_address) };
    assert_eq!(new(5), 1099);
    // The loader filled the runtime word along with the slots.
    let shadow_count = loaded.function_address("kgfix_rust_shadow_count").unwrap();
    // SAFETY: the fixture's `extern "C" fn() -> usize`.
    let shadow_count: extern "C" fn() -> usize = unsafe { std::mem::transmute(shadow_count) };
    assert_eq!(shadow_count(), 42);
    assert_eq!(new(1), 1015);
    assert_eq!(
        r.functions[0].old_address,
        bias + link_value(&f.lib, "compute", Some("target_a.c"))
    );

    // The post-revert callback bumps the target's counter through its slot.
    let counter = r
        .slots
        .iter()
        .find(|s| s.symbol.name == "kgfix_counter")
        .unwrap()
        .value as *const i32;
    // SAFETY: the fixture's `int kgfix_counter`; COUNTER_LOCK serializes its users.
    let before = unsafe { counter.read_volatile() };
    loaded.post_revert().unwrap();
    // SAFETY: as above.
    let after = unsafe { counter.read_volatile() };
    assert_eq!(after, before + 1);
    // SAFETY: the module is not patched in.
    unsafe { loaded.close() }.unwrap();
    let _ = fixtures();
}
