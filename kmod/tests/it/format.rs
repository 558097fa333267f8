//! The manifest bytes: round trip, one error per defect, and a fuzz over mutated bytes.

use kgpatch_kmod::raw;
use kgpatch_kmod::{
    encode_manifest, parse_manifest, BuildId, Callbacks, FunctionEntry, Manifest, ManifestError,
    RefKind, Reference, SymbolSpec, Target, TargetKind,
};
use proptest::prelude::*;

pub fn sample() -> Manifest {
    Manifest {
        format_version: 1,
        name: "fix".into(),
        version: "1.2".into(),
        description: "a fix".into(),
        target: Target {
            kind: TargetKind::Library {
                soname: "libfoo.so.1".into(),
            },
            build_id: Some(BuildId(vec![0xde, 0xad, 0xbe, 0xef])),
        },
        functions: vec![
            FunctionEntry {
                old: SymbolSpec {
                    name: "parse".into(),
                    file: Some("parse.c".into()),
                    index: Some(1),
                },
                expected_size: Some(42),
                checksum: Some(0x1234),
                new_symbol: "new_parse".into(),
            },
            FunctionEntry {
                old: SymbolSpec {
                    name: "run".into(),
                    file: None,
                    index: None,
                },
                expected_size: None,
                checksum: None,
                new_symbol: "new_run".into(),
            },
        ],
        references: vec![Reference {
            symbol: SymbolSpec {
                name: "limit".into(),
                file: Some("limit.c".into()),
                index: None,
            },
            kind: RefKind::Variable,
            slot_offset: 0,
        }],
        callbacks: Callbacks {
            pre_apply: Some("check".into()),
            post_revert: Some("cleanup".into()),
            ..Callbacks::default()
        },
    }
}

fn normalized(mut m: Manifest) -> Manifest {
    for r in &mut m.references {
        r.slot_offset = 0;
    }
    m
}

#[test]
fn round_trip() {
    let m = sample();
    let bytes = encode_manifest(&m);
    let back = parse_manifest(&bytes).unwrap();
    assert_eq!(normalized(back.clone()), m);
    // the slot is the first word after its record header
    let off = back.references[0].slot_offset as usize;
    assert_eq!(&bytes[off - 16..off - 12], b"KGPR");
    assert_eq!(off % 8, 0);
}

#[test]
fn zero_padding_between_records_is_skipped() {
    let m = sample();
    let bytes = encode_manifest(&m);
    // Split after the first record and insert 24 bytes of zeros (a linker's alignment gap).
    let first = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let mut padded = bytes[..first].to_vec();
    padded.extend_from_slice(&[0; 24]);
    padded.extend_from_slice(&bytes[first..]);
    padded.extend_from_slice(&[0; 5]);
    assert_eq!(normalized(parse_manifest(&padded).unwrap()), m);
}

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Offset of the first record of `kind` in `bytes`.
fn record_of(bytes: &[u8], kind: u16) -> usize {
    let mut off = 0;
    loop {
        let k = u16::from_le_bytes(bytes[off + 6..off + 8].try_into().unwrap());
        if k == kind {
            return off;
        }
        off += u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()) as usize;
    }
}

#[test]
fn each_defect_has_its_own_error() {
    let good = encode_manifest(&sample());
    let check = |f: &dyn Fn(&mut Vec<u8>), want: &dyn Fn(&ManifestError) -> bool| {
        let mut b = good.clone();
        f(&mut b);
        let err = parse_manifest(&b).unwrap_err();
        assert!(want(&err), "unexpected error {err:?}: {err}");
        // every message is one sentence with advice
        let msg = err.to_string();
        assert!(!msg.contains('\n') && msg.len() > 30, "{msg}");
    };
    check(&|b| b[0] = b'X', &|e| {
        matches!(e, ManifestError::BadMagic { offset: 0 })
    });
    check(&|b| set_u16(b, 4, 2), &|e| {
        matches!(
            e,
            ManifestError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        )
    });
    check(&|b| set_u16(b, 6, 77), &|e| {
        matches!(e, ManifestError::UnknownKind { kind: 77, .. })
    });
    check(&|b| set_u32(b, 8, 13), &|e| {
        matches!(e, ManifestError::BadSize { size: 13, .. })
    });
    check(&|b| set_u32(b, 8, 1 << 20), &|e| {
        matches!(e, ManifestError::BadSize { .. })
    });
    check(&|b| b.truncate(b.len() - 8), &|e| {
        matches!(e, ManifestError::Truncated { .. })
    });
    check(&|b| b.truncate(b.len() - 3), &|e| {
        matches!(e, ManifestError::Truncated { .. })
    });
    check(&|b| set_u32(b, 12, 1), &|e| {
        matches!(e, ManifestError::ReservedNotZero { offset: 0 })
    });
    // module strings: no terminator left after the name
    check(
        &|b| {
            let size = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
            let nul = 16 + b[16..].iter().position(|&c| c == 0).unwrap();
            b[nul..size].fill(b'x');
        },
        &|e| matches!(e, ManifestError::BadStrings { offset: 0 }),
    );
    check(&|b| b[16] = 0xff, &|e| {
        matches!(e, ManifestError::BadStrings { offset: 0 })
    });
    let target = record_of(&good, raw::KIND_TARGET);
    check(&|b| set_u32(b, target + 16, 9), &|e| {
        matches!(e, ManifestError::BadTargetKind { kind: 9, .. })
    });
    check(&|b| set_u32(b, target + 16, raw::TARGET_EXE), &|e| {
        matches!(e, ManifestError::BadTargetName { .. })
    });
    // build-id "deadbeef" -> "deadbeeg"
    check(
        &|b| {
            let at = target + 24 + "libfoo.so.1".len() + 1 + 7;
            b[at] = b'g';
        },
        &|e| matches!(e, ManifestError::BadBuildId { .. }),
    );
    let r = record_of(&good, raw::KIND_REF);
    check(&|b| b[r + 16] = 1, &|e| {
        matches!(e, ManifestError::SlotNotZero { .. })
    });
    check(&|b| set_u32(b, r + 28, 5), &|e| {
        matches!(e, ManifestError::BadRefKind { kind: 5, .. })
    });
    let cb = record_of(&good, raw::KIND_CALLBACK);
    check(&|b| set_u32(b, cb + 16, 0), &|e| {
        matches!(e, ManifestError::BadCallback { which: 0, .. })
    });
    // Duplicates: append a copy of the module record.
    let module_size = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    check(
        &|b| {
            let copy = b[..module_size].to_vec();
            b.extend_from_slice(&copy);
        },
        &|e| matches!(e, ManifestError::Duplicate { what: "module", .. }),
    );
    let rep = record_of(&good, raw::KIND_REPLACE);
    let rep_size = u32::from_le_bytes(good[rep + 8..rep + 12].try_into().unwrap()) as usize;
    check(
        &|b| {
            let copy = b[rep..rep + rep_size].to_vec();
            b.extend_from_slice(&copy);
        },
        &|e| matches!(e, ManifestError::DuplicateFunction { .. }),
    );
    // Stray bytes after the last record.
    check(
        &|b| b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        &|e| matches!(e, ManifestError::Truncated { .. }),
    );
    // Missing records.
    assert_eq!(parse_manifest(&[]), Err(ManifestError::MissingModule));
    assert_eq!(
        parse_manifest(&good[..module_size]),
        Err(ManifestError::MissingTarget)
    );
}

#[test]
fn empty_names_are_refused() {
    let mut m = sample();
    m.name.clear();
    assert!(matches!(
        parse_manifest(&encode_manifest(&m)),
        Err(ManifestError::EmptyField {
            field: "patch name",
            ..
        })
    ));
    let mut m = sample();
    m.functions[0].new_symbol.clear();
    assert!(matches!(
        parse_manifest(&encode_manifest(&m)),
        Err(ManifestError::EmptyField {
            field: "new symbol",
            ..
        })
    ));
}

#[test]
fn display_and_json() {
    let m = sample();
    let text = m.to_string();
    assert!(text.contains("patch fix 1.2"), "{text}");
    assert!(
        text.contains("library libfoo.so.1 (build-id deadbeef)"),
        "{text}"
    );
    assert!(
        text.contains("`parse` in parse.c #1 -> `new_parse`  size 42"),
        "{text}"
    );
    assert!(
        text.contains("size unchecked, checksum unchecked"),
        "{text}"
    );
    assert!(text.contains("pre-apply: `check`"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
    assert_eq!(json["target"]["kind"], "library");
    assert_eq!(json["target"]["soname"], "libfoo.so.1");
    assert_eq!(json["target"]["build_id"], "deadbeef");
    assert_eq!(json["functions"][0]["checksum"], "0x0000000000001234");
    assert_eq!(json["functions"][1]["checksum"], serde_json::Value::Null);
    assert_eq!(json["references"][0]["kind"], "variable");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random edits of a valid manifest: the parser returns Ok or Err, never panics, and
    /// every slot offset it reports lies inside the bytes.
    #[test]
    fn fuzz_mutated_manifest(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = encode_manifest(&sample());
        for (at, v) in edits {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        if do_cut {
            let n = cut.index(bytes.len() + 1);
            bytes.truncate(n);
        }
        if let Ok(m) = parse_manifest(&bytes) {
            for r in &m.references {
                prop_assert!(r.slot_offset as usize + 8 <= bytes.len());
                prop_assert_eq!(r.slot_offset % 8, 0);
            }
        }
    }

    /// Arbitrary bytes, often starting with a valid header.
    #[test]
    fn fuzz_random_bytes(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..512),
        header in any::<bool>(),
        kind in 0u16..8,
        size in 0u32..600,
    ) {
        if header && bytes.len() >= 16 {
            bytes[..4].copy_from_slice(b"KGPR");
            bytes[4..6].copy_from_slice(&1u16.to_le_bytes());
            bytes[6..8].copy_from_slice(&kind.to_le_bytes());
            bytes[8..12].copy_from_slice(&(size & !7).to_le_bytes());
            bytes[12..16].copy_from_slice(&0u32.to_le_bytes());
        }
        let _ = parse_manifest(&bytes);
    }
}
