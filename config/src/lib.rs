//! The Sluice sidecar's configuration file.
//!
//! [`SidecarConfig`] is the one type both programs share: the operator serializes it as JSON
//! into the ConfigMap it mounts into every pod, and the consumer sidecar reads it back at
//! start-up. Field names are camelCase, unknown fields are rejected, and [`SidecarConfig::validate`]
//! reports every problem at once, each naming the field, what was wrong and what is allowed.
//!
//! [`KafkaConnection`] is the Kafka-connection part; [`KafkaConnection::client_properties`]
//! turns it into librdkafka properties so any Kafka client (sidecar, operator, tests) connects
//! the same way.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod validate;

pub use validate::{HttpUrl, Problem, ValidationError, check_topic_name};

/// Where the sidecar looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sluice/config.json";

/// The sidecar's admin port: `/metrics`, `/healthz`, `/readyz` and `/drain`.
pub const ADMIN_PORT: u16 = 9898;

/// The response header of the sidecar's `/readyz` when it is not ready: why, as one of the
/// `sluice_not_ready{reason}` labels (`app_unreachable`, `kafka_unreachable`, `kafka_auth`,
/// `joining`, `draining`); the body says it for people, with details. The operator reads it
/// for the EventConsumer's status.
pub const NOT_READY_HEADER: &str = "Sluice-Not-Ready";

/// The request header that must carry the drain token on `GET /drain`.
pub const DRAIN_TOKEN_HEADER: &str = "X-Sluice-Drain-Token";

/// The sidecar configuration file (JSON, camelCase).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// How to reach Kafka and which group to join.
    pub kafka: KafkaConnection,
    /// How records are delivered to the application.
    pub delivery: Delivery,
    /// Graceful shutdown (SIGTERM, SIGINT, `GET /drain`).
    #[serde(default)]
    pub drain: Drain,
    /// The admin HTTP listener.
    #[serde(default)]
    pub admin: Admin,
    /// How the sidecar decides that the application is up before joining the group.
    #[serde(default)]
    pub app: App,
}

/// Kafka connection and consumer-group membership.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConnection {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Topics to consume (at least one).
    pub topics: Vec<String>,
    /// Consumer group.
    pub group_id: String,
    /// Where to start when the group has no committed offset.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Group membership protocol.
    #[serde(default)]
    pub protocol: GroupProtocol,
    /// `session.timeout.ms` (classic protocol only; the broker decides it for `consumer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout_ms: Option<u32>,
    /// `heartbeat.interval.ms` (classic protocol only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u32>,
    /// `max.poll.interval.ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_poll_interval_ms: Option<u32>,
    /// `queued.max.messages.kbytes`: bound on prefetched data per client, in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_max_messages_kbytes: Option<u32>,
    /// `fetch.max.bytes`: bound on one fetch response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_max_bytes: Option<u32>,
    /// `max.partition.fetch.bytes`: bound on one partition's data in a fetch response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_partition_fetch_bytes: Option<u32>,
    /// Authentication and encryption; credentials only from mounted files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// librdkafka properties passed through unchanged. Keys Sluice sets itself are rejected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// Where a group without a committed offset starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

/// The consumer-group protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GroupProtocol {
    /// The classic protocol with the cooperative-sticky assignor.
    #[default]
    Classic,
    /// KIP-848 (`group.protocol=consumer`, Kafka 4.0 and later).
    Consumer,
}

/// Authentication: SASL and/or TLS. Secrets are referenced by file path only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Auth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<Sasl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// SASL credentials: the password from a mounted file; the username from a mounted file
/// (`usernameFile`) or written here (`username`, for Secrets that hold only the password,
/// such as a Strimzi KafkaUser's). Exactly one of the two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<PathBuf>,
    pub password_file: PathBuf,
}

/// Supported SASL mechanisms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka / Kafka name of the mechanism.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// TLS to the brokers. A client certificate needs both `certFile` and `keyFile`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    pub ca_file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Delivery to the application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delivery {
    /// `http://<loopback host>:<port>/<path>`: where each record is POSTed.
    pub url: String,
    /// Bound on one delivery attempt (request and response).
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// What is kept in order.
    #[serde(default)]
    pub ordering: Ordering,
    /// Bound on deliveries in flight at once, over all partitions.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Retries of failed deliveries.
    #[serde(default)]
    pub retry: Retry,
    /// Topic for records that cannot be delivered. Unset: retry forever with the partition
    /// paused instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// How often finished offsets are committed (asynchronously) while running. Each round
    /// sends every partition's finished prefix that the broker has not acknowledged yet, so a
    /// commit that failed (during a rebalance, say) is sent again the next round.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// The sidecar's memory budget for records: bytes queued for delivery plus bytes in
    /// flight, over all partitions. At the budget every partition pauses fetching; below
    /// three quarters of it fetching resumes. One partition may use at most a quarter.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    /// Batch delivery: several records of one partition in one POST (CloudEvents JSON batch
    /// format). Unset: one POST per record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
}

/// Batch delivery. A batch holds records of one partition, in offset order, and respects the
/// ordering mode; `maxInFlight` then bounds batches (requests) in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Batch {
    /// Most records in one batch.
    #[serde(default = "default_batch_max_records")]
    pub max_records: u32,
    /// Most bytes of record keys, values and headers in one batch (a single larger record
    /// still goes, alone).
    #[serde(default = "default_batch_max_bytes")]
    pub max_bytes: u64,
    /// How long a partial batch waits for more records before it is sent. `0s`: send what
    /// is ready at once.
    #[serde(default = "default_batch_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            max_records: default_batch_max_records(),
            max_bytes: default_batch_max_bytes(),
            max_wait: default_batch_max_wait(),
        }
    }
}

fn default_batch_max_records() -> u32 {
    100
}
fn default_batch_max_bytes() -> u64 {
    1 << 20
}
fn default_batch_max_wait() -> Duration {
    Duration::from_millis(50)
}

/// Delivery ordering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Ordering {
    /// One record at a time per partition, in offset order.
    #[default]
    Partition,
    /// One record at a time per key; different keys in parallel.
    Key,
    /// No order: up to `maxInFlight` records at once.
    None,
}

impl fmt::Display for Ordering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ordering::Partition => "partition",
            Ordering::Key => "key",
            Ordering::None => "none",
        })
    }
}

/// Retry policy: exponential backoff with jitter from `initialBackoff` up to `maxBackoff`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Attempts in total (the first delivery counts), then dead-letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// Graceful shutdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Drain {
    /// Bound on waiting for in-flight deliveries on drain and on a partition revoke (with
    /// `key` ordering, also for the records that waited behind their key below records
    /// already delivered, which still go before the commit).
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Bound on committing the finished offsets of partitions that leave (drain or revoke):
    /// retriable commit errors (a rebalance in progress, a stale generation or member epoch,
    /// a coordinator move) are retried until it runs out. It should cover a rebalance: about
    /// two heartbeat intervals plus a round trip.
    #[serde(default = "default_commit_timeout", with = "humantime_serde")]
    pub commit_timeout: Duration,
    /// File holding the token `GET /drain` must send in `X-Sluice-Drain-Token`. Unset: `/drain`
    /// refuses every request (signals still drain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// After a drain a signal started, wait up to this long for a `GET /drain` call (the
    /// preStop hook's) to arrive and answer it before exiting. Unset: exit at once. The
    /// operator sets it when the sidecar runs as a plain container (`--sidecar-mode
    /// container`), where the kubelet signals the sidecar while the application's preStop
    /// hook may still be on its way; exiting first would fail that hook.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub await_pre_stop: Option<Duration>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            timeout: default_drain_timeout(),
            commit_timeout: default_commit_timeout(),
            token_file: None,
            await_pre_stop: None,
        }
    }
}

/// The admin HTTP listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Admin {
    /// Listen address; on the pod network so the kubelet can call `/drain`.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin_listen(),
        }
    }
}

/// How the sidecar learns that the application is up.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct App {
    /// An `http://` URL that answers 2xx when the application is ready. Unset: a TCP connect
    /// to the delivery URL's host and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_url: Option<String>,
}

fn default_delivery_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_in_flight() -> u32 {
    64
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_commit_timeout() -> Duration {
    Duration::from_secs(10)
}
/// 16 MiB of records queued for delivery and in flight: at a thousand records per second of
/// 1 KiB each that is 16 s of work, far more than a dispatcher needs to stay busy, and
/// beside the 16 MiB prefetch queue it keeps a loaded sidecar near 40 MiB (`make bench`).
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 16 << 20;
// The prefetch defaults below keep a loaded sidecar near 35 MiB of RSS where librdkafka's
// own defaults took 50–70 MiB, at the same or better throughput (`make bench`, 200 000
// records of ~100 bytes on 12 partitions; heaptrack put the rest in librdkafka's prefetch:
// up to 100 000 queued messages of ~300 bytes of overhead each, and 1 MiB per partition in
// every fetch response). The operator derives the same values from the pod's memory limit.

/// librdkafka `queued.min.messages` unless `kafka.properties` sets it (librdkafka: 100 000):
/// the prefetch queue's count bound, which binds before the byte bound for small records.
pub const DEFAULT_QUEUED_MIN_MESSAGES: u32 = 1_000;
/// `kafka.fetchMaxBytes` when unset (librdkafka: 50 MiB): one fetch response.
pub const DEFAULT_FETCH_MAX_BYTES: u32 = 4 << 20;
/// `kafka.maxPartitionFetchBytes` when unset (librdkafka: 1 MiB): one partition's data in a
/// fetch response. A larger record is still fetched, alone.
pub const DEFAULT_MAX_PARTITION_FETCH_BYTES: u32 = 256 << 10;
/// librdkafka `fetch.queue.backoff.ms` unless `kafka.properties` sets it: how long a
/// partition's next fetch waits once the prefetch queue reached `queued.min.messages` or
/// `queued.max.messages.kbytes`. librdkafka's 1 000 ms suits deep queues; with the bounded
/// queue the operator derives (`queued.min.messages` 1 000) the dispatcher empties it in a
/// few milliseconds and then waited up to a second for the next fetch: batches of 100 ran at
/// ~25 000–30 000 records/s instead of ~110 000–150 000 (`make bench` with
/// `SLUICE_BENCH_SIDECAR_CONFIG='{"kafka":{"properties":{"queued.min.messages":"1000"}}}'`).
pub const DEFAULT_FETCH_QUEUE_BACKOFF_MS: u32 = 10;
/// librdkafka's prefetch queue when `kafka.queuedMaxMessagesKbytes` is unset: 16 MiB instead
/// of librdkafka's own 64 MiB. Prefetch beyond what the dispatcher takes in a fraction of a
/// second buys no throughput (measured in `make bench`) and only holds memory.
pub const DEFAULT_QUEUED_MAX_MESSAGES_KBYTES: u32 = 16 * 1024;
fn default_max_buffered_bytes() -> u64 {
    DEFAULT_MAX_BUFFERED_BYTES
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT))
}

/// A configuration file that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not a valid Sluice sidecar configuration: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the configuration file {path} is invalid:\n{source}")]
    Invalid {
        path: PathBuf,
        source: ValidationError,
    },
}

impl SidecarConfig {
    /// Parses a configuration from JSON text (no validation).
    pub fn from_json(text: &str) -> Result<SidecarConfig, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<SidecarConfig, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::from_json(&text).map_err(|source| LoadError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate().map_err(|source| LoadError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(config)
    }

    /// Renders the configuration as the JSON the sidecar reads.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the sidecar configuration always serializes")
    }
}

/// A credential file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {field} from {path}: {reason}")]
pub struct CredentialError {
    pub field: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// Reads a secret from a mounted file: trailing newlines are dropped, an empty file is an error.
pub fn read_secret_file(field: &'static str, path: &Path) -> Result<String, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|e| CredentialError {
        field,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(CredentialError {
            field,
            path: path.to_owned(),
            reason: "the file is empty".into(),
        });
    }
    Ok(value)
}

/// librdkafka's `security.protocol` for a connection with or without SASL and TLS. Every
/// client of an EventConsumer's cluster (the sidecar, the operator's lag check) uses this.
pub fn security_protocol(sasl: bool, tls: bool) -> &'static str {
    match (sasl, tls) {
        (false, false) => "plaintext",
        (false, true) => "ssl",
        (true, false) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    }
}

impl KafkaConnection {
    /// A minimal connection: the given servers, topics and group with every default.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        topics: Vec<String>,
        group_id: impl Into<String>,
    ) -> Self {
        KafkaConnection {
            bootstrap_servers: bootstrap_servers.into(),
            topics,
            group_id: group_id.into(),
            start_from: StartFrom::default(),
            protocol: GroupProtocol::default(),
            session_timeout_ms: None,
            heartbeat_interval_ms: None,
            max_poll_interval_ms: None,
            queued_max_messages_kbytes: None,
            fetch_max_bytes: None,
            max_partition_fetch_bytes: None,
            auth: None,
            properties: BTreeMap::new(),
        }
    }

    /// Properties every client of this cluster needs: bootstrap servers, security protocol and
    /// credentials (read from their files now), then the pass-through properties.
    pub fn client_properties(&self) -> Result<BTreeMap<String, String>, CredentialError> {
        let mut props = BTreeMap::new();
        props.insert(
            "bootstrap.servers".to_owned(),
            self.bootstrap_servers.clone(),
        );
        let (sasl, tls) = match &self.auth {
            Some(auth) => (auth.sasl.as_ref(), auth.tls.as_ref()),
            None => (None, None),
        };
        let protocol = security_protocol(sasl.is_some(), tls.is_some());
        props.insert("security.protocol".to_owned(), protocol.to_owned());
        if let Some(sasl) = sasl {
            props.insert(
                "sasl.mechanism".to_owned(),
                sasl.mechanism.as_str().to_owned(),
            );
            let username = match (&sasl.username, &sasl.username_file) {
                (Some(username), _) => username.clone(),
                (None, Some(file)) => read_secret_file("kafka.auth.sasl.usernameFile", file)?,
                // Validation rejects a configuration with neither; an empty username fails
                // the authentication with the broker's own message.
                (None, None) => String::new(),
            };
            props.insert("sasl.username".to_owned(), username);
            props.insert(
                "sasl.password".to_owned(),
                read_secret_file("kafka.auth.sasl.passwordFile", &sasl.password_file)?,
            );
        }
        if let Some(tls) = tls {
            props.insert(
                "ssl.ca.location".to_owned(),
                tls.ca_file.display().to_string(),
            );
            if let Some(cert) = &tls.cert_file {
                props.insert(
                    "ssl.certificate.location".to_owned(),
                    cert.display().to_string(),
                );
            }
            if let Some(key) = &tls.key_file {
                props.insert("ssl.key.location".to_owned(), key.display().to_string());
            }
        }
        for (k, v) in &self.properties {
            props.insert(k.clone(), v.clone());
        }
        Ok(props)
    }

    /// The consumer's properties: [`Self::client_properties`] plus group membership, offsets
    /// under Sluice's control (no auto-commit, no auto-store) and the memory bounds.
    pub fn consumer_properties(&self) -> Result<BTreeMap<String, String>, CredentialError> {
        let mut props = self.client_properties()?;
        let mut set = |k: &str, v: String| {
            props.insert(k.to_owned(), v);
        };
        set("group.id", self.group_id.clone());
        set("enable.auto.commit", "false".into());
        set("enable.auto.offset.store", "false".into());
        set("enable.partition.eof", "false".into());
        set(
            "auto.offset.reset",
            match self.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            }
            .into(),
        );
        match self.protocol {
            GroupProtocol::Classic => {
                set("group.protocol", "classic".into());
                set("partition.assignment.strategy", "cooperative-sticky".into());
                if let Some(v) = self.session_timeout_ms {
                    set("session.timeout.ms", v.to_string());
                }
                if let Some(v) = self.heartbeat_interval_ms {
                    set("heartbeat.interval.ms", v.to_string());
                }
            }
            GroupProtocol::Consumer => set("group.protocol", "consumer".into()),
        }
        if let Some(v) = self.max_poll_interval_ms {
            set("max.poll.interval.ms", v.to_string());
        }
        set(
            "queued.max.messages.kbytes",
            self.queued_max_messages_kbytes
                .unwrap_or(DEFAULT_QUEUED_MAX_MESSAGES_KBYTES)
                .to_string(),
        );
        set(
            "fetch.max.bytes",
            self.fetch_max_bytes
                .unwrap_or(DEFAULT_FETCH_MAX_BYTES)
                .to_string(),
        );
        set(
            "max.partition.fetch.bytes",
            self.max_partition_fetch_bytes
                .unwrap_or(DEFAULT_MAX_PARTITION_FETCH_BYTES)
                .to_string(),
        );
        // Defaults the user may override in `kafka.properties`.
        for (key, value) in [
            ("queued.min.messages", DEFAULT_QUEUED_MIN_MESSAGES),
            ("fetch.queue.backoff.ms", DEFAULT_FETCH_QUEUE_BACKOFF_MS),
        ] {
            props
                .entry(key.to_owned())
                .or_insert_with(|| value.to_string());
        }
        Ok(props)
    }
}

/// librdkafka properties Sluice sets itself; `kafka.properties` must not contain them.
pub const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.bootstrapServers"),
    ("metadata.broker.list", "kafka.bootstrapServers"),
    ("group.id", "kafka.groupId"),
    (
        "group.instance.id",
        "nothing: static membership would stop drain from leaving the group",
    ),
    ("group.protocol", "kafka.protocol"),
    ("partition.assignment.strategy", "kafka.protocol"),
    ("group.remote.assignor", "kafka.protocol"),
    ("auto.offset.reset", "kafka.startFrom"),
    (
        "enable.auto.commit",
        "nothing: Sluice commits only finished offsets",
    ),
    (
        "enable.auto.offset.store",
        "nothing: Sluice stores only finished offsets",
    ),
    ("auto.commit.interval.ms", "delivery.commitInterval"),
    ("enable.partition.eof", "nothing"),
    ("session.timeout.ms", "kafka.sessionTimeoutMs"),
    ("heartbeat.interval.ms", "kafka.heartbeatIntervalMs"),
    ("max.poll.interval.ms", "kafka.maxPollIntervalMs"),
    (
        "queued.max.messages.kbytes",
        "kafka.queuedMaxMessagesKbytes",
    ),
    ("fetch.max.bytes", "kafka.fetchMaxBytes"),
    ("max.partition.fetch.bytes", "kafka.maxPartitionFetchBytes"),
    ("security.protocol", "kafka.auth"),
    ("sasl.mechanism", "kafka.auth.sasl.mechanism"),
    ("sasl.mechanisms", "kafka.auth.sasl.mechanism"),
    (
        "sasl.username",
        "kafka.auth.sasl.username or kafka.auth.sasl.usernameFile",
    ),
    ("sasl.password", "kafka.auth.sasl.passwordFile"),
    ("ssl.ca.location", "kafka.auth.tls.caFile"),
    ("ssl.ca.pem", "kafka.auth.tls.caFile"),
    ("ssl.certificate.location", "kafka.auth.tls.certFile"),
    ("ssl.certificate.pem", "kafka.auth.tls.certFile"),
    ("ssl.key.location", "kafka.auth.tls.keyFile"),
    ("ssl.key.pem", "kafka.auth.tls.keyFile"),
    (
        "ssl.key.password",
        "kafka.auth.tls.keyFile (use an unencrypted key)",
    ),
    (
        "enable.idempotence",
        "nothing: the dead-letter producer is always idempotent",
    ),
    (
        "acks",
        "nothing: the dead-letter producer always uses acks=all",
    ),
    (
        "request.required.acks",
        "nothing: the dead-letter producer always uses acks=all",
    ),
];

#[cfg(test)]
mod tests;
