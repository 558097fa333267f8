//! A function shorter than the site jump is patched through the alignment padding after it
//! (issue 10, item 7): `tp_tiny` (3 bytes, NOP fill to the next symbol) is applied and
//! reverted with `kgpatch` 10 times while two threads call it, with every answer the old or
//! the new version's and every byte (the padding too) restored after each revert. The
//! refusal of a 3-byte function with no padding is in `bad_input.rs`.

use std::time::Duration;

use crate::harness::*;

#[test]
fn a_three_byte_function_with_padding_is_patched_live() {
    let dir = TempDir::new("tinypad");
    let exe = build_fixture(&dir, "gcc", "tinypad.c", "tinypad");
    let tiny = describe(&exe, "tp_tiny");
    assert_eq!(tiny.size, 3);
    let after = describe(&exe, "tp_after");
    let room = Sym {
        size: after.address - tiny.address,
        ..tiny
    };
    assert_eq!(room.size, 16, "the fixture aligns tp_after to 16 bytes");
    let fix = dir.join("fix-tinypad.so");
    build_patch("tinypad_fix.c", &fix, &sym_defines(&exe, &["tp_tiny"]));

    let mut t = Spawn::new(&exe, &dir.runtime_dir()).arg("2").start();
    let before = t.code_bytes(&room);
    for cycle in 0..10 {
        expect_completed(&t.apply(&fix, "20s"));
        let s = t.status();
        assert_eq!(s.patches.len(), 1, "cycle {cycle}: {s:#?}");
        // A 5-byte jump at the entry: its last two bytes are in the padding.
        assert_eq!(t.code_bytes(&room)[0], 0xe9, "cycle {cycle}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let new0 = t.stats()["new"];
        while t.stats()["new"] == new0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            t.stats()["new"] > new0,
            "cycle {cycle}: no call ran the patch"
        );
        expect_completed(&t.revert("fix-tinypad", "20s"));
        assert_eq!(
            t.code_bytes(&room),
            before,
            "cycle {cycle}: bytes not restored"
        );
    }
    let st = t.stats();
    assert_eq!(st["bad"], 0, "{st:?}");
    assert!(st["old"] > 0 && st["new"] > 0, "{st:?}");
    assert!(t.alive());
    eprintln!(
        "tinypad: 10 apply/revert cycles, {} calls ({} old, {} new), 0 bad",
        st["calls"], st["old"], st["new"]
    );
}
