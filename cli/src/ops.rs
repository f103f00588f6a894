//! The operations endpoint every role serves on `telemetry.metrics_listen` (a port of its own, so that a
//! NetworkPolicy and a ServiceMonitor can target it without exposing ingest or restore):
//!
//! - `GET /metrics`: Prometheus text format (names in `chatvault_core::metrics`).
//! - `GET /healthz`: liveness, 200 while the process runs.
//! - `GET /readyz`: readiness, 200 once the role has started and until shutdown begins, 503 otherwise. The
//!   gateway and restorer also answer gRPC health, which turns NOT_SERVING at the same moment. A role can add
//!   its own condition ([`OpsState::set_health_check`]): the archiver answers 503 while a partition it owns is
//!   halted or stalled, with the reason in the body.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use chatvault_core::shutdown::Shutdown;
use chatvault_core::telemetry::Telemetry;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A role's own readiness condition: `Some(reason)` when it is not ready.
pub type HealthCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

pub struct OpsState {
    telemetry: Arc<Telemetry>,
    ready: AtomicBool,
    health_check: std::sync::OnceLock<HealthCheck>,
}

impl std::fmt::Debug for OpsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsState")
            .field("ready", &self.ready)
            .field("health_check", &self.health_check.get().is_some())
            .finish_non_exhaustive()
    }
}

impl OpsState {
    pub fn new(telemetry: Arc<Telemetry>) -> Arc<OpsState> {
        Arc::new(OpsState {
            telemetry,
            ready: AtomicBool::new(false),
            health_check: std::sync::OnceLock::new(),
        })
    }

    /// Adds the role's own readiness condition (once).
    pub fn set_health_check(&self, check: HealthCheck) {
        let _ = self.health_check.set(check);
    }

    fn unready_reason(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("not ready (starting or shutting down)".to_string());
        }
        self.health_check.get().and_then(|check| check())
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, content_type: &'static str, body: String| {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            response
        };
        let plain = "text/plain; charset=utf-8";
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                plain,
                "use GET\n".to_string(),
            );
        }
        match request.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.telemetry.prometheus_text(),
            ),
            "/healthz" => text(StatusCode::OK, plain, "ok\n".to_string()),
            "/readyz" => match self.unready_reason() {
                None => text(StatusCode::OK, plain, "ready\n".to_string()),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("{reason}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                plain,
                "not found; this port serves /metrics, /healthz and /readyz\n".to_string(),
            ),
        }
    }
}

/// Serves the operations endpoint until `shutdown`. Connections are short scrapes and probes, so open ones
/// are simply dropped at shutdown.
pub async fn serve(listener: TcpListener, state: Arc<OpsState>, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    while let Some((stream, _peer)) =
        chatvault_core::shutdown::accept_until(&listener, &mut stop, "operations endpoint").await
    {
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = state.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
