use std::time::Duration;

use super::*;

fn minimal_json() -> &'static str {
    r#"{
        "kafka": {"bootstrapServers": "kafka:9092", "topics": ["orders"], "groupId": "shop.inventory"},
        "delivery": {"url": "http://127.0.0.1:8080/events"}
    }"#
}

fn valid() -> SidecarConfig {
    SidecarConfig::from_json(minimal_json()).expect("the minimal configuration parses")
}

/// Asserts that validation fails with exactly one problem on `field` whose message contains
/// every fragment.
fn assert_problem(config: &SidecarConfig, field: &str, fragments: &[&str]) {
    let err = config
        .validate()
        .expect_err("the configuration must be rejected");
    let on_field: Vec<_> = err.problems.iter().filter(|p| p.field == field).collect();
    assert_eq!(
        on_field.len(),
        1,
        "expected one problem on {field}, got: {err}"
    );
    for f in fragments {
        assert!(
            on_field[0].message.contains(f),
            "message for {field} lacks {f:?}: {}",
            on_field[0].message
        );
    }
    assert_eq!(
        err.problems.len(),
        1,
        "expected only the problem on {field}, got: {err}"
    );
}

#[test]
fn minimal_configuration_gets_documented_defaults() {
    let c = valid();
    c.validate().expect("the minimal configuration is valid");
    assert_eq!(c.kafka.start_from, StartFrom::Earliest);
    assert_eq!(c.kafka.protocol, GroupProtocol::Classic);
    assert_eq!(c.delivery.timeout, Duration::from_secs(10));
    assert_eq!(c.delivery.ordering, Ordering::Partition);
    assert_eq!(c.delivery.max_in_flight, 64);
    assert_eq!(c.delivery.retry.max_attempts, 5);
    assert_eq!(c.delivery.retry.initial_backoff, Duration::from_millis(200));
    assert_eq!(c.delivery.retry.max_backoff, Duration::from_secs(30));
    assert_eq!(c.delivery.commit_interval, Duration::from_millis(500));
    assert_eq!(c.delivery.dead_letter_topic, None);
    assert_eq!(c.drain.timeout, Duration::from_secs(30));
    assert_eq!(c.drain.token_file, None);
    assert_eq!(c.admin.listen.to_string(), "0.0.0.0:9898");
    assert_eq!(c.app.readiness_url, None);
}

#[test]
fn full_configuration_round_trips_through_json() {
    let json = r#"{
      "kafka": {
        "bootstrapServers": "a:9092,b:9093", "topics": ["orders", "returns"], "groupId": "g",
        "startFrom": "latest", "protocol": "classic", "sessionTimeoutMs": 10000,
        "heartbeatIntervalMs": 3000, "maxPollIntervalMs": 60000, "queuedMaxMessagesKbytes": 4096,
        "fetchMaxBytes": 1048576, "maxPartitionFetchBytes": 262144,
        "auth": {"sasl": {"mechanism": "SCRAM-SHA-512", "usernameFile": "/s/u", "passwordFile": "/s/p"},
                 "tls": {"caFile": "/t/ca.crt", "certFile": "/t/tls.crt", "keyFile": "/t/tls.key"}},
        "properties": {"client.rack": "zone-a"}
      },
      "delivery": {"url": "http://localhost:8080/e?x=1", "timeout": "2s", "ordering": "key",
                   "maxInFlight": 8, "retry": {"maxAttempts": 3, "initialBackoff": "50ms", "maxBackoff": "1s"},
                   "deadLetterTopic": "orders.dlq", "commitInterval": "1s"},
      "drain": {"timeout": "20s", "tokenFile": "/etc/sluice/drain-token"},
      "admin": {"listen": "0.0.0.0:9898"},
      "app": {"readinessUrl": "http://127.0.0.1:8080/ready"}
    }"#;
    let c = SidecarConfig::from_json(json).unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.kafka
            .auth
            .as_ref()
            .unwrap()
            .sasl
            .as_ref()
            .unwrap()
            .mechanism,
        SaslMechanism::ScramSha512
    );
    assert_eq!(c.delivery.ordering, Ordering::Key);
    assert_eq!(c.delivery.retry.initial_backoff, Duration::from_millis(50));
    let again = SidecarConfig::from_json(&c.to_json()).unwrap();
    assert_eq!(again, c);
    assert!(c.to_json().contains("\"deadLetterTopic\": \"orders.dlq\""));
}

#[test]
fn unknown_keys_are_rejected_at_every_level() {
    for (json, key) in [
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://localhost:1/"}, "extra": 1}"#,
            "extra",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g", "topic": "t"}, "delivery": {"url": "http://localhost:1/"}}"#,
            "topic",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://localhost:1/", "retries": 3}}"#,
            "retries",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://localhost:1/", "retry": {"max": 3}}}"#,
            "max",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://localhost:1/"}, "drain": {"token": "x"}}"#,
            "token",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g", "auth": {"tls": {"ca": "x"}}}, "delivery": {"url": "http://localhost:1/"}}"#,
            "ca",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://localhost:1/"}, "admin": {"port": 1}}"#,
            "port",
        ),
        (
            r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://localhost:1/"}, "app": {"url": "x"}}"#,
            "url",
        ),
    ] {
        let err = SidecarConfig::from_json(json).expect_err(key).to_string();
        assert!(
            err.contains(&format!("unknown field `{key}`")),
            "{key}: {err}"
        );
    }
}

#[test]
fn enumerations_and_durations_reject_bad_values_with_the_allowed_ones() {
    let cases = [
        (r#""ordering": "fifo""#, "ordering", "partition"),
        (r#""timeout": "soon""#, "timeout", "soon"),
    ];
    for (field, name, fragment) in cases {
        let json = format!(
            r#"{{"kafka": {{"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g"}}, "delivery": {{"url": "http://localhost:1/", {field}}}}}"#
        );
        let err = SidecarConfig::from_json(&json).expect_err(name).to_string();
        assert!(err.contains(fragment), "{name}: {err}");
    }
    let json = r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g", "protocol": "kip848"}, "delivery": {"url": "http://localhost:1/"}}"#;
    let err = SidecarConfig::from_json(json).unwrap_err().to_string();
    assert!(err.contains("classic") && err.contains("consumer"), "{err}");
    let json = r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"], "groupId": "g", "auth": {"sasl": {"mechanism": "GSSAPI", "usernameFile": "u", "passwordFile": "p"}}}, "delivery": {"url": "http://localhost:1/"}}"#;
    let err = SidecarConfig::from_json(json).unwrap_err().to_string();
    assert!(err.contains("SCRAM-SHA-512"), "{err}");
    let json = r#"{"kafka": {"bootstrapServers": "k:1", "topics": ["t"]}, "delivery": {"url": "http://localhost:1/"}}"#;
    let err = SidecarConfig::from_json(json).unwrap_err().to_string();
    assert!(err.contains("missing field `groupId`"), "{err}");
}

#[test]
fn bootstrap_servers_must_be_host_port_lists() {
    for (value, fragment) in [
        ("", "must not be empty"),
        ("kafka", "has no port"),
        ("kafka:0", "invalid port"),
        ("kafka:99999", "invalid port"),
        (":9092", "has no host"),
        ("PLAINTEXT://kafka:9092", "without a scheme"),
        ("a:1,b", "\"b\" has no port"),
    ] {
        let mut c = valid();
        c.kafka.bootstrap_servers = value.into();
        assert_problem(&c, "kafka.bootstrapServers", &[fragment]);
    }
}

#[test]
fn topics_must_be_present_valid_and_distinct() {
    let mut c = valid();
    c.kafka.topics.clear();
    assert_problem(&c, "kafka.topics", &["at least one"]);
    for (topic, fragment) in [
        ("", "must not be empty"),
        ("has space", "contains ' '"),
        ("..", "not a valid topic name"),
        (&"x".repeat(250), "at most 249"),
    ] {
        let mut c = valid();
        c.kafka.topics.push(topic.to_owned());
        assert_problem(&c, "kafka.topics[1]", &[fragment]);
    }
    let mut c = valid();
    c.kafka.topics.push("orders".into());
    assert_problem(&c, "kafka.topics[1]", &["listed twice"]);
}

#[test]
fn group_id_must_be_set() {
    let mut c = valid();
    c.kafka.group_id = "  ".into();
    assert_problem(&c, "kafka.groupId", &["must not be empty"]);
    c.kafka.group_id = "g".repeat(256);
    assert_problem(&c, "kafka.groupId", &["at most 255"]);
}

#[test]
fn consumer_protocol_rejects_client_side_session_settings() {
    let mut c = valid();
    c.kafka.protocol = GroupProtocol::Consumer;
    c.validate().unwrap();
    c.kafka.session_timeout_ms = Some(10_000);
    assert_problem(
        &c,
        "kafka.sessionTimeoutMs",
        &["not allowed", "consumer", "classic"],
    );
    c.kafka.session_timeout_ms = None;
    c.kafka.heartbeat_interval_ms = Some(1000);
    assert_problem(&c, "kafka.heartbeatIntervalMs", &["broker sets it"]);
}

#[test]
fn classic_timing_rules() {
    let mut c = valid();
    c.kafka.session_timeout_ms = Some(500);
    assert_problem(
        &c,
        "kafka.sessionTimeoutMs",
        &["500 is out of range", "1000 to 3600000"],
    );
    let mut c = valid();
    c.kafka.session_timeout_ms = Some(6000);
    c.kafka.heartbeat_interval_ms = Some(6000);
    assert_problem(
        &c,
        "kafka.heartbeatIntervalMs",
        &["lower than the session timeout (6000 ms)"],
    );
    let mut c = valid();
    c.kafka.heartbeat_interval_ms = Some(50);
    assert_problem(&c, "kafka.heartbeatIntervalMs", &["100 to"]);
    let mut c = valid();
    c.kafka.session_timeout_ms = Some(60_000);
    c.kafka.max_poll_interval_ms = Some(45_000);
    c.drain.timeout = Duration::from_secs(20);
    assert_problem(
        &c,
        "kafka.maxPollIntervalMs",
        &["at least the session timeout (60000 ms)"],
    );
}

#[test]
fn memory_bounds_are_range_checked() {
    let mut c = valid();
    c.kafka.queued_max_messages_kbytes = Some(0);
    assert_problem(&c, "kafka.queuedMaxMessagesKbytes", &["1 to 2097151"]);
    let mut c = valid();
    c.kafka.fetch_max_bytes = Some(10);
    assert_problem(&c, "kafka.fetchMaxBytes", &["1024 to"]);
    let mut c = valid();
    c.kafka.max_partition_fetch_bytes = Some(2_000_000_000);
    assert_problem(&c, "kafka.maxPartitionFetchBytes", &["1024 to 1000000000"]);
    let mut c = valid();
    c.kafka.max_poll_interval_ms = Some(100_000_000);
    assert_problem(&c, "kafka.maxPollIntervalMs", &["1000 to 86400000"]);
}

#[test]
fn auth_rules() {
    let mut c = valid();
    c.kafka.auth = Some(Auth {
        sasl: None,
        tls: None,
    });
    assert_problem(&c, "kafka.auth", &["is empty"]);
    let mut c = valid();
    c.kafka.auth = Some(Auth {
        sasl: Some(Sasl {
            mechanism: SaslMechanism::Plain,
            username: None,
            username_file: Some("".into()),
            password_file: "/p".into(),
        }),
        tls: None,
    });
    assert_problem(&c, "kafka.auth.sasl.usernameFile", &["mounted file"]);
    // The username is a literal or a file: exactly one of them.
    let sasl = |username: Option<&str>, file: Option<&str>| {
        let mut c = valid();
        c.kafka.auth = Some(Auth {
            sasl: Some(Sasl {
                mechanism: SaslMechanism::ScramSha512,
                username: username.map(Into::into),
                username_file: file.map(Into::into),
                password_file: "/p".into(),
            }),
            tls: None,
        });
        c
    };
    assert_problem(
        &sasl(Some("alice"), Some("/u")),
        "kafka.auth.sasl.username",
        &["both set", "exactly one"],
    );
    assert_problem(
        &sasl(None, None),
        "kafka.auth.sasl.usernameFile",
        &["is required", "kafka.auth.sasl.username"],
    );
    for bad in ["", "has space", &"x".repeat(256)] {
        assert_problem(
            &sasl(Some(bad), None),
            "kafka.auth.sasl.username",
            &["1 to 255 characters without whitespace"],
        );
    }
    assert!(sasl(Some("my-user"), None).validate().is_ok());
    assert!(sasl(None, Some("/u")).validate().is_ok());
    let tls = |cert: Option<&str>, key: Option<&str>| Tls {
        ca_file: "/ca".into(),
        cert_file: cert.map(Into::into),
        key_file: key.map(Into::into),
    };
    let mut c = valid();
    c.kafka.auth = Some(Auth {
        sasl: None,
        tls: Some(tls(Some("/c"), None)),
    });
    assert_problem(&c, "kafka.auth.tls.keyFile", &["required when certFile"]);
    c.kafka.auth = Some(Auth {
        sasl: None,
        tls: Some(tls(None, Some("/k"))),
    });
    assert_problem(&c, "kafka.auth.tls.certFile", &["required when keyFile"]);
    c.kafka.auth = Some(Auth {
        sasl: None,
        tls: Some(Tls {
            ca_file: "".into(),
            cert_file: None,
            key_file: None,
        }),
    });
    assert_problem(&c, "kafka.auth.tls.caFile", &["CA certificate"]);
}

#[test]
fn every_owned_property_is_rejected_by_name() {
    for (key, instead) in OWNED_PROPERTIES {
        let mut c = valid();
        c.kafka.properties.insert((*key).to_owned(), "x".into());
        assert_problem(
            &c,
            &format!("kafka.properties[{key:?}]"),
            &[key, "set by Sluice", instead],
        );
    }
    let mut c = valid();
    c.kafka.properties.insert("Fetch.Wait".into(), "1".into());
    assert_problem(
        &c,
        "kafka.properties[\"Fetch.Wait\"]",
        &["not a librdkafka property name"],
    );
    let mut c = valid();
    c.kafka.properties.insert("client.rack".into(), "".into());
    assert_problem(&c, "kafka.properties[\"client.rack\"]", &["empty value"]);
    let mut c = valid();
    c.kafka
        .properties
        .insert("fetch.wait.max.ms".into(), "50".into());
    c.validate().unwrap();
}

#[test]
fn delivery_url_must_be_plain_http_on_loopback() {
    for (url, fragment) in [
        ("https://127.0.0.1:8443/", "uses https"),
        ("ftp://127.0.0.1/", "not an http:// URL"),
        ("http://app.default.svc:8080/", "not this pod"),
        ("http://10.0.0.1:8080/", "not this pod"),
        ("http://:8080/", "no host"),
        ("http://127.0.0.1:0/", "invalid port"),
        ("http://127.0.0.1:70000/", "invalid port"),
        ("http://127.0.0.1:x/", "invalid port"),
        ("http://user@127.0.0.1:80/", "user information"),
        ("http://127.0.0.1:80/a#frag", "fragment"),
        ("http://[::1:80/", "unterminated IPv6"),
        ("http://127.0.0.1:80/a b", "spaces"),
        ("http://127.0.0.1:9898/", "own admin port"),
    ] {
        let mut c = valid();
        c.delivery.url = url.into();
        assert_problem(&c, "delivery.url", &[fragment]);
    }
    for url in [
        "http://localhost/",
        "http://127.0.0.2:1/x?y",
        "http://[::1]:8080",
        "http://LOCALHOST:80",
    ] {
        let mut c = valid();
        c.delivery.url = url.into();
        c.validate().unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn http_url_parts() {
    let u = HttpUrl::parse("http://[::1]:8080/a?b=c").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.path_and_query.as_str()),
        ("[::1]", 8080, "/a?b=c")
    );
    assert!(u.is_loopback());
    assert_eq!(u.authority(), "[::1]:8080");
    let u = HttpUrl::parse("http://localhost").unwrap();
    assert_eq!((u.port, u.path_and_query.as_str()), (80, "/"));
    let u = HttpUrl::parse("http://127.0.0.1:81?q").unwrap();
    assert_eq!(u.path_and_query, "/?q");
    assert!(!HttpUrl::parse("http://128.0.0.1/").unwrap().is_loopback());
}

#[test]
fn delivery_limits() {
    let mut c = valid();
    c.delivery.max_in_flight = 0;
    assert_problem(&c, "delivery.maxInFlight", &["1 to 10000"]);
    let mut c = valid();
    c.delivery.timeout = Duration::ZERO;
    assert_problem(&c, "delivery.timeout", &["0s is out of range", "1ms to 1h"]);
    let mut c = valid();
    c.delivery.retry.max_attempts = 0;
    assert_problem(&c, "delivery.retry.maxAttempts", &["1 to 1000"]);
    let mut c = valid();
    c.delivery.retry.initial_backoff = Duration::from_secs(5);
    c.delivery.retry.max_backoff = Duration::from_secs(1);
    assert_problem(
        &c,
        "delivery.retry.maxBackoff",
        &["shorter than delivery.retry.initialBackoff (5s)"],
    );
    let mut c = valid();
    c.delivery.retry.initial_backoff = Duration::ZERO;
    assert_problem(&c, "delivery.retry.initialBackoff", &["out of range"]);
    let mut c = valid();
    c.delivery.commit_interval = Duration::from_millis(1);
    assert_problem(&c, "delivery.commitInterval", &["10ms to 1m"]);
}

#[test]
fn dead_letter_topic_must_be_valid_and_not_consumed() {
    let mut c = valid();
    c.delivery.dead_letter_topic = Some("orders".into());
    assert_problem(&c, "delivery.deadLetterTopic", &["also consumed"]);
    c.delivery.dead_letter_topic = Some("bad/topic".into());
    assert_problem(&c, "delivery.deadLetterTopic", &["contains '/'"]);
    c.delivery.dead_letter_topic = Some("orders.dlq".into());
    c.validate().unwrap();
}

#[test]
fn drain_rules() {
    let mut c = valid();
    c.drain.timeout = Duration::from_secs(5);
    assert_problem(
        &c,
        "drain.timeout",
        &["shorter than delivery.timeout (10s)"],
    );
    let mut c = valid();
    c.kafka.max_poll_interval_ms = Some(45_000);
    c.drain.timeout = Duration::from_secs(45);
    assert_problem(&c, "drain.timeout", &["kafka.maxPollIntervalMs (45000 ms)"]);
    let mut c = valid();
    c.drain.token_file = Some("".into());
    assert_problem(&c, "drain.tokenFile", &["must not be empty"]);
}

#[test]
fn readiness_url_rules() {
    let mut c = valid();
    c.app.readiness_url = Some("http://example.com/ready".into());
    assert_problem(&c, "app.readinessUrl", &["not this pod"]);
    c.app.readiness_url = Some("tcp://127.0.0.1:1".into());
    assert_problem(&c, "app.readinessUrl", &["not an http:// URL"]);
}

#[test]
fn all_problems_are_reported_together() {
    let mut c = valid();
    c.kafka.topics.clear();
    c.kafka.group_id.clear();
    c.delivery.max_in_flight = 0;
    c.delivery.url = "https://x/".into();
    let err = c.validate().unwrap_err();
    let fields: Vec<_> = err.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "kafka.topics",
            "kafka.groupId",
            "delivery.url",
            "delivery.maxInFlight"
        ]
    );
    let text = err.to_string();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.lines().all(|l| l.starts_with("  - ")), "{text}");
}

#[test]
fn consumer_properties_put_offsets_under_sluice_control() {
    let mut c = valid();
    c.kafka.session_timeout_ms = Some(10_000);
    c.kafka.queued_max_messages_kbytes = Some(2048);
    c.kafka.properties.insert("client.rack".into(), "a".into());
    let p = c.kafka.consumer_properties().unwrap();
    let get = |k: &str| p.get(k).map(String::as_str);
    assert_eq!(get("bootstrap.servers"), Some("kafka:9092"));
    assert_eq!(get("group.id"), Some("shop.inventory"));
    assert_eq!(get("enable.auto.commit"), Some("false"));
    assert_eq!(get("enable.auto.offset.store"), Some("false"));
    assert_eq!(get("auto.offset.reset"), Some("earliest"));
    assert_eq!(
        get("partition.assignment.strategy"),
        Some("cooperative-sticky")
    );
    assert_eq!(get("session.timeout.ms"), Some("10000"));
    assert_eq!(get("queued.max.messages.kbytes"), Some("2048"));
    assert_eq!(get("security.protocol"), Some("plaintext"));
    assert_eq!(get("client.rack"), Some("a"));
    c.kafka.protocol = GroupProtocol::Consumer;
    c.kafka.session_timeout_ms = None;
    c.kafka.start_from = StartFrom::Latest;
    let p = c.kafka.consumer_properties().unwrap();
    assert_eq!(
        p.get("group.protocol").map(String::as_str),
        Some("consumer")
    );
    assert_eq!(
        p.get("auto.offset.reset").map(String::as_str),
        Some("latest")
    );
    assert!(!p.contains_key("partition.assignment.strategy"));
    assert!(!p.contains_key("session.timeout.ms"));
    // Unset: Sluice's defaults for the prefetch, not librdkafka's.
    assert_eq!(get("fetch.queue.backoff.ms"), Some("10"));
    assert_eq!(get("queued.min.messages"), Some("1000"));
    assert_eq!(get("fetch.max.bytes"), Some("4194304"));
    assert_eq!(get("max.partition.fetch.bytes"), Some("262144"));
    c.kafka.queued_max_messages_kbytes = None;
    let p = c.kafka.consumer_properties().unwrap();
    assert_eq!(
        p.get("queued.max.messages.kbytes").map(String::as_str),
        Some("16384")
    );
    // The backoff is a default the user can override.
    c.kafka
        .properties
        .insert("fetch.queue.backoff.ms".into(), "250".into());
    let p = c.kafka.consumer_properties().unwrap();
    assert_eq!(
        p.get("fetch.queue.backoff.ms").map(String::as_str),
        Some("250")
    );
}

#[test]
fn credentials_come_from_files() {
    let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("user"), "alice\n").unwrap();
    std::fs::write(dir.join("pass"), "s3cret").unwrap();
    std::fs::write(dir.join("empty"), "\n").unwrap();
    let mut k = KafkaConnection::new("k:9092", vec!["t".into()], "g");
    k.auth = Some(Auth {
        sasl: Some(Sasl {
            mechanism: SaslMechanism::ScramSha256,
            username: None,
            username_file: Some(dir.join("user")),
            password_file: dir.join("pass"),
        }),
        tls: Some(Tls {
            ca_file: "/ca.crt".into(),
            cert_file: None,
            key_file: None,
        }),
    });
    let p = k.client_properties().unwrap();
    assert_eq!(p["security.protocol"], "sasl_ssl");
    assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-256");
    assert_eq!(p["sasl.username"], "alice");
    assert_eq!(p["sasl.password"], "s3cret");
    assert_eq!(p["ssl.ca.location"], "/ca.crt");
    // A literal username (a Strimzi KafkaUser's Secret holds only the password) is used as
    // written, and no username file is read.
    if let Some(sasl) = k.auth.as_mut().and_then(|a| a.sasl.as_mut()) {
        sasl.username = Some("my-user".into());
        sasl.username_file = None;
    }
    let p = k.client_properties().unwrap();
    assert_eq!(p["sasl.username"], "my-user");
    assert_eq!(p["sasl.password"], "s3cret");
    if let Some(sasl) = k.auth.as_mut().and_then(|a| a.sasl.as_mut()) {
        sasl.password_file = dir.join("empty");
    }
    let err = k.client_properties().unwrap_err().to_string();
    assert!(
        err.contains("kafka.auth.sasl.passwordFile") && err.contains("empty"),
        "{err}"
    );
    if let Some(sasl) = k.auth.as_mut().and_then(|a| a.sasl.as_mut()) {
        sasl.password_file = dir.join("missing");
    }
    let err = k.client_properties().unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_reports_path_and_problems() {
    let dir = std::env::temp_dir().join(format!("sluice-config-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = SidecarConfig::load(&dir.join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("cannot read the configuration file") && missing.contains("nope.json"),
        "{missing}"
    );
    std::fs::write(dir.join("bad.json"), "{\"kafka\": 1}").unwrap();
    let bad = SidecarConfig::load(&dir.join("bad.json"))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("bad.json") && bad.contains("line 1"), "{bad}");
    std::fs::write(
        dir.join("invalid.json"),
        minimal_json().replace("orders", ""),
    )
    .unwrap();
    let invalid = SidecarConfig::load(&dir.join("invalid.json"))
        .unwrap_err()
        .to_string();
    assert!(
        invalid.contains("kafka.topics[0]: must not be empty"),
        "{invalid}"
    );
    std::fs::write(dir.join("ok.json"), minimal_json()).unwrap();
    assert_eq!(SidecarConfig::load(&dir.join("ok.json")).unwrap(), valid());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn batch_delivery_is_off_by_default_and_fills_its_defaults() {
    assert_eq!(valid().delivery.batch, None);
    let c = SidecarConfig::from_json(
        r#"{
        "kafka": {"bootstrapServers": "kafka:9092", "topics": ["orders"], "groupId": "g"},
        "delivery": {"url": "http://127.0.0.1:8080/events", "batch": {}}
    }"#,
    )
    .expect("an empty batch object parses");
    c.validate().expect("the batch defaults are valid");
    assert_eq!(c.delivery.batch, Some(Batch::default()));
    let b = Batch::default();
    assert_eq!(
        (b.max_records, b.max_bytes, b.max_wait),
        (100, 1 << 20, Duration::from_millis(50))
    );
    let err = SidecarConfig::from_json(
        r#"{
        "kafka": {"bootstrapServers": "kafka:9092", "topics": ["orders"], "groupId": "g"},
        "delivery": {"url": "http://127.0.0.1:8080/events", "batch": {"maxRecord": 5}}
    }"#,
    )
    .expect_err("a misspelt batch field is rejected");
    assert!(err.to_string().contains("maxRecord"), "{err}");
}

#[test]
fn batch_limits_are_range_checked() {
    let with = |f: &dyn Fn(&mut Batch)| {
        let mut c = valid();
        let mut b = Batch::default();
        f(&mut b);
        c.delivery.batch = Some(b);
        // A budget large enough for the absolute cap to bind.
        c.delivery.max_buffered_bytes = 64 << 20;
        c
    };
    assert_problem(
        &with(&|b| b.max_records = 0),
        "delivery.batch.maxRecords",
        &["0 is out of range", "1 to 10000"],
    );
    assert_problem(
        &with(&|b| b.max_records = 10_001),
        "delivery.batch.maxRecords",
        &["1 to 10000"],
    );
    assert_problem(
        &with(&|b| b.max_bytes = 1023),
        "delivery.batch.maxBytes",
        &["1023 is out of range", "1024 to 16777216"],
    );
    assert_problem(
        &with(&|b| b.max_bytes = (16 << 20) + 1),
        "delivery.batch.maxBytes",
        &["1024 to 16777216"],
    );
    // The default budget (16 MiB) allows batches of up to 4 MiB.
    let mut default_budget = with(&|b| b.max_bytes = 16 << 20);
    default_budget.delivery.max_buffered_bytes = crate::DEFAULT_MAX_BUFFERED_BYTES;
    assert_problem(
        &default_budget,
        "delivery.batch.maxBytes",
        &["1024 to 4194304"],
    );
    let mut small = with(&|b| b.max_bytes = 1 << 20);
    small.delivery.max_buffered_bytes = 1 << 20;
    assert_problem(
        &small,
        "delivery.batch.maxBytes",
        &["1024 to 262144", "a quarter of delivery.maxBufferedBytes"],
    );
    assert_problem(
        &with(&|b| b.max_wait = Duration::from_secs(11)),
        "delivery.batch.maxWait",
        &["11s is out of range", "0s to 10s"],
    );
    with(&|b| {
        b.max_records = 1;
        b.max_bytes = 1024;
        b.max_wait = Duration::ZERO;
    })
    .validate()
    .expect("the smallest limits are valid");
}

#[test]
fn await_pre_stop_is_optional_parsed_and_range_checked() {
    let c = valid();
    assert_eq!(
        c.drain.await_pre_stop, None,
        "unset by default: exit at once"
    );
    assert!(c.validate().is_ok());
    let mut json = serde_json::to_value(&c).unwrap();
    json["drain"]["awaitPreStop"] = "5s".into();
    let parsed: SidecarConfig = serde_json::from_value(json).unwrap();
    assert_eq!(parsed.drain.await_pre_stop, Some(Duration::from_secs(5)));
    assert!(parsed.validate().is_ok());
    let mut c = valid();
    c.drain.await_pre_stop = Some(Duration::ZERO);
    assert_problem(
        &c,
        "drain.awaitPreStop",
        &["0s is out of range", "100ms to 1m"],
    );
    c.drain.await_pre_stop = Some(Duration::from_secs(61));
    assert_problem(&c, "drain.awaitPreStop", &["1m 1s is out of range"]);
}
