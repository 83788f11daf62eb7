use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::*;

fn key(n: &str) -> Key {
    ("ns".to_owned(), n.to_owned())
}

fn running<'a>(t: &'a str, i: Option<&'a str>, cause: Option<&'a str>, idle: bool) -> Running<'a> {
    Running {
        template_hash: Some(t),
        input_hash: i,
        cause,
        idle,
    }
}

#[test]
fn a_new_deployment_rolls_at_once() {
    for applied in [false, true] {
        assert_eq!(
            plan(None, "t", "i", applied),
            Plan::Roll {
                cause: Cause::Spec,
                needs_turn: false
            }
        );
    }
}

#[test]
fn an_unchanged_template_keeps_the_cause_of_its_last_roll() {
    for (cause, want) in [
        (Some("operator"), Cause::Operator),
        (Some("spec"), Cause::Spec),
        (None, Cause::Spec),
        (Some("garbage"), Cause::Spec),
    ] {
        for input in ["i", "other"] {
            let r = running("t", Some("i"), cause, false);
            assert_eq!(
                plan(Some(&r), "t", input, true),
                Plan::Unchanged { cause: want },
                "{cause:?} {input}"
            );
        }
    }
}

#[test]
fn a_template_change_without_a_user_change_is_the_operators_and_waits_for_a_turn() {
    let r = running("old", Some("i"), Some("spec"), false);
    assert_eq!(
        plan(Some(&r), "new", "i", true),
        Plan::Roll {
            cause: Cause::Operator,
            needs_turn: true
        }
    );
    // spec_applied plays no part when the input was recorded.
    assert_eq!(
        plan(Some(&r), "new", "i", false),
        Plan::Roll {
            cause: Cause::Operator,
            needs_turn: true
        }
    );
    // No pod runs and none is wanted: nothing to pace.
    let idle = running("old", Some("i"), Some("spec"), true);
    assert_eq!(
        plan(Some(&idle), "new", "i", true),
        Plan::Roll {
            cause: Cause::Operator,
            needs_turn: false
        }
    );
}

#[test]
fn a_user_change_rolls_at_once_even_with_an_operator_change_in_it() {
    for cause in [Some("operator"), Some("spec"), None] {
        for idle in [false, true] {
            let r = running("old", Some("i"), cause, idle);
            assert_eq!(
                plan(Some(&r), "new", "i2", true),
                Plan::Roll {
                    cause: Cause::Spec,
                    needs_turn: false
                }
            );
        }
    }
}

#[test]
fn deployments_of_an_older_operator_use_the_observed_generation() {
    // No input recorded: the spec already applied means the change is the operator's.
    let r = Running {
        template_hash: None,
        input_hash: None,
        cause: None,
        idle: false,
    };
    assert_eq!(
        plan(Some(&r), "new", "i", true),
        Plan::Roll {
            cause: Cause::Operator,
            needs_turn: true
        }
    );
    assert_eq!(
        plan(Some(&r), "new", "i", false),
        Plan::Roll {
            cause: Cause::Spec,
            needs_turn: false
        }
    );
}

#[test]
fn input_hash_ignores_replicas_and_sees_spec_and_secret_changes() {
    let spec: EventConsumerSpec = serde_norway::from_str(
        "kafka: {bootstrapServers: 'k:9092', topics: [a]}\ndelivery: {url: 'http://127.0.0.1:8080/'}\ntemplate: {spec: {containers: [{name: app}]}}\n",
    )
    .unwrap();
    let none = BTreeMap::new();
    let h = input_hash(&spec, &none);
    assert_eq!(h, input_hash(&spec.clone(), &none), "deterministic");
    let mut scaled = spec.clone();
    scaled.replicas = spec.replicas + 5;
    assert_eq!(h, input_hash(&scaled, &none), "a scale is not a change");
    let mut topics = spec.clone();
    topics.kafka.topics.push("b".into());
    assert_ne!(h, input_hash(&topics, &none));
    let secrets = BTreeMap::from([(
        "creds".to_owned(),
        SecretData::from([("password".to_owned(), b"x".to_vec())]),
    )]);
    let rotated = BTreeMap::from([(
        "creds".to_owned(),
        SecretData::from([("password".to_owned(), b"y".to_vec())]),
    )]);
    assert_ne!(h, input_hash(&spec, &secrets));
    assert_ne!(input_hash(&spec, &secrets), input_hash(&spec, &rotated));
}

fn template(image: &str, native: bool) -> PodTemplateSpec {
    let sidecar = Container {
        name: SIDECAR_CONTAINER_NAME.into(),
        image: Some(image.into()),
        ..Default::default()
    };
    let app = Container {
        name: "app".into(),
        image: Some("app:1".into()),
        ..Default::default()
    };
    PodTemplateSpec {
        metadata: None,
        spec: Some(if native {
            PodSpec {
                init_containers: Some(vec![sidecar]),
                containers: vec![app],
                ..Default::default()
            }
        } else {
            PodSpec {
                containers: vec![app, sidecar],
                ..Default::default()
            }
        }),
    }
}

#[test]
fn template_hashes_differ_by_image_and_the_sidecar_image_is_found_in_both_modes() {
    assert_eq!(
        template_hash(&template("s:1", true)),
        template_hash(&template("s:1", true))
    );
    assert_ne!(
        template_hash(&template("s:1", true)),
        template_hash(&template("s:2", true))
    );
    assert_ne!(
        template_hash(&template("s:1", true)),
        template_hash(&template("s:1", false))
    );
    assert_eq!(
        sidecar_image(&template("s:1", true)).as_deref(),
        Some("s:1")
    );
    assert_eq!(
        sidecar_image(&template("s:2", false)).as_deref(),
        Some("s:2")
    );
    assert_eq!(sidecar_image(&PodTemplateSpec::default()), None);
}

/// A Deployment `name` wanting `wanted` pods, with the given status figures
/// (observed generation, replicas, updated, available) and rollout cause.
fn deployment(
    name: &str,
    cause: Option<&str>,
    hash: Option<&str>,
    wanted: i32,
    status: Option<(i64, i32, i32, i32)>,
) -> Deployment {
    let mut annotations = BTreeMap::new();
    if let Some(c) = cause {
        annotations.insert(ROLLOUT_CAUSE_ANNOTATION.to_owned(), c.to_owned());
    }
    if let Some(h) = hash {
        annotations.insert(TEMPLATE_HASH_ANNOTATION.to_owned(), h.to_owned());
    }
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            generation: Some(2),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(wanted),
            template: template("s:2", true),
            ..Default::default()
        }),
        status: status.map(|(og, r, u, a)| DeploymentStatus {
            observed_generation: Some(og),
            replicas: Some(r),
            updated_replicas: Some(u),
            available_replicas: Some(a),
            ..Default::default()
        }),
    }
}

#[test]
fn a_rollout_is_complete_only_when_every_pod_runs_the_new_template_and_is_available() {
    let done = |s| rollout_complete(&deployment("d", None, None, 2, s));
    assert!(done(Some((2, 2, 2, 2))));
    assert!(!done(None), "no status yet");
    assert!(
        !done(Some((1, 2, 2, 2))),
        "the controller has not seen the change"
    );
    assert!(!done(Some((2, 3, 2, 2))), "an old pod still runs");
    assert!(!done(Some((2, 2, 1, 2))), "not every pod updated");
    assert!(!done(Some((2, 2, 2, 1))), "a new pod not available");
    assert!(
        rollout_complete(&deployment("d", None, None, 0, Some((2, 0, 0, 0)))),
        "scaled to zero"
    );
    // Just created (generation 1, never observed): no pods exist yet.
    let mut new = deployment("d", None, None, 0, None);
    new.metadata.generation = Some(1);
    assert!(rollout_complete(&new), "a new Deployment of no pods");
    new.spec.as_mut().unwrap().replicas = Some(2);
    assert!(
        !rollout_complete(&new),
        "a new Deployment whose pods do not exist yet"
    );
}

#[test]
fn only_an_incomplete_operator_rollout_holds_a_turn() {
    let rolling = Some((2, 2, 1, 1));
    let done = Some((2, 1, 1, 1));
    assert!(holds_turn(&deployment(
        "d",
        Some("operator"),
        None,
        1,
        rolling
    )));
    assert!(!holds_turn(&deployment(
        "d",
        Some("operator"),
        None,
        1,
        done
    )));
    assert!(!holds_turn(&deployment(
        "d",
        Some("spec"),
        None,
        1,
        rolling
    )));
    assert!(!holds_turn(&deployment("d", None, None, 1, rolling)));
    let r = deployment("d", Some("spec"), Some("h"), 0, Some((2, 0, 0, 0)));
    assert!(Running::of(&r).idle);
    assert_eq!(Running::of(&r).template_hash, Some("h"));
    assert!(
        !Running::of(&deployment("d", None, None, 0, Some((2, 1, 0, 0)))).idle,
        "a pod still terminating"
    );
}

fn seen(n: &str, hash: Option<&str>, holds: bool) -> Seen {
    Seen {
        key: key(n),
        template_hash: hash.map(str::to_owned),
        holds_turn: holds,
    }
}

#[test]
fn turns_are_bounded_and_counted_from_the_cluster() {
    let pacer = Pacer::new(2);
    // Two Deployments already roll for the operator (e.g. started by the previous leader).
    let cluster = vec![seen("a", Some("h"), true), seen("b", Some("h"), true)];
    assert_eq!(
        pacer.acquire(&key("c"), "h", &cluster),
        Turn::Wait { rolling: 2 }
    );
    // One holding a turn keeps it (a retry, or a second operator change).
    assert_eq!(pacer.acquire(&key("a"), "h2", &cluster), Turn::Granted);
    // A spec-caused rollout does not count.
    let cluster = vec![seen("a", Some("h"), true), seen("b", Some("h"), false)];
    assert_eq!(pacer.acquire(&key("c"), "h", &cluster), Turn::Granted);
    // c's apply is not in the cache yet: its reservation counts.
    assert_eq!(
        pacer.acquire(&key("d"), "h", &cluster),
        Turn::Wait { rolling: 2 }
    );
}

#[test]
fn a_reservation_ends_when_the_cache_shows_the_applied_template() {
    let pacer = Pacer::new(1);
    assert_eq!(pacer.acquire(&key("a"), "new", &[]), Turn::Granted);
    // The cache still shows the old template: the reservation holds the turn.
    let stale = vec![seen("a", Some("old"), false)];
    assert_eq!(
        pacer.acquire(&key("b"), "new", &stale),
        Turn::Wait { rolling: 1 }
    );
    // The cache shows the new template, rolling: the Deployment itself holds the turn.
    let rolling = vec![seen("a", Some("new"), true)];
    assert_eq!(
        pacer.acquire(&key("b"), "new", &rolling),
        Turn::Wait { rolling: 1 }
    );
    // Its rollout completed: the turn is free.
    let done = vec![seen("a", Some("new"), false)];
    assert_eq!(pacer.acquire(&key("b"), "new", &done), Turn::Granted);
}

#[test]
fn a_failed_apply_gives_the_turn_back() {
    let pacer = Pacer::new(1);
    assert_eq!(pacer.acquire(&key("a"), "new", &[]), Turn::Granted);
    assert_eq!(
        pacer.acquire(&key("b"), "new", &[]),
        Turn::Wait { rolling: 1 }
    );
    pacer.release(&key("a"));
    assert_eq!(pacer.acquire(&key("b"), "new", &[]), Turn::Granted);
}

#[test]
fn waiters_are_woken_first_come_first_as_turns_free_up() {
    let pacer = Pacer::new(2);
    let full = vec![seen("x", Some("h"), true), seen("y", Some("h"), true)];
    for n in ["c", "a", "b", "a"] {
        assert!(matches!(
            pacer.acquire(&key(n), "h", &full),
            Turn::Wait { .. }
        ));
    }
    assert!(pacer.has_waiters());
    assert_eq!(
        pacer.wake(&full),
        (vec![], 2, 3),
        "no free turn: nobody woken"
    );
    let one_free = vec![seen("x", Some("h"), true), seen("y", Some("h"), false)];
    assert_eq!(pacer.wake(&one_free), (vec![key("c")], 1, 3));
    let all_free = vec![seen("x", Some("h"), false)];
    assert_eq!(pacer.wake(&all_free), (vec![key("c"), key("a")], 0, 3));
    // c got its turn; a no longer needs one (its user changed the spec); b was deleted.
    assert_eq!(pacer.acquire(&key("c"), "h", &all_free), Turn::Granted);
    pacer.not_waiting(&key("a"));
    pacer.forget(&key("b"));
    assert!(!pacer.has_waiters());
    // The deleted one's reservation is gone too.
    pacer.forget(&key("c"));
    assert_eq!(pacer.wake(&[]), (vec![], 0, 0));
}

#[test]
fn max_is_at_least_one() {
    assert_eq!(Pacer::new(0).max(), 1);
    assert_eq!(Pacer::new(7).max(), 7);
}

fn progressing(reason: &str, status: &str) -> EventConsumerStatus {
    EventConsumerStatus {
        conditions: vec![Condition {
            type_: PROGRESSING.into(),
            status: status.into(),
            reason: reason.into(),
            message: "m".into(),
            observed_generation: Some(1),
            last_transition_time: Time(Default::default()),
        }],
        sidecar_image: Some("s:1".into()),
        ..Default::default()
    }
}

#[test]
fn status_shows_the_running_image_once_rolled_out_and_a_waiting_change() {
    let complete = deployment("d", None, None, 1, Some((2, 1, 1, 1)));
    let rolling = deployment("d", None, None, 1, Some((2, 2, 1, 1)));
    let mut s = progressing("RolloutComplete", "False");
    sidecar_status(&mut s, Some(&rolling), None);
    assert_eq!(
        s.sidecar_image.as_deref(),
        Some("s:1"),
        "mid-rollout: the last complete one"
    );
    sidecar_status(&mut s, Some(&complete), None);
    assert_eq!(s.sidecar_image.as_deref(), Some("s:2"));
    assert_eq!(s.pending_sidecar_image, None);
    assert_eq!(s.conditions[0].reason, "RolloutComplete");
    sidecar_status(&mut s, None, None);
    assert_eq!(
        s.sidecar_image.as_deref(),
        Some("s:2"),
        "no Deployment seen: kept"
    );

    let pending = Pending {
        image: Some("s:3".into()),
        rolling: 4,
        max: 4,
    };
    let mut s = progressing("RolloutComplete", "False");
    sidecar_status(&mut s, Some(&complete), Some(&pending));
    assert_eq!(s.pending_sidecar_image.as_deref(), Some("s:3"));
    assert_eq!(s.conditions[0].reason, SIDECAR_UPDATE_QUEUED);
    assert_eq!(s.conditions[0].status, "False");
    let m = &s.conditions[0].message;
    assert!(
        m.contains("s:3") && m.contains("s:2") && m.contains("--max-sidecar-rollouts"),
        "{m}"
    );
    // A rollout (of the user's) under way or a stalled one keeps its own reason.
    for (reason, status) in [("RollingOut", "True"), ("RolloutStalled", "False")] {
        let mut s = progressing(reason, status);
        sidecar_status(&mut s, Some(&rolling), Some(&pending));
        assert_eq!(s.conditions[0].reason, reason);
        assert_eq!(s.pending_sidecar_image.as_deref(), Some("s:3"));
    }
}
