//! Produces validated events to Kafka.
//!
//! The record key is `<tenant>/<conversation>` so a conversation keeps its order on one partition; the value is
//! the protobuf-encoded `ChatEvent`. A produce succeeds only when the broker acknowledged the record with
//! `acks=all` (idempotent producer, see `chatvault_kafka::producer_config`), and, where the deployment
//! sets one, once an [`AckCondition`] holds for the record (standalone: once it is archived).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatvault_core::config::KafkaConfig;

use crate::config::GatewayConfig;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::event::kafka_key;
use chatvault_core::metrics::{KeyValue, metrics};
use chatvault_core::telemetry::propagation_headers;
pub use chatvault_kafka::AckCondition;
use chatvault_kafka::{ProducerSettings, producer_config};
use chatvault_proto::v1::ChatEvent;
use prost::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tracing::Instrument;

/// Kafka header naming the record's value schema, so foreign consumers know what they read.
pub const SCHEMA_HEADER: &str = "chatvault-schema";
pub const SCHEMA_NAME: &str = "chatvault.v1.ChatEvent";

/// A produce that was accepted into librdkafka's queue and now waits for the broker's acknowledgement.
pub struct PendingDelivery {
    future: DeliveryFuture,
    condition: Option<Arc<dyn AckCondition>>,
}

impl PendingDelivery {
    /// Waits for the acknowledgement (and the [`AckCondition`], if any). UNAVAILABLE when the record could not
    /// be delivered within the delivery timeout (broker unreachable) or the producer shut down.
    pub async fn acknowledged(self) -> Result<()> {
        let (partition, offset) = match self.future.await {
            Ok(Ok(delivery)) => (delivery.partition, delivery.offset),
            Ok(Err((error, _message))) => return Err(map_kafka_error(&error)),
            Err(_canceled) => {
                return Err(Error::unavailable(
                    "the gateway is shutting down; the event was not acknowledged",
                ));
            }
        };
        match &self.condition {
            Some(condition) => condition.wait(partition, offset).await,
            None => Ok(()),
        }
    }
}

#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer,
    topic: String,
    condition: Option<Arc<dyn AckCondition>>,
    flush_timeout: Duration,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl EventProducer {
    pub fn new(kafka: &KafkaConfig, gateway: &GatewayConfig) -> Result<EventProducer> {
        let producer: FutureProducer = producer_config(
            kafka,
            ProducerSettings {
                delivery_timeout: gateway.delivery_timeout,
                max_queued_events: gateway.max_queued_events,
            },
        )
        .create()
        .map_err(|error| Error::invalid_argument(format!("kafka producer: {error}")))?;
        Ok(EventProducer {
            producer,
            topic: kafka.topic.clone(),
            condition: None,
            flush_timeout: gateway.producer_flush_timeout,
        })
    }

    /// Acknowledges events only once `condition` holds for their records (see [`AckCondition`]).
    pub fn with_ack_condition(mut self, condition: Arc<dyn AckCondition>) -> EventProducer {
        self.condition = Some(condition);
        self
    }

    /// Enqueues `event` without waiting: RESOURCE_EXHAUSTED when librdkafka's queue is full (the caller should
    /// back off), INVALID_ARGUMENT when it is too large for Kafka. `trace` is the produce span's propagation
    /// headers ([`ProduceSpan::headers`]), copied into the record so the archiver continues the trace.
    pub fn enqueue(
        &self,
        event: &ChatEvent,
        trace: &[(String, String)],
    ) -> Result<PendingDelivery> {
        let key = kafka_key(&event.tenant_id, &event.conversation_id);
        let payload = event.encode_to_vec();
        let mut headers = OwnedHeaders::new_with_capacity(1 + trace.len()).insert(Header {
            key: SCHEMA_HEADER,
            value: Some(SCHEMA_NAME),
        });
        for (name, value) in trace {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: Some(value.as_str()),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        match self.producer.send_result(record) {
            Ok(future) => Ok(PendingDelivery {
                future,
                condition: self.condition.clone(),
            }),
            Err((error, _record)) => Err(map_kafka_error(&error)),
        }
    }

    /// Starts the produce of one request's events (a span, and the clock of the produce latency).
    pub fn start_produce(&self, events: usize) -> ProduceSpan {
        let span = tracing::info_span!(
            "kafka.produce",
            otel.name = format!("{} publish", self.topic),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "publish",
            messaging.destination.name = %self.topic,
            messaging.batch.message_count = events,
            otel.status_code = tracing::field::Empty,
        );
        let headers = propagation_headers(&span);
        ProduceSpan {
            span,
            headers,
            started: Instant::now(),
        }
    }

    /// Enqueues `event` and waits for Kafka's acknowledgement.
    pub async fn produce(&self, event: &ChatEvent) -> Result<()> {
        self.produce_all(std::slice::from_ref(event)).await
    }

    /// Enqueues every event, then waits for all acknowledgements. When enqueueing fails part-way (queue full),
    /// what was queued is still awaited before the error returns: it may well be archived, and a retry of the
    /// whole request collapses onto it through the event ids.
    pub async fn produce_all(&self, events: &[ChatEvent]) -> Result<()> {
        let produce = self.start_produce(events.len());
        let mut pending = Vec::with_capacity(events.len());
        let mut enqueue_error = None;
        for event in events {
            match self.enqueue(event, &produce.headers) {
                Ok(delivery) => pending.push(delivery),
                Err(error) => {
                    enqueue_error = Some(error);
                    break;
                }
            }
        }
        let span = produce.span.clone();
        let acknowledged = await_all(pending).instrument(span).await;
        let result = match enqueue_error {
            Some(error) => Err(error),
            None => acknowledged,
        };
        produce.finish(&result);
        result
    }

    /// Waits up to `gateway.producer_flush_timeout` for every queued event to be acknowledged (at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.producer
            .flush(self.flush_timeout)
            .map_err(|error| map_kafka_error(&error))
    }
}

/// One request's produce: its span (whose context travels in the records' headers) and its start time.
pub struct ProduceSpan {
    pub span: tracing::Span,
    /// Propagation headers of `span`; empty when traces are off.
    pub headers: Vec<(String, String)>,
    started: Instant,
}

impl ProduceSpan {
    /// Records the produce latency and outcome, and ends the span.
    pub fn finish<T, E>(self, result: &std::result::Result<T, E>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics().produce_duration.record(
            self.started.elapsed().as_secs_f64(),
            &[KeyValue::new("outcome", outcome)],
        );
        if result.is_err() {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

/// Waits for every acknowledgement; the first failure, if any, is the result.
pub async fn await_all(pending: impl IntoIterator<Item = PendingDelivery>) -> Result<()> {
    let results =
        futures::future::join_all(pending.into_iter().map(PendingDelivery::acknowledged)).await;
    results.into_iter().collect()
}

/// Maps librdkafka failures to the error classes senders act on.
pub fn map_kafka_error(error: &KafkaError) -> Error {
    let code = error.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::QueueFull) => Error::new(
            ErrorCode::ResourceExhausted,
            "the gateway's Kafka queue is full; retry after a short backoff",
        ),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => Error::invalid_argument(
            "event is larger than the Kafka topic accepts (max.message.bytes)",
        ),
        Some(RDKafkaErrorCode::MessageTimedOut) => Error::unavailable(
            "Kafka did not acknowledge the event within the delivery timeout; retry later",
        ),
        _ => Error::unavailable(format!("Kafka could not take the event: {error}")),
    }
}
