//! Talking to an agent (through `kgpatch_protocol::Client`), and what each failure makes
//! the command exit with.

use anyhow::Result;
use kgpatch_protocol::{Client, ClientError, ErrorKind, Request, Response, Status};

/// The exit codes (the crate docs and README's table say the same).
pub mod exit {
    /// Success (with `--no-wait`: the transition began).
    pub const OK: u8 = 0;
    /// The operation failed (the agent's `internal` class, or a local failure), or a
    /// transition completed but a site's bytes could not be written back.
    pub const FAILED: u8 = 1;
    /// Bad usage (clap exits with it itself; named here for the table).
    #[cfg_attr(not(test), allow(dead_code))]
    pub const USAGE: u8 = 2;
    /// The process or its agent cannot be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The transition did not complete (reversed, left pending, or `force` left threads).
    pub const INCOMPLETE: u8 = 4;
    /// `busy`: another transition is in progress; retry later.
    pub const BUSY: u8 = 5;
    /// `bad_module`: the patch module is unusable (format, target, symbols, checksums).
    pub const BAD_MODULE: u8 = 6;
    /// `unpatchable`: a function cannot be patched.
    pub const UNPATCHABLE: u8 = 7;
    /// `vetoed`: the module's pre-apply or pre-revert callback said no.
    pub const VETOED: u8 = 8;
    /// `no_such_patch`: no such patch, or not on top of the stack.
    pub const NO_SUCH_PATCH: u8 = 9;
    /// `no_transition`: no transition is in progress.
    pub const NO_TRANSITION: u8 = 10;
    /// `bad_request`: the agent refused the request itself (another protocol version, or
    /// the caller's user may not control it).
    pub const BAD_REQUEST: u8 = 11;
}

/// The exit code of an agent's refusal of class `kind`.
pub fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Busy => exit::BUSY,
        ErrorKind::BadModule => exit::BAD_MODULE,
        ErrorKind::Unpatchable => exit::UNPATCHABLE,
        ErrorKind::Vetoed => exit::VETOED,
        ErrorKind::NoSuchPatch => exit::NO_SUCH_PATCH,
        ErrorKind::NoTransition => exit::NO_TRANSITION,
        ErrorKind::BadRequest => exit::BAD_REQUEST,
        // `internal`, and classes a newer agent may add.
        _ => exit::FAILED,
    }
}

/// An error that carries the exit code it should end the command with, and the class
/// `--json` reports.
#[derive(Debug)]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    /// The class: an agent's error kind name, or `unreachable`.
    pub kind: &'static str,
    /// What to print.
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The agent's refusal of class `kind`, as the error the command ends with.
pub fn refused(kind: ErrorKind, message: String) -> anyhow::Error {
    Exit {
        code: exit_code(kind),
        kind: kind.as_str(),
        message,
    }
    .into()
}

/// What a failed call ends the command with: not reaching the agent is `UNREACHABLE`, a
/// refusal its class's code, anything else (a timeout, a garbled answer) `FAILED`.
fn failed(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Refused { kind, message } => refused(kind, message),
        ClientError::NoProcess { .. }
        | ClientError::NoAgent { .. }
        | ClientError::PermissionDenied { .. }
        | ClientError::Connect { .. } => Exit {
            code: exit::UNREACHABLE,
            kind: "unreachable",
            message: e.to_string(),
        }
        .into(),
        other => anyhow::Error::new(other),
    }
}

/// The client of the agent of `pid`.
pub fn client(pid: u32) -> Result<Client> {
    Client::for_pid(pid).map_err(failed)
}

/// Sends `req` to the agent of `pid` and returns its response (a refusal included).
pub fn request(pid: u32, req: &Request) -> Result<Response> {
    client(pid)?.call(req).map_err(failed)
}

/// The status of the agent of `pid`; a refusal is an [`Exit`] of its class.
pub fn status_of(pid: u32) -> Result<Status> {
    client(pid)?.status().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_its_own_exit_code() {
        let mut codes: Vec<u8> = ErrorKind::ALL.iter().map(|&k| exit_code(k)).collect();
        assert_eq!(exit_code(ErrorKind::Internal), exit::FAILED);
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len(), "{codes:?}");
        for c in codes {
            assert!(
                ![exit::OK, exit::USAGE, exit::UNREACHABLE, exit::INCOMPLETE].contains(&c),
                "{c} is taken by another meaning"
            );
        }
    }
}
