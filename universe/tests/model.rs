//! Property test: random sequences of apply, revert, calls into patched functions, returns,
//! migration, thread start, quiescent points, force, reversal and completion, run against
//! the real `Universe` and checked against an independent model after every step.
//!
//! Invariants checked:
//! - a thread's calls select one side for every site of the transition in force;
//! - a thread on a side holds no frame in the other side's versions (unless it was forced);
//! - with no transition, every site is steady at the version the model's patch stack says;
//! - a refused operation changes nothing; nothing panics;
//! - transition numbers strictly increase.

use std::sync::Arc;

use kgpatch_universe::*;
use proptest::prelude::*;

const KEYS: [SiteKey; 3] = [0x1000, 0x2000, 0x3000];

fn original(key: SiteKey) -> Version {
    Version(key << 8)
}

#[derive(Clone, Debug)]
enum Op {
    Apply { name: u8, sites: Vec<usize> },
    Revert { name: u8 },
    Call { thread: usize, site: usize },
    Return { thread: usize },
    Migrate { thread: usize },
    Quiescent { thread: usize },
    StartThread,
    Reverse,
    Force,
    Poll,
}

fn op() -> impl Strategy<Value = Op> {
    let th = 0usize..4;
    prop_oneof![
        2 => (0u8..4, prop::collection::vec(0usize..3, 0..4))
            .prop_map(|(name, sites)| Op::Apply { name, sites }),
        1 => (0u8..4).prop_map(|name| Op::Revert { name }),
        4 => (th.clone(), 0usize..3).prop_map(|(thread, site)| Op::Call { thread, site }),
        3 => th.clone().prop_map(|thread| Op::Return { thread }),
        4 => th.clone().prop_map(|thread| Op::Migrate { thread }),
        2 => th.prop_map(|thread| Op::Quiescent { thread }),
        1 => Just(Op::StartThread),
        1 => Just(Op::Reverse),
        1 => Just(Op::Force),
        3 => Just(Op::Poll),
    ]
}

struct Thread {
    state: ThreadState,
    frames: Vec<Version>,
    forced: bool,
}

struct World {
    u: Universe<Arc<Site>, Arc<Gate>>,
    threads: Vec<Thread>,
    /// The model's own patch stack: name and (site, version) pairs.
    stack: Vec<(String, Vec<(SiteKey, Version)>)>,
    next_version: u64,
    last_t: u64,
}

/// What must not change when an operation is refused.
#[derive(Debug, PartialEq)]
struct Snapshot {
    patches: Vec<String>,
    transition: Option<Transition>,
    sites: Vec<(SiteKey, SiteWords)>,
}

impl World {
    fn new() -> World {
        World {
            u: Universe::new(Arc::new(Gate::new())),
            threads: (0..2)
                .map(|_| Thread {
                    state: ThreadState::new(),
                    frames: vec![],
                    forced: false,
                })
                .collect(),
            stack: vec![],
            next_version: 1,
            last_t: 0,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            patches: self
                .u
                .patches()
                .iter()
                .map(|p| p.spec.name.clone())
                .collect(),
            transition: self.u.transition().cloned(),
            sites: self
                .u
                .site_keys()
                .map(|k| (k, self.u.site(k).unwrap().words()))
                .collect(),
        }
    }

    fn model_version(&self, key: SiteKey) -> Version {
        self.stack
            .iter()
            .rev()
            .find_map(|(_, fns)| fns.iter().find(|f| f.0 == key).map(|f| f.1))
            .unwrap_or(original(key))
    }

    fn check_of(&self, i: usize) -> impl Fn(u64, Side) -> Check + '_ {
        move |_, _| {
            let tr = self.u.transition().unwrap();
            for (site, v) in tr.leaving() {
                if let Some(depth) = self.threads[i].frames.iter().rev().position(|f| *f == v) {
                    return Check::Blocked(Blocker::Busy {
                        site: site as u32,
                        depth: depth as u16,
                    });
                }
            }
            Check::Clean
        }
    }

    fn step(&mut self, op: Op) {
        let before = self.snapshot();
        let refused = match op {
            Op::Apply { name, sites } => {
                let spec = PatchSpec {
                    name: format!("p{name}"),
                    functions: sites
                        .iter()
                        .map(|&s| {
                            self.next_version += 1;
                            FunctionPatch {
                                site: KEYS[s],
                                new: Version(self.next_version),
                            }
                        })
                        .collect(),
                };
                let mut new: Vec<_> = self
                    .u
                    .sites_needed(&spec)
                    .into_iter()
                    .map(|key| NewSite {
                        key,
                        site: Arc::new(Site::new_steady(original(key))),
                        original: original(key),
                    })
                    .collect();
                let n = new.len();
                match self.u.begin_apply(spec, &mut new, 0) {
                    Ok(t) => {
                        assert!(t > self.last_t, "transition numbers increase");
                        self.last_t = t;
                        assert!(new.is_empty());
                        false
                    }
                    Err(_) => {
                        assert_eq!(new.len(), n, "a refused apply takes no site");
                        true
                    }
                }
            }
            Op::Revert { name } => match self.u.begin_revert(&format!("p{name}"), 0) {
                Ok(t) => {
                    assert!(t > self.last_t);
                    self.last_t = t;
                    false
                }
                Err(e) => {
                    let top = self.stack.last().map(|p| p.0.clone());
                    if self.u.transition().is_none() && top == Some(format!("p{name}")) {
                        panic!("revert of the top patch refused: {e}");
                    }
                    true
                }
            },
            Op::Call { thread, site } => {
                if let (Some(th), Some(s)) = (self.threads.get(thread), self.u.site(KEYS[site])) {
                    let v = select(th.state.word(), s);
                    if th.frames.len() < 6 {
                        self.threads[thread].frames.push(v);
                    }
                }
                false
            }
            Op::Return { thread } => {
                if let Some(th) = self.threads.get_mut(thread) {
                    th.frames.pop();
                    if th.frames.is_empty() {
                        th.forced = false;
                    }
                }
                false
            }
            Op::Migrate { thread } => {
                if thread < self.threads.len() {
                    let forced = self.u.gate().state().forced;
                    let out = self
                        .u
                        .gate()
                        .migrate(&self.threads[thread].state, self.check_of(thread));
                    if self.u.transition().is_none() {
                        assert_eq!(out, Migration::Idle);
                    }
                    if let Migration::Moved(_) = out {
                        let th = &mut self.threads[thread];
                        th.forced |= forced && !th.frames.is_empty();
                    }
                }
                false
            }
            Op::Quiescent { thread } => {
                // A quiescent point is where the thread holds no patched frame.
                if let Some(th) = self.threads.get(thread) {
                    if th.frames.is_empty() && !self.u.gate().is_settled_for(th.state.word()) {
                        let out = self.u.gate().migrate(&th.state, |_, _| Check::Clean);
                        assert!(matches!(out, Migration::Moved(_)), "{out:?}");
                        assert!(self.u.gate().is_settled_for(th.state.word()));
                    }
                }
                false
            }
            Op::StartThread => {
                if self.threads.len() < 4 {
                    let state = ThreadState::new();
                    self.u.gate().thread_start(&state);
                    if let Some(tr) = self.u.transition() {
                        assert_eq!(Side::of_word(state.word(), tr.t), tr.goal);
                    }
                    self.threads.push(Thread {
                        state,
                        frames: vec![],
                        forced: false,
                    });
                }
                false
            }
            Op::Reverse => self.u.reverse().is_err(),
            Op::Force => self.u.force().is_err(),
            Op::Poll => {
                let tr = self.u.transition().cloned();
                if let Some(done) = self.u.poll(self.threads.iter().map(|t| &t.state)) {
                    let tr = tr.unwrap();
                    assert_eq!(done.transition.t, tr.t);
                    for th in &self.threads {
                        assert_eq!(Side::of_word(th.state.word(), tr.t), tr.goal);
                    }
                    if !done.reversed {
                        match tr.kind {
                            TransitionKind::Apply => self.stack.push((
                                tr.patch.clone(),
                                tr.sites.iter().map(|m| (m.site, m.to)).collect(),
                            )),
                            TransitionKind::Revert => {
                                assert_eq!(self.stack.pop().unwrap().0, tr.patch);
                            }
                        }
                    }
                    for (key, _) in &done.released {
                        assert!(self.stack.iter().all(|p| p.1.iter().all(|f| f.0 != *key)));
                    }
                }
                false
            }
        };
        if refused {
            assert_eq!(before, self.snapshot(), "a refused operation changed state");
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        let names: Vec<_> = self.stack.iter().map(|p| p.0.clone()).collect();
        let patches: Vec<_> = self
            .u
            .patches()
            .iter()
            .map(|p| p.spec.name.clone())
            .collect();
        assert_eq!(names, patches, "patch stack");
        match self.u.transition() {
            None => {
                for key in self.u.site_keys() {
                    let s = self.u.site(key).unwrap();
                    assert_eq!(s.steady_version(), Some(self.model_version(key)));
                    assert_eq!(s.words().from, s.words().to);
                }
                assert!(self.u.gate().state().open.is_none());
            }
            Some(tr) => {
                let side_version = |m: &SiteMove, side| match side {
                    Side::From => m.from,
                    Side::To => m.to,
                };
                for th in &self.threads {
                    let side = Side::of_word(th.state.word(), tr.t);
                    // Every call selects the same side.
                    for m in &tr.sites {
                        let s = self.u.site(m.site).unwrap();
                        assert_eq!(select(th.state.word(), s), side_version(m, side));
                    }
                    // No frame in the other side's versions unless forced.
                    if !th.forced {
                        for m in &tr.sites {
                            let other = side_version(m, side.other());
                            if other != side_version(m, side) {
                                assert!(
                                    !th.frames.contains(&other),
                                    "thread on {side:?} holds a frame of {other:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_keep_the_invariants(ops in prop::collection::vec(op(), 1..80)) {
        let mut w = World::new();
        for op in ops {
            w.step(op);
        }
    }
}
