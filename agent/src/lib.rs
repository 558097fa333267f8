//! The in-process runtime of kgpatch: control socket, transition driver, migration signal
//! handling.
//!
//! **Owns:** the agent thread, the control protocol ([`protocol`]), the thread registry, the
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
//!
//! # Signals
//! Migration uses one real-time signal (`KGPATCH_SIGNAL`, default `SIGRTMAX-7`) with
//! `SA_RESTART`: interrupted `read`, `futex` waits and the like restart; `epoll_wait`,
//! `nanosleep`, `poll` and `select` return `EINTR`, as with any signal (README lists what the
//! tests measured). The redirect crate's own sweep uses `SIGRTMAX-8`, and it takes `SIGTRAP`
//! for the live-write protocol (chained to a handler the program had).

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod driver;
mod error;
mod migrate;
pub mod protocol;
mod registry;
mod server;
mod stacks;
#[cfg(feature = "bench-baseline")]
mod stw;
mod timing;

pub use timing::HandlerTimes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

pub use driver::migration_signal;
pub use error::AgentError;
pub use migrate::quiescent;
pub use server::{prune_stale_sockets, runtime_dir, socket_path};

static STARTED: OnceLock<Result<PathBuf, Arc<AgentError>>> = OnceLock::new();
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Starts the agent in this process (once; later calls return the first result): sets up
/// patching, binds the control socket and starts the agent thread. Returns the socket path;
/// a failure is [`AgentError::Start`], holding the first attempt's error.
pub fn start() -> Result<PathBuf, AgentError> {
    STARTED
        .get_or_init(|| {
            init_logging();
            let driver = driver::Driver::new()?;
            let server = server::Server::bind()?;
            let path = server.path().to_owned();
            preload::cache_signals(
                migration_signal(),
                kgpatch_redirect::PatcherConfig::default().sweep_signal,
            );
            ACTIVE.store(true, Ordering::Release);
            std::thread::Builder::new()
                .name("kgpatch-agent".into())
                .spawn(move || server.run(driver))
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
