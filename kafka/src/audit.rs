//! The audit trail's Kafka sink: each record is produced to `kafka.audit_topic`, keyed by tenant, by an
//! idempotent producer acknowledged by all in-sync replicas, and [`AuditSink::record`] returns only once the
//! broker acknowledged it (and, in standalone, once the audit trail's archiver committed it: see
//! [`KafkaAuditSink::with_ack_condition`]). Records never share the chat events' topic.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use chatvault_core::audit::{AuditRecord, AuditSink};
use chatvault_core::config::KafkaConfig;
use chatvault_core::error::{Error, ErrorCode, Result};

use crate::{AckCondition, ProducerSettings, producer_config};

/// How long a record may wait for the broker before the call it describes fails.
const AUDIT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaAuditSink {
    producer: FutureProducer,
    topic: String,
    /// Holds before a record counts as durable (standalone: once archived).
    condition: Option<Arc<dyn AckCondition>>,
}

impl std::fmt::Debug for KafkaAuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAuditSink")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaAuditSink {
    /// A producer for `kafka`'s audit topic.
    pub fn connect(kafka: &KafkaConfig) -> Result<KafkaAuditSink> {
        let mut config = producer_config(
            kafka,
            ProducerSettings {
                delivery_timeout: AUDIT_DELIVERY_TIMEOUT,
                max_queued_events: 100_000,
            },
        );
        // Each call waits for its record: a short linger keeps that wait close to the broker's round trip
        // (the events' producer lingers 5 ms to batch; concurrent calls still share requests).
        config.set("linger.ms", "1");
        config.set("socket.nagle.disable", "true");
        let producer: FutureProducer = config.create().map_err(|error| {
            Error::caused_by(ErrorCode::InvalidArgument, "kafka audit producer", error)
        })?;
        Ok(KafkaAuditSink {
            producer,
            topic: kafka.audit_topic(),
            condition: None,
        })
    }

    /// A record counts as durable only once `condition` holds for it too (standalone, whose Kafka dies with
    /// the process: once the audit trail's archiver committed it).
    pub fn with_ack_condition(mut self, condition: Arc<dyn AckCondition>) -> KafkaAuditSink {
        self.condition = Some(condition);
        self
    }

    /// Waits up to `timeout` for records still queued (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "audit records still queued at shutdown were not delivered");
        }
    }
}

impl AuditSink for KafkaAuditSink {
    fn record(&self, record: AuditRecord) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let payload = record.encode_to_vec();
            let delivery = self
                .producer
                .send(
                    FutureRecord::to(&self.topic)
                        .key(&record.tenant_id)
                        .payload(&payload),
                    AUDIT_DELIVERY_TIMEOUT,
                )
                .await;
            let (partition, offset) = match delivery {
                Ok(delivery) => (delivery.partition, delivery.offset),
                Err((error, _)) => {
                    return Err(Error::caused_by(
                        ErrorCode::Unavailable,
                        format!("producing an audit record to {}", self.topic),
                        error,
                    ));
                }
            };
            match &self.condition {
                Some(condition) => condition.wait(partition, offset).await,
                None => Ok(()),
            }
        })
    }
}
