//! Executables as targets: the PIE, non-PIE and stripped fixture programs through
//! `resolve_against` (the program is described as the main object at a chosen bias), and the
//! integration-test binary itself as a live target.

use std::path::Path;
use std::process::Command;

use kgpatch_kmod::{
    describe_symbol, file_build_id, resolve_against, KmodError, Loaded, LoadedObject, ModuleFile,
    ResolveOptions, SymbolTable,
};

use crate::c_module::link_value;
use crate::common::{c_module_from, fixtures, run};

const MODULE_BIAS: u64 = 0x7f12_3400_0000;

fn main_object(exe: &Path, bias: u64) -> LoadedObject {
    LoadedObject {
        name: String::new(),
        file: exe.to_owned(),
        bias,
        is_main: true,
        build_id: file_build_id(exe).unwrap().map(|b| b.0),
    }
}

fn module_for(exe: &Path, tag: &str) -> ModuleFile {
    let d = describe_symbol(exe, "compute", Some("target_a.c")).unwrap();
    assert_eq!(d.len(), 1);
    let p = c_module_from(
        "patch_c.c",
        &format!("EXE_{tag}"),
        &["-DVARIANT_EXE".to_owned()],
        &[(d[0].size, d[0].checksum.unwrap())],
    );
    ModuleFile::read(p).unwrap()
}

fn check_exe(exe: &Path, tag: &str, bias: u64) {
    // The fixture program runs: api_a(5) = compute(5) + 100 = 14 + 100, api_b(5) = 33.
    let out = Command::new(exe).arg("5").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "114 33\n");

    let module = module_for(exe, tag);
    let objects = [main_object(exe, bias)];
    let r = resolve_against(&module, MODULE_BIAS, &objects, ResolveOptions::default()).unwrap();
    assert_eq!(r.table, SymbolTable::Symtab);
    assert_eq!(r.target_bias, bias);
    let f = &r.functions[0];
    assert_eq!(
        f.old_address,
        bias + link_value(exe, "compute", Some("target_a.c"))
    );
    assert_eq!(
        f.new_address,
        MODULE_BIAS + link_value(&module.path, "kgfix_c_new_compute", None)
    );
    for slot in &r.slots {
        assert_eq!(
            slot.value,
            bias + link_value(exe, &slot.symbol.name, slot.symbol.file.as_deref()),
            "{}",
            slot.symbol
        );
        let off = slot.slot_address - MODULE_BIAS - module.section_vaddr;
        assert!(off + 8 <= module.section_bytes.len() as u64);
    }
}

#[test]
fn pie_executable() {
    let f = fixtures();
    check_exe(&f.exe_pie, "PIE", 0x5555_5555_4000);
}

#[test]
fn non_pie_executable() {
    let f = fixtures();
    // A non-PIE program is linked at its run address (bias 0): addresses are st_value.
    let value = link_value(&f.exe_nopie, "compute", Some("target_a.c"));
    assert!(value >= 0x40_0000, "not a non-PIE link address: {value:#x}");
    check_exe(&f.exe_nopie, "NOPIE", 0);
}

#[test]
fn stripped_executable_has_only_exported_symbols() {
    let f = fixtures();
    let exe = &f.exe_stripped;
    let out = Command::new(exe).arg("5").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "114 33\n");
    // A static function cannot be found by name in a stripped file.
    assert!(describe_symbol(exe, "compute", None).unwrap().is_empty());
    let module = module_for(&f.exe_pie, "STRIPPED_LOCAL");
    let objects = [main_object(exe, 0x5555_0000_0000)];
    let err =
        resolve_against(&module, MODULE_BIAS, &objects, ResolveOptions::default()).unwrap_err();
    assert!(matches!(err, KmodError::NeedsSymtab { .. }), "{err}");

    // Exported functions and variables resolve from .dynsym (-rdynamic).
    let d = describe_symbol(exe, "kgfix_api_a", None).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].table, SymbolTable::Dynsym);
    let p = c_module_from(
        "patch_global.c",
        "STRIPPED",
        &[],
        &[(d[0].size, d[0].checksum.unwrap())],
    );
    let module = ModuleFile::read(p).unwrap();
    let r = resolve_against(&module, MODULE_BIAS, &objects, ResolveOptions::default()).unwrap();
    assert_eq!(r.table, SymbolTable::Dynsym);
    assert_eq!(
        r.functions[0].old_address,
        0x5555_0000_0000 + link_value(exe, "kgfix_api_a", None)
    );
    assert_eq!(
        r.slots[0].value,
        0x5555_0000_0000 + link_value(exe, "kgfix_counter", None)
    );
}

#[test]
fn replaced_file_is_refused() {
    // The image in memory has another build-id than the file on disk: the binary was
    // replaced after the process started.
    let f = fixtures();
    let module = module_for(&f.exe_pie, "PIE");
    let mut obj = main_object(&f.exe_pie, 0x5555_5555_4000);
    obj.build_id = Some(vec![1, 2, 3, 4]);
    let err = resolve_against(&module, MODULE_BIAS, &[obj], ResolveOptions::default()).unwrap_err();
    assert!(matches!(err, KmodError::FileNotLoadedImage { .. }), "{err}");
    // and a library target is not the executable
    let lib_module = ModuleFile::read(crate::common::c_module("GOOD", &[])).unwrap();
    let err = resolve_against(
        &lib_module,
        MODULE_BIAS,
        &[main_object(&f.exe_pie, 0)],
        ResolveOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, KmodError::TargetNotLoaded { .. }), "{err}");
}

#[test]
fn rebuilt_target_is_detected() {
    // The same source built with other flags: compute's body changes.
    let f = fixtures();
    let rebuilt = f.dir.join("kgfix-pie-O0");
    run(Command::new("gcc")
        .args(["-O0", "-fPIE", "-pie"])
        .arg(crate::common::fixture_src("target_a.c"))
        .arg(crate::common::fixture_src("target_b.c"))
        .arg(crate::common::fixture_src("target_main.c"))
        .arg("-o")
        .arg(&rebuilt));
    let module = module_for(&f.exe_pie, "PIE");
    let err = resolve_against(
        &module,
        MODULE_BIAS,
        &[main_object(&rebuilt, 0x5555_5555_4000)],
        ResolveOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KmodError::SizeMismatch { .. } | KmodError::ChecksumMismatch { .. }
        ),
        "{err}"
    );
}

/// Replaced by the exe patch module; exported so it is in the test binary's symbol table.
#[no_mangle]
#[inline(never)]
pub extern "C" fn kgtest_exe_target(x: i32) -> i32 {
    std::hint::black_box(x) + 1
}

/// Read by the exe patch module through a reference slot.
#[no_mangle]
pub static KGTEST_EXE_VALUE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(7);

#[test]
fn live_executable_is_the_test_binary() {
    assert_eq!(std::hint::black_box(kgtest_exe_target)(1), 2);
    assert_eq!(
        KGTEST_EXE_VALUE.load(std::sync::atomic::Ordering::Relaxed),
        7
    );
    let d = describe_symbol("/proc/self/exe", "kgtest_exe_target", None).unwrap();
    assert_eq!(d.len(), 1, "{d:?}");
    let p = c_module_from(
        "patch_exe.c",
        "LIVE",
        &[],
        &[(d[0].size, d[0].checksum.unwrap())],
    );
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&p) }.unwrap();
    let r = loaded.resolve(ResolveOptions::default()).unwrap().clone();
    assert_eq!(
        r.functions[0].old_address,
        kgtest_exe_target as *const () as usize as u64
    );
    let value_slot = r
        .slots
        .iter()
        .find(|s| s.symbol.name == "KGTEST_EXE_VALUE")
        .unwrap();
    assert_eq!(value_slot.value, &KGTEST_EXE_VALUE as *const _ as u64);
    // SAFETY: `int kgtest_exe_new(int)`, slots filled.
    let new: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(r.functions[0].new_address) };
    assert_eq!(new(4), 57);
    // SAFETY: not patched in.
    unsafe { loaded.close() }.unwrap();
}
