//! Helpers shared by the operator's integration tests (`operator_*.rs`): installing the CRD,
//! running the operator in-process, creating EventConsumers and waiting for conditions.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use sluice_operator::build::SidecarDefaults;
use sluice_operator::crd::EventConsumer;
use sluice_operator::leader::LeaseSettings;
use sluice_operator::metrics::Metrics;
use sluice_operator::reconcile::WatchScope;
use sluice_operator::run::{Settings, run};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Server-side applies the CRD the operator's types generate (idempotent; the same field
/// manager as the CRD tests) and waits until it is established.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = EventConsumer::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(
        &name,
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("the API server refused the EventConsumer CRD: {e}"));
    sluice_tests::kube_env::wait_crd_established(client, &name).await;
}

/// Polls `probe` every 200 ms until it returns `Some`, or panics naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An operator running in this test process, watching one namespace.
pub struct Operator {
    pub metrics: Arc<Metrics>,
    pub identity: String,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

/// Short Lease timings so failover tests take seconds (valid: 3 s renew deadline + 2 s
/// graceful stop < 6 s lease).
pub fn lease(namespace: &str, name: &str, identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        identity: identity.to_owned(),
        lease_duration: Duration::from_secs(6),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_secs(1),
        graceful_stop: Duration::from_secs(2),
    }
}

impl Operator {
    /// Starts an operator for `namespace` with its Lease in that namespace.
    pub fn start(client: &Client, namespace: &str, identity: &str) -> Operator {
        Self::start_with(client, namespace, identity, SidecarDefaults::default())
    }

    pub fn start_with(
        client: &Client,
        namespace: &str,
        identity: &str,
        defaults: SidecarDefaults,
    ) -> Operator {
        Self::start_paced(client, namespace, identity, defaults, 10)
    }

    /// [`Operator::start_with`] with `--max-sidecar-rollouts`.
    pub fn start_paced(
        client: &Client,
        namespace: &str,
        identity: &str,
        defaults: SidecarDefaults,
        max_sidecar_rollouts: u32,
    ) -> Operator {
        let settings = Settings {
            max_sidecar_rollouts,
            defaults,
            scope: WatchScope {
                namespace: Some(namespace.to_owned()),
            },
            concurrency: 8,
            lease: lease(namespace, "sluice-operator", identity),
        };
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(
            client.clone(),
            settings,
            metrics.clone(),
            shutdown.clone(),
        ));
        Operator {
            metrics,
            identity: identity.to_owned(),
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }

    /// Clean shutdown: stops reconciling and releases the Lease.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("the operator stops within 20 s of its shutdown signal")
            .expect("the operator task does not panic");
    }

    /// A crash: the task is dropped mid-flight, the Lease is not released.
    pub async fn crash(mut self) {
        let handle = self.handle.take().expect("running");
        handle.abort();
        let _ = handle.await;
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        // A test that failed midway: stop reconciling at once.
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Creates an EventConsumer from YAML (metadata.name is set here).
pub async fn create_ec(client: &Client, namespace: &str, name: &str, yaml: &str) -> EventConsumer {
    let mut ec: EventConsumer = serde_norway::from_str(yaml)
        .unwrap_or_else(|e| panic!("test EventConsumer does not parse: {e}\n{yaml}"));
    ec.metadata.name = Some(name.to_owned());
    ec.metadata.namespace = Some(namespace.to_owned());
    let api: Api<EventConsumer> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match api.create(&PostParams::default(), &ec).await {
            Ok(created) => return created,
            // A freshly established CRD may not be served for a moment.
            Err(kube::Error::Api(e)) if e.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("creating EventConsumer {namespace}/{name}: {e}"),
        }
    }
}

/// A minimal valid EventConsumer spec (YAML document with apiVersion and kind).
pub fn ec_yaml(topic: &str, replicas: i32, extra_kafka: &str) -> String {
    format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: EventConsumer
metadata: {{}}
spec:
  kafka:
    bootstrapServers: "{bootstrap}"
    topics: [{topic}]{extra_kafka}
  delivery:
    url: http://127.0.0.1:8080/events
  replicas: {replicas}
  template:
    spec:
      containers:
      - {{name: app, image: "sluice.dev/test-app:dev", imagePullPolicy: IfNotPresent}}
"#,
        bootstrap = sluice_tests::kafka::pod_bootstrap(),
    )
}

/// The named condition of an EventConsumer, as (status, reason, message).
pub fn condition(ec: &EventConsumer, type_: &str) -> Option<(String, String, String)> {
    ec.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// `Degraded` says the operator realised the spec: false, or true only for a reason of the
/// pods (`status::pods::REASONS`; most tests' application image, `sluice.dev/test-app:dev`,
/// is not on the node, so their pods show `ImagePullFailed`).
pub fn applied_by_the_operator(ec: &EventConsumer) -> bool {
    condition(ec, "Degraded").is_some_and(|(status, reason, _)| {
        status == "False" || sluice_operator::status::pods::REASONS.contains(&reason.as_str())
    })
}

/// The value of the environment variable `name` parsed, or `default` when it is unset.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The `sluice-operator` binary beside the test binary (same profile and target folder), or
/// `SLUICE_OPERATOR_BIN`.
pub fn operator_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_OPERATOR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("sluice-operator");
    assert!(
        bin.is_file(),
        "{} does not exist: build it first with `cargo build -p sluice-operator` (same profile and target dir), or set SLUICE_OPERATOR_BIN",
        bin.display()
    );
    bin
}

/// The resources the operator reads and writes, as the API server's request metrics name them.
pub const OPERATOR_RESOURCES: [&str; 7] = [
    "eventconsumers",
    "deployments",
    "configmaps",
    "secrets",
    "poddisruptionbudgets",
    "leases",
    "events",
];

/// One series of the API server's `apiserver_request_total`.
pub struct RequestCount {
    pub resource: String,
    pub subresource: String,
    pub verb: String,
    pub count: f64,
}

/// Every `apiserver_request_total` series the API server exports now (its own count, read
/// with the test bed's admin credentials; shared by every client of the test bed).
pub async fn apiserver_request_counts(client: &kube::Client) -> Vec<RequestCount> {
    apiserver_request_series(client, "apiserver_request_total").await
}

/// The seconds the API server spent on requests (`apiserver_request_duration_seconds_sum`),
/// per series, in [`RequestCount::count`].
pub async fn apiserver_request_seconds(client: &kube::Client) -> Vec<RequestCount> {
    apiserver_request_series(client, "apiserver_request_duration_seconds_sum").await
}

async fn apiserver_request_series(client: &kube::Client, metric: &str) -> Vec<RequestCount> {
    let prefix = format!("{metric}{{");
    let text = client
        .request_text(
            http::Request::get("/metrics")
                .body(Vec::new())
                .expect("a request"),
        )
        .await
        .expect("the API server's /metrics (the test bed's admin credentials)");
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        out.push(RequestCount {
            resource: label("resource"),
            subresource: label("subresource"),
            verb: label("verb"),
            count,
        });
    }
    out
}

/// Median, min and max.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}
