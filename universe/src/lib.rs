//! The kgpatch consistency model: which version of each patched function a thread may run,
//! and when it may change.
//!
//! **Owns:** the patch stack (patches in order, each replacing a set of sites; a site's
//! versions stack), the transition (number `t`, `from`/`to` per site, goal, per-thread
//! state), the publication order of the site words the redirect stub reads ([`Site`]), the
//! thread-side operations ([`Gate::migrate`], [`Gate::is_settled_for`],
//! [`Gate::thread_start`]), the thread registry's slot state machine ([`Registry`]), reversal,
//! force, completion, and the progress view.
//!
//! **Must not touch:** anything OS-specific — no signals, no TLS, no machine code, no clock
//! (times come from the caller). The agent supplies those; this crate only decides.
//!
//! # The model
//! A thread is in the `from` or the `to` universe of the transition in force, decided by its
//! universe word ([`word`]). It moves only by itself, at a boundary, after a stack check said
//! none of its frames is in a version the transition leaves ([`Transition::leaving`]). No
//! thread waits for another: a thread-side operation is a bounded sequence of atomic steps.
//! When every known thread is on the goal side, [`Universe::poll`] settles the sites (every
//! thread then runs the same version) and closes the gate.
//!
//! # Invariants (proven by the loom models in `kgpatch-loom-tests` and the property tests)
//! 1. Between two boundaries a thread runs one universe: every patched function it calls is
//!    of the same side.
//! 2. A thread never reads a version pointer that was not fully published.
//! 3. A migrated thread never goes back to `from` unless a reversal moves it.
//! 4. A transition completes only when every known thread is on the goal side; a thread
//!    started during a transition is consistent from its first call.
//! 5. A reversed transition ends with every thread on `from` and every site steady.
//!
//! The atomics come from [`sync`](crate) — std's, or loom's under `--cfg kgpatch_loom`.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod control;
mod error;
mod gate;
pub mod registry;
mod site;
mod sync;
mod thread;
pub mod word;

pub use control::{
    AppliedPatch, Completed, FunctionPatch, NewSite, PatchSpec, Progress, SiteMove, ThreadProgress,
    Transition, TransitionKind, Universe,
};
pub use error::UniverseError;
pub use gate::{Check, Gate, GateState, Migration};
pub use registry::{ClaimError, Registry, Slot, SlotKey};
pub use site::{offsets as site_offsets, select, Site, SiteWords, Version};
pub use thread::{Blocker, ThreadState};
pub use word::{Side, STEADY};

/// Identifies a patch site: the entry address of the patched function.
pub type SiteKey = u64;
