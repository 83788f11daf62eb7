//! What users live through, against the real broker: the application restarting (down for
//! 10 s and for 60 s) with a dead-letter topic configured, an application that answers
//! `Retry-After: 0`, a revoke that arrives while a sidecar drains, and a broker that is
//! unreachable when the sidecar starts. Outcomes are counted where the user would see them:
//! in the application, in the dead-letter topic, in Kafka's committed offsets, on `/readyz`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::kafka::{Topic, group, read_all, wait_committed_to_end};
use sluice_tests::testapp::{Pacer, Received, Reply, Sidecar, TestApp, free_port};

/// A configuration with only what a user must set (every other setting is the default).
fn user_config(topic: &str, group: &str, url: &str) -> serde_json::Value {
    serde_json::json!({
        "kafka": {
            "bootstrapServers": sluice_tests::kafka::bootstrap(),
            "topics": [topic],
            "groupId": group,
        },
        "delivery": {"url": url},
    })
}

fn distinct(received: &[Received]) -> BTreeSet<usize> {
    received
        .iter()
        .map(|r| r.value.parse().expect("numbered value"))
        .collect()
}

fn stop(sidecar: &mut Sidecar) {
    sidecar.stop_gracefully(Duration::from_secs(60));
}

/// Polls `/readyz` until `pred(status, body)` holds, or panics after `timeout`.
async fn wait_readyz(
    sidecar: &Sidecar,
    what: &str,
    timeout: Duration,
    pred: impl Fn(u16, &str) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = sidecar.get("/readyz", &[]);
        if pred(status, &body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /readyz still {status} {body:?} after {timeout:?}; log:\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The application goes away for `outage` while records flow, then comes back. Nothing may
/// be dead-lettered (the records are healthy) and nothing lost; the sidecar is not ready
/// during the outage and ready again after it.
async fn application_outage(name: &str, outage: Duration) {
    const N: usize = 3_000;
    let topic = Topic::create(name, 3).await;
    let dlq = Topic::create(&format!("{name}-dlq"), 1).await;
    let group = group(name);
    let pacer = Pacer::per_second(300);
    let p = pacer.clone();
    let app = TestApp::start(move |_| Reply::ok().after(p.delay())).await;
    topic.produce_numbered(N, 100).await;
    let mut cfg = user_config(&topic.name, &group, &app.url());
    cfg["delivery"]["deadLetterTopic"] = dlq.name.clone().into();
    let mut sidecar = Sidecar::start(name, cfg);
    wait_readyz(&sidecar, "start", Duration::from_secs(30), |s, _| s == 200).await;
    app.wait_until("some records", Duration::from_secs(30), |r| r.len() >= 200)
        .await;

    app.stop();
    let down = Instant::now();
    wait_readyz(
        &sidecar,
        "during the outage",
        Duration::from_secs(5),
        |s, body| s == 503 && body.contains("waiting for the application"),
    )
    .await;
    let (_, metrics) = sidecar.get("/metrics", &[]);
    assert!(
        metrics.contains("sluice_not_ready{reason=\"app_unreachable\"} 1"),
        "{metrics}"
    );
    // Not ready for the whole outage.
    while down.elapsed() < outage {
        assert_eq!(
            sidecar.get("/readyz", &[]).0,
            503,
            "ready while the application is down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    app.resume().await;
    wait_readyz(
        &sidecar,
        "after the outage",
        Duration::from_secs(10),
        |s, _| s == 200,
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct(&app.received()).len() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} records delivered after the outage; log:\n{}",
            distinct(&app.received()).len(),
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_committed_to_end(&group, &topic, Duration::from_secs(30)).await;
    stop(&mut sidecar);
    let dead = read_all(&dlq.name, 1, Duration::from_secs(3));
    assert!(
        dead.is_empty(),
        "{} healthy records were dead-lettered during a {outage:?} application outage",
        dead.len()
    );
    assert_eq!(distinct(&app.received()), (0..N).collect());
    eprintln!(
        "{name}: {outage:?} outage, {} deliveries for {N} records, 0 dead-lettered",
        app.received().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_application_restart_dead_letters_nothing() {
    application_outage("outage10", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_application_outage_dead_letters_nothing() {
    application_outage("outage60", Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_zero_is_paced_by_the_backoff() {
    let topic = Topic::create("retry0", 1).await;
    let group = group("retry0");
    let throttle = Arc::new(AtomicBool::new(true));
    let t = throttle.clone();
    let app = TestApp::start(move |r| {
        if r.value == "0" && t.load(Ordering::SeqCst) {
            Reply::status(429).header("Retry-After", "0")
        } else {
            Reply::ok()
        }
    })
    .await;
    topic.produce_numbered(5, 1).await;
    let mut sidecar = Sidecar::start("retry0", user_config(&topic.name, &group, &app.url()));
    app.wait_until("record 0", Duration::from_secs(30), |r| {
        r.iter().any(|r| r.value == "0")
    })
    .await;
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tries = app.received().iter().filter(|r| r.value == "0").count();
    // The default backoff (200 ms doubling, jittered in its upper half) allows about six
    // tries in 5 s; a loop that honoured Retry-After: 0 literally would make thousands.
    eprintln!("Retry-After: 0 for {:?}: {tries} requests", first.elapsed());
    assert!(
        (2..=10).contains(&tries),
        "{tries} requests for one record in 5 s of Retry-After: 0"
    );
    throttle.store(false, Ordering::SeqCst);
    app.wait_until("records 0..5", Duration::from_secs(60), |r| {
        distinct(r) == (0..5).collect()
    })
    .await;
    wait_committed_to_end(&group, &topic, Duration::from_secs(20)).await;
    stop(&mut sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_during_a_drain_duplicates_nothing_and_the_drain_stays_in_budget() {
    const N: usize = 3_000;
    let topic = Topic::create("revdrain", 6).await;
    let group = group("revdrain");
    // Deliveries take 10 ms, or 2 s while `slow` is set: then work is in flight when the
    // drain starts, and the drain's wait for it spans the rebalance a third member's join
    // causes (1 s heartbeats), so a revoke arrives inside the drain.
    let slow = Arc::new(AtomicBool::new(false));
    let s2 = slow.clone();
    let app = TestApp::start(move |_| {
        Reply::ok().after(Duration::from_millis(if s2.load(Ordering::SeqCst) {
            2_000
        } else {
            10
        }))
    })
    .await;
    topic.produce_numbered(N, 60).await;
    let start = |name: &str| {
        let mut cfg = user_config(&topic.name, &group, &format!("{}/{name}", app.url()));
        cfg["kafka"]["sessionTimeoutMs"] = 6_000.into();
        cfg["kafka"]["heartbeatIntervalMs"] = 1_000.into();
        Sidecar::start(name, cfg)
    };
    let mut a = start("a");
    let mut b = start("b");
    app.wait_until("deliveries from a and b", Duration::from_secs(60), |r| {
        ["/events/a", "/events/b"]
            .iter()
            .all(|p| r.iter().any(|r| r.path == *p))
    })
    .await;
    slow.store(true, Ordering::SeqCst);
    let mut c = start("c");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drain_started = Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(60)).expect("a exits");
    let drain_took = drain_started.elapsed();
    slow.store(false, Ordering::SeqCst);
    let log = a.log();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    // The premise: a revoke was served between the drain's start and its end.
    let lines: Vec<&str> = log.lines().collect();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle));
    let (Some(drain), Some(revoked), Some(done)) = (
        at("drain: stopped fetching"),
        lines.iter().enumerate().position(|(i, l)| {
            i > at("drain: stopped fetching").unwrap_or(usize::MAX)
                && l.contains("partitions revoked")
        }),
        at("drain finished"),
    ) else {
        panic!("no revoke inside the drain; log:\n{log}");
    };
    assert!(
        drain < revoked && revoked < done,
        "the revoke did not arrive during the drain; log:\n{log}"
    );
    // In-flight work (2 s) + the commit budget (10 s) + leaving (10 s).
    assert!(
        drain_took < Duration::from_secs(22),
        "the drain took {drain_took:?}; log:\n{log}"
    );
    assert!(
        !log.contains("the drain's final commit failed"),
        "left with an uncommitted finished prefix; log:\n{log}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct(&app.received()).len() < N {
        assert!(Instant::now() < deadline, "not all records delivered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_committed_to_end(&group, &topic, Duration::from_secs(30)).await;
    stop(&mut b);
    stop(&mut c);
    let received = app.received();
    let dups = received.len() - distinct(&received).len();
    eprintln!("revoke during drain: drain took {drain_took:?}, {dups} duplicates");
    assert_eq!(distinct(&received), (0..N).collect());
    assert_eq!(dups, 0, "a revoke during a drain must not duplicate");
}

/// Forwards TCP connections from a loopback port to the broker once `open` is set: the
/// broker's address looks unreachable until then.
async fn gate_to_broker(listener: tokio::net::TcpListener, open: Arc<AtomicBool>) {
    let broker = sluice_tests::kafka::bootstrap();
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        if !open.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&broker).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_not_ready_with_a_reason_and_logs_at_a_bounded_rate() {
    let topic = Topic::create("nobroker", 1).await;
    let group = group("nobroker");
    let app = TestApp::start(|_| Reply::ok()).await;
    topic.produce_numbered(10, 1).await;
    // A loopback port where nothing answers yet; later it forwards to the broker (which
    // advertises its own address, so only the bootstrap goes through the gate).
    let port = free_port();
    let mut cfg = user_config(&topic.name, &group, &app.url());
    cfg["kafka"]["bootstrapServers"] = format!("127.0.0.1:{port}").into();
    let mut sidecar = Sidecar::start("nobroker", cfg);
    wait_readyz(
        &sidecar,
        "broker unreachable",
        Duration::from_secs(20),
        |s, body| s == 503 && body.contains("no Kafka broker is reachable"),
    )
    .await;
    let (_, metrics) = sidecar.get("/metrics", &[]);
    assert!(
        metrics.contains("sluice_not_ready{reason=\"kafka_unreachable\"} 1")
            && metrics.contains("sluice_ready 0"),
        "{metrics}"
    );
    // Twenty seconds of an unreachable broker: a bounded number of log lines.
    let lines_before = sidecar.log().lines().count();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let noisy = sidecar.log().lines().count() - lines_before;
    eprintln!("broker unreachable: {noisy} log lines in 20 s");
    assert!(
        noisy <= 20,
        "{noisy} log lines in 20 s of an unreachable broker; log:\n{}",
        sidecar.log()
    );
    assert_eq!(sidecar.get("/readyz", &[]).0, 503);

    let open = Arc::new(AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("binding the gate");
    let gate = tokio::spawn(gate_to_broker(listener, open.clone()));
    wait_readyz(
        &sidecar,
        "broker reachable",
        Duration::from_secs(60),
        |s, _| s == 200,
    )
    .await;
    app.wait_until("all 10", Duration::from_secs(30), |r| {
        distinct(r).len() == 10
    })
    .await;
    wait_committed_to_end(&group, &topic, Duration::from_secs(20)).await;
    stop(&mut sidecar);
    gate.abort();
}
