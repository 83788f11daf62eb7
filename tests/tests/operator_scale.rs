//! EventConsumers created at once converge and then stay quiet, with the operator running as
//! its own process (the built `sluice-operator` binary, lag on at its default interval
//! against a real topic) so its memory can be measured alone. Prints the convergence time
//! as a ratio to the same number of bare writes measured in the same run, and to the
//! operator's own writes (the same objects) made bare in the same run, the steady-state
//! request rate from the API server's own `apiserver_request_total`, status writes per
//! minute, Kafka clients held and peak RSS.
//!
//! The binary is `$SLUICE_OPERATOR_BIN`, else `sluice-operator` next to this test's `deps/`
//! folder (built by `cargo test --workspace`, or `cargo build -p sluice-operator`).
//! `SLUICE_SCALE_COUNT` (default 200) and `SLUICE_SCALE_STEADY_SECS` (default 20) change
//! the size and the steady-state window; `make bench-operator` runs 1 000 for 5 minutes.

mod operator_common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace as K8sNamespace, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use operator_common::{
    OPERATOR_RESOURCES, RequestCount, apiserver_request_counts, apiserver_request_seconds,
    condition, create_ec, ec_yaml, env_or, install_crd, operator_binary, spread, wait_for,
};
use serde_json::json;
use sluice_operator::build::{self, FIELD_MANAGER, Input, SidecarDefaults};
use sluice_operator::crd::EventConsumer;
use sluice_tests::kafka::Topic;
use sluice_tests::kube_env::{self, Namespace};

/// (peak, current) resident set size of a process, in KiB, from /proc.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the operator process is alive");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        // A test that failed because the operator was gone says how it ended.
        if std::thread::panicking()
            && let Ok(Some(status)) = self.0.try_wait()
        {
            eprintln!("the operator process had already exited: {status}");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sums `apiserver_request_total` from the API server's own metrics: (all requests, the
/// requests on the resources the operator touches, EventConsumer status PATCHes). The API
/// server is shared by every client of the test bed, so these are upper bounds for the
/// operator's share.
async fn apiserver_requests(client: &kube::Client) -> (f64, f64, f64) {
    let (mut total, mut ours, mut status) = (0.0, 0.0, 0.0);
    for r in apiserver_request_counts(client).await {
        total += r.count;
        if OPERATOR_RESOURCES.contains(&r.resource.as_str()) {
            ours += r.count;
        }
        if r.resource == "eventconsumers"
            && r.subresource == "status"
            // A server-side apply counts as verb APPLY, a merge patch as PATCH.
            && ["PATCH", "APPLY"].contains(&r.verb.as_str())
        {
            status += r.count;
        }
    }
    (total, ours, status)
}

/// The writes the operator makes to converge one EventConsumer once the test created it,
/// made bare — no watch, no queue, no cache, no decision: its drain-token Secret created,
/// the objects the operator's own `build` gives applied the way the reconcile applies them
/// (the ConfigMap, then the Deployment and the PodDisruptionBudget together, server-side
/// apply with the operator's field manager and owner references), and one status applied.
async fn bare_writes_of_one(client: &kube::Client, ns: &str, ec: EventConsumer) {
    let name = ec
        .metadata
        .name
        .as_deref()
        .expect("a created object has a name");
    let uid = ec.metadata.uid.clone().expect("a created object has a uid");
    let token = sluice_operator::secrets::new_token();
    let secrets = std::collections::BTreeMap::new();
    let defaults = SidecarDefaults::default();
    let desired = build::build(&Input {
        name,
        namespace: ns,
        uid: &uid,
        spec: &ec.spec,
        drain_token: &token,
        secrets: &secrets,
        defaults: &defaults,
    })
    .expect("the test's EventConsumer is valid");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &sluice_operator::secrets::drain_secret(ns, name, &uid, &token),
        )
        .await
        .expect("a bare drain-token Secret");
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let named = |m: &kube::api::ObjectMeta| m.name.clone().expect("a built object has a name");
    let cm_name = named(&desired.config_map.metadata);
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(&cm_name, &apply, &Patch::Apply(&desired.config_map))
        .await
        .expect("a bare ConfigMap apply");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let (deployment, pdb) = (
        Patch::Apply(&desired.deployment),
        Patch::Apply(&desired.pdb),
    );
    let (deployment_name, pdb_name) = (
        named(&desired.deployment.metadata),
        named(&desired.pdb.metadata),
    );
    let (d, p) = tokio::join!(
        deployments.patch(&deployment_name, &apply, &deployment),
        pdbs.patch(&pdb_name, &apply, &pdb),
    );
    d.expect("a bare Deployment apply");
    p.expect("a bare PodDisruptionBudget apply");
    let status = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "EventConsumer",
        "status": {
            "observedGeneration": ec.metadata.generation,
            "replicas": 0,
            "readyReplicas": 0,
            "selector": build::selector_string(name),
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "ScaledToZero", "message": "bare", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "bare", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        },
    });
    Api::<EventConsumer>::namespaced(client.clone(), ns)
        .patch_status(name, &apply, &Patch::Apply(&status))
        .await
        .expect("a bare status apply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_consumers_converge_and_stay_quiet() {
    let count: usize = env_or("SLUICE_SCALE_COUNT", 200);
    let steady = Duration::from_secs(env_or("SLUICE_SCALE_STEADY_SECS", 20));
    let client = kube_env::client().await;
    install_crd(&client).await;
    // An earlier run's namespaces, while the API server and the garbage collector still
    // delete their thousands of objects, would compete with this run's writes (a run right
    // after another converged in twice the time).
    let namespaces: Api<K8sNamespace> = Api::all(client.clone());
    let waited = Instant::now();
    wait_for(
        "an earlier run's namespaces to be deleted",
        Duration::from_secs(900),
        || async {
            let list = namespaces.list(&ListParams::default()).await.ok()?;
            (!list.items.iter().any(|n| {
                n.metadata.deletion_timestamp.is_some()
                    && n.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("op-scale"))
            }))
            .then_some(())
        },
    )
    .await;
    if waited.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "waited {:?} for an earlier run's namespaces to be deleted",
            waited.elapsed()
        );
    }
    let ns = Namespace::create(&client, "op-scale").await;
    // A real topic, so "lag on" (the default 30 s interval) measures real offsets.
    let topic = Topic::create("scale", 3).await;
    topic.produce_numbered(30, 3).await;

    // The same number of bare writes the operator makes to converge (a drain-token Secret,
    // a ConfigMap, a Deployment, a PodDisruptionBudget and a status per EventConsumer, plus
    // the EventConsumer itself: 6), as small ConfigMaps, at the operator's default
    // concurrency (16): what the API server alone needs, measured in this run.
    let writes = count * 6;
    let bare_seconds_before = apiserver_request_seconds(&client).await;
    let bare_started = Instant::now();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    stream::iter(0..writes)
        .for_each_concurrent(16, |i| {
            let cms = cms.clone();
            async move {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(format!("bare-{i:05}")),
                        ..Default::default()
                    },
                    data: Some([("k".to_owned(), "v".to_owned())].into()),
                    ..Default::default()
                };
                cms.create(&Default::default(), &cm)
                    .await
                    .expect("a bare write");
            }
        })
        .await;
    let bare = bare_started.elapsed();
    let bare_seconds: f64 = {
        let sum = |v: &[RequestCount]| -> f64 {
            v.iter()
                .filter(|r| r.verb == "POST" && r.resource == "configmaps")
                .map(|r| r.count)
                .sum()
        };
        sum(&apiserver_request_seconds(&client).await) - sum(&bare_seconds_before)
    };

    // The same writes the operator makes, with the same objects, made bare in a namespace
    // of their own at the same concurrency: what the API server alone needs for what the
    // operator must write. The convergence's ratio to this is the operator's own cost.
    let same_ns = Namespace::create(&client, "op-scale-bare").await;
    let same_seconds_before = apiserver_request_seconds(&client).await;
    let same_started = Instant::now();
    let bare_yaml = ec_yaml(&topic.name, 0, "");
    // Pipelined as in the operator's phase: the EventConsumers are created 16 at a time
    // (the test's writes there) while each created one gets the rest of its writes, 16 at a
    // time (the operator's default concurrency).
    let (created_tx, created_rx) = futures::channel::mpsc::unbounded::<EventConsumer>();
    let (bare_client, bare_ns) = (&client, &same_ns.name);
    // Moves the sender in, so the rest's stream ends after the last create.
    let bare_creates = async move {
        stream::iter(0..count)
            .for_each_concurrent(16, |i| {
                let client = bare_client.clone();
                let ns = bare_ns.clone();
                let yaml = bare_yaml.clone();
                let created_tx = created_tx.clone();
                async move {
                    let ec = create_ec(&client, &ns, &format!("ec-{i:04}"), &yaml).await;
                    created_tx.unbounded_send(ec).expect("the bare writes run");
                }
            })
            .await;
    };
    let bare_rest = created_rx.for_each_concurrent(16, |ec| {
        let client = client.clone();
        let ns = same_ns.name.clone();
        async move { bare_writes_of_one(&client, &ns, ec).await }
    });
    tokio::join!(bare_creates, bare_rest);
    let same = same_started.elapsed();
    let same_seconds: f64 = {
        // Every request but the long-running WATCHes, whose seconds are their lifetimes.
        let sum = |v: &[RequestCount]| -> f64 {
            v.iter()
                .filter(|r| r.verb != "WATCH")
                .map(|r| r.count)
                .sum()
        };
        sum(&apiserver_request_seconds(&client).await) - sum(&same_seconds_before)
    };
    // The Deployment controller writes each new Deployment's status; let it finish before
    // the operator's phase, so that phase does not pay for these.
    let bare_deployments: Api<Deployment> = Api::namespaced(client.clone(), &same_ns.name);
    wait_for(
        "the Deployment controller to observe the bare Deployments",
        Duration::from_secs(60 + count as u64 / 4),
        || async {
            let list = bare_deployments.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .all(|d| {
                    d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
                })
                .then_some(())
        },
    )
    .await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("{}-operator.log", ns.name));
    let child = Command::new(operator_binary())
        .args([
            "run",
            "--watch-namespace",
            &ns.name,
            "--lease-namespace",
            &ns.name,
            "--identity",
            "scale",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--log", "info"])
        .env("KUBECONFIG", kube_env::kubeconfig_path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting sluice-operator");
    let mut operator = Process(child);
    let pid = operator.0.id();
    let (idle_peak, _) = {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_kib(pid)
    };

    // Created at once (16 requests in flight), replicas 0 so the single test node is not
    // asked to run the pods: this measures the operator, not the kubelet.
    let requests_before = apiserver_request_counts(&client).await;
    let seconds_before = apiserver_request_seconds(&client).await;
    let started = Instant::now();
    let names: Vec<String> = (0..count).map(|i| format!("ec-{i:04}")).collect();
    let yaml = ec_yaml(&topic.name, 0, "");
    let ecs: Api<EventConsumer> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let peak_seen = std::sync::atomic::AtomicU64::new(0);
    // Convergence is watched, the way a user follows it (`kubectl get ec -w`): a LIST of
    // every EventConsumer every 200 ms would load the API server with work the bare writes
    // above never had to share it with.
    let converge = async {
        let is_converged = |ec: &EventConsumer| {
            ec.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == ec.metadata.generation)
                && condition(ec, "Degraded").is_some_and(|d| d.0 == "False")
                && condition(ec, "Ready").is_some_and(|r| r.1 == "ScaledToZero")
        };
        let mut done = std::collections::HashSet::new();
        let mut events = std::pin::pin!(
            watcher::watcher(ecs.clone(), watcher::Config::default()).default_backoff(),
        );
        let mut rss = tokio::time::interval(Duration::from_millis(200));
        while done.len() < count {
            tokio::select! {
                ev = events.next() => match ev.expect("the EventConsumer watch ended") {
                    Ok(watcher::Event::Apply(ec) | watcher::Event::InitApply(ec)) => {
                        let name = ec.metadata.name.clone().unwrap_or_default();
                        if is_converged(&ec) {
                            done.insert(name);
                        } else {
                            done.remove(&name);
                        }
                    }
                    Ok(watcher::Event::Delete(ec)) => {
                        done.remove(&ec.metadata.name.clone().unwrap_or_default());
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                    Err(e) => eprintln!("the EventConsumer watch: {e} (it retries after a backoff)"),
                },
                _ = rss.tick() => {
                    peak_seen.fetch_max(rss_kib(pid).0, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    };
    let create = async {
        stream::iter(names.iter())
            .for_each_concurrent(16, |name| {
                let client = client.clone();
                let ns = ns.name.clone();
                let yaml = yaml.clone();
                async move {
                    create_ec(&client, &ns, name, &yaml).await;
                }
            })
            .await;
        started.elapsed()
    };
    let timeout = Duration::from_secs(60 + count as u64 / 2);
    let (created, ()) = tokio::join!(create, async {
        tokio::time::timeout(timeout, converge).await.unwrap_or_else(|_| {
            panic!(
                "timed out after {timeout:?} waiting for {count} EventConsumers to converge (log: {})",
                log.display()
            )
        })
    });
    let converged = started.elapsed();
    let requests_converged = apiserver_request_counts(&client).await;
    let seconds_converged = apiserver_request_seconds(&client).await;
    let converge_metrics = reqwest_lite(port, "/metrics", &log).await;
    let deployment_count = deployments
        .list_metadata(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(deployment_count, count);
    // Lag on, against a real topic: every EventConsumer gets its measured lag (30 records,
    // nothing committed, startFrom earliest) in status.
    let lag_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = ecs
            .list(&ListParams::default())
            .await
            .expect("listing EventConsumers");
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for ec in &list.items {
            let s = ec.status.as_ref();
            let lag = format!(
                "lag {:?}{}",
                s.and_then(|s| s.lag),
                if s.is_some_and(|s| s.lag_stale) {
                    " (stale)"
                } else {
                    ""
                }
            );
            *seen.entry(lag).or_default() += 1;
        }
        if seen.get("lag Some(30)") == Some(&count) {
            break;
        }
        if Instant::now() > lag_deadline {
            let metrics = reqwest_lite(port, "/metrics", &log).await;
            let lag_metrics: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("sluice_operator_lag") && !l.contains("consumer_lag{"))
                .collect();
            panic!(
                "status.lag of every EventConsumer is not 30 after 120 s: {seen:?}; the operator's lag metrics: {lag_metrics:#?}; its log: {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Steady state: nothing changes; count the operator's reconciles and the API server's
    // requests over the window, sampled every 10 s.
    let log_path = log.as_path();
    let metric = |name: &'static str| async move {
        let body = reqwest_lite(port, "/metrics", log_path).await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    };
    // Let the Deployment controller finish writing the new Deployments' status (each write
    // triggers its owner once): wait until no reconcile ran for 10 s, at most 3 min.
    // The cap is reported as such, not as settled: reconciles that keep coming for minutes
    // are a finding (the children's status written slowly by kube-controller-manager, held
    // to 20 requests/s), which the steady window after it would not show.
    const SETTLE_CAP: Duration = Duration::from_secs(180);
    let settle_started = Instant::now();
    let first = metric("sluice_operator_reconciles_total").await;
    let mut last = first;
    let settled = loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = metric("sluice_operator_reconciles_total").await;
        if now == last {
            break true;
        }
        if settle_started.elapsed() > SETTLE_CAP {
            eprintln!(
                "reconciles NOT settled after the {SETTLE_CAP:?} cap: {} since convergence, {} in the last 10 s",
                now - first,
                now - last
            );
            break false;
        }
        last = now;
    };
    if settled {
        eprintln!(
            "reconciles settled {:?} after convergence ({} since convergence)",
            settle_started.elapsed(),
            last - first
        );
    }
    let reconciles_before = metric("sluice_operator_reconciles_total").await;
    let writes_before = metric("sluice_operator_status_writes_total").await
        + metric("sluice_operator_lag_status_writes_total").await;
    let mut rates = Vec::new();
    let mut ours_rates = Vec::new();
    let requests_window_start = apiserver_request_counts(&client).await;
    let (t0, o0, s0) = apiserver_requests(&client).await;
    let (mut last_total, mut last_ours) = (t0, o0);
    let window_started = Instant::now();
    let sample = Duration::from_secs(10).min(steady);
    while window_started.elapsed() < steady {
        tokio::time::sleep(sample).await;
        peak_seen.fetch_max(rss_kib(pid).0, std::sync::atomic::Ordering::Relaxed);
        let (t, o, _) = apiserver_requests(&client).await;
        rates.push((t - last_total) / sample.as_secs_f64());
        ours_rates.push((o - last_ours) / sample.as_secs_f64());
        (last_total, last_ours) = (t, o);
    }
    let window = window_started.elapsed().as_secs_f64();
    let (_, _, s1) = apiserver_requests(&client).await;
    let requests_window_end = apiserver_request_counts(&client).await;
    let reconciles = metric("sluice_operator_reconciles_total").await - reconciles_before;
    let status_writes = metric("sluice_operator_status_writes_total").await
        + metric("sluice_operator_lag_status_writes_total").await
        - writes_before;
    let clients = metric("sluice_operator_lag_clients").await;
    let (peak, current) = rss_kib(pid);
    let peak = peak.max(peak_seen.into_inner());
    let (all_med, all_min, all_max) = spread(rates);
    let (ours_med, ours_min, ours_max) = spread(ours_rates);
    eprintln!(
        "{count} EventConsumers: created in {created:?}, all converged after {converged:?}; {writes} bare writes took {bare:?}: ratio {:.2} (the API server spent {bare_seconds:.1} s on the bare writes, {:.0} ms each)",
        converged.as_secs_f64() / bare.as_secs_f64(),
        bare_seconds / writes as f64 * 1000.0
    );
    eprintln!(
        "the same writes the operator makes, with its own objects, made bare ({count} EventConsumers: create, drain-token Secret, ConfigMap, Deployment + PodDisruptionBudget, status; 16 at a time) took {same:?}: convergence is {:.2}× that (the API server spent {same_seconds:.1} s on every request but WATCHes meanwhile, the test's own LISTs included)",
        converged.as_secs_f64() / same.as_secs_f64(),
    );
    eprintln!(
        "steady state over {window:.0} s (lag on, 30 s): {reconciles} reconciles; API server requests/s on the operator's resources median {ours_med:.2} (min {ours_min:.2}, max {ours_max:.2}), all clients median {all_med:.2} (min {all_min:.2}, max {all_max:.2}) [shared API server: upper bounds]; EventConsumer status PATCHes {:.1}/min (API server), operator status writes {:.1}/min; Kafka lag clients {clients}",
        (s1 - s0) * 60.0 / window,
        status_writes * 60.0 / window,
    );
    print_requests(
        "until convergence (the test's own CREATE and LIST of eventconsumers included)",
        (&requests_before, &requests_converged),
        Some((&seconds_before, &seconds_converged)),
        count,
    );
    print_requests(
        "in the steady-state window",
        (&requests_window_start, &requests_window_end),
        None,
        count,
    );
    eprintln!(
        "during convergence, the operator's counters: {}",
        [
            "sluice_operator_reconciles_total",
            "sluice_operator_status_writes_total",
            "sluice_operator_applies_skipped_total",
            "sluice_operator_reconcile_duration_seconds_sum",
        ]
        .iter()
        .map(|name| {
            let v = converge_metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or("?")
                .trim();
            format!("{name} {v}")
        })
        .collect::<Vec<_>>()
        .join(", ")
    );
    eprintln!(
        "operator RSS peak {} MiB (idle before: {} MiB), now {} MiB",
        peak / 1024,
        idle_peak / 1024,
        current / 1024
    );
    // Quiet: no reconcile loop and no status churn once converged (measured: 0 of each, with
    // 200 and with 1 000). Allowed: the jittered 30 min resync and 1% stragglers (a late
    // Deployment status write); a loop or churn exceeds this many times over.
    assert!(
        reconciles <= (count / 100) as f64 + window / 60.0 * (count as f64 / 1800.0 * 1.2) + 5.0,
        "reconciles keep running after convergence: {reconciles} in {window:.0} s for {count} EventConsumers"
    );
    assert!(
        status_writes <= (count / 100) as f64 + 5.0,
        "status writes keep coming after convergence: {status_writes} in {window:.0} s"
    );
    assert_eq!(
        clients, 1.0,
        "one Kafka client for the one connection identity"
    );
    // Measured: 34 MiB with 200, 62 MiB with 1 000 (idle 26 MiB; the Deployment cache
    // trimmed, malloc arenas capped at 2). Before: 41 and 78 MiB, over this bound.
    let rss_bound = 34 * 1024 + 36 * count as u64;
    assert!(
        peak < rss_bound,
        "operator peak RSS {} MiB, over {} MiB for {count} EventConsumers (goal 64 MiB at 1 000)",
        peak / 1024,
        rss_bound / 1024
    );

    // SIGTERM: a clean exit.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = operator.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "the operator exits cleanly on SIGTERM: {status}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator did not exit within 20 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints the API server's requests between two snapshots on the resources the operator
/// touches, by verb and resource, per EventConsumer, and with `seconds` the API server's mean
/// time per request and its total (every client of the shared API server counts).
fn print_requests(
    what: &str,
    counts: (&[RequestCount], &[RequestCount]),
    seconds: Option<(&[RequestCount], &[RequestCount])>,
    count: usize,
) {
    use std::collections::BTreeMap;
    type Key = (String, String);
    let delta = |(before, after): (&[RequestCount], &[RequestCount])| {
        let key = |r: &RequestCount| -> Key {
            let resource = if r.subresource.is_empty() {
                r.resource.clone()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            (r.verb.clone(), resource)
        };
        let mut d: BTreeMap<Key, f64> = BTreeMap::new();
        let ours = |r: &&RequestCount| OPERATOR_RESOURCES.contains(&r.resource.as_str());
        for r in after.iter().filter(ours) {
            *d.entry(key(r)).or_default() += r.count;
        }
        for r in before.iter().filter(ours) {
            *d.entry(key(r)).or_default() -= r.count;
        }
        d
    };
    let secs = seconds.map(delta).unwrap_or_default();
    let mut rows: Vec<_> = delta(counts)
        .into_iter()
        .filter(|(_, n)| *n >= 1.0)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|(_, n)| n).sum();
    eprintln!(
        "API server requests on the operator's resources {what} (shared API server: every client counts): {total:.0}, {:.2} per EventConsumer{}",
        total / count as f64,
        if seconds.is_some() {
            "; the API server's mean time per request and its total"
        } else {
            ""
        }
    );
    for (k, n) in rows {
        let time = secs
            .get(&k)
            .map(|s| format!("  {:>6.0} ms  {:>7.1} s", s / n * 1000.0, s))
            .unwrap_or_default();
        eprintln!(
            "  {:<8} {:<28} {n:>8.0}  {:>6.2}/EventConsumer{time}",
            k.0,
            k.1,
            n / count as f64
        );
    }
}

/// A minimal HTTP/1.1 GET against the operator's endpoint.
async fn reqwest_lite(port: u16, path: &str, log: &std::path::Path) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            // Who holds the port now, and how the operator's log ends.
            let listeners = Command::new("ss")
                .args(["-ltnp", &format!("sport = :{port}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("ss: {e}"));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            panic!(
                "the operator's HTTP endpoint 127.0.0.1:{port}{path}: {e}\nlisteners on the port:\n{listeners}\nthe last lines of its log ({}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
    };
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
