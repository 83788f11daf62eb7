//! Drain and start-up of the consumer sidecar against the real broker: SIGTERM with
//! deliveries in flight, `/drain` with its token, leaving the group, waiting for the
//! application at start-up.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use sluice_tests::kafka::{Topic, client_config, committed, end_offsets, group};
use sluice_tests::testapp::{Received, Reply, Sidecar, TEST_DRAIN_TOKEN, TestApp, sidecar_config};

fn values(received: &[Received]) -> Vec<usize> {
    received
        .iter()
        .map(|r| r.value.parse().expect("numbered value"))
        .collect()
}

/// Members of a classic consumer group, as the broker sees them.
fn group_members(group: &str) -> usize {
    let consumer: BaseConsumer = client_config().create().expect("a Kafka client");
    let list = consumer
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("describing the group");
    list.groups()
        .iter()
        .filter(|g| g.name() == group)
        .map(|g| g.members().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_fifty_in_flight_finishes_them_commits_and_a_successor_resumes_exactly() {
    const N: usize = 300;
    let topic = Topic::create("sigterm", 4).await;
    let group = group("sigterm");
    let app = TestApp::start(|_| Reply::ok().after(Duration::from_secs(2))).await;
    topic.produce_numbered(N, 40).await;
    let mut cfg = sidecar_config(&topic.name, &group, &app.url());
    cfg["delivery"]["ordering"] = "none".into();
    cfg["delivery"]["maxInFlight"] = 50.into();
    let mut first = Sidecar::start("sigterm-1", cfg.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.in_flight() < 50 {
        assert!(
            Instant::now() < deadline,
            "never reached 50 in flight ({}); log:\n{}",
            app.in_flight(),
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answered_before = app.answered();
    let took = first.stop_gracefully(Duration::from_secs(30));
    assert_eq!(app.in_flight(), 0, "no delivery may be cut off");
    let delivered = app.received();
    assert_eq!(
        app.answered(),
        answered_before + 50,
        "all 50 in-flight deliveries finished"
    );
    assert!(
        took < Duration::from_secs(6),
        "drain took {took:?} for 2 s deliveries"
    );

    // Exactly the delivered records are committed: each partition's delivered offsets are
    // the prefix below its committed offset.
    let commits = committed(&group, &topic.name, topic.partitions);
    let mut per_partition = vec![Vec::new(); topic.partitions as usize];
    for r in &delivered {
        per_partition[r.partition() as usize].push(r.offset());
    }
    for (p, offsets) in per_partition.iter_mut().enumerate() {
        offsets.sort_unstable();
        let expected: Vec<i64> = (0..commits[p].unwrap_or(0)).collect();
        assert_eq!(
            *offsets, expected,
            "partition {p}: delivered offsets vs committed {:?}",
            commits[p]
        );
    }

    app.set_behaviour(|_| Reply::ok());
    let mut second = Sidecar::start("sigterm-2", cfg);
    app.wait_until("every record", Duration::from_secs(60), |r| r.len() >= N)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    second.signal("TERM");
    assert!(
        second
            .wait_exit(Duration::from_secs(30))
            .expect("exit")
            .success()
    );
    let mut all = values(&app.received());
    all.sort_unstable();
    assert_eq!(
        all,
        (0..N).collect::<Vec<_>>(),
        "zero duplicates and zero gaps across the handover"
    );
    let end: Vec<Option<i64>> = end_offsets(&topic.name, topic.partitions)
        .into_iter()
        .map(Some)
        .collect();
    assert_eq!(committed(&group, &topic.name, topic.partitions), end);
}

/// Key ordering takes records out of offset order: a record waits while an earlier record of
/// its key is in flight, and later records of other keys go. A drain that stopped there would
/// commit below records the application already has, and the successor would deliver those
/// again. One slow key among fast ones makes such a gap certain at the SIGTERM: the drain must
/// deliver what waited behind the slow key, commit past every record the application has, and
/// the successor must duplicate nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_ordered_drain_delivers_what_waited_behind_its_key_so_the_successor_duplicates_nothing()
 {
    const N: usize = 400;
    const KEYS: usize = 10;
    let topic = Topic::create("drain-key-gap", 1).await;
    let group = group("drain-key-gap");
    // key-0 (every tenth record) takes 100 ms; the nine other keys answer at once.
    let app = TestApp::start(|r| {
        let slow = r.value.parse::<usize>().expect("numbered value") % KEYS == 0;
        Reply::ok().after(Duration::from_millis(if slow { 100 } else { 0 }))
    })
    .await;
    topic.produce_numbered(N, KEYS).await;
    let mut cfg = sidecar_config(&topic.name, &group, &app.url());
    cfg["delivery"]["ordering"] = "key".into();
    let mut first = Sidecar::start("drain-key-gap-1", cfg.clone());
    let slow = |r: &[Received]| values(r).iter().filter(|v| *v % KEYS == 0).count();
    app.wait_until(
        "the fast keys and a few of the slow key",
        Duration::from_secs(60),
        |r| r.len() - slow(r) >= N / 2 && slow(r) >= 3,
    )
    .await;
    let took = first.stop_gracefully(Duration::from_secs(60));
    assert_eq!(app.in_flight(), 0, "no delivery may be cut off");
    let delivered = app.received();
    let slow_at_signal = slow(&delivered);
    println!(
        "drain took {took:?}; the application had {} records, {slow_at_signal} of the slow key",
        delivered.len()
    );
    // What the drain committed covers exactly what the application has: its offsets are
    // the prefix below the committed offset (read from Kafka).
    let commit = committed(&group, &topic.name, 1)[0].unwrap_or(0);
    let mut offsets: Vec<i64> = delivered.iter().map(Received::offset).collect();
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (0..commit).collect::<Vec<i64>>(),
        "the drain must commit past every record the application has, and only those; log:\n{}",
        first.log()
    );
    assert!(
        commit as usize > N / 2,
        "committed only to {commit}: the records that waited behind the slow key were not delivered"
    );

    // The successor starts where the drain committed: it delivers the records produced
    // since, and nothing the application already had.
    const MORE: usize = 100;
    topic.produce_numbered_from(N, MORE, KEYS).await;
    let mut second = Sidecar::start("drain-key-gap-2", cfg);
    app.wait_until("every record", Duration::from_secs(60), |r| {
        r.len() >= N + MORE
    })
    .await;
    second.stop_gracefully(Duration::from_secs(30));
    let mut all = values(&app.received());
    all.sort_unstable();
    assert_eq!(
        all,
        (0..N + MORE).collect::<Vec<_>>(),
        "zero duplicates and zero gaps across the handover"
    );
    assert_eq!(
        committed(&group, &topic.name, 1),
        vec![Some(end_offsets(&topic.name, 1)[0])]
    );
}

/// The same gap on a revoke: a second member joins while the first has records of slow keys
/// waiting behind their key below records of fast keys it delivered. The revoke delivers them
/// before its commit, so the new owner duplicates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_ordered_revoke_delivers_what_waited_behind_its_key_so_the_new_owner_duplicates_nothing()
 {
    const N: usize = 800;
    const KEYS: usize = 10;
    let topic = Topic::create("revoke-key-gap", 4).await;
    let group = group("revoke-key-gap");
    // Half the keys take 50 ms a record; the others answer at once.
    let slow = |v: usize| v % KEYS < KEYS / 2;
    let app = TestApp::start(move |r| {
        let v = r.value.parse::<usize>().expect("numbered value");
        Reply::ok().after(Duration::from_millis(if slow(v) { 50 } else { 0 }))
    })
    .await;
    topic.produce_numbered(N, KEYS).await;
    let mut cfg = sidecar_config(&topic.name, &group, &app.url());
    cfg["delivery"]["ordering"] = "key".into();
    let mut first = Sidecar::start("revoke-key-gap-1", cfg.clone());
    let count_slow = move |r: &[Received]| values(r).iter().filter(|v| slow(**v)).count();
    app.wait_until(
        "the fast keys and some of the slow ones",
        Duration::from_secs(60),
        |r| r.len() - count_slow(r) >= N / 4 && count_slow(r) >= 10,
    )
    .await;
    let before = app.received().len();
    let mut second = Sidecar::start("revoke-key-gap-2", cfg);
    app.wait_until("every record", Duration::from_secs(120), |r| {
        values(r).into_iter().collect::<BTreeSet<_>>().len() >= N
    })
    .await;
    first.stop_gracefully(Duration::from_secs(60));
    second.stop_gracefully(Duration::from_secs(60));
    let got = values(&app.received());
    let distinct: BTreeSet<usize> = got.iter().copied().collect();
    println!(
        "{before} records delivered when the second member joined; {} deliveries of {} records",
        got.len(),
        distinct.len()
    );
    let revoked = first
        .log()
        .contains("revoked partitions: records that waited behind their key");
    println!("the first member's revoke owed records: {revoked}");
    assert_eq!(distinct, (0..N).collect::<BTreeSet<_>>(), "lost records");
    assert_eq!(
        got.len(),
        N,
        "duplicates; the first member's log:\n{}",
        first.log()
    );
    let end: Vec<Option<i64>> = end_offsets(&topic.name, topic.partitions)
        .into_iter()
        .map(Some)
        .collect();
    assert_eq!(committed(&group, &topic.name, topic.partitions), end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_needs_the_token_leaves_the_group_and_is_idempotent() {
    let topic = Topic::create("drain-http", 2).await;
    let group = group("drain-http");
    let app = TestApp::start(|_| Reply::ok()).await;
    topic.produce_numbered(50, 5).await;
    let mut sidecar = Sidecar::start(
        "drain-http",
        sidecar_config(&topic.name, &group, &app.url()),
    );
    app.wait_until("every record", Duration::from_secs(60), |r| r.len() >= 50)
        .await;
    sidecar.wait_ready(Duration::from_secs(10));
    assert_eq!(group_members(&group), 1);

    let (status, _) = sidecar.get("/drain", &[]);
    assert_eq!(status, 401, "no token");
    let (status, _) = sidecar.get("/drain", &[("X-Sluice-Drain-Token", "guess")]);
    assert_eq!(status, 403, "wrong token");
    assert_eq!(
        sidecar.get("/readyz", &[]).0,
        200,
        "a refused drain changes nothing"
    );

    let started = Instant::now();
    let (status, body) = sidecar.get("/drain", &[("X-Sluice-Drain-Token", TEST_DRAIN_TOKEN)]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("drained"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle drain is quick: {:?}",
        started.elapsed()
    );
    assert_eq!(
        group_members(&group),
        0,
        "the group was left explicitly, not by session timeout"
    );
    let end: Vec<Option<i64>> = end_offsets(&topic.name, 2).into_iter().map(Some).collect();
    assert_eq!(committed(&group, &topic.name, 2), end);
    assert_eq!(sidecar.get("/readyz", &[]).0, 503);
    let (status, again) = sidecar.get("/drain", &[("X-Sluice-Drain-Token", TEST_DRAIN_TOKEN)]);
    assert_eq!(
        (status, again.as_str()),
        (200, body.as_str()),
        "a second drain answers the same at once"
    );
    assert_eq!(
        sidecar.get("/healthz", &[]).0,
        200,
        "still alive until told to stop"
    );

    sidecar.signal("TERM");
    let status = sidecar
        .wait_exit(Duration::from_secs(5))
        .expect("a drained sidecar exits at once on SIGTERM");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_application_before_joining_and_survives_a_flapping_slow_app() {
    const N: usize = 400;
    let topic = Topic::create("flap", 3).await;
    let group = group("flap");
    let app = TestApp::down(|_| Reply::ok().after(Duration::from_millis(20))).await;
    topic.produce_numbered(N, 30).await;
    let mut cfg = sidecar_config(&topic.name, &group, &app.url());
    cfg["delivery"]["ordering"] = "key".into();
    cfg["delivery"]["retry"] =
        serde_json::json!({"maxAttempts": 50, "initialBackoff": "50ms", "maxBackoff": "500ms"});
    let mut sidecar = Sidecar::start("flap", cfg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sidecar.get("/healthz", &[]).0,
        200,
        "alive while the application is down"
    );
    let (status, body) = sidecar.get("/readyz", &[]);
    assert_eq!((status, body.trim()), (503, "waiting for the application"));
    assert_eq!(
        group_members(&group),
        0,
        "does not join the group before the application is up"
    );
    assert_eq!(sidecar.metric("sluice_records_consumed_total"), Some(0.0));

    app.resume().await;
    sidecar.wait_ready(Duration::from_secs(10));
    // Flap: down for 1 s every 2 s while records flow.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        app.stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        app.resume().await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen: BTreeSet<usize> = values(&app.received()).into_iter().collect();
        if seen.len() == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {N} delivered; log:\n{}",
            seen.len(),
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let end: Vec<Option<i64>> = end_offsets(&topic.name, 3).into_iter().map(Some).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&group, &topic.name, 3) != end {
        assert!(
            Instant::now() < deadline,
            "offsets never committed to the end"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sidecar.metric("sluice_records_finished_total{outcome=\"dead_lettered\"}"),
        None,
        "nothing dead-lettered"
    );
    sidecar.signal("TERM");
    assert!(
        sidecar
            .wait_exit(Duration::from_secs(30))
            .expect("exit")
            .success()
    );
}

/// A member that holds no partitions (more members than partitions, as after a scale-up or
/// in the first round of a cooperative rebalance) must still leave the group explicitly on
/// SIGTERM. If it does not, a classic group waits for it for its whole session timeout (45 s
/// with the defaults) at the next rebalance, and every member that drains meanwhile cannot
/// commit. Counted where the user would see it: the broker's member list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_partitions_leaves_the_group_explicitly_on_sigterm() {
    let topic = Topic::create("empty-leave", 1).await;
    let group = group("empty-leave");
    let app = TestApp::start(|_| Reply::ok()).await;
    topic.produce_numbered(20, 2).await;
    // The operator's defaults for a classic group: a session that outlives any leave.
    let mut cfg = sidecar_config(&topic.name, &group, &app.url());
    cfg["kafka"]["sessionTimeoutMs"] = 45_000.into();
    cfg["kafka"]["heartbeatIntervalMs"] = 3_000.into();
    let mut first = Sidecar::start("empty-leave-1", cfg.clone());
    app.wait_until("every record", Duration::from_secs(60), |r| r.len() >= 20)
        .await;
    let mut second = Sidecar::start("empty-leave-2", cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while group_members(&group) < 2 || !second.log().contains("partitions assigned") {
        assert!(
            Instant::now() < deadline,
            "the second member never joined; log:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the group settle: the second member's assignment is empty (one partition).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(group_members(&group), 2);
    second.stop_gracefully(Duration::from_secs(30));
    let left = Instant::now();
    while group_members(&group) != 1 {
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "the member without partitions did not leave the group (the broker still lists it {:?} after its exit); log:\n{}",
            left.elapsed(),
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.stop_gracefully(Duration::from_secs(30));
}
