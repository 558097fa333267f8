//! Builds the benchmark's target (`csrc/bench_target.c`, Debian-style -O2) and its patch
//! module, whose size and checksum of `bench_leaf` come from the built target.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let cc = cc::Build::new().get_compiler().path().to_owned();
    let target = out.join("bench_target");
    run(Command::new(&cc)
        .args(["-std=gnu11", "-O2", "-g", "-pthread", "-o"])
        .arg(&target)
        .arg(here.join("csrc/bench_target.c")));
    let found = kgpatch_kmod::describe_symbol(&target, "bench_leaf", None)
        .expect("bench_leaf is in the target's symbol table");
    let leaf = found.first().expect("one bench_leaf");
    let patch = out.join("bench_patch.so");
    run(Command::new(&cc)
        .args(["-O2", "-shared", "-fPIC"])
        .arg(format!("-DBENCH_LEAF_SIZE={}", leaf.size))
        .arg(format!(
            "-DBENCH_LEAF_SUM={:#x}ULL",
            leaf.checksum.expect("bench_leaf has file bytes")
        ))
        .arg("-I")
        .arg(Path::new(&here).join("../kmod/include"))
        .arg("-o")
        .arg(&patch)
        .arg(here.join("csrc/bench_patch.c")));
    println!("cargo:rustc-env=KGPATCH_BENCH_TARGET={}", target.display());
    println!("cargo:rustc-env=KGPATCH_BENCH_PATCH={}", patch.display());
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=../kmod/include/kgpatch.h");
}
