//! The sidecar configuration ([`SidecarConfig`]) an EventConsumer's pods read.

use std::path::PathBuf;
use std::time::Duration;

use sluice_config::{
    Admin, App, Auth, Batch, Delivery, Drain, GroupProtocol, KafkaConnection, Ordering, Retry,
    Sasl, SaslMechanism, SidecarConfig, StartFrom, Tls,
};

use super::MOUNT_PATH;
use crate::crd::{self, EventConsumerSpec};
use crate::tuning::Tuning;

/// Files of the sidecar's projected volume, relative to [`MOUNT_PATH`].
pub const CONFIG_FILE: &str = "config.json";
pub const DRAIN_TOKEN_FILE: &str = "drain/token";
pub const SASL_USERNAME_FILE: &str = "sasl/username";
pub const SASL_PASSWORD_FILE: &str = "sasl/password";
pub const TLS_CA_FILE: &str = "tls/ca.crt";
pub const TLS_CERT_FILE: &str = "tls/client.crt";
pub const TLS_KEY_FILE: &str = "tls/client.key";
/// `kafka.auth.tls.caFile` when `tls.caSecretRef` is unset: librdkafka's `probe` value of
/// `ssl.ca.location` searches the image's usual system trust-store paths.
pub const SYSTEM_TRUST_STORE: &str = "probe";

/// The path of a file in the sidecar's volume.
pub fn mounted(file: &str) -> PathBuf {
    PathBuf::from(MOUNT_PATH).join(file)
}

/// Renders the sidecar configuration of an EventConsumer from its spec and tuning.
pub fn sidecar_config(
    spec: &EventConsumerSpec,
    tuning: &Tuning,
    namespace: &str,
    name: &str,
) -> SidecarConfig {
    let k = &spec.kafka;
    let mut kafka = KafkaConnection::new(
        k.bootstrap_servers.clone(),
        k.topics.clone(),
        k.effective_group_id(namespace, name),
    );
    kafka.start_from = match k.start_from {
        crd::StartFrom::Earliest => StartFrom::Earliest,
        crd::StartFrom::Latest => StartFrom::Latest,
    };
    kafka.protocol = match tuning.group_protocol.as_str() {
        "consumer" => GroupProtocol::Consumer,
        _ => GroupProtocol::Classic,
    };
    kafka.session_timeout_ms = tuning.session_timeout_ms.map(saturate);
    kafka.heartbeat_interval_ms = tuning.heartbeat_interval_ms.map(saturate);
    kafka.max_poll_interval_ms = Some(saturate(tuning.max_poll_interval_ms));
    kafka.queued_max_messages_kbytes = Some(saturate(tuning.queued_max_messages_kbytes));
    kafka.fetch_max_bytes = Some(saturate(tuning.fetch_max_bytes));
    kafka.max_partition_fetch_bytes = Some(saturate(tuning.max_partition_fetch_bytes));
    kafka.auth = k.auth.as_ref().map(|a| Auth {
        sasl: a.sasl.as_ref().map(|s| Sasl {
            mechanism: match s.mechanism {
                crd::SaslMechanism::Plain => SaslMechanism::Plain,
                crd::SaslMechanism::ScramSha256 => SaslMechanism::ScramSha256,
                crd::SaslMechanism::ScramSha512 => SaslMechanism::ScramSha512,
            },
            // A literal username travels in the configuration (it is not a secret); only
            // a username read from the Secret is a mounted file.
            username: s.username.clone(),
            username_file: s.username.is_none().then(|| mounted(SASL_USERNAME_FILE)),
            password_file: mounted(SASL_PASSWORD_FILE),
        }),
        tls: a.tls.as_ref().map(|t| Tls {
            ca_file: match &t.ca_secret_ref {
                Some(_) => mounted(TLS_CA_FILE),
                None => PathBuf::from(SYSTEM_TRUST_STORE),
            },
            cert_file: t
                .client_cert_secret_ref
                .as_ref()
                .map(|_| mounted(TLS_CERT_FILE)),
            key_file: t
                .client_cert_secret_ref
                .as_ref()
                .map(|_| mounted(TLS_KEY_FILE)),
        }),
    });
    kafka.properties = k.properties.clone();
    // The tuning's one setting without a dedicated configuration field (the CRD reserves the
    // key, so the user cannot have set it).
    kafka.properties.insert(
        "queued.min.messages".to_owned(),
        tuning.queued_min_messages.to_string(),
    );

    let d = &spec.delivery;
    let delivery = Delivery {
        url: d.url.clone(),
        timeout: d.timeout.into(),
        ordering: match d.ordering {
            crd::Ordering::Partition => Ordering::Partition,
            crd::Ordering::Key => Ordering::Key,
            crd::Ordering::None => Ordering::None,
        },
        max_in_flight: u32::try_from(d.max_in_flight).unwrap_or(0),
        retry: Retry {
            max_attempts: u32::try_from(d.retry.max_attempts).unwrap_or(0),
            initial_backoff: d.retry.initial_backoff.into(),
            max_backoff: d.retry.max_backoff.into(),
        },
        dead_letter_topic: d.dead_letter_topic.clone(),
        commit_interval: Duration::from_millis(500),
        max_buffered_bytes: tuning.max_buffered_bytes,
        batch: d.batch.as_ref().map(|b| Batch {
            max_records: u32::try_from(b.max_records).unwrap_or(0),
            // At most one partition's share of the record buffer (the sidecar's rule).
            max_bytes: u64::try_from(b.max_bytes)
                .unwrap_or(0)
                .min(tuning.max_buffered_bytes / 4),
            max_wait: b.max_wait.into(),
        }),
    };
    SidecarConfig {
        kafka,
        delivery,
        drain: Drain {
            timeout: Duration::from_millis(tuning.in_flight_timeout_ms),
            commit_timeout: Duration::from_millis(tuning.commit_timeout_ms),
            token_file: Some(mounted(DRAIN_TOKEN_FILE)),
            await_pre_stop: None,
        },
        admin: Admin::default(),
        app: App::default(),
    }
}

fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
