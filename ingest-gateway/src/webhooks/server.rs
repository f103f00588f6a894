//! The webhook HTTP server: routing, body limits, and the produce-then-answer rule.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatvault_core::error::{ErrorCode, Result};
use chatvault_core::event::{EventLimits, validate_and_complete};
use chatvault_core::shutdown::Shutdown;
use chatvault_core::telemetry::continue_remote_trace;
use chatvault_proto::v1::Source;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::{Integration, Rejection, WebhookRequest};
use crate::producer::EventProducer;

/// Seconds a platform is asked to wait before retrying when Kafka cannot take events.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Routes `POST /webhooks/<name>` to its integration.
pub struct WebhookService {
    integrations: HashMap<String, Arc<Integration>>,
    producer: EventProducer,
    limits: EventLimits,
    max_body_bytes: usize,
    replay_window_secs: i64,
}

impl WebhookService {
    pub fn new(
        integrations: Vec<Integration>,
        producer: EventProducer,
        limits: EventLimits,
        max_body_bytes: usize,
        replay_window_secs: u64,
    ) -> WebhookService {
        WebhookService {
            integrations: integrations
                .into_iter()
                .map(|integration| (integration.name.clone(), Arc::new(integration)))
                .collect(),
            producer,
            limits,
            max_body_bytes,
            replay_window_secs: replay_window_secs as i64,
        }
    }

    pub fn integration(&self, name: &str) -> Option<&Arc<Integration>> {
        self.integrations.get(name)
    }

    /// `GET /webhooks/stats`: per integration, accepted events, answered redeliveries and rejected requests by
    /// reason, as JSON. Counts only: no secrets, no content. (Prometheus metrics come with the telemetry work.)
    fn stats_response(&self) -> Response<Full<Bytes>> {
        let mut integrations = serde_json::Map::new();
        let mut names: Vec<&String> = self.integrations.keys().collect();
        names.sort();
        for name in names {
            let integration = &self.integrations[name];
            integrations.insert(
                name.clone(),
                serde_json::json!({
                    "platform": integration.platform,
                    "tenant": integration.tenant,
                    "accepted_events": integration.stats.accepted(),
                    "duplicate_deliveries": integration
                        .stats
                        .duplicate_deliveries
                        .load(std::sync::atomic::Ordering::Relaxed),
                    "rejected": integration.stats.rejected(),
                }),
            );
        }
        let mut response = Response::new(Full::new(Bytes::from(
            serde_json::json!({ "integrations": integrations }).to_string(),
        )));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }

    /// Answers one HTTP request inside a server span that continues the sender's trace, if it sent one.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() == "/healthz" {
            // Probes are not worth a trace each.
            return self.route(request).await;
        }
        let span = tracing::info_span!(
            "webhook",
            otel.name = format!("{} /webhooks/{{integration}}", request.method()),
            otel.kind = "server",
            http.request.method = %request.method(),
            http.route = "/webhooks/{integration}",
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        continue_remote_trace(&span, request.headers());
        let response = self.route(request).instrument(span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        response
    }

    async fn route(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        if request.method() == Method::GET && path == "/healthz" {
            return plain(StatusCode::OK, "ok");
        }
        if request.method() == Method::GET && path == "/webhooks/stats" {
            return self.stats_response();
        }
        let Some(name) = path.strip_prefix("/webhooks/") else {
            return plain(
                StatusCode::NOT_FOUND,
                "no such endpoint; webhooks are POST /webhooks/<integration>",
            );
        };
        let Some(integration) = self.integrations.get(name).cloned() else {
            return plain(StatusCode::NOT_FOUND, "unknown integration");
        };
        // Microsoft Graph may validate a notification URL with a GET carrying `?validationToken=`.
        let teams_get = request.method() == Method::GET
            && integration.platform == chatvault_core::config::WebhookPlatform::Teams;
        if request.method() != Method::POST && !teams_get {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "webhooks are POST requests");
        }
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            integration.stats.reject("too_large");
            return too_large(self.max_body_bytes);
        }
        let body = match Limited::new(body, self.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                if error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    integration.stats.reject("too_large");
                    return too_large(self.max_body_bytes);
                }
                integration.stats.reject("malformed");
                return plain(StatusCode::BAD_REQUEST, "could not read the request body");
            }
        };
        let now_secs = chatvault_core::time::now_micros() / 1_000_000;
        let webhook_request = WebhookRequest {
            headers: &parts.headers,
            query: parts.uri.query(),
            body: &body,
            now_secs,
            replay_window_secs: self.replay_window_secs,
        };
        let accepted = match integration
            .handler
            .handle(&integration.tenant, &webhook_request)
        {
            Ok(accepted) => accepted,
            Err(Rejection::Unauthorized { reason, message }) => {
                integration.stats.reject(reason);
                tracing::warn!(integration = %integration.name, reason, "webhook rejected: {message}");
                return plain(StatusCode::UNAUTHORIZED, &message);
            }
            Err(Rejection::Malformed(message)) => {
                integration.stats.reject("malformed");
                return plain(StatusCode::BAD_REQUEST, &message);
            }
        };
        if let Some(delivery) = &accepted.delivery_id
            && integration.recent.contains(delivery)
        {
            integration.stats.redelivered();
            return respond(&accepted.response);
        }
        let source = match integration.platform {
            chatvault_core::config::WebhookPlatform::Slack => Source::Slack,
            chatvault_core::config::WebhookPlatform::StandardWebhooks => Source::StandardWebhooks,
            chatvault_core::config::WebhookPlatform::Mattermost => Source::Mattermost,
            chatvault_core::config::WebhookPlatform::Discord => Source::Discord,
            chatvault_core::config::WebhookPlatform::Teams => Source::Teams,
        };
        let mut events = accepted.events;
        for (index, event) in events.iter_mut().enumerate() {
            if let Err(error) = validate_and_complete(event, source, &self.limits) {
                integration.stats.reject("invalid_event");
                let prefix = if index == 0 {
                    String::new()
                } else {
                    format!("event {index}: ")
                };
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!("{prefix}{}", error.message()),
                );
            }
        }
        match self.producer.produce_all(&events).await {
            Ok(()) => {
                integration.stats.accept(events.len());
                if let Some(delivery) = accepted.delivery_id {
                    integration.recent.insert(delivery);
                }
                respond(&accepted.response)
            }
            Err(error) => {
                integration.stats.reject("kafka_unavailable");
                tracing::warn!(integration = %integration.name, %error, "webhook events not acknowledged by Kafka");
                let mut response = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the archive cannot take events right now; retry later",
                );
                response.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from(RETRY_AFTER_SECS),
                );
                if error.code() == ErrorCode::InvalidArgument {
                    return plain(StatusCode::BAD_REQUEST, error.message());
                }
                response
            }
        }
    }
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn too_large(limit: usize) -> Response<Full<Bytes>> {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("body is larger than {limit} bytes"),
    )
}

fn respond(answer: &super::WebhookResponse) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body.clone())));
    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    if let Some(content_type) = answer.content_type {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
    }
    response
}

/// Serves webhooks until `shutdown`, then lets in-flight requests finish for up to `drain_timeout`.
pub async fn serve_http(
    listener: TcpListener,
    service: Arc<WebhookService>,
    shutdown: Shutdown,
    drain_timeout: Duration,
) -> Result<()> {
    let connections = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = shutdown.clone().wait();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => break,
        };
        let Ok((socket, _)) = accepted else { continue };
        let service = service.clone();
        let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
            let service = service.clone();
            async move { Ok::<_, Infallible>(service.handle(request).await) }
        });
        let connection = connections
            .serve_connection(TokioIo::new(socket), handler)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain_timeout) => tracing::warn!("webhook drain deadline passed"),
    }
    Ok(())
}
