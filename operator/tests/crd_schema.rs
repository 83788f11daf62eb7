//! The generated CRD: names, subresources, printer columns, documentation, and the CEL rules
//! evaluated client-side against the catalogue of invalid objects and the shipped examples.

use std::path::PathBuf;

use kube::CustomResourceExt;
use kube::core::cel::{ErrorKind, Validator};
use serde_json::Value;
use sluice_operator::catalogue::{self, Layer};
use sluice_operator::crd::EventConsumer;

fn schema() -> Value {
    let crd = EventConsumer::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn examples() -> Vec<(PathBuf, Value)> {
    // At run time: CI may reuse a binary built in an earlier clone of the same sources.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../deploy/examples");
    let mut out = vec![];
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value: Value = serde::Deserialize::deserialize(doc).unwrap();
                if value["kind"] == "EventConsumer" {
                    out.push((path.clone(), value));
                }
            }
        }
    }
    assert!(
        out.len() >= 4,
        "deploy/examples holds an EventConsumer per feature, found {}",
        out.len()
    );
    out
}

#[test]
fn names_scope_and_subresources() {
    let crd = serde_json::to_value(EventConsumer::crd()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], "eventconsumers.sluice.dev");
    assert_eq!(spec["group"], "sluice.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "EventConsumer");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["ec"]));
    assert_eq!(spec["names"]["categories"], serde_json::json!(["sluice"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    assert_eq!(
        version["subresources"]["scale"],
        serde_json::json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"
        })
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Replicas",
            "Available",
            "Lag",
            "Topics",
            "Group",
            "Reason",
            "Age"
        ]
    );
}

/// Every field a user writes outside the embedded Kubernetes types has a description, so
/// `kubectl explain` documents it.
#[test]
fn every_sluice_field_is_documented() {
    fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
        if node
            .get("description")
            .and_then(Value::as_str)
            .is_none_or(|d| d.trim().len() < 10)
        {
            missing.push(path.to_string());
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let child_path = format!("{path}.{name}");
                // Embedded upstream types: documented upstream, descriptions stripped for size.
                if child_path == "spec.template"
                    || child_path == "spec.sidecar.resources"
                    || child_path == "status.conditions"
                {
                    if child.get("description").is_none() {
                        missing.push(child_path);
                    }
                    continue;
                }
                walk(&child_path, child, missing);
            }
        }
        if let Some(items) = node.get("items")
            && items.get("properties").is_some()
        {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let schema = schema();
    let mut missing = vec![];
    walk("spec", &schema["properties"]["spec"], &mut missing);
    walk("status", &schema["properties"]["status"], &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn lists_iterated_by_cel_rules_are_bounded() {
    let schema = schema();
    let pod =
        &schema["properties"]["spec"]["properties"]["template"]["properties"]["spec"]["properties"];
    for list in ["containers", "initContainers"] {
        assert!(pod[list]["maxItems"].is_u64(), "{list} has maxItems");
        assert!(
            pod[list]["items"]["properties"]["ports"]["maxItems"].is_u64(),
            "{list}[].ports has maxItems"
        );
    }
    let kafka = &schema["properties"]["spec"]["properties"]["kafka"]["properties"];
    assert_eq!(kafka["topics"]["maxItems"], 64);
    assert_eq!(kafka["topics"]["x-kubernetes-list-type"], "set");
    assert_eq!(kafka["properties"]["maxProperties"], 64);
}

fn cel_errors(object: &Value, old: Option<&Value>) -> Result<(), String> {
    Validator::new()
        .validate(&schema(), object, old)
        .map_err(|errors| {
            errors
                .into_vec()
                .into_iter()
                .map(|e| {
                    assert!(
                        matches!(e.kind, ErrorKind::ValidationFailure),
                        "rule `{}` could not be evaluated: {} ({:?})",
                        e.rule,
                        e.message,
                        e.kind
                    );
                    format!("{}: {}", e.field_path, e.message)
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
}

#[test]
fn base_object_passes_every_rule() {
    let catalogue = catalogue::load();
    cel_errors(&catalogue.base, None).unwrap();
    let typed: EventConsumer = serde_json::from_value(catalogue.base.clone()).unwrap();
    assert_eq!(typed.spec.kafka.topics, ["orders"]);
}

#[test]
fn cel_cases_of_the_catalogue_are_rejected_with_their_message() {
    let catalogue = catalogue::load();
    let mut checked = 0;
    for case in catalogue.cases.iter().filter(|c| c.layer == Layer::Cel) {
        let created = case.created(&catalogue.base);
        let result = match case.updated(&catalogue.base) {
            Some(updated) => {
                cel_errors(&created, None)
                    .unwrap_or_else(|e| panic!("{}: the create must pass: {e}", case.name));
                cel_errors(&updated, Some(&created))
            }
            None => cel_errors(&created, None),
        };
        let message = result
            .err()
            .unwrap_or_else(|| panic!("{}: accepted", case.name));
        // Field paths are formatted by the API server; here only the rules' messages count.
        for expected in case
            .expect
            .iter()
            .filter(|e| !e.starts_with("spec.") || e.contains(' '))
        {
            assert!(
                message.contains(expected.as_str()),
                "{}: `{expected}` not in:\n{message}",
                case.name
            );
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} CEL cases");
}

#[test]
fn examples_pass_every_rule_and_deserialize() {
    for (path, example) in examples() {
        cel_errors(&example, None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let typed: EventConsumer = serde_json::from_value(example.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Round trip: what the operator writes back is what the user wrote.
        let mut again = serde_json::to_value(&typed).unwrap();
        again.as_object_mut().unwrap().remove("status");
        let mut original = example.clone();
        original["metadata"] = again["metadata"].clone();
        let typed_again: EventConsumer = serde_json::from_value(again).unwrap();
        assert_eq!(typed_again, typed, "{}", path.display());
    }
}
