//! A thread standing inside the overwritten bytes when the site is written is moved to the
//! matching instruction of the trampoline, and its call completes with the right value.
//!
//! Deterministic: `asm_probe` has a `read` system call among its first five bytes. A thread
//! blocked in it stands right after the `syscall`; the sweep's signal restarts the call, so
//! its context says pc = entry+3 (the `syscall` instruction itself, inside the site's
//! bytes). The sweep must move it to the trampoline's copy of the `syscall`, where it blocks
//! again; the kernel then shows the thread parked in the trampoline. Its memory is not
//! reclaimed while it stands there.

use std::time::{Duration, Instant};

use kgpatch_redirect::PadHint;
use kgpatch_sys::proc::{parked, Pid};
use kgpatch_universe::Version;

use crate::common::{asm_lib_copy, bytes, patcher};

fn parked_at(tid: i32, want: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if parked(Pid::This, tid).map(|(_, pc)| pc) == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn thread_inside_the_site_bytes_is_moved_to_the_trampoline() {
    let lib = asm_lib_copy("_probe");
    let p = patcher();
    let (entry, size) = lib.func("asm_probe");
    let (v2, _) = lib.func("asm_probe_v2");
    let probe: extern "C" fn(i32, *mut u8, usize) -> i64 =
        // SAFETY: asm_probe has this signature (read(2) by hand).
        unsafe { std::mem::transmute(entry as usize) };

    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        tid_tx.send(kgpatch_sys::thread::gettid()).unwrap();
        let mut byte = 0u8;
        let n = probe(rd, &mut byte, 1);
        (n, byte)
    });
    let tid = tid_rx.recv().unwrap();
    assert!(
        parked_at(tid, entry + 5),
        "the reader never blocked in asm_probe"
    );
    let moved_before = p.stats().moved;

    let before = bytes(entry, size);
    let a = p.analyze(entry, size, PadHint::Auto).unwrap();
    assert_eq!(a.instruction_offsets(), vec![0, 1, 3]);
    let site = p.install(&a).unwrap();

    // The copy of `syscall` is at trampoline offset 3; after it, offset 5.
    let tramp = site.original().0;
    assert!(
        parked_at(tid, tramp + 5),
        "reader parked at {:x?}, not in the trampoline at {:#x}",
        parked(Pid::This, tid).map(|(_, pc)| pc),
        tramp + 5
    );
    assert!(p.stats().moved > moved_before);

    // Meanwhile new calls from threads in `to` take the new version.
    site.site().begin(9, Version(v2));
    let mut byte = 0u8;
    kgpatch_redirect::tls::set_current_word_for_testing(19);
    assert_eq!(probe(rd, &mut byte, 1), -77);
    kgpatch_redirect::tls::set_current_word_for_testing(0);
    site.site().settle_back();

    // Removing the site restores the bytes; its memory cannot be reclaimed while the
    // reader stands in the trampoline.
    p.remove(entry).unwrap();
    assert_eq!(bytes(entry, size), before);
    assert_eq!(
        p.reclaim().unwrap(),
        0,
        "reclaimed a trampoline a thread is parked in"
    );
    assert!(p.code_ranges().iter().any(|r| r.entry == entry && !r.live));

    // SAFETY: writing one byte from a live buffer to our pipe.
    assert_eq!(unsafe { libc::write(wr, b"k".as_ptr().cast(), 1) }, 1);
    assert_eq!(reader.join().unwrap(), (1, b'k'));
    // Other tests may have a thread inside their own removed stubs for a moment.
    let mut freed = false;
    for _ in 0..200 {
        p.reclaim().unwrap();
        if !p.code_ranges().iter().any(|r| r.entry == entry) {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        freed,
        "the trampoline was never reclaimed after the reader left"
    );
    // SAFETY: closing our own descriptors.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
}
