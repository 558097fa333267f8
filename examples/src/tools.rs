//! Running kgpatch against a demo server, as an operator would: the `kgpatch` binary and
//! the agent library (`libkgpatch_agent.so`, preloaded into the server), a private runtime
//! directory for the agent's socket, and [`PatchableServer`], a [`DemoServer`] started with
//! both.
//!
//! This crate does not link the agent (only `kgpatch-protocol`, to read `--json` output
//! into its types): it finds the built binaries next to the running executable. A test or bench binary lives in `<target-dir>/<profile>/deps/`, a binary in
//! `<target-dir>/<profile>/`; the tools are `<target-dir>/<profile>/kgpatch` and
//! `<target-dir>/<profile>/libkgpatch_agent.so`. Under cargo (`$CARGO` set, as in `cargo
//! test`/`cargo bench`) [`Tools::get`] runs `$CARGO build -p kgpatch-agent -p kgpatch-cli`
//! once with the same target dir and profile, which is a no-op when both are current (so a
//! stale agent is never used); outside cargo it builds only when one is missing.
//! `KGPATCH_BIN` and `KGPATCH_AGENT_SO` override the two paths (then nothing is built).

use std::ffi::OsStr;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kgpatch_protocol::{Outcome, StatusOutput};

use crate::{patch_path, DemoServer, Error, Patch, ServerOptions, Variant};

/// Exit codes of `kgpatch` (its documented policy).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed (an agent's internal error, a local failure).
    pub const FAILED: i32 = 1;
    /// Bad usage.
    pub const USAGE: i32 = 2;
    /// The process or its agent cannot be reached.
    pub const UNREACHABLE: i32 = 3;
    /// The transition did not complete (reversed, or left pending).
    pub const INCOMPLETE: i32 = 4;
    /// Refused: another transition is in progress.
    pub const BUSY: i32 = 5;
    /// Refused: the patch module is unusable (format, target, symbols, checksums).
    pub const BAD_MODULE: i32 = 6;
    /// Refused: a function cannot be patched.
    pub const UNPATCHABLE: i32 = 7;
    /// Refused: the module's callback vetoed.
    pub const VETOED: i32 = 8;
    /// Refused: no such patch, or not on top of the stack.
    pub const NO_SUCH_PATCH: i32 = 9;
    /// Refused: no transition is in progress.
    pub const NO_TRANSITION: i32 = 10;
    /// Refused: the request itself (protocol version, or a user that may not control it).
    pub const BAD_REQUEST: i32 = 11;
}

/// The built `kgpatch` CLI and agent library.
#[derive(Clone, Debug)]
pub struct Tools {
    kgpatch: PathBuf,
    agent: PathBuf,
}

impl Tools {
    /// The tools of the running executable's profile, built once if needed (see the module
    /// docs).
    pub fn get() -> Result<&'static Tools, Error> {
        static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
        TOOLS
            .get_or_init(locate)
            .as_ref()
            .map_err(|message| Error::Tools {
                message: message.clone(),
            })
    }

    /// The `kgpatch` binary.
    pub fn kgpatch(&self) -> &Path {
        &self.kgpatch
    }

    /// `libkgpatch_agent.so`, for `LD_PRELOAD`.
    pub fn agent_library(&self) -> &Path {
        &self.agent
    }
}

fn locate() -> Result<Tools, String> {
    if let (Some(bin), Some(so)) = (
        std::env::var_os("KGPATCH_BIN"),
        std::env::var_os("KGPATCH_AGENT_SO"),
    ) {
        return Ok(Tools {
            kgpatch: bin.into(),
            agent: so.into(),
        });
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
    let mut profile_dir = exe
        .parent()
        .ok_or("the running executable has no directory")?
        .to_path_buf();
    if matches!(
        profile_dir.file_name().and_then(OsStr::to_str),
        Some("deps" | "examples")
    ) {
        profile_dir.pop();
    }
    let target_dir = profile_dir
        .parent()
        .ok_or("the profile directory has no parent")?
        .to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or("the profile directory has no name")?
        .to_string();
    let tools = Tools {
        kgpatch: profile_dir.join("kgpatch"),
        agent: profile_dir.join("libkgpatch_agent.so"),
    };
    let cargo = std::env::var_os("CARGO");
    let missing = !tools.kgpatch.exists() || !tools.agent.exists();
    if cargo.is_some() || missing {
        let cargo = cargo.unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "kgpatch-agent",
            "-p",
            "kgpatch-cli",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = cmd.output().map_err(|e| {
            format!(
                "cannot run {} to build kgpatch and its agent: {e}",
                Path::new(&cargo).display()
            )
        })?;
        if !out.status.success() {
            return Err(format!(
                "building kgpatch-agent and kgpatch-cli ({profile}) failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    for p in [&tools.kgpatch, &tools.agent] {
        if !p.exists() {
            return Err(format!(
                "{} is missing after the build; run `cargo build -p kgpatch-agent -p kgpatch-cli` with this target dir",
                p.display()
            ));
        }
    }
    Ok(tools)
}

/// A private (mode 0700) directory for the agents' sockets (`KGPATCH_RUNTIME_DIR`), removed
/// when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// A fresh directory under the system's temporary directory.
    pub fn new() -> Result<RuntimeDir, Error> {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kgpatch-examples-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |source| Error::RuntimeDir {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(io)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        Ok(RuntimeDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How one `kgpatch` command ended.
#[derive(Clone, Debug)]
pub struct KgpatchRun {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Wall time of the command.
    pub elapsed: Duration,
}

impl KgpatchRun {
    fn from_output(args: Vec<String>, out: Output, elapsed: Duration) -> KgpatchRun {
        KgpatchRun {
            args,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        }
    }

    /// Exit code 0.
    pub fn ok(&self) -> bool {
        self.code == Some(exit::OK)
    }

    /// Its stdout as `--json` output (a status, or the error the command failed with).
    pub fn json(&self) -> Result<StatusOutput, String> {
        StatusOutput::parse(&self.stdout)
    }

    /// How the transition of an `apply`/`revert` (run with `--json`, as
    /// [`PatchableServer::apply`] and [`PatchableServer::revert`] do) ended.
    pub fn outcome(&self) -> Option<Outcome> {
        self.json().ok()?.outcome().cloned()
    }

    /// The transition time `kgpatch apply`/`revert --json` reported, in milliseconds (to the
    /// microsecond).
    pub fn transition_ms(&self) -> Option<f64> {
        self.outcome().map(|o| o.elapsed_ms_f64())
    }
}

impl std::fmt::Display for KgpatchRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kgpatch {} -> exit {:?} after {:?}\nstdout: {}\nstderr: {}",
            self.args.join(" "),
            self.code,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// A [`DemoServer`] with the agent preloaded in a private runtime directory; `kgpatch`
/// commands run against it. Derefs to the [`DemoServer`].
#[derive(Debug)]
pub struct PatchableServer {
    server: DemoServer,
    // dropped after the server: the agent's socket lives in it
    rt: RuntimeDir,
    tools: &'static Tools,
}

impl PatchableServer {
    /// Starts the server described by `opts` with `LD_PRELOAD` of the agent and
    /// `KGPATCH_RUNTIME_DIR` set to a fresh private directory.
    pub fn spawn(opts: ServerOptions) -> Result<PatchableServer, Error> {
        let tools = Tools::get()?;
        let rt = RuntimeDir::new()?;
        let server = DemoServer::spawn(
            opts.env("LD_PRELOAD", tools.agent_library())
                .env("KGPATCH_RUNTIME_DIR", rt.path()),
        )?;
        Ok(PatchableServer { server, rt, tools })
    }

    /// Starts the server described by `opts` WITHOUT the agent (as a server started last
    /// month was), with `kgpatch` commands pointed at a fresh private runtime directory:
    /// [`PatchableServer::attach`] loads the agent into it.
    pub fn spawn_without_agent(opts: ServerOptions) -> Result<PatchableServer, Error> {
        let tools = Tools::get()?;
        let rt = RuntimeDir::new()?;
        let server = DemoServer::spawn(opts)?;
        Ok(PatchableServer { server, rt, tools })
    }

    /// `kgpatch attach <pid> --json`.
    pub fn attach(&self) -> Result<KgpatchRun, Error> {
        let pid = self.pid().to_string();
        self.kgpatch(&["attach", pid.as_str(), "--json"])
    }

    /// The server of `variant` with default options.
    pub fn start(variant: Variant) -> Result<PatchableServer, Error> {
        PatchableServer::spawn(ServerOptions::new(variant))
    }

    /// The runtime directory of its agent.
    pub fn runtime_dir(&self) -> &Path {
        self.rt.path()
    }

    /// A `kgpatch` command with the runtime directory set (add arguments, run it yourself:
    /// for commands that must run in the background, such as a waiting `apply`).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.tools.kgpatch());
        cmd.env("KGPATCH_RUNTIME_DIR", self.rt.path())
            .env_remove("KGPATCH_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `kgpatch <args>` and waits for it.
    pub fn kgpatch<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<KgpatchRun, Error> {
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let t0 = Instant::now();
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|source| Error::Spawn {
                path: self.tools.kgpatch().to_path_buf(),
                source,
            })?;
        Ok(KgpatchRun::from_output(shown, out, t0.elapsed()))
    }

    /// Starts `kgpatch <args>` in the background (stdout and stderr piped); collect it with
    /// [`PatchableServer::wait`].
    pub fn spawn_kgpatch<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Child, Error> {
        self.command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                path: self.tools.kgpatch().to_path_buf(),
                source,
            })
    }

    /// Waits for a command started with [`PatchableServer::spawn_kgpatch`].
    pub fn wait(&self, child: Child, args: &[&str]) -> Result<KgpatchRun, Error> {
        let t0 = Instant::now();
        let out = child.wait_with_output().map_err(|source| Error::Spawn {
            path: self.tools.kgpatch().to_path_buf(),
            source,
        })?;
        Ok(KgpatchRun::from_output(
            args.iter().map(|s| s.to_string()).collect(),
            out,
            t0.elapsed(),
        ))
    }

    /// `kgpatch apply <pid> <module of patch for this variant> --json [extra...]` (read it
    /// with [`KgpatchRun::outcome`]).
    pub fn apply(&self, patch: Patch, extra: &[&str]) -> Result<KgpatchRun, Error> {
        let module = patch_path(patch, self.variant());
        let pid = self.pid().to_string();
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("apply"),
            OsStr::new(&pid),
            module.as_os_str(),
            OsStr::new("--json"),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.kgpatch(&args)
    }

    /// `kgpatch revert <pid> <name> --json [extra...]`.
    pub fn revert(&self, name: &str, extra: &[&str]) -> Result<KgpatchRun, Error> {
        let pid = self.pid().to_string();
        let mut args = vec!["revert", &pid, name, "--json"];
        args.extend_from_slice(extra);
        self.kgpatch(&args)
    }

    /// `kgpatch status <pid> --json`, its stdout (the agent's stable JSON).
    pub fn status_json(&self) -> Result<KgpatchRun, Error> {
        let pid = self.pid().to_string();
        self.kgpatch(&["status", &pid, "--json"])
    }
}

impl Deref for PatchableServer {
    type Target = DemoServer;

    fn deref(&self) -> &DemoServer {
        &self.server
    }
}

impl DerefMut for PatchableServer {
    fn deref_mut(&mut self) -> &mut DemoServer {
        &mut self.server
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn run(stdout: &str) -> KgpatchRun {
        KgpatchRun {
            args: Vec::new(),
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn transition_time_from_the_json_outcome() {
        let status = |us: u64, result: &str| {
            format!(
                "{{\"pid\":1,\"agent_version\":\"0\",\"patches\":[],\"transition\":null,\
                 \"last\":{{\"t\":3,\"kind\":\"apply\",\"patch\":\"fix-incr\",\
                 \"result\":\"{result}\",\"elapsed_ms\":{},\"elapsed_us\":{us},\"message\":\"m\"}}}}",
                us / 1000
            )
        };
        let r = run(&status(12_000, "completed"));
        assert_eq!(r.transition_ms(), Some(12.0));
        let r = run(&status(850, "reversed"));
        assert_eq!(r.transition_ms(), Some(0.85));
        assert_eq!(
            r.outcome().map(|o| o.result),
            Some(kgpatch_protocol::OutcomeKind::Reversed)
        );
        assert_eq!(run("transition 3 completed in 12 ms").transition_ms(), None);
    }
}
