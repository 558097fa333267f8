//! How good a blocked thread is to borrow, and libc's symbols read from the file the
//! target mapped. `/proc` itself is read through `kgpatch_sys::proc`.

use std::path::{Path, PathBuf};

use kgpatch_sys::proc::Mapping;

/// How good a thread in syscall `nr` (arguments `args`) is to borrow; `None`: never.
///
/// 0: asleep in a call that holds no user-space lock (event waits, sleeps, accept);
/// 1: read-like calls (may sit under a stdio lock, which pthread_create does not take);
/// 2: futex (waits *for* a lock, so may hold another one).
/// Calls that swap the signal mask for their duration (ppoll, pselect6, epoll_pwait with a
/// mask, sigsuspend) are never borrowed: changing a thread's mask by ptrace clears the
/// kernel's "restore the mask afterwards" flag.
pub(crate) fn syscall_rank(nr: i64, args: [u64; 6]) -> Option<u8> {
    match nr {
        // epoll_wait, poll, select, nanosleep, clock_nanosleep, accept, accept4, pause,
        // rt_sigtimedwait, wait4, waitid
        232 | 7 | 23 | 35 | 230 | 43 | 288 | 34 | 128 | 61 | 247 => Some(0),
        // epoll_pwait, epoll_pwait2: mask is arg 5
        281 | 441 if args[4] == 0 => Some(0),
        // ppoll: mask is arg 4
        271 if args[3] == 0 => Some(0),
        // pselect6: arg 6 points at {mask, size}
        270 if args[5] == 0 => Some(0),
        // read, readv, pread64, recvfrom, recvmsg
        0 | 19 | 17 | 45 | 47 => Some(1),
        202 => Some(2),
        _ => None,
    }
}

/// The shared libc the target mapped, and the symbols and gadget the injection needs.
#[derive(Clone, Debug)]
pub(crate) struct Libc {
    /// The path as the target sees it.
    pub path: String,
    pub pthread_create: u64,
    pub pthread_self: u64,
    pub pthread_detach: u64,
    pub dlopen: u64,
    pub dlsym: u64,
    pub dlerror: u64,
    pub munmap: u64,
    /// An address in libc's text holding the bytes `0f 05` (`syscall`).
    pub syscall_gadget: u64,
    /// libc's and the dynamic loader's address ranges (a thread stopped in them may hold a
    /// lock of theirs).
    pub ranges: Vec<(u64, u64)>,
}

pub(crate) fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.starts_with("libc.so")
        || name.starts_with("libc-2.")
        || name.starts_with("libc.musl")
        || name.starts_with("ld-musl")
}

fn is_loader(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.starts_with("ld-linux") || name.starts_with("ld-2.") || name.starts_with("ld64.so")
}

/// Why libc could not be used.
#[derive(Debug)]
pub(crate) enum LibcProblem {
    NotShared,
    Deleted(String),
    Unreadable(PathBuf, std::io::Error),
    Missing(String, &'static str),
    NoGadget,
    Parse(String),
}

/// Resolve what the injection needs in the target's libc. `root` is `/proc/<pid>/root`.
pub(crate) fn find_libc(maps: &[Mapping], root: &Path) -> Result<Libc, LibcProblem> {
    let Some(first) = maps.iter().find(|m| is_libc(&m.path)) else {
        return Err(LibcProblem::NotShared);
    };
    let path = first.path.clone();
    if path.ends_with(" (deleted)") {
        return Err(LibcProblem::Deleted(path));
    }
    let mine: Vec<&Mapping> = maps.iter().filter(|m| m.path == path).collect();
    let base = mine
        .iter()
        .filter(|m| m.offset == 0)
        .map(|m| m.start)
        .min()
        .ok_or_else(|| LibcProblem::Parse(format!("{path}: no mapping at offset 0")))?;
    let file_path = root.join(path.trim_start_matches('/'));
    let data = std::fs::read(&file_path).map_err(|e| LibcProblem::Unreadable(file_path, e))?;
    use object::{Object, ObjectSymbol};
    let file = object::File::parse(&*data).map_err(|e| LibcProblem::Parse(e.to_string()))?;
    let find = |name: &'static str| -> Result<u64, LibcProblem> {
        let mut found: Vec<u64> = file
            .dynamic_symbols()
            .filter(|s| s.is_definition() && s.name() == Ok(name) && s.address() != 0)
            .map(|s| s.address())
            .collect();
        found.sort_unstable();
        found.dedup();
        match found[..] {
            [a] => Ok(base + a),
            [] => Err(LibcProblem::Missing(path.clone(), name)),
            _ => Err(LibcProblem::Parse(format!(
                "{name} has versions at different addresses in {path}"
            ))),
        }
    };
    let mut gadget = None;
    for m in mine.iter().filter(|m| m.exec) {
        let len = (m.end - m.start) as usize;
        let lo = m.offset as usize;
        let hi = (lo + len).min(data.len());
        if lo >= hi {
            continue;
        }
        if let Some(i) = data[lo..hi].windows(2).position(|w| w == [0x0f, 0x05]) {
            gadget = Some(m.start + i as u64);
            break;
        }
    }
    let mut ranges: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.path == path || is_loader(&m.path))
        .map(|m| (m.start, m.end))
        .collect();
    ranges.sort_unstable();
    Ok(Libc {
        pthread_create: find("pthread_create")?,
        pthread_self: find("pthread_self")?,
        pthread_detach: find("pthread_detach")?,
        dlopen: find("dlopen")?,
        dlsym: find("dlsym")?,
        dlerror: find("dlerror")?,
        munmap: find("munmap")?,
        syscall_gadget: gadget.ok_or(LibcProblem::NoGadget)?,
        ranges,
        path,
    })
}
