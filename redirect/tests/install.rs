//! Install, run old and new side by side, fast path, remove: on every C variant, the
//! assembly fixtures and a Rust function. Refusals with their reasons.

use iced_x86::{Decoder, DecoderOptions};
use kgpatch_redirect::{Error, PadHint, Refusal};
use kgpatch_universe::{word::migrated_value, Version};

use crate::common::{
    asm_lib, asm_lib_copy, bytes, c_lib, c_lib_copy, in_universe, patcher, Lib, C_VARIANTS,
};

/// Installs a site on `name`, checks that two threads with different universe words get
/// the old and the new result, that the fast path works, and that removing the site
/// restores every byte (the pad included).
fn round_trip(lib: &Lib, name: &str, v2: &str, arg: i64) -> kgpatch_redirect::SiteAnalysis {
    let p = patcher();
    let (entry, size) = lib.func(name);
    let (new_entry, _) = lib.func(v2);
    let f = lib.f1(name);
    let old = f(arg);
    let new = lib.f1(v2)(arg);
    assert_ne!(old, new);
    let before = bytes(entry - 16, size + 16);

    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    let site = p.install(&a).unwrap();
    assert_ne!(
        bytes(entry - 16, size + 16),
        before,
        "{name}: nothing was written"
    );
    assert_eq!(f(arg), old, "{name}: steady at the original");
    assert_eq!(site.site().steady_version(), Some(site.original()));

    let s = site.site();
    s.begin(3, Version(new_entry));
    assert_eq!(
        in_universe(migrated_value(3), move || f(arg)),
        new,
        "{name}: migrated"
    );
    assert_eq!(in_universe(0, move || f(arg)), old, "{name}: not migrated");
    assert_eq!(
        in_universe(migrated_value(2), move || f(arg)),
        old,
        "{name}: older word"
    );
    s.settle();
    assert_eq!(in_universe(0, move || f(arg)), new, "{name}: settled");

    p.set_fast_path(entry, Some(Version(new_entry))).unwrap();
    assert_eq!(f(arg), new, "{name}: fast path");
    assert!(p.set_fast_path(entry, Some(site.original())).is_err());
    p.set_fast_path(entry, None).unwrap();
    assert_eq!(f(arg), new, "{name}: back through the stub");

    s.begin(4, site.original());
    assert!(matches!(p.remove(entry), Err(Error::WrongState { .. })));
    assert_eq!(in_universe(migrated_value(4), move || f(arg)), old);
    assert_eq!(in_universe(0, move || f(arg)), new);
    s.settle();
    assert_eq!(f(arg), old);

    p.remove(entry).unwrap();
    assert_eq!(
        bytes(entry - 16, size + 16),
        before,
        "{name}: bytes not restored"
    );
    assert_eq!(f(arg), old);
    a
}

#[test]
fn every_c_variant_round_trips() {
    for (variant, _) in C_VARIANTS {
        let lib = c_lib(variant);
        let a = round_trip(lib, "fx_work", "fx_work_v2", 5);
        assert_eq!(a.has_endbr(), variant.contains("cet"), "{variant}");
        assert_eq!(a.pad_jump().is_some(), variant.contains("pad"), "{variant}");
        if variant.contains("pad") {
            assert_eq!(a.jump_len(), 2);
            // The entry's two single-byte NOPs.
            assert_eq!(a.original_bytes(), &[0x90, 0x90]);
        }
        round_trip(lib, "fx_rip", "fx_rip_v2", 9);
    }
}

#[test]
fn rip_relative_first_instruction_is_relocated() {
    // Its own copy: `every_c_variant_round_trips` patches the same function of "o2".
    let lib = c_lib_copy("o2", "_rip");
    let (entry, size) = lib.func("fx_rip");
    let code = bytes(entry, size);
    let first = Decoder::with_ip(64, &code, entry, DecoderOptions::NONE).decode();
    assert!(
        first.is_ip_rel_memory_operand(),
        "fixture changed: fx_rip at -O2 no longer starts with a RIP-relative load"
    );
    round_trip(lib, "fx_rip", "fx_rip_v2", 11);
}

#[test]
fn several_instructions_and_pads_round_trip() {
    let lib = asm_lib();
    let a = round_trip(lib, "asm_multi", "asm_multi_v2", 41);
    assert_eq!(a.instruction_offsets(), vec![0, 1, 2, 4]);
    let a = round_trip(lib, "asm_padded", "asm_multi_v2", 41);
    assert!(a.pad_jump().is_some());
    assert_eq!(a.instruction_offsets(), vec![0, 1]);
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn kgpatch_test_rust_old(x: i64) -> i64 {
    let v = std::hint::black_box(x);
    v.wrapping_mul(7).wrapping_add(v >> 3) + 3
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn kgpatch_test_rust_new(x: i64) -> i64 {
    let v = std::hint::black_box(x);
    v.wrapping_mul(7).wrapping_add(v >> 3) + 4
}

#[test]
fn a_rust_function_round_trips() {
    use object::{Object, ObjectSymbol};
    let exe = std::fs::read("/proc/self/exe").unwrap();
    let file = object::File::parse(&*exe).unwrap();
    let size = file
        .symbols()
        .find(|s| s.name() == Ok("kgpatch_test_rust_old"))
        .expect("test binary has a symbol table")
        .size();
    let p = patcher();
    let old: extern "C" fn(i64) -> i64 = std::hint::black_box(kgpatch_test_rust_old);
    let entry = old as *const () as u64;
    let new = kgpatch_test_rust_new as *const () as u64;
    let before = bytes(entry, size);
    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    let site = p.install(&a).unwrap();
    assert_eq!(old(10), 74);
    site.site().begin(1, Version(new));
    assert_eq!(in_universe(migrated_value(1), move || old(10)), 75);
    assert_eq!(in_universe(0, move || old(10)), 74);
    site.site().settle_back();
    p.remove(entry).unwrap();
    assert_eq!(bytes(entry, size), before);
}

#[test]
fn refusals_say_why() {
    let p = patcher();
    let (entry, size) = c_lib("o2").func("fx_tiny");
    let err = p.analyze(entry, size, PadHint::Auto).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::TooShort { needed: 5, .. })),
        "{err}"
    );
    assert!(err.to_string().contains("patch its caller instead"));

    let (entry, size) = asm_lib().func("asm_loop");
    let err = p.analyze(entry, size, PadHint::Auto).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused(Refusal::BranchIntoSite { target, .. }) if target == entry + 2
        ),
        "{err}"
    );

    // Its own copy: `several_instructions_and_pads_round_trip` installs on asm_multi.
    let (entry, size) = asm_lib_copy("_refusals").func("asm_multi");
    let err = p.analyze(entry, size, PadHint::Required).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::NoPad { .. })),
        "{err}"
    );
}

#[test]
fn a_second_install_and_foreign_jumps_are_refused() {
    let p = patcher();
    let lib = c_lib("o0_nofp");
    let (entry, size) = lib.func("fx_tiny");
    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    let site = p.install(&a).unwrap();
    assert!(matches!(p.install(&a), Err(Error::AlreadyInstalled { .. })));
    assert!(matches!(
        p.analyze(entry, size, PadHint::Auto),
        Err(Error::AlreadyInstalled { .. })
    ));
    // Our live stub is in the code ranges the agent treats as busy.
    assert!(p
        .code_ranges()
        .iter()
        .any(|r| r.live && r.entry == entry && (r.start..r.end).contains(&site.stub())));
    p.remove(entry).unwrap();
    // Stale analysis after the bytes change, and a foreign jump at the entry.
    let (v2, _) = lib.func("fx_rip_v2");
    let jump = kgpatch_redirect::x86_64::encode::jmp32(entry, v2).unwrap();
    let saved = bytes(entry, 5);
    write_code(entry, &jump);
    assert!(matches!(p.install(&a), Err(Error::Stale { .. })));
    let err = p.analyze(entry, size, PadHint::Auto).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::ForeignPatch { .. })),
        "{err}"
    );
    write_code(entry, &saved);
    p.analyze(entry, size, PadHint::Auto).unwrap();
}

fn write_code(addr: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    mem.write_all_at(bytes, addr).unwrap();
}
