//! Resolution: from a module's manifest and the loaded objects of a process to the addresses
//! the patch needs. Pure computation over files and numbers; writes nothing. The live wrapper
//! ([`crate::Loaded::resolve`]) writes the slots only after this succeeded for every entry.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checksum::fnv1a64;
use crate::elf::{read_target, soname, ModuleFile, SymKind, SymbolTable, TargetInfo, TargetSymbol};
use crate::error::{Candidate, KmodError};
use crate::manifest::{BuildId, Manifest, RefKind, SymbolSpec, TargetKind};
use crate::names;

/// One object loaded in a process (from `dl_iterate_phdr`, or made up by a test).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadedObject {
    /// The loader's name for it (`dlpi_name`; empty for the executable).
    pub name: String,
    /// The file to read its symbols from.
    pub file: PathBuf,
    /// Load bias: runtime address minus link-time address (0 for a non-PIE executable).
    pub bias: u64,
    /// The main executable.
    pub is_main: bool,
    /// GNU build-id read from its notes in memory, if it has one.
    pub build_id: Option<Vec<u8>>,
}

/// Policy knobs of resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveOptions {
    /// Accept manifest entries whose size or checksum is 0 ("not checked"). Off by default:
    /// without them the loader cannot tell that the target was rebuilt.
    pub allow_unchecked: bool,
}

/// A replaced function, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedFunction {
    /// The manifest's name for it.
    pub old: SymbolSpec,
    /// The `STT_FILE` of the symbol found (for locals).
    pub old_file: Option<String>,
    /// Runtime entry address of the old function (the patch site).
    pub old_address: u64,
    /// Its size in bytes.
    pub old_size: u64,
    /// Its size and the alignment padding after it, up to the next symbol or its section's
    /// end (`old_size` when only `.dynsym` names it): what the redirect may overwrite when
    /// the function is shorter than its site and the bytes there are provably padding.
    pub old_room: u64,
    /// The module's replacement symbol.
    pub new_symbol: String,
    /// Runtime address of the replacement.
    pub new_address: u64,
    /// `st_size` of the replacement in the module (its code is
    /// `[new_address, new_address + new_size)`).
    pub new_size: u64,
    /// Runtime code ranges `[start, end)` of the old function's split pieces (`f.cold`,
    /// `f.part.N`): a thread running in one of them is inside the old function.
    pub old_parts: Vec<(u64, u64)>,
}

/// A reference slot, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedSlot {
    /// The manifest's name for the target symbol.
    pub symbol: SymbolSpec,
    /// Runtime address of the slot word in the module.
    pub slot_address: u64,
    /// The value written into it: the symbol's runtime address.
    pub value: u64,
}

/// Everything a patch needs, computed before anything is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// Patch name.
    pub patch: String,
    /// The target's file.
    pub target_file: PathBuf,
    /// The target's load bias.
    pub target_bias: u64,
    /// The symbol table used.
    pub table: SymbolTable,
    /// The separate debug file whose `.symtab` was used (`table` is `DebugFile`).
    pub debug_file: Option<PathBuf>,
    /// Replaced functions, in manifest order.
    pub functions: Vec<ResolvedFunction>,
    /// Slots, in manifest order.
    pub slots: Vec<ResolvedSlot>,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "patch {} resolved against {} (bias {:#x}, {})",
            self.patch,
            self.target_file.display(),
            self.target_bias,
            source_name(self.table, self.debug_file.as_deref())
        )?;
        for func in &self.functions {
            writeln!(
                f,
                "  {} at {:#x} ({} bytes) -> `{}` at {:#x}",
                func.old, func.old_address, func.old_size, func.new_symbol, func.new_address
            )?;
            for (start, end) in &func.old_parts {
                writeln!(f, "    split piece at {start:#x} ({} bytes)", end - start)?;
            }
        }
        for slot in &self.slots {
            writeln!(
                f,
                "  slot {:#x} <- {} = {:#x}",
                slot.slot_address, slot.symbol, slot.value
            )?;
        }
        Ok(())
    }
}

/// Where symbols came from, for people: `.symtab`, `.dynsym`, or the debug file's path.
fn source_name(table: SymbolTable, debug_file: Option<&Path>) -> String {
    match (table, debug_file) {
        (SymbolTable::DebugFile, Some(p)) => format!(".symtab of {}", p.display()),
        (t, _) => t.section_name().to_owned(),
    }
}

/// A piece of a split function (`f.cold`, `f.part.N`): part of `f`'s code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SplitPart {
    /// Its symbol name.
    pub name: String,
    /// Link-time address.
    pub address: u64,
    /// `st_size`.
    pub size: u64,
}

/// Description of one candidate symbol of a target file, for patch authors: the values to
/// put in a `KGPATCH_REPLACE` / `replace!` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SymbolDescription {
    /// Name.
    pub name: String,
    /// `STT_FILE` for a local symbol.
    pub file: Option<String>,
    /// Position among the candidates of this name (and file filter), 0-based.
    pub index: u32,
    /// Symbol type.
    pub kind: SymKind,
    /// Link-time address.
    pub address: u64,
    /// `st_size`.
    pub size: u64,
    /// FNV-1a-64 of the body in the file (`None` when the symbol has no file bytes).
    #[serde(serialize_with = "hex_opt")]
    pub checksum: Option<u64>,
    /// The table it came from.
    pub table: SymbolTable,
    /// The separate debug file of that table (`table` is `DebugFile`).
    pub debug_file: Option<PathBuf>,
    /// The demangled C++ signature, for a mangled name.
    pub demangled: Option<String>,
    /// For a compiler clone (`f.isra.0`, `f.constprop.0`): the name it was cloned from. A
    /// clone is patched by its own name; its callers do not go through the original.
    pub clone_of: Option<String>,
    /// The split pieces of the function, patched and checked with it.
    pub parts: Vec<SplitPart>,
}

fn hex_opt<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(&format_args!("{v:#018x}")),
        None => s.serialize_none(),
    }
}

impl fmt::Display for SymbolDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(d) = &self.demangled {
            write!(f, " [{d}]")?;
        }
        if let Some(c) = &self.clone_of {
            write!(f, " (clone of {c})")?;
        }
        if let Some(file) = &self.file {
            write!(f, " in {file}")?;
        }
        write!(
            f,
            " #{}: {:?} at {:#x}, size {}",
            self.index, self.kind, self.address, self.size
        )?;
        if let Some(sum) = self.checksum {
            write!(f, ", checksum {sum:#018x}")?;
        }
        write!(
            f,
            " ({})",
            source_name(self.table, self.debug_file.as_deref())
        )?;
        for p in &self.parts {
            write!(
                f,
                "; split piece {} at {:#x}, size {}",
                p.name, p.address, p.size
            )?;
        }
        Ok(())
    }
}

/// Lists the symbols of `target` named `symbol` (restricted to the local symbols of `file`
/// when given), with the size and checksum a patch entry must carry, the split pieces of
/// each, and the compiler clones of the name. `symbol` may be a demangled C++ name, with
/// parameters (`ns::C::f(int)`: that overload) or without (`ns::C::f`: every overload).
pub fn describe_symbol(
    target: impl AsRef<Path>,
    symbol: &str,
    file: Option<&str>,
) -> Result<Vec<SymbolDescription>, KmodError> {
    let wanted: HashSet<&str> = [symbol].into_iter().collect();
    let info = read_target(target.as_ref(), Some(&wanted))?;
    let spec = SymbolSpec {
        name: symbol.to_owned(),
        file: file.map(str::to_owned),
        index: None,
    };
    let mut listed = candidates(&info, &spec);
    // Clones of the name (or of a listed overload), each patched by its own name.
    for s in &info.symbols {
        let is_clone_here = names::split_owner(&s.name).is_none()
            && names::is_clone(&s.name)
            && file_ok(s, file)
            && (names::base(&s.name) == symbol
                || listed.iter().any(|c| c.name == names::base(&s.name))
                || s.demangled
                    .as_ref()
                    .is_some_and(|(full, short)| full == symbol || short == symbol));
        if is_clone_here
            && !listed
                .iter()
                .any(|o| o.name == s.name && o.value == s.value)
        {
            listed.push(s);
        }
    }
    let mut out = Vec::with_capacity(listed.len());
    for s in listed {
        let checksum = if s.size > 0 {
            info.read_vaddr(s.value, s.size)?.map(|b| fnv1a64(&b))
        } else {
            None
        };
        let index = out
            .iter()
            .filter(|d: &&SymbolDescription| d.name == s.name)
            .count() as u32;
        out.push(SymbolDescription {
            name: s.name.clone(),
            file: s.file.clone(),
            index,
            kind: s.kind,
            address: s.value,
            size: s.size,
            checksum,
            table: info.table,
            debug_file: info.debug_file.clone(),
            demangled: s.demangled.as_ref().map(|d| d.0.clone()),
            clone_of: names::is_clone(&s.name).then(|| names::base(&s.name).to_owned()),
            parts: split_parts(&info, s)
                .into_iter()
                .map(|p| SplitPart {
                    name: p.name.clone(),
                    address: p.value,
                    size: p.size,
                })
                .collect(),
        });
    }
    Ok(out)
}

fn file_ok(s: &TargetSymbol, want: Option<&str>) -> bool {
    match (want, &s.file) {
        (None, _) => true,
        (Some(w), Some(f)) => file_matches(f, w),
        (Some(_), None) => false,
    }
}

/// The split pieces (`f.cold`, `f.part.N`, `f.part.N.cold`) of function `owner`: functions
/// of the table named after it, in its file when it is local (pieces are always local).
fn split_parts<'a>(info: &'a TargetInfo, owner: &TargetSymbol) -> Vec<&'a TargetSymbol> {
    let mut out: Vec<&TargetSymbol> = Vec::new();
    if owner.kind != SymKind::Function {
        return out;
    }
    for s in &info.symbols {
        if s.kind != SymKind::Function
            || s.size == 0
            || names::split_owner(&s.name) != Some(owner.name.as_str())
            || (owner.local && s.file != owner.file)
        {
            continue;
        }
        if !out.iter().any(|o| o.value == s.value) {
            out.push(s);
        }
    }
    out
}

/// The GNU build-id of an ELF file, for `KGPATCH_TARGET_*_BUILD_ID` / `build_id:`.
pub fn file_build_id(path: impl AsRef<Path>) -> Result<Option<BuildId>, KmodError> {
    Ok(read_target(path.as_ref(), Some(&HashSet::new()))?
        .build_id
        .map(BuildId))
}

fn file_matches(sym_file: &str, wanted: &str) -> bool {
    sym_file == wanted
        || sym_file.ends_with(&format!("/{wanted}"))
        || wanted.ends_with(&format!("/{sym_file}"))
}

/// Symbols named like `spec` (and in its file), in table order, duplicates removed.
fn candidates<'a>(info: &'a TargetInfo, spec: &SymbolSpec) -> Vec<&'a TargetSymbol> {
    let mut out: Vec<&TargetSymbol> = Vec::new();
    for s in &info.symbols {
        if !names::answers_to(&s.name, s.demangled.as_ref(), &spec.name) {
            continue;
        }
        if let Some(want) = &spec.file {
            match &s.file {
                Some(f) if file_matches(f, want) => {}
                _ => continue,
            }
        }
        if !out.iter().any(|o| o.value == s.value && o.size == s.size) {
            out.push(s);
        }
    }
    out
}

enum Lookup<'a> {
    Found(&'a TargetSymbol),
    Missing,
}

fn lookup<'a>(info: &'a TargetInfo, spec: &SymbolSpec, bias: u64) -> Result<Lookup<'a>, KmodError> {
    if spec.file.is_some() && !info.table.has_locals() {
        return Err(KmodError::NeedsSymtab {
            symbol: spec.clone(),
            path: info.path.clone(),
        });
    }
    let found = candidates(info, spec);
    match spec.index {
        Some(i) => Ok(found
            .get(i as usize)
            .map_or(Lookup::Missing, |s| Lookup::Found(s))),
        None => match found.as_slice() {
            [] => Ok(Lookup::Missing),
            [one] => Ok(Lookup::Found(one)),
            many => Err(KmodError::Ambiguous {
                symbol: spec.clone(),
                path: info.path.clone(),
                candidates: many
                    .iter()
                    .map(|s| Candidate {
                        name: (s.name != spec.name).then(|| s.name.clone()),
                        file: s.file.clone(),
                        address: bias.wrapping_add(s.value),
                        size: s.size,
                    })
                    .collect(),
            }),
        },
    }
}

fn kind_name(k: SymKind) -> &'static str {
    match k {
        SymKind::Function => "function",
        SymKind::IndirectFunction => "GNU indirect function (patch its implementations instead)",
        SymKind::Variable => "variable",
        SymKind::ThreadLocal => "thread-local variable (it has no single address)",
        SymKind::NoType => "symbol without type",
    }
}

/// Finds the object the manifest targets among `objects`.
pub fn find_target<'a>(
    manifest: &Manifest,
    objects: &'a [LoadedObject],
) -> Result<&'a LoadedObject, KmodError> {
    match &manifest.target.kind {
        TargetKind::Executable => {
            objects
                .iter()
                .find(|o| o.is_main)
                .ok_or_else(|| KmodError::TargetNotLoaded {
                    target: "the executable".into(),
                })
        }
        TargetKind::Library { soname: want } => {
            let libs = || objects.iter().filter(|o| !o.is_main && !o.name.is_empty());
            if let Some(o) = libs().find(|o| {
                Path::new(&o.name)
                    .file_name()
                    .is_some_and(|n| n.as_encoded_bytes() == want.as_bytes())
            }) {
                return Ok(o);
            }
            // Only objects named by a path: the vDSO's name is not a file to open.
            for o in libs().filter(|o| o.name.contains('/')) {
                if let Ok(Some(name)) = soname(&o.file) {
                    if &name == want {
                        return Ok(o);
                    }
                }
            }
            Err(KmodError::TargetNotLoaded {
                target: format!("the library {want}"),
            })
        }
    }
}

/// Resolves a module against the objects of a process, the module itself being loaded with
/// bias `module_bias`. Checks everything, writes nothing.
pub fn resolve_against(
    module: &ModuleFile,
    module_bias: u64,
    objects: &[LoadedObject],
    opts: ResolveOptions,
) -> Result<Resolved, KmodError> {
    let manifest = &module.manifest;
    let target = find_target(manifest, objects)?;
    let wanted: HashSet<&str> = manifest
        .functions
        .iter()
        .map(|f| f.old.name.as_str())
        .chain(manifest.references.iter().map(|r| r.symbol.name.as_str()))
        .collect();
    let info = read_target(&target.file, Some(&wanted))?;
    let memory_id = target.build_id.clone().map(BuildId);
    let file_id = info.build_id.clone().map(BuildId);
    if memory_id.is_some() && memory_id != file_id {
        return Err(KmodError::FileNotLoadedImage {
            path: info.path.clone(),
            file: file_id,
            memory: memory_id,
        });
    }
    if let Some(expected) = &manifest.target.build_id {
        let found = memory_id.or(file_id);
        if found.as_ref() != Some(expected) {
            return Err(KmodError::BuildIdMismatch {
                path: info.path.clone(),
                expected: expected.clone(),
                found,
            });
        }
    }
    let bias = target.bias;
    let table = match info.table {
        SymbolTable::Dynsym => ".dynsym (the file is stripped and no matching separate debug file was found under KGPATCH_DEBUG_DIRS or /usr/lib/debug)",
        t => t.section_name(),
    };
    let runtime = |s: &TargetSymbol| {
        let start = bias.wrapping_add(s.value);
        (start, start.wrapping_add(s.size))
    };

    let mut functions = Vec::with_capacity(manifest.functions.len());
    for entry in &manifest.functions {
        let spec = &entry.old;
        let sym = match lookup(&info, spec, bias)? {
            Lookup::Found(s) => s,
            Lookup::Missing => {
                return Err(KmodError::MissingFunction {
                    symbol: spec.clone(),
                    table,
                    path: info.path.clone(),
                })
            }
        };
        if sym.kind != SymKind::Function {
            return Err(KmodError::WrongKind {
                symbol: spec.clone(),
                path: info.path.clone(),
                expected: "function",
                found: kind_name(sym.kind),
            });
        }
        match entry.expected_size {
            Some(expected) if expected != sym.size => {
                return Err(KmodError::SizeMismatch {
                    symbol: spec.clone(),
                    path: info.path.clone(),
                    expected,
                    found: sym.size,
                })
            }
            None if !opts.allow_unchecked => {
                return Err(KmodError::Unchecked {
                    symbol: spec.clone(),
                    what: "size",
                })
            }
            _ => {}
        }
        let body = match sym.size {
            0 => None,
            n => info.read_vaddr(sym.value, n)?,
        };
        let Some(body) = body else {
            return Err(KmodError::BodyNotInFile {
                symbol: spec.clone(),
                path: info.path.clone(),
                address: sym.value,
                size: sym.size,
            });
        };
        match entry.checksum {
            Some(expected) => {
                let found = fnv1a64(&body);
                if found != expected {
                    return Err(KmodError::ChecksumMismatch {
                        symbol: spec.clone(),
                        path: info.path.clone(),
                        expected,
                        found,
                    });
                }
            }
            None if !opts.allow_unchecked => {
                return Err(KmodError::Unchecked {
                    symbol: spec.clone(),
                    what: "checksum",
                })
            }
            None => {}
        }
        let (new, new_size) = module.function_export_sized(&entry.new_symbol, "new function")?;
        functions.push(ResolvedFunction {
            old: spec.clone(),
            old_file: sym.file.clone(),
            old_address: bias.wrapping_add(sym.value),
            old_size: sym.size,
            old_room: sym.room.max(sym.size),
            new_symbol: entry.new_symbol.clone(),
            new_address: module_bias.wrapping_add(new),
            new_size,
            old_parts: split_parts(&info, sym).into_iter().map(runtime).collect(),
        });
    }

    let mut slots = Vec::with_capacity(manifest.references.len());
    for r in &manifest.references {
        let spec = &r.symbol;
        let sym = match lookup(&info, spec, bias)? {
            Lookup::Found(s) => s,
            Lookup::Missing => {
                return Err(KmodError::UnresolvedReference {
                    symbol: spec.clone(),
                    kind: r.kind.to_string(),
                    table,
                    path: info.path.clone(),
                })
            }
        };
        let ok = matches!(
            (r.kind, sym.kind),
            (RefKind::Function | RefKind::Any, SymKind::Function)
                | (RefKind::Variable | RefKind::Any, SymKind::Variable)
                | (RefKind::Any, SymKind::NoType)
        );
        if !ok {
            return Err(KmodError::WrongKind {
                symbol: spec.clone(),
                path: info.path.clone(),
                expected: match r.kind {
                    RefKind::Function => "function",
                    RefKind::Variable => "variable",
                    RefKind::Any => "function or variable",
                },
                found: kind_name(sym.kind),
            });
        }
        slots.push(ResolvedSlot {
            symbol: spec.clone(),
            slot_address: module_bias
                .wrapping_add(module.section_vaddr)
                .wrapping_add(r.slot_offset),
            value: bias.wrapping_add(sym.value),
        });
    }
    Ok(Resolved {
        patch: manifest.name.clone(),
        target_file: info.path.clone(),
        target_bias: bias,
        table: info.table,
        debug_file: info.debug_file.clone(),
        functions,
        slots,
    })
}
