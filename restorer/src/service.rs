//! The `chatvault.v1.RestoreService` gRPC API, with health checking and server reflection.
//!
//! Every call is authenticated (`authorization: Bearer <token>`, a static token or an OIDC access token),
//! authorized (the `restore` role for the requested tenant) and recorded in the audit trail
//! ([`chatvault_core::audit`]), whatever its outcome. A call is served only once its record is durable (for a
//! streamed conversation: before its first item, with the number of items it will have); a stream that fails
//! after it started is recorded once more, as an error, since it served less than its record says.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use chatvault_core::audit::{AuditCall, Auditor, CallSource, LogSafe};
use chatvault_core::auth::{Authenticator, Principal, Role};
use chatvault_core::event::check_tenant;
use chatvault_core::grpc::serve_health;
use chatvault_core::metrics::{KeyValue, metrics};
use chatvault_core::shutdown::Shutdown;
use chatvault_core::telemetry::{grpc_server_span, record_span_error};
use chatvault_core::{Error, ErrorCode, Result};
use chatvault_proto::v1::audit_service_server::AuditServiceServer;
use chatvault_proto::v1::key_service_server::KeyServiceServer;
use chatvault_proto::v1::restore_service_server::{RestoreService, RestoreServiceServer};
use chatvault_proto::v1::{
    GetConversationRequest, ListConversationsRequest, ListConversationsResponse, RestoreItem,
};
use futures::Stream;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::audit_trail::AuditApi;
use crate::index::TimeRange;
use crate::key_export::KeyExportApi;
use crate::reader::Restorer;
use crate::stream::ConversationPlan;

/// Restore items queued between a conversation's emission and its gRPC stream: the emission waits for a slow
/// client instead of buffering.
const STREAM_QUEUE_ITEMS: usize = 16;

/// Requests served at once by default. Each holds at most its buffer limits of events and an index of its
/// conversation (see [`crate::stream`]), so this bounds the restorer's memory; requests beyond it get
/// RESOURCE_EXHAUSTED (retryable).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 16;

/// The RestoreService implementation.
#[derive(Clone)]
pub struct RestoreApi {
    restorer: Arc<Restorer>,
    authenticator: Authenticator,
    auditor: Auditor,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for RestoreApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreApi")
            .field("available_permits", &self.in_flight.available_permits())
            .finish_non_exhaustive()
    }
}

pub type RestoreItemStream =
    Pin<Box<dyn Stream<Item = Result<RestoreItem, Status>> + Send + 'static>>;

impl RestoreApi {
    /// The API over `restorer`, authenticating with `authenticator` and recording every call with `auditor`.
    pub fn new(
        restorer: Arc<Restorer>,
        authenticator: Authenticator,
        auditor: Auditor,
    ) -> RestoreApi {
        RestoreApi {
            restorer,
            authenticator,
            auditor,
            in_flight: Arc::new(Semaphore::new(DEFAULT_MAX_CONCURRENT_REQUESTS)),
        }
    }

    pub fn with_max_concurrent_requests(mut self, requests: usize) -> RestoreApi {
        self.in_flight = Arc::new(Semaphore::new(requests.max(1)));
        self
    }

    /// Authenticates the caller and checks the `restore` role on `tenant`. The caller goes into `audit` as
    /// soon as it is known, so refusals are recorded under its name.
    async fn authorize(
        &self,
        authorization: Option<&str>,
        tenant: &str,
        audit: &mut AuditCall,
    ) -> Result<Principal> {
        let caller = self.authenticator.authenticate(authorization).await?;
        audit.principal(&caller);
        check_tenant("tenant_id", tenant)?;
        caller.require(tenant, Role::Restore)?;
        Ok(caller)
    }

    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Error::new(
                ErrorCode::ResourceExhausted,
                "the restorer is serving its maximum of concurrent requests; retry later",
            )
        })
    }

    /// Checks the request and plans the restore (reading the archive once); the items are sent afterwards.
    async fn plan_conversation(
        &self,
        authorization: Option<&str>,
        request: &GetConversationRequest,
        audit: &mut AuditCall,
    ) -> Result<(ConversationPlan, tokio::sync::OwnedSemaphorePermit)> {
        self.authorize(authorization, &request.tenant_id, audit)
            .await?;
        validate_conversation_request(request)?;
        let permit = self.admit()?;
        let range = TimeRange::new(request.from_micros, request.to_micros);
        let mut plan = self
            .restorer
            .plan_conversation(
                &request.tenant_id,
                &request.conversation_id,
                range,
                request.include_events,
            )
            .await?;
        if request.include_evidence {
            let evidence = self
                .restorer
                .conversation_evidence(&request.tenant_id, &request.conversation_id, range)
                .await?;
            plan = plan.with_evidence(serde_json::to_string_pretty(&evidence)?);
        }
        Ok((plan, permit))
    }

    async fn list_conversations_response(
        &self,
        authorization: Option<&str>,
        request: &ListConversationsRequest,
        audit: &mut AuditCall,
    ) -> Result<ListConversationsResponse> {
        self.authorize(authorization, &request.tenant_id, audit)
            .await?;
        let _permit = self.admit()?;
        let conversations = self.restorer.list_conversations(&request.tenant_id).await?;
        Ok(ListConversationsResponse { conversations })
    }
}

/// Checks a requested conversation id by the rules of ingest, so nothing archived is refused; the id itself is
/// not echoed back.
pub(crate) fn check_conversation_id(conversation: &str) -> Result<()> {
    if conversation.is_empty() {
        return Err(Error::invalid_argument("conversation_id is required"));
    }
    if conversation.len() > MAX_CONVERSATION_ID_BYTES {
        return Err(Error::invalid_argument(format!(
            "conversation_id is {} bytes, longer than the limit of {MAX_CONVERSATION_ID_BYTES}",
            conversation.len()
        )));
    }
    if let Some(position) = conversation.chars().position(char::is_control) {
        return Err(Error::invalid_argument(format!(
            "conversation_id contains a control character (at character {position})"
        )));
    }
    Ok(())
}

/// The longest conversation id the gateway accepts (`core::event`): no archived conversation has a longer one.
const MAX_CONVERSATION_ID_BYTES: usize = 256;

fn validate_conversation_request(request: &GetConversationRequest) -> Result<()> {
    check_conversation_id(&request.conversation_id)?;
    if request.from_micros < 0 {
        return Err(Error::invalid_argument(
            "from_micros must not be negative (0 means unbounded)",
        ));
    }
    if request.to_micros < 0 {
        return Err(Error::invalid_argument(
            "to_micros must not be negative (0 means unbounded)",
        ));
    }
    if request.from_micros != 0 && request.to_micros != 0 && request.from_micros > request.to_micros
    {
        return Err(Error::invalid_argument(format!(
            "from_micros ({}) is after to_micros ({})",
            request.from_micros, request.to_micros
        )));
    }
    Ok(())
}

/// The value of the `authorization` metadata. A value that is not visible ASCII is passed on as malformed so
/// the caller learns that rather than "missing".
pub(crate) fn authorization_of<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .map(|value| value.to_str().unwrap_or(""))
}

#[tonic::async_trait]
impl RestoreService for RestoreApi {
    type GetConversationStream = RestoreItemStream;

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<Self::GetConversationStream>, Status> {
        let call = CallTelemetry::start(&request, "GetConversation");
        let body = request.get_ref();
        let mut audit = self.auditor.call(
            "chatvault.v1.RestoreService/GetConversation",
            &CallSource::of_grpc(&request),
        );
        audit
            .tenant(&body.tenant_id)
            .conversation(&body.conversation_id)
            .time_range(body.from_micros, body.to_micros)
            .roles(&[Role::Restore]);
        let planned = self
            .plan_conversation(authorization_of(&request), body, &mut audit)
            .instrument(call.span.clone())
            .await;
        // The stream's own failure is recorded as a second record with the same call details.
        let failure_record = audit.copy();
        let result = match planned {
            Ok((plan, permit)) => audit
                .allowed(plan.item_count(), 0)
                .await
                .map(|()| (plan, permit)),
            Err(error) => {
                audit.refused(&error).await;
                Err(error)
            }
        };
        let span = call.span.clone();
        call.finish(&result);
        let (plan, permit) = result?;
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_QUEUE_ITEMS);
        let restorer = self.restorer.clone();
        tokio::spawn(
            async move {
                // The request keeps its slot until its last item is sent.
                let _permit = permit;
                if let Err(error) = plan.emit(&restorer, &sender).await {
                    tracing::error!(error = %LogSafe(error.message()), "restore stream failed");
                    failure_record.refused(&error).await;
                    let _ = sender.send(Err(error)).await;
                }
            }
            .instrument(span),
        );
        let stream: RestoreItemStream = Box::pin(futures::stream::unfold(
            receiver,
            |mut receiver| async move {
                let item = receiver.recv().await?;
                Some((item.map_err(Status::from), receiver))
            },
        ));
        Ok(Response::new(stream))
    }

    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let call = CallTelemetry::start(&request, "ListConversations");
        let mut audit = self.auditor.call(
            "chatvault.v1.RestoreService/ListConversations",
            &CallSource::of_grpc(&request),
        );
        audit
            .tenant(&request.get_ref().tenant_id)
            .roles(&[Role::Restore]);
        let listed = self
            .list_conversations_response(authorization_of(&request), request.get_ref(), &mut audit)
            .instrument(call.span.clone())
            .await;
        let result = audit
            .conclude(listed, |response| response.conversations.len() as u64)
            .await;
        call.finish(&result);
        Ok(Response::new(result?))
    }
}

/// A restorer call's span (continuing the caller's trace) and the clock of `chatvault.restorer.request.duration`.
struct CallTelemetry {
    span: tracing::Span,
    method: &'static str,
    started: Instant,
}

impl CallTelemetry {
    fn start<T>(request: &Request<T>, method: &'static str) -> CallTelemetry {
        let span = grpc_server_span("chatvault.v1.RestoreService", method, request.metadata());
        CallTelemetry {
            span,
            method,
            started: Instant::now(),
        }
    }

    fn finish<T>(self, result: &Result<T>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(error) => {
                record_span_error(&self.span, error.code());
                error.code().as_str()
            }
        };
        metrics().restore_duration.record(
            self.started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("method", self.method),
                KeyValue::new("outcome", outcome),
            ],
        );
    }
}

/// Serves the RestoreService, gRPC health (`grpc.health.v1`, the RestoreService reported SERVING until shutdown
/// begins) and server reflection (v1) on `listener` until `shutdown`, then drains in-flight calls for up to
/// `drain_timeout` and cuts off the ones still running (a restore is a read: the caller can retry it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: RestoreApi,
    more: MoreApis,
    shutdown: Shutdown,
    drain_timeout: std::time::Duration,
) -> Result<()> {
    match chatvault_core::shutdown::drain(
        shutdown.clone(),
        drain_timeout,
        serve_api(listener, api, more, shutdown),
    )
    .await
    {
        Some(result) => result,
        None => {
            tracing::warn!(
                drain_timeout_ms = drain_timeout.as_millis() as u64,
                "restorer drain deadline passed; cutting off in-flight calls"
            );
            Ok(())
        }
    }
}

/// The restorer's services besides the RestoreService; the role serves both, tests may serve neither.
#[derive(Debug, Clone, Default)]
pub struct MoreApis {
    /// `chatvault.v1.AuditService`.
    pub audit_trail: Option<AuditApi>,
    /// `chatvault.v1.KeyService`.
    pub key_export: Option<KeyExportApi>,
    /// `chatvault.v1.GovernanceService`.
    pub governance: Option<crate::governance::GovernanceApi>,
}

/// [`serve`] with a configured [`RestoreApi`] (auditor, concurrency limit) and the services of `more` beside it.
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    api: RestoreApi,
    more: MoreApis,
    shutdown: Shutdown,
) -> Result<()> {
    let common = serve_health::<RestoreServiceServer<RestoreApi>>().await?;
    let address = listener
        .local_addr()
        .map(|addr| addr.to_string())
        .unwrap_or_default();
    tracing::info!(address, "restorer gRPC API listening");
    let stop = async move {
        shutdown.wait().await;
        // Report NOT_SERVING first so load balancers stop routing here while in-flight calls drain.
        common
            .health
            .not_serving::<RestoreServiceServer<RestoreApi>>()
            .await;
        tracing::info!("restorer gRPC API shutting down");
    };
    tonic::transport::Server::builder()
        .add_service(common.health_service)
        .add_service(common.reflection)
        .add_service(RestoreServiceServer::new(api))
        .add_optional_service(more.audit_trail.map(AuditServiceServer::new))
        .add_optional_service(more.key_export.map(KeyServiceServer::new))
        .add_optional_service(
            more.governance
                .map(chatvault_proto::v1::governance_service_server::GovernanceServiceServer::new),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await
        .map_err(|error| {
            Error::unavailable(format!("restorer gRPC server on {address} failed: {error}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, event};
    use chatvault_core::auth::token_digest;
    use chatvault_proto::v1::restore_item::Item;
    use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
    use std::sync::Mutex;
    use tonic::transport::Channel;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as HealthStatus;
    use tonic_health::pb::health_client::HealthClient;

    use chatvault_core::audit::{AuditOutcome, MemorySink};

    fn outcome(record: &chatvault_core::audit::AuditRecord) -> AuditOutcome {
        AuditOutcome::try_from(record.outcome).expect("known outcome")
    }

    struct Server {
        channel: Channel,
        recorder: Arc<MemorySink>,
        trigger: chatvault_core::shutdown::ShutdownTrigger,
        task: tokio::task::JoinHandle<Result<()>>,
        _fixture: Fixture,
    }

    async fn start() -> Server {
        let fixture = Fixture::new().await;
        let mut hello = event("acme", "C1", "m1", 1_000);
        hello.text = "the secret launch date".into();
        fixture
            .commit_batch(
                0,
                &[
                    hello,
                    event("acme", "C1", "m2", 2_000),
                    event("acme", "C2", "m3", 3_000),
                ],
            )
            .await;
        let restorer = Arc::new(Restorer::new(
            fixture.store.clone(),
            fixture.data_keys.clone(),
            &fixture.topic,
            2,
        ));
        let mut authenticator = Authenticator::default();
        authenticator.add_token_digest(
            token_digest("restore-token"),
            "legal-team",
            "acme",
            &[Role::Restore],
        );
        authenticator.add_token_digest(
            token_digest("ingest-token"),
            "slack-bridge",
            "acme",
            &[Role::Ingest],
        );
        let recorder = Arc::new(MemorySink::default());
        let api = RestoreApi::new(
            restorer,
            authenticator,
            Auditor::new("restorer", recorder.clone()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (trigger, shutdown) = chatvault_core::shutdown::channel();
        let task = tokio::spawn(serve_api(listener, api, MoreApis::default(), shutdown));
        let channel = Channel::from_shared(format!("http://{address}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        Server {
            channel,
            recorder,
            trigger,
            task,
            _fixture: fixture,
        }
    }

    fn with_token<T>(message: T, token: &str) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        request
    }

    fn conversation(tenant: &str, conversation: &str) -> GetConversationRequest {
        GetConversationRequest {
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            ..GetConversationRequest::default()
        }
    }

    #[tokio::test]
    async fn an_authorized_caller_streams_the_conversation_and_the_access_is_recorded() {
        let server = start().await;
        let mut client = RestoreServiceClient::new(server.channel.clone());
        let mut request = conversation("acme", "C1");
        request.include_events = true;
        let mut stream = client
            .get_conversation(with_token(request, "restore-token"))
            .await
            .expect("served")
            .into_inner();
        let mut items = Vec::new();
        while let Some(item) = stream.message().await.expect("item") {
            items.push(item);
        }
        let kinds: Vec<_> = items
            .iter()
            .map(|item| match &item.item {
                Some(Item::Message(m)) => format!("message {}", m.message_id),
                Some(Item::ArchivedEvent(e)) => format!("archived {}", e.message_id),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["message m1", "message m2", "archived m1", "archived m2"]
        );

        let listed = client
            .list_conversations(with_token(
                ListConversationsRequest {
                    tenant_id: "acme".into(),
                },
                "restore-token",
            ))
            .await
            .expect("listed")
            .into_inner();
        let ids: Vec<_> = listed
            .conversations
            .iter()
            .map(|c| c.conversation_id.as_str())
            .collect();
        assert_eq!(ids, ["C1", "C2"]);

        let records = server.recorder.take();
        assert_eq!(records.len(), 2);
        assert_eq!(
            records[0].action,
            "chatvault.v1.RestoreService/GetConversation"
        );
        assert_eq!(records[0].subject, "legal-team");
        assert_eq!(records[0].service, "restorer");
        assert_eq!(records[0].roles_used, ["restore"]);
        assert_eq!(
            (
                records[0].tenant_id.as_str(),
                records[0].conversation_id.as_str()
            ),
            ("acme", "C1")
        );
        assert_eq!(outcome(&records[0]), AuditOutcome::Allowed);
        assert_eq!(records[0].item_count, 4);
        assert!(!records[0].peer_address.is_empty());
        assert_eq!(records[0].record_id.len(), 32);
        assert!(records[0].time_micros > 0);
        assert_eq!(
            records[1].action,
            "chatvault.v1.RestoreService/ListConversations"
        );
        assert_eq!(outcome(&records[1]), AuditOutcome::Allowed);
        assert_eq!(records[1].item_count, 2);
        assert_ne!(records[0].record_id, records[1].record_id);
        assert!(!format!("{records:?}").contains("secret launch"));
    }

    #[tokio::test]
    async fn refusals_carry_the_right_status_and_are_recorded_too() {
        let server = start().await;
        let mut client = RestoreServiceClient::new(server.channel.clone());
        let missing = client
            .get_conversation(Request::new(conversation("acme", "C1")))
            .await
            .expect_err("no token");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong_role = client
            .get_conversation(with_token(conversation("acme", "C1"), "ingest-token"))
            .await
            .expect_err("ingest role");
        assert_eq!(wrong_role.code(), tonic::Code::PermissionDenied);
        let other_tenant = client
            .list_conversations(with_token(
                ListConversationsRequest {
                    tenant_id: "globex".into(),
                },
                "restore-token",
            ))
            .await
            .expect_err("other tenant");
        assert_eq!(other_tenant.code(), tonic::Code::PermissionDenied);

        let mut backwards = conversation("acme", "C1");
        backwards.from_micros = 5;
        backwards.to_micros = 4;
        for (request, field) in [
            (conversation("ACME!", "C1"), "tenant_id"),
            (conversation("", "C1"), "tenant_id"),
            (conversation("acme", ""), "conversation_id"),
            (backwards, "from_micros"),
        ] {
            let status = client
                .get_conversation(with_token(request, "restore-token"))
                .await
                .expect_err("invalid");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(field), "{status:?}");
        }

        let records = server.recorder.take();
        assert_eq!(records.len(), 7);
        assert_eq!(records[0].subject, "");
        assert_eq!(outcome(&records[0]), AuditOutcome::Denied);
        assert!(
            records[0].reason.contains("missing authorization"),
            "{records:?}"
        );
        assert_eq!(records[1].subject, "slack-bridge");
        assert_eq!(outcome(&records[1]), AuditOutcome::Denied);
        assert!(records[1].reason.contains("does not hold the restore role"));
        assert_eq!(records[2].tenant_id, "globex");
        assert_eq!(outcome(&records[2]), AuditOutcome::Denied);
        assert!(
            records[3..]
                .iter()
                .all(|r| outcome(r) == AuditOutcome::Error && r.subject == "legal-team")
        );
        assert!(!format!("{records:?}").contains("-token"));
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf8")
        }
    }

    const FORGED: &str = "\n2026-12-01T17:00:00.000000Z  INFO chatvault::audit: archive access served \
                          method=\"GetConversation\" principal=legal-team tenant=acme conversation=C9 items=0";

    #[test]
    fn control_characters_in_logged_text_cannot_forge_log_lines() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let tenant = format!("acme\r{FORGED}");
            let conversation = format!("C1{FORGED}\u{1b}[2K\u{202e}");
            let error = format!("bad request{FORGED}");
            tracing::warn!(
                target: "chatvault::audit",
                tenant = %LogSafe(&tenant),
                conversation = %LogSafe(&conversation),
                principal = %LogSafe("intruder\r\u{2028}x"),
                error = %LogSafe(&error),
                "restore stream failed"
            );
        });
        let text = captured.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {text}");
        assert!(!text.contains('\r') && !text.contains('\u{1b}') && !text.contains('\u{2028}'));
        assert!(!text.contains('\u{202e}'), "{text}");
        assert!(
            lines[0].contains("conversation=C1\\u{a}2026-12-01T17:00:00.000000Z"),
            "{text}"
        );
        assert!(lines[0].contains("bad request\\u{a}2026"), "{text}");
        // The escaping cannot be imitated: a literal backslash is doubled.
        assert_eq!(LogSafe("a\\u{a}b").to_string(), "a\\\\u{a}b");
        assert_eq!(LogSafe("plain C1 日本").to_string(), "plain C1 日本");
    }

    #[tokio::test]
    async fn a_conversation_id_with_control_characters_is_refused_naming_the_field() {
        let server = start().await;
        let mut client = RestoreServiceClient::new(server.channel.clone());
        for id in [format!("C1{FORGED}"), "C1\u{0}".into(), "C".repeat(257)] {
            let status = client
                .get_conversation(with_token(conversation("acme", &id), "restore-token"))
                .await
                .expect_err("invalid id");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("conversation_id"), "{status:?}");
            assert!(!status.message().contains("INFO"), "{status:?}");
        }
        let records = server.recorder.take();
        assert_eq!(records.len(), 3);
    }

    #[tokio::test]
    async fn health_reports_serving_until_shutdown_and_the_server_stops() {
        let server = start().await;
        let mut health = HealthClient::new(server.channel.clone());
        let service = <RestoreServiceServer<RestoreApi> as tonic::server::NamedService>::NAME;
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, HealthStatus::Serving as i32);
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(
            watch.message().await.expect("first").map(|r| r.status),
            Some(HealthStatus::Serving as i32)
        );
        server.trigger.trigger();
        assert_eq!(
            watch.message().await.expect("second").map(|r| r.status),
            Some(HealthStatus::NotServing as i32)
        );
        drop(watch);
        tokio::time::timeout(std::time::Duration::from_secs(10), server.task)
            .await
            .expect("stops")
            .expect("joined")
            .expect("clean exit");
    }

    #[tokio::test]
    async fn reflection_lists_the_restore_service() {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let server = start().await;
        let mut reflection = ServerReflectionClient::new(server.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect("reflection")
            .into_inner();
        let response = responses
            .message()
            .await
            .expect("response")
            .expect("one response");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection response {response:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"chatvault.v1.RestoreService"), "{names:?}");
    }

    #[tokio::test]
    async fn a_stream_that_fails_after_it_started_ends_with_an_error_and_is_recorded_again() {
        use futures::StreamExt;
        use object_store::ObjectStoreExt;
        let fixture = Fixture::new().await;
        let mut last = None;
        for batch in 0..10 {
            let events: Vec<_> = (0..10)
                .map(|i| {
                    let n = batch * 10 + i;
                    event("acme", "C1", &format!("m{n:03}"), 1_000 + n * 10)
                })
                .collect();
            last = Some(fixture.commit_batch(0, &events).await.0);
        }
        let restorer = Arc::new(
            Restorer::new(
                fixture.store.clone(),
                fixture.data_keys.clone(),
                &fixture.topic,
                1,
            )
            .with_buffer_limits(crate::stream::BufferLimits {
                events: 2,
                bytes: usize::MAX,
            }),
        );
        let mut authenticator = Authenticator::default();
        authenticator.add_token_digest(token_digest("t"), "legal", "acme", &[Role::Restore]);
        let recorder = Arc::new(MemorySink::default());
        let api = RestoreApi::new(
            restorer,
            authenticator,
            Auditor::new("restorer", recorder.clone()),
        )
        .with_max_concurrent_requests(1);
        let mut stream = api
            .get_conversation(with_token(conversation("acme", "C1"), "t"))
            .await
            .expect("planned")
            .into_inner();
        // Recorded before the first item, with the number of items the stream will have.
        let planned = recorder.take();
        assert_eq!(outcome(&planned[0]), AuditOutcome::Allowed);
        assert_eq!(planned[0].item_count, 100);
        // The stream holds its request slot while it runs.
        let shed = api
            .get_conversation(with_token(conversation("acme", "C1"), "t"))
            .await
            .err()
            .expect("slot taken");
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
        recorder.take();
        // The newest file disappears after the plan: the stream fails where it needs it.
        let last = last.expect("committed");
        fixture
            .store
            .delete(&object_store::path::Path::from(last.files[0].path.as_str()))
            .await
            .expect("delete");
        let mut served = 0;
        let error = loop {
            match stream.next().await.expect("the stream ends with an error") {
                Ok(_) => served += 1,
                Err(status) => break status,
            }
        };
        assert_eq!(served, 90, "every item before the missing file");
        assert_eq!(error.code(), tonic::Code::Internal);
        assert!(error.message().contains("missing"), "{error:?}");
        assert!(stream.next().await.is_none());
        let records = recorder.take();
        assert_eq!(records.len(), 1);
        assert_eq!(outcome(&records[0]), AuditOutcome::Error);
        assert_eq!(records[0].conversation_id, "C1", "the same call's details");
        drop(stream);
        // The slot is free again once the stream ended.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            api.get_conversation(with_token(conversation("acme", "C1"), "t"))
                .await
                .is_err_and(|status| status.code() == tonic::Code::Internal)
        );
    }

    #[tokio::test]
    async fn overload_is_shed_with_a_retryable_status() {
        let fixture = Fixture::new().await;
        let restorer = Arc::new(Restorer::new(
            fixture.store.clone(),
            fixture.data_keys.clone(),
            &fixture.topic,
            1,
        ));
        let mut authenticator = Authenticator::default();
        authenticator.add_token_digest(token_digest("t"), "legal", "acme", &[Role::Restore]);
        let sink = Arc::new(MemorySink::default());
        let api = RestoreApi::new(
            restorer,
            authenticator,
            Auditor::new("restorer", sink.clone()),
        )
        .with_max_concurrent_requests(1);
        let held = api.admit().expect("first admitted");
        let status = api
            .get_conversation(with_token(conversation("acme", "C1"), "t"))
            .await
            .err()
            .expect("shed");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        drop(held);
        assert!(
            api.get_conversation(with_token(conversation("acme", "C1"), "t"))
                .await
                .is_ok()
        );
    }

    /// Fail closed: a call whose record cannot be made durable is not served, and says why.
    #[tokio::test]
    async fn nothing_is_served_when_the_access_cannot_be_recorded() {
        let server = start().await;
        server.recorder.set_failing(true);
        let mut client = RestoreServiceClient::new(server.channel.clone());
        let status = client
            .get_conversation(with_token(conversation("acme", "C1"), "restore-token"))
            .await
            .expect_err("not served");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("audit trail"), "{status:?}");
        let status = client
            .list_conversations(with_token(
                ListConversationsRequest {
                    tenant_id: "acme".into(),
                },
                "restore-token",
            ))
            .await
            .expect_err("not served");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        // A refusal stays a refusal.
        let status = client
            .get_conversation(with_token(conversation("acme", "C1"), "ingest-token"))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        server.recorder.set_failing(false);
        client
            .list_conversations(with_token(
                ListConversationsRequest {
                    tenant_id: "acme".into(),
                },
                "restore-token",
            ))
            .await
            .expect("served again");
        assert_eq!(server.recorder.take().len(), 1, "only the recorded call");
    }
}
