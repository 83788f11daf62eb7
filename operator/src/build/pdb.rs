//! The PodDisruptionBudget: one voluntary disruption (drain, eviction) at a time, so a node
//! drain moves one group member at a time, each leaving the group cleanly.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Input, child_meta, selector_labels};

/// The PodDisruptionBudget of an EventConsumer (same name as its Deployment).
pub fn pod_disruption_budget(input: &Input<'_>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(input, input.name.to_owned()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(input.name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}
