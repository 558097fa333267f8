//! Functions shorter than the site jump, and the alignment padding after them (issue 10,
//! item 7). Byte tables (the disassembly in comments, as iced-x86's block-encoder tests
//! have it): the bytes given run from the entry to the next symbol or the section's end. A
//! short function may hold the jump only when the bytes after its first exit (`ret`, `jmp`)
//! are NOP or int3 fill to the end, and nothing branches into them. Then a live install of
//! a 3-byte function with threads calling it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kgpatch_redirect::x86_64::analysis::analyze_bytes;
use kgpatch_redirect::{Error, PadHint, Refusal};
use kgpatch_universe::Version;

use crate::common::{asm_lib, bytes, patcher};

const AT: u64 = 0x40_1000;

/// (name, bytes from the entry to the next symbol, offsets of the overwritten instructions
/// from the patch point, padding bytes overwritten).
const ACCEPTED: &[(&str, &[u8], &[u64], u64)] = &[
    (
        "3 bytes, assembler NOP fill",
        &[
            0x89, 0xf8, // mov eax, edi
            0xc3, // ret
            0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00,
            0x00, // data16 cs nopw [rax+rax]
            0x66, 0x90, // xchg ax, ax (nop)
        ],
        &[0, 2, 3],
        11,
    ),
    (
        "3 bytes, int3 fill",
        &[
            0x31, 0xc0, // xor eax, eax
            0xc3, // ret
            0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
            0xcc, // int3 x13
        ],
        &[0, 2, 3, 4],
        2,
    ),
    (
        "1 byte, single-byte NOPs",
        &[
            0xc3, // ret
            0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, // nop x7
        ],
        &[0, 1, 2, 3, 4],
        4,
    ),
    (
        "endbr64 then 3 bytes, NOPs",
        &[
            0xf3, 0x0f, 0x1e, 0xfa, // endbr64 (stays)
            0x89, 0xf8, // mov eax, edi
            0xc3, // ret
            0x0f, 0x1f, 0x40, 0x00, // nop dword [rax]
            0x0f, 0x1f, 0x44, 0x00, 0x00, // nop dword [rax+rax]
        ],
        &[0, 2, 3],
        4,
    ),
    (
        "a tail-calling 4-byte function",
        &[
            0x31, 0xc0, // xor eax, eax
            0xeb, 0x20, // jmp short +0x20 (outside the bytes: a tail call)
            0x90, 0x90, 0x90, 0x90, // nop x4
        ],
        &[0, 2, 4],
        1,
    ),
];

/// (name, bytes from the entry to the next symbol, the refusal).
const REFUSED: &[(&str, &[u8], Refusal)] = &[
    (
        "3 bytes, no padding (the next symbol follows at once)",
        &[
            0x89, 0xf8, // mov eax, edi
            0xc3, // ret
        ],
        Refusal::TooShort {
            entry: AT,
            size: 3,
            needed: 5,
        },
    ),
    (
        "padding ends in something that is not fill",
        &[
            0x89, 0xf8, // mov eax, edi
            0xc3, // ret
            0x90, 0x90, 0x90, // nop x3
            0x55, // push rbp: code (reached by an indirect jump?), not padding
        ],
        Refusal::TooShort {
            entry: AT,
            size: 3,
            needed: 5,
        },
    ),
    (
        "fill that does not decode exactly to the next symbol",
        &[
            0x89, 0xf8, // mov eax, edi
            0xc3, // ret
            0x90, 0x90, // nop x2
            0x0f, 0x1f, // the first two bytes of a 3-byte nop: cut off by the symbol
        ],
        Refusal::TooShort {
            entry: AT,
            size: 3,
            needed: 5,
        },
    ),
    (
        "the function branches into the fill",
        &[
            0x75, 0x01, // jne +1 (to entry+3, in the "fill")
            0xc3, // ret
            0x90, 0x90, 0x90, 0x90, 0x90, // nop x5: executed after the jne, not padding
        ],
        Refusal::TooShort {
            entry: AT,
            size: 3,
            needed: 5,
        },
    ),
    (
        "code after an early ret (only an indirect jump reaches it) is never overwritten",
        &[
            0x31, 0xc0, // xor eax, eax
            0xc3, // ret
            0x48, 0x8d, 0x47, 0x01, // lea rax, [rdi+1]
            0xc3, // ret
        ],
        Refusal::TooShort {
            entry: AT,
            size: 3,
            needed: 5,
        },
    ),
];

#[test]
fn padding_byte_tables() {
    for &(name, code, offsets, padding) in ACCEPTED {
        let a = analyze_bytes(AT, code, &[], PadHint::Auto)
            .unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert_eq!(a.instruction_offsets(), offsets, "{name}");
        assert_eq!(a.padding_overwritten(), padding, "{name}");
        assert_eq!(a.jump_len(), 5, "{name}");
        let skip = (a.patch_point() - AT) as usize;
        assert_eq!(
            a.original_bytes(),
            &code[skip..skip + a.original_bytes().len()],
            "{name}"
        );
        assert!(a.original_bytes().len() >= 5, "{name}");
    }
    for (name, code, refusal) in REFUSED {
        assert_eq!(
            analyze_bytes(AT, code, &[], PadHint::Auto).unwrap_err(),
            *refusal,
            "{name}"
        );
    }
    // A function long enough on its own never touches its padding.
    let long = [
        0x48, 0x8d, 0x47, 0x01, // lea rax, [rdi+1]
        0x48, 0x01, 0xf8, // add rax, rdi
        0xc3, // ret
        0xcc, 0xcc, // int3 x2
    ];
    let a = analyze_bytes(AT, &long, &[], PadHint::Auto).unwrap();
    assert_eq!(a.padding_overwritten(), 0);
    assert_eq!(a.instruction_offsets(), vec![0, 4]);
}

/// `asm_tiny` (`mov eax, edi; ret`, 3 bytes, NOP fill to the next symbol) and `asm_tiny_cc`
/// (the same, int3 fill) are refused with their symbol size and installed with the distance
/// to the next symbol, while two threads call them: every call answers the old or the new
/// version, the site switches and is removed, and every byte (the padding too) is restored.
#[test]
fn a_three_byte_function_is_patched_through_its_padding() {
    let lib = asm_lib();
    let p = patcher();
    let (v2, _) = lib.func("asm_tiny_v2");
    for (name, next) in [("asm_tiny", "asm_tiny_cc"), ("asm_tiny_cc", "asm_tiny_v2")] {
        let (entry, size) = lib.func(name);
        assert_eq!(size, 3, "{name}");
        let room = lib.func(next).0 - entry;
        assert_eq!(
            room, 16,
            "{name}: the fixture aligns the next symbol to 16 bytes"
        );
        match p.analyze(entry, size, PadHint::Auto) {
            Err(Error::Refused(Refusal::TooShort { needed: 5, .. })) => {}
            other => panic!("{name} with its symbol size: {other:?}"),
        }
        let before = bytes(entry, room);
        let f = lib.f1(name);
        let stop = Arc::new(AtomicBool::new(false));
        let wrong = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (stop, wrong, calls) = (stop.clone(), wrong.clone(), calls.clone());
                std::thread::spawn(move || {
                    let mut x = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        let r = f(x);
                        if r != x && r != x + 1000 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                        x = (x + 1) % 1_000_000;
                    }
                })
            })
            .collect();
        let a = p.analyze(entry, room, PadHint::Auto).unwrap();
        assert!(a.padding_overwritten() > 0, "{name}");
        for round in 0..20u64 {
            let site = p.install(&a).unwrap();
            assert_eq!(f(7), 7, "{name}: steady at the original");
            site.site().begin(2 * round + 1, Version(v2));
            site.site().settle();
            assert_eq!(f(7), 1007, "{name}: settled on v2");
            p.set_fast_path(entry, Some(Version(v2))).unwrap();
            assert_eq!(f(7), 1007, "{name}: fast path");
            p.set_fast_path(entry, None).unwrap();
            site.site().begin(2 * round + 2, site.original());
            site.site().settle();
            assert_eq!(f(7), 7, "{name}: back to the original");
            p.remove(entry).unwrap();
            assert_eq!(bytes(entry, room), before, "{name}: bytes restored");
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(wrong.load(Ordering::Relaxed), 0, "{name}: wrong answers");
        assert!(calls.load(Ordering::Relaxed) > 0);
        eprintln!(
            "{name}: 20 install/switch/remove rounds, {} calls, 0 wrong",
            calls.load(Ordering::Relaxed)
        );
    }
}
