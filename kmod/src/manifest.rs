//! The parsed manifest: owned, validated values, printable for humans ([`Display`]) and as
//! JSON (serde).

use std::fmt;

use serde::{Serialize, Serializer};

/// A validated patch-module manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// Manifest format version (currently always [`crate::raw::FORMAT_VERSION`]).
    pub format_version: u16,
    /// Patch name: how `kgpatch revert` and `list` name it.
    pub name: String,
    /// Patch version, free text.
    pub version: String,
    /// One-line description, free text (may be empty).
    pub description: String,
    /// The object whose functions the patch replaces.
    pub target: Target,
    /// Replaced functions, in manifest order.
    pub functions: Vec<FunctionEntry>,
    /// Reference slots the loader fills, in manifest order.
    pub references: Vec<Reference>,
    /// Optional callbacks, by symbol in the module.
    pub callbacks: Callbacks,
}

/// The object a patch applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Executable or library.
    #[serde(flatten)]
    pub kind: TargetKind,
    /// GNU build-id the loaded object must carry, when the author pinned one.
    pub build_id: Option<BuildId>,
}

/// Which loaded object a patch applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetKind {
    /// The main executable of the process.
    Executable,
    /// A shared library, matched by its `DT_SONAME` or by the base name of its path.
    Library {
        /// e.g. `libfoo.so.1`.
        soname: String,
    },
}

/// A GNU build-id (the `NT_GNU_BUILD_ID` note's descriptor bytes). Prints as hex.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BuildId(pub Vec<u8>);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildId({self})")
    }
}

impl Serialize for BuildId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Names one symbol of the target, possibly a local (`static`) one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SymbolSpec {
    /// Symbol name exactly as in the symbol table (e.g. `helper`, `helper.constprop.0`).
    pub name: String,
    /// For a local symbol: the `STT_FILE` name it follows in `.symtab` (e.g. `a.c`). Matches
    /// the file symbol exactly or by base name.
    pub file: Option<String>,
    /// Position among the symbols of that name (and file), in symbol-table order, 0-based.
    pub index: Option<u32>,
}

impl fmt::Display for SymbolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.name)?;
        if let Some(file) = &self.file {
            write!(f, " in {file}")?;
        }
        if let Some(i) = self.index {
            write!(f, " #{i}")?;
        }
        Ok(())
    }
}

/// One replaced function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FunctionEntry {
    /// The function in the target.
    pub old: SymbolSpec,
    /// Expected `st_size` of the old function; `None` = not checked.
    pub expected_size: Option<u64>,
    /// Expected [`crate::checksum`] of the old body in the target's file; `None` = not checked.
    #[serde(serialize_with = "hex_opt")]
    pub checksum: Option<u64>,
    /// The replacement, by its exported symbol in the module.
    pub new_symbol: String,
}

/// What kind of symbol a reference may bind to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefKind {
    /// A function or a variable.
    Any,
    /// A function (`STT_FUNC`).
    Function,
    /// A variable (`STT_OBJECT`).
    Variable,
}

impl fmt::Display for RefKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefKind::Any => "symbol",
            RefKind::Function => "function",
            RefKind::Variable => "variable",
        })
    }
}

/// One reference slot: a pointer-sized word in the module that the loader sets to the
/// runtime address of a target symbol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reference {
    /// The target symbol.
    pub symbol: SymbolSpec,
    /// What it must be.
    pub kind: RefKind,
    /// Offset of the slot word from the start of the manifest section.
    pub slot_offset: u64,
}

/// Optional callbacks, each named by its exported symbol in the module.
///
/// Signatures: `int pre_apply(char *msg, size_t cap)` returns 0 to proceed, or nonzero to
/// veto with a NUL-terminated reason written to `msg`; the others are `void f(void)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Callbacks {
    /// Runs before applying; may veto.
    pub pre_apply: Option<String>,
    /// Runs after the patch is applied.
    pub post_apply: Option<String>,
    /// Runs before reverting.
    pub pre_revert: Option<String>,
    /// Runs after the patch is reverted, before the module is closed.
    pub post_revert: Option<String>,
}

impl Callbacks {
    /// `(role, symbol)` for each callback present.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("pre-apply", &self.pre_apply),
            ("post-apply", &self.post_apply),
            ("pre-revert", &self.pre_revert),
            ("post-revert", &self.post_revert),
        ]
        .into_iter()
        .filter_map(|(role, s)| s.as_deref().map(|s| (role, s)))
    }
}

fn hex_opt<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(&format_args!("{v:#018x}")),
        None => s.serialize_none(),
    }
}

impl Manifest {
    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> String {
        // A `Manifest` holds only strings, integers and options: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "patch {} {}", self.name, self.version)?;
        if !self.description.is_empty() {
            writeln!(f, "  {}", self.description)?;
        }
        match &self.target.kind {
            TargetKind::Executable => write!(f, "target: the executable")?,
            TargetKind::Library { soname } => write!(f, "target: library {soname}")?,
        }
        match &self.target.build_id {
            Some(id) => writeln!(f, " (build-id {id})")?,
            None => writeln!(f, " (any build-id)")?,
        }
        writeln!(f, "replaces {} function(s):", self.functions.len())?;
        for func in &self.functions {
            write!(f, "  {} -> `{}`", func.old, func.new_symbol)?;
            match func.expected_size {
                Some(size) => write!(f, "  size {size}")?,
                None => write!(f, "  size unchecked")?,
            }
            match func.checksum {
                Some(sum) => writeln!(f, ", checksum {sum:#018x}")?,
                None => writeln!(f, ", checksum unchecked")?,
            }
        }
        writeln!(f, "references {} target symbol(s):", self.references.len())?;
        for r in &self.references {
            writeln!(
                f,
                "  {} {} (slot at section offset {:#x})",
                r.kind, r.symbol, r.slot_offset
            )?;
        }
        let mut any = false;
        for (role, sym) in self.callbacks.iter() {
            if !any {
                writeln!(f, "callbacks:")?;
                any = true;
            }
            writeln!(f, "  {role}: `{sym}`")?;
        }
        if !any {
            writeln!(f, "callbacks: none")?;
        }
        Ok(())
    }
}
