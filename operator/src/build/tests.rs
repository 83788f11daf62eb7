use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use sluice_config::SidecarConfig;

use super::*;
use crate::crd::EventConsumerSpec;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn spec(yaml: &str) -> EventConsumerSpec {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("test spec does not parse: {e}\n{yaml}"))
}

const MINIMAL: &str = r#"
kafka:
  bootstrapServers: "kafka.kafka.svc:9092"
  topics: [orders]
delivery:
  url: http://127.0.0.1:8080/events
template:
  spec:
    containers:
    - {name: app, image: "shop/inventory:1.4", ports: [{containerPort: 8080}]}
"#;

const SASL_TLS: &str = r#"
kafka:
  bootstrapServers: "kafka-0.kafka:9093,kafka-1.kafka:9093"
  topics: [orders, refunds]
  groupId: shop.inventory
  startFrom: latest
  auth:
    sasl: {mechanism: SCRAM-SHA-512, secretRef: {name: inventory-user, usernameKey: user, passwordKey: pass}}
    tls:
      caSecretRef: {name: cluster-ca}
      clientCertSecretRef: {name: inventory-cert}
  properties: {isolation.level: read_committed, client.rack: eu-west-1a}
delivery:
  url: http://localhost:8080/events
  timeout: 20s
  deadLetterTopic: orders.inventory.dlq
  retry: {maxAttempts: 8, initialBackoff: 500ms, maxBackoff: 1m}
processing:
  maxDuration: 2m
replicas: 3
template:
  metadata:
    labels: {app: inventory, team: shop}
    annotations: {prometheus.io/scrape: "true"}
  spec:
    serviceAccountName: inventory
    initContainers:
    - {name: migrate, image: "shop/inventory:1.4", args: [migrate]}
    containers:
    - {name: app, image: "shop/inventory:1.4"}
    volumes:
    - name: cache
      emptyDir: {}
"#;

const KEY_ORDERING: &str = r#"
kafka:
  bootstrapServers: "10.88.0.1:9094"
  topics: [payments]
delivery:
  url: http://[::1]:9000/payment
  ordering: key
  maxInFlight: 256
replicas: 2
template:
  spec:
    containers:
    - {name: app, image: "pay/worker:2"}
    - {name: metrics-proxy, image: "proxy:1"}
"#;

const KIP848: &str = r#"
kafka:
  bootstrapServers: "kafka:9092"
  topics: [clicks]
  auth:
    tls: {}
delivery:
  url: http://127.0.0.1:8080/
  ordering: none
membership:
  protocol: consumer
template:
  spec:
    terminationGracePeriodSeconds: 600
    containers:
    - {name: app, image: "clicks:3"}
"#;

const SIDECAR_OVERRIDES: &str = r#"
kafka:
  bootstrapServers: "kafka:9092"
  topics: [audit]
  auth:
    sasl: {mechanism: PLAIN, secretRef: {name: audit-user}}
delivery:
  url: http://127.0.0.1:8080/audit
membership:
  sessionTimeout: 10s
  heartbeatInterval: 2s
sidecar:
  image: registry.example/sluice/consumer:1.2.3
  resources:
    requests: {cpu: 200m, memory: 512Mi}
    limits: {memory: 1Gi}
template:
  spec:
    containers:
    - {name: app, image: "audit:1"}
"#;

fn secrets_for(spec: &EventConsumerSpec) -> BTreeMap<String, SecretData> {
    let mut out: BTreeMap<String, SecretData> = BTreeMap::new();
    if let Some(auth) = &spec.kafka.auth {
        if let Some(s) = &auth.sasl {
            let r = &s.secret_ref;
            let e = out.entry(r.name.clone()).or_default();
            if s.username.is_none() {
                e.insert(r.username_key.clone(), b"user".to_vec());
            }
            e.insert(r.password_key.clone(), b"secret-password".to_vec());
        }
        if let Some(t) = &auth.tls {
            if let Some(ca) = &t.ca_secret_ref {
                out.entry(ca.name.clone())
                    .or_default()
                    .insert(ca.key.clone(), b"-----CA-----".to_vec());
            }
            if let Some(c) = &t.client_cert_secret_ref {
                let e = out.entry(c.name.clone()).or_default();
                e.insert(c.cert_key.clone(), b"-----CERT-----".to_vec());
                e.insert(c.key_key.clone(), b"-----KEY-----".to_vec());
            }
        }
    }
    out
}

fn build_with(
    spec: &EventConsumerSpec,
    defaults: &SidecarDefaults,
) -> Result<Desired, InvalidSpec> {
    let secrets = secrets_for(spec);
    build(&Input {
        name: "inventory",
        namespace: "shop",
        uid: "6a1e2f0c-0000-4000-8000-000000000001",
        spec,
        drain_token: TOKEN,
        secrets: &secrets,
        defaults,
    })
}

fn build_ok(yaml: &str) -> Desired {
    build_with(&spec(yaml), &SidecarDefaults::default()).expect("the spec is valid")
}

fn render(d: &Desired) -> String {
    let docs = [
        serde_norway::to_string(&d.config_map).unwrap(),
        serde_norway::to_string(&d.deployment).unwrap(),
        serde_norway::to_string(&d.pdb).unwrap(),
    ];
    docs.iter().map(|d| format!("---\n{d}")).collect()
}

/// Compares with `snapshots/<name>.yaml`; `SLUICE_UPDATE_SNAPSHOTS=1` rewrites it.
fn assert_snapshot(name: &str, actual: &str) {
    // The folder at run time (cargo sets it for the test process): CI may reuse a test
    // binary built in an earlier clone of the same sources (.ci/run).
    let path = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("src/build/snapshots")
        .join(format!("{name}.yaml"));
    if std::env::var("SLUICE_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read the snapshot {}: {e}; create it with SLUICE_UPDATE_SNAPSHOTS=1 cargo test -p sluice-operator", path.display())
    });
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the built objects at line {}:\n  snapshot: {:?}\n  built:    {:?}\nIf the change is intended, review it and rewrite the snapshots with SLUICE_UPDATE_SNAPSHOTS=1 cargo test -p sluice-operator",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

#[test]
fn golden_minimal() {
    assert_snapshot("minimal", &render(&build_ok(MINIMAL)));
}

#[test]
fn golden_sasl_tls() {
    assert_snapshot("sasl-tls", &render(&build_ok(SASL_TLS)));
}

#[test]
fn golden_key_ordering() {
    assert_snapshot("key-ordering", &render(&build_ok(KEY_ORDERING)));
}

#[test]
fn golden_kip848() {
    assert_snapshot("kip848", &render(&build_ok(KIP848)));
}

#[test]
fn golden_sidecar_overrides_as_plain_container() {
    let defaults = SidecarDefaults {
        image: "ignored/by-override:0".into(),
        mode: SidecarMode::Container,
    };
    let d = build_with(&spec(SIDECAR_OVERRIDES), &defaults).unwrap();
    assert_snapshot("sidecar-overrides", &render(&d));
}

fn pod(d: &Desired) -> &PodSpec {
    d.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn sidecar(d: &Desired) -> &Container {
    pod(d)
        .init_containers
        .iter()
        .flatten()
        .chain(pod(d).containers.iter())
        .find(|c| c.name == "sluice")
        .expect("the sidecar is injected")
}

fn config_of(d: &Desired) -> SidecarConfig {
    let json = &d.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let config =
        SidecarConfig::from_json(json).expect("the sidecar reads the rendered configuration");
    config
        .validate()
        .expect("the rendered configuration is valid for the sidecar");
    config
}

#[test]
fn native_sidecar_is_the_last_init_container_with_restart_policy_always() {
    let d = build_ok(SASL_TLS);
    let inits = pod(&d).init_containers.as_ref().unwrap();
    assert_eq!(
        inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["migrate", "sluice"]
    );
    assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
    assert!(pod(&d).containers.iter().all(|c| c.name != "sluice"));
}

#[test]
fn plain_container_mode_puts_the_sidecar_among_the_containers() {
    let defaults = SidecarDefaults {
        mode: SidecarMode::Container,
        ..Default::default()
    };
    let d = build_with(&spec(MINIMAL), &defaults).unwrap();
    let names: Vec<_> = pod(&d).containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "sluice"]);
    assert_eq!(sidecar(&d).restart_policy, None);
    assert!(
        pod(&d)
            .init_containers
            .as_ref()
            .is_none_or(|v| v.is_empty())
    );
}

#[test]
fn every_application_container_drains_the_sidecar_with_the_token() {
    let d = build_ok(KEY_ORDERING);
    let apps: Vec<_> = pod(&d)
        .containers
        .iter()
        .filter(|c| c.name != "sluice")
        .collect();
    assert_eq!(apps.len(), 2);
    for c in apps {
        let get = c
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(get.path.as_deref(), Some("/drain"));
        assert_eq!(get.port, IntOrString::Int(9898));
        assert_eq!(get.host, None, "the kubelet must call the pod IP");
        let headers = get.http_headers.as_ref().unwrap();
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].name, "X-Sluice-Drain-Token");
        assert_eq!(headers[0].value, TOKEN);
    }
    assert!(
        sidecar(&d).lifecycle.is_none(),
        "the sidecar drains on SIGTERM, not via a hook"
    );
}

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

#[test]
fn a_user_prestop_is_a_validation_error_not_replaced() {
    let yaml = MINIMAL.replace(
        "ports: [{containerPort: 8080}]}",
        "ports: [{containerPort: 8080}], lifecycle: {preStop: {exec: {command: [sleep, '5']}}}}",
    );
    let err = build_with(&spec(&yaml), &SidecarDefaults::default()).unwrap_err();
    assert_eq!(err.reason(), "PreStopConflict");
    assert!(
        err.to_string()
            .contains("containers[\"app\"].lifecycle.preStop"),
        "{err}"
    );
    assert!(err.to_string().contains("remove the preStop hook"), "{err}");
}

#[test]
fn reserved_volume_names_long_names_and_several_problems_are_all_reported() {
    let yaml = MINIMAL.replace(
        "ports: [{containerPort: 8080}]}",
        "ports: [{containerPort: 8080}], lifecycle: {preStop: {exec: {command: [x]}}}}\n    volumes: [{name: sluice-data, emptyDir: {}}, {name: sluice, emptyDir: {}}]",
    );
    let s = spec(&yaml);
    let long = "a".repeat(64);
    let err = build(&Input {
        name: &long,
        namespace: "shop",
        uid: "u",
        spec: &s,
        drain_token: TOKEN,
        secrets: &BTreeMap::new(),
        defaults: &SidecarDefaults::default(),
    })
    .unwrap_err();
    let reasons: Vec<_> = err.problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        [
            "NameTooLong",
            "PreStopConflict",
            "VolumeNameConflict",
            "VolumeNameConflict"
        ]
    );
    assert_eq!(err.reason(), "NameTooLong");
}

#[test]
fn a_container_named_sluice_is_refused_even_past_admission() {
    let yaml = MINIMAL.replace("name: app,", "name: sluice,");
    let err = build_with(&spec(&yaml), &SidecarDefaults::default()).unwrap_err();
    assert_eq!(err.reason(), "ContainerNameConflict");
}

#[test]
fn a_template_without_a_pod_spec_is_refused() {
    let mut s = spec(MINIMAL);
    s.template.spec = None;
    let err = build_with(&s, &SidecarDefaults::default()).unwrap_err();
    assert_eq!(err.reason(), "MissingContainers");
}

#[test]
fn properties_the_sidecar_refuses_surface_as_invalid_sidecar_config() {
    // `acks` passes the CRD's rules but the sidecar configuration owns it.
    let yaml = MINIMAL.replace(
        "topics: [orders]",
        "topics: [orders]\n  properties: {acks: '1'}",
    );
    let err = build_with(&spec(&yaml), &SidecarDefaults::default()).unwrap_err();
    assert_eq!(err.reason(), "InvalidSidecarConfig");
    assert!(err.to_string().contains("acks"), "{err}");
}

#[test]
fn the_rendered_configuration_is_what_the_sidecar_reads() {
    let d = build_ok(SASL_TLS);
    let c = config_of(&d);
    assert_eq!(c.kafka.group_id, "shop.inventory");
    assert_eq!(c.kafka.topics, ["orders", "refunds"]);
    assert_eq!(c.kafka.start_from, sluice_config::StartFrom::Latest);
    let auth = c.kafka.auth.as_ref().unwrap();
    let sasl = auth.sasl.as_ref().unwrap();
    assert_eq!(
        sasl.username_file.as_deref(),
        Some(std::path::Path::new("/etc/sluice/sasl/username"))
    );
    assert_eq!(sasl.username, None);
    assert_eq!(
        sasl.password_file,
        PathBuf::from("/etc/sluice/sasl/password")
    );
    let tls = auth.tls.as_ref().unwrap();
    assert_eq!(tls.ca_file, PathBuf::from("/etc/sluice/tls/ca.crt"));
    assert_eq!(
        tls.cert_file.as_deref(),
        Some(std::path::Path::new("/etc/sluice/tls/client.crt"))
    );
    assert_eq!(c.kafka.properties["isolation.level"], "read_committed");
    assert_eq!(
        c.kafka.properties["queued.min.messages"],
        d.tuning.queued_min_messages.to_string()
    );
    assert_eq!(
        c.delivery.dead_letter_topic.as_deref(),
        Some("orders.inventory.dlq")
    );
    assert_eq!(c.delivery.retry.max_attempts, 8);
    assert_eq!(
        c.drain.token_file.as_deref(),
        Some(std::path::Path::new("/etc/sluice/drain/token"))
    );
    assert_eq!(
        c.drain.timeout.as_millis() as u64,
        d.tuning.in_flight_timeout_ms
    );
    assert_eq!(
        u64::from(c.kafka.max_poll_interval_ms.unwrap()),
        d.tuning.max_poll_interval_ms
    );
    assert!(
        !d.config_map.data.as_ref().unwrap()[CONFIG_KEY].contains(TOKEN),
        "the token is not in the ConfigMap"
    );
}

#[test]
fn default_group_is_namespace_dot_name_and_tls_without_ca_probes_the_system_store() {
    let d = build_ok(KIP848);
    let c = config_of(&d);
    assert_eq!(c.kafka.group_id, "shop.inventory");
    assert_eq!(c.kafka.protocol, sluice_config::GroupProtocol::Consumer);
    assert_eq!(c.kafka.session_timeout_ms, None);
    assert_eq!(c.kafka.heartbeat_interval_ms, None);
    assert_eq!(
        c.kafka.auth.unwrap().tls.unwrap().ca_file,
        PathBuf::from("probe")
    );
    assert_eq!(d.tuning.group_id.as_deref(), Some("shop.inventory"));
}

#[test]
fn grace_period_comes_from_the_tuning_unless_the_user_asks_for_more() {
    let d = build_ok(SASL_TLS);
    assert_eq!(
        pod(&d).termination_grace_period_seconds,
        Some(d.tuning.termination_grace_period_seconds as i64)
    );
    assert!(
        d.tuning.termination_grace_period_seconds > 120,
        "covers processing.maxDuration 2m"
    );
    let d = build_ok(KIP848);
    assert_eq!(pod(&d).termination_grace_period_seconds, Some(600));
}

#[test]
fn rollout_changes_one_pod_at_a_time_and_the_pdb_allows_one_disruption() {
    let d = build_ok(SASL_TLS);
    let spec = d.deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let ru = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
    let pdb = d.pdb.spec.as_ref().unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb.selector.as_ref().unwrap().match_labels,
        Some(selector_labels("inventory"))
    );
    assert_eq!(
        spec.selector.match_labels,
        Some(selector_labels("inventory"))
    );
}

#[test]
fn user_labels_and_annotations_are_kept_and_the_selector_label_added() {
    let d = build_ok(SASL_TLS);
    let meta = d
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels["app"], "inventory");
    assert_eq!(labels["team"], "shop");
    assert_eq!(labels[SELECTOR_LABEL], "inventory");
    let ann = meta.annotations.as_ref().unwrap();
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann[CONFIG_HASH_ANNOTATION], d.config_hash);
    assert_eq!(pod(&d).service_account_name.as_deref(), Some("inventory"));
    assert!(
        pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == "cache")
    );
}

#[test]
fn every_child_is_owned_by_the_event_consumer_and_labelled() {
    let d = build_ok(MINIMAL);
    for meta in [
        &d.config_map.metadata,
        &d.deployment.metadata,
        &d.pdb.metadata,
    ] {
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "EventConsumer");
        assert_eq!(owners[0].api_version, "sluice.dev/v1alpha1");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(
            meta.labels.as_ref().unwrap()[MANAGED_BY_LABEL],
            MANAGED_BY_VALUE
        );
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
    }
    assert_eq!(
        d.config_map.metadata.name.as_deref(),
        Some("inventory-sluice")
    );
    assert_eq!(d.deployment.metadata.name.as_deref(), Some("inventory"));
    assert_eq!(d.pdb.metadata.name.as_deref(), Some("inventory"));
}

#[test]
fn the_sidecar_is_restricted_probed_and_sized() {
    let d = build_ok(MINIMAL);
    let s = sidecar(&d);
    assert_eq!(s.image.as_deref(), Some(DEFAULT_SIDECAR_IMAGE));
    assert_eq!(
        s.args.as_ref().unwrap(),
        &["--config", "/etc/sluice/config.json"]
    );
    let sc = s.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone()
    };
    assert_eq!(
        path(&s.startup_probe).as_deref(),
        Some("/healthz"),
        "startup never waits for the app"
    );
    assert_eq!(path(&s.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&s.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(s.resources, Some(default_sidecar_resources()));
}

#[test]
fn sidecar_overrides_replace_image_and_resources() {
    let d = build_with(
        &spec(SIDECAR_OVERRIDES),
        &SidecarDefaults {
            image: "flag/image:9".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let s = sidecar(&d);
    assert_eq!(
        s.image.as_deref(),
        Some("registry.example/sluice/consumer:1.2.3")
    );
    let limits = s.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "1Gi");
    // The memory limit sizes the Kafka buffers, up to their caps.
    assert_eq!(
        d.tuning.queued_max_messages_kbytes,
        crate::tuning::MAX_BUFFER_BYTES / 1024
    );
    // Without an override, the operator flag's image.
    let d = build_with(
        &spec(MINIMAL),
        &SidecarDefaults {
            image: "flag/image:9".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sidecar(&d).image.as_deref(), Some("flag/image:9"));
}

/// The sources of the sidecar's projected volume: (ConfigMap or Secret name, [(key, path)]).
fn projected_items(d: &Desired) -> Vec<(String, Vec<(String, String)>)> {
    let volumes = pod(d).volumes.as_ref().unwrap();
    let v = volumes.iter().find(|v| v.name == VOLUME_NAME).unwrap();
    let sources = v.projected.as_ref().unwrap().sources.as_ref().unwrap();
    let items: Vec<(String, Vec<(String, String)>)> = sources
        .iter()
        .map(|s| match (&s.config_map, &s.secret) {
            (Some(c), None) => (
                c.name.clone(),
                c.items
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(|i| (i.key, i.path))
                    .collect(),
            ),
            (None, Some(s)) => (
                s.name.clone(),
                s.items
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(|i| (i.key, i.path))
                    .collect(),
            ),
            _ => panic!("one source per projection"),
        })
        .collect();
    items
}

fn kv(k: &str, p: &str) -> (String, String) {
    (k.to_owned(), p.to_owned())
}

#[test]
fn only_referenced_keys_of_secrets_are_projected() {
    let d = build_ok(SASL_TLS);
    assert_eq!(
        projected_items(&d),
        vec![
            (
                "inventory-sluice".to_owned(),
                vec![kv("config.json", "config.json")]
            ),
            (
                "inventory-sluice-drain".to_owned(),
                vec![kv("drain-token", "drain/token")]
            ),
            (
                "inventory-user".to_owned(),
                vec![kv("user", "sasl/username"), kv("pass", "sasl/password")]
            ),
            ("cluster-ca".to_owned(), vec![kv("ca.crt", "tls/ca.crt")]),
            (
                "inventory-cert".to_owned(),
                vec![
                    kv("tls.crt", "tls/client.crt"),
                    kv("tls.key", "tls/client.key")
                ]
            ),
        ]
    );
    let mount = &sidecar(&d).volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (
            mount.name.as_str(),
            mount.mount_path.as_str(),
            mount.read_only
        ),
        (VOLUME_NAME, MOUNT_PATH, Some(true))
    );
}

#[test]
fn the_template_hash_follows_configuration_and_secret_data_only() {
    let s = spec(SASL_TLS);
    let base = build_with(&s, &SidecarDefaults::default()).unwrap();
    // Deterministic.
    assert_eq!(base, build_with(&s, &SidecarDefaults::default()).unwrap());
    // A rotated password rolls the pods.
    let mut secrets = secrets_for(&s);
    secrets
        .get_mut("inventory-user")
        .unwrap()
        .insert("pass".into(), b"rotated".to_vec());
    let rotated = build(&Input {
        name: "inventory",
        namespace: "shop",
        uid: "6a1e2f0c-0000-4000-8000-000000000001",
        spec: &s,
        drain_token: TOKEN,
        secrets: &secrets,
        defaults: &SidecarDefaults::default(),
    })
    .unwrap();
    assert_ne!(rotated.config_hash, base.config_hash);
    // A configuration change rolls the pods.
    let mut changed = s.clone();
    changed.delivery.max_in_flight = 7;
    assert_ne!(
        build_with(&changed, &SidecarDefaults::default())
            .unwrap()
            .config_hash,
        base.config_hash
    );
    // Scaling does not.
    let mut scaled = s.clone();
    scaled.replicas = 9;
    assert_eq!(
        build_with(&scaled, &SidecarDefaults::default())
            .unwrap()
            .config_hash,
        base.config_hash
    );
}

#[test]
fn config_hash_separates_fields() {
    let a = BTreeMap::from([(
        "ab".to_owned(),
        BTreeMap::from([("c".to_owned(), b"d".to_vec())]),
    )]);
    let b = BTreeMap::from([(
        "a".to_owned(),
        BTreeMap::from([("bc".to_owned(), b"d".to_vec())]),
    )]);
    assert_ne!(config_hash("{}", &a), config_hash("{}", &b));
    assert_eq!(config_hash("{}", &a).len(), 64);
}

#[test]
fn names_and_selector() {
    assert_eq!(config_map_name("x"), "x-sluice");
    assert_eq!(drain_secret_name("x"), "x-sluice-drain");
    assert_eq!(selector_string("x"), "sluice.dev/consumer=x");
}

#[test]
fn batch_delivery_is_rendered_only_when_set_and_fits_the_record_buffer() {
    assert_eq!(config_of(&build_ok(MINIMAL)).delivery.batch, None);
    let yaml = MINIMAL.replace(
        "url: http://127.0.0.1:8080/events",
        "url: http://127.0.0.1:8080/events\n  batch: {maxRecords: 500, maxWait: 200ms}",
    );
    let c = config_of(&build_ok(&yaml));
    let b = c.delivery.batch.expect("batch rendered");
    assert_eq!(b.max_records, 500);
    assert_eq!(b.max_bytes, 1 << 20, "the default");
    assert_eq!(b.max_wait, std::time::Duration::from_millis(200));
    // A small sidecar memory limit makes the record buffer small: the batch bytes follow.
    let yaml = MINIMAL.replace(
        "url: http://127.0.0.1:8080/events",
        "url: http://127.0.0.1:8080/events\n  batch: {maxBytes: 16777216}",
    ) + "sidecar:\n  resources:\n    limits: {memory: 64Mi}\n";
    let c = config_of(&build_ok(&yaml));
    let b = c.delivery.batch.as_ref().expect("batch rendered");
    assert_eq!(b.max_bytes, c.delivery.max_buffered_bytes / 4);
    assert!(b.max_bytes < 16 << 20);
}

/// Secrets as Strimzi writes them, used as they are: a SCRAM KafkaUser's Secret (`password`,
/// `sasl.jaas.config`; the username is the KafkaUser's name), the cluster CA from
/// `<cluster>-cluster-ca-cert`, a TLS KafkaUser's Secret (`user.crt`, `user.key`).
const STRIMZI: &str = r#"
kafka:
  bootstrapServers: "my-cluster-kafka-bootstrap.kafka:9093"
  topics: [orders]
  auth:
    sasl: {mechanism: SCRAM-SHA-512, username: inventory, secretRef: {name: inventory}}
    tls:
      caSecretRef: {name: my-cluster-cluster-ca-cert}
      clientCertSecretRef: {name: inventory-tls, certKey: user.crt, keyKey: user.key}
delivery:
  url: http://127.0.0.1:8080/events
template:
  spec:
    containers:
    - {name: app, image: "shop/inventory:1.4"}
"#;

#[test]
fn strimzi_layout_secrets_are_projected_by_their_own_keys() {
    let d = build_ok(STRIMZI);
    let items = projected_items(&d);
    assert_eq!(
        items[2..],
        [
            (
                "inventory".to_owned(),
                vec![kv("password", "sasl/password")]
            ),
            (
                "my-cluster-cluster-ca-cert".to_owned(),
                vec![kv("ca.crt", "tls/ca.crt")]
            ),
            (
                "inventory-tls".to_owned(),
                vec![
                    kv("user.crt", "tls/client.crt"),
                    kv("user.key", "tls/client.key")
                ]
            ),
        ]
    );
    // The literal username travels in the configuration; no username file is projected or
    // named.
    let c = config_of(&d);
    let sasl = c.kafka.auth.as_ref().unwrap().sasl.as_ref().unwrap();
    assert_eq!(sasl.username.as_deref(), Some("inventory"));
    assert_eq!(sasl.username_file, None);
    assert_eq!(
        sasl.password_file,
        PathBuf::from("/etc/sluice/sasl/password")
    );
    c.validate()
        .expect("the sidecar accepts the rendered configuration");
    let tls = c.kafka.auth.as_ref().unwrap().tls.as_ref().unwrap();
    assert_eq!(
        tls.key_file.as_deref(),
        Some(std::path::Path::new("/etc/sluice/tls/client.key"))
    );
}
