//! The agent's errors. Each message is one sentence that says what is wrong and what to do;
//! every refused request leaves the process as it was.

use crate::protocol::ErrorKind;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Another transition is in progress.
    #[error("{0}")]
    Busy(String),
    /// The module is unusable.
    #[error(transparent)]
    Module(#[from] kgpatch_kmod::KmodError),
    /// A function cannot be patched.
    #[error("cannot patch `{function}`: {source}")]
    Unpatchable {
        /// The function.
        function: String,
        /// Why.
        source: kgpatch_redirect::Error,
    },
    /// The consistency model refused.
    #[error(transparent)]
    Universe(#[from] kgpatch_universe::UniverseError),
    /// Machine-code work failed after checks passed.
    #[error("patching failed: {0}")]
    Redirect(#[from] kgpatch_redirect::Error),
    /// The unwind tables could not be read.
    #[error("cannot read the process's unwind tables: {0}")]
    Unwind(#[from] kgpatch_stackcheck::IndexError),
    /// An OS call failed.
    #[error("{call} failed: {source}")]
    Os {
        /// What was called.
        call: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The agent could not start in this process: the first attempt's error, which every
    /// later call of [`start`](crate::start) returns too.
    #[error(transparent)]
    Start(std::sync::Arc<AgentError>),
    /// A request about module lifetime (apply over a retired module, unload) was refused.
    #[error("{message}")]
    Refused {
        /// Its classification.
        kind: ErrorKind,
        /// One sentence: what is wrong and what to do.
        message: String,
    },
}

impl AgentError {
    /// The protocol's classification.
    pub fn kind(&self) -> ErrorKind {
        use kgpatch_universe::UniverseError as U;
        match self {
            AgentError::Busy(_) => ErrorKind::Busy,
            AgentError::Module(kgpatch_kmod::KmodError::Vetoed { .. }) => ErrorKind::Vetoed,
            AgentError::Module(_) => ErrorKind::BadModule,
            AgentError::Unpatchable { .. } => ErrorKind::Unpatchable,
            AgentError::Universe(U::TransitionInProgress { .. }) => ErrorKind::Busy,
            AgentError::Universe(U::UnknownPatch(_) | U::NotOnTop { .. }) => ErrorKind::NoSuchPatch,
            AgentError::Universe(U::NoTransition) => ErrorKind::NoTransition,
            AgentError::Universe(_) => ErrorKind::BadModule,
            AgentError::Redirect(_) | AgentError::Unwind(_) | AgentError::Os { .. } => {
                ErrorKind::Internal
            }
            AgentError::Refused { kind, .. } => *kind,
            AgentError::Start(inner) => inner.kind(),
        }
    }
}
