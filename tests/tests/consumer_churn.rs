//! Pod churn against the real broker, with the settings a user gets: three sidecars share a
//! group on a 12-partition topic and are stopped and restarted every 2–3 s while they
//! consume. The application counts every record it receives by the sequence number in the
//! payload; duplicates and losses are counted there, never from the sidecar's metrics or
//! commits.
//!
//! The matrix: {classic with the operator's default timings (45 s session, 3 s heartbeat),
//! classic with short timings (6 s / 1 s), KIP-848} × {partition, key, none}. Every cell runs
//! the sidecar's own defaults for everything else (in-flight bound, commit interval, drain
//! and commit budgets). The tests run concurrently (no serial lock): each already runs three
//! sidecars, the application and the broker on two cores, so two at once is a busy node.
//! One more runs the sidecars under a CPU quota.
//!
//! SIGTERM (graceful): 0 lost and 0 duplicates. Without a CPU quota no drain may find the
//! group stuck rebalancing past its commit budget (every member leaves explicitly, so no
//! join phase waits for a departed one). Under the quota a member may be fenced (it missed
//! its session timeout: detected from its log) or drain while the group waits for a starved
//! member (read from the broker); the SIGKILL bound then applies to those members. SIGKILL: 0 lost; duplicates at most, per kill, `maxInFlight` plus the
//! records the application answered during one commit interval before the kill.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_tests::kafka::{GroupWatch, Topic, committed, end_offsets, group};
use sluice_tests::testapp::{CpuQuota, Pacer, Received, Reply, Sidecar, TestApp};

const PARTITIONS: i32 = 12;
/// The sidecar's default `delivery.maxInFlight` and `delivery.commitInterval`.
const DEFAULT_MAX_IN_FLIGHT: usize = 64;
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// Restarts per run: the churn stops after these so the stream can finish.
const RESTARTS: usize = 8;
/// The sidecar's default `drain.commitTimeout`.
const DEFAULT_COMMIT_BUDGET: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timings {
    /// What the operator renders for a classic EventConsumer that sets nothing (also
    /// librdkafka's own defaults): session 45 s, heartbeat 3 s.
    OperatorDefault,
    /// Short classic timings: session 6 s, heartbeat 1 s.
    Short,
    /// `group.protocol=consumer`: the broker owns session and heartbeat.
    Kip848,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    timings: Timings,
    ordering: &'static str,
    signal: &'static str,
    /// Percent of one CPU for all three sidecars together.
    quota: Option<u32>,
    records: usize,
    /// The application's total rate (records per second).
    rate: u32,
}

impl Scenario {
    fn graceful(name: &'static str, timings: Timings, ordering: &'static str) -> Scenario {
        Scenario {
            name,
            timings,
            ordering,
            signal: "TERM",
            quota: None,
            records: 40_000,
            rate: 1_500,
        }
    }
}

/// A sidecar configuration with only what a user must set, plus the timings of the cell.
fn config(s: &Scenario, topic: &str, group: &str, url: &str) -> serde_json::Value {
    let mut kafka = serde_json::json!({
        "bootstrapServers": sluice_tests::kafka::bootstrap(),
        "topics": [topic],
        "groupId": group,
    });
    match s.timings {
        Timings::OperatorDefault => {
            kafka["sessionTimeoutMs"] = 45_000.into();
            kafka["heartbeatIntervalMs"] = 3_000.into();
        }
        Timings::Short => {
            kafka["sessionTimeoutMs"] = 6_000.into();
            kafka["heartbeatIntervalMs"] = 1_000.into();
        }
        Timings::Kip848 => kafka["protocol"] = "consumer".into(),
    }
    if let Ok(debug) = std::env::var("SLUICE_TEST_KAFKA_DEBUG") {
        kafka["properties"] = serde_json::json!({"debug": debug});
    }
    serde_json::json!({
        "kafka": kafka,
        "delivery": {"url": url, "ordering": s.ordering},
    })
}

struct ChurnResult {
    counts: HashMap<usize, usize>,
    restarts: usize,
    took: Duration,
    /// Each stop: the victim's delivery path, the time of the signal, and how long the group
    /// had been rebalancing then (from the broker's view of the group).
    stops: Vec<(String, Instant, Duration)>,
    /// Members that lost their partitions without giving them up (fenced), from the logs.
    fenced: usize,
    /// Stops (indexes into `stops`) whose drain could not commit because the group was
    /// stuck rebalancing for longer than the commit budget (broker view).
    stalled: Vec<usize>,
    received: Vec<Received>,
    throttled_periods: u64,
}

impl ChurnResult {
    fn duplicates(&self) -> usize {
        self.counts.values().map(|c| c - 1).sum()
    }

    /// Every duplicate, explained from what the application saw: for each record received
    /// more than once, its deliveries as (sidecar path, attempt number, answered at).
    fn duplicate_details(&self) -> Vec<String> {
        let mut by_value: HashMap<&str, Vec<&Received>> = HashMap::new();
        for r in &self.received {
            by_value.entry(r.value.as_str()).or_default().push(r);
        }
        let t0 = self.received.iter().map(|r| r.at).min();
        let mut out: Vec<String> = by_value
            .into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(value, v)| {
                let deliveries: Vec<String> = v
                    .iter()
                    .map(|r| {
                        format!(
                            "{} attempt {} at {:?}",
                            r.path,
                            r.header("sluice-attempt").unwrap_or("?"),
                            t0.map(|t| r.answered.duration_since(t))
                        )
                    })
                    .collect();
                format!(
                    "record {value} (partition {} offset {}): {}",
                    v[0].partition(),
                    v[0].offset(),
                    deliveries.join("; ")
                )
            })
            .collect();
        out.sort();
        out
    }

    fn lost(&self, records: usize) -> Vec<usize> {
        (0..records)
            .filter(|v| !self.counts.contains_key(v))
            .take(10)
            .collect()
    }

    /// Records the application answered for the sidecar delivering to `path` in
    /// `(at - window, at]`.
    fn answered_in(&self, path: &str, at: Instant, window: Duration) -> usize {
        self.received
            .iter()
            .filter(|r| {
                r.path == path && r.answered <= at && at.duration_since(r.answered) <= window
            })
            .count()
    }

    /// The most records the application answered in any window of that length.
    fn most_answered_in(&self, window: Duration) -> usize {
        let mut times: Vec<Instant> = self.received.iter().map(|r| r.answered).collect();
        times.sort();
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]) > window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }
}

/// Counts, in a sidecar's log, the times it lost partitions without releasing them.
fn fencings(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("partitions lost (the group moved on"))
        .count()
}

async fn churn(s: Scenario) -> ChurnResult {
    let topic = Topic::create(s.name, PARTITIONS).await;
    let group = group(s.name);
    let pacer = Pacer::per_second(s.rate);
    let p = pacer.clone();
    let app = TestApp::start(move |_| Reply::ok().after(p.delay())).await;
    topic.produce_numbered(s.records, 1000).await;
    let cfg = config(&s, &topic.name, &group, &app.url());
    let watch = GroupWatch::start(&group);
    let quota = s.quota.map(|q| CpuQuota::new(s.name, q));
    // Each sidecar delivers to its own path, so the application can tell who delivered what.
    let start = |name: String| {
        let mut cfg = cfg.clone();
        cfg["delivery"]["url"] = format!("{}/{name}", app.url()).into();
        let sidecar = Sidecar::start(&name, cfg);
        if let Some(q) = &quota {
            q.add(sidecar.pid());
        }
        sidecar
    };
    let mut sidecars: Vec<Sidecar> = (0..3).map(|i| start(format!("{}-{i}", s.name))).collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(420);
    let mut restarts = 0;
    let mut stops = Vec::new();
    let mut fenced = 0;
    let mut stalled = Vec::new();
    let distinct = |r: &[Received]| {
        r.iter()
            .map(|r| r.value.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    while restarts < RESTARTS {
        // One stop every 2–3 s.
        let pause = if restarts % 2 == 0 { 2_000 } else { 3_000 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if distinct(&app.received()) >= s.records {
            break;
        }
        let victim = &mut sidecars[restarts % 3];
        let at = Instant::now();
        victim.signal(s.signal);
        stops.push((
            format!("/events/{}", victim.name),
            at,
            watch.rebalancing_for(at),
        ));
        let status = victim
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit; log:\n{}", victim.name, victim.log()));
        let log = victim.log();
        fenced += fencings(&log);
        if s.signal == "TERM" {
            assert!(status.success(), "exit status {status}; log:\n{log}");
            // The drain may leave an uncommitted prefix only when its commit budget ran out
            // because the group never settled: the broker showed it rebalancing for longer
            // than the budget while this member drained (a classic group waits in its join
            // phase for every member). That stop then gets the crash bound.
            let rebalancing = watch.rebalancing_for(Instant::now());
            if log.contains("the drain's final commit failed") {
                assert!(
                    rebalancing > DEFAULT_COMMIT_BUDGET,
                    "{}: the drain left the group with an uncommitted finished prefix while the group was not stuck rebalancing ({rebalancing:?}); log:\n{log}",
                    victim.name
                );
                eprintln!(
                    "{}: the group had been rebalancing for {rebalancing:?} (broker view); the drain's commit could not land",
                    victim.name
                );
                stalled.push(stops.len() - 1);
            }
        }
        let name = format!("{}-{}-r{restarts}", s.name, restarts % 3);
        sidecars[restarts % 3] = start(name);
        restarts += 1;
    }
    loop {
        let got = distinct(&app.received());
        if got >= s.records {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: only {got} of {} distinct records after {:?}",
            s.name,
            s.records,
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    // Everything delivered: the group's offsets in Kafka must reach the end of every
    // partition, then every member stops gracefully.
    let end: Vec<Option<i64>> = end_offsets(&topic.name, PARTITIONS)
        .into_iter()
        .map(Some)
        .collect();
    let commit_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = committed(&group, &topic.name, PARTITIONS);
        if now == end {
            break;
        }
        assert!(
            Instant::now() < commit_deadline,
            "{}: offsets never committed to the end: {now:?} vs {end:?}",
            s.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for sc in &mut sidecars {
        sc.signal("TERM");
    }
    for sc in &mut sidecars {
        let status = sc.wait_exit(Duration::from_secs(60)).expect("exit");
        let log = sc.log();
        fenced += fencings(&log);
        assert!(status.success(), "exit status {status}; log:\n{log}");
    }
    let received = app.received();
    let mut counts = HashMap::new();
    for r in &received {
        *counts
            .entry(r.value.parse::<usize>().expect("numbered value"))
            .or_insert(0) += 1;
    }
    let throttled_periods = quota.as_ref().map_or(0, CpuQuota::throttled_periods);
    ChurnResult {
        counts,
        restarts,
        took,
        stops,
        fenced,
        stalled,
        received,
        throttled_periods,
    }
}

/// With `SLUICE_TEST_CHURN_DUMP=<dir>`, writes what the application received and when the
/// stops were, for looking into a failure.
fn dump(r: &ChurnResult, name: &str) {
    let Ok(dir) = std::env::var("SLUICE_TEST_CHURN_DUMP") else {
        return;
    };
    let Some(t0) = r.received.iter().map(|x| x.at).min() else {
        return;
    };
    let mut out = String::new();
    for (victim, k, reb) in &r.stops {
        out.push_str(&format!(
            "stop {victim} {} {}\n",
            k.duration_since(t0).as_millis(),
            reb.as_millis()
        ));
    }
    for x in &r.received {
        out.push_str(&format!(
            "rec {} {} {} {} {}\n",
            x.value,
            x.partition(),
            x.offset(),
            x.answered.duration_since(t0).as_millis(),
            x.path
        ));
    }
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(std::path::Path::new(&dir).join(name), out);
}

/// Runs a graceful cell and asserts its outcome.
async fn graceful(s: Scenario) {
    let r = churn(s).await;
    dump(&r, s.name);
    let dups = r.duplicates();
    eprintln!(
        "churn {} ({:?}, {}, SIGTERM{}): {} restarts in {:?}, {} records, {dups} duplicates, {} lost, {} fencings{}",
        s.name,
        s.timings,
        s.ordering,
        s.quota
            .map(|q| format!(", {q}% CPU quota"))
            .unwrap_or_default(),
        r.restarts,
        r.took,
        s.records,
        r.lost(s.records).len(),
        r.fenced,
        if s.quota.is_some() {
            format!(", {} throttled periods", r.throttled_periods)
        } else {
            String::new()
        }
    );
    assert!(
        r.restarts >= 5,
        "the test must actually churn: {} restarts",
        r.restarts
    );
    let lost = r.lost(s.records);
    assert!(lost.is_empty(), "records lost, e.g. {lost:?}");
    if s.quota.is_none() && r.fenced == 0 {
        // Without starvation every member leaves the group explicitly, so no join phase
        // waits for a departed member and every drain's commit lands within its budget.
        assert!(
            r.stalled.is_empty(),
            "{} drain(s) could not commit because the group was stuck rebalancing although no member was fenced (a member that left without leaving the group?): stops {:?}",
            r.stalled.len(),
            r.stalled.iter().map(|i| &r.stops[*i]).collect::<Vec<_>>()
        );
    }
    if r.fenced == 0 && r.stalled.is_empty() {
        assert_eq!(
            dups,
            0,
            "graceful churn must not duplicate: {:#?}\nstops: {:?}",
            r.duplicate_details().iter().take(20).collect::<Vec<_>>(),
            r.stops
                .iter()
                .map(|(v, t, _)| (
                    v,
                    r.received
                        .iter()
                        .map(|x| x.at)
                        .min()
                        .map(|t0| t.duration_since(t0))
                ))
                .collect::<Vec<_>>()
        );
    } else {
        // A member missed its session timeout (starved), or drained while the group was
        // stuck rebalancing past the commit budget: its finished records since its last
        // acknowledged commit come again, as after a SIGKILL.
        let stalled: usize = r
            .stalled
            .iter()
            .map(|i| {
                let (victim, at, rebalancing) = &r.stops[*i];
                DEFAULT_MAX_IN_FLIGHT
                    + r.answered_in(
                        victim,
                        *at,
                        DEFAULT_COMMIT_INTERVAL + *rebalancing + Duration::from_millis(100),
                    )
            })
            .sum();
        let bound = stalled
            + r.fenced * (DEFAULT_MAX_IN_FLIGHT + r.most_answered_in(DEFAULT_COMMIT_INTERVAL));
        eprintln!(
            "{}: {} fencings, {} drains in a stuck rebalance; crash bound {bound}",
            s.name,
            r.fenced,
            r.stalled.len()
        );
        assert!(dups <= bound, "{dups} duplicates exceed {bound}");
    }
    if s.quota.is_some() {
        assert!(
            r.throttled_periods > 0,
            "the CPU quota never throttled the sidecars: the test did not starve them"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_classic_default_timings_partition() {
    graceful(Scenario::graceful(
        "ch-def-part",
        Timings::OperatorDefault,
        "partition",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_classic_default_timings_key() {
    graceful(Scenario::graceful(
        "ch-def-key",
        Timings::OperatorDefault,
        "key",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_classic_default_timings_none() {
    graceful(Scenario::graceful(
        "ch-def-none",
        Timings::OperatorDefault,
        "none",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_classic_short_timings_partition() {
    graceful(Scenario::graceful(
        "ch-short-part",
        Timings::Short,
        "partition",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_classic_short_timings_key() {
    graceful(Scenario::graceful("ch-short-key", Timings::Short, "key")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_classic_short_timings_none() {
    graceful(Scenario::graceful("ch-short-none", Timings::Short, "none")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_kip848_partition() {
    graceful(Scenario::graceful(
        "ch-848-part",
        Timings::Kip848,
        "partition",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_kip848_key() {
    graceful(Scenario::graceful("ch-848-key", Timings::Kip848, "key")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_kip848_none() {
    graceful(Scenario::graceful("ch-848-none", Timings::Kip848, "none")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_under_a_cpu_quota() {
    graceful(Scenario {
        quota: Some(10),
        ..Scenario::graceful("ch-quota", Timings::OperatorDefault, "key")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_churn_loses_nothing_and_duplicates_stay_within_the_kill_bound() {
    let s = Scenario {
        signal: "KILL",
        ..Scenario::graceful("ch-kill", Timings::Short, "partition")
    };
    let r = churn(s).await;
    let dups = r.duplicates();
    let lost = r.lost(s.records);
    // Per kill: what was in flight, plus what the application answered during the last
    // commit interval before the kill (finished, but maybe not committed yet), counted by
    // the application. With the classic protocol no commit can land while the group waits
    // for members to rejoin (a member's commit queues behind its JoinGroup on the
    // coordinator connection), so the window also covers the time the group had been
    // rebalancing, as the broker reports it (sampled every 100 ms, hence + 100 ms).
    let per_kill: Vec<usize> = r
        .stops
        .iter()
        .map(|(victim, t, rebalancing)| {
            let window = if rebalancing.is_zero() {
                DEFAULT_COMMIT_INTERVAL
            } else {
                DEFAULT_COMMIT_INTERVAL + *rebalancing + Duration::from_millis(100)
            };
            DEFAULT_MAX_IN_FLIGHT + r.answered_in(victim, *t, window)
        })
        .collect();
    let bound: usize = per_kill.iter().sum();
    dump(&r, s.name);
    eprintln!(
        "churn {} (SIGKILL): {} kills in {:?}, {dups} duplicates, {} lost; bound {bound} ({per_kill:?})",
        s.name,
        r.restarts,
        r.took,
        lost.len()
    );
    assert!(r.restarts >= 5, "the test must churn: {} kills", r.restarts);
    assert!(lost.is_empty(), "records lost, e.g. {lost:?}");
    assert!(
        dups <= bound,
        "{dups} duplicates exceed the bound {bound} (per kill: maxInFlight + one commit interval of answered records)"
    );
}

#[test]
fn the_window_counts_only_what_was_answered_in_it() {
    let t0 = Instant::now();
    let at = |ms: u64| Received {
        path: "/events/a".into(),
        value: String::new(),
        headers: HashMap::new(),
        at: t0,
        answered: t0 + Duration::from_millis(ms),
    };
    let r = ChurnResult {
        counts: HashMap::new(),
        restarts: 0,
        took: Duration::ZERO,
        stops: vec![],
        fenced: 0,
        stalled: vec![],
        received: vec![at(0), at(100), at(400), at(450), at(2000)],
        throttled_periods: 0,
    };
    let t = t0 + Duration::from_millis(450);
    assert_eq!(r.answered_in("/events/a", t, Duration::from_millis(500)), 4);
    assert_eq!(r.answered_in("/events/a", t, Duration::from_millis(100)), 2);
    assert_eq!(r.answered_in("/events/b", t, Duration::from_millis(500)), 0);
    assert_eq!(r.most_answered_in(Duration::from_millis(500)), 4);
    assert_eq!(r.most_answered_in(Duration::from_millis(10)), 1);
}
