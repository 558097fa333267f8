//! Builds the demo server `server/*.c` twice, as executables in OUT_DIR:
//! `kvserver-fp` (`-O2 -g -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer`) and
//! `kvserver-nofp` (`-O2 -g -fomit-frame-pointer`, what Debian packages use). Both are PIE
//! and keep `.symtab`. The paths reach the crate as `KGPATCH_DEMO_SERVER` and
//! `KGPATCH_DEMO_SERVER_NOFP`.
//!
//! It also writes `kvserver_syms.h` (path in `KGPATCH_DEMO_SYMS_H`): for each patch target
//! of each variant, the size and FNV-1a-64 checksum of its bytes in the file (what a patch
//! entry must carry) and each binary's GNU build-id, so patch modules build against exactly
//! these binaries.
//!
//! Then it compiles the sample patch modules `patches/*.c` against that header, once per
//! variant, into `OUT_DIR/patches/<name>-<fp|nofp>.so` (folder in `KGPATCH_DEMO_PATCH_DIR`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

const SOURCES: [&str; 5] = ["main.c", "proto.c", "store.c", "compact.c", "churn.c"];

fn build(compiler: &Path, src_dir: &Path, out: &Path, variant_flags: &[&str]) {
    let mut cmd = Command::new(compiler);
    // compile from the source folder with bare file names, so each STT_FILE symbol is
    // "proto.c" (not a build-machine path): patches name static functions by that file
    cmd.current_dir(src_dir)
        .args(["-std=gnu11", "-O2", "-g"])
        .args(variant_flags)
        .args(["-fPIE", "-pie", "-pthread", "-Wall", "-Wextra", "-o"])
        .arg(out);
    cmd.args(SOURCES).arg("-ldl");
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

/// Patch targets: (symbol, file for a local symbol or "" for a global one).
const TARGETS: [(&str, &str); 9] = [
    ("kv_parse_amount", "proto.c"),
    ("kv_encode", ""),
    ("kv_decode", ""),
    ("kv_transcode", ""),
    ("kv_slow_path", ""),
    ("kv_checksum", ""),
    ("kv_compact_step", ""),
    ("kv_local_mix", "store.c"),
    ("kv_local_mix", "compact.c"),
];

/// FNV-1a-64, the checksum kgpatch_kmod::describe_symbol reports.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `#define`s for one binary: `KVSYM_<name>[__<file>]_SIZE`, `..._FNV`, `KVSYM_BUILD_ID`.
fn describe(path: &Path) -> String {
    let data = std::fs::read(path).expect("reading the server we just built");
    let file = object::File::parse(&*data).expect("the server is an ELF file");
    let mut out = String::new();
    let id = file
        .build_id()
        .ok()
        .flatten()
        .expect("gcc links with --build-id (add -Wl,--build-id if your toolchain does not)");
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(out, "#define KVSYM_BUILD_ID \"{hex}\"").unwrap();
    for (name, want_file) in TARGETS {
        let mut current_file = String::new();
        let mut found = Vec::new();
        for sym in file.symbols() {
            if sym.kind() == SymbolKind::File {
                current_file = sym.name().unwrap_or_default().to_string();
                continue;
            }
            let local_match = !want_file.is_empty() && sym.is_local() && current_file == want_file;
            let global_match = want_file.is_empty() && sym.is_global();
            if sym.kind() != SymbolKind::Text
                || sym.name() != Ok(name)
                || !(local_match || global_match)
            {
                continue;
            }
            let section = file
                .section_by_index(sym.section_index().expect("a defined function"))
                .unwrap();
            let bytes = section
                .data_range(sym.address(), sym.size())
                .unwrap()
                .expect("the function's bytes are in its section");
            found.push((sym.size(), fnv1a64(bytes)));
        }
        assert_eq!(found.len(), 1, "{name} ({want_file}) in {}", path.display());
        let macro_name = if want_file.is_empty() {
            name.to_string()
        } else {
            format!("{name}__{}", want_file.replace('.', "_"))
        };
        let (size, sum) = found[0];
        assert!(size >= 16, "{name} is only {size} bytes");
        writeln!(out, "#define KVSYM_{macro_name}_SIZE {size}").unwrap();
        writeln!(out, "#define KVSYM_{macro_name}_FNV 0x{sum:016x}ull").unwrap();
    }
    out
}

/// The sample patch modules: (source in `patches/`, output name).
const PATCHES: [(&str, &str); 6] = [
    ("fix-incr.c", "fix-incr"),
    ("codec-v2.c", "codec-v2"),
    ("codec-pair-only.c", "codec-pair-only"),
    ("slow-path.c", "slow-path"),
    ("wrong-target.c", "wrong-target"),
    ("missing-library.c", "missing-library"),
];

/// Compiles `patches/<source>` into `out` with the symbol values of the nofp build when
/// `nofp_symbols`.
fn build_patch(
    compiler: &Path,
    manifest: &Path,
    out_dir: &Path,
    source: &str,
    out: &Path,
    nofp_symbols: bool,
) {
    let mut cmd = Command::new(compiler);
    cmd.current_dir(manifest.join("patches"))
        .args(["-std=gnu11", "-O2", "-g", "-shared", "-fPIC"])
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(manifest.join("../kmod/include"))
        .arg("-I")
        .arg(manifest.join("server"))
        .arg("-I")
        .arg(out_dir);
    if nofp_symbols {
        cmd.arg("-DKV_TARGET_NOFP");
    }
    cmd.arg(source).arg("-o").arg(out);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {}: {e}", compiler.display()));
    if !output.status.success() {
        panic!(
            "building the patch module {} failed ({}):\n{}",
            out.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
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
    let header = [
        "/* Generated by examples/build.rs: the demo server's patch targets, for patch modules.",
        " * Define KV_TARGET_NOFP to get the values of kvserver-nofp instead of kvserver-fp.",
        " * A static function's macro carries its file: KVSYM_SIZE(kv_local_mix__store_c). */",
        "#ifndef KVSERVER_SYMS_H",
        "#define KVSERVER_SYMS_H",
        "#ifdef KV_TARGET_NOFP",
        describe(&nofp).trim_end(),
        "#else",
        describe(&fp).trim_end(),
        "#endif",
        "#define KVSYM_SIZE(name) KVSYM_##name##_SIZE",
        "#define KVSYM_FNV(name) KVSYM_##name##_FNV",
        "#endif",
        "",
    ]
    .join("\n");
    let syms = out_dir.join("kvserver_syms.h");
    std::fs::write(&syms, header).expect("writing kvserver_syms.h");
    println!("cargo:rustc-env=KGPATCH_DEMO_SYMS_H={}", syms.display());
    println!("cargo:rerun-if-changed=patches");
    println!("cargo:rerun-if-changed=../kmod/include/kgpatch.h");
    let patch_dir = out_dir.join("patches");
    std::fs::create_dir_all(&patch_dir).expect("creating OUT_DIR/patches");
    for (source, name) in PATCHES {
        for (variant, nofp) in [("fp", false), ("nofp", true)] {
            // wrong-target-<V>.so carries the OTHER build's build-id and checksums
            let nofp_symbols = if name == "wrong-target" { !nofp } else { nofp };
            let out = patch_dir.join(format!("{name}-{variant}.so"));
            build_patch(&compiler, &manifest, &out_dir, source, &out, nofp_symbols);
        }
    }
    println!(
        "cargo:rustc-env=KGPATCH_DEMO_PATCH_DIR={}",
        patch_dir.display()
    );
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
