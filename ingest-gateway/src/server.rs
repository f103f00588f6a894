//! The gateway's gRPC server: IngestService, `grpc.health.v1` and server reflection, with graceful shutdown.
//!
//! Shutdown order: health flips to NOT_SERVING, the server stops accepting and drains in-flight calls (each
//! waits for its Kafka acknowledgements), then the producer is flushed.

use std::time::Duration;

use chatvault_core::error::{Error, Result};
use chatvault_core::shutdown::Shutdown;
use chatvault_proto::v1::FILE_DESCRIPTOR_SET;
use chatvault_proto::v1::ingest_service_server::IngestServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::grpc::IngestGrpc;
use crate::producer::EventProducer;

/// Largest accepted gRPC message: a batch call of `max_batch_events` events must fit.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub async fn serve(
    listener: TcpListener,
    service: IngestGrpc,
    producer: EventProducer,
    shutdown: Shutdown,
    drain_timeout: Duration,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IngestServiceServer<IngestGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| Error::internal(format!("reflection: {error}")))?;
    let ingest =
        IngestServiceServer::new(service).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);

    let stop = {
        let shutdown = shutdown.clone();
        let health_reporter = health_reporter.clone();
        async move {
            shutdown.wait().await;
            health_reporter
                .set_not_serving::<IngestServiceServer<IngestGrpc>>()
                .await;
            tracing::info!("gateway shutting down: draining in-flight calls");
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ingest)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop);
    let drained = async {
        shutdown.clone().wait().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        result = server => result.map_err(|error| Error::internal(format!("gateway server: {error}")))?,
        _ = drained => tracing::warn!("gateway drain deadline passed; abandoning in-flight calls"),
    }
    let flush_producer = producer.clone();
    let flushed = tokio::task::spawn_blocking(move || flush_producer.flush(Duration::from_secs(5)))
        .await
        .map_err(|error| Error::internal(format!("flush task: {error}")))?;
    if let Err(error) = flushed {
        // Every call that got OK was acknowledged already; what remains queued belongs to calls that failed.
        tracing::warn!(%error, "events still queued at shutdown were not acknowledged");
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The whole gateway from its configuration: gRPC on `grpc_listener`, webhooks and `/healthz` on
/// `http_listener`, one producer and one shutdown for both.
pub async fn run(
    config: &chatvault_core::config::Config,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: Shutdown,
) -> Result<()> {
    let producer = EventProducer::new(&config.kafka, &config.gateway)?;
    let integrations = config
        .gateway
        .webhooks
        .iter()
        .map(crate::webhooks::Integration::from_config)
        .collect::<Result<Vec<_>>>()?;
    let webhooks = std::sync::Arc::new(crate::webhooks::server::WebhookService::new(
        integrations,
        producer.clone(),
        config.gateway.limits.clone(),
        config.gateway.max_webhook_body_bytes,
        config.gateway.webhook_replay_window_secs,
    ));
    let drain = Duration::from_millis(config.gateway.drain_timeout_ms);
    let service = IngestGrpc::new(
        producer.clone(),
        config.authenticator()?,
        config.gateway.clone(),
    );
    let grpc = serve(grpc_listener, service, producer, shutdown.clone(), drain);
    let http = crate::webhooks::server::serve_http(http_listener, webhooks, shutdown, drain);
    let (grpc, http) = tokio::join!(grpc, http);
    grpc?;
    http
}
