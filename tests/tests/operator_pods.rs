//! Status that says why pods do not work, on the test bed's real node: an application image
//! that cannot be pulled, an application that exits at once, and sidecars that run but stay
//! not ready — Kafka unreachable, Kafka refusing the SCRAM credentials, the application never
//! answering — each show as `Ready=False` and `Degraded=True` with their own reason and
//! message (the kubelet's, or the sidecar's `/readyz` as the operator reads it), and as a
//! Warning event. A sidecar that exits shows the reason it wrote to its termination message
//! (`SidecarCrashLooping`).
//!
//! The sidecar image is `SLUICE_SIDECAR_IMAGE` (as for the operator binary), by default the
//! one the operator is released with.

mod operator_common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use operator_common::{Operator, condition, create_ec, ec_yaml, install_crd, wait_for};
use sluice_operator::build::SidecarDefaults;
use sluice_operator::crd::EventConsumer;
use sluice_operator::status::pods::{NOT_READY_AFTER, RESTARTED_WITHIN};
use sluice_tests::kube_env::{self, Namespace};

const APP: &str = r#"{name: app, image: "sluice.dev/test-app:dev", imagePullPolicy: IfNotPresent}"#;

/// Waits until the EventConsumer is `Ready=False` and `Degraded=True` with `reason`, then
/// for a Warning event with that reason; returns the Ready and Degraded messages and the
/// event's note.
async fn wait_for_reason(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> (String, String, String) {
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), ns);
    let ec = wait_for(
        &format!("{name}: Ready=False and Degraded=True {reason}"),
        timeout,
        || async {
            let ec = ecs.get(name).await.ok()?;
            let r = condition(&ec, "Ready")?;
            let d = condition(&ec, "Degraded")?;
            (r.0 == "False" && r.1 == reason && d.0 == "True" && d.1 == reason).then_some(ec)
        },
    )
    .await;
    let ready = condition(&ec, "Ready").unwrap().2;
    let degraded = condition(&ec, "Degraded").unwrap().2;
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let event = wait_for(
        &format!("{name}: a {reason} Warning event"),
        Duration::from_secs(30),
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
        },
    )
    .await;
    (ready, degraded, event.note.unwrap_or_default())
}

#[tokio::test]
async fn images_that_cannot_be_pulled_crash_loops_and_a_sidecar_without_kafka_say_so() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    // One namespace and one operator for the three cases, created together so their waits
    // overlap (the Kafka case needs the sidecar to run NOT_READY_AFTER before it counts).
    let ns = Namespace::create(&client, "op-pods").await;
    let defaults = SidecarDefaults {
        image: std::env::var("SLUICE_SIDECAR_IMAGE").unwrap_or(SidecarDefaults::default().image),
        ..Default::default()
    };
    let _operator = Operator::start_with(&client, &ns.name, "op-pods", defaults);

    // A port nothing listens on, on the address the pods reach the test bed's Kafka at; an
    // application that answers (the test app; its collector is never reached, as nothing is
    // delivered), so the sidecar waits only for Kafka.
    let bootstrap = sluice_tests::kafka::pod_bootstrap();
    let host = bootstrap.rsplit_once(':').unwrap().0;
    let app = r#"{name: app, image: "sluice.dev/testapp:dev", imagePullPolicy: Never, env: [{name: TESTAPP_COLLECTOR, value: "127.0.0.1:1"}]}"#;
    let yaml = ec_yaml("orders", 1, "")
        .replace(&bootstrap, &format!("{host}:1"))
        .replace(APP, app);
    assert!(yaml.contains(&format!("{host}:1")) && yaml.contains("testapp"));
    create_ec(&client, &ns.name, "nokafka", &yaml).await;

    // The secured cluster's SCRAM listener for pods, a known user with a wrong password.
    let (user, _) = sluice_tests::kafka::cluster::SCRAM_USER;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for (name, key, value) in [
        (
            "kafka-cluster-ca",
            "ca.crt",
            sluice_tests::kafka::cluster::pki_file("ca.crt"),
        ),
        ("kafka-user", "password", "not-the-password".to_owned()),
    ] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "stringData": {key: value, "username": user},
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let auth = "\n    auth: {sasl: {mechanism: SCRAM-SHA-512, secretRef: {name: kafka-user}}, tls: {caSecretRef: {name: kafka-cluster-ca}}}";
    let scram = sluice_tests::kafka::cluster::pod_scram_bootstrap();
    let yaml = ec_yaml("orders", 1, auth)
        .replace(&bootstrap, &scram)
        .replace(APP, app);
    assert!(yaml.contains(&scram) && yaml.contains("SCRAM-SHA-512"));
    create_ec(&client, &ns.name, "badauth", &yaml).await;

    // An application that never answers: the delivery URL is a port nothing listens on in
    // the pod (the test app listens on 8080).
    let url = "http://127.0.0.1:1/events";
    let yaml = ec_yaml("orders", 1, "")
        .replace("http://127.0.0.1:8080/events", url)
        .replace(APP, app);
    assert!(yaml.contains(url));
    create_ec(&client, &ns.name, "noapp", &yaml).await;

    // Nothing listens on 127.0.0.1:1: the pull fails at once, without any network.
    let missing = "127.0.0.1:1/sluice/missing:none";
    let yaml = ec_yaml("orders", 1, "").replace(
        APP,
        &format!(r#"{{name: app, image: "{missing}", imagePullPolicy: IfNotPresent}}"#),
    );
    assert!(yaml.contains(missing));
    create_ec(&client, &ns.name, "nopull", &yaml).await;
    // The sidecar image's binary refuses an unknown flag and exits 2 at once.
    let yaml = ec_yaml("orders", 1, "").replace(
        APP,
        r#"{name: app, image: "sluice.dev/consumer:dev", imagePullPolicy: IfNotPresent, args: ["--no-such-flag"]}"#,
    );
    create_ec(&client, &ns.name, "crashing", &yaml).await;
    // A librdkafka property that does not exist: the sidecar (the CRD checks only the key's
    // form) fails to create its consumer once its application answers, writes why to its
    // termination message file and exits 1.
    let yaml =
        ec_yaml("orders", 1, "\n    properties: {no.such.property: \"1\"}").replace(APP, app);
    assert!(yaml.contains("no.such.property"));
    create_ec(&client, &ns.name, "badprop", &yaml).await;

    let timeout = Duration::from_secs(120);
    let (pull, crash, sidecar_crash) = tokio::join!(
        wait_for_reason(&client, &ns.name, "nopull", "ImagePullFailed", timeout),
        wait_for_reason(
            &client,
            &ns.name,
            "crashing",
            "ApplicationCrashLooping",
            timeout
        ),
        wait_for_reason(&client, &ns.name, "badprop", "SidecarCrashLooping", timeout),
    );
    let (ready, degraded, note) = pull;
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("container app of pod nopull-") && text.contains(missing),
            "{text}"
        );
    }
    assert!(ready.starts_with("0 of 1 pods are ready: "), "{ready}");
    let (ready, degraded, note) = crash;
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("container app of pod crashing-")
                && text.contains("exit code 2")
                && text.contains("-c app --previous"),
            "{text}"
        );
    }
    // The sidecar's termination message (its words, not the kubelet's log fallback: the
    // prefix exists only there) is in the message.
    let (ready, degraded, note) = sidecar_crash;
    println!("badprop: Ready: {ready}");
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("the sluice sidecar of pod badprop-")
                && text.contains(
                    "exit code 1 (Error): the sidecar failed: creating the Kafka consumer"
                )
                && text.contains("no.such.property"),
            "{text}"
        );
    }
    // A crash loop stays one between its restarts: past the window in which a restarted
    // container still counts, the reason has not flipped (no Recovered event).
    tokio::time::sleep(RESTARTED_WITHIN.min(Duration::from_secs(30))).await;
    let ec = Api::<EventConsumer>::namespaced(client.clone(), &ns.name)
        .get("crashing")
        .await
        .unwrap();
    assert_eq!(
        condition(&ec, "Degraded").map(|d| (d.0, d.1)),
        Some(("True".into(), "ApplicationCrashLooping".into()))
    );
    let recovered = Api::<Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Recovered"))
        .count();
    assert_eq!(recovered, 0, "the status flipped back between restarts");

    // The sidecars that run but never become ready, each with the cause its /readyz gives
    // (read by the operator once they have been not ready for NOT_READY_AFTER).
    let timeout = NOT_READY_AFTER + Duration::from_secs(90);
    let (nokafka, badauth, noapp) = tokio::join!(
        wait_for_reason(&client, &ns.name, "nokafka", "KafkaUnreachable", timeout),
        wait_for_reason(&client, &ns.name, "badauth", "KafkaAuthFailed", timeout),
        wait_for_reason(
            &client,
            &ns.name,
            "noapp",
            "ApplicationUnreachable",
            timeout
        ),
    );
    let (ready, degraded, note) = nokafka;
    println!("nokafka: Ready: {ready}\nnokafka: event: {note}");
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("the sluice sidecar of pod nokafka-")
                && text.contains("cannot reach Kafka: no Kafka broker is reachable")
                && text.contains("spec.kafka.bootstrapServers"),
            "{text}"
        );
    }
    let (ready, degraded, note) = badauth;
    println!("badauth: Ready: {ready}\nbadauth: event: {note}");
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("the sluice sidecar of pod badauth-")
                && text.contains("is refused by Kafka: Kafka refused the credentials")
                && text.contains("SASL authentication error")
                && !text.contains("suppressed"),
            "{text}"
        );
    }
    let (ready, degraded, note) = noapp;
    println!("noapp: Ready: {ready}\nnoapp: event: {note}");
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("the sluice sidecar of pod noapp-")
                && text
                    .contains("gets no answer from its application (waiting for the application)")
                && text.contains("spec.delivery.url"),
            "{text}"
        );
    }
}
