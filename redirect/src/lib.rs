//! x86-64 patch sites, trampolines and redirect stubs.
//!
//! **Owns:** every byte of machine code kgpatch reads or writes: analysis of a function's
//! entry ([`SiteAnalysis`], refusals as [`Refusal`]), trampolines for original versions,
//! per-site redirect stubs and their memory (near the site, private, W^X: code read+exec and
//! written through `/proc/self/mem`), the [fork lock](fork), the cross-modifying-code protocol for live text writes (int3, membarrier
//! `SYNC_CORE`, a thread sweep moving threads out of the overwritten bytes, writes through
//! `/proc/self/mem`), the SIGTRAP handler, unwind information for generated code, the
//! universe-word TLS slot ([`tls`]), and the thread sweep the agent reuses ([`sweep`]).
//!
//! **Must not touch:** the consistency model. Which version a thread runs is decided by
//! `kgpatch-universe` (its [`Site`](kgpatch_universe::Site) words and
//! [`select`](kgpatch_universe::select)); this crate only implements `select` in machine code
//! and hands out the site words' memory.
//!
//! # Invariants
//! - No page kgpatch maps is ever writable and executable; no protection is ever changed on
//!   the target's code (writes go through `/proc/self/mem`).
//! - No generated code calls or pushes a return address; a `call` among the overwritten
//!   instructions is refused. Stubs and trampolines carry registered unwind information.
//! - A thread never executes a half-written instruction: int3 first, then the tail, then the
//!   first byte, each step followed by a core serialisation; threads found inside the
//!   overwritten bytes are moved to the matching trampoline instruction before the tail is
//!   written.
//! - A child of `fork` gets private copies of all of it, taken between two write sequences
//!   (the [fork lock](fork)), and no later write of the parent reaches it.
//! - No int3 is written while another thread blocks SIGTRAP (it would be killed, with the
//!   process, on meeting it), and the SIGTRAP handler blocks every signal, so no program
//!   handler runs nested in it; a thread whose signal context further out lies inside the
//!   overwritten bytes makes the write wait, then refuse ([`x86_64::sigframe`]).
//! - Removing a site restores the original bytes exactly; its memory is reused only after a
//!   sweep saw every thread outside it.
//!
//! # Using it
//! ```no_run
//! use kgpatch_redirect::{Patcher, PatcherConfig, PadHint};
//! # fn demo(entry: u64, size: u64) -> Result<(), kgpatch_redirect::Error> {
//! let patcher = Patcher::new(PatcherConfig::default())?;
//! let analysis = patcher.analyze(entry, size, PadHint::Auto)?;
//! let site = patcher.install(&analysis)?; // steady at the original (trampoline)
//! // Hand `site.new_site()` to `kgpatch_universe::Universe::begin_apply`...
//! patcher.remove(site.entry())?; // once steady at the original again
//! patcher.reclaim()?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("kgpatch-redirect supports x86-64 Linux only");

mod error;
pub mod fork;
pub mod sweep;
pub mod tls;
pub mod x86_64;

pub use error::{Error, Refusal, Result};
pub use fork::{fork_guard, ForkGuard};
pub use sweep::{Sweep, SweepAction, SweepReport};
pub use x86_64::analysis::{PadHint, SiteAnalysis};
pub use x86_64::patcher::{CodeKind, CodeRange, Patcher, PatcherConfig, SiteHandle, Stats};
pub use x86_64::text::SyncMethod;
