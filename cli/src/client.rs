//! Talking to an agent: find its socket from the pid, send one request, read one response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kgpatch_agent::protocol::{self, Request, Response};

/// Exit code: the agent could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// An error that carries the exit code it should end the command with.
#[derive(Debug)]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    /// What to print.
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The uid a process runs as, from `/proc/<pid>/status`.
fn uid_of(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| Exit {
        code: EXIT_UNREACHABLE,
        message: format!("no process with pid {pid} is running; check the pid (`kgpatch ps` lists processes with an agent)"),
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| anyhow!("cannot read the uid of process {pid}"))
}

/// The control socket of process `pid`.
pub fn socket_of(pid: u32) -> Result<PathBuf> {
    let uid = uid_of(pid)?;
    Ok(kgpatch_agent::socket_path(
        &kgpatch_agent::runtime_dir(uid),
        pid,
    ))
}

/// Sends `req` to the agent of `pid` and returns its response.
pub fn request(pid: u32, req: &Request) -> Result<Response> {
    let path = socket_of(pid)?;
    let stream = UnixStream::connect(&path).map_err(|e| Exit {
        code: EXIT_UNREACHABLE,
        message: match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "process {pid} runs no kgpatch agent (no socket at {}); start it with LD_PRELOAD=libkgpatch_agent.so or by calling kgpatch_agent::start()",
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied on {}; run kgpatch as the process's user or as root",
                path.display()
            ),
            _ => format!("cannot connect to the agent of process {pid} at {}: {e}", path.display()),
        },
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    (&stream)
        .write_all(protocol::encode(req).as_bytes())
        .context("sending the request to the agent")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the agent's answer")?;
    if line.is_empty() {
        bail!("the agent of process {pid} closed the connection without an answer");
    }
    protocol::decode(&line).map_err(|e| anyhow!("the agent's answer: {e}"))
}
