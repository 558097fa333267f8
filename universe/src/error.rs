//! Errors of the control plane. Each says what is wrong and what to do.

use crate::site::Version;
use crate::SiteKey;

/// Why a control-plane operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UniverseError {
    /// Only one transition at a time.
    #[error(
        "transition {t} ({what}) is still in progress; wait for it, reverse it or force it first"
    )]
    TransitionInProgress {
        /// The transition in progress.
        t: u64,
        /// What it does, e.g. "apply fix-1".
        what: String,
    },
    /// `reverse`/`force` with no transition.
    #[error("no transition is in progress")]
    NoTransition,
    /// A patch of this name is applied already.
    #[error("a patch named `{0}` is already applied; revert it first or rename the new one")]
    DuplicatePatch(String),
    /// Revert of a name that is not applied.
    #[error("no patch named `{0}` is applied")]
    UnknownPatch(String),
    /// Revert of a patch that is not the most recent.
    #[error("patch `{name}` is not on top of the patch stack; revert `{top}` first (patches come out in the reverse order they went in)")]
    NotOnTop {
        /// The patch asked for.
        name: String,
        /// The patch on top.
        top: String,
    },
    /// A patch with no functions.
    #[error("patch `{0}` replaces no function")]
    EmptyPatch(String),
    /// A patch names the same function twice.
    #[error("patch `{name}` replaces the function at {site:#x} twice")]
    DuplicateFunction {
        /// The patch.
        name: String,
        /// The site named twice.
        site: SiteKey,
    },
    /// A replacement at address 0.
    #[error("patch `{name}` gives a null replacement for the function at {site:#x}")]
    NullVersion {
        /// The patch.
        name: String,
        /// The site.
        site: SiteKey,
    },
    /// The caller did not provide a site for a function that has none yet.
    #[error("no patch site was prepared for the function at {0:#x}")]
    MissingSite(SiteKey),
    /// The caller provided a site for a function that has one, or that the patch does not name.
    #[error("a patch site was prepared for the function at {0:#x}, which does not need a new one")]
    UnexpectedSite(SiteKey),
    /// A site whose words do not say what the patch stack says (a bug, or memory corruption).
    #[error("the site at {site:#x} runs {found:?}, but the patch stack says {expected:?}")]
    SiteMismatch {
        /// The site.
        site: SiteKey,
        /// The version its words hold.
        found: Option<Version>,
        /// The version the patch stack says.
        expected: Version,
    },
    /// Transition numbers ran out (after 2^40 transitions).
    #[error("transition numbers are exhausted; restart the process")]
    TransitionsExhausted,
}
