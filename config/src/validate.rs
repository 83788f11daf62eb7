//! Validation of [`SidecarConfig`]: every problem at once, each naming the field.

use std::fmt;
use std::time::Duration;

use humantime_serde::re::humantime;

use crate::{GroupProtocol, KafkaConnection, OWNED_PROPERTIES, SidecarConfig};

/// One thing wrong with a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field, as a JSON path (`kafka.topics[1]`).
    pub field: String,
    /// What was wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// An `http://` URL split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host as written (`localhost`, `127.0.0.1`, `[::1]`).
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path_and_query: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path][?query]`. The error says what is wrong.
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(if url.starts_with("https://") {
                format!("{url:?} uses https; the application is in the same pod, use http://")
            } else {
                format!("{url:?} is not an http:// URL")
            });
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!(
                "{url:?} contains user information, which is not supported"
            ));
        }
        if path.contains('#') {
            return Err(format!("{url:?} contains a fragment, which is not allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some(end) = v6.find(']') else {
                return Err(format!("{url:?} has an unterminated IPv6 address"));
            };
            let host = &authority[..end + 2];
            (host, &v6[end + 1..])
        } else {
            match authority.find(':') {
                Some(i) => (&authority[..i], &authority[i..]),
                None => (authority, ""),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            "" => 80,
            p => {
                let digits = p.strip_prefix(':').unwrap_or(p);
                match digits.parse::<u16>() {
                    Ok(0) | Err(_) => {
                        return Err(format!(
                            "{url:?} has an invalid port {digits:?}; allowed: 1 to 65535"
                        ));
                    }
                    Ok(n) => n,
                }
            }
        };
        let path_and_query = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if path_and_query.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!("{url:?} contains spaces or control characters"));
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port,
            path_and_query,
        })
    }

    /// Whether the host is this machine (the pod's network namespace).
    pub fn is_loopback(&self) -> bool {
        let h = self.host.as_str();
        h.eq_ignore_ascii_case("localhost")
            || h == "[::1]"
            || h.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// `host:port`, suitable for a TCP connect and an HTTP `Host` header.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A valid Kafka topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "{name:?} is {} characters long; at most 249 are allowed",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; topic names may contain only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn range(&mut self, field: &str, value: Option<u32>, min: u32, max: u32) {
        if let Some(v) = value
            && (v < min || v > max)
        {
            self.add(
                field,
                format!("{v} is out of range; allowed: {min} to {max}"),
            );
        }
    }

    fn duration(&mut self, field: &str, value: Duration, min: Duration, max: Duration) {
        if value < min || value > max {
            self.add(
                field,
                format!(
                    "{} is out of range; allowed: {} to {}",
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
        }
    }
}

const DEFAULT_SESSION_TIMEOUT_MS: u32 = 45_000;
const DEFAULT_MAX_POLL_INTERVAL_MS: u32 = 300_000;

impl SidecarConfig {
    /// Checks the whole configuration and returns every problem found.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut p = Problems(Vec::new());
        validate_kafka(&self.kafka, &mut p);
        self.validate_delivery(&mut p);
        self.validate_drain_and_admin(&mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationError { problems: p.0 })
        }
    }

    fn validate_delivery(&self, p: &mut Problems) {
        let d = &self.delivery;
        match HttpUrl::parse(&d.url) {
            Err(e) => p.add("delivery.url", e),
            Ok(url) if !url.is_loopback() => p.add(
                "delivery.url",
                format!(
                    "host {:?} is not this pod; allowed: localhost, 127.0.0.1 (or another 127.x address) or [::1]",
                    url.host
                ),
            ),
            Ok(url) => {
                let admin = self.admin.listen;
                if url.port == admin.port() && (admin.ip().is_unspecified() || admin.ip().is_loopback()) {
                    p.add(
                        "delivery.url",
                        format!(
                            "port {} is the sidecar's own admin port (admin.listen {admin}); use the application's port",
                            url.port
                        ),
                    );
                }
            }
        }
        p.duration(
            "delivery.timeout",
            d.timeout,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        );
        if d.max_in_flight == 0 || d.max_in_flight > 10_000 {
            p.add(
                "delivery.maxInFlight",
                format!("{} is out of range; allowed: 1 to 10000", d.max_in_flight),
            );
        }
        let r = &d.retry;
        if r.max_attempts == 0 || r.max_attempts > 1000 {
            p.add(
                "delivery.retry.maxAttempts",
                format!("{} is out of range; allowed: 1 to 1000", r.max_attempts),
            );
        }
        p.duration(
            "delivery.retry.initialBackoff",
            r.initial_backoff,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        );
        p.duration(
            "delivery.retry.maxBackoff",
            r.max_backoff,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        );
        if r.max_backoff < r.initial_backoff {
            p.add(
                "delivery.retry.maxBackoff",
                format!(
                    "{} is shorter than delivery.retry.initialBackoff ({}); it must be at least as long",
                    humantime::format_duration(r.max_backoff),
                    humantime::format_duration(r.initial_backoff)
                ),
            );
        }
        if let Some(dlt) = &d.dead_letter_topic {
            if let Err(e) = check_topic_name(dlt) {
                p.add("delivery.deadLetterTopic", e);
            } else if self.kafka.topics.iter().any(|t| t == dlt) {
                p.add(
                    "delivery.deadLetterTopic",
                    format!("{dlt:?} is also consumed (kafka.topics); a dead-letter topic must be a different topic"),
                );
            }
        }
        p.duration(
            "delivery.commitInterval",
            d.commit_interval,
            Duration::from_millis(10),
            Duration::from_secs(60),
        );
        if !(MIN_BUFFERED_BYTES..=MAX_BUFFERED_BYTES).contains(&d.max_buffered_bytes) {
            p.add(
                "delivery.maxBufferedBytes",
                format!(
                    "{} is out of range; allowed: {MIN_BUFFERED_BYTES} (1 MiB) to {MAX_BUFFERED_BYTES} (16 GiB)",
                    d.max_buffered_bytes
                ),
            );
        }
        if let Some(b) = &d.batch {
            if !(1..=MAX_BATCH_RECORDS).contains(&b.max_records) {
                p.add(
                    "delivery.batch.maxRecords",
                    format!(
                        "{} is out of range; allowed: 1 to {MAX_BATCH_RECORDS}",
                        b.max_records
                    ),
                );
            }
            let max_bytes = MAX_BATCH_BYTES.min(d.max_buffered_bytes / 4);
            if b.max_bytes < MIN_BATCH_BYTES || b.max_bytes > max_bytes {
                p.add(
                    "delivery.batch.maxBytes",
                    format!(
                        "{} is out of range; allowed: {MIN_BATCH_BYTES} to {max_bytes} (16 MiB, and at most a quarter of delivery.maxBufferedBytes, one partition's share)",
                        b.max_bytes
                    ),
                );
            }
            p.duration(
                "delivery.batch.maxWait",
                b.max_wait,
                Duration::ZERO,
                Duration::from_secs(10),
            );
        }
        if let Some(url) = &self.app.readiness_url {
            match HttpUrl::parse(url) {
                Err(e) => p.add("app.readinessUrl", e),
                Ok(u) if !u.is_loopback() => p.add(
                    "app.readinessUrl",
                    format!(
                        "host {:?} is not this pod; allowed: localhost, 127.0.0.1 or [::1]",
                        u.host
                    ),
                ),
                Ok(_) => {}
            }
        }
    }

    fn validate_drain_and_admin(&self, p: &mut Problems) {
        let drain = &self.drain;
        p.duration(
            "drain.timeout",
            drain.timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        if drain.timeout < self.delivery.timeout {
            p.add(
                "drain.timeout",
                format!(
                    "{} is shorter than delivery.timeout ({}); an in-flight delivery could not finish during a drain",
                    humantime::format_duration(drain.timeout),
                    humantime::format_duration(self.delivery.timeout)
                ),
            );
        }
        p.duration(
            "drain.commitTimeout",
            drain.commit_timeout,
            Duration::from_millis(100),
            Duration::from_secs(600),
        );
        if let Some(wait) = drain.await_pre_stop {
            p.duration(
                "drain.awaitPreStop",
                wait,
                Duration::from_millis(100),
                Duration::from_secs(60),
            );
        }
        let max_poll = self
            .kafka
            .max_poll_interval_ms
            .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
        if drain.timeout + drain.commit_timeout >= Duration::from_millis(u64::from(max_poll)) {
            p.add(
                "drain.timeout",
                format!(
                    "{} plus drain.commitTimeout ({}) is not shorter than kafka.maxPollIntervalMs ({max_poll} ms); a revoke that waits for in-flight deliveries and then commits would exceed the poll interval",
                    humantime::format_duration(drain.timeout),
                    humantime::format_duration(drain.commit_timeout)
                ),
            );
        }
        if let Some(path) = &drain.token_file
            && path.as_os_str().is_empty()
        {
            p.add(
                "drain.tokenFile",
                "must not be empty; omit it to disable /drain",
            );
        }
    }
}

/// Bounds of `delivery.batch`.
pub const MAX_BATCH_RECORDS: u32 = 10_000;
pub const MIN_BATCH_BYTES: u64 = 1 << 10;
pub const MAX_BATCH_BYTES: u64 = 16 << 20;

/// Bounds of `delivery.maxBufferedBytes`.
pub const MIN_BUFFERED_BYTES: u64 = 1 << 20;
pub const MAX_BUFFERED_BYTES: u64 = 16 << 30;

fn validate_kafka(k: &KafkaConnection, p: &mut Problems) {
    if k.bootstrap_servers.trim().is_empty() {
        p.add(
            "kafka.bootstrapServers",
            "must not be empty; expected host:port[,host:port...]",
        );
    } else {
        for server in k.bootstrap_servers.split(',') {
            let server = server.trim();
            if let Err(e) = check_host_port(server) {
                p.add("kafka.bootstrapServers", e);
            }
        }
    }
    if k.topics.is_empty() {
        p.add("kafka.topics", "must list at least one topic");
    }
    for (i, t) in k.topics.iter().enumerate() {
        if let Err(e) = check_topic_name(t) {
            p.add(format!("kafka.topics[{i}]"), e);
        } else if k.topics[..i].contains(t) {
            p.add(
                format!("kafka.topics[{i}]"),
                format!("{t:?} is listed twice"),
            );
        }
    }
    if k.group_id.trim().is_empty() {
        p.add("kafka.groupId", "must not be empty");
    } else if k.group_id.len() > 255 {
        p.add(
            "kafka.groupId",
            format!(
                "is {} characters long; at most 255 are allowed",
                k.group_id.len()
            ),
        );
    }
    match k.protocol {
        GroupProtocol::Consumer => {
            for (field, value) in [
                ("kafka.sessionTimeoutMs", k.session_timeout_ms),
                ("kafka.heartbeatIntervalMs", k.heartbeat_interval_ms),
            ] {
                if value.is_some() {
                    p.add(
                        field,
                        "is not allowed with protocol \"consumer\" (KIP-848): the broker sets it; remove it or use protocol \"classic\"",
                    );
                }
            }
        }
        GroupProtocol::Classic => {
            p.range(
                "kafka.sessionTimeoutMs",
                k.session_timeout_ms,
                1000,
                3_600_000,
            );
            p.range(
                "kafka.heartbeatIntervalMs",
                k.heartbeat_interval_ms,
                100,
                3_600_000,
            );
            let session = k.session_timeout_ms.unwrap_or(DEFAULT_SESSION_TIMEOUT_MS);
            if let Some(hb) = k.heartbeat_interval_ms
                && hb >= session
            {
                p.add(
                        "kafka.heartbeatIntervalMs",
                        format!("{hb} must be lower than the session timeout ({session} ms), ideally a third of it"),
                    );
            }
            let max_poll = k
                .max_poll_interval_ms
                .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
            if max_poll < session {
                p.add(
                    "kafka.maxPollIntervalMs",
                    format!("{max_poll} must be at least the session timeout ({session} ms)"),
                );
            }
        }
    }
    p.range(
        "kafka.maxPollIntervalMs",
        k.max_poll_interval_ms,
        1000,
        86_400_000,
    );
    p.range(
        "kafka.queuedMaxMessagesKbytes",
        k.queued_max_messages_kbytes,
        1,
        2_097_151,
    );
    p.range(
        "kafka.fetchMaxBytes",
        k.fetch_max_bytes,
        1024,
        2_147_483_135,
    );
    p.range(
        "kafka.maxPartitionFetchBytes",
        k.max_partition_fetch_bytes,
        1024,
        1_000_000_000,
    );
    if let Some(auth) = &k.auth {
        if auth.sasl.is_none() && auth.tls.is_none() {
            p.add(
                "kafka.auth",
                "is empty; set sasl, tls or both, or remove auth",
            );
        }
        if let Some(sasl) = &auth.sasl {
            let mut files = vec![("kafka.auth.sasl.passwordFile", &sasl.password_file)];
            match (&sasl.username, &sasl.username_file) {
                (Some(_), Some(_)) => p.add(
                    "kafka.auth.sasl.username",
                    "and kafka.auth.sasl.usernameFile are both set; set exactly one: username for a literal name, usernameFile for a mounted file",
                ),
                (None, None) => p.add(
                    "kafka.auth.sasl.usernameFile",
                    "is required (or kafka.auth.sasl.username): set exactly one of them",
                ),
                (Some(name), None) => {
                    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_whitespace)
                    {
                        p.add(
                            "kafka.auth.sasl.username",
                            "must be 1 to 255 characters without whitespace",
                        );
                    }
                }
                (None, Some(file)) => files.push(("kafka.auth.sasl.usernameFile", file)),
            }
            for (field, path) in files {
                if path.as_os_str().is_empty() {
                    p.add(
                        field,
                        "must name the mounted file that holds the credential",
                    );
                }
            }
        }
        if let Some(tls) = &auth.tls {
            if tls.ca_file.as_os_str().is_empty() {
                p.add(
                    "kafka.auth.tls.caFile",
                    "must name the mounted CA certificate file",
                );
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(_), None) => {
                    p.add("kafka.auth.tls.keyFile", "is required when certFile is set")
                }
                (None, Some(_)) => {
                    p.add("kafka.auth.tls.certFile", "is required when keyFile is set")
                }
                _ => {}
            }
        }
    }
    for (key, value) in &k.properties {
        let field = format!("kafka.properties[{key:?}]");
        if let Some((_, instead)) = OWNED_PROPERTIES.iter().find(|(owned, _)| owned == key) {
            p.add(
                field,
                format!("{key:?} is set by Sluice and cannot be overridden; use {instead}"),
            );
        } else if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
        {
            p.add(field, format!("{key:?} is not a librdkafka property name (lower-case letters, digits, '.' and '_')"));
        } else if value.is_empty() {
            p.add(
                field,
                "has an empty value; remove the property to use librdkafka's default",
            );
        }
    }
}

fn check_host_port(server: &str) -> Result<(), String> {
    if server.contains("://") {
        return Err(format!("{server:?} must be host:port without a scheme"));
    }
    let Some((host, port)) = server.rsplit_once(':') else {
        return Err(format!("{server:?} has no port; expected host:port"));
    };
    if host.is_empty() {
        return Err(format!("{server:?} has no host; expected host:port"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "{server:?} has an invalid port {port:?}; allowed: 1 to 65535"
        )),
        Ok(_) => Ok(()),
    }
}
