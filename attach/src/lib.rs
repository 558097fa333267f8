//! `kgpatch-attach`: inject kgpatch's agent into a process that was started without it,
//! stopping ONE of its threads for about a millisecond while every other thread runs on.
//!
//! **Owns:** the checks that decide whether a process can be injected safely, the choice of
//! the thread to borrow, the ptrace sequence on that one thread, and the bootstrap mapping
//! whose new thread `dlopen`s the agent and calls `kgpatch_agent_attach`.
//!
//! **Must not touch:** the agent's internals (it only calls the agent's one C entry point),
//! the protocol, patch modules.
//!
//! **Invariant:** on every refusal and every failure the target is left as it was: the
//! borrowed thread's registers, FPU/AVX state and signal mask are put back exactly, the
//! bootstrap mapping is unmapped (a remote `munmap` while we still hold the thread, or by
//! the new thread itself at its end), no signal is sent, no disposition is changed.
//! `docs` for the step-by-step sequence and what happens if the injector dies at each step:
//! docs/ARCHITECTURE.md, "Attach".
//!
//! ```no_run
//! use kgpatch_attach::{attach, AttachOptions};
//! let report = attach(1234, &AttachOptions::new("/usr/lib/kgpatch/libkgpatch_agent.so"))?;
//! println!("agent in 1234 (thread {} paused {:?})", report.tid, report.pause);
//! # Ok::<(), kgpatch_attach::AttachError>(())
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod inject;
mod target;
mod x86_64;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use inject::attach;

/// What to inject and how long to wait.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// Absolute path of `libkgpatch_agent.so` as the target sees it (resolved under
    /// `/proc/<pid>/root`, so a containerised target needs the file inside its root).
    pub agent_path: PathBuf,
    /// Runtime directory passed to the agent; `None` = the agent's default.
    pub runtime_dir: Option<PathBuf>,
    /// Bound on every wait (the thread stopping, the new thread's result).
    pub timeout: Duration,
    /// The benchmark's baseline: also stop every other thread (seize + interrupt) for the
    /// whole injection, as libcare and upatch do. Never needed for safety.
    pub stop_the_world: bool,
}

impl AttachOptions {
    /// Options with the default runtime directory and a 10 s timeout.
    pub fn new(agent_path: impl Into<PathBuf>) -> AttachOptions {
        AttachOptions {
            agent_path: agent_path.into(),
            runtime_dir: None,
            timeout: Duration::from_secs(10),
            stop_the_world: false,
        }
    }
}

/// What an attach did.
#[derive(Clone, Debug)]
pub struct AttachReport {
    /// The target.
    pub pid: i32,
    /// The agent was already in the process (found in its maps, or the agent said it was
    /// already running): nothing was done to the process, or the call was a no-op.
    pub already: bool,
    /// Where the 64 KiB bootstrap mapping stays, if the bootstrap thread did not unmap it
    /// within 2 s of the answer (it leaves it rather than unmap code a thread may still run).
    pub bootstrap_left: Option<u64>,
    /// The thread that was borrowed (0 if none).
    pub tid: i32,
    /// The syscall that thread was in when interrupted (`None`: it was running user code).
    pub syscall: Option<i64>,
    /// How long the borrowed thread was held, from its stop to its release.
    pub pause: Duration,
    /// From the call to the agent's answer and the bootstrap thread's exit.
    pub total: Duration,
    /// How many threads the target had when one was chosen.
    pub threads: usize,
}

/// Why an attach was refused or failed. Each message says what to do; in every case the
/// target was left as it was, unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// No such process.
    #[error("process {pid} does not exist; check the pid")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// We may not trace it.
    #[error("no permission to trace process {pid} ({why}); run kgpatch as the process's user or as root (CAP_SYS_PTRACE)")]
    Permission {
        /// The pid.
        pid: i32,
        /// uid, Yama or the kernel's answer.
        why: String,
    },
    /// A debugger or tracer is attached.
    #[error("process {pid} is already traced by pid {tracer} (a debugger or strace); detach it and retry")]
    AlreadyTraced {
        /// The pid.
        pid: i32,
        /// TracerPid.
        tracer: i32,
    },
    /// No shared libc (a static binary) or no dlopen in it.
    #[error("process {pid} cannot load a library: {why}; start it with LD_PRELOAD=libkgpatch_agent.so instead")]
    CannotLoad {
        /// The pid.
        pid: i32,
        /// What is missing.
        why: String,
    },
    /// A seccomp filter or strict mode is on.
    #[error("process {pid} runs under seccomp (mode {mode}), which may deny what the injection needs (mmap, munmap, clone3/clone, mprotect, openat, read, nanosleep, pause); start it with LD_PRELOAD=libkgpatch_agent.so instead")]
    Seccomp {
        /// The pid.
        pid: i32,
        /// 1 strict, 2 filter.
        mode: i64,
    },
    /// CET shadow stacks would trap the borrowed thread's return.
    #[error("process {pid} uses user shadow stacks, which injection does not support yet; start it with LD_PRELOAD=libkgpatch_agent.so instead")]
    ShadowStack {
        /// The pid.
        pid: i32,
    },
    /// The agent file is not visible inside the target's root.
    #[error("the agent {} is not visible to process {pid} (looked at {}); copy it into the process's root filesystem at that path", .agent.display(), .looked.display())]
    AgentNotVisible {
        /// The pid.
        pid: i32,
        /// The path given.
        agent: PathBuf,
        /// Where we looked.
        looked: PathBuf,
    },
    /// The agent path is relative or too long.
    #[error("the agent path {} must be absolute and under 4096 bytes", .0.display())]
    BadAgentPath(PathBuf),
    /// The runtime directory is too long.
    #[error("the runtime directory {} must be under 3840 bytes", .0.display())]
    BadRuntimeDir(PathBuf),
    /// No thread reached a point where borrowing it is safe.
    #[error("no thread of process {pid} was at a safe point (asleep in a syscall, or outside libc) in {tries} tries; retry when it is less busy")]
    NoSafeThread {
        /// The pid.
        pid: i32,
        /// Attempts made.
        tries: u32,
    },
    /// The target ended while we worked on it.
    #[error("process {pid} exited during attach")]
    TargetExited {
        /// The pid.
        pid: i32,
    },
    /// The remote mmap failed.
    #[error("process {pid} refused to map the 64 KiB bootstrap (mmap errno {errno}; W^X policy?); start it with LD_PRELOAD=libkgpatch_agent.so instead")]
    RemoteMmap {
        /// The pid.
        pid: i32,
        /// errno.
        errno: i64,
    },
    /// pthread_create failed in the target.
    #[error("process {pid} could not create the bootstrap thread (pthread_create returned {code}: thread limit?); retry later")]
    ThreadCreate {
        /// The pid.
        pid: i32,
        /// The error code.
        code: i32,
    },
    /// The borrowed thread did not come back from pthread_create in time.
    #[error("the borrowed thread {tid} of process {pid} did not return from pthread_create within {waited:?}; it was put back where it was, but a bootstrap mapping may remain")]
    CreateTimeout {
        /// The pid.
        pid: i32,
        /// The thread.
        tid: i32,
        /// How long.
        waited: Duration,
    },
    /// dlopen of the agent failed in the target.
    #[error("process {pid} could not load the agent: {msg}{}", static_tls_hint(.msg))]
    Dlopen {
        /// The pid.
        pid: i32,
        /// dlerror().
        msg: String,
    },
    /// The agent has no entry point.
    #[error("the agent loaded in process {pid} has no kgpatch_agent_attach ({msg}); use an agent built from this kgpatch")]
    NoEntry {
        /// The pid.
        pid: i32,
        /// dlerror().
        msg: String,
    },
    /// The agent's entry point returned an error.
    #[error("the agent in process {pid} failed to start: {msg}")]
    AgentFailed {
        /// The pid.
        pid: i32,
        /// Its message.
        msg: String,
    },
    /// The agent did not answer in time.
    #[error("the agent in process {pid} did not answer within {waited:?}; its bootstrap thread is still loading it and cleans up after itself")]
    AgentTimeout {
        /// The pid.
        pid: i32,
        /// How long.
        waited: Duration,
    },
    /// A ptrace request failed.
    #[error("attaching to process {pid}: {source}")]
    Ptrace {
        /// The pid.
        pid: i32,
        /// The request.
        #[source]
        source: kgpatch_sys::ptrace::PtraceError,
    },
    /// Reading /proc or the target's memory failed.
    #[error("attaching to process {pid}: {what}: {source}")]
    Io {
        /// The pid.
        pid: i32,
        /// What we were reading.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A step failed after the thread was borrowed; it was put back as it was.
    #[error("attaching to process {pid} failed: {what}; thread {tid} was put back as it was")]
    Failed {
        /// The pid.
        pid: i32,
        /// The thread.
        tid: i32,
        /// What failed.
        what: String,
    },
    /// Something the injector could not undo: the target may be affected.
    #[error("process {pid}: {what}; the borrowed thread {tid} could not be put back and the process may misbehave")]
    Damaged {
        /// The pid.
        pid: i32,
        /// The thread.
        tid: i32,
        /// What failed.
        what: String,
    },
}

/// What to do when the agent's static TLS block did not fit: glibc's surplus for libraries
/// loaded late (`glibc.rtld.optional_static_tls`, 512 bytes by default; the agent needs 376)
/// was used up by other libraries.
fn static_tls_hint(msg: &str) -> &'static str {
    if msg.contains("static TLS") {
        "; the process has no spare static TLS left for it: start it with LD_PRELOAD=libkgpatch_agent.so (or GLIBC_TUNABLES=glibc.rtld.optional_static_tls=2048)"
    } else {
        ""
    }
}

/// The file name the agent has in `/proc/<pid>/maps`.
pub const AGENT_FILE_NAME: &str = "libkgpatch_agent.so";

/// True if `pid` has a file named [`AGENT_FILE_NAME`] mapped.
pub fn agent_loaded(pid: i32) -> std::io::Result<bool> {
    Ok(kgpatch_sys::proc::maps(kgpatch_sys::proc::Pid::Other(pid))?
        .iter()
        .any(|m| Path::new(&m.path).file_name().and_then(|n| n.to_str()) == Some(AGENT_FILE_NAME)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_tls_failure_says_what_to_do() {
        let e = AttachError::Dlopen {
            pid: 7,
            msg: "libkgpatch_agent.so: cannot allocate memory in static TLS block".into(),
        };
        assert!(e.to_string().contains("LD_PRELOAD"), "{e}");
        let other = AttachError::Dlopen {
            pid: 7,
            msg: "libfoo.so: cannot open shared object file".into(),
        };
        assert!(!other.to_string().contains("static TLS left"), "{other}");
    }
}
