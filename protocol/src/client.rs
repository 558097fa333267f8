//! The one client of an agent: connect to its socket, send one request line, read one
//! response line, each step bounded by a timeout.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::messages::{decode, encode, ErrorKind, Request, Response, Status};

/// How long each step of a call may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting (retried while the agent's backlog is full).
    pub connect: Duration,
    /// Sending the request.
    pub write: Duration,
    /// Waiting for the answer. An agent answers between two steps of a transition, so this
    /// bounds how long a busy agent may take, not how long a transition may take.
    pub read: Duration,
}

impl Default for Timeouts {
    /// 5 s to connect, 5 s to send, 60 s for the answer.
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            write: Duration::from_secs(5),
            read: Duration::from_secs(60),
        }
    }
}

/// Why a call to an agent failed. Every variant says what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No process with that pid.
    #[error("no process with pid {pid} is running; check the pid (`kgpatch ps` lists processes with an agent)")]
    NoProcess {
        /// The pid asked for.
        pid: u32,
    },
    /// Nobody serves the socket (absent, or nobody listens).
    #[error("{} runs no kgpatch agent (no socket at {}); load one with `kgpatch attach {}` (or `kgpatch apply --attach`), or start the program with LD_PRELOAD=libkgpatch_agent.so", who(*.pid), .socket.display(), .pid.map_or_else(|| "<pid>".to_owned(), |p| p.to_string()))]
    NoAgent {
        /// The process, when the client was made from a pid.
        pid: Option<u32>,
        /// The socket tried.
        socket: PathBuf,
    },
    /// The socket or its directory belongs to another user.
    #[error("permission denied on {}; run kgpatch as the process's user or as root", .socket.display())]
    PermissionDenied {
        /// The socket tried.
        socket: PathBuf,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to the agent at {}: {source}", .socket.display())]
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A step took longer than its timeout.
    #[error("the agent at {} did not {step} within {after:?}; it may be stuck or very busy", .socket.display())]
    TimedOut {
        /// The socket.
        socket: PathBuf,
        /// Which step: `accept the connection`, `take the request`, `answer`.
        step: &'static str,
        /// The timeout that passed.
        after: Duration,
    },
    /// Sending or receiving failed.
    #[error("{step}: {source}")]
    Io {
        /// Which step: `sending the request to the agent`, `reading the agent's answer`.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The agent closed the connection without answering.
    #[error("{} closed the connection without an answer", agent_of(*.pid))]
    Closed {
        /// The process, when the client was made from a pid.
        pid: Option<u32>,
    },
    /// The answer is not a message of this protocol version.
    #[error("the agent's answer: {0}")]
    BadAnswer(String),
    /// The agent refused the request (from [`Client::status`]; [`Client::call`] returns
    /// refusals as [`Response::Error`]).
    #[error("{message}")]
    Refused {
        /// The stable class.
        kind: ErrorKind,
        /// The agent's sentence.
        message: String,
    },
    /// The agent answered with a message of another request.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
}

fn who(pid: Option<u32>) -> String {
    pid.map_or_else(|| "this socket".into(), |p| format!("process {p}"))
}

fn agent_of(pid: Option<u32>) -> String {
    pid.map_or_else(
        || "the agent".into(),
        |p| format!("the agent of process {p}"),
    )
}

/// A client of one agent. Each call opens its own connection (the agent serves one request
/// per connection), so a `Client` is cheap and can be shared.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    pid: Option<u32>,
    timeouts: Timeouts,
}

impl Client {
    /// The agent of process `pid`, in the runtime directory of the uid it runs as.
    pub fn for_pid(pid: u32) -> Result<Client, ClientError> {
        let uid = crate::uid_of(pid).ok_or(ClientError::NoProcess { pid })?;
        Ok(Client::in_dir(&crate::runtime_dir(uid), pid))
    }

    /// The agent of process `pid` whose runtime directory is `dir`.
    pub fn in_dir(dir: &Path, pid: u32) -> Client {
        Client {
            socket: crate::socket_path(dir, pid),
            pid: Some(pid),
            timeouts: Timeouts::default(),
        }
    }

    /// The agent serving the socket at `socket`.
    pub fn at(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            pid: None,
            timeouts: Timeouts::default(),
        }
    }

    /// The same client with other timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Client {
        self.timeouts = timeouts;
        self
    }

    /// The socket it talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until the agent accepts connections (a program just started binds its socket
    /// a little later), polling every 5 ms for at most `deadline`; then the error of the
    /// last attempt.
    pub fn wait_until_listening(&self, deadline: Duration) -> Result<(), ClientError> {
        let end = Instant::now() + deadline;
        loop {
            match self.connect_once() {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn connect_once(&self) -> Result<std::os::unix::net::UnixStream, ClientError> {
        crate::socket::try_connect(&self.socket).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoAgent {
                    pid: self.pid,
                    socket: self.socket.clone(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                socket: self.socket.clone(),
            },
            std::io::ErrorKind::WouldBlock => ClientError::TimedOut {
                socket: self.socket.clone(),
                step: "accept the connection",
                after: self.timeouts.connect,
            },
            _ => ClientError::Connect {
                socket: self.socket.clone(),
                source,
            },
        })
    }

    /// Connects, retrying a full backlog until the connect timeout.
    fn connect(&self) -> Result<std::os::unix::net::UnixStream, ClientError> {
        let end = Instant::now() + self.timeouts.connect;
        loop {
            match self.connect_once() {
                Err(ClientError::TimedOut { .. }) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => return other,
            }
        }
    }

    /// Sends `req` and returns the agent's answer, a refusal ([`Response::Error`]) included.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let stream = self.connect()?;
        // A timeout is `TimedOut { step }`; any other failure is `Io { doing }`.
        let fail = |source: std::io::Error, step, doing, after| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::TimedOut {
                    socket: self.socket.clone(),
                    step,
                    after,
                }
            }
            _ => ClientError::Io {
                step: doing,
                source,
            },
        };
        let setup = |source| ClientError::Io {
            step: "setting the socket's timeouts",
            source,
        };
        stream
            .set_write_timeout(Some(self.timeouts.write))
            .map_err(setup)?;
        stream
            .set_read_timeout(Some(self.timeouts.read))
            .map_err(setup)?;
        (&stream).write_all(encode(req).as_bytes()).map_err(|e| {
            fail(
                e,
                "take the request",
                "sending the request to the agent",
                self.timeouts.write,
            )
        })?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(|e| {
            fail(
                e,
                "answer",
                "reading the agent's answer",
                self.timeouts.read,
            )
        })?;
        if line.is_empty() {
            return Err(ClientError::Closed { pid: self.pid });
        }
        decode(&line).map_err(ClientError::BadAnswer)
    }

    /// The agent's status; a refusal is [`ClientError::Refused`].
    pub fn status(&self) -> Result<Status, ClientError> {
        match self.call(&Request::Status)? {
            Response::Status(s) => Ok(*s),
            Response::Error { kind, message } => Err(ClientError::Refused { kind, message }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
