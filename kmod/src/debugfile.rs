//! Separate debug files (`objcopy --only-keep-debug`, Debian's `-dbgsym` packages): where to
//! look for the file that holds the `.symtab` a stripped binary lost, and how to know it is
//! the right one.
//!
//! Order, as GDB does it: by GNU build-id under each debug directory
//! (`<dir>/.build-id/xx/yyyy.debug`, accepted only when the file's own build-id is equal),
//! then by `.gnu_debuglink` (accepted only when the file's CRC32 is the one the link
//! records; looked for in the binary's directory, its `.debug/` and
//! `<dir>/<binary's directory>/` of each debug directory). The debug directories are
//! `KGPATCH_DEBUG_DIRS` (a colon-separated list) of the process that resolves, else
//! `/usr/lib/debug`. Reads files; writes nothing.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The environment variable naming the debug directories.
pub const DEBUG_DIRS_ENV: &str = "KGPATCH_DEBUG_DIRS";

/// The debug directory used when `KGPATCH_DEBUG_DIRS` is unset or empty.
pub const DEFAULT_DEBUG_DIR: &str = "/usr/lib/debug";

/// The debug directories: `KGPATCH_DEBUG_DIRS` split at `:` (empty entries dropped), else
/// `/usr/lib/debug`.
pub fn debug_dirs() -> Vec<PathBuf> {
    let from_env: Vec<PathBuf> = std::env::var_os(DEBUG_DIRS_ENV)
        .map(|v| {
            v.as_bytes()
                .split(|&b| b == b':')
                .filter(|s| !s.is_empty())
                .map(|s| PathBuf::from(OsStr::from_bytes(s)))
                .collect()
        })
        .unwrap_or_default();
    if from_env.is_empty() {
        vec![PathBuf::from(DEFAULT_DEBUG_DIR)]
    } else {
        from_env
    }
}

/// `<dir>/.build-id/xx/yyyy.debug` for a build-id.
pub(crate) fn build_id_path(dir: &Path, id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let hex: String = rest.iter().map(|b| format!("{b:02x}")).collect();
    Some(
        dir.join(".build-id")
            .join(format!("{first:02x}"))
            .join(format!("{hex}.debug")),
    )
}

/// Where a `.gnu_debuglink` named `link` of `binary` may be, in order.
pub(crate) fn debuglink_paths(binary: &Path, link: &str, dirs: &[PathBuf]) -> Vec<PathBuf> {
    // `/proc/self/exe` and friends name a link: the directory that counts is the real one.
    let real = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
    let Some(parent) = real.parent() else {
        return Vec::new();
    };
    let mut out = vec![parent.join(link), parent.join(".debug").join(link)];
    let rel = parent.strip_prefix("/").unwrap_or(parent);
    out.extend(dirs.iter().map(|d| d.join(rel).join(link)));
    // The binary itself may carry the link's name: it is not its own debug file.
    out.retain(|p| std::fs::canonicalize(p).map_or(true, |c| c != real));
    out
}

/// The CRC32 `.gnu_debuglink` records (IEEE 802.3, reflected, as zlib's `crc32`) of a
/// file's bytes.
pub(crate) fn file_crc32(path: &Path) -> std::io::Result<u32> {
    let mut f = File::open(path)?;
    let table = crc_table();
    let mut crc = !0u32;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    Ok(!crc)
}

fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, slot) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *slot = c;
    }
    t
}

/// The name and CRC of a `.gnu_debuglink` section's bytes (name, NUL, padding to 4, CRC).
pub(crate) fn parse_debuglink(data: &[u8], little_endian: bool) -> Option<(String, u32)> {
    let nul = data.iter().position(|&b| b == 0)?;
    let name = core::str::from_utf8(&data[..nul]).ok()?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let at = (nul + 1).next_multiple_of(4);
    let bytes: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
    let crc = if little_endian {
        u32::from_le_bytes(bytes)
    } else {
        u32::from_be_bytes(bytes)
    };
    Some((name.to_owned(), crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        let dir = std::env::temp_dir().join(format!("kgpatch-crc-{}", std::process::id()));
        std::fs::write(&dir, b"123456789").unwrap();
        let crc = file_crc32(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(crc, 0xcbf4_3926);
    }

    #[test]
    fn paths() {
        let p = build_id_path(Path::new("/d"), &[0xab, 0x01, 0xff]).unwrap();
        assert_eq!(p, Path::new("/d/.build-id/ab/01ff.debug"));
        assert_eq!(build_id_path(Path::new("/d"), &[1]), None);
        let link = parse_debuglink(b"t.debug\0\x78\x56\x34\x12", true).unwrap();
        assert_eq!(link, ("t.debug".to_owned(), 0x1234_5678));
        let paths = debuglink_paths(Path::new("/usr/bin/x"), "x.debug", &[PathBuf::from("/g")]);
        assert_eq!(
            paths,
            [
                PathBuf::from("/usr/bin/x.debug"),
                PathBuf::from("/usr/bin/.debug/x.debug"),
                PathBuf::from("/g/usr/bin/x.debug")
            ]
        );
    }
}
