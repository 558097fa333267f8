//! The only place where manifest bytes become structs. Reads copy (no references into the
//! module's bytes, so no alignment requirement) after a checked bounds test.
//!
//! # Safety
//! [`Pod`] is implemented only for the `raw` structs, which are `#[repr(C)]`, contain only
//! integers, and have no padding (checked by the size asserts in `raw`): every bit pattern of
//! the right size is a valid value.

#![allow(unsafe_code)]

use crate::raw::{RawCallback, RawRef, RawReplace, RawTarget, RecordHeader};

mod sealed {
    pub trait Sealed {}
}

/// A plain-old-data struct that may be read from arbitrary bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]`, made only of integers, without padding.
pub unsafe trait Pod: Copy + sealed::Sealed {}

macro_rules! pod {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        // SAFETY: `$t` is a `raw` struct: repr(C), integer fields only, no padding.
        unsafe impl Pod for $t {}
    )*};
}
pod!(RecordHeader, RawTarget, RawReplace, RawRef, RawCallback);

/// Reads a `T` at `offset` in `data`, or `None` when `data` is too short.
pub fn read_at<T: Pod>(data: &[u8], offset: usize) -> Option<T> {
    let end = offset.checked_add(core::mem::size_of::<T>())?;
    let bytes = data.get(offset..end)?;
    // SAFETY: `bytes` holds exactly size_of::<T>() readable bytes (checked just above);
    // `read_unaligned` has no alignment requirement; `T: Pod` accepts any bit pattern.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_range_and_refuses_out_of_range() {
        let mut data = [0u8; 20];
        data[1..5].copy_from_slice(&crate::raw::MAGIC.to_le_bytes());
        let h: RecordHeader = read_at(&data, 1).unwrap();
        assert_eq!(h.magic, crate::raw::MAGIC);
        assert!(read_at::<RecordHeader>(&data, 5).is_none());
        assert!(read_at::<RecordHeader>(&data, usize::MAX).is_none());
    }
}
