//! `sluice-testapp`: the application the end-to-end tests run behind the Sluice sidecar.
//!
//! It records every record it receives somewhere that outlives its pod: for each POST it
//! sends one line to a collector on the host and answers the sidecar only after the
//! collector acknowledged that line. A record the sidecar saw answered 2xx is therefore
//! always counted, even when the pod is killed right after; a record the collector counted
//! but whose 2xx never reached the sidecar is redelivered and counted again (a duplicate).
//!
//! Line protocol (one TCP connection, lines in order): the app sends
//! `rec <pod> <partition> <offset> <attempt> <value>` for a record it accepts and
//! `poison <pod> <partition> <offset> <attempt> <value>` for one it refuses; the collector
//! answers each line with `ok`.
//!
//! Records whose value starts with `TESTAPP_POISON_PREFIX` (default `poison`) are answered
//! `422 Unprocessable Entity`: the sidecar dead-letters them at once.
//!
//! Environment: `POD_NAME` (downward API), `TESTAPP_COLLECTOR` (`IP:PORT`, required),
//! `TESTAPP_LISTEN` (default `0.0.0.0:8080`), `TESTAPP_POISON_PREFIX`.
//! HTTP: `POST <any path>` delivers a record; `GET <any path>` answers 200 (readiness).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

/// How long a delivery waits for the collector's acknowledgement before answering 503
/// (the sidecar then retries the record).
const ACK_TIMEOUT: Duration = Duration::from_secs(4);

type Pending = Arc<Mutex<VecDeque<oneshot::Sender<()>>>>;

/// The link to the collector: lines go in through `tx`; each is acknowledged through the
/// oneshot that travels with it.
#[derive(Clone)]
struct Collector {
    tx: mpsc::Sender<(String, oneshot::Sender<()>)>,
}

impl Collector {
    fn start(addr: String) -> Collector {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(link(addr, rx));
        Collector { tx }
    }

    /// Sends `line` and waits for its acknowledgement; false when it did not come in time.
    async fn report(&self, line: String) -> bool {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send((line, ack_tx)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(ACK_TIMEOUT, ack_rx).await, Ok(Ok(())))
    }
}

/// Owns the collector connection: reconnects when it breaks, and drops the waiters of
/// lines whose acknowledgement can no longer come (their deliveries answer 503).
async fn link(addr: String, mut rx: mpsc::Receiver<(String, oneshot::Sender<()>)>) {
    loop {
        let stream = loop {
            match TcpStream::connect(&addr).await {
                Ok(s) => break s,
                Err(e) => {
                    eprintln!("sluice-testapp: cannot reach the collector at {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let pending: Pending = Arc::default();
        let acks = pending.clone();
        let mut reader = tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() != "ok" {
                    eprintln!("sluice-testapp: unexpected collector answer {line:?}");
                    return;
                }
                let Some(waiter) = acks.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                else {
                    eprintln!("sluice-testapp: an acknowledgement for no line");
                    return;
                };
                let _ = waiter.send(());
            }
        });
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some((line, waiter)) = msg else { return };
                    pending.lock().unwrap_or_else(|p| p.into_inner()).push_back(waiter);
                    if let Err(e) = write.write_all(line.as_bytes()).await {
                        eprintln!("sluice-testapp: writing to the collector: {e}");
                        break;
                    }
                }
                _ = &mut reader => {
                    eprintln!("sluice-testapp: the collector closed the connection");
                    break;
                }
            }
        }
        reader.abort();
        pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

struct App {
    pod: String,
    poison_prefix: String,
    collector: Collector,
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::OK, "ok\n"));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (partition, offset, attempt) = (
        header("kafka-partition"),
        header("kafka-offset"),
        header("sluice-attempt"),
    );
    let body = req.into_body().collect().await?.to_bytes();
    let value = String::from_utf8_lossy(&body).replace(['\n', '\r'], " ");
    let poison = !app.poison_prefix.is_empty() && value.starts_with(&app.poison_prefix);
    let kind = if poison { "poison" } else { "rec" };
    let line = format!(
        "{kind} {} {partition} {offset} {attempt} {value}\n",
        app.pod
    );
    if !app.collector.report(line).await {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "collector unavailable\n",
        ));
    }
    Ok(if poison {
        reply(StatusCode::UNPROCESSABLE_ENTITY, "poison record refused\n")
    } else {
        reply(StatusCode::OK, "ok\n")
    })
}

#[tokio::main]
async fn main() {
    let listen = std::env::var("TESTAPP_LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let Ok(collector) = std::env::var("TESTAPP_COLLECTOR") else {
        eprintln!("sluice-testapp: TESTAPP_COLLECTOR (the collector's IP:PORT) is not set");
        std::process::exit(2);
    };
    let app = Arc::new(App {
        pod: std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into()),
        poison_prefix: std::env::var("TESTAPP_POISON_PREFIX").unwrap_or_else(|_| "poison".into()),
        collector: Collector::start(collector.clone()),
    });
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice-testapp: cannot listen on {listen}: {e}");
            std::process::exit(2);
        }
    };
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice-testapp: cannot handle SIGTERM: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "sluice-testapp {} listening on {listen}, reporting to {collector}",
        app.pod
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(app.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = term.recv() => {
                println!("sluice-testapp {}: SIGTERM, exiting", app.pod);
                return;
            }
        }
    }
}
