//! The start-up check that the EventConsumer CRD on the API server is not older than this
//! operator. An older CRD lacks fields the operator writes (status fields, new spec
//! settings): the API server would prune them silently. `sluice-operator run` refuses to
//! start against such a CRD and says which fields are missing and how to upgrade it.

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::{Api, Client, CustomResourceExt};

use crate::crd::EventConsumer;

/// The property paths (`spec.kafka.topics`, `status.effective.maxBufferedBytes`; `[]` for
/// array items) that `wanted` declares and `served` does not.
pub fn missing_fields(served: &JSONSchemaProps, wanted: &JSONSchemaProps) -> Vec<String> {
    let mut out = Vec::new();
    walk(served, wanted, "", &mut out);
    out
}

fn walk(served: &JSONSchemaProps, wanted: &JSONSchemaProps, path: &str, out: &mut Vec<String>) {
    if let Some(props) = &wanted.properties {
        let have = served.properties.as_ref();
        for (name, want) in props {
            let child = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            match have.and_then(|h| h.get(name)) {
                Some(got) => walk(got, want, &child, out),
                None => out.push(child),
            }
        }
    }
    if let (Some(JSONSchemaPropsOrArray::Schema(want)), Some(JSONSchemaPropsOrArray::Schema(got))) =
        (&wanted.items, &served.items)
    {
        walk(got, want, &format!("{path}[]"), out);
    }
}

/// The schema of `version` in `crd`.
fn schema<'a>(crd: &'a CustomResourceDefinition, version: &str) -> Option<&'a JSONSchemaProps> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version)?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()
}

/// What is wrong with the `served` CRD for this operator, if anything.
pub fn compare(served: &CustomResourceDefinition) -> Result<(), String> {
    let wanted = EventConsumer::crd();
    let version = &wanted.spec.versions[0].name;
    let fix = "upgrade the CRD: `helm upgrade` with crds.install=true (the default), or \
               `kubectl apply --server-side -f charts/sluice/files/eventconsumers.sluice.dev.yaml` \
               from this operator's chart version";
    let name = wanted.metadata.name.clone().unwrap_or_default();
    let Some(have) = schema(served, version) else {
        return Err(format!(
            "the CRD {name} on the API server does not serve version {version}, which this operator needs; {fix}"
        ));
    };
    let want = schema(&wanted, version).expect("the generated CRD has a schema");
    let missing = missing_fields(have, want);
    if missing.is_empty() {
        return Ok(());
    }
    let shown: BTreeSet<&str> = missing.iter().take(10).map(String::as_str).collect();
    Err(format!(
        "the CRD {name} on the API server is older than this operator: it lacks {} field(s) the operator uses ({}{}), which the API server would drop silently; {fix}",
        missing.len(),
        shown.into_iter().collect::<Vec<_>>().join(", "),
        if missing.len() > 10 { ", …" } else { "" }
    ))
}

/// Reads the CRD from the API server and compares it. A CRD that cannot be read for lack of
/// permission (RBAC without the chart's rule) is reported and not checked.
pub async fn ensure_current(client: &Client) -> anyhow::Result<()> {
    let name = EventConsumer::crd_name();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    match api.get_opt(name).await {
        Ok(Some(served)) => compare(&served).map_err(anyhow::Error::msg),
        Ok(None) => Err(anyhow::anyhow!(
            "the CRD {name} is not installed: install the chart with crds.install=true (the default), or `kubectl apply --server-side -f charts/sluice/files/eventconsumers.sluice.dev.yaml`"
        )),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            tracing::warn!(
                crd = name,
                "cannot read the CRD (forbidden): its version is not checked"
            );
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("cannot read the CRD {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn previous_crd() -> CustomResourceDefinition {
        serde_norway::from_str(include_str!(
            "../../tests/fixtures/chart-previous/crds/eventconsumers.sluice.dev.yaml"
        ))
        .expect("the previous chart's CRD parses")
    }

    #[test]
    fn the_current_crd_passes() {
        assert_eq!(compare(&EventConsumer::crd()), Ok(()));
    }

    #[test]
    fn the_previous_charts_crd_is_refused_naming_the_missing_fields() {
        let err = compare(&previous_crd()).expect_err("the previous CRD lacks fields");
        for needle in [
            "older than this operator",
            "status.effective.maxBufferedBytes",
            "status.topics",
            "helm upgrade",
            "charts/sluice/files/eventconsumers.sluice.dev.yaml",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
    }

    #[test]
    fn missing_fields_walks_nested_properties_and_array_items() {
        let want = EventConsumer::crd();
        let want = schema(&want, "v1alpha1").unwrap();
        let mut have = want.clone();
        // Drop one nested property and one property under an array's items.
        let spec = have.properties.as_mut().unwrap().get_mut("spec").unwrap();
        let kafka = spec.properties.as_mut().unwrap().get_mut("kafka").unwrap();
        kafka.properties.as_mut().unwrap().remove("topics");
        let status = have.properties.as_mut().unwrap().get_mut("status").unwrap();
        let conditions = status
            .properties
            .as_mut()
            .unwrap()
            .get_mut("conditions")
            .unwrap();
        let Some(JSONSchemaPropsOrArray::Schema(item)) = conditions.items.as_mut() else {
            panic!("conditions are an array of objects");
        };
        item.properties.as_mut().unwrap().remove("reason");
        assert_eq!(
            missing_fields(&have, want),
            vec![
                "spec.kafka.topics".to_owned(),
                "status.conditions[].reason".to_owned()
            ]
        );
        assert!(missing_fields(want, want).is_empty());
    }

    #[test]
    fn a_crd_without_the_version_is_refused() {
        let mut crd = EventConsumer::crd();
        crd.spec.versions[0].name = "v1beta9".into();
        let err = compare(&crd).unwrap_err();
        assert!(err.contains("does not serve version v1alpha1"), "{err}");
    }
}
