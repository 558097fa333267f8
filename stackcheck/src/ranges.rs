//! The address ranges a transition moves away from.

use std::ops::Range;

/// One range: code a thread must not be running or returning into to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusyRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The caller's tag, reported in [`WalkOutcome::Busy`](crate::WalkOutcome::Busy)
    /// (the agent uses the site index).
    pub id: u32,
}

/// Why a set of ranges was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RangesError {
    /// A range has `start >= end`.
    #[error("busy range {id} ({start:#x}..{end:#x}) is empty; give each range at least one byte")]
    Empty {
        /// The range's id.
        id: u32,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// Two ranges share bytes.
    #[error("busy ranges {a} and {b} overlap at {at:#x}; merge them or give them disjoint bounds")]
    Overlap {
        /// One range's id.
        a: u32,
        /// The other's.
        b: u32,
        /// The first shared address.
        at: u64,
    },
}

/// A sorted, non-overlapping set of [`BusyRange`]s, built before a transition and
/// searched (binary search, no allocation) during walks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusyRanges {
    sorted: Vec<BusyRange>,
}

impl BusyRanges {
    /// No ranges: every complete walk is [`Clean`](crate::WalkOutcome::Clean).
    pub fn empty() -> BusyRanges {
        BusyRanges::default()
    }

    /// Sorts and checks `ranges`.
    pub fn new(ranges: impl IntoIterator<Item = BusyRange>) -> Result<BusyRanges, RangesError> {
        let mut sorted: Vec<BusyRange> = ranges.into_iter().collect();
        for r in &sorted {
            if r.start >= r.end {
                return Err(RangesError::Empty {
                    id: r.id,
                    start: r.start,
                    end: r.end,
                });
            }
        }
        sorted.sort_by_key(|r| r.start);
        for w in sorted.windows(2) {
            if w[1].start < w[0].end {
                return Err(RangesError::Overlap {
                    a: w[0].id,
                    b: w[1].id,
                    at: w[1].start,
                });
            }
        }
        Ok(BusyRanges { sorted })
    }

    /// Convenience: ranges from `(range, id)` pairs.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (Range<u64>, u32)>,
    ) -> Result<BusyRanges, RangesError> {
        BusyRanges::new(pairs.into_iter().map(|(r, id)| BusyRange {
            start: r.start,
            end: r.end,
            id,
        }))
    }

    /// The id of the range containing `addr`.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<u32> {
        let i = self.sorted.partition_point(|r| r.start <= addr);
        let r = self.sorted.get(i.checked_sub(1)?)?;
        (addr < r.end).then_some(r.id)
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// `true` if there are none.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_hits_only_inside() {
        let r = BusyRanges::from_pairs([(0x200..0x300, 2), (0x100..0x180, 1)]).unwrap();
        assert_eq!(r.find(0xff), None);
        assert_eq!(r.find(0x100), Some(1));
        assert_eq!(r.find(0x17f), Some(1));
        assert_eq!(r.find(0x180), None);
        assert_eq!(r.find(0x2ff), Some(2));
        assert_eq!(r.find(0x300), None);
        assert_eq!(BusyRanges::empty().find(5), None);
    }

    #[test]
    fn refuses_overlap_and_empty() {
        assert!(matches!(
            BusyRanges::from_pairs([(0x100..0x200, 1), (0x1ff..0x300, 2)]),
            Err(RangesError::Overlap {
                a: 1,
                b: 2,
                at: 0x1ff
            })
        ));
        assert!(matches!(
            BusyRanges::from_pairs([(0x100..0x100, 7)]),
            Err(RangesError::Empty { id: 7, .. })
        ));
    }
}
