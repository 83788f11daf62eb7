//! `testbed-probe`: the tiny image the test-bed smoke tests run on the node.
//!
//! It proves what a fake cluster could not: that the kubelet really starts it, that its
//! stdout reaches `kubectl logs`, that a pod reaches the broker's pod listener, and that
//! deleting a pod runs the `preStop` hook before SIGTERM. Each observation is printed and,
//! when `PROBE_REPORT` names a host `IP:PORT`, sent there as one line
//! `<event> <pod> <unix-millis> [detail]` so the test on the host can check the order.
//!
//! Environment: `POD_NAME` (downward API), `PROBE_REPORT`, `PROBE_KAFKA` (bootstrap),
//! `PROBE_LISTEN` (default `0.0.0.0:8080`). HTTP: `GET /prestop` reports `prestop`;
//! any other path answers 200 (readiness).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn report(event: &str, detail: &str) {
    let pod = std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into());
    let line = format!("{event} {pod} {} {detail}", now_millis());
    println!("{line}");
    if let Ok(target) = std::env::var("PROBE_REPORT") {
        for _ in 0..20 {
            if let Ok(mut stream) = TcpStream::connect(&target).await
                && stream
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_ok()
            {
                let _ = stream.shutdown().await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("could not report {event} to {target}");
    }
}

/// Fetches the cluster metadata through `bootstrap` and returns the advertised brokers.
fn kafka_brokers(bootstrap: &str) -> Result<String, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(metadata
        .brokers()
        .iter()
        .map(|b| format!("{}:{}", b.host(), b.port()))
        .collect::<Vec<_>>()
        .join(","))
}

async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            if request.starts_with("GET /prestop ") {
                report("prestop", "").await;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                .await;
        });
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let listen = std::env::var("PROBE_LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testbed-probe: cannot listen on {listen}: {e}");
            std::process::exit(2);
        }
    };
    report("started", &listen).await;
    if let Ok(bootstrap) = std::env::var("PROBE_KAFKA") {
        let result = tokio::task::spawn_blocking(move || kafka_brokers(&bootstrap)).await;
        match result {
            Ok(Ok(brokers)) => report("kafka-ok", &brokers).await,
            Ok(Err(e)) => report("kafka-error", &e.replace(' ', "_")).await,
            Err(e) => report("kafka-error", &e.to_string().replace(' ', "_")).await,
        }
    }
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("testbed-probe: cannot handle SIGTERM: {e}");
            std::process::exit(2);
        }
    };
    tokio::select! {
        _ = serve(listener) => {}
        _ = term.recv() => {
            report("sigterm", "").await;
        }
    }
}
