//! The demo's `inventory` application with batch delivery, against the real broker: a
//! sidecar POSTs CloudEvents batches, `inventory` reserves each order, records a receipt with
//! a stand-in for the order service, and answers `dead-letter` for an event that is not an
//! `OrderCreated`. Counted in the receipts, the dead-letter topic and the committed offsets.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use sluice_tests::kafka::{Topic, group, producer, read_all, wait_committed_to_end};
use sluice_tests::testapp::{Sidecar, free_port, sidecar_config};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The `inventory` binary, built with the tests' profile.
fn inventory_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap().to_path_buf();
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "-p", "sluice-examples", "--bin", "inventory"])
        .env("CARGO_TARGET_DIR", dir.parent().unwrap())
        .current_dir(sluice_tests::package_dir());
    if release {
        cmd.arg("--release");
    }
    assert!(cmd.status().unwrap().success(), "building inventory");
    dir.join("inventory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_handles_batches_and_dead_letters_what_is_not_an_order() {
    const ORDERS: u64 = 60;
    let topic = Topic::create("demo-batch", 2).await;
    let dlq = Topic::create("demo-batch-dlq", 1).await;
    let group = group("demo-batch");

    // The order service's receipt listener: one `ok` per line.
    let receipts: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receipts_addr = listener.local_addr().unwrap();
    let r = receipts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    r.lock().unwrap().push(line);
                    if write.write_all(b"ok\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });

    let producer = producer();
    for seq in 0..ORDERS {
        let order = serde_json::json!({"type": "OrderCreated", "orderId": format!("order-{seq:07}"), "seq": seq, "sku": "sku-1", "quantity": 1});
        if seq == 30 {
            producer
                .send(
                    FutureRecord::to(&topic.name)
                        .key("bad")
                        .payload("not an order"),
                    Duration::from_secs(5),
                )
                .await
                .expect("producing");
        }
        producer
            .send(
                FutureRecord::to(&topic.name)
                    .key(&format!("order-{seq:07}"))
                    .payload(&order.to_string()),
                Duration::from_secs(5),
            )
            .await
            .expect("producing");
    }

    let port = free_port();
    let mut inventory = Command::new(inventory_binary())
        .env("INVENTORY_LISTEN", format!("127.0.0.1:{port}"))
        .env("INVENTORY_RECEIPTS", receipts_addr.to_string())
        .env("POD_NAME", "inventory-test")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting inventory");
    let mut cfg = sidecar_config(
        &topic.name,
        &group,
        &format!("http://127.0.0.1:{port}/orders"),
    );
    cfg["delivery"]["ordering"] = "key".into();
    cfg["delivery"]["deadLetterTopic"] = dlq.name.clone().into();
    cfg["delivery"]["batch"] = serde_json::json!({"maxRecords": 16, "maxWait": "20ms"});
    let mut sidecar = Sidecar::start("demo-batch", cfg);
    wait_committed_to_end(&group, &topic, Duration::from_secs(60)).await;
    sidecar.stop_gracefully(Duration::from_secs(30));
    let _ = inventory.kill();
    let _ = inventory.wait();

    let got = receipts.lock().unwrap().clone();
    let mut seqs: Vec<u64> = got
        .iter()
        .map(|l| {
            l.split_whitespace()
                .nth(4)
                .and_then(|s| s.parse().ok())
                .expect("a receipt line")
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..ORDERS).collect::<Vec<_>>(),
        "every order reserved once"
    );
    let dead = read_all(&dlq.name, 2, Duration::from_secs(5));
    assert_eq!(dead.len(), 1, "only the record that is not an order");
    assert_eq!(dead[0].payload(), Some(&b"not an order"[..]));
    assert!(
        sidecar.log().contains("explicit_dead_letter"),
        "dead-lettered by the batch answer"
    );
}
