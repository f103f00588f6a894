//! `chatvault.v1.IngestService`.
//!
//! Contract: OK means every event of the call was acknowledged by Kafka. Validation happens before anything is
//! produced for unary and batch calls, so a rejected request produces nothing; a stream produces events as they
//! arrive and stops at the first invalid one (events before it may be archived, and a retry of the whole stream
//! collapses onto them through their event ids).
//!
//! Admission comes first ([`Admitting`], a layer around the service that sees only the headers): a call
//! without a valid bearer token (static, or a JWT of a configured OIDC issuer), or beyond
//! `gateway.max_grpc_calls` in flight, is refused before its message is read or decoded, and a message is
//! decoded only up to `gateway.max_grpc_message_bytes`.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::GatewayConfig;
use chatvault_core::audit::{AuditCall, Auditor, CallSource};
use chatvault_core::auth::{Authenticator, Principal, Role};
use chatvault_core::error::Coded;
use chatvault_core::event::validate_and_complete;
use chatvault_core::metrics::{metrics, rejection_labels, source_label};
use chatvault_core::telemetry::{grpc_server_span, record_span_error};
use chatvault_proto::v1::ingest_service_server::IngestService;
use chatvault_proto::v1::{
    ChatEvent, IngestBatchRequest, IngestBatchResponse, IngestRequest, IngestResponse, Source,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::IngestError;
use crate::producer::{EventProducer, PendingDelivery, await_all};

type Result<T, E = IngestError> = std::result::Result<T, E>;

/// Acknowledgements a single stream may have outstanding before it waits for the oldest: bounds the memory a
/// fast sender can pin.
const MAX_IN_FLIGHT_PER_STREAM: usize = 10_000;

/// Admits gRPC calls from their headers alone, before the message is read: authenticates the bearer token
/// (UNAUTHENTICATED) and takes one of `gateway.max_grpc_calls` in-flight slots (RESOURCE_EXHAUSTED when none
/// is free), held until the call ends. Installed with [`Admitting`] around the IngestService.
#[derive(Debug, Clone)]
pub struct Admission {
    authenticator: Arc<Authenticator>,
    calls: Arc<Semaphore>,
    max_calls: usize,
    /// Records the calls refused here; the service records the others.
    auditor: Auditor,
}

/// What [`Admission`] hands to the call: who it is, and its in-flight slot.
#[derive(Debug, Clone)]
struct Admitted {
    principal: Principal,
    _slot: Arc<OwnedSemaphorePermit>,
}

impl Admission {
    fn refuse(error: IngestError) -> Status {
        metrics()
            .requests_rejected
            .add(1, &rejection_labels("grpc", error.reason()));
        error.into()
    }

    /// Authenticates `authorization` (which may wait for an OIDC issuer's keys, never for the message) and
    /// takes an in-flight slot. The caller goes into `audit` as soon as it is known.
    async fn admit(&self, authorization: Option<&str>, audit: &mut AuditCall) -> Result<Admitted> {
        let principal = self.authenticator.authenticate(authorization).await?;
        audit.principal(&principal);
        let slot = self.calls.clone().try_acquire_owned().map_err(|_| {
            IngestError::Overloaded(format!(
                "the gateway is serving its limit of {} calls (gateway.max_grpc_calls); retry after a short backoff",
                self.max_calls
            ))
        })?;
        Ok(Admitted {
            principal,
            _slot: Arc::new(slot),
        })
    }
}

/// The IngestService behind [`Admission`]: each call is admitted from its headers, then handed on with its
/// admitted caller in the request's extensions; a refused call is answered with its status and its body
/// is never read.
#[derive(Debug, Clone)]
pub struct Admitting<S> {
    inner: S,
    admission: Admission,
}

impl<S> Admitting<S> {
    pub fn new(inner: S, admission: Admission) -> Admitting<S> {
        Admitting { inner, admission }
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for Admitting<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        futures::future::BoxFuture<'static, std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone waits for the next one.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        let admission = self.admission.clone();
        Box::pin(async move {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.to_str().unwrap_or_default().to_string());
            let action = request.uri().path().trim_start_matches('/').to_string();
            let mut audit = admission
                .auditor
                .call(&action, &CallSource::of_http(&request));
            audit.roles(&[Role::Ingest]);
            match admission.admit(authorization.as_deref(), &mut audit).await {
                Ok(admitted) => {
                    request.extensions_mut().insert(admitted);
                    ready.call(request).await
                }
                Err(error) => {
                    audit.refused(&error).await;
                    Ok(Admission::refuse(error).into_http())
                }
            }
        })
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Admitting<S> {
    const NAME: &'static str = S::NAME;
}

#[derive(Debug, Clone)]
pub struct IngestGrpc {
    producer: EventProducer,
    config: Arc<GatewayConfig>,
    admission: Admission,
    auditor: Auditor,
}

impl IngestGrpc {
    /// The service producing with `producer`, authenticating with `authenticator` and recording every call
    /// with `auditor`.
    pub fn new(
        producer: EventProducer,
        authenticator: Authenticator,
        config: GatewayConfig,
        auditor: Auditor,
    ) -> Self {
        let admission = Admission {
            authenticator: Arc::new(authenticator),
            calls: Arc::new(Semaphore::new(config.max_grpc_calls)),
            max_calls: config.max_grpc_calls,
            auditor: auditor.clone(),
        };
        IngestGrpc {
            producer,
            config: Arc::new(config),
            admission,
            auditor,
        }
    }

    /// What admits this service's calls (see [`Admission`], installed with [`Admitting`]).
    pub fn admission(&self) -> Admission {
        self.admission.clone()
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The caller admitted by [`Admission`], with its in-flight slot (keep it for the call's duration); served
    /// without [`Admitting`], the call is admitted here instead.
    async fn caller<T>(&self, request: &mut Request<T>, audit: &mut AuditCall) -> Result<Admitted> {
        match request.extensions_mut().remove::<Admitted>() {
            Some(admitted) => {
                audit.principal(&admitted.principal);
                Ok(admitted)
            }
            None => {
                let authorization = request
                    .metadata()
                    .get("authorization")
                    .map(|value| value.to_str().unwrap_or_default().to_string());
                self.admission.admit(authorization.as_deref(), audit).await
            }
        }
    }

    /// Starts the record of a call of `method`.
    fn audit<T>(&self, method: &str, request: &Request<T>) -> AuditCall {
        let mut audit = self.auditor.call(
            &format!("{INGEST_SERVICE}/{method}"),
            &CallSource::of_grpc(request),
        );
        audit.roles(&[Role::Ingest]);
        audit
    }

    /// Finishes `audit` with the call's outcome. A served call whose record cannot be made durable fails
    /// (UNAVAILABLE: its events are in Kafka, and the sender's retry collapses onto them by event id).
    async fn recorded<T>(
        audit: AuditCall,
        result: Result<T>,
        events: impl FnOnce(&T) -> usize,
    ) -> Result<T> {
        match result {
            Ok(value) => {
                audit
                    .allowed(events(&value) as u64, 0)
                    .await
                    .map_err(IngestError::from)?;
                Ok(value)
            }
            Err(error) => {
                audit.refused(&error).await;
                Err(error)
            }
        }
    }

    /// Validates, completes and authorizes one event. `field_prefix` names it in errors (`events[3].`).
    fn admit(
        &self,
        principal: &Principal,
        event: Option<ChatEvent>,
        field_prefix: &str,
    ) -> Result<ChatEvent> {
        let mut event = event
            .ok_or_else(|| IngestError::InvalidEvent(format!("{field_prefix}event is required")))?;
        validate_and_complete(&mut event, Source::Grpc, &self.config.limits).map_err(|error| {
            IngestError::InvalidEvent(format!("{field_prefix}{}", error.message()))
        })?;
        principal.require(&event.tenant_id, Role::Ingest)?;
        Ok(event)
    }
}

const INGEST_SERVICE: &str = "chatvault.v1.IngestService";

/// The tenant every event names, when they all name the same one (the record's `tenant_id`).
fn single_tenant(events: &[ChatEvent]) -> Option<&str> {
    let first = events.first()?.tenant_id.as_str();
    events
        .iter()
        .all(|event| event.tenant_id == first)
        .then_some(first)
}

/// Records a call's outcome in its span and in the accepted/rejected counters.
fn finish_call(span: &tracing::Span, result: std::result::Result<usize, &IngestError>) {
    match result {
        Ok(events) => {
            span.record("events", events);
            metrics()
                .events_accepted
                .add(events as u64, &source_label("grpc"));
        }
        Err(error) => {
            record_span_error(span, error.code());
            metrics()
                .requests_rejected
                .add(1, &rejection_labels("grpc", error.reason()));
        }
    }
}

impl IngestGrpc {
    /// Authenticates, validates and authorizes the event of an `Ingest` call (nothing is produced yet).
    async fn admit_one(
        &self,
        mut request: Request<IngestRequest>,
        audit: &mut AuditCall,
    ) -> Result<(Admitted, Vec<ChatEvent>)> {
        let caller = self.caller(&mut request, audit).await?;
        let event = request.into_inner().event;
        if let Some(event) = &event {
            audit.tenant(&event.tenant_id);
        }
        let event = self.admit(&caller.principal, event, "")?;
        Ok((caller, vec![event]))
    }

    /// Authenticates, validates and authorizes the events of an `IngestBatch` call (nothing is produced yet).
    async fn admit_many(
        &self,
        mut request: Request<IngestBatchRequest>,
        audit: &mut AuditCall,
    ) -> Result<(Admitted, Vec<ChatEvent>)> {
        let caller = self.caller(&mut request, audit).await?;
        let principal = &caller.principal;
        let events = request.into_inner().events;
        if let Some(tenant) = single_tenant(&events) {
            audit.tenant(tenant);
        }
        if events.is_empty() {
            return Err(IngestError::malformed("events must not be empty"));
        }
        if events.len() > self.config.max_batch_events {
            return Err(IngestError::malformed(format!(
                "events has {} items, over the limit of {} per batch",
                events.len(),
                self.config.max_batch_events
            )));
        }
        let admitted = events
            .into_iter()
            .enumerate()
            .map(|(index, event)| self.admit(principal, Some(event), &format!("events[{index}].")))
            .collect::<Result<Vec<_>>>()?;
        Ok((caller, admitted))
    }

    /// Produces the admitted events of a call and, at the same time, its audit record: the call is answered
    /// once both are durable, so the record costs no round trip of its own. When the events then fail, the
    /// call gets a second record, as an error (the first says it was allowed); when only the record fails,
    /// the call fails with UNAVAILABLE (its events are in Kafka, and the sender's retry collapses onto them
    /// by event id). A call refused before producing is recorded as refused.
    async fn produce_recorded(
        &self,
        audit: AuditCall,
        admitted: Result<(Admitted, Vec<ChatEvent>)>,
    ) -> Result<Vec<String>> {
        let (caller, events) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => {
                audit.refused(&error).await;
                return Err(error);
            }
        };
        let failure_record = audit.copy();
        let (produced, recorded) = tokio::join!(
            self.producer.produce_all(&events),
            audit.allowed(events.len() as u64, 0)
        );
        // The in-flight slot is held until the events are acknowledged.
        drop(caller);
        if let Err(error) = produced {
            let error = IngestError::from(error);
            failure_record.refused(&error).await;
            return Err(error);
        }
        recorded.map_err(IngestError::from)?;
        Ok(events.into_iter().map(|event| event.event_id).collect())
    }

    async fn ingest_streamed(
        &self,
        mut request: Request<Streaming<IngestRequest>>,
        audit: &mut AuditCall,
    ) -> Result<IngestBatchResponse> {
        let caller = self.caller(&mut request, audit).await?;
        let principal = &caller.principal;
        let mut stream = request.into_inner();
        let produce = self.producer.start_produce(0);
        let mut in_flight: VecDeque<PendingDelivery> = VecDeque::new();
        let mut event_ids = Vec::new();
        let mut index = 0usize;
        let outcome: Result<()> = async {
            while let Some(message) = stream.next().await {
                let message = message.map_err(|status| {
                    IngestError::malformed(format!("reading the stream: {}", status.message()))
                })?;
                let event = self.admit(principal, message.event, &format!("stream[{index}]."))?;
                index += 1;
                if in_flight.len() >= MAX_IN_FLIGHT_PER_STREAM
                    && let Some(oldest) = in_flight.pop_front()
                {
                    oldest.acknowledged().await?;
                }
                in_flight.push_back(self.producer.enqueue(&event, &produce.headers)?);
                event_ids.push(event.event_id);
            }
            Ok(())
        }
        .await;
        let acknowledged = await_all(in_flight).await;
        let result = outcome.and(acknowledged.map_err(IngestError::from));
        produce.span.record("messaging.batch.message_count", index);
        produce.finish(&result);
        result?;
        Ok(IngestBatchResponse { event_ids })
    }
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let span = grpc_server_span(INGEST_SERVICE, "Ingest", request.metadata());
        let mut audit = self.audit("Ingest", &request);
        let result = async {
            let admitted = self.admit_one(request, &mut audit).await;
            self.produce_recorded(audit, admitted).await
        }
        .instrument(span.clone())
        .await
        .map(|mut ids| IngestResponse {
            event_id: ids.pop().unwrap_or_default(),
        });
        finish_call(&span, result.as_ref().map(|_| 1));
        Ok(Response::new(result?))
    }

    async fn ingest_batch(
        &self,
        request: Request<IngestBatchRequest>,
    ) -> Result<Response<IngestBatchResponse>, Status> {
        let span = grpc_server_span(INGEST_SERVICE, "IngestBatch", request.metadata());
        let mut audit = self.audit("IngestBatch", &request);
        let result = async {
            let admitted = self.admit_many(request, &mut audit).await;
            self.produce_recorded(audit, admitted).await
        }
        .instrument(span.clone())
        .await
        .map(|event_ids| IngestBatchResponse { event_ids });
        finish_call(
            &span,
            result.as_ref().map(|response| response.event_ids.len()),
        );
        Ok(Response::new(result?))
    }

    async fn ingest_stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestBatchResponse>, Status> {
        let span = grpc_server_span(INGEST_SERVICE, "IngestStream", request.metadata());
        let mut audit = self.audit("IngestStream", &request);
        let result = self
            .ingest_streamed(request, &mut audit)
            .instrument(span.clone())
            .await;
        let result = Self::recorded(audit, result, |response| response.event_ids.len()).await;
        finish_call(
            &span,
            result.as_ref().map(|response| response.event_ids.len()),
        );
        Ok(Response::new(result?))
    }
}
