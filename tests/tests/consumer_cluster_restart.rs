//! Three sidecars with their own defaults, over SCRAM-SHA-512 and TLS, while the secured
//! three-node cluster restarts its brokers one by one (SIGTERM, start, in-sync again) and
//! while one broker is SIGKILLed: nothing lost, nothing duplicated on the controlled
//! restarts, everything committed to the log end afterwards — counted in the application
//! and in Kafka's committed offsets.
//!
//! These restart the cluster's brokers, so they live in their own test binary (cargo runs
//! test binaries one after another) and hold one lock between them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_tests::kafka::{Topic, cluster, group};
use sluice_tests::testapp::{Reply, Sidecar, TestApp};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A sidecar configuration with nothing but what a user must set: the cluster's SCRAM
/// listener, the credentials as files (written once into `dir`, as a mounted Secret), the
/// CA, the topic, the group, the URL.
fn secured_config(dir: &std::path::Path, topic: &str, group: &str, url: &str) -> serde_json::Value {
    let (username_file, password_file) = (dir.join("username"), dir.join("password"));
    if !password_file.exists() {
        let (user, password) = cluster::SCRAM_USER;
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&username_file, user).unwrap();
        std::fs::write(&password_file, password).unwrap();
    }
    serde_json::json!({
        "kafka": {
            "bootstrapServers": cluster::scram_bootstrap(),
            "topics": [topic],
            "groupId": group,
            "auth": {
                "sasl": {
                    "mechanism": "SCRAM-SHA-512",
                    "usernameFile": username_file,
                    "passwordFile": password_file,
                },
                "tls": {"caFile": cluster::pki().join("ca.crt")},
            },
        },
        "delivery": {"url": url},
    })
}

struct Outcome {
    distinct: usize,
    duplicates: usize,
    lost: Vec<usize>,
}

fn outcome(app: &TestApp, count: usize) -> Outcome {
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for r in app.received() {
        *seen
            .entry(r.value.parse().expect("a numbered record"))
            .or_default() += 1;
    }
    Outcome {
        distinct: seen.len(),
        duplicates: seen.values().map(|n| n - 1).sum(),
        lost: (0..count).filter(|i| !seen.contains_key(i)).collect(),
    }
}

/// Runs three sidecars over the stream, calls `disturb` once a fifth of it was delivered,
/// then waits until every record reached the application and the group committed every
/// partition to its log end (both read outside the sidecars). Returns what the application
/// saw.
async fn run(name: &str, disturb: impl FnOnce(&str) + Send + 'static) -> Outcome {
    const RECORDS: usize = 15_000;
    const PARTITIONS: i32 = 6;
    let topic = Topic::create_replicated(name, PARTITIONS).await;
    let group = group(name);
    let app = TestApp::start(|_| Reply::ok()).await;
    let dir = std::env::temp_dir().join(sluice_tests::unique_name(name));
    let mut sidecars: Vec<Sidecar> = (0..3)
        .map(|i| {
            Sidecar::start(
                &format!("{name}-{i}"),
                secured_config(&dir, &topic.name, &group, &app.url()),
            )
        })
        .collect();
    let producer = topic.produce_paced(RECORDS, 300, |i| i.to_string());
    app.wait_until("a fifth of the stream", Duration::from_secs(120), |r| {
        r.len() >= RECORDS / 5
    })
    .await;
    let at = app.received().len();
    let name_of_topic = topic.name.clone();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || disturb(&name_of_topic))
        .await
        .expect("the brokers' restart");
    let disturbed_for = started.elapsed();
    producer.await.expect("producer");
    let deadline = Instant::now() + Duration::from_secs(180);
    let end: Vec<Option<i64>> = topic.end_offsets().into_iter().map(Some).collect();
    loop {
        let o = outcome(&app, RECORDS);
        let committed = topic.committed(&group);
        if o.lost.is_empty() && committed == end {
            break;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = sidecars.iter().map(|s| s.log()).collect();
            panic!(
                "{name}: 180 s after the restarts {} of {RECORDS} delivered (first missing {:?}), committed {committed:?}, log end {end:?}; sidecar logs:\n{}",
                o.distinct,
                &o.lost[..o.lost.len().min(10)],
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for s in &mut sidecars {
        s.stop_gracefully(Duration::from_secs(60));
    }
    let o = outcome(&app, RECORDS);
    eprintln!(
        "{name}: {RECORDS} records, disturbed at {at} delivered for {disturbed_for:.1?}: {} duplicates, {} lost",
        o.duplicates,
        o.lost.len()
    );
    o
}

/// Brings every node back up if a test fails half-way.
struct NodesBackUp;

impl Drop for NodesBackUp {
    fn drop(&mut self) {
        for node in ["1", "2", "3"] {
            let _ = std::panic::catch_unwind(|| cluster::ctl(&["start-node", node]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_over_scram_lose_and_duplicate_nothing_in_a_rolling_broker_restart() {
    let _serial = SERIAL.lock().await;
    let _up = NodesBackUp;
    let o = run("cluster-roll", |topic| {
        for node in ["1", "2", "3"] {
            cluster::ctl(&["stop-node", node]);
            cluster::ctl(&["start-node", node]);
            cluster::wait_in_sync(topic, 3, Duration::from_secs(120));
            cluster::wait_in_sync("__consumer_offsets", 3, Duration::from_secs(120));
        }
    })
    .await;
    assert!(o.lost.is_empty(), "lost {:?}", o.lost);
    assert_eq!(o.duplicates, 0, "duplicates in a rolling broker restart");
}
