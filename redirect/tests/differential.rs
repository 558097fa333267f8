//! Differential: for every (universe word, site state) combination, the machine-code stub
//! jumps where `kgpatch_universe::select` says.

use kgpatch_redirect::{tls::set_current_word_for_testing, PadHint};
use kgpatch_universe::{select, word::migrated_value, Site, Version};

use crate::common::{c_lib, patcher};

#[test]
fn stub_agrees_with_select() {
    let lib = c_lib("o2_cet");
    let p = patcher();
    let (entry, size) = lib.func("fx_diff");
    let (v2, _) = lib.func("fx_diff_v2");
    let (v3, _) = lib.func("fx_diff_v3");
    let site = p
        .install(&p.analyze(entry, size, PadHint::Auto).unwrap())
        .unwrap();
    let original = site.original().0;
    let s: &Site = site.site();
    let f = lib.f1("fx_diff");
    // SAFETY: the stub behaves as the function it dispatches for (same signature).
    let stub: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(site.stub() as usize) };
    let expected = |v: Version, x: i64| -> i64 {
        match v.0 {
            a if a == original => x * 7 + 1,
            a if a == v2 => x * 7 + 2,
            a if a == v3 => x * 7 + 3,
            other => panic!("select chose {other:#x}, not a version"),
        }
    };
    let words = [
        0,
        1,
        2 * 5,
        migrated_value(5),
        2 * 6,
        migrated_value(6),
        migrated_value(7),
        u64::MAX - 1,
        u64::MAX,
    ];
    let mut checked = 0;
    let mut check = |state: &str| {
        for (i, &w) in words.iter().enumerate() {
            set_current_word_for_testing(w);
            let x = i as i64 + 3;
            let want = expected(select(w, s), x);
            assert_eq!(f(x), want, "entry, state {state}, word {w:#x}");
            assert_eq!(stub(x), want, "stub, state {state}, word {w:#x}");
            checked += 1;
        }
    };
    check("steady original");
    s.begin(5, Version(v2));
    check("original -> v2 (t=5)");
    s.settle();
    check("steady v2");
    s.begin(6, Version(v3));
    check("v2 -> v3 (t=6)");
    s.settle_back();
    check("steady v2 after reversal");
    s.begin(7, Version(v3));
    check("v2 -> v3 (t=7)");
    s.settle();
    check("steady v3");
    s.begin(8, Version(original));
    s.settle();
    check("steady original again");
    set_current_word_for_testing(0);
    assert_eq!(checked, 8 * words.len());
    p.remove(entry).unwrap();
}
