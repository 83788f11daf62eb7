//! `make bench`: throughput, CPU, memory and drain time of the consumer sidecar against the
//! local broker, next to what users run without it — all delivering the same Kafka records
//! and counted the same way.
//!
//! * plain rdkafka consume loop (no delivery): the ceiling;
//! * plain rdkafka → hyper loop: every record POSTed to the same application, as many
//!   requests in flight as the sidecar (`maxInFlight` 64), offsets auto-committed; and the
//!   same loop with 12 in flight, the most the sidecar's `partition` ordering can have on
//!   12 partitions (one delivery per partition): the per-record target compares each
//!   ordering with the loop at its own concurrency;
//! * the sidecar, one record per request, ordering `partition` / `key` / `none`;
//! * the sidecar with batches of up to 100 records (`delivery.batch`), each ordering;
//! * kafka-go `FetchMessage` → POST → `CommitMessages` per record (and with
//!   `CommitInterval: 1s`), built from the Go module proxy (`tests/bench/build-go.sh`);
//! * a sarama consumer group handling records in process (`MarkMessage`, auto-commit).
//!
//! Every contestant runs as its own process (CPU and RSS read from /proc). Throughput is
//! unique records the application accepted (each value carries a sequence number), from the
//! first to the last; the in-process contestants count their own the same way. Each figure
//! is the median of `SLUICE_BENCH_RUNS` (3) runs with min and max; the RSS column is the
//! median of each run's peak with the highest peak beside it, and the memory target is judged
//! on that highest peak (a bound holds in every run). A drain that exits
//! before its in-flight deliveries were answered is a failure, not a fast drain.
//!
//! The contestants that pass 200 000 records in well under a second (the consume loop,
//! sarama, the sidecar with batches) read a second topic of `SLUICE_BENCH_FAST_RECORDS`
//! (default five times as many), so that their runs last long enough to be measured.
//!
//! Run: `make bench` (env `SLUICE_BENCH_RECORDS`, default 200 000; `SLUICE_BENCH_FAST_RECORDS`;
//! `SLUICE_BENCH_RUNS`;
//! `SLUICE_BENCH_KAFKAGO_RECORDS`, default 5 000, for the slow per-record-commit consumer;
//! `SLUICE_BENCH_KEYS`, distinct record keys, default 1 000 — few keys make key ordering
//! wait on keys in flight; `SLUICE_BENCH_GO_BIN`, the Go baselines' directory, set by
//! `make bench`; `SLUICE_BENCH_ONLY`, only the contestants whose name contains it (several
//! texts separated by `|`: those containing any of them), or
//! `drain`; `SLUICE_BENCH_SIDECAR_CONFIG`, a JSON object of sidecar settings merged over the
//! sidecar contestants' configuration, e.g. `{"kafka":{"queuedMaxMessagesKbytes":65536}}`;
//! `SLUICE_BENCH_RDKAFKA_DEBUG`, librdkafka `debug` contexts for the drain's sidecar,
//! whose log level `SLUICE_TEST_SIDECAR_LOG` sets; `SLUICE_SIDECAR_BIN`, a sidecar binary to
//! run instead of this workspace's, to compare two builds with one benchmark binary).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use sluice_tests::kafka::{Topic, bootstrap, client_config, ensure_reachable, group, producer};
use sluice_tests::testapp::{Reply, Sidecar, TestApp, sidecar_binary, sidecar_config};
use tokio::net::TcpListener;

const PARTITIONS: i32 = 12;
const MAX_IN_FLIGHT: usize = 64;
const BATCH_RECORDS: usize = 100;

fn env_usize(name: &str, default: usize) -> usize {
    env_opt(name).unwrap_or(default as u64) as usize
}

/// Merges `extra` into `into`, objects key by key, anything else replaced.
fn merge(into: &mut serde_json::Value, extra: serde_json::Value) {
    match (into, extra) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn env_opt(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// (user + system CPU time, resident set size) of a process, from /proc.
fn proc_usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: utime is field 14, stime 15 (1-based) => indices 11, 12.
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

/// The local broker's process (the test bed's pid file: its first line), to count the CPU
/// the broker spends per record beside the contestant's.
fn broker_pid() -> Option<u32> {
    let cache = std::env::var("SLUICE_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/sluice",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    std::fs::read_to_string(format!("{cache}/state/pids/kafka.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// CPU spent beside a contestant during its run: the bench process (the application the
/// contestants deliver to, and the bench's own polling) and the broker.
struct Beside {
    app: Duration,
    broker: Option<(u32, Duration)>,
}

impl Beside {
    fn start() -> Self {
        Beside {
            app: proc_usage(std::process::id()).0,
            broker: broker_pid().map(|pid| (pid, proc_usage(pid).0)),
        }
    }

    /// (application µs, broker µs) per record since [`Beside::start`].
    fn per_record(&self, n: usize) -> (f64, Option<f64>) {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let app = proc_usage(std::process::id()).0.saturating_sub(self.app);
        let broker = self
            .broker
            .map(|(pid, at)| us(proc_usage(pid).0.saturating_sub(at)));
        (us(app), broker)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The sequence number in a record value `{"seq":N,...}` — found the same way in a single
/// record's body and in every event of a batch.
fn seqs(body: &[u8]) -> impl Iterator<Item = usize> + '_ {
    const KEY: &[u8] = b"\"seq\":";
    let mut at = 0;
    std::iter::from_fn(move || {
        let i = body[at..].windows(KEY.len()).position(|w| w == KEY)? + at + KEY.len();
        let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        at = i + digits;
        std::str::from_utf8(&body[i..i + digits]).ok()?.parse().ok()
    })
}

/// Unique records accepted, with the time of the first and of the `n`-th.
struct Counter {
    seen: Vec<bool>,
    count: usize,
    first: Option<Instant>,
    done: Option<Instant>,
    n: usize,
}

impl Counter {
    fn new(total: usize, n: usize) -> Counter {
        Counter {
            seen: vec![false; total],
            count: 0,
            first: None,
            done: None,
            n,
        }
    }

    fn mark(&mut self, seq: usize) {
        if seq < self.seen.len() && !std::mem::replace(&mut self.seen[seq], true) {
            self.count += 1;
            self.first.get_or_insert_with(Instant::now);
            if self.count == self.n {
                self.done = Some(Instant::now());
            }
        }
    }
}

/// The application every HTTP contestant delivers to: answers 200 at once and counts
/// unique records.
struct BenchApp {
    addr: SocketAddr,
    counter: Arc<Mutex<Counter>>,
    server: tokio::task::JoinHandle<()>,
}

impl BenchApp {
    async fn start(total: usize, n: usize) -> BenchApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = Arc::new(Mutex::new(Counter::new(total, n)));
        let c = counter.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let c = c.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<Incoming>| {
                        let c = c.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            {
                                let mut c = c.lock().unwrap();
                                for s in seqs(&body) {
                                    c.mark(s);
                                }
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BenchApp {
            addr,
            counter,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    fn count(&self) -> usize {
        self.counter.lock().unwrap().count
    }

    fn span(&self) -> Option<Duration> {
        let c = self.counter.lock().unwrap();
        Some(c.done? - c.first?)
    }
}

impl Drop for BenchApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One run of one contestant.
#[derive(Clone, Copy, Debug)]
struct Run {
    rate: f64,
    cpu_us: f64,
    rss: u64,
    /// CPU µs per record of the bench process (the application) during the run.
    app_cpu_us: f64,
    /// CPU µs per record of the broker during the run (None: its pid is unknown).
    broker_cpu_us: Option<f64>,
}

/// A contestant process delivering to `app`: measured until the application counted `n`
/// unique records, then killed.
async fn watch(mut child: Child, n: usize, app: &BenchApp, what: &str) -> Run {
    let run = watch_pid(child.id(), n, app, what).await;
    if let Ok(Some(status)) = child.try_wait() {
        panic!("{what} exited before the end: {status}");
    }
    let _ = child.kill();
    let _ = child.wait();
    run
}

/// A self-reporting contestant: it prints `first_to_last_s=<s>` when it counted `n`.
async fn watch_reporting(mut child: Child, n: usize, what: &str) -> Run {
    use std::io::BufRead;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let started = Instant::now();
    let beside = Beside::start();
    let mut max_rss = 0;
    let line = loop {
        max_rss = max_rss.max(proc_usage(pid).1);
        match rx.try_recv() {
            Ok(line) => break line,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                panic!("{what} ended without a report")
            }
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{what}: no report in 900 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (cpu, rss) = proc_usage(pid);
    let (app_cpu_us, broker_cpu_us) = beside.per_record(n);
    let span: f64 = line
        .trim()
        .strip_prefix("first_to_last_s=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: unexpected report {line:?}"));
    let _ = child.kill();
    let _ = child.wait();
    Run {
        rate: n as f64 / span,
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        rss: max_rss.max(rss),
        app_cpu_us,
        broker_cpu_us,
    }
}

fn self_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::inherit());
    cmd
}

// ----- the in-process baselines, run as `sluice-bench <baseline> ...` -----

/// `consume <topic> <group> <n>`: a plain rdkafka consume loop, counting unique records.
fn baseline_consume(topic: &str, group: &str, n: usize) {
    let consumer: BaseConsumer = client_config()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        // The sidecar's default. librdkafka's own (1 s) idles a partition whose queue was
        // full for a second before its next fetch: at a million records the loop then
        // reached ~0.3 M records/s instead of ~1.6 M, a ceiling below what it measures.
        .set(
            "fetch.queue.backoff.ms",
            sluice_config::DEFAULT_FETCH_QUEUE_BACKOFF_MS.to_string(),
        )
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut counter = Counter::new(n, n);
    while counter.done.is_none() {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            for s in seqs(m.payload().unwrap_or_default()) {
                counter.mark(s);
            }
        }
    }
    let span = counter.done.unwrap() - counter.first.unwrap();
    println!("first_to_last_s={:.6}", span.as_secs_f64());
    std::thread::sleep(Duration::from_secs(600));
}

/// `http <topic> <group> <url> <concurrency>`: a plain rdkafka → hyper loop: every record
/// POSTed with the sidecar's headers, up to `concurrency` requests at once, offsets
/// auto-committed.
async fn baseline_http(topic: &str, group: &str, url: &str, concurrency: usize) {
    let consumer: StreamConsumer = client_config()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(connector);
    let uri: http::Uri = url.parse().unwrap();
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    loop {
        let m = consumer.recv().await.expect("a record");
        let permit = permits.clone().acquire_owned().await.unwrap();
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let value = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        let (t, p, o) = (m.topic().to_owned(), m.partition(), m.offset());
        // `ce-time` from the record's timestamp, as the sidecar sends it.
        let time = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| {
                humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string()
            });
        drop(m);
        let client = client.clone();
        let uri = uri.clone();
        tokio::spawn(async move {
            let mut req = http::Request::post(uri)
                .header("ce-specversion", "1.0")
                .header("ce-id", format!("{t}-{p}-{o}"))
                .header("ce-source", format!("/sluice/topics/{t}"))
                .header("ce-type", "dev.sluice.kafka.record")
                .header("content-type", "application/octet-stream")
                .header("kafka-topic", t.as_str())
                .header("kafka-partition", p.to_string())
                .header("kafka-offset", o.to_string())
                .header("sluice-attempt", "1");
            if let Some(k) = key {
                req = req.header("kafka-key", k);
            }
            if let Some(time) = time {
                req = req.header("ce-time", time);
            }
            let req = req.body(Full::new(value)).unwrap();
            let resp = client.request(req).await.expect("plain HTTP request");
            let _ = resp.into_body().collect().await;
            drop(permit);
        });
    }
}

// ----- the bench -----

async fn produce(topic: &Topic, n: usize, keys: usize) {
    let producer = producer();
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let key = format!("key-{}", i % keys);
        // ~100 bytes, JSON.
        let value = format!("{{\"seq\":{i},\"pad\":\"{:0>72}\"}}", i);
        let fut = producer
            .send_result(FutureRecord::to(&topic.name).key(&key).payload(&value))
            .unwrap_or_else(|(e, _)| panic!("producing record {i}: {e}"));
        pending.push(fut);
        if pending.len() >= 10_000 {
            for f in pending.drain(..) {
                f.await.expect("delivery").expect("produced");
            }
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("produced");
    }
}

async fn sidecar_run(topic: &Topic, mode: &str, batch: bool, n: usize) -> Run {
    let app = BenchApp::start(n, n).await;
    let name = format!("bench-{mode}{}", if batch { "-batch" } else { "" });
    let mut cfg = sidecar_config(&topic.name, &group(&name), &app.url());
    cfg["delivery"]["ordering"] = mode.into();
    cfg["delivery"]["maxInFlight"] = MAX_IN_FLIGHT.into();
    cfg["delivery"]["commitInterval"] = "500ms".into();
    if batch {
        cfg["delivery"]["batch"] = serde_json::json!({ "maxRecords": BATCH_RECORDS });
    }
    // Settings under study (the memory budget, say): merged over the configuration.
    if let Ok(extra) = std::env::var("SLUICE_BENCH_SIDECAR_CONFIG") {
        let extra: serde_json::Value = serde_json::from_str(&extra)
            .expect("SLUICE_BENCH_SIDECAR_CONFIG is a JSON object of sidecar settings");
        merge(&mut cfg, extra);
    }
    let sidecar = Sidecar::start(&name, cfg);
    // The sidecar's own process handle stays with `Sidecar`; watch it by pid.
    let pid = sidecar.pid() as u32;
    let run = watch_pid(pid, n, &app, &name).await;
    drop(sidecar);
    run
}

async fn watch_pid(pid: u32, n: usize, app: &BenchApp, what: &str) -> Run {
    let started = Instant::now();
    let beside = Beside::start();
    let mut max_rss = 0;
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    loop {
        if last_sample.elapsed() >= Duration::from_millis(100) {
            max_rss = max_rss.max(proc_usage(pid).1);
            last_sample = Instant::now();
        }
        if let Some(span) = app.span() {
            let (cpu, rss) = proc_usage(pid);
            let (app_cpu_us, broker_cpu_us) = beside.per_record(n);
            return Run {
                rate: n as f64 / span.as_secs_f64(),
                cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
                rss: max_rss.max(rss),
                app_cpu_us,
                broker_cpu_us,
            };
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{what}: only {} of {n} records in 900 s",
            app.count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
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
    proc_usage(sidecar.pid() as u32).1
}

/// Time from the last in-flight delivery's answer to the sidecar's exit after SIGTERM, and
/// SIGTERM to exit. `Err` when the sidecar exited before a delivery was answered.
async fn drain_once(batch: bool) -> Result<(Duration, Duration), String> {
    const DELAY: Duration = Duration::from_secs(1);
    let topic = Topic::create("bench-drain", 4).await;
    topic.produce_numbered(400, 50).await;
    let app = TestApp::start(|_| Reply::ok().after(DELAY)).await;
    let mut cfg = sidecar_config(&topic.name, &group("bench-drain"), &app.url());
    cfg["delivery"]["ordering"] = "none".into();
    cfg["delivery"]["maxInFlight"] = 20.into();
    if let Ok(d) = std::env::var("SLUICE_BENCH_RDKAFKA_DEBUG") {
        cfg["kafka"]["properties"] = serde_json::json!({"debug": d});
    }
    if batch {
        cfg["delivery"]["batch"] = serde_json::json!({ "maxRecords": 10 });
    }
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
            return Err("the sidecar did not exit within 60 s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // Requests still in the application when the sidecar exited were not waited for.
    tokio::time::sleep(DELAY + Duration::from_millis(200)).await;
    let received = app.received();
    let last_answer = received
        .iter()
        .map(|r| r.answered)
        .max()
        .ok_or("no delivery was answered")?;
    if last_answer > exited || app.answered() < received.len() {
        return Err(format!(
            "the sidecar exited {:?} before its last in-flight delivery was answered",
            last_answer.saturating_duration_since(exited)
        ));
    }
    Ok((exited - last_answer, exited - signalled))
}

struct Figures {
    runs: Vec<Run>,
}

impl Figures {
    fn median_by(&self, f: impl Fn(&Run) -> f64) -> (f64, f64, f64) {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    }
    fn rate(&self) -> f64 {
        self.median_by(|r| r.rate).0
    }
    fn cpu(&self) -> f64 {
        self.median_by(|r| r.cpu_us).0
    }
    /// The ratio of `self` to `other` within each run (the two ran minutes apart at most,
    /// so a drift of the machine's pace between runs cancels out): median [min – max].
    fn paired(&self, other: &Figures, f: impl Fn(&Run) -> f64) -> Option<(f64, f64, f64)> {
        if self.runs.len() != other.runs.len() || self.runs.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self
            .runs
            .iter()
            .zip(&other.runs)
            .map(|(a, b)| f(a) / f(b))
            .collect();
        v.sort_by(f64::total_cmp);
        Some((v[v.len() / 2], v[0], v[v.len() - 1]))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("consume") => {
            baseline_consume(&args[2], &args[3], args[4].parse().unwrap());
            return;
        }
        Some("http") => {
            // On a runtime worker, as the sidecar's dispatcher runs: in `main`'s own future
            // (the thread outside the pool) every start and result would be a cross-thread
            // wake-up, a cost the sidecar does not pay.
            let (topic, group, url) = (args[2].clone(), args[3].clone(), args[4].clone());
            let concurrency = args[5].parse().unwrap();
            tokio::spawn(async move { baseline_http(&topic, &group, &url, concurrency).await })
                .await
                .expect("the hyper loop");
            return;
        }
        _ => {}
    }
    ensure_reachable();
    let n = env_usize("SLUICE_BENCH_RECORDS", 200_000);
    let fast_n = env_usize("SLUICE_BENCH_FAST_RECORDS", 5 * n).max(1);
    let runs = env_usize("SLUICE_BENCH_RUNS", 3).max(1);
    let kafkago_n = env_usize("SLUICE_BENCH_KAFKAGO_RECORDS", 5_000).min(n);
    // `SLUICE_BENCH_ONLY=<text>[|<text>…]`: only the contestants whose name contains one of
    // them (profiling, pairs);
    // `drain`: only the idle RSS and the drain.
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.split('|').any(|o| name.contains(o));
    let go_bin = std::env::var("SLUICE_BENCH_GO_BIN")
        .ok()
        .map(std::path::PathBuf::from);
    eprintln!("sluice-bench: building the sidecar (release)…");
    let bin = sidecar_binary();
    eprintln!(
        "sluice-bench: sidecar {}; producing {n} records of ~100 bytes to {PARTITIONS} partitions…",
        bin.display()
    );
    const CONSUME: &str = "plain rdkafka consume loop (no delivery)";
    const HTTP: &str = "plain rdkafka → hyper loop, 64 in flight";
    // `partition` ordering delivers one record per partition at a time: on 12 partitions
    // at most 12 in flight, whatever `maxInFlight` says.
    const HTTP_PARTITIONS: &str = "plain rdkafka → hyper loop, 12 in flight";
    const SARAMA: &str = "sarama group, in process (MarkMessage)";
    const KAFKAGO: &str = "kafka-go Fetch → POST → Commit per record";
    const KAFKAGO_1S: &str = "kafka-go, CommitInterval 1s";
    const SIDECAR: [&str; 3] = [
        "sidecar, per record, partition",
        "sidecar, per record, key",
        "sidecar, per record, none",
    ];
    const BATCH: [&str; 3] = [
        "sidecar, batch 100, partition",
        "sidecar, batch 100, key",
        "sidecar, batch 100, none",
    ];
    let keys = env_usize("SLUICE_BENCH_KEYS", 1000).max(1);
    let topic = Topic::create("bench", PARTITIONS).await;
    produce(&topic, n, keys).await;
    let fast = Topic::create("bench-fast", PARTITIONS).await;
    // Only when a contestant reads it (a pair of per-record contestants does not).
    if [CONSUME, SARAMA].iter().chain(&BATCH).any(|c| wanted(c)) {
        eprintln!(
            "sluice-bench: producing {fast_n} records to a second topic for the consume loop, sarama and batches…"
        );
        produce(&fast, fast_n, keys).await;
    }

    let mut results: BTreeMap<&'static str, (usize, Figures)> = BTreeMap::new();
    let mut order: Vec<&'static str> = Vec::new();
    let mut record = |name: &'static str, count: usize, run: Run| {
        eprintln!(
            "sluice-bench:   {name}: {:.0} records/s, {:.1} CPU µs/record, {:.1} MiB",
            run.rate,
            run.cpu_us,
            mib(run.rss)
        );
        if !order.contains(&name) {
            order.push(name);
        }
        results
            .entry(name)
            .or_insert_with(|| (count, Figures { runs: vec![] }))
            .1
            .runs
            .push(run);
    };
    for i in 0..runs {
        eprintln!("sluice-bench: run {} of {runs}", i + 1);
        if wanted(CONSUME) {
            let child = self_command(&[
                "consume",
                &fast.name,
                &group("bench-consume"),
                &fast_n.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the consume loop");
            record(
                CONSUME,
                fast_n,
                watch_reporting(child, fast_n, CONSUME).await,
            );
        }
        for (name, concurrency) in [
            (HTTP, MAX_IN_FLIGHT),
            (HTTP_PARTITIONS, PARTITIONS as usize),
        ] {
            if !wanted(name) {
                continue;
            }
            let app = BenchApp::start(n, n).await;
            let child = self_command(&[
                "http",
                &topic.name,
                &group("bench-http"),
                &app.url(),
                &concurrency.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the HTTP loop");
            record(name, n, watch(child, n, &app, name).await);
            drop(app);
        }

        for (j, mode) in ["partition", "key", "none"].into_iter().enumerate() {
            if wanted(SIDECAR[j]) {
                record(SIDECAR[j], n, sidecar_run(&topic, mode, false, n).await);
            }
            if wanted(BATCH[j]) {
                record(
                    BATCH[j],
                    fast_n,
                    sidecar_run(&fast, mode, true, fast_n).await,
                );
            }
        }

        if let Some(dir) = go_bin
            .as_ref()
            .filter(|_| wanted(SARAMA) || wanted(KAFKAGO))
        {
            let child = Command::new(dir.join("sarama"))
                .args([
                    "-brokers",
                    &bootstrap(),
                    "-topic",
                    &fast.name,
                    "-group",
                    &group("bench-sarama"),
                    "-n",
                    &fast_n.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting the sarama baseline");
            record(SARAMA, fast_n, watch_reporting(child, fast_n, SARAMA).await);
            for (name, interval) in [(KAFKAGO, "0s"), (KAFKAGO_1S, "1s")] {
                let app = BenchApp::start(n, kafkago_n).await;
                let child = Command::new(dir.join("kafkago"))
                    .args([
                        "-brokers",
                        &bootstrap(),
                        "-topic",
                        &topic.name,
                        "-group",
                        &group("bench-kafkago"),
                        "-url",
                        &app.url(),
                        "-commit-interval",
                        interval,
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("starting the kafka-go baseline");
                record(name, kafkago_n, watch(child, kafkago_n, &app, name).await);
            }
        }
    }
    eprintln!("sluice-bench: idle RSS and drain…");
    let idle = idle_rss().await;
    let mut drains = Vec::new();
    for batch in [false, true] {
        for _ in 0..if only.is_empty() || only == "drain" {
            runs
        } else {
            0
        } {
            drains.push((batch, drain_once(batch).await));
        }
    }

    println!();
    println!(
        "Sluice consumer benchmark — {n} records of ~100 bytes ({fast_n} for the consume loop, sarama and batches), {PARTITIONS} partitions, local broker, an application that answers at once and counts unique records; median of {runs} runs [min – max]"
    );
    println!(
        "NOTE: one 2-core machine shared by the broker, the application, the contestant and whatever else runs; figures are noisy."
    );
    println!();
    let fig = |name: &str| results.get(name).map(|(_, f)| f);
    let ratio = |a: f64, b: Option<f64>| b.map_or("—".to_owned(), |b| format!("{:.2}×", a / b));
    let http_rate = fig(HTTP).map(Figures::rate);
    let http_cpu = fig(HTTP).map(Figures::cpu);
    let http12_rate = fig(HTTP_PARTITIONS).map(Figures::rate);
    let consume_rate = fig(CONSUME).map(Figures::rate);
    let sarama_rate = fig(SARAMA).map(Figures::rate);
    let kafkago_rate = fig(KAFKAGO).map(Figures::rate);
    println!(
        "{:<44} {:>26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>18} {:>14}",
        "contestant",
        "records/s",
        "×hyper",
        "×hyper12",
        "×consume",
        "×sarama",
        "×kafka-go",
        "CPU µs/rec (×hyper)",
        "RSS MiB (max)"
    );
    for name in &order {
        let (count, f) = &results[name];
        let (rate, lo, hi) = f.median_by(|r| r.rate);
        let (cpu, _, _) = f.median_by(|r| r.cpu_us);
        let (rss, _, rss_max) = f.median_by(|r| mib(r.rss));
        let counted = if *count == n {
            String::new()
        } else {
            format!(" ({count} records)")
        };
        println!(
            "{:<44} {:>26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>18} {:>14}",
            format!("{name}{counted}"),
            format!("{rate:.0} [{lo:.0} – {hi:.0}]"),
            ratio(rate, http_rate),
            ratio(rate, http12_rate),
            ratio(rate, consume_rate),
            ratio(rate, sarama_rate),
            ratio(rate, kafkago_rate),
            format!("{cpu:.1} ({})", ratio(cpu, http_cpu)),
            format!("{rss:.1} ({rss_max:.1})")
        );
    }
    println!();
    println!(
        "×hyper: against the hyper loop with 64 in flight; ×hyper12: with 12 in flight, the concurrency of `partition` ordering on 12 partitions"
    );
    println!();
    println!(
        "Where the two cores go, CPU µs per record (medians): the contestant, the application (the bench process), the broker; and the rate those totals would allow if the 2 cores did nothing else"
    );
    println!(
        "{:<44} {:>11} {:>12} {:>9} {:>9} {:>16}",
        "contestant", "contestant", "application", "broker", "total", "2 cores allow/s"
    );
    for name in &order {
        let (_, f) = &results[name];
        let cpu = f.cpu();
        let app = f.median_by(|r| r.app_cpu_us).0;
        let broker = f
            .runs
            .iter()
            .all(|r| r.broker_cpu_us.is_some())
            .then(|| f.median_by(|r| r.broker_cpu_us.unwrap_or(0.0)).0);
        let total = cpu + app + broker.unwrap_or(0.0);
        println!(
            "{:<44} {:>11.1} {:>12.1} {:>9} {:>9.1} {:>16.0}",
            name,
            cpu,
            app,
            broker.map_or("—".to_owned(), |b| format!("{b:.1}")),
            total,
            2e6 / total
        );
    }
    println!();
    println!(
        "sidecar RSS idle: {:.1} MiB (target ≤ 12 MiB: {})",
        mib(idle),
        met(mib(idle) <= 12.0)
    );
    for batch in [false, true] {
        let label = if batch { "batch" } else { "per record" };
        let ok: Vec<(Duration, Duration)> = drains
            .iter()
            .filter(|(b, _)| *b == batch)
            .filter_map(|(_, r)| r.as_ref().ok().copied())
            .collect();
        let failed: Vec<&String> = drains
            .iter()
            .filter(|(b, _)| *b == batch)
            .filter_map(|(_, r)| r.as_ref().err())
            .collect();
        for f in &failed {
            println!("drain ({label}): FAILED — {f}");
        }
        if !ok.is_empty() {
            let mut after: Vec<f64> = ok.iter().map(|(a, _)| a.as_secs_f64()).collect();
            after.sort_by(f64::total_cmp);
            let mut total: Vec<f64> = ok.iter().map(|(_, t)| t.as_secs_f64()).collect();
            total.sort_by(f64::total_cmp);
            let med = after[after.len() / 2];
            println!(
                "drain ({label}): exit {med:.3} s [{:.3} – {:.3}] after the last in-flight delivery was answered (target ≤ 0.1 s: {}); SIGTERM to exit with 1 s deliveries in flight {:.3} s",
                after[0],
                after[after.len() - 1],
                met(med <= 0.1 && failed.is_empty()),
                total[total.len() / 2]
            );
        }
    }
    println!();
    println!(
        "targets (ratios of medians; for the per-record rate also the median of each run's own ratio, which a drift of the machine's pace between runs does not move):"
    );
    let target = |what: &str, name: &str, value: Option<f64>, ok: fn(f64) -> bool| match value {
        Some(v) => println!("  {what} [{name}]: {v:.3} — {}", met(ok(v))),
        // A contestant left out by `SLUICE_BENCH_ONLY` has no targets to report.
        None if !wanted(name) => {}
        None => println!("  {what} [{name}]: not measured"),
    };
    for name in SIDECAR {
        let f = fig(name);
        // The loop at the same concurrency as this ordering.
        let (loop_name, what, what_cpu) = if name == SIDECAR[0] {
            (
                HTTP_PARTITIONS,
                "per record ≥ 0.9× the hyper loop at the same concurrency (12 in flight)",
                "per record CPU ≤ 1.5× the hyper loop's (12 in flight)",
            )
        } else {
            (
                HTTP,
                "per record ≥ 0.9× the hyper loop at the same concurrency (64 in flight)",
                "per record CPU ≤ 1.5× the hyper loop's (64 in flight)",
            )
        };
        let same = fig(loop_name);
        target(
            what,
            name,
            f.map(Figures::rate)
                .zip(same.map(Figures::rate))
                .map(|(a, b)| a / b),
            |v| v >= 0.9,
        );
        if let Some((med, lo, hi)) = f.zip(same).and_then(|(a, b)| a.paired(b, |r| r.rate)) {
            println!("    (each run's own ratio: median {med:.3} [{lo:.3} – {hi:.3}])");
        }
        target(
            what_cpu,
            name,
            f.map(Figures::cpu)
                .zip(same.map(Figures::cpu))
                .map(|(a, b)| a / b),
            |v| v <= 1.5,
        );
        target(
            "≥ 100× kafka-go per-record commit",
            name,
            f.map(Figures::rate).zip(kafkago_rate).map(|(a, b)| a / b),
            |v| v >= 100.0,
        );
    }
    for name in BATCH {
        let f = fig(name);
        target(
            "batch ≥ 1× sarama in process",
            name,
            f.map(Figures::rate).zip(sarama_rate).map(|(a, b)| a / b),
            |v| v >= 1.0,
        );
        target(
            "batch ≥ 0.3× the consume loop",
            name,
            f.map(Figures::rate).zip(consume_rate).map(|(a, b)| a / b),
            |v| v >= 0.3,
        );
        target(
            "batch CPU ≤ 3 µs/record",
            name,
            f.map(Figures::cpu),
            |v| v <= 3.0,
        );
        target(
            "≥ 100× kafka-go per-record commit",
            name,
            f.map(Figures::rate).zip(kafkago_rate).map(|(a, b)| a / b),
            |v| v >= 100.0,
        );
    }
    for name in SIDECAR.iter().chain(BATCH.iter()) {
        // A memory bound holds in every run or not at all: judged on the highest peak.
        target(
            "RSS under load ≤ 40 MiB (the highest peak of any run)",
            name,
            fig(name).map(|f| f.median_by(|r| mib(r.rss)).2),
            |v| v <= 40.0,
        );
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}
