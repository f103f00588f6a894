//! The dead-letter topic: where records that can never be archived go, before the batch holding them commits
//! them as rejected records (with their reason and this copy's coordinates).
//!
//! A record is dead-lettered for a permanent reason only: it is not a `chatvault.v1.ChatEvent`, its tenant id
//! is invalid, or its tenant has no key-encryption key and none can be created (a read-only keyring). Transient
//! failures (storage or the key provider unreachable) are retried instead. The copy keeps the record's key and
//! value (for events the archiver decoded, the value is the event re-encoded: equal as a message, though
//! fields unknown to this version are not kept) and headers naming its source topic, partition and offset and
//! the reason, so an operator can inspect it and, once the cause is fixed, produce it to the topic again (the
//! event id makes a replay collapse onto anything archived meanwhile).
//!
//! The copy lives in Kafka rather than in the bucket: it could not be encrypted under the tenant's key (that
//! is often why it is here), and Kafka already holds it in the same form.

use std::time::Duration;

use chatvault_archive::manifest::DeadLetter;
use chatvault_core::config::KafkaConfig;
use chatvault_core::error::{Error, Result};
use chatvault_kafka::dead_letter_producer_config;
use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::batch::Rejected;

/// Where rejected records are copied before their batch commits them: the dead-letter topic in production
/// ([`DeadLetterProducer`]), a recorder in tests.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Copies `rejected` (from `partition` of `source_topic`) and returns where the copy is.
    fn produce<'a>(
        &'a self,
        source_topic: &'a str,
        partition: i32,
        rejected: &'a Rejected,
    ) -> BoxFuture<'a, Result<DeadLetter>>;
}

impl DeadLetterSink for DeadLetterProducer {
    fn produce<'a>(
        &'a self,
        source_topic: &'a str,
        partition: i32,
        rejected: &'a Rejected,
    ) -> BoxFuture<'a, Result<DeadLetter>> {
        Box::pin(DeadLetterProducer::produce(
            self,
            source_topic,
            partition,
            rejected,
        ))
    }
}

/// Headers of a dead-lettered record.
pub const SOURCE_TOPIC_HEADER: &str = "chatvault-source-topic";
pub const SOURCE_PARTITION_HEADER: &str = "chatvault-source-partition";
pub const SOURCE_OFFSET_HEADER: &str = "chatvault-source-offset";
pub const REASON_HEADER: &str = "chatvault-rejected-reason";

#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for DeadLetterProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl DeadLetterProducer {
    /// A producer for `topic`, which must exist: checked here, so a missing topic stops the archiver at start
    /// with the remedy instead of stalling it at the first rejected record.
    pub fn connect(kafka: &KafkaConfig, topic: &str) -> Result<DeadLetterProducer> {
        let producer: FutureProducer = dead_letter_producer_config(kafka)
            .create()
            .map_err(|error| Error::invalid_argument(format!("kafka producer: {error}")))?;
        let metadata = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|error| {
                Error::unavailable(format!(
                    "reading the metadata of the dead-letter topic {topic}: {error}"
                ))
            })?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(Error::invalid_argument(format!(
                "archiver.dead_letter_topic: topic {topic} does not exist; create it (same replication as \
                 kafka.topic, retention at least as long) so records that can never be archived are kept"
            )));
        }
        Ok(DeadLetterProducer {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Produces `rejected` (from `source_topic`/`partition`) and waits for the broker's acknowledgement.
    pub async fn produce(
        &self,
        source_topic: &str,
        partition: i32,
        rejected: &Rejected,
    ) -> Result<DeadLetter> {
        let source_partition = partition.to_string();
        let source_offset = rejected.offset.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: SOURCE_TOPIC_HEADER,
                value: Some(source_topic),
            })
            .insert(Header {
                key: SOURCE_PARTITION_HEADER,
                value: Some(&source_partition),
            })
            .insert(Header {
                key: SOURCE_OFFSET_HEADER,
                value: Some(&source_offset),
            })
            .insert(Header {
                key: REASON_HEADER,
                value: Some(&rejected.reason),
            });
        let mut record = FutureRecord::to(&self.topic)
            .payload(&rejected.value)
            .headers(headers);
        if let Some(key) = &rejected.key {
            record = record.key(key);
        }
        match self.producer.send(record, Duration::from_secs(10)).await {
            Ok(delivery) => Ok(DeadLetter {
                topic: self.topic.clone(),
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((error, _)) => Err(Error::unavailable(format!(
                "producing a rejected record to the dead-letter topic {}: {error}",
                self.topic
            ))),
        }
    }
}
