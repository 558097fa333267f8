//! Property test: random stack contents and registers never panic the walker, never make
//! it read outside the stack it is given, and always end within the depth bound.

use std::sync::OnceLock;

use kgpatch_stackcheck::{
    BusyRanges, Regs, StackBounds, UnreliableReason, UnwindIndex, WalkCache, WalkOutcome,
    MAX_FRAMES,
};
use proptest::prelude::*;

use crate::support::{fixture, Variant};
use crate::synthetic::BufStack;

const BASE: u64 = 0x7100_0000_0000;
const WORDS: usize = 256;

struct World {
    index: UnwindIndex,
    /// Code addresses with unwind info (fixture functions, libc, this binary).
    code: Vec<u64>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let mut code = Vec::new();
        for v in [Variant::NoFp, Variant::Fp] {
            let fx = fixture(v);
            for n in [
                "fx_leaf",
                "fx_c",
                "fx_b",
                "fx_a",
                "fx_entry",
                "fx_unused",
                "fx_nocfi",
            ] {
                let r = fx.range(n);
                code.extend([r.start, r.start + 1, (r.start + r.end) / 2, r.end - 1]);
            }
        }
        code.push(libc::getpid as unsafe extern "C" fn() -> libc::pid_t as usize as u64 + 4);
        code.push(
            libc::read as unsafe extern "C" fn(i32, *mut libc::c_void, usize) -> isize as usize
                as u64
                + 9,
        );
        code.push(world as fn() -> &'static World as usize as u64 + 12);
        World {
            index: crate::support::index(),
            code,
        }
    })
}

/// A stack word: a code address, a pointer into the fake stack, or anything.
fn word() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0usize..64, 0u64..64).prop_map(|(i, d)| {
            let c = &world().code;
            c[i % c.len()].wrapping_add(d)
        }),
        (0u64..(WORDS as u64 * 8 + 64)).prop_map(|o| BASE.wrapping_add(o).wrapping_sub(32)),
        any::<u64>(),
        Just(0u64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn random_stacks_never_panic_or_read_outside(
        words in proptest::collection::vec(word(), WORDS),
        rip in word(),
        sp_off in -64i64..(WORDS as i64 * 8 + 64),
        rbp in word(),
        busy_at in proptest::option::of(0usize..64),
    ) {
        let w = world();
        let mut stack = BufStack::new(BASE, words);
        let rsp = BASE.wrapping_add_signed(sp_off);
        let ranges = match busy_at {
            Some(i) => {
                let a = w.code[i % w.code.len()];
                BusyRanges::from_pairs([(a..a + 16, 1)]).unwrap()
            }
            None => BusyRanges::empty(),
        };
        let mut cache = WalkCache::new();
        let mut frames = [0u64; 300];
        let (o, n) = w.index.walk_with(&mut cache, &Regs::new(rip, rsp, rbp), &mut stack, &ranges, &mut frames);
        prop_assert!(n <= usize::from(MAX_FRAMES));
        match o {
            WalkOutcome::Clean { depth } => prop_assert_eq!(usize::from(depth), n),
            WalkOutcome::Busy { depth, pc, range_id } => {
                prop_assert_eq!(range_id, 1);
                prop_assert_eq!(usize::from(depth) + 1, n);
                prop_assert_eq!(frames[usize::from(depth)], pc);
            }
            WalkOutcome::Unreliable { why, .. } => {
                if why == UnreliableReason::ReadOutOfBounds {
                    prop_assert!(stack.refused > 0);
                }
            }
        }
        // The reader is the only way the walker reads stack memory; a refused read is
        // never turned into data.
        prop_assert!(stack.served <= 8 * n + 8);
    }
}

/// A page of fake stack between two inaccessible guard pages: a read outside it would
/// crash the test process with SIGSEGV.
struct Guarded {
    base: usize,
}

impl Guarded {
    fn new() -> Guarded {
        // SAFETY: a fresh private anonymous mapping of three pages; the outer two are made
        // inaccessible.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p, 4096, libc::PROT_NONE), 0);
            assert_eq!(
                libc::mprotect(p.cast::<u8>().add(2 * 4096).cast(), 4096, libc::PROT_NONE),
                0
            );
            Guarded { base: p as usize }
        }
    }

    fn page(&self) -> u64 {
        self.base as u64 + 4096
    }

    fn fill(&self, words: &[u64]) {
        // SAFETY: the middle page is readable and writable, 512 words long.
        let page = unsafe { std::slice::from_raw_parts_mut(self.page() as *mut u64, 512) };
        for (i, w) in page.iter_mut().enumerate() {
            *w = words[i % words.len()];
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new().
        unsafe { libc::munmap(self.base as *mut libc::c_void, 3 * 4096) };
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    /// The live reader over a guarded page: random contents, random registers, never a
    /// read outside the page (it would crash the process).
    #[test]
    fn live_reader_never_leaves_a_guarded_page(
        words in proptest::collection::vec(word_at(0x1000), 64),
        rip in word_at(0x1000),
        sp_off in prop_oneof![0u64..4096, 3840u64..4096],
        rbp in word_at(0x1000),
    ) {
        let w = world();
        let g = GUARD.with(|g| g.page());
        let words: Vec<u64> = words.into_iter().map(|x| relocate(x, g)).collect();
        GUARD.with(|guard| guard.fill(&words));
        // SAFETY: the page is mapped readable for the whole walk (GUARD lives as long as
        // this thread).
        let bounds = unsafe { StackBounds::new_unchecked(g, g + 4096) };
        let regs = Regs::new(relocate(rip, g), g + sp_off, relocate(rbp, g));
        let mut cache = WalkCache::new();
        let (o, n) = w.index.walk_live(&mut cache, &regs, bounds, &BusyRanges::empty(), &mut []);
        prop_assert!(n <= usize::from(MAX_FRAMES));
        if let WalkOutcome::Clean { depth } = o {
            prop_assert_eq!(usize::from(depth), n);
        }
    }
}

thread_local! {
    static GUARD: Guarded = Guarded::new();
}

/// Placeholder base for stack pointers in generated words, replaced by the real page.
const FAKE: u64 = 0x7300_0000_0000;

/// Like [`word`], with stack pointers relative to [`FAKE`] (relocated onto the page).
fn word_at(span: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0usize..64, 0u64..4).prop_map(|(i, d)| {
            let c = &world().code;
            c[i % c.len()].wrapping_add(d)
        }),
        1 => (0u64..span + 64).prop_map(|o| FAKE.wrapping_add(o).wrapping_sub(32)),
        1 => any::<u64>(),
        1 => Just(0u64),
    ]
}

fn relocate(x: u64, page: u64) -> u64 {
    if (FAKE.wrapping_sub(64)..FAKE + 0x2000).contains(&x) {
        x.wrapping_sub(FAKE).wrapping_add(page)
    } else {
        x
    }
}
