//! The transition driver: applies and reverts patch modules, sweeps threads with the
//! migration signal until every one is on the goal side, and finishes or reverses the
//! transition at its deadline. It runs on the agent's thread only; it never waits for a
//! target thread (a sweep waits a bounded time for signal handlers, then returns).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kgpatch_kmod::{Loaded, ResolveOptions};
use kgpatch_redirect::{sweep, PadHint, Patcher, PatcherConfig, SiteHandle, Sweep};
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
    BlockerInfo, FunctionInfo, Kind, OnTimeout, Outcome, OutcomeKind, PatchInfo, Status,
    ThreadInfo, TransitionInfo,
};
use crate::registry;
use crate::stacks::StackMap;
use crate::stw;

/// Default deadline of a transition.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_millis(1);
const MAX_RETRY: Duration = Duration::from_millis(50);
const SWEEP_WAIT: Duration = Duration::from_millis(20);

/// A patch module that is loaded, with what status shows of it.
struct Module {
    loaded: Loaded,
    path: PathBuf,
    /// Per replaced function: name, old entry, new entry, the new function's code range.
    functions: Vec<(String, u64, u64, (u64, u64))>,
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
                .map(|(name, old, new, _)| FunctionInfo {
                    name: name.clone(),
                    old: *old,
                    new: *new,
                })
                .collect(),
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
    /// Threads the last sweep found blocking the signal.
    blocked: Vec<u32>,
    /// Move every thread at once in a rendezvous (the benchmark's baseline).
    stop_the_world: bool,
}

/// The driver's state. One per process, owned by the agent thread.
pub struct Driver {
    patcher: Patcher,
    migration: Sweep,
    universe: Universe<&'static Site, &'static Gate>,
    /// Applied modules, parallel to the universe's patch stack.
    modules: Vec<Module>,
    /// Installed sites, by entry.
    sites: Vec<SiteHandle>,
    /// Functions' code ranges, by entry: (entry, end).
    bodies: Vec<(u64, u64)>,
    index: Option<UnwindIndex>,
    pending: Option<Pending>,
    last: Option<Outcome>,
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
        Ok(Driver {
            patcher,
            migration,
            universe: Universe::new(&GATE),
            modules: Vec::new(),
            sites: Vec::new(),
            bodies: Vec::new(),
            index: None,
            pending: None,
            last: None,
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
        let mut loaded = open_module(path)?;
        let result = self.apply_loaded(&mut loaded);
        match result {
            Ok(plan) => self.begin_apply(loaded, path, plan, opts),
            Err(e) => {
                // No site points into the module: nothing was installed for it.
                unload(loaded);
                Err(e)
            }
        }
    }

    fn apply_loaded(&mut self, loaded: &mut Loaded) -> Result<ApplyPlan, AgentError> {
        let name = loaded.manifest().name.clone();
        if self.universe.patches().iter().any(|p| p.spec.name == name) {
            return Err(kgpatch_universe::UniverseError::DuplicatePatch(name).into());
        }
        let resolved = loaded.resolve(ResolveOptions::default())?.clone();
        loaded.pre_apply()?;
        let mut functions = Vec::new();
        for f in &resolved.functions {
            let size = f.new_size;
            functions.push((
                f.old.name.clone(),
                f.old_address,
                f.new_address,
                (f.new_address, f.new_address + size.max(1)),
                f.old_size,
            ));
        }
        // Analyse every function that needs a site before installing any.
        let spec = PatchSpec {
            name: name.clone(),
            functions: functions
                .iter()
                .map(|f| FunctionPatch {
                    site: f.1,
                    new: Version(f.2),
                })
                .collect(),
        };
        let needed = self.universe.sites_needed(&spec);
        let mut analyses = Vec::new();
        for f in functions.iter().filter(|f| needed.contains(&f.1)) {
            // With the padding after it: a function shorter than the site may use it.
            let room = resolved
                .functions
                .iter()
                .find(|r| r.old_address == f.1)
                .map_or(f.4, |r| r.old_room);
            let a = self
                .patcher
                .analyze(f.1, room, PadHint::Auto)
                .map_err(|source| AgentError::Unpatchable {
                    function: f.0.clone(),
                    source,
                })?;
            analyses.push((a, f.4));
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
        path: &Path,
        plan: ApplyPlan,
        opts: TransitionOptions,
    ) -> Result<(u64, String), AgentError> {
        let module = Module {
            loaded,
            path: path.to_owned(),
            functions: plan
                .functions
                .iter()
                .map(|f| (f.0.clone(), f.1, f.2, f.3))
                .collect(),
        };
        let undo = |me: &mut Driver, installed: &[SiteHandle], module: Module, e: AgentError| {
            for h in installed {
                let _ = me.patcher.remove(h.entry());
                me.sites.retain(|s| s.entry() != h.entry());
                me.bodies.retain(|b| b.0 != h.entry());
            }
            let _ = me.patcher.reclaim();
            // The sites that pointed at the module's code are removed, and no transition
            // made a thread run it.
            unload(module.loaded);
            Err(e)
        };
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
                        .find(|f| f.1 == a.entry())
                        .map_or_else(String::new, |f| f.0.clone());
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
        if let Err(e) = self.prepare_index() {
            return undo(self, &installed, module, e);
        }
        let mut new_sites: Vec<_> = installed.iter().map(|h| h.new_site()).collect();
        let name = plan.spec.name.clone();
        let t = match self.universe.begin_apply(plan.spec, &mut new_sites, 0) {
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
        if let Some(m) = self.modules.last() {
            if m.loaded.manifest().name == name {
                m.loaded.pre_revert()?;
            }
        }
        for f in self
            .universe
            .patches()
            .last()
            .map(|p| p.spec.functions.clone())
            .unwrap_or_default()
        {
            self.patcher.set_fast_path(f.site, None)?;
        }
        self.prepare_index()?;
        let t = match self.universe.begin_revert(name, 0) {
            Ok(t) => t,
            Err(e) => {
                self.restore_fast_paths();
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
        let in_module = |m: &Module| m.functions.iter().find(|f| f.2 == v.0).map(|f| f.3);
        self.modules
            .iter()
            .find_map(in_module)
            .or_else(|| self.pending.as_ref()?.applying.as_ref().and_then(in_module))
    }

    fn busy_ranges(&self, side: Side) -> BusyRanges {
        let tr = self
            .universe
            .transition()
            .expect("a transition is in progress");
        let mut ranges: Vec<BusyRange> = Vec::new();
        let mut push = |start: u64, end: u64, id: u32| {
            // Keep the set disjoint: a range that overlaps one already in is merged into it.
            if let Some(r) = ranges.iter_mut().find(|r| r.start < end && start < r.end) {
                r.start = r.start.min(start);
                r.end = r.end.max(end);
            } else {
                ranges.push(BusyRange { start, end, id });
            }
        };
        for (i, m) in tr.sites.iter().enumerate() {
            let v = match side {
                Side::From => m.from,
                Side::To => m.to,
            };
            if let Some((start, end)) = self.version_range(m.site, v) {
                push(start, end, i as u32);
            }
        }
        for c in self.patcher.code_ranges() {
            push(c.start, c.end, OUR_CODE);
        }
        BusyRanges::new(ranges).expect("merged ranges are disjoint and non-empty")
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
            stop_the_world: opts.stop_the_world,
        });
        let leaving_from = self.busy_ranges(Side::From);
        let leaving_to = self.busy_ranges(Side::To);
        let p = self.pending.as_mut().expect("just set");
        p.leaving_from = leaving_from;
        p.leaving_to = leaving_to;
    }

    /// Turns the transition in progress around.
    pub fn reverse(&mut self, why: &str) -> Result<(), AgentError> {
        let side = self.universe.reverse()?;
        warn!(why, goal = ?side, "transition reversed");
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
        registry::reclaim(live_tids);
        if self.try_finish() {
            return;
        }
        let now = Instant::now();
        let p = self.pending.as_mut().expect("checked");
        if now >= p.deadline && !p.deadline_passed {
            p.deadline_passed = true;
            if p.on_timeout == OnTimeout::Reverse {
                let _ = self.reverse("deadline passed");
            }
        }
        let p = self.pending.as_mut().expect("checked");
        if now >= p.next_sweep {
            self.sweep();
            let p = self.pending.as_mut().expect("checked");
            p.next_sweep = Instant::now() + p.retry;
            p.retry = (p.retry * 2).min(MAX_RETRY);
            self.try_finish();
        }
    }

    fn sweep(&mut self) {
        if !self.index.as_ref().is_some_and(|i| i.is_current()) {
            if let Ok(i) = UnwindIndex::build() {
                self.index = Some(i);
            }
        }
        let (Some(index), Some(p)) = (self.index.as_ref(), self.pending.as_ref()) else {
            return;
        };
        let stacks = StackMap::snapshot().unwrap_or_default();
        let ctx = MigrationContext {
            index,
            leaving_from: &p.leaving_from,
            leaving_to: &p.leaving_to,
            stacks: &stacks,
        };
        if p.stop_the_world {
            let goal = self.universe.transition().map_or(Side::To, |tr| tr.goal);
            let r = stw::rendezvous(&self.migration, &ctx, goal, SWEEP_WAIT * 10);
            debug!(?r, "stop-the-world rendezvous");
            return;
        }
        let action = |uc: &mut libc::ucontext_t| migrate::on_signal(uc, &ctx);
        let _span = debug_span!("sweep").entered();
        // Only the threads not yet on the goal side (or never seen) are signalled.
        let me = sweep::gettid();
        let pending: Vec<i32> = match self.universe.transition() {
            Some(tr) => live_tids()
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
        if let (Ok(report), Some(p)) = (report, self.pending.as_mut()) {
            p.blocked = report.blocked.iter().map(|&t| t as u32).collect();
            for &tid in &p.blocked {
                if let Some(slot) = registry::find(tid) {
                    GATE.note_blocked(slot.state(), Blocker::SignalBlocked);
                }
            }
        }
    }

    fn try_finish(&mut self) -> bool {
        let tids = live_tids();
        let mut states = Vec::with_capacity(tids.len());
        for tid in &tids {
            match registry::find(*tid) {
                Some(slot) => states.push(slot.state()),
                None => return false,
            }
        }
        let Some(done) = self.universe.poll(states) else {
            return false;
        };
        let p = self.pending.take().expect("a transition was pending");
        let elapsed = p.started.elapsed();
        // Every thread runs the steady version: jump straight to it.
        for (entry, v) in &done.steady {
            if let Err(e) = self.patcher.set_fast_path(*entry, Some(*v)) {
                warn!(entry, error = %e, "fast path not installed; the stub stays");
            }
        }
        for (entry, _) in &done.released {
            if let Err(e) = self.patcher.remove(*entry) {
                warn!(entry, error = %e, "site not removed");
            }
            self.sites.retain(|s| s.entry() != *entry);
            self.bodies.retain(|b| b.0 != *entry);
        }
        let _ = self.patcher.reclaim();
        let result = if done.reversed {
            OutcomeKind::Reversed
        } else {
            OutcomeKind::Completed
        };
        match (p.kind, done.reversed, p.applying) {
            (Kind::Apply, false, Some(module)) => {
                let _ = module.loaded.post_apply();
                self.modules.push(module);
            }
            (Kind::Apply, true, Some(module)) => {
                // The reversed transition left every thread on `from`, its sites are settled
                // back (removed or on earlier versions) and reclaim swept every thread out of
                // the stubs: nothing runs or will call the module's code.
                unload(module.loaded);
            }
            (Kind::Revert, false, _) => {
                if let Some(module) = self.modules.pop() {
                    let _ = module.loaded.post_revert();
                    // The revert completed: nothing runs the module.
                    unload(module.loaded);
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
        });
        true
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
            let tids = live_tids();
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
                    blocker: th.last_blocker.map(|b| describe_blocker(b, &p.names)),
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
            })
        });
        Status {
            pid: std::process::id(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            patches,
            transition,
            last: self.last.clone(),
            handler: crate::timing::HANDLER.snapshot(),
            halted: crate::timing::HALTED.snapshot(),
            unwind_index_bytes: self.index.as_ref().map_or(0, |i| i.heap_bytes() as u64),
        }
    }
}

/// The name of the function at `entry`, as the manifest of one of `modules` gives it.
fn function_name<'a>(modules: impl IntoIterator<Item = &'a Module>, entry: u64) -> String {
    modules
        .into_iter()
        .flat_map(|m| m.functions.iter())
        .find(|f| f.1 == entry)
        .map_or_else(|| format!("{entry:#x}"), |f| f.0.clone())
}

/// Opens a patch module in this process.
#[allow(unsafe_code)]
fn open_module(path: &Path) -> Result<Loaded, AgentError> {
    // SAFETY: the operator chose to load this module into the process; its initialisers run
    // here (PATCH-AUTHORING.md: a module has no constructors that need its references).
    Ok(unsafe { Loaded::open(path)? })
}

/// Unloads a module. The caller has made sure no thread runs, or will call, its code: no
/// site points into it, and every thread was seen outside its functions.
#[allow(unsafe_code)]
fn unload(module: Loaded) {
    // SAFETY: the caller's guarantee above is `Loaded::close`'s contract.
    if let Err(e) = unsafe { module.close() } {
        warn!(error = %e, "module not unloaded");
    }
}

/// A replaced function: name, old entry, new entry, new code range, old size.
type PlannedFunction = (String, u64, u64, (u64, u64), u64);

struct ApplyPlan {
    spec: PatchSpec,
    analyses: Vec<(kgpatch_redirect::SiteAnalysis, u64)>,
    functions: Vec<PlannedFunction>,
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

/// The living threads of the process.
pub fn live_tids() -> Vec<u32> {
    sweep::list_threads()
        .map(|v| v.into_iter().map(|t| t as u32).collect())
        .unwrap_or_default()
}

fn thread_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}
