//! The dispatcher: owns every assigned partition's buffered records and offset tracker,
//! decides what is delivered next under the ordering mode and the in-flight bound, applies
//! backpressure by pausing partitions, commits the finished prefix, and runs revokes and the
//! drain.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_config::Ordering;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::deliver::{Deliverer, Outcome, TaskEvent};
use crate::kafka::{EpochOffset, FromKafka, ToKafka};
use crate::metrics::{Metrics, TpLabel};
use crate::offsets::OffsetTracker;
use crate::record::{Record, Tp};

/// How far ahead of the committed prefix a partition may be fetched before it pauses.
#[derive(Debug, Clone, Copy)]
pub struct Watermarks {
    pub high_records: usize,
    pub low_records: usize,
    pub high_bytes: usize,
    pub low_bytes: usize,
}

impl Watermarks {
    pub fn for_in_flight(max_in_flight: usize) -> Self {
        let high = (max_in_flight * 4).max(2000);
        Watermarks {
            high_records: high,
            low_records: high / 2,
            high_bytes: 16 << 20,
            low_bytes: 8 << 20,
        }
    }
}

/// One assigned partition.
#[derive(Debug)]
pub struct PartitionState {
    pub epoch: u64,
    queue: VecDeque<Record>,
    queued_bytes: usize,
    tracker: OffsetTracker,
    in_flight: usize,
    in_flight_keys: HashSet<Bytes>,
    in_flight_since: BTreeMap<i64, Instant>,
    blocked: usize,
    paused: bool,
    revoking: bool,
    cancel: CancellationToken,
}

/// How many queued records the key mode looks past a blocked key.
const KEY_SCAN_LIMIT: usize = 512;

impl PartitionState {
    pub fn new(epoch: u64) -> Self {
        PartitionState {
            epoch,
            queue: VecDeque::new(),
            queued_bytes: 0,
            tracker: OffsetTracker::new(),
            in_flight: 0,
            in_flight_keys: HashSet::new(),
            in_flight_since: BTreeMap::new(),
            blocked: 0,
            paused: false,
            revoking: false,
            cancel: CancellationToken::new(),
        }
    }

    /// Buffers a fetched record. False if its offset does not follow the last one (it is
    /// then dropped: it was fetched twice).
    pub fn push(&mut self, record: Record) -> bool {
        if self.tracker.track(record.offset).is_err() {
            return false;
        }
        self.queued_bytes += record.size();
        self.queue.push_back(record);
        true
    }

    /// The next record that may be delivered now under `mode`, marked in flight.
    pub fn take_next(&mut self, mode: Ordering, now: Instant) -> Option<Record> {
        if self.revoking {
            return None;
        }
        let idx = match mode {
            Ordering::Partition if self.in_flight > 0 => return None,
            Ordering::Partition | Ordering::None => (!self.queue.is_empty()).then_some(0)?,
            Ordering::Key => self.next_free_key()?,
        };
        let record = self.queue.remove(idx)?;
        self.queued_bytes -= record.size();
        self.in_flight += 1;
        if mode == Ordering::Key
            && let Some(k) = &record.key
        {
            self.in_flight_keys.insert(k.clone());
        }
        self.in_flight_since.insert(record.offset, now);
        Some(record)
    }

    /// The first queued record whose key is neither in flight nor held by an earlier queued
    /// record. Records without a key are not ordered.
    fn next_free_key(&self) -> Option<usize> {
        let mut held: HashSet<&Bytes> = HashSet::new();
        for (i, r) in self.queue.iter().enumerate().take(KEY_SCAN_LIMIT) {
            match &r.key {
                None => return Some(i),
                Some(k) if !self.in_flight_keys.contains(k) && !held.contains(k) => return Some(i),
                Some(k) => {
                    held.insert(k);
                }
            }
        }
        None
    }

    /// A delivery finished. Abandoned records stay unfinished (never committed).
    pub fn finish(&mut self, offset: i64, key: Option<&Bytes>, outcome: Outcome) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(k) = key {
            self.in_flight_keys.remove(k);
        }
        self.in_flight_since.remove(&offset);
        if outcome != Outcome::Abandoned
            && let Err(e) = self.tracker.finish(offset)
        {
            warn!(offset, error = %e, "unexpected delivery result");
        }
    }

    /// Whether fetching should be paused (true) or resumed (false), with hysteresis.
    pub fn wants_pause(&self, w: &Watermarks) -> bool {
        if self.blocked > 0 {
            return true;
        }
        let pending = self.tracker.pending();
        if self.paused {
            pending > w.low_records || self.queued_bytes > w.low_bytes
        } else {
            pending >= w.high_records || self.queued_bytes >= w.high_bytes
        }
    }

    /// Drops the buffered records and cancels retries (revoke or drain).
    fn stop(&mut self) -> usize {
        self.revoking = true;
        self.cancel.cancel();
        let dropped = self.queue.len();
        self.queue.clear();
        self.queued_bytes = 0;
        dropped
    }

    pub fn committable(&self) -> Option<i64> {
        self.tracker.committable()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

struct PendingRevoke {
    partitions: Vec<Tp>,
    reply: Sender<Vec<EpochOffset>>,
    deadline: Instant,
}

/// What a drain did.
#[derive(Debug, Clone)]
pub struct DrainReport {
    pub waited: Duration,
    /// In-flight deliveries still running at the drain timeout (not committed).
    pub abandoned: usize,
    pub committed: Vec<(String, i64)>,
    pub commit_error: Option<String>,
}

impl std::fmt::Display for DrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drained in {:?}; {} abandoned; committed",
            self.waited, self.abandoned
        )?;
        for (tp, o) in &self.committed {
            write!(f, " {tp}@{o}")?;
        }
        if let Some(e) = &self.commit_error {
            write!(f, "; commit failed: {e}")?;
        }
        Ok(())
    }
}

pub struct Dispatcher {
    mode: Ordering,
    max_in_flight: usize,
    watermarks: Watermarks,
    stop_timeout: Duration,
    commit_interval: Duration,
    partitions: HashMap<Tp, PartitionState>,
    order: Vec<Tp>,
    round_robin: usize,
    in_flight: usize,
    deliverer: Arc<Deliverer>,
    to_kafka: Sender<ToKafka>,
    metrics: Arc<Metrics>,
    revokes: Vec<PendingRevoke>,
    drain_deadline: Option<(Instant, Instant)>,
    commit_rounds: u64,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: Ordering,
        max_in_flight: usize,
        stop_timeout: Duration,
        commit_interval: Duration,
        deliverer: Arc<Deliverer>,
        to_kafka: Sender<ToKafka>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Dispatcher {
            mode,
            max_in_flight,
            watermarks: Watermarks::for_in_flight(max_in_flight),
            stop_timeout,
            commit_interval,
            partitions: HashMap::new(),
            order: Vec::new(),
            round_robin: 0,
            in_flight: 0,
            deliverer,
            to_kafka,
            metrics,
            revokes: Vec::new(),
            drain_deadline: None,
            commit_rounds: 0,
        }
    }

    /// Runs until the drain is complete (or the Kafka thread is gone).
    pub async fn run(
        mut self,
        mut from_kafka: UnboundedReceiver<FromKafka>,
        mut events: UnboundedReceiver<TaskEvent>,
        drain: CancellationToken,
    ) -> DrainReport {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_commit = Instant::now();
        loop {
            tokio::select! {
                // Not biased: a flood of results must not starve fetched records or revokes.
                Some(ev) = events.recv() => {
                    self.on_task_event(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.on_task_event(ev);
                    }
                }
                msg = from_kafka.recv() => match msg {
                    Some(m) => self.on_kafka(m),
                    None => {
                        warn!("the Kafka thread ended");
                        return DrainReport { waited: Duration::ZERO, abandoned: self.in_flight, committed: vec![], commit_error: Some("the Kafka consumer stopped".into()) };
                    }
                },
                _ = drain.cancelled(), if self.drain_deadline.is_none() => self.start_drain(),
                _ = tick.tick() => {
                    if self.drain_deadline.is_none() && last_commit.elapsed() >= self.commit_interval {
                        last_commit = Instant::now();
                        self.commit_async();
                    }
                    self.update_gauges();
                }
            }
            self.dispatch();
            self.settle_revokes();
            if let Some((started, deadline)) = self.drain_deadline
                && (self.in_flight == 0 || Instant::now() >= deadline)
            {
                return self.finish_drain(started).await;
            }
        }
    }

    fn on_kafka(&mut self, msg: FromKafka) {
        match msg {
            FromKafka::Records(batch) => {
                let mut touched: Vec<Tp> = Vec::new();
                let mut buffered = 0i64;
                for (epoch, record) in batch {
                    let Some(state) = self.partitions.get_mut(&record.tp) else {
                        continue;
                    };
                    if state.epoch != epoch || state.revoking {
                        continue;
                    }
                    if touched.last() != Some(&record.tp) && !touched.contains(&record.tp) {
                        touched.push(record.tp.clone());
                    }
                    if state.push(record) {
                        buffered += 1;
                    }
                }
                self.metrics.buffered.inc_by(buffered);
                for tp in touched {
                    self.apply_backpressure(&tp);
                }
            }
            FromKafka::Assigned(parts) => {
                for (tp, epoch) in parts {
                    if let Some(old) = self
                        .partitions
                        .insert(tp.clone(), PartitionState::new(epoch))
                    {
                        self.in_flight -= old.in_flight;
                    }
                    if !self.order.contains(&tp) {
                        self.order.push(tp);
                    }
                }
            }
            FromKafka::Revoked {
                partitions,
                lost,
                reply,
            } => {
                for tp in &partitions {
                    if let Some(state) = self.partitions.get_mut(tp) {
                        let dropped = state.stop();
                        self.metrics.buffered.dec_by(dropped as i64);
                    }
                }
                info!(
                    count = partitions.len(),
                    lost, "stopping revoked partitions"
                );
                self.revokes.push(PendingRevoke {
                    partitions,
                    reply,
                    deadline: Instant::now() + self.stop_timeout,
                });
            }
        }
    }

    fn on_task_event(&mut self, ev: TaskEvent) {
        match ev {
            TaskEvent::Done {
                tp,
                epoch,
                offset,
                key,
                outcome,
            } => match self.partitions.get_mut(&tp) {
                Some(state) if state.epoch == epoch => {
                    state.finish(offset, key.as_ref(), outcome);
                    self.in_flight -= 1;
                    self.metrics.in_flight.dec();
                    self.apply_backpressure(&tp);
                }
                _ => {
                    self.metrics.late_results.inc();
                }
            },
            TaskEvent::Blocked { tp, epoch, blocked } => {
                if let Some(state) = self.partitions.get_mut(&tp)
                    && state.epoch == epoch
                {
                    if blocked {
                        state.blocked += 1;
                    } else {
                        state.blocked = state.blocked.saturating_sub(1);
                    }
                    self.apply_backpressure(&tp);
                }
            }
        }
    }

    fn apply_backpressure(&mut self, tp: &Tp) {
        let Some(state) = self.partitions.get_mut(tp) else {
            return;
        };
        if state.revoking {
            return;
        }
        let want = state.wants_pause(&self.watermarks);
        if want != state.paused {
            state.paused = want;
            let parts = vec![(tp.clone(), state.epoch)];
            let _ = self.to_kafka.send(if want {
                ToKafka::Pause(parts)
            } else {
                ToKafka::Resume(parts)
            });
            self.metrics
                .paused
                .get_or_create(&TpLabel::from(tp))
                .set(i64::from(want));
            info!(partition = %tp, paused = want, blocked = state.blocked, pending = state.tracker.pending(), "backpressure");
        }
    }

    fn dispatch(&mut self) {
        if self.drain_deadline.is_some() || self.order.is_empty() {
            return;
        }
        let now = Instant::now();
        let n = self.order.len();
        let mut progress = true;
        while self.in_flight < self.max_in_flight && progress {
            progress = false;
            for i in 0..n {
                if self.in_flight >= self.max_in_flight {
                    break;
                }
                let tp = &self.order[(self.round_robin + i) % n];
                let Some(state) = self.partitions.get_mut(tp) else {
                    continue;
                };
                if let Some(record) = state.take_next(self.mode, now) {
                    let epoch = state.epoch;
                    let cancel = state.cancel.clone();
                    self.in_flight += 1;
                    self.metrics.in_flight.inc();
                    self.metrics.buffered.dec();
                    progress = true;
                    tokio::spawn(self.deliverer.clone().run(record, epoch, cancel));
                }
            }
            self.round_robin = (self.round_robin + 1) % n;
        }
    }

    /// Commits what advanced since the last round. Every tenth round re-commits every
    /// partition's finished prefix, so a commit that failed (e.g. during a rebalance) is
    /// repeated even when nothing new finished.
    fn commit_async(&mut self) {
        self.commit_rounds += 1;
        let refresh = self.commit_rounds.is_multiple_of(10);
        let mut offsets = Vec::new();
        for (tp, state) in &mut self.partitions {
            if state.revoking {
                continue;
            }
            let advanced = state.tracker.take_commit();
            let offset = if refresh {
                state.tracker.committable()
            } else {
                advanced
            };
            if let Some(o) = offset {
                offsets.push((tp.clone(), state.epoch, o));
            }
        }
        if !offsets.is_empty() {
            let _ = self.to_kafka.send(ToKafka::Commit(offsets));
        }
    }

    fn settle_revokes(&mut self) {
        if self.revokes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.revokes.len() {
            let r = &self.revokes[i];
            let idle = r
                .partitions
                .iter()
                .all(|tp| self.partitions.get(tp).is_none_or(|s| s.in_flight == 0));
            if !idle && now < r.deadline {
                i += 1;
                continue;
            }
            let r = self.revokes.swap_remove(i);
            let mut offsets = Vec::new();
            for tp in &r.partitions {
                if let Some(state) = self.partitions.remove(tp) {
                    if state.in_flight > 0 {
                        warn!(partition = %tp, in_flight = state.in_flight, "revoke timeout: in-flight deliveries abandoned");
                    }
                    self.in_flight -= state.in_flight;
                    self.metrics.in_flight.dec_by(state.in_flight as i64);
                    self.metrics.buffered.dec_by(state.queue.len() as i64);
                    if let Some(o) = state.committable() {
                        offsets.push((tp.clone(), state.epoch, o));
                    }
                }
                self.order.retain(|t| t != tp);
            }
            let _ = r.reply.send(offsets);
        }
    }

    fn start_drain(&mut self) {
        let now = Instant::now();
        info!(
            in_flight = self.in_flight,
            "drain: stopped fetching, waiting for in-flight deliveries"
        );
        self.drain_deadline = Some((now, now + self.stop_timeout));
        let _ = self.to_kafka.send(ToKafka::PauseAll);
        for state in self.partitions.values_mut() {
            let dropped = state.stop();
            self.metrics.buffered.dec_by(dropped as i64);
        }
    }

    async fn finish_drain(self, started: Instant) -> DrainReport {
        let waited = started.elapsed();
        let mut offsets = Vec::new();
        for (tp, state) in &self.partitions {
            if let Some(o) = state.committable() {
                offsets.push((tp.clone(), state.epoch, o));
            }
        }
        let committed = offsets
            .iter()
            .map(|(tp, _, o)| (tp.to_string(), *o))
            .collect();
        let (done, result) = tokio::sync::oneshot::channel();
        let commit_error = if self
            .to_kafka
            .send(ToKafka::Finish { offsets, done })
            .is_err()
        {
            Some("the Kafka thread is gone".to_owned())
        } else {
            match tokio::time::timeout(Duration::from_secs(60), result).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(e))) => Some(e.to_string()),
                Ok(Err(_)) => Some("the Kafka thread ended without answering".to_owned()),
                Err(_) => Some("closing the consumer took more than 60 s".to_owned()),
            }
        };
        // Abandoned deliveries are cancelled and their results ignored.
        let report = DrainReport {
            waited,
            abandoned: self.in_flight,
            committed,
            commit_error,
        };
        info!(%report, "drain finished");
        report
    }

    fn update_gauges(&self) {
        let now = Instant::now();
        let mut oldest: Option<Instant> = None;
        for (tp, state) in &self.partitions {
            if let Some(t) = state.in_flight_since.values().min() {
                oldest = Some(oldest.map_or(*t, |o| o.min(*t)));
            }
            self.metrics
                .uncommitted
                .get_or_create(&TpLabel::from(tp))
                .set(state.tracker.pending() as i64);
        }
        let age = oldest.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.metrics.oldest_in_flight.set(age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, key: Option<&'static str>) -> Record {
        Record {
            tp: Tp::new("t", 0),
            offset,
            key: key.map(|k| Bytes::from_static(k.as_bytes())),
            value: Some(Bytes::from_static(b"v")),
            headers: vec![],
            timestamp_ms: None,
        }
    }

    fn state_with(records: &[(i64, Option<&'static str>)]) -> PartitionState {
        let mut s = PartitionState::new(1);
        for (o, k) in records {
            assert!(s.push(rec(*o, *k)));
        }
        s
    }

    fn take_all(s: &mut PartitionState, mode: Ordering) -> Vec<i64> {
        let now = Instant::now();
        std::iter::from_fn(|| s.take_next(mode, now).map(|r| r.offset)).collect()
    }

    #[test]
    fn partition_mode_has_one_in_flight_in_order() {
        let mut s = state_with(&[(0, Some("a")), (1, Some("b")), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::Partition), [0]);
        s.finish(0, None, Outcome::Delivered);
        assert_eq!(take_all(&mut s, Ordering::Partition), [1]);
        s.finish(1, None, Outcome::Delivered);
        assert_eq!(take_all(&mut s, Ordering::Partition), [2]);
        assert_eq!(s.committable(), Some(2));
        s.finish(2, None, Outcome::DeadLettered);
        assert_eq!(s.committable(), Some(3));
    }

    #[test]
    fn key_mode_runs_keys_in_parallel_and_each_key_in_order() {
        let a = Some("a");
        let b = Some("b");
        let mut s = state_with(&[(0, a), (1, a), (2, b), (3, None), (4, b), (5, Some("c"))]);
        assert_eq!(
            take_all(&mut s, Ordering::Key),
            [0, 2, 3, 5],
            "one per key; keyless records are free"
        );
        let key_a = Bytes::from_static(b"a");
        s.finish(0, Some(&key_a), Outcome::Delivered);
        assert_eq!(take_all(&mut s, Ordering::Key), [1]);
        let key_b = Bytes::from_static(b"b");
        s.finish(2, Some(&key_b), Outcome::Delivered);
        assert_eq!(take_all(&mut s, Ordering::Key), [4]);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.in_flight(), 4);
    }

    #[test]
    fn key_mode_never_overtakes_an_earlier_record_of_the_same_key() {
        let mut s = state_with(&[(0, Some("a")), (1, Some("a")), (2, Some("a"))]);
        assert_eq!(take_all(&mut s, Ordering::Key), [0]);
        s.finish(0, Some(&Bytes::from_static(b"a")), Outcome::Delivered);
        assert_eq!(take_all(&mut s, Ordering::Key), [1]);
    }

    #[test]
    fn none_mode_takes_everything() {
        let mut s = state_with(&[(0, Some("a")), (1, Some("a")), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::None), [0, 1, 2]);
        s.finish(1, None, Outcome::Delivered);
        s.finish(2, None, Outcome::Delivered);
        assert_eq!(s.committable(), None, "0 still in flight");
        s.finish(0, None, Outcome::Delivered);
        assert_eq!(s.committable(), Some(3));
    }

    #[test]
    fn abandoned_records_hold_the_commit_point() {
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::None), [0, 1, 2]);
        s.finish(0, None, Outcome::Delivered);
        s.finish(1, None, Outcome::Abandoned);
        s.finish(2, None, Outcome::Delivered);
        assert_eq!(s.committable(), Some(1));
    }

    #[test]
    fn stopping_drops_the_buffer_and_keeps_unfinished_offsets_uncommitted() {
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::Partition), [0]);
        assert_eq!(s.stop(), 2);
        assert!(s.cancel.is_cancelled());
        assert_eq!(
            take_all(&mut s, Ordering::None),
            Vec::<i64>::new(),
            "nothing is dispatched once stopped"
        );
        s.finish(0, None, Outcome::Delivered);
        assert_eq!(s.committable(), Some(1));
    }

    #[test]
    fn duplicate_fetches_are_dropped() {
        let mut s = state_with(&[(5, None)]);
        assert!(!s.push(rec(5, None)));
        assert!(!s.push(rec(4, None)));
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn backpressure_has_hysteresis_and_blocking_pauses() {
        let w = Watermarks {
            high_records: 4,
            low_records: 2,
            high_bytes: usize::MAX,
            low_bytes: usize::MAX,
        };
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        assert!(!s.wants_pause(&w));
        s.push(rec(3, None));
        assert!(s.wants_pause(&w));
        s.paused = true;
        assert_eq!(take_all(&mut s, Ordering::None), [0, 1, 2, 3]);
        s.finish(0, None, Outcome::Delivered);
        assert!(s.wants_pause(&w), "3 pending > low watermark 2");
        s.finish(1, None, Outcome::Delivered);
        assert!(!s.wants_pause(&w), "2 pending: resume");
        s.paused = false;
        s.blocked = 1;
        assert!(s.wants_pause(&w), "a blocked record pauses the partition");
        let bytes = Watermarks {
            high_records: 100,
            low_records: 50,
            high_bytes: 2,
            low_bytes: 1,
        };
        let mut s = state_with(&[(0, None), (1, None)]);
        assert!(
            s.wants_pause(&bytes),
            "two one-byte values reach the byte bound"
        );
        s.paused = true;
        let _ = take_all(&mut s, Ordering::None);
        assert!(!s.wants_pause(&bytes));
    }
}
