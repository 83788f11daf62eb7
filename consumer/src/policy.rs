//! The delivery contract without I/O: how one attempt's result is classified, and what
//! happens next (retry after a delay, dead-letter, or done).

use std::time::{Duration, SystemTime};

/// The response header an application may use to decide a record's fate explicitly.
pub const OUTCOME_HEADER: &str = "x-sluice-outcome";

/// Longest `Retry-After` honoured; a larger value is capped to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// What one delivery attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The application answered.
    Response {
        status: u16,
        /// The `Retry-After` header, as sent.
        retry_after: Option<String>,
        /// The `X-Sluice-Outcome` header, as sent.
        outcome: Option<String>,
    },
    /// No answer within `delivery.timeout`.
    Timeout,
    /// The request was sent (or may have been) and the connection failed before an answer:
    /// reset, closed, or a malformed response. The application may have seen the record.
    ConnectionError(String),
    /// The application could not be reached at all (connection refused, connect timeout):
    /// the request was never sent.
    Unreachable(String),
}

/// What an attempt means for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered: the record is done.
    Delivered,
    /// The application asked to skip it: done, not delivered, not dead-lettered.
    Skipped,
    /// Try again. `after` is the delay the application asked for; `counts` says whether the
    /// attempt counts against `maxAttempts` (throttling does not).
    Retry {
        reason: &'static str,
        after: Option<Duration>,
        counts: bool,
        detail: String,
    },
    /// The record itself is bad: dead-letter it now.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
    /// The application is not there (it is restarting, or not started): wait until it
    /// answers again, then send the record again. Not an attempt: an application outage
    /// never uses up `maxAttempts`, so it never dead-letters a healthy record.
    AppDown { detail: String },
}

/// Classifies an attempt. An explicit `X-Sluice-Outcome` header wins over the status code.
pub fn classify(result: &AttemptResult, now: SystemTime) -> Verdict {
    match result {
        AttemptResult::Timeout => Verdict::Retry {
            reason: "timeout",
            after: None,
            counts: true,
            detail: "no response within delivery.timeout".into(),
        },
        AttemptResult::Unreachable(e) => Verdict::AppDown {
            detail: format!("the application is unreachable: {e}"),
        },
        AttemptResult::ConnectionError(e) => Verdict::Retry {
            reason: "connection_error",
            after: None,
            counts: true,
            detail: format!("connection error: {e}"),
        },
        AttemptResult::Response {
            status,
            retry_after,
            outcome,
        } => {
            let status = *status;
            let retry_after_delay = retry_after
                .as_deref()
                .and_then(|v| parse_retry_after(v, now));
            if let Some(explicit) = outcome.as_deref().map(str::trim) {
                if explicit.eq_ignore_ascii_case("retry") {
                    return Verdict::Retry {
                        reason: "explicit_retry",
                        after: retry_after_delay,
                        counts: true,
                        detail: format!("HTTP {status} with {OUTCOME_HEADER}: retry"),
                    };
                }
                if explicit.eq_ignore_ascii_case("dead-letter") {
                    return Verdict::DeadLetter {
                        reason: "explicit_dead_letter",
                        detail: format!("HTTP {status} with {OUTCOME_HEADER}: dead-letter"),
                    };
                }
                if explicit.eq_ignore_ascii_case("skip") {
                    return Verdict::Skipped;
                }
                // An unknown value is ignored: the status code decides.
            }
            match status {
                200..=299 => Verdict::Delivered,
                429 => Verdict::Retry {
                    reason: "throttled",
                    after: retry_after_delay,
                    counts: false,
                    detail: "HTTP 429".into(),
                },
                503 if retry_after_delay.is_some() => Verdict::Retry {
                    reason: "throttled",
                    after: retry_after_delay,
                    counts: false,
                    detail: "HTTP 503 with Retry-After".into(),
                },
                400..=499 => Verdict::DeadLetter {
                    reason: "http_4xx",
                    detail: format!("HTTP {status}: the application rejected the record"),
                },
                _ => Verdict::Retry {
                    reason: if status >= 500 {
                        "http_5xx"
                    } else {
                        "unexpected_status"
                    },
                    after: None,
                    counts: true,
                    detail: format!("HTTP {status}"),
                },
            }
        }
    }
}

/// Longest batch response body read; a longer one is malformed.
pub const MAX_BATCH_RESPONSE_BYTES: usize = 4 << 20;

/// Classifies the answer to a batch request: one verdict per record, in the order of `ids`
/// (the records' CloudEvent ids, as sent).
///
/// Anything but a 2xx (and an `X-Sluice-Outcome` header) decides every record of the batch
/// as [`classify`] decides one record. A 2xx decides per record: without a JSON body
/// (`Content-Type` not JSON, or an empty body) every record is delivered; a JSON body
/// `{"records": [{"id": "...", "outcome": "retry" | "dead-letter" | "skip" | "done",
/// "detail": "..."}]}` names the records that are not simply done. A body that does not
/// follow that shape, an unknown outcome, or an id that is not in the batch makes the whole
/// answer malformed: every record is retried (counting an attempt), since the application's
/// intent is unknown and nothing may be skipped.
pub fn classify_batch(
    result: &AttemptResult,
    content_type: Option<&str>,
    body: &[u8],
    ids: &[&str],
    now: SystemTime,
) -> Vec<Verdict> {
    let verdict = classify(result, now);
    if verdict != Verdict::Delivered {
        return vec![verdict; ids.len()];
    }
    let json = content_type.is_some_and(|c| {
        let media = c
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        media == "application/json" || media.ends_with("+json")
    });
    if !json || body.iter().all(u8::is_ascii_whitespace) {
        return vec![Verdict::Delivered; ids.len()];
    }
    match parse_batch_answer(body, ids) {
        Ok(verdicts) => verdicts,
        Err(problem) => {
            let status = match result {
                AttemptResult::Response { status, .. } => *status,
                _ => 0,
            };
            vec![
                Verdict::Retry {
                    reason: "malformed_response",
                    after: None,
                    counts: true,
                    detail: format!("HTTP {status} with a malformed batch answer: {problem}"),
                };
                ids.len()
            ]
        }
    }
}

fn parse_batch_answer(body: &[u8], ids: &[&str]) -> Result<Vec<Verdict>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(top) = value else {
        return Err("the body must be a JSON object with a \"records\" array".into());
    };
    let mut verdicts = vec![Verdict::Delivered; ids.len()];
    let Some(records) = top.get("records") else {
        return Ok(verdicts);
    };
    let serde_json::Value::Array(records) = records else {
        return Err("\"records\" must be an array".into());
    };
    for (i, entry) in records.iter().enumerate() {
        let Some(entry) = entry.as_object() else {
            return Err(format!("records[{i}] must be an object"));
        };
        let id = entry
            .get("id")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("records[{i}].id must be a string"))?;
        let outcome = entry
            .get("outcome")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("records[{i}].outcome must be a string"))?;
        let detail = match entry.get("detail") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(d)) => Some(d.as_str()),
            Some(_) => return Err(format!("records[{i}].detail must be a string")),
        };
        let verdict = match outcome.trim().to_ascii_lowercase().as_str() {
            "done" => Verdict::Delivered,
            "skip" => Verdict::Skipped,
            "retry" => Verdict::Retry {
                reason: "explicit_retry",
                after: None,
                counts: true,
                detail: format!("batch answer: retry{}", suffix(detail)),
            },
            "dead-letter" => Verdict::DeadLetter {
                reason: "explicit_dead_letter",
                detail: format!("batch answer: dead-letter{}", suffix(detail)),
            },
            other => {
                return Err(format!(
                    "records[{i}].outcome {other:?} is unknown; allowed: done, retry, dead-letter, skip"
                ));
            }
        };
        let mut found = false;
        for (slot, _) in ids.iter().enumerate().filter(|(_, x)| **x == id) {
            verdicts[slot] = verdict.clone();
            found = true;
        }
        if !found {
            return Err(format!("records[{i}].id {id:?} is not in this batch"));
        }
    }
    Ok(verdicts)
}

fn suffix(detail: Option<&str>) -> String {
    detail.map(|d| format!(" ({d})")).unwrap_or_default()
}

/// Parses `Retry-After`: delta-seconds or an HTTP date. Capped at [`MAX_RETRY_AFTER`]; a
/// date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The un-jittered delay before retry number `retry` (1-based): `initial * 2^(retry-1)`,
    /// capped at `max`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << shift).min(self.max)
    }

    /// The delay before retry number `retry`, drawn uniformly from the upper half of
    /// [`Backoff::ceiling`] with `unit` in `[0, 1)`, so retries of many records spread out but
    /// never collapse to zero.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(retry);
        let unit = unit.clamp(0.0, 1.0);
        ceiling.mul_f64(0.5 + unit / 2.0)
    }
}

/// The next step for a record after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Wait, then attempt again.
    RetryAfter(Duration),
    /// Attempts are exhausted (or the record is bad): dead-letter it.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
    /// Wait until the application answers again, then attempt again (no attempt used up).
    WaitForApp,
}

/// Decides what follows a non-final verdict. `failures` counts attempts that counted so far,
/// including this one; `retries` counts every retry of the record so far, including this
/// one (counted or not); `unit` is a random number in `[0, 1)` for jitter.
///
/// A `Retry-After` shorter than the backoff for `retries` is raised to it: an application
/// that keeps answering `Retry-After: 0` (or a date in the past) is retried at the backoff's
/// pace, never in a tight loop.
pub fn next_step(
    verdict: &Verdict,
    failures: u32,
    retries: u32,
    max_attempts: u32,
    backoff: &Backoff,
    unit: f64,
) -> Option<Next> {
    match verdict {
        Verdict::Delivered | Verdict::Skipped => None,
        Verdict::AppDown { .. } => Some(Next::WaitForApp),
        Verdict::DeadLetter { reason, detail } => Some(Next::DeadLetter {
            reason,
            detail: detail.clone(),
        }),
        Verdict::Retry {
            after,
            counts,
            detail,
            ..
        } => {
            if *counts && failures >= max_attempts {
                return Some(Next::DeadLetter {
                    reason: "max_attempts",
                    detail: format!("{failures} attempts failed; last: {detail}"),
                });
            }
            let delay = match after {
                Some(d) => (*d).max(backoff.delay(retries.max(1), unit)),
                None => backoff.delay(failures.max(1), unit),
            };
            Some(Next::RetryAfter(delay))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16) -> AttemptResult {
        AttemptResult::Response {
            status,
            retry_after: None,
            outcome: None,
        }
    }

    fn with(status: u16, retry_after: Option<&str>, outcome: Option<&str>) -> AttemptResult {
        AttemptResult::Response {
            status,
            retry_after: retry_after.map(Into::into),
            outcome: outcome.map(Into::into),
        }
    }

    fn now() -> SystemTime {
        httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap()
    }

    #[test]
    fn two_hundreds_are_delivered() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify(&response(s), now()), Verdict::Delivered, "{s}");
        }
    }

    #[test]
    fn four_hundreds_dead_letter_at_once() {
        for s in [400, 401, 403, 404, 409, 413, 422, 499] {
            match classify(&response(s), now()) {
                Verdict::DeadLetter { reason, detail } => {
                    assert_eq!(reason, "http_4xx");
                    assert!(detail.contains(&s.to_string()));
                }
                v => panic!("{s}: {v:?}"),
            }
        }
    }

    #[test]
    fn five_hundreds_timeouts_and_connection_errors_retry_and_count() {
        for (r, reason) in [
            (response(500), "http_5xx"),
            (response(502), "http_5xx"),
            (response(503), "http_5xx"),
            (response(504), "http_5xx"),
            (response(302), "unexpected_status"),
            (response(100), "unexpected_status"),
            (AttemptResult::Timeout, "timeout"),
            (
                AttemptResult::ConnectionError("connection reset".into()),
                "connection_error",
            ),
        ] {
            match classify(&r, now()) {
                Verdict::Retry {
                    reason: got,
                    after: None,
                    counts: true,
                    ..
                } => assert_eq!(got, reason),
                v => panic!("{r:?}: {v:?}"),
            }
        }
    }

    #[test]
    fn throttling_honours_retry_after_and_does_not_count() {
        let v = classify(&with(429, Some("7"), None), now());
        assert_eq!(
            v,
            Verdict::Retry {
                reason: "throttled",
                after: Some(Duration::from_secs(7)),
                counts: false,
                detail: "HTTP 429".into()
            }
        );
        let v = classify(&with(429, None, None), now());
        assert!(
            matches!(
                v,
                Verdict::Retry {
                    reason: "throttled",
                    after: None,
                    counts: false,
                    ..
                }
            ),
            "{v:?}"
        );
        let v = classify(
            &with(503, Some("Sun, 06 Nov 1994 08:49:40 GMT"), None),
            now(),
        );
        assert!(
            matches!(v, Verdict::Retry { after: Some(d), counts: false, .. } if d == Duration::from_secs(3)),
            "{v:?}"
        );
        let v = classify(&with(503, Some("garbage"), None), now());
        assert!(
            matches!(
                v,
                Verdict::Retry {
                    reason: "http_5xx",
                    counts: true,
                    ..
                }
            ),
            "{v:?}"
        );
    }

    #[test]
    fn explicit_outcome_header_wins() {
        assert_eq!(
            classify(&with(200, None, Some("skip")), now()),
            Verdict::Skipped
        );
        assert_eq!(
            classify(&with(500, None, Some(" SKIP ")), now()),
            Verdict::Skipped
        );
        assert!(matches!(
            classify(&with(200, None, Some("dead-letter")), now()),
            Verdict::DeadLetter {
                reason: "explicit_dead_letter",
                ..
            }
        ));
        assert!(matches!(
            classify(&with(200, Some("2"), Some("Retry")), now()),
            Verdict::Retry { reason: "explicit_retry", after: Some(d), counts: true, .. } if d == Duration::from_secs(2)
        ));
        assert_eq!(
            classify(&with(204, None, Some("maybe")), now()),
            Verdict::Delivered,
            "unknown values are ignored"
        );
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("0", now()), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(" 120 ", now()),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("100000", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now()),
            Some(Duration::ZERO),
            "past dates mean now"
        );
        assert_eq!(parse_retry_after("-1", now()), None);
        assert_eq!(parse_retry_after("soon", now()), None);
    }

    #[test]
    fn backoff_grows_exponentially_is_capped_and_jittered() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(1000), Duration::from_secs(1));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(
            b.delay(3, 0.999_999),
            Duration::from_millis(400).mul_f64(0.999_999_5)
        );
        for i in 0..100 {
            let d = b.delay(3, f64::from(i) / 100.0);
            assert!(
                d >= Duration::from_millis(200) && d < Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn next_step_dead_letters_after_max_attempts() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let fail = classify(&response(500), now());
        assert_eq!(
            next_step(&fail, 1, 1, 3, &b, 0.0),
            Some(Next::RetryAfter(Duration::from_millis(50)))
        );
        assert_eq!(
            next_step(&fail, 2, 2, 3, &b, 0.0),
            Some(Next::RetryAfter(Duration::from_millis(100)))
        );
        match next_step(&fail, 3, 3, 3, &b, 0.0) {
            Some(Next::DeadLetter {
                reason: "max_attempts",
                detail,
            }) => {
                assert!(
                    detail.contains("3 attempts") && detail.contains("HTTP 500"),
                    "{detail}"
                )
            }
            n => panic!("{n:?}"),
        }
        let throttled = classify(&with(429, Some("4"), None), now());
        assert_eq!(
            next_step(&throttled, 3, 3, 3, &b, 0.0),
            Some(Next::RetryAfter(Duration::from_secs(4))),
            "throttling never dead-letters"
        );
        let bad = classify(&response(400), now());
        assert!(matches!(
            next_step(&bad, 1, 1, 3, &b, 0.0),
            Some(Next::DeadLetter {
                reason: "http_4xx",
                ..
            })
        ));
        assert_eq!(next_step(&Verdict::Delivered, 1, 1, 3, &b, 0.0), None);
        assert_eq!(next_step(&Verdict::Skipped, 1, 1, 3, &b, 0.0), None);
        let one = classify(&AttemptResult::Timeout, now());
        assert!(
            matches!(
                next_step(&one, 1, 1, 1, &b, 0.0),
                Some(Next::DeadLetter { .. })
            ),
            "maxAttempts 1: no retry"
        );
    }

    #[test]
    fn an_unreachable_application_is_waited_for_and_never_counts() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let v = classify(
            &AttemptResult::Unreachable("connection refused".into()),
            now(),
        );
        assert!(
            matches!(&v, Verdict::AppDown { detail } if detail.contains("refused")),
            "{v:?}"
        );
        for failures in [0, 1, 3, 100] {
            assert_eq!(
                next_step(&v, failures, failures, 3, &b, 0.0),
                Some(Next::WaitForApp),
                "an outage never dead-letters"
            );
        }
    }

    #[test]
    fn retry_after_zero_or_in_the_past_is_floored_by_the_backoff() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for header in ["0", "Sun, 06 Nov 1994 08:49:00 GMT"] {
            let v = classify(&with(429, Some(header), None), now());
            let delays: Vec<_> = (1..=6)
                .map(|n| match next_step(&v, 0, n, 3, &b, 0.0) {
                    Some(Next::RetryAfter(d)) => d,
                    n => panic!("{n:?}"),
                })
                .collect();
            assert_eq!(
                delays,
                [50, 100, 200, 400, 500, 500].map(Duration::from_millis),
                "{header}: the backoff's lower half, growing to its cap"
            );
        }
        let v = classify(&with(503, Some("3"), None), now());
        assert_eq!(
            next_step(&v, 0, 1, 3, &b, 0.0),
            Some(Next::RetryAfter(Duration::from_secs(3))),
            "a longer Retry-After is honoured as sent"
        );
    }

    fn batch(status: u16, ct: Option<&str>, body: &str, ids: &[&str]) -> Vec<Verdict> {
        classify_batch(&response(status), ct, body.as_bytes(), ids, now())
    }

    const JSON: Option<&str> = Some("application/json");

    #[test]
    fn batch_without_a_json_body_is_all_done() {
        let ids = ["a", "b"];
        assert_eq!(batch(200, None, "", &ids), vec![Verdict::Delivered; 2]);
        assert_eq!(batch(204, JSON, "  \n", &ids), vec![Verdict::Delivered; 2]);
        assert_eq!(
            batch(200, Some("text/plain"), "OK", &ids),
            vec![Verdict::Delivered; 2],
            "a body that is not JSON is not an answer"
        );
        assert_eq!(batch(200, JSON, "{}", &ids), vec![Verdict::Delivered; 2]);
        assert_eq!(
            batch(
                200,
                Some("application/problem+json; charset=utf-8"),
                r#"{"records":[]}"#,
                &ids
            ),
            vec![Verdict::Delivered; 2]
        );
    }

    #[test]
    fn batch_answers_decide_each_named_record() {
        let ids = ["a", "b", "c", "d", "e"];
        let v = batch(
            200,
            JSON,
            r#"{"records":[{"id":"b","outcome":"retry"},{"id":"c","outcome":"dead-letter","detail":"bad sku"},{"id":"d","outcome":"SKIP"},{"id":"e","outcome":"done"}]}"#,
            &ids,
        );
        assert_eq!(v[0], Verdict::Delivered);
        assert!(matches!(
            &v[1],
            Verdict::Retry {
                reason: "explicit_retry",
                counts: true,
                after: None,
                ..
            }
        ));
        assert_eq!(
            v[2],
            Verdict::DeadLetter {
                reason: "explicit_dead_letter",
                detail: "batch answer: dead-letter (bad sku)".into()
            }
        );
        assert_eq!(v[3], Verdict::Skipped);
        assert_eq!(v[4], Verdict::Delivered);
    }

    #[test]
    fn batch_answers_name_every_record_sharing_an_id() {
        let v = batch(
            200,
            JSON,
            r#"{"records":[{"id":"x","outcome":"skip"}]}"#,
            &["x", "y", "x"],
        );
        assert_eq!(v, [Verdict::Skipped, Verdict::Delivered, Verdict::Skipped]);
    }

    #[test]
    fn malformed_batch_answers_retry_every_record() {
        let ids = ["a", "b"];
        for body in [
            "not json",
            "[1,2]",
            r#"{"records":{}}"#,
            r#"{"records":[1]}"#,
            r#"{"records":[{"outcome":"retry"}]}"#,
            r#"{"records":[{"id":"a"}]}"#,
            r#"{"records":[{"id":"a","outcome":"later"}]}"#,
            r#"{"records":[{"id":"zz","outcome":"retry"}]}"#,
            r#"{"records":[{"id":"a","outcome":"skip","detail":5}]}"#,
        ] {
            let v = batch(200, JSON, body, &ids);
            assert_eq!(v.len(), 2);
            for verdict in v {
                assert!(
                    matches!(
                        &verdict,
                        Verdict::Retry {
                            reason: "malformed_response",
                            counts: true,
                            ..
                        }
                    ),
                    "{body}: {verdict:?}"
                );
            }
        }
    }

    #[test]
    fn batch_status_and_outcome_header_decide_the_whole_batch() {
        let ids = ["a", "b", "c"];
        let answer = r#"{"records":[{"id":"a","outcome":"skip"}]}"#;
        let v = classify_batch(&response(500), JSON, answer.as_bytes(), &ids, now());
        assert!(v.iter().all(|v| matches!(
            v,
            Verdict::Retry {
                reason: "http_5xx",
                ..
            }
        )));
        let v = classify_batch(&response(400), None, b"", &ids, now());
        assert!(v.iter().all(|v| matches!(
            v,
            Verdict::DeadLetter {
                reason: "http_4xx",
                ..
            }
        )));
        let v = classify_batch(
            &with(200, None, Some("skip")),
            JSON,
            answer.as_bytes(),
            &ids,
            now(),
        );
        assert_eq!(v, vec![Verdict::Skipped; 3]);
        let v = classify_batch(
            &AttemptResult::Unreachable("refused".into()),
            None,
            b"",
            &ids,
            now(),
        );
        assert!(v.iter().all(|v| matches!(v, Verdict::AppDown { .. })));
        let v = classify_batch(&with(429, Some("2"), None), None, b"", &ids, now());
        assert!(
            v.iter()
                .all(|v| matches!(v, Verdict::Retry { counts: false, .. }))
        );
    }
}
