//! A C patch module against the fixture library loaded in this process: inspect, open,
//! resolve, call the new function through filled slots, callbacks, close.

use std::process::Command;

use kgpatch_kmod::{inspect, Loaded, RefKind, ResolveOptions, SymbolTable, TargetKind};

use crate::common::{c_module, fixture_fn, load_fixture_lib};

/// `(file, name, value, size)` of every symbol, from `readelf -sW` (an independent reading
/// of the symbol table to check ours against).
pub fn readelf_symbols(path: &std::path::Path) -> Vec<(Option<String>, String, u64, u64)> {
    let out = Command::new("readelf")
        .args(["-sW", "--dyn-syms"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut file = None;
    let mut syms = Vec::new();
    let mut in_symtab = false;
    for line in text.lines() {
        if line.starts_with("Symbol table") {
            in_symtab = line.contains(".symtab");
            file = None;
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 || !cols[0].ends_with(':') || cols[0] == "Num:" {
            continue;
        }
        let name = cols[7].split('@').next().unwrap().to_owned();
        if cols[3] == "FILE" {
            file = Some(name);
            continue;
        }
        let value = u64::from_str_radix(cols[1], 16).unwrap();
        let size = cols[2].parse().unwrap_or(0);
        let f = if in_symtab && cols[4] == "LOCAL" {
            file.clone()
        } else {
            None
        };
        syms.push((f, name, value, size));
    }
    syms
}

pub fn link_value(path: &std::path::Path, name: &str, file: Option<&str>) -> u64 {
    let all = readelf_symbols(path);
    let found: Vec<_> = all
        .iter()
        .filter(|(f, n, _, _)| n == name && (file.is_none() || f.as_deref() == file))
        .collect();
    assert!(!found.is_empty(), "{name} not in readelf output");
    found[0].2
}

/// Load bias of the fixture library, from dlsym and readelf (not from kmod).
pub fn fixture_bias() -> u64 {
    let f = load_fixture_lib();
    let addr = fixture_fn("kgfix_set_scale") as usize as u64;
    addr - link_value(&f.lib, "kgfix_set_scale", None)
}

#[test]
fn inspect_reads_the_c_manifest_without_loading_it() {
    let path = c_module("GOOD", &[]);
    let m = inspect(&path).unwrap();
    assert_eq!(m.name, "c-fix");
    assert_eq!(m.version, "1.0");
    assert_eq!(
        m.target.kind,
        TargetKind::Library {
            soname: "libkgfix.so.1".into()
        }
    );
    assert_eq!(m.functions.len(), 1);
    assert_eq!(m.functions[0].old.name, "compute");
    assert_eq!(m.functions[0].old.file.as_deref(), Some("target_a.c"));
    assert_eq!(m.functions[0].new_symbol, "kgfix_c_new_compute");
    let f = crate::common::fixtures();
    assert_eq!(m.functions[0].expected_size, Some(f.compute.size));
    assert_eq!(m.functions[0].checksum, f.compute.checksum);
    let mut refs: Vec<_> = m
        .references
        .iter()
        .map(|r| (r.symbol.name.as_str(), r.symbol.file.as_deref(), r.kind))
        .collect();
    refs.sort();
    assert_eq!(
        refs,
        [
            ("helper", Some("target_b.c"), RefKind::Function),
            ("kgfix_counter", None, RefKind::Variable),
            ("scale", Some("target_a.c"), RefKind::Any),
        ]
    );
    assert_eq!(m.callbacks.pre_apply.as_deref(), Some("kgfix_c_pre_apply"));
    assert_eq!(
        m.callbacks.post_apply.as_deref(),
        Some("kgfix_c_post_apply")
    );
    assert!(m
        .to_string()
        .contains("`compute` in target_a.c -> `kgfix_c_new_compute`"));
}

#[test]
fn resolves_fills_slots_and_the_new_function_works() {
    let f = load_fixture_lib();
    let path = c_module("GOOD", &[]);
    // SAFETY: our fixture module has no constructors.
    let mut loaded = unsafe { Loaded::open(&path) }.unwrap();
    assert_eq!(loaded.slot_values(), vec![0, 0, 0]);
    // The mapped object is the file: found at the module's bias with the file's build-id.
    let mapped = kgpatch_kmod::loaded_objects()
        .into_iter()
        .find(|o| o.bias == loaded.bias())
        .unwrap();
    assert!(
        mapped.name.ends_with("patch_c.c-GOOD.so"),
        "{}",
        mapped.name
    );
    assert!(mapped.build_id.is_some());
    assert_eq!(mapped.build_id, loaded.module().build_id);
    let resolved = loaded.resolve(ResolveOptions::default()).unwrap().clone();
    assert_eq!(resolved.table, SymbolTable::Symtab);
    assert_eq!(resolved.target_file, f.lib);

    let bias = fixture_bias();
    assert_eq!(resolved.target_bias, bias);
    let func = &resolved.functions[0];
    assert_eq!(
        func.old_address,
        bias + link_value(&f.lib, "compute", Some("target_a.c"))
    );
    assert_eq!(func.old_size, f.compute.size);
    assert_eq!(func.old_file.as_deref(), Some("target_a.c"));
    let new_syms = readelf_symbols(&path);
    let new_sym = new_syms
        .iter()
        .find(|s| s.1 == "kgfix_c_new_compute")
        .unwrap();
    assert_eq!(func.new_size, new_sym.3);
    assert!(func.new_size > 0);

    // Every slot holds the runtime address of its symbol.
    let values = loaded.slot_values();
    for (slot, value) in resolved.slots.iter().zip(&values) {
        assert_eq!(slot.value, *value);
        let want = bias + link_value(&f.lib, &slot.symbol.name, slot.symbol.file.as_deref());
        assert_eq!(*value, want, "{}", slot.symbol);
    }

    // A second open of the same module (even through another path) is refused.
    let link = path.with_extension("link.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&path, &link).unwrap();
    for p in [&path, &link] {
        // SAFETY: refused before dlopen maps anything new.
        let err = unsafe { Loaded::open(p) }.unwrap_err();
        assert!(
            matches!(err, kgpatch_kmod::KmodError::AlreadyLoaded { .. }),
            "{err}"
        );
    }
    assert_eq!(loaded.slot_values(), values);

    // new compute(x) = helper_b(x) * scale = (7x - 2) * 3; the original is 2x + 1 + 3.
    // SAFETY: kgfix_c_new_compute is `int f(int)` and its slots are filled.
    let new: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(func.new_address) };
    assert_eq!(new(5), 99);
    assert_eq!(new(1), 15);
    // the target itself is untouched
    assert_eq!(fixture_fn("kgfix_api_b")(5), 33);
    // SAFETY: nothing of the module is patched in or running.
    unsafe { loaded.close() }.unwrap();
}

#[test]
fn callbacks_run_after_resolve_and_pre_apply_can_veto() {
    let _guard = crate::COUNTER_LOCK.lock().unwrap();
    load_fixture_lib();
    let path = crate::common::c_module_from("patch_c.c", "GOOD_CALLBACKS", &[], &[]);
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&path) }.unwrap();
    // Callbacks may read slots, so they refuse to run before resolve.
    assert!(matches!(
        loaded.pre_apply(),
        Err(kgpatch_kmod::KmodError::NotResolved { .. })
    ));
    loaded.resolve(ResolveOptions::default()).unwrap();
    loaded.pre_apply().unwrap();

    let counter = loaded.slot_values()[loaded
        .manifest()
        .references
        .iter()
        .position(|r| r.symbol.name == "kgfix_counter")
        .unwrap()] as *mut i32;
    // SAFETY: the slot points at the fixture's `int kgfix_counter`; COUNTER_LOCK serializes
    // the tests that touch it.
    let saved = unsafe { counter.read_volatile() };
    // SAFETY: as above.
    unsafe { counter.write_volatile(-4) };
    let err = loaded.pre_apply().unwrap_err();
    // SAFETY: as above.
    unsafe { counter.write_volatile(saved) };
    let msg = err.to_string();
    assert!(
        matches!(err, kgpatch_kmod::KmodError::Vetoed { code: 7, .. }),
        "{msg}"
    );
    assert!(msg.contains("counter is negative (-4)"), "{msg}");

    let applied = loaded.function_address("kgfix_c_applied").unwrap();
    // SAFETY: `int kgfix_c_applied(void)` of the open module.
    let applied: extern "C" fn() -> i32 = unsafe { std::mem::transmute(applied) };
    assert_eq!(applied(), 0);
    loaded.post_apply().unwrap();
    assert_eq!(applied(), 1);
    loaded.pre_revert().unwrap(); // none declared: a no-op
                                  // SAFETY: module not patched in.
    unsafe { loaded.close() }.unwrap();
}

#[test]
fn manifest_survives_gc_sections() {
    let flags = [
        "-ffunction-sections",
        "-fdata-sections",
        "-Wl,--gc-sections",
    ]
    .map(String::from);
    let gc = crate::common::c_module_from("patch_c.c", "GOOD_GC", &flags, &[]);
    assert_eq!(
        inspect(gc).unwrap(),
        inspect(c_module("GOOD", &[])).unwrap()
    );
}

#[test]
fn header_works_from_cplusplus() {
    let f = crate::common::fixtures();
    let out = f.dir.join("patch_cpp.so");
    crate::common::run(
        Command::new("g++")
            .args([
                "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I",
            ])
            .arg(crate::common::include_dir())
            .arg(crate::common::fixture_src("patch_cpp.cc"))
            .arg("-o")
            .arg(&out),
    );
    let m = inspect(&out).unwrap();
    assert_eq!(m.name, "cpp-fix");
    assert_eq!(m.functions[0].new_symbol, "cpp_new");
    assert_eq!(m.references[0].symbol.file.as_deref(), Some("target_a.c"));
}

#[test]
fn index_picks_one_of_the_same_named_statics() {
    let f = load_fixture_lib();
    let d = kgpatch_kmod::describe_symbol(&f.lib, "helper", None).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[1].file.as_deref(), Some("target_b.c"));
    assert_eq!(d[1].index, 1);
    let p = crate::common::c_module_from(
        "patch_c.c",
        "NTH",
        &[],
        &[(d[1].size, d[1].checksum.unwrap())],
    );
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&p) }.unwrap();
    let r = loaded.resolve(ResolveOptions::default()).unwrap();
    assert_eq!(r.functions[0].old_file.as_deref(), Some("target_b.c"));
    assert_eq!(
        r.functions[0].old_address,
        fixture_bias() + link_value(&f.lib, "helper", Some("target_b.c"))
    );
}

#[test]
fn checksum_is_of_the_file_so_a_rewritten_entry_still_matches() {
    use std::os::unix::fs::FileExt;
    let f = load_fixture_lib();
    let addr = fixture_bias() + link_value(&f.lib, "compute", Some("target_a.c"));
    // Rewrite compute's first 5 bytes in memory, as an earlier patch would (a jmp to itself;
    // nothing calls compute in these tests), through /proc/self/mem.
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    let mut saved = [0u8; 5];
    mem.read_exact_at(&mut saved, addr).unwrap();
    mem.write_all_at(&[0xe9, 0xfb, 0xff, 0xff, 0xff], addr)
        .unwrap();
    let p = crate::common::c_module_from("patch_c.c", "GOOD_REWRITTEN", &[], &[]);
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&p) }.unwrap();
    let r = loaded
        .resolve(ResolveOptions::default())
        .map(|r| r.functions[0].old_address);
    mem.write_all_at(&saved, addr).unwrap();
    assert_eq!(r.unwrap(), addr);
}

#[test]
fn header_constants_match_raw() {
    use kgpatch_kmod::raw;
    let f = crate::common::fixtures();
    let src = f.dir.join("consts.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include \"kgpatch.h\"\nint main(void) {\n\
         printf(\"%u %d %d %d %d %d %d %d %d %u %d %d %d %d %d %d %d %zu\\n\",\n\
         KGPATCH_MAGIC, KGPATCH_FORMAT_VERSION, KGPATCH_KIND_MODULE, KGPATCH_KIND_TARGET,\n\
         KGPATCH_KIND_REPLACE, KGPATCH_KIND_REF, KGPATCH_KIND_CALLBACK,\n\
         KGPATCH_TARGET_KIND_EXE, KGPATCH_TARGET_KIND_LIB, KGPATCH_ANY,\n\
         KGPATCH_REF_KIND_ANY, KGPATCH_REF_KIND_FUNC, KGPATCH_REF_KIND_OBJECT,\n\
         KGPATCH_CB_PRE_APPLY, KGPATCH_CB_POST_APPLY, KGPATCH_CB_PRE_REVERT,\n\
         KGPATCH_CB_POST_REVERT, sizeof(struct kgpatch_record_header));\n\
         return 0; }\n",
    )
    .unwrap();
    let exe = f.dir.join("consts");
    crate::common::run(
        Command::new("gcc")
            .arg("-I")
            .arg(crate::common::include_dir())
            .arg(&src)
            .arg("-o")
            .arg(&exe),
    );
    let out = Command::new(&exe).output().unwrap();
    let c: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let rust: Vec<u64> = vec![
        raw::MAGIC.into(),
        raw::FORMAT_VERSION.into(),
        raw::KIND_MODULE.into(),
        raw::KIND_TARGET.into(),
        raw::KIND_REPLACE.into(),
        raw::KIND_REF.into(),
        raw::KIND_CALLBACK.into(),
        raw::TARGET_EXE.into(),
        raw::TARGET_LIB.into(),
        raw::INDEX_NONE.into(),
        raw::REF_ANY.into(),
        raw::REF_FUNC.into(),
        raw::REF_OBJECT.into(),
        raw::CALLBACK_PRE_APPLY.into(),
        raw::CALLBACK_POST_APPLY.into(),
        raw::CALLBACK_PRE_REVERT.into(),
        raw::CALLBACK_POST_REVERT.into(),
        std::mem::size_of::<raw::RecordHeader>() as u64,
    ];
    assert_eq!(c, rust);
}

#[test]
fn library_found_by_soname_when_its_file_name_differs() {
    let f = crate::common::fixtures();
    let lib = f.dir.join("renamed-lib.so");
    crate::common::run(
        Command::new("gcc")
            .args([
                "-O1",
                "-g",
                "-shared",
                "-fPIC",
                "-Wl,-soname,libkgsoname.so.3",
            ])
            .arg(crate::common::fixture_src("target_a.c"))
            .arg(crate::common::fixture_src("target_b.c"))
            .arg("-o")
            .arg(&lib),
    );
    let path = std::ffi::CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: our fixture library, no constructors; kept loaded for the test's lifetime.
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null());
    let d = kgpatch_kmod::describe_symbol(&lib, "compute", Some("target_a.c")).unwrap();
    let p = crate::common::c_module_from(
        "patch_c.c",
        "SONAME",
        &["-DTARGET_SONAME=\"libkgsoname.so.3\"".to_owned()],
        &[(d[0].size, d[0].checksum.unwrap())],
    );
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&p) }.unwrap();
    let r = loaded.resolve(ResolveOptions::default()).unwrap().clone();
    assert_eq!(r.target_file, lib);
    // SAFETY: `int f(int)`, slots filled; the renamed library has scale = 3 like the other.
    let new: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(r.functions[0].new_address) };
    assert_eq!(new(5), 99);
    // Resolving again changes nothing.
    let before = loaded.slot_values();
    assert_eq!(loaded.resolve(ResolveOptions::default()).unwrap(), &r);
    assert_eq!(loaded.slot_values(), before);
}
