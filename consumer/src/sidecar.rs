//! Wiring: wait for the application, create the consumer and its thread, run the dispatcher
//! until the drain is complete. Also what the sidecar knows about the application's
//! availability ([`AppGate`]) and its own readiness ([`Readiness`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rdkafka::ClientConfig;
use sluice_config::{HttpUrl, SidecarConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::deliver::{DeadLetterWriter, Deliverer, http_client};
use crate::dispatch::{BatchLimits, Dispatcher, MemoryBudget};
use crate::kafka::{self, Budget, GroupHealth, SluiceContext};
use crate::metrics::{Metrics, ReasonLabel};
use crate::policy::Backoff;

/// The drain handshake shared by signals, `/drain` and the pipeline. Requesting it any number
/// of times, from anywhere, starts one drain; everyone waiting sees the same result.
#[derive(Clone)]
pub struct DrainControl {
    requested: CancellationToken,
    done: Arc<watch::Sender<Option<String>>>,
    /// A `GET /drain` with the right token arrived.
    called: CancellationToken,
}

impl Default for DrainControl {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainControl {
    pub fn new() -> Self {
        DrainControl {
            requested: CancellationToken::new(),
            done: Arc::new(watch::channel(None).0),
            called: CancellationToken::new(),
        }
    }

    /// Notes that `GET /drain` was called (with the right token).
    pub fn called(&self) {
        self.called.cancel();
    }

    /// Waits up to `bound` for a `GET /drain` call; returns whether one came.
    pub async fn wait_called(&self, bound: std::time::Duration) -> bool {
        tokio::time::timeout(bound, self.called.cancelled())
            .await
            .is_ok()
    }

    pub fn request(&self) {
        self.requested.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    pub fn token(&self) -> CancellationToken {
        self.requested.clone()
    }

    pub fn finish(&self, summary: String) {
        self.done.send_replace(Some(summary));
    }

    pub fn is_done(&self) -> bool {
        self.done.borrow().is_some()
    }

    /// Waits until the drain has finished and returns its summary.
    pub async fn wait_done(&self) -> String {
        let mut rx = self.done.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "drain state lost".into(),
        }
    }
}

/// Whether the application answers, shared by the deliveries, the dispatcher and readiness.
///
/// It starts down. When a delivery cannot reach the application (connection refused), the
/// gate closes: deliveries wait instead of using up attempts, the dispatcher starts nothing
/// new, readiness turns false, and a prober checks the application every 200 ms until it
/// answers again.
pub struct AppGate {
    up: watch::Sender<bool>,
    delivery: HttpUrl,
    readiness: Option<http::Uri>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    down_since: std::sync::Mutex<Option<Instant>>,
}

impl AppGate {
    pub fn new(config: &SidecarConfig) -> Arc<AppGate> {
        Arc::new(AppGate {
            up: watch::channel(false).0,
            delivery: HttpUrl::parse(&config.delivery.url).expect("validated"),
            readiness: config
                .app
                .readiness_url
                .as_deref()
                .map(|u| u.parse::<http::Uri>().expect("validated")),
            client: http_client(1),
            down_since: std::sync::Mutex::new(Some(Instant::now())),
        })
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Sets the state directly (tests).
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Waits until the application is up; false if `cancel` fired first.
    pub async fn wait_up(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.up.subscribe();
        tokio::select! {
            r = rx.wait_for(|up| *up) => r.is_ok(),
            _ = cancel.cancelled() => false,
        }
    }

    /// A delivery found the application unreachable: close the gate and probe until it
    /// answers again.
    pub fn mark_down(self: &Arc<Self>, detail: &str) {
        if self.up.send_if_modified(|up| std::mem::replace(up, false)) {
            *self.down_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            warn!(%detail, "the application is unreachable: deliveries wait (no attempts are used up) until it answers again");
            tokio::spawn(self.clone().watch_until_up());
        }
    }

    /// One check: the readiness URL answers 2xx, or (without one) the delivery address
    /// accepts a TCP connection.
    async fn probe(&self) -> bool {
        match &self.readiness {
            Some(uri) => {
                let req = http::Request::get(uri.clone())
                    .body(Full::new(Bytes::new()))
                    .expect("valid request");
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), async {
                        let resp = self.client.request(req).await.ok()?;
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        Some(ok)
                    })
                    .await,
                    Ok(Some(true))
                )
            }
            None => matches!(
                tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(self.delivery.authority())
                )
                .await,
                Ok(Ok(_))
            ),
        }
    }

    /// Probes every 200 ms until the application answers, then opens the gate.
    pub async fn watch_until_up(self: Arc<Self>) {
        let mut last_log = None::<Instant>;
        loop {
            if self.probe().await {
                let since = self
                    .down_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                info!(waited = ?since.map(|t| t.elapsed()), "the application is reachable");
                self.up.send_replace(true);
                return;
            }
            if last_log.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                info!(
                    target = self
                        .readiness
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_else(|| self.delivery.authority().to_string()),
                    "waiting for the application"
                );
                last_log = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Readiness as `/readyz` and `sluice_ready` report it: the application answers and the
/// member holds its group membership, with no Kafka problem outstanding, and no drain.
pub struct Readiness {
    pub app: Arc<AppGate>,
    pub group: Arc<GroupHealth>,
    pub drain: DrainControl,
}

impl Readiness {
    /// `Ok(())` when ready, else the static reason and a sentence for people.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.drain.is_requested() {
            return Err(("draining", "draining".into()));
        }
        if !self.app.is_up() {
            return Err(("app_unreachable", "waiting for the application".into()));
        }
        if let Some(p) = self.group.problem() {
            return Err((p.reason, p.detail));
        }
        if !self.group.joined() {
            return Err(("joining", "joining the consumer group".into()));
        }
        Ok(())
    }

    /// Sets `sluice_ready` and `sluice_not_ready{reason}` from [`Readiness::check`].
    pub fn export(&self, metrics: &Metrics) -> Result<(), (&'static str, String)> {
        let result = self.check();
        metrics.ready.set(i64::from(result.is_ok()));
        for reason in [
            "draining",
            "app_unreachable",
            "kafka_unreachable",
            "kafka_auth",
            "joining",
        ] {
            let on = matches!(&result, Err((r, _)) if *r == reason);
            metrics
                .not_ready
                .get_or_create(&ReasonLabel { reason })
                .set(i64::from(on));
        }
        result
    }
}

/// How the sidecar run ended.
#[derive(Debug)]
pub enum Ended {
    /// Drained as asked (signal or `/drain`).
    Drained,
    /// The consumer hit a fatal error: drained, and the process must exit non-zero.
    Fatal(String),
}

/// Runs the sidecar's pipeline until a drain completes. Errors are start-up failures.
pub async fn run(
    config: SidecarConfig,
    drain: DrainControl,
    app: Arc<AppGate>,
    group: Arc<GroupHealth>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Ended> {
    let requested = drain.token();
    tokio::select! {
        _ = app.clone().watch_until_up() => {}
        _ = requested.cancelled() => {
            drain.finish("drained before joining the group".into());
            return Ok(Ended::Drained);
        }
    }

    let kafka_cfg = &config.kafka;
    let consumer_props = kafka_cfg
        .consumer_properties()
        .context("reading Kafka credentials")?;
    let dead_letter = match &config.delivery.dead_letter_topic {
        Some(topic) => {
            let mut producer_cfg = ClientConfig::new();
            for (k, v) in kafka_cfg
                .client_properties()
                .context("reading Kafka credentials")?
            {
                producer_cfg.set(k, v);
            }
            Some(
                DeadLetterWriter::new(producer_cfg, topic.clone(), kafka_cfg.group_id.clone())
                    .context("creating the dead-letter producer")?,
            )
        }
        None => None,
    };

    // The hand-off from the Kafka thread is bounded (batches of up to 512 records): a slow
    // dispatcher holds the Kafka thread's next batch instead of growing a queue.
    let (to_dispatcher, from_kafka) = tokio::sync::mpsc::channel(4);
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (to_kafka, commands) = std::sync::mpsc::channel();
    let d = &config.delivery;
    let uri: http::Uri = d.url.parse().context("delivery.url")?;
    let deliverer = Arc::new(Deliverer::new(
        uri,
        d.timeout,
        d.retry.max_attempts,
        Backoff {
            initial: d.retry.initial_backoff,
            max: d.retry.max_backoff,
        },
        d.max_in_flight as usize,
        dead_letter,
        metrics.clone(),
        events_tx,
        app.clone(),
    ));
    let context = SluiceContext::new(
        to_dispatcher,
        metrics.clone(),
        group,
        Budget {
            in_flight: config.drain.timeout,
            commit: config.drain.commit_timeout,
            commit_interval: d.commit_interval,
        },
        kafka_cfg.protocol,
    );
    let consumer = kafka::create_consumer(
        &consumer_props,
        &kafka_cfg.topics,
        context,
        to_kafka.clone(),
    )
    .context("creating the Kafka consumer")?;
    info!(group = %kafka_cfg.group_id, topics = ?kafka_cfg.topics, protocol = ?kafka_cfg.protocol, ordering = %d.ordering, "joining the consumer group");
    let kafka_thread = std::thread::Builder::new()
        .name("sluice-kafka".into())
        .spawn(move || kafka::run(consumer, commands))
        .context("starting the Kafka thread")?;

    let dispatcher = Dispatcher::new(
        d.ordering,
        d.max_in_flight as usize,
        MemoryBudget {
            max_bytes: usize::try_from(d.max_buffered_bytes).unwrap_or(usize::MAX),
        },
        deliverer.clone(),
        to_kafka,
        metrics.clone(),
        app.subscribe(),
        d.commit_interval,
        d.batch.as_ref().map(|b| BatchLimits {
            max_records: b.max_records as usize,
            max_bytes: usize::try_from(b.max_bytes).unwrap_or(usize::MAX),
            max_wait: b.max_wait,
        }),
    );
    // The dispatcher runs on a worker thread of the runtime, next to the delivery tasks it
    // starts and that report back to it: on the thread that runs this function (outside the
    // worker pool) every start and every result was a wake-up across threads.
    let report = match tokio::spawn(dispatcher.run(from_kafka, events_rx, drain.token())).await {
        Ok(report) => report,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    if report.fatal.is_some() {
        metrics
            .drains
            .get_or_create(&ReasonLabel {
                reason: "fatal_error",
            })
            .inc();
    }
    // The Kafka thread leaves the group and closes the consumer once, on its way out; the
    // wait for it is bounded so a broker that never answers cannot hold the pod.
    let deliverer_for_flush = deliverer.clone();
    let closing = tokio::task::spawn_blocking(move || {
        if let Some(w) = deliverer_for_flush.dead_letter() {
            w.flush(Duration::from_secs(5));
        }
        kafka_thread.join()
    });
    match tokio::time::timeout(LEAVE_TIMEOUT, closing).await {
        Ok(Ok(Ok(()))) => info!("left the consumer group"),
        Ok(_) => warn!("the Kafka thread panicked"),
        Err(_) => warn!(
            timeout = ?LEAVE_TIMEOUT,
            "leaving the group did not finish in time; exiting anyway (the broker drops the member at its session timeout)"
        ),
    }
    let summary = report.to_string();
    drain.finish(summary);
    if let Some(fatal) = report.fatal {
        return Ok(Ended::Fatal(fatal));
    }
    if !drain.is_requested() {
        anyhow::bail!("the consumer stopped without a drain: {report}");
    }
    if let Some(e) = report.commit_error {
        error!(error = %e, uncommitted = report.uncommitted, "the drain's final commit failed");
    }
    Ok(Ended::Drained)
}

/// Bound on leaving the group and closing the consumer after the drain's commit.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
