//! `make bench`: throughput, drain time, memory and CPU of the consumer sidecar against the
//! local broker, next to a plain rdkafka consume loop and a plain HTTP client.
//!
//! Run: `cargo run --release -p sluice-tests --bin sluice-bench` (env `SLUICE_BENCH_RECORDS`
//! sets the record count, default 200 000).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sluice_tests::kafka::{Topic, client_config, ensure_reachable, group};
use sluice_tests::testapp::{Reply, Sidecar, TestApp, sidecar_binary, sidecar_config};

const PARTITIONS: i32 = 12;

fn records() -> usize {
    std::env::var("SLUICE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// (user + system CPU time, resident set size) of a process, from /proc.
fn proc_usage(pid: i32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 3, utime 14, stime 15 (1-based) => indices 11, 12.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let hz = 100; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    (Duration::from_millis(ticks * 1000 / hz), rss_kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn plain_consume(topic: &str, n: usize) -> f64 {
    let consumer: BaseConsumer = client_config()
        .set("group.id", group("bench-plain"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = 0;
    let mut first = None;
    while seen < n {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    let took = first.map_or(Duration::ZERO, |t| t.elapsed());
    n as f64 / took.as_secs_f64()
}

async fn plain_http(url: &str, topic: &str, n: usize, concurrency: usize) -> f64 {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(connector);
    let uri: http::Uri = url.parse().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let uri = uri.clone();
        let next = next.clone();
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let req = http::Request::post(uri.clone())
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("{topic}-{}-{i}", i % 12))
                    .header("ce-source", format!("/sluice/topics/{topic}"))
                    .header("ce-type", "dev.sluice.kafka.record")
                    .header("content-type", "application/octet-stream")
                    .header("kafka-topic", topic.as_str())
                    .header("kafka-partition", (i % 12).to_string())
                    .header("kafka-offset", i.to_string())
                    .header("kafka-key", format!("key-{}", i % 1000))
                    .header("sluice-attempt", "1")
                    .body(Full::new(Bytes::from(i.to_string())))
                    .unwrap();
                let resp = client.request(req).await.expect("plain HTTP request");
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

struct SidecarRun {
    rate: f64,
    cpu_us_per_record: f64,
    max_rss: u64,
}

async fn through_sidecar(topic: &Topic, mode: &str, n: usize) -> SidecarRun {
    let app = TestApp::counting().await;
    let mut cfg = sidecar_config(&topic.name, &group(&format!("bench-{mode}")), &app.url());
    cfg["delivery"]["ordering"] = mode.into();
    cfg["delivery"]["maxInFlight"] = 64.into();
    cfg["delivery"]["commitInterval"] = "500ms".into();
    let mut sidecar = Sidecar::start(&format!("bench-{mode}"), cfg);
    let pid = sidecar.pid();
    while app.answered() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (cpu0, _) = proc_usage(pid);
    let started = Instant::now();
    let first = app.answered();
    let mut max_rss = 0;
    let mut last_sample = Instant::now();
    while app.answered() < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if last_sample.elapsed() > Duration::from_millis(100) {
            max_rss = max_rss.max(proc_usage(pid).1);
            last_sample = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!(
                "sidecar ({mode}) delivered only {} of {n} in 600 s",
                app.answered()
            );
        }
    }
    let took = started.elapsed();
    let (cpu1, rss) = proc_usage(pid);
    max_rss = max_rss.max(rss);
    sidecar.signal("TERM");
    let _ = sidecar.wait_exit(Duration::from_secs(30));
    let delivered = (n - first) as f64;
    SidecarRun {
        rate: delivered / took.as_secs_f64(),
        cpu_us_per_record: (cpu1 - cpu0).as_secs_f64() * 1e6 / delivered,
        max_rss,
    }
}

async fn idle_rss() -> u64 {
    let topic = Topic::create("bench-idle", 1).await;
    let app = TestApp::counting().await;
    let sidecar = Sidecar::start(
        "bench-idle",
        sidecar_config(&topic.name, &group("bench-idle"), &app.url()),
    );
    sidecar.wait_ready(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(5)).await;
    proc_usage(sidecar.pid()).1
}

/// Time from the end of the last in-flight delivery to the sidecar's exit after SIGTERM.
async fn drain_overhead() -> (Duration, Duration) {
    const DELAY: Duration = Duration::from_secs(1);
    let topic = Topic::create("bench-drain", 4).await;
    topic.produce_numbered(200, 50).await;
    let app = TestApp::start(|_| Reply::ok().after(DELAY)).await;
    let mut cfg = sidecar_config(&topic.name, &group("bench-drain"), &app.url());
    cfg["delivery"]["ordering"] = "none".into();
    cfg["delivery"]["maxInFlight"] = 20.into();
    let mut sidecar = Sidecar::start("bench-drain", cfg);
    while app.in_flight() < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let exited = loop {
        if let Ok(Some(_)) = sidecar.child.try_wait() {
            break Instant::now();
        }
        if signalled.elapsed() > Duration::from_secs(60) {
            panic!("the sidecar did not exit within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // `Received::at` is the arrival time; each delivery then takes exactly DELAY.
    let last_delivery_end = app
        .received()
        .iter()
        .map(|r| r.at + DELAY)
        .max()
        .expect("deliveries finished");
    (
        exited.saturating_duration_since(last_delivery_end),
        exited - signalled,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    ensure_reachable();
    let n = records();
    eprintln!("sluice-bench: building the sidecar (release)…");
    let bin = sidecar_binary();
    eprintln!(
        "sluice-bench: sidecar {}; producing {n} records to {PARTITIONS} partitions…",
        bin.display()
    );
    let topic = Topic::create("bench", PARTITIONS).await;
    topic.produce_numbered(n, 1000).await;

    let kafka_rate = {
        let name = topic.name.clone();
        tokio::task::spawn_blocking(move || plain_consume(&name, n))
            .await
            .unwrap()
    };
    let app = TestApp::counting().await;
    let http_rate = plain_http(&app.url(), &topic.name, n, PARTITIONS as usize).await;
    drop(app);

    let mut runs = Vec::new();
    for mode in ["partition", "key", "none"] {
        eprintln!("sluice-bench: sidecar, ordering {mode}…");
        runs.push((mode, through_sidecar(&topic, mode, n).await));
    }
    let idle = idle_rss().await;
    let (drain_after_last, drain_total) = drain_overhead().await;

    println!();
    println!(
        "Sluice consumer benchmark — {n} records, {PARTITIONS} partitions, local broker, trivial HTTP app"
    );
    println!("{:<52} {:>12}", "measurement", "value");
    println!(
        "{:<52} {:>12.0}",
        "plain rdkafka consume loop (records/s)", kafka_rate
    );
    println!(
        "{:<52} {:>12.0}",
        format!("plain HTTP client, {PARTITIONS} connections (requests/s)"),
        http_rate
    );
    for (mode, r) in &runs {
        println!(
            "{:<52} {:>12.0}",
            format!("sidecar, ordering {mode} (records/s)"),
            r.rate
        );
        println!(
            "{:<52} {:>12.2}",
            format!("  ratio to plain HTTP client"),
            r.rate / http_rate
        );
        println!(
            "{:<52} {:>12.3}",
            format!("  ratio to plain rdkafka loop"),
            r.rate / kafka_rate
        );
        println!(
            "{:<52} {:>12.1}",
            format!("  CPU µs per record"),
            r.cpu_us_per_record
        );
        println!(
            "{:<52} {:>12.1}",
            format!("  RSS under load (MiB, max)"),
            mib(r.max_rss)
        );
    }
    println!("{:<52} {:>12.1}", "sidecar RSS idle (MiB)", mib(idle));
    println!(
        "{:<52} {:>12.3}",
        "drain: exit after the last in-flight delivery (s)",
        drain_after_last.as_secs_f64()
    );
    println!(
        "{:<52} {:>12.3}",
        "drain: SIGTERM to exit, 1 s deliveries (s)",
        drain_total.as_secs_f64()
    );
    let partition_ratio = runs[0].1.rate / http_rate;
    println!();
    println!(
        "targets: partition mode >= 0.5x plain HTTP: {} ({partition_ratio:.2}); idle RSS <= 20 MiB: {} ({:.1}); drain <= 0.5 s after last delivery: {} ({:.3})",
        if partition_ratio >= 0.5 {
            "MET"
        } else {
            "MISSED"
        },
        if mib(idle) <= 20.0 { "MET" } else { "MISSED" },
        mib(idle),
        if drain_after_last <= Duration::from_millis(500) {
            "MET"
        } else {
            "MISSED"
        },
        drain_after_last.as_secs_f64(),
    );
}
