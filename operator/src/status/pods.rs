//! What keeps an EventConsumer's pods from working, from their status: images that cannot be
//! pulled, containers that cannot start or keep exiting, pods that cannot be scheduled,
//! containers that run but do not become ready. Pure: the pods, the clock and what the
//! sidecars' `/readyz` said come in as arguments.
//!
//! A sidecar not ready for [`NOT_READY_AFTER`] is named in [`Summary::probe`]; the caller
//! reads its `/readyz` ([`readyz::Prober`]) and passes the answers back in, which turns the
//! generic [`SIDECAR_NOT_READY`] into the cause the sidecar gives: [`KAFKA_AUTH_FAILED`],
//! [`KAFKA_UNREACHABLE`], [`APPLICATION_UNREACHABLE`].
//!
//! The operator caches only the pods it labels (`sluice.dev/consumer`), trimmed by [`trim`]
//! to the few status fields read here, and reconciles their EventConsumer only when a pod's
//! [`signature`] — what [`summarize`] can conclude from it — changes.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;

use crate::build::SELECTOR_LABEL;
use crate::crd::{EventConsumerStatus, SIDECAR_CONTAINER_NAME};

use super::{DEGRADED, READY};

/// A container's image cannot be pulled (`ErrImagePull`, `ImagePullBackOff`,
/// `InvalidImageName`, `ErrImageNeverPull`).
pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
/// The kubelet cannot create or start a container (`CreateContainerConfigError` — e.g. a
/// missing ConfigMap or Secret key —, `CreateContainerError`, `RunContainerError`).
pub const CONTAINER_CANNOT_START: &str = "ContainerCannotStart";
/// A container of the user's pod template keeps exiting (`CrashLoopBackOff`).
pub const APPLICATION_CRASH_LOOPING: &str = "ApplicationCrashLooping";
/// The sluice sidecar keeps exiting (`CrashLoopBackOff`), e.g. a fatal Kafka error.
pub const SIDECAR_CRASH_LOOPING: &str = "SidecarCrashLooping";
/// The scheduler finds no node for a pod (`PodScheduled=False Unschedulable`).
pub const PODS_UNSCHEDULABLE: &str = "PodsUnschedulable";
/// An application container runs but its own readiness probe keeps failing.
pub const APPLICATION_NOT_READY: &str = "ApplicationNotReady";
/// The sidecar runs but is not ready because Kafka refuses its credentials or permissions
/// (its `/readyz` says `kafka_auth`).
pub const KAFKA_AUTH_FAILED: &str = "KafkaAuthFailed";
/// The sidecar runs but is not ready because no Kafka broker is reachable (its `/readyz`
/// says `kafka_unreachable`).
pub const KAFKA_UNREACHABLE: &str = "KafkaUnreachable";
/// The sidecar runs but is not ready because its application does not answer on the
/// delivery (or readiness) URL (its `/readyz` says `app_unreachable`).
pub const APPLICATION_UNREACHABLE: &str = "ApplicationUnreachable";
/// The sidecar runs but is not ready for another reason (still joining the consumer group,
/// draining), or its `/readyz` could not be read.
pub const SIDECAR_NOT_READY: &str = "SidecarNotReady";

/// Every reason [`summarize`] can give, most severe first.
pub const REASONS: [&str; 10] = [
    IMAGE_PULL_FAILED,
    CONTAINER_CANNOT_START,
    SIDECAR_CRASH_LOOPING,
    APPLICATION_CRASH_LOOPING,
    PODS_UNSCHEDULABLE,
    APPLICATION_NOT_READY,
    KAFKA_AUTH_FAILED,
    KAFKA_UNREACHABLE,
    APPLICATION_UNREACHABLE,
    SIDECAR_NOT_READY,
];

/// How long a running container may stay not ready before it counts as a problem (joining
/// the consumer group and the application's start-up take a while).
pub const NOT_READY_AFTER: Duration = Duration::from_secs(120);
/// How long a container that was restarted after a failure still counts as crash looping
/// while it runs (so a container that exits at once does not flip the status back and forth
/// between its restarts).
pub const RESTARTED_WITHIN: Duration = Duration::from_secs(90);

/// The most severe problem among the pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodProblem {
    /// One of [`REASONS`].
    pub reason: &'static str,
    /// What is wrong, with the pod and container, the kubelet's message, and where to look.
    pub message: String,
}

/// What [`summarize`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub problem: Option<PodProblem>,
    /// When to look again: a container that is not ready (or restarted) but not yet for long
    /// enough to count.
    pub recheck: Option<Duration>,
    /// The pods (by name) whose sidecar has been running but not ready for
    /// [`NOT_READY_AFTER`]: whose `/readyz` says why. Empty for healthy pods.
    pub probe: Vec<String>,
}

/// What a sidecar's `/readyz` answered, or why it could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readyz {
    /// `503`: the `Sluice-Not-Ready` header's reason (empty from a sidecar that sends none)
    /// and the body's text.
    NotReady { reason: String, detail: String },
    /// `200`: ready by now (the kubelet's view lags).
    Ready,
    /// No answer that could be used: why.
    Unread(String),
}

/// The `/readyz` answers per pod name, for [`summarize`].
pub type Probes = BTreeMap<String, Readyz>;

/// Longest sidecar detail put into a message.
const DETAIL_MAX: usize = 400;

/// The sidecar's text on one line, bounded, without librdkafka's timing suffixes
/// (`(after 12ms in state CONNECT, 3 identical error(s) suppressed)`), so the message does
/// not change on every read.
fn clean_detail(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("(after ") {
        out.push_str(&rest[..i]);
        // To the matching parenthesis: the suffix may hold some, as in
        // `(after 9ms in state UP, 1 identical error(s) suppressed)`.
        let mut depth = 0usize;
        let end = rest[i..].char_indices().find_map(|(j, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            (depth == 0).then_some(i + j + 1)
        });
        rest = end.map_or("", |e| &rest[e..]);
    }
    out.push_str(rest);
    let mut line: String = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > DETAIL_MAX {
        let mut cut = DETAIL_MAX - 3;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

/// One container's finding.
struct Finding {
    reason: &'static str,
    /// Without the pod count.
    message: String,
    /// The pod's sidecar has been not ready for long: its `/readyz` is wanted.
    probe: bool,
}

fn severity(reason: &str) -> usize {
    REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REASONS.len())
}

/// The most severe problem of the pods (ties: the first pod by name, then the first container
/// by name), with how many pods share its reason. Terminating pods are ignored. `probes`
/// holds what the sidecars named in an earlier summary's [`Summary::probe`] answered on
/// `/readyz`; a sidecar without an answer there counts as [`SIDECAR_NOT_READY`].
pub fn summarize<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    now: Timestamp,
    probes: &Probes,
) -> Summary {
    let mut pods: Vec<&Pod> = pods
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut recheck: Option<Duration> = None;
    let mut probe: Vec<String> = Vec::new();
    let mut findings: Vec<(String, Finding)> = Vec::new();
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let answer = probes.get(&name);
        if let Some(f) = pod_finding(pod, &name, now, answer, &mut recheck) {
            if f.probe {
                probe.push(name.clone());
            }
            findings.push((name, f));
        }
    }
    let problem = findings
        .iter()
        .min_by_key(|(_, f)| severity(f.reason))
        .map(|(_, first)| {
            let same = findings
                .iter()
                .filter(|(_, f)| f.reason == first.reason)
                .count();
            let message = match same {
                1 => first.message.clone(),
                n => format!(
                    "{} (and {} more pod{} with the same problem)",
                    first.message,
                    n - 1,
                    if n == 2 { "" } else { "s" }
                ),
            };
            PodProblem {
                reason: first.reason,
                message,
            }
        });
    Summary {
        problem,
        recheck,
        probe,
    }
}

fn pod_finding(
    pod: &Pod,
    name: &str,
    now: Timestamp,
    answer: Option<&Readyz>,
    recheck: &mut Option<Duration>,
) -> Option<Finding> {
    let status = pod.status.as_ref()?;
    let mut containers: Vec<(&ContainerStatus, bool)> = Vec::new();
    containers.extend(
        status
            .init_container_statuses
            .iter()
            .flatten()
            .map(|c| (c, true)),
    );
    containers.extend(
        status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| (c, false)),
    );
    containers.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut found: Option<Finding> = None;
    // Whether the sidecar's /readyz is wanted, even when another finding is more severe
    // (it is read only for sidecars not ready for long, and may be the one that stays).
    let mut probe = false;
    let mut keep = |f: Finding| {
        probe |= f.probe;
        if found
            .as_ref()
            .is_none_or(|old| severity(f.reason) < severity(old.reason))
        {
            found = Some(f);
        }
    };
    for (c, init) in containers {
        if let Some(f) = container_finding(c, init, name, now, answer, recheck) {
            keep(f);
        }
    }
    if let Some(c) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    }) {
        keep(Finding {
            reason: PODS_UNSCHEDULABLE,
            message: format!(
                "pod {name} cannot be scheduled: {}; free or add nodes, or lower the pod template's resource requests or constraints",
                c.message.as_deref().unwrap_or("no node fits")
            ),
            probe: false,
        });
    }
    found.map(|f| Finding { probe, ..f })
}

fn is_sidecar(c: &ContainerStatus) -> bool {
    c.name == SIDECAR_CONTAINER_NAME
}

fn since(
    t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> Option<Duration> {
    let t = t?;
    Some(now.duration_since(t.0).try_into().unwrap_or(Duration::ZERO))
}

fn earliest(recheck: &mut Option<Duration>, after: Duration) {
    let after = after.max(Duration::from_secs(1));
    *recheck = Some(recheck.map_or(after, |r| r.min(after)));
}

/// `exit code 1 (Error): message` from a terminated state.
fn exit_text(t: &k8s_openapi::api::core::v1::ContainerStateTerminated) -> String {
    let mut s = format!("exit code {}", t.exit_code);
    if let Some(r) = t.reason.as_deref().filter(|r| !r.is_empty()) {
        s.push_str(&format!(" ({r})"));
    }
    if let Some(m) = t
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        s.push_str(&format!(": {m}"));
    }
    s
}

fn container_finding(
    c: &ContainerStatus,
    init: bool,
    pod: &str,
    now: Timestamp,
    answer: Option<&Readyz>,
    recheck: &mut Option<Duration>,
) -> Option<Finding> {
    let who = if is_sidecar(c) {
        format!("the sluice sidecar of pod {pod}")
    } else {
        format!("container {} of pod {pod}", c.name)
    };
    let crash_reason = if is_sidecar(c) {
        SIDECAR_CRASH_LOOPING
    } else {
        APPLICATION_CRASH_LOOPING
    };
    let logs = format!("kubectl logs {pod} -c {} --previous", c.name);
    let state = c.state.as_ref();
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        let reason = w.reason.as_deref().unwrap_or_default();
        let message = w
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty());
        return match reason {
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                Some(Finding {
                    reason: IMAGE_PULL_FAILED,
                    message: format!(
                        "{who} cannot pull image {:?} ({reason}{}); check the image name and tag, the registry and the pod's imagePullSecrets",
                        c.image,
                        message.map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                    probe: false,
                })
            }
            "CreateContainerConfigError"
            | "CreateContainerError"
            | "RunContainerError"
            | "PreStartHookError"
            | "PostStartHookError" => Some(Finding {
                reason: CONTAINER_CANNOT_START,
                message: format!(
                    "{who} cannot start ({reason}{}); see kubectl describe pod {pod}",
                    message.map(|m| format!(": {m}")).unwrap_or_default()
                ),
                probe: false,
            }),
            "CrashLoopBackOff" => Some(Finding {
                reason: crash_reason,
                message: format!(
                    "{who} keeps exiting (last: {}); {logs} shows why",
                    last.map(exit_text)
                        .unwrap_or_else(|| "no exit recorded".into())
                ),
                probe: false,
            }),
            // ContainerCreating, PodInitializing and the like: on its way.
            _ => None,
        };
    }
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        // A finished init container is done; any other container of a Deployment's pod is
        // restarted, so its end is a failure until it runs again.
        if init && t.exit_code == 0 {
            return None;
        }
        return Some(Finding {
            reason: crash_reason,
            message: format!("{who} exited ({}); {logs} shows why", exit_text(t)),
            probe: false,
        });
    }
    let running = state.and_then(|s| s.running.as_ref())?;
    let up = since(running.started_at.as_ref(), now).unwrap_or(Duration::ZERO);
    // Ready or not: a container without a readiness probe is ready the moment it runs, so
    // one that exits at once shows as running and ready between its restarts (this flipped
    // the status back in CI). Looked at only while some pod is not ready, so a container
    // that crashed once and is fine again costs nothing.
    if let Some(t) = last.filter(|t| t.exit_code != 0)
        && up < RESTARTED_WITHIN
    {
        earliest(recheck, RESTARTED_WITHIN - up);
        return Some(Finding {
            reason: crash_reason,
            message: format!(
                "{who} keeps exiting (last: {}); {logs} shows why",
                exit_text(t)
            ),
            probe: false,
        });
    }
    if c.ready {
        return None;
    }
    if up < NOT_READY_AFTER {
        earliest(recheck, NOT_READY_AFTER - up);
        return None;
    }
    // Static (or the sidecar's own words), so the message does not change while the problem
    // lasts.
    let minutes = NOT_READY_AFTER.as_secs() / 60;
    let logs = format!("kubectl logs {pod} -c {}", c.name);
    if !is_sidecar(c) {
        return Some(Finding {
            reason: APPLICATION_NOT_READY,
            message: format!(
                "{who} has not become ready in {minutes} min of running: its readiness probe fails; see kubectl describe pod {pod} and {logs}"
            ),
            probe: false,
        });
    }
    Some(sidecar_not_ready(&who, minutes, &logs, answer))
}

/// A sidecar running but not ready for [`NOT_READY_AFTER`], explained by its `/readyz`.
fn sidecar_not_ready(who: &str, minutes: u64, logs: &str, answer: Option<&Readyz>) -> Finding {
    let generic = |why: &str| Finding {
        reason: SIDECAR_NOT_READY,
        message: format!(
            "{who} has not become ready in {minutes} min of running{why}: it is ready once its application answers on the delivery URL and it has joined the consumer group; its /readyz and sluice_not_ready{{reason}} metric on the admin port say which (app_unreachable, kafka_unreachable, kafka_auth, joining), as do {logs}"
        ),
        probe: true,
    };
    let (reason, detail) = match answer {
        None => return generic(""),
        Some(Readyz::Unread(e)) => {
            return generic(&format!(
                " (the operator could not read its /readyz: {})",
                clean_detail(e)
            ));
        }
        Some(Readyz::Ready) => {
            return generic(" (its /readyz answers ready by now)");
        }
        Some(Readyz::NotReady { reason, detail }) => (reason.as_str(), clean_detail(detail)),
    };
    let (reason, message) = match reason {
        "kafka_auth" => (
            KAFKA_AUTH_FAILED,
            format!(
                "{who} is refused by Kafka: {detail}; check the credentials Secret, spec.kafka's SASL mechanism and TLS settings, and the user's ACLs for the group and topics; see {logs}"
            ),
        ),
        "kafka_unreachable" => (
            KAFKA_UNREACHABLE,
            format!(
                "{who} cannot reach Kafka: {detail}; check spec.kafka.bootstrapServers, that the brokers run, and that the pod may connect to them (network policies, DNS); see {logs}"
            ),
        ),
        "app_unreachable" => (
            APPLICATION_UNREACHABLE,
            format!(
                "{who} gets no answer from its application ({detail}): the application must answer on spec.delivery.url (or readinessUrl when set); see the application's logs and {logs}"
            ),
        ),
        _ => (
            SIDECAR_NOT_READY,
            format!(
                "{who} has not become ready in {minutes} min of running: its /readyz says: {detail}; see {logs}"
            ),
        ),
    };
    Finding {
        reason,
        message,
        probe: true,
    }
}

/// What [`summarize`] reads of a pod, as a hash: the pod watch passes a pod on (and its
/// EventConsumer is reconciled) only when this changes. Restart counts and times of
/// termination are left out, so a crash loop's repetitions do not reconcile.
pub fn signature(pod: &Pod) -> Option<u64> {
    let mut h = DefaultHasher::new();
    pod.metadata.deletion_timestamp.is_some().hash(&mut h);
    let Some(status) = &pod.status else {
        return Some(h.finish());
    };
    for c in status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
    {
        c.name.hash(&mut h);
        c.ready.hash(&mut h);
        let state = c.state.as_ref();
        if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            (1u8, &w.reason, &w.message).hash(&mut h);
        }
        if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
            (2u8, t.exit_code, &t.reason, &t.message).hash(&mut h);
        }
        if let Some(r) = state.and_then(|s| s.running.as_ref()) {
            (3u8, r.started_at.as_ref().map(|t| t.0.as_second())).hash(&mut h);
        }
        if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            (4u8, t.exit_code, &t.reason, &t.message).hash(&mut h);
        }
    }
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" {
            (&c.status, &c.reason, &c.message).hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Drops what [`summarize`] and the mapping to the EventConsumer do not read, so the cache of
/// pods stays small: the spec, annotations, managed fields, other labels, the host's and the
/// extra pod IPs, and the container statuses' image IDs, resources and mounts. The pod IP
/// stays: the sidecar's `/readyz` is read there when it stays not ready.
pub fn trim(pod: &mut Pod) {
    pod.spec = None;
    let m = &mut pod.metadata;
    m.annotations = None;
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    if let Some(labels) = &mut m.labels {
        labels.retain(|k, _| k == SELECTOR_LABEL);
    }
    if let Some(s) = &mut pod.status {
        let conditions = s.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "PodScheduled")
                .collect()
        });
        let keep = |cs: Option<Vec<ContainerStatus>>| {
            cs.map(|cs| {
                cs.into_iter()
                    .map(|c| ContainerStatus {
                        name: c.name,
                        image: c.image,
                        ready: c.ready,
                        started: c.started,
                        restart_count: c.restart_count,
                        state: c.state,
                        last_state: c.last_state,
                        ..Default::default()
                    })
                    .collect()
            })
        };
        *s = k8s_openapi::api::core::v1::PodStatus {
            phase: s.phase.take(),
            pod_ip: s.pod_ip.take(),
            conditions,
            init_container_statuses: keep(s.init_container_statuses.take()),
            container_statuses: keep(s.container_statuses.take()),
            ..Default::default()
        };
    }
}

/// The EventConsumer a cached pod belongs to: its `sluice.dev/consumer` label.
pub fn owner(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SELECTOR_LABEL))
        .map(String::as_str)
}

/// Puts a pod problem into the status: `Ready`, when it is false only because pods are not
/// ready (`ReplicasNotReady`), gets the problem's reason and message; `Degraded`, unless it
/// already reports something the operator found (a spec or the cluster refusing the pods),
/// becomes true with them. A transition time moves only when the status flips.
pub fn explain(
    new: &mut EventConsumerStatus,
    old: Option<&EventConsumerStatus>,
    problem: &PodProblem,
    desired_replicas: i32,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) {
    let previous: BTreeMap<&str, &Condition> = old
        .map(|s| s.conditions.iter().map(|c| (c.type_.as_str(), c)).collect())
        .unwrap_or_default();
    for c in &mut new.conditions {
        match (c.type_.as_str(), c.status.as_str(), c.reason.as_str()) {
            (READY, "False", "ReplicasNotReady") => {
                c.reason = problem.reason.to_owned();
                c.message = format!(
                    "{} of {} pods are ready: {}",
                    new.ready_replicas, desired_replicas, problem.message
                );
            }
            (DEGRADED, _, "AsExpected" | "RolloutStalled") => {
                c.status = "True".into();
                c.reason = problem.reason.to_owned();
                c.message = format!("the pods do not work: {}", problem.message);
                c.last_transition_time = match previous.get(DEGRADED) {
                    Some(p) if p.status == "True" => p.last_transition_time.clone(),
                    _ => now.clone(),
                };
            }
            _ => {}
        }
    }
}

pub mod readyz;

#[cfg(test)]
mod tests;
