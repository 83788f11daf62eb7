//! Smoke tests of the test bed's Kubernetes: a real API server of the expected version, and
//! a real node whose kubelet runs a project-built image, streams its logs, runs `preStop`
//! hooks before SIGTERM, and lets pods reach the broker's pod listener.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use sluice_tests::kube_env::{self, Namespace};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const PROBE_IMAGE: &str = "sluice.dev/testbed-probe:dev";

#[tokio::test]
async fn api_server_is_kubernetes_1_34() {
    let client = kube_env::client().await;
    let version = client.apiserver_version().await.expect("/version");
    assert!(
        version.git_version.starts_with("v1.34."),
        "API server reports {}, expected v1.34.x",
        version.git_version
    );
    assert_eq!(version.major, "1");
    assert_eq!(version.minor, "34");
}

/// One line a probe reported: `<event> <pod> <unix-millis> [detail]`.
#[derive(Debug, Clone)]
struct Report {
    event: String,
    pod: String,
    millis: u128,
    detail: String,
}

/// Listens on the bridge gateway (the host as pods see it) for probe reports.
async fn report_listener() -> (String, mpsc::UnboundedReceiver<Report>) {
    let host_ip = sluice_tests::env_value("SLUICE_HOST_IP").unwrap_or_else(|| "10.88.0.1".into());
    let listener = TcpListener::bind((host_ip.as_str(), 0))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {host_ip} (the node's bridge): {e}"));
    let addr = listener.local_addr().expect("local addr").to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut parts = line.splitn(4, ' ');
                    let report = Report {
                        event: parts.next().unwrap_or_default().to_string(),
                        pod: parts.next().unwrap_or_default().to_string(),
                        millis: parts.next().and_then(|m| m.parse().ok()).unwrap_or(0),
                        detail: parts.next().unwrap_or_default().trim().to_string(),
                    };
                    let _ = tx.send(report);
                }
            });
        }
    });
    (addr, rx)
}

async fn next_report(
    rx: &mut mpsc::UnboundedReceiver<Report>,
    timeout: Duration,
    what: &str,
) -> Report {
    match tokio::time::timeout(timeout, rx.recv()).await {
        Ok(Some(r)) => r,
        _ => panic!("no probe report within {timeout:?} while waiting for {what}"),
    }
}

fn probe_deployment(name: &str, report_addr: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": "probe",
                        "image": PROBE_IMAGE,
                        "imagePullPolicy": "Never",
                        "ports": [{"containerPort": 8080}],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "PROBE_REPORT", "value": report_addr},
                            {"name": "PROBE_KAFKA", "value": sluice_tests::kafka::pod_bootstrap()}
                        ],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
                        "lifecycle": {"preStop": {"httpGet": {"path": "/prestop", "port": 8080}}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        }
                    }]
                }
            }
        }
    }))
    .expect("valid Deployment")
}

#[tokio::test]
async fn a_real_node_runs_pods_streams_logs_and_runs_prestop_before_sigterm() {
    let client = kube_env::client().await;
    let ns = Namespace::create(&client, "smoke-node").await;
    let (report_addr, mut reports) = report_listener().await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments
        .create(
            &PostParams::default(),
            &probe_deployment("probe", &report_addr),
        )
        .await
        .expect("create Deployment");

    // Two pods become ready on the node.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = deployments.get("probe").await.expect("get Deployment");
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready == 2 {
            break;
        }
        if Instant::now() > deadline {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
            let list = pods.list(&ListParams::default()).await.expect("list pods");
            let states: Vec<_> = list
                .items
                .iter()
                .map(|p| (p.metadata.name.clone(), p.status.clone()))
                .collect();
            panic!(
                "Deployment has {ready}/2 ready pods after 120 s (is {PROBE_IMAGE} imported? `make images`); pods: {states:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Each pod started and reached the broker through the pod listener, which advertised
    // its own (pod-reachable) address.
    let mut kafka_ok: HashMap<String, String> = HashMap::new();
    let mut started = 0;
    while kafka_ok.len() < 2 {
        let r = next_report(&mut reports, Duration::from_secs(60), "kafka-ok").await;
        match r.event.as_str() {
            "started" => started += 1,
            "kafka-ok" => {
                kafka_ok.insert(r.pod.clone(), r.detail.clone());
            }
            "kafka-error" => panic!("pod {} could not reach Kafka: {}", r.pod, r.detail),
            _ => {}
        }
    }
    assert!(
        started >= 2,
        "expected a start report from both pods, got {started}"
    );
    for (pod, brokers) in &kafka_ok {
        assert_eq!(
            brokers,
            &sluice_tests::kafka::pod_bootstrap(),
            "pod {pod} saw brokers {brokers}, expected the pod listener's advertised address"
        );
    }

    // `kubectl logs` shows the probe's output.
    let pod_name = kafka_ok.keys().next().expect("a pod").clone();
    let out = Command::new(sluice_tests::tool("SLUICE_KUBECTL"))
        .args(["logs", "-n", &ns.name, &pod_name])
        .env("KUBECONFIG", kube_env::kubeconfig_path())
        .output()
        .expect("kubectl logs");
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl logs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains(&format!("started {pod_name} ")),
        "kubectl logs lacks the start line:\n{logs}"
    );
    assert!(
        logs.contains(&format!("kafka-ok {pod_name} ")),
        "kubectl logs lacks the Kafka line:\n{logs}"
    );

    // Deleting a pod runs its preStop hook, then delivers SIGTERM, within the grace period.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deleted_at = Instant::now();
    pods.delete(&pod_name, &DeleteParams::default())
        .await
        .expect("delete pod");
    let mut prestop = None;
    let mut sigterm = None;
    while prestop.is_none() || sigterm.is_none() {
        let r = next_report(&mut reports, Duration::from_secs(30), "prestop and sigterm").await;
        if r.pod != pod_name {
            continue; // the replacement pod starting
        }
        match r.event.as_str() {
            "prestop" => prestop = Some(r),
            "sigterm" => sigterm = Some(r),
            _ => {}
        }
    }
    let (prestop, sigterm) = (prestop.expect("prestop"), sigterm.expect("sigterm"));
    assert!(
        prestop.millis <= sigterm.millis,
        "SIGTERM ({}) arrived before the preStop hook ({})",
        sigterm.millis,
        prestop.millis
    );
    assert!(
        deleted_at.elapsed() < Duration::from_secs(30),
        "preStop and SIGTERM took {:?}, longer than the 30 s grace period",
        deleted_at.elapsed()
    );
}
