//! The consumer sidecar while the broker restarts mid-stream: nothing may be lost.
//!
//! This restarts the test bed's broker (`tests/env/kafka.sh restart`, data kept), so it lives
//! alone in its own test binary: cargo runs test binaries one after another, and no other
//! test of this binary runs beside it.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_tests::kafka::{Topic, committed, end_offsets, ensure_reachable, group};
use sluice_tests::testapp::{Reply, Sidecar, TestApp, sidecar_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    const FIRST: usize = 20_000;
    let topic = Topic::create("broker-restart", 3).await;
    let group = group("broker-restart");
    let app = TestApp::start(|_| Reply::ok().after(Duration::from_millis(1))).await;
    topic.produce_numbered(FIRST, 100).await;
    let mut sidecar = Sidecar::start(
        "broker-restart",
        sidecar_config(&topic.name, &group, &app.url()),
    );
    app.wait_until("a quarter of the records", Duration::from_secs(60), |r| {
        r.len() >= FIRST / 4
    })
    .await;

    let script = sluice_tests::env_scripts().join("kafka.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg("restart")
        .status()
        .expect("running kafka.sh restart");
    assert!(status.success(), "kafka.sh restart failed: {status}");
    ensure_reachable();

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in app.received() {
            *counts.entry(r.value).or_default() += 1;
        }
        if counts.len() >= FIRST {
            let dups: usize = counts.values().map(|c| c - 1).sum();
            eprintln!(
                "broker restart: {} records, {dups} duplicates",
                counts.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {FIRST} delivered after the restart; log:\n{}",
            counts.len(),
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let end: Vec<Option<i64>> = end_offsets(&topic.name, 3).into_iter().map(Some).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed(&group, &topic.name, 3) != end {
        assert!(
            Instant::now() < deadline,
            "offsets never committed to the end after the restart"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut values: Vec<usize> = app
        .received()
        .iter()
        .map(|r| r.value.parse().unwrap())
        .collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values, (0..FIRST).collect::<Vec<_>>(), "nothing lost");
    sidecar.stop_gracefully(Duration::from_secs(30));
}
