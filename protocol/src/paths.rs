//! Where an agent's socket lives: `<runtime dir>/<pid>.sock`, the runtime directory per uid,
//! and the pruning of sockets no agent serves any more.

use std::path::{Path, PathBuf};

/// The runtime directory for processes of `uid`: `$KGPATCH_RUNTIME_DIR`, else
/// `/tmp/kgpatch-<uid>`.
pub fn runtime_dir(uid: u32) -> PathBuf {
    match std::env::var_os("KGPATCH_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(format!("/tmp/kgpatch-{uid}")),
    }
}

/// The socket of process `pid` in `dir`.
pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

/// The effective uid of process `pid` (the second `Uid:` field of `/proc/<pid>/status`: the
/// agent names its runtime directory after it); `None` if no such process is running or its
/// status cannot be read.
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = kgpatch_sys::proc::status(kgpatch_sys::proc::Pid::Other(pid as i32)).ok()?;
    status.uid.map(|[_, effective, _, _]| effective)
}

/// Removes the sockets in `dir` that no agent serves any more (left by processes that
/// exited without unlinking theirs: killed, or `_exit`): `<pid>.sock` files, except `keep`'s,
/// that refuse a connection and that no socket of this system is bound to
/// (`/proc/net/unix`). A pid alone proves nothing (pids are reused): a live agent accepts
/// connections, and one between its `bind` and `listen` is listed as bound. Returns the
/// paths removed; on any doubt (an unreadable `/proc/net/unix`) nothing is removed.
pub fn prune_stale_sockets(dir: &Path, keep: Option<u32>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let refusing: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_suffix(".sock"))
                .and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|p| Some(p) != keep)
                && e.file_type().is_ok_and(|t| {
                    use std::os::unix::fs::FileTypeExt;
                    t.is_socket()
                })
        })
        .map(|e| e.path())
        .filter(|p| crate::socket::refuses_connection(p))
        .collect();
    if refusing.is_empty() {
        return Vec::new();
    }
    let Ok(bound) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    // Paths of bound sockets are the last column; compare file names (the path a socket
    // was bound with may be relative), which can only keep more than needed.
    let bound_names: Vec<&str> = bound
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|p| p.rsplit('/').next())
        .collect();
    let mut removed = Vec::new();
    for path in refusing {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !bound_names.contains(&name) && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}
