//! Stack-walk benchmark: µs per walk at depth 10, 30 and 100 (ours warm and cold, against
//! glibc's `backtrace()` — libgcc's unwinder — as a baseline), index build time and memory
//! for this binary and after dlopen'ing a large library, and walks through that library's
//! unwind tables. Prints a table; medians of several runs.
//!
//! `cargo bench -p kgpatch-stackcheck --bench walk [-- BIG.so]`; without an argument it
//! looks for libLLVM (Debian's llvm packages), and skips that part if none is installed.

mod framehop_baseline;

use std::ffi::{c_void, CString};
use std::hint::black_box;
use std::time::Instant;

use kgpatch_stackcheck::{
    BusyRanges, IndexOptions, Regs, StackBounds, StackReader, UnwindIndex, WalkCache,
};
use object::{Object, ObjectSymbol};

extern "C" {
    fn backtrace(buffer: *mut *mut c_void, size: i32) -> i32;
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median over `runs` batches of `iters` calls of `f`, in µs per call.
fn time_us(runs: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        v.push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    median(v)
}

struct Ctx<'a> {
    index: &'a UnwindIndex,
    framehop: framehop_baseline::Fh,
    bounds: StackBounds,
    ranges: BusyRanges,
}

/// Runs `at_bottom` `extra` frames deeper than the caller.
#[inline(never)]
fn deeper(extra: u32, at_bottom: &mut dyn FnMut()) {
    if extra == 0 {
        at_bottom();
    } else {
        deeper(black_box(extra - 1), at_bottom);
    }
    black_box(());
}

fn depth_here(ctx: &Ctx) -> usize {
    let mut n = 0;
    deeper(0, &mut || {
        let mut frames = [0u64; 512];
        let (o, k) = ctx.index.walk_current(ctx.bounds, &ctx.ranges, &mut frames);
        assert!(o.is_clean(), "{o:?}");
        n = k;
    });
    n
}

struct Row {
    depth: usize,
    warm: f64,
    cold: f64,
    glibc: f64,
    framehop: f64,
    framehop_frames: usize,
    slow: f64,
}

fn walks(ctx: &Ctx, depth: usize, base: usize) -> Row {
    let extra = (depth - base) as u32;
    let mut row = Row {
        depth,
        warm: 0.0,
        cold: 0.0,
        glibc: 0.0,
        framehop: 0.0,
        framehop_frames: 0,
        slow: 0.0,
    };
    deeper(extra, &mut || {
        let mut frames = [0u64; 512];
        let (o, n) = ctx.index.walk_current(ctx.bounds, &ctx.ranges, &mut frames);
        assert!(o.is_clean(), "{o:?}");
        assert_eq!(n, depth);
        row.warm = time_us(31, 2000, || {
            black_box(ctx.index.walk_current(ctx.bounds, &ctx.ranges, &mut []));
        });
        let mut own = WalkCache::new();
        let (mut h0, mut m0) = (0, 0);
        for i in 0..101 {
            if i == 1 {
                (h0, m0) = own.stats();
            }
            ctx.index
                .walk_current_in(&mut own, ctx.bounds, &ctx.ranges, &mut []);
        }
        let (h1, m1) = own.stats();
        row.slow = (m1 - m0) as f64 / 100.0;
        assert_eq!(h1 - h0 + m1 - m0, 100 * depth as u64);
        // Cold: a fresh cache per walk (allocated outside the timed region).
        let mut caches: Vec<WalkCache> = (0..200).map(|_| WalkCache::new()).collect();
        let mut cold = Vec::new();
        for c in caches.iter_mut() {
            let regs_at = Instant::now();
            let (o, _) = ctx
                .index
                .walk_current_in(c, ctx.bounds, &ctx.ranges, &mut []);
            cold.push(regs_at.elapsed().as_secs_f64() * 1e6);
            assert!(o.is_clean());
        }
        row.cold = median(cold);
        let fh = &ctx.framehop;
        let mut fh_cache = framehop_baseline::FhCache::new_in();
        row.framehop_frames =
            framehop_baseline::walk_here(fh, &mut fh_cache, ctx.bounds.lo(), ctx.bounds.hi());
        row.framehop = time_us(31, 2000, || {
            black_box(framehop_baseline::walk_here(
                fh,
                &mut fh_cache,
                ctx.bounds.lo(),
                ctx.bounds.hi(),
            ));
        });
        row.glibc = time_us(31, 200, || {
            let mut buf = [std::ptr::null_mut::<c_void>(); 512];
            // SAFETY: buf has room for 512 entries.
            black_box(unsafe { backtrace(buf.as_mut_ptr(), 512) });
        });
    });
    row
}

/// A fake stack of return addresses: every frame is a function entry (CFA = rsp + 8).
struct Entries {
    base: u64,
    words: Vec<u64>,
}

impl StackReader for Entries {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let i = addr.checked_sub(self.base)? / 8;
        if addr % 8 != 0 {
            return None;
        }
        self.words.get(i as usize).copied()
    }
}

fn big_library(path: &str) -> Option<(String, u64, Vec<u64>)> {
    let data = std::fs::read(path).ok()?;
    let c = CString::new(path).unwrap();
    let t = Instant::now();
    // SAFETY: loading a system library; RTLD_NODELETE keeps it mapped for the index.
    let h = unsafe {
        libc::dlopen(
            c.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    };
    if h.is_null() {
        return None;
    }
    let dlopen_ms = t.elapsed().as_secs_f64() * 1e3;
    let file = object::File::parse(&*data).ok()?;
    let funcs: Vec<(String, u64)> = file
        .dynamic_symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 32 && s.is_definition())
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
        .collect();
    let (name, addr) = funcs.first()?.clone();
    let cname = CString::new(name).unwrap();
    // SAFETY: h is a live handle; name is a defined text symbol of it.
    let p = unsafe { libc::dlsym(h, cname.as_ptr()) } as u64;
    if p == 0 {
        return None;
    }
    let bias = p - addr;
    let step = (funcs.len() / 4000).max(1);
    let addrs = funcs.iter().step_by(step).map(|(_, a)| bias + a).collect();
    Some((format!("{path} (dlopen {dlopen_ms:.0} ms)"), bias, addrs))
}

/// Build time with the default 16 pooled walk caches, and with 1 (the index proper).
fn build_stats() -> ((f64, f64), UnwindIndex) {
    let t = time_us(9, 3, || {
        black_box(UnwindIndex::build().unwrap());
    });
    let one = IndexOptions { cache_slots: 1 };
    let t1 = time_us(9, 3, || {
        black_box(UnwindIndex::build_with(one).unwrap());
    });
    ((t, t1), UnwindIndex::build().unwrap())
}

/// Runs `f` on a raw pthread (start_thread and clone3 are its only frames below `f`'s),
/// so that a 10-frame walk is possible.
fn on_raw_thread(f: Box<dyn FnOnce() + Send>) {
    extern "C" fn start(arg: *mut c_void) -> *mut c_void {
        // SAFETY: arg is the Box<Box<dyn FnOnce>> leaked by on_raw_thread, taken once.
        let f = unsafe { Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()) };
        f();
        std::ptr::null_mut()
    }
    let arg = Box::into_raw(Box::new(f)).cast::<c_void>();
    let mut t: libc::pthread_t = 0;
    // SAFETY: start matches pthread's signature and takes ownership of arg; joined below.
    unsafe {
        assert_eq!(
            libc::pthread_create(&mut t, std::ptr::null(), start, arg),
            0
        );
        assert_eq!(libc::pthread_join(t, std::ptr::null_mut()), 0);
    }
}

fn main() {
    let big_arg = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".so") || a.contains(".so."));
    let (build_us, index) = build_stats();
    let index = std::sync::Arc::new(index);
    let i2 = index.clone();
    on_raw_thread(Box::new(move || walk_table(&i2)));
    index_table(build_us, &index, big_arg);
}

fn walk_table(index: &UnwindIndex) {
    let bounds = StackBounds::of_current_thread().unwrap();
    let ranges = BusyRanges::from_pairs([(0x1000..0x2000, 0), (0x3000..0x4000, 1)]).unwrap();
    let ctx = Ctx {
        index,
        framehop: framehop_baseline::build(),
        bounds,
        ranges,
    };
    let base = depth_here(&ctx);
    println!("## stack walks (a thread of this bench binary, recursion of one Rust function; {base} frames at the bottom)");
    println!();
    println!("| frames | ours, warm cache (µs) | ours, cold cache (µs) | framehop, warm (µs) | glibc backtrace() (µs) | rule-cache misses per warm walk |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for depth in [10usize, 30, 100] {
        let r = walks(&ctx, depth, base);
        println!(
            "| {} | {:.3} | {:.2} | {:.3} ({} frames) | {:.2} | {} |",
            r.depth, r.warm, r.cold, r.framehop, r.framehop_frames, r.glibc, r.slow
        );
    }
}

fn index_table(build_us: (f64, f64), index: &UnwindIndex, big_arg: Option<String>) {
    println!();
    println!("## index");
    println!();
    println!("| process | objects | build, 16 pooled caches (µs) | build, 1 cache (µs) | index heap (KiB) | of which walk caches (KiB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let objs = index.objects().count();
    let caches = 16 * WalkCache::heap_bytes();
    println!("(one walk cache: {} bytes)", WalkCache::heap_bytes());
    let check = time_us(9, 1000, || {
        black_box(index.is_current());
    });
    println!("(is_current(): {check:.3} µs)");
    println!(
        "| this bench binary | {objs} | {:.0} | {:.0} | {:.0} | {:.0} |",
        build_us.0,
        build_us.1,
        index.heap_bytes() as f64 / 1024.0,
        caches as f64 / 1024.0
    );
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
        "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
    ];
    let path = big_arg.or_else(|| {
        candidates
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .map(|s| s.to_string())
    });
    let Some(path) = path else {
        println!("| (no large library found; pass one as argument) | | | | | |");
        return;
    };
    let Some((label, _bias, funcs)) = big_library(&path) else {
        println!("| {path}: could not load | | | | | |");
        return;
    };
    let (build_us, index) = build_stats();
    let hdr = index
        .objects()
        .find(|o| path.ends_with(o.name.rsplit('/').next().unwrap_or("")) && !o.name.is_empty())
        .map(|o| o.eh_frame_hdr_len)
        .unwrap_or(0);
    println!(
        "| + {label}, .eh_frame_hdr {} KiB | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        hdr / 1024,
        index.objects().count(),
        build_us.0,
        build_us.1,
        index.heap_bytes() as f64 / 1024.0,
        caches as f64 / 1024.0
    );
    // 30-frame fake stacks through the large library's functions (every frame an entry).
    println!();
    println!(
        "## 30-frame walks through {path} (fake stack of function entries, {} functions sampled)",
        funcs.len()
    );
    println!();
    let base_addr = 0x7200_0000_0000u64;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut cache = WalkCache::new();
    let mut short = 0;
    for chunk in funcs.chunks(31).filter(|c| c.len() == 31).take(100) {
        let mut words: Vec<u64> = chunk[1..].iter().map(|a| a + 1).collect();
        words.push(0);
        let regs = Regs::new(chunk[0], base_addr, 0);
        let mut mem = Entries {
            base: base_addr,
            words,
        };
        let mut fresh = WalkCache::new();
        let t = Instant::now();
        let (_, n) = index.walk_with(&mut fresh, &regs, &mut mem, &BusyRanges::empty(), &mut []);
        let us = t.elapsed().as_secs_f64() * 1e6;
        if n < 31 {
            // Some entry had no FDE (hand-written code): not a 30-frame walk.
            short += 1;
            continue;
        }
        cold.push(us);
        index.walk_with(&mut cache, &regs, &mut mem, &BusyRanges::empty(), &mut []);
        let t = Instant::now();
        for _ in 0..100 {
            black_box(index.walk_with(&mut cache, &regs, &mut mem, &BusyRanges::empty(), &mut []));
        }
        warm.push(t.elapsed().as_secs_f64() * 1e6 / 100.0);
    }
    println!(
        "| walk | µs (median of {} stacks; {short} skipped: a sampled entry had no FDE) |",
        cold.len()
    );
    println!("|---|---:|");
    println!(
        "| cold cache (every frame: .eh_frame_hdr search + CFI program) | {:.2} |",
        median(cold)
    );
    println!("| warm cache | {:.3} |", median(warm));
}
