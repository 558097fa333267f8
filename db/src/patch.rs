//! Patch modules for the database servers: sizes and checksums from `kgpatch describe` of
//! the installed binary (so the module matches whatever build Debian ships), compiled with
//! the kgpatch C header.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run, Error};

/// A function of a binary as `kgpatch describe` reports it.
#[derive(Clone, Debug)]
pub struct Described {
    /// The symbol.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its checksum, as the C literal `describe` prints (`0x...ULL`).
    pub checksum: String,
}

/// `kgpatch describe <binary> <name>`, for the first (or only) function of that name.
pub fn describe(kgpatch: &Path, binary: &Path, name: &str) -> Result<Described, Error> {
    let out = run(
        &format!("kgpatch describe {} {name}", binary.display()),
        Command::new(kgpatch).arg("describe").arg(binary).arg(name),
    )?;
    // "my_hrtime #0 at 0xef6460: size 58 checksum 0x370b49bdec078119ULL"
    let line = out.lines().next().unwrap_or_default();
    let field = |key: &str| {
        line.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .map(str::to_owned)
    };
    let size = field("size").and_then(|s| s.parse().ok());
    let checksum = field("checksum");
    match (size, checksum) {
        (Some(size), Some(checksum)) => Ok(Described {
            name: name.to_owned(),
            size,
            checksum,
        }),
        _ => Err(Error::Parse {
            what: "size and checksum",
            output: out,
        }),
    }
}

/// The patch sources shipped with this crate.
pub fn patch_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("patches")
        .join(name)
}

/// Compiles `patches/<source>` into `out` with `-D` switches `defines` plus
/// `SZ_<fn>`/`SUM_<fn>` for each of `functions`.
pub fn build_patch(
    source: &str,
    out: &Path,
    defines: &[String],
    functions: &[Described],
) -> Result<(), Error> {
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/include");
    let mut cmd = Command::new("gcc");
    cmd.args(["-O2", "-shared", "-fPIC", "-Wall"])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(out)
        .arg(patch_source(source));
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    for f in functions {
        cmd.arg(format!("-DSZ_{}={}", f.name, f.size))
            .arg(format!("-DSUM_{}={}", f.name, f.checksum));
    }
    run(&format!("gcc {source}"), &mut cmd).map(|_| ())
}
