//! The webhook HTTP server: routing, connection and body limits, read timeouts, and the produce-then-answer
//! rule.
//!
//! Memory per request is bounded before anything is parsed: at most `max_http_connections` connections, each
//! reading one body of at most `max_webhook_body_bytes` at a time (HTTP/1.1; HTTP/2 streams per connection are
//! capped too), within `http_body_read_timeout`; headers within `http_header_read_timeout`. A
//! delivery's events then hold its body about once (see [`super::evidence`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use crate::config::GatewayConfig;
use bytes::Bytes;
use chatvault_core::audit::{Auditor, CallSource};
use chatvault_core::auth::{Authenticator, Principal, Role};
use chatvault_core::error::{Coded, Result};
use chatvault_core::event::{EventLimits, validate_and_complete};
use chatvault_core::shutdown::Shutdown;
use chatvault_core::telemetry::continue_remote_trace;
use chatvault_proto::v1::Source;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::evidence;
use super::{Integration, WebhookRequest};
use crate::error::IngestError;
use crate::producer::EventProducer;

/// Seconds a platform is asked to wait before retrying when Kafka cannot take events.
pub const RETRY_AFTER_SECS: u64 = 5;

/// HTTP/2 streams one webhook connection may have open at once (platforms send HTTP/1.1; this bounds h2c).
const MAX_HTTP2_STREAMS: u32 = 16;

/// Connection limits and read timeouts of the webhook listener (from `[gateway]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl HttpLimits {
    pub fn from_config(config: &GatewayConfig) -> HttpLimits {
        HttpLimits {
            max_connections: config.max_http_connections,
            header_read_timeout: config.http_header_read_timeout,
            body_read_timeout: config.http_body_read_timeout,
        }
    }
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits::from_config(&GatewayConfig::default())
    }
}

/// Routes `POST /webhooks/<name>` to its integration.
pub struct WebhookService {
    integrations: HashMap<String, Arc<Integration>>,
    producer: EventProducer,
    limits: EventLimits,
    max_body_bytes: usize,
    replay_window_secs: i64,
    http_limits: HttpLimits,
    /// Who may read `GET /webhooks/stats` (tokens holding `audit` or `admin` for a tenant); none by default.
    stats_readers: Arc<Authenticator>,
    /// Records every delivery to an integration and every stats request (fail closed, as for gRPC).
    auditor: Auditor,
}

impl WebhookService {
    pub fn new(
        integrations: Vec<Integration>,
        producer: EventProducer,
        limits: EventLimits,
        max_body_bytes: usize,
        replay_window_secs: u64,
        auditor: Auditor,
    ) -> WebhookService {
        WebhookService {
            integrations: integrations
                .into_iter()
                .map(|integration| (integration.name.clone(), Arc::new(integration)))
                .collect(),
            producer,
            limits,
            max_body_bytes,
            replay_window_secs: i64::try_from(replay_window_secs).unwrap_or(i64::MAX),
            http_limits: HttpLimits::default(),
            stats_readers: Arc::new(Authenticator::default()),
            auditor,
        }
    }

    /// The service as the gateway runs it: every limit from `config`, stats readable with the tenants' tokens.
    pub fn from_config(
        integrations: Vec<Integration>,
        producer: EventProducer,
        config: &GatewayConfig,
        authenticator: Authenticator,
        auditor: Auditor,
    ) -> WebhookService {
        WebhookService::new(
            integrations,
            producer,
            config.limits.clone(),
            config.max_webhook_body_bytes,
            config.webhook_replay_window_secs,
            auditor,
        )
        .with_http_limits(HttpLimits::from_config(config))
        .with_stats_readers(authenticator)
    }

    pub fn with_http_limits(mut self, limits: HttpLimits) -> WebhookService {
        self.http_limits = limits;
        self
    }

    /// Tokens that may read `GET /webhooks/stats`: each sees the integrations of the tenants for which it holds
    /// `audit` or `admin`.
    pub fn with_stats_readers(mut self, authenticator: Authenticator) -> WebhookService {
        self.stats_readers = Arc::new(authenticator);
        self
    }

    pub fn integration(&self, name: &str) -> Option<&Arc<Integration>> {
        self.integrations.get(name)
    }

    /// `GET /webhooks/stats`: per integration, accepted events, answered redeliveries and rejected requests by
    /// reason, as JSON. Counts only: no secrets, no content. The listener faces the internet, so the request
    /// needs `authorization: Bearer <token>` of a token holding `audit` or `admin` (401 without a known token,
    /// 403 when it holds neither for any tenant), and it sees only its tenants' integrations.
    async fn stats_response(&self, headers: &http::HeaderMap) -> Routed {
        let authorization = headers
            .get(http::header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or_default());
        let principal = match self.stats_readers.authenticate(authorization).await {
            Ok(principal) => principal,
            Err(error) => {
                let mut response = plain(StatusCode::UNAUTHORIZED, error.message());
                response.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return Routed {
                    response,
                    verdict: Verdict::Refused(IngestError::from(error)),
                    tenant: None,
                    principal: None,
                };
            }
        };
        let readable = |tenant: &str| principal.require(tenant, Role::Audit).is_ok();
        if !principal.grants.keys().any(|tenant| readable(tenant)) {
            let message = format!(
                "{} holds neither the audit nor the admin role for any tenant",
                principal.name
            );
            return Routed {
                response: plain(StatusCode::FORBIDDEN, &message),
                verdict: Verdict::Refused(IngestError::PermissionDenied(message)),
                tenant: None,
                principal: Some(principal),
            };
        }
        let mut integrations = serde_json::Map::new();
        let mut names: Vec<&String> = self.integrations.keys().collect();
        names.sort();
        for name in names {
            let integration = &self.integrations[name];
            if !readable(&integration.tenant) {
                continue;
            }
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
        let listed = integrations.len();
        let mut response = Response::new(Full::new(Bytes::from(
            serde_json::json!({ "integrations": integrations }).to_string(),
        )));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Routed {
            response,
            verdict: Verdict::Served(listed),
            tenant: None,
            principal: Some(principal),
        }
    }

    /// Answers one HTTP request from `peer` inside a server span that continues the sender's trace, if it
    /// sent one, and records it in the audit trail when it concerns an integration or the stats: a served
    /// request only once its record is durable (else 503, and the platform's retry collapses onto the events
    /// already produced).
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: Option<std::net::SocketAddr>,
    ) -> Response<Full<Bytes>> {
        if request.uri().path() == "/healthz" {
            // Probes are not worth a trace or a record each.
            return self.route(request).await.response;
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
        let action = format!("{} {}", request.method(), request.uri().path());
        let source = CallSource {
            peer_address: peer,
            user_agent: CallSource::of_http(&request).user_agent,
        };
        let routed = self.route(request).instrument(span.clone()).await;
        let response = self.recorded(routed, &action, &source).await;
        span.record("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        response
    }

    /// Records a routed request in the audit trail and gives its answer.
    async fn recorded(
        &self,
        routed: Routed,
        action: &str,
        source: &CallSource,
    ) -> Response<Full<Bytes>> {
        let Routed {
            response,
            verdict,
            tenant,
            principal,
        } = routed;
        let mut audit = self.auditor.call(action, source);
        if let Some(tenant) = &tenant {
            audit.tenant(tenant);
        }
        if let Some(principal) = &principal {
            audit.principal(principal);
        }
        match verdict {
            Verdict::Unaudited => response,
            Verdict::Served(items) => match audit.allowed(items as u64, 0).await {
                Ok(()) => response,
                Err(error) => error_response(&IngestError::from(error)),
            },
            Verdict::Refused(error) => {
                audit.refused(&error).await;
                response
            }
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Routed {
        let path = request.uri().path().to_string();
        if request.method() == Method::GET && path == "/healthz" {
            return Routed::unaudited(plain(StatusCode::OK, "ok"));
        }
        if request.method() == Method::GET && path == "/webhooks/stats" {
            return self.stats_response(request.headers()).await;
        }
        let Some(name) = path.strip_prefix("/webhooks/") else {
            return Routed::unaudited(plain(
                StatusCode::NOT_FOUND,
                "no such endpoint; webhooks are POST /webhooks/<integration>",
            ));
        };
        let Some(integration) = self.integrations.get(name).cloned() else {
            return Routed::unaudited(plain(StatusCode::NOT_FOUND, "unknown integration"));
        };
        // Microsoft Graph may validate a notification URL with a GET carrying `?validationToken=`.
        let teams_get = request.method() == Method::GET
            && integration.platform == crate::config::WebhookPlatform::Teams;
        if request.method() != Method::POST && !teams_get {
            return Routed::unaudited(plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "webhooks are POST requests",
            ));
        }
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            return refused(
                &integration,
                IngestError::TooLarge {
                    limit: self.max_body_bytes,
                },
            );
        }
        let read = tokio::time::timeout(
            self.http_limits.body_read_timeout,
            Limited::new(body, self.max_body_bytes).collect(),
        )
        .await;
        let body = match read {
            Err(_elapsed) => {
                let millis = self.http_limits.body_read_timeout.as_millis();
                return refused(&integration, IngestError::BodyTimeout { millis });
            }
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(error)) => {
                let refusal = if error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    IngestError::TooLarge {
                        limit: self.max_body_bytes,
                    }
                } else {
                    IngestError::UnreadableBody(error)
                };
                return refused(&integration, refusal);
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
            Err(refusal) => return refused(&integration, refusal),
        };
        if let Some(delivery) = &accepted.delivery_id
            && integration.recent.contains(delivery)
        {
            integration.stats.redelivered();
            return Routed::served(&integration, respond(&accepted.response), 0);
        }
        let source = match integration.platform {
            crate::config::WebhookPlatform::Slack => Source::Slack,
            crate::config::WebhookPlatform::StandardWebhooks => Source::StandardWebhooks,
            crate::config::WebhookPlatform::Mattermost => Source::Mattermost,
            crate::config::WebhookPlatform::Discord => Source::Discord,
            crate::config::WebhookPlatform::Teams => Source::Teams,
        };
        let mut events = accepted.events;
        if let Err(why) = evidence::seal(&body, &mut events) {
            // A handler bug, not the sender's fault: 500, so the platform retries once it is fixed.
            tracing::error!(integration = %integration.name, "webhook evidence: {why}");
            return refused(
                &integration,
                IngestError::Internal(
                    "the gateway could not keep this delivery as evidence".into(),
                ),
            );
        }
        let envelope = events
            .iter()
            .map(|event| event.delivery_envelope.len())
            .sum::<usize>();
        if envelope > self.limits.max_raw_payload_bytes {
            return refused(
                &integration,
                IngestError::InvalidEvent(format!(
                    "the body outside its items is {envelope} bytes, over the limit of {} (gateway.limits.max_raw_payload_bytes)",
                    self.limits.max_raw_payload_bytes
                )),
            );
        }
        for (index, event) in events.iter_mut().enumerate() {
            if let Err(error) = validate_and_complete(event, source, &self.limits) {
                let prefix = if index == 0 {
                    String::new()
                } else {
                    format!("event {index}: ")
                };
                return refused(
                    &integration,
                    IngestError::InvalidEvent(format!("{prefix}{}", error.message())),
                );
            }
        }
        match self.producer.produce_all(&events).await {
            Ok(()) => {
                integration.stats.accept(events.len());
                if let Some(delivery) = accepted.delivery_id {
                    integration.recent.insert(delivery);
                }
                Routed::served(&integration, respond(&accepted.response), events.len())
            }
            Err(error) => refused(&integration, IngestError::from(error)),
        }
    }
}

/// What routing a request came to: the answer, and what the audit trail records about it.
struct Routed {
    response: Response<Full<Bytes>>,
    verdict: Verdict,
    /// The integration's tenant.
    tenant: Option<String>,
    /// The caller of `/webhooks/stats`, once authenticated (webhook senders are platforms, known by their
    /// signature, not principals).
    principal: Option<Principal>,
}

enum Verdict {
    /// Not a call of the service (health probes, unknown paths): no record.
    Unaudited,
    /// Served: the events accepted (or the integrations listed).
    Served(usize),
    Refused(IngestError),
}

impl Routed {
    fn unaudited(response: Response<Full<Bytes>>) -> Routed {
        Routed {
            response,
            verdict: Verdict::Unaudited,
            tenant: None,
            principal: None,
        }
    }

    fn served(integration: &Integration, response: Response<Full<Bytes>>, events: usize) -> Routed {
        Routed {
            response,
            verdict: Verdict::Served(events),
            tenant: Some(integration.tenant.clone()),
            principal: None,
        }
    }
}

/// A refused delivery to `integration`: its answer ([`refuse`]) and its record.
fn refused(integration: &Integration, error: IngestError) -> Routed {
    Routed {
        response: refuse(integration, &error),
        verdict: Verdict::Refused(error),
        tenant: Some(integration.tenant.clone()),
        principal: None,
    }
}

/// The answer to a refused webhook request, from its error's code (see [`error_response`]). Counts the
/// refusal under its reason and logs those that are not the sender's fault or that concern authentication.
fn refuse(integration: &Integration, error: &IngestError) -> Response<Full<Bytes>> {
    integration.stats.reject(error.reason());
    match error {
        IngestError::Unauthenticated { reason, .. } => {
            tracing::warn!(integration = %integration.name, reason, "webhook rejected: {error}");
        }
        IngestError::KafkaUnavailable(_) | IngestError::Internal(_) => {
            tracing::warn!(integration = %integration.name, error = %error, "webhook not acknowledged");
        }
        _ => {}
    }
    error_response(error)
}

/// The answer for `error`: the status of its code, `Retry-After` when a retry can succeed, `Connection:
/// close` when the body was left unread.
fn error_response(error: &IngestError) -> Response<Full<Bytes>> {
    let code = error.code();
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = plain(status, &error.to_string());
    if code.is_retryable() {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(RETRY_AFTER_SECS),
        );
    }
    if error.body_left_unread() {
        response = closing(response);
    }
    response
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

/// Marks an answer given before the request's body was read whole: the rest of the body is still on the
/// connection, so it cannot carry another request. Saying so (`Connection: close`) keeps a client from sending
/// its next request on a connection the server is closing (it would see the connection end with no answer).
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
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

/// Serves webhooks until `shutdown`, then lets in-flight requests finish for up to `drain_timeout`. At most
/// the service's `max_connections` connections are served at once; one beyond it gets a 503 and is closed.
pub async fn serve_http(
    listener: TcpListener,
    service: Arc<WebhookService>,
    shutdown: Shutdown,
    drain_timeout: Duration,
) -> Result<()> {
    let limits = service.http_limits;
    let mut connections = ConnBuilder::new(TokioExecutor::new());
    connections
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    connections
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_HTTP2_STREAMS)
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = shutdown.clone().wait();
    tokio::pin!(stop);
    while let Some((socket, peer)) =
        chatvault_core::shutdown::accept_until(&listener, &mut stop, "webhooks").await
    {
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(socket, limits.max_connections));
            continue;
        };
        let service = service.clone();
        let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
            let service = service.clone();
            async move { Ok::<_, Infallible>(service.handle(request, Some(peer)).await) }
        });
        let connection = connections
            .serve_connection(TokioIo::new(socket), handler)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    if chatvault_core::shutdown::drain(shutdown, drain_timeout, graceful.shutdown())
        .await
        .is_none()
    {
        tracing::warn!("webhook drain deadline passed");
    }
    Ok(())
}

/// Answers a connection over the limit with a 503 (platforms retry those) without reading its request, and
/// closes it. Bounded in time: a client that does not read its answer is dropped.
async fn refuse_connection(mut socket: TcpStream, limit: usize) {
    tracing::warn!(
        limit,
        "webhook connection refused: gateway.max_http_connections are open"
    );
    let message = "too many open connections; retry later\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: {RETRY_AFTER_SECS}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{message}",
        message.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        socket.write_all(answer.as_bytes()).await?;
        socket.shutdown().await?;
        // Closing with the request unread would reset the connection and could discard the answer before the
        // client read it: read (and drop) what the client sent until it closes, within the deadline.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut socket, &mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}
