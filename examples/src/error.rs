//! Errors of the demo-server helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong while starting or talking to the demo server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The executable could not be started.
    #[error(
        "cannot start the demo server {path}: {source}; build the kgpatch-examples crate first"
    )]
    Spawn {
        /// The executable.
        path: PathBuf,
        /// Why `exec` failed.
        source: std::io::Error,
    },
    /// The server did not print `LISTENING <port>` in time.
    #[error("the demo server printed no LISTENING line within {timeout:?}; see its stderr above")]
    StartTimeout {
        /// How long we waited.
        timeout: Duration,
    },
    /// The server exited (or closed stdout) before it was listening.
    #[error("the demo server exited before listening ({status}); see its stderr above for why")]
    ExitedEarly {
        /// Its exit status, or a note when it could not be read.
        status: String,
    },
    /// The `LISTENING` line did not carry a port number.
    #[error(
        "the demo server printed {line:?}, not \"LISTENING <port>\"; is this the right binary?"
    )]
    BadBanner {
        /// The line it printed.
        line: String,
    },
    /// Connecting to the server failed.
    #[error("cannot connect to the demo server at {addr}: {source}; is it still running?")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// A request got no answer.
    #[error("request {request:?} failed: {source}; the server closed the connection or did not answer in time")]
    Request {
        /// The request line.
        request: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The answer to `STATS` could not be parsed.
    #[error("unexpected answer to STATS: {line:?}; expected \"STATS key=value ...\"")]
    BadStats {
        /// What the server answered.
        line: String,
    },
    /// Reading `/proc/<pid>/task` failed.
    #[error("cannot list the threads of process {pid}: {source}; has it exited?")]
    Threads {
        /// The process.
        pid: u32,
        /// The filesystem error.
        source: std::io::Error,
    },
    /// Sending a signal failed.
    #[error("cannot send signal {signal} to {pid}: {source}")]
    Signal {
        /// The process (or thread) id.
        pid: i32,
        /// The signal number.
        signal: i32,
        /// The errno.
        source: std::io::Error,
    },
    /// Waiting for the server to exit failed or timed out.
    #[error("the demo server (pid {pid}) did not exit within {timeout:?} after being asked to stop; it was killed")]
    StopTimeout {
        /// The process.
        pid: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// The `kgpatch` binary or the agent library could not be found or built.
    #[error("kgpatch's tools are not available: {message}")]
    Tools {
        /// What failed.
        message: String,
    },
    /// The private runtime directory for the agent could not be made.
    #[error("cannot create the runtime directory {path}: {source}; check the temporary directory")]
    RuntimeDir {
        /// The directory.
        path: PathBuf,
        /// The filesystem error.
        source: std::io::Error,
    },
    /// Waiting for the child failed.
    #[error("cannot wait for the demo server (pid {pid}): {source}")]
    Wait {
        /// The process.
        pid: u32,
        /// The errno.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn exited(status: Option<ExitStatus>) -> Error {
        Error::ExitedEarly {
            status: status.map_or_else(|| "status unknown".to_string(), |s| s.to_string()),
        }
    }
}
