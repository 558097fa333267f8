//! The control socket: a Unix stream socket in a 0700 runtime directory, one request line and
//! one response line per connection, the peer checked with `SO_PEERCRED` (same uid or root).
//! The agent thread serves it and drives transitions in between; when nothing is pending it
//! sleeps in `poll(2)` until a client connects.
//!
//! # Safety
//! The unsafe is plain libc calls on values this module owns: a zeroed `sockaddr_un` filled
//! within its bounds, a socket descriptor opened and closed here, `geteuid`, `getsockopt`
//! into a `ucred` of the right size, and `poll` on one `pollfd` on the stack. No pointer
//! outlives the call it is passed to.
//!
//! # The stop-the-world baseline
//! A request with `stop_the_world` set is served only by an agent built with the
//! `bench-baseline` feature (the benchmark's own build); the production library refuses it
//! with [`BASELINE_REFUSED`] and changes nothing.
#![allow(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::driver::{Driver, TransitionOptions, DEFAULT_TIMEOUT};
use crate::error::AgentError;
use crate::protocol::{
    self, prune_stale_sockets, runtime_dir, socket_path, ErrorKind, Request, Response,
};

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` with mode 0700 if needed, and refuses one that another user owns or that
/// others can enter.
pub fn prepare_dir(dir: &Path) -> Result<(), AgentError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(AgentError::Os {
                call: "mkdir of the runtime directory",
                source,
            })
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| AgentError::Os {
        call: "stat of the runtime directory",
        source,
    })?;
    let private = meta.is_dir() && meta.uid() == euid() && meta.permissions().mode() & 0o077 == 0;
    if !private {
        return Err(AgentError::Os {
            call: "the runtime directory check",
            source: std::io::Error::other(format!(
                "{} must be a directory owned by uid {} with mode 0700; remove it or set KGPATCH_RUNTIME_DIR",
                dir.display(),
                euid()
            )),
        });
    }
    Ok(())
}

/// The uid of the peer of `stream`.
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out-parameters of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The control server of this process.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `<runtime dir>/<pid>.sock`.
    pub fn bind() -> Result<Server, AgentError> {
        let dir = crate::attach::runtime_dir_override().unwrap_or_else(|| runtime_dir(euid()));
        prepare_dir(&dir)?;
        let path = socket_path(&dir, std::process::id());
        // A socket of a dead process that had our pid.
        let _ = std::fs::remove_file(&path);
        // And those of other processes that are gone.
        for stale in prune_stale_sockets(&dir, Some(std::process::id())) {
            debug!(path = %stale.display(), "removed a stale agent socket");
        }
        let listener = UnixListener::bind(&path).map_err(|source| AgentError::Os {
            call: "bind of the control socket",
            source,
        })?;
        Ok(Server { listener, path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests and drives transitions, forever. A panic in the driver never leaves
    /// this thread (it would take the process down with it, or leave the agent dead): it is
    /// caught, `status` reports it, and every later transition request is refused. The
    /// transition in progress, if any, is not touched again: each thread keeps the universe
    /// it is in, consistent per thread, and new threads still pass the gate.
    pub fn run(self, mut driver: Driver) -> ! {
        let mut failure: Option<String> = None;
        loop {
            let timeout = match failure {
                Some(_) => None,
                None => driver
                    .next_wakeup()
                    .map(|t| t.saturating_duration_since(Instant::now())),
            };
            if wait_readable(&self.listener, timeout) {
                match self.listener.accept() {
                    Ok((stream, _)) => self.serve(stream, &mut driver, &mut failure),
                    Err(e) => warn!(error = %e, "accept failed"),
                }
            }
            if failure.is_none() {
                if let Err(why) = guarded(|| driver.tick()) {
                    failure = Some(why);
                }
            }
        }
    }

    fn serve(&self, stream: UnixStream, driver: &mut Driver, failure: &mut Option<String>) {
        let allowed = peer_uid(&stream).is_ok_and(|uid| uid == euid() || uid == 0);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let cpu_at = crate::timing::thread_cpu_ns();
        let mut status_request = false;
        let response = if !allowed {
            error(
                ErrorKind::BadRequest,
                "permission denied: only the process's own user or root may control its agent"
                    .into(),
            )
        } else {
            match protocol::decode::<Request>(&line) {
                Ok(req) => {
                    debug!(?req, "request");
                    status_request = matches!(req, Request::Status);
                    handle_guarded(req, driver, failure)
                }
                Err(msg) => error(ErrorKind::BadRequest, msg),
            }
        };
        let _ = (&stream).write_all(protocol::encode(&response).as_bytes());
        if status_request {
            // A client polling status is not the transition's work (Cost::agent_cpu_us).
            driver.exclude_cpu(crate::timing::thread_cpu_ns().saturating_sub(cpu_at));
        }
    }
}

/// Runs `f`, turning a panic into the sentence `status` shows.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with no message".into());
        let why = format!("the kgpatch agent hit an internal error ({what})");
        warn!(error = %why, "agent stopped driving transitions");
        why
    })
}

/// The sentence a transition request gets once the agent failed.
fn refusal(why: &str) -> String {
    format!(
        "{why} and refuses further transitions; the process runs on as it is (restart it to patch it again, and please report the error)"
    )
}

/// [`handle`], with the agent's failure state: after a panic only `status` is served.
fn handle_guarded(req: Request, driver: &mut Driver, failure: &mut Option<String>) -> Response {
    if let Some(why) = failure.as_deref() {
        return match req {
            Request::Status => match guarded(|| driver.status()) {
                Ok(mut status) => {
                    status.agent_failure = Some(refusal(why));
                    Response::Status(Box::new(status))
                }
                Err(_) => error(ErrorKind::Internal, refusal(why)),
            },
            _ => error(ErrorKind::Internal, refusal(why)),
        };
    }
    match guarded(|| handle(req, driver)) {
        Ok(r) => r,
        Err(why) => {
            let r = error(ErrorKind::Internal, refusal(&why));
            *failure = Some(why);
            r
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

fn failed(e: AgentError) -> Response {
    error(e.kind(), e.to_string())
}

/// Why an agent without the `bench-baseline` feature refuses a stop-the-world request.
pub(crate) const BASELINE_REFUSED: &str = "this agent is built without the stop-the-world baseline (the `bench-baseline` feature of kgpatch-agent, for benchmarks only); apply or revert without --stop-the-world";

/// The refusal of a transition request that asks for the stop-the-world baseline when this
/// agent is built without it; `None` when the request may go on.
fn baseline_refusal(stop_the_world: bool) -> Option<Response> {
    (stop_the_world && !cfg!(feature = "bench-baseline"))
        .then(|| error(ErrorKind::BadRequest, BASELINE_REFUSED.to_owned()))
}

fn handle(req: Request, driver: &mut Driver) -> Response {
    if let Request::Apply { stop_the_world, .. } | Request::Revert { stop_the_world, .. } = &req {
        if let Some(refused) = baseline_refusal(*stop_the_world) {
            return refused;
        }
    }
    let opts = |ms: Option<u64>, on_timeout, stop_the_world| TransitionOptions {
        timeout: ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis),
        on_timeout,
        stop_the_world,
    };
    match req {
        Request::Apply {
            module,
            timeout_ms,
            on_timeout,
            stop_the_world,
        } => match driver.apply(&module, opts(timeout_ms, on_timeout, stop_the_world)) {
            Ok((t, patch)) => {
                driver.tick();
                Response::Started {
                    t,
                    kind: protocol::Kind::Apply,
                    patch,
                }
            }
            Err(e) => failed(e),
        },
        Request::Revert {
            patch,
            timeout_ms,
            on_timeout,
            stop_the_world,
        } => match driver.revert(&patch, opts(timeout_ms, on_timeout, stop_the_world)) {
            Ok(r) => {
                driver.tick();
                r
            }
            Err(e) => failed(e),
        },
        Request::Status => Response::Status(Box::new(driver.status())),
        Request::Force => match driver.force() {
            Ok(r) => {
                driver.tick();
                r
            }
            Err(e) => failed(e),
        },
        Request::Unload { patch } => match driver.unload_module(&patch) {
            Ok((patch, module, mapped_bytes)) => Response::Unloaded {
                patch,
                module,
                mapped_bytes,
            },
            Err(e) => failed(e),
        },
    }
}

/// Waits until `listener` has a connection, or `timeout` passes (`None`: forever).
fn wait_readable(listener: &UnixListener, timeout: Option<Duration>) -> bool {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |d| d.as_millis().clamp(0, i32::MAX as u128) as i32);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    n > 0 && fds.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_request_is_never_refused_as_baseline() {
        assert_eq!(baseline_refusal(false), None);
    }

    #[cfg(not(feature = "bench-baseline"))]
    #[test]
    fn without_the_feature_a_stop_the_world_request_is_refused() {
        match baseline_refusal(true) {
            Some(Response::Error { kind, message }) => {
                assert_eq!(kind, ErrorKind::BadRequest);
                assert!(message.contains("bench-baseline"), "{message}");
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[cfg(feature = "bench-baseline")]
    #[test]
    fn with_the_feature_a_stop_the_world_request_goes_on() {
        assert_eq!(baseline_refusal(true), None);
    }
}
