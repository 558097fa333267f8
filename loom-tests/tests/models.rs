//! Loom models of the universe protocol. See the crate docs for how to run them.
//!
//! Each worker runs "requests": between two boundaries it calls patched `f` then `g`. A
//! version is an index into `Bodies`, whose contents the driver writes (as a module's code is
//! loaded) before publishing it: loom reports any read of a body that is not ordered after its
//! write, which is what "a version pointer that is not fully published" means.

#![cfg(kgpatch_loom)]

use kgpatch_universe::*;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

const F: SiteKey = 0x10;
const G: SiteKey = 0x20;
const F0: Version = Version(0);
const G0: Version = Version(1);
const F1: Version = Version(2);
const G1: Version = Version(3);
/// Workers in the apply and reversal models (plus the driver).
const WORKERS: usize = 3;

/// Function bodies: index = version. Originals exist from the start; the driver writes the
/// new ones before it applies the patch.
struct Bodies([UnsafeCell<u64>; 4]);

// SAFETY: loom's UnsafeCell checks every access for races; the model relies on that.
unsafe impl Sync for Bodies {}

impl Bodies {
    fn new() -> Bodies {
        Bodies([
            UnsafeCell::new(100),
            UnsafeCell::new(101),
            UnsafeCell::new(0),
            UnsafeCell::new(0),
        ])
    }

    fn load_module(&self) {
        // SAFETY: loom tracks this write; readers must be ordered after it.
        self.0[F1.0 as usize].with_mut(|p| unsafe { *p = 102 });
        // SAFETY: as above.
        self.0[G1.0 as usize].with_mut(|p| unsafe { *p = 103 });
    }

    fn run(&self, v: Version) -> u64 {
        // SAFETY: loom reports a read that races with the module's write.
        let got = self.0[v.0 as usize].with(|p| unsafe { *p });
        assert_eq!(got, 100 + v.0, "ran {v:?} before it was published");
        got
    }
}

struct World {
    gate: Arc<Gate>,
    f: Arc<Site>,
    g: Arc<Site>,
    bodies: Arc<Bodies>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Old,
    New,
}

impl World {
    fn new() -> World {
        World {
            gate: Arc::new(Gate::new()),
            f: Arc::new(Site::new_steady(F0)),
            g: Arc::new(Site::new_steady(G0)),
            bodies: Arc::new(Bodies::new()),
        }
    }

    fn worker(&self) -> Worker {
        Worker {
            f: self.f.clone(),
            g: self.g.clone(),
            gate: self.gate.clone(),
            bodies: self.bodies.clone(),
        }
    }

    fn universe(&self) -> Universe<Arc<Site>, Arc<Gate>> {
        Universe::new(self.gate.clone())
    }

    /// Loads the module and begins the transition that applies it.
    fn apply(&self, u: &mut Universe<Arc<Site>, Arc<Gate>>) -> u64 {
        self.bodies.load_module();
        let spec = PatchSpec {
            name: "fix".into(),
            functions: vec![
                FunctionPatch { site: F, new: F1 },
                FunctionPatch { site: G, new: G1 },
            ],
        };
        let mut sites = vec![
            NewSite {
                key: F,
                site: self.f.clone(),
                original: F0,
            },
            NewSite {
                key: G,
                site: self.g.clone(),
                original: G0,
            },
        ];
        u.begin_apply(spec, &mut sites, 0).unwrap()
    }
}

struct Worker {
    f: Arc<Site>,
    g: Arc<Site>,
    gate: Arc<Gate>,
    bodies: Arc<Bodies>,
}

impl Worker {
    /// One request between two boundaries: `f` then `g`, both of one universe.
    fn request(&self, me: &ThreadState) -> Seen {
        let vf = select(me.word(), &self.f);
        self.bodies.run(vf);
        let vg = select(me.word(), &self.g);
        self.bodies.run(vg);
        match (vf, vg) {
            (F0, G0) => Seen::Old,
            (F1, G1) => Seen::New,
            mix => panic!("a request mixed universes: {mix:?}"),
        }
    }

    /// A boundary: the worker's stack holds no patched frame here, so the check is clean.
    fn boundary(&self, me: &ThreadState) -> Migration {
        self.gate.migrate(me, |_, _| Check::Clean)
    }
}

fn spawn_worker(
    w: Worker,
    me: Arc<ThreadState>,
    body: impl FnOnce(&Worker, &ThreadState) + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || body(&w, &me))
}

/// Invariants 1, 2, 3 and 4: per-request consistency, publication, monotonicity, and
/// completion only when every worker migrated — over start, migration and completion.
fn apply_model(wrong_order: bool) {
    loom::model(move || {
        let world = World::new();
        let threads: Vec<Arc<ThreadState>> =
            (0..WORKERS).map(|_| Arc::new(ThreadState::new())).collect();
        let handles: Vec<_> = threads
            .iter()
            .map(|me| {
                spawn_worker(world.worker(), me.clone(), |w, me| {
                    let before = w.request(me);
                    let moved = w.boundary(me);
                    let after = w.request(me);
                    if matches!(moved, Migration::Moved(_) | Migration::AlreadyThere) {
                        assert_eq!(after, Seen::New, "a migrated worker went back to `from`");
                    }
                    if before == Seen::New {
                        assert_eq!(after, Seen::New, "a worker went back to `from`");
                    }
                })
            })
            .collect();

        let mut u = world.universe();
        if wrong_order {
            u.use_wrong_settle_order_for_tests();
        }
        let t = world.apply(&mut u);
        // One early attempt to complete, racing with the workers.
        let mut done = u.poll(threads.iter().map(|t| &**t));
        if done.is_some() {
            for th in &threads {
                assert_eq!(th.word(), word::migrated_value(t), "completed too early");
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        if done.is_none() {
            // A worker whose boundary came before the gate opened moves at its next one.
            for th in &threads {
                world.gate.migrate(th, |_, _| Check::Clean);
            }
            done = u.poll(threads.iter().map(|t| &**t));
        }
        let done = done.expect("every worker passed a boundary: the transition completes");
        assert!(!done.reversed);
        assert_eq!(world.f.steady_version(), Some(F1));
        assert_eq!(world.g.steady_version(), Some(G1));
    });
}

#[test]
fn apply_consistency_publication_completion() {
    apply_model(false);
}

/// The wrong completion order (STEADY before from = to) lets a migrated worker run the old
/// `f` after the new one: the models catch it.
#[test]
#[should_panic(expected = "a request mixed universes")]
fn wrong_settle_order_is_caught() {
    apply_model(true);
}

/// Invariant 4, second half: a worker started during the transition is consistent from its
/// first call, and counts for completion once it is known.
#[test]
fn thread_started_during_the_transition() {
    loom::model(|| {
        let world = World::new();
        let old = Arc::new(ThreadState::new());
        let old_worker = spawn_worker(world.worker(), old.clone(), |w, me| {
            w.request(me);
            w.boundary(me);
            w.request(me);
        });
        let mut u = world.universe();
        let t = world.apply(&mut u);
        let young = Arc::new(ThreadState::new());
        let young_worker = spawn_worker(world.worker(), young.clone(), move |w, me| {
            assert!(matches!(
                w.gate.thread_start(me),
                Migration::Moved(Side::To)
            ));
            assert_eq!(
                w.request(me),
                Seen::New,
                "a new thread starts in the goal universe"
            );
        });
        young_worker.join().unwrap();
        old_worker.join().unwrap();
        assert_eq!(young.word(), word::migrated_value(t));
        // The old worker's boundary may have come before the gate opened.
        world.gate.migrate(&old, |_, _| Check::Clean);
        assert!(u.poll([&*old, &*young]).is_some());
    });
}

/// Invariant 5 and the in-flight rule: a reversal mid-transition, racing with workers that
/// migrate, ends with every worker on `from` and every site steady at the original; a worker
/// that read the old goal just before the reversal can never make the driver settle while
/// it is about to enter `to`.
#[test]
fn reversal_mid_transition() {
    loom::model(|| {
        let world = World::new();
        let threads: Vec<Arc<ThreadState>> =
            (0..WORKERS).map(|_| Arc::new(ThreadState::new())).collect();
        let handles: Vec<_> = threads
            .iter()
            .map(|me| {
                spawn_worker(world.worker(), me.clone(), |w, me| {
                    w.boundary(me);
                    w.request(me);
                    w.boundary(me);
                    w.request(me);
                })
            })
            .collect();
        let mut u = world.universe();
        world.apply(&mut u);
        assert_eq!(u.reverse().unwrap(), Side::From);
        // Racing attempt: if it completes, the workers must still be consistent after it
        // (their requests assert that).
        let mut done = u.poll(threads.iter().map(|t| &**t));
        for h in handles {
            h.join().unwrap();
        }
        if done.is_none() {
            done = u.poll(threads.iter().map(|t| &**t));
        }
        // A worker that moved to `to` before the reversal and then passed one more boundary
        // came back; one that did not may still be in `to`: move it back now.
        if done.is_none() {
            for th in &threads {
                world.gate.migrate(th, |_, _| Check::Clean);
            }
            done = u.poll(threads.iter().map(|t| &**t));
        }
        let done = done.expect("all workers are back on `from`");
        assert!(done.reversed);
        assert_eq!(world.f.steady_version(), Some(F0));
        assert_eq!(world.g.steady_version(), Some(G0));
        for th in &threads {
            assert_eq!(select(th.word(), &world.f), F0);
            assert_eq!(select(th.word(), &world.g), G0);
        }
    });
}

/// `force` lifts the stack check but not the boundary rule: requests stay consistent.
#[test]
fn force_keeps_requests_consistent() {
    loom::model(|| {
        let world = World::new();
        let me = Arc::new(ThreadState::new());
        let worker = spawn_worker(world.worker(), me.clone(), |w, me| {
            // The worker's stack check always says busy; only force can move it.
            let busy = |_, _| Check::Blocked(Blocker::Busy { site: 0, depth: 1 });
            w.request(me);
            let moved = w.gate.migrate(me, busy);
            let after = w.request(me);
            if moved == Migration::Moved(Side::To) {
                assert_eq!(after, Seen::New);
            }
        });
        let mut u = world.universe();
        world.apply(&mut u);
        u.force().unwrap();
        worker.join().unwrap();
        if u.poll([&*me]).is_none() {
            world
                .gate
                .migrate(&me, |_, _| Check::Blocked(Blocker::SignalBlocked));
            assert!(
                u.poll([&*me]).is_some(),
                "a forced worker moves at its next boundary"
            );
        }
    });
}

/// The kernel's view of tid 7 in the registry models: which incarnation holds it (0 = none).
/// A listing of the process's threads is a load of it.
struct Kernel(loom::sync::atomic::AtomicU64);

impl Kernel {
    fn list(&self) -> Vec<u32> {
        match self.0.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Vec::new(),
            _ => vec![TID],
        }
    }

    fn set(&self, incarnation: u64) {
        self.0
            .store(incarnation, std::sync::atomic::Ordering::SeqCst);
    }

    fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

const TID: u32 = 7;
/// Registry capacity under loom: two slots, so reuse and probing both happen.
type SmallRegistry = Registry<2>;

/// Claim, exit, tid reuse and completion: thread A (tid 7) claims its slot, migrates and
/// exits (its exit hook frees the slot); thread B is then born with the reused tid 7, claims
/// and passes a boundary. The driver reclaims and polls for completion meanwhile. Whenever
/// the driver completes while B holds tid 7, B's stack was checked first: the registry never
/// shows B's tid with a state that is not B's. With `broken`, the old claim (tid published
/// before the word is adopted) and the old release (state not reset) are used: the model
/// catches a completion that skipped B.
fn registry_model(broken: bool) {
    loom::model(move || {
        let world = World::new();
        let reg = Arc::new(SmallRegistry::new());
        let kernel = Arc::new(Kernel(loom::sync::atomic::AtomicU64::new(1)));
        let b_checked = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let mut u = world.universe();
        let t = world.apply(&mut u);
        let life = {
            let (reg, kernel, b_checked, gate) = (
                reg.clone(),
                kernel.clone(),
                b_checked.clone(),
                world.gate.clone(),
            );
            thread::spawn(move || {
                let claim = |word: u64| {
                    if broken {
                        reg.claim_tid_first_for_tests(TID, word)
                    } else {
                        reg.claim(TID, word).ok()
                    }
                };
                // Thread A: its TLS word starts at 0.
                let a = claim(0).expect("a slot for A");
                gate.migrate(a.state(), |_, _| Check::Clean);
                // A exits: its exit hook frees the slot, then the kernel frees tid 7.
                if broken {
                    reg.release_without_reset_for_tests(TID);
                } else {
                    reg.release(TID);
                }
                kernel.set(0);
                // Thread B, born with the reused tid 7 and a fresh TLS word 0.
                kernel.set(2);
                let Some(b) = claim(0) else {
                    return;
                };
                gate.migrate(b.state(), |_, _| {
                    b_checked.store(true, std::sync::atomic::Ordering::SeqCst);
                    Check::Clean
                });
            })
        };
        // The driver: reclaim, then one attempt to complete, racing with both lives.
        reg.reclaim(|| Some(kernel.list()));
        let alive = kernel.get();
        let states: Option<Vec<&ThreadState>> = kernel
            .list()
            .iter()
            .map(|&tid| reg.find(tid).map(Slot::state))
            .collect();
        if let Some(states) = states {
            if u.poll(states).is_some() && alive == 2 {
                assert!(
                    b_checked.load(std::sync::atomic::Ordering::SeqCst),
                    "completed with thread B (reused tid) never checked"
                );
            }
        }
        life.join().unwrap();
        let _ = t;
    });
}

#[test]
fn registry_claim_exit_reuse_completion() {
    registry_model(false);
}

#[test]
#[should_panic(expected = "never checked")]
fn registry_old_claim_is_caught() {
    registry_model(true);
}

/// Reclaim racing with tid reuse: thread A (tid 7) exits without freeing its slot (a thread
/// the start hook never saw), and B is born with tid 7 while the driver reads the keys, lists
/// the threads and reclaims. B keeps a live slot of its own with its own word, whichever
/// order the steps take: a reclaim decided on A's key never frees B's slot.
#[test]
fn registry_reclaim_never_frees_a_reused_tid() {
    loom::model(|| {
        let reg = Arc::new(SmallRegistry::new());
        let kernel = Arc::new(Kernel(loom::sync::atomic::AtomicU64::new(1)));
        reg.claim(TID, 5).unwrap();
        // A exits without its hook.
        kernel.set(0);
        let b = {
            let (reg, kernel) = (reg.clone(), kernel.clone());
            thread::spawn(move || {
                // B is born with tid 7 and TLS word 0.
                kernel.set(2);
                let slot = reg.claim(TID, 0).expect("B gets a slot") as *const Slot as usize;
                slot
            })
        };
        reg.reclaim(|| Some(kernel.list()));
        let b_slot = b.join().unwrap();
        let found = reg.find(TID).expect("B's slot is live");
        assert_eq!(found as *const Slot as usize, b_slot, "B lost its slot");
        assert_eq!(found.state().word(), 0, "B's slot holds B's word");
        assert_eq!(reg.live().count(), 1);
    });
}
