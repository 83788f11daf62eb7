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
    config_at(&bootstrap())
}

/// A plaintext client configuration for `bootstrap` (the single broker's host listener, or
/// the secured cluster's PLAINTEXT one: see [`cluster`]).
pub fn config_at(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// Fails with an actionable message unless the broker answers a metadata request.
pub fn ensure_reachable() {
    ensure_reachable_at(&bootstrap());
}

/// Fails with an actionable message unless the brokers at `bootstrap` answer.
pub fn ensure_reachable_at(bootstrap: &str) {
    let consumer: BaseConsumer = config_at(bootstrap)
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka client for {bootstrap}: {e}"));
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!("the Kafka test bed is not reachable at {bootstrap} ({e}); {START_HINT}");
    }
}

/// The test bed's admin client.
pub fn admin() -> AdminClient<DefaultClientContext> {
    admin_at(&bootstrap())
}

fn admin_at(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    config_at(bootstrap)
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka admin client: {e}"))
}

/// A topic that belongs to one test. It is deleted when dropped.
pub struct Topic {
    pub name: String,
    pub partitions: i32,
    /// The plaintext bootstrap of the brokers that hold it.
    pub bootstrap: String,
}

impl Topic {
    /// Creates a uniquely named topic with `partitions` partitions (replication factor 1).
    pub async fn create(prefix: &str, partitions: i32) -> Topic {
        Self::create_named(unique_name(prefix), partitions).await
    }

    /// Creates the topic `name` with `partitions` partitions on the single broker.
    pub async fn create_named(name: String, partitions: i32) -> Topic {
        Self::create_at(&bootstrap(), name, partitions, 1).await
    }

    /// Creates a uniquely named topic on the secured three-node cluster: replication factor
    /// 3 (the cluster's `min.insync.replicas` is 2).
    pub async fn create_replicated(prefix: &str, partitions: i32) -> Topic {
        Self::create_at(&cluster::bootstrap(), unique_name(prefix), partitions, 3).await
    }

    async fn create_at(bootstrap: &str, name: String, partitions: i32, replicas: i32) -> Topic {
        ensure_reachable_at(bootstrap);
        let results = admin_at(bootstrap)
            .create_topics(
                &[NewTopic::new(
                    &name,
                    partitions,
                    TopicReplication::Fixed(replicas),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .unwrap_or_else(|e| panic!("creating topic {name}: {e}; {START_HINT}"));
        for result in results {
            if let Err((topic, code)) = result {
                panic!("creating topic {topic}: {code}");
            }
        }
        wait_for_leaders(bootstrap, &name, partitions);
        Topic {
            name,
            partitions,
            bootstrap: bootstrap.to_owned(),
        }
    }

    /// The offsets `group` committed for every partition (`None` where it committed nothing).
    pub fn committed(&self, group: &str) -> Vec<Option<i64>> {
        committed_at(&self.bootstrap, group, &self.name, self.partitions)
    }

    /// The log-end offset (high watermark) of every partition.
    pub fn end_offsets(&self) -> Vec<i64> {
        end_offsets_at(&self.bootstrap, &self.name, self.partitions)
    }

    /// A producer for this topic's brokers (acks=all, idempotent).
    pub fn producer(&self) -> FutureProducer {
        producer_at(&self.bootstrap)
    }

    /// Produces `count` records at `rate` per second in the background, keyed `k-<i % 500>`
    /// with value `value(i)`; the task ends once every record is acknowledged (it panics on
    /// a failed one).
    pub fn produce_paced(
        &self,
        count: usize,
        rate: usize,
        value: impl Fn(usize) -> String + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let producer = self.producer();
        let topic = self.name.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut pending = Vec::new();
            for i in 0..count {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                if due > std::time::Instant::now() + Duration::from_millis(20) {
                    tokio::time::sleep_until(due.into()).await;
                }
                let (key, value) = (format!("k-{}", i % 500), value(i));
                match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                    Ok(fut) => pending.push(fut),
                    Err((e, _)) => panic!("enqueueing record {i} for {topic}: {e}"),
                }
                if pending.len() >= 5_000 {
                    for fut in pending.drain(..) {
                        assert!(
                            matches!(fut.await, Ok(Ok(_))),
                            "producing to {topic} failed"
                        );
                    }
                }
            }
            for fut in pending {
                assert!(
                    matches!(fut.await, Ok(Ok(_))),
                    "producing to {topic} failed"
                );
            }
        })
    }

    /// Produces `count` records keyed `key-<i % keys>` with value `<i>` (decimal), spread
    /// over partitions by key, and waits for every acknowledgement.
    pub async fn produce_numbered(&self, count: usize, keys: usize) {
        self.produce_numbered_from(0, count, keys).await;
    }

    /// [`Topic::produce_numbered`] for the numbers `first..first + count`.
    pub async fn produce_numbered_from(&self, first: usize, count: usize, keys: usize) {
        let producer = self.producer();
        let mut pending = Vec::with_capacity(count.min(10_000));
        for i in first..first + count {
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
    producer_at(&bootstrap())
}

/// [`producer`] for the brokers at `bootstrap`.
pub fn producer_at(bootstrap: &str) -> FutureProducer {
    config_at(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka producer: {e}"))
}

fn wait_for_leaders(bootstrap: &str, name: &str, partitions: i32) {
    let consumer: BaseConsumer = config_at(bootstrap)
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
        let (name, bootstrap) = (self.name.clone(), self.bootstrap.clone());
        // rdkafka's admin futures are driven by librdkafka's own thread, so any executor
        // works; a plain thread keeps this safe inside or outside a tokio runtime.
        let _ = std::thread::spawn(move || {
            let admin = admin_at(&bootstrap);
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
    committed_at(&bootstrap(), group, topic, partitions)
}

/// [`committed`] on the brokers at `bootstrap`.
pub fn committed_at(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<Option<i64>> {
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = config_at(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka consumer: {e}"));
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    // The group's coordinator may be moving or still loading its offsets (a fresh broker,
    // a broker restart): those answers are transient, asked again for up to 30 s; anything
    // else, or a coordinator that never settles, fails the test.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(got) => break got,
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(
                        e.rdkafka_error_code(),
                        Some(
                            rdkafka::types::RDKafkaErrorCode::NotCoordinator
                                | rdkafka::types::RDKafkaErrorCode::CoordinatorLoadInProgress
                                | rdkafka::types::RDKafkaErrorCode::CoordinatorNotAvailable
                        )
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("committed offsets of {group}: {e}"),
        }
    };
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// The end offset (high watermark) of partitions `0..partitions` of `topic`.
pub fn end_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    end_offsets_at(&bootstrap(), topic, partitions)
}

/// [`end_offsets`] on the brokers at `bootstrap`.
pub fn end_offsets_at(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = config_at(bootstrap)
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
    let end: Vec<Option<i64>> = topic.end_offsets().into_iter().map(Some).collect();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = topic.committed(group);
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

/// The test bed's secured three-node cluster (tests/env/kafka-cluster.sh): a PLAINTEXT
/// listener for the fixtures, SASL_SSL SCRAM-SHA-512 and SSL-with-client-certificate
/// listeners for the code under test, each on the host and on the pod bridge.
pub mod cluster {
    use std::path::PathBuf;
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    use crate::START_HINT;

    /// SCRAM-SHA-512 users created when the cluster is formatted: (name, password).
    pub const SCRAM_USER: (&str, &str) = ("sluice-scram", "scram-secret-1");
    /// The user the Strimzi-layout test reads from a Secret named after it.
    pub const STRIMZI_SCRAM_USER: (&str, &str) = ("strimzi-scram", "strimzi-secret-1");
    /// Client certificates (CN) the cluster's CA signed: `<name>.crt`, `<name>.key`,
    /// `<name>.p12` and `<name>.password` in [`pki`].
    pub const TLS_USER: &str = "sluice-mtls";
    pub const STRIMZI_TLS_USER: &str = "strimzi-mtls";

    fn setting(key: &str) -> String {
        crate::env_value(key).unwrap_or_else(|| {
            panic!("{key} is not set: the secured Kafka cluster is not part of the running test bed; {START_HINT}")
        })
    }

    /// PLAINTEXT bootstrap on the host (the fixtures' admin, producers, offset checks).
    pub fn bootstrap() -> String {
        setting("SLUICE_KAFKA_CLUSTER_BOOTSTRAP")
    }
    /// SASL_SSL (SCRAM-SHA-512) bootstrap on the host.
    pub fn scram_bootstrap() -> String {
        setting("SLUICE_KAFKA_CLUSTER_SCRAM_BOOTSTRAP")
    }
    /// SSL (client certificate required) bootstrap on the host.
    pub fn mtls_bootstrap() -> String {
        setting("SLUICE_KAFKA_CLUSTER_MTLS_BOOTSTRAP")
    }
    /// SASL_SSL (SCRAM-SHA-512) bootstrap for pods.
    pub fn pod_scram_bootstrap() -> String {
        setting("SLUICE_KAFKA_CLUSTER_POD_SCRAM_BOOTSTRAP")
    }
    /// SSL (client certificate required) bootstrap for pods.
    pub fn pod_mtls_bootstrap() -> String {
        setting("SLUICE_KAFKA_CLUSTER_POD_MTLS_BOOTSTRAP")
    }

    /// The folder with the cluster's CA (`ca.crt`) and the client key pairs.
    pub fn pki() -> PathBuf {
        PathBuf::from(setting("SLUICE_KAFKA_CLUSTER_PKI"))
    }

    /// A file of [`pki`], as text.
    pub fn pki_file(name: &str) -> String {
        let path = pki().join(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}; {START_HINT}", path.display()))
    }

    /// A file of [`pki`], as bytes.
    pub fn pki_bytes(name: &str) -> Vec<u8> {
        let path = pki().join(name);
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}; {START_HINT}", path.display()))
    }

    /// A SCRAM-SHA-512 client configuration for the host listener.
    pub fn scram_config(user: &str, password: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", scram_bootstrap())
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", user)
            .set("sasl.password", password)
            .set("ssl.ca.location", pki().join("ca.crt").to_string_lossy());
        config
    }

    /// A client configuration for the host mTLS listener; `user` is a key pair in [`pki`],
    /// or `None` for a TLS connection without a client certificate.
    pub fn mtls_config(user: Option<&str>) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", mtls_bootstrap())
            .set("security.protocol", "SSL")
            .set("ssl.ca.location", pki().join("ca.crt").to_string_lossy());
        if let Some(user) = user {
            config
                .set(
                    "ssl.certificate.location",
                    pki().join(format!("{user}.crt")).to_string_lossy(),
                )
                .set(
                    "ssl.key.location",
                    pki().join(format!("{user}.key")).to_string_lossy(),
                );
        }
        config
    }

    /// Whether SCRAM-SHA-512 as `user` with `password` is accepted on the host listener
    /// (a metadata request within 6 s).
    pub fn scram_accepted(user: &str, password: &str) -> bool {
        scram_config(user, password)
            .create::<BaseConsumer>()
            .is_ok_and(|c| c.fetch_metadata(None, Duration::from_secs(6)).is_ok())
    }

    /// Creates (or replaces) the SCRAM-SHA-512 credential of `user` through the Admin API and
    /// waits until the listener accepts it.
    pub fn scram_set(user: &str, password: &str) {
        ctl(&["scram-set", user, password]);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !scram_accepted(user, password) {
            assert!(
                std::time::Instant::now() < deadline,
                "the SCRAM credential of {user} is not accepted 60 s after it was set"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Runs `kafka-cluster.sh ARGS` (stop-node, start-node, kill-node, scram-set, ...) and
    /// prints what it reported (a restarted node's "is back", and whether the test bed's
    /// SCRAM users had to be set again), so a test's output shows what the cluster did.
    pub fn ctl(args: &[&str]) {
        let script = crate::env_value("SLUICE_KAFKA_CLUSTER_CTL").unwrap_or_else(|| {
            crate::env_scripts()
                .join("kafka-cluster.sh")
                .display()
                .to_string()
        });
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {script} {args:?}: {e}"));
        assert!(
            out.status.success(),
            "{script} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("kafka-cluster {}: {line}", args.join(" "));
        }
    }

    /// The node that coordinates `group`: the leader of the `__consumer_offsets` partition
    /// the group maps to — `abs(hashCode(group)) % partitions`, with Java's `String.hashCode`
    /// (over UTF-16 units) and Kafka's `Utils.abs` (`Math.abs`, with `Integer.MIN_VALUE`
    /// mapped to 0), as the broker's group coordinator computes it.
    pub fn coordinator(group: &str) -> i32 {
        let client: BaseConsumer = super::config_at(&bootstrap())
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka client: {e}"));
        let md = client
            .fetch_metadata(Some("__consumer_offsets"), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata of __consumer_offsets: {e}"));
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions())
            .unwrap_or_default();
        assert!(
            !partitions.is_empty(),
            "the cluster has no __consumer_offsets topic yet; {START_HINT}"
        );
        let index = offsets_partition(group, partitions.len()) as i32;
        partitions
            .iter()
            .find(|p| p.id() == index)
            .map(|p| p.leader())
            .unwrap_or_else(|| panic!("__consumer_offsets has no partition {index}"))
    }

    /// Which of `partitions` partitions of `__consumer_offsets` holds `group`.
    pub fn offsets_partition(group: &str, partitions: usize) -> usize {
        let hash = group.encode_utf16().fold(0i32, |h, unit| {
            h.wrapping_mul(31).wrapping_add(i32::from(unit))
        });
        // Utils.abs: Math.abs, except that MIN_VALUE (which has no absolute value) is 0.
        hash.checked_abs().unwrap_or(0) as usize % partitions
    }

    /// The number of brokers the cluster's metadata lists and, per partition of `topic`,
    /// (leader, replicas, in-sync replicas).
    pub fn describe(topic: &str) -> (usize, Vec<(i32, usize, usize)>) {
        let client: BaseConsumer = super::config_at(&bootstrap())
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka client: {e}"));
        let md = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
        let partitions = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions())
            .map(|p| (p.leader(), p.replicas().len(), p.isr().len()))
            .collect();
        (md.brokers().len(), partitions)
    }

    /// Waits until every partition of `topic` has a leader and all `replicas` in sync, or
    /// panics after `timeout` with what the metadata showed.
    pub fn wait_in_sync(topic: &str, replicas: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (_, partitions) = describe(topic);
            if !partitions.is_empty()
                && partitions
                    .iter()
                    .all(|&(leader, _, isr)| leader >= 0 && isr == replicas)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{topic}: not all partitions have {replicas} in-sync replicas after {timeout:?}: (leader, replicas, isr) {partitions:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cluster::offsets_partition;

    #[test]
    fn a_group_maps_to_the_offsets_partition_the_broker_computes() {
        // Java: "hello".hashCode() == 99162322; "polygenelubricants".hashCode() ==
        // Integer.MIN_VALUE, which Kafka's Utils.abs maps to 0; "" hashes to 0.
        assert_eq!(offsets_partition("hello", 50), 99_162_322 % 50);
        assert_eq!(offsets_partition("hello", 12), 99_162_322 % 12);
        assert_eq!(offsets_partition("polygenelubricants", 12), 0);
        assert_eq!(offsets_partition("", 12), 0);
        // A negative hash (-991817782) is taken by its absolute value, not masked.
        assert_eq!(
            offsets_partition("e2e-mtls-29241-2-d33d", 12),
            991_817_782 % 12
        );
        // "Aa" and "BB" collide in Java (2112).
        assert_eq!(offsets_partition("Aa", 50), 2112 % 50);
        assert_eq!(offsets_partition("BB", 50), 2112 % 50);
    }
}
