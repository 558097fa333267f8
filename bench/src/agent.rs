//! Building what the benchmark runs, and talking to an agent over its socket.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kgpatch_protocol::{Client, Outcome, Request, Response, Status};

/// The agent library and a private runtime directory.
pub struct Built {
    pub agent_so: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Built {
    /// Builds the benchmark's own `libkgpatch_agent.so`: release, with the `bench-baseline`
    /// feature (the stop-the-world baseline, which the production library refuses), in its
    /// own target directory `<target>/bench-agent`, so that the feature never reaches the
    /// production library next to this binary (cargo unifies features within one build).
    pub fn ensure() -> Built {
        let exe = std::env::current_exe().expect("own path");
        // <target>/release/kgpatch-bench → <target>/bench-agent
        let target = exe
            .parent()
            .and_then(Path::parent)
            .expect("the binary lies in <target>/<profile>/");
        let target_dir = target.join("bench-agent");
        let agent_so = target_dir.join("release/libkgpatch_agent.so");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "kgpatch-agent"])
            .args(["--features", "bench-baseline", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target_dir)
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
