//! Connecting to a Unix stream socket without blocking: a connect to an agent whose backlog
//! is full fails with `EAGAIN` at once instead of hanging, so the client can retry until its
//! connect timeout and `ps` can tell a live agent from a stale socket.
//!
//! # Safety
//! The unsafe code here is three libc calls (`socket`, `connect`, taking ownership of the
//! new descriptor). Each works on a `sockaddr_un` built and bounds-checked in this module
//! and on a descriptor this module just created and owns (an [`OwnedFd`] closes it exactly
//! once). Nothing here touches memory it did not create.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// `path` as a `sockaddr_un`, or `InvalidInput` if it does not fit (with its NUL) or holds a
/// NUL byte.
fn sockaddr(path: &Path) -> io::Result<libc::sockaddr_un> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid (AF_UNSPEC, empty path); filled below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long or holds a NUL", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    Ok(addr)
}

/// One non-blocking connect attempt to the socket at `path`. On success the stream is
/// switched back to blocking mode (the caller sets its read and write timeouts). A full
/// backlog is `WouldBlock`; nobody listening is `ConnectionRefused`; no socket is `NotFound`.
pub(crate) fn try_connect(path: &Path) -> io::Result<UnixStream> {
    let addr = sockaddr(path)?;
    // SAFETY: socket takes integers only.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket() just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of the size given; `fd` is open.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// `true` if a non-blocking connect to the socket at `path` is refused (nobody listens). A
/// full backlog (`EAGAIN`) or any other answer counts as alive.
pub(crate) fn refuses_connection(path: &Path) -> bool {
    matches!(try_connect(path), Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED))
}
