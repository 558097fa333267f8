//! Builds the fixtures with gcc (and cargo for the Rust patch module) once per test run, into
//! `CARGO_TARGET_TMPDIR`.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use kgpatch_kmod::{describe_symbol, file_build_id, SymbolDescription};

pub const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

pub fn fixture_src(name: &str) -> PathBuf {
    Path::new(MANIFEST_DIR).join("tests/fixtures").join(name)
}

pub fn include_dir() -> PathBuf {
    Path::new(MANIFEST_DIR).join("include")
}

pub struct Fixtures {
    pub dir: PathBuf,
    /// libkgfix.so.1: target_a.c + target_b.c as a shared library.
    pub lib: PathBuf,
    pub exe_pie: PathBuf,
    pub exe_nopie: PathBuf,
    /// PIE built with -rdynamic, then stripped: `.dynsym` only.
    pub exe_stripped: PathBuf,
    /// `compute` (static, target_a.c) in `lib`.
    pub compute: SymbolDescription,
    pub lib_build_id: String,
}

pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gcc(args: &[&str], out: &Path) {
    run(Command::new("gcc").args(args).arg("-o").arg(out));
}

pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        // Test runners like nextest run every test in its own process: build in a private
        // folder and publish it with an atomic rename, named by a hash of the sources, so
        // no process ever reads a fixture another is still writing.
        let sources: Vec<u8> = ["target_a.c", "target_b.c", "target_main.c"]
            .iter()
            .flat_map(|f| std::fs::read(fixture_src(f)).unwrap())
            .collect();
        let hash = kgpatch_kmod::checksum::fnv1a64(&sources);
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = root.join(format!("kmod-fixtures-{hash:016x}"));
        if dir.join("done").exists() {
            return fixtures_in(dir);
        }
        let tmp = root.join(format!(
            "kmod-fixtures-tmp-{}-{hash:016x}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        build_fixtures(&tmp);
        std::fs::write(tmp.join("done"), b"").unwrap();
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process published first: use theirs.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        fixtures_in(dir)
    })
}

fn build_fixtures(dir: &Path) {
    {
        let a = fixture_src("target_a.c");
        let b = fixture_src("target_b.c");
        let main = fixture_src("target_main.c");
        let (a, b, main) = (
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            main.to_str().unwrap(),
        );
        let common = ["-O1", "-g", "-Wall", "-Wl,--build-id"];
        let lib = dir.join("libkgfix.so.1");
        let mut args = common.to_vec();
        args.extend(["-shared", "-fPIC", "-Wl,-soname,libkgfix.so.1", a, b]);
        gcc(&args, &lib);
        let exe_pie = dir.join("kgfix-pie");
        let mut args = common.to_vec();
        args.extend(["-fPIE", "-pie", a, b, main]);
        gcc(&args, &exe_pie);
        let exe_nopie = dir.join("kgfix-nopie");
        let mut args = common.to_vec();
        args.extend(["-fno-pie", "-no-pie", a, b, main]);
        gcc(&args, &exe_nopie);
        let exe_stripped = dir.join("kgfix-stripped");
        let mut args = common.to_vec();
        args.extend(["-fPIE", "-pie", "-rdynamic", a, b, main]);
        gcc(&args, &exe_stripped);
        run(Command::new("strip").arg(&exe_stripped));
    }
}

fn fixtures_in(dir: std::path::PathBuf) -> Fixtures {
    {
        let lib = dir.join("libkgfix.so.1");
        let exe_pie = dir.join("kgfix-pie");
        let exe_nopie = dir.join("kgfix-nopie");
        let exe_stripped = dir.join("kgfix-stripped");
        let found = describe_symbol(&lib, "compute", Some("target_a.c")).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let compute = found[0].clone();
        let lib_build_id = file_build_id(&lib)
            .unwrap()
            .expect("gcc --build-id")
            .to_string();
        Fixtures {
            dir,
            lib,
            exe_pie,
            exe_nopie,
            exe_stripped,
            compute,
            lib_build_id,
        }
    }
}

/// dlopens the fixture library into this process (once; never closed).
pub fn load_fixture_lib() -> &'static Fixtures {
    static LOADED: OnceLock<usize> = OnceLock::new();
    let f = fixtures();
    LOADED.get_or_init(|| {
        let path = CString::new(f.lib.to_str().unwrap()).unwrap();
        // SAFETY: the fixture library is our own C code with no constructors.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen of the fixture library failed");
        h as usize
    });
    f
}

/// Looks up a symbol of the fixture library through the dynamic loader.
pub fn fixture_fn(name: &str) -> extern "C" fn(i32) -> i32 {
    let f = load_fixture_lib();
    let path = CString::new(f.lib.to_str().unwrap()).unwrap();
    let name = CString::new(name).unwrap();
    // SAFETY: RTLD_NOLOAD returns the already-open handle; dlsym reads the symbol table.
    let addr = unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!h.is_null());
        libc::dlsym(h, name.as_ptr())
    };
    assert!(!addr.is_null());
    // SAFETY: the fixture functions all have the signature int f(int).
    unsafe { std::mem::transmute::<*mut libc::c_void, extern "C" fn(i32) -> i32>(addr) }
}

/// Compiles `patch_c.c` with `-DVARIANT_<variant>` (or none for "GOOD") and extra flags,
/// with SIZE/SUM of `compute` from the fixture library. Cached by name.
pub fn c_module(variant: &str, extra: &[String]) -> PathBuf {
    c_module_from("patch_c.c", variant, extra, &[])
}

pub fn c_module_from(source: &str, name: &str, extra: &[String], sizes: &[(u64, u64)]) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let f = fixtures();
    let key = format!("{source}-{name}");
    let mut built = BUILT.lock().unwrap();
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let out = f.dir.join(format!("{key}.so"));
    let (size, sum) = sizes
        .first()
        .copied()
        .unwrap_or((f.compute.size, f.compute.checksum.unwrap()));
    let mut cmd = Command::new("gcc");
    cmd.args(["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"])
        .arg("-I")
        .arg(include_dir())
        .arg(format!("-DSIZE={size}"))
        .arg(format!("-DSUM={sum:#x}ULL"));
    if name != "GOOD" {
        cmd.arg(format!("-DVARIANT_{name}"));
    }
    // Built under a private name and renamed into place: other test processes may be
    // reading `out` (same bytes) at the same time.
    let tmp = f.dir.join(format!("{key}.so.tmp-{}", std::process::id()));
    cmd.args(extra).arg(fixture_src(source)).arg("-o").arg(&tmp);
    run(&mut cmd);
    std::fs::rename(&tmp, &out).unwrap();
    built.insert(key, out.clone());
    out
}

/// Builds the Rust patch module (tests/fixtures/rust_patch.rs) as a cdylib crate depending
/// on this kgpatch-kmod, with cargo, in its own workspace under CARGO_TARGET_TMPDIR.
pub fn rust_module() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let f = fixtures();
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kmod-rust-patch");
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let write_if_changed = |p: PathBuf, text: String| {
            if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&p, text).unwrap();
            }
        };
        write_if_changed(
            root.join("Cargo.toml"),
            format!(
                "[package]\nname = \"kgfix-rust-patch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
                 publish = false\n\n[lib]\npath = \"src/lib.rs\"\ncrate-type = [\"cdylib\"]\n\n\
                 [dependencies]\nkgpatch-kmod = {{ path = {:?}, default-features = false }}\n\n[workspace]\n",
                MANIFEST_DIR
            ),
        );
        write_if_changed(
            src.join("lib.rs"),
            std::fs::read_to_string(fixture_src("rust_patch.rs")).unwrap(),
        );
        write_if_changed(
            src.join("expected.rs"),
            format!(
                "const SIZE: u64 = {};\nconst SUM: u64 = {:#x};\n",
                f.compute.size,
                f.compute.checksum.unwrap()
            ),
        );
        let lock = root.join("Cargo.lock");
        if !lock.exists() {
            // Same versions as the workspace: they are already downloaded.
            std::fs::copy(Path::new(MANIFEST_DIR).join("../Cargo.lock"), &lock).unwrap();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = |offline: bool| {
            let mut cmd = Command::new(&cargo);
            cmd.arg("build")
                .arg("--quiet")
                .arg("--manifest-path")
                .arg(root.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(root.join("target"))
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS");
            if offline {
                cmd.arg("--offline");
            }
            cmd.output().unwrap()
        };
        let out = build(true);
        let out = if out.status.success() {
            out
        } else {
            build(false)
        };
        assert!(
            out.status.success(),
            "building the Rust patch module failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/debug/libkgfix_rust_patch.so")
    })
}
