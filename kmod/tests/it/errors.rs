//! Every bad input gives its own error and changes nothing: modules that fail to read are
//! never dlopened; modules that fail to resolve keep every slot zero.

use std::path::{Path, PathBuf};
use std::process::Command;

use kgpatch_kmod::{loaded_objects, KmodError, Loaded, ManifestError, ResolveOptions};

use crate::c_module::fixture_bias;
use crate::c_module::link_value;
use crate::common::{c_module, fixtures, load_fixture_lib};

/// Opens (must succeed), resolves (must fail), checks that no slot was written.
fn resolve_err(path: &Path, opts: ResolveOptions) -> KmodError {
    load_fixture_lib();
    // SAFETY: fixture modules have no constructors.
    let mut loaded = unsafe { Loaded::open(path) }.unwrap();
    let err = loaded.resolve(opts).unwrap_err();
    let slots = loaded.slot_values();
    assert!(!slots.is_empty());
    assert!(slots.iter().all(|&v| v == 0), "{err}: slots {slots:x?}");
    assert!(loaded.resolved().is_none());
    // SAFETY: nothing of the module runs.
    unsafe { loaded.close() }.unwrap();
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    err
}

/// `Loaded::open` must fail without the module ever being mapped.
fn open_err(path: &Path) -> KmodError {
    // SAFETY: never reaches dlopen for these inputs (asserted below).
    let err = unsafe { Loaded::open(path) }.unwrap_err();
    let name = path.to_str().unwrap();
    assert!(
        loaded_objects().iter().all(|o| o.name != name),
        "{name} was loaded despite {err}"
    );
    err
}

/// `(file offset, size)` of `.kgpatch`, from `readelf -SW`.
fn section_offset(path: &Path) -> (usize, usize) {
    let out = Command::new("readelf")
        .arg("-SW")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.contains(".kgpatch")).unwrap();
    let cols: Vec<&str> = line.split(']').nth(1).unwrap().split_whitespace().collect();
    (
        usize::from_str_radix(cols[3], 16).unwrap(),
        usize::from_str_radix(cols[4], 16).unwrap(),
    )
}

/// A copy of the good C module with `edit` applied to its `.kgpatch` bytes.
fn edited_module(name: &str, edit: impl Fn(&mut [u8])) -> PathBuf {
    let good = c_module("GOOD", &[]);
    let mut bytes = std::fs::read(&good).unwrap();
    let (off, size) = section_offset(&good);
    edit(&mut bytes[off..off + size]);
    let out = fixtures().dir.join(format!("edited-{name}.so"));
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn not_an_elf() {
    let p = fixtures().dir.join("not-an-elf.so");
    std::fs::write(&p, "this is text, not a shared object\n").unwrap();
    assert!(matches!(open_err(&p), KmodError::NotElf { .. }));
    let missing = fixtures().dir.join("no-such-file.so");
    assert!(matches!(open_err(&missing), KmodError::Io { .. }));
}

#[test]
fn elf_without_manifest() {
    let copy = fixtures().dir.join("no-manifest.so");
    std::fs::copy(&fixtures().lib, &copy).unwrap();
    let err = open_err(&copy);
    assert!(matches!(err, KmodError::NoManifest { .. }), "{err}");
    assert!(err.to_string().contains("no .kgpatch section"));
}

#[test]
fn future_format_version() {
    let p = edited_module("future", |s| s[4..6].copy_from_slice(&2u16.to_le_bytes()));
    let err = open_err(&p);
    assert!(
        matches!(
            err,
            KmodError::BadManifest {
                source: ManifestError::UnsupportedVersion {
                    found: 2,
                    supported: 1
                },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn truncated_manifest() {
    // The first record claims more bytes than the section has.
    let p = edited_module("truncated", |s| {
        let len = s.len() as u32;
        s[8..12].copy_from_slice(&(len + 8).to_le_bytes());
    });
    let err = open_err(&p);
    assert!(
        matches!(
            err,
            KmodError::BadManifest {
                source: ManifestError::Truncated { offset: 0, .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn garbled_manifest() {
    let p = edited_module("garbled", |s| {
        let first = u32::from_le_bytes(s[8..12].try_into().unwrap()) as usize;
        s[first..first + 4].copy_from_slice(b"JUNK");
    });
    let err = open_err(&p);
    assert!(
        matches!(
            err,
            KmodError::BadManifest {
                source: ManifestError::BadMagic { .. },
                ..
            }
        ),
        "{err}"
    );
    // A slot that is not zero in the file is garbage too.
    let p = edited_module("slot", |s| {
        let mut off = 0;
        while u16::from_le_bytes(s[off + 6..off + 8].try_into().unwrap()) != 4 {
            off += u32::from_le_bytes(s[off + 8..off + 12].try_into().unwrap()) as usize;
        }
        s[off + 16] = 0x42;
    });
    assert!(matches!(
        open_err(&p),
        KmodError::BadManifest {
            source: ManifestError::SlotNotZero { .. },
            ..
        }
    ));
}

#[test]
fn new_function_not_exported() {
    let p = c_module("HIDDEN_NEW", &[]);
    let err = open_err(&p);
    assert!(
        matches!(&err, KmodError::NotExported { symbol, .. } if symbol == "kgfix_c_new_compute"),
        "{err}"
    );
    // inspect reports it too: the manifest names a function the module does not have
    assert!(kgpatch_kmod::inspect(&p).is_err());
}

#[test]
fn direct_reference_to_a_target_static_fails_dlopen() {
    load_fixture_lib();
    let p = c_module("DIRECT_REF", &[]);
    // SAFETY: dlopen fails before any code runs (undefined symbol).
    let err = unsafe { Loaded::open(&p) }.unwrap_err();
    assert!(
        matches!(&err, KmodError::Dlopen { message, .. } if message.contains("scale")),
        "{err}"
    );
}

#[test]
fn wrong_target() {
    let err = resolve_err(&c_module("WRONG_TARGET", &[]), ResolveOptions::default());
    assert!(
        matches!(&err, KmodError::TargetNotLoaded { target } if target.contains("libkgnotloaded.so.9")),
        "{err}"
    );
}

#[test]
fn wrong_build_id() {
    let bad = "-DBUILD_ID=\"00112233445566778899aabbccddeeff00112233\"".to_owned();
    let p = crate::common::c_module_from("patch_c.c", "WRONG_BUILD_ID", &[bad], &[]);
    let err = resolve_err(&p, ResolveOptions::default());
    assert!(
        matches!(&err, KmodError::BuildIdMismatch { found: Some(found), .. }
            if found.to_string() == fixtures().lib_build_id),
        "{err}"
    );
    // The right build-id resolves.
    let good = format!("-DBUILD_ID=\"{}\"", fixtures().lib_build_id);
    let p = crate::common::c_module_from("patch_c.c", "RIGHT_BUILD_ID", &[good], &[]);
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&p) }.unwrap();
    assert_eq!(
        loaded
            .manifest()
            .target
            .build_id
            .as_ref()
            .unwrap()
            .to_string(),
        fixtures().lib_build_id
    );
    loaded.resolve(ResolveOptions::default()).unwrap();
}

#[test]
fn missing_symbol() {
    let err = resolve_err(&c_module("MISSING_SYMBOL", &[]), ResolveOptions::default());
    assert!(
        matches!(&err, KmodError::MissingFunction { symbol, table: ".symtab", .. }
            if symbol.name == "kgfix_no_such_function"),
        "{err}"
    );
}

#[test]
fn ambiguous_local_symbol_lists_candidates() {
    let err = resolve_err(&c_module("AMBIGUOUS", &[]), ResolveOptions::default());
    let KmodError::Ambiguous { candidates, .. } = &err else {
        panic!("{err}");
    };
    let f = fixtures();
    let bias = fixture_bias();
    let files: Vec<_> = candidates.iter().map(|c| c.file.as_deref()).collect();
    assert_eq!(files, [Some("target_a.c"), Some("target_b.c")]);
    for c in candidates {
        assert_eq!(
            c.address,
            bias + link_value(&f.lib, "helper", c.file.as_deref())
        );
    }
    let msg = err.to_string();
    assert!(msg.contains("#0 target_a.c at 0x"), "{msg}");
    assert!(msg.contains("#1 target_b.c at 0x"), "{msg}");
}

#[test]
fn size_mismatch() {
    let err = resolve_err(&c_module("SIZE", &[]), ResolveOptions::default());
    let size = fixtures().compute.size;
    assert!(
        matches!(err, KmodError::SizeMismatch { expected, found, .. } if expected == size + 1 && found == size),
        "{err}"
    );
}

#[test]
fn checksum_mismatch() {
    let err = resolve_err(&c_module("SUM", &[]), ResolveOptions::default());
    let sum = fixtures().compute.checksum.unwrap();
    assert!(
        matches!(err, KmodError::ChecksumMismatch { expected, found, .. } if expected == sum ^ 1 && found == sum),
        "{err}"
    );
}

#[test]
fn unresolved_reference() {
    let err = resolve_err(&c_module("UNRESOLVED_REF", &[]), ResolveOptions::default());
    assert!(
        matches!(&err, KmodError::UnresolvedReference { symbol, .. } if symbol.name == "kgfix_no_such_variable"),
        "{err}"
    );
}

#[test]
fn unchecked_entries_need_an_explicit_opt_in() {
    let p = c_module("UNCHECKED", &[]);
    let err = resolve_err(&p, ResolveOptions::default());
    assert!(
        matches!(err, KmodError::Unchecked { what: "size", .. }),
        "{err}"
    );
    // SAFETY: no constructors.
    let mut loaded = unsafe { Loaded::open(&p) }.unwrap();
    let r = loaded
        .resolve(ResolveOptions {
            allow_unchecked: true,
        })
        .unwrap();
    assert_eq!(r.functions[0].old_size, fixtures().compute.size);
}

mod fuzz {
    use proptest::prelude::*;

    use crate::common::{c_module, fixtures};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Random byte edits anywhere in a real module file (ELF headers, section table,
        /// symbol tables, manifest): reading it returns Ok or an error, never panics.
        #[test]
        fn fuzz_module_file(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..10),
            head in any::<bool>(),
        ) {
            let good = std::fs::read(c_module("GOOD", &[])).unwrap();
            let mut bytes = good.clone();
            for (at, v) in edits {
                // Half the cases hit the ELF and program headers, where parsing starts.
                let n = if head { 0x200.min(bytes.len()) } else { bytes.len() };
                bytes[at.index(n)] = v;
            }
            let path = fixtures().dir.join(format!(
                "fuzz-{}-{:?}.so",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, &bytes).unwrap();
            let _ = kgpatch_kmod::ModuleFile::read(&path);
            let _ = kgpatch_kmod::describe_symbol(&path, "kgfix_c_new_compute", None);
        }
    }
}

#[test]
fn read_only_manifest_section_is_refused() {
    // Slots must be writable: a module whose .kgpatch lost SHF_WRITE is refused at read.
    let good = c_module("GOOD", &[]);
    let ro = fixtures().dir.join("readonly-manifest.so");
    crate::common::run(
        Command::new("objcopy")
            .args([
                "--set-section-flags",
                ".kgpatch=alloc,readonly,contents,data",
            ])
            .arg(&good)
            .arg(&ro),
    );
    let err = open_err(&ro);
    assert!(
        matches!(err, KmodError::ManifestNotLoadable { .. }),
        "{err}"
    );
}
