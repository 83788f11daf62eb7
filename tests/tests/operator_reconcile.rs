//! The operator against the test bed's real API server and controller-manager: the objects it
//! creates, rollouts on spec changes and credential rotation, garbage collection, status, and
//! how it handles specs it cannot realise.

mod operator_common;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use operator_common::{
    Operator, applied_by_the_operator, condition, create_ec, ec_yaml, install_crd, wait_for,
};
use sluice_config::SidecarConfig;
use sluice_operator::build::CONFIG_HASH_ANNOTATION;
use sluice_operator::crd::EventConsumer;
use sluice_tests::kube_env::{self, Namespace};

const LONG: Duration = Duration::from_secs(60);

fn template_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone()
}

async fn secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("sluice-tests").force(),
            &Patch::Apply(&s),
        )
        .await
        .unwrap_or_else(|e| panic!("writing Secret {name}: {e}"));
}

/// ReplicaSets of the Deployment, by their template's config hash.
async fn replica_set_hashes(client: &Client, ns: &str) -> Vec<String> {
    let mut hashes: Vec<String> = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|rs| {
            rs.spec
                .as_ref()?
                .template
                .as_ref()?
                .metadata
                .as_ref()?
                .annotations
                .as_ref()?
                .get(CONFIG_HASH_ANNOTATION)
                .cloned()
        })
        .collect();
    hashes.sort();
    hashes
}

async fn wait_for_hash_change(client: &Client, ns: &str, name: &str, old: &str) -> String {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for("a new template hash on the Deployment", LONG, || async {
        let d = deployments.get(name).await.ok()?;
        let h = template_hash(&d);
        (h != old).then_some(h)
    })
    .await
}

#[tokio::test]
async fn create_update_rotate_and_delete() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-lifecycle").await;
    let operator = Operator::start(&client, &ns.name, "op-lifecycle");
    secret(
        &client,
        &ns.name,
        "kafka-user",
        &[("username", "alice"), ("password", "one")],
    )
    .await;

    let sasl = "\n    auth: {sasl: {mechanism: SCRAM-SHA-512, secretRef: {name: kafka-user}}}";
    let ec = create_ec(&client, &ns.name, "inventory", &ec_yaml("orders", 2, sasl)).await;
    let uid = ec.metadata.uid.clone().unwrap();

    // Create → Deployment, ConfigMap, PDB and drain-token Secret, all owned by the EC.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = wait_for("the Deployment", LONG, || async {
        deployments.get_opt("inventory").await.ok().flatten()
    })
    .await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("inventory-sluice")
        .await
        .unwrap();
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name)
        .get("inventory")
        .await
        .unwrap();
    let drain = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .get("inventory-sluice-drain")
        .await
        .unwrap();
    for meta in [&d.metadata, &cm.metadata, &pdb.metadata, &drain.metadata] {
        let owner = &meta.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("EventConsumer", uid.as_str(), Some(true))
        );
        assert!(
            meta.managed_fields
                .iter()
                .flatten()
                .any(|m| m.manager.as_deref() == Some("sluice-operator"))
        );
    }
    let config = SidecarConfig::from_json(&cm.data.as_ref().unwrap()["config.json"])
        .expect("the sidecar reads it");
    config.validate().expect("valid sidecar configuration");
    assert_eq!(config.kafka.group_id, format!("{}.inventory", ns.name));
    assert_eq!(
        config
            .kafka
            .auth
            .unwrap()
            .sasl
            .unwrap()
            .password_file
            .to_str(),
        Some("/etc/sluice/sasl/password")
    );
    let token = String::from_utf8(drain.data.as_ref().unwrap()["drain-token"].0.clone()).unwrap();
    assert_eq!(token.len(), 64);
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let hook = pod.containers[0]
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        hook.http_headers.as_ref().unwrap()[0].value,
        token,
        "preStop carries the EC's drain token"
    );
    let sidecar = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        (sidecar.name.as_str(), sidecar.restart_policy.as_deref()),
        ("sluice", Some("Always"))
    );
    assert_eq!(
        pdb.spec.as_ref().unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // Status: observed generation, conditions, selector, effective tuning, replicas mirrored
    // from the Deployment the real controller-manager runs.
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let ec = wait_for("status mirroring the Deployment's 2 pods", LONG, || async {
        let ec = ecs.get("inventory").await.ok()?;
        let d = deployments.get("inventory").await.ok()?;
        let ds = d.status.clone()?;
        let s = ec.status.clone()?;
        (ds.replicas == Some(2)
            && s.replicas == 2
            && s.ready_replicas == ds.ready_replicas.unwrap_or(0))
        .then_some(ec)
    })
    .await;
    let status = ec.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, ec.metadata.generation);
    assert_eq!(
        status.selector.as_deref(),
        Some("sluice.dev/consumer=inventory")
    );
    let effective = status
        .effective
        .as_ref()
        .expect("effective tuning reported");
    assert_eq!(
        effective.group_id.as_deref(),
        Some(format!("{}.inventory", ns.name).as_str())
    );
    assert_eq!(
        Some(effective.termination_grace_period_seconds as i64),
        pod.termination_grace_period_seconds,
        "the pods get the tuned grace period"
    );
    assert!(
        applied_by_the_operator(&ec),
        "{:?}",
        condition(&ec, "Degraded")
    );
    // The application image is not on the node in this test, so the pods are not ready.
    let ready = condition(&ec, "Ready").unwrap();
    assert!(
        ready.0 == "False"
            && (ready.1 == "ReplicasNotReady"
                || sluice_operator::status::pods::REASONS.contains(&ready.1.as_str())),
        "{ready:?}"
    );
    let ready_since = ec
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .last_transition_time
        .clone();

    // Spec update → new template hash → a rollout (a second ReplicaSet from the real
    // Deployment controller).
    let first_hash = template_hash(&d);
    ecs.patch(
        "inventory",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"delivery": {"maxInFlight": 7}}})),
    )
    .await
    .unwrap();
    let second_hash = wait_for_hash_change(&client, &ns.name, "inventory", &first_hash).await;
    wait_for("a ReplicaSet for the updated template", LONG, || async {
        let hashes = replica_set_hashes(&client, &ns.name).await;
        (hashes.contains(&first_hash) && hashes.contains(&second_hash)).then_some(())
    })
    .await;
    let ec = wait_for(
        "Progressing=True RollingOut and the new generation observed",
        LONG,
        || async {
            let ec = ecs.get("inventory").await.ok()?;
            let p = condition(&ec, "Progressing")?;
            (ec.status.as_ref()?.observed_generation == ec.metadata.generation
                && p.0 == "True"
                && p.1 == "RollingOut")
                .then_some(ec)
        },
    )
    .await;
    let ready_now = ec
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .last_transition_time
        .clone();
    assert_eq!(
        ready_now, ready_since,
        "Ready did not flip, so its transition time did not move"
    );

    // Rotating a referenced Secret → new hash → another rollout.
    secret(
        &client,
        &ns.name,
        "kafka-user",
        &[("username", "alice"), ("password", "two")],
    )
    .await;
    let third_hash = wait_for_hash_change(&client, &ns.name, "inventory", &second_hash).await;
    wait_for("a ReplicaSet for the rotated credentials", LONG, || async {
        replica_set_hashes(&client, &ns.name)
            .await
            .contains(&third_hash)
            .then_some(())
    })
    .await;
    // The drain token stayed the same through all of it.
    let drain_after = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .get("inventory-sluice-drain")
        .await
        .unwrap();
    assert_eq!(drain_after.data.unwrap()["drain-token"].0, token.as_bytes());

    // Events for meaningful transitions.
    let events = Api::<Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("ConfigChanged"))
            .count()
            >= 1,
        "ConfigChanged events for the update and the rotation: {:?}",
        events
            .items
            .iter()
            .map(|e| e.reason.clone())
            .collect::<Vec<_>>()
    );

    // Delete → the garbage collector removes every child.
    ecs.delete("inventory", &DeleteParams::background())
        .await
        .unwrap();
    wait_for("garbage collection of the children", LONG, || async {
        let d = deployments.get_opt("inventory").await.ok()?;
        let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
            .get_opt("inventory-sluice")
            .await
            .ok()?;
        let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name)
            .get_opt("inventory")
            .await
            .ok()?;
        let s = Api::<Secret>::namespaced(client.clone(), &ns.name)
            .get_opt("inventory-sluice-drain")
            .await
            .ok()?;
        (d.is_none() && cm.is_none() && pdb.is_none() && s.is_none()).then_some(())
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn invalid_spec_is_degraded_with_its_reason_without_a_hot_loop() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-invalid").await;
    let operator = Operator::start(&client, &ns.name, "op-invalid");

    let yaml = ec_yaml("orders", 1, "").replace(
        "imagePullPolicy: IfNotPresent}",
        "imagePullPolicy: IfNotPresent, lifecycle: {preStop: {exec: {command: [sleep, '5']}}}}",
    );
    create_ec(&client, &ns.name, "prestop", &yaml).await;
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let ec = wait_for("Degraded=True PreStopConflict", LONG, || async {
        let ec = ecs.get("prestop").await.ok()?;
        let d = condition(&ec, "Degraded")?;
        (d.0 == "True" && d.1 == "PreStopConflict").then_some(ec)
    })
    .await;
    let (_, _, message) = condition(&ec, "Degraded").unwrap();
    assert!(
        message.contains("lifecycle.preStop") && message.contains("remove the preStop hook"),
        "{message}"
    );
    assert_eq!(condition(&ec, "Ready").unwrap().1, "PreStopConflict");
    assert_eq!(
        ec.status.as_ref().unwrap().observed_generation,
        ec.metadata.generation
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .get_opt("prestop")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), &ns.name)
            .get_opt("prestop-sluice-drain")
            .await
            .unwrap()
            .is_none(),
        "an invalid spec creates nothing, not even the drain-token Secret"
    );

    // Bounded: count reconciles over 10 s once Degraded is set. Without a hot loop the
    // number stays put (the status write does not change the generation, so it does not
    // retrigger; the bound leaves room for one stray watch event).
    let before = operator.reconciles();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = operator.reconciles() - before;
    eprintln!(
        "reconciles in the 10 s after Degraded: {during} (total so far {})",
        operator.reconciles()
    );
    assert!(
        during <= 2,
        "{during} reconciles in 10 s for an unchanged invalid spec: a hot loop"
    );
    assert!(operator.metrics.failures_with("PreStopConflict") >= 1);
    let events = Api::<Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    let warning = events
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("PreStopConflict"))
        .expect("a Warning event");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));

    // Fixing the spec clears it.
    ecs.patch(
        "prestop",
        &PatchParams::default(),
        // A merge patch replaces the whole list: the container without its preStop.
        &Patch::Merge(serde_json::json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "sluice.dev/test-app:dev", "imagePullPolicy": "IfNotPresent"}
        ]}}}})),
    )
    .await
    .unwrap();
    wait_for(
        "Degraded=False (or a pod reason) after the fix",
        LONG,
        || async {
            let ec = ecs.get("prestop").await.ok()?;
            applied_by_the_operator(&ec).then_some(())
        },
    )
    .await;
    let events = Api::<Event>::namespaced(client.clone(), &ns.name);
    wait_for("a Recovered event", LONG, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Recovered"))
            .then_some(())
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn a_missing_secret_waits_and_its_creation_resumes_the_reconcile() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-secret").await;
    let operator = Operator::start(&client, &ns.name, "op-secret");

    let tls = "\n    auth: {tls: {caSecretRef: {name: cluster-ca}}}";
    create_ec(&client, &ns.name, "tls", &ec_yaml("orders", 1, tls)).await;
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let ec = wait_for("Degraded=True SecretNotFound", LONG, || async {
        let ec = ecs.get("tls").await.ok()?;
        (condition(&ec, "Degraded")?.1 == "SecretNotFound").then_some(ec)
    })
    .await;
    let message = condition(&ec, "Degraded").unwrap().2;
    assert!(
        message.contains("cluster-ca") && message.contains("create it"),
        "{message}"
    );

    // The wrong key: SecretKeyMissing.
    secret(
        &client,
        &ns.name,
        "cluster-ca",
        &[("ca.pem", "-----CA-----")],
    )
    .await;
    wait_for("Degraded=True SecretKeyMissing", LONG, || async {
        let ec = ecs.get("tls").await.ok()?;
        (condition(&ec, "Degraded")?.1 == "SecretKeyMissing").then_some(())
    })
    .await;
    let before = operator.reconciles();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        operator.reconciles() - before <= 2,
        "no hot loop while the key is missing"
    );

    // The right key: the Secret watch brings the EC back, the objects appear.
    secret(
        &client,
        &ns.name,
        "cluster-ca",
        &[("ca.crt", "-----CA-----")],
    )
    .await;
    wait_for("the Deployment once the Secret is right", LONG, || async {
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .get_opt("tls")
            .await
            .ok()
            .flatten()
    })
    .await;
    wait_for("Degraded=False (or a pod reason)", LONG, || async {
        let ec = ecs.get("tls").await.ok()?;
        applied_by_the_operator(&ec).then_some(())
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn scaling_is_mirrored_and_the_drain_token_survives_its_secret_being_emptied() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-scale").await;
    let operator = Operator::start(&client, &ns.name, "op-scale");
    create_ec(&client, &ns.name, "scaled", &ec_yaml("orders", 1, "")).await;
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for("1 replica mirrored", LONG, || async {
        let ec = ecs.get("scaled").await.ok()?;
        (ec.status?.replicas == 1).then_some(())
    })
    .await;

    // The scale subresource: kubectl scale ec/scaled --replicas=3.
    ecs.patch_scale(
        "scaled",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    wait_for(
        "3 replicas on the Deployment and mirrored in status",
        LONG,
        || async {
            let d = deployments.get("scaled").await.ok()?;
            let ec = ecs.get("scaled").await.ok()?;
            (d.spec?.replicas == Some(3)
                && d.status?.replicas == Some(3)
                && ec.status?.replicas == 3)
                .then_some(())
        },
    )
    .await;
    let scale = ecs.get_scale("scaled").await.unwrap();
    assert_eq!(
        scale.status.unwrap().selector.as_deref(),
        Some("sluice.dev/consumer=scaled")
    );

    // Scale to zero: Ready with ScaledToZero.
    ecs.patch_scale(
        "scaled",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
    )
    .await
    .unwrap();
    wait_for("ScaledToZero", LONG, || async {
        let ec = ecs.get("scaled").await.ok()?;
        let r = condition(&ec, "Ready")?;
        (r.1 == "ScaledToZero" && ec.status?.replicas == 0).then_some(())
    })
    .await;

    // Someone empties the drain-token Secret: a new token is generated (and, being in the
    // preStop hook, rolls the pods).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let old = secrets
        .get("scaled-sluice-drain")
        .await
        .unwrap()
        .data
        .unwrap()["drain-token"]
        .clone();
    let mut emptied = secrets.get("scaled-sluice-drain").await.unwrap();
    emptied.data = Some(BTreeMap::new());
    emptied.metadata.managed_fields = None;
    secrets
        .replace("scaled-sluice-drain", &PostParams::default(), &emptied)
        .await
        .unwrap();
    let new = wait_for("a regenerated drain token", LONG, || async {
        let s = secrets.get("scaled-sluice-drain").await.ok()?;
        s.data?.get("drain-token").cloned()
    })
    .await;
    assert_ne!(new, old);
    operator.stop().await;
}

/// An EventConsumer whose pods the cluster refuses to create (here: the namespace enforces
/// Pod Security `restricted` and the application container asks to be privileged) says so:
/// `Ready=False` and `Degraded=True` with reason `PodsCannotBeCreated` and the admission's
/// own message, taken from the Deployment's `ReplicaFailure` (no per-pod reads), plus a
/// Warning event. Counted where a user looks: the EventConsumer's status and events in the
/// API server.
#[tokio::test]
async fn pods_refused_by_pod_security_show_as_degraded_with_the_admission_message() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let labels: BTreeMap<String, String> = [
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/enforce-version", "latest"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let ns = Namespace::create_with_labels(&client, "op-psa", labels).await;
    let _operator = Operator::start(&client, &ns.name, "op-psa");
    let yaml = ec_yaml("orders", 1, "").replace(
        "imagePullPolicy: IfNotPresent}",
        "imagePullPolicy: IfNotPresent, securityContext: {privileged: true}}",
    );
    create_ec(&client, &ns.name, "privileged", &yaml).await;
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let ec = wait_for(
        "Degraded=True PodsCannotBeCreated",
        Duration::from_secs(120),
        || async {
            let ec = ecs.get("privileged").await.ok()?;
            let d = condition(&ec, "Degraded")?;
            (d.0 == "True" && d.1 == "PodsCannotBeCreated").then_some(ec)
        },
    )
    .await;
    let (_, _, degraded) = condition(&ec, "Degraded").unwrap();
    assert!(
        degraded.contains("violates PodSecurity") && degraded.contains("privileged"),
        "{degraded}"
    );
    let (ready, reason, message) = condition(&ec, "Ready").unwrap();
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "PodsCannotBeCreated")
    );
    assert!(message.contains("violates PodSecurity"), "{message}");
    let events = wait_for("a PodsCannotBeCreated Warning event", LONG, || async {
        let events = Api::<Event>::namespaced(client.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .ok()?;
        events.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("PodsCannotBeCreated")
                && e.type_.as_deref() == Some("Warning")
        })
    })
    .await;
    let note = events.message.unwrap_or_default();
    assert!(note.contains("violates PodSecurity"), "{note}");
}
