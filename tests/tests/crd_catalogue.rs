//! The EventConsumer CRD on the test bed's real API server: it installs, every invalid object
//! of the catalogue (operator/testdata/invalid-eventconsumers.yaml) is rejected with its
//! expected message, the examples in deploy/examples apply cleanly with their defaults
//! filled in, and the scale subresource works.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::Status;
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice_operator::catalogue::{self, Layer};
use sluice_operator::crd::EventConsumer;
use sluice_tests::kube_env::{self, Namespace};

mod operator_common;
use operator_common::install_crd;

const FIELD_MANAGER: &str = "sluice-tests";

fn api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<EventConsumer>(&()),
    )
}

fn object(value: Value, name: &str) -> DynamicObject {
    let mut value = value;
    value["metadata"] = json!({"name": name});
    serde_json::from_value(value).expect("a catalogue object is a Kubernetes object")
}

/// Creates an object, retrying while the freshly established CRD is not yet served (404).
async fn create(
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match api.create(&PostParams::default(), obj).await {
            Err(kube::Error::Api(status)) if status.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

fn rejection(result: Result<DynamicObject, kube::Error>, case: &str) -> Status {
    match result {
        Ok(_) => panic!("{case}: the API server accepted it"),
        Err(kube::Error::Api(response)) => *response,
        Err(e) => panic!("{case}: expected a rejection, got a client error: {e}"),
    }
}

#[tokio::test]
async fn api_server_rejects_every_invalid_event_consumer_with_its_message() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "crd-catalogue").await;
    let api = api(&client, &ns.name);
    let catalogue = catalogue::load();
    assert!(catalogue.cases.len() >= 25);

    // The base every case varies is itself valid.
    create(&api, &object(catalogue.base.clone(), "base"))
        .await
        .expect("the catalogue's base object is valid");

    let mut failures = vec![];
    let (mut openapi, mut cel) = (0, 0);
    for case in &catalogue.cases {
        let name = format!("c-{}", case.name);
        let created = object(case.created(&catalogue.base), &name);
        let response = match case.updated(&catalogue.base) {
            None => rejection(create(&api, &created).await, &case.name),
            Some(updated) => {
                let stored = create(&api, &created).await.unwrap_or_else(|e| {
                    panic!(
                        "{}: the create before the update must succeed: {e}",
                        case.name
                    )
                });
                let mut updated = object(updated, &name);
                updated.metadata.resource_version = stored.metadata.resource_version.clone();
                rejection(
                    api.replace(&name, &PostParams::default(), &updated).await,
                    &case.name,
                )
            }
        };
        let missing: Vec<&String> = case
            .expect
            .iter()
            .filter(|e| !response.message.contains(e.as_str()))
            .collect();
        if response.code != 422 || !missing.is_empty() {
            failures.push(format!(
                "{}: code {} (want 422), missing {:?} in: {}",
                case.name, response.code, missing, response.message
            ));
        }
        match case.layer {
            Layer::Openapi => openapi += 1,
            Layer::Cel => cel += 1,
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        catalogue.cases.len(),
        failures.join("\n")
    );
    assert!(
        openapi >= 10 && cel >= 20,
        "covers both layers: {openapi} OpenAPI and {cel} CEL cases"
    );
}

#[tokio::test]
async fn examples_apply_cleanly_and_get_their_defaults() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "crd-examples").await;
    let api = api(&client, &ns.name);

    let dir = sluice_tests::repo_root().join("deploy/examples");
    let mut applied = 0;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            let obj: DynamicObject = serde_json::from_value(value).unwrap();
            let name = obj.metadata.name.clone().unwrap();
            let stored = api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Apply(&obj),
                )
                .await
                .unwrap_or_else(|e| panic!("{} does not apply: {e}", path.display()));
            // The stored object is a valid typed EventConsumer with every default filled in.
            let typed: EventConsumer = serde_json::from_value(
                serde_json::to_value(&stored).unwrap(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{}: stored object does not deserialize: {e}",
                    path.display()
                )
            });
            let spec = &stored.data["spec"];
            for defaulted in ["timeout", "ordering", "maxInFlight", "retry"] {
                assert!(
                    !spec["delivery"][defaulted].is_null(),
                    "{}: delivery.{defaulted} defaulted",
                    path.display()
                );
            }
            assert!(
                !spec["kafka"]["startFrom"].is_null(),
                "{}: kafka.startFrom defaulted",
                path.display()
            );
            assert!(
                typed.spec.replicas >= 1,
                "{}: replicas defaulted",
                path.display()
            );
            applied += 1;
        }
    }
    assert!(applied >= 4, "only {applied} examples");
}

#[tokio::test]
async fn defaults_are_applied_by_the_api_server() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "crd-defaults").await;
    let api = api(&client, &ns.name);
    let catalogue = catalogue::load();
    let stored = create(&api, &object(catalogue.base.clone(), "defaults"))
        .await
        .unwrap();
    let spec = &stored.data["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["kafka"]["startFrom"], "earliest");
    assert_eq!(spec["delivery"]["timeout"], "10s");
    assert_eq!(spec["delivery"]["ordering"], "partition");
    assert_eq!(spec["delivery"]["maxInFlight"], 64);
    assert_eq!(
        spec["delivery"]["retry"],
        json!({"maxAttempts": 5, "initialBackoff": "200ms", "maxBackoff": "30s"})
    );
}

#[tokio::test]
async fn group_id_may_stay_and_other_fields_may_change() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "crd-update").await;
    let api = api(&client, &ns.name);
    let mut base = catalogue::load().base;
    base["spec"]["kafka"]["groupId"] = json!("shop.inventory");
    create(&api, &object(base, "stable-group")).await.unwrap();
    let patch = json!({"spec": {"kafka": {"groupId": "shop.inventory", "topics": ["orders", "returns"]}, "replicas": 2}});
    let updated = api
        .patch(
            "stable-group",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("an update that keeps groupId is accepted");
    assert_eq!(
        updated.data["spec"]["kafka"]["topics"],
        json!(["orders", "returns"])
    );
}

#[tokio::test]
async fn scale_subresource_changes_replicas() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "crd-scale").await;
    let api = api(&client, &ns.name);
    create(&api, &object(catalogue::load().base, "scaled"))
        .await
        .unwrap();
    // What `kubectl scale ec/scaled --replicas=5` does.
    let patch = json!({"spec": {"replicas": 5}});
    let scale = api
        .patch_scale("scaled", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("scale subresource");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(5));
    let stored = api.get("scaled").await.unwrap();
    assert_eq!(stored.data["spec"]["replicas"], 5);
    // Out-of-range through the scale subresource is refused by the same schema.
    let too_many = json!({"spec": {"replicas": 5000}});
    let err = api
        .patch_scale("scaled", &PatchParams::default(), &Patch::Merge(&too_many))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.replicas"), "{err}");
}
