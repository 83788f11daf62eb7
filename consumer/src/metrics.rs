//! Prometheus metrics of the sidecar. Labels are static reasons or topic/partition, never
//! error text.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::record::Tp;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TpLabel {
    pub topic: String,
    pub partition: String,
}

impl From<&Tp> for TpLabel {
    fn from(tp: &Tp) -> Self {
        TpLabel {
            topic: tp.topic.to_string(),
            partition: tp.partition.to_string(),
        }
    }
}

/// Every metric the sidecar exports.
pub struct Metrics {
    pub registry: Registry,
    pub records_consumed: Counter,
    /// Records finished, by outcome: delivered, skipped, dead_lettered.
    pub records_finished: Family<OutcomeLabel, Counter>,
    /// Delivery attempts by result class.
    pub attempts: Family<OutcomeLabel, Counter>,
    pub retries: Family<ReasonLabel, Counter>,
    pub dead_lettered: Family<ReasonLabel, Counter>,
    pub dead_letter_failures: Counter,
    pub delivery_duration: Histogram,
    pub lag: Family<TpLabel, Gauge>,
    pub committed_offset: Family<TpLabel, Gauge>,
    pub paused: Family<TpLabel, Gauge>,
    pub uncommitted: Family<TpLabel, Gauge>,
    pub in_flight: Gauge,
    pub oldest_in_flight: Gauge<f64, AtomicU64>,
    pub buffered: Gauge,
    pub rebalances: Family<KindLabel, Counter>,
    pub commits: Counter,
    pub commit_failures: Counter,
    pub late_results: Counter,
    pub kafka_errors: Counter,
    pub ready: Gauge,
    /// 1 for the reason the sidecar is not ready now (at most one is 1).
    pub not_ready: Family<ReasonLabel, Gauge>,
    /// Finished records whose offsets could not be committed before their partition left
    /// this member (the commit budget ran out): the next owner delivers them again.
    pub uncommitted_on_release: Counter,
    /// Bytes of records queued and in flight, against the memory budget.
    pub buffered_bytes: Gauge,
    /// Drains started, by what asked for them (signal, prestop_hook, fatal_error).
    pub drains: Family<ReasonLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sluice");
        let m = Metrics {
            records_consumed: Counter::default(),
            records_finished: Family::default(),
            attempts: Family::default(),
            retries: Family::default(),
            dead_lettered: Family::default(),
            dead_letter_failures: Counter::default(),
            delivery_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
            lag: Family::default(),
            committed_offset: Family::default(),
            paused: Family::default(),
            uncommitted: Family::default(),
            in_flight: Gauge::default(),
            oldest_in_flight: Gauge::default(),
            buffered: Gauge::default(),
            rebalances: Family::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            late_results: Counter::default(),
            kafka_errors: Counter::default(),
            ready: Gauge::default(),
            not_ready: Family::default(),
            uncommitted_on_release: Counter::default(),
            buffered_bytes: Gauge::default(),
            drains: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "records_consumed",
            "Records fetched from Kafka",
            m.records_consumed.clone(),
        );
        registry.register(
            "records_finished",
            "Records finished, by outcome (delivered, skipped, dead_lettered)",
            m.records_finished.clone(),
        );
        registry.register(
            "delivery_attempts",
            "HTTP delivery attempts, by result (2xx, 4xx, 5xx, throttled, timeout, connection_error, other)",
            m.attempts.clone(),
        );
        registry.register(
            "records_retried",
            "Delivery retries scheduled, by reason",
            m.retries.clone(),
        );
        registry.register(
            "records_dead_lettered",
            "Records written to the dead-letter topic, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "dead_letter_write_failures",
            "Dead-letter writes the broker did not acknowledge (the partition pauses and retries)",
            m.dead_letter_failures.clone(),
        );
        registry.register(
            "delivery_duration_seconds",
            "Duration of one HTTP delivery attempt",
            m.delivery_duration.clone(),
        );
        registry.register(
            "partition_lag",
            "Records between the committed offset and the end of the partition",
            m.lag.clone(),
        );
        registry.register(
            "partition_committed_offset",
            "Last committed offset per partition",
            m.committed_offset.clone(),
        );
        registry.register(
            "partition_paused",
            "1 while fetching from the partition is paused for backpressure",
            m.paused.clone(),
        );
        registry.register(
            "partition_uncommitted_records",
            "Fetched records beyond the committed prefix (bounded; the partition pauses at the bound)",
            m.uncommitted.clone(),
        );
        registry.register("in_flight", "Deliveries in flight", m.in_flight.clone());
        registry.register(
            "oldest_in_flight_age_seconds",
            "Age of the oldest in-flight delivery",
            m.oldest_in_flight.clone(),
        );
        registry.register(
            "buffered_records",
            "Records fetched and waiting to be dispatched",
            m.buffered.clone(),
        );
        registry.register(
            "rebalances",
            "Partition assignment changes, by kind (assign, revoke, lost)",
            m.rebalances.clone(),
        );
        registry.register(
            "commits",
            "Offset commits acknowledged by the broker",
            m.commits.clone(),
        );
        registry.register(
            "commit_failures",
            "Offset commits that failed",
            m.commit_failures.clone(),
        );
        registry.register(
            "late_results_dropped",
            "Delivery results dropped because their partition was revoked meanwhile",
            m.late_results.clone(),
        );
        registry.register(
            "kafka_errors",
            "Errors reported by the Kafka client",
            m.kafka_errors.clone(),
        );
        registry.register(
            "ready",
            "1 while the application answers and the member holds its group membership",
            m.ready.clone(),
        );
        registry.register(
            "not_ready",
            "1 for the reason the sidecar is not ready (app_unreachable, kafka_unreachable, kafka_auth, joining, draining)",
            m.not_ready.clone(),
        );
        registry.register(
            "uncommitted_on_release",
            "Finished records left uncommitted when a partition left this member because the commit budget ran out (the next owner delivers them again)",
            m.uncommitted_on_release.clone(),
        );
        registry.register(
            "buffered_bytes",
            "Bytes of records queued and in flight, against delivery.maxBufferedBytes",
            m.buffered_bytes.clone(),
        );
        registry.register(
            "drains",
            "Drains started, by trigger (signal, prestop_hook, fatal_error)",
            m.drains.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Forgets a partition's gauges (after it was revoked).
    pub fn forget_partition(&self, tp: &Tp) {
        let l = TpLabel::from(tp);
        self.lag.remove(&l);
        self.committed_offset.remove(&l);
        self.paused.remove(&l);
        self.uncommitted.remove(&l);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_the_documented_names() {
        let m = Metrics::new();
        m.records_consumed.inc();
        m.records_finished
            .get_or_create(&OutcomeLabel {
                outcome: "delivered",
            })
            .inc();
        m.lag.get_or_create(&TpLabel::from(&Tp::new("t", 2))).set(5);
        m.delivery_duration.observe(0.01);
        let text = m.encode();
        for needle in [
            "sluice_records_consumed_total 1",
            "sluice_records_finished_total{outcome=\"delivered\"} 1",
            "sluice_partition_lag{topic=\"t\",partition=\"2\"} 5",
            "sluice_delivery_duration_seconds_bucket",
            "sluice_in_flight 0",
            "sluice_oldest_in_flight_age_seconds 0",
            "sluice_commit_failures_total 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        m.forget_partition(&Tp::new("t", 2));
        assert!(!m.encode().contains("sluice_partition_lag{"));
    }
}
