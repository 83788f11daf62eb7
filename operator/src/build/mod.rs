//! Build: from an EventConsumer's spec (plus the data it references) to the objects the
//! operator applies. Pure: no client, no clock, no randomness — the same input always gives
//! byte-identical output, which the golden snapshots in `snapshots/` pin down.
//!
//! The pipeline is [`validate`] (everything the API server's schema and CEL rules cannot
//! check, each problem with a reason and a fix) and then [`build`].

mod config;
mod deployment;
mod pdb;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceRequirements};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};
use sluice_config::SidecarConfig;

use crate::crd::{EventConsumerSpec, GROUP, SIDECAR_CONTAINER_NAME, VERSION};
use crate::tuning::{Tuning, tune};

pub use config::sidecar_config;
pub use deployment::deployment;
pub use pdb::pod_disruption_budget;

/// The field manager of every object (and status) the operator applies.
pub const FIELD_MANAGER: &str = "sluice-operator";
/// The label that selects an EventConsumer's pods (value: the EventConsumer's name).
pub const SELECTOR_LABEL: &str = "sluice.dev/consumer";
/// Set on every object the operator owns; the operator's watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "sluice-operator";
/// Pod-template annotation: hash of the sidecar configuration and the referenced Secrets'
/// data. A change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "sluice.dev/config-hash";
/// Key of the sidecar configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "config.json";
/// How long a sidecar running as a plain container waits, after a SIGTERM-started drain, for
/// the application's preStop `GET /drain` (the kubelet signals both containers at once, and
/// the hook's request can arrive after a short drain ended).
pub const AWAIT_PRE_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Key of the drain token in the drain-token Secret.
pub const DRAIN_TOKEN_KEY: &str = "drain-token";
/// The one volume (projected: configuration, drain token, Kafka credentials) mounted into
/// the sidecar. User volumes must not use the `sluice-` prefix.
pub const VOLUME_NAME: &str = "sluice";
pub const RESERVED_VOLUME_PREFIX: &str = "sluice-";
/// Where that volume is mounted in the sidecar.
pub const MOUNT_PATH: &str = "/etc/sluice";
/// Longest EventConsumer name: the name is a label value (63 characters at most).
pub const MAX_NAME_LEN: usize = 63;

/// The ConfigMap holding the sidecar configuration.
pub fn config_map_name(ec: &str) -> String {
    format!("{ec}-sluice")
}
/// The Secret holding the drain token (created once, owned by the EventConsumer).
pub fn drain_secret_name(ec: &str) -> String {
    format!("{ec}-sluice-drain")
}
/// The label selector of an EventConsumer's pods, in string form (`status.selector`).
pub fn selector_string(ec: &str) -> String {
    format!("{SELECTOR_LABEL}={ec}")
}

/// How the sidecar is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SidecarMode {
    /// A native sidecar (Kubernetes 1.29+): an init container with `restartPolicy: Always`.
    /// It starts before the application and stops after it, so it drains last.
    #[default]
    Native,
    /// A plain container next to the application's (for clusters without native sidecars).
    /// Kubernetes then signals all containers at once; the sidecar drains on SIGTERM and the
    /// application's preStop hook waits for that drain.
    Container,
}

/// What the operator decides about sidecars for every EventConsumer (operator flags).
#[derive(Clone, Debug, PartialEq)]
pub struct SidecarDefaults {
    /// Image used when `spec.sidecar.image` is unset.
    pub image: String,
    pub mode: SidecarMode,
}

impl Default for SidecarDefaults {
    fn default() -> Self {
        SidecarDefaults {
            image: DEFAULT_SIDECAR_IMAGE.to_owned(),
            mode: SidecarMode::Native,
        }
    }
}

/// The sidecar image the operator is released with.
pub const DEFAULT_SIDECAR_IMAGE: &str = "sluice.dev/consumer:dev";

/// The sidecar's resources when `spec.sidecar.resources` is unset (the CRD documents them).
pub fn default_sidecar_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("50m".into())),
            ("memory".to_owned(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("256Mi".into()),
        )])),
        ..Default::default()
    }
}

/// The data of one referenced Secret: only the keys the spec references, as bytes.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// Everything [`build`] needs. The Secrets' data only feeds the template hash; the
/// credentials themselves reach the pods as mounted files, never through the objects built.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub spec: &'a EventConsumerSpec,
    pub drain_token: &'a str,
    /// Referenced Secrets by name, restricted to the referenced keys.
    pub secrets: &'a BTreeMap<String, SecretData>,
    pub defaults: &'a SidecarDefaults,
}

/// The objects to apply, and the values reported in status.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub pdb: PodDisruptionBudget,
    pub tuning: Tuning,
    pub config_hash: String,
}

/// One thing wrong with a spec that only the operator can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase, static: the `Degraded` condition's reason and the event reason.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// A spec the operator cannot realise. Permanent: it waits for the spec to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; "))]
pub struct InvalidSpec {
    pub problems: Vec<Problem>,
}

impl InvalidSpec {
    /// The condition reason: the first problem's.
    pub fn reason(&self) -> &'static str {
        self.problems
            .first()
            .map(|p| p.reason)
            .unwrap_or("InvalidSpec")
    }
}

/// A spec that passed [`validate`]: the tuning and the sidecar configuration derived from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub tuning: Tuning,
    pub config: SidecarConfig,
}

/// Checks what the CRD's schema and CEL rules cannot, and derives the tuning and sidecar
/// configuration. Reports every problem at once.
pub fn validate(input: &Input<'_>) -> Result<Validated, InvalidSpec> {
    let mut problems = Vec::new();
    let spec = input.spec;
    if input.name.len() > MAX_NAME_LEN {
        problems.push(Problem {
            reason: "NameTooLong",
            message: format!(
                "the EventConsumer name {:?} has {} characters; at most {MAX_NAME_LEN} are allowed because it labels the pods; recreate it with a shorter name",
                input.name,
                input.name.len()
            ),
        });
    }
    if let Some(pod) = &spec.template.spec {
        for c in &pod.containers {
            if c.lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .is_some()
            {
                problems.push(Problem {
                    reason: "PreStopConflict",
                    message: format!(
                        "spec.template.spec.containers[{:?}].lifecycle.preStop is set, but Sluice sets every application container's preStop to drain the sidecar first (so no record is lost or duplicated on shutdown); remove the preStop hook and do that work after SIGTERM instead",
                        c.name
                    ),
                });
            }
        }
        for v in pod.volumes.iter().flatten() {
            if v.name == VOLUME_NAME || v.name.starts_with(RESERVED_VOLUME_PREFIX) {
                problems.push(Problem {
                    reason: "VolumeNameConflict",
                    message: format!(
                        "spec.template.spec.volumes[{:?}]: volume names {VOLUME_NAME:?} and {RESERVED_VOLUME_PREFIX:?}* belong to the Sluice sidecar; rename the volume",
                        v.name
                    ),
                });
            }
        }
        let sidecar_named = pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER_NAME);
        if sidecar_named {
            // The CRD's CEL rule rejects this at admission; objects written around it land here.
            problems.push(Problem {
                reason: "ContainerNameConflict",
                message: format!(
                    "a container in spec.template is named {SIDECAR_CONTAINER_NAME:?}, the name of the injected sidecar; rename the container"
                ),
            });
        }
    } else {
        problems.push(Problem {
            reason: "MissingContainers",
            message:
                "spec.template.spec is missing; it must list at least one application container"
                    .into(),
        });
    }

    let group_id = spec.kafka.effective_group_id(input.namespace, input.name);
    let tuning = tune(spec, Some(group_id));
    let mut config = sidecar_config(spec, &tuning, input.namespace, input.name);
    if input.defaults.mode == SidecarMode::Container {
        // Signalled together with the application, the sidecar waits for its preStop hook.
        config.drain.await_pre_stop = Some(AWAIT_PRE_STOP);
    }
    if let Err(e) = config.validate() {
        for p in &e.problems {
            problems.push(Problem {
                reason: "InvalidSidecarConfig",
                message: format!(
                    "the sidecar configuration derived from the spec is invalid: {p}; fix the spec field it comes from"
                ),
            });
        }
    }
    if problems.is_empty() {
        Ok(Validated { tuning, config })
    } else {
        Err(InvalidSpec { problems })
    }
}

/// Validates and builds the desired objects.
pub fn build(input: &Input<'_>) -> Result<Desired, InvalidSpec> {
    let Validated { tuning, config } = validate(input)?;
    let config_json = config.to_json();
    let config_hash = config_hash(&config_json, input.secrets);
    let config_map = ConfigMap {
        metadata: child_meta(input, config_map_name(input.name)),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), config_json)])),
        ..Default::default()
    };
    let deployment = deployment(input, &tuning, &config_hash);
    let pdb = pod_disruption_budget(input);
    Ok(Desired {
        config_map,
        deployment,
        pdb,
        tuning,
        config_hash,
    })
}

/// SHA-256 over the configuration and the referenced Secrets' data (names, keys and values,
/// each length-prefixed so no two inputs hash alike), hex encoded.
pub fn config_hash(config_json: &str, secrets: &BTreeMap<String, SecretData>) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(config_json.as_bytes());
    for (name, data) in secrets {
        field(name.as_bytes());
        for (key, value) in data {
            field(key.as_bytes());
            field(value);
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The controller owner reference to the EventConsumer: garbage collection deletes the
/// children with it.
pub fn owner_reference(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: format!("{GROUP}/{VERSION}"),
        kind: "EventConsumer".into(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Labels on every object the operator owns.
pub fn child_labels(ec: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (SELECTOR_LABEL.to_owned(), ec.to_owned()),
    ])
}

pub(crate) fn child_meta(input: &Input<'_>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(input.namespace.to_owned()),
        labels: Some(child_labels(input.name)),
        owner_references: Some(vec![owner_reference(input.name, input.uid)]),
        ..Default::default()
    }
}

pub(crate) fn selector_labels(ec: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(SELECTOR_LABEL.to_owned(), ec.to_owned())])
}

#[cfg(test)]
mod tests;
