//! Failover of the chart-like deployment: operator replicas as their own processes (the
//! built `sluice-operator` binary, default Lease timings), EventConsumers converged by the
//! first leader, then the leader SIGKILLed (no release of the Lease). Prints, per failover,
//! the time from the kill to the new leader's first reconcile (goal: at most the lease
//! duration + 2 s) and the API requests in the window after the kill, from the API server's
//! own `apiserver_request_total` (shared test bed: an upper bound of the operator's share).
//!
//! The standby has watched everything since it started (warm caches), so the new leader
//! reconciles from its caches: its catch-up pass skips every apply whose desired state is
//! unchanged, and it lists nothing.
//!
//! `SLUICE_FAILOVER_COUNT` (default 100), `SLUICE_FAILOVER_ROUNDS` (default 1) and
//! `SLUICE_FAILOVER_AFTER_SECS` (default 20) change the size, the number of failovers and the
//! request window; `make bench-operator-failover` runs 1 000 EventConsumers, 3 failovers and
//! a one-minute window. The binary is `$SLUICE_OPERATOR_BIN`, else `sluice-operator` next to
//! this test's `deps/` folder.

mod operator_common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use kube::Api;
use kube::api::ListParams;
use operator_common::{
    OPERATOR_RESOURCES, apiserver_request_counts, create_ec, ec_yaml, env_or, install_crd,
    operator_binary, spread, wait_for,
};
use sluice_operator::crd::EventConsumer;
use sluice_tests::kube_env::{self, Namespace};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The operator's default `--lease-duration-seconds`.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// One operator process; SIGKILLed when dropped.
struct Replica {
    child: Child,
    port: u16,
    identity: String,
}

impl Replica {
    fn start(namespace: &str, identity: &str) -> Replica {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("{namespace}-{identity}.log"));
        let child = Command::new(operator_binary())
            .args([
                "run",
                "--watch-namespace",
                namespace,
                "--lease-namespace",
                namespace,
            ])
            .args(["--identity", identity, "--lag-interval", "0s"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--log", "info"])
            .env("KUBECONFIG", kube_env::kubeconfig_path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting sluice-operator");
        Replica {
            child,
            port,
            identity: identity.to_owned(),
        }
    }

    /// A metric's value from the replica's /metrics (`None` while it does not answer).
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.port, "/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    async fn is_leader(&self) -> bool {
        self.metric("sluice_operator_leader").await == Some(1.0)
    }

    async fn is_ready(&self) -> bool {
        http_get(self.port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// SIGKILL: no release of the Lease, nothing finishes.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the leader");
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET against an operator's endpoint.
async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// Requests the API server counted per (resource, verb) on what the operator touches.
async fn apiserver_requests(client: &kube::Client) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for r in apiserver_request_counts(client).await {
        if OPERATOR_RESOURCES.contains(&r.resource.as_str()) {
            let key = if r.subresource.is_empty() {
                r.resource
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            *out.entry((key, r.verb)).or_default() += r.count;
        }
    }
    out
}

fn delta(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_within_the_lease_duration() {
    let count: usize = env_or("SLUICE_FAILOVER_COUNT", 100);
    let rounds: usize = env_or("SLUICE_FAILOVER_ROUNDS", 1);
    let window = Duration::from_secs(env_or("SLUICE_FAILOVER_AFTER_SECS", 20));
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-failover").await;

    let mut leader = Replica::start(&ns.name, "fo-0");
    wait_for(
        "the first replica to lead",
        Duration::from_secs(60),
        || async { leader.is_leader().await.then_some(()) },
    )
    .await;
    let names: Vec<String> = (0..count).map(|i| format!("ec-{i:04}")).collect();
    let yaml = ec_yaml("failover", 0, "");
    stream::iter(names.iter())
        .for_each_concurrent(16, |name| {
            let (client, ns, yaml) = (client.clone(), ns.name.clone(), yaml.clone());
            async move {
                create_ec(&client, &ns, name, &yaml).await;
            }
        })
        .await;
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        &format!("{count} EventConsumers to converge"),
        Duration::from_secs(60 + count as u64 / 2),
        || async {
            let list = ecs.list(&ListParams::default()).await.ok()?;
            let done = list
                .items
                .iter()
                .filter(|ec| {
                    ec.status
                        .as_ref()
                        .is_some_and(|s| s.observed_generation == ec.metadata.generation)
                })
                .count();
            (done == count).then_some(())
        },
    )
    .await;

    let mut failovers = Vec::new();
    let mut requests_after = Vec::new();
    for round in 1..=rounds {
        let standby = Replica::start(&ns.name, &format!("fo-{round}"));
        wait_for(
            "the standby to reach the API server",
            Duration::from_secs(60),
            || async { standby.is_ready().await.then_some(()) },
        )
        .await;
        // Time for the standby's first lists; a replica that has run for a while is past them.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !standby.is_leader().await,
            "the standby does not lead a live Lease"
        );
        assert_eq!(
            standby.metric("sluice_operator_reconciles_total").await,
            Some(0.0),
            "the standby does not reconcile"
        );

        let before = apiserver_requests(&client).await;
        let killed = Instant::now();
        leader.kill();
        let failover = wait_for(
            &format!(
                "{} to reconcile after the leader was killed",
                standby.identity
            ),
            LEASE_DURATION * 4,
            || async {
                let n = standby.metric("sluice_operator_reconciles_total").await?;
                (n > 0.0).then(|| killed.elapsed())
            },
        )
        .await;
        let died_at = killed.elapsed();
        if died_at < window {
            tokio::time::sleep(window - died_at).await;
        }
        let after = apiserver_requests(&client).await;
        let reconciles = standby
            .metric("sluice_operator_reconciles_total")
            .await
            .unwrap_or(0.0);
        let d = delta(&before, &after);
        let total: f64 = d.values().sum();
        eprintln!(
            "failover {round}/{rounds} with {count} EventConsumers: first reconcile {:.2}s after the SIGKILL (goal <= {}s = lease duration + 2s); {reconciles} reconciles and {total} API requests on the operator's resources in the {}s after the kill: {d:?}",
            failover.as_secs_f64(),
            (LEASE_DURATION + Duration::from_secs(2)).as_secs(),
            window.as_secs()
        );
        // A new leader must not take over a Lease that has not expired.
        assert!(
            failover >= LEASE_DURATION - Duration::from_secs(3),
            "{} led {failover:?} after the kill, before the killed leader's Lease (renewed every 2 s, valid {LEASE_DURATION:?}) could have expired",
            standby.identity
        );
        failovers.push(failover.as_secs_f64());
        requests_after.push(total);
        leader = standby;
    }
    let (median, min, max) = spread(failovers);
    let (rmedian, rmin, rmax) = spread(requests_after);
    eprintln!(
        "failover, {count} EventConsumers, {rounds} run(s): kill -> first reconcile median {median:.2}s (min {min:.2}, max {max:.2}), {:.2}x the goal of {}s; API requests in the {}s after: median {rmedian} (min {rmin}, max {rmax})",
        median / (LEASE_DURATION + Duration::from_secs(2)).as_secs_f64(),
        (LEASE_DURATION + Duration::from_secs(2)).as_secs(),
        window.as_secs()
    );
}
