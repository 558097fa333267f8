//! The built binaries have what patching needs: PIE, `.symtab`, `.eh_frame`, the patch
//! targets as real functions of at least 16 bytes, the static and duplicate-named ones
//! distinguishable by file, and the two deliberately unpatchable assembly functions.

use object::{Object, ObjectKind, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

use kgpatch_examples::{server_path, Variant};

struct Sym {
    name: String,
    file: String,
    global: bool,
    size: u64,
    bytes: Vec<u8>,
}

fn functions(variant: Variant) -> Vec<Sym> {
    let data = std::fs::read(server_path(variant)).unwrap();
    let file = object::File::parse(&*data).unwrap();
    assert_eq!(
        file.kind(),
        ObjectKind::Dynamic,
        "PIE executables are ET_DYN"
    );
    assert!(file.entry() != 0);
    assert!(file.section_by_name(".symtab").is_some(), "not stripped");
    assert!(file.section_by_name(".eh_frame").is_some());
    let mut out = Vec::new();
    let mut current_file = String::new();
    for sym in file.symbols() {
        if sym.kind() == SymbolKind::File {
            current_file = sym.name().unwrap_or_default().to_string();
            continue;
        }
        if sym.kind() != SymbolKind::Text {
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let section = file.section_by_index(index).unwrap();
        assert_eq!(section.kind(), SectionKind::Text);
        let bytes = section
            .data_range(sym.address(), sym.size())
            .unwrap()
            .unwrap_or_default()
            .to_vec();
        out.push(Sym {
            name: sym.name().unwrap().to_string(),
            file: current_file.clone(),
            global: sym.is_global(),
            size: sym.size(),
            bytes,
        });
    }
    out
}

fn one<'a>(syms: &'a [Sym], name: &str) -> &'a Sym {
    let found: Vec<&Sym> = syms.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "{name}");
    found[0]
}

const PUSH_RBP_MOV_RBP_RSP: [u8; 4] = [0x55, 0x48, 0x89, 0xe5];

#[test]
fn patch_targets_are_real_functions() {
    for v in Variant::ALL {
        let syms = functions(v);
        for (name, global, file) in [
            ("kv_encode", true, ""),
            ("kv_decode", true, ""),
            ("kv_transcode", true, ""),
            ("kv_slow_path", true, ""),
            ("kv_parse_amount", false, "proto.c"),
            ("kv_checksum", true, ""),
            ("kv_compact_step", true, ""),
        ] {
            let s = one(&syms, name);
            assert_eq!(s.global, global, "{}: {name} binding", v.name());
            if !global {
                // only local symbols follow their STT_FILE; globals come after all of them
                assert_eq!(s.file, file, "{}: {name} file", v.name());
            }
            assert!(s.size >= 16, "{}: {name} is {} bytes", v.name(), s.size);
            assert_eq!(s.bytes.len() as u64, s.size);
        }
        // same name, two files: a patch must say which
        let mut mixes: Vec<(&str, bool)> = syms
            .iter()
            .filter(|s| s.name == "kv_local_mix")
            .map(|s| (s.file.as_str(), s.global))
            .collect();
        mixes.sort();
        assert_eq!(
            mixes,
            [("compact.c", false), ("store.c", false)],
            "{}",
            v.name()
        );
        // unpatchable on purpose
        let head = one(&syms, "kv_loop_head");
        assert_eq!(
            head.bytes,
            [0x31, 0xc0, 0x83, 0xc0, 0x01, 0x39, 0xf8, 0x72, 0xf9, 0xc3]
        );
        assert_eq!(one(&syms, "kv_tiny_ret").bytes, [0x89, 0xf8, 0xc3]);
    }
    // Functions that call others set up rbp as frame pointer in the fp build (kv_transcode
    // only after its shrink-wrapped early exit), never in the Debian-style build. Leaves
    // that need no stack (kv_encode, kv_decode, kv_parse_amount) have no frame in either.
    let fp = functions(Variant::FramePointers);
    let nofp = functions(Variant::NoFramePointers);
    for name in ["kv_transcode", "kv_slow_path", "kv_compact_step"] {
        assert!(has_frame_setup(&one(&fp, name).bytes[..24]), "fp: {name}");
        assert!(!has_frame_setup(&one(&nofp, name).bytes), "nofp: {name}");
    }
    assert_ne!(
        one(&fp, "kv_transcode").bytes[0],
        0x55,
        "shrink-wrapped: checks before push rbp"
    );
}

fn has_frame_setup(code: &[u8]) -> bool {
    code.windows(4).any(|w| w == PUSH_RBP_MOV_RBP_RSP)
}
