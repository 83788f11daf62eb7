//! Consumer-group lag, computed from Kafka itself, for `status.lag` and the
//! `sluice_operator_consumer_lag` metric.
//!
//! The operator keeps one long-lived client ([`LagClient`]) per connection identity: the
//! librdkafka properties an EventConsumer connects with ([`connection_properties`]: bootstrap
//! servers, security protocol, SASL and TLS material from the referenced Secrets, passed in
//! memory rather than as files, and the pass-through properties that concern the
//! connection). EventConsumers that reach the same cluster with the same credentials share
//! it. One query ([`LagClient::query_blocking`]) reads, for every topic of those
//! EventConsumers, the partitions (metadata) and the earliest and log-end offsets (two
//! ListOffsets requests per partition leader, batched by librdkafka), then the committed
//! offsets of every group (one OffsetFetch per group to its coordinator, a bounded number in
//! flight). [`group_lag`] then sums, per EventConsumer, the records after the committed
//! offset. The client never subscribes or joins a group.
//!
//! The collector that drives this (leader only, beside the reconciler) is
//! [`crate::collector`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::debug;

mod group_offsets;

pub use group_offsets::Committed;

use crate::build::SecretData;
use crate::crd::{KafkaSpec, StartFrom, rules};

/// Default time between two lag measurements (`--lag-interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Default time budget of one cluster's query, all Kafka requests included.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(10);
/// Default minimum time between two `status.lag` writes of one EventConsumer
/// (`--lag-status-interval`).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(180);
/// OffsetFetch requests in flight at once per Kafka cluster (connection identity).
pub const GROUPS_IN_FLIGHT: usize = 16;
/// Kafka clusters (connection identities) queried at once.
pub const CLUSTERS_IN_FLIGHT: usize = 4;
/// `client.id` of the operator's lag clients (visible in broker logs and quotas).
pub const CLIENT_ID: &str = "sluice-operator-lag";
/// `ssl.ca.location` when `tls.caSecretRef` is unset: the system trust store, as for the
/// sidecar (the build's `SYSTEM_TRUST_STORE`).
const SYSTEM_TRUST_STORE: &str = "probe";

/// How the operator measures lag and keeps `status.lag` up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LagSettings {
    /// Time between two measurements; zero turns lag off (`status.lag` stays unset and no
    /// Kafka client is ever created).
    pub interval: Duration,
    /// Time budget of one cluster's query.
    pub budget: Duration,
    /// Minimum time between two `status.lag` writes of one EventConsumer.
    pub status_interval: Duration,
}

impl Default for LagSettings {
    fn default() -> Self {
        LagSettings {
            interval: DEFAULT_INTERVAL,
            budget: DEFAULT_BUDGET,
            status_interval: DEFAULT_STATUS_INTERVAL,
        }
    }
}

impl LagSettings {
    pub fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }
}

/// Why the lag is unknown. Messages never contain credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LagError {
    /// The spec references credentials the client cannot use.
    #[error("{0}")]
    Credentials(String),
    /// librdkafka refused the client configuration.
    #[error("the Kafka client configuration is invalid: {0}")]
    Config(String),
    /// A topic does not exist (or is not visible to these credentials).
    #[error("topic {topic}: {error}")]
    Topic { topic: String, error: String },
    /// A Kafka request failed.
    #[error("{what}: {error}")]
    Kafka { what: &'static str, error: String },
    /// The time budget ran out.
    #[error("no answer from Kafka within {0:?}")]
    Timeout(Duration),
    /// The broker asked for a group's committed offsets is not its coordinator any more.
    #[error(
        "reading the group's committed offsets: {0} (the group's coordinator moved; the lag client is replaced so that it looks the coordinator up again)"
    )]
    CoordinatorMoved(String),
    /// The blocking task failed (panicked or was cancelled).
    #[error("the lag task failed: {0}")]
    Task(String),
}

impl LagError {
    /// A static reason, for the `sluice_operator_lag_errors_total{reason}` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            LagError::Credentials(_) => "Credentials",
            LagError::Config(_) => "Config",
            LagError::Topic { .. } => "Topic",
            LagError::Kafka { .. } => "Kafka",
            LagError::Timeout(_) => "Timeout",
            LagError::CoordinatorMoved(_) => "CoordinatorMoved",
            LagError::Task(_) => "Task",
        }
    }
}

/// Pass-through properties (`spec.kafka.properties`) the lag client takes over: the ones
/// about reaching and talking to brokers, plus `isolation.level` (which decides whether the
/// high watermark is the last stable offset). Consumer-only tuning is left out.
const CONNECTION_PREFIXES: &[&str] = &[
    "socket.",
    "broker.",
    "reconnect.backoff",
    "retry.backoff",
    "api.version",
    "metadata.",
    "topic.metadata.",
    "ssl.",
];
const CONNECTION_KEYS: &[&str] = &[
    "client.dns.lookup",
    "connections.max.idle.ms",
    "enable.ssl.certificate.verification",
    "resolve_canonical_bootstrap_servers_only",
    "isolation.level",
];

fn connection_property(key: &str) -> bool {
    let relevant =
        CONNECTION_KEYS.contains(&key) || CONNECTION_PREFIXES.iter().any(|p| key.starts_with(p));
    // Files named in the sidecar's image do not exist in the operator's; credentials only
    // ever come from Secrets (the CRD rejects such keys; this is a second fence).
    let file = key.ends_with(".location");
    let credential = rules::CREDENTIAL_KEY_PREFIXES
        .iter()
        .any(|p| key.starts_with(p))
        || rules::CREDENTIAL_KEY_FRAGMENTS
            .iter()
            .any(|f| key.contains(f));
    relevant && !file && !credential
}

fn secret_text(
    secrets: &BTreeMap<String, SecretData>,
    name: &str,
    key: &str,
    field: &str,
) -> Result<String, LagError> {
    let bytes = secrets.get(name).and_then(|d| d.get(key)).ok_or_else(|| {
        LagError::Credentials(format!(
            "key {key:?} of Secret {name} ({field}) was not read"
        ))
    })?;
    String::from_utf8(bytes.clone()).map_err(|_| {
        LagError::Credentials(format!(
            "key {key:?} of Secret {name} ({field}) is not UTF-8 text"
        ))
    })
}

/// The librdkafka properties of the lag client of an EventConsumer: what the sidecar
/// connects with (see `KafkaConnection::client_properties` in sluice-config), with the
/// credentials taken from the referenced Secrets' data (`secrets`: Secret name → key →
/// bytes, as `secrets::fetch_referenced` returns it) instead of mounted files. Pure.
///
/// The result holds secret values: never log it.
pub fn client_properties(
    kafka: &KafkaSpec,
    group_id: &str,
    secrets: &BTreeMap<String, SecretData>,
) -> Result<Vec<(String, String)>, LagError> {
    let mut props: BTreeMap<String, String> =
        connection_properties(kafka, secrets)?.into_iter().collect();
    props.insert("group.id".into(), group_id.to_owned());
    Ok(props.into_iter().collect())
}

/// [`client_properties`] without `group.id`: what identifies a connection. EventConsumers
/// with equal connection properties share one [`LagClient`]. Sorted by key.
///
/// The result holds secret values: never log it.
pub fn connection_properties(
    kafka: &KafkaSpec,
    secrets: &BTreeMap<String, SecretData>,
) -> Result<Vec<(String, String)>, LagError> {
    let mut props: BTreeMap<String, String> = kafka
        .properties
        .iter()
        .filter(|(k, _)| connection_property(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut set = |k: &str, v: String| {
        props.insert(k.to_owned(), v);
    };
    set("bootstrap.servers", kafka.bootstrap_servers.clone());
    set("client.id", CLIENT_ID.to_owned());
    set("enable.auto.commit", "false".into());
    set("enable.auto.offset.store", "false".into());
    set("allow.auto.create.topics", "false".into());
    let (sasl, tls) = match &kafka.auth {
        Some(a) => (a.sasl.as_ref(), a.tls.as_ref()),
        None => (None, None),
    };
    set(
        "security.protocol",
        sluice_config::security_protocol(sasl.is_some(), tls.is_some()).into(),
    );
    if let Some(sasl) = sasl {
        let r = &sasl.secret_ref;
        let mechanism = match sasl.mechanism {
            crate::crd::SaslMechanism::Plain => "PLAIN",
            crate::crd::SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            crate::crd::SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        };
        set("sasl.mechanism", mechanism.into());
        let username = match &sasl.username {
            Some(username) => username.clone(),
            None => secret_text(
                secrets,
                &r.name,
                &r.username_key,
                "spec.kafka.auth.sasl.secretRef.usernameKey",
            )?,
        };
        set("sasl.username", username);
        set(
            "sasl.password",
            secret_text(
                secrets,
                &r.name,
                &r.password_key,
                "spec.kafka.auth.sasl.secretRef.passwordKey",
            )?,
        );
    }
    if let Some(tls) = tls {
        match &tls.ca_secret_ref {
            Some(ca) => set(
                "ssl.ca.pem",
                secret_text(
                    secrets,
                    &ca.name,
                    &ca.key,
                    "spec.kafka.auth.tls.caSecretRef",
                )?,
            ),
            // As for the sidecar: the system trust store.
            None => set("ssl.ca.location", SYSTEM_TRUST_STORE.into()),
        }
        if let Some(c) = &tls.client_cert_secret_ref {
            set(
                "ssl.certificate.pem",
                secret_text(
                    secrets,
                    &c.name,
                    &c.cert_key,
                    "spec.kafka.auth.tls.clientCertSecretRef.certKey",
                )?,
            );
            set(
                "ssl.key.pem",
                secret_text(
                    secrets,
                    &c.name,
                    &c.key_key,
                    "spec.kafka.auth.tls.clientCertSecretRef.keyKey",
                )?,
            );
        }
    }
    Ok(props.into_iter().collect())
}

/// What Kafka says about one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// Low watermark: the oldest retained offset.
    pub low: i64,
    /// High watermark: the offset the next record will get.
    pub high: i64,
    /// The group's committed offset (the next record to process), if any.
    pub committed: Option<i64>,
}

/// The lag of one partition: the records from the committed offset to the high watermark.
/// Without a committed offset, or with one the broker no longer retains (below the low
/// watermark), the sidecar starts where `startFrom` says, so count what it would consume:
/// every retained record for `earliest`, none for `latest`.
pub fn partition_lag(p: &PartitionOffsets, start_from: StartFrom) -> i64 {
    match p.committed {
        Some(c) if c >= p.low => p.high.saturating_sub(c).max(0),
        _ => match start_from {
            StartFrom::Earliest => p.high.saturating_sub(p.low).max(0),
            StartFrom::Latest => 0,
        },
    }
}

/// The group's lag: the sum of [`partition_lag`] over all partitions.
pub fn total(partitions: &[PartitionOffsets], start_from: StartFrom) -> i64 {
    partitions
        .iter()
        .map(|p| partition_lag(p, start_from))
        .fold(0i64, i64::saturating_add)
}

/// The lag client's context: librdkafka's logs and global errors go to `debug` (an
/// unreachable cluster would otherwise log at error level from every attempt); the
/// reconciler reports the outcome once.
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        debug!(target: "librdkafka", ?level, "lag client: {fac} {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!(target: "librdkafka", "lag client: {error}: {reason}");
    }
}

impl ConsumerContext for QuietContext {}

/// A client error as text, without configuration values (librdkafka's configuration errors
/// quote the refused value, which may be a credential).
fn describe(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, desc, key, _) => format!("property {key}: {desc}"),
        other => other.to_string(),
    }
}

fn remaining(deadline: Instant, budget: Duration) -> Result<Duration, LagError> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(LagError::Timeout(budget)),
    }
}

/// Earliest and log-end offset of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ends {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
}

/// What one query asks of one Kafka cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub topics: BTreeSet<String>,
    pub groups: BTreeSet<String>,
}

/// What Kafka answered, per topic and per group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub topics: HashMap<String, Result<Vec<Ends>, LagError>>,
    pub groups: HashMap<String, Result<Committed, LagError>>,
}

impl Answer {
    /// The groups whose coordinator moved since the client looked it up. Pure.
    pub fn moved_groups(&self) -> BTreeSet<String> {
        self.groups_where(|e| matches!(e, LagError::CoordinatorMoved(_)))
    }

    /// The groups a new client should read again: those whose coordinator moved, and
    /// those whose committed offsets got no answer in time. Pure.
    pub fn groups_to_read_again(&self) -> BTreeSet<String> {
        self.groups_where(|e| matches!(e, LagError::CoordinatorMoved(_) | LagError::Timeout(_)))
    }

    fn groups_where(&self, pick: impl Fn(&LagError) -> bool) -> BTreeSet<String> {
        self.groups
            .iter()
            .filter(|(_, r)| r.as_ref().is_err_and(&pick))
            .map(|(g, _)| g.clone())
            .collect()
    }
}

/// What [`query_retrying`] did.
pub struct Retried {
    /// The answer, with the groups read again as the new client read them.
    pub answer: Result<Answer, LagError>,
    /// The new client that read them; it knows where the coordinators are now, so it
    /// should take the old client's place.
    pub new_client: Option<LagClient>,
}

/// Queries through `client` with two thirds of `budget`, then reads the groups it could
/// not read ([`Answer::groups_to_read_again`]) again, at once, through a new client made
/// from `props` and `own_group` (see [`LagClient::new`]), with what is left of `budget`.
///
/// Two faults of a long-lived librdkafka client make this necessary; a new client clears
/// both, and without it the groups' lag stayed stale for one or more passes:
/// * it keeps asking the broker it found first to be a group's coordinator for as long as
///   it is used (`NOT_COORDINATOR` after a broker restart);
/// * after a rolling restart of a secured cluster, one client's committed-offset requests
///   went unanswered for good while a new client was answered at once (seen on the test
///   bed, README "End to end"; the cause inside librdkafka is not known).
///
/// If the retry fails as a whole, the first answer stands. Blocking.
pub fn query_retrying(
    client: &LagClient,
    props: &[(String, String)],
    own_group: &str,
    query: &Query,
    budget: Duration,
    groups_in_flight: usize,
) -> Retried {
    let started = Instant::now();
    let mut answer = client.query_blocking(query, budget - budget / 3, groups_in_flight);
    let again = match &answer {
        Ok(a) => a.groups_to_read_again(),
        Err(_) => BTreeSet::new(),
    };
    let left = budget.saturating_sub(started.elapsed());
    if again.is_empty() || left.is_zero() {
        return Retried {
            answer,
            new_client: None,
        };
    }
    let Ok(fresh) = LagClient::new(props, own_group) else {
        return Retried {
            answer,
            new_client: None,
        };
    };
    let retry = Query {
        topics: BTreeSet::new(),
        groups: again,
    };
    if let (Ok(a), Ok(r)) = (
        answer.as_mut(),
        fresh.query_blocking(&retry, left, groups_in_flight),
    ) {
        a.groups.extend(r.groups);
    }
    Retried {
        answer,
        new_client: Some(fresh),
    }
}

/// The lag of `group` over `topics` from an [`Answer`]: the sum of [`partition_lag`] over
/// every partition, or the first error that keeps it unknown. Pure.
pub fn group_lag(
    answer: &Answer,
    group: &str,
    topics: &[String],
    start_from: StartFrom,
) -> Result<i64, LagError> {
    let committed = match answer.groups.get(group) {
        Some(Ok(c)) => c,
        Some(Err(e)) => return Err(e.clone()),
        None => {
            return Err(LagError::Kafka {
                what: "reading the group's committed offsets",
                error: format!("group {group} was not queried"),
            });
        }
    };
    let mut partitions = Vec::new();
    for topic in topics {
        match answer.topics.get(topic) {
            Some(Ok(ends)) => partitions.extend(ends.iter().map(|e| PartitionOffsets {
                low: e.low,
                high: e.high,
                committed: committed.get(&(topic.clone(), e.partition)).copied(),
            })),
            Some(Err(e)) => return Err(e.clone()),
            None => {
                return Err(LagError::Topic {
                    topic: topic.clone(),
                    error: "was not queried".into(),
                });
            }
        }
    }
    Ok(total(&partitions, start_from))
}

/// A long-lived Kafka client for one connection identity. Its librdkafka threads run until
/// it is dropped; its connections are kept open between queries (librdkafka reconnects on
/// its own when a broker goes away).
pub struct LagClient {
    consumer: BaseConsumer<QuietContext>,
}

impl LagClient {
    /// A client with these connection properties (see [`connection_properties`]), given
    /// `group`, one of the consumer groups it will read, as its own `group.id`.
    ///
    /// The client serves every group of its identity through admin requests, and never
    /// joins a group, subscribes, assigns or commits. But librdkafka 2.12 answers an
    /// OffsetFetch refused with `NOT_COORDINATOR` (the group's coordinator moved: a broker
    /// restart, a leader change of `__consumer_offsets`, a cluster still loading it) by
    /// asking the client's own consumer group to look up its coordinator again, and
    /// without a `group.id` there is none: the process crashes (librdkafka issue #5040;
    /// tests/lag_coordinator.rs). With one, that lookup is all it does: a FindCoordinator
    /// for `group`. One of the groups it reads, because a principal allowed to describe
    /// those groups (ListConsumerGroupOffsets needs it) may be denied any other name.
    pub fn new(props: &[(String, String)], group: &str) -> Result<LagClient, LagError> {
        let mut config = ClientConfig::new();
        for (k, v) in props {
            config.set(k, v);
        }
        config.set("group.id", group);
        config.set("enable.auto.commit", "false");
        // librdkafka's main queue is forwarded to this consumer's queue, drained each query.
        let consumer: BaseConsumer<QuietContext> = config
            .create_with_context(QuietContext)
            .map_err(|e| LagError::Config(describe(&e)))?;
        Ok(LagClient { consumer })
    }

    /// Reads the ends of every partition of `query.topics` and the committed offsets of
    /// every group in `query.groups` (blocking; returns by `budget`, give or take one
    /// librdkafka timeout granularity). An error for the whole query means the cluster did
    /// not answer; errors of single topics and groups are in the [`Answer`].
    pub fn query_blocking(
        &self,
        query: &Query,
        budget: Duration,
        groups_in_flight: usize,
    ) -> Result<Answer, LagError> {
        let deadline = Instant::now() + budget;
        // Serve what librdkafka queued for the application since the last query (errors,
        // which the context logs at debug) so the queue does not grow.
        for _ in 0..1024 {
            if self.consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        let timeout = |e: &KafkaError| {
            matches!(
                e,
                KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::OperationTimedOut)
            )
        };
        let mut answer = Answer::default();
        let mut partitions: Vec<(String, i32)> = Vec::new();
        for topic in &query.topics {
            let md = self
                .consumer
                .fetch_metadata(Some(topic), remaining(deadline, budget)?)
                .map_err(|e| {
                    if timeout(&e) {
                        LagError::Timeout(budget)
                    } else {
                        LagError::Kafka {
                            what: "reading the topic metadata",
                            error: describe(&e),
                        }
                    }
                })?;
            let found = md.topics().iter().find(|t| t.name() == topic);
            let result = match found {
                None => Err("not in the broker's metadata".to_owned()),
                Some(t) => match t.error() {
                    Some(err) => Err(rdkafka::types::RDKafkaErrorCode::from(err).to_string()),
                    None if t.partitions().is_empty() => Err("has no partitions".to_owned()),
                    None => Ok(t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>()),
                },
            };
            match result {
                Ok(ids) => partitions.extend(ids.into_iter().map(|p| (topic.clone(), p))),
                Err(error) => {
                    answer.topics.insert(
                        topic.clone(),
                        Err(LagError::Topic {
                            topic: topic.clone(),
                            error,
                        }),
                    );
                }
            }
        }

        // Earliest and log-end offsets: one batched ListOffsets per partition leader each.
        let ends = |at: Offset| -> Result<TopicPartitionList, LagError> {
            let mut tpl = TopicPartitionList::with_capacity(partitions.len());
            for (topic, p) in &partitions {
                tpl.add_partition_offset(topic, *p, at)
                    .map_err(|e| LagError::Config(describe(&e)))?;
            }
            self.consumer
                .offsets_for_times(tpl, remaining(deadline, budget)?)
                .map_err(|e| {
                    if timeout(&e) {
                        LagError::Timeout(budget)
                    } else {
                        LagError::Kafka {
                            what: "reading the partitions' offsets",
                            error: describe(&e),
                        }
                    }
                })
        };
        if !partitions.is_empty() {
            let lows = ends(Offset::Beginning)?;
            let highs = ends(Offset::End)?;
            let mut per_topic: BTreeMap<String, Result<Vec<Ends>, LagError>> = BTreeMap::new();
            for h in highs.elements() {
                let entry = per_topic
                    .entry(h.topic().to_owned())
                    .or_insert_with(|| Ok(Vec::new()));
                let Ok(list) = entry else { continue };
                let low = lows
                    .find_partition(h.topic(), h.partition())
                    .map(|l| (l.error(), l.offset()));
                let fail = |error: String| LagError::Kafka {
                    what: "reading the partitions' offsets",
                    error: format!("{}[{}]: {error}", h.topic(), h.partition()),
                };
                match (h.error(), h.offset(), low) {
                    (Ok(()), Offset::Offset(high), Some((Ok(()), Offset::Offset(low)))) => list
                        .push(Ends {
                            partition: h.partition(),
                            low,
                            high,
                        }),
                    (Err(e), _, _) | (_, _, Some((Err(e), _))) => *entry = Err(fail(describe(&e))),
                    _ => *entry = Err(fail("no offset in the answer".into())),
                }
            }
            answer.topics.extend(per_topic);
        }

        let groups: Vec<String> = query.groups.iter().cloned().collect();
        let committed =
            group_offsets::list(self.consumer.client(), &groups, groups_in_flight, deadline);
        for (group, result) in groups.into_iter().zip(committed) {
            let result = result.map_err(|e| match e {
                group_offsets::GroupError::Timeout => LagError::Timeout(budget),
                group_offsets::GroupError::CoordinatorMoved(error) => {
                    LagError::CoordinatorMoved(error)
                }
                group_offsets::GroupError::Kafka(error) => LagError::Kafka {
                    what: "reading the group's committed offsets",
                    error,
                },
            });
            answer.groups.insert(group, result);
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EventConsumerSpec;

    fn kafka(extra: &str) -> KafkaSpec {
        let spec: EventConsumerSpec = serde_norway::from_str(&format!(
            "kafka: {{bootstrapServers: 'k:9092', topics: [a, b]{extra}}}\ndelivery: {{url: 'http://127.0.0.1:8080/'}}\ntemplate: {{spec: {{containers: [{{name: app}}]}}}}"
        ))
        .unwrap();
        spec.kafka
    }

    fn data(entries: &[(&str, &[(&str, &str)])]) -> BTreeMap<String, SecretData> {
        entries
            .iter()
            .map(|(name, kv)| {
                (
                    name.to_string(),
                    kv.iter()
                        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                        .collect(),
                )
            })
            .collect()
    }

    fn map(v: Vec<(String, String)>) -> BTreeMap<String, String> {
        v.into_iter().collect()
    }

    #[test]
    fn plaintext_without_auth() {
        let p = map(client_properties(&kafka(""), "ns.ec", &BTreeMap::new()).unwrap());
        assert_eq!(p["bootstrap.servers"], "k:9092");
        assert_eq!(p["group.id"], "ns.ec");
        assert_eq!(p["security.protocol"], "plaintext");
        assert_eq!(p["enable.auto.commit"], "false");
        assert_eq!(p["allow.auto.create.topics"], "false");
        assert_eq!(p["client.id"], CLIENT_ID);
        assert!(
            !p.keys()
                .any(|k| k.starts_with("sasl.") || k.starts_with("ssl."))
        );
    }

    #[test]
    fn sasl_over_tls_takes_credentials_from_the_secret_data() {
        let k = kafka(
            ", auth: {sasl: {mechanism: SCRAM-SHA-512, secretRef: {name: user, usernameKey: u, passwordKey: p}}, tls: {caSecretRef: {name: ca}, clientCertSecretRef: {name: cert}}}",
        );
        let s = data(&[
            ("user", &[("u", "alice"), ("p", "s3cret")]),
            ("ca", &[("ca.crt", "CA-PEM")]),
            ("cert", &[("tls.crt", "CERT-PEM"), ("tls.key", "KEY-PEM")]),
        ]);
        let p = map(client_properties(&k, "g", &s).unwrap());
        assert_eq!(p["security.protocol"], "sasl_ssl");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(p["sasl.username"], "alice");
        assert_eq!(p["sasl.password"], "s3cret");
        assert_eq!(p["ssl.ca.pem"], "CA-PEM");
        assert_eq!(p["ssl.certificate.pem"], "CERT-PEM");
        assert_eq!(p["ssl.key.pem"], "KEY-PEM");
        assert!(
            !p.keys().any(|k| k.ends_with(".location")),
            "no files: {:?}",
            p.keys()
        );
    }

    #[test]
    fn strimzi_layout_secrets_feed_the_lag_client() {
        // A SCRAM KafkaUser's Secret has no username key: the username comes from the spec.
        let k = kafka(
            ", auth: {sasl: {mechanism: SCRAM-SHA-512, username: app, secretRef: {name: app}}, tls: {caSecretRef: {name: c-cluster-ca-cert}}}",
        );
        let s = data(&[
            ("app", &[("password", "pw"), ("sasl.jaas.config", "jaas")]),
            ("c-cluster-ca-cert", &[("ca.crt", "CA-PEM")]),
        ]);
        let p = map(client_properties(&k, "g", &s).unwrap());
        assert_eq!(p["sasl.username"], "app");
        assert_eq!(p["sasl.password"], "pw");
        assert_eq!(p["ssl.ca.pem"], "CA-PEM");
        // A TLS KafkaUser's Secret: user.crt and user.key.
        let k = kafka(
            ", auth: {tls: {caSecretRef: {name: c-cluster-ca-cert}, clientCertSecretRef: {name: app, certKey: user.crt, keyKey: user.key}}}",
        );
        let s = data(&[
            (
                "app",
                &[
                    ("user.crt", "CERT"),
                    ("user.key", "KEY"),
                    ("ca.crt", "CLIENTS-CA"),
                ],
            ),
            ("c-cluster-ca-cert", &[("ca.crt", "CA-PEM")]),
        ]);
        let p = map(client_properties(&k, "g", &s).unwrap());
        assert_eq!(p["ssl.certificate.pem"], "CERT");
        assert_eq!(p["ssl.key.pem"], "KEY");
        assert_eq!(
            p["ssl.ca.pem"], "CA-PEM",
            "the cluster CA, not the clients CA"
        );
        let s = data(&[("app", &[("user.crt", "CERT")])]);
        let e = client_properties(&k, "g", &s).unwrap_err();
        assert!(e.to_string().contains("Secret c-cluster-ca-cert"), "{e}");
    }

    #[test]
    fn protocols_follow_the_auth_combination() {
        let s = data(&[("user", &[("username", "a"), ("password", "b")])]);
        let sasl = ", auth: {sasl: {mechanism: PLAIN, secretRef: {name: user}}}";
        let p = map(client_properties(&kafka(sasl), "g", &s).unwrap());
        assert_eq!(p["security.protocol"], "sasl_plaintext");
        assert_eq!(p["sasl.mechanism"], "PLAIN");
        let p = map(client_properties(&kafka(", auth: {tls: {}}"), "g", &s).unwrap());
        assert_eq!(p["security.protocol"], "ssl");
        assert_eq!(p["ssl.ca.location"], "probe", "the system trust store");
        assert!(!p.contains_key("ssl.certificate.pem"));
    }

    #[test]
    fn only_connection_properties_pass_through_and_cannot_override() {
        let k = kafka(
            ", properties: {isolation.level: read_committed, client.rack: r1, socket.keepalive.enable: 'true', ssl.endpoint.identification.algorithm: none, ssl.crl.location: /etc/crl.pem, fetch.wait.max.ms: '50', broker.address.family: v4}",
        );
        let p = map(client_properties(&k, "g", &BTreeMap::new()).unwrap());
        assert_eq!(p["isolation.level"], "read_committed");
        assert_eq!(p["socket.keepalive.enable"], "true");
        assert_eq!(p["ssl.endpoint.identification.algorithm"], "none");
        assert_eq!(p["broker.address.family"], "v4");
        for absent in ["client.rack", "fetch.wait.max.ms", "ssl.crl.location"] {
            assert!(!p.contains_key(absent), "{absent} passed through");
        }
        // Keys the CRD rejects never get through, even if an object bypassed validation.
        let mut k = kafka("");
        k.properties
            .insert("security.protocol".into(), "ssl".into());
        k.properties.insert("ssl.key.password".into(), "x".into());
        k.properties
            .insert("bootstrap.servers".into(), "evil:1".into());
        let p = map(client_properties(&k, "g", &BTreeMap::new()).unwrap());
        assert_eq!(p["security.protocol"], "plaintext");
        assert_eq!(p["bootstrap.servers"], "k:9092");
        assert!(!p.contains_key("ssl.key.password"));
    }

    #[test]
    fn unusable_secret_data_is_named_without_its_value() {
        let sasl = ", auth: {sasl: {mechanism: PLAIN, secretRef: {name: user}}}";
        let e = client_properties(&kafka(sasl), "g", &BTreeMap::new()).unwrap_err();
        assert_eq!(e.reason(), "Credentials");
        assert!(e.to_string().contains("Secret user"), "{e}");
        let mut s = data(&[("user", &[("username", "a")])]);
        s.get_mut("user")
            .unwrap()
            .insert("password".into(), vec![0xff, 0xfe, b's']);
        let e = client_properties(&kafka(sasl), "g", &s).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }

    #[test]
    fn config_errors_do_not_quote_values() {
        let e = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value".into(),
            "sasl.password".into(),
            "s3cret".into(),
        );
        let d = describe(&e);
        assert!(d.contains("sasl.password") && !d.contains("s3cret"), "{d}");
    }

    fn p(low: i64, high: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets {
            low,
            high,
            committed,
        }
    }

    #[test]
    fn lag_counts_records_after_the_committed_offset() {
        use StartFrom::{Earliest, Latest};
        assert_eq!(partition_lag(&p(0, 10, Some(4)), Earliest), 6);
        assert_eq!(partition_lag(&p(0, 10, Some(10)), Latest), 0);
        // A committed offset past the high watermark (truncation) counts as caught up.
        assert_eq!(partition_lag(&p(0, 10, Some(12)), Earliest), 0);
        // No committed offset: what startFrom would consume.
        assert_eq!(partition_lag(&p(3, 10, None), Earliest), 7);
        assert_eq!(partition_lag(&p(3, 10, None), Latest), 0);
        // A committed offset retention removed: the consumer resets as startFrom says.
        assert_eq!(partition_lag(&p(5, 10, Some(2)), Earliest), 5);
        assert_eq!(partition_lag(&p(5, 10, Some(2)), Latest), 0);
        // An empty partition.
        assert_eq!(partition_lag(&p(0, 0, None), Earliest), 0);
        let parts = [p(0, 10, Some(4)), p(0, 5, None), p(2, 2, Some(2))];
        assert_eq!(total(&parts, Earliest), 11);
        assert_eq!(total(&parts, Latest), 6);
        assert_eq!(total(&[], Earliest), 0);
        assert_eq!(
            total(&[p(0, i64::MAX, None), p(0, i64::MAX, None)], Earliest),
            i64::MAX,
            "saturates"
        );
    }

    #[test]
    fn settings_default_to_thirty_seconds_and_zero_turns_lag_off() {
        let s = LagSettings::default();
        assert_eq!(s.interval, Duration::from_secs(30));
        assert_eq!(s.status_interval, Duration::from_secs(180));
        assert!(s.enabled());
        let off = LagSettings {
            interval: Duration::ZERO,
            ..s
        };
        assert!(!off.enabled());
    }

    #[test]
    fn an_unreachable_cluster_fails_within_the_budget() {
        // Port 9 on loopback: nothing listens, connections are refused at once.
        let mut k = kafka("");
        k.bootstrap_servers = "127.0.0.1:9".into();
        let client =
            LagClient::new(&connection_properties(&k, &BTreeMap::new()).unwrap(), "g").unwrap();
        let query = Query {
            topics: ["a".to_owned()].into(),
            groups: ["g".to_owned()].into(),
        };
        let started = Instant::now();
        let e = client
            .query_blocking(&query, Duration::from_millis(1500), 4)
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(1500 + 2500),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(e.reason(), "Timeout" | "Kafka"), "{e}");
    }

    #[test]
    fn group_lag_sums_the_topics_partitions_or_names_what_is_unknown() {
        let ends = |v: &[(i32, i64, i64)]| {
            Ok(v.iter()
                .map(|&(partition, low, high)| Ends {
                    partition,
                    low,
                    high,
                })
                .collect())
        };
        let mut answer = Answer::default();
        answer
            .topics
            .insert("a".into(), ends(&[(0, 0, 10), (1, 0, 5)]));
        answer.topics.insert("b".into(), ends(&[(0, 2, 4)]));
        answer.topics.insert(
            "gone".into(),
            Err(LagError::Topic {
                topic: "gone".into(),
                error: "Broker: Unknown topic or partition".into(),
            }),
        );
        answer.groups.insert(
            "g".into(),
            Ok(Committed::from([
                (("a".into(), 0), 4),
                (("b".into(), 0), 3),
                (("other".into(), 0), 100),
            ])),
        );
        answer.groups.insert(
            "slow".into(),
            Err(LagError::Timeout(Duration::from_secs(1))),
        );
        let topics = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        // a[0]: 10-4, a[1]: uncommitted, earliest: 5; b[0]: 4-3.
        assert_eq!(
            group_lag(&answer, "g", &topics(&["a", "b"]), StartFrom::Earliest),
            Ok(12)
        );
        assert_eq!(
            group_lag(&answer, "g", &topics(&["a", "b"]), StartFrom::Latest),
            Ok(7)
        );
        assert_eq!(
            group_lag(&answer, "g", &topics(&["b"]), StartFrom::Earliest),
            Ok(1)
        );
        // A group that committed nothing.
        answer.groups.insert("new".into(), Ok(Committed::new()));
        assert_eq!(
            group_lag(&answer, "new", &topics(&["a"]), StartFrom::Earliest),
            Ok(15)
        );
        let e = group_lag(&answer, "g", &topics(&["a", "gone"]), StartFrom::Earliest).unwrap_err();
        assert_eq!(e.reason(), "Topic");
        let e = group_lag(&answer, "slow", &topics(&["a"]), StartFrom::Earliest).unwrap_err();
        assert_eq!(e.reason(), "Timeout");
        let e = group_lag(&answer, "g", &topics(&["never"]), StartFrom::Earliest).unwrap_err();
        assert!(e.to_string().contains("never"), "{e}");
        let e = group_lag(&answer, "unknown", &topics(&["a"]), StartFrom::Earliest).unwrap_err();
        assert!(e.to_string().contains("unknown"), "{e}");
    }

    #[test]
    fn groups_moved_or_unanswered_are_read_again_and_others_are_not() {
        let mut answer = Answer::default();
        answer.groups.insert("read".into(), Ok(Committed::new()));
        answer.groups.insert(
            "slow".into(),
            Err(LagError::Timeout(Duration::from_secs(1))),
        );
        answer
            .groups
            .insert("moved".into(), Err(LagError::CoordinatorMoved("x".into())));
        answer.groups.insert(
            "denied".into(),
            Err(LagError::Kafka {
                what: "reading the group's committed offsets",
                error: "Broker: Group authorization failed".into(),
            }),
        );
        let names = |v: &[&str]| v.iter().map(|g| g.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(answer.moved_groups(), names(&["moved"]));
        assert_eq!(answer.groups_to_read_again(), names(&["moved", "slow"]));
        assert!(Answer::default().groups_to_read_again().is_empty());
    }

    #[test]
    fn connection_properties_leave_the_group_out() {
        let c = map(connection_properties(&kafka(""), &BTreeMap::new()).unwrap());
        assert!(!c.contains_key("group.id"));
        let mut with = c.clone();
        with.insert("group.id".into(), "ns.ec".into());
        assert_eq!(
            map(client_properties(&kafka(""), "ns.ec", &BTreeMap::new()).unwrap()),
            with
        );
    }
}
