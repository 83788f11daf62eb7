//! Reads the `/readyz` of sidecars that stay not ready, for [`super::summarize`]: at most
//! [`IN_FLIGHT`] requests at once, each bounded by [`TIMEOUT`], the answers kept per pod for
//! [`KEEP_FOR`]. A read waits at most [`TIMEOUT`] for its turn, then is left for the next
//! look (so a reconcile is held at most twice [`TIMEOUT`], even when many sidecars are
//! silent at once). Only pods named in [`super::Summary::probe`] are read (sidecars running but
//! not ready for [`super::NOT_READY_AFTER`]), so healthy pods cost nothing here, and no
//! request goes to the API server: the pod IP comes from the pod cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_config::NOT_READY_HEADER;
use tokio::sync::Semaphore;

use super::{Probes, Readyz};
use sluice_config::ADMIN_PORT;

/// Requests to sidecars at the same time, across all EventConsumers.
pub const IN_FLIGHT: usize = 4;
/// Longest wait for one answer (connect, head and body).
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How long an answer is used before the sidecar is asked again; answers older than this
/// are dropped (so are those of pods that are gone).
pub const KEEP_FOR: Duration = Duration::from_secs(60);
/// Largest body read.
const BODY_MAX: usize = 4096;

/// (namespace, pod name).
type Key = (String, String);

/// A pod to read: its name and IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub ip: String,
}

/// The reader of sidecars' `/readyz`, shared by the reconciles.
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
    permits: Semaphore,
    /// Per pod: when read, from which IP, and the answer.
    answers: Mutex<HashMap<Key, (Instant, String, Readyz)>>,
    port: u16,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new(ADMIN_PORT)
    }
}

impl Prober {
    /// Reads the sidecars' admin endpoint on `port` (the sidecar's admin port outside tests).
    pub fn new(port: u16) -> Prober {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        connector.set_nodelay(true);
        Prober {
            client: Client::builder(TokioExecutor::new())
                // One request per pod per KEEP_FOR: nothing to reuse.
                .pool_max_idle_per_host(0)
                .build(connector),
            permits: Semaphore::new(IN_FLIGHT),
            answers: Mutex::new(HashMap::new()),
            port,
        }
    }

    /// The answers of `targets` (pods of `namespace`): kept ones younger than [`KEEP_FOR`]
    /// from the same IP, the others read now (at most [`IN_FLIGHT`] at once overall). A pod
    /// whose read found no turn within [`TIMEOUT`] has no answer (and none is kept).
    pub async fn read(&self, namespace: &str, targets: &[Target]) -> Probes {
        let now = Instant::now();
        let mut probes = Probes::new();
        let mut missing = Vec::new();
        {
            let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            answers.retain(|_, (at, _, _)| now.duration_since(*at) < KEEP_FOR);
            for t in targets {
                match answers.get(&(namespace.to_owned(), t.name.clone())) {
                    Some((_, ip, answer)) if *ip == t.ip => {
                        probes.insert(t.name.clone(), answer.clone());
                    }
                    _ => missing.push(t.clone()),
                }
            }
        }
        let read = futures::future::join_all(missing.into_iter().map(|t| async move {
            let answer = self.read_one(&t.ip).await;
            (t, answer)
        }))
        .await;
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        for (t, answer) in read {
            let Some(answer) = answer else { continue };
            answers.insert(
                (namespace.to_owned(), t.name.clone()),
                (Instant::now(), t.ip, answer.clone()),
            );
            probes.insert(t.name, answer);
        }
        probes
    }

    /// How many pods' answers are kept (for tests).
    pub fn kept(&self) -> usize {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `None` when no turn came within [`TIMEOUT`].
    async fn read_one(&self, ip: &str) -> Option<Readyz> {
        let _permit = tokio::time::timeout(TIMEOUT, self.permits.acquire())
            .await
            .ok()?
            .ok()?;
        Some(self.read_now(ip).await)
    }

    async fn read_now(&self, ip: &str) -> Readyz {
        // An IPv6 pod IP goes in brackets.
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let uri = match format!("http://{host}:{}/readyz", self.port).parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => return Readyz::Unread(format!("bad pod IP {ip:?}: {e}")),
        };
        match tokio::time::timeout(TIMEOUT, self.get(uri)).await {
            Ok(answer) => answer,
            Err(_) => Readyz::Unread(format!(
                "no answer from {host}:{} within {TIMEOUT:?}",
                self.port
            )),
        }
    }

    async fn get(&self, uri: http::Uri) -> Readyz {
        let target = format!(
            "{}:{}",
            uri.host().unwrap_or_default(),
            uri.port_u16().unwrap_or_default()
        );
        let response = match self.client.get(uri).await {
            Ok(r) => r,
            Err(e) => {
                // The connector's error says what failed (refused, unreachable).
                use std::error::Error as _;
                let cause = e.source().map(|s| format!(": {s}")).unwrap_or_default();
                return Readyz::Unread(format!("GET {target}/readyz failed: {e}{cause}"));
            }
        };
        let status = response.status();
        let reason = response
            .headers()
            .get(NOT_READY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = match Limited::new(response.into_body(), BODY_MAX).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
            Err(e) => return Readyz::Unread(format!("reading the body of {target}/readyz: {e}")),
        };
        match status.as_u16() {
            200 => Readyz::Ready,
            503 => Readyz::NotReady {
                reason,
                detail: body,
            },
            other => Readyz::Unread(format!("{target}/readyz answered {other}: {body}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A real HTTP listener on 127.0.0.1 answering every request with `response`, counting
    /// the connections and holding `delay` before answering.
    async fn sidecar(response: &'static str, delay: Duration) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (port, count)
    }

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn target(name: &str) -> Target {
        Target {
            name: name.into(),
            ip: "127.0.0.1".into(),
        }
    }

    #[tokio::test]
    async fn the_reason_header_and_body_are_read_and_kept() {
        let (port, count) = sidecar(
            "HTTP/1.1 503 Service Unavailable\r\nSluice-Not-Ready: kafka_auth\r\ncontent-length: 33\r\nconnection: close\r\n\r\nKafka refused the credentials: x\n",
            Duration::ZERO,
        )
        .await;
        let prober = Prober::new(port);
        let got = prober.read("ns", &[target("a")]).await;
        assert_eq!(
            got.get("a"),
            Some(&Readyz::NotReady {
                reason: "kafka_auth".into(),
                detail: "Kafka refused the credentials: x".into()
            })
        );
        // Kept: a second read asks nobody.
        let again = prober.read("ns", &[target("a")]).await;
        assert_eq!(again, got);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Another namespace's pod of the same name, or the pod on another IP, is read anew.
        prober.read("other", &[target("a")]).await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(prober.kept(), 2);
    }

    #[tokio::test]
    async fn ready_other_statuses_and_sidecars_without_the_header() {
        let (port, _) = sidecar(
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nready\n",
            Duration::ZERO,
        )
        .await;
        let got = Prober::new(port).read("ns", &[target("a")]).await;
        assert_eq!(got.get("a"), Some(&Readyz::Ready));
        let (port, _) = sidecar(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\nconnection: close\r\n\r\njoining\n",
            Duration::ZERO,
        )
        .await;
        let got = Prober::new(port).read("ns", &[target("a")]).await;
        assert_eq!(
            got.get("a"),
            Some(&Readyz::NotReady {
                reason: String::new(),
                detail: "joining".into()
            })
        );
        let (port, _) = sidecar(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope",
            Duration::ZERO,
        )
        .await;
        let got = Prober::new(port).read("ns", &[target("a")]).await;
        match got.get("a") {
            Some(Readyz::Unread(e)) => assert!(e.contains("answered 404"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn refused_connections_and_silent_sidecars_are_unread_within_the_timeout() {
        // A port nothing listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let got = Prober::new(port).read("ns", &[target("a")]).await;
        match got.get("a") {
            Some(Readyz::Unread(e)) => assert!(e.contains("failed"), "{e}"),
            other => panic!("{other:?}"),
        }
        let (port, _) = sidecar("", Duration::from_secs(30)).await;
        let started = Instant::now();
        let got = Prober::new(port).read("ns", &[target("a")]).await;
        let took = started.elapsed();
        match got.get("a") {
            Some(Readyz::Unread(e)) => assert!(e.contains("within 2s"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(
            took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_read_without_a_turn_within_the_timeout_is_left_for_later() {
        let (port, count) = sidecar(
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nready\n",
            Duration::ZERO,
        )
        .await;
        let prober = Prober::new(port);
        // Four reads elsewhere hold every turn.
        let held = prober.permits.acquire_many(IN_FLIGHT as u32).await.unwrap();
        let started = Instant::now();
        let got = prober.read("ns", &[target("a")]).await;
        let took = started.elapsed();
        assert_eq!(got, Probes::new());
        assert!(
            took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!((count.load(Ordering::SeqCst), prober.kept()), (0, 0));
        drop(held);
        let got = prober.read("ns", &[target("a")]).await;
        assert_eq!(got.get("a"), Some(&Readyz::Ready));
    }

    #[tokio::test]
    async fn at_most_four_at_once() {
        // Eight silent sidecars' worth of pods on one listener that answers after 500 ms:
        // with four at once, the reads take two rounds.
        let (port, count) = sidecar(
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nready\n",
            Duration::from_millis(500),
        )
        .await;
        let prober = Prober::new(port);
        let targets: Vec<Target> = (0..8).map(|i| target(&format!("p{i}"))).collect();
        let started = Instant::now();
        let got = prober.read("ns", &targets).await;
        let took = started.elapsed();
        assert_eq!(got.len(), 8);
        assert!(got.values().all(|a| *a == Readyz::Ready), "{got:?}");
        assert_eq!(count.load(Ordering::SeqCst), 8);
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
            "8 reads of 500 ms, 4 at once, took {took:?}"
        );
    }
}
