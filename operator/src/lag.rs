//! Consumer-group lag, computed from Kafka itself, for `status.lag`.
//!
//! For the EventConsumer's topics and effective group id the operator reads the topics'
//! partitions (metadata), the group's committed offsets (OffsetFetch through a `BaseConsumer`
//! configured with `group.id`; it never subscribes, so it does not join the group) and each
//! partition's low and high watermarks, then sums, over all partitions, the records after
//! the committed offset ([`total`]).
//!
//! The client is configured like the sidecar's ([`client_properties`]: bootstrap servers,
//! security protocol, SASL and TLS material from the referenced Secrets, passed in memory
//! rather than as files, and the pass-through properties that concern the connection). Every
//! blocking librdkafka call runs on the blocking pool with a deadline, and the client is
//! dropped (its threads joined) before the call returns, so an unreachable cluster costs one
//! reconcile at most the time budget and leaves nothing running behind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::debug;

use crate::build::SecretData;
use crate::crd::{KafkaSpec, StartFrom, rules};

/// Default time between two lag refreshes of an EventConsumer (`--lag-interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Default time budget of one lag computation, all Kafka requests included.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(10);
/// `client.id` of the operator's lag clients (visible in broker logs and quotas).
pub const CLIENT_ID: &str = "sluice-operator-lag";
/// `ssl.ca.location` when `tls.caSecretRef` is unset: the system trust store, as for the
/// sidecar (the build's `SYSTEM_TRUST_STORE`).
const SYSTEM_TRUST_STORE: &str = "probe";

/// How the operator keeps `status.lag` fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LagSettings {
    /// Time between two refreshes of an applied EventConsumer; zero turns lag off
    /// (`status.lag` stays unset and no Kafka client is ever created).
    pub interval: Duration,
    /// Time budget of one computation.
    pub budget: Duration,
}

impl Default for LagSettings {
    fn default() -> Self {
        LagSettings {
            interval: DEFAULT_INTERVAL,
            budget: DEFAULT_BUDGET,
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
    set("group.id", group_id.to_owned());
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
        set(
            "sasl.username",
            secret_text(
                secrets,
                &r.name,
                &r.username_key,
                "spec.kafka.auth.sasl.secretRef.usernameKey",
            )?,
        );
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
            let field = "spec.kafka.auth.tls.clientCertSecretRef";
            set(
                "ssl.certificate.pem",
                secret_text(secrets, &c.name, "tls.crt", field)?,
            );
            set(
                "ssl.key.pem",
                secret_text(secrets, &c.name, "tls.key", field)?,
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

/// Reads the offsets of every partition of `topics` (blocking; returns by `deadline` give or
/// take one librdkafka timeout granularity). The client is dropped before returning.
pub fn query_blocking(
    props: &[(String, String)],
    topics: &[String],
    deadline: Instant,
    budget: Duration,
) -> Result<Vec<PartitionOffsets>, LagError> {
    let mut config = ClientConfig::new();
    for (k, v) in props {
        config.set(k, v);
    }
    let consumer: BaseConsumer<QuietContext> = config
        .create_with_context(QuietContext)
        .map_err(|e| LagError::Config(describe(&e)))?;
    let kafka = |what: &'static str| {
        move |e: KafkaError| match e {
            KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::OperationTimedOut)
            | KafkaError::OffsetFetch(rdkafka::types::RDKafkaErrorCode::OperationTimedOut) => {
                LagError::Timeout(budget)
            }
            e => LagError::Kafka {
                what,
                error: describe(&e),
            },
        }
    };

    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), remaining(deadline, budget)?)
            .map_err(kafka("reading the topic metadata"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| LagError::Topic {
                topic: topic.clone(),
                error: "not in the broker's metadata".into(),
            })?;
        if let Some(err) = t.error() {
            return Err(LagError::Topic {
                topic: topic.clone(),
                error: rdkafka::types::RDKafkaErrorCode::from(err).to_string(),
            });
        }
        if t.partitions().is_empty() {
            return Err(LagError::Topic {
                topic: topic.clone(),
                error: "has no partitions".into(),
            });
        }
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }

    let committed = consumer
        .committed_offsets(tpl, remaining(deadline, budget)?)
        .map_err(kafka("reading the group's committed offsets"))?;
    let mut out = Vec::with_capacity(committed.count());
    for e in committed.elements() {
        if let Err(err) = e.error() {
            return Err(LagError::Kafka {
                what: "reading the group's committed offsets",
                error: format!("{}[{}]: {}", e.topic(), e.partition(), describe(&err)),
            });
        }
        let committed = match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        };
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), remaining(deadline, budget)?)
            .map_err(|err| match err {
                KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::OperationTimedOut) => {
                    LagError::Timeout(budget)
                }
                err => LagError::Kafka {
                    what: "reading the watermarks",
                    error: format!("{}[{}]: {}", e.topic(), e.partition(), describe(&err)),
                },
            })?;
        out.push(PartitionOffsets {
            low,
            high,
            committed,
        });
    }
    drop(consumer);
    Ok(out)
}

/// The lag of a consumer group over `kafka.topics`, within `budget`. Runs on the blocking
/// pool; the client (and its librdkafka threads) is gone when this returns Ok or Err, except
/// after a [`LagError::Timeout`] from the outer guard, when the blocking task still finishes
/// its last request (each is bounded by the same deadline) and then drops the client.
pub async fn compute(
    kafka: &KafkaSpec,
    group_id: &str,
    secrets: &BTreeMap<String, SecretData>,
    budget: Duration,
) -> Result<i64, LagError> {
    let props = client_properties(kafka, group_id, secrets)?;
    let topics = kafka.topics.clone();
    let start_from = kafka.start_from;
    let deadline = Instant::now() + budget;
    let task = tokio::task::spawn_blocking(move || {
        query_blocking(&props, &topics, deadline, budget).map(|p| total(&p, start_from))
    });
    // The inner deadline bounds each request; the outer guard also covers client creation
    // and teardown.
    match tokio::time::timeout(budget + Duration::from_secs(2), task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(LagError::Task(join.to_string())),
        Err(_) => Err(LagError::Timeout(budget)),
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
        assert!(s.enabled());
        let off = LagSettings {
            interval: Duration::ZERO,
            ..s
        };
        assert!(!off.enabled());
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_within_the_budget() {
        // Port 9 on loopback: nothing listens, connections are refused at once.
        let mut k = kafka("");
        k.bootstrap_servers = "127.0.0.1:9".into();
        let started = Instant::now();
        let e = compute(&k, "g", &BTreeMap::new(), Duration::from_millis(1500))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(1500 + 2500),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(e.reason(), "Timeout" | "Kafka"), "{e}");
    }
}
