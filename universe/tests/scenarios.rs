//! Scripted scenarios: each names the rule it pins.

use std::sync::Arc;

use kgpatch_universe::*;

type U = Universe<Arc<Site>, Arc<Gate>>;

const F: SiteKey = 0x1000;
const G: SiteKey = 0x2000;
const F0: Version = Version(0x1_0000);
const G0: Version = Version(0x2_0000);

fn universe() -> U {
    Universe::new(Arc::new(Gate::new()))
}

fn new_sites(u: &U, spec: &PatchSpec) -> Vec<NewSite<Arc<Site>>> {
    u.sites_needed(spec)
        .into_iter()
        .map(|key| {
            let original = if key == F { F0 } else { G0 };
            NewSite {
                key,
                site: Arc::new(Site::new_steady(original)),
                original,
            }
        })
        .collect()
}

fn spec(name: &str, fns: &[(SiteKey, u64)]) -> PatchSpec {
    PatchSpec {
        name: name.into(),
        functions: fns
            .iter()
            .map(|&(site, v)| FunctionPatch {
                site,
                new: Version(v),
            })
            .collect(),
    }
}

fn apply(u: &mut U, s: PatchSpec) -> u64 {
    let mut sites = new_sites(u, &s);
    let t = u.begin_apply(s, &mut sites, 0).unwrap();
    assert!(sites.is_empty());
    t
}

fn run(u: &U, th: &ThreadState, key: SiteKey) -> Version {
    select(th.word(), u.site(key).unwrap())
}

#[test]
fn apply_migrate_complete() {
    let mut u = universe();
    let a = ThreadState::new();
    let b = ThreadState::new();
    let t = apply(&mut u, spec("fix", &[(F, 0xf1), (G, 0xf2)]));
    assert_eq!(t, 1);
    // Nobody migrated: everyone runs the originals.
    assert_eq!(run(&u, &a, F), F0);
    assert_eq!(run(&u, &a, G), G0);
    assert!(u.poll([&a, &b]).is_none());

    assert_eq!(
        u.gate().migrate(&a, |_, _| Check::Clean),
        Migration::Moved(Side::To)
    );
    assert_eq!(run(&u, &a, F), Version(0xf1));
    assert_eq!(run(&u, &a, G), Version(0xf2));
    assert_eq!(run(&u, &b, F), F0);
    let p = u.progress([(1, &a), (2, &b)]).unwrap();
    assert_eq!((p.migrated, p.total), (1, 2));
    assert!(u.poll([&a, &b]).is_none());

    u.gate().migrate(&b, |_, _| Check::Clean);
    let done = u.poll([&a, &b]).unwrap();
    assert!(!done.reversed);
    assert_eq!(done.steady, vec![(F, Version(0xf1)), (G, Version(0xf2))]);
    assert!(done.released.is_empty());
    assert!(u.transition().is_none());
    // A thread of unknown origin runs the new code once steady.
    assert_eq!(run(&u, &ThreadState::new(), F), Version(0xf1));
    assert_eq!(u.patches().len(), 1);
}

#[test]
fn blocked_thread_records_attempts_and_blocker() {
    let mut u = universe();
    let a = ThreadState::new();
    apply(&mut u, spec("fix", &[(F, 0xf1)]));
    let busy = Blocker::Busy { site: 0, depth: 3 };
    for _ in 0..3 {
        assert_eq!(
            u.gate().migrate(&a, |_, _| Check::Blocked(busy)),
            Migration::Blocked(busy)
        );
    }
    let p = u.progress([(7, &a)]).unwrap();
    assert_eq!(p.threads[0].attempts, 3);
    assert_eq!(p.threads[0].last_blocker, Some(busy));
    assert_eq!(p.threads[0].side, Side::From);
}

#[test]
fn the_check_is_told_where_the_thread_goes() {
    let mut u = universe();
    let a = ThreadState::new();
    let t = apply(&mut u, spec("fix", &[(F, 0xf1)]));
    u.gate().migrate(&a, |tt, side| {
        assert_eq!((tt, side), (t, Side::To));
        Check::Clean
    });
    assert_eq!(
        u.transition().unwrap().leaving().collect::<Vec<_>>(),
        vec![(0, F0)]
    );
    u.reverse().unwrap();
    assert_eq!(
        u.transition().unwrap().leaving().collect::<Vec<_>>(),
        vec![(0, Version(0xf1))]
    );
    u.gate().migrate(&a, |tt, side| {
        assert_eq!((tt, side), (t, Side::From));
        Check::Clean
    });
}

#[test]
fn reversal_mid_transition_returns_everyone_and_releases_new_sites() {
    let mut u = universe();
    let a = ThreadState::new();
    let b = ThreadState::new();
    apply(&mut u, spec("fix", &[(F, 0xf1)]));
    u.gate().migrate(&a, |_, _| Check::Clean);
    assert_eq!(u.reverse().unwrap(), Side::From);
    // b never moved, a must come back.
    assert!(u.poll([&a, &b]).is_none());
    assert_eq!(
        run(&u, &a, F),
        Version(0xf1),
        "a stays in `to` until it moves back"
    );
    assert_eq!(
        u.gate().migrate(&a, |_, _| Check::Clean),
        Migration::Moved(Side::From)
    );
    assert_eq!(run(&u, &a, F), F0);
    let done = u.poll([&a, &b]).unwrap();
    assert!(done.reversed);
    assert_eq!(
        done.released.len(),
        1,
        "a site nobody patches any more is handed back"
    );
    assert!(u.patches().is_empty());
    assert!(u.site(F).is_none());
}

#[test]
fn revert_only_the_top_patch() {
    let mut u = universe();
    let a = ThreadState::new();
    apply(&mut u, spec("one", &[(F, 0xf1)]));
    u.gate().migrate(&a, |_, _| Check::Clean);
    u.poll([&a]).unwrap();
    apply(&mut u, spec("two", &[(F, 0xf2), (G, 0xf3)]));
    u.gate().migrate(&a, |_, _| Check::Clean);
    u.poll([&a]).unwrap();
    assert_eq!(run(&u, &a, F), Version(0xf2));

    let err = u.begin_revert("one", 0).unwrap_err();
    assert_eq!(
        err,
        UniverseError::NotOnTop {
            name: "one".into(),
            top: "two".into()
        }
    );
    assert!(err.to_string().contains("revert `two` first"));
    assert_eq!(
        u.begin_revert("zero", 0).unwrap_err(),
        UniverseError::UnknownPatch("zero".into())
    );

    let t = u.begin_revert("two", 0).unwrap();
    assert_eq!(t, 3);
    let moves = &u.transition().unwrap().sites;
    assert_eq!(
        moves[0].to,
        Version(0xf1),
        "F goes back to patch one's version"
    );
    assert_eq!(moves[1].to, G0, "G goes back to its original");
    u.gate().migrate(&a, |_, _| Check::Clean);
    let done = u.poll([&a]).unwrap();
    assert_eq!(done.steady, vec![(F, Version(0xf1))]);
    assert_eq!(
        done.released.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![G]
    );
    assert_eq!(run(&u, &a, F), Version(0xf1));
}

#[test]
fn one_transition_at_a_time() {
    let mut u = universe();
    apply(&mut u, spec("one", &[(F, 0xf1)]));
    let s = spec("two", &[(G, 0xf2)]);
    let mut sites = new_sites(&u, &s);
    let err = u.begin_apply(s, &mut sites, 0).unwrap_err();
    assert!(matches!(
        err,
        UniverseError::TransitionInProgress { t: 1, .. }
    ));
    assert_eq!(sites.len(), 1, "nothing taken on error");
    assert!(u.site(G).is_none(), "nothing registered on error");
}

#[test]
fn bad_patches_are_refused_whole() {
    let mut u = universe();
    let cases = [
        (spec("e", &[]), "replaces no function"),
        (spec("d", &[(F, 1), (F, 2)]), "twice"),
        (spec("n", &[(F, 0)]), "null replacement"),
    ];
    for (s, msg) in cases {
        let mut sites = new_sites(&u, &s);
        let err = u.begin_apply(s, &mut sites, 0).unwrap_err();
        assert!(err.to_string().contains(msg), "{err}");
        assert!(u.transition().is_none());
    }
    // A missing prepared site.
    let err = u
        .begin_apply(spec("m", &[(F, 1)]), &mut Vec::new(), 0)
        .unwrap_err();
    assert_eq!(err, UniverseError::MissingSite(F));
    assert_eq!(
        u.last_transition_number(),
        0,
        "refusals use no transition number"
    );
}

#[test]
fn force_lifts_the_check_but_moves_only_at_a_boundary() {
    let mut u = universe();
    let a = ThreadState::new();
    let b = ThreadState::new();
    apply(&mut u, spec("fix", &[(F, 0xf1)]));
    let busy = |_, _| Check::Blocked(Blocker::Busy { site: 0, depth: 1 });
    assert!(matches!(u.gate().migrate(&a, busy), Migration::Blocked(_)));
    u.force().unwrap();
    assert!(u.gate().state().forced);
    // Nothing moved yet: words change only at a thread's own boundary.
    assert_eq!(run(&u, &b, F), F0);
    assert!(u.poll([&a, &b]).is_none());
    assert_eq!(u.gate().migrate(&a, busy), Migration::Moved(Side::To));
    assert_eq!(u.gate().migrate(&b, busy), Migration::Moved(Side::To));
    assert!(u.poll([&a, &b]).is_some());
    assert_eq!(u.force().unwrap_err(), UniverseError::NoTransition);
}

#[test]
fn reversal_lifts_force() {
    let mut u = universe();
    let a = ThreadState::new();
    apply(&mut u, spec("fix", &[(F, 0xf1)]));
    u.force().unwrap();
    u.gate().migrate(&a, |_, _| Check::Clean);
    u.reverse().unwrap();
    assert!(!u.gate().state().forced);
    let busy = |_, _| Check::Blocked(Blocker::Busy { site: 0, depth: 0 });
    assert!(matches!(u.gate().migrate(&a, busy), Migration::Blocked(_)));
}

#[test]
fn new_thread_enters_the_goal_universe() {
    let mut u = universe();
    let gate = u.gate();
    let a = ThreadState::new();
    assert_eq!(gate.thread_start(&a), Migration::Idle);
    apply(&mut u, spec("fix", &[(F, 0xf1)]));
    let b = ThreadState::new();
    assert_eq!(u.gate().thread_start(&b), Migration::Moved(Side::To));
    assert_eq!(run(&u, &b, F), Version(0xf1));
    u.reverse().unwrap();
    let c = ThreadState::new();
    assert_eq!(u.gate().thread_start(&c), Migration::AlreadyThere);
    assert_eq!(run(&u, &c, F), F0);
}

#[test]
fn quiescent_fast_path() {
    let mut u = universe();
    let a = ThreadState::new();
    assert!(u.gate().is_settled_for(a.word()));
    apply(&mut u, spec("fix", &[(F, 0xf1)]));
    assert!(!u.gate().is_settled_for(a.word()));
    u.gate().migrate(&a, |_, _| Check::Clean);
    assert!(u.gate().is_settled_for(a.word()));
    u.poll([&a]).unwrap();
    assert!(u.gate().is_settled_for(a.word()));
}

#[test]
fn transition_numbers_are_never_reused() {
    let mut u = universe();
    let a = ThreadState::new();
    let mut last = 0;
    for i in 0..5 {
        let t = apply(&mut u, spec(&format!("p{i}"), &[(F, 0x100 + i)]));
        assert!(t > last);
        last = t;
        u.reverse().unwrap();
        u.poll([&a]).unwrap();
    }
}
