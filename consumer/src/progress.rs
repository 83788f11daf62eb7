//! One partition's progress in one assignment epoch, shared by the Kafka thread, the
//! dispatcher and the delivery tasks.
//!
//! This is the single place that says what may be committed for a partition and whether
//! deliveries are still running on it. The Kafka thread reads it directly, with a deadline,
//! when the partition leaves this member (revoke, loss or drain), so giving a partition up
//! never depends on a request/reply round trip through the dispatcher. Every assignment gets
//! a new `Progress`; a delivery task holds the `Progress` of the epoch it was dispatched in,
//! so a late result can only ever touch its own (released) epoch.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cloudevents::PartitionHeaders;
use crate::offsets::OffsetTracker;
use crate::record::Tp;

/// A partition's shared state for one assignment epoch.
#[derive(Debug)]
pub struct Progress {
    pub tp: Tp,
    pub epoch: u64,
    /// The delivery headers that are constant for the partition, built once.
    pub headers: PartitionHeaders,
    state: Mutex<State>,
    idle: Condvar,
    cancel: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    tracker: OffsetTracker,
    in_flight: usize,
    released: bool,
    /// The first offset tracked in this epoch (where this member started).
    first: Option<i64>,
    /// The highest offset the broker acknowledged as committed for this partition while
    /// this epoch was current.
    acked: Option<i64>,
    /// Since when finished records have been waiting for the broker's acknowledgement (the
    /// oldest of them finished at or after this time); `None` when all are acknowledged.
    unacked_since: Option<Instant>,
    /// The highest offset started in this epoch.
    highest_started: Option<i64>,
    /// After [`Progress::release_finishing`]: the records that may still start.
    gap: Option<Gap>,
}

/// Records that had not started when their partition was released, below one that had (key
/// ordering takes records out of offset order: a record waits while its key is in flight and
/// later records of other keys go). Left undelivered, they would hold the commit below
/// records the application already has, and the next owner would deliver those again; so a
/// graceful release lets them start, and its wait lasts until they are done.
#[derive(Debug, Clone, Copy)]
struct Gap {
    /// Only offsets below this (one past the highest started) may start.
    limit: i64,
    /// How many of them have not started yet.
    owed: usize,
}

/// A consistent view of a partition's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub in_flight: usize,
    /// Records below the highest started one that a graceful release still lets start.
    pub owed: usize,
    /// Records tracked beyond the finished prefix.
    pub pending: usize,
    /// One past the finished prefix (what a commit would send).
    pub committable: Option<i64>,
    pub acked: Option<i64>,
    pub released: bool,
}

/// Whether a finished prefix `committable` is ahead of the acknowledged offset `acked`.
fn ahead(committable: Option<i64>, acked: Option<i64>) -> bool {
    match (committable, acked) {
        (Some(c), Some(a)) => c > a,
        (c, _) => c.is_some(),
    }
}

impl Snapshot {
    /// The offset to commit, if the finished prefix is ahead of what the broker acknowledged.
    pub fn to_commit(&self) -> Option<i64> {
        self.committable
            .filter(|_| ahead(self.committable, self.acked))
    }
}

impl Progress {
    pub fn new(tp: Tp, epoch: u64) -> Arc<Progress> {
        Arc::new(Progress {
            headers: PartitionHeaders::new(&tp),
            tp,
            epoch,
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
            cancel: CancellationToken::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a fetched record. False if the partition was released or the offset does
    /// not follow the last one (a record fetched twice); the record must then be dropped.
    pub fn track(&self, offset: i64) -> bool {
        let mut s = self.lock();
        if s.released || s.tracker.track(offset).is_err() {
            return false;
        }
        s.first.get_or_insert(offset);
        true
    }

    /// Takes the tracked record at `offset` into flight. Once the partition is released,
    /// nothing new starts on it, except what [`Progress::release_finishing`] still owes.
    pub fn start(&self, offset: i64) -> bool {
        let mut s = self.lock();
        if s.released {
            let Some(gap) = s.gap.as_mut().filter(|g| offset < g.limit) else {
                return false;
            };
            gap.owed -= 1;
            if gap.owed == 0 {
                s.gap = None;
            }
        } else {
            s.highest_started = Some(s.highest_started.map_or(offset, |h| h.max(offset)));
        }
        s.in_flight += 1;
        true
    }

    /// A delivery ended. `finished` says whether the record is done (delivered, skipped or
    /// dead-lettered); an abandoned record stays unfinished and holds the commit point, and
    /// on a released partition ends what the release still owed (a later record of its key
    /// must not reach the application before it).
    pub fn end(&self, offset: i64, finished: bool) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if finished {
            // An error here means a result for an offset that is not tracked: impossible
            // by construction, and harmless (nothing is committed for it).
            let _ = s.tracker.finish(offset);
            if s.unacked_since.is_none() && ahead(s.tracker.committable(), s.acked) {
                s.unacked_since = Some(Instant::now());
            }
        } else if s.released {
            s.gap = None;
        }
        if s.in_flight == 0 && s.gap.is_none() {
            self.idle.notify_all();
        }
    }

    /// Stops the partition at once: nothing new starts and retry waits are cancelled.
    /// Deliveries already running finish. For a partition that is lost or replaced (the
    /// next owner may already be delivering it). True the first time.
    pub fn release(&self) -> bool {
        self.release_with(false)
    }

    /// Stops the partition as [`Progress::release`] does, except that records below the
    /// highest one started that have not started yet still may (see [`Gap`]): a revoke or a
    /// drain, where this member commits before it lets go. Only key ordering leaves such
    /// records. True the first time.
    pub fn release_finishing(&self) -> bool {
        self.release_with(true)
    }

    fn release_with(&self, finishing: bool) -> bool {
        let newly = {
            let mut s = self.lock();
            let newly = !std::mem::replace(&mut s.released, true);
            if newly
                && finishing
                && let Some(highest) = s.highest_started
            {
                // Before the release nothing is abandoned: every started record below the
                // limit that is not finished is in flight.
                let limit = highest + 1;
                let owed = s
                    .tracker
                    .unfinished_below(limit)
                    .saturating_sub(s.in_flight);
                s.gap = (owed > 0).then_some(Gap { limit, owed });
            }
            newly
        };
        self.cancel.cancel();
        newly
    }

    /// Ends what a graceful release still owed: nothing new starts any more.
    pub fn close_gap(&self) {
        let mut s = self.lock();
        if s.gap.take().is_some() && s.in_flight == 0 {
            self.idle.notify_all();
        }
    }

    pub fn is_released(&self) -> bool {
        self.lock().released
    }

    /// Cancelled when the partition is released.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Waits until no delivery runs on the partition and a graceful release owes nothing,
    /// or `deadline`. True if idle; at the deadline what was owed is given up (nothing new
    /// starts after the wait).
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut s = self.lock();
        while s.in_flight > 0 || s.gap.is_some() {
            let now = Instant::now();
            if now >= deadline {
                s.gap = None;
                return false;
            }
            s = self
                .idle
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// The broker acknowledged `offset` as the partition's committed offset; the commit was
    /// taken from the progress at `taken` (so what is still unacknowledged finished after).
    pub fn acknowledge(&self, offset: i64, taken: Instant) {
        let mut s = self.lock();
        s.acked = Some(s.acked.map_or(offset, |a| a.max(offset)));
        s.unacked_since = if ahead(s.tracker.committable(), s.acked) {
            Some(s.unacked_since.map_or(taken, |t| t.max(taken)))
        } else {
            None
        };
    }

    /// True when finished records have waited longer than `limit` for the broker's
    /// acknowledgement: the commits are not landing (the group is rebalancing, or the
    /// coordinator is away), and delivering more would only widen what a crash now makes
    /// the next owner deliver again. Never on a released partition: what may still start
    /// there closes a gap below delivered records (and the release's commit waits for it).
    pub fn commit_behind(&self, now: Instant, limit: Duration) -> bool {
        let s = self.lock();
        !s.released
            && s.unacked_since
                .is_some_and(|t| now.saturating_duration_since(t) > limit)
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            in_flight: s.in_flight,
            owed: s.gap.map_or(0, |g| g.owed),
            pending: s.tracker.pending(),
            committable: s.tracker.committable(),
            acked: s.acked,
            released: s.released,
        }
    }

    /// Finished records whose offsets the broker has not acknowledged: what the next owner
    /// would deliver again if this member left now.
    pub fn unacknowledged(&self) -> u64 {
        let s = self.lock();
        match s.tracker.committable() {
            Some(c) => {
                let from = s.acked.into_iter().chain(s.first).max().unwrap_or(c);
                u64::try_from(c - from).unwrap_or(0)
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> Arc<Progress> {
        Progress::new(Tp::new("t", 0), 1)
    }

    #[test]
    fn commits_only_the_finished_prefix_ahead_of_the_acknowledged_offset() {
        let p = progress();
        for o in 10..14 {
            assert!(p.track(o));
        }
        assert_eq!(p.snapshot().to_commit(), None, "nothing finished");
        assert!(p.start(10) && p.start(11));
        p.end(11, true);
        assert_eq!(p.snapshot().to_commit(), None, "10 still in flight");
        p.end(10, true);
        let s = p.snapshot();
        assert_eq!(
            (s.committable, s.to_commit(), s.in_flight),
            (Some(12), Some(12), 0)
        );
        assert_eq!(p.unacknowledged(), 2);
        p.acknowledge(12, Instant::now());
        assert_eq!(
            p.snapshot().to_commit(),
            None,
            "acknowledged: nothing to send"
        );
        assert_eq!(p.unacknowledged(), 0);
        p.acknowledge(11, Instant::now());
        assert_eq!(
            p.snapshot().acked,
            Some(12),
            "an older ack never moves it back"
        );
        assert!(p.start(12));
        p.end(12, true);
        assert_eq!(p.snapshot().to_commit(), Some(13));
        assert_eq!(p.unacknowledged(), 1);
    }

    #[test]
    fn abandoned_records_hold_the_commit_point() {
        let p = progress();
        for o in 0..3 {
            assert!(p.track(o));
            assert!(p.start(o));
        }
        p.end(0, true);
        p.end(1, false);
        p.end(2, true);
        assert_eq!(p.snapshot().committable, Some(1));
    }

    #[test]
    fn a_released_partition_starts_and_tracks_nothing_but_running_work_still_counts() {
        let p = progress();
        assert!(p.track(0) && p.track(1));
        assert!(p.start(0));
        assert!(p.release());
        assert!(!p.release(), "release is idempotent");
        assert!(p.cancelled().is_cancelled());
        assert!(!p.start(1));
        assert!(!p.track(2));
        p.end(0, true);
        let s = p.snapshot();
        assert_eq!((s.in_flight, s.committable, s.released), (0, Some(1), true));
    }

    #[test]
    fn a_graceful_release_lets_the_records_below_the_highest_started_one_start() {
        // Key ordering: 0 (key a) in flight, 1 (key a) waits behind it, 2 (key b) delivered,
        // 3 (key c) in flight, 4 and 5 not started.
        let p = progress();
        for o in 0..6 {
            assert!(p.track(o));
        }
        assert!(p.start(0) && p.start(2) && p.start(3));
        p.end(2, true);
        assert!(p.release_finishing());
        assert!(!p.release_finishing() && !p.release(), "idempotent");
        assert!(p.cancelled().is_cancelled(), "retry waits still end");
        let s = p.snapshot();
        assert_eq!((s.in_flight, s.owed, s.released), (2, 1, true));
        assert!(!p.start(4), "above the highest started record: never");
        p.end(0, true);
        p.end(3, true);
        let s = p.snapshot();
        assert_eq!((s.in_flight, s.owed), (0, 1), "1 is still owed");
        let q = p.clone();
        let waiter =
            std::thread::spawn(move || q.wait_idle(Instant::now() + Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "the wait lasts while 1 is owed");
        assert!(p.start(1), "the record that waited behind its key");
        assert_eq!(p.snapshot().owed, 0);
        assert!(!p.start(1) && !p.start(0), "nothing more is owed");
        p.end(1, true);
        assert!(waiter.join().unwrap(), "idle once 1 is done");
        let s = p.snapshot();
        assert_eq!(
            (s.committable, s.pending),
            (Some(4), 2),
            "the commit reaches every record that went"
        );
    }

    #[test]
    fn a_graceful_release_owes_nothing_where_the_started_records_are_a_prefix() {
        // Partition and none ordering start records in offset order.
        let p = progress();
        for o in 0..4 {
            assert!(p.track(o));
        }
        assert!(p.start(0) && p.start(1));
        p.end(0, true);
        assert!(p.release_finishing());
        assert_eq!(p.snapshot().owed, 0);
        assert!(!p.start(2));
        p.end(1, true);
        assert!(p.wait_idle(Instant::now()));
        // Nothing started at all: nothing owed either.
        let q = progress();
        assert!(q.track(0));
        assert!(q.release_finishing());
        assert_eq!(q.snapshot().owed, 0);
        assert!(!q.start(0));
    }

    #[test]
    fn an_abandoned_record_a_deadline_or_a_plain_release_ends_what_was_owed() {
        let setup = || {
            let p = progress();
            for o in 0..4 {
                assert!(p.track(o));
            }
            // 0 in flight, 1 waits behind 0's key, 2 delivered, 3 not started.
            assert!(p.start(0) && p.start(2));
            p.end(2, true);
            p
        };
        // 0 abandoned (its retry wait cancelled): 1, of the same key, must not go after it.
        let p = setup();
        assert!(p.release_finishing());
        p.end(0, false);
        assert_eq!(p.snapshot().owed, 0);
        assert!(!p.start(1));
        assert!(p.wait_idle(Instant::now()));
        // The wait's deadline gives up what is owed: nothing starts after the wait.
        let p = setup();
        assert!(p.release_finishing());
        p.end(0, true);
        assert!(!p.wait_idle(Instant::now()));
        assert_eq!(p.snapshot().owed, 0);
        assert!(!p.start(1));
        // close_gap does the same, and wakes a waiter.
        let p = setup();
        assert!(p.release_finishing());
        p.end(0, true);
        let q = p.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            q.close_gap();
        });
        assert!(p.wait_idle(Instant::now() + Duration::from_secs(10)));
        t.join().unwrap();
        assert!(!p.start(1));
        // A lost partition owes nothing.
        let p = setup();
        assert!(p.release());
        assert_eq!(p.snapshot().owed, 0);
        assert!(!p.start(1));
    }

    #[test]
    fn commit_behind_never_holds_a_released_partition() {
        let p = progress();
        let limit = Duration::from_millis(1);
        assert!(p.track(0) && p.track(1) && p.track(2));
        assert!(p.start(0) && p.start(2));
        p.end(0, true);
        let later = Instant::now() + Duration::from_secs(60);
        assert!(p.commit_behind(later, limit));
        assert!(p.release_finishing());
        assert!(
            !p.commit_behind(later, limit),
            "what is owed goes even while commits lag"
        );
        assert!(p.start(1));
    }

    #[test]
    fn duplicate_fetches_are_refused() {
        let p = progress();
        assert!(p.track(5));
        assert!(!p.track(5));
        assert!(!p.track(4));
        assert_eq!(p.snapshot().pending, 1);
    }

    #[test]
    fn commit_behind_measures_how_long_finished_records_wait_for_acknowledgement() {
        let p = progress();
        let limit = Duration::from_millis(500);
        let t0 = Instant::now();
        assert!(p.track(0) && p.track(1) && p.track(2));
        assert!(
            !p.commit_behind(t0 + Duration::from_secs(60), limit),
            "nothing finished"
        );
        assert!(p.start(0));
        p.end(0, true);
        let finished = Instant::now();
        assert!(!p.commit_behind(finished + Duration::from_millis(400), limit));
        assert!(p.commit_behind(finished + Duration::from_millis(600), limit));
        let taken = Instant::now();
        assert!(p.start(1));
        p.end(1, true);
        p.acknowledge(1, taken);
        assert!(
            p.commit_behind(taken + Duration::from_millis(600), limit),
            "record 1 finished after the commit was taken: still waiting"
        );
        assert!(!p.commit_behind(taken + Duration::from_millis(400), limit));
        p.acknowledge(2, Instant::now());
        assert!(
            !p.commit_behind(Instant::now() + Duration::from_secs(60), limit),
            "all acknowledged"
        );
    }

    #[test]
    fn wait_idle_returns_when_the_last_delivery_ends_or_at_the_deadline() {
        let p = progress();
        assert!(p.wait_idle(Instant::now()), "idle at once");
        assert!(p.track(0));
        assert!(p.start(0));
        let started = Instant::now();
        assert!(!p.wait_idle(started + Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        let q = p.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            q.end(0, true);
        });
        assert!(p.wait_idle(Instant::now() + Duration::from_secs(10)));
        t.join().unwrap();
        assert_eq!(p.snapshot().committable, Some(1));
    }
}
