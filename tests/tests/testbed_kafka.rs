//! Smoke tests of the test bed's Apache Kafka: they would fail against anything but a real
//! Kafka 4 broker with the KIP-848 consumer protocol enabled.

use std::collections::{BTreeSet, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use sluice_tests::kafka::{self, Topic};

/// What `kafka.sh info` prints: the broker's own finalized feature levels.
fn broker_info() -> Vec<(String, String)> {
    let out = Command::new("bash")
        .arg(sluice_tests::env_scripts().join("kafka.sh"))
        .arg("info")
        .output()
        .expect("running tests/env/kafka.sh info");
    assert!(
        out.status.success(),
        "kafka.sh info failed ({}): {}; {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sluice_tests::START_HINT
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn broker_reports_kafka_4_with_the_consumer_protocol() {
    let info = broker_info();
    let get = |k: &str| {
        info.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("kafka.sh info printed no {k}: {info:?}"))
    };
    // metadata.version is named after the release that introduced it, e.g. "4.4-IV2".
    let metadata_version = get("metadata.version");
    let major: u32 = metadata_version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unparsable metadata.version {metadata_version}"));
    assert!(
        major >= 4,
        "broker metadata.version {metadata_version} is older than Kafka 4.0"
    );
    let group_version: u32 = get("group.version").parse().expect("numeric group.version");
    assert!(
        group_version >= 1,
        "KIP-848 consumer protocol not enabled (group.version 0)"
    );
}

/// Consumes `topic` through a new group until `expected` records arrived, returning the
/// values seen and the partitions they came from. Panics on a duplicate.
async fn consume_all(topic: &Topic, protocol: &str, expected: usize) -> BTreeSet<i32> {
    let mut config = kafka::client_config();
    config
        .set("group.id", kafka::group("smoke"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    match protocol {
        "classic" => {
            config.set("partition.assignment.strategy", "cooperative-sticky");
        }
        "consumer" => {
            config.set("group.protocol", "consumer");
        }
        other => panic!("unknown protocol {other}"),
    }
    let consumer: StreamConsumer = config.create().expect("consumer");
    consumer.subscribe(&[&topic.name]).expect("subscribe");

    let mut values = HashSet::with_capacity(expected);
    let mut partitions = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while values.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            !remaining.is_zero(),
            "{protocol}: consumed {} of {expected} records in 90 s",
            values.len()
        );
        let msg = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => panic!("{protocol}: consume error: {e}"),
            Err(_) => continue,
        };
        let value: u64 = std::str::from_utf8(msg.payload().expect("payload"))
            .expect("utf8")
            .parse()
            .expect("numeric value");
        assert!(
            values.insert(value),
            "{protocol}: record {value} delivered twice"
        );
        partitions.insert(msg.partition());
    }
    assert_eq!(values.len(), expected);
    assert!(
        values.iter().all(|v| (*v as usize) < expected),
        "unexpected values"
    );
    partitions
}

#[tokio::test]
async fn ten_thousand_records_through_a_classic_cooperative_sticky_group() {
    let topic = Topic::create("smoke-classic", 6).await;
    topic.produce_numbered(10_000, 100).await;
    let partitions = consume_all(&topic, "classic", 10_000).await;
    assert_eq!(
        partitions,
        (0..6).collect(),
        "records did not come from all 6 partitions"
    );
}

#[tokio::test]
async fn ten_thousand_records_through_a_kip848_consumer_group() {
    let topic = Topic::create("smoke-kip848", 6).await;
    topic.produce_numbered(10_000, 100).await;
    let partitions = consume_all(&topic, "consumer", 10_000).await;
    assert_eq!(
        partitions,
        (0..6).collect(),
        "records did not come from all 6 partitions"
    );
}
