//! The `EventConsumer` custom resource (`sluice.dev/v1alpha1`).
//!
//! `///` comments on the types below are user documentation: they become the CRD's OpenAPI
//! descriptions and so `kubectl explain eventconsumer.spec...`. Notes for developers use `//`.
//!
//! Validation happens at the API server. Single-field constraints are OpenAPI keywords
//! (enums, ranges, patterns, `required`); everything that needs CEL (durations, cross-field
//! and transition rules) is an `x-kubernetes-validations` rule built by the helpers in
//! [`rules`]. Every rule's message names the field, says what is wrong and what is allowed.

// `#[kube(printcolumn(type_ = ..), printcolumn(type_ = ..))]` repeats keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tuning::Tuning;

/// The API group of Sluice's resources.
pub const GROUP: &str = "sluice.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The port of the sidecar's admin listener (metrics, health, readiness, drain). The
/// application's containers must not use it.
pub const SIDECAR_ADMIN_PORT: i32 = 9898;
/// The name of the injected sidecar container; the application's containers must not use it.
pub const SIDECAR_CONTAINER_NAME: &str = "sluice";

/// An EventConsumer runs one Kafka-consuming service: the application's pods with the Sluice
/// consumer injected as a sidecar, which joins the consumer group and delivers every record
/// to the application over HTTP on localhost, committing only what the application finished.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "EventConsumer",
    plural = "eventconsumers",
    singular = "eventconsumer",
    shortname = "ec",
    category = "sluice",
    namespaced,
    status = "EventConsumerStatus",
    derive = "PartialEq",
    doc = "An EventConsumer runs a Kafka-consuming application with the Sluice consumer sidecar: Sluice joins the consumer group, delivers each record to the application over HTTP on localhost, commits only finished records, dead-letters poison records and drains cleanly on every pod shutdown.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether the consumer is ready (the Ready condition)",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "Desired number of pods",
        json_path = ".spec.replicas"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        description = "Pods whose application and sidecar are ready",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        description = "Records not yet committed, summed over all partitions",
        json_path = ".status.lag"
    ),
    printcolumn(
        name = "Topics",
        type_ = "string",
        description = "Source topics",
        json_path = ".status.topics",
        priority = "1"
    ),
    printcolumn(
        name = "Group",
        type_ = "string",
        description = "Kafka consumer group",
        json_path = ".status.effective.groupId",
        priority = "1"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "Reason of the Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = rules::dead_letter_not_source())]
#[x_kube(validation = rules::timeout_within_max_duration())]
#[x_kube(validation = rules::url_port_not_admin())]
#[serde(rename_all = "camelCase")]
pub struct EventConsumerSpec {
    /// Where and how to consume: brokers, topics, consumer group, authentication.
    pub kafka: KafkaSpec,

    /// How each record is delivered to the application: URL, timeout, ordering, concurrency,
    /// retries and dead-lettering.
    pub delivery: DeliverySpec,

    /// What the application's handler needs. Drives the drain, poll-interval and pod
    /// termination timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing: Option<ProcessingSpec>,

    /// How the pods share the topics' partitions (the consumer-group protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipSpec>,

    /// Number of pods. Each pod is one member of the consumer group; members beyond the
    /// number of partitions stay idle. Changed by `kubectl scale ec/NAME --replicas=N`.
    /// Default 1; 0 stops consuming (committed offsets are kept).
    #[serde(default = "defaults::replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The application's pod template (a core/v1 PodTemplateSpec, as in a Deployment).
    /// Sluice adds its sidecar container, a preStop hook on the application containers that
    /// drains the sidecar, the selector labels and the termination grace period. It needs at
    /// least one container; no container may be named `sluice` or use port 9898 (both
    /// belong to the sidecar); restartPolicy, if set, must be Always.
    #[schemars(schema_with = "schema::pod_template")]
    #[x_kube(validation = rules::template_has_containers())]
    #[x_kube(validation = rules::template_ports_free())]
    #[x_kube(validation = rules::template_names_free())]
    #[x_kube(validation = rules::template_restart_policy())]
    pub template: PodTemplateSpec,

    /// Overrides for the injected Sluice sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
}

/// Kafka connection and consumer-group settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = rules::group_id_immutable())]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated list of broker addresses, each `host:port`, used for the first
    /// connection (librdkafka `bootstrap.servers`). Example: `kafka-0.kafka:9092,kafka-1.kafka:9092`.
    #[schemars(
        length(min = 3, max = 2048),
        regex(pattern = r"^[^,\s:]+:[0-9]{1,5}(,[^,\s:]+:[0-9]{1,5})*$")
    )]
    pub bootstrap_servers: String,

    /// Topics to consume (1 to 64, unique). Kafka topic names: 1 to 249 characters from
    /// `a-z A-Z 0-9 . _ -`, not `.` or `..`.
    #[schemars(
        length(min = 1, max = 64),
        inner(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))
    )]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    #[x_kube(validation = rules::topics_not_dots())]
    pub topics: Vec<String>,

    /// Kafka consumer group id. Default: `<namespace>.<name>` of this EventConsumer.
    /// Immutable: it cannot be added, changed or removed after creation, because a new
    /// group starts without the old group's committed offsets. 1 to 255 characters from
    /// `a-z A-Z 0-9 . _ -`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,255}$"))]
    pub group_id: Option<String>,

    /// Where to start when the group has no committed offset for a partition (librdkafka
    /// `auto.offset.reset`): `earliest` (the oldest retained record, the default) or
    /// `latest` (only records produced after the group first joins).
    #[serde(default)]
    pub start_from: StartFrom,

    /// Authentication and encryption. Credentials come only from Secrets, mounted into the
    /// sidecar as files; they never appear in this resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<KafkaAuth>,

    /// librdkafka consumer properties passed through as-is (string values), e.g.
    /// `{"isolation.level": "read_committed", "client.rack": "eu-west-1a"}`. At most 64.
    /// Keys that Sluice sets itself (group, offsets, timeouts, fetch bounds, security, and
    /// anything carrying credentials) are rejected: use the dedicated fields instead.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "schema::properties")]
    #[x_kube(validation = rules::properties_key_format())]
    #[x_kube(validation = rules::properties_not_owned())]
    #[x_kube(validation = rules::properties_no_credentials())]
    pub properties: BTreeMap<String, String>,
}

/// Where a group without committed offsets starts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest record still retained.
    #[default]
    Earliest,
    /// Only records produced after the group first commits.
    Latest,
}

/// Authentication to the brokers. Set `sasl`, `tls` or both (SASL over TLS).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = rules::auth_not_empty())]
#[serde(rename_all = "camelCase")]
pub struct KafkaAuth {
    /// SASL authentication with a username and password from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<SaslAuth>,
    /// TLS to the brokers. An empty object (`tls: {}`) enables TLS with the sidecar image's
    /// system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsAuth>,
}

/// SASL credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = rules::username_or_username_key())]
#[serde(rename_all = "camelCase")]
pub struct SaslAuth {
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`. Without `tls`, PLAIN
    /// sends the password in clear text.
    pub mechanism: SaslMechanism,
    /// The username, written here instead of read from the Secret: for Secrets that hold
    /// only the password, such as those Strimzi's User Operator writes for a KafkaUser
    /// (keys `password` and `sasl.jaas.config`; the username is the KafkaUser's name, which
    /// is also the Secret's name). When set, `secretRef.usernameKey` must not be set.
    /// 1 to 255 characters, no whitespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^\S+$"))]
    pub username: Option<String>,
    /// The Secret (in this namespace) holding the password, and the username unless
    /// `username` is set.
    pub secret_ref: UserPasswordSecretRef,
}

/// A SASL mechanism.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    /// Username and password, sent as-is (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// Salted challenge-response with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Salted challenge-response with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// A Secret holding a username and a password.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserPasswordSecretRef {
    /// Name of the Secret, in the EventConsumer's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key of the username in the Secret. Default `username`; not read when `sasl.username`
    /// is set.
    #[serde(default = "defaults::username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub username_key: String,
    /// Key of the password in the Secret. Default `password`.
    #[serde(default = "defaults::password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub password_key: String,
}

/// TLS settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsAuth {
    /// The Secret key holding the PEM CA bundle that signs the brokers' certificates.
    /// Unset: the system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// The Secret with the client certificate and its private key (PEM) for mutual TLS: by
    /// default a Secret of type kubernetes.io/tls (keys `tls.crt` and `tls.key`); for a
    /// Strimzi KafkaUser's Secret set `certKey: user.crt` and `keyKey: user.key`. Unset: no
    /// client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<ClientCertSecretRef>,
}

/// One key of a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the EventConsumer's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key in the Secret. Default `ca.crt`.
    #[serde(default = "defaults::ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A Secret holding a client certificate and its private key, both PEM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = rules::cert_key_distinct())]
#[serde(rename_all = "camelCase")]
pub struct ClientCertSecretRef {
    /// Name of the Secret, in the EventConsumer's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key of the PEM client certificate in the Secret. Default `tls.crt`; `user.crt` in a
    /// Strimzi KafkaUser's Secret.
    #[serde(default = "defaults::cert_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub cert_key: String,
    /// Key of the PEM private key (unencrypted) in the Secret. Default `tls.key`;
    /// `user.key` in a Strimzi KafkaUser's Secret.
    #[serde(default = "defaults::key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key_key: String,
}

/// How records reach the application.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = rules::backoff_bounds())]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// The application's HTTP endpoint that receives one POST per record, on the pod's
    /// loopback interface: `http://127.0.0.1:PORT/PATH`, `http://localhost:PORT/PATH` or
    /// `http://[::1]:PORT/PATH`. Port 9898 belongs to the sidecar.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = rules::url_loopback())]
    pub url: String,

    /// Time limit of one delivery attempt (one HTTP request), as a duration such as `10s`
    /// or `1m30s` (units `ms`, `s`, `m`, `h`). Between 100ms and 1h; default 10s. A timed-out
    /// attempt is retried like a 5xx response.
    #[serde(default = "defaults::delivery_timeout")]
    #[schemars(schema_with = "schema::duration")]
    #[x_kube(validation = rules::duration_between("timeout", "100ms", "1h"))]
    pub timeout: Duration,

    /// Which records may be in flight at the same time: `partition` (default) delivers each
    /// partition's records one at a time, in order; `key` keeps records with the same key in
    /// order and runs different keys in parallel; `none` runs up to maxInFlight records at
    /// once. In every mode only the contiguous prefix of finished offsets is committed.
    #[serde(default)]
    pub ordering: Ordering,

    /// Maximum number of records being delivered at once by one pod, over all its
    /// partitions. Between 1 and 1024; default 64.
    #[serde(default = "defaults::max_in_flight")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_in_flight: i32,

    /// Retries of failed deliveries (5xx, timeouts, refused connections).
    #[serde(default)]
    pub retry: RetrySpec,

    /// Topic that receives records which failed maxAttempts times or were refused with a
    /// 4xx; their offsets are committed only after the broker acknowledged that write.
    /// Unset: a failing record is retried forever with its partition paused; Sluice never
    /// skips a record. Must not be one of the source topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub dead_letter_topic: Option<String>,

    /// Batch delivery (off when unset): one POST carries several records of one partition,
    /// in offset order, as a CloudEvents JSON batch (`application/cloudevents-batch+json`),
    /// and a JSON answer may name records to retry, dead-letter or skip (see the README's
    /// delivery contract). maxInFlight then bounds batches in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,
}

/// Batch delivery limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// Most records in one batch. Between 1 and 10000; default 100.
    #[serde(default = "defaults::batch_max_records")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_records: i32,

    /// Most bytes (keys, values and headers) in one batch; a single larger record goes
    /// alone. Between 1024 and 16777216; default 1048576. The operator lowers it to a quarter
    /// of the sidecar's record buffer when that is smaller.
    #[serde(default = "defaults::batch_max_bytes")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_bytes: i64,

    /// How long a partial batch waits for more records before it is sent. A duration
    /// between 0s and 10s; default 50ms.
    #[serde(default = "defaults::batch_max_wait")]
    #[schemars(schema_with = "schema::duration")]
    #[x_kube(validation = rules::duration_between("maxWait", "0s", "10s"))]
    pub max_wait: Duration,
}

/// Order guarantees of delivery.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// One record at a time per partition, in offset order.
    #[default]
    Partition,
    /// One record at a time per key, in offset order; different keys in parallel.
    Key,
    /// No order; up to maxInFlight records at once.
    None,
}

/// Exponential backoff with jitter between delivery attempts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts per record before it is dead-lettered, counting the first. Between 1 and
    /// 100; default 5. Without a deadLetterTopic the record keeps being retried at
    /// maxBackoff after the last attempt, with its partition paused.
    #[serde(default = "defaults::max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,

    /// Wait before the second attempt; doubled for each further attempt up to maxBackoff.
    /// A duration between 10ms and 10m; default 200ms. Must not exceed maxBackoff.
    #[serde(default = "defaults::initial_backoff")]
    #[schemars(schema_with = "schema::duration")]
    #[x_kube(validation = rules::duration_between("initialBackoff", "10ms", "10m"))]
    pub initial_backoff: Duration,

    /// Longest wait between two attempts. A duration between 100ms and 1h; default 30s.
    #[serde(default = "defaults::max_backoff")]
    #[schemars(schema_with = "schema::duration")]
    #[x_kube(validation = rules::duration_between("maxBackoff", "100ms", "1h"))]
    pub max_backoff: Duration,
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            max_attempts: defaults::max_attempts(),
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
        }
    }
}

/// The application's processing characteristics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProcessingSpec {
    /// Worst-case time the application needs for one record. On a partition revoke and on
    /// pod shutdown the sidecar waits this long for in-flight deliveries before it commits,
    /// so it sizes max.poll.interval.ms, the drain timeout and the pod's
    /// terminationGracePeriodSeconds. A duration between 1s and 1h, at least
    /// delivery.timeout. Default: delivery.timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_duration")]
    #[x_kube(validation = rules::duration_between("maxDuration", "1s", "1h"))]
    pub max_duration: Option<Duration>,
}

/// Consumer-group membership.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = rules::session_only_classic())]
#[x_kube(validation = rules::heartbeat_only_classic())]
#[x_kube(validation = rules::heartbeat_within_session())]
#[serde(rename_all = "camelCase")]
pub struct MembershipSpec {
    /// Group protocol: `classic` (default; the cooperative-sticky assignor, so partitions
    /// that do not move keep flowing during a rebalance) or `consumer` (KIP-848, the
    /// broker assigns partitions; needs Kafka 4.0 or later; session and heartbeat timing
    /// are then the broker's group.consumer.* settings).
    #[serde(default)]
    pub protocol: GroupProtocol,

    /// Only for protocol `classic`: how long the broker waits for a crashed pod's heartbeats
    /// before giving its partitions to others (librdkafka `session.timeout.ms`). Shorter
    /// means faster failover after a crash; longer tolerates network blips and pauses
    /// without needless rebalances. Graceful shutdowns leave the group at once and do not
    /// wait for it. A duration between 6s and 30m (the broker's default
    /// group.min/max.session.timeout.ms); default 45s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_duration")]
    #[x_kube(validation = rules::duration_between("sessionTimeout", "6s", "30m"))]
    pub session_timeout: Option<Duration>,

    /// Only for protocol `classic`: interval between heartbeats (librdkafka
    /// `heartbeat.interval.ms`). At most a third of the session timeout, so two heartbeats
    /// can be lost without losing the session. A duration between 500ms and 10m; default
    /// derived from the session timeout (a third of it, at most 3s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_duration")]
    #[x_kube(validation = rules::duration_between("heartbeatInterval", "500ms", "10m"))]
    pub heartbeat_interval: Option<Duration>,
}

/// The consumer-group protocol.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic protocol with the cooperative-sticky assignor.
    #[default]
    Classic,
    /// The KIP-848 consumer protocol (Kafka 4.0 or later).
    Consumer,
}

/// Overrides for the Sluice sidecar container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Sidecar image. Default: the image the operator was released with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,

    /// Sidecar resources. The memory limit also sizes the Kafka prefetch queue and fetch
    /// sizes so the sidecar stays within it; give it at least 64Mi (a smaller limit is
    /// sized as 64Mi and risks the sidecar being OOM-killed). Default: requests 50m CPU and
    /// 64Mi memory, limit 256Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::resources")]
    pub resources: Option<ResourceRequirements>,
}

/// The observed state of an EventConsumer, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventConsumerStatus {
    /// The metadata.generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current conditions: `Ready` (pods ready and consuming), `Progressing` (a rollout is
    /// under way), `Degraded` (the operator cannot realise the spec; the reason says why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of pods (for the scale subresource).
    #[serde(default)]
    pub replicas: i32,

    /// Number of pods whose application and sidecar are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the pods, in string form (for the scale subresource and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Records not yet committed by the consumer group, summed over all partitions of its
    /// topics (log-end offset minus committed offset), as last measured by the operator from
    /// Kafka. Measured every lag interval (30s by default) but written here only when it
    /// changed noticeably (zero to non-zero and back, or by 10% or more) and at most every
    /// lag status interval (3m by default); the exact, current value is the operator's
    /// `sluice_operator_consumer_lag` metric. Unset until first measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,

    /// `spec.kafka.topics` as a comma-separated list, for the `Topics` column of
    /// `kubectl get ec -o wide` (a column over the array itself prints it as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<String>,

    /// When `lag` was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_observed_time: Option<Time>,

    /// True when the last measurements failed (Kafka did not answer, a topic is missing, the
    /// credentials were refused): `lag` is then the last value measured, at
    /// `lagObservedTime`, and may be out of date. Unset while measurements succeed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lag_stale: bool,

    /// The consumer settings and pod timing Sluice derived from the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<Tuning>,

    /// The sidecar image every pod runs: the Deployment's, recorded once its rollout is
    /// complete (during a rollout the previous value stays). Unset until the first rollout
    /// completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_image: Option<String>,

    /// Set while an operator-side change of the pods (a new sidecar image after an operator
    /// upgrade) waits for its turn: the operator rolls at most `--max-sidecar-rollouts`
    /// EventConsumers at a time for its own changes (the Progressing condition then has reason
    /// `SidecarUpdateQueued`). The sidecar image the pods will run. A change of the spec rolls
    /// at once and takes the new sidecar with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_sidecar_image: Option<String>,
}

impl KafkaSpec {
    /// The consumer group: `groupId`, or `<namespace>.<name>` when unset.
    pub fn effective_group_id(&self, namespace: &str, name: &str) -> String {
        match &self.group_id {
            Some(id) => id.clone(),
            None => format!("{namespace}.{name}"),
        }
    }
}

pub(crate) mod defaults {
    use kube::core::Duration;

    fn duration(ms: u64) -> Duration {
        std::time::Duration::from_millis(ms).into()
    }
    pub fn replicas() -> i32 {
        1
    }
    pub fn username_key() -> String {
        "username".into()
    }
    pub fn password_key() -> String {
        "password".into()
    }
    pub fn ca_key() -> String {
        "ca.crt".into()
    }
    pub fn cert_key() -> String {
        "tls.crt".into()
    }
    pub fn key_key() -> String {
        "tls.key".into()
    }
    pub fn delivery_timeout() -> Duration {
        duration(10_000)
    }
    pub fn max_in_flight() -> i32 {
        64
    }
    pub fn max_attempts() -> i32 {
        5
    }
    pub fn initial_backoff() -> Duration {
        duration(200)
    }
    pub fn max_backoff() -> Duration {
        duration(30_000)
    }
    pub fn batch_max_records() -> i32 {
        100
    }
    pub fn batch_max_bytes() -> i64 {
        1 << 20
    }
    pub fn batch_max_wait() -> Duration {
        duration(50)
    }
}

/// Schemas for fields whose Rust type does not describe them fully.
pub(crate) mod schema {
    use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

    /// A Go-style duration string. The format itself is checked by a CEL rule (see
    /// `rules::duration_between`) so the message can say what is allowed.
    pub fn duration(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "maxLength": 32})
    }

    pub fn optional_duration(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "maxLength": 32, "nullable": true})
    }

    /// The pod template's schema, with the upstream descriptions removed (they would make the
    /// CRD several hundred kilobytes, beyond what client-side `kubectl apply` accepts; the
    /// fields are the well-known PodTemplateSpec ones) and `maxItems` on the lists CEL rules
    /// iterate, so the API server's cost estimate of those rules stays bounded.
    pub fn pod_template(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = k8s_openapi::api::core::v1::PodTemplateSpec::json_schema(generator);
        let mut value = schema.to_value();
        strip_descriptions(&mut value);
        bound_list(
            &mut value,
            &["properties", "spec", "properties", "containers"],
            64,
        );
        bound_list(
            &mut value,
            &["properties", "spec", "properties", "initContainers"],
            64,
        );
        for list in ["containers", "initContainers"] {
            bound_list(
                &mut value,
                &[
                    "properties",
                    "spec",
                    "properties",
                    list,
                    "items",
                    "properties",
                    "ports",
                ],
                128,
            );
        }
        schema = Schema::try_from(value).expect("the pod template schema is an object");
        schema
    }

    /// A string map with bounded size and value length (librdkafka properties).
    pub fn properties(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "maxProperties": 64,
            "additionalProperties": {"type": "string", "maxLength": 1024},
        })
    }

    /// ResourceRequirements without the long upstream descriptions.
    pub fn resources(generator: &mut SchemaGenerator) -> Schema {
        let schema = k8s_openapi::api::core::v1::ResourceRequirements::json_schema(generator);
        let mut value = schema.to_value();
        strip_descriptions(&mut value);
        if let Some(obj) = value.as_object_mut() {
            obj.insert("nullable".into(), true.into());
        }
        // Bounded like the rest of the spec (the API server's CEL cost estimates and object
        // size stay small).
        for map in ["limits", "requests"] {
            if let Some(m) = value
                .pointer_mut(&format!("/properties/{map}"))
                .and_then(|m| m.as_object_mut())
            {
                m.insert("maxProperties".into(), 16.into());
            }
            if let Some(m) = value
                .pointer_mut(&format!("/properties/{map}/additionalProperties"))
                .and_then(|m| m.as_object_mut())
            {
                m.insert("maxLength".into(), 64.into());
            }
        }
        Schema::try_from(value).expect("the resources schema is an object")
    }

    fn strip_descriptions(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.remove("description");
                for (key, child) in map.iter_mut() {
                    // `properties` maps field names to schemas; a field may itself be named
                    // "description", so only schema keywords are removed, never properties.
                    if key == "properties" {
                        if let Some(props) = child.as_object_mut() {
                            for prop in props.values_mut() {
                                strip_descriptions(prop);
                            }
                        }
                    } else {
                        strip_descriptions(child);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip_descriptions),
            _ => {}
        }
    }

    fn bound_list(value: &mut serde_json::Value, path: &[&str], max_items: u64) {
        let mut node = value;
        for key in path {
            match node.get_mut(*key) {
                Some(next) => node = next,
                // The generator may emit a $ref here instead of an inline schema; the CRD
                // generation test asserts the bound is present, so a miss cannot go unnoticed.
                None => return,
            }
        }
        if let Some(obj) = node.as_object_mut() {
            obj.insert("maxItems".into(), max_items.into());
        }
    }
}

/// The CEL `x-kubernetes-validations` rules, each with a message that names the field, says
/// what is wrong and what is allowed.
pub mod rules {
    use kube::core::{Message, Rule};

    /// The format every duration must have: digits and a unit, repeated (Go's
    /// time.ParseDuration accepts more; this subset is what Sluice documents and parses).
    pub const DURATION_PATTERN: &str = "^([0-9]{1,9}(ms|s|m|h))+$";

    fn rule(expr: impl Into<String>, message: impl Into<String>) -> Rule {
        Rule::new(expr.into()).message(Message::Message(message.into()))
    }

    /// A duration string in `[min, max]`.
    pub fn duration_between(field: &str, min: &str, max: &str) -> Rule {
        rule(
            format!(
                "self.matches('{DURATION_PATTERN}') && duration(self) >= duration('{min}') && duration(self) <= duration('{max}')"
            ),
            format!(
                "{field} must be a duration between {min} and {max}, written as numbers with units ms, s, m or h, such as 500ms, 10s or 1m30s"
            ),
        )
    }

    pub fn dead_letter_not_source() -> Rule {
        rule(
            "!has(self.delivery.deadLetterTopic) || !(self.delivery.deadLetterTopic in self.kafka.topics)",
            "delivery.deadLetterTopic must not be one of kafka.topics: dead-lettered records would be consumed again; use a separate topic such as <topic>.dlq",
        )
    }

    pub fn timeout_within_max_duration() -> Rule {
        rule(
            "!has(self.processing) || !has(self.processing.maxDuration) || !self.processing.maxDuration.matches('^([0-9]{1,9}(ms|s|m|h))+$') || !self.delivery.timeout.matches('^([0-9]{1,9}(ms|s|m|h))+$') || duration(self.delivery.timeout) <= duration(self.processing.maxDuration)",
            "delivery.timeout must not exceed processing.maxDuration: an attempt may run for the whole delivery timeout, and maxDuration is the worst case the drain and poll timings are sized for; raise processing.maxDuration or lower delivery.timeout",
        )
    }

    pub fn url_port_not_admin() -> Rule {
        rule(
            "!isURL(self.delivery.url) || url(self.delivery.url).getPort() != '9898'",
            "delivery.url must not use port 9898: it is the Sluice sidecar's admin port; serve the application on another port",
        )
    }

    pub fn url_loopback() -> Rule {
        rule(
            "self.startsWith('http://') && isURL(self) && url(self).getHostname() in ['127.0.0.1', 'localhost', '::1']",
            "url must be an http URL on the pod's loopback interface, such as http://127.0.0.1:8080/events (hosts 127.0.0.1, localhost or [::1]): the sidecar delivers to the application in the same pod",
        )
    }

    pub fn backoff_bounds() -> Rule {
        rule(
            "!self.retry.initialBackoff.matches('^([0-9]{1,9}(ms|s|m|h))+$') || !self.retry.maxBackoff.matches('^([0-9]{1,9}(ms|s|m|h))+$') || duration(self.retry.initialBackoff) <= duration(self.retry.maxBackoff)",
            "retry.initialBackoff must not exceed retry.maxBackoff: the backoff doubles from initialBackoff up to maxBackoff",
        )
    }

    pub fn group_id_immutable() -> Rule {
        rule(
            "has(self.groupId) == has(oldSelf.groupId) && (!has(self.groupId) || self.groupId == oldSelf.groupId)",
            "groupId is immutable: it cannot be added, changed or removed after creation, because another group would start without this group's committed offsets; create a new EventConsumer to move to another group",
        )
    }

    pub fn topics_not_dots() -> Rule {
        rule(
            "self.all(t, t != '.' && t != '..')",
            "topics must not be '.' or '..': Kafka rejects these names",
        )
    }

    /// librdkafka keys the sidecar sets itself, from the spec or from the tuning.
    pub const OWNED_PROPERTIES: &[&str] = &[
        "bootstrap.servers",
        "metadata.broker.list",
        "group.id",
        "group.instance.id",
        "group.protocol",
        "group.remote.assignor",
        "client.id",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "enable.partition.eof",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "partition.assignment.strategy",
        "queued.max.messages.kbytes",
        "queued.min.messages",
        "fetch.max.bytes",
        "max.partition.fetch.bytes",
        "fetch.message.max.bytes",
        "receive.message.max.bytes",
        "statistics.interval.ms",
        "security.protocol",
        "rebalance_cb",
        "offset_commit_cb",
    ];

    pub fn properties_key_format() -> Rule {
        rule(
            "self.all(k, k.matches('^[a-z][a-z0-9._]{0,127}$'))",
            "properties keys must be librdkafka property names: lower-case letters, digits, '.' and '_', starting with a letter, at most 128 characters",
        )
    }

    pub fn properties_not_owned() -> Rule {
        let list = quoted(OWNED_PROPERTIES);
        // A static message: a messageExpression that names the offending key (filter + join
        // over map keys of unbounded length) exceeds the API server's CEL cost budget.
        rule(
            format!("self.all(k, !(k in [{list}]))"),
            format!(
                "properties must not set any of {}: Sluice sets these itself; use spec.kafka (bootstrapServers, groupId, startFrom, auth), spec.membership and spec.sidecar.resources instead",
                OWNED_PROPERTIES.join(", ")
            ),
        )
    }

    /// Prefixes and fragments of librdkafka keys that carry credentials or key material.
    pub const CREDENTIAL_KEY_PREFIXES: &[&str] = &[
        "sasl.",
        "ssl.key",
        "ssl.keystore",
        "ssl.certificate",
        "ssl.ca.",
        "ssl_engine",
    ];
    pub const CREDENTIAL_KEY_FRAGMENTS: &[&str] = &["password", "secret"];

    pub fn properties_no_credentials() -> Rule {
        let prefixes = quoted(CREDENTIAL_KEY_PREFIXES);
        let fragments = quoted(CREDENTIAL_KEY_FRAGMENTS);
        rule(
            format!(
                "!self.exists(k, [{prefixes}].exists(p, k.startsWith(p)) || [{fragments}].exists(f, k.contains(f)))"
            ),
            "properties must not carry credentials or key material (keys starting with sasl., ssl.key, ssl.keystore, ssl.certificate, ssl.ca. or ssl_engine, or containing password or secret): credentials come only from Secrets, through spec.kafka.auth.sasl.secretRef and spec.kafka.auth.tls",
        )
    }

    fn quoted(items: &[&str]) -> String {
        items
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn auth_not_empty() -> Rule {
        rule(
            "has(self.sasl) || has(self.tls)",
            "auth must set sasl, tls or both; omit auth for an unauthenticated plaintext connection",
        )
    }

    pub fn username_or_username_key() -> Rule {
        rule(
            "!has(self.username) || !has(self.secretRef.usernameKey) || self.secretRef.usernameKey == 'username'",
            "sasl.username and sasl.secretRef.usernameKey are alternatives: with username set, the username is not read from the Secret; remove secretRef.usernameKey, or remove username to read it from the Secret",
        )
    }

    pub fn cert_key_distinct() -> Rule {
        rule(
            "!has(self.certKey) || !has(self.keyKey) || self.certKey != self.keyKey",
            "clientCertSecretRef.certKey and keyKey must name different keys of the Secret: one holds the PEM certificate, the other the PEM private key (tls.crt and tls.key by default; user.crt and user.key in a Strimzi KafkaUser's Secret)",
        )
    }

    pub fn session_only_classic() -> Rule {
        rule(
            "self.protocol == 'classic' || !has(self.sessionTimeout)",
            "sessionTimeout applies only to protocol classic: with protocol consumer (KIP-848) the broker's group.consumer.session.timeout.ms governs; remove sessionTimeout",
        )
    }

    pub fn heartbeat_only_classic() -> Rule {
        rule(
            "self.protocol == 'classic' || !has(self.heartbeatInterval)",
            "heartbeatInterval applies only to protocol classic: with protocol consumer (KIP-848) the broker's group.consumer.heartbeat.interval.ms governs; remove heartbeatInterval",
        )
    }

    pub fn heartbeat_within_session() -> Rule {
        rule(
            "!has(self.heartbeatInterval) || !self.heartbeatInterval.matches('^([0-9]{1,9}(ms|s|m|h))+$') || (has(self.sessionTimeout) && !self.sessionTimeout.matches('^([0-9]{1,9}(ms|s|m|h))+$')) || duration(self.heartbeatInterval).getMilliseconds() * 3 <= (has(self.sessionTimeout) ? duration(self.sessionTimeout).getMilliseconds() : 45000)",
            "heartbeatInterval must be at most a third of sessionTimeout (default 45s), so that two lost heartbeats do not end the session; lower heartbeatInterval or raise sessionTimeout",
        )
    }

    pub fn template_has_containers() -> Rule {
        rule(
            "has(self.spec) && has(self.spec.containers) && size(self.spec.containers) > 0",
            "template.spec.containers must list at least one container: the application that receives the records",
        )
    }

    pub fn template_ports_free() -> Rule {
        rule(
            "!has(self.spec) || ((!has(self.spec.containers) || self.spec.containers.all(c, !has(c.ports) || c.ports.all(p, p.containerPort != 9898))) && (!has(self.spec.initContainers) || self.spec.initContainers.all(c, !has(c.ports) || c.ports.all(p, p.containerPort != 9898))))",
            "template containers must not use containerPort 9898: it is the Sluice sidecar's admin port (metrics, health, drain); use another port",
        )
    }

    pub fn template_names_free() -> Rule {
        rule(
            "!has(self.spec) || ((!has(self.spec.containers) || self.spec.containers.all(c, c.name != 'sluice')) && (!has(self.spec.initContainers) || self.spec.initContainers.all(c, c.name != 'sluice')))",
            "template containers must not be named sluice: that name belongs to the injected sidecar; rename the container",
        )
    }

    pub fn template_restart_policy() -> Rule {
        rule(
            "!has(self.spec) || !has(self.spec.restartPolicy) || self.spec.restartPolicy == 'Always'",
            "template.spec.restartPolicy must be Always (or unset): the pods belong to a Deployment",
        )
    }
}
