//! The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, `/drain`.
//!
//! It listens on the pod network because the kubelet calls `/drain` (a preStop httpGet hook)
//! from the node against the pod IP; `/drain` therefore refuses any request without the
//! per-consumer token in `X-Sluice-Drain-Token`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sluice_config::{DRAIN_TOKEN_HEADER, NOT_READY_HEADER};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::sidecar::{DrainControl, Readiness};
#[cfg(test)]
use crate::{kafka::GroupHealth, sidecar::AppGate};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub drain: DrainControl,
    /// The drain token; `None` disables `/drain`.
    pub drain_token: Option<Arc<str>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/drain", get(drain))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let _ = s.readiness.export(&s.metrics);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// `200 ready`, or `503` with the reason for people in the body and for programs (the
/// operator, which shows it in the EventConsumer's status) in the [`NOT_READY_HEADER`]
/// header: one of the `sluice_not_ready{reason}` labels.
async fn readyz(State(s): State<AdminState>) -> Response {
    match s.readiness.export(&s.metrics) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err((reason, text)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(NOT_READY_HEADER, reason)],
            format!("{text}\n"),
        )
            .into_response(),
    }
}

/// Compares without an early exit, so the token cannot be guessed byte by byte from timing.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn drain(State(s): State<AdminState>, headers: HeaderMap) -> (StatusCode, String) {
    let Some(expected) = &s.drain_token else {
        return (
            StatusCode::FORBIDDEN,
            "drain is disabled: no drain.tokenFile is configured\n".into(),
        );
    };
    let Some(given) = headers.get(DRAIN_TOKEN_HEADER) else {
        warn!("/drain refused: no drain token");
        return (
            StatusCode::UNAUTHORIZED,
            format!("missing {DRAIN_TOKEN_HEADER} header\n"),
        );
    };
    if !token_matches(given.as_bytes(), expected.as_bytes()) {
        warn!("/drain refused: wrong drain token");
        return (StatusCode::FORBIDDEN, "wrong drain token\n".into());
    }
    s.drain.called();
    if !s.drain.is_requested() {
        info!("drain requested over HTTP");
        s.metrics
            .drains
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: "prestop_hook",
            })
            .inc();
    }
    s.drain.request();
    let summary = s.drain.wait_done().await;
    (StatusCode::OK, format!("{summary}\n"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }

    async fn call(state: AdminState, path: &str, token: Option<&str>) -> (StatusCode, String) {
        let (status, _, body) = call_with_head(state, path, token).await;
        (status, body)
    }

    /// The status, the response head (lower-cased) and the body.
    async fn call_with_head(
        state: AdminState,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, String, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let token = token
            .map(|t| format!("{DRAIN_TOKEN_HEADER}: {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{token}Connection: close\r\n\r\n");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        stream.read_to_string(&mut resp).await.unwrap();
        server.abort();
        let status: u16 = resp[9..12].parse().unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        (
            StatusCode::from_u16(status).unwrap(),
            head.to_ascii_lowercase(),
            body.to_owned(),
        )
    }

    fn state(token: Option<&str>) -> AdminState {
        let config = sluice_config::SidecarConfig::from_json(
            r#"{"kafka": {"bootstrapServers": "127.0.0.1:9", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://127.0.0.1:9/"}}"#,
        )
        .unwrap();
        let drain = DrainControl::new();
        AdminState {
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness {
                app: AppGate::new(&config),
                group: Arc::new(GroupHealth::default()),
                drain: drain.clone(),
            }),
            drain,
            drain_token: token.map(Arc::from),
        }
    }

    #[tokio::test]
    async fn drain_requires_the_token_and_is_idempotent() {
        let s = state(Some("t0ken"));
        assert_eq!(
            call(s.clone(), "/drain", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(s.clone(), "/drain", Some("wrong")).await.0,
            StatusCode::FORBIDDEN
        );
        assert!(
            !s.drain.is_requested(),
            "refused requests must not start a drain"
        );
        assert!(
            !s.drain.wait_called(Duration::from_millis(20)).await,
            "refused requests are not the preStop hook's call"
        );
        let pipeline = s.drain.clone();
        tokio::spawn(async move {
            pipeline.token().cancelled().await;
            pipeline.finish("drained in 1ms".into());
        });
        let (status, body) = call(s.clone(), "/drain", Some("t0ken")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("drained in 1ms"), "{body}");
        assert!(
            s.drain.wait_called(Duration::ZERO).await,
            "an accepted call is noted for a sidecar waiting for its preStop hook"
        );
        let (status, body) = call(s.clone(), "/drain", Some("t0ken")).await;
        assert_eq!(
            (status, body.trim()),
            (StatusCode::OK, "drained in 1ms"),
            "a second drain answers at once"
        );
        let disabled = state(None);
        assert_eq!(
            call(disabled.clone(), "/drain", Some("x")).await.0,
            StatusCode::FORBIDDEN
        );
        assert!(!disabled.drain.is_requested());
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let s = state(None);
        assert_eq!(
            call(s.clone(), "/healthz", None).await,
            (StatusCode::OK, "ok\n".into())
        );
        let (status, body) = call(s.clone(), "/readyz", None).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the application\n"
            )
        );
        let (_, body) = call(s.clone(), "/metrics", None).await;
        assert!(body.contains("sluice_ready 0"), "{body}");
        assert!(
            body.contains("sluice_not_ready{reason=\"app_unreachable\"} 1"),
            "{body}"
        );
        s.readiness.app.set_up(true);
        assert_eq!(
            call(s.clone(), "/readyz", None).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "joining the consumer group\n".into()
            )
        );
        let (_, head, _) = call_with_head(s.clone(), "/readyz", None).await;
        let header = format!("{}: joining\r\n", NOT_READY_HEADER.to_ascii_lowercase());
        assert!(head.contains(&header), "{head}");
        s.readiness.group.set_joined(true);
        let (status, head, _) = call_with_head(s.clone(), "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            !head.contains(&NOT_READY_HEADER.to_ascii_lowercase()),
            "a ready sidecar names no reason: {head}"
        );
        let (_, body) = call(s.clone(), "/metrics", None).await;
        assert!(body.contains("sluice_ready 1"), "{body}");
        assert!(
            body.contains("sluice_not_ready{reason=\"joining\"} 0"),
            "{body}"
        );
        s.readiness
            .group
            .set_problem(Some(crate::kafka::KafkaProblem {
                reason: "kafka_auth",
                detail: "Kafka refused the credentials or permissions: SASL authentication failed"
                    .into(),
            }));
        let (status, head, body) = call_with_head(s.clone(), "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("SASL authentication failed"), "{body}");
        let header = format!("{}: kafka_auth\r\n", NOT_READY_HEADER.to_ascii_lowercase());
        assert!(head.contains(&header), "{head}");
        let (_, body) = call(s.clone(), "/metrics", None).await;
        assert!(
            body.contains("sluice_not_ready{reason=\"kafka_auth\"} 1"),
            "{body}"
        );
        s.readiness.group.set_problem(None);
        s.readiness.app.set_up(false);
        assert_eq!(
            call(s.clone(), "/readyz", None).await.1,
            "waiting for the application\n",
            "an application outage turns the sidecar not ready"
        );
        s.readiness.app.set_up(true);
        s.drain.request();
        assert_eq!(
            call(s.clone(), "/readyz", None).await,
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        );
        let (status, body) = call(s.clone(), "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("sluice_records_consumed_total"), "{body}");
    }
}
