//! A recording HTTP application for the consumer sidecar's tests and benchmark, and a
//! handle on a `sluice-consumer` process.
//!
//! [`TestApp`] answers every POST according to a behaviour function (status, headers, delay),
//! records what it received, tracks concurrency, and can be stopped and restarted on the same
//! port to play an application that is down or flapping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// One request the application received.
#[derive(Clone, Debug)]
pub struct Received {
    pub value: String,
    /// The request's path (tests give each sidecar its own to tell them apart).
    pub path: String,
    /// Lower-case header names.
    pub headers: HashMap<String, String>,
    /// When the request arrived.
    pub at: Instant,
    /// When the application answered it (after the reply's delay).
    pub answered: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn partition(&self) -> i32 {
        self.header("kafka-partition")
            .and_then(|p| p.parse().ok())
            .expect("kafka-partition header")
    }
    pub fn offset(&self) -> i64 {
        self.header("kafka-offset")
            .and_then(|p| p.parse().ok())
            .expect("kafka-offset header")
    }

    /// The CloudEvents of a batch request (`application/cloudevents-batch+json`), in order.
    pub fn events(&self) -> Vec<Event> {
        let array: Vec<serde_json::Value> = serde_json::from_str(&self.value)
            .unwrap_or_else(|e| panic!("a batch body must be a JSON array ({e}): {}", self.value));
        array.iter().map(Event::from_json).collect()
    }
}

/// One CloudEvent of a batch request, with the fields the tests look at.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// `data` as text (a JSON number or string as written; `data_base64` decoded as UTF-8).
    pub value: String,
    pub attempt: u32,
    pub json: serde_json::Value,
}

impl Event {
    fn from_json(v: &serde_json::Value) -> Event {
        let text = |name: &str| {
            v.get(name)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_else(|| panic!("event attribute {name} missing: {v}"))
                .to_owned()
        };
        let value = match (v.get("data"), v.get("data_base64")) {
            (Some(serde_json::Value::String(s)), _) => s.clone(),
            (Some(d), _) => d.to_string(),
            (None, Some(b)) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b.as_str().expect("data_base64 is a string"))
                    .expect("valid base64");
                String::from_utf8_lossy(&bytes).into_owned()
            }
            (None, None) => String::new(),
        };
        Event {
            id: text("id"),
            partition: text("kafkapartition").parse().expect("kafkapartition"),
            offset: text("kafkaoffset").parse().expect("kafkaoffset"),
            key: v
                .get("kafkakey")
                .and_then(|k| k.as_str())
                .map(str::to_owned),
            value,
            attempt: v
                .get("sluiceattempt")
                .and_then(serde_json::Value::as_u64)
                .expect("sluiceattempt") as u32,
            json: v.clone(),
        }
    }
}

/// How the application answers one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
    pub body: String,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            status: 200,
            headers: vec![],
            delay: Duration::ZERO,
            body: String::new(),
        }
    }
    /// A 200 with a JSON body (a batch answer).
    pub fn json(body: serde_json::Value) -> Reply {
        let mut r = Reply::ok().header("content-type", "application/json");
        r.body = body.to_string();
        r
    }
    /// A 200 with this body and content type, as written.
    pub fn body(content_type: &str, body: &str) -> Reply {
        let mut r = Reply::ok().header("content-type", content_type);
        r.body = body.to_owned();
        r
    }
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            ..Reply::ok()
        }
    }
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

pub type Behaviour = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

struct Shared {
    behaviour: RwLock<Behaviour>,
    record: bool,
    received: Mutex<Vec<Received>>,
    /// Requests whose reply was sent (recorded or not).
    answered: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The test application.
pub struct TestApp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl TestApp {
    /// Starts on a free loopback port, recording every request.
    pub async fn start(behaviour: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> TestApp {
        Self::start_with(Arc::new(behaviour), true).await
    }

    /// Starts an application that answers 200 at once and only counts requests.
    pub async fn counting() -> TestApp {
        Self::start_with(Arc::new(|_: &Received| Reply::ok()), false).await
    }

    async fn start_with(behaviour: Behaviour, record: bool) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test application");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            behaviour: RwLock::new(behaviour),
            record,
            received: Mutex::new(Vec::new()),
            answered: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = TestApp {
            addr,
            shared,
            server: Mutex::new(None),
        };
        app.serve(listener);
        app
    }

    /// Starts without listening yet (the application is "down" until [`TestApp::resume`]).
    pub async fn down(behaviour: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> TestApp {
        let app = Self::start(behaviour).await;
        app.stop();
        app
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let handle = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let shared = shared.clone();
                        connections.spawn(async move {
                            let service = service_fn(move |req| handle(shared.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.server.lock().unwrap() = Some(handle);
    }

    /// Stops listening and drops every open connection (in-flight requests fail).
    pub fn stop(&self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding the test application on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn set_behaviour(&self, behaviour: impl Fn(&Received) -> Reply + Send + Sync + 'static) {
        *self.shared.behaviour.write().unwrap() = Arc::new(behaviour);
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Requests answered so far (a reply was written).
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests ever handled at once.
    pub fn max_concurrency(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds for the received requests, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.shared.received.lock().unwrap()) {
                return;
            }
            if Instant::now() > deadline {
                let n = self.shared.received.lock().unwrap().len();
                panic!("timed out after {timeout:?} waiting for {what} ({n} requests received)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop();
    }
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&shared);
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let received = Received {
        path: parts.uri.path().to_owned(),
        value: String::from_utf8_lossy(&body).into_owned(),
        headers: if shared.record {
            parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect()
        } else {
            HashMap::new()
        },
        at: Instant::now(),
        answered: Instant::now(),
    };
    let behaviour = shared.behaviour.read().unwrap().clone();
    let reply = behaviour(&received);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut received = received;
    received.answered = Instant::now();
    if shared.record {
        shared.received.lock().unwrap().push(received);
    }
    let mut resp = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        resp = resp.header(k, v);
    }
    shared.answered.fetch_add(1, Ordering::SeqCst);
    Ok(resp
        .body(Full::new(Bytes::from(reply.body)))
        .expect("valid test response"))
}

/// The `sluice-consumer` binary, built once per test process with the same profile as the
/// tests (`cargo build -p sluice-consumer`), or the one `SLUICE_SIDECAR_BIN` names (to compare
/// two builds of the sidecar with one benchmark binary).
pub fn sidecar_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SLUICE_SIDECAR_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "SLUICE_SIDECAR_BIN={} is not a file",
                bin.display()
            );
            return bin;
        }
        // <target>/<profile>/deps/<test-binary> or <target>/<profile>/<binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut profile_dir = exe.parent().expect("target/<profile>").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir = profile_dir
                .parent()
                .map(Path::to_path_buf)
                .expect("target/<profile>");
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "sluice-consumer",
            "--bin",
            "sluice-consumer",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(crate::package_dir());
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for sluice-consumer");
        assert!(
            status.success(),
            "building sluice-consumer failed: {status}"
        );
        let bin = profile_dir.join("sluice-consumer");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// Paces an application to a total rate: each request is answered at the next free slot
/// (`1/rate` apart), whatever the number of requests in flight. Use as the reply delay.
pub struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    pub fn per_second(rate: u32) -> Arc<Pacer> {
        Arc::new(Pacer {
            interval: Duration::from_secs(1) / rate.max(1),
            next: Mutex::new(Instant::now()),
        })
    }

    /// The delay until this request's slot.
    pub fn delay(&self) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap();
        let slot = (*next).max(now);
        *next = slot + self.interval;
        slot - now
    }
}

/// A CPU quota for processes (a cgroup of the `cpu` controller, v1 or v2), removed on drop.
/// Processes added stay in it until they exit.
pub struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    /// A cgroup limited to `percent` of one CPU.
    pub fn new(name: &str, percent: u32) -> CpuQuota {
        let period = 100_000u32;
        let quota = period / 100 * percent.max(1);
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let base = if v2 {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/cpu")
        };
        let dir = base.join(crate::unique_name(name));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating the cgroup {}: {e}", dir.display()));
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}")).unwrap();
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()).unwrap();
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
        }
        CpuQuota { dir }
    }

    pub fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("adding {pid} to {}: {e}", self.dir.display()));
    }

    /// How often the group was throttled (it ran out of quota in a period).
    pub fn throttled_periods(&self) -> u64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        stat.lines()
            .find_map(|l| {
                l.strip_prefix("nr_throttled ")
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // The processes are gone by now (their handles are dropped first); a cgroup can only
        // be removed empty, so retry briefly while the last ones exit.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `sluice-consumer` process with its own config file and admin port.
pub struct Sidecar {
    pub child: Child,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub name: String,
}

/// The drain token every test sidecar is configured with.
pub const TEST_DRAIN_TOKEN: &str = "test-drain-token";

impl Sidecar {
    /// Starts the sidecar with `config` (a JSON object; `admin` and `drain.tokenFile` are
    /// filled in). Logs go to `<dir>/sidecar.log`.
    pub fn start(name: &str, mut config: serde_json::Value) -> Sidecar {
        let dir = std::env::temp_dir().join(format!("sluice-sidecar-{}", crate::unique_name(name)));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("drain-token");
        std::fs::write(&token, format!("{TEST_DRAIN_TOKEN}\n")).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        config["admin"] = serde_json::json!({"listen": admin.to_string()});
        let drain = config
            .get("drain")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        let mut drain = drain;
        drain["tokenFile"] = serde_json::json!(token);
        config["drain"] = drain;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join("sidecar.log")).unwrap();
        let child = Command::new(sidecar_binary())
            .arg("--config")
            .arg(&path)
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_TEST_SIDECAR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting sluice-consumer");
        Sidecar {
            child,
            admin,
            dir,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (up to `timeout`) for a successful exit; panics with the log
    /// otherwise. Returns how long the exit took from the signal.
    pub fn stop_gracefully(&mut self, timeout: Duration) -> Duration {
        let signalled = Instant::now();
        self.signal("TERM");
        let status = self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "{} did not exit after SIGTERM; log:\n{}",
                self.name,
                self.log()
            )
        });
        assert!(
            status.success(),
            "{}: exit status {status}; log:\n{}",
            self.name,
            self.log()
        );
        signalled.elapsed()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    /// A GET on the admin port: (status, body). Errors are reported as status 0.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))
        else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: sidecar\r\n{extra}Connection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The value of one metric sample (exact name with labels), if present.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (status, body) = self.get("/metrics", &[]);
        if status != 200 {
            return None;
        }
        let prefix = format!("{sample} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.get("/readyz", &[]).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "sidecar {} not ready after {timeout:?}; log:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A sidecar configuration for tests: `topic`, `group`, delivery to `url`, fast retries and
/// short drain and session timeouts. Adjust with `config["delivery"]["..."] = ...`.
pub fn sidecar_config(topic: &str, group: &str, url: &str) -> serde_json::Value {
    serde_json::json!({
        "kafka": {
            "bootstrapServers": crate::kafka::bootstrap(),
            "topics": [topic],
            "groupId": group,
            "sessionTimeoutMs": 6000,
            "heartbeatIntervalMs": 1000,
        },
        "delivery": {
            "url": url,
            "timeout": "5s",
            "ordering": "partition",
            "maxInFlight": 32,
            "retry": {"maxAttempts": 3, "initialBackoff": "20ms", "maxBackoff": "200ms"},
            "commitInterval": "200ms",
        },
        "drain": {"timeout": "20s"},
    })
}
