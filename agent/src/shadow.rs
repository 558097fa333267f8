//! Shadow variables (klp_shadow's model): new data attached to existing objects of the
//! patched program, keyed by (object address, id), kept by the agent so that they outlive
//! the patch module that made them (a later patch sees a shadow an earlier one allocated).
//!
//! Patch modules reach the table through [`KGPATCH_RUNTIME`], a table of C function
//! pointers: the loader writes its address into the module's `kgpatch__runtime` word when it
//! fills the reference slots (`kgpatch_kmod::set_runtime`, called once by [`crate::start`]),
//! so it works when the agent was `dlopen`ed `RTLD_LOCAL` by `kgpatch attach`.
//!
//! # The table
//! A fixed array of [`CAPACITY`] slots, open-addressed with linear probing. Each slot is a
//! small seqlock (`seq`, odd while a writer changes it) over atomic fields, so that:
//! - [`get`] takes no lock and allocates nothing: it reads slots and retries one whose `seq`
//!   changed under it (a writer holds a slot odd for a few stores). Callable from any
//!   thread; not from a signal handler that may have interrupted a shadow writer.
//! - writers ([`alloc`], [`get_or_alloc`], [`free`], [`free_all`]) serialise on one
//!   `parking_lot` mutex; readers never wait for it.
//! - slots never move: a freed slot becomes a tombstone, reused by a later insert; probing
//!   stops at a never-used slot. A tombstone followed by a never-used slot becomes
//!   never-used again (and `free_all` leaving nothing live resets them all), so lookups stay
//!   short after churn. A full table makes `alloc` return NULL.
//!
//! Memory: shadow data is allocated zeroed, 16-aligned, by the agent, and released by
//! `free`/`free_all`. As with klp_shadow, freeing is the caller's promise that no thread
//! still uses that object's data; the lookup itself never touches freed memory (it reads
//! only the slot words).
//!
//! # Safety
//! This module holds `unsafe` for the C ABI: calling the author's constructor and
//! destructor, and allocating / freeing shadow data with the layout recorded in its slot.
//! Only the mutex holder allocates or frees, and a slot's data is freed only after the slot
//! stopped pointing at it (readers that saw it earlier hold a pointer the caller promised
//! not to use after `free`).

#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ffi::c_void;
use std::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Slots in the table (a power of two).
pub const CAPACITY: usize = 1 << 14;
/// Alignment of shadow data.
const ALIGN: usize = 16;
/// Largest shadow a single `alloc` may ask for.
const MAX_SIZE: usize = 1 << 20;

const NEVER: u8 = 0;
const LIVE: u8 = 1;
const TOMB: u8 = 2;

pub use kgpatch_kmod::author::{Runtime, ShadowCtor as Ctor, ShadowDtor as Dtor};

struct Slot {
    seq: AtomicU64,
    state: AtomicU8,
    obj: AtomicUsize,
    id: AtomicU64,
    data: AtomicPtr<c_void>,
    size: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    seq: AtomicU64::new(0),
    state: AtomicU8::new(NEVER),
    obj: AtomicUsize::new(0),
    id: AtomicU64::new(0),
    data: AtomicPtr::new(std::ptr::null_mut()),
    size: AtomicUsize::new(0),
};

static SLOTS: [Slot; CAPACITY] = [EMPTY; CAPACITY];
static WRITER: Mutex<()> = Mutex::new(());
static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);

fn home(obj: usize, id: u64) -> usize {
    // splitmix64 of the pair
    let mut x = (obj as u64) ^ id.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as usize & (CAPACITY - 1)
}

/// A consistent view of one slot: (state, obj, id, data).
fn read_slot(s: &Slot) -> (u8, usize, u64, *mut c_void) {
    loop {
        let s1 = s.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let v = (
            s.state.load(Ordering::Relaxed),
            s.obj.load(Ordering::Relaxed),
            s.id.load(Ordering::Relaxed),
            s.data.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) == s1 {
            return v;
        }
    }
}

/// Writes a slot (mutex held): readers see the old or the new contents, never a mix.
fn write_slot(s: &Slot, state: u8, obj: usize, id: u64, data: *mut c_void, size: usize) {
    let seq = s.seq.load(Ordering::Relaxed);
    s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    s.state.store(state, Ordering::Relaxed);
    s.obj.store(obj, Ordering::Relaxed);
    s.id.store(id, Ordering::Relaxed);
    s.data.store(data, Ordering::Relaxed);
    s.size.store(size, Ordering::Relaxed);
    s.seq.store(seq.wrapping_add(2), Ordering::Release);
}

/// The shadow data of (`obj`, `id`), or NULL. Lock-free, allocation-free.
pub fn get(obj: *mut c_void, id: u64) -> *mut c_void {
    let obj = obj as usize;
    let start = home(obj, id);
    for i in 0..CAPACITY {
        let (state, o, k, data) = read_slot(&SLOTS[(start + i) & (CAPACITY - 1)]);
        match state {
            NEVER => break,
            LIVE if o == obj && k == id => return data,
            _ => {}
        }
    }
    std::ptr::null_mut()
}

/// Where (`obj`, `id`) lives, or else the first reusable slot (mutex held).
enum Probe {
    Found(usize),
    Free(usize),
    Full,
}

fn probe(obj: usize, id: u64) -> Probe {
    let start = home(obj, id);
    let mut free = None;
    for i in 0..CAPACITY {
        let at = (start + i) & (CAPACITY - 1);
        let s = &SLOTS[at];
        // The mutex holder is the only writer: plain loads see the current contents.
        match s.state.load(Ordering::Relaxed) {
            NEVER => return Probe::Free(free.unwrap_or(at)),
            LIVE if s.obj.load(Ordering::Relaxed) == obj && s.id.load(Ordering::Relaxed) == id => {
                return Probe::Found(at)
            }
            TOMB if free.is_none() => free = Some(at),
            _ => {}
        }
    }
    free.map_or(Probe::Full, Probe::Free)
}

fn layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.max(1), ALIGN).ok()
}

fn insert(
    obj: *mut c_void,
    id: u64,
    size: usize,
    ctor: Ctor,
    ctor_data: *mut c_void,
    return_existing: bool,
) -> *mut c_void {
    if size > MAX_SIZE {
        return std::ptr::null_mut();
    }
    let Some(layout) = layout(size) else {
        return std::ptr::null_mut();
    };
    let _w = WRITER.lock();
    let at = match probe(obj as usize, id) {
        Probe::Found(at) if return_existing => {
            return SLOTS[at].data.load(Ordering::Relaxed);
        }
        Probe::Found(_) | Probe::Full => return std::ptr::null_mut(),
        Probe::Free(at) => at,
    };
    // SAFETY: `layout` has a non-zero size (at least 1) and a valid alignment.
    let data = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<c_void>();
    if data.is_null() {
        return data;
    }
    if let Some(ctor) = ctor {
        // SAFETY: the author's constructor, called as klp_shadow does: with the object, the
        // new zeroed data (`size` bytes) and the author's own argument.
        if unsafe { ctor(obj, data, ctor_data) } != 0 {
            // SAFETY: allocated just above with `layout`; nothing else saw it.
            unsafe { std::alloc::dealloc(data.cast(), layout) };
            return std::ptr::null_mut();
        }
    }
    write_slot(&SLOTS[at], LIVE, obj as usize, id, data, size);
    LIVE_COUNT.fetch_add(1, Ordering::Relaxed);
    data
}

/// A new zeroed shadow of `size` bytes for (`obj`, `id`), run through `ctor` (if any; a
/// nonzero return drops it). NULL if one exists already, the table is full, `size` is over
/// 1 MiB, memory ran out, or `ctor` refused. `ctor` runs with the writer lock held: it must
/// not call the shadow API.
pub fn alloc(
    obj: *mut c_void,
    id: u64,
    size: usize,
    ctor: Ctor,
    ctor_data: *mut c_void,
) -> *mut c_void {
    insert(obj, id, size, ctor, ctor_data, false)
}

/// The shadow of (`obj`, `id`) if there is one, else as [`alloc`].
pub fn get_or_alloc(
    obj: *mut c_void,
    id: u64,
    size: usize,
    ctor: Ctor,
    ctor_data: *mut c_void,
) -> *mut c_void {
    let found = get(obj, id);
    if !found.is_null() {
        return found;
    }
    insert(obj, id, size, ctor, ctor_data, true)
}

/// Unlinks slot `at` (mutex held), runs `dtor` on its data and frees it.
fn release(at: usize, dtor: Dtor) {
    let s = &SLOTS[at];
    let obj = s.obj.load(Ordering::Relaxed);
    let id = s.id.load(Ordering::Relaxed);
    let data = s.data.load(Ordering::Relaxed);
    let size = s.size.load(Ordering::Relaxed);
    write_slot(s, TOMB, obj, id, std::ptr::null_mut(), 0);
    LIVE_COUNT.fetch_sub(1, Ordering::Relaxed);
    reclaim_tombstones(at);
    if let Some(dtor) = dtor {
        // SAFETY: the author's destructor, with the object and its shadow data, which is
        // still allocated.
        unsafe { dtor(obj as *mut c_void, data) };
    }
    if let Some(layout) = layout(size) {
        // SAFETY: `data` was allocated by `insert` with this same layout (its size is the
        // slot's), and the slot no longer points at it, so it is freed once.
        unsafe { std::alloc::dealloc(data.cast(), layout) };
    }
}

/// Turns the tombstone at `at`, and the tombstones right before it, back into never-used
/// slots while the slot after each is never-used (mutex held), so that lookups stay short
/// after churn. Sound with concurrent readers: a live entry has no never-used slot between
/// its home and itself, and a slot whose successor is never-used cannot lie on such a path.
fn reclaim_tombstones(mut at: usize) {
    for _ in 0..CAPACITY {
        let next = &SLOTS[(at + 1) & (CAPACITY - 1)];
        let s = &SLOTS[at];
        if s.state.load(Ordering::Relaxed) != TOMB || next.state.load(Ordering::Relaxed) != NEVER {
            return;
        }
        write_slot(s, NEVER, 0, 0, std::ptr::null_mut(), 0);
        at = (at + CAPACITY - 1) & (CAPACITY - 1);
    }
}

/// Frees the shadow of (`obj`, `id`) if there is one, after `dtor` (if any) saw it.
pub fn free(obj: *mut c_void, id: u64, dtor: Dtor) {
    let _w = WRITER.lock();
    if let Probe::Found(at) = probe(obj as usize, id) {
        release(at, dtor);
    }
}

/// Frees every shadow of `id`, each after `dtor` (if any) saw it.
pub fn free_all(id: u64, dtor: Dtor) {
    let _w = WRITER.lock();
    for (at, s) in SLOTS.iter().enumerate() {
        if s.state.load(Ordering::Relaxed) == LIVE && s.id.load(Ordering::Relaxed) == id {
            release(at, dtor);
        }
    }
    if LIVE_COUNT.load(Ordering::Relaxed) == 0 {
        // Nothing is live: every slot may become never-used (a reader then stops at once,
        // which is right). This undoes the tombstones of a table that was once full.
        for s in SLOTS.iter() {
            if s.state.load(Ordering::Relaxed) == TOMB {
                write_slot(s, NEVER, 0, 0, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// How many shadows are allocated.
pub fn count() -> usize {
    LIVE_COUNT.load(Ordering::Relaxed)
}

extern "C" fn c_get(obj: *mut c_void, id: u64) -> *mut c_void {
    get(obj, id)
}
extern "C" fn c_alloc(
    obj: *mut c_void,
    id: u64,
    size: usize,
    ctor: Ctor,
    d: *mut c_void,
) -> *mut c_void {
    alloc(obj, id, size, ctor, d)
}
extern "C" fn c_get_or_alloc(
    obj: *mut c_void,
    id: u64,
    size: usize,
    ctor: Ctor,
    d: *mut c_void,
) -> *mut c_void {
    get_or_alloc(obj, id, size, ctor, d)
}
extern "C" fn c_free(obj: *mut c_void, id: u64, dtor: Dtor) {
    free(obj, id, dtor)
}
extern "C" fn c_free_all(id: u64, dtor: Dtor) {
    free_all(id, dtor)
}
extern "C" fn c_count() -> usize {
    count()
}

/// Version of [`Runtime`] this agent fills.
pub const RUNTIME_VERSION: u32 = 1;

/// The one runtime table of this process.
pub static KGPATCH_RUNTIME: Runtime = Runtime {
    version: RUNTIME_VERSION,
    size: std::mem::size_of::<Runtime>() as u32,
    shadow_get: c_get,
    shadow_alloc: c_alloc,
    shadow_get_or_alloc: c_get_or_alloc,
    shadow_free: c_free,
    shadow_free_all: c_free_all,
    shadow_count: c_count,
};

/// Tells the module loader where [`KGPATCH_RUNTIME`] is.
pub(crate) fn publish() {
    kgpatch_kmod::set_runtime(std::ptr::addr_of!(KGPATCH_RUNTIME) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_int;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    static DTORS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn tag(obj: *mut c_void, data: *mut c_void, arg: *mut c_void) -> c_int {
        // SAFETY: `data` is a fresh shadow of at least 8 bytes, 16-aligned.
        unsafe { *data.cast::<usize>() = obj as usize ^ arg as usize };
        0
    }

    unsafe extern "C" fn refuse(_: *mut c_void, _: *mut c_void, _: *mut c_void) -> c_int {
        1
    }

    unsafe extern "C" fn count_dtor(obj: *mut c_void, data: *mut c_void) {
        // SAFETY: `data` is a live shadow made by `tag` with arg 0.
        assert_eq!(unsafe { *data.cast::<usize>() }, obj as usize);
        DTORS.fetch_add(1, Ordering::Relaxed);
    }

    fn obj(i: usize) -> *mut c_void {
        (0x10_0000 + i * 64) as *mut c_void
    }

    /// One test, because the table is process-wide: the phases must not overlap.
    #[test]
    fn table_under_threads_full_and_free_all() {
        // alloc / get / refuse / free
        let p = alloc(obj(1), 9, 8, Some(tag), std::ptr::null_mut());
        assert!(!p.is_null());
        assert_eq!(p as usize % ALIGN, 0);
        assert_eq!(get(obj(1), 9), p);
        assert!(get(obj(1), 10).is_null());
        assert!(
            alloc(obj(1), 9, 8, None, std::ptr::null_mut()).is_null(),
            "exists"
        );
        assert_eq!(get_or_alloc(obj(1), 9, 8, None, std::ptr::null_mut()), p);
        assert!(alloc(obj(2), 9, 8, Some(refuse), std::ptr::null_mut()).is_null());
        assert!(get(obj(2), 9).is_null());
        assert!(alloc(obj(2), 9, MAX_SIZE + 1, None, std::ptr::null_mut()).is_null());
        free(obj(1), 9, None);
        assert!(get(obj(1), 9).is_null());
        assert_eq!(count(), 0);

        // 8 threads: 4 allocate and free their own objects, 4 read all the time; a reader
        // sees either nothing or the right shadow.
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..4096 {
                            let d = get(obj(i), 1);
                            // Writers free concurrently: use only the pointer value.
                            if !d.is_null() {
                                assert_eq!(d as usize % ALIGN, 0);
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                std::thread::spawn(move || {
                    for round in 0..50 {
                        for i in (w..4096).step_by(4) {
                            let d = get_or_alloc(obj(i), 1, 8, Some(tag), std::ptr::null_mut());
                            assert!(!d.is_null(), "round {round} obj {i}");
                            assert_eq!(get(obj(i), 1), d);
                            // SAFETY: only this thread frees obj(i)'s shadow.
                            assert_eq!(unsafe { *d.cast::<usize>() }, obj(i) as usize);
                        }
                        if round % 2 == 0 {
                            for i in (w..4096).step_by(4) {
                                free(obj(i), 1, None);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let seen: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(seen > 0);
        assert_eq!(count(), 4096);

        // full: the rest of the table fills, then alloc says NULL; free_all counts right
        let mut extra = 0;
        while !alloc(obj(100_000 + extra), 2, 8, None, std::ptr::null_mut()).is_null() {
            extra += 1;
        }
        assert_eq!(4096 + extra, CAPACITY);
        assert!(get_or_alloc(obj(1 << 30), 3, 8, None, std::ptr::null_mut()).is_null());
        DTORS.store(0, Ordering::Relaxed);
        free_all(1, Some(count_dtor));
        assert_eq!(DTORS.load(Ordering::Relaxed), 4096);
        assert_eq!(count(), extra);
        free_all(2, None);
        assert_eq!(count(), 0);
        // tombstones are reused
        assert!(!alloc(obj(5), 4, 8, None, std::ptr::null_mut()).is_null());
        assert!(!get(obj(5), 4).is_null());
        free_all(4, None);

        // cost per call (printed, not asserted: the machine is shared)
        let n = 200_000;
        let p = alloc(obj(7), 5, 16, None, std::ptr::null_mut());
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(
                std::hint::black_box(get(std::hint::black_box(obj(7)), 5)),
                p
            );
        }
        let get_ns = t.elapsed().as_nanos() / n as u128;
        free(obj(7), 5, None);
        let t = std::time::Instant::now();
        for i in 0..n {
            assert!(!alloc(obj(i % 1000), 6, 16, None, std::ptr::null_mut()).is_null());
            free(obj(i % 1000), 6, None);
        }
        let alloc_ns = t.elapsed().as_nanos() / n as u128;
        eprintln!("shadow: get hit {get_ns} ns/call; alloc+free {alloc_ns} ns/pair");
    }
}
