//! Synthetic register contexts over fake stacks: corrupted stack pointers and return
//! addresses must give Unreliable, never a crash or a read outside the fake stack.

use kgpatch_stackcheck::{
    BusyRanges, Regs, StackReader, UnreliableReason, UnwindIndex, WalkCache, WalkOutcome,
};

use crate::support::{fixture, index, Variant};

/// A fake stack at `base`, served from a buffer; counts refused reads.
pub struct BufStack {
    pub base: u64,
    pub words: Vec<u64>,
    pub refused: usize,
    pub served: usize,
}

impl BufStack {
    pub fn new(base: u64, words: Vec<u64>) -> BufStack {
        BufStack {
            base,
            words,
            refused: 0,
            served: 0,
        }
    }

    pub fn end(&self) -> u64 {
        self.base + 8 * self.words.len() as u64
    }
}

impl StackReader for BufStack {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let ok = addr >= self.base && addr.checked_add(8).is_some_and(|e| e <= self.end());
        if !ok {
            self.refused += 1;
            return None;
        }
        let off = addr - self.base;
        let i = (off / 8) as usize;
        let r = (off % 8) * 8;
        let lo = self.words[i];
        let v = if r == 0 {
            lo
        } else {
            (lo >> r) | (self.words[i + 1] << (64 - r))
        };
        self.served += 1;
        Some(v)
    }
}

const BASE: u64 = 0x7000_0000_0000;

fn walk(index: &UnwindIndex, regs: Regs, stack: &mut BufStack) -> (WalkOutcome, Vec<u64>) {
    let mut cache = WalkCache::new();
    let mut frames = [0u64; 64];
    let (o, n) = index.walk_with(&mut cache, &regs, stack, &BusyRanges::empty(), &mut frames);
    (o, frames[..n.min(64)].to_vec())
}

#[test]
fn garbage_return_address_is_unknown_code() {
    let index = index();
    let c = fixture(Variant::NoFp).range("fx_unused");
    // fx_unused is a leaf with CFA = rsp + 8 at its entry: the return address is at rsp.
    let mut stack = BufStack::new(BASE, vec![0x4141_4141_4141_4141; 64]);
    let (o, frames) = walk(&index, Regs::new(c.start, BASE + 64, 0), &mut stack);
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::UnknownCode,
                depth: 1,
                ..
            }
        ),
        "{o:?} {frames:#x?}"
    );
    assert_eq!(stack.refused, 0);
}

#[test]
fn stack_pointer_at_the_top_reads_nothing_outside() {
    let index = index();
    let c = fixture(Variant::NoFp).range("fx_unused");
    let mut stack = BufStack::new(BASE, vec![0; 8]);
    let (o, _) = walk(&index, Regs::new(c.start, stack.end(), 0), &mut stack);
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::ReadOutOfBounds,
                depth: 0,
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(stack.served, 0);
}

#[test]
fn return_address_into_the_same_frame_does_not_loop() {
    let index = index();
    let c = fixture(Variant::NoFp).range("fx_unused");
    // Every word is a return address just after fx_unused's entry: each frame is 8 bytes
    // higher, so the walk climbs and stops at the top of the buffer.
    let mut stack = BufStack::new(BASE, vec![c.start + 1; 32]);
    let (o, frames) = walk(&index, Regs::new(c.start, BASE, 0), &mut stack);
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::ReadOutOfBounds,
                ..
            }
        ),
        "{o:?}"
    );
    assert!(frames.len() <= 33);
    assert_eq!(stack.refused, 1);
}

#[test]
fn frame_pointer_frames_unwind_through_rbp_from_the_context() {
    // In the frame-pointer fixture's bodies the CFA is rbp + 16: craft two such frames
    // linked through saved rbp values in a fake stack, ending in a null return address.
    let index = index();
    let fx = fixture(Variant::Fp);
    let (c, b) = (fx.range("fx_c"), fx.range("fx_b"));
    let mid = |r: &std::ops::Range<u64>| r.start + (r.end - r.start) / 2;
    let mut words = vec![0u64; 128];
    let fp0 = BASE + 8 * 32;
    let fp1 = BASE + 8 * 64;
    words[32] = fp1; // fx_c's saved rbp
    words[33] = mid(&b) + 1; // fx_c returns into fx_b's body
    words[64] = 0; // fx_b's saved rbp
    words[65] = 0; // and its return address: nowhere
    let mut stack = BufStack::new(BASE, words);
    let (o, frames) = walk(&index, Regs::new(mid(&c), BASE + 8 * 8, fp0), &mut stack);
    assert_eq!(frames[..2], [mid(&c), mid(&b) + 1], "{o:?}");
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::UnknownCode,
                depth: 2,
                pc: 0
            }
        ),
        "{o:?}"
    );
    assert_eq!(stack.refused, 0);

    // The same context with rbp pointing below the fake stack: refused, never guessed.
    let mut stack = BufStack::new(BASE, vec![0; 128]);
    let (o, _) = walk(&index, Regs::new(mid(&c), BASE + 8 * 8, 0x10), &mut stack);
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::ReadOutOfBounds,
                depth: 0,
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(stack.served, 0);
}

#[test]
fn plt_entries_unwind_through_their_cfa_expression() {
    // ld's .plt FDE computes the CFA with an expression over rsp and rip:
    // rsp + 8 + ((rip & 15) >= 11 ? 8 : 0) (after an entry's `push $n`, at offset 11).
    let index = index();
    let fx = fixture(Variant::NoFp);
    let entry = fx.section(".plt").start + 16; // the first entry after PLT0
    let b = fx.range("fx_b");
    let ret = b.start + (b.end - b.start) / 2 + 1;
    for (off, slot) in [(0u64, 0usize), (6, 0), (11, 1)] {
        let mut words = vec![0u64; 64];
        words[slot] = ret;
        let mut stack = BufStack::new(BASE, words);
        let (o, frames) = walk(&index, Regs::new(entry + off, BASE, 0), &mut stack);
        assert_eq!(frames.get(1), Some(&ret), "PLT+{off}: {o:?} {frames:#x?}");
        assert!(
            matches!(
                o,
                WalkOutcome::Unreliable {
                    why: UnreliableReason::UnknownCode,
                    depth: 2,
                    pc: 0
                }
            ),
            "PLT+{off}: {o:?}"
        );
    }
}

/// Pins why the walker is not framehop: framehop 0.16 unwinds a pc outside every module
/// with a frame-pointer guess and reports the guessed caller as a frame; the walker refuses.
#[test]
fn framehop_guesses_a_frame_where_the_walker_refuses() {
    use framehop::x86_64::UnwindRegsX86_64;
    use framehop::Unwinder;

    let index = index();
    let fh = crate::framehop_baseline::build();
    let mut fh_cache = crate::framehop_baseline::FhCache::new_in();
    let mut words = vec![0u64; 64];
    let bp = BASE + 8 * 16;
    words[16] = BASE + 8 * 32; // "saved rbp"
    words[17] = 0x5678; // "return address"
    let jit_pc = 0x1234u64; // no object maps this
    let mut stack = BufStack::new(BASE, words.clone());
    let mut read = |a: u64| stack.read_u64(a).ok_or(());
    let mut it = fh.iter_frames(
        jit_pc,
        UnwindRegsX86_64::new(jit_pc, BASE, bp),
        &mut fh_cache,
        &mut read,
    );
    let mut guessed = Vec::new();
    while let Ok(Some(f)) = it.next() {
        guessed.push(f.address());
    }
    assert!(
        guessed.contains(&0x5678),
        "framehop no longer guesses: {guessed:#x?}"
    );

    let mut stack = BufStack::new(BASE, words);
    let (o, frames) = walk(&index, Regs::new(jit_pc, BASE, bp), &mut stack);
    assert_eq!(frames, [jit_pc]);
    assert!(
        matches!(
            o,
            WalkOutcome::Unreliable {
                why: UnreliableReason::UnknownCode,
                depth: 0,
                ..
            }
        ),
        "{o:?}"
    );
}
