use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::crd::EventConsumerSpec;
use crate::tuning::tune;

fn t(secs: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000 + secs).unwrap())
}

fn tuning() -> Tuning {
    let spec: EventConsumerSpec = serde_norway::from_str(
        "kafka: {bootstrapServers: 'k:9092', topics: [a]}\ndelivery: {url: 'http://127.0.0.1:8080/'}\ntemplate: {spec: {containers: [{name: app}]}}",
    )
    .unwrap();
    tune(&spec, Some("ns.ec".into()))
}

fn dep(
    generation: i64,
    observed: i64,
    replicas: i32,
    ready: i32,
    updated: i32,
    available: i32,
) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            generation: Some(generation),
            ..Default::default()
        },
        spec: None,
        status: Some(DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            available_replicas: Some(available),
            ..Default::default()
        }),
    }
}

fn seen<'a>(d: Option<&'a Deployment>, desired: i32) -> Observed<'a> {
    Observed {
        name: "ec",
        generation: Some(4),
        desired_replicas: desired,
        deployment: d,
    }
}

fn applied() -> Outcome {
    Outcome::Applied { tuning: tuning() }
}

fn get<'a>(s: &'a EventConsumerStatus, type_: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

fn brief(s: &EventConsumerStatus) -> Vec<(String, String, String)> {
    s.conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
        .collect()
}

fn tri(r: (&str, &str), p: (&str, &str), d: (&str, &str)) -> Vec<(String, String, String)> {
    [(READY, r), (PROGRESSING, p), (DEGRADED, d)]
        .into_iter()
        .map(|(t, (s, r))| (t.to_owned(), s.to_owned(), r.to_owned()))
        .collect()
}

#[test]
fn all_ready_and_rolled_out() {
    let d = dep(2, 2, 3, 3, 3, 3);
    let s = compute(None, &seen(Some(&d), 3), &applied(), &t(0));
    assert_eq!(
        brief(&s),
        tri(
            ("True", "ReplicasReady"),
            ("False", "RolloutComplete"),
            ("False", "AsExpected")
        )
    );
    assert_eq!((s.replicas, s.ready_replicas), (3, 3));
    assert_eq!(s.observed_generation, Some(4));
    assert_eq!(s.selector.as_deref(), Some("sluice.dev/consumer=ec"));
    assert_eq!(s.effective, Some(tuning()));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(4) && c.last_transition_time == t(0))
    );
}

#[test]
fn rolling_out_while_old_pods_still_serve() {
    // 3 desired, a surge pod of the new template exists, old ones still ready.
    let d = dep(3, 3, 4, 3, 1, 3);
    let s = compute(None, &seen(Some(&d), 3), &applied(), &t(0));
    assert_eq!(
        brief(&s),
        tri(
            ("True", "ReplicasReady"),
            ("True", "RollingOut"),
            ("False", "AsExpected")
        )
    );
    assert!(
        get(&s, PROGRESSING)
            .message
            .contains("1 of 3 pods run the current template (4 in total)")
    );
}

#[test]
fn deployment_controller_not_caught_up_is_progressing() {
    let d = dep(5, 4, 3, 3, 3, 3);
    let s = compute(None, &seen(Some(&d), 3), &applied(), &t(0));
    assert_eq!(get(&s, PROGRESSING).reason, "RollingOut");
}

#[test]
fn pods_not_ready_says_where_to_look() {
    let d = dep(1, 1, 2, 1, 2, 1);
    let s = compute(None, &seen(Some(&d), 2), &applied(), &t(0));
    let r = get(&s, READY);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "ReplicasNotReady")
    );
    assert!(r.message.contains("1 of 2 pods are ready"), "{}", r.message);
    assert!(
        r.message
            .contains("kubectl describe pods -l sluice.dev/consumer=ec"),
        "{}",
        r.message
    );
}

#[test]
fn scaled_to_zero_is_ready() {
    // Observed by the Deployment controller, or just created (generation 1, never
    // observed, with or without an empty status): no pods, nothing left to roll.
    for d in [
        dep(1, 1, 0, 0, 0, 0),
        just_created(None),
        just_created(Some(DeploymentStatus::default())),
    ] {
        let s = compute(None, &seen(Some(&d), 0), &applied(), &t(0));
        assert_eq!(
            brief(&s),
            tri(
                ("True", "ScaledToZero"),
                ("False", "RolloutComplete"),
                ("False", "AsExpected")
            ),
            "{d:?}"
        );
    }
}

#[test]
fn stalled_rollout_is_degraded() {
    let mut d = dep(2, 2, 2, 1, 1, 1);
    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        ..Default::default()
    }]);
    let s = compute(None, &seen(Some(&d), 1), &applied(), &t(0));
    assert_eq!(
        brief(&s),
        tri(
            ("True", "ReplicasReady"),
            ("False", "RolloutStalled"),
            ("True", "RolloutStalled")
        )
    );
    assert!(get(&s, DEGRADED).message.contains("progress deadline"));
}

#[test]
fn blocked_without_deployment_explains_in_ready_and_degraded() {
    let outcome = Outcome::Blocked {
        reason: "SecretNotFound",
        message: "Secret x not found; create it".into(),
    };
    let s = compute(None, &seen(None, 2), &outcome, &t(0));
    assert_eq!(
        brief(&s),
        tri(
            ("False", "SecretNotFound"),
            ("False", "NoDeployment"),
            ("True", "SecretNotFound")
        )
    );
    assert_eq!(
        get(&s, READY).message,
        "no pods run: Secret x not found; create it"
    );
    assert_eq!(get(&s, DEGRADED).message, "Secret x not found; create it");
    assert_eq!(s.effective, None);
    assert_eq!((s.replicas, s.ready_replicas), (0, 0));
}

#[test]
fn blocked_with_running_pods_keeps_their_readiness_and_last_tuning() {
    let d = dep(1, 1, 2, 2, 2, 2);
    let first = compute(None, &seen(Some(&d), 2), &applied(), &t(0));
    let outcome = Outcome::Blocked {
        reason: "PreStopConflict",
        message: "remove the preStop hook".into(),
    };
    let s = compute(Some(&first), &seen(Some(&d), 2), &outcome, &t(10));
    assert_eq!(
        brief(&s),
        tri(
            ("True", "ReplicasReady"),
            ("False", "RolloutComplete"),
            ("True", "PreStopConflict")
        )
    );
    assert_eq!(
        s.effective, first.effective,
        "the running pods still use the last applied tuning"
    );
}

#[test]
fn transition_time_moves_only_when_the_status_flips() {
    let d = dep(1, 1, 2, 1, 2, 1);
    let s0 = compute(None, &seen(Some(&d), 2), &applied(), &t(0));
    // Same status, different message (1 -> 0 ready) at a later time: time kept.
    let d1 = dep(1, 1, 2, 0, 2, 0);
    let s1 = compute(Some(&s0), &seen(Some(&d1), 2), &applied(), &t(30));
    assert_eq!(get(&s1, READY).last_transition_time, t(0));
    assert!(get(&s1, READY).message.starts_with("0 of 2"));
    // Flip to ready: time moves for Ready only.
    let d2 = dep(1, 1, 2, 2, 2, 2);
    let s2 = compute(Some(&s1), &seen(Some(&d2), 2), &applied(), &t(60));
    assert_eq!(get(&s2, READY).last_transition_time, t(60));
    assert_eq!(get(&s2, DEGRADED).last_transition_time, t(0));
    // Recomputing the same state changes nothing at all: no status churn.
    let s3 = compute(Some(&s2), &seen(Some(&d2), 2), &applied(), &t(90));
    assert_eq!(s3, s2);
}

#[test]
fn lag_reported_elsewhere_is_kept() {
    let d = dep(1, 1, 1, 1, 1, 1);
    let mut old = compute(None, &seen(Some(&d), 1), &applied(), &t(0));
    old.lag = Some(42);
    let s = compute(Some(&old), &seen(Some(&d), 1), &applied(), &t(1));
    assert_eq!(s.lag, Some(42));
}

#[test]
fn transitions_report_flips_and_first_degradation_only() {
    let d = dep(1, 1, 1, 0, 1, 0);
    let s0 = compute(None, &seen(Some(&d), 1), &applied(), &t(0));
    assert_eq!(
        transitions(None, &s0),
        vec![],
        "a fresh, healthy consumer starting is not news"
    );
    let blocked = Outcome::Blocked {
        reason: "InvalidSidecarConfig",
        message: "m".into(),
    };
    let s1 = compute(Some(&s0), &seen(Some(&d), 1), &blocked, &t(1));
    let tr = transitions(Some(&s0), &s1);
    assert_eq!(tr.len(), 1);
    assert_eq!(
        (tr[0].type_.as_str(), tr[0].status, tr[0].reason.as_str()),
        (DEGRADED, true, "InvalidSidecarConfig")
    );
    let ready = dep(1, 1, 1, 1, 1, 1);
    let s2 = compute(Some(&s1), &seen(Some(&ready), 1), &applied(), &t(2));
    let types: Vec<_> = transitions(Some(&s1), &s2)
        .into_iter()
        .map(|t| (t.type_, t.status))
        .collect();
    // The one pod became available: ready, rollout complete, no longer degraded.
    assert_eq!(
        types,
        vec![
            (READY.to_owned(), true),
            (PROGRESSING.to_owned(), false),
            (DEGRADED.to_owned(), false)
        ]
    );
    assert_eq!(transitions(Some(&s2), &s2), vec![]);
    let s_new = compute(None, &seen(None, 1), &blocked, &t(0));
    assert_eq!(
        transitions(None, &s_new).len(),
        1,
        "a consumer blocked from the start is reported"
    );
}

#[test]
fn topics_column_is_a_plain_comma_separated_list() {
    assert_eq!(topics_column(&["orders".to_owned()]), "orders");
    assert_eq!(
        topics_column(&["orders".to_owned(), "payments.v2".to_owned()]),
        "orders,payments.v2"
    );
    // The wide Topics column shows that string, not the spec's array (printed as JSON).
    let crd = <crate::crd::EventConsumer as kube::CustomResourceExt>::crd();
    let column = crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .expect("printer columns")
        .iter()
        .find(|c| c.name == "Topics")
        .expect("a Topics column")
        .clone();
    assert_eq!(
        (column.json_path.as_str(), column.type_.as_str()),
        (".status.topics", "string")
    );
}

#[test]
fn pods_the_cluster_refuses_to_create_show_in_ready_and_degraded_with_the_message() {
    let mut d = dep(1, 1, 0, 0, 0, 0);
    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "ReplicaFailure".into(),
        status: "True".into(),
        reason: Some("FailedCreate".into()),
        message: Some(
            "pods \"ec-abc\" is forbidden: violates PodSecurity \"restricted:latest\": privileged"
                .into(),
        ),
        ..Default::default()
    }]);
    let s = compute(None, &seen(Some(&d), 1), &applied(), &t(0));
    assert_eq!(get(&s, READY).status, "False");
    assert_eq!(get(&s, READY).reason, PODS_CANNOT_BE_CREATED);
    assert_eq!(get(&s, DEGRADED).status, "True");
    assert_eq!(get(&s, DEGRADED).reason, PODS_CANNOT_BE_CREATED);
    for c in [READY, DEGRADED] {
        assert!(
            get(&s, c)
                .message
                .contains("FailedCreate: pods \"ec-abc\" is forbidden: violates PodSecurity"),
            "{c}: {}",
            get(&s, c).message
        );
    }
    // A false ReplicaFailure (the controller clears it by removing or flipping it) is not one.
    d.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
    let s = compute(None, &seen(Some(&d), 1), &applied(), &t(0));
    assert_eq!(get(&s, READY).reason, "ReplicasNotReady");
    assert_eq!(get(&s, DEGRADED).reason, "AsExpected");
}

#[test]
fn a_replica_failure_beside_ready_pods_keeps_ready_but_is_degraded() {
    // Scaled from 1 to 3: one pod runs, the ReplicaSet cannot create the others.
    let mut d = dep(2, 2, 1, 1, 1, 1);
    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "ReplicaFailure".into(),
        status: "True".into(),
        reason: Some("FailedCreate".into()),
        message: Some("exceeded quota: pods".into()),
        ..Default::default()
    }]);
    let s = compute(None, &seen(Some(&d), 3), &applied(), &t(0));
    assert_eq!(get(&s, READY).reason, PODS_CANNOT_BE_CREATED);
    assert!(get(&s, READY).message.starts_with("1 of 3 pods are ready"));
    assert_eq!(get(&s, DEGRADED).reason, PODS_CANNOT_BE_CREATED);
    assert!(get(&s, DEGRADED).message.contains("exceeded quota: pods"));
}

#[test]
fn the_deployment_signature_moves_only_with_what_the_reconcile_reads() {
    let cond = |type_: &str, status: &str, reason: &str, message: &str| DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..Default::default()
    };
    let with = |conditions: Vec<DeploymentCondition>| {
        let mut d = dep(1, 1, 0, 0, 0, 0);
        d.status.as_mut().unwrap().conditions = Some(conditions);
        d
    };
    let base = with(vec![cond(
        "Progressing",
        "True",
        "NewReplicaSetCreated",
        "created",
    )]);
    let sig = |d: &Deployment| deployment_signature(d).unwrap();
    // The Deployment controller moving a condition's reason, message or time: quiet.
    let mut moved = with(vec![
        cond("Progressing", "True", "NewReplicaSetAvailable", "available"),
        cond("Available", "True", "MinimumReplicasAvailable", "ok"),
    ]);
    moved.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_update_time =
        Some(Time(Timestamp::now()));
    assert_eq!(sig(&base), sig(&moved));
    // What the status, the pod summary and the pacing read: each one moves it.
    let stalled = with(vec![cond(
        "Progressing",
        "False",
        "ProgressDeadlineExceeded",
        "x",
    )]);
    let failing = with(vec![cond(
        "ReplicaFailure",
        "True",
        "FailedCreate",
        "quota",
    )]);
    let failing_other = with(vec![cond("ReplicaFailure", "True", "FailedCreate", "psa")]);
    let mut changed = vec![stalled, failing, failing_other];
    for edit in [
        |d: &mut Deployment| d.metadata.generation = Some(2),
        |d: &mut Deployment| d.status.as_mut().unwrap().observed_generation = Some(0),
        |d: &mut Deployment| d.status.as_mut().unwrap().replicas = Some(1),
        |d: &mut Deployment| d.status.as_mut().unwrap().ready_replicas = Some(1),
        |d: &mut Deployment| d.status.as_mut().unwrap().updated_replicas = Some(1),
        |d: &mut Deployment| d.status.as_mut().unwrap().available_replicas = Some(1),
        |d: &mut Deployment| d.status.as_mut().unwrap().unavailable_replicas = Some(1),
        |d: &mut Deployment| {
            d.metadata.annotations = Some([("a".to_owned(), "b".to_owned())].into())
        },
        |d: &mut Deployment| d.metadata.labels = Some([("a".to_owned(), "b".to_owned())].into()),
        |d: &mut Deployment| d.metadata.deletion_timestamp = Some(Time(Timestamp::now())),
        |d: &mut Deployment| {
            d.spec = Some(k8s_openapi::api::apps::v1::DeploymentSpec {
                replicas: Some(3),
                ..Default::default()
            })
        },
    ] {
        let mut d = base.clone();
        edit(&mut d);
        changed.push(d);
    }
    let mut seen = vec![sig(&base)];
    for d in &changed {
        let s = sig(d);
        assert!(!seen.contains(&s), "a change the reconcile reads: {d:?}");
        seen.push(s);
    }
}

/// A Deployment as the apply that created it returns it: generation 1, never observed.
fn just_created(status: Option<DeploymentStatus>) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        spec: None,
        status,
    }
}

#[test]
fn a_just_created_deployment_has_no_pods_and_needs_no_second_look() {
    for status in [None, Some(DeploymentStatus::default())] {
        let d = just_created(status);
        assert!(status_is_current(&d));
        // With pods wanted, it is still rolling out: none of them exists yet (with none
        // wanted: `scaled_to_zero_is_ready`).
        let s = compute(None, &seen(Some(&d), 2), &applied(), &t(0));
        assert_eq!(
            brief(&s),
            tri(
                ("False", "ReplicasNotReady"),
                ("True", "RollingOut"),
                ("False", "AsExpected")
            )
        );
        assert!(
            get(&s, PROGRESSING)
                .message
                .contains("0 of 2 pods run the current template (0 in total)")
        );
    }
}

#[test]
fn a_changed_deployment_not_yet_observed_is_not_current() {
    // Generation 2 and no observed generation: a spec changed before the controller ever
    // reported (its pods, if any, are unknown), so the status waits for the controller.
    let mut d = just_created(None);
    d.metadata.generation = Some(2);
    assert!(!status_is_current(&d));
    let s = compute(None, &seen(Some(&d), 0), &applied(), &t(0));
    assert_eq!(get(&s, PROGRESSING).reason, "RollingOut");
    // Observed at an older generation: not current either.
    assert!(!status_is_current(&dep(3, 2, 0, 0, 0, 0)));
    assert!(status_is_current(&dep(3, 3, 0, 0, 0, 0)));
}
