//! The dispatcher: owns every assigned partition's buffered records, decides what is
//! delivered next under the ordering mode and the in-flight bound, and applies backpressure
//! by pausing partitions — per partition (records beyond the committed prefix, bytes queued)
//! and over the whole sidecar (one memory budget for queued and in-flight bytes).
//!
//! Offsets and in-flight counts live in each partition's [`Progress`], which delivery tasks
//! settle themselves and the Kafka thread reads directly when a partition leaves; the
//! dispatcher never has to answer for a revoke or a drain.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
// foldhash, not SipHash: these maps are read several times per record.
use hashbrown::{HashMap, HashSet};
use sluice_config::Ordering;
use tokio::sync::mpsc::{Receiver, UnboundedReceiver};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::deliver::{Deliverer, TaskEvent};
use crate::kafka::{DrainReport, FromKafka, ToKafka};
use crate::metrics::{Metrics, TpLabel};
use crate::progress::Progress;
use crate::record::{Record, Tp};
use crate::workers::{Job, Workers};

/// How far ahead of the committed prefix a partition may be fetched before it pauses.
#[derive(Debug, Clone, Copy)]
pub struct Watermarks {
    pub high_records: usize,
    pub low_records: usize,
    pub high_bytes: usize,
    pub low_bytes: usize,
}

impl Watermarks {
    /// Per-partition bounds: records from the in-flight bound, bytes a quarter of the
    /// sidecar's memory budget (so one hot partition cannot take all of it).
    pub fn new(max_in_flight: usize, budget_bytes: usize) -> Self {
        let high = (max_in_flight * 4).max(2000);
        let high_bytes = (budget_bytes / 4).max(1);
        Watermarks {
            high_records: high,
            low_records: high / 2,
            high_bytes,
            low_bytes: high_bytes / 2,
        }
    }
}

/// The sidecar-wide memory budget: bytes of records queued plus bytes in flight. Over the
/// budget every partition pauses; under three quarters of it they resume.
#[derive(Debug, Clone, Copy)]
pub struct MemoryBudget {
    pub max_bytes: usize,
}

impl MemoryBudget {
    /// Whether fetching must stop, with hysteresis: from `max_bytes` up until it falls to
    /// three quarters of it.
    pub fn over(&self, used: usize, was_over: bool) -> bool {
        if was_over {
            used > self.max_bytes / 4 * 3
        } else {
            used >= self.max_bytes
        }
    }
}

/// One assigned partition, as the dispatcher sees it.
#[derive(Debug)]
pub struct PartitionState {
    pub progress: Arc<Progress>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Deliveries of this epoch still running (the partition mode allows one).
    in_flight: usize,
    /// Records in flight per key (a batch may hold several records of one key), by the
    /// key's hash (see [`Queued`]).
    in_flight_keys: HashMap<u64, usize>,
    /// Hashes the keys, once per record as it arrives and once as it ends.
    keys: hashbrown::DefaultHashBuilder,
    blocked: usize,
    paused: bool,
    /// Key mode: the last scan found no free key and neither the keys in flight nor the
    /// scanned part of the queue changed since, so the next `take_next` or `take_batch`
    /// need not scan again (without this, every dispatch round rescanned up to
    /// [`KEY_SCAN_LIMIT`] queued records per partition).
    keys_exhausted: bool,
    /// How many queued records that exhausted scan looked at.
    scan_window: usize,
    /// Since when a partial batch has been ready (batch delivery's `maxWait`).
    batch_waiting_since: Option<Instant>,
}

/// A buffered record with its key's 64-bit hash. Key ordering compares keys by this hash:
/// a scan of the queue costs a few integer lookups per record instead of hashing every key
/// again on every scan. Two different keys with the same hash are taken for one key, so they
/// only wait for each other — never a reordering — and with 64 bits that is vanishingly rare.
#[derive(Debug)]
struct Queued {
    key: Option<u64>,
    record: Record,
}

/// A partition's state, shared by the dispatcher with the delivery task that runs the
/// partition's record in `partition` ordering (see [`Follow`]).
pub type SharedPartition = Arc<Mutex<PartitionState>>;

fn lock(state: &Mutex<PartitionState>) -> MutexGuard<'_, PartitionState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lets a delivery task in `partition` ordering, one record per request, take its
/// partition's next record itself when its record ends: the exchange's next request goes
/// out from the task that got the answer, without a turn through the dispatcher (which, when
/// busy with fetched records, a commit or a pause, held every partition's next request
/// behind it). The dispatcher still hears of every record that ends and does its
/// bookkeeping, but off the exchange's path.
///
/// Only while each partition can have its own request slot (no more partitions than
/// `maxInFlight`): a task that kept its slot could otherwise starve a partition waiting for
/// one.
#[derive(Clone)]
pub struct Follow {
    state: SharedPartition,
    rules: Arc<FollowRules>,
}

pub struct FollowRules {
    /// Whether every assigned partition can have its own slot; the dispatcher updates it as
    /// partitions come and go.
    allowed: AtomicBool,
    commit_limit: Duration,
    app_up: watch::Receiver<bool>,
}

impl Follow {
    /// Ends the task's record in its partition's state (its offset is already settled in the
    /// progress) and, when allowed, takes and starts the partition's next record, exactly as
    /// the dispatcher would: never while the application is down, finished records wait too
    /// long for their commit, or the partition is released.
    pub fn end_and_take(&self, key: Option<&Bytes>) -> Option<Record> {
        let mut state = lock(&self.state);
        state.done(key);
        if !self.rules.allowed.load(AtomicOrdering::Relaxed) || !*self.rules.app_up.borrow() {
            return None;
        }
        state.take_next(Ordering::Partition, Instant::now(), self.rules.commit_limit)
    }
}

/// Batch delivery's bounds.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// What [`PartitionState::take_batch`] found.
#[derive(Debug)]
pub enum Take {
    /// A batch, started in the progress.
    Batch(Vec<Record>),
    /// A partial batch is ready; it goes at this time unless it fills first.
    WaitUntil(Instant),
    /// Nothing may be delivered now.
    Nothing,
}

/// How many queued records the key mode looks past a blocked key.
const KEY_SCAN_LIMIT: usize = 512;

impl PartitionState {
    pub fn new(progress: Arc<Progress>) -> Self {
        PartitionState {
            progress,
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: 0,
            in_flight_keys: HashMap::new(),
            keys: hashbrown::DefaultHashBuilder::default(),
            blocked: 0,
            paused: false,
            keys_exhausted: false,
            scan_window: 0,
            batch_waiting_since: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.progress.epoch
    }

    /// Buffers a fetched record. False if it was not accepted (fetched twice, or the
    /// partition is leaving); it is then dropped.
    pub fn push(&mut self, record: Record) -> bool {
        if !self.progress.track(record.offset) {
            return false;
        }
        // After an exhausted scan every scanned record waits for a key in flight (a key is
        // only held behind a record that waits itself), so only a record that lands inside
        // the scanned window with no key or a key not in flight can be taken now.
        let key = record.key.as_ref().map(|k| self.keys.hash_one(k));
        if self.keys_exhausted
            && self.queue.len() < self.scan_window
            && key.is_none_or(|k| !self.in_flight_keys.contains_key(&k))
        {
            self.keys_exhausted = false;
        }
        self.queued_bytes += record.size();
        self.queue.push_back(Queued { key, record });
        true
    }

    /// The next record that may be delivered now under `mode`, started in its progress.
    /// Nothing starts while finished records have waited longer than `commit_limit` for the
    /// broker's acknowledgement.
    pub fn take_next(
        &mut self,
        mode: Ordering,
        now: Instant,
        commit_limit: Duration,
    ) -> Option<Record> {
        // The checks of this state first: most calls (a partition with its one record in
        // flight, in partition mode) end here without taking the progress's lock.
        if self.queue.is_empty()
            || (mode == Ordering::Partition && self.in_flight > 0)
            || (mode == Ordering::Key && self.keys_exhausted)
            || self.progress.commit_behind(now, commit_limit)
        {
            return None;
        }
        let idx = match mode {
            Ordering::Partition | Ordering::None => 0,
            Ordering::Key => match self.next_free_key() {
                Some(i) => i,
                None => {
                    self.keys_exhausted = true;
                    self.scan_window = KEY_SCAN_LIMIT;
                    return None;
                }
            },
        };
        if !self.progress.start(self.queue.get(idx)?.record.offset) {
            return None;
        }
        let Queued { key, record } = self.queue.remove(idx)?;
        self.queued_bytes -= record.size();
        self.in_flight += 1;
        if mode == Ordering::Key
            && let Some(k) = key
        {
            *self.in_flight_keys.entry(k).or_default() += 1;
        }
        Some(record)
    }

    /// The next batch that may be delivered now under `mode`: up to `limits.max_records`
    /// records and `limits.max_bytes` bytes (a single larger record goes alone), in offset
    /// order, never a record whose partition (partition mode) or key (key mode) has an
    /// earlier record in flight or left behind. A batch that is not full waits up to
    /// `limits.max_wait` from when it was first ready.
    pub fn take_batch(
        &mut self,
        mode: Ordering,
        now: Instant,
        commit_limit: Duration,
        limits: &BatchLimits,
    ) -> Take {
        if self.queue.is_empty() {
            self.batch_waiting_since = None;
            return Take::Nothing;
        }
        if (mode == Ordering::Partition && self.in_flight > 0)
            || (mode == Ordering::Key && self.keys_exhausted)
            || self.progress.commit_behind(now, commit_limit)
        {
            return Take::Nothing;
        }
        let mut picked: Vec<usize> = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        let mut fits = |i: usize, r: &Record, picked: &mut Vec<usize>| -> bool {
            let size = r.size();
            if picked.len() >= limits.max_records
                || (!picked.is_empty() && bytes + size > limits.max_bytes)
            {
                return false;
            }
            bytes += size;
            picked.push(i);
            true
        };
        match mode {
            Ordering::Partition | Ordering::None => {
                for (i, q) in self.queue.iter().enumerate() {
                    if !fits(i, &q.record, &mut picked) {
                        full = true;
                        break;
                    }
                }
            }
            Ordering::Key => {
                // Keys taken into this batch may appear again (in order); a key in flight
                // elsewhere, or passed over here, holds every later record of it.
                let mut held: HashSet<u64> = HashSet::new();
                let scan = KEY_SCAN_LIMIT.max(limits.max_records);
                for (i, q) in self.queue.iter().enumerate().take(scan) {
                    if let Some(k) = q.key
                        && (self.in_flight_keys.contains_key(&k) || held.contains(&k))
                    {
                        held.insert(k);
                        continue;
                    }
                    if !fits(i, &q.record, &mut picked) {
                        full = true;
                        break;
                    }
                }
            }
        }
        if picked.is_empty() {
            if mode == Ordering::Key {
                self.keys_exhausted = true;
                self.scan_window = KEY_SCAN_LIMIT.max(limits.max_records);
            }
            return Take::Nothing;
        }
        full |= picked.len() >= limits.max_records || bytes >= limits.max_bytes;
        // A released partition's batch goes at once: only what its release still owes
        // starts, and the release waits for it.
        if !full && !limits.max_wait.is_zero() && !self.progress.is_released() {
            let since = *self.batch_waiting_since.get_or_insert(now);
            let due = since + limits.max_wait;
            if now < due {
                return Take::WaitUntil(due);
            }
        }
        // In offset order: on a released partition, the records its release still owes
        // start and the first one that may not ends the batch.
        let started = picked
            .iter()
            .take_while(|&&i| self.progress.start(self.queue[i].record.offset))
            .count();
        if started == 0 {
            return Take::Nothing;
        }
        if started < picked.len() {
            picked.truncate(started);
            bytes = picked.iter().map(|&i| self.queue[i].record.size()).sum();
        }
        let records: Vec<Queued> = if picked.len() == picked.last().map_or(0, |l| l + 1) {
            self.queue.drain(..picked.len()).collect()
        } else {
            let mut taken = Vec::with_capacity(picked.len());
            let mut rest = VecDeque::with_capacity(self.queue.len() - picked.len());
            let mut next = picked.iter().peekable();
            for (i, r) in std::mem::take(&mut self.queue).into_iter().enumerate() {
                if next.peek() == Some(&&i) {
                    next.next();
                    taken.push(r);
                } else {
                    rest.push_back(r);
                }
            }
            self.queue = rest;
            taken
        };
        self.queued_bytes -= bytes;
        self.in_flight += records.len();
        if mode == Ordering::Key {
            for k in records.iter().filter_map(|q| q.key) {
                *self.in_flight_keys.entry(k).or_default() += 1;
            }
        }
        self.batch_waiting_since = None;
        Take::Batch(records.into_iter().map(|q| q.record).collect())
    }

    /// The first queued record whose key is neither in flight nor held by an earlier queued
    /// record. Records without a key are not ordered.
    fn next_free_key(&self) -> Option<usize> {
        let mut held: HashSet<u64> = HashSet::new();
        for (i, q) in self.queue.iter().enumerate().take(KEY_SCAN_LIMIT) {
            match q.key {
                None => return Some(i),
                Some(k) if !self.in_flight_keys.contains_key(&k) && !held.contains(&k) => {
                    return Some(i);
                }
                Some(k) => {
                    held.insert(k);
                }
            }
        }
        None
    }

    /// A delivery of this epoch ended (its offset is already settled in the progress).
    pub fn done(&mut self, key: Option<&Bytes>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        // Nothing in flight by key outside key ordering: no key to hash.
        if self.in_flight_keys.is_empty() {
            return;
        }
        let Some(k) = key.map(|k| self.keys.hash_one(k)) else {
            return;
        };
        if let Some(n) = self.in_flight_keys.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.in_flight_keys.remove(&k);
                // Only a key that is no longer in flight can free a record an exhausted
                // scan passed over (a record without a key was never passed over).
                self.keys_exhausted = false;
            }
        }
    }

    /// Whether fetching should be paused (true) or resumed (false), with hysteresis.
    pub fn wants_pause(&self, w: &Watermarks) -> bool {
        if self.blocked > 0 {
            return true;
        }
        let pending = self.progress.snapshot().pending;
        if self.paused {
            pending > w.low_records || self.queued_bytes > w.low_bytes
        } else {
            pending >= w.high_records || self.queued_bytes >= w.high_bytes
        }
    }

    /// Drops the buffered records; returns (records, bytes) dropped.
    fn clear(&mut self) -> (usize, usize) {
        let dropped = (self.queue.len(), self.queued_bytes);
        self.queue.clear();
        self.keys_exhausted = false;
        self.queued_bytes = 0;
        dropped
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

pub struct Dispatcher {
    mode: Ordering,
    max_in_flight: usize,
    watermarks: Watermarks,
    budget: MemoryBudget,
    partitions: HashMap<Tp, SharedPartition>,
    order: Vec<Tp>,
    round_robin: usize,
    /// Delivery tasks running (of any epoch: each holds an HTTP slot until it ends).
    in_flight: usize,
    bytes_queued: usize,
    bytes_in_flight: usize,
    over_budget: bool,
    deliverer: Arc<Deliverer>,
    /// The long-lived tasks the deliveries run on.
    workers: Workers<Deliverer>,
    to_kafka: Sender<ToKafka>,
    metrics: Arc<Metrics>,
    app_up: watch::Receiver<bool>,
    draining: bool,
    /// How long finished records may wait for the broker's acknowledgement before nothing
    /// new starts on their partition (the commit interval).
    commit_limit: Duration,
    /// Batch delivery, when configured: `max_in_flight` then counts batches.
    batch: Option<BatchLimits>,
    /// When a partial batch is due (the dispatcher wakes up then).
    batch_due: Option<Instant>,
    /// `partition` ordering, one record per request: what lets a delivery task go on with
    /// its partition's next record ([`Follow`]).
    follow: Option<Arc<FollowRules>>,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: Ordering,
        max_in_flight: usize,
        budget: MemoryBudget,
        deliverer: Arc<Deliverer>,
        to_kafka: Sender<ToKafka>,
        metrics: Arc<Metrics>,
        app_up: watch::Receiver<bool>,
        commit_limit: Duration,
        batch: Option<BatchLimits>,
    ) -> Self {
        let follow = (mode == Ordering::Partition && batch.is_none()).then(|| {
            Arc::new(FollowRules {
                allowed: AtomicBool::new(true),
                commit_limit,
                app_up: app_up.clone(),
            })
        });
        Dispatcher {
            mode,
            max_in_flight,
            watermarks: Watermarks::new(max_in_flight, budget.max_bytes),
            budget,
            partitions: HashMap::new(),
            order: Vec::new(),
            round_robin: 0,
            in_flight: 0,
            bytes_queued: 0,
            bytes_in_flight: 0,
            over_budget: false,
            workers: Workers::new(deliverer.clone(), max_in_flight),
            deliverer,
            to_kafka,
            metrics,
            app_up,
            draining: false,
            commit_limit,
            batch,
            batch_due: None,
            follow,
        }
    }

    /// Runs until the Kafka thread reports the drain complete (requested through `drain`,
    /// or forced by a fatal consumer error), or is gone.
    pub async fn run(
        mut self,
        mut from_kafka: Receiver<FromKafka>,
        mut events: UnboundedReceiver<TaskEvent>,
        drain: CancellationToken,
    ) -> DrainReport {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut app_up = self.app_up.clone();
        // Made once, not in every turn of the loop, which runs about once per delivery.
        let drain_requested = drain.cancelled_owned();
        tokio::pin!(drain_requested);
        let batch_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(batch_timer);
        let mut timer_set: Option<Instant> = None;
        loop {
            let due = self.batch_due;
            if due != timer_set {
                if let Some(at) = due {
                    batch_timer.as_mut().reset(at.into());
                }
                timer_set = due;
            }
            tokio::select! {
                // Not biased: a flood of results must not starve fetched records or revokes.
                Some(ev) = events.recv() => {
                    self.on_task_event(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.on_task_event(ev);
                    }
                }
                msg = from_kafka.recv() => match msg {
                    Some(FromKafka::Drained(report)) => {
                        self.drop_all();
                        return report;
                    }
                    Some(m) => self.on_kafka(m),
                    None => {
                        warn!("the Kafka thread ended without a drain");
                        return DrainReport {
                            abandoned: self.in_flight,
                            commit_error: Some("the Kafka consumer stopped".into()),
                            ..DrainReport::default()
                        };
                    }
                },
                () = &mut drain_requested, if !self.draining => {
                    self.draining = true;
                    // Released here, before the Kafka thread hears of the drain, so that
                    // nothing new starts from now on, except the records that waited behind
                    // their key below records already started (key ordering): those still
                    // go, and the drain waits for them (see `Progress::release_finishing`).
                    // The buffers are dropped once the drain is complete.
                    let owed: usize = self
                        .partitions
                        .values()
                        .map(|s| {
                            let s = lock(s);
                            s.progress.release_finishing();
                            s.progress.snapshot().owed
                        })
                        .sum();
                    info!(in_flight = self.in_flight, owed, "drain requested: no new deliveries");
                    if self.to_kafka.send(ToKafka::Drain).is_err() {
                        return DrainReport {
                            commit_error: Some("the Kafka thread is gone".into()),
                            ..DrainReport::default()
                        };
                    }
                }
                Ok(()) = app_up.changed() => {}
                () = &mut batch_timer, if due.is_some() => {}
                _ = tick.tick() => self.update_gauges(),
            }
            self.dispatch();
        }
    }

    fn on_kafka(&mut self, msg: FromKafka) {
        match msg {
            FromKafka::Records(batch) => {
                let mut touched: Vec<Tp> = Vec::new();
                let mut buffered = 0i64;
                // The partition's lock is held across a run of its records (a fetch
                // response's records come partition by partition).
                let mut held: Option<(Tp, MutexGuard<'_, PartitionState>)> = None;
                for (epoch, record) in batch {
                    if held.as_ref().is_none_or(|(tp, _)| *tp != record.tp) {
                        held = None;
                        let Some(shared) = self.partitions.get(&record.tp) else {
                            continue;
                        };
                        held = Some((record.tp.clone(), lock(shared)));
                    }
                    let Some((_, state)) = held.as_mut() else {
                        continue;
                    };
                    if state.epoch() != epoch {
                        continue;
                    }
                    if touched.last() != Some(&record.tp) && !touched.contains(&record.tp) {
                        touched.push(record.tp.clone());
                    }
                    let size = record.size();
                    if state.push(record) {
                        buffered += 1;
                        self.bytes_queued += size;
                    }
                }
                drop(held);
                self.metrics.buffered.inc_by(buffered);
                self.check_budget();
                for tp in touched {
                    self.apply_backpressure(&tp);
                }
            }
            FromKafka::Assigned(parts) => {
                for progress in parts {
                    let tp = progress.tp.clone();
                    let state = Arc::new(Mutex::new(PartitionState::new(progress)));
                    if let Some(old) = self.partitions.insert(tp.clone(), state) {
                        self.forget(&old);
                    }
                    if !self.order.contains(&tp) {
                        self.order.push(tp);
                    }
                }
                self.update_follow();
            }
            FromKafka::Released(parts) => {
                for (tp, epoch) in parts {
                    if self
                        .partitions
                        .get(&tp)
                        .is_some_and(|s| lock(s).epoch() == epoch)
                    {
                        if let Some(state) = self.partitions.remove(&tp) {
                            self.forget(&state);
                        }
                        self.order.retain(|t| *t != tp);
                    }
                }
                self.update_follow();
                self.check_budget();
            }
            FromKafka::Drained(_) | FromKafka::Committed => {}
        }
    }

    /// Drops a partition's buffer from the books. (A delivery task that still holds the
    /// state finds its queue empty.)
    fn forget(&mut self, state: &Mutex<PartitionState>) {
        let (records, bytes) = lock(state).clear();
        self.bytes_queued -= bytes;
        self.metrics.buffered.dec_by(records as i64);
    }

    fn drop_all(&mut self) {
        let states: Vec<SharedPartition> = self.partitions.drain().map(|(_, s)| s).collect();
        for s in &states {
            self.forget(s);
        }
        self.order.clear();
        self.update_follow();
    }

    /// Delivery tasks may go on with their partition's next record only while every
    /// partition can have its own slot.
    fn update_follow(&self) {
        if let Some(rules) = &self.follow {
            rules.allowed.store(
                self.partitions.len() <= self.max_in_flight,
                AtomicOrdering::Relaxed,
            );
        }
    }

    fn on_task_event(&mut self, ev: TaskEvent) {
        match ev {
            TaskEvent::Done {
                tp,
                epoch,
                key,
                bytes,
                slot,
                ended,
                next,
            } => {
                if slot {
                    self.free_slot();
                }
                self.bytes_in_flight -= bytes;
                if let Some(size) = next {
                    // The task went on with the partition's next record in the same slot.
                    self.bytes_queued -= size;
                    self.bytes_in_flight += size;
                    self.metrics.buffered.dec();
                }
                let current = self.partitions.get(&tp).map(|s| lock(s)).and_then(|mut s| {
                    if s.epoch() != epoch {
                        return None;
                    }
                    if !ended {
                        s.done(key.as_ref());
                    }
                    Some(())
                });
                match current {
                    Some(()) => {
                        self.check_budget();
                        self.apply_backpressure(&tp);
                    }
                    _ => {
                        self.metrics.late_results.inc();
                        self.check_budget();
                    }
                }
            }
            TaskEvent::SlotFree => {
                self.free_slot();
                self.check_budget();
            }
            TaskEvent::Blocked { tp, epoch, blocked } => {
                let counted = self.partitions.get(&tp).is_some_and(|s| {
                    let mut state = lock(s);
                    if state.epoch() != epoch {
                        return false;
                    }
                    if blocked {
                        state.blocked += 1;
                    } else {
                        state.blocked = state.blocked.saturating_sub(1);
                    }
                    true
                });
                if counted {
                    self.apply_backpressure(&tp);
                }
            }
        }
    }

    fn free_slot(&mut self) {
        self.in_flight -= 1;
        self.metrics.in_flight.dec();
    }

    /// Re-evaluates the sidecar-wide memory budget; on a change every partition's pause is
    /// re-evaluated.
    fn check_budget(&mut self) {
        let used = self.bytes_queued + self.bytes_in_flight;
        let over = self.budget.over(used, self.over_budget);
        self.metrics.buffered_bytes.set(used as i64);
        if over != self.over_budget {
            self.over_budget = over;
            if over {
                warn!(
                    used,
                    budget = self.budget.max_bytes,
                    "memory budget reached: fetching paused on every partition"
                );
            } else {
                info!(used, "back under the memory budget: fetching resumes");
            }
            let tps: Vec<Tp> = self.partitions.keys().cloned().collect();
            for tp in tps {
                self.apply_backpressure(&tp);
            }
        }
    }

    fn apply_backpressure(&mut self, tp: &Tp) {
        let Some(shared) = self.partitions.get(tp) else {
            return;
        };
        let mut state = lock(shared);
        let want = self.over_budget || state.wants_pause(&self.watermarks);
        if want != state.paused {
            state.paused = want;
            let parts = vec![(tp.clone(), state.epoch())];
            let _ = self.to_kafka.send(if want {
                ToKafka::Pause(parts)
            } else {
                ToKafka::Resume(parts)
            });
            self.metrics
                .paused
                .get_or_create(&TpLabel::from(tp))
                .set(i64::from(want));
            tracing::debug!(partition = %tp, paused = want, blocked = state.blocked, over_budget = self.over_budget, "backpressure");
        }
    }

    /// Starts what may start. On a released partition (revoked, or draining) that is only
    /// what its release still owes; the rest of its buffer waits to be dropped.
    fn dispatch(&mut self) {
        self.batch_due = None;
        if self.order.is_empty() {
            return;
        }
        if !*self.app_up.borrow() {
            // Nothing would reach the application: a release need not wait for what it owed.
            for s in self.partitions.values() {
                lock(s).progress.close_gap();
            }
            return;
        }
        if let Some(limits) = self.batch {
            self.dispatch_batches(&limits);
            return;
        }
        let n = self.order.len();
        let now = Instant::now();
        let mut progress = true;
        while self.in_flight < self.max_in_flight && progress {
            progress = false;
            for i in 0..n {
                if self.in_flight >= self.max_in_flight {
                    break;
                }
                let tp = &self.order[(self.round_robin + i) % n];
                let Some(shared) = self.partitions.get(tp) else {
                    continue;
                };
                let mut state = lock(shared);
                if let Some(record) = state.take_next(self.mode, now, self.commit_limit) {
                    let follow = self.follow.as_ref().map(|rules| Follow {
                        state: shared.clone(),
                        rules: rules.clone(),
                    });
                    let size = record.size();
                    self.bytes_queued -= size;
                    self.bytes_in_flight += size;
                    self.in_flight += 1;
                    self.metrics.in_flight.inc();
                    self.metrics.buffered.dec();
                    // In partition mode a partition that started a record has nothing more
                    // to give, and the others had nothing: one pass is enough.
                    progress = self.mode != Ordering::Partition;
                    self.workers.start(
                        Job::Record(record, state.progress.clone(), follow),
                        self.in_flight,
                    );
                }
            }
            self.round_robin = (self.round_robin + 1) % n;
        }
    }

    /// [`Dispatcher::dispatch`] with batch delivery: one batch per partition per round.
    fn dispatch_batches(&mut self, limits: &BatchLimits) {
        let n = self.order.len();
        let now = Instant::now();
        let mut progress = true;
        while self.in_flight < self.max_in_flight && progress {
            progress = false;
            for i in 0..n {
                if self.in_flight >= self.max_in_flight {
                    break;
                }
                let tp = &self.order[(self.round_robin + i) % n];
                let Some(shared) = self.partitions.get(tp) else {
                    continue;
                };
                let mut state = lock(shared);
                match state.take_batch(self.mode, now, self.commit_limit, limits) {
                    Take::Batch(records) => {
                        let size: usize = records.iter().map(Record::size).sum();
                        self.bytes_queued -= size;
                        self.bytes_in_flight += size;
                        self.in_flight += 1;
                        self.metrics.in_flight.inc();
                        self.metrics.buffered.dec_by(records.len() as i64);
                        progress = true;
                        self.workers
                            .start(Job::Batch(records, state.progress.clone()), self.in_flight);
                    }
                    Take::WaitUntil(due) => {
                        self.batch_due = Some(self.batch_due.map_or(due, |d| d.min(due)));
                    }
                    Take::Nothing => {}
                }
            }
            self.round_robin = (self.round_robin + 1) % n;
        }
    }

    fn update_gauges(&self) {
        for (tp, state) in &self.partitions {
            let pending = lock(state).progress.snapshot().pending;
            self.metrics
                .uncommitted
                .get_or_create(&TpLabel::from(tp))
                .set(pending as i64);
        }
        self.metrics
            .oldest_in_flight
            .set(self.deliverer.oldest_in_flight_age().as_secs_f64());
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
        let mut s = PartitionState::new(Progress::new(Tp::new("t", 0), 1));
        for (o, k) in records {
            assert!(s.push(rec(*o, *k)));
        }
        s
    }

    fn take_all(s: &mut PartitionState, mode: Ordering) -> Vec<i64> {
        let now = Instant::now();
        std::iter::from_fn(|| {
            s.take_next(mode, now, Duration::from_secs(3600))
                .map(|r| r.offset)
        })
        .collect()
    }

    /// What a delivery task does when a record ends.
    fn end(s: &mut PartitionState, offset: i64, key: Option<&'static str>, finished: bool) {
        s.progress.end(offset, finished);
        let key = key.map(|k| Bytes::from_static(k.as_bytes()));
        s.done(key.as_ref());
    }

    #[test]
    fn partition_mode_has_one_in_flight_in_order() {
        let mut s = state_with(&[(0, Some("a")), (1, Some("b")), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::Partition), [0]);
        end(&mut s, 0, Some("a"), true);
        assert_eq!(take_all(&mut s, Ordering::Partition), [1]);
        end(&mut s, 1, Some("b"), true);
        assert_eq!(take_all(&mut s, Ordering::Partition), [2]);
        assert_eq!(s.progress.snapshot().committable, Some(2));
        end(&mut s, 2, None, true);
        assert_eq!(s.progress.snapshot().committable, Some(3));
    }

    /// A delivery task's [`Follow`] on `s`, with the dispatcher's rules.
    fn follow(s: PartitionState, commit_limit: Duration) -> (Follow, watch::Sender<bool>) {
        let (app, app_up) = watch::channel(true);
        let rules = Arc::new(FollowRules {
            allowed: AtomicBool::new(true),
            commit_limit,
            app_up,
        });
        let state = Arc::new(Mutex::new(s));
        (Follow { state, rules }, app)
    }

    /// What the dispatcher takes from the follow's partition now, in `partition` ordering.
    fn dispatcher_takes(f: &Follow) -> Option<i64> {
        lock(&f.state)
            .take_next(
                Ordering::Partition,
                Instant::now(),
                Duration::from_secs(3600),
            )
            .map(|r| r.offset)
    }

    /// The task's record `offset` ends (finished); what the task goes on with.
    fn task_ends(f: &Follow, offset: i64) -> Option<i64> {
        lock(&f.state).progress.end(offset, true);
        f.end_and_take(None).map(|r| r.offset)
    }

    #[test]
    fn a_task_goes_on_with_its_partitions_next_record_in_order_and_alone() {
        let (f, _app) = follow(
            state_with(&[(0, None), (1, None), (2, None)]),
            Duration::from_secs(3600),
        );
        assert_eq!(dispatcher_takes(&f), Some(0));
        assert_eq!(task_ends(&f, 0), Some(1));
        assert_eq!(
            dispatcher_takes(&f),
            None,
            "1 is in flight: the dispatcher starts nothing beside it"
        );
        assert_eq!(task_ends(&f, 1), Some(2));
        assert_eq!(
            task_ends(&f, 2),
            None,
            "the queue is empty: the slot goes back"
        );
        let s = lock(&f.state);
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.queued_bytes, 0);
        assert_eq!(s.progress.snapshot().committable, Some(3));
    }

    #[test]
    fn a_task_hands_the_next_record_back_when_the_dispatcher_must_decide() {
        let hour = Duration::from_secs(3600);
        // More partitions than slots: the slot goes back, the record stays queued.
        let (f, _app) = follow(state_with(&[(0, None), (1, None)]), hour);
        assert_eq!(dispatcher_takes(&f), Some(0));
        f.rules.allowed.store(false, AtomicOrdering::Relaxed);
        assert_eq!(task_ends(&f, 0), None);
        assert_eq!(dispatcher_takes(&f), Some(1), "the dispatcher starts it");

        // The application is down.
        let (f, app) = follow(state_with(&[(0, None), (1, None)]), hour);
        assert_eq!(dispatcher_takes(&f), Some(0));
        app.send_replace(false);
        assert_eq!(task_ends(&f, 0), None);
        app.send_replace(true);
        assert_eq!(dispatcher_takes(&f), Some(1));

        // The partition is released (revoked or draining).
        let (f, _app) = follow(state_with(&[(0, None), (1, None)]), hour);
        assert_eq!(dispatcher_takes(&f), Some(0));
        lock(&f.state).progress.release_finishing();
        assert_eq!(task_ends(&f, 0), None);
        assert_eq!(dispatcher_takes(&f), None);
        assert_eq!(lock(&f.state).progress.snapshot().committable, Some(1));

        // Finished records have waited longer than the commit interval for the broker.
        let (f, _app) = follow(state_with(&[(0, None), (1, None)]), Duration::ZERO);
        assert_eq!(
            lock(&f.state)
                .take_next(Ordering::Partition, Instant::now(), Duration::ZERO)
                .map(|r| r.offset),
            Some(0)
        );
        lock(&f.state).progress.end(0, true);
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            f.end_and_take(None).is_none(),
            "record 0 is not acknowledged"
        );
        lock(&f.state).progress.acknowledge(1, Instant::now());
        assert_eq!(
            lock(&f.state)
                .take_next(Ordering::Partition, Instant::now(), Duration::ZERO)
                .map(|r| r.offset),
            Some(1),
            "acknowledged: the dispatcher starts it"
        );
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
        end(&mut s, 0, a, true);
        assert_eq!(take_all(&mut s, Ordering::Key), [1]);
        end(&mut s, 2, b, true);
        assert_eq!(take_all(&mut s, Ordering::Key), [4]);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.progress.snapshot().in_flight, 4);
    }

    #[test]
    fn key_mode_never_overtakes_an_earlier_record_of_the_same_key() {
        let mut s = state_with(&[(0, Some("a")), (1, Some("a")), (2, Some("a"))]);
        assert_eq!(take_all(&mut s, Ordering::Key), [0]);
        end(&mut s, 0, Some("a"), true);
        assert_eq!(take_all(&mut s, Ordering::Key), [1]);
    }

    #[test]
    fn key_mode_rescans_when_a_record_arrives_or_a_key_is_freed() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, a)]);
        assert_eq!(take_all(&mut s, Ordering::Key), [0]);
        assert!(s.keys_exhausted, "1 waits for key a: nothing to rescan");
        assert_eq!(take_all(&mut s, Ordering::Key), Vec::<i64>::new());
        assert!(s.push(rec(2, b)));
        assert_eq!(
            take_all(&mut s, Ordering::Key),
            [2],
            "a new record of a free key is found"
        );
        end(&mut s, 0, a, true);
        assert_eq!(take_all(&mut s, Ordering::Key), [1], "key a freed");
    }

    #[test]
    fn key_mode_skips_the_rescan_only_when_nothing_new_could_be_taken() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, a)]);
        assert_eq!(take_all(&mut s, Ordering::Key), [0]);
        assert!(s.keys_exhausted);
        assert!(s.push(rec(2, a)));
        assert!(s.keys_exhausted, "key a is in flight: 2 waits like 1");
        assert!(s.push(rec(3, None)));
        assert!(!s.keys_exhausted, "a record without a key is free");
        assert_eq!(take_all(&mut s, Ordering::Key), [3]);
        assert!(s.keys_exhausted);
        // A queue longer than the scan window: a free record beyond it cannot be taken yet.
        let mut s = state_with(&[(0, a)]);
        for o in 1..=KEY_SCAN_LIMIT as i64 {
            assert!(s.push(rec(o, a)));
        }
        assert_eq!(take_all(&mut s, Ordering::Key), [0]);
        assert!(s.push(rec(1000, b)));
        assert!(s.keys_exhausted, "beyond the scanned window");
        end(&mut s, 0, a, true);
        assert_eq!(
            take_all(&mut s, Ordering::Key),
            [1, 1000],
            "a freed key rescans, and 1000 is now inside the window"
        );
    }

    #[test]
    fn only_a_key_leaving_flight_ends_an_exhausted_scan() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, a), (2, None), (3, b), (4, a), (5, b)]);
        let l = limits(4, usize::MAX, 0);
        assert_eq!(batch(&mut s, Ordering::Key, &l), [0, 1, 2, 3]);
        let hour = Duration::from_secs(3600);
        assert!(matches!(
            s.take_batch(Ordering::Key, Instant::now(), hour, &l),
            Take::Nothing
        ));
        assert!(s.keys_exhausted, "4 waits for key a, 5 for key b");
        end(&mut s, 2, None, true);
        assert!(s.keys_exhausted, "a record without a key frees nothing");
        end(&mut s, 0, a, true);
        assert!(s.keys_exhausted, "key a is still in flight with 1");
        end(&mut s, 1, a, true);
        assert!(!s.keys_exhausted, "key a is free");
        assert_eq!(batch(&mut s, Ordering::Key, &l), [4], "5 still waits for b");
        end(&mut s, 3, b, true);
        assert_eq!(batch(&mut s, Ordering::Key, &l), [5]);
    }

    #[test]
    fn key_batches_skip_the_rescan_until_a_key_is_freed_or_a_free_record_arrives() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, b), (2, a)]);
        let l = limits(2, usize::MAX, 0);
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(batch(&mut s, Ordering::Key, &l), [0, 1]);
        assert!(matches!(
            s.take_batch(Ordering::Key, now, hour, &l),
            Take::Nothing
        ));
        assert!(s.keys_exhausted, "2 waits for key a");
        assert!(s.push(rec(3, b)));
        assert!(s.keys_exhausted, "key b is in flight too");
        assert!(matches!(
            s.take_batch(Ordering::Key, now, hour, &l),
            Take::Nothing
        ));
        assert!(s.push(rec(4, Some("c"))));
        assert_eq!(batch(&mut s, Ordering::Key, &l), [4], "a free key arrived");
        end(&mut s, 1, b, true);
        assert_eq!(
            batch(&mut s, Ordering::Key, &l),
            [3],
            "key b freed; a still held"
        );
        end(&mut s, 0, a, true);
        assert_eq!(batch(&mut s, Ordering::Key, &l), [2]);
    }

    #[test]
    fn none_mode_takes_everything() {
        let mut s = state_with(&[(0, Some("a")), (1, Some("a")), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::None), [0, 1, 2]);
        end(&mut s, 1, None, true);
        end(&mut s, 2, None, true);
        assert_eq!(s.progress.snapshot().committable, None, "0 still in flight");
        end(&mut s, 0, None, true);
        assert_eq!(s.progress.snapshot().committable, Some(3));
    }

    #[test]
    fn abandoned_records_hold_the_commit_point() {
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::None), [0, 1, 2]);
        end(&mut s, 0, None, true);
        end(&mut s, 1, None, false);
        end(&mut s, 2, None, true);
        assert_eq!(s.progress.snapshot().committable, Some(1));
    }

    #[test]
    fn a_released_partition_dispatches_nothing_and_keeps_unfinished_offsets_uncommitted() {
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        assert_eq!(take_all(&mut s, Ordering::Partition), [0]);
        s.progress.release();
        assert_eq!(
            take_all(&mut s, Ordering::None),
            Vec::<i64>::new(),
            "nothing is dispatched once released"
        );
        assert_eq!(s.clear(), (2, 2));
        end(&mut s, 0, None, true);
        assert_eq!(s.progress.snapshot().committable, Some(1));
    }

    #[test]
    fn a_released_key_partition_still_delivers_what_waited_behind_its_key_and_nothing_else() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, a), (2, b), (3, a), (4, b), (5, None)]);
        assert_eq!(take_all(&mut s, Ordering::Key), [0, 2, 5]);
        end(&mut s, 2, b, true);
        end(&mut s, 5, None, true);
        // A drain or revoke now: 1 and 3 (key a, behind 0) and 4 (key b) lie below 5,
        // which the application has.
        assert!(s.progress.release_finishing());
        assert_eq!(s.progress.snapshot().owed, 3);
        assert_eq!(
            take_all(&mut s, Ordering::Key),
            [4],
            "key b is free; key a waits for 0"
        );
        end(&mut s, 0, a, true);
        assert_eq!(take_all(&mut s, Ordering::Key), [1]);
        end(&mut s, 1, a, true);
        end(&mut s, 4, b, true);
        assert!(
            !s.push(rec(6, b)),
            "a released partition tracks nothing new"
        );
        assert_eq!(take_all(&mut s, Ordering::Key), [3]);
        end(&mut s, 3, a, true);
        let snap = s.progress.snapshot();
        assert_eq!(
            (snap.owed, snap.in_flight, snap.committable),
            (0, 0, Some(6)),
            "the commit covers every record the application has"
        );
    }

    #[test]
    fn a_released_key_partition_stops_a_key_whose_record_was_abandoned() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, a), (2, b)]);
        assert_eq!(take_all(&mut s, Ordering::Key), [0, 2]);
        end(&mut s, 2, b, true);
        assert!(s.progress.release_finishing());
        end(&mut s, 0, a, false);
        assert_eq!(
            take_all(&mut s, Ordering::Key),
            Vec::<i64>::new(),
            "1 must not reach the application before 0"
        );
        assert_eq!(s.progress.snapshot().committable, None);
    }

    #[test]
    fn a_released_key_partition_batches_only_what_it_owes_and_at_once() {
        let (a, b) = (Some("a"), Some("b"));
        let mut s = state_with(&[(0, a), (1, a), (2, b), (3, a), (4, None)]);
        // Waits of a minute for a full batch: a released partition does not wait.
        let l = limits(2, usize::MAX, 60_000);
        let now = Instant::now();
        let take = |s: &mut PartitionState| match s.take_batch(
            Ordering::Key,
            now,
            Duration::from_secs(3600),
            &l,
        ) {
            Take::Batch(r) => r.iter().map(|r| r.offset).collect::<Vec<_>>(),
            Take::WaitUntil(_) => vec![-1],
            Take::Nothing => vec![],
        };
        assert_eq!(take(&mut s), [0, 1], "a full batch");
        assert_eq!(take(&mut s), [2, 4]);
        end(&mut s, 2, b, true);
        assert!(s.progress.release_finishing());
        assert_eq!(s.progress.snapshot().owed, 1, "3, behind key a");
        assert_eq!(take(&mut s), Vec::<i64>::new(), "key a is in flight");
        end(&mut s, 0, a, true);
        end(&mut s, 1, a, true);
        assert_eq!(take(&mut s), [3], "goes alone, without waiting");
        assert_eq!(take(&mut s), Vec::<i64>::new());
    }

    #[test]
    fn nothing_starts_while_finished_records_wait_too_long_for_their_commit() {
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        let limit = Duration::from_millis(500);
        let now = Instant::now();
        assert_eq!(
            s.take_next(Ordering::None, now, limit).map(|r| r.offset),
            Some(0)
        );
        end(&mut s, 0, None, true);
        let later = Instant::now() + Duration::from_secs(1);
        assert!(
            s.take_next(Ordering::None, later, limit).is_none(),
            "record 0 waited 1 s for its commit: hold back"
        );
        s.progress.acknowledge(1, Instant::now());
        assert_eq!(
            s.take_next(Ordering::None, later, limit).map(|r| r.offset),
            Some(1),
            "acknowledged: deliveries go on"
        );
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
        end(&mut s, 0, None, true);
        assert!(s.wants_pause(&w), "3 pending > low watermark 2");
        end(&mut s, 1, None, true);
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

    #[test]
    fn the_memory_budget_pauses_at_the_bound_and_resumes_at_three_quarters() {
        let b = MemoryBudget { max_bytes: 1000 };
        assert!(!b.over(999, false));
        assert!(b.over(1000, false));
        assert!(b.over(751, true), "hysteresis: still over above 3/4");
        assert!(!b.over(750, true));
        let w = Watermarks::new(64, 64 << 20);
        assert_eq!((w.high_records, w.low_records), (2000, 1000));
        assert_eq!((w.high_bytes, w.low_bytes), (16 << 20, 8 << 20));
        let w = Watermarks::new(1000, 1 << 20);
        assert_eq!(w.high_records, 4000);
        assert_eq!(w.high_bytes, 256 << 10, "a quarter of the budget");
    }

    fn limits(max_records: usize, max_bytes: usize, wait_ms: u64) -> BatchLimits {
        BatchLimits {
            max_records,
            max_bytes,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    fn batch(s: &mut PartitionState, mode: Ordering, l: &BatchLimits) -> Vec<i64> {
        match s.take_batch(mode, Instant::now(), Duration::from_secs(3600), l) {
            Take::Batch(b) => b.iter().map(|r| r.offset).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn partition_batches_are_contiguous_and_one_at_a_time() {
        let mut s = state_with(&[(0, None), (1, None), (2, None), (3, None), (4, None)]);
        let l = limits(2, usize::MAX, 0);
        assert_eq!(batch(&mut s, Ordering::Partition, &l), [0, 1]);
        assert!(matches!(
            s.take_batch(
                Ordering::Partition,
                Instant::now(),
                Duration::from_secs(3600),
                &l
            ),
            Take::Nothing
        ));
        end(&mut s, 0, None, true);
        assert!(
            matches!(
                s.take_batch(
                    Ordering::Partition,
                    Instant::now(),
                    Duration::from_secs(3600),
                    &l
                ),
                Take::Nothing
            ),
            "record 1 of the batch is still in flight (being retried, say)"
        );
        end(&mut s, 1, None, true);
        assert_eq!(batch(&mut s, Ordering::Partition, &l), [2, 3]);
        assert_eq!(s.progress.snapshot().in_flight, 2);
    }

    #[test]
    fn none_batches_run_side_by_side() {
        let mut s = state_with(&[(0, None), (1, None), (2, None)]);
        let l = limits(2, usize::MAX, 0);
        assert_eq!(batch(&mut s, Ordering::None, &l), [0, 1]);
        assert_eq!(batch(&mut s, Ordering::None, &l), [2]);
    }

    #[test]
    fn key_batches_keep_keys_together_and_never_overtake() {
        let (a, b, c) = (Some("a"), Some("b"), Some("c"));
        let mut s = state_with(&[(0, a), (1, a), (2, b), (3, None), (4, a)]);
        let l = limits(3, usize::MAX, 0);
        assert_eq!(
            batch(&mut s, Ordering::Key, &l),
            [0, 1, 2],
            "a key may appear several times in one batch, in order"
        );
        assert_eq!(
            batch(&mut s, Ordering::Key, &l),
            [3],
            "4 (key a) waits for a"
        );
        end(&mut s, 0, a, true);
        assert!(
            matches!(
                s.take_batch(Ordering::Key, Instant::now(), Duration::from_secs(3600), &l),
                Take::Nothing
            ),
            "record 1 of key a is still in flight"
        );
        end(&mut s, 1, a, true);
        assert!(s.push(rec(5, c)));
        assert!(s.push(rec(6, b)));
        assert_eq!(
            batch(&mut s, Ordering::Key, &l),
            [4, 5],
            "key b (offset 2) still in flight holds 6"
        );
        end(&mut s, 2, b, true);
        assert_eq!(batch(&mut s, Ordering::Key, &l), [6]);
    }

    #[test]
    fn batches_respect_the_byte_bound_but_a_large_record_goes_alone() {
        let mut s = PartitionState::new(Progress::new(Tp::new("t", 0), 1));
        for (o, n) in [(0, 4usize), (1, 4), (2, 10), (3, 1)] {
            let mut r = rec(o, None);
            r.value = Some(Bytes::from(vec![b'x'; n]));
            assert!(s.push(r));
        }
        let l = limits(100, 8, 1000);
        assert_eq!(batch(&mut s, Ordering::None, &l), [0, 1], "full at 8 bytes");
        assert_eq!(batch(&mut s, Ordering::None, &l), [2], "10 bytes, alone");
        assert!(
            matches!(
                s.take_batch(
                    Ordering::None,
                    Instant::now(),
                    Duration::from_secs(3600),
                    &l
                ),
                Take::WaitUntil(_)
            ),
            "1 byte is a partial batch: it waits"
        );
    }

    #[test]
    fn a_partial_batch_waits_max_wait_from_when_it_was_first_ready() {
        let mut s = state_with(&[(0, None)]);
        let l = limits(3, usize::MAX, 100);
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let Take::WaitUntil(due) = s.take_batch(Ordering::None, t0, hour, &l) else {
            panic!("expected a wait");
        };
        assert_eq!(due, t0 + Duration::from_millis(100));
        assert!(s.push(rec(1, None)));
        assert!(
            matches!(s.take_batch(Ordering::None, t0 + Duration::from_millis(50), hour, &l), Take::WaitUntil(d) if d == due),
            "more records do not restart the wait"
        );
        let Take::Batch(b) = s.take_batch(Ordering::None, due, hour, &l) else {
            panic!("due: expected the batch");
        };
        assert_eq!(b.len(), 2);
        for o in 2..5 {
            assert!(s.push(rec(o, None)));
        }
        let Take::Batch(b) = s.take_batch(Ordering::None, due, hour, &l) else {
            panic!("a full batch goes at once");
        };
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn a_released_partition_gives_no_batch() {
        let mut s = state_with(&[(0, None), (1, None)]);
        s.progress.release();
        assert!(matches!(
            s.take_batch(
                Ordering::None,
                Instant::now(),
                Duration::from_secs(3600),
                &limits(10, usize::MAX, 0)
            ),
            Take::Nothing
        ));
        assert_eq!(s.progress.snapshot().in_flight, 0);
    }
}
