//! From what the user says about the workload to the consumer's Kafka settings and the pod's
//! termination timing. Pure: no I/O, no clock.
//!
//! Each rule below carries its reason; `docs/eventconsumer.md` ("How Sluice derives the
//! timings") explains the same rules to users.

use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{EventConsumerSpec, GroupProtocol};

// ----- Ranges the broker and librdkafka accept ---------------------------------------------

/// Broker default `group.min.session.timeout.ms`: a shorter session is refused at join.
pub const BROKER_MIN_SESSION_MS: u64 = 6_000;
/// Broker default `group.max.session.timeout.ms`.
pub const BROKER_MAX_SESSION_MS: u64 = 1_800_000;
/// librdkafka's upper bound of `max.poll.interval.ms`.
pub const LIBRDKAFKA_MAX_POLL_MS: u64 = 86_400_000;
/// librdkafka's bounds of `queued.max.messages.kbytes`.
pub const LIBRDKAFKA_MIN_QUEUE_KBYTES: u64 = 1;
pub const LIBRDKAFKA_MAX_QUEUE_KBYTES: u64 = 2_097_151;
/// librdkafka's lower bound of `fetch.max.bytes` and `max.partition.fetch.bytes`.
pub const LIBRDKAFKA_MIN_FETCH_BYTES: u64 = 1;
/// librdkafka's upper bound of `fetch.max.bytes`.
pub const LIBRDKAFKA_MAX_FETCH_BYTES: u64 = 2_147_483_135;

// ----- Sluice's own rules --------------------------------------------------------------------

/// Session timeout when the user sets none: Kafka's own default since 3.0. A crashed pod's
/// partitions stall this long; graceful shutdowns leave the group at once and never wait for
/// it, so a generous value costs only crash failover and buys tolerance of network blips.
pub const DEFAULT_SESSION_MS: u64 = 45_000;
/// Heartbeats more frequent than this only load the group coordinator.
pub const MAX_DEFAULT_HEARTBEAT_MS: u64 = 3_000;
/// Least time allowed for the synchronous commit after in-flight work finished (one round
/// trip to the group coordinator, with retries on a coordinator move).
pub const COMMIT_TIMEOUT_MS: u64 = 5_000;
/// The broker's default `group.consumer.heartbeat.interval.ms` (KIP-848): a member learns of
/// a new member epoch at its next heartbeat.
pub const BROKER_CONSUMER_HEARTBEAT_MS: u64 = 5_000;
/// Round trips on top of the heartbeats in the commit budget.
pub const COMMIT_MARGIN_MS: u64 = 2_000;
/// Time allowed for leaving the group (LeaveGroup request and closing the client).
pub const LEAVE_TIMEOUT_MS: u64 = 5_000;
/// Slack in the grace period for the kubelet's hook call, signal delivery and the
/// application's own shutdown after its SIGTERM (which comes after the drain).
pub const GRACE_MARGIN_MS: u64 = 10_000;
/// Slack of the poll deadline above the longest stretch the poll loop can be blocked.
pub const POLL_MARGIN_MS: u64 = 30_000;
/// Lowest max.poll.interval.ms Sluice sets: the deadline only catches a wedged client,
/// never a slow application (the sidecar keeps polling while the application works), so a
/// short floor detects a wedged sidecar sooner without risking false positives.
pub const MIN_POLL_INTERVAL_MS: u64 = 60_000;
/// Sidecar memory limit assumed when none is set (the operator's default limit).
pub const DEFAULT_SIDECAR_MEMORY_BYTES: u64 = 256 * MIB;
/// Memory the sidecar needs besides Kafka buffers (runtime, HTTP client, metrics, librdkafka
/// metadata and per-connection buffers).
pub const BASELINE_MEMORY_BYTES: u64 = 32 * MIB;
/// The smallest memory limit the CRD accepts (`rules::sidecar_memory_floor`).
pub const MIN_SIDECAR_MEMORY_BYTES: u64 = 64 * MIB;
/// Number of brokers a consumer may have fetch responses in flight from at the same time
/// that the fetch sizing allows for. librdkafka sends one fetch per broker leading an
/// assigned partition; sized for this many, a larger cluster only overshoots when one pod's
/// partitions are led by more brokers than this.
pub const FETCH_BROKERS_BUDGETED: u64 = 4;
/// Per-partition fetch size Sluice aims for (librdkafka's default is 1 MiB, which with many
/// partitions on one broker makes each fetch response large without fetching faster);
/// lowered when the budget is small. A larger record is still fetched, alone.
/// The sidecar's own default (one constant, so the two cannot drift apart).
pub const TARGET_PARTITION_FETCH_BYTES: u64 =
    sluice_config::DEFAULT_MAX_PARTITION_FETCH_BYTES as u64;
/// Most the sidecar's own record budget (`delivery.maxBufferedBytes`) and librdkafka's
/// prefetch queue (`queued.max.messages.kbytes`) get, each, however large the memory limit:
/// the dispatcher takes what is prefetched within a fraction of a second, so more prefetch or
/// buffering buys no throughput and only holds memory (`make bench` with
/// `SLUICE_BENCH_SIDECAR_CONFIG`). The sidecar's own defaults, taken from its constants. A
/// smaller limit still shrinks them.
pub const MAX_BUFFER_BYTES: u64 = sluice_config::DEFAULT_MAX_BUFFERED_BYTES;
const _: () = assert!(
    sluice_config::DEFAULT_QUEUED_MAX_MESSAGES_KBYTES as u64 * 1024 == MAX_BUFFER_BYTES,
    "one cap serves the sidecar's record budget and librdkafka's prefetch queue"
);
/// Most one fetch response may carry (`fetch.max.bytes`), for the same reason: the
/// sidecar's own default.
pub const MAX_FETCH_BYTES: u64 = sluice_config::DEFAULT_FETCH_MAX_BYTES as u64;
/// Minimum prefetched messages per partition librdkafka tries to hold (the sidecar's own
/// default). The byte cap of the queue binds first; the low count keeps many-partition
/// consumers from prefetching for all partitions up to the cap.
pub const QUEUED_MIN_MESSAGES: u64 = sluice_config::DEFAULT_QUEUED_MIN_MESSAGES as u64;

const MIB: u64 = 1024 * 1024;

/// The settings Sluice derives for one EventConsumer: Kafka consumer properties for the
/// sidecar and the pod's termination timing. Also reported in `status.effective`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Tuning {
    /// Consumer group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// librdkafka `group.protocol`: `classic` or `consumer`.
    pub group_protocol: String,
    /// librdkafka `partition.assignment.strategy` (classic protocol only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_assignment_strategy: Option<String>,
    /// librdkafka `session.timeout.ms` (classic protocol only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout_ms: Option<u64>,
    /// librdkafka `heartbeat.interval.ms` (classic protocol only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// librdkafka `max.poll.interval.ms`.
    pub max_poll_interval_ms: u64,
    /// librdkafka `queued.max.messages.kbytes`: the prefetch queue's byte cap.
    pub queued_max_messages_kbytes: u64,
    /// librdkafka `queued.min.messages`.
    pub queued_min_messages: u64,
    /// librdkafka `fetch.max.bytes`: largest fetch response per broker.
    pub fetch_max_bytes: u64,
    /// librdkafka `max.partition.fetch.bytes`.
    pub max_partition_fetch_bytes: u64,
    /// How long the sidecar waits for in-flight deliveries on a revoke or drain, in
    /// milliseconds.
    pub in_flight_timeout_ms: u64,
    /// Bound of the synchronous commit after in-flight work (retried while the group
    /// rebalances), in milliseconds.
    pub commit_timeout_ms: u64,
    /// The sidecar's memory budget for records queued and in flight, in bytes.
    pub max_buffered_bytes: u64,
    /// Bound of leaving the group, in milliseconds.
    pub leave_timeout_ms: u64,
    /// The whole drain (in-flight wait, commit, leave), in seconds.
    pub drain_timeout_seconds: u64,
    /// The pod's terminationGracePeriodSeconds.
    pub termination_grace_period_seconds: u64,
}

impl Tuning {
    /// The Kafka consumer properties, as librdkafka key/value pairs. Keys the protocol does
    /// not use are absent, not empty.
    pub fn kafka_properties(&self) -> Vec<(&'static str, String)> {
        let mut props = vec![("group.protocol", self.group_protocol.clone())];
        if let Some(s) = &self.partition_assignment_strategy {
            props.push(("partition.assignment.strategy", s.clone()));
        }
        if let Some(ms) = self.session_timeout_ms {
            props.push(("session.timeout.ms", ms.to_string()));
        }
        if let Some(ms) = self.heartbeat_interval_ms {
            props.push(("heartbeat.interval.ms", ms.to_string()));
        }
        props.push((
            "max.poll.interval.ms",
            self.max_poll_interval_ms.to_string(),
        ));
        props.push((
            "queued.max.messages.kbytes",
            self.queued_max_messages_kbytes.to_string(),
        ));
        props.push(("queued.min.messages", self.queued_min_messages.to_string()));
        props.push(("fetch.max.bytes", self.fetch_max_bytes.to_string()));
        props.push((
            "max.partition.fetch.bytes",
            self.max_partition_fetch_bytes.to_string(),
        ));
        props
    }

    /// Upper bound of the memory the Kafka client's buffers take, whatever the number of
    /// assigned partitions: the prefetch queue's cap, plus one fetch response that may
    /// overshoot it from each budgeted broker. (With the high-level consumer librdkafka
    /// applies `queued.max.messages.kbytes` to the single consumer queue, not per partition,
    /// and stops fetching once it is full; a partition's share of a fetch response never
    /// exceeds `max.partition.fetch.bytes` except for a single oversized record, and the
    /// whole response never exceeds `fetch.max.bytes`.)
    pub fn kafka_buffer_bound_bytes(&self, partitions: u64) -> u64 {
        let per_response =
            (partitions.max(1) * self.max_partition_fetch_bytes).min(self.fetch_max_bytes);
        self.queued_max_messages_kbytes * 1024 + FETCH_BROKERS_BUDGETED * per_response
    }
}

/// Derives the consumer settings and pod timing from a spec. `group_id` is the effective
/// consumer group (see `KafkaSpec::effective_group_id`), echoed into the result for status.
pub fn tune(spec: &EventConsumerSpec, group_id: Option<String>) -> Tuning {
    let membership = spec.membership.clone().unwrap_or_default();

    // The longest any one delivery can be in flight. processing.maxDuration is the user's
    // worst case; the CRD guarantees it is at least delivery.timeout. Without it, the
    // delivery timeout is the bound: the sidecar abandons an attempt at that point anyway.
    let in_flight = spec
        .processing
        .as_ref()
        .and_then(|p| p.max_duration)
        .map(Duration::from)
        .unwrap_or_else(|| spec.delivery.timeout.into());
    let in_flight_ms = in_flight.as_millis().min(u128::from(u64::MAX)) as u64;

    // Classic protocol: the client owns session and heartbeat timing, and the assignor is
    // cooperative-sticky so a rebalance only moves the partitions that must move (the others
    // keep flowing). KIP-848 `consumer`: the broker owns assignment, session and heartbeat
    // timing (group.consumer.*); librdkafka refuses session.timeout.ms,
    // heartbeat.interval.ms and partition.assignment.strategy with it, so none are sent.
    let (protocol, strategy, session_ms, heartbeat_ms) = match membership.protocol {
        GroupProtocol::Classic => {
            let session = membership
                .session_timeout
                .map(|d| millis(d.into()))
                .unwrap_or(DEFAULT_SESSION_MS)
                // The broker refuses a join outside its range; clamp rather than fail at runtime
                // (the CRD already enforces the same range).
                .clamp(BROKER_MIN_SESSION_MS, BROKER_MAX_SESSION_MS);
            // Heartbeat at most a third of the session so two lost heartbeats don't lose the
            // session; not more often than every 3 s by default (coordinator load).
            let heartbeat = membership
                .heartbeat_interval
                .map(|d| millis(d.into()))
                .unwrap_or_else(|| (session / 3).min(MAX_DEFAULT_HEARTBEAT_MS))
                .clamp(1, session / 3);
            (
                "classic",
                Some("cooperative-sticky".to_string()),
                Some(session),
                Some(heartbeat),
            )
        }
        GroupProtocol::Consumer => ("consumer", None, None, None),
    };

    // The poll loop is blocked only inside the revoke callback: waiting for in-flight
    // deliveries (in_flight) and then the synchronous commit. The poll deadline must exceed
    // that with margin, or librdkafka leaves the group in the middle of a revoke and the
    // commit fails. librdkafka also requires max.poll.interval.ms >= session.timeout.ms.
    // A drain can start while the group is rebalancing; its final commit then fails until
    // the rebalance settles and is retried until this budget runs out. A rebalance takes
    // up to two heartbeat intervals (this member and the others learn of it at their next
    // heartbeat) plus round trips.
    let heartbeat_for_commit = heartbeat_ms.unwrap_or(BROKER_CONSUMER_HEARTBEAT_MS);
    let commit_ms = COMMIT_TIMEOUT_MS.max(2 * heartbeat_for_commit + COMMIT_MARGIN_MS);

    let max_poll = (in_flight_ms + commit_ms + POLL_MARGIN_MS)
        .max(MIN_POLL_INTERVAL_MS)
        .max(session_ms.unwrap_or(0))
        .min(LIBRDKAFKA_MAX_POLL_MS);

    // Memory: what the sidecar's limit leaves after its baseline is split between the
    // sidecar's own record buffer (a quarter: records queued for delivery and in flight,
    // one budget over all partitions) and Kafka's buffers (the rest: half for the prefetch
    // queue, half for fetch responses in flight from the budgeted brokers).
    let memory = memory_limit_bytes(spec.sidecar.as_ref().and_then(|s| s.resources.as_ref()))
        .max(MIN_SIDECAR_MEMORY_BYTES);
    let records_budget = memory.saturating_sub(BASELINE_MEMORY_BYTES);
    // Each share is capped (MAX_BUFFER_BYTES, MAX_FETCH_BYTES): past that, a larger limit is
    // headroom, not buffers.
    let buffer_bytes = (records_budget / 4).clamp(1 << 20, MAX_BUFFER_BYTES);
    let kafka_budget = records_budget - records_budget / 4;
    let queue_kbytes = (kafka_budget / 2).min(MAX_BUFFER_BYTES) / 1024;
    let queue_kbytes = queue_kbytes.clamp(LIBRDKAFKA_MIN_QUEUE_KBYTES, LIBRDKAFKA_MAX_QUEUE_KBYTES);
    let fetch_max = (kafka_budget / 2 / FETCH_BROKERS_BUDGETED)
        .min(MAX_FETCH_BYTES)
        .clamp(LIBRDKAFKA_MIN_FETCH_BYTES, LIBRDKAFKA_MAX_FETCH_BYTES);
    let partition_fetch = TARGET_PARTITION_FETCH_BYTES.min(fetch_max);

    // Drain on SIGTERM or /drain: stop fetching, wait for in-flight work, commit, leave. The
    // preStop hook holds the application until the drain answers, and the grace period
    // counts from the start of the hook, so it must cover the whole drain plus the
    // application's own shutdown after its SIGTERM.
    let drain_ms = in_flight_ms + commit_ms + LEAVE_TIMEOUT_MS;
    let grace_ms = drain_ms + GRACE_MARGIN_MS;

    Tuning {
        group_id,
        group_protocol: protocol.to_string(),
        partition_assignment_strategy: strategy,
        session_timeout_ms: session_ms,
        heartbeat_interval_ms: heartbeat_ms,
        max_poll_interval_ms: max_poll,
        queued_max_messages_kbytes: queue_kbytes,
        queued_min_messages: QUEUED_MIN_MESSAGES,
        fetch_max_bytes: fetch_max,
        max_partition_fetch_bytes: partition_fetch,
        in_flight_timeout_ms: in_flight_ms,
        commit_timeout_ms: commit_ms,
        max_buffered_bytes: buffer_bytes,
        leave_timeout_ms: LEAVE_TIMEOUT_MS,
        drain_timeout_seconds: drain_ms.div_ceil(1000),
        termination_grace_period_seconds: grace_ms.div_ceil(1000),
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The sidecar's memory limit in bytes: `resources.limits.memory`, else the default.
/// A limit that does not parse counts as the default (the API server has already validated
/// the quantity, so that only happens for objects written around it).
pub fn memory_limit_bytes(resources: Option<&ResourceRequirements>) -> u64 {
    resources
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| parse_quantity_bytes(&q.0))
        .unwrap_or(DEFAULT_SIDECAR_MEMORY_BYTES)
}

/// Parses a Kubernetes quantity into whole bytes (rounded down), or `None` if it is not a
/// non-negative quantity or does not fit in u64. Accepts binary (Ki…Ei) and decimal (k…E)
/// suffixes, decimal exponents (`1e9`, `12E6`), fractions (`1.5Gi`) and `m` (milli).
pub fn parse_quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty() || number == "." {
        return None;
    }
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // Work in u128 as (mantissa, 10^scale) so fractions are exact.
    let digits = format!("{int_part}{frac_part}");
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let mut denominator: u128 = 10u128.checked_pow(frac_part.len() as u32)?;
    let multiplier: u128 = match suffix {
        "" => 1,
        "m" => {
            denominator = denominator.checked_mul(1000)?;
            1
        }
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().ok()?;
            if exp >= 0 {
                10u128.checked_pow(exp as u32)?
            } else {
                denominator = denominator.checked_mul(10u128.checked_pow(exp.unsigned_abs())?)?;
                1
            }
        }
        _ => return None,
    };
    let bytes = mantissa.checked_mul(multiplier)? / denominator;
    u64::try_from(bytes).ok()
}
