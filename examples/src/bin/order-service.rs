//! `order-service`: the order side of the demo, and its driver (`make demo`).
//!
//! Runs on the host next to the test bed. It creates a fresh `orders` topic, applies the
//! `inventory` EventConsumer (three pods of the `inventory` image behind the Sluice
//! sidecar), publishes `OrderCreated` events keyed by order id at a steady rate, and shows
//! every second what was produced, what the inventory pods processed, the group's lag and
//! each pod's count. Halfway it rolls the pods (a pod-template change, as a deploy would).
//! At the end it prints delivered, duplicates, lost and elapsed, and how to look around.
//!
//! The inventory pods report each processed order to this program's receipt listener on
//! the node's bridge (`--listen-ip`) before they answer the sidecar, so the counts survive
//! pod restarts.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;
use sluice_examples::report::{DemoRun, Sample, render_html};
use sluice_examples::{OrderCreated, Receipt, order_id};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    about = "The order -> inventory demo: publishes OrderCreated events and watches the inventory EventConsumer"
)]
struct Cli {
    /// Kafka bootstrap servers as this host reaches them.
    #[arg(long, env = "DEMO_KAFKA", default_value = "127.0.0.1:9092")]
    kafka: String,
    /// Kafka bootstrap servers as the pods reach them.
    #[arg(long, env = "DEMO_POD_KAFKA", default_value = "10.88.0.1:9094")]
    pod_kafka: String,
    /// The host's address on the pod network (the receipt listener binds it).
    #[arg(long, env = "DEMO_LISTEN_IP", default_value = "10.88.0.1")]
    listen_ip: String,
    /// Namespace of the demo (created with Pod Security `restricted`).
    #[arg(long, env = "DEMO_NAMESPACE", default_value = "sluice-demo")]
    namespace: String,
    /// Orders to publish.
    #[arg(long, env = "DEMO_ORDERS", default_value_t = 24_000)]
    orders: u64,
    /// Orders per second.
    #[arg(long, env = "DEMO_RATE", default_value_t = 400)]
    rate: u64,
    /// Partitions of the orders topic.
    #[arg(long, env = "DEMO_PARTITIONS", default_value_t = 6)]
    partitions: i32,
    /// Inventory pods.
    #[arg(long, env = "DEMO_REPLICAS", default_value_t = 3)]
    replicas: i32,
    /// The inventory image (imported into the node by `make images`).
    #[arg(long, env = "DEMO_IMAGE", default_value = "sluice.dev/inventory:dev")]
    image: String,
    /// kubectl to use.
    #[arg(long, env = "SLUICE_KUBECTL", default_value = "kubectl")]
    kubectl: String,
    /// Where to write the run's report (HTML with inline SVG charts). Default:
    /// `$SLUICE_CACHE/demo/report.html` (`~/.cache/sluice/demo/report.html`).
    #[arg(long, env = "DEMO_REPORT")]
    report: Option<std::path::PathBuf>,
    /// Records per batch: deliver orders to the inventory in batches of up to this many
    /// (`spec.delivery.batch`); 0 delivers one order per request.
    #[arg(long, env = "DEMO_BATCH", default_value_t = 0)]
    batch: u32,
}

/// The report's path: `--report`, or under the build cache (outside the repository).
fn report_path(cli: &Cli) -> std::path::PathBuf {
    cli.report.clone().unwrap_or_else(|| {
        let cache = std::env::var_os("SLUICE_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/sluice")
            });
        cache.join("demo/report.html")
    })
}

const EC: &str = "inventory";

fn kubectl(cli: &Cli, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(&cli.kubectl)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "running {} (set SLUICE_KUBECTL or put kubectl on PATH)",
                cli.kubectl
            )
        })?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Default)]
struct Receipts {
    counts: HashMap<u64, u32>,
    per_pod: BTreeMap<String, u64>,
    malformed: u64,
}

async fn receipt_listener(ip: &str) -> anyhow::Result<(String, Arc<Mutex<Receipts>>)> {
    let listener = TcpListener::bind((ip, 0)).await.with_context(|| {
        format!("cannot listen on {ip} (the node's bridge; is the test bed up?)")
    })?;
    let addr = listener.local_addr()?.to_string();
    let receipts: Arc<Mutex<Receipts>> = Arc::default();
    let shared = receipts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let receipts = shared.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    {
                        let mut r = receipts.lock().unwrap_or_else(|p| p.into_inner());
                        match Receipt::parse(&line) {
                            Some(rc) => {
                                *r.counts.entry(rc.seq).or_default() += 1;
                                *r.per_pod.entry(rc.pod).or_default() += 1;
                            }
                            None => r.malformed += 1,
                        }
                    }
                    if write.write_all(b"ok\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, receipts))
}

fn event_consumer(
    cli: &Cli,
    topic: &str,
    group: &str,
    receipts: &str,
    restart: Option<&str>,
) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if let Some(at) = restart {
        annotations.insert("demo.sluice.dev/restartedAt".into(), at.into());
    }
    let mut delivery = json!({
        "url": "http://127.0.0.1:8080/orders",
        "timeout": "5s",
        "ordering": "key",
        "maxInFlight": 32,
        "retry": {"maxAttempts": 5, "initialBackoff": "200ms", "maxBackoff": "5s"},
    });
    if cli.batch > 0 {
        delivery["batch"] = json!({"maxRecords": cli.batch, "maxWait": "50ms"});
        delivery["maxInFlight"] = 4.into();
    }
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "EventConsumer",
        "metadata": {"name": EC, "namespace": cli.namespace},
        "spec": {
            "kafka": {"bootstrapServers": cli.pod_kafka, "topics": [topic], "groupId": group, "startFrom": "earliest"},
            "delivery": delivery,
            "processing": {"maxDuration": "5s"},
            "membership": {"protocol": "classic", "sessionTimeout": "10s"},
            "replicas": cli.replicas,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "inventory"}, "annotations": annotations},
                "spec": {
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "inventory",
                        "image": cli.image,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"containerPort": 8080}],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "INVENTORY_RECEIPTS", "value": receipts},
                        ],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    })
}

/// Committed offsets of the group and high watermarks of the topic: (lag, committed sum).
fn lag(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
    let mut lag = 0;
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
        let c = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        lag += high - c;
    }
    Ok(lag)
}

/// Ready pods of the inventory Deployment, as "ready/desired (updated)".
fn rollout(cli: &Cli) -> String {
    kubectl(
        cli,
        &["get", "deployment", EC, "-n", &cli.namespace, "-o",
          "jsonpath={.status.readyReplicas}/{.spec.replicas} ready, {.status.updatedReplicas} updated"],
        None,
    )
    .unwrap_or_else(|_| "?".into())
}

/// The Deployment's generation and whether it runs exactly the desired pods, all updated
/// and ready.
fn deployment_state(cli: &Cli) -> (i64, bool) {
    let out = kubectl(
        cli,
        &["get", "deployment", EC, "-n", &cli.namespace, "-o",
          "jsonpath={.metadata.generation} {.status.observedGeneration} {.status.replicas} {.status.updatedReplicas} {.status.readyReplicas}"],
        None,
    )
    .unwrap_or_default();
    let f: Vec<i64> = out
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(-1))
        .collect();
    let want = i64::from(cli.replicas);
    let done = f.len() == 5 && f[0] == f[1] && f[2] == want && f[3] == want && f[4] == want;
    (f.first().copied().unwrap_or(-1), done)
}

async fn wait_ready(cli: &Cli) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if deployment_state(cli).1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the inventory Deployment is not ready after 180 s; see `kubectl -n {} get pods,events`",
                cli.namespace
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let topic = format!("orders-{run}");
    let group = format!("shop.inventory-{run}");
    println!(
        "== Sluice demo: order service -> Kafka topic {topic} -> inventory (3 pods behind the Sluice sidecar)"
    );

    // The namespace, restricted like production should be.
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cli.namespace, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}});
    kubectl(&cli, &["apply", "-f", "-"], Some(&ns.to_string()))?;
    // A previous run's consumer goes first (its pods would keep reporting to a dead port).
    let _ = kubectl(
        &cli,
        &[
            "delete",
            "ec",
            EC,
            "-n",
            &cli.namespace,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ],
        None,
    );

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cli.kafka)
        .create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                cli.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| format!("creating topic {topic} on {}", cli.kafka))?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }

    let (receipts_addr, receipts) = receipt_listener(&cli.listen_ip).await?;
    kubectl(
        &cli,
        &["apply", "-f", "-"],
        Some(&event_consumer(&cli, &topic, &group, &receipts_addr, None).to_string()),
    )?;
    println!(
        "== kubectl apply ec/{EC} -n {}: waiting for {} pods",
        cli.namespace, cli.replicas
    );
    wait_ready(&cli).await?;
    println!(
        "== {}; publishing {} OrderCreated events at {}/s",
        rollout(&cli),
        cli.orders,
        cli.rate
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cli.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let producing = {
        let (topic, produced, orders, rate) =
            (topic.clone(), produced.clone(), cli.orders, cli.rate);
        tokio::spawn(async move {
            let mut pending = Vec::new();
            for seq in 0..orders {
                let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let order = OrderCreated {
                    kind: "OrderCreated".into(),
                    order_id: order_id(seq),
                    seq,
                    sku: format!("sku-{:04}", seq % 50),
                    quantity: 1 + (seq % 3) as u32,
                };
                let payload = serde_json::to_vec(&order).expect("JSON");
                match producer.send_result(
                    FutureRecord::to(&topic)
                        .key(&order.order_id)
                        .payload(&payload),
                ) {
                    Ok(f) => pending.push(f),
                    Err((e, _)) => {
                        return Err(anyhow::anyhow!("publishing {}: {e}", order.order_id));
                    }
                }
                if pending.len() >= 200 {
                    for f in pending.drain(..) {
                        f.await
                            .map_err(|_| anyhow::anyhow!("producer gone"))?
                            .map_err(|(e, _)| anyhow::anyhow!("publishing: {e}"))?;
                        produced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            for f in pending {
                f.await
                    .map_err(|_| anyhow::anyhow!("producer gone"))?
                    .map_err(|(e, _)| anyhow::anyhow!("publishing: {e}"))?;
                produced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        })
    };

    let mut restarted: Option<(Instant, i64)> = None;
    let mut rollout_done: Option<Duration> = None;
    let mut samples: Vec<Sample> = Vec::new();
    let deadline = started + Duration::from_secs(cli.orders / cli.rate.max(1) + 120);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let p = produced.load(std::sync::atomic::Ordering::Relaxed);
        let (delivered, pods) = {
            let r = receipts.lock().unwrap_or_else(|p| p.into_inner());
            (r.counts.len() as u64, r.per_pod.clone())
        };
        let (kafka, g, t, parts) = (
            cli.kafka.clone(),
            group.clone(),
            topic.clone(),
            cli.partitions,
        );
        let lag = tokio::task::spawn_blocking(move || lag(&kafka, &g, &t, parts))
            .await?
            .unwrap_or(-1);
        samples.push(Sample {
            t: started.elapsed().as_secs_f64(),
            produced: p,
            delivered,
            lag: (lag >= 0).then_some(lag),
        });
        let per_pod = pods
            .iter()
            .map(|(pod, n)| format!("{}={n}", pod.rsplit('-').next().unwrap_or(pod)))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "[{:>5.1}s] produced {p:>6}  delivered {delivered:>6}  lag {lag:>5}  pods: {per_pod}{}",
            started.elapsed().as_secs_f64(),
            match (restarted, rollout_done) {
                (Some(_), None) => format!("  | rolling restart: {}", rollout(&cli)),
                _ => String::new(),
            }
        );
        if restarted.is_none() && p >= cli.orders / 2 {
            let generation = deployment_state(&cli).0;
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)?
                .as_secs()
                .to_string();
            let patch = json!({"spec": {"template": {"metadata": {"annotations": {"demo.sluice.dev/restartedAt": at}}}}});
            kubectl(
                &cli,
                &[
                    "patch",
                    "ec",
                    EC,
                    "-n",
                    &cli.namespace,
                    "--type",
                    "merge",
                    "-p",
                    &patch.to_string(),
                ],
                None,
            )?;
            println!(
                "== halfway: rolling restart (kubectl patch ec/{EC}: new pod-template annotation); the stream keeps flowing"
            );
            restarted = Some((Instant::now(), generation));
        }
        if let (Some((at, generation)), None) = (restarted, rollout_done) {
            let (now, done) = deployment_state(&cli);
            if now > generation && done {
                rollout_done = Some(at.elapsed());
                println!(
                    "== rolling restart finished in {:.1}s",
                    at.elapsed().as_secs_f64()
                );
            }
        }
        if producing.is_finished() && delivered >= cli.orders && lag == 0 && rollout_done.is_some()
        {
            break;
        }
        if Instant::now() > deadline {
            println!("== giving up waiting: not every order was processed in time");
            break;
        }
    }
    producing.await??;
    let elapsed = started.elapsed();
    let r = receipts.lock().unwrap_or_else(|p| p.into_inner());
    let delivered = (0..cli.orders).filter(|s| r.counts.contains_key(s)).count() as u64;
    let duplicates: u64 = r
        .counts
        .values()
        .map(|&c| u64::from(c.saturating_sub(1)))
        .sum();
    let lost = cli.orders - delivered;
    println!("\n== Summary");
    println!("   orders published      {}", cli.orders);
    println!("   delivered             {delivered}");
    println!("   duplicates            {duplicates}");
    println!("   lost                  {lost}");
    println!("   elapsed               {:.1}s", elapsed.as_secs_f64());
    if let Some(d) = rollout_done {
        println!(
            "   rolling restart       {:.1}s, {} pods replaced mid-stream",
            d.as_secs_f64(),
            cli.replicas
        );
    }
    println!(
        "   orders per pod        {}",
        r.per_pod
            .iter()
            .map(|(p, n)| format!("{p}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let run = DemoRun {
        samples,
        restart: restarted.map(|(at, _)| {
            let from = at.duration_since(started).as_secs_f64();
            (from, rollout_done.map(|d| from + d.as_secs_f64()))
        }),
        per_pod: r.per_pod.iter().map(|(p, n)| (p.clone(), *n)).collect(),
        orders: cli.orders,
        delivered,
        duplicates,
        lost,
        elapsed: elapsed.as_secs_f64(),
    };
    let path = report_path(&cli);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, render_html(&run)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("   report                {}", path.display());
    println!("\n== Look around (set -a; source ~/.cache/sluice/state/env; set +a):");
    println!(
        "   kubectl get ec -n {}                      # READY, REPLICAS, LAG",
        cli.namespace
    );
    println!(
        "   kubectl get ec {EC} -n {} -o yaml         # derived timings in status.effective",
        cli.namespace
    );
    println!("   kubectl get pods,deploy,pdb,cm -n {}", cli.namespace);
    println!(
        "   kubectl logs -n {} deploy/{EC} -c sluice  # the sidecar's JSON logs",
        cli.namespace
    );
    println!(
        "   kubectl get events -n {} --sort-by=.lastTimestamp",
        cli.namespace
    );
    println!("   kubectl -n sluice-system get pods,lease   # the operator, 2 replicas, one leader");
    if lost > 0 || r.malformed > 0 {
        bail!(
            "{lost} orders were not processed ({} malformed receipts)",
            r.malformed
        );
    }
    Ok(())
}
