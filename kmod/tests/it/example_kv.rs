//! The worked example of docs/PATCH-AUTHORING.md (kmod/examples/kv), built and checked.

use std::path::Path;
use std::process::Command;

use kgpatch_kmod::{
    describe_symbol, file_build_id, resolve_against, LoadedObject, ModuleFile, ResolveOptions,
};

use crate::c_module::link_value;
use crate::common::{fixtures, include_dir, run, MANIFEST_DIR};

#[test]
fn worked_example_builds_inspects_and_resolves() {
    let src = Path::new(MANIFEST_DIR).join("examples/kv");
    let dir = fixtures().dir.join("kv");
    std::fs::create_dir_all(&dir).unwrap();
    let kvd = dir.join("kvd");
    run(Command::new("gcc")
        .args(["-O2", "-g"])
        .arg(src.join("store.c"))
        .arg(src.join("main.c"))
        .arg("-o")
        .arg(&kvd));
    // As the doc says: hash() was inlined everywhere and has no symbol; kv_get has one.
    assert!(describe_symbol(&kvd, "hash", None).unwrap().is_empty());
    let d = describe_symbol(&kvd, "kv_get", None).unwrap();
    assert_eq!(d.len(), 1);
    let id = file_build_id(&kvd).unwrap().unwrap().to_string();

    let fix = dir.join("kv-miss-fix.so");
    run(Command::new("gcc")
        .args([
            "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I",
        ])
        .arg(include_dir())
        .arg(format!("-DKV_GET_SIZE={}", d[0].size))
        .arg(format!("-DKV_GET_SUM={:#x}ULL", d[0].checksum.unwrap()))
        .arg(format!("-DKVD_BUILD_ID=\"{id}\""))
        .arg(src.join("fix.c"))
        .arg("-o")
        .arg(&fix));
    let module = ModuleFile::read(&fix).unwrap();
    assert_eq!(module.manifest.name, "kv-miss-fix");
    let text = module.manifest.to_string();
    assert!(text.contains("`kv_get` -> `kv_get_fixed`"), "{text}");

    let bias = 0x5555_5555_0000;
    let object = LoadedObject {
        name: String::new(),
        file: kvd.clone(),
        bias,
        is_main: true,
        build_id: Some(file_build_id(&kvd).unwrap().unwrap().0),
    };
    let r = resolve_against(
        &module,
        0x7f00_0000_0000,
        &[object],
        ResolveOptions::default(),
    )
    .unwrap();
    assert_eq!(
        r.functions[0].old_address,
        bias + link_value(&kvd, "kv_get", None)
    );
    for slot in &r.slots {
        assert_eq!(
            slot.value,
            bias + link_value(&kvd, &slot.symbol.name, Some("store.c"))
        );
    }
}
