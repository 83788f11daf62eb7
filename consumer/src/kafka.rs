//! The Kafka side: one OS thread owns the consumer, polls it, runs the rebalance callbacks and
//! executes the dispatcher's commands (pause, resume, commit, finish).
//!
//! The thread never waits for the application except inside a revoke callback, where it must:
//! the revoked partitions' in-flight deliveries are allowed to finish (bounded) and their
//! offsets are committed synchronously before the partitions are given up. Every assignment
//! of a partition gets a new epoch; records, commits and results carry it, so anything that
//! belongs to an earlier assignment is recognised and dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
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
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use crate::metrics::{KindLabel, Metrics, TpLabel};
use crate::record::{Record, Tp};

/// A partition's offset in one assignment epoch.
pub type EpochOffset = (Tp, u64, i64);

/// What the Kafka thread tells the dispatcher.
#[derive(Debug)]
pub enum FromKafka {
    /// Fetched records, each with the epoch of its partition's assignment.
    Records(Vec<(u64, Record)>),
    /// Newly assigned partitions with their epochs.
    Assigned(Vec<(Tp, u64)>),
    /// Partitions being revoked. The dispatcher stops them, waits (bounded) for their
    /// in-flight deliveries and replies with the offsets to commit.
    Revoked {
        partitions: Vec<Tp>,
        lost: bool,
        reply: Sender<Vec<EpochOffset>>,
    },
}

/// What the dispatcher asks of the Kafka thread.
#[derive(Debug)]
pub enum ToKafka {
    /// Nothing: new events are waiting in the consumer queue.
    Wake,
    Pause(Vec<(Tp, u64)>),
    Resume(Vec<(Tp, u64)>),
    /// Commit asynchronously (aggregated, at the commit interval).
    Commit(Vec<EpochOffset>),
    /// Stop fetching everything (drain has begun).
    PauseAll,
    /// Commit synchronously, leave the group, close the consumer, then acknowledge.
    Finish {
        offsets: Vec<EpochOffset>,
        done: tokio::sync::oneshot::Sender<KafkaResult<()>>,
    },
}

/// The consumer's context: rebalance callbacks, commit results, statistics, logs.
pub struct SluiceContext {
    to_dispatcher: UnboundedSender<FromKafka>,
    metrics: Arc<Metrics>,
    assigned: Mutex<Vec<(Tp, u64)>>,
    next_epoch: AtomicU64,
    closing: AtomicBool,
    revoke_wait: Duration,
}

impl SluiceContext {
    pub fn new(
        to_dispatcher: UnboundedSender<FromKafka>,
        metrics: Arc<Metrics>,
        revoke_wait: Duration,
    ) -> Self {
        SluiceContext {
            to_dispatcher,
            metrics,
            assigned: Mutex::new(Vec::new()),
            next_epoch: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            revoke_wait,
        }
    }

    fn assigned(&self) -> std::sync::MutexGuard<'_, Vec<(Tp, u64)>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current epoch of a partition, if it is assigned.
    fn epoch_of(&self, topic: &str, partition: i32) -> Option<(Tp, u64)> {
        self.assigned()
            .iter()
            .find(|(tp, _)| tp.partition == partition && &*tp.topic == topic)
            .cloned()
    }

    /// A list for librdkafka of the offsets whose epoch is still current.
    fn current_offsets(&self, offsets: &[EpochOffset]) -> TopicPartitionList {
        let assigned = self.assigned();
        let mut tpl = TopicPartitionList::new();
        for (tp, epoch, offset) in offsets {
            if assigned.iter().any(|(a, e)| a == tp && e == epoch) {
                let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
            }
        }
        tpl
    }

    fn current_partitions(&self, partitions: &[(Tp, u64)]) -> TopicPartitionList {
        let assigned = self.assigned();
        let mut tpl = TopicPartitionList::new();
        for (tp, epoch) in partitions {
            if assigned.iter().any(|(a, e)| a == tp && e == epoch) {
                tpl.add_partition(&tp.topic, tp.partition);
            }
        }
        tpl
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| Tp::new(e.topic(), e.partition()))
        .collect()
}

impl ClientContext for SluiceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let assigned = self.assigned();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                if assigned
                    .iter()
                    .any(|(tp, _)| tp.partition == *partition && &*tp.topic == topic.as_str())
                {
                    let label = TpLabel {
                        topic: topic.clone(),
                        partition: partition.to_string(),
                    };
                    self.metrics.lag.get_or_create(&label).set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.kafka_errors.inc();
        warn!(error = %error, reason, "Kafka client error");
    }
}

impl ConsumerContext for SluiceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            if let Rebalance::Error(e) = rebalance {
                warn!(error = %e, "rebalance error");
            }
            return;
        };
        let partitions = partitions_of(tpl);
        let lost = consumer.assignment_lost();
        self.metrics
            .rebalances
            .get_or_create(&KindLabel {
                kind: if lost { "lost" } else { "revoke" },
            })
            .inc();
        info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), lost, "partitions revoked");
        if !self.closing.load(AtomicOrdering::SeqCst) {
            let (reply, answer) = std::sync::mpsc::channel();
            let started = Instant::now();
            if self
                .to_dispatcher
                .send(FromKafka::Revoked {
                    partitions: partitions.clone(),
                    lost,
                    reply,
                })
                .is_ok()
            {
                match answer.recv_timeout(self.revoke_wait + Duration::from_secs(5)) {
                    Ok(offsets) if !lost && !offsets.is_empty() => {
                        let tpl = self.current_offsets(&offsets);
                        if tpl.count() > 0 {
                            match consumer.commit(&tpl, CommitMode::Sync) {
                                Ok(()) => {
                                    info!(?offsets, waited = ?started.elapsed(), "committed revoked partitions")
                                }
                                Err(e) => {
                                    error!(error = %e, "synchronous commit on revoke failed; the next owner may redeliver")
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => warn!(
                        "the dispatcher did not release revoked partitions in time; nothing committed for them"
                    ),
                }
            }
        }
        let mut assigned = self.assigned();
        assigned.retain(|(tp, _)| !partitions.contains(tp));
        for tp in &partitions {
            self.metrics.forget_partition(tp);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka remembers a partition's pause across a lost assignment (and a new
            // assignment of the same partition); a fresh assignment starts unpaused here, so
            // it must start unpaused in librdkafka too, or it would never be fetched again.
            if let Err(e) = consumer.resume(tpl) {
                warn!(error = %e, "resuming newly assigned partitions");
            }
            let mut fresh = Vec::new();
            {
                let mut assigned = self.assigned();
                for tp in partitions_of(tpl) {
                    let epoch = self.next_epoch.fetch_add(1, AtomicOrdering::SeqCst);
                    assigned.retain(|(a, _)| *a != tp);
                    assigned.push((tp.clone(), epoch));
                    fresh.push((tp, epoch));
                }
            }
            self.metrics
                .rebalances
                .get_or_create(&KindLabel { kind: "assign" })
                .inc();
            info!(partitions = ?fresh.iter().map(|(tp, _)| tp.to_string()).collect::<Vec<_>>(), "partitions assigned");
            let _ = self.to_dispatcher.send(FromKafka::Assigned(fresh));
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.metrics.commits.inc();
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        let label = TpLabel {
                            topic: e.topic().to_owned(),
                            partition: e.partition().to_string(),
                        };
                        self.metrics.committed_offset.get_or_create(&label).set(o);
                    }
                }
            }
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.metrics.commit_failures.inc();
                warn!(error = %e, "offset commit failed");
            }
        }
    }
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
    config.set("statistics.interval.ms", "5000");
    let mut consumer: BaseConsumer<SluiceContext> = config.create_with_context(context)?;
    let wake = Mutex::new(wake);
    consumer.set_nonempty_callback(move || {
        let _ = wake.lock().map(|w| w.send(ToKafka::Wake));
    });
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// The Kafka thread's loop. Returns when the consumer was closed after `Finish`, or when
/// the dispatcher went away.
pub fn run(
    consumer: BaseConsumer<SluiceContext>,
    commands: Receiver<ToKafka>,
    metrics: Arc<Metrics>,
) {
    const BATCH: usize = 1024;
    let ctx = consumer.context().clone();
    loop {
        loop {
            match commands.try_recv() {
                Ok(cmd) => {
                    if execute(&consumer, &ctx, cmd) {
                        return;
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
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
                    metrics.kafka_errors.inc();
                    warn!(error = %e, "consumer error");
                }
                None => break,
            }
        }
        if !batch.is_empty() {
            metrics.records_consumed.inc_by(batch.len() as u64);
            if ctx.to_dispatcher.send(FromKafka::Records(batch)).is_err() {
                return;
            }
            continue;
        }
        match commands.recv_timeout(Duration::from_millis(200)) {
            Ok(cmd) => {
                if execute(&consumer, &ctx, cmd) {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Executes one command; true when the consumer is closed and the thread must end.
fn execute(consumer: &BaseConsumer<SluiceContext>, ctx: &SluiceContext, cmd: ToKafka) -> bool {
    match cmd {
        ToKafka::Wake => {}
        ToKafka::Pause(parts) => {
            let tpl = ctx.current_partitions(&parts);
            if tpl.count() > 0
                && let Err(e) = consumer.pause(&tpl)
            {
                warn!(error = %e, "pausing partitions");
            }
        }
        ToKafka::Resume(parts) => {
            let tpl = ctx.current_partitions(&parts);
            if tpl.count() > 0
                && let Err(e) = consumer.resume(&tpl)
            {
                warn!(error = %e, "resuming partitions");
            }
        }
        ToKafka::Commit(offsets) => {
            let tpl = ctx.current_offsets(&offsets);
            if tpl.count() > 0
                && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
            {
                ctx.metrics.commit_failures.inc();
                warn!(error = %e, "asynchronous commit could not be sent");
            }
        }
        ToKafka::PauseAll => match consumer.assignment() {
            Ok(tpl) if tpl.count() > 0 => {
                if let Err(e) = consumer.pause(&tpl) {
                    warn!(error = %e, "pausing all partitions");
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "reading the assignment"),
        },
        ToKafka::Finish { offsets, done } => {
            let tpl = ctx.current_offsets(&offsets);
            let mut result = Ok(());
            if tpl.count() > 0 {
                result = consumer.commit(&tpl, CommitMode::Sync);
                match &result {
                    Ok(()) => info!(?offsets, "final commit done"),
                    Err(e) => error!(error = %e, "final commit failed"),
                }
            }
            ctx.closing.store(true, AtomicOrdering::SeqCst);
            close(consumer);
            let _ = done.send(result);
            return true;
        }
    }
    false
}

/// Leaves the group and closes the consumer (bounded to 30 s).
fn close(consumer: &BaseConsumer<SluiceContext>) {
    let started = Instant::now();
    if let Err(e) = consumer.close_queue() {
        warn!(error = %e, "closing the consumer");
        return;
    }
    while !consumer.closed() && started.elapsed() < Duration::from_secs(30) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    info!(took = ?started.elapsed(), "left the consumer group");
}
