//! Symbol names the compiler derives from a function's name: the pieces of a split function
//! (`f.cold`, `f.part.0`, `f.part.0.cold`), clones with another calling convention
//! (`f.isra.0`, `f.constprop.0`, `f.lto_priv.0`), and C++ mangled names (`_ZN4shop7Counter4bumpEi`,
//! demangled `shop::Counter::bump(int)`). Pure string work; demangling is `cpp_demangle`'s.
//!
//! A split piece is part of its function: a thread running in `f.cold` is inside `f`. A
//! clone is a function of its own (callers reach it directly, with other arguments): it is
//! listed beside `f` so an author sees it, and patched only by its own name.

use cpp_demangle::{DemangleOptions, Symbol};

/// `name` without the compiler suffixes (everything from the first `.`): what the source
/// called it. A C++ mangled name never holds a `.`, and neither does a C identifier.
pub(crate) fn base(name: &str) -> &str {
    name.split_once('.').map_or(name, |(b, _)| b)
}

/// The function a split piece belongs to: `f.cold` -> `f`, `f.cold.1` -> `f`,
/// `f.part.0` -> `f`, `f.part.0.cold` -> `f`, `f.isra.0.cold` -> `f.isra.0` (the cold part of
/// the clone). `None` when `name` is not a split piece.
pub(crate) fn split_owner(name: &str) -> Option<&str> {
    let mut cur = name;
    let mut stripped = false;
    loop {
        let next = strip_piece(cur);
        match next {
            Some(n) if !n.is_empty() => {
                cur = n;
                stripped = true;
            }
            _ => break,
        }
    }
    stripped.then_some(cur)
}

/// One trailing `.cold`, `.cold.N` or `.part.N` removed.
fn strip_piece(name: &str) -> Option<&str> {
    if let Some(rest) = name.strip_suffix(".cold") {
        return Some(rest);
    }
    let (rest, n) = name.rsplit_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.strip_suffix(".cold")
        .or_else(|| rest.strip_suffix(".part"))
}

/// Whether `name` is a clone of the function `base(name)` (`.isra`, `.constprop`, ...),
/// and not merely a split piece of it.
pub(crate) fn is_clone(name: &str) -> bool {
    let owner = split_owner(name).unwrap_or(name);
    owner != base(owner)
}

/// The demangled forms of a C++ name (its compiler suffixes are not demangled): the full
/// signature (`shop::Counter::bump(int)`) and the name without parameters
/// (`shop::Counter::bump`). `None` for a name that is not a mangled C++ name.
pub(crate) fn demangle(name: &str) -> Option<(String, String)> {
    let b = base(name);
    if !b.starts_with("_Z") {
        return None;
    }
    let sym = Symbol::new(b.as_bytes()).ok()?;
    let full = sym.demangle(&DemangleOptions::new()).ok()?;
    let short = sym
        .demangle(&DemangleOptions::new().no_params().no_return_type())
        .ok()?;
    Some((full, short))
}

/// Whether a name a user gave is a demangled C++ name (it must be matched by demangling).
pub(crate) fn looks_demangled(name: &str) -> bool {
    name.contains("::") || name.contains('(')
}

/// Whether symbol `name` (with `demangled` its demangled forms) answers to the wanted name
/// `q`: equal, or `q` is its demangled signature, or `q` its demangled name without
/// parameters (which every overload answers to). Compiler suffixes count: a clone answers
/// only to its own mangled name.
pub(crate) fn answers_to(name: &str, demangled: Option<&(String, String)>, q: &str) -> bool {
    if name == q {
        return true;
    }
    if base(name) != name || !looks_demangled(q) {
        return false;
    }
    demangled.is_some_and(|(full, short)| full == q || short == q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_pieces_and_clones() {
        assert_eq!(split_owner("f.cold"), Some("f"));
        assert_eq!(split_owner("f.cold.3"), Some("f"));
        assert_eq!(split_owner("f.part.0"), Some("f"));
        assert_eq!(split_owner("f.part.0.cold"), Some("f"));
        assert_eq!(split_owner("f.isra.0.cold"), Some("f.isra.0"));
        assert_eq!(split_owner("f.isra.0"), None);
        assert_eq!(split_owner("f"), None);
        assert_eq!(split_owner(".cold"), None);
        assert!(is_clone("f.isra.0"));
        assert!(is_clone("f.constprop.0.cold"));
        assert!(!is_clone("f.part.1"));
        assert!(!is_clone("f"));
        assert_eq!(base("_ZL6helperPii.constprop.0.isra.0"), "_ZL6helperPii");
    }

    #[test]
    fn demangled_names() {
        let d = demangle("_ZN4shop7Counter4bumpEi").unwrap();
        assert_eq!(d.0, "shop::Counter::bump(int)");
        assert_eq!(d.1, "shop::Counter::bump");
        assert!(answers_to(
            "_ZN4shop7Counter4bumpEi",
            Some(&d),
            "shop::Counter::bump"
        ));
        assert!(answers_to(
            "_ZN4shop7Counter4bumpEi",
            Some(&d),
            "shop::Counter::bump(int)"
        ));
        assert!(!answers_to(
            "_ZN4shop7Counter4bumpEi",
            Some(&d),
            "shop::Counter::bump(long)"
        ));
        assert!(!answers_to("_ZN4shop7Counter4bumpEi", Some(&d), "bump"));
        assert_eq!(demangle("main"), None);
    }
}
