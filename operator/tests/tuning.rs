//! The tuning rules: examples with exact values, and property-based invariants over any spec
//! the CRD accepts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use proptest::prelude::*;
use sluice_operator::catalogue;
use sluice_operator::crd::{
    EventConsumerSpec, GroupProtocol, MembershipSpec, ProcessingSpec, SidecarSpec,
};
use sluice_operator::tuning::*;

fn base() -> EventConsumerSpec {
    static BASE: std::sync::LazyLock<EventConsumerSpec> = std::sync::LazyLock::new(|| {
        serde_json::from_value(catalogue::load().base["spec"].clone()).unwrap()
    });
    BASE.clone()
}

fn dur(ms: u64) -> kube::core::Duration {
    std::time::Duration::from_millis(ms).into()
}

fn with_memory(spec: &mut EventConsumerSpec, limit: &str) {
    spec.sidecar = Some(SidecarSpec {
        image: None,
        resources: Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity(limit.to_string()),
            )])),
            ..Default::default()
        }),
    });
}

#[test]
fn defaults_give_kafka_defaults_and_a_grace_period_that_covers_the_drain() {
    let t = tune(&base(), Some("ns.name".into()));
    assert_eq!(t.group_id.as_deref(), Some("ns.name"));
    assert_eq!(t.group_protocol, "classic");
    assert_eq!(
        t.partition_assignment_strategy.as_deref(),
        Some("cooperative-sticky")
    );
    assert_eq!(t.session_timeout_ms, Some(45_000));
    assert_eq!(t.heartbeat_interval_ms, Some(3_000));
    // in-flight bound = delivery.timeout (10 s) when maxDuration is unset.
    assert_eq!(t.in_flight_timeout_ms, 10_000);
    assert_eq!(
        t.commit_timeout_ms, 8_000,
        "two 3 s heartbeats (a rebalance in progress settles) + 2 s"
    );
    assert_eq!(
        t.max_poll_interval_ms, 60_000,
        "10 s + 8 s commit + 30 s margin, raised to the 60 s floor"
    );
    assert_eq!(
        t.drain_timeout_seconds, 23,
        "10 s in flight + 8 s commit + 5 s leave"
    );
    assert_eq!(t.termination_grace_period_seconds, 33);
    // 256Mi default limit - 32Mi baseline = 224Mi; a quarter (56Mi) for the sidecar's
    // record buffer, the rest (168Mi) half to the queue, half over 4 brokers (21Mi each) —
    // each capped: 16Mi, 16Mi, 4Mi.
    assert_eq!(t.max_buffered_bytes, 16 * 1024 * 1024);
    assert_eq!(t.queued_max_messages_kbytes, 16 * 1024);
    assert_eq!(t.fetch_max_bytes, 4 * 1024 * 1024);
    assert_eq!(t.max_partition_fetch_bytes, 256 * 1024);
}

#[test]
fn a_slow_handler_stretches_poll_interval_drain_and_grace() {
    let mut spec = base();
    spec.processing = Some(ProcessingSpec {
        max_duration: Some(dur(600_000)),
    });
    let t = tune(&spec, None);
    assert_eq!(t.in_flight_timeout_ms, 600_000);
    assert_eq!(t.max_poll_interval_ms, 638_000);
    assert_eq!(t.drain_timeout_seconds, 613);
    assert_eq!(t.termination_grace_period_seconds, 623);
}

#[test]
fn consumer_protocol_sends_no_client_side_group_timing() {
    let mut spec = base();
    spec.membership = Some(MembershipSpec {
        protocol: GroupProtocol::Consumer,
        ..Default::default()
    });
    let t = tune(&spec, None);
    assert_eq!(t.group_protocol, "consumer");
    assert_eq!(
        (
            t.session_timeout_ms,
            t.heartbeat_interval_ms,
            t.partition_assignment_strategy.clone()
        ),
        (None, None, None)
    );
    let keys: Vec<&str> = t.kafka_properties().iter().map(|(k, _)| *k).collect();
    for absent in [
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "partition.assignment.strategy",
    ] {
        assert!(
            !keys.contains(&absent),
            "{absent} must not be sent with group.protocol=consumer"
        );
    }
    assert!(keys.contains(&"max.poll.interval.ms"));
}

#[test]
fn session_and_heartbeat_overrides_are_used() {
    let mut spec = base();
    spec.membership = Some(MembershipSpec {
        protocol: GroupProtocol::Classic,
        session_timeout: Some(dur(15_000)),
        heartbeat_interval: Some(dur(2_000)),
    });
    let t = tune(&spec, None);
    assert_eq!(
        (t.session_timeout_ms, t.heartbeat_interval_ms),
        (Some(15_000), Some(2_000))
    );
    // Only the session: heartbeat derived as a third, capped at 3 s.
    spec.membership = Some(MembershipSpec {
        session_timeout: Some(dur(6_000)),
        ..Default::default()
    });
    assert_eq!(tune(&spec, None).heartbeat_interval_ms, Some(2_000));
    // A long session keeps max.poll.interval.ms at or above it (librdkafka requires it).
    spec.membership = Some(MembershipSpec {
        session_timeout: Some(dur(1_800_000)),
        ..Default::default()
    });
    assert_eq!(tune(&spec, None).max_poll_interval_ms, 1_800_000);
}

#[test]
fn memory_limit_sizes_the_buffers() {
    let mut spec = base();
    // Above the caps a larger limit is headroom, not buffers.
    with_memory(&mut spec, "1Gi");
    let t = tune(&spec, None);
    assert_eq!(t.max_buffered_bytes, MAX_BUFFER_BYTES);
    assert_eq!(t.queued_max_messages_kbytes, MAX_BUFFER_BYTES / 1024);
    assert_eq!(t.fetch_max_bytes, MAX_FETCH_BYTES);
    // Below them the limit sizes each share: 96Mi - 32Mi = 64Mi; 16Mi for records, 48Mi for
    // Kafka: 24Mi for the queue (capped at 16Mi), 6Mi per fetch response (capped at 4Mi);
    // 80Mi: 12Mi for records, 36Mi for Kafka: 18Mi (16Mi), 4.5Mi (4Mi); 72Mi: 10Mi, 30Mi:
    // 15Mi, 3.75Mi — under every cap.
    with_memory(&mut spec, "96Mi");
    let mid = tune(&spec, None);
    assert_eq!(mid.max_buffered_bytes, 16 * 1024 * 1024);
    assert_eq!(mid.queued_max_messages_kbytes, 16 * 1024);
    assert_eq!(mid.fetch_max_bytes, 4 * 1024 * 1024);
    with_memory(&mut spec, "72Mi");
    let below = tune(&spec, None);
    assert_eq!(below.max_buffered_bytes, 10 * 1024 * 1024);
    assert_eq!(below.queued_max_messages_kbytes, 15 * 1024);
    assert_eq!(below.fetch_max_bytes, 15 * 1024 * 1024 / 4);
    with_memory(&mut spec, "32Mi"); // below the documented floor: sized as 64Mi
    let small = tune(&spec, None);
    assert_eq!(small.max_buffered_bytes, 8 * 1024 * 1024);
    assert_eq!(small.queued_max_messages_kbytes, 12 * 1024);
    assert_eq!(small.fetch_max_bytes, 3 * 1024 * 1024);
    assert!(
        small.kafka_buffer_bound_bytes(10_000) + small.max_buffered_bytes
            <= 64 * 1024 * 1024 - BASELINE_MEMORY_BYTES
    );
}

#[test]
fn kafka_properties_list_every_tuned_key_once() {
    let t = tune(&base(), None);
    let props = t.kafka_properties();
    let keys: std::collections::BTreeSet<&str> = props.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys.len(), props.len());
    for (k, v) in &props {
        assert!(!v.is_empty(), "{k}");
        assert!(
            sluice_operator::crd::rules::OWNED_PROPERTIES.contains(k),
            "{k} is tuned, so users may not set it"
        );
    }
}

#[test]
fn quantities_parse_like_kubernetes() {
    let cases = [
        ("128Mi", Some(128 * 1024 * 1024)),
        ("1Gi", Some(1 << 30)),
        ("1.5Gi", Some(3 << 29)),
        ("500M", Some(500_000_000)),
        ("1e9", Some(1_000_000_000)),
        ("12E6", Some(12_000_000)),
        ("1k", Some(1000)),
        ("1024", Some(1024)),
        ("+2Ki", Some(2048)),
        ("1500m", Some(1)),
        ("0.5", Some(0)),
        ("1e-3", Some(0)),
        ("", None),
        ("Mi", None),
        ("12Q", None),
        ("-1Gi", None),
        ("1.2.3", None),
        ("20Ei", None),
    ];
    for (q, want) in cases {
        assert_eq!(parse_quantity_bytes(q), want, "{q}");
    }
}

fn arb_spec() -> impl Strategy<Value = EventConsumerSpec> {
    (
        100u64..=3_600_000,                         // delivery.timeout
        proptest::option::of(0u64..=3_600_000),     // extra above timeout for maxDuration
        any::<bool>(),                              // consumer protocol
        proptest::option::of(6_000u64..=1_800_000), // session
        proptest::option::of(500u64..=600_000),     // heartbeat
        proptest::option::of(1u64..=64 * 1024),     // memory MiB
    )
        .prop_map(|(timeout, extra, consumer, session, heartbeat, memory)| {
            let mut spec = base();
            spec.delivery.timeout = dur(timeout);
            spec.processing = extra.map(|e| ProcessingSpec {
                max_duration: Some(dur((timeout + e).clamp(1_000, 3_600_000).max(timeout))),
            });
            spec.membership = Some(if consumer {
                MembershipSpec {
                    protocol: GroupProtocol::Consumer,
                    ..Default::default()
                }
            } else {
                // As the CRD admits: heartbeat at most a third of the (effective) session.
                let effective_session = session.unwrap_or(DEFAULT_SESSION_MS);
                MembershipSpec {
                    protocol: GroupProtocol::Classic,
                    session_timeout: session.map(dur),
                    heartbeat_interval: heartbeat.map(|h| dur(h.min(effective_session / 3))),
                }
            });
            if let Some(mib) = memory {
                with_memory(&mut spec, &format!("{mib}Mi"));
            }
            spec
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn heartbeat_is_at_most_a_third_of_the_session(spec in arb_spec()) {
        let t = tune(&spec, None);
        match (t.session_timeout_ms, t.heartbeat_interval_ms) {
            (Some(s), Some(h)) => {
                prop_assert!(h >= 1 && h * 3 <= s, "heartbeat {h} session {s}");
                prop_assert_eq!(t.group_protocol.as_str(), "classic");
            }
            (None, None) => prop_assert_eq!(t.group_protocol.as_str(), "consumer"),
            other => prop_assert!(false, "session and heartbeat come together: {other:?}"),
        }
    }

    #[test]
    fn grace_covers_drain_commit_leave_and_margin(spec in arb_spec()) {
        let t = tune(&spec, None);
        let needed_ms = t.in_flight_timeout_ms + t.commit_timeout_ms + t.leave_timeout_ms + GRACE_MARGIN_MS;
        prop_assert!(t.termination_grace_period_seconds * 1000 >= needed_ms);
        prop_assert!(t.drain_timeout_seconds * 1000 >= t.in_flight_timeout_ms + t.commit_timeout_ms + t.leave_timeout_ms);
        prop_assert!(t.termination_grace_period_seconds > t.drain_timeout_seconds);
        // The in-flight bound is the user's worst case: at least the delivery timeout.
        let timeout_ms = std::time::Duration::from(spec.delivery.timeout).as_millis() as u64;
        prop_assert!(t.in_flight_timeout_ms >= timeout_ms);
    }

    #[test]
    fn poll_deadline_outlasts_a_revoke(spec in arb_spec()) {
        let t = tune(&spec, None);
        // The poll loop is blocked in the revoke callback for in-flight work plus the commit.
        prop_assert!(t.max_poll_interval_ms >= t.in_flight_timeout_ms + t.commit_timeout_ms + POLL_MARGIN_MS);
        if let Some(s) = t.session_timeout_ms {
            prop_assert!(t.max_poll_interval_ms >= s, "librdkafka requires max.poll.interval.ms >= session.timeout.ms");
        }
    }

    #[test]
    fn values_are_inside_the_accepted_ranges(spec in arb_spec()) {
        let t = tune(&spec, None);
        if let Some(s) = t.session_timeout_ms {
            prop_assert!((BROKER_MIN_SESSION_MS..=BROKER_MAX_SESSION_MS).contains(&s));
        }
        prop_assert!((1..=LIBRDKAFKA_MAX_POLL_MS).contains(&t.max_poll_interval_ms));
        prop_assert!((LIBRDKAFKA_MIN_QUEUE_KBYTES..=LIBRDKAFKA_MAX_QUEUE_KBYTES).contains(&t.queued_max_messages_kbytes));
        prop_assert!((LIBRDKAFKA_MIN_FETCH_BYTES..=LIBRDKAFKA_MAX_FETCH_BYTES).contains(&t.fetch_max_bytes));
        prop_assert!(t.max_partition_fetch_bytes >= 1 && t.max_partition_fetch_bytes <= t.fetch_max_bytes);
        // Kubernetes: terminationGracePeriodSeconds is an int64.
        prop_assert!(i64::try_from(t.termination_grace_period_seconds).is_ok());
    }

    #[test]
    fn kafka_and_record_buffers_fit_the_memory_limit_for_any_partition_count(spec in arb_spec(), partitions in 1u64..=100_000) {
        let t = tune(&spec, None);
        let limit = memory_limit_bytes(spec.sidecar.as_ref().and_then(|s| s.resources.as_ref())).max(MIN_SIDECAR_MEMORY_BYTES);
        let bound = t.kafka_buffer_bound_bytes(partitions);
        prop_assert!(bound + t.max_buffered_bytes + BASELINE_MEMORY_BYTES <= limit, "{bound} + {} + baseline > {limit} at {partitions} partitions", t.max_buffered_bytes);
        // More partitions never raise the bound beyond its cap.
        prop_assert!(bound <= t.kafka_buffer_bound_bytes(u64::MAX / (1 << 40)));
    }

    #[test]
    fn tuning_is_deterministic(spec in arb_spec()) {
        prop_assert_eq!(tune(&spec, Some("g".into())), tune(&spec, Some("g".into())));
    }
}
