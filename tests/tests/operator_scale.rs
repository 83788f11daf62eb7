//! 200 EventConsumers created at once converge, with the operator running as its own
//! process (the built `sluice-operator` binary) so its memory can be measured alone.
//!
//! The binary is `$SLUICE_OPERATOR_BIN`, else `sluice-operator` next to this test's `deps/`
//! folder (built by `cargo test --workspace`, or `cargo build -p sluice-operator`).
//! `SLUICE_SCALE_COUNT` changes the number of EventConsumers (default 200).

mod operator_common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::ListParams;
use operator_common::{condition, create_ec, ec_yaml, install_crd, wait_for};
use sluice_operator::crd::EventConsumer;
use sluice_tests::kube_env::{self, Namespace};

fn operator_binary() -> PathBuf {
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

/// (peak, current) resident set size of a process, in KiB, from /proc.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the operator process is alive");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_event_consumers_converge() {
    let count: usize = std::env::var("SLUICE_SCALE_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-scale200").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("{}-operator.log", ns.name));
    let child = Command::new(operator_binary())
        .args([
            "run",
            "--watch-namespace",
            &ns.name,
            "--lease-namespace",
            &ns.name,
            "--identity",
            "scale",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--log", "info"])
        .env("KUBECONFIG", kube_env::kubeconfig_path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting sluice-operator");
    let mut operator = Process(child);
    let pid = operator.0.id();
    let (idle_peak, _) = {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_kib(pid)
    };

    // Created at once (32 requests in flight), replicas 0 so the single test node is not
    // asked to run 200 pods: this measures the operator, not the kubelet.
    let started = Instant::now();
    let names: Vec<String> = (0..count).map(|i| format!("ec-{i:04}")).collect();
    stream::iter(names.iter())
        .for_each_concurrent(32, |name| {
            let client = client.clone();
            let ns = ns.name.clone();
            async move {
                create_ec(&client, &ns, name, &ec_yaml("orders", 0, "")).await;
            }
        })
        .await;
    let created = started.elapsed();

    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let peak_seen = std::sync::atomic::AtomicU64::new(0);
    wait_for(
        &format!(
            "{count} EventConsumers to converge (log: {})",
            log.display()
        ),
        Duration::from_secs(300),
        || async {
            peak_seen.fetch_max(rss_kib(pid).0, std::sync::atomic::Ordering::Relaxed);
            let list = ecs.list(&ListParams::default()).await.ok()?;
            let converged = list
                .items
                .iter()
                .filter(|ec| {
                    ec.status
                        .as_ref()
                        .is_some_and(|s| s.observed_generation == ec.metadata.generation)
                        && condition(ec, "Degraded").is_some_and(|d| d.0 == "False")
                        && condition(ec, "Ready").is_some_and(|r| r.1 == "ScaledToZero")
                })
                .count();
            (converged == count).then_some(())
        },
    )
    .await;
    let converged = started.elapsed();
    let deployment_count = deployments
        .list_metadata(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(deployment_count, count);

    // Quiet afterwards: no reconcile storm once everything converged.
    let metrics = |port: u16| async move {
        let body = reqwest_lite(port, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix("sluice_operator_reconciles_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("reconciles_total in /metrics")
    };
    let after = metrics(port).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = metrics(port).await;
    let (peak, current) = rss_kib(pid);
    eprintln!(
        "{count} EventConsumers: created in {created:?}, all converged after {converged:?}; reconciles {after} (+{} in the next 5 s); operator RSS peak {} MiB (idle before: {} MiB), now {} MiB",
        later - after,
        peak.max(peak_seen.into_inner()) / 1024,
        idle_peak / 1024,
        current / 1024
    );
    // The Deployment controller may still be writing the new Deployments' status (each
    // write retriggers its owner once, a no-op); a loop would be many times one per EC.
    assert!(
        later - after <= count as u64,
        "reconciles keep running after convergence: {} in 5 s for {count} EventConsumers",
        later - after
    );
    assert!(
        converged < Duration::from_secs(180),
        "convergence took {converged:?}"
    );
    assert!(peak < 512 * 1024, "operator peak RSS {} MiB", peak / 1024);

    // SIGTERM: a clean exit.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = operator.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "the operator exits cleanly on SIGTERM: {status}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator did not exit within 20 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 GET against the operator's endpoint.
async fn reqwest_lite(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the operator's HTTP endpoint");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
