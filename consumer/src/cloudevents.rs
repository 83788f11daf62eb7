//! The HTTP headers of a delivery: CloudEvents binary mode plus Kafka metadata.
//!
//! A record that already carries CloudEvents attributes as `ce_*` Kafka headers (the Kafka
//! protocol binding) keeps them: each becomes the matching `ce-*` HTTP header and wins over
//! the defaults derived from the record's coordinates. `content-type`, `traceparent` and
//! `tracestate` Kafka headers are passed through. Other Kafka headers are not forwarded.

use base64::Engine;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::record::Record;

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

/// Builds the request headers for delivering `record`, attempt number `attempt` (1-based).
pub fn request_headers(record: &Record, attempt: u32) -> HeaderMap {
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
    let tp = &record.tp;
    let mut default = |name: &'static str, value: String| {
        let name = HeaderName::from_static(name);
        if !h.contains_key(&name)
            && let Ok(v) = HeaderValue::from_str(&value)
        {
            h.insert(name, v);
        }
    };
    default("ce-specversion", SPEC_VERSION.into());
    default(
        "ce-id",
        format!("{}-{}-{}", tp.topic, tp.partition, record.offset),
    );
    default("ce-source", default_source(&tp.topic));
    default("ce-type", EVENT_TYPE.into());
    if let Some(ms) = record.timestamp_ms {
        default("ce-time", rfc3339_millis(ms));
    }
    if !h.contains_key(CONTENT_TYPE) {
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    let set = |h: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set(&mut h, HEADER_TOPIC, tp.topic.to_string());
    set(&mut h, HEADER_PARTITION, tp.partition.to_string());
    set(&mut h, HEADER_OFFSET, record.offset.to_string());
    set(&mut h, HEADER_ATTEMPT, attempt.to_string());
    if let Some(key) = &record.key {
        match HeaderValue::from_bytes(key) {
            Ok(v) if key.iter().all(|b| (0x20..0x7f).contains(b)) => {
                h.insert(HeaderName::from_static(HEADER_KEY), v);
            }
            _ => set(
                &mut h,
                HEADER_KEY_BASE64,
                base64::engine::general_purpose::STANDARD.encode(key),
            ),
        }
    }
    h
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_709_251_199_999),
            "2024-02-29T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(253_402_300_799_000),
            "9999-12-31T23:59:59.000Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }
}
