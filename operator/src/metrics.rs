//! The operator's Prometheus metrics and its HTTP endpoint: `/metrics`, `/healthz`,
//! `/readyz`. Served by every replica, leader or not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the failure counter: a static reason only (bounded cardinality).
pub type ReasonLabels = Vec<(&'static str, &'static str)>;
/// Labels of the per-EventConsumer series: namespace and name.
pub type ConsumerLabels = Vec<(&'static str, String)>;

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run (successful or not).
    pub reconciles: Counter,
    /// Reconciles that failed, by the error's static reason.
    pub failures: Family<ReasonLabels, Counter>,
    /// Duration of one reconcile, in seconds.
    pub duration: Histogram,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Consumer-group lag computations (for `status.lag`) started.
    pub lag_queries: Counter,
    /// Lag computations that failed (lag unknown), by the error's static reason.
    pub lag_errors: Family<ReasonLabels, Counter>,
    /// The last measured lag of each EventConsumer (records).
    pub consumer_lag: Family<ConsumerLabels, Gauge>,
    /// 1 when an EventConsumer's last lag measurement failed (its lag series is the last
    /// value measured).
    pub consumer_lag_stale: Family<ConsumerLabels, Gauge>,
    /// Kafka clients the lag collector holds (one per connection identity).
    pub lag_clients: Gauge,
    /// status.lag writes.
    pub lag_status_writes: Counter,
    /// Status writes by the reconciler.
    pub status_writes: Counter,
    /// Server-side applies skipped because the desired object had not changed.
    pub applies_skipped: Counter,
    /// Deployments rolling for an operator-side change (a new sidecar image) now.
    pub sidecar_rollouts: Gauge,
    /// EventConsumers whose operator-side change waits for a turn.
    pub sidecar_rollouts_waiting: Gauge,
    /// Set once the replica has reached the API server (leader or follower).
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sluice_operator");
        let reconciles = Counter::default();
        let failures = Family::<ReasonLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let leader = Gauge::default();
        let lag_queries = Counter::default();
        let lag_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconciles",
            "EventConsumer reconciles run",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed EventConsumer reconciles, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one EventConsumer reconcile",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "lag_queries",
            "Consumer-group lag computations for status.lag",
            lag_queries.clone(),
        );
        registry.register(
            "lag_errors",
            "Consumer-group lag computations that failed (status.lag unknown), by reason",
            lag_errors.clone(),
        );
        let consumer_lag = Family::<ConsumerLabels, Gauge>::default();
        let consumer_lag_stale = Family::<ConsumerLabels, Gauge>::default();
        let lag_clients = Gauge::default();
        let lag_status_writes = Counter::default();
        let status_writes = Counter::default();
        let applies_skipped = Counter::default();
        registry.register(
            "consumer_lag",
            "Records not yet committed by the EventConsumer's group, summed over its partitions, as last measured",
            consumer_lag.clone(),
        );
        registry.register(
            "consumer_lag_stale",
            "1 when the EventConsumer's last lag measurement failed (consumer_lag is the last value measured)",
            consumer_lag_stale.clone(),
        );
        registry.register(
            "lag_clients",
            "Kafka clients held by the lag collector (one per connection identity)",
            lag_clients.clone(),
        );
        registry.register(
            "lag_status_writes",
            "status.lag writes",
            lag_status_writes.clone(),
        );
        registry.register(
            "status_writes",
            "EventConsumer status writes by the reconciler",
            status_writes.clone(),
        );
        registry.register(
            "applies_skipped",
            "Server-side applies skipped because the desired object had not changed",
            applies_skipped.clone(),
        );
        let sidecar_rollouts = Gauge::default();
        let sidecar_rollouts_waiting = Gauge::default();
        registry.register(
            "sidecar_rollouts",
            "Deployments rolling for an operator-side change (a new sidecar image) now",
            sidecar_rollouts.clone(),
        );
        registry.register(
            "sidecar_rollouts_waiting",
            "EventConsumers whose operator-side change (a new sidecar image) waits for a turn (--max-sidecar-rollouts)",
            sidecar_rollouts_waiting.clone(),
        );
        Metrics {
            registry,
            sidecar_rollouts,
            sidecar_rollouts_waiting,
            consumer_lag,
            consumer_lag_stale,
            lag_clients,
            lag_status_writes,
            status_writes,
            applies_skipped,
            reconciles,
            failures,
            duration,
            leader,
            lag_queries,
            lag_errors,
            ready: AtomicBool::new(false),
        }
    }

    /// Records one reconcile.
    pub fn observe(&self, elapsed: Duration, failure: Option<&'static str>) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(reason) = failure {
            self.failures.get_or_create(&vec![("reason", reason)]).inc();
        }
    }

    /// Records one lag computation and, if it failed, its reason.
    pub fn observe_lag(&self, failure: Option<&'static str>) {
        self.lag_queries.inc();
        if let Some(reason) = failure {
            self.lag_errors
                .get_or_create(&vec![("reason", reason)])
                .inc();
        }
    }

    /// Sets an EventConsumer's lag series (`None`: never measured, no value series).
    pub fn set_consumer_lag(&self, namespace: &str, name: &str, lag: Option<i64>, stale: bool) {
        let labels = vec![
            ("namespace", namespace.to_owned()),
            ("name", name.to_owned()),
        ];
        if let Some(lag) = lag {
            self.consumer_lag.get_or_create(&labels).set(lag);
        }
        self.consumer_lag_stale
            .get_or_create(&labels)
            .set(i64::from(stale));
    }

    /// Drops an EventConsumer's series (it was deleted).
    pub fn forget_consumer(&self, namespace: &str, name: &str) {
        let labels = vec![
            ("namespace", namespace.to_owned()),
            ("name", name.to_owned()),
        ];
        self.consumer_lag.remove(&labels);
        self.consumer_lag_stale.remove(&labels);
    }

    /// Lag computations that failed with this reason so far.
    pub fn lag_errors_with(&self, reason: &'static str) -> u64 {
        self.lag_errors
            .get_or_create(&vec![("reason", reason)])
            .get()
    }

    /// Failures with this reason so far.
    pub fn failures_with(&self, reason: &'static str) -> u64 {
        self.failures.get_or_create(&vec![("reason", reason)]).get()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The HTTP router of the operator's endpoint.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the API server yet\n",
        )
    }
}

/// Serves the endpoint until `shutdown` completes.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counts_reasons_histogram_and_leader() {
        let m = Metrics::new();
        m.observe(Duration::from_millis(20), None);
        m.observe(Duration::from_millis(30), Some("SecretNotFound"));
        m.leader.set(1);
        m.observe_lag(None);
        m.observe_lag(Some("Timeout"));
        let text = m.encode();
        assert!(
            text.contains("sluice_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_reconcile_failures_total{reason=\"SecretNotFound\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("sluice_operator_leader 1"), "{text}");
        assert!(
            text.contains("sluice_operator_lag_queries_total 2"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_lag_errors_total{reason=\"Timeout\"} 1"),
            "{text}"
        );
        assert_eq!(m.lag_errors_with("Timeout"), 1);
        m.set_consumer_lag("ns", "ec", Some(42), false);
        m.set_consumer_lag("ns", "other", None, true);
        let text = m.encode();
        assert!(
            text.contains("sluice_operator_consumer_lag{namespace=\"ns\",name=\"ec\"} 42"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_consumer_lag_stale{namespace=\"ns\",name=\"other\"} 1"),
            "{text}"
        );
        assert!(!text.contains("sluice_operator_consumer_lag{namespace=\"ns\",name=\"other\"}"));
        m.forget_consumer("ns", "ec");
        assert!(!m.encode().contains("name=\"ec\""));
        assert_eq!(m.failures_with("SecretNotFound"), 1);
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let m = Arc::new(Metrics::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(axum::serve(listener, router(m.clone())).into_future());
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        m.set_ready();
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get("/metrics").await;
        assert!(
            metrics.contains("sluice_operator_reconciles_total 0"),
            "{metrics}"
        );
        server.abort();
    }
}
