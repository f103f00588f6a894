//! librdkafka settings for chatvault's clients. The settings the delivery guarantees rest on are set here,
//! explicitly, and cannot be overridden from configuration
//! ([`chatvault_core::config::PROTECTED_KAFKA_PROPERTIES`], checked when the configuration is loaded).

pub mod audit;

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::ClientConfig;

use chatvault_core::config::KafkaConfig;
use chatvault_core::error::Result;

/// What must hold for a produced record, beyond Kafka's acknowledgement, before what it carries is
/// acknowledged: an event to its sender, an audit record to the call it describes. Standalone's Kafka lives in
/// the process and dies with it, so there a record counts only once the archive holds it; a Kafka cluster
/// that outlives the process needs no condition.
pub trait AckCondition: Send + Sync {
    /// Waits until the record at `offset` of `partition` may be acknowledged; an error (retryable: the
    /// sender retries, and ids collapse the copies) when it cannot be in time.
    fn wait(&self, partition: i32, offset: i64) -> BoxFuture<'_, Result<()>>;
}

/// The conditions of a process whose Kafka does not outlive it: one for the chat events' topic, one for
/// the audit topic (each waits for its own stream's archiver).
#[derive(Clone)]
pub struct AckConditions {
    pub events: std::sync::Arc<dyn AckCondition>,
    pub audit: std::sync::Arc<dyn AckCondition>,
}

/// The gateway settings its producer is built from (`gateway.delivery_timeout`, `gateway.max_queued_events`).
#[derive(Debug, Clone, Copy)]
pub struct ProducerSettings {
    pub delivery_timeout: Duration,
    pub max_queued_events: u64,
}

/// The archiver settings its consumer is built from (`archiver.group_id`, `archiver.session_timeout`,
/// `archiver.fetch_queue_kbytes`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings<'a> {
    pub group_id: &'a str,
    pub session_timeout: Duration,
    pub fetch_queue_kbytes: u64,
}

fn base(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// The gateway's producer: idempotent, acknowledged by all in-sync replicas, bounded queue, bounded wait.
pub fn producer_config(kafka: &KafkaConfig, gateway: ProducerSettings) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            gateway.delivery_timeout.as_millis().to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            gateway.max_queued_events.to_string(),
        )
        .set("queue.buffering.max.kbytes", (256 * 1024).to_string())
        .set("linger.ms", "5")
        .set("compression.codec", "lz4")
        // Same partition for a key as Java producers use, so a mixed fleet keeps a conversation on one partition.
        .set("partitioner", "murmur2_random");
    config
}

/// The archiver's dead-letter producer: idempotent, acknowledged by all in-sync replicas; it never creates the
/// topic (the archiver checks that it exists).
pub fn dead_letter_producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("allow.auto.create.topics", "false")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5");
    config
}

/// The archiver's consumer: offsets are stored and committed only after the manifest commit, and the manifest,
/// not Kafka, is the source of truth on assignment.
pub fn consumer_config(kafka: &KafkaConfig, archiver: ConsumerSettings<'_>) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", archiver.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set(
            "session.timeout.ms",
            archiver.session_timeout.as_millis().to_string(),
        )
        .set(
            "queued.max.messages.kbytes",
            archiver.fetch_queue_kbytes.to_string(),
        )
        .set("fetch.message.max.bytes", (4 * 1024 * 1024).to_string())
        .set("enable.partition.eof", "false")
        // Feeds the consumer-lag metric (`ClientContext::stats` of the archiver).
        .set("statistics.interval.ms", "5000");
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    #[test]
    fn clients_speak_tls_and_scram() {
        // librdkafka refuses `security.protocol=sasl_ssl` when built without OpenSSL; production Kafka needs it.
        let mut kafka = KafkaConfig::default();
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "chatvault"),
            ("sasl.password", "not-a-real-password"),
        ] {
            kafka.properties.insert(key.into(), value.into());
        }
        let producer: Result<BaseProducer, _> = producer_config(
            &kafka,
            ProducerSettings {
                delivery_timeout: Duration::from_secs(10),
                max_queued_events: 1000,
            },
        )
        .create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }
}
