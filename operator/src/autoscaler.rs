//! HorizontalPodAutoscalers aimed at an EventConsumer's Deployment instead of at the
//! EventConsumer. The operator owns the Deployment's replicas (it applies `spec.replicas`), so
//! such an autoscaler and the operator undo each other's changes; the EventConsumer has a
//! scale subresource an autoscaler can target instead. The operator says so with a Warning
//! event on the EventConsumer, once per autoscaler and autoscaler generation.

use std::collections::HashSet;
use std::sync::Mutex;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::ResourceExt;

use crate::crd::{GROUP, VERSION};

/// The Warning event's reason.
pub const REASON: &str = "AutoscalerTargetsDeployment";

/// The Deployment an autoscaler scales, if it scales a Deployment (`apps/…`, or no API
/// version given). Pure.
pub fn target_deployment(hpa: &HorizontalPodAutoscaler) -> Option<&str> {
    let r = &hpa.spec.as_ref()?.scale_target_ref;
    let apps = r
        .api_version
        .as_deref()
        .is_none_or(|v| v.starts_with("apps/") || v == "extensions/v1beta1");
    (r.kind == "Deployment" && apps).then_some(r.name.as_str())
}

/// The event's message: what is wrong and what to target instead. Pure.
pub fn message(hpa: &str, ec: &str) -> String {
    format!(
        "HorizontalPodAutoscaler {hpa} targets the Deployment {ec}, which this EventConsumer owns: the operator sets the Deployment's replicas to the EventConsumer's spec.replicas, so the autoscaler's changes are undone and the pod count flaps. Target the EventConsumer instead (it has a scale subresource): scaleTargetRef {{apiVersion: {GROUP}/{VERSION}, kind: EventConsumer, name: {ec}}}"
    )
}

/// The autoscalers already warned about: (namespace, name, uid, generation).
#[derive(Debug, Default)]
pub struct Warned {
    seen: Mutex<HashSet<(String, String, String, i64)>>,
}

impl Warned {
    /// True the first time for this autoscaler at this generation.
    pub fn first(&self, hpa: &HorizontalPodAutoscaler) -> bool {
        let key = (
            hpa.namespace().unwrap_or_default(),
            hpa.name_any(),
            hpa.uid().unwrap_or_default(),
            hpa.metadata.generation.unwrap_or(0),
        );
        let mut seen = self.seen.lock().expect("not poisoned");
        if seen.contains(&key) {
            return false;
        }
        // A newer generation replaces the record of the older one.
        seen.retain(|(ns, n, uid, _)| !(ns == &key.0 && n == &key.1 && uid == &key.2));
        seen.insert(key)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::autoscaling::v2::{
        CrossVersionObjectReference, HorizontalPodAutoscalerSpec,
    };
    use kube::api::ObjectMeta;

    use super::*;

    fn hpa(
        name: &str,
        gen_: i64,
        api: Option<&str>,
        kind: &str,
        target: &str,
    ) -> HorizontalPodAutoscaler {
        HorizontalPodAutoscaler {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                generation: Some(gen_),
                ..Default::default()
            },
            spec: Some(HorizontalPodAutoscalerSpec {
                max_replicas: 5,
                scale_target_ref: CrossVersionObjectReference {
                    api_version: api.map(str::to_owned),
                    kind: kind.into(),
                    name: target.into(),
                },
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn only_deployment_targets_count() {
        assert_eq!(
            target_deployment(&hpa("h", 1, Some("apps/v1"), "Deployment", "orders")),
            Some("orders")
        );
        assert_eq!(
            target_deployment(&hpa("h", 1, None, "Deployment", "orders")),
            Some("orders")
        );
        assert_eq!(
            target_deployment(&hpa(
                "h",
                1,
                Some("sluice.dev/v1alpha1"),
                "EventConsumer",
                "orders"
            )),
            None,
            "the right target"
        );
        assert_eq!(
            target_deployment(&hpa("h", 1, Some("apps/v1"), "StatefulSet", "orders")),
            None
        );
        assert_eq!(
            target_deployment(&hpa("h", 1, Some("example.com/v1"), "Deployment", "orders")),
            None,
            "another group's Deployment kind"
        );
        assert_eq!(target_deployment(&HorizontalPodAutoscaler::default()), None);
    }

    #[test]
    fn the_message_names_both_and_the_target_to_use() {
        let m = message("orders-hpa", "orders");
        assert!(
            m.contains("orders-hpa") && m.contains("Deployment orders"),
            "{m}"
        );
        assert!(
            m.contains("apiVersion: sluice.dev/v1alpha1, kind: EventConsumer, name: orders"),
            "{m}"
        );
    }

    #[test]
    fn each_autoscaler_generation_is_warned_once() {
        let w = Warned::default();
        let a1 = hpa("a", 1, None, "Deployment", "x");
        assert!(w.first(&a1));
        assert!(!w.first(&a1));
        assert!(
            w.first(&hpa("b", 1, None, "Deployment", "x")),
            "another autoscaler"
        );
        let a2 = hpa("a", 2, None, "Deployment", "y");
        assert!(w.first(&a2), "changed since");
        assert!(!w.first(&a2));
        assert_eq!(
            w.seen.lock().unwrap().len(),
            2,
            "the old generation's record is replaced"
        );
    }
}
