//! `inventory`: the demo's inventory service, run behind the Sluice sidecar.
//!
//! Each `OrderCreated` event the sidecar POSTs reserves stock for the order's SKU. Before
//! answering 200 the service sends a receipt line to the order service's receipt listener
//! and waits for its `ok`, so a receipt is never lost with a pod. An event that is not an
//! `OrderCreated` JSON document is answered 400: the sidecar dead-letters it.
//!
//! With batch delivery (`spec.delivery.batch`) the sidecar POSTs a CloudEvents JSON batch
//! (`application/cloudevents-batch+json`); the service handles each order as above and
//! answers with the records that are not simply done: `dead-letter` for an event that is
//! not an `OrderCreated`, `retry` for one whose receipt was not acknowledged.
//!
//! Environment: `POD_NAME`, `INVENTORY_RECEIPTS` (`IP:PORT`, required), `INVENTORY_LISTEN`
//! (default `0.0.0.0:8080`), `INVENTORY_WORK_MS` (simulated work per order, default 2).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sluice_examples::{OrderCreated, Receipt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

const STARTING_STOCK: i64 = 1_000;
const ACK_TIMEOUT: Duration = Duration::from_secs(4);

type Line = (String, oneshot::Sender<()>);

/// Keeps one connection to the receipt listener; lines are acknowledged in order.
async fn receipt_link(addr: String, mut rx: mpsc::Receiver<Line>) {
    loop {
        let stream = loop {
            match TcpStream::connect(&addr).await {
                Ok(s) => break s,
                Err(e) => {
                    eprintln!("inventory: cannot reach the receipt listener {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let waiting: Arc<Mutex<VecDeque<oneshot::Sender<()>>>> = Arc::default();
        let acks = waiting.clone();
        let mut reader = tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let next = acks.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                match (line.trim(), next) {
                    ("ok", Some(w)) => {
                        let _ = w.send(());
                    }
                    _ => return,
                }
            }
        });
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some((line, waiter)) = msg else { return };
                    waiting.lock().unwrap_or_else(|p| p.into_inner()).push_back(waiter);
                    if write.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                }
                _ = &mut reader => break,
            }
        }
        reader.abort();
        waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

struct Inventory {
    pod: String,
    work: Duration,
    stock: Mutex<HashMap<String, i64>>,
    receipts: mpsc::Sender<Line>,
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// What became of one order.
enum Handled {
    Reserved,
    NotAnOrder,
    ReceiptNotRecorded,
}

/// Reserves stock for one order and records its receipt with the order service.
async fn reserve(inv: &Inventory, order: OrderCreated, partition: i32, offset: i64) -> Handled {
    if order.kind != "OrderCreated" {
        return Handled::NotAnOrder;
    }
    tokio::time::sleep(inv.work).await;
    let remaining = {
        let mut stock = inv.stock.lock().unwrap_or_else(|p| p.into_inner());
        let level = stock.entry(order.sku.clone()).or_insert(STARTING_STOCK);
        *level -= i64::from(order.quantity);
        *level
    };
    let receipt = Receipt {
        pod: inv.pod.clone(),
        partition,
        offset,
        seq: order.seq,
        sku: order.sku,
        quantity: order.quantity,
        remaining,
    };
    let (tx, rx) = oneshot::channel();
    if inv.receipts.send((receipt.to_line(), tx)).await.is_err()
        || !matches!(tokio::time::timeout(ACK_TIMEOUT, rx).await, Ok(Ok(())))
    {
        // Not recorded: let the sidecar retry (stock is re-reserved on retry; a real
        // service would make the reservation idempotent by order id).
        return Handled::ReceiptNotRecorded;
    }
    Handled::Reserved
}

/// A batch: each event's order in turn (the batch is one partition in offset order), and an
/// answer naming the events that are not simply done.
async fn handle_batch(inv: &Inventory, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(events) = serde_json::from_slice::<Vec<serde_json::Value>>(body) else {
        return reply(StatusCode::BAD_REQUEST, "not a CloudEvents batch\n");
    };
    let mut named = Vec::new();
    for event in events {
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let coordinate = |name: &str| {
            event[name]
                .as_str()
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(-1)
        };
        let (partition, offset) = (
            coordinate("kafkapartition") as i32,
            coordinate("kafkaoffset"),
        );
        let outcome = match serde_json::from_value::<OrderCreated>(event["data"].clone()) {
            Err(_) => Handled::NotAnOrder,
            Ok(order) => reserve(inv, order, partition, offset).await,
        };
        match outcome {
            Handled::Reserved => {}
            Handled::NotAnOrder => named.push(serde_json::json!(
                {"id": id, "outcome": "dead-letter", "detail": "not an OrderCreated event"}
            )),
            Handled::ReceiptNotRecorded => {
                named.push(serde_json::json!({"id": id, "outcome": "retry"}));
            }
        }
    }
    if named.is_empty() {
        return reply(StatusCode::OK, "");
    }
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::json!({ "records": named }).to_string(),
    )));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(
    inv: Arc<Inventory>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::OK, "ok\n"));
    }
    let batch = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes()
                .starts_with(b"application/cloudevents-batch+json")
        });
    if batch {
        let body = req.into_body().collect().await?.to_bytes();
        return Ok(handle_batch(&inv, &body).await);
    }
    let number = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let (partition, offset) = (number("kafka-partition") as i32, number("kafka-offset"));
    let body = req.into_body().collect().await?.to_bytes();
    let order: OrderCreated = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(_) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "not an OrderCreated event\n",
            ));
        }
    };
    Ok(match reserve(&inv, order, partition, offset).await {
        Handled::Reserved => reply(StatusCode::OK, "reserved\n"),
        Handled::NotAnOrder => reply(StatusCode::BAD_REQUEST, "not an OrderCreated event\n"),
        Handled::ReceiptNotRecorded => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "receipt not recorded\n")
        }
    })
}

#[tokio::main]
async fn main() {
    let listen = std::env::var("INVENTORY_LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let Ok(receipts_addr) = std::env::var("INVENTORY_RECEIPTS") else {
        eprintln!(
            "inventory: INVENTORY_RECEIPTS (the order service's receipt listener, IP:PORT) is not set"
        );
        std::process::exit(2);
    };
    let work_ms = std::env::var("INVENTORY_WORK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(receipt_link(receipts_addr.clone(), rx));
    let inv = Arc::new(Inventory {
        pod: std::env::var("POD_NAME").unwrap_or_else(|_| "inventory".into()),
        work: Duration::from_millis(work_ms),
        stock: Mutex::default(),
        receipts: tx,
    });
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("inventory: cannot listen on {listen}: {e}");
            std::process::exit(2);
        }
    };
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("inventory: cannot handle SIGTERM: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "inventory {} listening on {listen}; receipts to {receipts_addr}",
        inv.pod
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let inv = inv.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(inv.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = term.recv() => {
                println!("inventory {}: SIGTERM after the sidecar drained; exiting", inv.pod);
                return;
            }
        }
    }
}
