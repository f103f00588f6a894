//! The gateway's gRPC server: IngestService, `grpc.health.v1` and server reflection, with graceful shutdown.
//!
//! Shutdown order ([`run`]): health flips to NOT_SERVING (the IngestService and the server, `""`), both
//! listeners keep serving for `gateway.shutdown_delay` so load balancers and health-checking clients move
//! away, then they stop accepting and drain in-flight calls and webhooks (each waits for its Kafka
//! acknowledgements) for up to `gateway.drain_timeout`, then the producer is flushed. A call abandoned at the
//! drain deadline never got its OK, so the sender retries it: nothing acknowledged is lost.

use std::time::Duration;

use chatvault_core::error::{Error, Result};
use chatvault_core::grpc::{CommonServices, GrpcHealth, serve_health};
use chatvault_core::shutdown::{self, Shutdown};
use chatvault_proto::v1::ingest_service_server::IngestServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_server::Health;
use tonic_reflection::server::v1::ServerReflection;

use crate::grpc::IngestGrpc;
use crate::producer::EventProducer;

/// Largest header block a gRPC call may send (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE): the token, trace
/// context and the usual gRPC headers fit many times over.
const MAX_GRPC_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The gRPC server alone, without a delay between NOT_SERVING and refusing new calls (benchmarks; the gateway
/// is [`run`]): serves until `shutdown`, drains for up to `drain_timeout`, flushes the producer.
pub async fn serve(
    listener: TcpListener,
    service: IngestGrpc,
    producer: EventProducer,
    shutdown: Shutdown,
    drain_timeout: Duration,
) -> Result<()> {
    let common = serve_health::<IngestServiceServer<IngestGrpc>>().await?;
    let (stop_accepting, sequence) =
        not_serving_then_stop(shutdown, common.health.clone(), Duration::ZERO);
    let served = serve_grpc(listener, service, common, stop_accepting, drain_timeout).await;
    sequence.abort();
    flush(&producer).await;
    served
}

/// At `shutdown`: reports NOT_SERVING, waits `delay`, then fires the returned signal, on which the listeners
/// stop accepting.
fn not_serving_then_stop(
    shutdown: Shutdown,
    health: GrpcHealth,
    delay: Duration,
) -> (Shutdown, JoinHandle<()>) {
    let (trigger, stop_accepting) = shutdown::channel();
    let sequence = tokio::spawn(async move {
        shutdown.wait().await;
        health
            .not_serving::<IngestServiceServer<IngestGrpc>>()
            .await;
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "gateway shutting down: health reports NOT_SERVING; still serving for gateway.shutdown_delay"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("gateway stops accepting; draining in-flight calls");
        trigger.trigger();
    });
    (stop_accepting, sequence)
}

/// Serves gRPC until `stop_accepting`, then lets in-flight calls finish for up to `drain_timeout`.
async fn serve_grpc(
    listener: TcpListener,
    service: IngestGrpc,
    common: CommonServices<impl Health, impl ServerReflection>,
    stop_accepting: Shutdown,
    drain_timeout: Duration,
) -> Result<()> {
    let config = service.config().clone();
    let admission = service.admission();
    // Admission sees the headers before the message is read: an unauthenticated call, or one beyond
    // gateway.max_grpc_calls, never gets its message decoded.
    let ingest = crate::grpc::Admitting::new(
        IngestServiceServer::new(service).max_decoding_message_size(config.max_grpc_message_bytes),
        admission,
    );
    let keepalive =
        (!config.grpc_keepalive_interval.is_zero()).then_some(config.grpc_keepalive_interval);
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(config.grpc_max_concurrent_streams)
        .concurrency_limit_per_connection(config.grpc_concurrency_limit_per_connection)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(config.grpc_keepalive_timeout))
        .http2_max_header_list_size(MAX_GRPC_HEADER_LIST_BYTES)
        .add_service(common.health_service)
        .add_service(common.reflection)
        .add_service(ingest)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop_accepting.clone().wait(),
        );
    match shutdown::drain(stop_accepting, drain_timeout, server).await {
        Some(result) => {
            result.map_err(|error| Error::internal(format!("gateway server: {error}")))?
        }
        None => tracing::warn!(
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            "gateway drain deadline passed; abandoning in-flight gRPC calls (their senders got no OK)"
        ),
    }
    Ok(())
}

/// Waits for the producer's queue to empty. Every call that got OK was acknowledged already; what remains
/// belongs to calls that failed or were abandoned.
async fn flush(producer: &EventProducer) {
    let producer = producer.clone();
    match tokio::task::spawn_blocking(move || producer.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "events still queued at shutdown were not acknowledged")
        }
        Err(error) => tracing::warn!(%error, "flushing the producer failed"),
    }
}

/// The whole gateway from the shared settings and its `[gateway]` section: gRPC on `grpc_listener`, webhooks and `/healthz` on
/// `http_listener`, one producer and one shutdown sequence for both (see the module documentation). Events
/// are acknowledged once Kafka acknowledged them and, when given, `ack_conditions.events` holds (standalone:
/// archived); audit records count as durable likewise, with `ack_conditions.audit`.
pub async fn run(
    shared: &chatvault_core::config::SharedConfig,
    config: &crate::config::GatewayConfig,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    ack_conditions: Option<chatvault_kafka::AckConditions>,
    shutdown: Shutdown,
) -> Result<()> {
    let mut producer = EventProducer::new(&shared.kafka, config)?;
    let mut audit_sink = chatvault_kafka::audit::KafkaAuditSink::connect(&shared.kafka)?;
    if let Some(conditions) = ack_conditions {
        producer = producer.with_ack_condition(conditions.events);
        audit_sink = audit_sink.with_ack_condition(conditions.audit);
    }
    let integrations = config
        .webhooks
        .iter()
        .map(|webhook| {
            crate::webhooks::Integration::from_config(webhook).map(|integration| {
                integration.remembering(
                    config.webhook_redelivery_cache_size,
                    config.webhook_redelivery_window,
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Every gRPC call and webhook request leaves one audit record on the audit topic (fail closed: see
    // chatvault_core::audit).
    let audit_sink = std::sync::Arc::new(audit_sink);
    let auditor = chatvault_core::audit::Auditor::new("gateway", audit_sink.clone());
    let webhooks = std::sync::Arc::new(crate::webhooks::server::WebhookService::from_config(
        integrations,
        producer.clone(),
        config,
        shared.authenticator()?,
        auditor.clone(),
    ));
    let drain = config.drain_timeout;
    let service = IngestGrpc::new(
        producer.clone(),
        shared.authenticator()?,
        config.clone(),
        auditor,
    );
    let common = serve_health::<IngestServiceServer<IngestGrpc>>().await?;
    let (stop_accepting, sequence) =
        not_serving_then_stop(shutdown, common.health.clone(), config.shutdown_delay);
    let grpc = serve_grpc(
        grpc_listener,
        service,
        common,
        stop_accepting.clone(),
        drain,
    );
    let http = crate::webhooks::server::serve_http(http_listener, webhooks, stop_accepting, drain);
    let (grpc, http) = tokio::join!(grpc, http);
    sequence.abort();
    // Both listeners are drained: nothing can enqueue any more.
    flush(&producer).await;
    audit_sink.flush(config.producer_flush_timeout);
    tracing::info!("gateway stopped");
    grpc?;
    http
}
