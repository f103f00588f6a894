//! librdkafka's mock cluster: a Kafka-protocol broker on loopback TCP, in-process. Not durable; enough for
//! produce, consumer groups and offset commits. Set `CHATVAULT_TEST_KAFKA_BROKERS` to run against a real
//! broker instead (the topic and its dead-letter topic must then exist).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

pub struct TestKafka {
    pub brokers: String,
    // Keeps the mock cluster alive; `None` with an external broker.
    _cluster: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl TestKafka {
    /// A mock cluster of 3 brokers with `topic` of `partitions` partitions, its dead-letter topic
    /// (`<topic>.dead-letter`) and its audit topic (`<topic>.audit`), one partition each.
    pub fn start(topic: &str, partitions: i32) -> anyhow::Result<TestKafka> {
        if let Ok(brokers) = std::env::var("CHATVAULT_TEST_KAFKA_BROKERS") {
            return Ok(TestKafka {
                brokers,
                _cluster: None,
            });
        }
        let cluster = MockCluster::new(3)?;
        cluster.create_topic(topic, partitions, 3)?;
        cluster.create_topic(&format!("{topic}.dead-letter"), 1, 3)?;
        cluster.create_topic(&format!("{topic}.audit"), 1, 3)?;
        Ok(TestKafka {
            brokers: cluster.bootstrap_servers(),
            _cluster: Some(cluster),
        })
    }
}

/// Sum of the high watermarks of `topic`'s partitions: how many records were ever produced to it.
pub fn record_count(brokers: &str, topic: &str) -> anyhow::Result<i64> {
    Ok(high_watermarks(brokers, topic)?
        .iter()
        .map(|(_, high)| high)
        .sum())
}

/// `(partition, high watermark)` of every partition of `topic`.
pub fn high_watermarks(brokers: &str, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "chatvault-test-inspector")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut out = Vec::new();
    for topic_metadata in metadata.topics() {
        for partition in topic_metadata.partitions() {
            let (_, high) =
                consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
            out.push((partition.id(), high));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `(partition, committed offset)` of `group` for every partition of `topic`; `None` where the group committed
/// nothing. Reads the group's offsets without joining it.
pub fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut partitions = rdkafka::TopicPartitionList::new();
    for (partition, _) in high_watermarks(brokers, topic)? {
        partitions.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    let mut out: Vec<(i32, Option<i64>)> = committed
        .elements()
        .iter()
        .map(|element| (element.partition(), element.offset().to_raw()))
        .map(|(partition, raw)| (partition, raw.filter(|offset| *offset >= 0)))
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// The payloads of every record of `topic` produced so far (up to the high watermarks when called), partition
/// by partition in offset order. Reads by assignment, so it joins no group and commits nothing.
pub fn read_topic(brokers: &str, topic: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let ends = high_watermarks(brokers, topic)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "chatvault-test-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut payloads = Vec::new();
    for (partition, end) in ends {
        if end == 0 {
            continue;
        }
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut next = 0;
        while next < end {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{topic}[{partition}]: read {next} of {end} records in 30 s"
            );
            if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                let message = message?;
                next = rdkafka::Message::offset(&message) + 1;
                payloads.push(
                    rdkafka::Message::payload(&message)
                        .unwrap_or_default()
                        .to_vec(),
                );
            }
        }
    }
    Ok(payloads)
}
