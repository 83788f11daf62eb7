//! Status: from what the reconcile found to `EventConsumerStatus`. Pure: the clock comes in
//! as an argument, so transition times are testable and never churn.
//!
//! Conditions follow the Kubernetes conventions: `Ready` (enough pods ready to consume),
//! `Progressing` (a rollout is under way), `Degraded` (the operator cannot realise the spec,
//! or the rollout is stuck). Reasons are CamelCase and static; messages say what is wrong and
//! what to do. A condition's `lastTransitionTime` moves only when its status flips.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::build::selector_string;
use crate::crd::EventConsumerStatus;
use crate::tuning::Tuning;

pub mod pods;
pub mod written;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the reconcile achieved.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every object was applied; `tuning` is what the sidecars now run with.
    Applied { tuning: Tuning },
    /// The spec (or what it references) cannot be realised; waits for a change.
    Blocked {
        reason: &'static str,
        message: String,
    },
}

/// Reason of `Ready` and `Degraded` when the cluster refuses to create the pods (the
/// Deployment's `ReplicaFailure`, e.g. Pod Security admission).
pub const PODS_CANNOT_BE_CREATED: &str = "PodsCannotBeCreated";

/// What the reconcile saw of the world.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub name: &'a str,
    pub generation: Option<i64>,
    /// `spec.replicas`.
    pub desired_replicas: i32,
    /// The Deployment as returned by the apply (or read back); `None` if there is none.
    pub deployment: Option<&'a Deployment>,
}

/// The new status. `old` supplies the transition times of unchanged conditions and, when the
/// outcome is `Blocked`, the last effective tuning (still what the running pods use).
pub fn compute(
    old: Option<&EventConsumerStatus>,
    seen: &Observed<'_>,
    outcome: &Outcome,
    now: &Time,
) -> EventConsumerStatus {
    let d = deployment_view(seen);
    let mut conditions = Vec::with_capacity(3);

    // Ready: about the pods, whatever the operator's own trouble.
    let ready = if seen.desired_replicas == 0 {
        cond(READY, true, "ScaledToZero", "spec.replicas is 0, so no pod consumes (committed offsets are kept); scale up with kubectl scale ec/NAME --replicas=N to consume".into())
    } else if d.exists && d.ready >= seen.desired_replicas {
        cond(
            READY,
            true,
            "ReplicasReady",
            format!(
                "{} of {} pods are ready: their sidecars joined the consumer group and their applications answer",
                d.ready, seen.desired_replicas
            ),
        )
    } else if let (false, Outcome::Blocked { reason, message }) = (d.exists, outcome) {
        cond(READY, false, reason, format!("no pods run: {message}"))
    } else if let Some(failure) = &d.replica_failure {
        cond(
            READY,
            false,
            PODS_CANNOT_BE_CREATED,
            format!(
                "{} of {} pods are ready; the cluster refuses to create the others ({failure})",
                d.ready, seen.desired_replicas
            ),
        )
    } else {
        cond(
            READY,
            false,
            "ReplicasNotReady",
            format!(
                "{} of {} pods are ready; a sidecar is ready once its application answers and it has joined the consumer group; see kubectl describe pods -l {} and the sluice container's logs",
                d.ready,
                seen.desired_replicas,
                selector_string(seen.name)
            ),
        )
    };
    conditions.push(ready);

    // Progressing: the Deployment still moving pods to the current template.
    let progressing = if !d.exists {
        cond(
            PROGRESSING,
            false,
            "NoDeployment",
            "the Deployment does not exist yet; see the Degraded condition".into(),
        )
    } else if d.stalled {
        cond(PROGRESSING, false, "RolloutStalled", "the rollout made no progress within the Deployment's progress deadline; see the Degraded condition".into())
    } else if !d.rolled_out(seen.desired_replicas) {
        cond(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{} of {} pods run the current template ({} in total); pods are replaced one at a time, each draining before it stops",
                d.updated, seen.desired_replicas, d.replicas
            ),
        )
    } else {
        cond(
            PROGRESSING,
            false,
            "RolloutComplete",
            format!(
                "all {} pods run the current template",
                seen.desired_replicas
            ),
        )
    };
    conditions.push(progressing);

    let degraded = match outcome {
        Outcome::Blocked { reason, message } => cond(DEGRADED, true, reason, message.clone()),
        Outcome::Applied { .. } if d.replica_failure.is_some() => cond(
            DEGRADED,
            true,
            PODS_CANNOT_BE_CREATED,
            format!(
                "the Deployment's pods cannot be created: {}; fix the pod template in spec.template (or the namespace's policy or quota) — kubectl describe rs -l {} shows the same",
                d.replica_failure.as_deref().unwrap_or_default(),
                selector_string(seen.name)
            ),
        ),
        Outcome::Applied { .. } if d.stalled => cond(
            DEGRADED,
            true,
            "RolloutStalled",
            format!(
                "the Deployment's rollout exceeded its progress deadline: new pods do not become ready; see kubectl describe pods -l {} (image pull, crash loop, Kafka or application readiness) and fix the spec or the cluster",
                selector_string(seen.name)
            ),
        ),
        Outcome::Applied { .. } => cond(
            DEGRADED,
            false,
            "AsExpected",
            "the operator applied the spec".into(),
        ),
    };
    conditions.push(degraded);

    for c in &mut conditions {
        c.observed_generation = seen.generation;
        let previous = old.and_then(|s| s.conditions.iter().find(|p| p.type_ == c.type_));
        c.last_transition_time = match previous {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
    }

    EventConsumerStatus {
        observed_generation: seen.generation,
        conditions,
        replicas: d.replicas,
        ready_replicas: d.ready,
        selector: Some(selector_string(seen.name)),
        // Carried over: the lag collector owns these fields (its own field manager, see
        // `crate::collector`); the reconciler never writes them.
        lag: old.and_then(|s| s.lag),
        // Set by the reconciler from the spec (`topics_column`).
        topics: old.and_then(|s| s.topics.clone()),
        lag_observed_time: old.and_then(|s| s.lag_observed_time.clone()),
        lag_stale: old.is_some_and(|s| s.lag_stale),
        effective: match outcome {
            Outcome::Applied { tuning } => Some(tuning.clone()),
            Outcome::Blocked { .. } => old.and_then(|s| s.effective.clone()),
        },
        // Set by the reconciler from the Deployment (`crate::pacing::sidecar_status`).
        sidecar_image: old.and_then(|s| s.sidecar_image.clone()),
        pending_sidecar_image: None,
    }
}

/// `status.topics`: the topics as one plain comma-separated string (`orders,payments`).
pub fn topics_column(topics: &[String]) -> String {
    topics.join(",")
}

/// A condition whose status flipped between two statuses (for events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// The conditions whose status or reason changed from `old` to `new`, in `new`'s order. A
/// condition that appears for the first time counts only when it is not the quiet default
/// (Ready=False while the first pods start, Progressing, Degraded=False).
pub fn transitions(
    old: Option<&EventConsumerStatus>,
    new: &EventConsumerStatus,
) -> Vec<Transition> {
    new.conditions
        .iter()
        .filter(
            |c| match old.and_then(|s| s.conditions.iter().find(|p| p.type_ == c.type_)) {
                Some(p) => p.status != c.status || p.reason != c.reason,
                None => c.type_ == DEGRADED && c.status == "True",
            },
        )
        .map(|c| Transition {
            type_: c.type_.clone(),
            status: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: None,
        last_transition_time: Time(Default::default()),
    }
}

struct DeploymentView {
    exists: bool,
    current: bool,
    replicas: i32,
    ready: i32,
    updated: i32,
    available: i32,
    stalled: bool,
    /// The Deployment's `ReplicaFailure` condition when true: its ReplicaSet cannot create
    /// pods (Pod Security admission, a quota, a missing service account). `reason: message`.
    replica_failure: Option<String>,
}

impl DeploymentView {
    fn rolled_out(&self, desired: i32) -> bool {
        self.current
            && self.updated >= desired
            && self.replicas == self.updated
            && self.available >= desired
    }
}

fn deployment_view(seen: &Observed<'_>) -> DeploymentView {
    let Some(dep) = seen.deployment else {
        return DeploymentView {
            exists: false,
            current: false,
            replicas: 0,
            ready: 0,
            updated: 0,
            available: 0,
            stalled: false,
            replica_failure: None,
        };
    };
    view_of(dep)
}

/// What the reconcile reads of a Deployment, as a hash: the Deployment watch passes a
/// Deployment on (and its EventConsumer is reconciled) only when this changes — its
/// metadata (generation, labels, annotations, deletion), its replicas, and the parts of its
/// status the EventConsumer's status and the rollout pacing read. The Deployment
/// controller's other status updates (a condition's reason or time moving while nothing the
/// EventConsumer shows changes) do not reconcile.
pub fn deployment_signature(dep: &Deployment) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    let m = &dep.metadata;
    (
        &m.generation,
        &m.labels,
        &m.annotations,
        m.deletion_timestamp.is_some(),
    )
        .hash(&mut h);
    dep.spec.as_ref().and_then(|s| s.replicas).hash(&mut h);
    let v = view_of(dep);
    (
        v.current,
        v.replicas,
        v.ready,
        v.updated,
        v.available,
        v.stalled,
        &v.replica_failure,
    )
        .hash(&mut h);
    dep.status
        .as_ref()
        .map(|s| (s.observed_generation, s.unavailable_replicas))
        .hash(&mut h);
    Some(h.finish())
}

/// Whether the Deployment's status describes its current spec: the Deployment controller
/// has observed its latest generation, or it was just created and not looked at yet
/// (generation 1, never observed). A new Deployment has no ReplicaSet and no pods, which is
/// what its first status will say; taking that as read saves every new EventConsumer a
/// second status write (and a `RolloutComplete` event) once the controller reports "0 pods"
/// a moment later. Should it report pods after all (a ReplicaSet it adopts), that status
/// change reconciles the EventConsumer again.
pub fn status_is_current(dep: &Deployment) -> bool {
    let observed = dep.status.as_ref().and_then(|s| s.observed_generation);
    match (dep.metadata.generation, observed) {
        (Some(g), Some(o)) => o >= g,
        (Some(1), None) => true,
        _ => false,
    }
}

fn view_of(dep: &Deployment) -> DeploymentView {
    let status = dep.status.clone().unwrap_or_default();
    let current = status_is_current(dep);
    let stalled = status.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let replica_failure = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("ReplicaFailure"),
                c.message.as_deref().unwrap_or("no message")
            )
        });
    DeploymentView {
        exists: true,
        current,
        replicas: status.replicas.unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        stalled,
        replica_failure,
    }
}

#[cfg(test)]
mod tests;
