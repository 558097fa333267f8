//! Building what the benchmark runs, and talking to an agent over its socket.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kgpatch_protocol::{Client, Outcome, Request, Response, Status};

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
    client: Client,
}

impl Agent {
    /// Waits (10 s at most) for the agent of `pid` to accept connections.
    pub fn connect(built: &Built, pid: u32) -> Agent {
        let client = Client::in_dir(&built.runtime_dir, pid);
        if let Err(e) = client.wait_until_listening(Duration::from_secs(10)) {
            panic!("no agent at {}: {e}", client.socket().display());
        }
        Agent { client }
    }

    /// One request, one response.
    pub fn call(&self, req: &Request) -> Response {
        self.client
            .call(req)
            .unwrap_or_else(|e| panic!("{req:?}: {e}"))
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
