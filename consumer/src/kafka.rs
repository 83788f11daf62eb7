//! The Kafka side: one OS thread owns the consumer, polls it, runs the rebalance callbacks,
//! commits, and runs the drain.
//!
//! A partition leaves this member in one of three ways — revoked, lost, or drained — and all
//! three are one operation, [`SluiceContext::release`]: stop dispatching it, wait (bounded)
//! for its in-flight deliveries, commit its finished prefix with a valid generation, give it
//! up. The state that operation needs (in-flight count, committable offset, what the broker
//! acknowledged) lives in the partition's [`Progress`], which this thread reads directly; no
//! request/reply round trip through the dispatcher.
//!
//! Commits: every commit round re-sends each partition's finished prefix while it is ahead of
//! what the broker acknowledged (the commit callback records acknowledgements), so a commit
//! that failed during a rebalance is repeated until it lands. The revoke-time and final
//! commits are synchronous and retried on retriable errors within the commit budget; the
//! drain's final commit polls the consumer between tries, so a rebalance in progress settles
//! and the commit goes out with the group's current generation (or member epoch).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use sluice_config::GroupProtocol;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, error, info, warn};

use crate::metrics::{KindLabel, Metrics, TpLabel};
use crate::progress::Progress;
use crate::record::{Record, Tp, TpRef};

/// What the Kafka thread tells the dispatcher.
#[derive(Debug)]
pub enum FromKafka {
    /// Fetched records, each with the epoch of its partition's assignment.
    Records(Vec<(u64, Record)>),
    /// Newly assigned partitions.
    Assigned(Vec<Arc<Progress>>),
    /// Partitions that left this member (revoked, lost or drained): drop their buffers.
    Released(Vec<(Tp, u64)>),
    /// The drain is complete (requested, or forced by a fatal error); the consumer closes
    /// next.
    Drained(DrainReport),
    /// A commit was acknowledged (deliveries held back for it may go on).
    Committed,
}

/// What the dispatcher asks of the Kafka thread.
#[derive(Debug)]
pub enum ToKafka {
    /// Nothing: new events are waiting in the consumer queue.
    Wake,
    Pause(Vec<(Tp, u64)>),
    Resume(Vec<(Tp, u64)>),
    /// Drain: stop fetching, wait for in-flight work, commit, and close.
    Drain,
}

/// What a drain did.
#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    pub waited: Duration,
    /// In-flight deliveries still running at the in-flight timeout, and records owed by
    /// the release that had not started by then (none of them committed).
    pub abandoned: usize,
    pub committed: Vec<(String, i64)>,
    pub commit_error: Option<String>,
    /// Finished records whose offsets were not committed when the budget ran out: the next
    /// owner delivers them again.
    pub uncommitted: u64,
    /// Set when the drain was forced by a fatal consumer error.
    pub fatal: Option<String>,
}

impl std::fmt::Display for DrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(fatal) = &self.fatal {
            write!(f, "fatal consumer error ({fatal}); ")?;
        }
        write!(
            f,
            "drained in {:?}; {} abandoned; committed",
            self.waited, self.abandoned
        )?;
        for (tp, o) in &self.committed {
            write!(f, " {tp}@{o}")?;
        }
        if let Some(e) = &self.commit_error {
            write!(
                f,
                "; commit failed: {e} ({} finished records uncommitted)",
                self.uncommitted
            )?;
        }
        Ok(())
    }
}

/// Time budgets for giving partitions up.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Waiting for in-flight deliveries of a partition that leaves.
    pub in_flight: Duration,
    /// Retrying the synchronous commit of a partition that leaves.
    pub commit: Duration,
    /// Between asynchronous commit rounds.
    pub commit_interval: Duration,
}

/// Why the member is not (or no longer) consuming, as `/readyz` and a metric report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaProblem {
    /// Static: `kafka_unreachable`, `kafka_auth`.
    pub reason: &'static str,
    pub detail: String,
}

/// The member's standing in its group, for readiness.
#[derive(Debug, Default)]
pub struct GroupHealth {
    joined: AtomicBool,
    problem: Mutex<Option<KafkaProblem>>,
}

impl GroupHealth {
    /// True while the member holds its group membership (it has been given an assignment,
    /// possibly empty, and has not lost it since).
    pub fn joined(&self) -> bool {
        self.joined.load(AtomicOrdering::SeqCst)
    }

    pub fn problem(&self) -> Option<KafkaProblem> {
        self.problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, AtomicOrdering::SeqCst);
    }

    pub fn set_problem(&self, problem: Option<KafkaProblem>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// No broker is reachable. Not over an authentication problem: a broker that refuses the
    /// credentials closes the connection, and librdkafka then reports every broker down too;
    /// the refusal is the cause worth reporting.
    fn brokers_down(&self, problem: KafkaProblem) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if p.as_ref().is_none_or(|p| p.reason != "kafka_auth") {
            *p = Some(problem);
        }
    }

    /// A broker is connected (librdkafka's statistics show it up): a problem of reaching
    /// Kafka is over. Not an authentication problem: a broker can be up while it refuses
    /// this member's credentials or permissions.
    fn broker_answered(&self) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if p.as_ref().is_some_and(|p| p.reason == "kafka_unreachable") {
            info!("Kafka is reachable again");
            *p = None;
        }
    }

    /// Kafka served this member something that needs its credentials and permissions (records
    /// fetched, an offset commit acknowledged, an assignment): every problem is over. A TLS
    /// or SASL error while a broker restarts is transient; before this, such an error left
    /// the sidecar not ready for good.
    fn kafka_served(&self) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = p.take() {
            info!(reason = old.reason, "Kafka serves this member again");
        }
    }
}

/// Logs each kind of repeated message at most once per interval, with the count of the
/// ones suppressed since.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` if a message of this kind may be logged now.
    pub fn allow(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 256 {
            seen.retain(|_, (t, _)| now.duration_since(*t) < self.every);
        }
        match seen.get_mut(kind) {
            Some((last, suppressed)) if now.duration_since(*last) < self.every => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                seen.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// The kind of a librdkafka log line for rate limiting: its facility and its text up to the
/// first parenthesis, without the numbers (addresses, durations and counts differ between
/// repeats of one problem; librdkafka appends its own details in parentheses).
fn log_kind(facility: &str, message: &str) -> String {
    let mut kind = String::with_capacity(facility.len() + 64);
    kind.push_str(facility);
    kind.push(' ');
    kind.extend(
        message
            .chars()
            .take_while(|c| *c != '(')
            .filter(|c| !c.is_ascii_digit())
            .take(96),
    );
    kind
}

/// Commit errors that a later try can overcome: the group is rebalancing, the generation or
/// member epoch moved on, the coordinator moved or is loading, or the request timed out.
pub fn commit_error_is_retriable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::RebalanceInProgress
                | C::IllegalGeneration
                | C::UnknownMemberId
                | C::StaleMemberEpoch
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
                | C::RequestTimedOut
                | C::NetworkException
                | C::OperationTimedOut
                | C::TimedOutQueue
                | C::MessageTimedOut
                | C::WaitingForCoordinator
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::Retry
                | C::InProgress
        )
    )
}

/// The consumer's context: rebalance callbacks, commit results, statistics, logs.
pub struct SluiceContext {
    to_dispatcher: tokio::sync::mpsc::Sender<FromKafka>,
    metrics: Arc<Metrics>,
    health: Arc<GroupHealth>,
    /// A `hashbrown` map, looked up for every fetched record by a borrowed [`TpRef`].
    assigned: Mutex<hashbrown::HashMap<Tp, Arc<Progress>>>,
    next_epoch: AtomicU64,
    draining: AtomicBool,
    closing: AtomicBool,
    fatal: AtomicBool,
    /// Callbacks served; lets the poll loop tell "queue empty" from "served an event".
    served: AtomicU64,
    /// The last commit failure (for the drain's report).
    last_commit_error: Mutex<Option<String>>,
    commit_lock: Mutex<()>,
    committer: Mutex<CommitterWake>,
    committer_wake: Condvar,
    budget: Budget,
    protocol: GroupProtocol,
    limiter: LogLimiter,
    /// Partitions paused in librdkafka (by backpressure, or a draining member's new
    /// assignment), and each partition's leader from the latest statistics: together they
    /// tell whether a broker's fetcher is asleep (see [`to_wake`]).
    fetch_paused: Mutex<HashSet<Tp>>,
    leaders: Mutex<HashMap<Tp, i32>>,
}

impl SluiceContext {
    pub fn new(
        to_dispatcher: tokio::sync::mpsc::Sender<FromKafka>,
        metrics: Arc<Metrics>,
        health: Arc<GroupHealth>,
        budget: Budget,
        protocol: GroupProtocol,
    ) -> Self {
        SluiceContext {
            to_dispatcher,
            metrics,
            health,
            assigned: Mutex::new(hashbrown::HashMap::new()),
            next_epoch: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            served: AtomicU64::new(0),
            last_commit_error: Mutex::new(None),
            commit_lock: Mutex::new(()),
            committer: Mutex::new(CommitterWake::default()),
            committer_wake: Condvar::new(),
            budget,
            protocol,
            limiter: LogLimiter::new(Duration::from_secs(10)),
            fetch_paused: Mutex::new(HashSet::new()),
            leaders: Mutex::new(HashMap::new()),
        }
    }

    fn fetch_paused(&self) -> MutexGuard<'_, HashSet<Tp>> {
        self.fetch_paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leaders(&self) -> MutexGuard<'_, HashMap<Tp, i32>> {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn assigned(&self) -> MutexGuard<'_, hashbrown::HashMap<Tp, Arc<Progress>>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn served(&self) -> u64 {
        self.served.load(AtomicOrdering::SeqCst)
    }

    fn serve(&self) {
        self.served.fetch_add(1, AtomicOrdering::SeqCst);
    }

    /// The current epoch of a partition, if it is assigned and still active.
    fn epoch_of(&self, topic: &str, partition: i32) -> Option<(Tp, u64)> {
        let assigned = self.assigned();
        let (tp, p) = assigned.get_key_value(&TpRef { topic, partition })?;
        Some((tp.clone(), p.epoch))
    }

    fn current(&self, parts: &[(Tp, u64)]) -> TopicPartitionList {
        let assigned = self.assigned();
        let mut tpl = TopicPartitionList::new();
        for (tp, epoch) in parts {
            if assigned.get(tp).is_some_and(|p| p.epoch == *epoch) {
                tpl.add_partition(&tp.topic, tp.partition);
            }
        }
        tpl
    }

    /// Sends to the dispatcher from the Kafka thread, waiting for room: the dispatcher never
    /// waits for this thread, so the wait is short.
    fn tell(&self, msg: FromKafka) {
        let _ = self.to_dispatcher.blocking_send(msg);
    }

    fn warn_limited(&self, kind: &str, f: impl FnOnce(u64)) {
        if let Some(suppressed) = self.limiter.allow(kind, Instant::now()) {
            f(suppressed);
        }
    }

    /// Gives partitions up inside a revoke callback: stops them, waits (bounded) for their
    /// in-flight deliveries unless they are lost, and commits their finished prefix. (The
    /// drain releases every partition the same way, then commits from its poll loop.)
    fn release(
        &self,
        consumer: &BaseConsumer<SluiceContext>,
        parts: &[Arc<Progress>],
        lost: bool,
    ) -> Result<(), String> {
        if parts.is_empty() {
            return Ok(());
        }
        self.stop_partitions(parts, !lost);
        for p in parts {
            self.metrics.forget_partition(&p.tp);
        }
        if lost {
            self.tell_released(parts);
            // Another member may own them already: committing now could move its offsets
            // back. Their in-flight results are dropped; the new owner delivers them again.
            let unacked: u64 = parts.iter().map(|p| p.unacknowledged()).sum();
            warn!(
                partitions = parts.len(),
                unacknowledged = unacked,
                "partitions lost (the group moved on without this member); nothing committed for them"
            );
            return Ok(());
        }
        let started = Instant::now();
        let deadline = started + self.budget.in_flight;
        let owed: usize = parts.iter().map(|p| p.snapshot().owed).sum();
        if owed > 0 {
            info!(
                owed,
                "revoked partitions: records that waited behind their key go before the commit"
            );
        }
        let mut abandoned = 0;
        for p in parts {
            if !p.wait_idle(deadline) {
                abandoned += p.snapshot().in_flight;
            }
        }
        // The dispatcher keeps a released partition's buffer until now (what the release
        // owed came from it).
        self.tell_released(parts);
        if abandoned > 0 {
            warn!(
                abandoned,
                "in-flight deliveries still running at the in-flight timeout; not committed, the next owner delivers them again"
            );
        }
        let budget = if self.closing.load(AtomicOrdering::SeqCst) {
            Duration::ZERO
        } else {
            self.budget.commit
        };
        let result = {
            let _order = self.commit_order();
            self.commit_sync(consumer, parts, Instant::now() + budget)
        };
        match &result {
            Ok(()) => {
                info!(partitions = parts.len(), waited = ?started.elapsed(), "released partitions and committed their finished offsets")
            }
            Err(e) => {
                let unacked: u64 = parts.iter().map(|p| p.unacknowledged()).sum();
                self.metrics.uncommitted_on_release.inc_by(unacked);
                error!(error = %e, uncommitted = unacked, "giving partitions up without committing their finished offsets: the commit budget ran out; the next owner delivers them again");
            }
        }
        result
    }

    /// Commits the finished prefix of each of `parts` that is ahead of what the broker
    /// acknowledged, synchronously, and records the acknowledgement. `Ok(false)` when there
    /// was nothing to send. The caller holds [`Self::commit_order`].
    fn commit_once(
        &self,
        consumer: &BaseConsumer<SluiceContext>,
        parts: &[Arc<Progress>],
    ) -> KafkaResult<bool> {
        let taken = Instant::now();
        let mut tpl = TopicPartitionList::new();
        let mut sent = Vec::new();
        for p in parts {
            if let Some(o) = p.snapshot().to_commit() {
                let _ = tpl.add_partition_offset(&p.tp.topic, p.tp.partition, Offset::Offset(o));
                sent.push((p, o));
            }
        }
        if sent.is_empty() {
            return Ok(false);
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.metrics.commit_failures.inc();
                *self
                    .last_commit_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return Err(e);
            }
        }
        self.metrics.commits.inc();
        self.health.kafka_served();
        for (p, o) in &sent {
            p.acknowledge(*o, taken);
            self.metrics
                .committed_offset
                .get_or_create(&TpLabel::from(&p.tp))
                .set(*o);
        }
        // Deliveries held back for a commit that lagged may go on.
        let _ = self.to_dispatcher.try_send(FromKafka::Committed);
        Ok(true)
    }

    /// Commits the finished prefix of `parts` (inside a revoke callback, where the member
    /// holds the current generation), retrying retriable errors until `deadline`.
    fn commit_sync(
        &self,
        consumer: &BaseConsumer<SluiceContext>,
        parts: &[Arc<Progress>],
        deadline: Instant,
    ) -> Result<(), String> {
        let mut tries = 0u32;
        loop {
            tries += 1;
            match self.commit_once(consumer, parts) {
                Ok(sent) => {
                    if sent && tries > 1 {
                        info!(tries, "synchronous commit succeeded after retries");
                    }
                    return Ok(());
                }
                Err(e) if commit_error_is_retriable(&e) && Instant::now() < deadline => {
                    self.warn_limited("sync commit retry", |suppressed| {
                        warn!(error = %e, suppressed, "synchronous commit failed; retrying within the commit budget");
                    });
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// One commit round of the committer: every partition still assigned (active, or
    /// stopped by a drain) whose finished prefix is ahead of what the broker acknowledged is
    /// committed, on the committer's own thread. A failure is sent again the next round.
    fn commit_round(&self, consumer: &BaseConsumer<SluiceContext>) {
        let _order = self.commit_order();
        let parts: Vec<Arc<Progress>> = self.assigned().values().cloned().collect();
        if let Err(e) = self.commit_once(consumer, &parts) {
            self.warn_limited("commit failed", |suppressed| {
                warn!(error = %e, suppressed, "offset commit failed; the finished offsets are sent again next round");
            });
        }
    }

    /// Stops partitions: nothing new starts on them (with `finishing`, except what
    /// [`Progress::release_finishing`] still owes), retry waits end.
    fn stop_partitions(&self, parts: &[Arc<Progress>], finishing: bool) {
        for p in parts {
            if finishing {
                p.release_finishing();
            } else {
                p.release();
                p.close_gap();
            }
        }
    }

    /// The dispatcher may drop the partitions' buffers.
    fn tell_released(&self, parts: &[Arc<Progress>]) {
        self.tell(FromKafka::Released(
            parts.iter().map(|p| (p.tp.clone(), p.epoch)).collect(),
        ));
    }

    /// Serialises commits: a revoke's commit never overtakes (and so is never overwritten
    /// by) an older commit of the same partition from the committer.
    fn commit_order(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the committer now (and, while draining, every 100 ms).
    fn wake_committer(&self) {
        let mut w = self.committer.lock().unwrap_or_else(|p| p.into_inner());
        w.woken = true;
        self.committer_wake.notify_all();
    }

    fn stop_committer(&self) {
        let mut w = self.committer.lock().unwrap_or_else(|p| p.into_inner());
        w.stop = true;
        self.committer_wake.notify_all();
    }

    /// True when every partition still assigned has its finished prefix acknowledged.
    fn all_acknowledged(&self) -> bool {
        self.assigned()
            .values()
            .all(|p| p.snapshot().to_commit().is_none())
    }
}

/// The committer's wake-up state.
#[derive(Debug, Default)]
struct CommitterWake {
    woken: bool,
    stop: bool,
}

/// The committer thread: a commit round every half commit interval (every 100 ms while
/// draining), until stopped, so a finished record normally waits less than one commit
/// interval for its acknowledgement. Synchronous commits run here, never on the polling thread, so
/// a commit that waits for the group coordinator (during a rebalance, say) never stops the
/// polling that lets the rebalance complete.
fn committer(consumer: &BaseConsumer<SluiceContext>, ctx: &SluiceContext) {
    loop {
        {
            let interval = if ctx.draining.load(AtomicOrdering::SeqCst) {
                Duration::from_millis(100)
            } else {
                ctx.budget.commit_interval / 2
            };
            let w = ctx.committer.lock().unwrap_or_else(|p| p.into_inner());
            let (mut w, _) = ctx
                .committer_wake
                .wait_timeout_while(w, interval, |w| !w.woken && !w.stop)
                .unwrap_or_else(|p| p.into_inner());
            if w.stop {
                return;
            }
            w.woken = false;
        }
        ctx.commit_round(consumer);
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| Tp::new(e.topic(), e.partition()))
        .collect()
}

/// Polls once, serving callbacks; records (of paused or released partitions) are dropped.
fn poll_and_drop(consumer: &BaseConsumer<SluiceContext>, timeout: Duration) {
    let _ = consumer.poll(timeout);
}

impl ClientContext for SluiceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // Logs arrive through the polled queue too (rust-rdkafka sets log.queue).
        self.serve();
        let limited = || {
            self.limiter
                .allow(&log_kind(fac, log_message), Instant::now())
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                if let Some(suppressed) = limited() {
                    error!(target: "librdkafka", facility = fac, suppressed, "{log_message}")
                }
            }
            RDKafkaLogLevel::Warning => {
                if let Some(suppressed) = limited() {
                    warn!(target: "librdkafka", facility = fac, suppressed, "{log_message}")
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        self.serve();
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.health.broker_answered();
        }
        if let Some(cgrp) = &statistics.cgrp {
            // A rebalance passes through other join states without the member losing its
            // membership; only a lost assignment (see pre_rebalance) or no coordinator
            // connection means it is not consuming.
            if cgrp.state == "up" && cgrp.join_state == "steady" {
                self.health.set_joined(true);
            } else if cgrp.state != "up" {
                self.health.set_joined(false);
            }
        }
        let assigned = self.assigned();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                let tp = Tp::new(topic, *partition);
                if assigned.contains_key(&tp) && p.leader >= 0 {
                    self.leaders().insert(tp.clone(), p.leader);
                }
                if assigned.contains_key(&tp) {
                    self.metrics
                        .lag
                        .get_or_create(&TpLabel::from(&tp))
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.serve();
        self.metrics.kafka_errors.inc();
        let code = error.rdkafka_error_code();
        use RDKafkaErrorCode as C;
        match code {
            Some(C::Fatal) => {
                self.fatal.store(true, AtomicOrdering::SeqCst);
                error!(error = %error, reason, "fatal Kafka client error: draining and exiting");
                return;
            }
            Some(C::AllBrokersDown) => self.health.brokers_down(KafkaProblem {
                reason: "kafka_unreachable",
                detail: format!("no Kafka broker is reachable: {reason}"),
            }),
            Some(
                C::Authentication
                | C::SaslAuthenticationFailed
                | C::GroupAuthorizationFailed
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::SSL,
            ) => self.health.set_problem(Some(KafkaProblem {
                reason: "kafka_auth",
                detail: format!("Kafka refused the credentials or permissions: {reason}"),
            })),
            _ => {}
        }
        let kind = format!("client error {code:?}");
        self.warn_limited(&kind, |suppressed| {
            warn!(error = %error, reason, suppressed, "Kafka client error");
        });
    }
}

impl ConsumerContext for SluiceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.serve();
        let Rebalance::Revoke(tpl) = rebalance else {
            if let Rebalance::Error(e) = rebalance {
                warn!(error = %e, "rebalance error");
            }
            return;
        };
        let lost = consumer.assignment_lost();
        let partitions = partitions_of(tpl);
        self.metrics
            .rebalances
            .get_or_create(&KindLabel {
                kind: if lost { "lost" } else { "revoke" },
            })
            .inc();
        info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), lost, "partitions revoked");
        if lost {
            self.health.set_joined(false);
        }
        {
            let (mut paused, mut leaders) = (self.fetch_paused(), self.leaders());
            for tp in &partitions {
                paused.remove(tp);
                leaders.remove(tp);
            }
        }
        let parts: Vec<Arc<Progress>> = {
            let mut assigned = self.assigned();
            partitions
                .iter()
                .filter_map(|tp| assigned.remove(tp))
                .collect()
        };
        let _ = self.release(consumer, &parts, lost);
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.serve();
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        let draining = self.draining.load(AtomicOrdering::SeqCst);
        // librdkafka remembers a partition's pause across a lost assignment; a fresh
        // assignment starts unpaused here, so it must start unpaused in librdkafka too. A
        // draining member never starts new partitions: they stay paused until it leaves.
        let result = if draining {
            consumer.pause(tpl)
        } else {
            consumer.resume(tpl)
        };
        if let Err(e) = result {
            warn!(error = %e, draining, "pausing or resuming newly assigned partitions");
        }
        {
            let mut paused = self.fetch_paused();
            for tp in partitions_of(tpl) {
                if draining {
                    paused.insert(tp);
                } else {
                    paused.remove(&tp);
                }
            }
        }
        let mut fresh = Vec::new();
        let mut replaced = Vec::new();
        {
            let mut assigned = self.assigned();
            for tp in partitions_of(tpl) {
                let epoch = self.next_epoch.fetch_add(1, AtomicOrdering::SeqCst);
                let p = Progress::new(tp.clone(), epoch);
                if draining {
                    p.release();
                }
                if let Some(old) = assigned.insert(tp, p.clone()) {
                    replaced.push(old);
                }
                fresh.push(p);
            }
        }
        for old in replaced {
            // An assignment of a partition this member still held: the old epoch is over.
            old.release();
        }
        self.health.set_joined(true);
        self.health.kafka_served();
        self.metrics
            .rebalances
            .get_or_create(&KindLabel { kind: "assign" })
            .inc();
        info!(partitions = ?fresh.iter().map(|p| p.tp.to_string()).collect::<Vec<_>>(), draining, "partitions assigned");
        if !draining && !fresh.is_empty() {
            self.tell(FromKafka::Assigned(fresh));
        }
    }

    // No commit_callback: Sluice commits only explicitly and synchronously (the committer
    // thread and revokes), and librdkafka reports the result of an explicit commit to the
    // caller, not to this context (rust-rdkafka sets no offset_commit_cb). Acknowledgements
    // are recorded where each commit returns (`commit_once`).
}

/// Copies a fetched message out of librdkafka's buffers.
fn to_record(m: &BorrowedMessage<'_>, tp: Tp) -> Record {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect()
        })
        .unwrap_or_default();
    Record {
        tp,
        offset: m.offset(),
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// Creates the consumer and subscribes it. `wake` is sent whenever the consumer queue
/// becomes non-empty, so the thread can sleep on its command channel.
pub fn create_consumer(
    properties: &BTreeMap<String, String>,
    topics: &[String],
    context: SluiceContext,
    wake: Sender<ToKafka>,
) -> KafkaResult<BaseConsumer<SluiceContext>> {
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(k, v);
    }
    // Statistics feed the lag metric and readiness (group state, brokers up).
    config.set("statistics.interval.ms", "1000");
    let mut consumer: BaseConsumer<SluiceContext> = config.create_with_context(context)?;
    let wake = Mutex::new(wake);
    consumer.set_nonempty_callback(move || {
        let _ = wake.lock().map(|w| w.send(ToKafka::Wake));
    });
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Records handed to the dispatcher per message.
const BATCH: usize = 512;

/// The Kafka thread's loop. Returns after a drain (having sent its report), or when the
/// dispatcher went away. The consumer is closed once, when it is dropped at the end: the
/// drop leaves the group, serving the final revoke (which finds nothing left to commit).
pub fn run(consumer: BaseConsumer<SluiceContext>, commands: Receiver<ToKafka>) {
    let ctx = consumer.context().clone();
    std::thread::scope(|scope| {
        let committer = std::thread::Builder::new()
            .name("sluice-commit".into())
            .spawn_scoped(scope, || committer(&consumer, &ctx));
        poll_loop(&consumer, &ctx, &commands);
        ctx.stop_committer();
        if let Ok(handle) = committer {
            let _ = handle.join();
        }
    });
    leave(&consumer, &ctx);
    if close(&consumer) {
        // Closed and out of the group: nothing is left for the handle to do before the
        // process exits. Not dropped, because rust-rdkafka's drop closes the consumer again
        // and logs that second close's failure as an error on every exit.
        std::mem::forget(consumer);
    }
    // Otherwise dropping the consumer closes it, serving the final revoke, if any.
}

/// How long [`close`] polls for the consumer's close to complete before leaving it to the
/// drop (inside the sidecar's overall bound on leaving, `LEAVE_TIMEOUT`).
const CLOSE_WAIT: Duration = Duration::from_secs(8);

/// Closes the consumer (serving the final revoke, if any) with short polls.
///
/// rust-rdkafka's drop closes it too, but checks for the end of the close only between
/// 100 ms polls, and the close's completion wakes no poll: every drain paid ~100 ms after
/// librdkafka had finished (seen in `SLUICE_BENCH_ONLY=drain make bench` with librdkafka's
/// `cgrp` debug log); polled every 5 ms it exits 0.04 s after its last delivery was answered
/// instead of 0.135 s. Returns whether the consumer is closed.
fn close(consumer: &BaseConsumer<SluiceContext>) -> bool {
    if let Err(e) = consumer.close_queue() {
        debug!(error = %e, "closing the consumer early failed; the drop closes it");
        return false;
    }
    let started = Instant::now();
    while !consumer.closed() {
        if started.elapsed() >= CLOSE_WAIT {
            warn!(waited = ?started.elapsed(), "the consumer did not close in time; exiting anyway");
            return false;
        }
        poll_and_drop(consumer, Duration::from_millis(5));
    }
    true
}

/// How long the Kafka thread waits for the classic LeaveGroup to go out before closing
/// anyway (inside the sidecar's overall bound on leaving, `LEAVE_TIMEOUT`).
const LEAVE_WAIT: Duration = Duration::from_secs(8);

/// Leaves the group explicitly before the consumer is closed.
///
/// librdkafka 2.12's close sends no LeaveGroup for a classic member whose cooperative
/// assignment is empty (a newcomer in the first round of a cooperative rebalance, a member
/// of a group larger than its partition count), nor for one closed while its JoinGroup is
/// in flight: its terminate path finds nothing to revoke (or drops the join response) and
/// ends without leaving. The broker then keeps the member until its session timeout (45 s by
/// default), the group's next join phase waits for it, and no member that drains meanwhile
/// can commit (a member's OffsetCommit queues behind its own pending JoinGroup). Found by
/// the churn tests; pinned by consumer_drain's
/// `a_member_without_partitions_leaves_the_group_explicitly_on_sigterm`.
///
/// `unsubscribe` takes the path that leaves (librdkafka postpones it to the end of a
/// rebalance in progress), and the LeaveGroup resets the member id, so the Kafka thread polls
/// (serving the revoke of what is still assigned) until the member id is gone or
/// [`LEAVE_WAIT`] passed. The close that follows waits for the LeaveGroup's answer. With
/// KIP-848 librdkafka's close leaves by itself.
fn leave(consumer: &BaseConsumer<SluiceContext>, ctx: &SluiceContext) {
    consumer.unsubscribe();
    // A fatal error ends the membership in librdkafka's eyes: nothing to wait for.
    if ctx.protocol != GroupProtocol::Classic || ctx.fatal.load(AtomicOrdering::SeqCst) {
        return;
    }
    let started = Instant::now();
    while member_id(consumer).is_some_and(|id| !id.is_empty()) {
        if started.elapsed() >= LEAVE_WAIT {
            warn!(
                waited = ?started.elapsed(),
                "the group did not let this member leave in time (a rebalance in progress?); closing anyway"
            );
            return;
        }
        poll_and_drop(consumer, Duration::from_millis(20));
    }
    debug!(waited = ?started.elapsed(), "LeaveGroup sent");
}

/// The member id librdkafka holds for this consumer (empty once it left the group).
/// rust-rdkafka does not wrap `rd_kafka_memberid`.
#[allow(unsafe_code)]
fn member_id(consumer: &BaseConsumer<SluiceContext>) -> Option<String> {
    use rdkafka::bindings as rd;
    // SAFETY: the handle is alive for the borrow of `consumer`; `rd_kafka_memberid` returns
    // NULL or a NUL-terminated string allocated by librdkafka, which is copied and then
    // released with `rd_kafka_mem_free` exactly once.
    unsafe {
        let rk = consumer.client().native_ptr();
        let ptr = rd::rd_kafka_memberid(rk);
        if ptr.is_null() {
            return None;
        }
        let id = std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned();
        rd::rd_kafka_mem_free(rk, ptr.cast());
        Some(id)
    }
}

fn poll_loop(
    consumer: &BaseConsumer<SluiceContext>,
    ctx: &Arc<SluiceContext>,
    commands: &Receiver<ToKafka>,
) {
    let mut held: Option<Vec<(u64, Record)>> = None;
    loop {
        loop {
            match commands.try_recv() {
                Ok(ToKafka::Drain) => {
                    let report = drain(consumer, ctx, None);
                    ctx.tell(FromKafka::Drained(report));
                    return;
                }
                Ok(cmd) => execute(consumer, ctx, cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if ctx.fatal.load(AtomicOrdering::SeqCst)
            && let Some((code, reason)) = consumer.client().fatal_error()
        {
            let report = drain(consumer, ctx, Some(format!("{code:?}: {reason}")));
            ctx.tell(FromKafka::Drained(report));
            return;
        }
        if let Some(batch) = held.take() {
            match ctx.to_dispatcher.try_send(FromKafka::Records(batch)) {
                Ok(()) => {}
                Err(TrySendError::Full(FromKafka::Records(batch))) => {
                    // The hand-off is full: hold the batch (bounded memory) and try again
                    // shortly, still serving commands.
                    held = Some(batch);
                    wait_command(consumer, ctx, commands, Duration::from_millis(5));
                    continue;
                }
                Err(_) => return,
            }
        }
        let served = ctx.served();
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => match ctx.epoch_of(m.topic(), m.partition()) {
                    Some((tp, epoch)) => batch.push((epoch, to_record(&m, tp))),
                    None => debug!(
                        topic = m.topic(),
                        partition = m.partition(),
                        "record of an unassigned partition dropped"
                    ),
                },
                Some(Err(e)) => {
                    ctx.metrics.kafka_errors.inc();
                    ctx.warn_limited("consumer error", |suppressed| {
                        warn!(error = %e, suppressed, "consumer error");
                    });
                }
                None => break,
            }
        }
        if !batch.is_empty() {
            ctx.metrics.records_consumed.inc_by(batch.len() as u64);
            ctx.health.kafka_served();
            held = Some(batch);
            continue;
        }
        if ctx.served() != served {
            // poll returned after serving a callback, not because the queue was empty.
            continue;
        }
        if !wait_command(consumer, ctx, commands, Duration::from_millis(200)) {
            return;
        }
    }
}

/// Waits up to `timeout` for one command and executes it (a drain is left for the loop).
/// False when the dispatcher went away.
fn wait_command(
    consumer: &BaseConsumer<SluiceContext>,
    ctx: &SluiceContext,
    commands: &Receiver<ToKafka>,
    timeout: Duration,
) -> bool {
    match commands.recv_timeout(timeout) {
        Ok(ToKafka::Drain) => {
            let report = drain(consumer, ctx, None);
            ctx.tell(FromKafka::Drained(report));
            false
        }
        Ok(cmd) => {
            execute(consumer, ctx, cmd);
            true
        }
        Err(RecvTimeoutError::Timeout) => true,
        Err(RecvTimeoutError::Disconnected) => false,
    }
}

fn execute(consumer: &BaseConsumer<SluiceContext>, ctx: &SluiceContext, cmd: ToKafka) {
    match cmd {
        ToKafka::Wake | ToKafka::Drain => {}
        ToKafka::Pause(parts) => {
            let tpl = ctx.current(&parts);
            if tpl.count() > 0 {
                match consumer.pause(&tpl) {
                    Ok(()) => ctx.fetch_paused().extend(partitions_of(&tpl)),
                    Err(e) => warn!(error = %e, "pausing partitions"),
                }
            }
        }
        ToKafka::Resume(parts) => {
            if ctx.draining.load(AtomicOrdering::SeqCst) {
                return;
            }
            let tpl = ctx.current(&parts);
            if tpl.count() == 0 {
                return;
            }
            if let Err(e) = consumer.resume(&tpl) {
                warn!(error = %e, "resuming partitions");
                return;
            }
            let resumed = partitions_of(&tpl);
            let wake = {
                let mut paused = ctx.fetch_paused();
                let wake = to_wake(&resumed, &paused, ctx.assigned().keys(), &ctx.leaders());
                for tp in &resumed {
                    paused.remove(tp);
                }
                wake
            };
            if !wake.is_empty() {
                wake_fetcher(consumer, &wake);
            }
        }
    }
}

/// The resumed partitions whose broker's fetcher is asleep: librdkafka's resume (2.12)
/// only clears the pause flag, and a broker thread whose every partition was paused sleeps
/// up to its maximum block of a second (`rd_kafka_max_block_ms`) before it looks again, so
/// the buffers run dry meanwhile. A resumed partition is woken when every assigned
/// partition with the same leader was paused before this resume (all assigned partitions,
/// when its leader is not known yet). Where another partition of that broker was still
/// fetching, its thread is awake and takes the resumed partition up within milliseconds,
/// and a seek would only throw away its fetch state.
fn to_wake<'a>(
    resumed: &[Tp],
    paused_before: &HashSet<Tp>,
    assigned: impl Iterator<Item = &'a Tp>,
    leaders: &HashMap<Tp, i32>,
) -> Vec<Tp> {
    let assigned: Vec<&Tp> = assigned.collect();
    resumed
        .iter()
        .filter(|r| {
            let leader = leaders.get(*r);
            assigned
                .iter()
                .filter(|tp| leader.is_none() || leaders.get(**tp) == leader)
                .all(|tp| paused_before.contains(*tp))
        })
        .cloned()
        .collect()
}

/// Wakes librdkafka's fetcher for resumed partitions (see [`to_wake`]) by a seek of each to
/// its own position (the record after the last one polled), which is where the pause left
/// the fetcher, so no record is skipped or fetched twice; a partition with nothing polled
/// yet has no position, and librdkafka's resume already starts it (by an offset lookup).
/// The seek is asynchronous and carries no leader epoch, so it costs no round trip.
fn wake_fetcher(consumer: &BaseConsumer<SluiceContext>, resumed: &[Tp]) {
    let positions = match consumer.position() {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "reading positions after a resume");
            return;
        }
    };
    let mut seek = TopicPartitionList::new();
    for tp in resumed {
        if let Some(p) = positions.find_partition(&tp.topic, tp.partition)
            && let Offset::Offset(o) = p.offset()
        {
            let _ = seek.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(o));
        }
    }
    if seek.count() > 0
        && let Err(e) = consumer.seek_partitions(seek, Duration::ZERO)
    {
        warn!(error = %e, "seeking resumed partitions to their positions");
    }
}

/// The drain: every partition is released at once (fetching stops, nothing new starts),
/// in-flight deliveries get the in-flight budget while the consumer keeps being polled
/// (so rebalance callbacks and heartbeats are served), then the finished prefix is committed
/// with retries that poll between tries until the group is stable and the commit carries a
/// valid generation. Assignments that arrive meanwhile stay paused and are never started.
fn drain(
    consumer: &BaseConsumer<SluiceContext>,
    ctx: &SluiceContext,
    fatal: Option<String>,
) -> DrainReport {
    let started = Instant::now();
    ctx.draining.store(true, AtomicOrdering::SeqCst);
    match consumer.assignment() {
        Ok(tpl) if tpl.count() > 0 => {
            if let Err(e) = consumer.pause(&tpl) {
                warn!(error = %e, "pausing all partitions");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "reading the assignment"),
    }
    let parts: Vec<Arc<Progress>> = ctx.assigned().values().cloned().collect();
    // The dispatcher released them already when it asked for the drain (a forced drain
    // finishes nothing more: the membership is gone).
    ctx.stop_partitions(&parts, fatal.is_none());
    // Deliveries running, and records that waited behind their key below records already
    // started (key ordering), which still go.
    let busy = |ctx: &SluiceContext| -> (usize, usize) {
        ctx.assigned().values().fold((0, 0), |(i, o), p| {
            let s = p.snapshot();
            (i + s.in_flight, o + s.owed)
        })
    };
    let (in_flight, owed) = busy(ctx);
    info!(
        partitions = parts.len(),
        in_flight, owed, "drain: stopped fetching, waiting for in-flight deliveries"
    );
    let deadline = started + ctx.budget.in_flight;
    let abandoned = loop {
        let (in_flight, owed) = busy(ctx);
        if in_flight + owed == 0 || Instant::now() >= deadline {
            // Nothing new starts after the wait.
            for p in ctx.assigned().values() {
                p.close_gap();
            }
            break in_flight + owed;
        }
        poll_and_drop(consumer, Duration::from_millis(20));
    };
    let waited = started.elapsed();
    // The committer commits every 100 ms while draining; wait (polling, so a rebalance in
    // progress completes) until the broker acknowledged every finished prefix.
    ctx.wake_committer();
    let commit_deadline = Instant::now() + ctx.budget.commit;
    let commit_result = loop {
        if ctx.all_acknowledged() {
            break Ok(());
        }
        if Instant::now() >= commit_deadline {
            break Err(ctx
                .last_commit_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "no acknowledgement from the group coordinator".into()));
        }
        poll_and_drop(consumer, Duration::from_millis(20));
    };
    let current: Vec<Arc<Progress>> = ctx.assigned().values().cloned().collect();
    let committed = current
        .iter()
        .filter_map(|p| p.snapshot().acked.map(|o| (p.tp.to_string(), o)))
        .collect();
    let uncommitted: u64 = current.iter().map(|p| p.unacknowledged()).sum();
    if uncommitted > 0 {
        ctx.metrics.uncommitted_on_release.inc_by(uncommitted);
        error!(
            uncommitted,
            error = commit_result
                .as_ref()
                .err()
                .map(String::as_str)
                .unwrap_or(""),
            "leaving the group with finished records uncommitted: the commit budget ran out; the next owner delivers them again"
        );
    }
    ctx.closing.store(true, AtomicOrdering::SeqCst);
    let report = DrainReport {
        waited,
        abandoned,
        committed,
        commit_error: commit_result.err(),
        uncommitted,
        fatal,
    };
    info!(%report, "drain finished; leaving the group");
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_lets_one_message_of_a_kind_through_per_interval_and_counts_the_rest() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow("a", t0), Some(0));
        assert_eq!(l.allow("b", t0), Some(0), "kinds are independent");
        for i in 1..=40 {
            assert_eq!(l.allow("a", t0 + Duration::from_millis(i * 25)), None);
        }
        assert_eq!(l.allow("a", t0 + Duration::from_secs(10)), Some(40));
        assert_eq!(l.allow("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(l.allow("a", t0 + Duration::from_secs(20)), Some(1));
    }

    #[test]
    fn log_kinds_ignore_numbers() {
        assert_eq!(
            log_kind(
                "FAIL",
                "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)"
            ),
            log_kind(
                "FAIL",
                "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 12ms in state CONNECT, 3 identical error(s) suppressed)"
            )
        );
        assert_ne!(log_kind("FAIL", "x"), log_kind("REQTMOUT", "x"));
    }

    #[test]
    fn an_auth_problem_ends_only_when_kafka_serves_the_member_again() {
        let h = GroupHealth::default();
        let auth = KafkaProblem {
            reason: "kafka_auth",
            detail: "SSL handshake failed".into(),
        };
        h.set_problem(Some(auth.clone()));
        // A connected broker may still refuse the credentials.
        h.broker_answered();
        assert_eq!(h.problem(), Some(auth.clone()));
        // Brokers that refuse the credentials close the connections: all are down then,
        // and the refusal stays the cause.
        let down = KafkaProblem {
            reason: "kafka_unreachable",
            detail: "no Kafka broker is reachable: 3/3 brokers are down".into(),
        };
        h.brokers_down(down.clone());
        assert_eq!(h.problem(), Some(auth));
        // Records fetched, a commit acknowledged, an assignment: it is over.
        h.kafka_served();
        assert_eq!(h.problem(), None);
        // Without an authentication problem, all brokers down is the cause.
        h.brokers_down(down.clone());
        assert_eq!(h.problem(), Some(down));
        h.set_problem(None);
        let unreachable = KafkaProblem {
            reason: "kafka_unreachable",
            detail: "all brokers down".into(),
        };
        h.set_problem(Some(unreachable.clone()));
        h.broker_answered();
        assert_eq!(h.problem(), None);
        h.set_problem(Some(unreachable));
        h.kafka_served();
        assert_eq!(h.problem(), None);
    }

    #[test]
    fn retriable_commit_errors() {
        use RDKafkaErrorCode as C;
        for c in [
            C::RebalanceInProgress,
            C::IllegalGeneration,
            C::UnknownMemberId,
            C::StaleMemberEpoch,
            C::NotCoordinator,
            C::CoordinatorNotAvailable,
            C::RequestTimedOut,
            C::WaitingForCoordinator,
        ] {
            assert!(
                commit_error_is_retriable(&KafkaError::ConsumerCommit(c)),
                "{c:?}"
            );
        }
        for c in [
            C::NoOffset,
            C::State,
            C::OffsetOutOfRange,
            C::GroupAuthorizationFailed,
            C::Fatal,
        ] {
            assert!(
                !commit_error_is_retriable(&KafkaError::ConsumerCommit(c)),
                "{c:?}"
            );
        }
    }

    #[test]
    fn the_drain_report_says_what_was_left_uncommitted() {
        let r = DrainReport {
            waited: Duration::from_millis(5),
            abandoned: 1,
            committed: vec![("t[0]".into(), 7)],
            commit_error: Some("Broker: Specified group generation id is not valid".into()),
            uncommitted: 12,
            fatal: None,
        };
        let text = r.to_string();
        assert!(
            text.contains("1 abandoned") && text.contains("t[0]@7"),
            "{text}"
        );
        assert!(text.contains("12 finished records uncommitted"), "{text}");
    }

    fn tps(ps: &[i32]) -> Vec<Tp> {
        ps.iter().map(|p| Tp::new("t", *p)).collect()
    }

    fn set(ps: &[i32]) -> HashSet<Tp> {
        tps(ps).into_iter().collect()
    }

    #[test]
    fn a_resume_wakes_the_fetcher_only_where_every_partition_of_the_broker_was_paused() {
        let assigned = tps(&[0, 1, 2, 3]);
        // Partitions 0 and 1 led by broker 1, 2 and 3 by broker 2.
        let leaders: HashMap<Tp, i32> = [(0, 1), (1, 1), (2, 2), (3, 2)]
            .into_iter()
            .map(|(p, l)| (Tp::new("t", p), l))
            .collect();
        let wake = |resumed: &[i32], paused: &[i32]| {
            to_wake(&tps(resumed), &set(paused), assigned.iter(), &leaders)
        };
        // Every partition of broker 1 was paused: its thread sleeps.
        assert_eq!(wake(&[0], &[0, 1]), tps(&[0]));
        assert_eq!(wake(&[0, 1], &[0, 1, 2]), tps(&[0, 1]));
        // Broker 1 still fetches partition 1: its thread is awake.
        assert_eq!(wake(&[0], &[0, 2, 3]), tps(&[]));
        // Per broker: 2 and 3 were paused, 0 was not.
        assert_eq!(wake(&[0, 2], &[0, 2, 3]), tps(&[2]));
        assert_eq!(wake(&[3], &[0, 1, 2, 3]), tps(&[3]));
        assert_eq!(wake(&[], &[0, 1, 2, 3]), tps(&[]));
    }

    #[test]
    fn without_a_known_leader_a_resume_wakes_the_fetcher_only_if_everything_was_paused() {
        let assigned = tps(&[0, 1, 2]);
        let none = HashMap::new();
        let wake = |resumed: &[i32], paused: &[i32]| {
            to_wake(&tps(resumed), &set(paused), assigned.iter(), &none)
        };
        assert_eq!(wake(&[1], &[0, 1, 2]), tps(&[1]));
        assert_eq!(wake(&[1], &[1, 2]), tps(&[]));
        // Partition 1's leader is unknown, 0's is known: 1 is judged on every partition.
        let some: HashMap<Tp, i32> = [(Tp::new("t", 0), 1)].into_iter().collect();
        assert_eq!(
            to_wake(&tps(&[0, 1]), &set(&[0, 1]), assigned.iter(), &some),
            tps(&[0])
        );
        assert_eq!(
            to_wake(&tps(&[0, 1]), &set(&[0, 1, 2]), assigned.iter(), &some),
            tps(&[0, 1])
        );
    }
}
