//! Offset tracking for one partition: which fetched records are finished, and the contiguous
//! finished prefix that may be committed.
//!
//! Every record is tracked from the moment it is fetched (not when it is dispatched), so a
//! record that was fetched but never delivered holds the commit point back until it is done.
//! Offsets need not be contiguous (compaction, transaction markers); only their order counts.

use std::collections::VecDeque;

/// Why an offset could not be tracked or finished.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    #[error("offset {offset} is not after the last tracked offset {last}")]
    NotIncreasing { offset: i64, last: i64 },
    #[error("offset {0} is not tracked (never fetched, or already committed)")]
    Unknown(i64),
    #[error("offset {0} was already finished")]
    AlreadyFinished(i64),
}

/// The finished/unfinished state of a partition's fetched records.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Fetched records not yet part of the finished prefix, in offset order.
    entries: VecDeque<(i64, bool)>,
    /// The last offset ever tracked.
    last_tracked: Option<i64>,
    /// The next offset to consume after the finished prefix (what Kafka expects in a commit).
    committable: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a fetched record. Offsets must increase.
    pub fn track(&mut self, offset: i64) -> Result<(), TrackError> {
        if let Some(last) = self.last_tracked
            && offset <= last
        {
            return Err(TrackError::NotIncreasing { offset, last });
        }
        self.last_tracked = Some(offset);
        self.entries.push_back((offset, false));
        Ok(())
    }

    /// Marks a record finished (delivered, skipped or dead-lettered) and advances the prefix.
    pub fn finish(&mut self, offset: i64) -> Result<(), TrackError> {
        // Offsets are usually contiguous, so the record is usually at its distance from the
        // first entry; a gap (compaction, transaction markers) falls back to a search.
        let guess = self
            .entries
            .front()
            .and_then(|&(first, _)| usize::try_from(offset.checked_sub(first)?).ok())
            .filter(|&i| self.entries.get(i).is_some_and(|&(o, _)| o == offset));
        let idx = match guess {
            Some(i) => i,
            None => self
                .entries
                .binary_search_by_key(&offset, |(o, _)| *o)
                .map_err(|_| TrackError::Unknown(offset))?,
        };
        if self.entries[idx].1 {
            return Err(TrackError::AlreadyFinished(offset));
        }
        self.entries[idx].1 = true;
        while let Some(&(o, true)) = self.entries.front() {
            self.entries.pop_front();
            self.committable = Some(o + 1);
        }
        Ok(())
    }

    /// The offset to commit for the finished prefix (last finished + 1), if any finished.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// Records tracked beyond the finished prefix (unfinished, or finished after a gap).
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Unfinished records tracked below `limit`.
    pub fn unfinished_below(&self, limit: i64) -> usize {
        self.entries
            .iter()
            .take_while(|(o, _)| *o < limit)
            .filter(|(_, done)| !done)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn nothing_is_committable_until_the_first_record_finishes() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        t.track(10).unwrap();
        t.track(11).unwrap();
        assert_eq!(t.committable(), None);
        t.finish(11).unwrap();
        assert_eq!(
            t.committable(),
            None,
            "11 finished but 10 is not: nothing may be committed"
        );
        assert_eq!(t.pending(), 2);
        t.finish(10).unwrap();
        assert_eq!(t.committable(), Some(12));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn unfinished_below_counts_only_unfinished_records_under_the_limit() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.unfinished_below(100), 0);
        for o in [3, 5, 6, 9, 12] {
            t.track(o).unwrap();
        }
        t.finish(5).unwrap();
        t.finish(12).unwrap();
        assert_eq!(t.unfinished_below(3), 0, "the limit is exclusive");
        assert_eq!(t.unfinished_below(4), 1);
        assert_eq!(t.unfinished_below(9), 2, "3 and 6; 5 is finished");
        assert_eq!(t.unfinished_below(i64::MAX), 3, "12 is finished");
        t.finish(3).unwrap();
        assert_eq!(
            t.unfinished_below(i64::MAX),
            2,
            "the finished prefix is gone"
        );
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        let mut t = OffsetTracker::new();
        for o in [3, 7, 8, 20] {
            t.track(o).unwrap();
        }
        t.finish(3).unwrap();
        assert_eq!(t.committable(), Some(4));
        t.finish(8).unwrap();
        assert_eq!(t.committable(), Some(4));
        t.finish(7).unwrap();
        assert_eq!(t.committable(), Some(9));
        t.finish(20).unwrap();
        assert_eq!(t.committable(), Some(21));
    }

    #[test]
    fn errors() {
        let mut t = OffsetTracker::new();
        t.track(5).unwrap();
        assert_eq!(
            t.track(5),
            Err(TrackError::NotIncreasing { offset: 5, last: 5 })
        );
        assert_eq!(
            t.track(4),
            Err(TrackError::NotIncreasing { offset: 4, last: 5 })
        );
        assert_eq!(t.finish(6), Err(TrackError::Unknown(6)));
        t.track(6).unwrap();
        t.finish(6).unwrap();
        assert_eq!(t.finish(6), Err(TrackError::AlreadyFinished(6)));
        t.finish(5).unwrap();
        assert_eq!(
            t.finish(5),
            Err(TrackError::Unknown(5)),
            "committed offsets are forgotten"
        );
    }

    /// Offsets that follow each other by `gaps` (1: contiguous), all tracked.
    fn tracked(gaps: &[i64]) -> (Vec<i64>, OffsetTracker) {
        let offsets: Vec<i64> = gaps
            .iter()
            .scan(0, |o, g| {
                *o += g;
                Some(*o)
            })
            .collect();
        let mut t = OffsetTracker::new();
        for &o in &offsets {
            t.track(o).unwrap();
        }
        (offsets, t)
    }

    proptest! {
        /// Whatever order records finish in, the committable offset is always one past the
        /// longest finished prefix, never beyond an unfinished record.
        #[test]
        fn committable_is_the_finished_prefix(
            gaps in prop::collection::vec(1i64..4, 1..60),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        ) {
            let (offsets, mut t) = tracked(&gaps);
            let mut finished = vec![false; offsets.len()];
            for idx in order {
                let i = idx.index(offsets.len());
                if finished[i] { continue; }
                finished[i] = true;
                t.finish(offsets[i]).unwrap();
                let prefix = finished.iter().take_while(|f| **f).count();
                let expected = if prefix == 0 { None } else { Some(offsets[prefix - 1] + 1) };
                prop_assert_eq!(t.committable(), expected);
                prop_assert_eq!(t.pending(), offsets.len() - prefix);
            }
        }

        /// An offset is found wherever it sits, whether its distance from the first entry
        /// points at it (contiguous offsets) or not (after a gap); one that was never
        /// tracked, or is already finished, is refused and changes nothing.
        #[test]
        fn finish_finds_every_tracked_offset_and_only_those(
            gaps in prop::collection::vec(1i64..4, 1..60),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        ) {
            let (offsets, mut t) = tracked(&gaps);
            let last = *offsets.last().expect("at least one gap");
            let mut finished = std::collections::BTreeSet::new();
            for idx in order {
                let target = offsets[idx.index(offsets.len())];
                for probe in 0..=last + 1 {
                    if offsets.contains(&probe) { continue; }
                    prop_assert_eq!(t.finish(probe), Err(TrackError::Unknown(probe)));
                }
                let before = (t.committable(), t.pending());
                if finished.insert(target) {
                    prop_assert_eq!(t.finish(target), Ok(()));
                } else {
                    // Finished: still waiting in the tracker, or gone with the prefix.
                    let err = t.finish(target).unwrap_err();
                    prop_assert!(
                        err == TrackError::AlreadyFinished(target) || err == TrackError::Unknown(target)
                    );
                    prop_assert_eq!((t.committable(), t.pending()), before);
                }
            }
        }
    }
}
