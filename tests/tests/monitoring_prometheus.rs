//! The dashboard's lag query, evaluated by a real Prometheus (built from Prometheus' Go
//! module by tests/env/build-promtool.sh, run on the loopback) that scrapes a real sidecar,
//! equals the consumer group's lag as Kafka reports it (end offsets minus committed offsets).
//!
//! The sidecar runs on the host (as the consumer tests run it); the scrape adds the labels
//! `namespace` and `eventconsumer` the way the chart's PodMonitor does. The application
//! answers the first records and then goes away, so the group falls behind by exactly the
//! records produced after that.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::kafka::{self, Topic, committed, end_offsets};
use sluice_tests::testapp::{Sidecar, TestApp, free_port, sidecar_config};

fn repo() -> PathBuf {
    sluice_tests::repo_root()
}

/// Prometheus from the cache (built by `build-promtool.sh prometheus` when missing).
fn prometheus_binary() -> PathBuf {
    let out = Command::new("bash")
        .arg(sluice_tests::env_scripts().join("build-promtool.sh"))
        .arg("prometheus")
        .output()
        .expect("running tests/env/build-promtool.sh prometheus");
    assert!(
        out.status.success(),
        "building prometheus failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let promtool = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("the promtool path")
            .trim(),
    );
    promtool.with_file_name("prometheus")
}

/// A Prometheus process and its folder, stopped and removed when dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn query(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    addr: &str,
    promql: &str,
) -> Option<Value> {
    use http_body_util::BodyExt as _;
    let mut encoded = String::new();
    for b in promql.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let uri: http::Uri = format!("http://{addr}/api/v1/query?query={encoded}")
        .parse()
        .expect("query URI");
    let resp = client.get(uri).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

#[tokio::test]
async fn the_dashboard_lag_query_on_a_real_prometheus_equals_kafkas_lag() {
    kafka::ensure_reachable();
    let topic = Topic::create("prom-lag", 2).await;
    let group = kafka::group("prom-lag");
    let app = TestApp::counting().await;
    let sidecar = Sidecar::start("prom-lag", sidecar_config(&topic.name, &group, &app.url()));

    // Phase 1: 100 records delivered and committed (lag 0).
    topic.produce_numbered(100, 10).await;
    kafka::wait_committed_to_end(&group, &topic, Duration::from_secs(60)).await;
    // Phase 2: the application goes away; 250 more records cannot be delivered.
    app.stop();
    topic.produce_numbered(250, 10).await;
    let end: i64 = end_offsets(&topic.name, topic.partitions).iter().sum();
    let done: i64 = committed(&group, &topic.name, topic.partitions)
        .iter()
        .map(|c| c.expect("committed in phase 1"))
        .sum();
    let kafka_lag = end - done;
    assert_eq!(kafka_lag, 250, "Kafka's view of the group's lag");

    // A Prometheus scraping the sidecar every second, labelled as the PodMonitor labels.
    let dir = std::env::temp_dir().join(sluice_tests::unique_name("prometheus"));
    std::fs::create_dir_all(&dir).expect("prometheus folder");
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: sluice-sidecars\n    static_configs:\n      - targets: ['{}']\n        labels: {{namespace: monitoring-test, pod: prom-lag-0, eventconsumer: prom-lag}}\n",
        sidecar.admin
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let child = Command::new(prometheus_binary())
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    let prometheus = Prometheus { child, dir, addr };

    // The dashboard's own query, its variables set as Grafana would for this consumer.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/sluice/files/grafana/sluice.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let lag_query = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == "Lag per EventConsumer")
        .expect("the lag panel")["targets"][0]["expr"]
        .as_str()
        .expect("expr")
        .replace("$namespace", "monitoring-test")
        .replace("$eventconsumer", "prom-lag");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    loop {
        if let Some(v) = query(&client, &prometheus.addr, &lag_query).await {
            let result = &v["data"]["result"];
            if let Some(series) = result.as_array().and_then(|r| r.first()) {
                assert_eq!(series["metric"]["eventconsumer"], "prom-lag");
                assert_eq!(series["metric"]["namespace"], "monitoring-test");
                let value: f64 = series["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("a sample value");
                if value as i64 == kafka_lag {
                    println!(
                        "Prometheus: {lag_query} = {value}; Kafka: end {end} - committed {done} = {kafka_lag}"
                    );
                    break;
                }
            }
            last = Some(v);
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard's lag query never showed Kafka's lag {kafka_lag} within 90 s; last answer: {last:?}\nprometheus log: {}",
            std::fs::read_to_string(prometheus.dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Both partitions are reported (the per-partition panel's query), summing to the lag.
    let per_partition = format!(
        "sum by (topic, partition) (sluice_partition_lag{{eventconsumer=\"prom-lag\",topic=\"{}\"}})",
        topic.name
    );
    let v = query(&client, &prometheus.addr, &per_partition)
        .await
        .expect("per-partition answer");
    let series = v["data"]["result"].as_array().expect("result");
    assert_eq!(series.len(), 2, "{v}");
    drop(sidecar);
}
