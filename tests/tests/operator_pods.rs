//! Status that says why pods do not work, on the test bed's real node: an application image
//! that cannot be pulled, an application that exits at once, and a sidecar whose Kafka is
//! unreachable each show as `Ready=False` and `Degraded=True` with their own reason and the
//! kubelet's message, and as a Warning event.

mod operator_common;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};
use operator_common::{Operator, condition, create_ec, ec_yaml, install_crd, wait_for};
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
    let _operator = Operator::start(&client, &ns.name, "op-pods");

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

    let timeout = Duration::from_secs(120);
    let (pull, crash) = tokio::join!(
        wait_for_reason(&client, &ns.name, "nopull", "ImagePullFailed", timeout),
        wait_for_reason(
            &client,
            &ns.name,
            "crashing",
            "ApplicationCrashLooping",
            timeout
        ),
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

    // The sidecar whose Kafka is unreachable: running, never ready.
    let (ready, degraded, note) = wait_for_reason(
        &client,
        &ns.name,
        "nokafka",
        "SidecarNotReady",
        NOT_READY_AFTER + Duration::from_secs(90),
    )
    .await;
    // The message names the pod and where to read the cause (the sidecar's /readyz, its
    // sluice_not_ready{reason} metric); it does not say the cause itself (the operator does
    // not read the sidecar's /readyz), so only the pod is checked here.
    for text in [&ready, &degraded, &note] {
        assert!(
            text.contains("the sluice sidecar of pod nokafka-") && text.contains("/readyz"),
            "{text}"
        );
    }
}
