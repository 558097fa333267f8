//! The in-process runtime of kgpatch: control socket, transition driver, migration signal
//! handling.
//!
//! **Owns:** the agent thread, the server side of the control protocol ([`protocol`], the
//! `kgpatch-protocol` crate re-exported), the thread registry, the
//! migration signal and its handler, the thread-start hook and [`quiescent`]. It joins
//! `kgpatch-universe` (what may happen), `kgpatch-stackcheck` (is this thread clean),
//! `kgpatch-redirect` (machine code) and `kgpatch-kmod` (what the patch is).
//!
//! **Must not touch:** machine code directly (only through `kgpatch-redirect`); it decides
//! nothing about consistency that `kgpatch-universe` does not decide.
//!
//! # Two ways in
//! - Linked in as a crate: call [`start`] early in `main`.
//! - `LD_PRELOAD=libkgpatch_agent.so`: the library starts itself when the process loads it
//!   (set `KGPATCH_AGENT=off` to keep it dormant), and interposes `pthread_create` so that
//!   every new thread enters the goal universe before it runs its own code.
//! - `kgpatch attach <pid>`: a thread of the running process `dlopen`s the library and calls
//!   [`attach::kgpatch_agent_attach`]; no interposer takes effect (module [`attach`]).
//!
//! # Signals
//! Migration uses one real-time signal (`KGPATCH_SIGNAL`, default `SIGRTMAX-7`) with
//! `SA_RESTART`: interrupted `read`, `futex` waits and the like restart; `epoll_wait`,
//! `nanosleep`, `poll` and `select` return `EINTR`, as with any signal (README lists what the
//! tests measured). The redirect crate's own sweep uses `SIGRTMAX-8`, and it takes `SIGTRAP`
//! for the live-write protocol (chained to a handler the program had).

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod attach;
mod driver;
mod error;
mod migrate;
mod registry;
mod server;
pub mod shadow;
mod stacks;
#[cfg(feature = "bench-baseline")]
mod stw;
mod thread;
mod timing;

/// The control protocol (the `kgpatch-protocol` crate): messages, error kinds, socket paths.
pub use kgpatch_protocol as protocol;
pub use timing::HandlerTimes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

pub use driver::migration_signal;
pub use error::AgentError;
pub use migrate::quiescent;
pub use protocol::{prune_stale_sockets, runtime_dir, socket_path};

static STARTED: OnceLock<Result<PathBuf, Arc<AgentError>>> = OnceLock::new();
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// How the agent came in: 0 until set, else `origin_code`'s value; and when it started.
static ORIGIN: AtomicU8 = AtomicU8::new(0);
static SINCE_UNIX_MS: AtomicU64 = AtomicU64::new(0);

fn origin_code(o: protocol::Origin) -> u8 {
    match o {
        protocol::Origin::Preload => 1,
        protocol::Origin::Attach => 2,
        protocol::Origin::Linked => 3,
    }
}

/// Records how the agent came in, before [`start`] (which records `Linked` if nobody did).
pub(crate) fn set_origin(o: protocol::Origin) {
    ORIGIN.store(origin_code(o), Ordering::Relaxed);
}

/// How and when the agent came in, once [`start`] succeeded.
pub(crate) fn origin_info() -> Option<protocol::AgentInfo> {
    let origin = match ORIGIN.load(Ordering::Relaxed) {
        1 => protocol::Origin::Preload,
        2 => protocol::Origin::Attach,
        3 => protocol::Origin::Linked,
        _ => return None,
    };
    Some(protocol::AgentInfo {
        origin,
        since_unix_ms: SINCE_UNIX_MS.load(Ordering::Relaxed),
    })
}

/// Starts the agent in this process (once; later calls return the first result): sets up
/// patching, binds the control socket and starts the agent thread. Returns the socket path;
/// a failure is [`AgentError::Start`], holding the first attempt's error.
pub fn start() -> Result<PathBuf, AgentError> {
    STARTED
        .get_or_init(|| {
            init_logging();
            shadow::publish();
            let driver = driver::Driver::new()?;
            let server = server::Server::bind()?;
            let path = server.path().to_owned();
            let _ = ORIGIN.compare_exchange(
                0,
                origin_code(protocol::Origin::Linked),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            SINCE_UNIX_MS.store(since, Ordering::Relaxed);
            preload::cache_signals(
                migration_signal(),
                kgpatch_redirect::PatcherConfig::default().sweep_signal,
            );
            ACTIVE.store(true, Ordering::Release);
            thread::with_async_signals_blocked(|| {
                std::thread::Builder::new()
                    .name("kgpatch-agent".into())
                    .spawn(move || server.run(driver))
            })
            .map_err(|source| AgentError::Os {
                call: "starting the agent thread",
                source,
            })?;
            Ok(path)
        })
        .clone()
        .map_err(AgentError::Start)
}

/// With `KGPATCH_LOG` set (e.g. `info`, `kgpatch_agent=debug`), the agent's `tracing` spans
/// and events go to the process's stderr. A program that installed its own subscriber keeps
/// it and gets them instead.
fn init_logging() {
    let Some(filter) = std::env::var_os("KGPATCH_LOG") else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::new(filter.to_string_lossy());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// `true` once [`start`] succeeded.
pub fn is_active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

mod preload;
