//! The HTTP headers of a delivery: CloudEvents binary mode plus Kafka metadata.
//!
//! A record that already carries CloudEvents attributes as `ce_*` Kafka headers (the Kafka
//! protocol binding) keeps them: each becomes the matching `ce-*` HTTP header and wins over
//! the defaults derived from the record's coordinates. `content-type`, `traceparent` and
//! `tracestate` Kafka headers are passed through. Other Kafka headers are not forwarded.

use std::io::Write as _;

use base64::Engine;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::record::{Record, Tp};

pub const SPEC_VERSION: &str = "1.0";
pub const EVENT_TYPE: &str = "dev.sluice.kafka.record";
pub const HEADER_TOPIC: &str = "kafka-topic";
pub const HEADER_PARTITION: &str = "kafka-partition";
pub const HEADER_OFFSET: &str = "kafka-offset";
pub const HEADER_KEY: &str = "kafka-key";
/// The key, base64-encoded, when it is not a valid header value (binary keys).
pub const HEADER_KEY_BASE64: &str = "kafka-key-base64";
pub const HEADER_ATTEMPT: &str = "sluice-attempt";

/// The CloudEvents `source` Sluice gives records without their own.
pub fn default_source(topic: &str) -> String {
    format!("/sluice/topics/{topic}")
}

/// The header values that are the same for every record of a partition, built once per
/// assignment (see [`crate::progress::Progress`]) instead of formatted per request.
#[derive(Debug, Clone)]
pub struct PartitionHeaders {
    topic: Option<HeaderValue>,
    partition: HeaderValue,
    source: Option<HeaderValue>,
    /// `<topic>-<partition>-`: the default `ce-id` is this and the offset.
    id_prefix: String,
}

impl PartitionHeaders {
    pub fn new(tp: &Tp) -> Self {
        PartitionHeaders {
            topic: HeaderValue::from_str(&tp.topic).ok(),
            partition: HeaderValue::from(tp.partition),
            source: HeaderValue::from_str(&default_source(&tp.topic)).ok(),
            id_prefix: format!("{}-{}-", tp.topic, tp.partition),
        }
    }
}

/// `sluice-attempt` values of the first attempts, without formatting.
const ATTEMPTS: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Builds the request headers for delivering `record`, attempt number `attempt` (1-based).
pub fn request_headers(record: &Record, attempt: u32) -> HeaderMap {
    request_headers_with(record, attempt, &PartitionHeaders::new(&record.tp))
}

/// [`request_headers`] with the partition's constant values built beforehand.
pub fn request_headers_with(record: &Record, attempt: u32, part: &PartitionHeaders) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(16);
    // Pass-through first, so the defaults below only fill what the record lacks.
    for (name, value) in &record.headers {
        let Some(value) = value else { continue };
        let lower = name.to_ascii_lowercase();
        let http_name = if let Some(attr) = lower.strip_prefix("ce_") {
            if attr.is_empty() {
                continue;
            }
            format!("ce-{attr}")
        } else if matches!(
            lower.as_str(),
            "content-type" | "traceparent" | "tracestate"
        ) {
            lower
        } else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(http_name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            h.insert(n, v);
        }
    }
    // With nothing passed through, every default applies (no lookups).
    let passed = !h.is_empty();
    let mut default = |name: &'static str, value: Option<HeaderValue>| {
        let name = HeaderName::from_static(name);
        if let Some(v) = value
            && !(passed && h.contains_key(&name))
        {
            h.insert(name, v);
        }
    };
    default(
        "ce-specversion",
        Some(HeaderValue::from_static(SPEC_VERSION)),
    );
    let mut id = String::with_capacity(part.id_prefix.len() + 20);
    id.push_str(&part.id_prefix);
    id.push_str(&record.offset.to_string());
    default(
        "ce-id",
        HeaderValue::from_maybe_shared(Bytes::from(id)).ok(),
    );
    default("ce-source", part.source.clone());
    default("ce-type", Some(HeaderValue::from_static(EVENT_TYPE)));
    if let Some(ms) = record.timestamp_ms {
        default(
            "ce-time",
            rfc3339_millis(ms).and_then(|t| HeaderValue::from_maybe_shared(Bytes::from(t)).ok()),
        );
    }
    if !(passed && h.contains_key(CONTENT_TYPE)) {
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    if let Some(topic) = &part.topic {
        h.insert(HeaderName::from_static(HEADER_TOPIC), topic.clone());
    }
    h.insert(
        HeaderName::from_static(HEADER_PARTITION),
        part.partition.clone(),
    );
    h.insert(
        HeaderName::from_static(HEADER_OFFSET),
        HeaderValue::from(record.offset),
    );
    h.insert(
        HeaderName::from_static(HEADER_ATTEMPT),
        match ATTEMPTS.get((attempt as usize).wrapping_sub(1)) {
            Some(a) => HeaderValue::from_static(a),
            None => HeaderValue::from(attempt),
        },
    );
    if let Some(key) = &record.key {
        let printable = key.iter().all(|b| (0x20..0x7f).contains(b));
        match HeaderValue::from_maybe_shared(key.clone()) {
            Ok(v) if printable => {
                h.insert(HeaderName::from_static(HEADER_KEY), v);
            }
            _ => {
                if let Ok(v) =
                    HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(key))
                {
                    h.insert(HeaderName::from_static(HEADER_KEY_BASE64), v);
                }
            }
        }
    }
    h
}

/// The content type of a batch request (the CloudEvents JSON batch format).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// The number of records in a batch request.
pub const HEADER_BATCH_SIZE: &str = "sluice-batch-size";

/// Extension attributes of a record in a batch (CloudEvents attribute names are lower-case
/// letters and digits only). Partition and offset are strings: an offset does not fit the
/// CloudEvents integer type.
pub mod ext {
    pub const TOPIC: &str = "kafkatopic";
    pub const PARTITION: &str = "kafkapartition";
    pub const OFFSET: &str = "kafkaoffset";
    pub const KEY: &str = "kafkakey";
    pub const KEY_BASE64: &str = "kafkakeybase64";
    pub const ATTEMPT: &str = "sluiceattempt";
}

/// The record's CloudEvents `id`: its `ce_id` header, else `<topic>-<partition>-<offset>`.
pub fn event_id(record: &Record) -> String {
    record
        .headers
        .iter()
        .find(|(k, v)| v.is_some() && k.eq_ignore_ascii_case("ce_id"))
        .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
        .filter(|id| !id.is_empty())
        .map_or_else(
            || {
                format!(
                    "{}-{}-{}",
                    record.tp.topic, record.tp.partition, record.offset
                )
            },
            str::to_owned,
        )
}

fn valid_attribute_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !matches!(name, "data" | "data_base64")
}

/// How a value is carried in a structured CloudEvent.
enum Data<'a> {
    /// JSON, embedded as it is.
    Json(&'a str),
    /// Text, as a JSON string.
    Text(&'a str),
    Base64,
}

fn data_kind<'a>(value: &'a [u8], content_type: Option<&str>) -> Data<'a> {
    let media = content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let json_like = match media.as_deref() {
        None => true,
        Some(m) => m == "application/json" || m == "text/json" || m.ends_with("+json"),
    };
    let Ok(text) = std::str::from_utf8(value) else {
        return Data::Base64;
    };
    if json_like && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        return Data::Json(text);
    }
    if media.as_deref().is_some_and(|m| m.starts_with("text/")) {
        return Data::Text(text);
    }
    Data::Base64
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a JSON string to memory");
}

/// `,"source":"/sluice/topics/<topic>"` without building the string ([`default_source`]).
fn push_source(out: &mut Vec<u8>, topic: &str) {
    out.extend_from_slice(b",\"source\":");
    // Legal Kafka topic names ([a-zA-Z0-9._-]) need no JSON escaping; anything else goes
    // through the escaping writer.
    if topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        out.extend_from_slice(b"\"/sluice/topics/");
        out.extend_from_slice(topic.as_bytes());
        out.push(b'"');
    } else {
        push_str(out, &default_source(topic));
    }
}

/// `,"<name>":<value as a JSON string>`. Names are CloudEvents attribute names (checked by
/// [`valid_attribute_name`] where they come from a record) or this module's constants: ASCII
/// letters, digits and `_`, which JSON needs no escaping for, so only the value is escaped.
fn push_attr(out: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(
        name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "attribute name {name:?} would need escaping"
    );
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    push_str(out, value);
}

/// Appends `record` as one structured-mode CloudEvent (JSON) to `out`. Attributes come from
/// the record's `ce_*` headers, then the same defaults as the binary mode; `traceparent` and
/// `tracestate` become the distributed-tracing extension; the Kafka coordinates and the
/// attempt number are extensions ([`ext`]). The value is `data` when it is JSON (its content
/// type is JSON, or it has none and parses as JSON) or text (`text/*`), else `data_base64`.
pub fn write_event(out: &mut Vec<u8>, record: &Record, id: &str, attempt: u32) {
    let tp = &record.tp;
    let mut own: Vec<(String, &str)> = Vec::new();
    let mut content_type = None;
    for (name, value) in &record.headers {
        let Some(value) = value.as_deref().and_then(|v| std::str::from_utf8(v).ok()) else {
            continue;
        };
        let lower = name.to_ascii_lowercase();
        if let Some(attr) = lower.strip_prefix("ce_") {
            if valid_attribute_name(attr)
                && !matches!(attr, "id" | "sluiceattempt")
                && !attr.starts_with("kafka")
                && !own.iter().any(|(n, _)| n == attr)
            {
                own.push((attr.to_owned(), value));
            }
        } else if lower == "content-type" {
            content_type = Some(value);
        } else if (lower == "traceparent" || lower == "tracestate")
            && !own.iter().any(|(n, _)| *n == lower)
        {
            own.push((lower, value));
        }
    }
    if let Some((_, ct)) = own.iter().find(|(n, _)| n == "datacontenttype") {
        content_type = Some(ct);
    }
    let has = |name: &str| own.iter().any(|(n, _)| n == name);
    out.extend_from_slice(b"{\"id\":");
    push_str(out, id);
    if !has("specversion") {
        push_attr(out, "specversion", SPEC_VERSION);
    }
    if !has("source") {
        push_source(out, &tp.topic);
    }
    if !has("type") {
        push_attr(out, "type", EVENT_TYPE);
    }
    if !has("time")
        && let Some(time) = record.timestamp_ms.and_then(rfc3339_timestamp)
    {
        // Digits, `-`, `:`, `.`, `T` and `Z`: nothing to escape, and no string built.
        out.extend_from_slice(b",\"time\":\"");
        write!(out, "{time}").expect("writing to memory");
        out.push(b'"');
    }
    for (name, value) in &own {
        if name != "datacontenttype" {
            push_attr(out, name, value);
        }
    }
    push_attr(out, ext::TOPIC, &tp.topic);
    let mut n = itoa::Buffer::new();
    push_attr(out, ext::PARTITION, n.format(tp.partition));
    push_attr(out, ext::OFFSET, n.format(record.offset));
    if let Some(key) = &record.key {
        match std::str::from_utf8(key) {
            Ok(k) if key.iter().all(|b| (0x20..0x7f).contains(b)) => {
                push_attr(out, ext::KEY, k);
            }
            _ => push_attr(
                out,
                ext::KEY_BASE64,
                &base64::engine::general_purpose::STANDARD.encode(key),
            ),
        }
    }
    out.extend_from_slice(b",\"");
    out.extend_from_slice(ext::ATTEMPT.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(n.format(attempt).as_bytes());
    if let Some(value) = &record.value {
        match data_kind(value, content_type) {
            Data::Json(json) => {
                push_attr(
                    out,
                    "datacontenttype",
                    content_type.unwrap_or("application/json"),
                );
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(json.as_bytes());
            }
            Data::Text(text) => {
                push_attr(out, "datacontenttype", content_type.unwrap_or("text/plain"));
                push_attr(out, "data", text);
            }
            Data::Base64 => {
                push_attr(
                    out,
                    "datacontenttype",
                    content_type.unwrap_or("application/octet-stream"),
                );
                push_attr(
                    out,
                    "data_base64",
                    &base64::engine::general_purpose::STANDARD.encode(value),
                );
            }
        }
    } else if let Some(ct) = content_type {
        push_attr(out, "datacontenttype", ct);
    }
    out.push(b'}');
}

/// A batch request body: a JSON array of the records' CloudEvents, in the order given.
pub fn batch_body<'a>(
    records: impl ExactSizeIterator<Item = (&'a Record, &'a str, u32)> + Clone,
) -> Vec<u8> {
    // The values and keys plus the attributes (~300 bytes for a record without headers; more
    // for base64 values, which then grow the buffer once or twice).
    let size: usize = records
        .clone()
        .map(|(r, id, _)| r.size() + id.len() + 320)
        .sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'[');
    for (i, (record, id, attempt)) in records.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_event(&mut out, record, id, attempt);
    }
    out.push(b']');
    out
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds, with
/// humantime; `None` outside what it formats (before 1970 or after 9999), where the event
/// goes without a `time` (optional in CloudEvents) rather than with a wrong one. Kafka
/// refuses negative timestamps other than -1 (none), so only a broker-side clock far in the
/// future reaches that case.
pub fn rfc3339_millis(ms: i64) -> Option<String> {
    rfc3339_timestamp(ms).map(|t| t.to_string())
}

/// [`rfc3339_millis`] before it is formatted.
fn rfc3339_timestamp(ms: i64) -> Option<humantime::Rfc3339Timestamp> {
    /// 10000-01-01T00:00:00Z: humantime formats only four-digit years.
    const END_MS: i64 = 253_402_300_800_000;
    if !(0..END_MS).contains(&ms) {
        return None;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    Some(humantime::format_rfc3339_millis(t))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::record::Tp;

    fn record() -> Record {
        Record {
            tp: Tp::new("orders", 3),
            offset: 42,
            key: Some(Bytes::from_static(b"customer-7")),
            value: Some(Bytes::from_static(b"{}")),
            headers: vec![],
            timestamp_ms: Some(1_700_000_000_123),
        }
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn plain_records_get_cloudevents_defaults_and_metadata() {
        let h = request_headers(&record(), 1);
        assert_eq!(get(&h, "ce-specversion"), Some("1.0"));
        assert_eq!(get(&h, "ce-id"), Some("orders-3-42"));
        assert_eq!(get(&h, "ce-source"), Some("/sluice/topics/orders"));
        assert_eq!(get(&h, "ce-type"), Some(EVENT_TYPE));
        assert_eq!(get(&h, "ce-time"), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(get(&h, "content-type"), Some("application/octet-stream"));
        assert_eq!(get(&h, "kafka-topic"), Some("orders"));
        assert_eq!(get(&h, "kafka-partition"), Some("3"));
        assert_eq!(get(&h, "kafka-offset"), Some("42"));
        assert_eq!(get(&h, "kafka-key"), Some("customer-7"));
        assert_eq!(get(&h, "sluice-attempt"), Some("1"));
        assert_eq!(h.len(), 11);
    }

    #[test]
    fn partition_values_built_once_serve_every_record_and_attempt() {
        let part = PartitionHeaders::new(&Tp::new("orders", 3));
        let mut r = record();
        for (offset, attempt, text) in
            [(42, 1, "1"), (43, 9, "9"), (44, 10, "10"), (45, 123, "123")]
        {
            r.offset = offset;
            let h = request_headers_with(&r, attempt, &part);
            assert_eq!(h, request_headers(&r, attempt), "same as built per record");
            assert_eq!(get(&h, "sluice-attempt"), Some(text));
            assert_eq!(
                get(&h, "ce-id"),
                Some(format!("orders-3-{offset}").as_str())
            );
            assert_eq!(get(&h, "kafka-offset"), Some(offset.to_string().as_str()));
        }
    }

    #[test]
    fn records_with_ce_headers_keep_their_attributes() {
        let mut r = record();
        r.headers = vec![
            ("ce_specversion".into(), Some(Bytes::from_static(b"1.0"))),
            ("ce_id".into(), Some(Bytes::from_static(b"evt-1"))),
            (
                "ce_source".into(),
                Some(Bytes::from_static(b"/shop/orders")),
            ),
            (
                "ce_type".into(),
                Some(Bytes::from_static(b"shop.order.created")),
            ),
            ("CE_Subject".into(), Some(Bytes::from_static(b"order-9"))),
            (
                "content-type".into(),
                Some(Bytes::from_static(b"application/json")),
            ),
            (
                "traceparent".into(),
                Some(Bytes::from_static(
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )),
            ),
            (
                "tracestate".into(),
                Some(Bytes::from_static(b"congo=t61rcWkgMzE")),
            ),
            (
                "internal".into(),
                Some(Bytes::from_static(b"not forwarded")),
            ),
            ("ce_".into(), Some(Bytes::from_static(b"nameless"))),
            ("ce_bad".into(), Some(Bytes::from_static(b"line\nbreak"))),
            ("ce_null".into(), None),
        ];
        let h = request_headers(&r, 3);
        assert_eq!(get(&h, "ce-id"), Some("evt-1"));
        assert_eq!(get(&h, "ce-source"), Some("/shop/orders"));
        assert_eq!(get(&h, "ce-type"), Some("shop.order.created"));
        assert_eq!(get(&h, "ce-subject"), Some("order-9"));
        assert_eq!(get(&h, "content-type"), Some("application/json"));
        assert_eq!(
            get(&h, "traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(get(&h, "tracestate"), Some("congo=t61rcWkgMzE"));
        assert_eq!(
            get(&h, "ce-time"),
            Some("2023-11-14T22:13:20.123Z"),
            "missing attributes are still filled"
        );
        assert_eq!(get(&h, "sluice-attempt"), Some("3"));
        assert!(h.get("internal").is_none());
        assert!(
            h.get("ce-bad").is_none(),
            "invalid values are dropped, not sent broken"
        );
        assert!(h.get("ce-null").is_none());
    }

    #[test]
    fn binary_and_missing_keys() {
        let mut r = record();
        r.key = Some(Bytes::from_static(&[0, 159, 146, 150]));
        let h = request_headers(&r, 1);
        assert!(h.get("kafka-key").is_none());
        assert_eq!(get(&h, "kafka-key-base64"), Some("AJ+Slg=="));
        r.key = None;
        r.timestamp_ms = None;
        let h = request_headers(&r, 1);
        assert!(h.get("kafka-key").is_none() && h.get("kafka-key-base64").is_none());
        assert!(h.get("ce-time").is_none());
    }

    #[test]
    fn rfc3339_formatting() {
        let f = |ms| rfc3339_millis(ms);
        assert_eq!(f(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            f(951_782_400_000).as_deref(),
            Some("2000-02-29T00:00:00.000Z")
        );
        assert_eq!(
            f(1_709_251_199_999).as_deref(),
            Some("2024-02-29T23:59:59.999Z")
        );
        assert_eq!(
            f(253_402_300_799_999).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
        // Outside humantime's range: no time rather than a wrong one.
        assert_eq!(f(253_402_300_800_000), None);
        assert_eq!(f(-1), None);
        assert_eq!(f(i64::MIN), None);
    }

    fn event(r: &Record, attempt: u32) -> serde_json::Value {
        let body = batch_body(std::iter::once((r, event_id(r).as_str(), attempt)));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        v[0].clone()
    }

    #[test]
    fn batch_events_carry_attributes_extensions_and_json_data() {
        let mut r = record();
        r.value = Some(Bytes::from_static(br#"{"sku":"a","n":1}"#));
        let e = event(&r, 2);
        assert_eq!(e["id"], "orders-3-42");
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["source"], "/sluice/topics/orders");
        assert_eq!(e["type"], EVENT_TYPE);
        assert_eq!(e["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(e["kafkatopic"], "orders");
        assert_eq!(e["kafkapartition"], "3");
        assert_eq!(e["kafkaoffset"], "42");
        assert_eq!(e["kafkakey"], "customer-7");
        assert_eq!(e["sluiceattempt"], 2);
        assert_eq!(e["datacontenttype"], "application/json");
        assert_eq!(e["data"], serde_json::json!({"sku": "a", "n": 1}));
        assert!(e.get("data_base64").is_none());
    }

    #[test]
    fn batch_events_use_base64_for_binary_and_text_for_text() {
        let mut r = record();
        r.value = Some(Bytes::from_static(&[0, 255, 1]));
        r.key = Some(Bytes::from_static(&[0, 159]));
        let e = event(&r, 1);
        assert_eq!(e["data_base64"], "AP8B");
        assert_eq!(e["datacontenttype"], "application/octet-stream");
        assert_eq!(e["kafkakeybase64"], "AJ8=");
        assert!(e.get("data").is_none() && e.get("kafkakey").is_none());
        // Not JSON and no content type: bytes.
        r.value = Some(Bytes::from_static(b"plain words"));
        assert_eq!(event(&r, 1)["data_base64"], "cGxhaW4gd29yZHM=");
        // Text with a text content type: a string.
        r.headers = vec![(
            "content-type".into(),
            Some(Bytes::from_static(b"text/plain; charset=utf-8")),
        )];
        let e = event(&r, 1);
        assert_eq!(e["data"], "plain words");
        assert_eq!(e["datacontenttype"], "text/plain; charset=utf-8");
        // JSON content type but not JSON: bytes, the content type kept.
        r.headers = vec![(
            "content-type".into(),
            Some(Bytes::from_static(b"application/json")),
        )];
        let e = event(&r, 1);
        assert_eq!(e["data_base64"], "cGxhaW4gd29yZHM=");
        assert_eq!(e["datacontenttype"], "application/json");
        // No value: no data.
        r.value = None;
        let e = event(&r, 1);
        assert!(e.get("data").is_none() && e.get("data_base64").is_none());
    }

    #[test]
    fn batch_events_keep_the_records_own_attributes_without_duplicates() {
        let mut r = record();
        r.headers = vec![
            ("ce_id".into(), Some(Bytes::from_static(b"evt-1"))),
            ("ce_type".into(), Some(Bytes::from_static(b"shop.order"))),
            ("CE_Subject".into(), Some(Bytes::from_static(b"o-9"))),
            ("ce_kafkaoffset".into(), Some(Bytes::from_static(b"999"))),
            ("ce_data".into(), Some(Bytes::from_static(b"x"))),
            ("ce_Bad-Name".into(), Some(Bytes::from_static(b"x"))),
            (
                "traceparent".into(),
                Some(Bytes::from_static(b"00-ab-cd-01")),
            ),
            ("other".into(), Some(Bytes::from_static(b"not forwarded"))),
        ];
        assert_eq!(event_id(&r), "evt-1");
        let e = event(&r, 1);
        assert_eq!(e["id"], "evt-1");
        assert_eq!(e["type"], "shop.order");
        assert_eq!(e["subject"], "o-9");
        assert_eq!(e["kafkaoffset"], "42", "the coordinates are Sluice's own");
        assert_eq!(e["traceparent"], "00-ab-cd-01");
        assert_eq!(e["data"], serde_json::json!({}));
        assert!(e.get("other").is_none() && e.get("bad-name").is_none());
        let body = batch_body(std::iter::once((&r, "evt-1", 1)));
        let text = std::str::from_utf8(&body).unwrap();
        for key in ["\"id\"", "\"type\"", "\"kafkaoffset\"", "\"data\""] {
            assert_eq!(text.matches(key).count(), 1, "{key} once in {text}");
        }
    }

    #[test]
    fn a_batch_body_is_an_array_in_the_given_order() {
        let a = record();
        let mut b = record();
        b.offset = 43;
        let body = batch_body([(&a, "x", 1), (&b, "y", 3)].into_iter());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let ids: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].clone())
            .collect();
        assert_eq!(ids, ["x", "y"]);
        assert_eq!(v[1]["sluiceattempt"], 3);
        assert_eq!(batch_body(std::iter::empty()), b"[]");
    }
}
