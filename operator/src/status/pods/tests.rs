use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::{Value, json};

use super::*;
use crate::status::{Observed, Outcome, compute};

const T0: i64 = 1_700_000_000;

fn now(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

fn at(secs: i64) -> String {
    now(secs).to_string()
}

fn pod(name: &str, init: Vec<Value>, containers: Vec<Value>) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {SELECTOR_LABEL: "ec", "app": "x"},
            "annotations": {"a": "b"}, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u"}]},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9", "initContainerStatuses": init, "containerStatuses": containers,
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]}
    }))
    .unwrap()
}

fn waiting(name: &str, reason: &str, message: &str) -> Value {
    json!({"name": name, "image": format!("{name}:1"), "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}}})
}

fn running(name: &str, ready: bool, started_secs: i64) -> Value {
    json!({"name": name, "image": format!("{name}:1"), "imageID": "sha", "ready": ready, "started": true, "restartCount": 0,
        "state": {"running": {"startedAt": at(started_secs)}}})
}

fn with_last_exit(mut c: Value, code: i32, reason: &str, message: &str) -> Value {
    c["lastState"] =
        json!({"terminated": {"exitCode": code, "reason": reason, "message": message}});
    c["restartCount"] = json!(3);
    c
}

fn terminated(name: &str, code: i32, reason: &str) -> Value {
    json!({"name": name, "image": format!("{name}:1"), "imageID": "", "ready": false, "restartCount": 1,
        "state": {"terminated": {"exitCode": code, "reason": reason}}})
}

fn healthy(name: &str) -> Pod {
    pod(
        name,
        vec![running("sluice", true, -3600)],
        vec![running("app", true, -3600)],
    )
}

fn problem(pods: &[Pod], secs: i64) -> Option<PodProblem> {
    summarize(pods, now(secs), &Probes::new()).problem
}

fn reason(pods: &[Pod], secs: i64) -> Option<&'static str> {
    problem(pods, secs).map(|p| p.reason)
}

#[test]
fn healthy_and_starting_pods_have_no_problem() {
    assert_eq!(summarize([], now(0), &Probes::new()), Summary::default());
    assert_eq!(
        summarize(&[healthy("a"), healthy("b")], now(0), &Probes::new()),
        Summary::default()
    );
    for w in ["ContainerCreating", "PodInitializing", "SomethingNew", ""] {
        let p = pod(
            "a",
            vec![running("sluice", true, -5)],
            vec![waiting("app", w, "")],
        );
        assert_eq!(reason(&[p], 0), None, "{w} is on its way");
    }
    // No status at all yet (just created), or a pending pod without container statuses.
    let mut p = healthy("a");
    p.status = None;
    assert_eq!(reason(&[p], 0), None);
    let p = pod("a", vec![], vec![]);
    assert_eq!(reason(&[p], 0), None);
    // A finished init container (the user's migration) is done.
    let p = pod(
        "a",
        vec![
            terminated("migrate", 0, "Completed"),
            running("sluice", true, -9),
        ],
        vec![running("app", true, -9)],
    );
    assert_eq!(reason(&[p], 0), None);
}

#[test]
fn every_image_pull_waiting_reason_is_image_pull_failed_with_the_kubelet_message() {
    for w in [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
    ] {
        let p = pod(
            "ec-7f-abc",
            vec![running("sluice", false, -5)],
            vec![waiting(
                "app",
                w,
                "failed to resolve reference \"nope:1\": not found",
            )],
        );
        let got = problem(&[p], 0).unwrap();
        assert_eq!(got.reason, IMAGE_PULL_FAILED, "{w}");
        for part in [
            "container app of pod ec-7f-abc",
            "cannot pull image \"app:1\"",
            w,
            "not found",
            "imagePullSecrets",
        ] {
            assert!(got.message.contains(part), "{part:?} in {}", got.message);
        }
    }
    // A sidecar image is named as the sidecar's.
    let p = pod(
        "a",
        vec![waiting("sluice", "ImagePullBackOff", "Back-off")],
        vec![],
    );
    let got = problem(&[p], 0).unwrap();
    assert_eq!(got.reason, IMAGE_PULL_FAILED);
    assert!(
        got.message
            .starts_with("the sluice sidecar of pod a cannot pull image \"sluice:1\""),
        "{}",
        got.message
    );
}

#[test]
fn containers_the_kubelet_cannot_create_or_start() {
    for w in [
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "PreStartHookError",
        "PostStartHookError",
    ] {
        let p = pod(
            "a",
            vec![running("sluice", true, -5)],
            vec![waiting("app", w, "secret \"db\" not found")],
        );
        let got = problem(&[p], 0).unwrap();
        assert_eq!(got.reason, CONTAINER_CANNOT_START, "{w}");
        assert!(
            got.message.contains(w) && got.message.contains("secret \"db\" not found"),
            "{}",
            got.message
        );
        assert!(
            got.message.contains("kubectl describe pod a"),
            "{}",
            got.message
        );
    }
    // An empty message is left out, not shown as ": ".
    let p = pod(
        "a",
        vec![],
        vec![waiting("app", "CreateContainerError", " ")],
    );
    let got = problem(&[p], 0).unwrap();
    assert!(
        got.message.contains("(CreateContainerError)"),
        "{}",
        got.message
    );
}

#[test]
fn crash_loops_name_the_container_its_last_exit_and_the_logs() {
    let app = with_last_exit(
        waiting(
            "app",
            "CrashLoopBackOff",
            "back-off 20s restarting failed container",
        ),
        1,
        "Error",
        "cannot open /data\n",
    );
    let p = pod("a", vec![running("sluice", false, -60)], vec![app]);
    let got = problem(&[p], 0).unwrap();
    assert_eq!(got.reason, APPLICATION_CRASH_LOOPING);
    assert_eq!(
        got.message,
        "container app of pod a keeps exiting (last: exit code 1 (Error): cannot open /data); kubectl logs a -c app --previous shows why"
    );
    // The sidecar's own crash loop has its own reason (a user init container is the
    // application's).
    let sidecar = with_last_exit(waiting("sluice", "CrashLoopBackOff", ""), 2, "Error", "");
    let p = pod(
        "a",
        vec![sidecar],
        vec![waiting("app", "PodInitializing", "")],
    );
    let got = problem(&[p], 0).unwrap();
    assert_eq!(got.reason, SIDECAR_CRASH_LOOPING);
    assert!(
        got.message
            .contains("the sluice sidecar of pod a keeps exiting (last: exit code 2 (Error))"),
        "{}",
        got.message
    );
    let migrate = with_last_exit(waiting("migrate", "CrashLoopBackOff", ""), 1, "Error", "");
    let p = pod("a", vec![migrate], vec![]);
    assert_eq!(reason(&[p], 0), Some(APPLICATION_CRASH_LOOPING));
    // Backing off before any exit is recorded.
    let p = pod("a", vec![], vec![waiting("app", "CrashLoopBackOff", "")]);
    assert!(
        problem(&[p], 0)
            .unwrap()
            .message
            .contains("no exit recorded")
    );
}

#[test]
fn a_crash_loop_stays_one_between_restarts() {
    // Just exited: terminated (any code for an application container, which is restarted).
    for (code, why) in [(1, "Error"), (0, "Completed"), (137, "OOMKilled")] {
        let p = pod(
            "a",
            vec![running("sluice", true, -60)],
            vec![terminated("app", code, why)],
        );
        let got = problem(&[p], 0).unwrap();
        assert_eq!(got.reason, APPLICATION_CRASH_LOOPING, "{code}");
        assert!(
            got.message.contains(&format!("exit code {code} ({why})")),
            "{}",
            got.message
        );
    }
    // A failed init container (not a clean finish).
    let p = pod("a", vec![terminated("migrate", 3, "Error")], vec![]);
    assert_eq!(reason(&[p], 0), Some(APPLICATION_CRASH_LOOPING));
    // Running again after a failure, not ready: still crash looping within the window, with
    // a recheck when the window ends.
    let app = with_last_exit(running("app", false, -10), 1, "Error", "");
    let p = pod("a", vec![running("sluice", true, -60)], vec![app]);
    let s = summarize(std::slice::from_ref(&p), now(0), &Probes::new());
    assert_eq!(s.problem.unwrap().reason, APPLICATION_CRASH_LOOPING);
    assert_eq!(s.recheck, Some(RESTARTED_WITHIN - Duration::from_secs(10)));
    // Past the window: no longer (it then counts as not ready only after NOT_READY_AFTER).
    let later = RESTARTED_WITHIN.as_secs() as i64;
    let s = summarize(&[p], now(later), &Probes::new());
    assert_eq!(s.problem, None);
    assert_eq!(
        s.recheck,
        Some(NOT_READY_AFTER - RESTARTED_WITHIN - Duration::from_secs(10))
    );
    // Restarted and ready within the window: still crash looping (an application without a
    // readiness probe is ready the moment it runs, also when it exits at once); past the
    // window it is fine. An earlier clean exit (code 0) is no crash.
    let app = with_last_exit(running("app", true, -10), 1, "Error", "");
    assert_eq!(
        reason(&[pod("a", vec![], vec![app.clone()])], 0),
        Some(APPLICATION_CRASH_LOOPING)
    );
    assert_eq!(reason(&[pod("a", vec![], vec![app])], later), None);
    let app = with_last_exit(running("app", false, -10), 0, "Completed", "");
    assert_eq!(reason(&[pod("a", vec![], vec![app])], 0), None);
}

#[test]
fn not_ready_counts_only_after_a_while_and_the_sidecar_and_application_differ() {
    let sidecar_slow = pod(
        "a",
        vec![running("sluice", false, -30)],
        vec![running("app", true, -30)],
    );
    let s = summarize(std::slice::from_ref(&sidecar_slow), now(0), &Probes::new());
    assert_eq!(s.problem, None);
    assert_eq!(s.recheck, Some(NOT_READY_AFTER - Duration::from_secs(30)));
    let after = NOT_READY_AFTER.as_secs() as i64;
    let s = summarize(&[sidecar_slow], now(after + 100), &Probes::new());
    let p = s.problem.unwrap();
    assert_eq!(p.reason, SIDECAR_NOT_READY);
    for part in [
        "the sluice sidecar of pod a has not become ready in 2 min of running",
        "kafka_auth",
        "kafka_unreachable",
        "app_unreachable",
        "kubectl logs a -c sluice",
    ] {
        assert!(p.message.contains(part), "{part:?} in {}", p.message);
    }
    assert_eq!(s.recheck, None, "nothing left to wait for");
    let app_slow = pod(
        "a",
        vec![running("sluice", true, -999)],
        vec![running("app", false, -999)],
    );
    let p = problem(&[app_slow], 0).unwrap();
    assert_eq!(p.reason, APPLICATION_NOT_READY);
    assert!(
        p.message
            .contains("container app of pod a has not become ready in 2 min of running"),
        "{}",
        p.message
    );
    // Both not ready: the application is the likelier cause (the sidecar waits for it).
    let both = pod(
        "a",
        vec![running("sluice", false, -999)],
        vec![running("app", false, -999)],
    );
    assert_eq!(reason(&[both], 0), Some(APPLICATION_NOT_READY));
    // A running container without a start time counts as just started.
    let mut c = running("app", false, 0);
    c["state"]["running"] = json!({});
    let s = summarize(&[pod("a", vec![], vec![c])], now(0), &Probes::new());
    assert_eq!((s.problem, s.recheck), (None, Some(NOT_READY_AFTER)));
}

#[test]
fn unschedulable_pods_say_why() {
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "a"},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient cpu."}]}
    }))
    .unwrap();
    let got = problem(std::slice::from_ref(&p), 0).unwrap();
    assert_eq!(got.reason, PODS_UNSCHEDULABLE);
    assert!(
        got.message
            .contains("pod a cannot be scheduled: 0/1 nodes are available: 1 Insufficient cpu."),
        "{}",
        got.message
    );
    // Not scheduled yet for another reason (e.g. scheduling gates): no problem of its own.
    p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].reason =
        Some("SchedulingGated".into());
    assert_eq!(reason(&[p], 0), None);
}

#[test]
fn the_most_severe_problem_wins_within_a_pod_and_across_pods() {
    let pull = || waiting("app", "ImagePullBackOff", "");
    let start = || waiting("app", "CreateContainerConfigError", "");
    let app_crash = || with_last_exit(waiting("app", "CrashLoopBackOff", ""), 1, "Error", "");
    let sidecar_crash =
        || with_last_exit(waiting("sluice", "CrashLoopBackOff", ""), 1, "Error", "");
    let not_ready = || running("sluice", false, -999);
    // Within a pod.
    let p = pod("a", vec![sidecar_crash()], vec![pull()]);
    assert_eq!(reason(&[p], 0), Some(IMAGE_PULL_FAILED));
    let p = pod("a", vec![not_ready()], vec![app_crash()]);
    assert_eq!(reason(&[p], 0), Some(APPLICATION_CRASH_LOOPING));
    let p = pod("a", vec![sidecar_crash()], vec![app_crash()]);
    assert_eq!(reason(&[p], 0), Some(SIDECAR_CRASH_LOOPING));
    // Across pods, in every order: the order of REASONS.
    let by_reason = [
        (IMAGE_PULL_FAILED, pod("p1", vec![], vec![pull()])),
        (CONTAINER_CANNOT_START, pod("p2", vec![], vec![start()])),
        (
            SIDECAR_CRASH_LOOPING,
            pod("p3", vec![sidecar_crash()], vec![]),
        ),
        (
            APPLICATION_CRASH_LOOPING,
            pod("p4", vec![], vec![app_crash()]),
        ),
        (
            APPLICATION_NOT_READY,
            pod("p6", vec![], vec![running("app", false, -999)]),
        ),
        (KAFKA_AUTH_FAILED, pod("p7", vec![not_ready()], vec![])),
        (KAFKA_UNREACHABLE, pod("p8", vec![not_ready()], vec![])),
        (
            APPLICATION_UNREACHABLE,
            pod("p9", vec![not_ready()], vec![]),
        ),
        (SIDECAR_NOT_READY, pod("pa", vec![not_ready()], vec![])),
    ];
    // What the not-ready sidecars' /readyz said (pa's could not be read).
    let probes = Probes::from([
        ("p7".into(), said("kafka_auth", "refused")),
        ("p8".into(), said("kafka_unreachable", "down")),
        (
            "p9".into(),
            said("app_unreachable", "waiting for the application"),
        ),
        ("pa".into(), Readyz::Unread("timed out".into())),
    ]);
    for i in 0..by_reason.len() {
        // Pods i.. in reverse, plus healthy ones: the i-th reason wins.
        let mut pods: Vec<Pod> = by_reason[i..]
            .iter()
            .rev()
            .map(|(_, p)| p.clone())
            .collect();
        pods.push(healthy("p0"));
        pods.push(healthy("pz"));
        let got = summarize(&pods, now(0), &probes).problem.map(|p| p.reason);
        assert_eq!(got, Some(by_reason[i].0), "from {i}");
    }
    assert_eq!(
        by_reason.len() + 1,
        REASONS.len(),
        "every reason but PodsUnschedulable (unschedulable_pods_say_why) is ordered here"
    );
    for (i, r) in REASONS.iter().enumerate() {
        assert_eq!(severity(r), i);
    }
}

#[test]
fn pods_sharing_the_problem_are_counted_and_the_first_by_name_is_shown() {
    let crash = |n: &str, msg: &str| {
        pod(
            n,
            vec![],
            vec![with_last_exit(
                waiting("app", "CrashLoopBackOff", ""),
                1,
                "Error",
                msg,
            )],
        )
    };
    let pods = [
        crash("ec-c", "third"),
        healthy("ec-0"),
        crash("ec-a", "first"),
        crash("ec-b", "second"),
    ];
    let got = problem(&pods, 0).unwrap();
    assert!(
        got.message
            .starts_with("container app of pod ec-a keeps exiting"),
        "{}",
        got.message
    );
    assert!(
        got.message
            .ends_with("(and 2 more pods with the same problem)"),
        "{}",
        got.message
    );
    let got = problem(&pods[1..3], 0).unwrap();
    assert!(!got.message.contains("more pod"), "{}", got.message);
    let got = problem(&[crash("x", ""), crash("y", "")], 0).unwrap();
    assert!(
        got.message
            .ends_with("(and 1 more pod with the same problem)"),
        "{}",
        got.message
    );
    // A less severe problem of other pods is not counted in.
    let pods = [
        crash("a", ""),
        pod("b", vec![], vec![waiting("app", "ErrImagePull", "")]),
    ];
    let got = problem(&pods, 0).unwrap();
    assert_eq!(got.reason, IMAGE_PULL_FAILED);
    assert!(!got.message.contains("more pod"), "{}", got.message);
}

#[test]
fn terminating_pods_are_ignored() {
    let mut p = pod("old", vec![], vec![terminated("app", 143, "Error")]);
    p.metadata.deletion_timestamp = Some(Time(now(-1)));
    assert_eq!(reason(&[p.clone()], 0), None);
    assert_ne!(
        signature(&p),
        signature(&pod("old", vec![], vec![terminated("app", 143, "Error")]))
    );
}

#[test]
fn the_signature_changes_with_what_summarize_reads_and_not_with_restart_counts() {
    let base = || {
        pod(
            "a",
            vec![running("sluice", true, -9)],
            vec![waiting("app", "CrashLoopBackOff", "back-off 10s")],
        )
    };
    let s = signature(&base()).unwrap();
    assert_eq!(signature(&base()), Some(s), "deterministic");
    let mut restarted = base();
    restarted
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0]
        .restart_count = 7;
    assert_eq!(
        signature(&restarted),
        Some(s),
        "a restart count alone does not reconcile"
    );
    let mut trimmed = base();
    trim(&mut trimmed);
    assert_eq!(
        signature(&trimmed),
        Some(s),
        "trimming keeps what the signature reads"
    );
    let changes: Vec<Pod> = vec![
        pod(
            "a",
            vec![running("sluice", false, -9)],
            vec![waiting("app", "CrashLoopBackOff", "back-off 10s")],
        ),
        pod(
            "a",
            vec![running("sluice", true, -8)],
            vec![waiting("app", "CrashLoopBackOff", "back-off 10s")],
        ),
        pod(
            "a",
            vec![running("sluice", true, -9)],
            vec![waiting("app", "CrashLoopBackOff", "back-off 20s")],
        ),
        pod(
            "a",
            vec![running("sluice", true, -9)],
            vec![waiting("app", "ImagePullBackOff", "back-off 10s")],
        ),
        pod(
            "a",
            vec![running("sluice", true, -9)],
            vec![terminated("app", 1, "Error")],
        ),
        pod(
            "a",
            vec![running("sluice", true, -9)],
            vec![running("app", false, -1)],
        ),
        pod(
            "a",
            vec![running("sluice", true, -9)],
            vec![with_last_exit(
                waiting("app", "CrashLoopBackOff", "back-off 10s"),
                1,
                "Error",
                "",
            )],
        ),
        pod("a", vec![], vec![]),
    ];
    for (i, p) in changes.iter().enumerate() {
        assert_ne!(signature(p), Some(s), "change {i}");
    }
    let mut unschedulable = pod("a", vec![], vec![]);
    let before = signature(&unschedulable);
    unschedulable
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[1]
        .status = "False".into();
    assert_ne!(signature(&unschedulable), before);
}

#[test]
fn trim_keeps_what_summarize_and_the_mapping_read_and_drops_the_rest() {
    let app = with_last_exit(waiting("app", "CrashLoopBackOff", "x"), 1, "Error", "boom");
    let full = pod("a", vec![running("sluice", false, -999)], vec![app]);
    let mut p = full.clone();
    trim(&mut p);
    let none = Probes::new();
    assert_eq!(
        summarize([&p], now(0), &none),
        summarize([&full], now(0), &none)
    );
    assert_eq!(owner(&p), Some("ec"));
    assert_eq!(p.metadata.name.as_deref(), Some("a"));
    assert_eq!(p.metadata.namespace.as_deref(), Some("ns"));
    assert_eq!(p.metadata.labels.as_ref().unwrap().len(), 1);
    assert!(
        p.spec.is_none()
            && p.metadata.annotations.is_none()
            && p.metadata.owner_references.is_none()
    );
    let s = p.status.as_ref().unwrap();
    assert_eq!(
        s.pod_ip.as_deref(),
        Some("10.0.0.9"),
        "the sidecar's /readyz is read there"
    );
    assert_eq!(s.conditions.as_ref().unwrap().len(), 1, "only PodScheduled");
    assert_eq!(s.container_statuses.as_ref().unwrap()[0].image_id, "");
    assert!(serde_json::to_vec(&p).unwrap().len() < serde_json::to_vec(&full).unwrap().len());
    // No status: nothing to trim there.
    let mut bare = Pod::default();
    trim(&mut bare);
    assert_eq!(bare, Pod::default());
    assert_eq!(owner(&bare), None);
}

fn deployment(replicas: i32, ready: i32) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        spec: None,
        status: Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            updated_replicas: Some(replicas),
            available_replicas: Some(ready),
            ..Default::default()
        }),
    }
}

fn status_for(
    d: &Deployment,
    desired: i32,
    old: Option<&EventConsumerStatus>,
    at_secs: i64,
) -> EventConsumerStatus {
    let spec: crate::crd::EventConsumerSpec = serde_norway::from_str(
        "kafka: {bootstrapServers: 'k:9092', topics: [a]}\ndelivery: {url: 'http://127.0.0.1:8080/'}\ntemplate: {spec: {containers: [{name: app}]}}",
    )
    .unwrap();
    let seen = Observed {
        name: "ec",
        generation: Some(1),
        desired_replicas: desired,
        deployment: Some(d),
    };
    let outcome = Outcome::Applied {
        tuning: crate::tuning::tune(&spec, Some("ns.ec".into())),
    };
    compute(old, &seen, &outcome, &Time(now(at_secs)))
}

fn cond<'a>(s: &'a EventConsumerStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn explain_puts_the_problem_in_ready_and_degraded_and_keeps_transition_times() {
    let problem = PodProblem {
        reason: IMAGE_PULL_FAILED,
        message: "container app of pod a cannot pull image".into(),
    };
    let d = deployment(2, 1);
    let mut s = status_for(&d, 2, None, 0);
    let before = s.clone();
    explain(&mut s, None, &problem, 2, &Time(now(0)));
    let ready = cond(&s, READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", IMAGE_PULL_FAILED)
    );
    assert_eq!(
        ready.message,
        "1 of 2 pods are ready: container app of pod a cannot pull image"
    );
    assert_eq!(
        ready.last_transition_time,
        cond(&before, READY).last_transition_time
    );
    let degraded = cond(&s, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", IMAGE_PULL_FAILED)
    );
    assert_eq!(
        degraded.message,
        "the pods do not work: container app of pod a cannot pull image"
    );
    assert_eq!(degraded.last_transition_time, Time(now(0)));
    assert_eq!(cond(&s, "Progressing"), cond(&before, "Progressing"));
    // The next pass: the same problem keeps the Degraded transition time and writes nothing
    // new; a transition is seen once.
    let mut again = status_for(&d, 2, Some(&s), 50);
    explain(&mut again, Some(&s), &problem, 2, &Time(now(50)));
    assert_eq!(again, s);
    let t = crate::status::transitions(Some(&before), &s);
    assert_eq!(
        t.iter()
            .map(|t| (t.type_.as_str(), t.reason.as_str()))
            .collect::<Vec<_>>(),
        [(READY, IMAGE_PULL_FAILED), (DEGRADED, IMAGE_PULL_FAILED)]
    );
    assert!(crate::status::transitions(Some(&s), &again).is_empty());
}

#[test]
fn explain_leaves_ready_pods_and_the_operators_own_findings_alone() {
    let problem = PodProblem {
        reason: APPLICATION_CRASH_LOOPING,
        message: "m".into(),
    };
    // Enough pods ready (a surge pod of a rollout crashes): Ready stays, Degraded says it.
    let d = deployment(3, 2);
    let mut s = status_for(&d, 2, None, 0);
    explain(&mut s, None, &problem, 2, &Time(now(0)));
    assert_eq!(cond(&s, READY).reason, "ReplicasReady");
    assert_eq!(cond(&s, DEGRADED).reason, APPLICATION_CRASH_LOOPING);
    // The cluster refuses pods, or the rollout stalled: Degraded by the operator's finding is
    // kept except for the stall, which the pods explain better.
    let mut refused = deployment(1, 0);
    refused.status.as_mut().unwrap().conditions = Some(vec![serde_json::from_value(json!({
        "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "forbidden"})).unwrap()]);
    let mut s = status_for(&refused, 2, None, 0);
    explain(&mut s, None, &problem, 2, &Time(now(0)));
    assert_eq!(cond(&s, READY).reason, "PodsCannotBeCreated");
    assert_eq!(cond(&s, DEGRADED).reason, "PodsCannotBeCreated");
    let mut stalled = deployment(1, 0);
    stalled.status.as_mut().unwrap().conditions = Some(vec![
        serde_json::from_value(json!({
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}))
        .unwrap(),
    ]);
    let old = status_for(&stalled, 1, None, 0);
    assert_eq!(cond(&old, DEGRADED).reason, "RolloutStalled");
    let mut s = status_for(&stalled, 1, Some(&old), 60);
    explain(&mut s, Some(&old), &problem, 1, &Time(now(60)));
    let degraded = cond(&s, DEGRADED);
    assert_eq!(degraded.reason, APPLICATION_CRASH_LOOPING);
    assert_eq!(
        degraded.last_transition_time,
        Time(now(0)),
        "it was already True"
    );
}

fn said(reason: &str, detail: &str) -> Readyz {
    Readyz::NotReady {
        reason: reason.into(),
        detail: detail.into(),
    }
}

/// A pod whose sidecar has run, not ready, for 999 s; its application is ready.
fn sidecar_stuck(name: &str) -> Pod {
    pod(
        name,
        vec![running("sluice", false, -999)],
        vec![running("app", true, -999)],
    )
}

#[test]
fn only_sidecars_not_ready_for_long_are_to_be_probed() {
    let none = Probes::new();
    // Healthy, starting, crash looping, an application not ready, a sidecar not ready for
    // less than NOT_READY_AFTER: nothing to read.
    let young = pod(
        "young",
        vec![running("sluice", false, -30)],
        vec![running("app", true, -30)],
    );
    let crash = pod(
        "crash",
        vec![with_last_exit(
            waiting("sluice", "CrashLoopBackOff", ""),
            1,
            "Error",
            "",
        )],
        vec![],
    );
    let app = pod(
        "app",
        vec![running("sluice", true, -999)],
        vec![running("app", false, -999)],
    );
    let s = summarize(&[healthy("h"), young, crash, app], now(0), &none);
    assert_eq!(s.probe, Vec::<String>::new());
    // Sidecars not ready for long, by pod name, even where another finding of the pod
    // is more severe (that finding may go, the sidecar's stays).
    let both = pod(
        "both",
        vec![running("sluice", false, -999)],
        vec![running("app", false, -999)],
    );
    let s = summarize(
        &[sidecar_stuck("b"), healthy("h"), sidecar_stuck("a"), both],
        now(0),
        &none,
    );
    assert_eq!(s.probe, vec!["a", "b", "both"]);
    assert_eq!(s.problem.unwrap().reason, APPLICATION_NOT_READY);
    // Terminating pods are not read.
    let mut gone = sidecar_stuck("gone");
    gone.metadata.deletion_timestamp = Some(Time(now(0)));
    assert_eq!(
        summarize(&[gone], now(0), &none).probe,
        Vec::<String>::new()
    );
}

#[test]
fn what_the_sidecar_says_becomes_the_reason_with_its_words() {
    let p = [sidecar_stuck("ec-1")];
    let with = |answer: Readyz| {
        summarize(&p, now(0), &Probes::from([("ec-1".into(), answer)]))
            .problem
            .unwrap()
    };
    let cases = [
        (
            said(
                "kafka_auth",
                "Kafka refused the credentials or permissions: SASL authentication error: Authentication failed (after 310ms in state AUTH_REQ)",
            ),
            KAFKA_AUTH_FAILED,
            vec![
                "the sluice sidecar of pod ec-1 is refused by Kafka: Kafka refused the credentials or permissions: SASL authentication error: Authentication failed;",
                "credentials Secret",
                "kubectl logs ec-1 -c sluice",
            ],
        ),
        (
            said(
                "kafka_unreachable",
                "no Kafka broker is reachable: 1/1 brokers are down\n",
            ),
            KAFKA_UNREACHABLE,
            vec![
                "the sluice sidecar of pod ec-1 cannot reach Kafka: no Kafka broker is reachable: 1/1 brokers are down;",
                "spec.kafka.bootstrapServers",
            ],
        ),
        (
            said("app_unreachable", "waiting for the application"),
            APPLICATION_UNREACHABLE,
            vec![
                "the sluice sidecar of pod ec-1 gets no answer from its application (waiting for the application)",
                "spec.delivery.url",
            ],
        ),
        (
            said("joining", "joining the consumer group"),
            SIDECAR_NOT_READY,
            vec![
                "has not become ready in 2 min of running: its /readyz says: joining the consumer group;",
            ],
        ),
        (
            said("draining", "draining"),
            SIDECAR_NOT_READY,
            vec!["its /readyz says: draining;"],
        ),
        // A sidecar of a version that sends no reason header: its words, generic reason.
        (
            said("", "no Kafka broker is reachable: x"),
            SIDECAR_NOT_READY,
            vec!["its /readyz says: no Kafka broker is reachable: x;"],
        ),
        (
            said("something_new", "a new reason"),
            SIDECAR_NOT_READY,
            vec!["its /readyz says: a new reason;"],
        ),
        (
            Readyz::Unread("GET 10.0.0.9:9898/readyz failed: connection refused".into()),
            SIDECAR_NOT_READY,
            vec![
                "has not become ready in 2 min of running (the operator could not read its /readyz: GET 10.0.0.9:9898/readyz failed: connection refused)",
                "kafka_auth",
            ],
        ),
        (
            Readyz::Ready,
            SIDECAR_NOT_READY,
            vec!["(its /readyz answers ready by now)"],
        ),
    ];
    for (answer, reason, parts) in cases {
        let got = with(answer.clone());
        assert_eq!(got.reason, reason, "{answer:?}");
        for part in parts {
            assert!(got.message.contains(part), "{part:?} in {}", got.message);
        }
        assert!(!got.message.contains('\n'), "{}", got.message);
        assert!(!got.message.contains("after 310ms"), "{}", got.message);
    }
    // No answer (yet): the generic reason and message, as before the read.
    assert_eq!(
        summarize(&p, now(0), &Probes::new())
            .problem
            .unwrap()
            .reason,
        SIDECAR_NOT_READY
    );
    // An answer for another pod changes nothing.
    let other = Probes::from([("ec-2".into(), said("kafka_auth", "refused"))]);
    assert_eq!(
        summarize(&p, now(0), &other).problem.unwrap().reason,
        SIDECAR_NOT_READY
    );
    // A long detail is cut.
    let long = with(said("kafka_unreachable", &"x".repeat(5000)));
    assert!(
        long.message.len() < 1000 && long.message.contains("xxx..."),
        "{}",
        long.message
    );
}

#[test]
fn pods_with_the_same_cause_are_counted_and_different_causes_are_ordered() {
    let pods = [sidecar_stuck("a"), sidecar_stuck("b"), sidecar_stuck("c")];
    let probes = Probes::from([
        ("a".into(), said("kafka_unreachable", "down")),
        ("b".into(), said("kafka_auth", "refused")),
        ("c".into(), said("kafka_auth", "refused")),
    ]);
    let p = summarize(&pods, now(0), &probes).problem.unwrap();
    assert_eq!(p.reason, KAFKA_AUTH_FAILED);
    assert!(
        p.message.contains("pod b is refused by Kafka: refused"),
        "{}",
        p.message
    );
    assert!(
        p.message
            .ends_with("(and 1 more pod with the same problem)"),
        "{}",
        p.message
    );
}

#[test]
fn clean_detail_drops_timings_and_line_breaks() {
    assert_eq!(clean_detail("a (after 12ms in state UP) b"), "a b");
    assert_eq!(
        clean_detail("a (after 1ms in state X) b (after 2ms in state Y)"),
        "a b"
    );
    assert_eq!(clean_detail("a (after unclosed"), "a");
    // As the test bed's broker refusing a SCRAM password gives it.
    assert_eq!(
        clean_detail(
            "SASL authentication error: Authentication failed with SASL mechanism SCRAM-SHA-512 (after 310ms in state AUTH_REQ, 1 identical error(s) suppressed)"
        ),
        "SASL authentication error: Authentication failed with SASL mechanism SCRAM-SHA-512"
    );
    assert_eq!(clean_detail(" one\n two\t three "), "one two three");
    assert_eq!(clean_detail("(kept) text"), "(kept) text");
    let cut = clean_detail(&"é".repeat(400));
    assert!(cut.len() <= DETAIL_MAX && cut.ends_with("..."), "{cut}");
}
