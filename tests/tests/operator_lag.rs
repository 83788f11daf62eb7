//! `status.lag` against the real test bed: the operator reads the group's committed offsets
//! and the watermarks from Kafka, refreshes them every lag interval, leaves the lag unknown
//! (and the EventConsumer not Degraded) when Kafka does not answer, rewrites the status only
//! when it changes, and leaves no librdkafka thread behind.

mod operator_common;

use std::sync::Arc;
use std::time::Duration;

use kube::{Api, Client, ResourceExt};
use operator_common::{condition, create_ec, ec_yaml, install_crd, lease, wait_for};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sluice_operator::build::SidecarDefaults;
use sluice_operator::crd::EventConsumer;
use sluice_operator::lag::LagSettings;
use sluice_operator::metrics::Metrics;
use sluice_operator::reconcile::WatchScope;
use sluice_operator::run::{Settings, run_with_lag};
use sluice_tests::kafka::{self, Topic};
use sluice_tests::kube_env::{self, Namespace};
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_secs(2);
const BUDGET: Duration = Duration::from_secs(4);
const RECORDS: usize = 60;

/// Starts an operator for `namespace` with a short lag interval.
fn start(
    client: &Client,
    namespace: &str,
) -> (Arc<Metrics>, CancellationToken, tokio::task::JoinHandle<()>) {
    let settings = Settings {
        defaults: SidecarDefaults::default(),
        scope: WatchScope {
            namespace: Some(namespace.to_owned()),
        },
        concurrency: 8,
        lease: lease(namespace, "sluice-operator", "op-lag"),
    };
    let lag = LagSettings {
        interval: INTERVAL,
        budget: BUDGET,
    };
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(run_with_lag(
        client.clone(),
        settings,
        lag,
        metrics.clone(),
        shutdown.clone(),
    ));
    (metrics, shutdown, handle)
}

async fn status_lag(api: &Api<EventConsumer>, name: &str) -> Option<Option<i64>> {
    let ec = api.get(name).await.ok()?;
    Some(ec.status?.lag)
}

/// Threads of this process that librdkafka started (it names them `rdk:...`).
fn librdkafka_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("rdk:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Commits `offsets[p]` for each partition `p` (skipping `None`) as `group`, the way a plain
/// consumer does: assign, then a synchronous commit.
fn commit(group: &str, topic: &str, offsets: &[Option<i64>]) {
    let consumer: BaseConsumer = kafka::client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a Kafka consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets.iter().enumerate() {
        if let Some(o) = o {
            tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))
                .unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("a synchronous commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_follows_commits_and_is_unknown_when_kafka_does_not_answer() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-lag").await;
    let topic = Topic::create("lag", 3).await;
    topic.produce_numbered(RECORDS, 7).await;
    let ends = kafka::end_offsets(&topic.name, topic.partitions);
    assert_eq!(ends.iter().sum::<i64>(), RECORDS as i64);
    let baseline_threads = librdkafka_threads();
    assert_eq!(baseline_threads, 0, "the fixtures' clients are gone");

    let (metrics, shutdown, handle) = start(&client, &ns.name);
    let api: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);

    // replicas: 0, so no pod consumes; startFrom earliest (default): nothing committed yet,
    // so every record counts.
    create_ec(&client, &ns.name, "orders", &ec_yaml(&topic.name, 0, "")).await;
    let lag = wait_for(
        "status.lag of a group that committed nothing",
        Duration::from_secs(60),
        || async { status_lag(&api, "orders").await.flatten() },
    )
    .await;
    println!("lag before any commit: {lag} (records: {RECORDS})");
    assert_eq!(lag, RECORDS as i64);

    // Commit all of partition 0 and half of partition 1; partition 2 stays uncommitted.
    let group = format!("{}.orders", ns.name);
    let committed = [Some(ends[0]), Some(ends[1] / 2), None];
    let m: i64 = committed.iter().flatten().sum();
    let started = std::time::Instant::now();
    commit(&group, &topic.name, &committed);
    let expected = RECORDS as i64 - m;
    let lag = wait_for(
        "status.lag after the commit",
        INTERVAL * 3 + BUDGET,
        || async {
            status_lag(&api, "orders")
                .await
                .flatten()
                .filter(|l| *l == expected)
        },
    )
    .await;
    println!(
        "lag after committing {m} records: {lag} (expected {expected}), seen {:?} after the commit started",
        started.elapsed()
    );

    // Stable lag: the periodic reconciles do not rewrite the status.
    let before = api.get("orders").await.unwrap();
    let reconciles = metrics.reconciles.get();
    tokio::time::sleep(INTERVAL * 3).await;
    let after = api.get("orders").await.unwrap();
    assert!(
        metrics.reconciles.get() >= reconciles + 2,
        "requeued every lag interval ({} -> {})",
        reconciles,
        metrics.reconciles.get()
    );
    assert_eq!(
        before.resource_version(),
        after.resource_version(),
        "an unchanged status is not rewritten"
    );

    // Clients are short-lived: between measurements no librdkafka thread runs.
    let mut samples = Vec::new();
    for _ in 0..40 {
        samples.push(librdkafka_threads());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("librdkafka threads sampled over 4 s: {samples:?}");
    assert_eq!(
        samples.iter().min(),
        Some(&0),
        "no client outlives its measurement: {samples:?}"
    );
    assert!(samples.iter().all(|n| *n <= 40), "{samples:?}");

    // Kafka not answering: lag unknown, counted, and the EventConsumer is still not Degraded.
    let unreachable = ec_yaml(&topic.name, 0, "").replace(&kafka::pod_bootstrap(), "127.0.0.1:9");
    create_ec(&client, &ns.name, "nowhere", &unreachable).await;
    let ec = wait_for(
        "the status of the unreachable EventConsumer",
        Duration::from_secs(60),
        || async {
            let ec = api.get("nowhere").await.ok()?;
            condition(&ec, "Ready").map(|_| ec)
        },
    )
    .await;
    assert_eq!(ec.status.as_ref().unwrap().lag, None, "unknown");
    let degraded = condition(&ec, "Degraded").unwrap();
    assert_eq!(degraded.0, "False", "{degraded:?}");
    assert_eq!(condition(&ec, "Ready").unwrap().0, "True");
    let (timeouts, kafka_errors) = (
        metrics.lag_errors_with("Timeout"),
        metrics.lag_errors_with("Kafka"),
    );
    let errors = timeouts + kafka_errors;
    println!(
        "lag errors: Timeout {timeouts}, Kafka {kafka_errors}; lag queries: {}",
        metrics.lag_queries.get()
    );
    assert!(errors >= 1);
    // The good one is unaffected.
    assert_eq!(status_lag(&api, "orders").await.flatten(), Some(expected));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the operator stops")
        .expect("no panic");
    // After shutdown (the last measurement's blocking task ends within the budget), every
    // librdkafka thread is gone.
    wait_for(
        "librdkafka threads to end",
        BUDGET + Duration::from_secs(5),
        || async { (librdkafka_threads() == 0).then_some(()) },
    )
    .await;
}
