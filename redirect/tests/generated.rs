//! The code kgpatch generates: its unwind information is registered (and deregistered on
//! reclaim), its memory is never writable and executable, and it works under
//! `PR_SET_MDWE` (memory-deny-write-execute).

use std::process::Command;

use kgpatch_redirect::{CodeKind, PadHint};

use crate::common::{asm_lib_copy, bytes, c_lib, patcher};

#[repr(C)]
struct DwarfEhBases {
    tbase: *const libc::c_void,
    dbase: *const libc::c_void,
    func: *const libc::c_void,
}

extern "C" {
    fn _Unwind_Find_FDE(pc: *const libc::c_void, bases: *mut DwarfEhBases) -> *const libc::c_void;
}

/// The start of the function libgcc's unwinder finds unwind information for at `pc`.
fn fde_function(pc: u64) -> Option<u64> {
    let mut bases = DwarfEhBases {
        tbase: std::ptr::null(),
        dbase: std::ptr::null(),
        func: std::ptr::null(),
    };
    // SAFETY: `_Unwind_Find_FDE` only reads the registered tables and fills `bases`.
    let fde = unsafe { _Unwind_Find_FDE(pc as *const libc::c_void, &mut bases) };
    (!fde.is_null()).then_some(bases.func as u64)
}

#[test]
fn stubs_and_trampolines_have_unwind_info_until_reclaimed() {
    let lib = c_lib("o2_fp");
    let p = patcher();
    let (entry, size) = lib.func("fx_diff");
    let site = p
        .install(&p.analyze(entry, size, PadHint::Auto).unwrap())
        .unwrap();
    let ranges: Vec<_> = p
        .code_ranges()
        .into_iter()
        .filter(|r| r.entry == entry && r.live)
        .collect();
    assert_eq!(ranges.len(), 2);
    for r in &ranges {
        assert_eq!(fde_function(r.start + 1), Some(r.start), "{r:?}");
        assert_eq!(fde_function(r.end - 1), Some(r.start), "{r:?}");
        if r.kind == CodeKind::Stub {
            assert_eq!(r.start, site.stub());
        } else {
            assert_eq!(r.start, site.original().0);
        }
    }
    p.remove(entry).unwrap();
    assert!(p.code_ranges().iter().any(|r| r.entry == entry && !r.live));
    // Other tests may have a thread inside their own removed stubs for a moment.
    let mut freed = false;
    for _ in 0..200 {
        if p.reclaim().unwrap() > 0 && !p.code_ranges().iter().any(|r| r.entry == entry) {
            freed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(freed, "the removed site's memory was never reclaimed");
    for r in &ranges {
        assert_ne!(
            fde_function(r.start + 1),
            Some(r.start),
            "still registered: {r:?}"
        );
    }
}

#[test]
fn generated_memory_is_never_writable_and_executable() {
    let lib = asm_lib_copy("_wx");
    let p = patcher();
    let (entry, size) = lib.func("asm_multi");
    p.install(&p.analyze(entry, size, PadHint::Auto).unwrap())
        .unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let wx: Vec<&str> = maps
        .lines()
        .filter(|l| {
            let perms = l.split_whitespace().nth(1).unwrap_or("");
            perms.contains('w') && perms.contains('x')
        })
        .collect();
    assert!(wx.is_empty(), "writable and executable mappings: {wx:?}");
    // The function's own page kept its protections (written through /proc/self/mem).
    let page = entry & !0xfff;
    let line = maps
        .lines()
        .find(|l| {
            let (a, b) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            (a..b).contains(&page)
        })
        .unwrap();
    assert!(
        line.split_whitespace().nth(1).unwrap().starts_with("r-x"),
        "{line}"
    );
    p.remove(entry).unwrap();
}

/// Runs in a child process (the test binary again) because PR_SET_MDWE cannot be undone.
#[test]
fn works_under_memory_deny_write_execute() {
    if std::env::var_os("KGPATCH_MDWE_CHILD").is_some() {
        const PR_SET_MDWE: libc::c_int = 65;
        const PR_MDWE_REFUSE_EXEC_GAIN: libc::c_ulong = 1;
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) };
        assert_eq!(
            r,
            0,
            "PR_SET_MDWE failed: {}",
            std::io::Error::last_os_error()
        );
        // Under MDWE an anonymous W+X mapping is refused...
        // SAFETY: asking for a fresh anonymous mapping.
        let wx = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_eq!(wx, libc::MAP_FAILED, "MDWE is not in force");
        // ...and patching still works.
        let lib = c_lib("o2");
        let p = patcher();
        let (entry, size) = lib.func("fx_work");
        let f = lib.f1("fx_work");
        let before = bytes(entry, size);
        let site = p
            .install(&p.analyze(entry, size, PadHint::Auto).unwrap())
            .unwrap();
        let (v2, _) = lib.func("fx_work_v2");
        site.site().begin(1, kgpatch_universe::Version(v2));
        site.site().settle();
        assert_eq!(f(5), lib.f1("fx_work_v2")(5));
        p.set_fast_path(entry, Some(kgpatch_universe::Version(v2)))
            .unwrap();
        assert_eq!(f(5), lib.f1("fx_work_v2")(5));
        p.set_fast_path(entry, None).unwrap();
        site.site().begin(2, site.original());
        site.site().settle();
        p.remove(entry).unwrap();
        assert_eq!(bytes(entry, size), before);
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "generated::works_under_memory_deny_write_execute",
            "--nocapture",
        ])
        .env("KGPATCH_MDWE_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
