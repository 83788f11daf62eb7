//! Wiring: wait for the application, create the consumer and its thread, run the dispatcher
//! until the drain is complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rdkafka::ClientConfig;
use sluice_config::{HttpUrl, SidecarConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::deliver::{DeadLetterWriter, Deliverer, http_client};
use crate::dispatch::Dispatcher;
use crate::kafka::{self, SluiceContext};
use crate::metrics::Metrics;
use crate::policy::Backoff;

/// The drain handshake shared by signals, `/drain` and the pipeline. Requesting it any number
/// of times, from anywhere, starts one drain; everyone waiting sees the same result.
#[derive(Clone)]
pub struct DrainControl {
    requested: CancellationToken,
    done: Arc<watch::Sender<Option<String>>>,
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
        }
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

/// Readiness as `/readyz` reports it.
#[derive(Default)]
pub struct Readiness {
    pub app_reachable: AtomicBool,
    pub consuming: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.app_reachable.load(AtomicOrdering::SeqCst)
            && self.consuming.load(AtomicOrdering::SeqCst)
    }
}

/// Waits until the application accepts connections (or the readiness URL answers 2xx).
pub async fn wait_for_app(config: &SidecarConfig) {
    let delivery = HttpUrl::parse(&config.delivery.url).expect("validated");
    let readiness = config
        .app
        .readiness_url
        .as_deref()
        .map(|u| u.parse::<http::Uri>().expect("validated"));
    let client = http_client(1);
    let started = Instant::now();
    let mut last_log = None::<Instant>;
    loop {
        let ok = match &readiness {
            Some(uri) => {
                let req = http::Request::get(uri.clone())
                    .body(Full::new(Bytes::new()))
                    .expect("valid request");
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), async {
                        let resp = client.request(req).await.ok()?;
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
                    tokio::net::TcpStream::connect(delivery.authority())
                )
                .await,
                Ok(Ok(_))
            ),
        };
        if ok {
            info!(waited = ?started.elapsed(), "the application is reachable");
            return;
        }
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            info!(
                target = config
                    .app
                    .readiness_url
                    .as_deref()
                    .unwrap_or(&config.delivery.url),
                "waiting for the application"
            );
            last_log = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the sidecar's pipeline until a drain completes. Errors are start-up failures.
pub async fn run(
    config: SidecarConfig,
    drain: DrainControl,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let requested = drain.token();
    tokio::select! {
        _ = wait_for_app(&config) => {}
        _ = requested.cancelled() => {
            drain.finish("drained before joining the group".into());
            return Ok(());
        }
    }
    readiness.app_reachable.store(true, AtomicOrdering::SeqCst);

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

    let (to_dispatcher, from_kafka) = tokio::sync::mpsc::unbounded_channel();
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
    ));
    let context = SluiceContext::new(to_dispatcher, metrics.clone(), config.drain.timeout);
    let consumer = kafka::create_consumer(
        &consumer_props,
        &kafka_cfg.topics,
        context,
        to_kafka.clone(),
    )
    .context("creating the Kafka consumer")?;
    info!(group = %kafka_cfg.group_id, topics = ?kafka_cfg.topics, protocol = ?kafka_cfg.protocol, ordering = %d.ordering, "joining the consumer group");
    let thread_metrics = metrics.clone();
    let kafka_thread = std::thread::Builder::new()
        .name("sluice-kafka".into())
        .spawn(move || kafka::run(consumer, commands, thread_metrics))
        .context("starting the Kafka thread")?;
    readiness.consuming.store(true, AtomicOrdering::SeqCst);
    metrics.ready.set(1);

    let dispatcher = Dispatcher::new(
        d.ordering,
        d.max_in_flight as usize,
        config.drain.timeout,
        d.commit_interval,
        deliverer.clone(),
        to_kafka,
        metrics.clone(),
    );
    let report = dispatcher.run(from_kafka, events_rx, drain.token()).await;
    readiness.consuming.store(false, AtomicOrdering::SeqCst);
    metrics.ready.set(0);
    if let Some(w) = deliverer.dead_letter() {
        w.flush(Duration::from_secs(5));
    }
    let joined = tokio::task::spawn_blocking(move || kafka_thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        warn!("the Kafka thread panicked");
    }
    let summary = report.to_string();
    drain.finish(summary);
    if !drain.is_requested() {
        anyhow::bail!("the consumer stopped without a drain: {report}");
    }
    if let Some(e) = report.commit_error {
        warn!(error = %e, "the drain's final commit failed");
    }
    Ok(())
}
