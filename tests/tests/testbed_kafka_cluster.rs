//! Smoke tests of the test bed's secured three-node Kafka cluster (tests/env/kafka-cluster.sh):
//! three brokers, replicated internal topics, RF 3 with min.insync.replicas=2, SCRAM-SHA-512
//! that refuses a wrong password, an SSL listener that refuses a client without a
//! certificate signed by the test bed's CA, and a restarted node that is back in service when
//! `start-node` returns.

use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_tests::kafka::{self, Topic, cluster};
use tokio::sync::RwLock;

/// The node restart test takes it for writing, every other test for reading: they run side
/// by side, but none of them sees a node go down under it.
static NODES: RwLock<()> = RwLock::const_new(());

/// Produces one record through `config`, then reads it back from the start through the same
/// listener, and returns what came back. Errors are returned, not panicked on, so a test can
/// assert a refusal.
async fn round_trip(config: rdkafka::ClientConfig, topic: &str) -> Result<String, String> {
    let producer: FutureProducer = config
        .clone()
        .set("message.timeout.ms", "8000")
        .create()
        .map_err(|e| e.to_string())?;
    let value = format!("hello-{}", rand::random::<u32>());
    producer
        .send(
            FutureRecord::to(topic).key("k").payload(&value),
            Duration::from_secs(8),
        )
        .await
        .map_err(|(e, _)| e.to_string())?;
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", sluice_tests::unique_name("smoke"))
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| e.to_string())?;
    consumer.subscribe(&[topic]).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let got = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                if got == value {
                    return Ok(got);
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
    }
    Err("the record did not come back within 30 s".into())
}

/// Whether a client built from `config` can fetch metadata within a few seconds.
fn can_fetch_metadata(config: rdkafka::ClientConfig) -> Result<(), String> {
    let client: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    client
        .fetch_metadata(None, Duration::from_secs(6))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_replicate_every_topic_and_internal_topic() {
    let _nodes = NODES.read().await;
    let topic = Topic::create_replicated("cluster-rf", 3).await;
    cluster::wait_in_sync(&topic.name, 3, Duration::from_secs(60));
    let (brokers, partitions) = cluster::describe(&topic.name);
    println!(
        "{}: {brokers} brokers; (leader, replicas, isr) {partitions:?}",
        topic.name
    );
    assert_eq!(brokers, 3, "brokers in the cluster's metadata");
    assert!(partitions.iter().all(|&(_, r, _)| r == 3), "{partitions:?}");
    // The leaders are spread: more than one broker leads a partition.
    let leaders: std::collections::BTreeSet<i32> = partitions.iter().map(|p| p.0).collect();
    assert!(
        leaders.len() > 1,
        "all partitions led by one broker: {partitions:?}"
    );

    // A write needs two in-sync replicas.
    let admin: rdkafka::admin::AdminClient<_> = kafka::config_at(&cluster::bootstrap())
        .create()
        .expect("admin client");
    let configs = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(&topic.name)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe configs");
    let resource = configs
        .into_iter()
        .next()
        .expect("one result")
        .expect("topic config");
    let min_isr = resource
        .get("min.insync.replicas")
        .and_then(|e| e.value.clone());
    assert_eq!(
        min_isr.as_deref(),
        Some("2"),
        "min.insync.replicas of {}",
        topic.name
    );

    // Committing creates __consumer_offsets, which is replicated three ways too.
    topic.produce_numbered(10, 10).await;
    let group = kafka::group("cluster-rf");
    let consumer: BaseConsumer = kafka::config_at(&cluster::bootstrap())
        .set("group.id", &group)
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic.name, 0, rdkafka::Offset::Offset(1))
        .unwrap();
    consumer
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
    cluster::wait_in_sync("__consumer_offsets", 3, Duration::from_secs(60));
    let (_, offsets) = cluster::describe("__consumer_offsets");
    assert!(
        !offsets.is_empty() && offsets.iter().all(|&(_, r, _)| r == 3),
        "__consumer_offsets replicas: {offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_512_accepts_the_right_password_and_refuses_a_wrong_one() {
    let _nodes = NODES.read().await;
    let topic = Topic::create_replicated("cluster-scram", 1).await;
    let (user, password) = cluster::SCRAM_USER;
    let got = round_trip(cluster::scram_config(user, password), &topic.name).await;
    assert!(got.is_ok(), "SCRAM-SHA-512 as {user}: {got:?}");
    let refused = can_fetch_metadata(cluster::scram_config(user, "not-the-password"));
    println!("a wrong password: {refused:?}");
    assert!(
        refused.is_err(),
        "the broker accepted a wrong SCRAM password"
    );
    // The listener is TLS: a client that does not trust the CA is refused too.
    let mut untrusted = cluster::scram_config(user, password);
    untrusted.set("ssl.ca.location", "/nonexistent-ca.crt");
    assert!(
        untrusted.create::<BaseConsumer>().is_err() || can_fetch_metadata(untrusted).is_err(),
        "a client without the CA connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_accepts_a_signed_client_certificate_and_refuses_none() {
    let _nodes = NODES.read().await;
    let topic = Topic::create_replicated("cluster-mtls", 1).await;
    for user in [cluster::TLS_USER, cluster::STRIMZI_TLS_USER] {
        let got = round_trip(cluster::mtls_config(Some(user)), &topic.name).await;
        assert!(got.is_ok(), "mTLS as {user}: {got:?}");
    }
    let refused = can_fetch_metadata(cluster::mtls_config(None));
    println!("no client certificate: {refused:?}");
    assert!(
        refused.is_err(),
        "the mTLS listener accepted a client without a certificate"
    );
}

/// `kafka-cluster.sh start-node` returns only once the node serves again, SCRAM included:
/// after a runtime SCRAM change (Kafka 4.4 then forgets older credentials on a node that
/// restarts, see tests/env/kafka/NodeBack.java), a restarted node accepts the test bed's
/// user on its own listener at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_serves_scram_logins_when_start_node_returns() {
    let _nodes = NODES.write().await;
    let topic = Topic::create_replicated("cluster-node-back", 3).await;
    let (user, password) = cluster::SCRAM_USER;
    let throwaway = sluice_tests::unique_name("throwaway");
    tokio::task::spawn_blocking(move || {
        cluster::scram_set(&throwaway, "throwaway-password");
        cluster::ctl(&["scram-delete", &throwaway]);
        // The node's own SCRAM listener only (a client bootstraps from the first address
        // and authenticates there).
        let node = "3";
        let address = cluster::scram_bootstrap()
            .split(',')
            .nth(2)
            .expect("three SCRAM addresses")
            .to_owned();
        cluster::ctl(&["stop-node", node]);
        let restarted = std::time::Instant::now();
        cluster::ctl(&["start-node", node]);
        println!("node {node} back after {:?}", restarted.elapsed());
        let mut config = cluster::scram_config(user, password);
        config.set("bootstrap.servers", &address);
        let got = can_fetch_metadata(config);
        assert!(
            got.is_ok(),
            "the restarted node refuses {user} on {address}: {got:?}"
        );
    })
    .await
    .expect("restart");
    // And it replicates again.
    cluster::wait_in_sync(&topic.name, 3, Duration::from_secs(120));
}
