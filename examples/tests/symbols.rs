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

/// The `#define KVSYM_...` values of one variant's half of kvserver_syms.h.
fn header_values(nofp: bool) -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(kgpatch_examples::server_symbols_header()).unwrap();
    let mut in_nofp = false;
    let mut in_fp = false;
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        match line {
            "#ifdef KV_TARGET_NOFP" => in_nofp = true,
            "#else" => (in_nofp, in_fp) = (false, true),
            "#endif" => in_fp = false,
            _ => {
                if in_nofp == nofp && in_fp != nofp {
                    if let Some(def) = line.strip_prefix("#define KVSYM_") {
                        let (k, v) = def.split_once(' ').unwrap();
                        out.insert(k.to_string(), v.to_string());
                    }
                }
            }
        }
    }
    out
}

#[test]
fn generated_header_matches_what_the_loader_checks() {
    for v in Variant::ALL {
        let values = header_values(v == Variant::NoFramePointers);
        assert_eq!(values.len(), 1 + 2 * 9, "{}: {values:?}", v.name());
        let path = server_path(v);
        let id = kgpatch_kmod::file_build_id(path)
            .unwrap()
            .expect("a build-id");
        assert_eq!(values["BUILD_ID"], format!("\"{id}\""), "{}", v.name());
        for (name, file) in [
            ("kv_parse_amount", Some("proto.c")),
            ("kv_encode", None),
            ("kv_decode", None),
            ("kv_transcode", None),
            ("kv_slow_path", None),
            ("kv_checksum", None),
            ("kv_compact_step", None),
            ("kv_local_mix", Some("store.c")),
            ("kv_local_mix", Some("compact.c")),
        ] {
            let found = kgpatch_kmod::describe_symbol(path, name, file).unwrap();
            assert_eq!(found.len(), 1, "{}: {name} {file:?}: {found:?}", v.name());
            let key = match file {
                Some(f) => format!("{name}__{}", f.replace('.', "_")),
                None => name.to_string(),
            };
            assert_eq!(
                values[&format!("{key}_SIZE")],
                found[0].size.to_string(),
                "{key}"
            );
            let sum = found[0].checksum.expect("a checksum");
            assert_eq!(
                values[&format!("{key}_FNV")],
                format!("0x{sum:016x}ull"),
                "{key}"
            );
        }
        // without the file, the duplicate static name is ambiguous
        assert_eq!(
            kgpatch_kmod::describe_symbol(path, "kv_local_mix", None)
                .unwrap()
                .len(),
            2
        );
    }
}

#[test]
fn generated_header_compiles_into_a_patch_manifest() {
    let dir = std::env::temp_dir().join(format!("kvsyms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    std::fs::write(
        &src,
        r#"#include <stddef.h>
#include "kgpatch.h"
#include "kvserver.h"
#include "kvserver_syms.h"
KGPATCH_MODULE("probe", "1", "checks that the generated header is usable");
KGPATCH_TARGET_EXE_BUILD_ID(KVSYM_BUILD_ID);
int probe_parse_amount(const char *s, size_t n, long *out) { (void)s; (void)n; *out = 0; return 0; }
KGPATCH_REPLACE_LOCAL("kv_parse_amount", "proto.c", probe_parse_amount,
                      KVSYM_SIZE(kv_parse_amount__proto_c), KVSYM_FNV(kv_parse_amount__proto_c));
_Static_assert(KVSYM_SIZE(kv_encode) >= 16, "a site fits");
"#,
    )
    .unwrap();
    let kmod_include = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/include");
    for nofp in [false, true] {
        let so = dir.join(format!("probe-{nofp}.so"));
        let mut cmd = std::process::Command::new("cc");
        cmd.args(["-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror"])
            .arg("-I")
            .arg(&kmod_include)
            .arg("-I")
            .arg(kgpatch_examples::server_source_dir())
            .arg("-I")
            .arg(kgpatch_examples::server_symbols_header().parent().unwrap());
        if nofp {
            cmd.arg("-DKV_TARGET_NOFP");
        }
        let out = cmd.arg(&src).arg("-o").arg(&so).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = kgpatch_kmod::inspect(&so).unwrap();
        let variant = if nofp {
            Variant::NoFramePointers
        } else {
            Variant::FramePointers
        };
        let target =
            kgpatch_kmod::describe_symbol(server_path(variant), "kv_parse_amount", Some("proto.c"))
                .unwrap()
                .remove(0);
        assert_eq!(m.functions.len(), 1);
        let f = &m.functions[0];
        assert_eq!(
            (f.old.name.as_str(), f.old.file.as_deref()),
            ("kv_parse_amount", Some("proto.c"))
        );
        assert_eq!(f.new_symbol, "probe_parse_amount");
        assert_eq!(
            (f.expected_size, f.checksum),
            (Some(target.size), target.checksum),
            "nofp={nofp}"
        );
        let id = kgpatch_kmod::file_build_id(server_path(variant)).unwrap();
        assert_eq!(m.target.build_id, id, "nofp={nofp}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
