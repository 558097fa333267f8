//! Writing manifest bytes from a [`Manifest`]: the inverse of [`crate::parse_manifest`], for
//! tools that generate modules and for tests. `slot_offset` values are ignored (they follow
//! from the layout) and every slot is written zero.

use crate::manifest::{Manifest, RefKind, SymbolSpec, TargetKind};
use crate::raw::{self, RecordHeader};

fn record(out: &mut Vec<u8>, kind: u16, fixed: &[u8], strings: &[&str]) {
    let mut body = fixed.to_vec();
    for s in strings {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let size = (core::mem::size_of::<RecordHeader>() + body.len()).next_multiple_of(8);
    out.extend_from_slice(&raw::MAGIC.to_le_bytes());
    out.extend_from_slice(&raw::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&body);
    out.resize(out.len().next_multiple_of(8), 0);
}

fn index(spec: &SymbolSpec) -> u32 {
    spec.index.unwrap_or(raw::INDEX_NONE)
}

/// Encodes `m` as the contents of a `.kgpatch` section (format version 1).
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    record(
        &mut out,
        raw::KIND_MODULE,
        &[],
        &[&m.name, &m.version, &m.description],
    );
    let (kind, soname) = match &m.target.kind {
        TargetKind::Executable => (raw::TARGET_EXE, ""),
        TargetKind::Library { soname } => (raw::TARGET_LIB, soname.as_str()),
    };
    let build_id = m
        .target
        .build_id
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let mut fixed = kind.to_le_bytes().to_vec();
    fixed.extend_from_slice(&0u32.to_le_bytes());
    record(&mut out, raw::KIND_TARGET, &fixed, &[soname, &build_id]);
    for f in &m.functions {
        let mut fixed = f.expected_size.unwrap_or(0).to_le_bytes().to_vec();
        fixed.extend_from_slice(&f.checksum.unwrap_or(0).to_le_bytes());
        fixed.extend_from_slice(&index(&f.old).to_le_bytes());
        fixed.extend_from_slice(&0u32.to_le_bytes());
        let file = f.old.file.as_deref().unwrap_or("");
        record(
            &mut out,
            raw::KIND_REPLACE,
            &fixed,
            &[&f.old.name, file, &f.new_symbol],
        );
    }
    for r in &m.references {
        let mut fixed = 0u64.to_le_bytes().to_vec();
        fixed.extend_from_slice(&index(&r.symbol).to_le_bytes());
        let kind = match r.kind {
            RefKind::Any => raw::REF_ANY,
            RefKind::Function => raw::REF_FUNC,
            RefKind::Variable => raw::REF_OBJECT,
        };
        fixed.extend_from_slice(&kind.to_le_bytes());
        let file = r.symbol.file.as_deref().unwrap_or("");
        record(&mut out, raw::KIND_REF, &fixed, &[&r.symbol.name, file]);
    }
    let cbs = &m.callbacks;
    for (which, sym) in [
        (raw::CALLBACK_PRE_APPLY, &cbs.pre_apply),
        (raw::CALLBACK_POST_APPLY, &cbs.post_apply),
        (raw::CALLBACK_PRE_REVERT, &cbs.pre_revert),
        (raw::CALLBACK_POST_REVERT, &cbs.post_revert),
    ] {
        if let Some(sym) = sym {
            let mut fixed = which.to_le_bytes().to_vec();
            fixed.extend_from_slice(&0u32.to_le_bytes());
            record(&mut out, raw::KIND_CALLBACK, &fixed, &[sym]);
        }
    }
    out
}
