//! Leader election on the real API server: of two operator replicas exactly one reconciles;
//! when it stops cleanly a standby takes over at once, and when it crashes (Lease not
//! released) a standby takes over once the Lease expires.

mod operator_common;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use operator_common::{Operator, create_ec, ec_yaml, install_crd, wait_for};
use sluice_tests::kube_env::{self, Namespace};

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
