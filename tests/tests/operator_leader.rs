//! Leader election on the real API server: of two operator replicas exactly one reconciles;
//! when it stops cleanly a standby takes over at once, and when it crashes (Lease not
//! released) a standby takes over once the Lease expires. Electors on one Lease never act at
//! once when the leader's API server stalls, and a 409 on a renewal re-reads the Lease.

mod operator_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use operator_common::{Operator, create_ec, ec_yaml, install_crd, lease, wait_for};
use serde_json::json;
use sluice_operator::leader::{BeforeWrite, Elector, Lost};
use sluice_tests::kube_env::{self, Namespace};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn reconciled(client: &Client, ns: &str, name: &str) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("the Deployment of {name}"),
        Duration::from_secs(60),
        || async { deployments.get_opt(name).await.ok().flatten() },
    )
    .await;
}

async fn holder(client: &Client, ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get("sluice-operator")
        .await
        .ok()?;
    lease.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    let client = kube_env::client().await;
    install_crd(&client).await;
    let ns = Namespace::create(&client, "op-leader").await;

    let a = Operator::start(&client, &ns.name, "replica-a");
    let b = Operator::start(&client, &ns.name, "replica-b");
    wait_for("one leader", Duration::from_secs(30), || async {
        (a.is_leader() || b.is_leader()).then_some(())
    })
    .await;
    // Stays exactly one over several renewals.
    for _ in 0..10 {
        assert!(
            a.is_leader() ^ b.is_leader(),
            "exactly one of two replicas leads"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (leader, standby) = if a.is_leader() { (a, b) } else { (b, a) };
    assert_eq!(
        holder(&client, &ns.name).await.as_deref(),
        Some(leader.identity.as_str())
    );

    create_ec(&client, &ns.name, "first", &ec_yaml("orders", 0, "")).await;
    reconciled(&client, &ns.name, "first").await;
    assert!(leader.reconciles() >= 1);
    assert_eq!(standby.reconciles(), 0, "the standby does not reconcile");

    // Clean stop: the Lease is released, the standby takes over at once.
    let stopped = Instant::now();
    leader.stop().await;
    wait_for(
        "the standby to lead after a clean stop",
        Duration::from_secs(10),
        || async { standby.is_leader().then_some(()) },
    )
    .await;
    let clean_failover = stopped.elapsed();
    assert_eq!(
        holder(&client, &ns.name).await.as_deref(),
        Some(standby.identity.as_str())
    );
    create_ec(&client, &ns.name, "second", &ec_yaml("orders", 0, "")).await;
    reconciled(&client, &ns.name, "second").await;

    // Crash: the Lease is not released; a new standby waits for it to expire (6 s here).
    let c = Operator::start(&client, &ns.name, "replica-c");
    wait_for(
        "replica-c to see the Lease",
        Duration::from_secs(10),
        || async { c.metrics.is_ready().then_some(()) },
    )
    .await;
    assert!(!c.is_leader());
    let crashed = Instant::now();
    standby.crash().await;
    wait_for(
        "replica-c to lead after the crash",
        Duration::from_secs(30),
        || async { c.is_leader().then_some(()) },
    )
    .await;
    let crash_failover = crashed.elapsed();
    assert!(
        crash_failover >= Duration::from_secs(4),
        "took over after {crash_failover:?}, before the crashed leader's Lease could have expired"
    );
    create_ec(&client, &ns.name, "third", &ec_yaml("orders", 0, "")).await;
    reconciled(&client, &ns.name, "third").await;
    let lease = Api::<Lease>::namespaced(client.clone(), &ns.name)
        .get("sluice-operator")
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-c"));
    assert!(spec.lease_transitions.unwrap_or(0) >= 2);
    eprintln!("failover after a clean stop: {clean_failover:?}; after a crash: {crash_failover:?}");
    c.stop().await;
    assert_eq!(
        holder(&client, &ns.name).await,
        None,
        "a clean stop releases the Lease"
    );
}

/// The test bed's client configuration.
async fn kube_config() -> kube::Config {
    let kubeconfig = kube::config::Kubeconfig::read_from(kube_env::kubeconfig_path())
        .expect("the test bed's kubeconfig");
    kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a valid kubeconfig")
}

/// A TCP relay in front of the API server that can be stalled: while stalled it holds every
/// byte in both directions, as a hung API server or network would.
struct StallingProxy {
    port: u16,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(upstream: String) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                tokio::spawn(relay(down_r, up_w, flag.clone()));
                tokio::spawn(relay(up_r, down_w, flag.clone()));
            }
        });
        StallingProxy {
            port,
            stalled,
            task,
        }
    }

    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// A client of the API server through this relay (its own connection pool).
    async fn client(&self) -> Client {
        let mut config = kube_config().await;
        config.cluster_url = format!("https://127.0.0.1:{}", self.port).parse().unwrap();
        Client::try_from(config).unwrap()
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A leader whose API server stops answering gives up at its renew deadline — each renewal
/// is cut at the time left, not left hanging — and, allowing its graceful stop, has stopped
/// before a competing elector on the same Lease takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leader_stops_before_another_elector_takes_over() {
    let client = kube_env::client().await;
    let ns = Namespace::create(&client, "op-lease-stall").await;
    let upstream = {
        let url = kube_config().await.cluster_url;
        format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap_or(443))
    };
    let proxy = StallingProxy::start(upstream).await;
    let settings = |id: &str| lease(&ns.name, "stall", id);
    let a = Arc::new(Elector::new(proxy.client().await, settings("a")));
    let b = Arc::new(Elector::new(kube_env::client().await, settings("b")));
    let graceful_stop = a.settings().graceful_stop;
    let renew_deadline = a.settings().renew_deadline;

    let stop = CancellationToken::new();
    let acquired = a
        .acquire(&stop, || {})
        .await
        .expect("a acquires a free Lease");
    let b_task = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            b.acquire(&stop, || {}).await.expect("b acquires");
            Instant::now()
        })
    };
    let a_hold = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let lost = a.hold(acquired, &stop).await;
            (lost, Instant::now())
        })
    };
    // Several renewals: a keeps the Lease, b waits.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!a_hold.is_finished(), "the leader kept renewing");
    assert!(!b_task.is_finished(), "b does not take a live Lease");
    assert_eq!(
        holder_of(&client, &ns.name, "stall").await.as_deref(),
        Some("a")
    );

    proxy.stall();
    let stalled = Instant::now();
    let (lost, a_stopped) = tokio::time::timeout(Duration::from_secs(30), a_hold)
        .await
        .expect("the stalled leader gives up")
        .unwrap();
    assert_eq!(lost, Some(Lost::Deadline));
    let b_acquired = tokio::time::timeout(Duration::from_secs(30), b_task)
        .await
        .expect("b takes over the expired Lease")
        .unwrap();
    // The leader gave up within one renew deadline of the stall (its last renewal started
    // before the stall), and — counting the graceful stop it may still take — before b led.
    let gave_up = a_stopped - stalled;
    assert!(
        gave_up <= renew_deadline + Duration::from_millis(500),
        "the stalled leader acted for {gave_up:?} after the stall, past its {renew_deadline:?} renew deadline"
    );
    assert!(
        a_stopped + graceful_stop < b_acquired,
        "overlap: a stopped (plus its {graceful_stop:?} graceful stop) {:?} after the stall, b led {:?} after it",
        a_stopped - stalled + graceful_stop,
        b_acquired - stalled
    );
    assert_eq!(
        holder_of(&client, &ns.name, "stall").await.as_deref(),
        Some("b")
    );
    eprintln!(
        "stalled API server: the leader stopped {gave_up:?} after the stall; the other elector led {:?} after it (margin {:?} beyond the graceful stop)",
        b_acquired - stalled,
        b_acquired - (a_stopped + graceful_stop)
    );
    stop.cancel();
}

/// A renewal whose write meets a 409 Conflict (the Lease changed since it was read) reads the
/// Lease again: still ours, it renews at the new resourceVersion and stays leader; someone
/// else's live Lease, it steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflict_re_reads_the_lease_instead_of_stepping_down() {
    let client = kube_env::client().await;
    let ns = Namespace::create(&client, "op-lease-409").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    // What the next write of the elector races with: a concurrent write, made between its
    // read and its write (so its write is certain to conflict). 0: nothing.
    let armed = Arc::new(AtomicU32::new(0));
    let hook: BeforeWrite = {
        let (armed, leases) = (armed.clone(), leases.clone());
        Arc::new(move || {
            let (armed, leases) = (armed.clone(), leases.clone());
            Box::pin(async move {
                let patch = match armed.swap(0, Ordering::SeqCst) {
                    0 => return,
                    // Touches the object, the holder stays "a".
                    1 => json!({"metadata": {"labels": {"touched": "yes"}}}),
                    // Another replica's live Lease.
                    _ => json!({"spec": {
                        "holderIdentity": "intruder",
                        "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
                    }}),
                };
                leases
                    .patch("conflict", &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .expect("the concurrent write");
            })
        })
    };
    let a = Arc::new(
        Elector::new(kube_env::client().await, lease(&ns.name, "conflict", "a"))
            .with_before_write(hook),
    );
    let stop = CancellationToken::new();
    let acquired = a.acquire(&stop, || {}).await.unwrap();
    let renewed_before = renew_time(&leases).await;
    let conflicts_before = lease_conflicts(&client).await;
    let hold = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move { a.hold(acquired, &stop).await })
    };
    armed.store(1, Ordering::SeqCst);
    wait_for(
        "the armed write to happen",
        Duration::from_secs(10),
        || async { (armed.load(Ordering::SeqCst) == 0).then_some(()) },
    )
    .await;
    // Renewals go on: renewTime moves past the conflict and a stays the holder.
    let touched = wait_for(
        "a renewal after the conflict",
        Duration::from_secs(10),
        || async {
            let lease = leases.get("conflict").await.ok()?;
            let touched = lease.metadata.labels.as_ref()?.contains_key("touched");
            let spec = lease.spec?;
            (touched && spec.renew_time > renewed_before).then_some(spec.holder_identity)
        },
    )
    .await;
    assert_eq!(touched.as_deref(), Some("a"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !hold.is_finished(),
        "the leader stepped down on a conflict while the Lease was still its own"
    );
    let conflicts = lease_conflicts(&client).await - conflicts_before;
    assert!(
        conflicts >= 1.0,
        "the API server answered no Lease write with 409: the test did not race"
    );

    // Now the concurrent write is another replica taking the Lease: a steps down.
    armed.store(2, Ordering::SeqCst);
    let lost = tokio::time::timeout(Duration::from_secs(10), hold)
        .await
        .expect("the leader steps down once another holds the Lease")
        .unwrap();
    assert_eq!(lost, Some(Lost::Taken));
    assert_eq!(
        holder_of(&client, &ns.name, "conflict").await.as_deref(),
        Some("intruder")
    );
    eprintln!("409s on Lease writes during the test (API server, all clients): {conflicts}");
    stop.cancel();
}

async fn holder_of(client: &Client, ns: &str, name: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?
        .spec?
        .holder_identity
}

async fn renew_time(leases: &Api<Lease>) -> Option<MicroTime> {
    leases.get("conflict").await.ok()?.spec?.renew_time
}

/// Lease writes the API server answered with 409 Conflict, from its own
/// `apiserver_request_total` (all clients of the shared test bed).
async fn lease_conflicts(client: &Client) -> f64 {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .expect("the API server's /metrics");
    text.lines()
        .filter_map(|l| l.strip_prefix("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"leases\"") && l.contains("code=\"409\""))
        .filter_map(|l| l.rsplit_once("} ")?.1.trim().parse::<f64>().ok())
        .sum()
}
