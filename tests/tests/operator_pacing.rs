//! An operator upgrade that brings a new sidecar image rolls EventConsumers at a bounded
//! pace (`--max-sidecar-rollouts`), against the test bed's real API server and
//! controller-manager. The pods are pinned to a node that does not exist, so no rollout
//! completes until the test scales an EventConsumer to zero: that way the test, not the
//! machine's speed, decides when a turn frees up, and the bound is read from the
//! Deployments in the API server. Also: the Warning about an autoscaler aimed at the
//! Deployment instead of the EventConsumer.

mod operator_common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use operator_common::{Operator, create_ec, install_crd, wait_for};
use serde_json::json;
use sluice_operator::build::{SidecarDefaults, SidecarMode};
use sluice_operator::crd::EventConsumer;
use sluice_tests::kube_env::{self, Namespace};

const N: usize = 10;
const MAX: usize = 3;
const OLD: &str = "sluice.dev/consumer:pace-old";
const NEW: &str = "sluice.dev/consumer:pace-new";
const LONG: Duration = Duration::from_secs(60);

fn yaml() -> String {
    format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: EventConsumer
metadata: {{}}
spec:
  kafka:
    bootstrapServers: "{bootstrap}"
    topics: [pace-orders]
  delivery:
    url: http://127.0.0.1:8080/events
  replicas: 1
  template:
    spec:
      nodeSelector: {{sluice.dev/test-node: none}}
      containers:
      - {{name: app, image: "sluice.dev/test-app:dev", imagePullPolicy: IfNotPresent}}
"#,
        bootstrap = sluice_tests::kafka::pod_bootstrap(),
    )
}

fn image(d: &Deployment) -> String {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "sluice")
        .and_then(|c| c.image.clone())
        .expect("a sluice sidecar")
}

/// The Deployment controller has rolled out the current template: every pod on it and
/// available (read from the Deployment's status, as `kubectl rollout status` does).
fn rolled_out(d: &Deployment) -> bool {
    let s = d.status.clone().unwrap_or_default();
    let wanted = d.spec.as_ref().unwrap().replicas.unwrap_or(1);
    s.observed_generation >= d.metadata.generation
        && s.updated_replicas.unwrap_or(0) >= wanted
        && s.replicas.unwrap_or(0) == s.updated_replicas.unwrap_or(0)
        && s.available_replicas.unwrap_or(0) >= wanted
}

/// Name → Deployment.
async fn deployments(client: &Client, ns: &str) -> BTreeMap<String, Deployment> {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| (d.metadata.name.clone().unwrap(), d))
        .collect()
}

/// Deployments on the new image whose rollout is not complete.
fn rolling_new(ds: &BTreeMap<String, Deployment>) -> Vec<String> {
    ds.iter()
        .filter(|(_, d)| image(d) == NEW && !rolled_out(d))
        .map(|(n, _)| n.clone())
        .collect()
}

async fn scale(ecs: &Api<EventConsumer>, name: &str, replicas: i32) {
    ecs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .unwrap_or_else(|e| panic!("scaling {name}: {e}"));
}

#[tokio::test]
async fn a_new_sidecar_image_rolls_at_most_max_at_a_time_and_spec_changes_at_once() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-pacing").await;
    let defaults = |image: &str| SidecarDefaults {
        image: image.into(),
        mode: SidecarMode::Native,
    };
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);

    // The fleet on the old sidecar: creations are not paced.
    let op = Operator::start_paced(&client, &ns.name, "op-pacing-1", defaults(OLD), MAX as u32);
    let names: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    for n in &names {
        create_ec(&client, &ns.name, n, &yaml()).await;
    }
    wait_for("all Deployments on the old sidecar", LONG, || async {
        let ds = deployments(&client, &ns.name).await;
        (ds.len() == N && ds.values().all(|d| image(d) == OLD)).then_some(())
    })
    .await;
    op.stop().await;

    // The upgrade: a new operator with a new sidecar image.
    let op = Operator::start_paced(&client, &ns.name, "op-pacing-2", defaults(NEW), MAX as u32);
    let started = Instant::now();
    let max_seen = Cell::new(0);
    wait_for("MAX Deployments on the new sidecar", LONG, || async {
        let ds = deployments(&client, &ns.name).await;
        let rolling = rolling_new(&ds);
        max_seen.set(max_seen.get().max(rolling.len()));
        assert!(
            rolling.len() <= MAX,
            "more than {MAX} roll at once: {rolling:?}"
        );
        (rolling.len() == MAX).then_some(())
    })
    .await;
    println!(
        "first {MAX} rollouts started {:?} after the upgrade",
        started.elapsed()
    );
    // The others wait, say so, and keep waiting while no turn frees up.
    let waiting = wait_for(
        "the others to report their pending sidecar",
        LONG,
        || async {
            let list = ecs.list(&ListParams::default()).await.ok()?;
            let waiting: Vec<String> = list
                .items
                .iter()
                .filter(|ec| {
                    ec.status
                        .as_ref()
                        .and_then(|s| s.pending_sidecar_image.as_deref())
                        == Some(NEW)
                })
                .map(|ec| ec.metadata.name.clone().unwrap())
                .collect();
            (waiting.len() == N - MAX).then_some(waiting)
        },
    )
    .await;
    let settle = Instant::now() + Duration::from_secs(4);
    while Instant::now() < settle {
        let ds = deployments(&client, &ns.name).await;
        let on_new = ds.values().filter(|d| image(d) == NEW).count();
        assert_eq!(
            on_new, MAX,
            "no turn is free, so no other Deployment changes"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A user's change rolls at once, new sidecar included, though every turn is taken.
    let user = &waiting[0];
    ecs.patch(
        user,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"delivery": {"url": "http://127.0.0.1:8081/events"}}})),
    )
    .await
    .unwrap();
    wait_for(
        "the spec change on the new sidecar",
        Duration::from_secs(30),
        || async {
            let d = Api::<Deployment>::namespaced(client.clone(), &ns.name)
                .get(user)
                .await
                .ok()?;
            (image(&d) == NEW).then_some(())
        },
    )
    .await;
    // A scale of a waiting EventConsumer is applied at once (the template still waits)...
    let scaled = &waiting[1];
    scale(&ecs, scaled, 2).await;
    wait_for(
        "the scale of a waiting EventConsumer",
        Duration::from_secs(30),
        || async {
            let d = Api::<Deployment>::namespaced(client.clone(), &ns.name)
                .get(scaled)
                .await
                .ok()?;
            (d.spec.as_ref()?.replicas == Some(2)).then_some(())
        },
    )
    .await;
    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .get(scaled)
        .await
        .unwrap();
    assert_eq!(image(&d), OLD, "a scale takes no turn");
    // ... and the user-rolled one, scaled to zero, is out of the count.
    scale(&ecs, user, 0).await;

    // Free turns by scaling each Deployment on the new sidecar to zero (its rollout then
    // completes); the waiting ones follow, never more than MAX rolling at a time.
    let rounds = Cell::new(0);
    wait_for(
        "every Deployment on the new sidecar",
        Duration::from_secs(150),
        || async {
            let ds = deployments(&client, &ns.name).await;
            // The user-rolled one is not paced: it is left out of the count.
            let rolling: Vec<String> = rolling_new(&ds).into_iter().filter(|n| n != user).collect();
            assert!(
                rolling.len() <= MAX,
                "more than {MAX} roll at once: {rolling:?}"
            );
            max_seen.set(max_seen.get().max(rolling.len()));
            for (n, d) in &ds {
                if image(d) == NEW && d.spec.as_ref()?.replicas != Some(0) {
                    scale(&ecs, n, 0).await;
                    rounds.set(rounds.get() + 1);
                }
            }
            (ds.len() == N && ds.values().all(|d| image(d) == NEW && rolled_out(d))).then_some(())
        },
    )
    .await;
    println!(
        "all {N} on the new sidecar {:?} after the upgrade; at most {} rolled at once; {} scale-downs",
        started.elapsed(),
        max_seen.get(),
        rounds.get()
    );
    assert_eq!(max_seen.get(), MAX);

    // Status reports the image every pod runs, and nothing pending.
    wait_for(
        "status.sidecarImage on every EventConsumer",
        LONG,
        || async {
            let list = ecs.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .all(|ec| {
                    let s = ec.status.as_ref();
                    s.and_then(|s| s.sidecar_image.as_deref()) == Some(NEW)
                        && s.and_then(|s| s.pending_sidecar_image.as_deref()).is_none()
                })
                .then_some(())
        },
    )
    .await;
    op.stop().await;
}

/// An autoscaler aimed at the Deployment the operator owns gets a Warning event on the
/// EventConsumer naming the right target; one aimed at the EventConsumer does not.
#[tokio::test]
async fn an_autoscaler_on_the_deployment_is_warned_about() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use k8s_openapi::api::core::v1::Event;
    use kube::api::PostParams;

    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-hpa").await;
    let op = Operator::start(&client, &ns.name, "op-hpa");
    create_ec(
        &client,
        &ns.name,
        "orders",
        &operator_common::ec_yaml("hpa-orders", 0, ""),
    )
    .await;
    wait_for("the Deployment", LONG, || async {
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .get_opt("orders")
            .await
            .ok()
            .flatten()
    })
    .await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    for (name, api_version, kind) in [
        ("right", "sluice.dev/v1alpha1", "EventConsumer"),
        ("wrong", "apps/v1", "Deployment"),
    ] {
        let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name},
            "spec": {
                "scaleTargetRef": {"apiVersion": api_version, "kind": kind, "name": "orders"},
                "minReplicas": 1, "maxReplicas": 3,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 80}}}]
            }
        }))
        .unwrap();
        hpas.create(&PostParams::default(), &hpa).await.unwrap();
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let warnings = wait_for("a Warning about the autoscaler", LONG, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let found: Vec<String> = list
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some("AutoscalerTargetsDeployment")
                    && e.type_.as_deref() == Some("Warning")
                    && e.involved_object.name.as_deref() == Some("orders")
            })
            .map(|e| e.message.clone().unwrap_or_default())
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let m = &warnings[0];
    assert!(m.contains("HorizontalPodAutoscaler wrong"), "{m}");
    assert!(!m.contains("HorizontalPodAutoscaler right"), "{m}");
    assert!(
        m.contains(
            "scaleTargetRef {apiVersion: sluice.dev/v1alpha1, kind: EventConsumer, name: orders}"
        ),
        "{m}"
    );
    // Once per autoscaler: another reconcile (a spec change) publishes it again neither as a
    // new Event nor as a repeat of the same one.
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let changed = ecs
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"delivery": {"url": "http://127.0.0.1:8081/events"}}})),
        )
        .await
        .unwrap();
    wait_for("the spec change reconciled", LONG, || async {
        let ec = ecs.get("orders").await.ok()?;
        (ec.status?.observed_generation == changed.metadata.generation).then_some(())
    })
    .await;
    let list = events.list(&ListParams::default()).await.unwrap();
    let counts: Vec<i32> = list
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("AutoscalerTargetsDeployment"))
        .map(|e| {
            let series = e.series.as_ref().and_then(|s| s.count).unwrap_or(1);
            e.count.unwrap_or(1).max(series)
        })
        .collect();
    assert_eq!(counts, [1], "published once");
    op.stop().await;
}
