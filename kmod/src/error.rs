//! Errors of reading, resolving and loading patch modules: one variant per cause, each
//! message one sentence saying what is wrong and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::manifest::{BuildId, SymbolSpec};
use crate::parse::ManifestError;

/// One symbol that matched an ambiguous lookup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    /// Its symbol name, when it differs from the name asked for (a demangled C++ name
    /// matches every overload, each under its own mangled name).
    pub name: Option<String>,
    /// The `STT_FILE` it follows, if local.
    pub file: Option<String>,
    /// Runtime address (link-time address when resolving a file alone).
    pub address: u64,
    /// `st_size`.
    pub size: u64,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name} ")?;
        }
        match &self.file {
            Some(file) => write!(f, "{file} at {:#x}", self.address),
            None => write!(f, "global at {:#x}", self.address),
        }
    }
}

struct List<'a>(&'a [Candidate]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "#{i} {c}")?;
        }
        Ok(())
    }
}

fn opt_id(id: &Option<BuildId>) -> String {
    match id {
        Some(id) => id.to_string(),
        None => "none".to_owned(),
    }
}

/// Why a patch module cannot be read, resolved, or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmodError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a 64-bit x86-64 ELF file of the expected type.
    #[error("{} is not a usable x86-64 ELF file ({reason}); give the path of a patch module or target built for this machine", path.display())]
    NotElf {
        /// File.
        path: PathBuf,
        /// What `object` or the check said.
        reason: String,
    },
    /// The module has no `.kgpatch` section.
    #[error("{} has no .kgpatch section, so it is not a kgpatch patch module; build it with kgpatch.h (C) or the kgpatch_kmod macros (Rust)", path.display())]
    NoManifest {
        /// File.
        path: PathBuf,
    },
    /// The manifest failed validation.
    #[error("the manifest of {} is invalid: {source}", path.display())]
    BadManifest {
        /// File.
        path: PathBuf,
        /// What is wrong.
        source: ManifestError,
    },
    /// The `.kgpatch` section is not file-backed writable loaded data.
    #[error("the .kgpatch section of {} is not aligned, writable data in a loaded segment outside RELRO, so its slots cannot be filled; build the module with kgpatch.h or the kgpatch_kmod macros", path.display())]
    ManifestNotLoadable {
        /// File.
        path: PathBuf,
    },
    /// A new function or callback is not an exported function of the module.
    #[error("{} does not export the {role} `{symbol}` as a function; define it non-static with default visibility (C) or #[no_mangle] pub extern \"C\" (Rust)", path.display())]
    NotExported {
        /// Module file.
        path: PathBuf,
        /// "new function", "pre-apply", ...
        role: String,
        /// Symbol.
        symbol: String,
    },
    /// The target object is not loaded in this process.
    #[error("the patch targets {target}, which is not loaded in this process; apply it to a process that runs that object")]
    TargetNotLoaded {
        /// "the executable" or the soname.
        target: String,
    },
    /// The loaded target's build-id differs from the one the patch was built for.
    #[error("the loaded target {} has build-id {}, but the patch was built for build-id {expected}; build the patch against this exact binary", path.display(), opt_id(found))]
    BuildIdMismatch {
        /// Target file.
        path: PathBuf,
        /// Build-id in the manifest.
        expected: BuildId,
        /// Build-id of the loaded object.
        found: Option<BuildId>,
    },
    /// The target's file on disk is not the image loaded in memory.
    #[error("the file {} (build-id {}) is not the image loaded in this process (build-id {}); the binary was replaced after the process started, so its symbols cannot be trusted: restart the process or patch the file it runs", path.display(), opt_id(file), opt_id(memory))]
    FileNotLoadedImage {
        /// Target file.
        path: PathBuf,
        /// Build-id of the file.
        file: Option<BuildId>,
        /// Build-id found in memory.
        memory: Option<BuildId>,
    },
    /// A replaced function is not in the target's symbol table.
    #[error("the function {symbol} to replace is not in the {table} of {}; check the name with `nm` (compilers rename statics, e.g. `f.constprop.0`)", path.display())]
    MissingFunction {
        /// Symbol.
        symbol: SymbolSpec,
        /// `.symtab` or `.dynsym`.
        table: &'static str,
        /// Target file.
        path: PathBuf,
    },
    /// A reference's symbol is not in the target's symbol table.
    #[error("the reference to {symbol} cannot be resolved: no such {kind} in the {table} of {}; check the name with `nm`", path.display())]
    UnresolvedReference {
        /// Symbol.
        symbol: SymbolSpec,
        /// "function", "variable" or "symbol".
        kind: String,
        /// `.symtab` or `.dynsym`.
        table: &'static str,
        /// Target file.
        path: PathBuf,
    },
    /// A local symbol (named with a file) was asked of a stripped target.
    #[error("{symbol} names a file, but {} has no .symtab (it is stripped), and no matching separate debug file was found (by build-id or .gnu_debuglink under KGPATCH_DEBUG_DIRS, default /usr/lib/debug), so local symbols cannot be found; install its debug file or patch a build with symbols", path.display())]
    NeedsSymtab {
        /// Symbol.
        symbol: SymbolSpec,
        /// Target file.
        path: PathBuf,
    },
    /// Several symbols match and the manifest does not say which.
    #[error("{symbol} is ambiguous in {}: it matches {}; add the file and/or index to the manifest entry", path.display(), List(candidates))]
    Ambiguous {
        /// Symbol.
        symbol: SymbolSpec,
        /// Target file.
        path: PathBuf,
        /// The matches, in symbol-table order.
        candidates: Vec<Candidate>,
    },
    /// The symbol is of the wrong type (e.g. a variable where a function is replaced).
    #[error("{symbol} in {} is a {found}, not a {expected}; name the right symbol", path.display())]
    WrongKind {
        /// Symbol.
        symbol: SymbolSpec,
        /// Target file.
        path: PathBuf,
        /// What was needed.
        expected: &'static str,
        /// What was found.
        found: &'static str,
    },
    /// The old function's size differs from the manifest's.
    #[error("{symbol} in {} is {found} bytes, but the patch expects {expected}: the target was rebuilt; rebuild the patch against it", path.display())]
    SizeMismatch {
        /// Symbol.
        symbol: SymbolSpec,
        /// Target file.
        path: PathBuf,
        /// Expected size.
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// The old function's checksum differs from the manifest's.
    #[error("{symbol} in {} has checksum {found:#018x}, but the patch expects {expected:#018x}: the target was rebuilt; rebuild the patch against it", path.display())]
    ChecksumMismatch {
        /// Symbol.
        symbol: SymbolSpec,
        /// Target file.
        path: PathBuf,
        /// Expected checksum.
        expected: u64,
        /// Actual checksum.
        found: u64,
    },
    /// The manifest leaves a size or checksum unchecked and the caller did not allow it.
    #[error("the entry for {symbol} has no {what} to check against the target; compute it with kgpatch_kmod::describe_symbol, or allow unchecked entries explicitly")]
    Unchecked {
        /// Symbol.
        symbol: SymbolSpec,
        /// "size" or "checksum".
        what: &'static str,
    },
    /// The old body is not in the file's bytes.
    #[error("the body of {symbol} ({size} bytes at {address:#x}) is not in the file bytes of {}; it cannot be checked or patched", path.display())]
    BodyNotInFile {
        /// Symbol.
        symbol: SymbolSpec,
        /// Target file.
        path: PathBuf,
        /// Link-time address.
        address: u64,
        /// Size.
        size: u64,
    },
    /// `dlopen` failed.
    #[error("dlopen of {} failed: {message}; a module may only use symbols of the libraries it links and must reach target symbols through reference slots", path.display())]
    Dlopen {
        /// Module file.
        path: PathBuf,
        /// `dlerror()`.
        message: String,
    },
    /// The module is already loaded in this process.
    #[error("{} is already loaded in this process; revert and close the loaded copy first, or give this build another file name", path.display())]
    AlreadyLoaded {
        /// Module file.
        path: PathBuf,
    },
    /// `dlclose` failed.
    #[error("dlclose of {} failed: {message}", path.display())]
    Dlclose {
        /// Module file.
        path: PathBuf,
        /// `dlerror()`.
        message: String,
    },
    /// The mapped manifest differs from the file's.
    #[error("the .kgpatch section mapped from {} differs from the file read before dlopen; the file changed while loading, or a constructor of the module wrote into its manifest", path.display())]
    ModuleChanged {
        /// Module file.
        path: PathBuf,
    },
    /// An operation needs the slots filled first.
    #[error("the module {name} is not resolved yet; call resolve() before running its callbacks")]
    NotResolved {
        /// Patch name.
        name: String,
    },
    /// The pre-apply callback vetoed.
    #[error("the pre-apply callback of {name} refused the patch (code {code}): {message}")]
    Vetoed {
        /// Patch name.
        name: String,
        /// Nonzero return value.
        code: i32,
        /// Reason the callback gave.
        message: String,
    },
}

impl KmodError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> KmodError {
        KmodError::Io {
            path: path.to_owned(),
            source,
        }
    }
}
