//! Delivery of one record: HTTP attempts with retries, then the dead-letter topic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::cloudevents::{
    BATCH_CONTENT_TYPE, HEADER_BATCH_SIZE, HEADER_PARTITION, HEADER_TOPIC, PartitionHeaders,
    batch_body, event_id, request_headers_with,
};
use crate::dispatch::Follow;
use crate::metrics::{Metrics, OutcomeLabel, ReasonLabel};
use crate::policy::{
    AttemptResult, Backoff, MAX_BATCH_RESPONSE_BYTES, Next, OUTCOME_HEADER, Verdict, classify,
    classify_batch, next_step,
};
use crate::progress::Progress;
use crate::record::{Record, Tp};
use crate::sidecar::AppGate;

/// How a record's delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Skipped,
    DeadLettered,
    /// Given up because its partition was revoked or the sidecar is draining: not finished,
    /// so its offset is not committed and the next owner delivers it again.
    Abandoned,
}

/// What delivery tasks tell the dispatcher. (The record's offset is settled in its
/// partition's [`Progress`] before `Done` is sent; the dispatcher only does its bookkeeping.)
#[derive(Debug)]
pub enum TaskEvent {
    Done {
        tp: Tp,
        epoch: u64,
        key: Option<Bytes>,
        /// The record's size, released from the memory budget.
        bytes: usize,
        /// Whether its request slot is free: false when the task went on with the next
        /// record (`next`), and for a batch's records (a batch task sends
        /// [`TaskEvent::SlotFree`] once all its records are done).
        slot: bool,
        /// Whether the task already ended the record in its partition's state
        /// ([`Follow::end_and_take`]); otherwise the dispatcher does.
        ended: bool,
        /// The size of the partition's next record, when the task took it and went on with
        /// it in the same slot.
        next: Option<usize>,
    },
    /// A batch task ended: its request slot is free.
    SlotFree,
    /// The record cannot currently be finished (dead-letter topic unwritable, or no
    /// dead-letter topic): its partition pauses until `blocked: false`.
    Blocked { tp: Tp, epoch: u64, blocked: bool },
}

/// Header names of a dead-lettered record (added to its original headers).
pub mod dlq_headers {
    pub const REASON: &str = "sluice-dlq-reason";
    pub const DETAIL: &str = "sluice-dlq-detail";
    pub const TOPIC: &str = "sluice-dlq-topic";
    pub const PARTITION: &str = "sluice-dlq-partition";
    pub const OFFSET: &str = "sluice-dlq-offset";
    pub const ATTEMPTS: &str = "sluice-dlq-attempts";
    pub const GROUP: &str = "sluice-dlq-group";
    pub const TIMESTAMP: &str = "sluice-dlq-original-timestamp";
}

/// Writes records to the dead-letter topic with an idempotent, acks=all producer.
pub struct DeadLetterWriter {
    config: ClientConfig,
    producer: Mutex<FutureProducer>,
    topic: String,
    group: String,
}

impl DeadLetterWriter {
    pub fn new(mut config: ClientConfig, topic: String, group: String) -> Result<Self, KafkaError> {
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "10000")
            // A missing topic fails the write after 2 s (then it is retried) instead of 30 s.
            .set("topic.metadata.propagation.max.ms", "2000");
        let producer = config.create()?;
        Ok(DeadLetterWriter {
            config,
            producer: Mutex::new(producer),
            topic,
            group,
        })
    }

    fn producer(&self) -> FutureProducer {
        let mut guard = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((code, reason)) = guard.client().fatal_error() {
            warn!(%code, %reason, "the dead-letter producer hit a fatal error; creating a new one");
            match self.config.create::<FutureProducer>() {
                Ok(p) => *guard = p,
                Err(e) => error!(error = %e, "cannot create a new dead-letter producer"),
            }
        }
        guard.clone()
    }

    /// Writes `record` with its key, value and headers plus the `sluice-dlq-*` headers, and
    /// returns once the broker acknowledged it.
    pub async fn write(
        &self,
        record: &Record,
        reason: &str,
        detail: &str,
        attempts: u32,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 8);
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let partition = record.tp.partition.to_string();
        let offset = record.offset.to_string();
        let attempts = attempts.to_string();
        let timestamp = record.timestamp_ms.map(|t| t.to_string());
        let mut extra: Vec<(&str, &str)> = vec![
            (dlq_headers::REASON, reason),
            (dlq_headers::DETAIL, detail),
            (dlq_headers::TOPIC, &record.tp.topic),
            (dlq_headers::PARTITION, &partition),
            (dlq_headers::OFFSET, &offset),
            (dlq_headers::ATTEMPTS, &attempts),
            (dlq_headers::GROUP, &self.group),
        ];
        if let Some(ts) = &timestamp {
            extra.push((dlq_headers::TIMESTAMP, ts));
        }
        for (k, v) in extra {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &record.key {
            fr = fr.key(k.as_ref());
        }
        if let Some(v) = &record.value {
            fr = fr.payload(v.as_ref());
        }
        let producer = self.producer();
        producer
            .send(fr, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// Waits (bounded) for queued dead-letter writes on shutdown. Blocking: call it off the
    /// async runtime.
    pub fn flush(&self, timeout: Duration) {
        let producer = self.producer();
        if let Err(e) = producer.flush(timeout) {
            warn!(error = %e, "flushing the dead-letter producer");
        }
    }
}

/// One record of a batch delivery, with its attempt counters.
struct BatchItem {
    rec: Record,
    id: String,
    sent: u32,
    failures: u32,
    retries: u32,
}

/// Delivers records over HTTP/1.1 keep-alive.
pub struct Deliverer {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    dead_letter: Option<DeadLetterWriter>,
    metrics: Arc<Metrics>,
    events: UnboundedSender<TaskEvent>,
    app: Arc<AppGate>,
    /// Start times of the deliveries running, by a sequence number (so the first is the
    /// oldest).
    running: Mutex<BTreeMap<u64, Instant>>,
    seq: AtomicU64,
}

/// A hyper client for the application on localhost: keep-alive, no Nagle.
pub fn http_client(max_idle: usize) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle)
        .build(connector)
}

impl Deliverer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        uri: http::Uri,
        timeout: Duration,
        max_attempts: u32,
        backoff: Backoff,
        max_in_flight: usize,
        dead_letter: Option<DeadLetterWriter>,
        metrics: Arc<Metrics>,
        events: UnboundedSender<TaskEvent>,
        app: Arc<AppGate>,
    ) -> Self {
        Deliverer {
            client: http_client(max_in_flight),
            uri,
            timeout,
            max_attempts,
            backoff,
            dead_letter,
            metrics,
            events,
            app,
            running: Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(0),
        }
    }

    /// How long the oldest running delivery has been running.
    pub fn oldest_in_flight_age(&self) -> Duration {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .values()
            .next()
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    pub fn dead_letter(&self) -> Option<&DeadLetterWriter> {
        self.dead_letter.as_ref()
    }

    /// Delivers one record to the end, settles it in its partition's progress and tells the
    /// dispatcher. The record must have been started in `progress` ([`Progress::start`]).
    /// With `follow`, the task then takes the partition's next record, if it may start now,
    /// and goes on with it.
    pub async fn run(
        self: Arc<Self>,
        mut record: Record,
        progress: Arc<Progress>,
        follow: Option<Follow>,
    ) {
        let epoch = progress.epoch;
        let cancel = progress.cancelled().clone();
        loop {
            let mut blocked = false;
            let id = self.started();
            let outcome = self
                .deliver(&record, &progress.headers, epoch, &cancel, &mut blocked)
                .await;
            progress.end(record.offset, outcome != Outcome::Abandoned);
            self.ended(id, &record.tp, epoch, blocked);
            let bytes = record.size();
            let next = follow
                .as_ref()
                .and_then(|f| f.end_and_take(record.key.as_ref()));
            let _ = self.events.send(TaskEvent::Done {
                tp: record.tp,
                epoch,
                key: record.key,
                bytes,
                slot: next.is_none(),
                ended: follow.is_some(),
                next: next.as_ref().map(Record::size),
            });
            match next {
                Some(r) => record = r,
                None => return,
            }
        }
    }

    /// Delivers a batch of one partition's records (in offset order, all started in
    /// `progress`) to the end: one request for the records still open, retrying only the
    /// records the answer did not finish, then dead-lettering those that ran out of attempts.
    /// Each record is settled in the progress and reported as soon as it is done.
    pub async fn run_batch(self: Arc<Self>, records: Vec<Record>, progress: Arc<Progress>) {
        let epoch = progress.epoch;
        let cancel = progress.cancelled().clone();
        let mut blocked = false;
        let id = self.started();
        let mut open: Vec<BatchItem> = records
            .into_iter()
            .map(|rec| BatchItem {
                id: event_id(&rec),
                rec,
                sent: 0,
                failures: 0,
                retries: 0,
            })
            .collect();
        let mut first = true;
        while !open.is_empty() {
            // As for one record: the first attempt always goes (see `deliver`).
            if (!first && cancel.is_cancelled())
                || (!self.app.is_up() && !self.app.wait_up(&cancel).await)
            {
                break;
            }
            first = false;
            for item in &mut open {
                item.sent += 1;
            }
            let verdicts = self.attempt_batch(&open).await;
            let mut delay = Duration::ZERO;
            let mut keep = Vec::with_capacity(open.len());
            let mut dead = Vec::new();
            for (mut item, verdict) in open.drain(..).zip(verdicts) {
                match &verdict {
                    Verdict::Retry { counts: true, .. } => item.failures += 1,
                    Verdict::AppDown { .. } => item.sent -= 1,
                    _ => {}
                }
                if !matches!(verdict, Verdict::AppDown { .. }) {
                    item.retries += 1;
                }
                let step = next_step(
                    &verdict,
                    item.failures,
                    item.retries,
                    self.max_attempts,
                    &self.backoff,
                    rand::random::<f64>(),
                );
                match step {
                    None => {
                        let outcome = if verdict == Verdict::Skipped {
                            Outcome::Skipped
                        } else {
                            Outcome::Delivered
                        };
                        self.count_finished(outcome);
                        self.settle(item.rec, outcome, &progress);
                    }
                    Some(Next::WaitForApp) => {
                        if let Verdict::AppDown { detail } = &verdict {
                            self.app.mark_down(detail);
                        }
                        self.metrics
                            .retries
                            .get_or_create(&ReasonLabel {
                                reason: "app_unreachable",
                            })
                            .inc();
                        keep.push(item);
                    }
                    Some(Next::RetryAfter(d)) => {
                        if let Verdict::Retry { reason, detail, .. } = &verdict {
                            self.metrics
                                .retries
                                .get_or_create(&ReasonLabel { reason })
                                .inc();
                            debug!(tp = %item.rec.tp, offset = item.rec.offset, attempt = item.sent, %detail, ?d, "retrying delivery (batch)");
                        }
                        delay = delay.max(d);
                        keep.push(item);
                    }
                    Some(Next::DeadLetter { reason, detail }) => dead.push((item, reason, detail)),
                }
            }
            if !dead.is_empty() {
                if let Some(writer) = &self.dead_letter {
                    // Written concurrently; each write parks the partition while it fails
                    // (its own flag), and the park is lifted when the writes are over.
                    let mut flags = vec![false; dead.len()];
                    let writes =
                        dead.iter()
                            .zip(flags.iter_mut())
                            .map(|((item, reason, detail), flag)| {
                                self.write_dead_letter(
                                    writer, &item.rec, reason, detail, item.sent, epoch, &cancel,
                                    flag,
                                )
                            });
                    let outcomes = futures::future::join_all(writes).await;
                    for _ in flags.into_iter().filter(|f| *f) {
                        let _ = self.events.send(TaskEvent::Blocked {
                            tp: progress.tp.clone(),
                            epoch,
                            blocked: false,
                        });
                    }
                    for ((item, _, _), outcome) in dead.into_iter().zip(outcomes) {
                        self.settle(item.rec, outcome, &progress);
                    }
                } else {
                    // No dead-letter topic: never skip. Park the partition and keep trying.
                    self.set_blocked(&progress.tp, epoch, &mut blocked);
                    for (mut item, _, detail) in dead {
                        self.metrics
                            .retries
                            .get_or_create(&ReasonLabel {
                                reason: "no_dead_letter_topic",
                            })
                            .inc();
                        warn!(tp = %item.rec.tp, offset = item.rec.offset, %detail, "record cannot be delivered and there is no dead-letter topic; retrying with the partition paused");
                        item.failures = 0;
                        delay = delay.max(self.backoff.max);
                        keep.push(item);
                    }
                }
            }
            // Retried records go again in offset order.
            keep.sort_by_key(|item| item.rec.offset);
            open = keep;
            if !open.is_empty() && !delay.is_zero() && !sleep_unless_cancelled(delay, &cancel).await
            {
                break;
            }
        }
        for item in open {
            self.settle(item.rec, Outcome::Abandoned, &progress);
        }
        self.ended(id, &progress.tp, epoch, blocked);
        let _ = self.events.send(TaskEvent::SlotFree);
    }

    /// A delivery starts: noted for the oldest-in-flight gauge; its id.
    fn started(&self) -> u64 {
        let id = self.seq.fetch_add(1, AtomicOrdering::Relaxed);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now());
        id
    }

    /// The delivery `id` ended; if it had blocked its partition, the partition is unblocked.
    fn ended(&self, id: u64, tp: &Tp, epoch: u64, blocked: bool) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if blocked {
            let _ = self.events.send(TaskEvent::Blocked {
                tp: tp.clone(),
                epoch,
                blocked: false,
            });
        }
    }

    fn count_finished(&self, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Skipped => "skipped",
            Outcome::DeadLettered => "dead_lettered",
            _ => "delivered",
        };
        self.metrics
            .records_finished
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Settles one record of a batch in its progress and tells the dispatcher.
    fn settle(&self, rec: Record, outcome: Outcome, progress: &Progress) {
        progress.end(rec.offset, outcome != Outcome::Abandoned);
        let bytes = rec.size();
        let _ = self.events.send(TaskEvent::Done {
            tp: rec.tp,
            epoch: progress.epoch,
            key: rec.key,
            bytes,
            slot: false,
            ended: false,
            next: None,
        });
    }

    async fn attempt_batch(&self, open: &[BatchItem]) -> Vec<Verdict> {
        let body = batch_body(open.iter().map(|i| (&i.rec, i.id.as_str(), i.sent)));
        let first = &open[0].rec;
        let mut req = Request::post(self.uri.clone())
            .body(Full::new(Bytes::from(body)))
            .expect("a POST to a valid URI is a valid request");
        let h = req.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(BATCH_CONTENT_TYPE),
        );
        for (name, value) in [
            (HEADER_TOPIC, first.tp.topic.to_string()),
            (HEADER_PARTITION, first.tp.partition.to_string()),
            (HEADER_BATCH_SIZE, open.len().to_string()),
        ] {
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                h.insert(http::HeaderName::from_static(name), v);
            }
        }
        let started = Instant::now();
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Self::request_failed(&e))?;
            let result = Self::response_result(&resp);
            let content_type = Self::response_header(&resp, "content-type");
            let mut body = resp.into_body();
            let mut bytes = Vec::new();
            let mut too_long = false;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| AttemptResult::ConnectionError(error_chain(&e)))?;
                if let Some(data) = frame.data_ref() {
                    if bytes.len() + data.len() > MAX_BATCH_RESPONSE_BYTES {
                        too_long = true;
                    } else {
                        bytes.extend_from_slice(data);
                    }
                }
            }
            if too_long {
                // Not JSON as far as the classification goes: malformed.
                bytes = b"<longer than the limit>".to_vec();
            }
            Ok::<_, AttemptResult>((result, content_type, bytes))
        };
        let (result, content_type, body) = match tokio::time::timeout(self.timeout, exchange).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(r)) => (r, None, Vec::new()),
            Err(_) => (AttemptResult::Timeout, None, Vec::new()),
        };
        self.observe(&result, started);
        let ids: Vec<&str> = open.iter().map(|i| i.id.as_str()).collect();
        classify_batch(
            &result,
            content_type.as_deref(),
            &body,
            &ids,
            SystemTime::now(),
        )
    }

    fn set_blocked(&self, tp: &Tp, epoch: u64, blocked: &mut bool) {
        if !*blocked {
            *blocked = true;
            let _ = self.events.send(TaskEvent::Blocked {
                tp: tp.clone(),
                epoch,
                blocked: true,
            });
        }
    }

    async fn deliver(
        &self,
        rec: &Record,
        headers: &PartitionHeaders,
        epoch: u64,
        cancel: &CancellationToken,
        blocked: &mut bool,
    ) -> Outcome {
        let mut sent = 0u32;
        let mut failures = 0u32;
        let mut retries = 0u32;
        loop {
            // A dispatched record always gets its first attempt, even if its partition was
            // released meanwhile (the drain and the revoke wait for it): abandoning it
            // unsent would leave a gap below records of the same partition that did reach
            // the application (key and none modes), and the next owner would deliver those
            // again. Retries, and waits for an application that is down, stop at once.
            if retries > 0 && cancel.is_cancelled() {
                return Outcome::Abandoned;
            }
            if !self.app.is_up() && !self.app.wait_up(cancel).await {
                return Outcome::Abandoned;
            }
            sent += 1;
            let result = self.attempt(rec, headers, sent).await;
            let verdict = classify(&result, SystemTime::now());
            match &verdict {
                Verdict::Retry { counts: true, .. } => failures += 1,
                Verdict::AppDown { .. } => sent -= 1,
                _ => {}
            }
            if !matches!(verdict, Verdict::AppDown { .. }) {
                retries += 1;
            }
            let step = next_step(
                &verdict,
                failures,
                retries,
                self.max_attempts,
                &self.backoff,
                rand::random::<f64>(),
            );
            match step {
                None => {
                    let outcome = if verdict == Verdict::Skipped {
                        "skipped"
                    } else {
                        "delivered"
                    };
                    self.metrics
                        .records_finished
                        .get_or_create(&OutcomeLabel { outcome })
                        .inc();
                    return if verdict == Verdict::Skipped {
                        Outcome::Skipped
                    } else {
                        Outcome::Delivered
                    };
                }
                Some(Next::WaitForApp) => {
                    if let Verdict::AppDown { detail } = &verdict {
                        self.app.mark_down(detail);
                    }
                    self.metrics
                        .retries
                        .get_or_create(&ReasonLabel {
                            reason: "app_unreachable",
                        })
                        .inc();
                }
                Some(Next::RetryAfter(delay)) => {
                    if let Verdict::Retry { reason, detail, .. } = &verdict {
                        self.metrics
                            .retries
                            .get_or_create(&ReasonLabel { reason })
                            .inc();
                        debug!(tp = %rec.tp, offset = rec.offset, attempt = sent, %detail, ?delay, "retrying delivery");
                    }
                    if !sleep_unless_cancelled(delay, cancel).await {
                        return Outcome::Abandoned;
                    }
                }
                Some(Next::DeadLetter { reason, detail }) => {
                    let Some(writer) = &self.dead_letter else {
                        // No dead-letter topic: never skip. Park the partition and keep trying.
                        self.set_blocked(&rec.tp, epoch, blocked);
                        self.metrics
                            .retries
                            .get_or_create(&ReasonLabel {
                                reason: "no_dead_letter_topic",
                            })
                            .inc();
                        warn!(tp = %rec.tp, offset = rec.offset, %detail, "record cannot be delivered and there is no dead-letter topic; retrying with the partition paused");
                        if !sleep_unless_cancelled(self.backoff.max, cancel).await {
                            return Outcome::Abandoned;
                        }
                        failures = 0;
                        continue;
                    };
                    return self
                        .write_dead_letter(
                            writer, rec, reason, &detail, sent, epoch, cancel, blocked,
                        )
                        .await;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_dead_letter(
        &self,
        writer: &DeadLetterWriter,
        rec: &Record,
        reason: &'static str,
        detail: &str,
        attempts: u32,
        epoch: u64,
        cancel: &CancellationToken,
        blocked: &mut bool,
    ) -> Outcome {
        let mut failures = 0u32;
        loop {
            match writer.write(rec, reason, detail, attempts).await {
                Ok(()) => {
                    self.metrics
                        .dead_lettered
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                    self.metrics
                        .records_finished
                        .get_or_create(&OutcomeLabel {
                            outcome: "dead_lettered",
                        })
                        .inc();
                    warn!(tp = %rec.tp, offset = rec.offset, reason, %detail, attempts, "record dead-lettered");
                    return Outcome::DeadLettered;
                }
                Err(e) => {
                    failures += 1;
                    self.metrics.dead_letter_failures.inc();
                    error!(tp = %rec.tp, offset = rec.offset, error = %e, "cannot write to the dead-letter topic; the partition pauses and the write is retried");
                    self.set_blocked(&rec.tp, epoch, blocked);
                    let delay = self.backoff.delay(failures, rand::random::<f64>());
                    if !sleep_unless_cancelled(delay, cancel).await {
                        return Outcome::Abandoned;
                    }
                }
            }
        }
    }

    async fn attempt(
        &self,
        rec: &Record,
        headers: &PartitionHeaders,
        attempt: u32,
    ) -> AttemptResult {
        let body = Full::new(rec.value.clone().unwrap_or_default());
        let mut req = Request::post(self.uri.clone())
            .body(body)
            .expect("a POST to a valid URI is a valid request");
        *req.headers_mut() = request_headers_with(rec, attempt, headers);
        let started = Instant::now();
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Self::request_failed(&e))?;
            let result = Self::response_result(&resp);
            // Read the whole body so the connection goes back to the pool.
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                frame.map_err(|e| AttemptResult::ConnectionError(error_chain(&e)))?;
            }
            Ok::<_, AttemptResult>(result)
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(r)) | Ok(Err(r)) => r,
            Err(_) => AttemptResult::Timeout,
        };
        self.observe(&result, started);
        result
    }

    /// A request that got no response: a refused or failed connect means the application is
    /// not there (no attempt used up); anything else is a failed exchange.
    fn request_failed(e: &hyper_util::client::legacy::Error) -> AttemptResult {
        if e.is_connect() {
            AttemptResult::Unreachable(error_chain(e))
        } else {
            AttemptResult::ConnectionError(error_chain(e))
        }
    }

    fn response_header<B>(resp: &http::Response<B>, name: &str) -> Option<String> {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// What the application's answer says, from its status line and headers.
    fn response_result<B>(resp: &http::Response<B>) -> AttemptResult {
        AttemptResult::Response {
            status: resp.status().as_u16(),
            retry_after: Self::response_header(resp, "retry-after"),
            outcome: Self::response_header(resp, OUTCOME_HEADER),
        }
    }

    fn observe(&self, result: &AttemptResult, started: Instant) {
        self.metrics
            .delivery_duration
            .observe(started.elapsed().as_secs_f64());
        let class = match result {
            AttemptResult::Response {
                status: 200..=299, ..
            } => "2xx",
            AttemptResult::Response { status: 429, .. } => "throttled",
            AttemptResult::Response {
                status: 400..=499, ..
            } => "4xx",
            AttemptResult::Response {
                status: 500..=599, ..
            } => "5xx",
            AttemptResult::Response { .. } => "other",
            AttemptResult::Timeout => "timeout",
            AttemptResult::ConnectionError(_) => "connection_error",
            AttemptResult::Unreachable(_) => "unreachable",
        };
        self.metrics
            .attempts
            .get_or_create(&OutcomeLabel { outcome: class })
            .inc();
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Sleeps for `delay`; false if cancelled first.
async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = cancel.cancelled() => false,
    }
}
