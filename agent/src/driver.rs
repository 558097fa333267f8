//! The transition driver: applies and reverts patch modules, sweeps threads with the
//! migration signal until every one is on the goal side, and finishes or reverses the
//! transition at its deadline. It runs on the agent's thread only; it never waits for a
//! target thread (a sweep waits a bounded time for signal handlers, then returns).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kgpatch_kmod::{Loaded, ModuleFile, Pin, ResolveOptions};
use kgpatch_redirect::{PadHint, Patcher, PatcherConfig, SiteHandle, Sweep};
use kgpatch_stackcheck::{BusyRange, BusyRanges, UnreliableReason, UnwindIndex};
use kgpatch_universe::{
    Blocker, FunctionPatch, Gate, PatchSpec, Side, Site, TransitionKind, Universe, Version,
};
use tracing::{debug, debug_span, info, info_span, warn};

use crate::error::AgentError;
use crate::migrate::{
    self, MigrationContext, GATE, NO_STACK_MAPPING, OUR_CODE, REGISTRY_FULL, SHORT_OF_STACK,
};
use crate::protocol::{
    BlockerInfo, ErrorKind, FunctionInfo, Kind, OnTimeout, Outcome, OutcomeKind, PatchInfo,
    PinnedInfo, RetiredInfo, Status, ThreadInfo, TransitionInfo,
};
use crate::registry;
use crate::stacks::StackMap;
#[cfg(feature = "bench-baseline")]
use crate::stw;
use crate::timing::TransitionCost;

/// Default deadline of a transition.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_millis(1);
const MAX_RETRY: Duration = Duration::from_millis(50);
const SWEEP_WAIT: Duration = Duration::from_millis(20);

/// A patch module that is loaded, with what status shows of it.
struct Module {
    loaded: Loaded,
    path: PathBuf,
    /// The functions it replaces.
    functions: Vec<ReplacedFunction>,
    /// The target library, pinned for as long as the module is mapped when the module's
    /// code refers to it (reference slots): a retired module's code may still be called.
    target_pin: Option<Pin>,
    /// The module file's identity when it was opened, to tell a rebuilt file from the one
    /// a retired module was loaded from.
    stamp: Option<FileStamp>,
}

/// A module file's device, inode, size and modification time.
type FileStamp = (u64, u64, u64, i64, i64);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// A module no longer applied (reverted, or its apply reversed), kept mapped: the program
/// may still hold pointers into it (module lifetime, ARCHITECTURE.md).
struct Retired {
    module: Module,
    retired_by: u64,
    how: &'static str,
}

impl Module {
    fn info(&self, applied_by: u64) -> PatchInfo {
        let m = self.loaded.manifest();
        PatchInfo {
            name: m.name.clone(),
            version: m.version.clone(),
            description: m.description.clone(),
            module: self.path.clone(),
            applied_by,
            functions: self
                .functions
                .iter()
                .map(|f| FunctionInfo {
                    name: f.name.clone(),
                    old: f.old,
                    new: f.new,
                })
                .collect(),
            mapped_bytes: self.loaded.mapped_bytes(),
        }
    }
}

/// The transition in progress, beyond what the universe keeps.
struct Pending {
    kind: Kind,
    patch: String,
    started: Instant,
    deadline: Instant,
    on_timeout: OnTimeout,
    deadline_passed: bool,
    /// The module being applied (pushed on completion), or `None` for a revert.
    applying: Option<Module>,
    leaving_from: BusyRanges,
    leaving_to: BusyRanges,
    /// Site index → function name, for blockers.
    names: Vec<String>,
    next_sweep: Instant,
    retry: Duration,
    /// Threads the last sweep found blocking the signal: the driver's own observation, kept
    /// here (never written into a thread's state, which only the thread writes).
    blocked: Vec<u32>,
    /// The last OS error that kept the driver from checking every thread, for status.
    os_error: Option<String>,
    /// Move every thread at once in a rendezvous (the benchmark's baseline).
    #[cfg_attr(not(feature = "bench-baseline"), allow(dead_code))]
    stop_the_world: bool,
}

/// The driver's state. One per process, owned by the agent thread.
pub struct Driver {
    patcher: Patcher,
    migration: Sweep,
    universe: Universe<&'static Site, &'static Gate>,
    /// Applied modules, parallel to the universe's patch stack.
    modules: Vec<Module>,
    /// Modules no longer applied, still mapped (until `unload`).
    retired: Vec<Retired>,
    /// References to libraries that hold a site, by site entry.
    pins: Vec<(u64, Pin)>,
    /// Pins of removed sites, released once no stub or trampoline of the site remains.
    unpinning: Vec<(u64, Pin)>,
    /// Installed sites, by entry.
    sites: Vec<SiteHandle>,
    /// Functions' code ranges, by entry: (entry, end).
    bodies: Vec<(u64, u64)>,
    /// The unwind index of the transition in progress (it pins the objects it covers).
    index: Option<UnwindIndex>,
    /// Heap bytes of the last index, for status once it is dropped.
    index_bytes: u64,
    pending: Option<Pending>,
    last: Option<Outcome>,
    /// What the transition requested last costs (counted from the request on).
    cost: TransitionCost,
}

/// How a transition runs.
#[derive(Clone, Copy, Debug)]
pub struct TransitionOptions {
    /// Deadline.
    pub timeout: Duration,
    /// What happens at the deadline.
    pub on_timeout: OnTimeout,
    /// Move every thread at once in a rendezvous (the benchmark's baseline).
    pub stop_the_world: bool,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// The migration signal: `KGPATCH_SIGNAL` (a number) or `SIGRTMAX - 7`.
pub fn migration_signal() -> libc::c_int {
    std::env::var("KGPATCH_SIGNAL")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| libc::SIGRTMAX() - 7)
}

impl Driver {
    /// Sets up machine-code patching and the migration signal.
    pub fn new() -> Result<Driver, AgentError> {
        let patcher = Patcher::new(PatcherConfig::default())?;
        let migration = Sweep::new(migration_signal())?;
        // Sweeps count the signals that wake a sleeping thread (Cost::wakeups).
        kgpatch_redirect::sweep::cost::set_count_wakeups(true);
        Ok(Driver {
            patcher,
            migration,
            universe: Universe::new(&GATE),
            modules: Vec::new(),
            retired: Vec::new(),
            pins: Vec::new(),
            unpinning: Vec::new(),
            sites: Vec::new(),
            bodies: Vec::new(),
            index: None,
            index_bytes: 0,
            pending: None,
            last: None,
            cost: TransitionCost::default(),
        })
    }

    fn ensure_idle(&self) -> Result<(), AgentError> {
        match self.universe.transition() {
            Some(t) => Err(AgentError::Busy(format!(
                "transition {} ({}) is still in progress; wait for it, or use `kgpatch force` or `kgpatch revert` first",
                t.t,
                t.describe()
            ))),
            None => Ok(()),
        }
    }

    /// Loads `path`, checks and resolves it, installs what sites it needs and begins the
    /// transition that applies it. On error nothing is left behind.
    pub fn apply(
        &mut self,
        path: &Path,
        opts: TransitionOptions,
    ) -> Result<(u64, String), AgentError> {
        let _span = info_span!("apply", module = %path.display()).entered();
        self.ensure_idle()?;
        self.cost = TransitionCost::begin();
        // A fault the end-to-end tests inject to prove a panic here cannot take the process
        // down (server.rs catches it); never set in production.
        if std::env::var_os("KGPATCH_TEST_FAULT").is_some_and(|v| v == "panic-in-apply") {
            panic!("KGPATCH_TEST_FAULT=panic-in-apply");
        }
        // A module applied again after its revert is the mapping kept for it.
        let reused = self.take_retired(path)?;
        let (mut loaded, parts, back) = match reused {
            Some(r) => {
                let m = r.module;
                (
                    m.loaded,
                    (m.target_pin, m.stamp),
                    Some((r.retired_by, r.how)),
                )
            }
            None => {
                let loaded = open_module(path)?;
                (loaded, (None, file_stamp(path)), None)
            }
        };
        let result = self.apply_loaded(&mut loaded);
        match result {
            Ok(plan) => self.begin_apply(loaded, parts, path, plan, opts),
            Err(e) => {
                match back {
                    // It stays retired, as it was.
                    Some((retired_by, how)) => self.retired.push(Retired {
                        module: Module {
                            loaded,
                            path: path.to_owned(),
                            functions: Vec::new(),
                            target_pin: parts.0,
                            stamp: parts.1,
                        },
                        retired_by,
                        how,
                    }),
                    // No site points into the module, none of its replacement code ever
                    // ran: only its initialisers (and a pre-apply callback that refused,
                    // which must leave nothing behind, PATCH-AUTHORING.md).
                    None => unload(loaded),
                }
                Err(e)
            }
        }
    }

    /// The retired module kept for the module file at `path`, taken out of the retired
    /// list to be applied again; `None` when there is none. Refused when a retired module
    /// has the same patch name but another file, or the file changed since it was loaded:
    /// two mappings of one patch would be ambiguous, and applying the old mapping would
    /// run code that is not the file's.
    fn take_retired(&mut self, path: &Path) -> Result<Option<Retired>, AgentError> {
        if self.retired.is_empty() {
            return Ok(None);
        }
        let file = ModuleFile::read(path)?;
        let name = &file.manifest.name;
        let Some(i) = self
            .retired
            .iter()
            .position(|r| r.module.path == path || r.module.loaded.manifest().name == *name)
        else {
            return Ok(None);
        };
        let r = &self.retired[i];
        let kept = r.module.loaded.module();
        let old_name = &kept.manifest.name;
        if r.module.path != path || old_name != name {
            return Err(AgentError::Refused {
                kind: ErrorKind::BadModule,
                message: format!(
                    "a reverted module `{old_name}` from {} is still mapped (the program may still point into it), so `{name}` from {} cannot be loaded beside it: give the new module another patch name and file name, or apply {} again",
                    r.module.path.display(),
                    path.display(),
                    r.module.path.display()
                ),
            });
        }
        let same = kept.section_bytes == file.section_bytes
            && kept.build_id == file.build_id
            && r.module.stamp.is_some()
            && r.module.stamp == file_stamp(path);
        if !same {
            return Err(AgentError::Refused {
                kind: ErrorKind::BadModule,
                message: format!(
                    "{} changed since it was loaded, and its reverted copy is still mapped (the program may still point into it): build the new version under another file name and patch name, or apply the file as it was",
                    path.display()
                ),
            });
        }
        Ok(Some(self.retired.remove(i)))
    }

    fn apply_loaded(&mut self, loaded: &mut Loaded) -> Result<ApplyPlan, AgentError> {
        let name = loaded.manifest().name.clone();
        if self.universe.patches().iter().any(|p| p.spec.name == name) {
            return Err(kgpatch_universe::UniverseError::DuplicatePatch(name).into());
        }
        let resolved = loaded.resolve(ResolveOptions::default())?.clone();
        let mut functions = Vec::new();
        for f in &resolved.functions {
            let size = f.new_size;
            functions.push(ReplacedFunction {
                name: f.old.name.clone(),
                old: f.old_address,
                new: f.new_address,
                new_range: (f.new_address, f.new_address + size.max(1)),
                old_size: f.old_size,
                old_parts: f.old_parts.clone(),
            });
        }
        // Analyse every function that needs a site before installing any.
        let spec = PatchSpec {
            name: name.clone(),
            functions: functions
                .iter()
                .map(|f| FunctionPatch {
                    site: f.old,
                    new: Version(f.new),
                })
                .collect(),
        };
        let needed = self.universe.sites_needed(&spec);
        let mut analyses = Vec::new();
        for f in functions.iter().filter(|f| needed.contains(&f.old)) {
            // With the padding after it: a function shorter than the site may use it.
            let room = resolved
                .functions
                .iter()
                .find(|r| r.old_address == f.old)
                .map_or(f.old_size, |r| r.old_room);
            let a = self
                .patcher
                .analyze(f.old, room, PadHint::Auto)
                .map_err(|source| AgentError::Unpatchable {
                    function: f.name.clone(),
                    source,
                })?;
            analyses.push((a, f.old_size));
        }
        Ok(ApplyPlan {
            spec,
            analyses,
            functions,
        })
    }

    fn begin_apply(
        &mut self,
        loaded: Loaded,
        (target_pin, stamp): (Option<Pin>, Option<FileStamp>),
        path: &Path,
        plan: ApplyPlan,
        opts: TransitionOptions,
    ) -> Result<(u64, String), AgentError> {
        let mut module = Module {
            loaded,
            path: path.to_owned(),
            functions: plan.functions.clone(),
            target_pin,
            stamp,
        };
        let undo = |me: &mut Driver, installed: &[SiteHandle], module: Module, e: AgentError| {
            for h in installed {
                if me.patcher.remove(h.entry()).is_ok() {
                    me.sites.retain(|s| s.entry() != h.entry());
                    me.bodies.retain(|b| b.0 != h.entry());
                }
            }
            // Pins taken for sites that are not (or no longer) installed.
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut me.pins)
                .into_iter()
                .partition(|(entry, _)| me.patcher.site(*entry).is_none());
            me.pins = kept;
            me.unpinning.extend(gone);
            let _ = me.patcher.reclaim();
            me.release_unpinned();
            // No transition runs: the index's pins go with it.
            me.drop_index();
            // No transition made a thread run the module's replacement code, but its
            // pre-apply callback may have run (or it was applied before): keep it mapped,
            // as after a revert.
            me.retire(module, 0, "apply failed");
            Err(e)
        };
        // The module's code refers to its target (reference slots): keep the target
        // loaded for as long as the module is mapped.
        let refers = module
            .loaded
            .resolved()
            .is_some_and(|r| !r.slots.is_empty());
        if refers && module.target_pin.is_none() {
            if let Some(f) = plan.functions.first() {
                match Pin::object_at(f.old) {
                    Ok(pin) => module.target_pin = pin,
                    Err(e) => return undo(self, &[], module, e.into()),
                }
            }
        }
        // Every library that will hold a site stays loaded while the site exists, whatever
        // the program dlcloses.
        for (a, _) in &plan.analyses {
            match Pin::object_at(a.entry()) {
                Ok(Some(pin)) => self.pins.push((a.entry(), pin)),
                Ok(None) => {}
                Err(e) => return undo(self, &[], module, e.into()),
            }
        }
        // Every check that can refuse is done by now (resolution, analysis, the unwind
        // index): only then does module code run. A refused apply leaves no side effect of
        // the module's behind.
        if let Err(e) = self.prepare_index() {
            return undo(self, &[], module, e);
        }
        if let Err(e) = module.loaded.pre_apply() {
            return undo(self, &[], module, e.into());
        }
        let mut installed = Vec::new();
        for (a, size) in &plan.analyses {
            match self.patcher.install(a) {
                Ok(h) => {
                    installed.push(h);
                    self.sites.push(h);
                    self.bodies.push((a.entry(), a.entry() + size));
                }
                Err(source) => {
                    let name = plan
                        .functions
                        .iter()
                        .find(|f| f.old == a.entry())
                        .map_or_else(String::new, |f| f.name.clone());
                    let e = AgentError::Unpatchable {
                        function: name,
                        source,
                    };
                    return undo(self, &installed, module, e);
                }
            }
        }
        // Sites already steady on the fast path go back through their stub first.
        for f in &plan.spec.functions {
            if !installed.iter().any(|h| h.entry() == f.site) {
                if let Err(e) = self.patcher.set_fast_path(f.site, None) {
                    return undo(self, &installed, module, e.into());
                }
            }
        }
        let mut new_sites: Vec<_> = installed.iter().map(|h| h.new_site()).collect();
        let name = plan.spec.name.clone();
        // Site words are written under the fork lock: no child sees half a publication.
        let published = {
            let _fork = kgpatch_redirect::fork_guard();
            self.universe.begin_apply(plan.spec, &mut new_sites, 0)
        };
        let t = match published {
            Ok(t) => t,
            Err(e) => return undo(self, &installed, module, e.into()),
        };
        info!(t, patch = %name, "transition begins");
        self.start_pending(Kind::Apply, name.clone(), Some(module), opts);
        Ok((t, name))
    }

    /// Begins the transition that reverts `name` (on top of the stack), or turns around the
    /// transition applying it.
    pub fn revert(
        &mut self,
        name: &str,
        opts: TransitionOptions,
    ) -> Result<crate::protocol::Response, AgentError> {
        let _span = info_span!("revert", patch = name).entered();
        if let Some(tr) = self.universe.transition() {
            if tr.kind == TransitionKind::Apply && tr.patch == name && tr.goal == Side::To {
                let t = tr.t;
                self.reverse("revert requested while applying")?;
                return Ok(crate::protocol::Response::Reversed { t });
            }
        }
        self.ensure_idle()?;
        self.cost = TransitionCost::begin();
        // Sites go back through their stub first; this checks each still holds kgpatch's
        // jump (a refusal here leaves everything as it was, and runs no module code).
        for f in self
            .universe
            .patches()
            .last()
            .filter(|p| p.spec.name == name)
            .map(|p| p.spec.functions.clone())
            .unwrap_or_default()
        {
            if let Err(e) = self.patcher.set_fast_path(f.site, None) {
                self.restore_fast_paths();
                return Err(e.into());
            }
        }
        if let Some(m) = self.modules.last() {
            if m.loaded.manifest().name == name {
                if let Err(e) = m.loaded.pre_revert() {
                    self.restore_fast_paths();
                    return Err(e.into());
                }
            }
        }
        if let Err(e) = self.prepare_index() {
            self.restore_fast_paths();
            return Err(e);
        }
        let published = {
            let _fork = kgpatch_redirect::fork_guard();
            self.universe.begin_revert(name, 0)
        };
        let t = match published {
            Ok(t) => t,
            Err(e) => {
                self.restore_fast_paths();
                self.drop_index();
                return Err(e.into());
            }
        };
        info!(t, patch = name, "revert begins");
        self.start_pending(Kind::Revert, name.to_string(), None, opts);
        Ok(crate::protocol::Response::Started {
            t,
            kind: Kind::Revert,
            patch: name.to_string(),
        })
    }

    fn restore_fast_paths(&mut self) {
        for h in &self.sites {
            if let Some(v) = self.universe.current_version(h.entry()) {
                let _ = self.patcher.set_fast_path(h.entry(), Some(v));
            }
        }
    }

    /// Drops the unwind index, which releases its pins on every object's unwind data: the
    /// transition it served is over (or never began).
    fn drop_index(&mut self) {
        if let Some(i) = self.index.take() {
            self.index_bytes = i.heap_bytes() as u64;
        }
    }

    fn prepare_index(&mut self) -> Result<(), AgentError> {
        if !self.index.as_ref().is_some_and(|i| i.is_current()) {
            self.index = Some(UnwindIndex::build()?);
        }
        Ok(())
    }

    /// The code range of `version` of the site at `entry`.
    fn version_range(&self, entry: u64, v: Version) -> Option<(u64, u64)> {
        let site = self.sites.iter().find(|s| s.entry() == entry)?;
        if v == site.original() {
            return self.bodies.iter().find(|b| b.0 == entry).copied();
        }
        let in_module = |m: &Module| {
            m.functions
                .iter()
                .find(|f| f.new == v.0)
                .map(|f| f.new_range)
        };
        self.modules
            .iter()
            .find_map(in_module)
            .or_else(|| self.pending.as_ref()?.applying.as_ref().and_then(in_module))
    }

    /// The code a thread must not be in to move to the other side of `side`. `None` when
    /// no transition is in progress or the ranges cannot be built.
    fn busy_ranges(&self, side: Side) -> Result<BusyRanges, String> {
        let tr = self
            .universe
            .transition()
            .ok_or_else(|| "no transition is in progress".to_string())?;
        let mut ranges: Vec<BusyRange> = Vec::new();
        for (i, m) in tr.sites.iter().enumerate() {
            let v = match side {
                Side::From => m.from,
                Side::To => m.to,
            };
            if let Some((start, end)) = self.version_range(m.site, v) {
                ranges.push(BusyRange {
                    start,
                    end,
                    id: i as u32,
                });
            }
            // A thread in a split piece of the original body is inside the function.
            let original = self.sites.iter().find(|s| s.entry() == m.site);
            if original.is_some_and(|s| s.original() == v) {
                let pending = self.pending.as_ref().and_then(|p| p.applying.as_ref());
                let parts = self
                    .modules
                    .iter()
                    .chain(pending)
                    .flat_map(|md| &md.functions)
                    .find(|f| f.old == m.site)
                    .map_or(&[][..], |f| &f.old_parts[..]);
                for &(start, end) in parts {
                    ranges.push(BusyRange {
                        start,
                        end,
                        id: i as u32,
                    });
                }
            }
        }
        for c in self.patcher.code_ranges() {
            ranges.push(BusyRange {
                start: c.start,
                end: c.end,
                id: OUR_CODE,
            });
        }
        BusyRanges::new(merge_ranges(ranges)).map_err(|e| e.to_string())
    }

    fn start_pending(
        &mut self,
        kind: Kind,
        patch: String,
        applying: Option<Module>,
        opts: TransitionOptions,
    ) {
        let now = Instant::now();
        let names = self
            .universe
            .transition()
            .map(|tr| {
                tr.sites
                    .iter()
                    .map(|m| function_name(self.modules.iter().chain(&applying), m.site))
                    .collect()
            })
            .unwrap_or_default();
        self.pending = Some(Pending {
            kind,
            patch,
            started: now,
            deadline: now + opts.timeout,
            on_timeout: opts.on_timeout,
            deadline_passed: false,
            applying,
            leaving_from: BusyRanges::empty(),
            leaving_to: BusyRanges::empty(),
            names,
            next_sweep: now,
            retry: FIRST_RETRY,
            blocked: Vec::new(),
            os_error: None,
            stop_the_world: opts.stop_the_world,
        });
        // Ranges that cannot be built fail closed: everything is busy, no thread moves, and
        // the deadline reverses the transition.
        let everything = || {
            BusyRanges::new([BusyRange {
                start: 0,
                end: u64::MAX,
                id: OUR_CODE,
            }])
            .unwrap_or_default()
        };
        let mut ranges = [Side::From, Side::To].map(|side| match self.busy_ranges(side) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "busy ranges not built; no thread can move");
                everything()
            }
        });
        if let Some(p) = self.pending.as_mut() {
            p.leaving_from = std::mem::take(&mut ranges[0]);
            p.leaving_to = std::mem::take(&mut ranges[1]);
        }
    }

    /// Turns the transition in progress around.
    pub fn reverse(&mut self, why: &str) -> Result<(), AgentError> {
        let side = self.universe.reverse()?;
        warn!(why, goal = ?side, "transition reversed");
        // A thread busy for one goal may be clean for the other.
        self.cost.forget();
        if let Some(p) = &mut self.pending {
            p.next_sweep = Instant::now();
            p.retry = FIRST_RETRY;
        }
        Ok(())
    }

    /// Lifts the stack check for the transition in progress and sweeps the threads at once,
    /// a few rounds (at most `FORCE_ROUNDS` sweeps of `SWEEP_WAIT` each), until the transition completes or
    /// only threads that block the migration signal are left. The answer says what moved and
    /// names the threads force cannot move: a thread that blocks the signal never runs the
    /// handler, so it moves only at a quiescent point or once it unblocks the signal.
    pub fn force(&mut self) -> Result<crate::protocol::Response, AgentError> {
        const FORCE_ROUNDS: usize = 10;
        self.universe.force()?;
        self.cost.forget();
        let t = self.universe.transition().map_or(0, |t| t.t);
        warn!(
            t,
            "transition forced: remaining threads move without a stack check"
        );
        let before = self.status().transition;
        let (migrated_before, total_before) =
            before.as_ref().map_or((0, 0), |tr| (tr.migrated, tr.total));
        for _ in 0..FORCE_ROUNDS {
            self.sweep();
            if self.try_finish() {
                let moved = total_before.saturating_sub(migrated_before);
                return Ok(crate::protocol::Response::Forced {
                    t,
                    completed: true,
                    moved,
                    unmoved: Vec::new(),
                });
            }
            // None pending but not complete (a handler still in flight): sweep again.
            let only_blockers = self.status().transition.is_some_and(|tr| {
                !tr.pending.is_empty()
                    && tr
                        .pending
                        .iter()
                        .all(|th| th.blocker == Some(BlockerInfo::SignalBlocked))
            });
            if only_blockers {
                break;
            }
        }
        if let Some(p) = &mut self.pending {
            p.next_sweep = Instant::now();
        }
        let after = self.status().transition;
        let moved = after
            .as_ref()
            .map_or(0, |tr| tr.migrated.saturating_sub(migrated_before));
        let unmoved = after.map_or_else(Vec::new, |tr| tr.pending);
        if !unmoved.is_empty() {
            warn!(
                t,
                unmoved = unmoved.len(),
                "force cannot move every thread; the transition stays pending"
            );
        }
        Ok(crate::protocol::Response::Forced {
            t,
            completed: false,
            moved,
            unmoved,
        })
    }

    /// Takes `ns` of the agent thread's CPU out of the cost of the transition in progress
    /// (serving status requests meanwhile is not its work).
    pub fn exclude_cpu(&mut self, ns: u64) {
        if self.pending.is_some() {
            self.cost.exclude_cpu(ns);
        }
    }

    /// When the driver next needs to run, if a transition is in progress.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.next_sweep.min(p.deadline))
    }

    /// One step: sweep the threads if it is time, complete the transition if every thread is
    /// on the goal side, apply the deadline.
    pub fn tick(&mut self) {
        if self.pending.is_none() {
            return;
        }
        // The agent thread is at a quiescent point here.
        migrate::quiescent();
        // A listing that fails frees nothing (fail closed), and says why in status.
        let mut listing_error = None;
        registry::reclaim(|| live_tids().map_err(|e| listing_error = Some(e)).ok());
        if let (Some(e), Some(p)) = (listing_error, self.pending.as_mut()) {
            p.os_error = Some(format!(
                "listing /proc/self/task failed ({e}); no slot is reclaimed and completion waits"
            ));
        }
        if self.try_finish() {
            return;
        }
        let now = Instant::now();
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        if now >= p.deadline && !p.deadline_passed {
            p.deadline_passed = true;
            if p.on_timeout == OnTimeout::Reverse {
                let _ = self.reverse("deadline passed");
            }
        }
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        if now >= p.next_sweep {
            self.sweep();
            let Some(p) = self.pending.as_mut() else {
                return;
            };
            p.next_sweep = Instant::now() + p.retry;
            p.retry = (p.retry * 2).min(MAX_RETRY);
            self.try_finish();
        }
    }

    /// Records an OS error that keeps the driver from checking every thread.
    fn note_os_error(&mut self, what: String) {
        warn!(error = %what, "transition waits on an OS error");
        if let Some(p) = self.pending.as_mut() {
            p.os_error = Some(what);
        }
    }

    fn sweep(&mut self) {
        if !self.index.as_ref().is_some_and(|i| i.is_current()) {
            match UnwindIndex::build() {
                Ok(i) => self.index = Some(i),
                Err(e) => self.note_os_error(format!("the unwind index was not rebuilt ({e})")),
            }
        }
        let stacks = match StackMap::snapshot() {
            Ok(s) => s,
            Err(e) => {
                // With no map every walk is unreliable: nobody moves this round.
                self.note_os_error(format!(
                    "reading /proc/self/maps failed ({e}); no thread can move this round"
                ));
                StackMap::default()
            }
        };
        let tids = match live_tids() {
            Ok(t) => t,
            Err(e) => {
                self.note_os_error(format!(
                    "listing /proc/self/task failed ({e}); no thread was signalled"
                ));
                return;
            }
        };
        let (Some(index), Some(p)) = (self.index.as_ref(), self.pending.as_ref()) else {
            return;
        };
        let ctx = MigrationContext {
            index,
            leaving_from: &p.leaving_from,
            leaving_to: &p.leaving_to,
            stacks: &stacks,
        };
        // Without the feature the server refuses such a request, so this is never set.
        #[cfg(feature = "bench-baseline")]
        if p.stop_the_world {
            let goal = self.universe.transition().map_or(Side::To, |tr| tr.goal);
            let r = stw::rendezvous(&self.migration, &ctx, goal, SWEEP_WAIT * 10);
            debug!(?r, "stop-the-world rendezvous");
            return;
        }
        let action = |uc: &mut libc::ucontext_t| migrate::on_signal(uc, &ctx);
        let _span = debug_span!("sweep").entered();
        // Only the threads not yet on the goal side (or never seen) are signalled.
        let me = kgpatch_sys::thread::gettid();
        let pending: Vec<i32> = match self.universe.transition() {
            Some(tr) => tids
                .into_iter()
                .filter(|&tid| tid as i32 != me)
                .filter(|&tid| {
                    registry::find(tid)
                        .is_none_or(|s| Side::of_word(s.state().word(), tr.t) != tr.goal)
                })
                .map(|tid| tid as i32)
                .collect(),
            None => Vec::new(),
        };
        let pending = self
            .cost
            .select(pending, final_round(p, GATE.state().forced));
        let report = self.migration.run_on(&pending, &action, SWEEP_WAIT);
        match &report {
            Ok(r) => debug!(
                done = r.done.len(),
                exited = r.exited.len(),
                blocked = r.blocked.len(),
                timed_out = r.timed_out.len(),
                "sweep"
            ),
            Err(e) => warn!(error = %e, "sweep failed"),
        }
        match report {
            // The driver's own table: only the owning thread writes its state.
            Ok(report) => {
                if let Some(p) = self.pending.as_mut() {
                    p.blocked = report.blocked.iter().map(|&t| t as u32).collect();
                }
            }
            Err(e) => self.note_os_error(format!("the sweep failed ({e})")),
        }
    }

    fn try_finish(&mut self) -> bool {
        let tids = match live_tids() {
            Ok(t) => t,
            Err(e) => {
                // Fail closed: a thread we cannot list is a thread we cannot check.
                self.note_os_error(format!(
                    "listing /proc/self/task failed ({e}); completion waits until every thread can be checked"
                ));
                return false;
            }
        };
        let mut states = Vec::with_capacity(tids.len());
        for tid in &tids {
            match registry::find(*tid) {
                Some(slot) => states.push(slot.state()),
                None => return false,
            }
        }
        if let Some(p) = self.pending.as_mut() {
            p.os_error = None;
        }
        let settled = {
            let _fork = kgpatch_redirect::fork_guard();
            self.universe.poll(states)
        };
        let Some(done) = settled else {
            return false;
        };
        let Some(p) = self.pending.take() else {
            warn!("a transition completed with no pending record");
            return true;
        };
        // The index's pins on every object's unwind data are released with it.
        self.drop_index();
        let elapsed = p.started.elapsed();
        let mut problems = Vec::new();
        let name_of =
            |me: &Driver, entry: u64| function_name(me.modules.iter().chain(&p.applying), entry);
        // Every thread runs the steady version: jump straight to it.
        for (entry, v) in &done.steady {
            if let Err(e) = self.patcher.set_fast_path(*entry, Some(*v)) {
                warn!(entry, error = %e, "fast path not installed; the stub stays");
                if matches!(e, kgpatch_redirect::Error::SiteChanged { .. }) {
                    problems.push(format!("`{}`: {e}", name_of(self, *entry)));
                }
            }
        }
        for (entry, _) in &done.released {
            match self.patcher.remove(*entry) {
                Ok(()) => {
                    self.sites.retain(|s| s.entry() != *entry);
                    self.bodies.retain(|b| b.0 != *entry);
                    // The library may go once no stub or trampoline of the site remains.
                    while let Some(i) = self.pins.iter().position(|(e, _)| e == entry) {
                        let pin = self.pins.swap_remove(i);
                        self.unpinning.push(pin);
                    }
                }
                Err(e) => {
                    // The site stays (and its library pinned): nothing was written.
                    warn!(entry, error = %e, "site not removed");
                    problems.push(format!(
                        "the original bytes of `{}` were not written back: {e}",
                        name_of(self, *entry)
                    ));
                }
            }
        }
        let _ = self.patcher.reclaim();
        self.release_unpinned();
        let result = if done.reversed {
            OutcomeKind::Reversed
        } else {
            OutcomeKind::Completed
        };
        let t = done.transition.t;
        match (p.kind, done.reversed, p.applying) {
            (Kind::Apply, false, Some(module)) => {
                let _ = module.loaded.post_apply();
                self.modules.push(module);
            }
            (Kind::Apply, true, Some(module)) => {
                // The reversed transition left every thread on `from` and no site leads
                // into the module; but migrated threads ran its code meanwhile and may have
                // kept pointers into it: it stays mapped.
                self.retire(module, t, "reversed");
            }
            (Kind::Revert, false, _) => {
                if let Some(module) = self.modules.pop() {
                    let _ = module.loaded.post_revert();
                    // No thread runs the module's code any more, but the program may still
                    // point into it (constants, function pointers, callbacks): it stays
                    // mapped until `kgpatch unload`.
                    self.retire(module, t, "reverted");
                }
            }
            _ => {}
        }
        let message = match (p.kind, result) {
            (Kind::Apply, OutcomeKind::Completed) => format!("patch {} applied", p.patch),
            (Kind::Revert, OutcomeKind::Completed) => format!("patch {} reverted", p.patch),
            (_, OutcomeKind::Reversed) if p.deadline_passed => "the deadline passed before every thread could move; the transition was reversed and the process is as before".to_string(),
            (_, OutcomeKind::Reversed) => {
                "the transition was reversed; the process is as before".to_string()
            }
        };
        info!(
            t = done.transition.t,
            ?result,
            elapsed_ms = ms(elapsed),
            "transition finished"
        );
        self.last = Some(Outcome {
            t: done.transition.t,
            kind: p.kind,
            patch: p.patch,
            result,
            elapsed_ms: ms(elapsed),
            elapsed_us: elapsed.as_micros().min(u64::MAX as u128) as u64,
            message,
            problems,
            cost: Some(
                self.cost
                    .finish(self.migration.signal(), self.patcher.sweep().signal()),
            ),
        });
        true
    }

    /// Keeps a module that is no longer applied mapped.
    fn retire(&mut self, module: Module, retired_by: u64, how: &'static str) {
        info!(
            patch = %module.loaded.manifest().name,
            bytes = module.loaded.mapped_bytes(),
            how,
            "module retired; it stays mapped"
        );
        self.retired.push(Retired {
            module,
            retired_by,
            how,
        });
    }

    /// Releases the pins of removed sites whose stubs and trampolines are all reclaimed
    /// (no thread can be on its way into the library through them).
    fn release_unpinned(&mut self) {
        if self.unpinning.is_empty() {
            return;
        }
        let ranges = self.patcher.code_ranges();
        let (free, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unpinning)
            .into_iter()
            .partition(|(entry, _)| !ranges.iter().any(|r| r.entry == *entry));
        self.unpinning = keep;
        for (_, pin) in free {
            release_pin(pin);
        }
    }

    /// Unloads (`dlclose`s) the retired module of patch `name`: the separate, explicit step
    /// after a revert. Refused while the module is applied or any transition is in
    /// progress. The program may still hold pointers into it; the operator vouches that it
    /// does not.
    pub fn unload_module(&mut self, name: &str) -> Result<(String, PathBuf, u64), AgentError> {
        let _span = info_span!("unload", patch = name).entered();
        if self
            .modules
            .iter()
            .any(|m| m.loaded.manifest().name == name)
            || self.pending.as_ref().is_some_and(|p| p.patch == name)
        {
            return Err(AgentError::Refused {
                kind: ErrorKind::Busy,
                message: format!(
                    "patch `{name}` is applied or in a transition; revert it first (`kgpatch revert`), then unload its module"
                ),
            });
        }
        self.ensure_idle()?;
        let Some(i) = self
            .retired
            .iter()
            .position(|r| r.module.loaded.manifest().name == name)
        else {
            return Err(AgentError::Refused {
                kind: ErrorKind::NoSuchPatch,
                message: format!(
                    "no reverted module of patch `{name}` is mapped (`kgpatch status` lists them)"
                ),
            });
        };
        let r = self.retired.remove(i);
        let bytes = r.module.loaded.mapped_bytes();
        let path = r.module.path.clone();
        warn!(patch = name, bytes, "unloading a retired module on request");
        // No site leads into it (its patch is off the stack, the transition that took it
        // out completed), and the operator asked for it: the program's pointers into it
        // are the operator's responsibility (`kgpatch unload --help`).
        unload(r.module.loaded);
        if let Some(pin) = r.module.target_pin {
            release_pin(pin);
        }
        // Its unwind tables are gone: the next transition rebuilds the index.
        Ok((name.to_string(), path, bytes))
    }

    /// What `kgpatch status` shows.
    pub fn status(&self) -> Status {
        let patches = self
            .universe
            .patches()
            .iter()
            .zip(&self.modules)
            .map(|(p, m)| m.info(p.applied_by))
            .collect();
        let transition = self.pending.as_ref().and_then(|p| {
            let (tids, listing_error) = match live_tids() {
                Ok(t) => (t, None),
                Err(e) => (
                    Vec::new(),
                    Some(format!("listing /proc/self/task failed ({e})")),
                ),
            };
            let states: Vec<_> = tids
                .iter()
                .filter_map(|&tid| registry::find(tid).map(|s| (tid as u64, s.state())))
                .collect();
            let progress = self.universe.progress(states)?;
            let tr = &progress.transition;
            let mut pending: Vec<ThreadInfo> = progress
                .threads
                .iter()
                .filter(|th| th.side != tr.goal)
                .map(|th| ThreadInfo {
                    tid: th.id as u32,
                    name: thread_name(th.id as u32),
                    attempts: th.attempts,
                    // The driver's observation (the signal stays pending) comes first.
                    blocker: if p.blocked.contains(&(th.id as u32)) {
                        Some(BlockerInfo::SignalBlocked)
                    } else {
                        th.last_blocker.map(|b| describe_blocker(b, &p.names))
                    },
                })
                .collect();
            // Threads that never reached a handler have no slot yet.
            for &tid in &tids {
                if registry::find(tid).is_none() {
                    pending.push(ThreadInfo {
                        tid,
                        name: thread_name(tid),
                        attempts: 0,
                        blocker: p
                            .blocked
                            .contains(&tid)
                            .then_some(BlockerInfo::SignalBlocked),
                    });
                }
            }
            let now = Instant::now();
            Some(TransitionInfo {
                t: tr.t,
                kind: p.kind,
                patch: p.patch.clone(),
                reversed: tr.goal == Side::From,
                forced: GATE.state().forced,
                elapsed_ms: ms(now - p.started),
                remaining_ms: ms(p.deadline.saturating_duration_since(now)),
                left_pending: p.deadline_passed && p.on_timeout == OnTimeout::Pending,
                migrated: progress.migrated,
                total: tids.len(),
                pending,
                waiting_on_error: p.os_error.clone().or(listing_error),
            })
        });
        Status {
            pid: std::process::id(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            patches,
            transition,
            last: self.last.clone(),
            agent: crate::origin_info(),
            handler: crate::timing::HANDLER.snapshot(),
            halted: crate::timing::HALTED.snapshot(),
            unwind_index_bytes: self
                .index
                .as_ref()
                .map_or(self.index_bytes, |i| i.heap_bytes() as u64),
            retired: self
                .retired
                .iter()
                .map(|r| {
                    let m = r.module.loaded.manifest();
                    RetiredInfo {
                        name: m.name.clone(),
                        version: m.version.clone(),
                        module: r.module.path.clone(),
                        mapped_bytes: r.module.loaded.mapped_bytes(),
                        retired_by: r.retired_by,
                        how: r.how.to_string(),
                    }
                })
                .collect(),
            pinned: self.pinned(),
            agent_failure: None,
        }
    }

    /// The libraries kgpatch keeps loaded, and why.
    fn pinned(&self) -> Vec<PinnedInfo> {
        let mut out: Vec<PinnedInfo> = Vec::new();
        let mut at = |library: &Path| -> usize {
            match out.iter().position(|p| p.library == library) {
                Some(i) => i,
                None => {
                    out.push(PinnedInfo {
                        library: library.to_owned(),
                        sites: Vec::new(),
                        modules: Vec::new(),
                    });
                    out.len() - 1
                }
            }
        };
        let mut sites = Vec::new();
        for (entry, pin) in self.pins.iter().chain(&self.unpinning) {
            sites.push((at(pin.name()), *entry));
        }
        let mut modules = Vec::new();
        let applied = self.modules.iter();
        let applying = self.pending.iter().filter_map(|p| p.applying.as_ref());
        let retired = self.retired.iter().map(|r| &r.module);
        for m in applied.chain(applying).chain(retired) {
            if let Some(pin) = &m.target_pin {
                modules.push((at(pin.name()), m.loaded.manifest().name.clone()));
            }
        }
        for (i, entry) in sites {
            out[i].sites.push(entry);
        }
        for (i, name) in modules {
            out[i].modules.push(name);
        }
        out
    }
}

/// `true` when a migration round must signal every pending thread, sparing none: the check
/// is lifted (force), or the deadline comes before the next round would.
fn final_round(p: &Pending, forced: bool) -> bool {
    forced
        || (!p.deadline_passed && p.deadline.saturating_duration_since(Instant::now()) <= p.retry)
}

/// `ranges` made disjoint: empty ones dropped, the rest sorted by start and every chain of
/// overlapping ranges merged into one (it keeps the id of its first range).
fn merge_ranges(mut ranges: Vec<BusyRange>) -> Vec<BusyRange> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| (r.start, r.end));
    let mut merged: Vec<BusyRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// The name of the function at `entry`, as the manifest of one of `modules` gives it.
fn function_name<'a>(modules: impl IntoIterator<Item = &'a Module>, entry: u64) -> String {
    modules
        .into_iter()
        .flat_map(|m| m.functions.iter())
        .find(|f| f.old == entry)
        .map_or_else(|| format!("{entry:#x}"), |f| f.name.clone())
}

/// Opens a patch module in this process.
#[allow(unsafe_code)]
fn open_module(path: &Path) -> Result<Loaded, AgentError> {
    // SAFETY: the operator chose to load this module into the process; its initialisers run
    // here (PATCH-AUTHORING.md: a module has no constructors that need its references).
    Ok(unsafe { Loaded::open(path)? })
}

/// Unloads a module. The caller has made sure no thread runs, or will call, its code: no
/// site points into it, and either none of its replacement code ever ran (a refused apply)
/// or the operator asked for it (`kgpatch unload`).
#[allow(unsafe_code)]
fn unload(module: Loaded) {
    // SAFETY: the caller's guarantee above is `Loaded::close`'s contract.
    if let Err(e) = unsafe { module.close() } {
        warn!(error = %e, "module not unloaded");
    }
}

/// Releases a library pin.
#[allow(unsafe_code)]
fn release_pin(pin: Pin) {
    // SAFETY: callers release a site's pin only once the site is removed and its stub and
    // trampoline are reclaimed, and a module's target pin only when the module is unloaded:
    // nothing of kgpatch leads into the library any more.
    if let Err(e) = unsafe { pin.release() } {
        warn!(error = %e, "library pin not released");
    }
}

/// A function a patch module replaces, as resolved in this process.
#[derive(Debug, Clone)]
struct ReplacedFunction {
    /// The old function's name, as the manifest gives it.
    name: String,
    /// The old function's entry: the patch site.
    old: u64,
    /// The new function's entry.
    new: u64,
    /// The new function's code, `[start, end)` (at least one byte).
    new_range: (u64, u64),
    /// The old function's size, from its symbol.
    old_size: u64,
    /// The old function's split pieces (`f.cold`, `f.part.N`), `[start, end)`: busy with it.
    old_parts: Vec<(u64, u64)>,
}

struct ApplyPlan {
    spec: PatchSpec,
    analyses: Vec<(kgpatch_redirect::SiteAnalysis, u64)>,
    functions: Vec<ReplacedFunction>,
}

fn describe_blocker(b: Blocker, names: &[String]) -> BlockerInfo {
    match b {
        Blocker::Busy {
            site: OUR_CODE,
            depth,
        } => BlockerInfo::Busy {
            function: "a kgpatch stub or trampoline".into(),
            depth,
        },
        Blocker::Busy { site, depth } => BlockerInfo::Busy {
            function: names
                .get(site as usize)
                .cloned()
                .unwrap_or_else(|| format!("site {site}")),
            depth,
        },
        Blocker::Unreliable {
            reason: NO_STACK_MAPPING,
        } => BlockerInfo::Unreliable {
            reason: "no mapping holds the thread's stack pointer".into(),
        },
        Blocker::Unreliable {
            reason: REGISTRY_FULL,
        } => BlockerInfo::Unreliable {
            reason: "the agent's thread registry is full".into(),
        },
        Blocker::Unreliable {
            reason: SHORT_OF_STACK,
        } => BlockerInfo::Unreliable {
            reason: "the signal arrived on a stack too small for a walk (an alternate signal stack); retried".into(),
        },
        Blocker::Unreliable { reason } => BlockerInfo::Unreliable {
            reason: UnreliableReason::describe(reason).to_string(),
        },
        Blocker::SignalBlocked => BlockerInfo::SignalBlocked,
    }
}

/// The living threads of the process, from `/proc/self/task`. Any error — opening the
/// directory (EMFILE at the fd limit, ENOMEM) or reading one entry — fails the whole listing:
/// a partial list would let completion skip a thread and reclaim free a living thread's slot.
pub fn live_tids() -> std::io::Result<Vec<u32>> {
    let tids = kgpatch_sys::proc::tasks(kgpatch_sys::proc::Pid::This)?;
    Ok(tids.into_iter().map(|t| t as u32).collect())
}

fn thread_name(tid: u32) -> String {
    kgpatch_sys::proc::task_comm(kgpatch_sys::proc::Pid::This, tid as i32).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64, id: u32) -> BusyRange {
        BusyRange { start, end, id }
    }

    /// Regression (issue 10): merging into the first overlapping range could make it overlap
    /// another one already in the set, and the `expect` on `BusyRanges::new` panicked the
    /// agent thread.
    #[test]
    fn merge_ranges_handles_overlapping_chains() {
        let cases: Vec<Vec<BusyRange>> = vec![
            // c bridges a and b, after both are in.
            vec![r(10, 20, 0), r(30, 40, 1), r(15, 35, 2)],
            // A chain of four, pushed out of order, and one inside another.
            vec![
                r(50, 60, 0),
                r(10, 20, 1),
                r(55, 70, 2),
                r(19, 51, 3),
                r(12, 13, 4),
            ],
            // Touching ranges stay apart; empty ones go.
            vec![r(0, 10, 0), r(10, 20, 1), r(5, 5, 2), r(30, 20, 3)],
        ];
        let expected: Vec<Vec<(u64, u64)>> =
            vec![vec![(10, 40)], vec![(10, 70)], vec![(0, 10), (10, 20)]];
        for (case, want) in cases.into_iter().zip(expected) {
            let merged = merge_ranges(case.clone());
            let got: Vec<(u64, u64)> = merged.iter().map(|r| (r.start, r.end)).collect();
            assert_eq!(got, want, "{case:?}");
            assert!(BusyRanges::new(merged).is_ok(), "{case:?}");
            // Every input byte is still busy.
            for c in case.iter().filter(|c| c.start < c.end) {
                assert!(got.iter().any(|g| g.0 <= c.start && c.end <= g.1), "{c:?}");
            }
        }
    }
}
