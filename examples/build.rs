//! Builds the demo server `server/*.c` twice, as executables in OUT_DIR:
//! `kvserver-fp` (`-O2 -g -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer`) and
//! `kvserver-nofp` (`-O2 -g -fomit-frame-pointer`, what Debian packages use). Both are PIE
//! and keep `.symtab`. The paths reach the crate as `KGPATCH_DEMO_SERVER` and
//! `KGPATCH_DEMO_SERVER_NOFP`.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 4] = ["main.c", "proto.c", "store.c", "compact.c"];

fn build(compiler: &Path, src_dir: &Path, out: &Path, variant_flags: &[&str]) {
    let mut cmd = Command::new(compiler);
    // compile from the source folder with bare file names, so each STT_FILE symbol is
    // "proto.c" (not a build-machine path): patches name static functions by that file
    cmd.current_dir(src_dir)
        .args(["-std=gnu11", "-O2", "-g"])
        .args(variant_flags)
        .args(["-fPIE", "-pie", "-pthread", "-Wall", "-Wextra", "-o"])
        .arg(out);
    cmd.args(SOURCES);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {}: {e}", compiler.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines() {
        println!("cargo:warning=kvserver: {line}");
    }
    if !output.status.success() {
        panic!(
            "building {} failed ({}):\n{stderr}",
            out.display(),
            output.status
        );
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let src_dir = manifest.join("server");
    println!("cargo:rerun-if-changed=server");
    println!("cargo:rerun-if-env-changed=CC");

    let compiler = cc::Build::new().get_compiler().path().to_path_buf();
    let fp = out_dir.join("kvserver-fp");
    let nofp = out_dir.join("kvserver-nofp");
    build(
        &compiler,
        &src_dir,
        &fp,
        &["-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer"],
    );
    build(&compiler, &src_dir, &nofp, &["-fomit-frame-pointer"]);
    println!("cargo:rustc-env=KGPATCH_DEMO_SERVER={}", fp.display());
    println!(
        "cargo:rustc-env=KGPATCH_DEMO_SERVER_NOFP={}",
        nofp.display()
    );
    println!(
        "cargo:rustc-env=KGPATCH_DEMO_SERVER_SRC={}",
        src_dir.display()
    );
}
