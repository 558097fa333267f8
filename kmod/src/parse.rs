//! Parsing and validating the manifest section's bytes. Safe code only: every read goes
//! through [`crate::cast::read_at`], every offset is checked, every string is bounded by its
//! record. The error type is a small `Copy` enum that never allocates.

use crate::cast::read_at;
use crate::manifest::{
    BuildId, Callbacks, FunctionEntry, Manifest, RefKind, Reference, SymbolSpec, Target, TargetKind,
};
use crate::raw::{self, RawCallback, RawRef, RawReplace, RawTarget, RecordHeader};

const HEADER: usize = core::mem::size_of::<RecordHeader>();

/// Why a manifest section is not valid. Offsets are from the start of the section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The section is larger than [`raw::MAX_SECTION_SIZE`].
    #[error("the manifest section is {size} bytes, more than the 16 MiB limit; the module is not a kgpatch module or is corrupt")]
    SectionTooLarge {
        /// Section size.
        size: u64,
    },
    /// A record header or fixed part runs past the end of the section.
    #[error("the manifest is truncated: the record at offset {offset:#x} needs {needed} bytes but only {available} remain; rebuild the module")]
    Truncated {
        /// Record offset.
        offset: usize,
        /// Bytes the record needs.
        needed: usize,
        /// Bytes left in the section.
        available: usize,
    },
    /// A record does not start with [`raw::MAGIC`].
    #[error("the manifest is garbled: no record magic at offset {offset:#x}; rebuild the module")]
    BadMagic {
        /// Record offset.
        offset: usize,
    },
    /// A record has a format version this crate does not read.
    #[error("the manifest uses format version {found}, but this kgpatch reads only version {supported}; use a kgpatch at least as new as the module's kgpatch.h")]
    UnsupportedVersion {
        /// Version in the record.
        found: u16,
        /// Version this crate reads.
        supported: u16,
    },
    /// A record has an unknown kind.
    #[error("the manifest is garbled: unknown record kind {kind} at offset {offset:#x}; rebuild the module")]
    UnknownKind {
        /// Record offset.
        offset: usize,
        /// Kind found.
        kind: u16,
    },
    /// A record size is not a multiple of 8, too small for its kind, or too large.
    #[error("the manifest is garbled: the record at offset {offset:#x} has an invalid size {size}; rebuild the module")]
    BadSize {
        /// Record offset.
        offset: usize,
        /// Size found.
        size: u32,
    },
    /// A field that must be zero is not.
    #[error("the manifest is garbled: a reserved field of the record at offset {offset:#x} is not zero; rebuild the module")]
    ReservedNotZero {
        /// Record offset.
        offset: usize,
    },
    /// A record's strings are not the expected number of NUL-terminated UTF-8 strings
    /// followed by zero padding.
    #[error("the manifest is garbled: the strings of the record at offset {offset:#x} are malformed (count, terminator or UTF-8); rebuild the module")]
    BadStrings {
        /// Record offset.
        offset: usize,
    },
    /// A string that must not be empty is.
    #[error("the record at offset {offset:#x} has an empty {field}; give it in the module source")]
    EmptyField {
        /// Record offset.
        offset: usize,
        /// Which field.
        field: &'static str,
    },
    /// No module record.
    #[error("the manifest has no module record; declare the patch with KGPATCH_MODULE (C) or patch_module! (Rust)")]
    MissingModule,
    /// No target record.
    #[error("the manifest has no target record; declare the target with KGPATCH_TARGET_EXE/KGPATCH_TARGET_LIB (C) or in patch_module! (Rust)")]
    MissingTarget,
    /// Two records of a kind that must be unique.
    #[error(
        "the manifest has a second {what} record at offset {offset:#x}; declare it once per module"
    )]
    Duplicate {
        /// Record offset of the second one.
        offset: usize,
        /// What is duplicated.
        what: &'static str,
    },
    /// Unknown target kind.
    #[error("the target record at offset {offset:#x} has an unknown target kind {kind}; rebuild the module")]
    BadTargetKind {
        /// Record offset.
        offset: usize,
        /// Kind found.
        kind: u32,
    },
    /// A library target without a soname, or an executable target with one.
    #[error("the target record at offset {offset:#x} is inconsistent: a library target needs a soname and an executable target must not have one")]
    BadTargetName {
        /// Record offset.
        offset: usize,
    },
    /// The build-id is not an even number of hex digits, or longer than 64 bytes.
    #[error("the target build-id at offset {offset:#x} is not 1 to 64 bytes of hex; copy it from `readelf -n` or `kgpatch-kmod describe`")]
    BadBuildId {
        /// Record offset.
        offset: usize,
    },
    /// Unknown reference kind.
    #[error(
        "the reference record at offset {offset:#x} has an unknown kind {kind}; rebuild the module"
    )]
    BadRefKind {
        /// Record offset.
        offset: usize,
        /// Kind found.
        kind: u32,
    },
    /// A slot is not zero in the file.
    #[error("the reference slot at offset {offset:#x} is not zero in the file; slots must start empty, rebuild the module")]
    SlotNotZero {
        /// Record offset.
        offset: usize,
    },
    /// Unknown callback role.
    #[error(
        "the callback record at offset {offset:#x} has an unknown role {which}; rebuild the module"
    )]
    BadCallback {
        /// Record offset.
        offset: usize,
        /// Role found.
        which: u32,
    },
    /// The same function is replaced twice.
    #[error("the replace record at offset {offset:#x} names the same old function as an earlier one; replace each function once")]
    DuplicateFunction {
        /// Record offset.
        offset: usize,
    },
}

/// Parses and validates a manifest section (`.kgpatch` contents).
pub fn parse_manifest(data: &[u8]) -> Result<Manifest, ManifestError> {
    if data.len() as u64 > raw::MAX_SECTION_SIZE {
        return Err(ManifestError::SectionTooLarge {
            size: data.len() as u64,
        });
    }
    let mut parts = Parts::default();
    let mut offset = 0usize;
    while let Some(offset_after_padding) = skip_padding(data, offset) {
        offset = offset_after_padding;
        let record = Record::at(data, offset)?;
        match record.kind {
            raw::KIND_MODULE => parts.module(&record)?,
            raw::KIND_TARGET => parts.target(&record)?,
            raw::KIND_REPLACE => parts.replace(&record)?,
            raw::KIND_REF => parts.reference(&record)?,
            raw::KIND_CALLBACK => parts.callback(&record)?,
            _ => unreachable!("kind range checked in Record::at"),
        }
        offset += record.bytes.len();
    }
    parts.finish()
}

/// The offset of the next record at or after `offset`, past zero padding between records
/// (in whole 8-byte words); `None` when only zero bytes (or nothing) are left.
fn skip_padding(data: &[u8], mut offset: usize) -> Option<usize> {
    while offset < data.len() {
        if data.len() - offset >= 8 && data[offset..offset + 8].iter().all(|&b| b == 0) {
            offset += 8;
            continue;
        }
        if data[offset..].iter().all(|&b| b == 0) {
            return None; // trailing zero bytes shorter than a word
        }
        // Records and padding advance in multiples of 8, so `offset` stays 8-aligned.
        debug_assert_eq!(offset % 8, 0);
        return Some(offset);
    }
    None
}

/// One record whose header, size and strings are checked; its fixed part is read by kind.
struct Record<'a> {
    /// Where it starts in the section.
    offset: usize,
    /// Its kind (one of `raw::KIND_*`).
    kind: u16,
    /// The whole record, header included.
    bytes: &'a [u8],
    /// Its strings, as many as its kind has.
    strings: Vec<&'a str>,
    /// Header plus fixed part.
    fixed_end: usize,
    /// Bytes left in the section from `offset`.
    available: usize,
}

impl<'a> Record<'a> {
    /// Checks the record header at `offset` and splits the record's strings.
    fn at(data: &'a [u8], offset: usize) -> Result<Record<'a>, ManifestError> {
        let available = data.len() - offset;
        let h: RecordHeader = read_at(data, offset).ok_or(ManifestError::Truncated {
            offset,
            needed: HEADER,
            available,
        })?;
        if h.magic != raw::MAGIC {
            return Err(ManifestError::BadMagic { offset });
        }
        if h.version != raw::FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                found: h.version,
                supported: raw::FORMAT_VERSION,
            });
        }
        let kind = usize::from(h.kind);
        if !(1..raw::FIXED_SIZE.len()).contains(&kind) {
            return Err(ManifestError::UnknownKind {
                offset,
                kind: h.kind,
            });
        }
        let fixed_end = HEADER + raw::FIXED_SIZE[kind];
        let size = h.size as usize;
        if h.size % 8 != 0
            || size < fixed_end + raw::STRING_COUNT[kind]
            || h.size > raw::MAX_RECORD_SIZE
        {
            return Err(ManifestError::BadSize {
                offset,
                size: h.size,
            });
        }
        if size > available {
            return Err(ManifestError::Truncated {
                offset,
                needed: size,
                available,
            });
        }
        if h.reserved != 0 {
            return Err(ManifestError::ReservedNotZero { offset });
        }
        let bytes = &data[offset..offset + size];
        let strings = split_strings(&bytes[fixed_end..], raw::STRING_COUNT[kind])
            .ok_or(ManifestError::BadStrings { offset })?;
        Ok(Record {
            offset,
            kind: h.kind,
            bytes,
            strings,
            fixed_end,
            available,
        })
    }

    /// The record's fixed part. `size >= fixed_end` was checked in [`Record::at`], so this
    /// cannot fail; the error is still a clean one rather than a panic.
    fn fixed<T: crate::cast::Pod>(&self) -> Result<T, ManifestError> {
        read_at(self.bytes, HEADER).ok_or(ManifestError::Truncated {
            offset: self.offset,
            needed: self.fixed_end,
            available: self.available,
        })
    }

    /// String `i`, which must not be empty (`field` names it in the error).
    fn non_empty(&self, i: usize, field: &'static str) -> Result<&'a str, ManifestError> {
        let s = self.strings[i];
        if s.is_empty() {
            return Err(ManifestError::EmptyField {
                offset: self.offset,
                field,
            });
        }
        Ok(s)
    }
}

/// What the records seen so far declare.
#[derive(Default)]
struct Parts {
    /// Name, version, description.
    module: Option<(String, String, String)>,
    target: Option<Target>,
    functions: Vec<FunctionEntry>,
    references: Vec<Reference>,
    callbacks: Callbacks,
}

impl Parts {
    fn module(&mut self, r: &Record<'_>) -> Result<(), ManifestError> {
        if self.module.is_some() {
            return Err(ManifestError::Duplicate {
                offset: r.offset,
                what: "module",
            });
        }
        let name = r.non_empty(0, "patch name")?;
        self.module = Some((
            name.to_owned(),
            r.strings[1].to_owned(),
            r.strings[2].to_owned(),
        ));
        Ok(())
    }

    fn target(&mut self, r: &Record<'_>) -> Result<(), ManifestError> {
        let offset = r.offset;
        let t: RawTarget = r.fixed()?;
        if t.reserved != 0 {
            return Err(ManifestError::ReservedNotZero { offset });
        }
        if self.target.is_some() {
            return Err(ManifestError::Duplicate {
                offset,
                what: "target",
            });
        }
        let kind = match (t.target_kind, r.strings[0].is_empty()) {
            (raw::TARGET_EXE, true) => TargetKind::Executable,
            (raw::TARGET_LIB, false) => TargetKind::Library {
                soname: r.strings[0].to_owned(),
            },
            (raw::TARGET_EXE | raw::TARGET_LIB, _) => {
                return Err(ManifestError::BadTargetName { offset })
            }
            (k, _) => return Err(ManifestError::BadTargetKind { offset, kind: k }),
        };
        let build_id = if r.strings[1].is_empty() {
            None
        } else {
            Some(parse_hex(r.strings[1]).ok_or(ManifestError::BadBuildId { offset })?)
        };
        self.target = Some(Target { kind, build_id });
        Ok(())
    }

    fn replace(&mut self, r: &Record<'_>) -> Result<(), ManifestError> {
        let offset = r.offset;
        let raw: RawReplace = r.fixed()?;
        if raw.flags != 0 {
            return Err(ManifestError::ReservedNotZero { offset });
        }
        let old_name = r.non_empty(0, "old symbol")?;
        let new_symbol = r.non_empty(2, "new symbol")?;
        let old = spec(old_name, r.strings[1], raw.index);
        if self.functions.iter().any(|f| f.old == old) {
            return Err(ManifestError::DuplicateFunction { offset });
        }
        self.functions.push(FunctionEntry {
            old,
            expected_size: (raw.expected_size != 0).then_some(raw.expected_size),
            checksum: (raw.checksum != 0).then_some(raw.checksum),
            new_symbol: new_symbol.to_owned(),
        });
        Ok(())
    }

    fn reference(&mut self, r: &Record<'_>) -> Result<(), ManifestError> {
        let offset = r.offset;
        let raw: RawRef = r.fixed()?;
        if raw.slot != 0 {
            return Err(ManifestError::SlotNotZero { offset });
        }
        let kind = match raw.ref_kind {
            raw::REF_ANY => RefKind::Any,
            raw::REF_FUNC => RefKind::Function,
            raw::REF_OBJECT => RefKind::Variable,
            k => return Err(ManifestError::BadRefKind { offset, kind: k }),
        };
        let symbol = r.non_empty(0, "referenced symbol")?;
        self.references.push(Reference {
            symbol: spec(symbol, r.strings[1], raw.index),
            kind,
            slot_offset: (offset + raw::REF_SLOT_OFFSET) as u64,
        });
        Ok(())
    }

    fn callback(&mut self, r: &Record<'_>) -> Result<(), ManifestError> {
        let offset = r.offset;
        let c: RawCallback = r.fixed()?;
        if c.reserved != 0 {
            return Err(ManifestError::ReservedNotZero { offset });
        }
        let slot = match c.which {
            raw::CALLBACK_PRE_APPLY => &mut self.callbacks.pre_apply,
            raw::CALLBACK_POST_APPLY => &mut self.callbacks.post_apply,
            raw::CALLBACK_PRE_REVERT => &mut self.callbacks.pre_revert,
            raw::CALLBACK_POST_REVERT => &mut self.callbacks.post_revert,
            w => return Err(ManifestError::BadCallback { offset, which: w }),
        };
        if slot.is_some() {
            return Err(ManifestError::Duplicate {
                offset,
                what: "callback",
            });
        }
        *slot = Some(r.non_empty(0, "callback symbol")?.to_owned());
        Ok(())
    }

    /// The manifest, once every record is read: a module and a target record are required.
    fn finish(self) -> Result<Manifest, ManifestError> {
        let (name, version, description) = self.module.ok_or(ManifestError::MissingModule)?;
        let target = self.target.ok_or(ManifestError::MissingTarget)?;
        Ok(Manifest {
            format_version: raw::FORMAT_VERSION,
            name,
            version,
            description,
            target,
            functions: self.functions,
            references: self.references,
            callbacks: self.callbacks,
        })
    }
}

fn spec(name: &str, file: &str, index: u32) -> SymbolSpec {
    SymbolSpec {
        name: name.to_owned(),
        file: (!file.is_empty()).then(|| file.to_owned()),
        index: (index != raw::INDEX_NONE).then_some(index),
    }
}

/// Splits `blob` into exactly `count` NUL-terminated UTF-8 strings followed by fewer than 8
/// zero bytes.
fn split_strings(blob: &[u8], count: usize) -> Option<Vec<&str>> {
    let mut out = Vec::with_capacity(count);
    let mut rest = blob;
    for _ in 0..count {
        let nul = rest.iter().position(|&b| b == 0)?;
        out.push(core::str::from_utf8(&rest[..nul]).ok()?);
        rest = &rest[nul + 1..];
    }
    // Only the padding to the next 8-byte boundary may follow.
    (rest.len() < 8 && rest.iter().all(|&b| b == 0)).then_some(out)
}

fn parse_hex(s: &str) -> Option<BuildId> {
    if s.is_empty() || s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    let bytes = s
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect::<Option<Vec<u8>>>()?;
    Some(BuildId(bytes))
}
