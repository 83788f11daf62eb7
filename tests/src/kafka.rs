//! Kafka fixtures: the test bed's broker addresses and per-test topics.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{START_HINT, unique_name};

/// Bootstrap address of the broker's loopback listener, for clients on the host.
pub fn bootstrap() -> String {
    crate::env_value("SLUICE_KAFKA_BOOTSTRAP").unwrap_or_else(|| "127.0.0.1:9092".into())
}

/// Bootstrap address of the broker's pod listener (on the CNI bridge gateway), for
/// clients running in pods on the test bed's node.
pub fn pod_bootstrap() -> String {
    crate::env_value("SLUICE_KAFKA_POD_BOOTSTRAP").unwrap_or_else(|| "10.88.0.1:9094".into())
}

/// A client configuration pointing at the test bed's host listener.
pub fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    config
}

/// Fails with an actionable message unless the broker answers a metadata request.
pub fn ensure_reachable() {
    let consumer: BaseConsumer = client_config()
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka client for {}: {e}", bootstrap()));
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "the Kafka test bed is not reachable at {} ({e}); {START_HINT}",
            bootstrap()
        );
    }
}

/// The test bed's admin client.
pub fn admin() -> AdminClient<DefaultClientContext> {
    client_config()
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka admin client: {e}"))
}

/// A topic that belongs to one test. It is deleted when dropped.
pub struct Topic {
    pub name: String,
    pub partitions: i32,
}

impl Topic {
    /// Creates a uniquely named topic with `partitions` partitions (replication factor 1).
    pub async fn create(prefix: &str, partitions: i32) -> Topic {
        Self::create_named(unique_name(prefix), partitions).await
    }

    /// Creates the topic `name` with `partitions` partitions.
    pub async fn create_named(name: String, partitions: i32) -> Topic {
        ensure_reachable();
        let results = admin()
            .create_topics(
                &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .unwrap_or_else(|e| panic!("creating topic {name}: {e}; {START_HINT}"));
        for result in results {
            if let Err((topic, code)) = result {
                panic!("creating topic {topic}: {code}");
            }
        }
        wait_for_leaders(&name, partitions);
        Topic { name, partitions }
    }

    /// Produces `count` records keyed `key-<i % keys>` with value `<i>` (decimal), spread
    /// over partitions by key, and waits for every acknowledgement.
    pub async fn produce_numbered(&self, count: usize, keys: usize) {
        let producer = producer();
        let mut pending = Vec::with_capacity(count.min(10_000));
        for i in 0..count {
            let key = format!("key-{}", i % keys.max(1));
            let value = i.to_string();
            let delivery =
                producer.send_result(FutureRecord::to(&self.name).key(&key).payload(&value));
            match delivery {
                Ok(fut) => pending.push(fut),
                Err((e, _)) => panic!("enqueueing record {i} for {}: {e}", self.name),
            }
            if pending.len() >= 10_000 {
                for fut in pending.drain(..) {
                    await_delivery(fut).await;
                }
            }
        }
        for fut in pending {
            await_delivery(fut).await;
        }
    }
}

async fn await_delivery(fut: rdkafka::producer::DeliveryFuture) {
    match fut.await {
        Ok(Ok(_)) => {}
        Ok(Err((e, _))) => panic!("producing a test record: {e}"),
        Err(_) => panic!("producing a test record: the producer went away"),
    }
}

/// A producer for test data: acks=all, idempotent, so a test's input is exactly what it
/// produced.
pub fn producer() -> FutureProducer {
    client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka producer: {e}"))
}

fn wait_for_leaders(name: &str, partitions: i32) {
    let consumer: BaseConsumer = client_config()
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka client: {e}"));
    for _ in 0..100 {
        if let Ok(md) = consumer.fetch_metadata(Some(name), Duration::from_secs(5))
            && let Some(t) = md.topics().iter().find(|t| t.name() == name)
            && t.partitions().len() == partitions as usize
            && t.partitions().iter().all(|p| p.leader() >= 0)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("topic {name} has no leader for all {partitions} partitions after 10 s");
}

impl Drop for Topic {
    fn drop(&mut self) {
        let name = self.name.clone();
        // rdkafka's admin futures are driven by librdkafka's own thread, so any executor
        // works; a plain thread keeps this safe inside or outside a tokio runtime.
        let _ = std::thread::spawn(move || {
            let admin = admin();
            let _ = futures::executor::block_on(admin.delete_topics(
                &[name.as_str()],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ));
        })
        .join();
    }
}

/// A consumer-group name that belongs to one test.
pub fn group(prefix: &str) -> String {
    unique_name(prefix)
}

/// Reads `topic` from the beginning with a throwaway consumer (no commits) until `expected`
/// records were read or `timeout` passed, and returns what it read.
pub fn read_all(
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = client_config()
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka consumer: {e}"));
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer
        .assign(&tpl)
        .unwrap_or_else(|e| panic!("assigning {topic}: {e}"));
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// The offsets `group` committed for partitions `0..partitions` of `topic` (`None` where it
/// committed nothing).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka consumer: {e}"));
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("committed offsets of {group}: {e}"));
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// The end offset (high watermark) of partitions `0..partitions` of `topic`.
pub fn end_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = client_config()
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka client: {e}"));
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks of {topic}[{p}]: {e}"))
                .1
        })
        .collect()
}

/// Watches a consumer group's state as the broker reports it (ListGroups/DescribeGroups),
/// sampling every 100 ms on its own thread until dropped. For tests that need to know when
/// the group was rebalancing, from Kafka rather than from the members.
pub struct GroupWatch {
    samples: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupWatch {
    pub fn start(group: &str) -> GroupWatch {
        use std::sync::atomic::Ordering;
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st, group) = (samples.clone(), stop.clone(), group.to_owned());
        let thread = std::thread::spawn(move || {
            let client: BaseConsumer = client_config()
                .create()
                .unwrap_or_else(|e| panic!("cannot create a Kafka client: {e}"));
            while !st.load(Ordering::SeqCst) {
                if let Ok(list) = client.fetch_group_list(Some(&group), Duration::from_secs(2)) {
                    let state = list
                        .groups()
                        .first()
                        .map(|g| g.state().to_owned())
                        .unwrap_or_default();
                    s.lock().unwrap().push((std::time::Instant::now(), state));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        GroupWatch {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// How long the group had been rebalancing without a break at `at` (zero if the last
    /// sample before `at` showed it `Stable` or `Empty`).
    pub fn rebalancing_for(&self, at: std::time::Instant) -> Duration {
        let samples = self.samples.lock().unwrap();
        let mut since = None;
        for (t, state) in samples.iter().filter(|(t, _)| *t <= at) {
            if state == "Stable" || state == "Empty" {
                since = None;
            } else if since.is_none() {
                since = Some(*t);
            }
        }
        since.map_or(Duration::ZERO, |s| at.duration_since(s))
    }
}

impl Drop for GroupWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until `group`'s committed offsets (read from Kafka) equal the end of every
/// partition of `topic`, or panics after `timeout`.
pub async fn wait_committed_to_end(group: &str, topic: &Topic, timeout: Duration) {
    let end: Vec<Option<i64>> = end_offsets(&topic.name, topic.partitions)
        .into_iter()
        .map(Some)
        .collect();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = committed(group, &topic.name, topic.partitions);
        if got == end {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{group}: committed offsets {got:?} never reached the end {end:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
