//! Reading ELF files with `object`: a target's symbols (with the `STT_FILE` each local
//! symbol follows), build-id, soname and loadable segments; a module's manifest section and
//! exported symbols. Files are read lazily through `object::ReadCache`, so a large target
//! costs its headers and symbol tables, not its whole size.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader, SectionHeader, Sym};
use object::read::ReadCache;
use object::{Endianness, Object, ObjectSection};
use serde::Serialize;

use crate::error::KmodError;
use crate::manifest::Manifest;
use crate::parse::parse_manifest;
use crate::raw;
use crate::{debugfile, names};

/// Which symbol table a lookup used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SymbolTable {
    /// The full `.symtab` (locals included).
    Symtab,
    /// Only the dynamic `.dynsym` (the file is stripped): exported symbols only.
    Dynsym,
    /// The `.symtab` of a separate debug file matched to the stripped file by build-id or
    /// `.gnu_debuglink` CRC (its path is given beside).
    DebugFile,
}

impl SymbolTable {
    /// `.symtab` or `.dynsym`.
    pub fn section_name(self) -> &'static str {
        match self {
            SymbolTable::Symtab => ".symtab",
            SymbolTable::Dynsym => ".dynsym",
            SymbolTable::DebugFile => ".symtab of a separate debug file",
        }
    }

    /// Whether the table names local (static) symbols.
    pub fn has_locals(self) -> bool {
        self != SymbolTable::Dynsym
    }
}

/// The ELF type of a symbol, as far as patching cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SymKind {
    /// `STT_FUNC`.
    Function,
    /// `STT_GNU_IFUNC`: a resolver, not the function.
    IndirectFunction,
    /// `STT_OBJECT` or `STT_COMMON`.
    Variable,
    /// `STT_TLS`: per-thread, has no single address.
    ThreadLocal,
    /// `STT_NOTYPE` (assembler labels).
    NoType,
}

/// One defined symbol of a target file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetSymbol {
    /// Name.
    pub name: String,
    /// The `STT_FILE` this local symbol follows; `None` for globals.
    pub file: Option<String>,
    /// `STB_LOCAL`.
    pub local: bool,
    /// Type.
    pub kind: SymKind,
    /// `st_value`: link-time address.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// Bytes from `value` to the next symbol of its section (at or after `value + size`) or
    /// the section's end: the function and the alignment padding after it. Equal to `size`
    /// when the table is `.dynsym` (unnamed static functions may lie in between) or the
    /// section is unknown.
    pub room: u64,
    /// Demangled forms of a C++ name (full signature, and without parameters).
    #[serde(skip)]
    pub(crate) demangled: Option<(String, String)>,
}

/// A `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub flags: u32,
}

impl LoadSegment {
    /// File offset of `[vaddr, vaddr+len)` when it lies entirely in this segment's file bytes.
    fn file_offset(&self, vaddr: u64, len: u64) -> Option<u64> {
        let end = vaddr.checked_add(len)?;
        let seg_end = self.vaddr.checked_add(self.filesz)?;
        (vaddr >= self.vaddr && end <= seg_end).then(|| self.offset + (vaddr - self.vaddr))
    }
}

/// What the resolver needs from a target file.
#[derive(Clone, Debug)]
pub(crate) struct TargetInfo {
    pub path: PathBuf,
    pub build_id: Option<Vec<u8>>,
    pub table: SymbolTable,
    /// The separate debug file the symbols came from (`table` is `DebugFile`).
    pub debug_file: Option<PathBuf>,
    /// Defined symbols among the wanted names, in table order.
    pub symbols: Vec<TargetSymbol>,
    pub loads: Vec<LoadSegment>,
}

impl TargetInfo {
    /// The `len` bytes at link-time address `vaddr`, from the file.
    pub fn read_vaddr(&self, vaddr: u64, len: u64) -> Result<Option<Vec<u8>>, KmodError> {
        let Some(offset) = self.loads.iter().find_map(|s| s.file_offset(vaddr, len)) else {
            return Ok(None);
        };
        let file = File::open(&self.path).map_err(|e| KmodError::io(&self.path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| KmodError::io(&self.path, e))?
            .len();
        // A corrupt segment table must not make us allocate more than the file holds.
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Ok(None);
        }
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| KmodError::io(&self.path, e))?;
        Ok(Some(buf))
    }
}

fn open(path: &Path) -> Result<ReadCache<File>, KmodError> {
    let file = File::open(path).map_err(|e| KmodError::io(path, e))?;
    Ok(ReadCache::new(file))
}

fn parse<'a>(
    path: &Path,
    cache: &'a ReadCache<File>,
) -> Result<ElfFile64<'a, Endianness, &'a ReadCache<File>>, KmodError> {
    let elf = ElfFile64::<Endianness, _>::parse(cache).map_err(|e| KmodError::NotElf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let machine = elf.elf_header().e_machine(elf.endian());
    if machine != elf::EM_X86_64 {
        return Err(KmodError::NotElf {
            path: path.to_owned(),
            reason: format!("machine {machine} is not x86-64"),
        });
    }
    Ok(elf)
}

fn loads<'a>(elf: &ElfFile64<'a, Endianness, &'a ReadCache<File>>) -> Vec<LoadSegment> {
    let e = elf.endian();
    elf.elf_program_headers()
        .iter()
        .filter(|p| p.p_type(e) == elf::PT_LOAD)
        .map(|p| LoadSegment {
            vaddr: p.p_vaddr(e),
            memsz: p.p_memsz(e),
            offset: p.p_offset(e),
            filesz: p.p_filesz(e),
            flags: p.p_flags(e),
        })
        .collect()
}

fn bad(path: &Path, e: object::Error) -> KmodError {
    KmodError::NotElf {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Whether a symbol named `name` is kept for the wanted names: its own name, the name it
/// was derived from (`f` for `f.cold`, `f.part.0`, `f.isra.0`), or, for a wanted demangled
/// C++ name, its demangled forms (computed into `demangled`).
fn keep(
    name: &str,
    wanted: Option<&HashSet<&str>>,
    demangled: &mut Option<(String, String)>,
) -> bool {
    let Some(w) = wanted else {
        *demangled = names::demangle(name);
        return true;
    };
    if w.contains(name) || w.contains(names::base(name)) {
        *demangled = names::demangle(name);
        return true;
    }
    if !names::base(name).starts_with("_Z") || !w.iter().any(|q| names::looks_demangled(q)) {
        return false;
    }
    let Some(d) = names::demangle(name) else {
        return false;
    };
    let hit = w.iter().any(|q| *q == d.0 || *q == d.1);
    if hit {
        *demangled = Some(d);
    }
    hit
}

/// Reads a target file: build-id, the symbol table to use (`.symtab` when present and
/// non-empty; else the `.symtab` of its separate debug file, found and checked as
/// [`crate::debugfile`] says; else `.dynsym`), and its defined symbols whose name is in
/// `wanted` (all when `None`), with the pieces and clones derived from those names.
pub(crate) fn read_target(
    path: &Path,
    wanted: Option<&HashSet<&str>>,
) -> Result<TargetInfo, KmodError> {
    let cache = open(path)?;
    let elf = parse(path, &cache)?;
    let build_id = elf
        .build_id()
        .map_err(|err| bad(path, err))?
        .map(<[u8]>::to_vec);
    let loads = loads(&elf);
    if !elf.elf_symbol_table().is_empty() {
        let symbols = read_symbols(path, &elf, false, wanted)?;
        return Ok(TargetInfo {
            path: path.to_owned(),
            build_id,
            table: SymbolTable::Symtab,
            debug_file: None,
            symbols,
            loads,
        });
    }
    // No names wanted (the build-id alone was asked for): no debug file to look for.
    let search = wanted.is_none_or(|w| !w.is_empty());
    let debug = match search {
        true => find_debug_file(path, &elf, build_id.as_deref())?,
        false => None,
    };
    if let Some(debug) = debug {
        let dcache = open(&debug)?;
        let delf = parse(&debug, &dcache)?;
        if !delf.elf_symbol_table().is_empty() {
            let symbols = read_symbols(&debug, &delf, false, wanted)?;
            return Ok(TargetInfo {
                path: path.to_owned(),
                build_id,
                table: SymbolTable::DebugFile,
                debug_file: Some(debug),
                symbols,
                loads,
            });
        }
    }
    let symbols = read_symbols(path, &elf, true, wanted)?;
    Ok(TargetInfo {
        path: path.to_owned(),
        build_id,
        table: SymbolTable::Dynsym,
        debug_file: None,
        symbols,
        loads,
    })
}

/// The separate debug file of a stripped `binary`, if one is found whose build-id (by the
/// `.build-id` path) or CRC32 (by `.gnu_debuglink`) matches. A candidate that does not
/// match is passed over: its addresses could belong to another build.
fn find_debug_file<'a>(
    binary: &Path,
    elf: &ElfFile64<'a, Endianness, &'a ReadCache<File>>,
    build_id: Option<&[u8]>,
) -> Result<Option<PathBuf>, KmodError> {
    let dirs = debugfile::debug_dirs();
    if let Some(id) = build_id {
        for dir in &dirs {
            let Some(p) = debugfile::build_id_path(dir, id) else {
                continue;
            };
            if !p.is_file() {
                continue;
            }
            let Ok(c) = open(&p) else { continue };
            let Ok(d) = parse(&p, &c) else { continue };
            if d.build_id().ok().flatten() == Some(id) {
                return Ok(Some(p));
            }
        }
    }
    let Some(section) = elf.section_by_name(".gnu_debuglink") else {
        return Ok(None);
    };
    let data = section.data().map_err(|err| bad(binary, err))?;
    let little = elf.endian() == Endianness::Little;
    let Some((link, crc)) = debugfile::parse_debuglink(data, little) else {
        return Ok(None);
    };
    for p in debugfile::debuglink_paths(binary, &link, &dirs) {
        if !p.is_file() || debugfile::file_crc32(&p).ok() != Some(crc) {
            continue;
        }
        // A debug file that names a build-id must name the binary's.
        let Ok(c) = open(&p) else { continue };
        let Ok(d) = parse(&p, &c) else { continue };
        match (d.build_id().ok().flatten(), build_id) {
            (Some(a), Some(b)) if a != b => continue,
            _ => return Ok(Some(p)),
        }
    }
    Ok(None)
}

/// The defined symbols of one table of `elf` (`.dynsym` when `dynamic`) that [`keep`]
/// keeps, with `room` computed when the table has every symbol's start.
fn read_symbols<'a>(
    path: &Path,
    elf: &ElfFile64<'a, Endianness, &'a ReadCache<File>>,
    dynamic: bool,
    wanted: Option<&HashSet<&str>>,
) -> Result<Vec<TargetSymbol>, KmodError> {
    let e = elf.endian();
    let syms = if dynamic {
        elf.elf_dynamic_symbol_table()
    } else {
        elf.elf_symbol_table()
    };
    // Read the whole string table once: looking names up one by one through the lazy
    // reader would cost a read per symbol.
    let strtab: &[u8] = if syms.is_empty() {
        &[]
    } else {
        elf.elf_section_table()
            .section(syms.string_section())
            .and_then(|s| s.data(e, elf.data()))
            .map_err(|err| bad(path, err))?
    };
    let mut symbols = Vec::new();
    // (section, value) of every defined symbol, and each kept symbol's section: for `room`.
    let mut starts: Vec<(usize, u64)> = Vec::new();
    let mut sections_of: Vec<usize> = Vec::new();
    let mut file: Option<String> = None;
    for sym in syms.iter().skip(1) {
        let shndx = usize::from(sym.st_shndx(e));
        if sym.st_shndx(e) != elf::SHN_UNDEF && shndx < usize::from(elf::SHN_LORESERVE) {
            starts.push((shndx, sym.st_value(e)));
        }
        let st_type = sym.st_type();
        let name = name_at(strtab, sym.st_name(e)).ok_or_else(|| KmodError::NotElf {
            path: path.to_owned(),
            reason: "a symbol name lies outside its string table".into(),
        })?;
        if st_type == elf::STT_FILE {
            file = Some(String::from_utf8_lossy(name).into_owned());
            continue;
        }
        let local = sym.st_bind() == elf::STB_LOCAL;
        if name.is_empty() || sym.st_shndx(e) == elf::SHN_UNDEF {
            continue;
        }
        let Ok(name) = core::str::from_utf8(name) else {
            continue;
        };
        let mut demangled = None;
        if !keep(name, wanted, &mut demangled) {
            continue;
        }
        let kind = match st_type {
            elf::STT_FUNC => SymKind::Function,
            elf::STT_GNU_IFUNC => SymKind::IndirectFunction,
            elf::STT_OBJECT | elf::STT_COMMON => SymKind::Variable,
            elf::STT_TLS => SymKind::ThreadLocal,
            elf::STT_NOTYPE => SymKind::NoType,
            _ => continue,
        };
        symbols.push(TargetSymbol {
            name: name.to_owned(),
            file: if local { file.clone() } else { None },
            local,
            kind,
            value: sym.st_value(e),
            size: sym.st_size(e),
            room: sym.st_size(e),
            demangled,
        });
        sections_of.push(shndx);
    }
    if !dynamic {
        starts.sort_unstable();
        let sections = elf.elf_section_table();
        for (s, &shndx) in symbols.iter_mut().zip(&sections_of) {
            let Ok(section) = sections.section(object::SectionIndex(shndx)) else {
                continue;
            };
            let (addr, len) = (section.sh_addr(e), section.sh_size(e));
            let Some(body_end) = s.value.checked_add(s.size) else {
                continue;
            };
            let Some(section_end) = addr.checked_add(len) else {
                continue;
            };
            if s.value < addr || body_end > section_end {
                continue;
            }
            let from = starts.partition_point(|&(sec, v)| (sec, v) < (shndx, body_end));
            let next = starts
                .get(from)
                .filter(|&&(sec, _)| sec == shndx)
                .map_or(section_end, |&(_, v)| v.min(section_end));
            s.room = next - s.value;
        }
    }
    Ok(symbols)
}

/// The NUL-terminated string at `offset` of a string table.
fn name_at(strtab: &[u8], offset: u32) -> Option<&[u8]> {
    let rest = strtab.get(offset as usize..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..len])
}

/// The `DT_SONAME` of a shared object, if any.
pub(crate) fn soname(path: &Path) -> Result<Option<String>, KmodError> {
    let cache = open(path)?;
    let elf = parse(path, &cache)?;
    let e = elf.endian();
    let data = elf.data();
    let sections = elf.elf_section_table();
    let Some((dyns, strtab)) = sections.dynamic(e, data).map_err(|err| bad(path, err))? else {
        return Ok(None);
    };
    let strings = sections
        .strings(e, data, strtab)
        .map_err(|err| bad(path, err))?;
    for d in dyns {
        if d.tag32(e) == Some(elf::DT_SONAME) {
            let offset = u32::try_from(d.d_val(e)).map_err(|_| KmodError::NotElf {
                path: path.to_owned(),
                reason: "DT_SONAME offset out of range".into(),
            })?;
            let name = strings.get(offset).map_err(|()| KmodError::NotElf {
                path: path.to_owned(),
                reason: "DT_SONAME offset out of range".into(),
            })?;
            return Ok(Some(String::from_utf8_lossy(name).into_owned()));
        }
    }
    Ok(None)
}

/// A symbol the module exports in `.dynsym`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Export {
    pub value: u64,
    pub size: u64,
    pub kind: u8,
}

/// A patch module read from its file, with the manifest validated. Nothing of it has run.
#[derive(Clone, Debug)]
pub struct ModuleFile {
    /// Path it was read from.
    pub path: PathBuf,
    /// The validated manifest.
    pub manifest: Manifest,
    /// Link-time address of the `.kgpatch` section.
    pub section_vaddr: u64,
    /// The section's bytes as in the file (every slot zero).
    pub section_bytes: Vec<u8>,
    /// The module's own GNU build-id, if it has one.
    pub build_id: Option<Vec<u8>>,
    pub(crate) exports: HashMap<String, Export>,
    pub(crate) loads: Vec<LoadSegment>,
}

impl ModuleFile {
    /// Reads and validates a patch module: an x86-64 ELF shared object with a well-formed
    /// `.kgpatch` section in a writable loaded segment, exporting every new function and
    /// callback the manifest names. Runs none of the module's code.
    pub fn read(path: impl AsRef<Path>) -> Result<ModuleFile, KmodError> {
        let path = path.as_ref();
        let cache = open(path)?;
        let elf = parse(path, &cache)?;
        let e = elf.endian();
        if elf.elf_header().e_type(e) != elf::ET_DYN {
            return Err(KmodError::NotElf {
                path: path.to_owned(),
                reason: "not a shared object (ET_DYN)".into(),
            });
        }
        let section =
            elf.section_by_name(raw::SECTION_NAME)
                .ok_or_else(|| KmodError::NoManifest {
                    path: path.to_owned(),
                })?;
        let size = section.size();
        if size > raw::MAX_SECTION_SIZE {
            return Err(KmodError::BadManifest {
                path: path.to_owned(),
                source: crate::ManifestError::SectionTooLarge { size },
            });
        }
        let bytes = section.data().map_err(|err| bad(path, err))?.to_vec();
        let manifest = parse_manifest(&bytes).map_err(|source| KmodError::BadManifest {
            path: path.to_owned(),
            source,
        })?;
        let vaddr = section.address();
        let loads = loads(&elf);
        let header = section.elf_section_header();
        let writable = header.sh_flags(e) & u64::from(elf::SHF_WRITE) != 0;
        let in_rw_load = loads.iter().any(|s| {
            s.flags & elf::PF_W != 0 && s.file_offset(vaddr, bytes.len() as u64).is_some()
        });
        // PT_GNU_RELRO is made read-only after relocation: a slot there could not be written.
        let end = vaddr.saturating_add(bytes.len() as u64);
        let in_relro = elf.elf_program_headers().iter().any(|p| {
            p.p_type(e) == elf::PT_GNU_RELRO
                && vaddr < p.p_vaddr(e).saturating_add(p.p_memsz(e))
                && p.p_vaddr(e) < end
        });
        if header.sh_type(e) != elf::SHT_PROGBITS
            || !writable
            || !in_rw_load
            || in_relro
            || vaddr % 8 != 0
        {
            return Err(KmodError::ManifestNotLoadable {
                path: path.to_owned(),
            });
        }
        let mut exports = HashMap::new();
        let dynsym = elf.elf_dynamic_symbol_table();
        for sym in dynsym.iter().skip(1) {
            if sym.st_shndx(e) == elf::SHN_UNDEF || sym.st_bind() == elf::STB_LOCAL {
                continue;
            }
            let Ok(name) = sym.name(e, dynsym.strings()) else {
                continue;
            };
            let Ok(name) = core::str::from_utf8(name) else {
                continue;
            };
            exports.insert(
                name.to_owned(),
                Export {
                    value: sym.st_value(e),
                    size: sym.st_size(e),
                    kind: sym.st_type(),
                },
            );
        }
        let build_id = elf
            .build_id()
            .map_err(|err| bad(path, err))?
            .map(<[u8]>::to_vec);
        let module = ModuleFile {
            path: path.to_owned(),
            manifest,
            section_vaddr: vaddr,
            section_bytes: bytes,
            build_id,
            exports,
            loads,
        };
        for f in &module.manifest.functions {
            module.function_export(&f.new_symbol, "new function")?;
        }
        for (role, sym) in module.manifest.callbacks.iter() {
            module.function_export(sym, role)?;
        }
        Ok(module)
    }

    /// Link-time address of an exported function of the module, checked to be a defined
    /// function inside an executable loaded segment.
    pub(crate) fn function_export(&self, symbol: &str, role: &str) -> Result<u64, KmodError> {
        self.function_export_sized(symbol, role)
            .map(|(value, _)| value)
    }

    /// Like `function_export`, with the function's `st_size`.
    pub(crate) fn function_export_sized(
        &self,
        symbol: &str,
        role: &str,
    ) -> Result<(u64, u64), KmodError> {
        let not = || KmodError::NotExported {
            path: self.path.clone(),
            role: role.to_owned(),
            symbol: symbol.to_owned(),
        };
        let export = self.exports.get(symbol).ok_or_else(not)?;
        let in_text = self.loads.iter().any(|s| {
            s.flags & elf::PF_X != 0 && s.file_offset(export.value, export.size.max(1)).is_some()
        });
        if export.kind != elf::STT_FUNC || !in_text {
            return Err(not());
        }
        Ok((export.value, export.size))
    }
}

/// Reads the manifest of a patch module file, validated, without running any of its code.
/// The CLI's `kgpatch inspect` prints it with `Display` or [`Manifest::to_json`].
pub fn inspect(path: impl AsRef<Path>) -> Result<Manifest, KmodError> {
    ModuleFile::read(path).map(|m| m.manifest)
}
