//! The lag collector against the real test bed: it reads the groups' committed offsets and
//! the log-end offsets from Kafka with one long-lived client per connection identity, writes
//! `status.lag` when it changes (not when it does not), keeps the last value marked stale
//! when Kafka stops answering (the EventConsumer is not Degraded), exports the lag as a
//! metric, and leaves no librdkafka thread behind when it stops.

mod operator_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use operator_common::{
    applied_by_the_operator, condition, create_ec, ec_yaml, install_crd, lease, wait_for,
};
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
        max_sidecar_rollouts: 10,
    };
    let lag = LagSettings {
        interval: INTERVAL,
        budget: BUDGET,
        status_interval: INTERVAL,
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

/// Thread ids of this process's threads that librdkafka started (it names them `rdk:...`).
fn librdkafka_thread_ids() -> BTreeSet<u64> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("rdk:"))
                })
                .filter_map(|t| t.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn librdkafka_threads() -> usize {
    librdkafka_thread_ids().len()
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
async fn lag_follows_commits_through_one_long_lived_client_and_goes_stale_when_kafka_does_not_answer()
 {
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
    // so every record counts. Two EventConsumers (two groups) on the same cluster.
    create_ec(&client, &ns.name, "orders", &ec_yaml(&topic.name, 0, "")).await;
    create_ec(&client, &ns.name, "payments", &ec_yaml(&topic.name, 0, "")).await;
    for name in ["orders", "payments"] {
        let lag = wait_for(
            "status.lag of a group that committed nothing",
            Duration::from_secs(60),
            || async { status_lag(&api, name).await.flatten() },
        )
        .await;
        println!("{name}: lag before any commit: {lag} (records: {RECORDS})");
        assert_eq!(lag, RECORDS as i64);
    }
    let ec = api.get("orders").await.unwrap();
    let status = ec.status.as_ref().unwrap();
    assert!(status.lag_observed_time.is_some(), "{status:?}");
    assert!(!status.lag_stale);

    // Commit all of partition 0 and half of partition 1; partition 2 stays uncommitted.
    let group = format!("{}.orders", ns.name);
    let committed = [Some(ends[0]), Some(ends[1] / 2), None];
    let m: i64 = committed.iter().flatten().sum();
    let started = std::time::Instant::now();
    commit(&group, &topic.name, &committed);
    let expected = RECORDS as i64 - m;
    let lag = wait_for(
        "status.lag after the commit",
        (INTERVAL * 2 + BUDGET) * 2,
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
    // The exact value is also a metric, per EventConsumer.
    let series = format!(
        "sluice_operator_consumer_lag{{namespace=\"{}\",name=\"orders\"}} {expected}",
        ns.name
    );
    assert!(metrics.encode().contains(&series), "{series} missing");
    // The other group did not move.
    assert_eq!(
        status_lag(&api, "payments").await.flatten(),
        Some(RECORDS as i64)
    );

    // Stable lag: the passes neither rewrite the status nor create clients. One client
    // serves both groups: the same librdkafka threads (same thread ids) pass after pass.
    let before = api.get("orders").await.unwrap();
    let threads_before = librdkafka_thread_ids();
    let queries = metrics.lag_queries.get();
    tokio::time::sleep(INTERVAL * 4).await;
    let after = api.get("orders").await.unwrap();
    let threads_after = librdkafka_thread_ids();
    println!(
        "librdkafka threads: {} before, {} after 4 lag intervals; lag measurements {} -> {}",
        threads_before.len(),
        threads_after.len(),
        queries,
        metrics.lag_queries.get()
    );
    assert!(
        metrics.lag_queries.get() >= queries + 2 * 2,
        "measured every lag interval ({} -> {})",
        queries,
        metrics.lag_queries.get()
    );
    assert_eq!(
        before.resource_version(),
        after.resource_version(),
        "an unchanged lag is not rewritten"
    );
    assert!(!threads_before.is_empty(), "a long-lived client");
    assert_eq!(
        threads_before, threads_after,
        "the same client serves every pass: no client is created or dropped"
    );
    assert_eq!(
        metrics.lag_clients.get(),
        1,
        "one client per connection identity"
    );

    // Kafka stops answering for `payments` (its bootstrap servers now point at a closed
    // port): the last value stays, marked stale, with the time it was observed; the
    // EventConsumer is not Degraded.
    let observed = api
        .get("payments")
        .await
        .unwrap()
        .status
        .unwrap()
        .lag_observed_time;
    let changed = k8s_openapi::jiff::Timestamp::now();
    api.patch(
        "payments",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"kafka": {"bootstrapServers": "127.0.0.1:9"}}})),
    )
    .await
    .unwrap();
    let ec = wait_for(
        "payments' status.lag marked stale",
        (INTERVAL * 2 + BUDGET) * 3,
        || async {
            let ec = api.get("payments").await.ok()?;
            ec.status.as_ref()?.lag_stale.then_some(ec)
        },
    )
    .await;
    let status = ec.status.as_ref().unwrap();
    assert_eq!(status.lag, Some(RECORDS as i64), "the last value is kept");
    // Observed at the last successful measurement: not before the value the status showed,
    // and not after the bootstrap servers changed.
    let at = status
        .lag_observed_time
        .as_ref()
        .expect("lagObservedTime")
        .0;
    assert!(at >= observed.expect("lagObservedTime before").0, "{at}");
    assert!(at <= changed, "{at} is after the change at {changed}");
    let degraded = condition(&ec, "Degraded").unwrap();
    assert!(applied_by_the_operator(&ec), "{degraded:?}");
    let (timeouts, kafka_errors) = (
        metrics.lag_errors_with("Timeout"),
        metrics.lag_errors_with("Kafka"),
    );
    println!(
        "lag errors: Timeout {timeouts}, Kafka {kafka_errors}; lag measurements: {}",
        metrics.lag_queries.get()
    );
    assert!(timeouts + kafka_errors >= 1);
    assert_eq!(
        metrics.lag_clients.get(),
        2,
        "one client per connection identity"
    );
    // The good one is unaffected.
    let ec = api.get("orders").await.unwrap();
    assert_eq!(ec.status.as_ref().unwrap().lag, Some(expected));
    assert!(!ec.status.as_ref().unwrap().lag_stale);

    // An EventConsumer never measured has no lag (not a made-up one).
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
    tokio::time::sleep(INTERVAL * 2 + BUDGET).await;
    let ec = api.get(&ec.name_any()).await.unwrap();
    assert_eq!(ec.status.as_ref().unwrap().lag, None, "unknown");

    // Deleting an EventConsumer drops its metric series.
    api.delete("orders", &Default::default()).await.unwrap();
    wait_for(
        "the deleted EventConsumer's lag series to go",
        INTERVAL * 4 + BUDGET,
        || async { (!metrics.encode().contains(&series)).then_some(()) },
    )
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the operator stops")
        .expect("no panic");
    // After shutdown every client is dropped and its librdkafka threads are gone.
    wait_for(
        "librdkafka threads to end",
        BUDGET + Duration::from_secs(5),
        || async { (librdkafka_threads() == 0).then_some(()) },
    )
    .await;
}
