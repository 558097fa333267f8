//! Authoring helper until the `kgpatch` CLI wires these in:
//!
//! ```text
//! cargo run -p kgpatch-kmod --example kmod-tool -- inspect fix.so [--json]
//! cargo run -p kgpatch-kmod --example kmod-tool -- describe <target> <symbol> [file.c]
//! cargo run -p kgpatch-kmod --example kmod-tool -- build-id <target>
//! cargo run -p kgpatch-kmod --example kmod-tool -- check fix.so <target>
//! ```
//!
//! `check` resolves the module against the target *file* (link-time addresses, nothing
//! loaded): every symbol, size, checksum and build-id the live loader will check.
//!
//! `describe` prints each candidate with the size and checksum a patch entry must carry, and
//! the matching `KGPATCH_REPLACE*` / `replace!` line.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["inspect", path] => kgpatch_kmod::inspect(path).map(|m| print!("{m}")),
        ["inspect", path, "--json"] => {
            kgpatch_kmod::inspect(path).map(|m| println!("{}", m.to_json()))
        }
        ["describe", target, symbol] => describe(target, symbol, None),
        ["describe", target, symbol, file] => describe(target, symbol, Some(file)),
        ["check", module, target] => check(module, target),
        ["build-id", target] => kgpatch_kmod::file_build_id(target).map(|id| match id {
            Some(id) => println!("{id}"),
            None => println!("(no build-id)"),
        }),
        _ => {
            eprintln!(
                "usage: kmod-tool inspect <module.so> [--json]\n       \
                 kmod-tool describe <target> <symbol> [file]\n       \
                 kmod-tool build-id <target>\n       \
                 kmod-tool check <module.so> <target>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn describe(
    target: &str,
    symbol: &str,
    filter: Option<&str>,
) -> Result<(), kgpatch_kmod::KmodError> {
    let found = kgpatch_kmod::describe_symbol(target, symbol, filter)?;
    // With several candidates, an index counts among those matching the same file filter.
    let filter = filter.unwrap_or("");
    if found.is_empty() {
        println!("no symbol {symbol} in {target}");
    }
    let several = found.len() > 1;
    for d in &found {
        println!("{d}");
        let Some(sum) = d.checksum else { continue };
        let file = d.file.as_deref().unwrap_or("");
        let c = match (several, file.is_empty()) {
            (false, true) => format!(
                "KGPATCH_REPLACE(\"{}\", new_fn, {}, {sum:#x}ULL);",
                d.name, d.size
            ),
            (false, false) => format!(
                "KGPATCH_REPLACE_LOCAL(\"{}\", \"{file}\", new_fn, {}, {sum:#x}ULL);",
                d.name, d.size
            ),
            (true, _) => format!(
                "KGPATCH_REPLACE_NTH(\"{}\", \"{filter}\", {}, new_fn, {}, {sum:#x}ULL);",
                d.name, d.index, d.size
            ),
        };
        let mut rust = format!("replace!(old = \"{}\", ", d.name);
        let rust_file = if several { filter } else { file };
        if !rust_file.is_empty() {
            rust += &format!("file = \"{rust_file}\", ");
        }
        if several {
            rust += &format!("index = {}, ", d.index);
        }
        rust += &format!("new = new_fn, size = {}, checksum = {sum:#x});", d.size);
        println!("    C:    {c}\n    Rust: {rust}");
    }
    Ok(())
}

fn check(module: &str, target: &str) -> Result<(), kgpatch_kmod::KmodError> {
    let module = kgpatch_kmod::ModuleFile::read(module)?;
    let object = kgpatch_kmod::LoadedObject {
        name: target.to_owned(),
        file: target.into(),
        bias: 0,
        is_main: module.manifest.target.kind == kgpatch_kmod::TargetKind::Executable,
        build_id: kgpatch_kmod::file_build_id(target)?.map(|b| b.0),
    };
    let resolved = kgpatch_kmod::resolve_against(
        &module,
        0,
        &[object],
        kgpatch_kmod::ResolveOptions::default(),
    )?;
    print!("{resolved}");
    println!("ok: every entry resolves and matches (addresses are link-time)");
    Ok(())
}
