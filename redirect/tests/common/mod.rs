//! Test (and bench) support: compiles the C, C++ and assembly fixtures with gcc/g++ into
//! shared objects under the target's temporary directory, loads them with dlopen, and finds
//! their symbols (address from dlsym, size from the symbol table).

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use kgpatch_redirect::{Patcher, PatcherConfig};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A loaded fixture library.
pub struct Lib {
    pub name: String,
    handle: usize,
    sizes: HashMap<String, u64>,
}

impl Lib {
    /// Address and size of a function.
    pub fn func(&self, name: &str) -> (u64, u64) {
        let c = CString::new(name).unwrap();
        // SAFETY: `handle` is a live dlopen handle (never closed); dlsym only reads.
        let addr = unsafe { libc::dlsym(self.handle as *mut libc::c_void, c.as_ptr()) } as u64;
        assert_ne!(addr, 0, "{name} not found in {}", self.name);
        let size = *self
            .sizes
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no symbol size in {}", self.name));
        (addr, size)
    }

    /// The function as `extern "C" fn(i64) -> i64`.
    pub fn f1(&self, name: &str) -> extern "C" fn(i64) -> i64 {
        let (addr, _) = self.func(name);
        // SAFETY: every fixture called through this takes and returns one integer.
        unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(addr as usize) }
    }

    /// Any symbol's address.
    pub fn addr(&self, name: &str) -> u64 {
        self.func_addr(name)
    }

    fn func_addr(&self, name: &str) -> u64 {
        let c = CString::new(name).unwrap();
        // SAFETY: as in `func`.
        unsafe { libc::dlsym(self.handle as *mut libc::c_void, c.as_ptr()) as u64 }
    }
}

fn out_dir() -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // Fixtures of earlier runs whose process is gone.
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("kgpatch-redirect-fixtures-"));
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = base.join(format!("kgpatch-redirect-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn compile(name: &str, compiler: &str, sources: &[&str], flags: &[&str]) -> PathBuf {
    let out = out_dir().join(format!("lib{name}.so"));
    let mut cmd = Command::new(compiler);
    cmd.args(["-shared", "-fPIC", "-o"]).arg(&out).args(flags);
    for s in sources {
        cmd.arg(Path::new(FIXTURES).join(s));
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        status.success(),
        "{compiler} failed to build fixture {name}"
    );
    out
}

fn symbol_sizes(path: &Path) -> HashMap<String, u64> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.size())))
        .collect()
}

fn load(name: &str, compiler: &str, sources: &[&str], flags: &[&str]) -> &'static Lib {
    static LIBS: Mutex<Vec<&'static Lib>> = Mutex::new(Vec::new());
    let mut libs = LIBS.lock().unwrap();
    if let Some(l) = libs.iter().find(|l| l.name == name) {
        return l;
    }
    let path = compile(name, compiler, sources, flags);
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: loading a fixture we just built; its constructors are the C runtime's.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {name} failed");
    let lib: &'static Lib = Box::leak(Box::new(Lib {
        name: name.to_string(),
        handle: handle as usize,
        sizes: symbol_sizes(&path),
    }));
    libs.push(lib);
    lib
}

/// The C variants the issue lists: (name, flags).
pub const C_VARIANTS: &[(&str, &[&str])] = &[
    ("o0", &["-O0"]),
    ("o0_nofp", &["-O0", "-fomit-frame-pointer"]),
    ("o2", &["-O2", "-fcf-protection=none"]),
    (
        "o2_fp",
        &["-O2", "-fno-omit-frame-pointer", "-fcf-protection=none"],
    ),
    ("o2_cet", &["-O2", "-fcf-protection=full"]),
    (
        "o2_pad",
        &[
            "-O2",
            "-fpatchable-function-entry=16,14",
            "-fcf-protection=none",
        ],
    ),
    (
        "o0_pad_cet",
        &[
            "-O0",
            "-fpatchable-function-entry=16,14",
            "-fcf-protection=full",
        ],
    ),
];

/// One C variant.
pub fn c_lib(variant: &str) -> &'static Lib {
    c_lib_copy(variant, "")
}

/// A separate copy of a C variant, for a test that patches a function another test also
/// patches (tests run in parallel).
pub fn c_lib_copy(variant: &str, tag: &str) -> &'static Lib {
    let flags = C_VARIANTS
        .iter()
        .find(|(n, _)| *n == variant)
        .map(|(_, f)| *f)
        .unwrap();
    load(
        &format!("fix_{variant}{tag}"),
        "gcc",
        &["fixtures.c"],
        flags,
    )
}

/// The hand-written assembly fixtures.
pub fn asm_lib() -> &'static Lib {
    asm_lib_copy("")
}

/// A separate copy of the assembly fixtures, for a test that must have them alone.
pub fn asm_lib_copy(tag: &str) -> &'static Lib {
    load(&format!("fix_asm{tag}"), "gcc", &["fixtures_asm.S"], &[])
}

/// The assembly fixture whose second instruction faults (issue 10's nested-handler case).
pub fn nested_lib() -> &'static Lib {
    load("fix_nested", "gcc", &["nested_asm.S"], &[])
}

/// The C++ fixture.
pub fn cxx_lib() -> &'static Lib {
    load(
        "fix_cxx",
        "g++",
        &["fixture.cpp"],
        &["-O2", "-fcf-protection=none"],
    )
}

/// The process's patcher.
pub fn patcher() -> &'static Patcher {
    static P: OnceLock<Patcher> = OnceLock::new();
    P.get_or_init(|| {
        // A long deadline: the test machine is small and shared, and the hammer keeps four
        // threads spinning on two cores.
        let config = PatcherConfig {
            sweep_timeout: std::time::Duration::from_secs(20),
            ..PatcherConfig::default()
        };
        Patcher::new(config).expect("patcher")
    })
}

/// Reads `len` bytes of code at `addr`.
pub fn bytes(addr: u64, len: u64) -> Vec<u8> {
    // SAFETY: tests only read code of loaded fixtures, which stays mapped.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) }.to_vec()
}

/// Runs `f` on a fresh thread whose universe word is `word`.
pub fn in_universe<T: Send + 'static>(word: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        kgpatch_redirect::tls::set_current_word_for_testing(word);
        f()
    })
    .join()
    .unwrap()
}

/// Runs test `name` alone in a child process of this test binary with `var=value` set, and
/// fails unless it passed. For tests that must own every thread of their process (a sweep
/// signals all of them; other tests' threads, or their traps, would change the answer).
pub fn in_child(name: &str, var: &str, value: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(var, value)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child ({var}={value}) failed with {:?}:\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
