//! Batch delivery (`delivery.batch`) against the real broker: order within and across
//! batches in every ordering mode, the JSON answer (retry, dead-letter, skip, malformed),
//! an application outage, and a graceful drain with nothing lost or duplicated. What the
//! application received is counted from the CloudEvents in each request; commits are read
//! from Kafka.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use sluice_tests::kafka::{Topic, group, read_all};
use sluice_tests::testapp::{Event, Received, Reply, Sidecar, TestApp, sidecar_config};

const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

async fn wait_committed_to_end(group: &str, topic: &Topic) {
    sluice_tests::kafka::wait_committed_to_end(group, topic, Duration::from_secs(30)).await;
}

fn batch_config(
    topic: &Topic,
    group: &str,
    url: &str,
    batch: serde_json::Value,
) -> serde_json::Value {
    let mut cfg = sidecar_config(&topic.name, group, url);
    cfg["delivery"]["batch"] = batch;
    cfg
}

/// Every event the application received, with the request it came in (by index).
fn all_events(got: &[Received]) -> Vec<(usize, Event)> {
    got.iter()
        .enumerate()
        .flat_map(|(i, r)| r.events().into_iter().map(move |e| (i, e)))
        .collect()
}

/// How often each numbered value was received.
fn counts(got: &[Received]) -> BTreeMap<usize, usize> {
    let mut c = BTreeMap::new();
    for (_, e) in all_events(got) {
        *c.entry(e.value.parse::<usize>().expect("numbered value"))
            .or_default() += 1;
    }
    c
}

/// The shape every batch request must have: the batch content type, one partition, offsets
/// increasing, at most `max` records, and a size header that matches.
fn check_requests(got: &[Received], max: usize) {
    for r in got {
        assert_eq!(r.header("content-type"), Some(BATCH_CONTENT_TYPE));
        let events = r.events();
        assert!(
            !events.is_empty() && events.len() <= max,
            "batch of {}",
            events.len()
        );
        assert_eq!(
            r.header("sluice-batch-size"),
            Some(events.len().to_string().as_str())
        );
        for w in events.windows(2) {
            assert_eq!(w[0].partition, w[1].partition, "one partition per batch");
            assert!(w[0].offset < w[1].offset, "offsets in order within a batch");
        }
        assert_eq!(r.partition(), events[0].partition);
    }
}

async fn ordered(mode: &str) -> (Vec<Received>, usize) {
    const N: usize = 600;
    let topic = Topic::create(&format!("batch-order-{mode}"), 3).await;
    let group = group(&format!("batch-order-{mode}"));
    let app = TestApp::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    topic.produce_numbered(N, 12).await;
    let mut cfg = batch_config(
        &topic,
        &group,
        &app.url(),
        serde_json::json!({"maxRecords": 20, "maxWait": "20ms"}),
    );
    cfg["delivery"]["ordering"] = mode.into();
    cfg["delivery"]["maxInFlight"] = 4.into();
    let mut sidecar = Sidecar::start(&format!("batch-order-{mode}"), cfg);
    app.wait_until("every record", Duration::from_secs(60), |r| {
        r.iter().map(|r| r.events().len()).sum::<usize>() >= N
    })
    .await;
    wait_committed_to_end(&group, &topic).await;
    sidecar.stop_gracefully(Duration::from_secs(30));
    let mut got = app.received();
    got.sort_by_key(|r| r.at);
    check_requests(&got, 20);
    assert_eq!(
        counts(&got),
        (0..N).map(|v| (v, 1)).collect(),
        "every record exactly once"
    );
    assert!(
        got.iter().any(|r| r.events().len() == 20),
        "records were waiting, so some batch must be full; sizes: {:?}",
        got.iter().map(|r| r.events().len()).collect::<Vec<_>>()
    );
    (got, app.max_concurrency())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_mode_batches_keep_each_partition_in_order() {
    let (got, concurrency) = ordered("partition").await;
    let mut last: HashMap<i32, i64> = HashMap::new();
    for (_, e) in all_events(&got) {
        if let Some(prev) = last.insert(e.partition, e.offset) {
            assert!(
                e.offset > prev,
                "partition {}: {} after {prev}",
                e.partition,
                e.offset
            );
        }
    }
    assert!(
        concurrency <= 3,
        "one batch per partition at once, saw {concurrency}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_mode_batches_keep_each_key_in_order() {
    let (got, concurrency) = ordered("key").await;
    let mut last: HashMap<String, usize> = HashMap::new();
    for (_, e) in all_events(&got) {
        let key = e.key.clone().expect("a key");
        let v: usize = e.value.parse().unwrap();
        if let Some(prev) = last.insert(key.clone(), v) {
            assert!(v > prev, "key {key}: {v} after {prev}");
        }
    }
    assert!(
        concurrency <= 4,
        "maxInFlight 4 batches exceeded: {concurrency}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_mode_batches_run_up_to_max_in_flight() {
    let (_, concurrency) = ordered("none").await;
    assert!(
        concurrency <= 4,
        "maxInFlight 4 batches exceeded: {concurrency}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_retry_resends_only_the_named_records_before_the_partition_moves_on() {
    const N: usize = 60;
    let topic = Topic::create("batch-retry", 1).await;
    let group = group("batch-retry");
    let needs_retry = |v: usize| v % 7 == 3;
    let app = TestApp::start(move |r| {
        let retry: Vec<_> = r
            .events()
            .into_iter()
            .filter(|e| e.attempt == 1 && needs_retry(e.value.parse().unwrap()))
            .map(|e| serde_json::json!({"id": e.id, "outcome": "retry"}))
            .collect();
        Reply::json(serde_json::json!({ "records": retry }))
    })
    .await;
    topic.produce_numbered(N, 5).await;
    let cfg = batch_config(
        &topic,
        &group,
        &app.url(),
        serde_json::json!({"maxRecords": 10, "maxWait": "50ms"}),
    );
    let mut sidecar = Sidecar::start("batch-retry", cfg);
    wait_committed_to_end(&group, &topic).await;
    let retried = (0..N).filter(|v| needs_retry(*v)).count();
    assert_eq!(
        sidecar.metric("sluice_records_retried_total{reason=\"explicit_retry\"}"),
        Some(retried as f64)
    );
    sidecar.stop_gracefully(Duration::from_secs(30));
    let mut got = app.received();
    got.sort_by_key(|r| r.at);
    check_requests(&got, 10);
    let expected: BTreeMap<usize, usize> = (0..N)
        .map(|v| (v, if needs_retry(v) { 2 } else { 1 }))
        .collect();
    assert_eq!(
        counts(&got),
        expected,
        "retried records twice, the rest once"
    );
    let mut max_before = -1i64;
    for r in &got {
        let events = r.events();
        if events.iter().any(|e| e.attempt > 1) {
            for e in &events {
                assert_eq!(
                    e.attempt, 2,
                    "a retry request holds only retries: {events:?}"
                );
                assert!(
                    needs_retry(e.value.parse().unwrap()),
                    "{} was not asked to retry",
                    e.value
                );
                assert!(
                    e.offset <= max_before,
                    "a retry belongs to the batch before it"
                );
            }
        } else {
            assert!(
                events[0].offset > max_before,
                "a new batch starts only after the previous one (and its retries) finished"
            );
        }
        max_before = max_before.max(events.last().unwrap().offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_dead_letters_and_skips_named_records() {
    const N: usize = 30;
    let topic = Topic::create("batch-dlq", 1).await;
    let dlq = Topic::create("batch-dlq-dlq", 1).await;
    let group = group("batch-dlq");
    let app = TestApp::start(|r| {
        let mut named = Vec::new();
        for e in r.events() {
            match e.value.as_str() {
                "5" => named.push(
                    serde_json::json!({"id": e.id, "outcome": "dead-letter", "detail": "bad sku"}),
                ),
                "7" => named.push(serde_json::json!({"id": e.id, "outcome": "skip"})),
                _ => {}
            }
        }
        Reply::json(serde_json::json!({ "records": named }))
    })
    .await;
    topic.produce_numbered(N, 3).await;
    let mut cfg = batch_config(
        &topic,
        &group,
        &app.url(),
        serde_json::json!({"maxRecords": 8, "maxWait": "50ms"}),
    );
    cfg["delivery"]["deadLetterTopic"] = dlq.name.clone().into();
    let mut sidecar = Sidecar::start("batch-dlq", cfg);
    wait_committed_to_end(&group, &topic).await;
    let got = app.received();
    check_requests(&got, 8);
    assert_eq!(
        counts(&got),
        (0..N).map(|v| (v, 1)).collect(),
        "nothing retried"
    );
    let dead = read_all(&dlq.name, 2, Duration::from_secs(5));
    assert_eq!(dead.len(), 1, "only record 5 is dead-lettered");
    let five = &dead[0];
    assert_eq!(five.payload(), Some(&b"5"[..]));
    assert_eq!(five.key(), Some(&b"key-2"[..]));
    assert_eq!(
        header(five, "sluice-dlq-reason").as_deref(),
        Some("explicit_dead_letter")
    );
    assert!(
        header(five, "sluice-dlq-detail").is_some_and(|d| d.contains("bad sku")),
        "the answer's detail is kept: {:?}",
        header(five, "sluice-dlq-detail")
    );
    assert_eq!(header(five, "sluice-dlq-attempts").as_deref(), Some("1"));
    assert_eq!(header(five, "sluice-dlq-offset").as_deref(), Some("5"));
    assert_eq!(header(five, "sluice-dlq-partition").as_deref(), Some("0"));
    assert_eq!(
        header(five, "sluice-dlq-topic").as_deref(),
        Some(topic.name.as_str())
    );
    assert_eq!(
        header(five, "sluice-dlq-group").as_deref(),
        Some(group.as_str())
    );
    for (outcome, n) in [
        ("skipped", 1.0),
        ("dead_lettered", 1.0),
        ("delivered", (N - 2) as f64),
    ] {
        assert_eq!(
            sidecar.metric(&format!(
                "sluice_records_finished_total{{outcome=\"{outcome}\"}}"
            )),
            Some(n),
            "{outcome}"
        );
    }
    sidecar.stop_gracefully(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_retry_the_whole_batch_and_dead_letter_after_max_attempts() {
    const N: usize = 20;
    let topic = Topic::create("batch-malformed", 1).await;
    let dlq = Topic::create("batch-malformed-dlq", 1).await;
    let group = group("batch-malformed");
    // Every batch's first answer is malformed; a batch holding record 4 is always answered
    // malformed (three shapes in turn).
    let app = TestApp::start(|r| {
        let events = r.events();
        let poisoned = events.iter().any(|e| e.value == "4");
        let attempt = events[0].attempt;
        if poisoned || attempt == 1 {
            match attempt % 3 {
                1 => Reply::body("application/json", "{not json"),
                2 => Reply::json(
                    serde_json::json!({"records": [{"id": "no-such-id", "outcome": "retry"}]}),
                ),
                _ => Reply::json(
                    serde_json::json!({"records": [{"id": events[0].id, "outcome": "later"}]}),
                ),
            }
        } else {
            // A 2xx with a body that is not JSON is simply "all done".
            Reply::body("text/plain", "OK")
        }
    })
    .await;
    topic.produce_numbered(N, 2).await;
    let mut cfg = batch_config(
        &topic,
        &group,
        &app.url(),
        serde_json::json!({"maxRecords": 5, "maxWait": "1s"}),
    );
    cfg["delivery"]["deadLetterTopic"] = dlq.name.clone().into();
    let mut sidecar = Sidecar::start("batch-malformed", cfg);
    wait_committed_to_end(&group, &topic).await;
    let got = app.received();
    check_requests(&got, 5);
    let poisoned: Vec<usize> = got
        .iter()
        .map(Received::events)
        .find(|ev| ev.iter().any(|e| e.value == "4"))
        .expect("record 4 was sent")
        .iter()
        .map(|e| e.value.parse().unwrap())
        .collect();
    let c = counts(&got);
    for v in 0..N {
        let expected = if poisoned.contains(&v) { 3 } else { 2 };
        assert_eq!(c.get(&v), Some(&expected), "record {v}: {c:?}");
    }
    let dead = read_all(&dlq.name, poisoned.len() + 1, Duration::from_secs(5));
    let mut dead_values: Vec<usize> = dead
        .iter()
        .map(|m| {
            String::from_utf8_lossy(m.payload().unwrap())
                .parse()
                .unwrap()
        })
        .collect();
    dead_values.sort_unstable();
    assert_eq!(
        dead_values, poisoned,
        "exactly the batch with the poisoned answer"
    );
    for m in &dead {
        assert_eq!(
            header(m, "sluice-dlq-reason").as_deref(),
            Some("max_attempts")
        );
        assert!(
            header(m, "sluice-dlq-detail").is_some_and(|d| d.contains("malformed batch answer")),
            "{:?}",
            header(m, "sluice-dlq-detail")
        );
    }
    assert_eq!(
        sidecar.metric("sluice_records_retried_total{reason=\"malformed_response\"}"),
        Some((N + poisoned.len()) as f64),
        "one retry per record, one more per poisoned record (its third answer dead-letters)"
    );
    sidecar.stop_gracefully(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_outage_uses_up_no_attempts_of_a_batch() {
    const N: usize = 400;
    let topic = Topic::create("batch-outage", 2).await;
    let dlq = Topic::create("batch-outage-dlq", 1).await;
    let group = group("batch-outage");
    let app = TestApp::start(|_| Reply::ok().after(Duration::from_millis(20))).await;
    topic.produce_numbered(N, 8).await;
    let mut cfg = batch_config(
        &topic,
        &group,
        &app.url(),
        serde_json::json!({"maxRecords": 10, "maxWait": "0s"}),
    );
    cfg["delivery"]["deadLetterTopic"] = dlq.name.clone().into();
    // A batch in flight when the application goes away may have been seen, so its broken
    // connection counts as one attempt; every try after it finds the application
    // unreachable and waits without using up attempts. Two attempts are enough.
    cfg["delivery"]["retry"]["maxAttempts"] = 2.into();
    let mut sidecar = Sidecar::start("batch-outage", cfg);
    app.wait_until("some batches", Duration::from_secs(60), |r| r.len() >= 5)
        .await;
    app.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.resume().await;
    wait_committed_to_end(&group, &topic).await;
    let got = app.received();
    let c = counts(&got);
    assert_eq!(c.len(), N, "every record reached the application");
    let dead = read_all(&dlq.name, 1, Duration::from_secs(3));
    assert!(
        dead.is_empty(),
        "an outage dead-letters nothing; dead-lettered: {:?}",
        dead.iter().map(|m| m.offset()).collect::<Vec<_>>()
    );
    assert!(
        sidecar
            .metric("sluice_delivery_attempts_total{outcome=\"unreachable\"}")
            .is_some_and(|n| n >= 1.0),
        "the outage was seen by deliveries (else this test proves nothing)"
    );
    sidecar.stop_gracefully(Duration::from_secs(30));
}

/// SIGTERM while batches are in flight, then a successor: nothing lost, nothing delivered
/// twice (counted by the application), in every ordering mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_drain_with_batches_loses_and_duplicates_nothing() {
    const N: usize = 3000;
    for mode in ["partition", "key", "none"] {
        let topic = Topic::create(&format!("batch-drain-{mode}"), 4).await;
        let group = group(&format!("batch-drain-{mode}"));
        let app = TestApp::start(|_| Reply::ok().after(Duration::from_millis(30))).await;
        topic.produce_numbered(N, 40).await;
        let mut cfg = batch_config(
            &topic,
            &group,
            &app.url(),
            serde_json::json!({"maxRecords": 25, "maxWait": "10ms"}),
        );
        cfg["delivery"]["ordering"] = mode.into();
        cfg["delivery"]["maxInFlight"] = 8.into();
        let mut first = Sidecar::start(&format!("batch-drain-{mode}-1"), cfg.clone());
        app.wait_until("a third of the records", Duration::from_secs(60), |r| {
            r.iter().map(|r| r.events().len()).sum::<usize>() >= N / 3
        })
        .await;
        let signalled = Instant::now();
        first.signal("TERM");
        let status = first
            .wait_exit(Duration::from_secs(30))
            .expect("exit after SIGTERM");
        let exited = Instant::now();
        assert!(
            status.success(),
            "{mode}: exit {status}; log:\n{}",
            first.log()
        );
        let last_answer = app
            .received()
            .iter()
            .map(|r| r.answered)
            .max()
            .expect("answers");
        assert_eq!(
            app.in_flight(),
            0,
            "{mode}: the drain left a batch in flight"
        );
        println!(
            "{mode}: drain took {:?}; exit {:?} after the last answer",
            exited - signalled,
            exited.saturating_duration_since(last_answer)
        );
        let mut second = Sidecar::start(&format!("batch-drain-{mode}-2"), cfg);
        wait_committed_to_end(&group, &topic).await;
        second.stop_gracefully(Duration::from_secs(30));
        let got = app.received();
        let c = counts(&got);
        let lost: Vec<usize> = (0..N).filter(|v| !c.contains_key(v)).collect();
        let dup: Vec<(usize, usize)> = c
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(v, n)| (*v, *n))
            .collect();
        assert!(lost.is_empty(), "{mode}: lost {lost:?}");
        assert!(dup.is_empty(), "{mode}: duplicated {dup:?}");
    }
}
