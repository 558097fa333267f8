//! Patched code that goes away (issue 10 item 5): when the bytes at a site are no longer the
//! jump kgpatch wrote (the library was unloaded and something else mapped there, or it was
//! loaded again at the same address with its original code), `Patcher::remove` and
//! `Patcher::set_fast_path` refuse and write nothing.

use kgpatch_redirect::{Error, PadHint, Patcher, SiteHandle};
use kgpatch_universe::Version;

use crate::common::{bytes, c_lib_copy, patcher};

const PAGE: u64 = 4096;

/// The pages covering `[start, end)`.
fn pages(start: u64, end: u64) -> (u64, u64) {
    (start & !(PAGE - 1), (end + PAGE - 1) & !(PAGE - 1))
}

/// Maps fresh anonymous memory over `[start, end)` (whole pages) holding `content` (the
/// pages' bytes), read-only: something else mapped where the patched code was.
fn squat(start: u64, end: u64, content: &[u8]) {
    map_over(start, end, content, libc::PROT_READ);
}

/// Puts the library's code back (its bytes before the site was installed, executable): the
/// loader runs code of these pages (`_fini`) when the test process exits.
fn restore(start: u64, end: u64, original: &[u8]) {
    map_over(start, end, original, libc::PROT_READ | libc::PROT_EXEC);
}

fn map_over(start: u64, end: u64, content: &[u8], prot: libc::c_int) {
    let len = (end - start) as usize;
    assert_eq!(content.len(), len);
    // SAFETY: the pages belong to a fixture library only this test uses; nothing executes
    // them while they are replaced.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, start, "mmap over the fixture failed");
    // SAFETY: `p` is the fresh writable mapping of `len` bytes made above.
    unsafe {
        std::ptr::copy_nonoverlapping(content.as_ptr(), p.cast::<u8>(), len);
        assert_eq!(libc::mprotect(p, len, prot), 0);
    }
}

/// Installs a site on `fx_diff` of a private copy of the `variant` fixture; returns the
/// patcher, the site, and the pages around it with their content before the install.
fn installed(variant: &str, tag: &str) -> (&'static Patcher, SiteHandle, (u64, u64), Vec<u8>) {
    let lib = c_lib_copy(variant, tag);
    let p = patcher();
    let (entry, size) = lib.func("fx_diff");
    let (start, end) = pages(entry - 16, entry + size);
    let original = bytes(start, end - start);
    let site = p
        .install(&p.analyze(entry, size, PadHint::Auto).unwrap())
        .unwrap();
    (p, site, (start, end), original)
}

#[track_caller]
fn assert_refused(e: Error, entry: u64) {
    let msg = e.to_string();
    assert!(
        matches!(e, Error::SiteChanged { entry: at, .. } if at == entry),
        "not a SiteChanged refusal: {msg}"
    );
    assert!(msg.contains("no longer"), "{msg}");
}

/// Proves that `remove` refuses, and changes no byte, when anonymous memory was mapped over
/// the site (with and without a patchable-entry pad).
#[test]
fn remove_refuses_over_foreign_memory() {
    for (variant, tag) in [("o2", "_gone_rm"), ("o2_pad", "_gone_rm_pad")] {
        let (p, site, (start, end), original) = installed(variant, tag);
        let fill = vec![0xa5; (end - start) as usize];
        squat(start, end, &fill);
        let e = p.remove(site.entry());
        let after = bytes(start, end - start);
        restore(start, end, &original);
        assert_eq!(after, fill, "{variant}: bytes changed");
        assert_refused(e.unwrap_err(), site.entry());
    }
}

/// Proves that `remove` refuses when the library came back at the same address with its
/// original code (the site's bytes are the original ones, not kgpatch's jump), and that
/// `set_fast_path` refuses in both directions; no byte changes.
#[test]
fn remove_and_fast_path_refuse_over_reloaded_code() {
    let (p, site, (start, end), original) = installed("o2", "_gone_reload");
    squat(start, end, &original);
    let removed = p.remove(site.entry());
    let to_original = p.set_fast_path(site.entry(), Some(site.original()));
    let to_stub = p.set_fast_path(site.entry(), None);
    let after = bytes(start, end - start);
    restore(start, end, &original);
    assert_eq!(after, original, "bytes changed");
    for e in [removed, to_original, to_stub] {
        assert_refused(e.unwrap_err(), site.entry());
    }
}

/// Proves that `set_fast_path` refuses to move a site off its fast path when the bytes
/// there are no longer its jump, and changes no byte.
#[test]
fn fast_path_refuses_over_foreign_memory() {
    let (p, site, (start, end), original) = installed("o2", "_gone_fast");
    p.set_fast_path(site.entry(), Some(site.original()))
        .unwrap();
    p.set_fast_path(site.entry(), None).unwrap();
    p.set_fast_path(site.entry(), Some(Version(site.original().0)))
        .unwrap();
    let fill = vec![0x5a; (end - start) as usize];
    squat(start, end, &fill);
    let e = p.set_fast_path(site.entry(), None);
    let after = bytes(start, end - start);
    restore(start, end, &original);
    assert_eq!(after, fill, "bytes changed");
    assert_refused(e.unwrap_err(), site.entry());
}
