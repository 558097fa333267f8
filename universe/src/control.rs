//! The control plane: the patch stack, the transition in force, and the progress view. Owned
//! by one driver (the agent's control thread); thread-side operations never touch it, they go
//! through the [`Gate`] and the [`Site`] words it publishes.

use std::collections::BTreeMap;
use std::ops::Deref;

use crate::error::UniverseError;
use crate::gate::Gate;
use crate::site::{Site, Version};
use crate::thread::{Blocker, ThreadState};
use crate::word::{Side, MAX_TRANSITION};
use crate::SiteKey;

/// One function a patch replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionPatch {
    /// The patched function (its entry address).
    pub site: SiteKey,
    /// The entry of the replacement.
    pub new: Version,
}

/// A patch as the control plane sees it: a name and the functions it replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchSpec {
    /// Unique among applied patches.
    pub name: String,
    /// The functions it replaces, each once.
    pub functions: Vec<FunctionPatch>,
}

/// A site the caller prepared for a function that had none: installed, steady, running
/// `original` (the trampoline to the original body).
#[derive(Debug)]
pub struct NewSite<S> {
    /// The function.
    pub key: SiteKey,
    /// Its words.
    pub site: S,
    /// The original version (trampoline entry).
    pub original: Version,
}

/// What a transition does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionKind {
    /// Moves threads onto a new patch.
    Apply,
    /// Moves threads off the top patch.
    Revert,
}

/// One site's move in a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteMove {
    /// The function.
    pub site: SiteKey,
    /// The version threads leave.
    pub from: Version,
    /// The version threads reach.
    pub to: Version,
}

/// The transition in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Its number: monotonic, never reused.
    pub t: u64,
    /// Apply or revert.
    pub kind: TransitionKind,
    /// The patch applied or reverted.
    pub patch: String,
    /// Where threads are going: `To`, or `From` once reversed.
    pub goal: Side,
    /// The sites it moves, in the patch's order. [`Blocker::Busy`] indexes this list.
    pub sites: Vec<SiteMove>,
    /// When it began, in the caller's clock (nanoseconds).
    pub started_at_ns: u64,
    spec: PatchSpec,
}

impl Transition {
    /// The versions a thread must have no frame in before it may move to the goal side:
    /// `from` versions going forward, `to` versions once reversed.
    pub fn leaving(&self) -> impl Iterator<Item = (usize, Version)> + '_ {
        self.sites
            .iter()
            .enumerate()
            .map(move |(i, m)| match self.goal {
                Side::To => (i, m.from),
                Side::From => (i, m.to),
            })
    }

    /// A short description, e.g. "apply fix-1".
    pub fn describe(&self) -> String {
        let verb = match self.kind {
            TransitionKind::Apply => "apply",
            TransitionKind::Revert => "revert",
        };
        let reversed = if self.goal == Side::From {
            ", reversed"
        } else {
            ""
        };
        format!("{verb} {}{reversed}", self.patch)
    }
}

/// What a finished transition left behind, for the caller to act on.
#[derive(Debug)]
pub struct Completed<S> {
    /// The transition that finished.
    pub transition: Transition,
    /// `true` when it finished reversed (nothing changed in the end).
    pub reversed: bool,
    /// Every site it touched that still exists, with the version every thread now runs:
    /// the caller may now jump straight to it (fast path).
    pub steady: Vec<(SiteKey, Version)>,
    /// Sites back at their original version with no patch on them: the caller removes them
    /// (restores the original bytes) and reclaims their memory once no thread is inside.
    pub released: Vec<(SiteKey, S)>,
}

/// An applied patch in the stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedPatch {
    /// The patch.
    pub spec: PatchSpec,
    /// The transition that applied it.
    pub applied_by: u64,
}

/// One thread in the progress view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadProgress {
    /// The caller's id for the thread (the tid).
    pub id: u64,
    /// Which universe it is in.
    pub side: Side,
    /// Failed attempts in this transition.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_blocker: Option<Blocker>,
}

/// The view `kgpatch status` shows for a transition in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The transition.
    pub transition: Transition,
    /// Threads on the goal side.
    pub migrated: usize,
    /// Threads known.
    pub total: usize,
    /// Every known thread.
    pub threads: Vec<ThreadProgress>,
}

struct SiteEntry<S> {
    site: S,
    original: Version,
}

/// The control plane. `S` holds a site's words (`&'static Site` in the agent, `Arc<Site>` in
/// tests), `G` the gate.
pub struct Universe<S, G> {
    gate: G,
    sites: BTreeMap<SiteKey, SiteEntry<S>>,
    stack: Vec<AppliedPatch>,
    transition: Option<Transition>,
    last_t: u64,
    #[cfg(kgpatch_loom)]
    wrong_settle_order: bool,
}

impl<S: Deref<Target = Site>, G: Deref<Target = Gate>> Universe<S, G> {
    /// An empty universe: no sites, no patches, gate closed.
    pub fn new(gate: G) -> Self {
        Universe {
            gate,
            sites: BTreeMap::new(),
            stack: Vec::new(),
            transition: None,
            last_t: 0,
            #[cfg(kgpatch_loom)]
            wrong_settle_order: false,
        }
    }

    /// Makes completion publish in the wrong order (`STEADY` before `from = to`), so a loom
    /// model can show that the models catch it. Only in loom builds.
    #[cfg(kgpatch_loom)]
    #[doc(hidden)]
    pub fn use_wrong_settle_order_for_tests(&mut self) {
        self.wrong_settle_order = true;
    }

    /// The gate threads pass through.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Applied patches, oldest first.
    pub fn patches(&self) -> &[AppliedPatch] {
        &self.stack
    }

    /// The transition in force, if any.
    pub fn transition(&self) -> Option<&Transition> {
        self.transition.as_ref()
    }

    /// The number of the most recent transition (0 before the first).
    pub fn last_transition_number(&self) -> u64 {
        self.last_t
    }

    /// The words of the site of `key`, if it has one.
    pub fn site(&self, key: SiteKey) -> Option<&Site> {
        self.sites.get(&key).map(|e| &*e.site)
    }

    /// Keys of every site, in address order.
    pub fn site_keys(&self) -> impl Iterator<Item = SiteKey> + '_ {
        self.sites.keys().copied()
    }

    /// The version of `key` the patch stack says every thread runs when steady.
    pub fn current_version(&self, key: SiteKey) -> Option<Version> {
        let from_stack = self.stack.iter().rev().find_map(|p| {
            p.spec
                .functions
                .iter()
                .find(|f| f.site == key)
                .map(|f| f.new)
        });
        from_stack.or_else(|| self.sites.get(&key).map(|e| e.original))
    }

    /// The functions of `spec` that have no site yet: the caller prepares a [`NewSite`] for
    /// each before [`Universe::begin_apply`].
    pub fn sites_needed(&self, spec: &PatchSpec) -> Vec<SiteKey> {
        spec.functions
            .iter()
            .map(|f| f.site)
            .filter(|k| !self.sites.contains_key(k))
            .collect()
    }

    fn idle(&self) -> Result<u64, UniverseError> {
        if let Some(tr) = &self.transition {
            return Err(UniverseError::TransitionInProgress {
                t: tr.t,
                what: tr.describe(),
            });
        }
        if self.last_t >= MAX_TRANSITION {
            return Err(UniverseError::TransitionsExhausted);
        }
        Ok(self.last_t + 1)
    }

    fn validate(&self, spec: &PatchSpec) -> Result<(), UniverseError> {
        if spec.functions.is_empty() {
            return Err(UniverseError::EmptyPatch(spec.name.clone()));
        }
        if self.stack.iter().any(|p| p.spec.name == spec.name) {
            return Err(UniverseError::DuplicatePatch(spec.name.clone()));
        }
        for (i, f) in spec.functions.iter().enumerate() {
            if f.new.0 == 0 {
                return Err(UniverseError::NullVersion {
                    name: spec.name.clone(),
                    site: f.site,
                });
            }
            if spec.functions[..i].iter().any(|g| g.site == f.site) {
                return Err(UniverseError::DuplicateFunction {
                    name: spec.name.clone(),
                    site: f.site,
                });
            }
        }
        Ok(())
    }

    /// Begins transition `t` that applies `spec`. `new_sites` must hold exactly the sites
    /// [`Universe::sites_needed`] named; on success they are taken, on error nothing is taken
    /// and nothing changed. Returns `t`.
    pub fn begin_apply(
        &mut self,
        spec: PatchSpec,
        new_sites: &mut Vec<NewSite<S>>,
        now_ns: u64,
    ) -> Result<u64, UniverseError> {
        let t = self.idle()?;
        self.validate(&spec)?;
        let needed = self.sites_needed(&spec);
        if let Some(missing) = needed
            .iter()
            .find(|k| !new_sites.iter().any(|n| n.key == **k))
        {
            return Err(UniverseError::MissingSite(*missing));
        }
        if let Some(extra) = new_sites.iter().find(|n| !needed.contains(&n.key)) {
            return Err(UniverseError::UnexpectedSite(extra.key));
        }
        for f in &spec.functions {
            if let Some(entry) = self.sites.get(&f.site) {
                let expected = self.current_version(f.site).expect("site exists");
                let found = entry.site.steady_version();
                if found != Some(expected) {
                    return Err(UniverseError::SiteMismatch {
                        site: f.site,
                        found,
                        expected,
                    });
                }
            }
        }
        for n in new_sites.iter() {
            if n.site.steady_version() != Some(n.original) {
                return Err(UniverseError::SiteMismatch {
                    site: n.key,
                    found: n.site.steady_version(),
                    expected: n.original,
                });
            }
        }
        for n in new_sites.drain(..) {
            self.sites.insert(
                n.key,
                SiteEntry {
                    site: n.site,
                    original: n.original,
                },
            );
        }
        let moves = spec
            .functions
            .iter()
            .map(|f| SiteMove {
                site: f.site,
                from: self.current_version(f.site).expect("every site exists now"),
                to: f.new,
            })
            .collect();
        self.start(t, TransitionKind::Apply, spec, moves, now_ns)
    }

    /// Begins transition `t` that reverts the patch `name`, which must be on top of the
    /// stack. Returns `t`.
    pub fn begin_revert(&mut self, name: &str, now_ns: u64) -> Result<u64, UniverseError> {
        let t = self.idle()?;
        let top = self
            .stack
            .last()
            .ok_or_else(|| UniverseError::UnknownPatch(name.to_string()))?;
        if top.spec.name != name {
            return Err(if self.stack.iter().any(|p| p.spec.name == name) {
                UniverseError::NotOnTop {
                    name: name.to_string(),
                    top: top.spec.name.clone(),
                }
            } else {
                UniverseError::UnknownPatch(name.to_string())
            });
        }
        let spec = top.spec.clone();
        let below = &self.stack[..self.stack.len() - 1];
        let moves = spec
            .functions
            .iter()
            .map(|f| {
                let under = below
                    .iter()
                    .rev()
                    .find_map(|p| p.spec.functions.iter().find(|g| g.site == f.site))
                    .map(|g| g.new)
                    .unwrap_or(self.sites[&f.site].original);
                SiteMove {
                    site: f.site,
                    from: f.new,
                    to: under,
                }
            })
            .collect();
        self.start(t, TransitionKind::Revert, spec, moves, now_ns)
    }

    fn start(
        &mut self,
        t: u64,
        kind: TransitionKind,
        spec: PatchSpec,
        sites: Vec<SiteMove>,
        now_ns: u64,
    ) -> Result<u64, UniverseError> {
        for m in &sites {
            let found = self.sites[&m.site].site.steady_version();
            if found != Some(m.from) {
                return Err(UniverseError::SiteMismatch {
                    site: m.site,
                    found,
                    expected: m.from,
                });
            }
        }
        // Publish every site before the gate opens: the gate's release carries them.
        for m in &sites {
            self.sites[&m.site].site.begin(t, m.to);
        }
        self.gate.open(t);
        self.last_t = t;
        self.transition = Some(Transition {
            t,
            kind,
            patch: spec.name.clone(),
            goal: Side::To,
            sites,
            started_at_ns: now_ns,
            spec,
        });
        Ok(t)
    }

    /// Turns the transition in force around: threads move back to `from`. Calling it again
    /// turns it forward once more.
    pub fn reverse(&mut self) -> Result<Side, UniverseError> {
        let tr = self
            .transition
            .as_mut()
            .ok_or(UniverseError::NoTransition)?;
        tr.goal = tr.goal.other();
        self.gate.reverse();
        Ok(tr.goal)
    }

    /// Lifts the stack check for the rest of the transition in force: every thread not yet
    /// on the goal side moves at its next boundary whatever its stack holds. Per-request
    /// consistency still holds (the word changes only at a boundary), but a thread may keep
    /// running a version it left — say so loudly.
    pub fn force(&mut self) -> Result<(), UniverseError> {
        if self.transition.is_none() {
            return Err(UniverseError::NoTransition);
        }
        self.gate.force();
        Ok(())
    }

    /// Completes the transition in force if every one of `threads` (all the threads the
    /// caller knows) is on the goal side and none is in flight: settles the sites, updates
    /// the patch stack, closes the gate. Never waits; `None` means "not yet".
    pub fn poll<'a>(
        &mut self,
        threads: impl IntoIterator<Item = &'a ThreadState>,
    ) -> Option<Completed<S>> {
        self.transition.as_ref()?;
        if !self.gate.try_complete(threads) {
            return None;
        }
        let tr = self.transition.take().expect("checked above");
        let reversed = tr.goal == Side::From;
        for m in &tr.sites {
            let site = &self.sites[&m.site].site;
            #[cfg(kgpatch_loom)]
            if self.wrong_settle_order && !reversed {
                site.settle_wrong_order();
                continue;
            }
            if reversed {
                site.settle_back();
            } else {
                site.settle();
            }
        }
        self.gate.close();
        match (tr.kind, reversed) {
            (TransitionKind::Apply, false) => self.stack.push(AppliedPatch {
                spec: tr.spec.clone(),
                applied_by: tr.t,
            }),
            (TransitionKind::Revert, false) => {
                self.stack.pop();
            }
            (_, true) => {}
        }
        let mut steady = Vec::new();
        let mut released = Vec::new();
        for m in &tr.sites {
            let current = self.current_version(m.site).expect("site exists");
            let on_stack = self
                .stack
                .iter()
                .any(|p| p.spec.functions.iter().any(|f| f.site == m.site));
            if on_stack {
                steady.push((m.site, current));
            } else {
                let entry = self.sites.remove(&m.site).expect("site exists");
                released.push((m.site, entry.site));
            }
        }
        Some(Completed {
            transition: tr,
            reversed,
            steady,
            released,
        })
    }

    /// The progress view of the transition in force, over `threads` (the caller's id and
    /// state of every thread it knows).
    pub fn progress<'a>(
        &self,
        threads: impl IntoIterator<Item = (u64, &'a ThreadState)>,
    ) -> Option<Progress> {
        let tr = self.transition.as_ref()?;
        let threads: Vec<ThreadProgress> = threads
            .into_iter()
            .map(|(id, th)| {
                let (attempts, last_blocker) = th.attempts(tr.t);
                ThreadProgress {
                    id,
                    side: Side::of_word(th.word(), tr.t),
                    attempts,
                    last_blocker,
                }
            })
            .collect();
        Some(Progress {
            transition: tr.clone(),
            migrated: threads.iter().filter(|p| p.side == tr.goal).count(),
            total: threads.len(),
            threads,
        })
    }
}
