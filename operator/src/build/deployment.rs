//! The Deployment: the user's pod template with the sidecar injected.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, HTTPGetAction, HTTPHeader,
    KeyToPath, LifecycleHandler, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile,
    SecretProjection, SecurityContext, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sluice_config::DRAIN_TOKEN_HEADER;

use super::config::{
    CONFIG_FILE, DRAIN_TOKEN_FILE, SASL_PASSWORD_FILE, SASL_USERNAME_FILE, TLS_CA_FILE,
    TLS_CERT_FILE, TLS_KEY_FILE,
};
use super::{
    CONFIG_HASH_ANNOTATION, CONFIG_KEY, DRAIN_TOKEN_KEY, Input, MOUNT_PATH, SidecarMode,
    VOLUME_NAME, child_meta, config_map_name, default_sidecar_resources, drain_secret_name,
    selector_labels,
};
use crate::crd::{SIDECAR_ADMIN_PORT, SIDECAR_CONTAINER_NAME};
use crate::tuning::Tuning;

/// The user (and group) the sidecar runs as: the non-root user of the sidecar image.
pub const SIDECAR_UID: i64 = 65532;
/// Name of the sidecar's admin port.
pub const ADMIN_PORT_NAME: &str = "sluice-admin";

/// The Deployment of an EventConsumer.
pub fn deployment(input: &Input<'_>, tuning: &Tuning, config_hash: &str) -> Deployment {
    let user = &input.spec.template;
    let mut pod = user.spec.clone().unwrap_or_default();

    // The application's containers drain the sidecar before they get SIGTERM. (`validate`
    // has refused a user-defined preStop; none is replaced here.)
    for c in &mut pod.containers {
        let lifecycle = c.lifecycle.get_or_insert_with(Default::default);
        lifecycle.pre_stop = Some(drain_hook(input.drain_token));
    }
    let sidecar = sidecar_container(input);
    match input.defaults.mode {
        SidecarMode::Native => pod
            .init_containers
            .get_or_insert_with(Vec::new)
            .push(sidecar),
        SidecarMode::Container => pod.containers.push(sidecar),
    }
    pod.volumes
        .get_or_insert_with(Vec::new)
        .push(sidecar_volume(input));
    // The grace period counts from the start of the preStop hook, so it must cover the whole
    // drain; a user's longer one (for the application's own shutdown) is kept.
    let tuned = i64::try_from(tuning.termination_grace_period_seconds).unwrap_or(i64::MAX);
    pod.termination_grace_period_seconds =
        Some(pod.termination_grace_period_seconds.unwrap_or(0).max(tuned));

    let mut meta = user.metadata.clone().unwrap_or_default();
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(selector_labels(input.name));
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned());
    // Fields a pod template must not carry.
    meta.name = None;
    meta.namespace = None;

    // The hash also on the Deployment itself, so a metadata-only read tells the reconciler
    // whether this pass rolls the pods.
    let mut metadata = child_meta(input, input.name.to_owned());
    metadata.annotations = Some(BTreeMap::from([(
        CONFIG_HASH_ANNOTATION.to_owned(),
        config_hash.to_owned(),
    )]));
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(input.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(input.name)),
                ..Default::default()
            },
            // One pod at a time: a new pod joins (maxSurge 1) before an old one drains and
            // leaves (maxUnavailable 0), so the group never has fewer members than asked
            // for and each rebalance moves only one member's partitions.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(5),
            template: PodTemplateSpec {
                metadata: Some(meta),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The preStop hook of the application containers: `GET /drain` on the sidecar's admin
/// port. The kubelet runs it from the node against the pod's IP (no `host`), with the
/// EventConsumer's drain token.
pub fn drain_hook(token: &str) -> LifecycleHandler {
    LifecycleHandler {
        http_get: Some(HTTPGetAction {
            path: Some("/drain".into()),
            port: IntOrString::Int(SIDECAR_ADMIN_PORT),
            scheme: Some("HTTP".into()),
            http_headers: Some(vec![HTTPHeader {
                name: DRAIN_TOKEN_HEADER.into(),
                value: token.to_owned(),
            }]),
            host: None,
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn sidecar_container(input: &Input<'_>) -> Container {
    let overrides = input.spec.sidecar.as_ref();
    let image = overrides
        .and_then(|s| s.image.clone())
        .unwrap_or_else(|| input.defaults.image.clone());
    let resources = overrides
        .and_then(|s| s.resources.clone())
        .unwrap_or_else(default_sidecar_resources);
    Container {
        name: SIDECAR_CONTAINER_NAME.into(),
        image: Some(image),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec![
            "--config".into(),
            format!("{MOUNT_PATH}/{CONFIG_FILE}"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: SIDECAR_ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Native sidecars: the application starts once this container counts as started.
        // /healthz answers as soon as the admin listener is up — it never waits for the
        // application (the sidecar waits for that in the background; /readyz reflects it).
        startup_probe: Some(http_probe("/healthz", 1, 60)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        restart_policy: match input.defaults.mode {
            SidecarMode::Native => Some("Always".into()),
            SidecarMode::Container => None,
        },
        resources: Some(resources),
        // The restricted Pod Security profile, plus a read-only root file system.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME_NAME.into(),
            mount_path: MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn key(key: &str, path: &str) -> KeyToPath {
    KeyToPath {
        key: key.to_owned(),
        path: path.to_owned(),
        mode: None,
    }
}

fn secret(name: &str, items: Vec<KeyToPath>) -> VolumeProjection {
    VolumeProjection {
        secret: Some(SecretProjection {
            name: name.to_owned(),
            items: Some(items),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

/// One projected volume with everything the sidecar reads: its configuration, the drain
/// token and the Kafka credentials (only the referenced keys, at fixed paths).
fn sidecar_volume(input: &Input<'_>) -> Volume {
    let mut sources = vec![
        VolumeProjection {
            config_map: Some(ConfigMapProjection {
                name: config_map_name(input.name),
                items: Some(vec![key(CONFIG_KEY, CONFIG_FILE)]),
                optional: Some(false),
            }),
            ..Default::default()
        },
        secret(
            &drain_secret_name(input.name),
            vec![key(DRAIN_TOKEN_KEY, DRAIN_TOKEN_FILE)],
        ),
    ];
    if let Some(auth) = &input.spec.kafka.auth {
        if let Some(sasl) = &auth.sasl {
            let r = &sasl.secret_ref;
            let mut items = vec![key(&r.password_key, SASL_PASSWORD_FILE)];
            if sasl.username.is_none() {
                items.insert(0, key(&r.username_key, SASL_USERNAME_FILE));
            }
            sources.push(secret(&r.name, items));
        }
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                sources.push(secret(&ca.name, vec![key(&ca.key, TLS_CA_FILE)]));
            }
            if let Some(client) = &tls.client_cert_secret_ref {
                sources.push(secret(
                    &client.name,
                    vec![
                        key(&client.cert_key, TLS_CERT_FILE),
                        key(&client.key_key, TLS_KEY_FILE),
                    ],
                ));
            }
        }
    }
    Volume {
        name: VOLUME_NAME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: Some(0o444),
        }),
        ..Default::default()
    }
}
