//! Building what the benchmark runs, and talking to an agent over its socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kgpatch_agent::protocol::{self, Outcome, Request, Response, Status};

/// The agent library and a private runtime directory.
pub struct Built {
    pub agent_so: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Built {
    /// Builds `libkgpatch_agent.so` in release next to this binary if it is missing or older.
    pub fn ensure() -> Built {
        let exe = std::env::current_exe().expect("own path");
        let dir = exe.parent().expect("a folder").to_owned();
        let agent_so = dir.join("libkgpatch_agent.so");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "kgpatch-agent"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the agent failed");
        assert!(agent_so.exists(), "no {}", agent_so.display());
        let runtime_dir =
            std::env::temp_dir().join(format!("kgpatch-bench-{}", std::process::id()));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&runtime_dir);
        Built {
            agent_so,
            runtime_dir,
        }
    }
}

impl Drop for Built {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

/// A client of one process's agent.
pub struct Agent {
    socket: PathBuf,
}

impl Agent {
    /// Waits for the agent of `pid` to listen.
    pub fn connect(built: &Built, pid: u32) -> Agent {
        let socket = kgpatch_agent::socket_path(&built.runtime_dir, pid);
        let end = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < end,
                "no agent socket at {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { socket }
    }

    /// One request, one response.
    pub fn call(&self, req: &Request) -> Response {
        let stream = UnixStream::connect(&self.socket).expect("connect to the agent");
        (&stream)
            .write_all(protocol::encode(req).as_bytes())
            .expect("send");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("answer");
        protocol::decode(&line).expect("a protocol answer")
    }

    /// The agent's status.
    pub fn status(&self) -> Status {
        match self.call(&Request::Status) {
            Response::Status(s) => *s,
            other => panic!("status: {other:?}"),
        }
    }

    /// Starts a transition and waits (polling every 200 µs) until it ends; `None` if the
    /// agent refused it.
    pub fn transition(&self, req: Request) -> Option<Outcome> {
        let t = match self.call(&req) {
            Response::Started { t, .. } => t,
            Response::Error { message, .. } => {
                eprintln!("refused: {message}");
                return None;
            }
            other => panic!("unexpected {other:?}"),
        };
        loop {
            let s = self.status();
            if let Some(o) = s.last.filter(|o| o.t == t) {
                return Some(o);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
