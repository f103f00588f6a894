//! An archive that is ahead of Kafka: the topic was deleted and recreated under the same name (or a cluster lost
//! acknowledged records), so new records get offsets the manifest chain already covers. Consuming would skip
//! them as archived; the archiver must halt the partition instead, leaving the records in Kafka.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chatvault_archive::chain::ChainReader;
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::{ChatEvent, EventKind, IngestBatchRequest, Sender};
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, TOPIC, authorized, ingest_client, start_archiver, start_gateway, test_config,
    wait_until,
};
use chatvault_testkit::s3::S3Server;

fn events(first: usize, count: usize) -> Vec<ChatEvent> {
    (first..first + count)
        .map(|index| ChatEvent {
            tenant_id: "acme".into(),
            conversation_id: "C1".into(),
            message_id: format!("m{index}"),
            kind: EventKind::MessageCreated as i32,
            sender: Some(Sender {
                id: "U1".into(),
                ..Default::default()
            }),
            occurred_at_micros: 1_764_000_000_000_000 + index as i64,
            text: format!("message {index}"),
            ..Default::default()
        })
        .collect()
}

async fn ingest(gateway: &str, events: Vec<ChatEvent>) -> anyhow::Result<()> {
    ingest_client(gateway)
        .await?
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_halts_the_partition_instead_of_skipping_its_records()
-> anyhow::Result<()> {
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;

    // The first life of the topic: 50 records archived.
    let first_kafka = TestKafka::start(TOPIC, 1)?;
    let config = test_config(
        &first_kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    ingest(&gateway.endpoint(), events(0, 50)).await?;
    let (archiver, stats) = start_archiver(&config, "first").await?;
    assert!(
        wait_until(Duration::from_secs(30), || stats
            .events
            .committed_records
            .load(Ordering::Relaxed)
            == 50)
        .await,
        "the first 50 records were not archived"
    );
    archiver.stop().await?;
    gateway.stop().await?;
    let log = ChainReader::new(object_store_from_config(&config.shared.storage)?, TOPIC);
    let head_before = log.head(0).await?;
    assert_eq!(head_before.end_offset, 50);

    // The topic is recreated: same name, offsets from 0 again. 20 new records sit below the chain's end.
    let second_kafka = TestKafka::start(TOPIC, 1)?;
    let config = test_config(
        &second_kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    ingest(&gateway.endpoint(), events(50, 20)).await?;
    let (archiver, stats) = start_archiver(&config, "second").await?;
    assert!(
        wait_until(Duration::from_secs(30), || stats
            .events
            .halted_partitions
            .load(Ordering::Relaxed)
            == 1)
        .await,
        "the partition was not halted"
    );
    // More records, now past the chain's end: archiving them would hide the loss of the first 20 for good.
    ingest(&gateway.endpoint(), events(70, 40)).await?;
    // Nothing is committed (the partition is paused), and every record is still in Kafka.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stats.events.committed_records.load(Ordering::Relaxed), 0);
    let head_after = log.head(0).await?;
    assert_eq!(head_after.next_seq, head_before.next_seq);
    assert_eq!(head_after.end_offset, 50);
    assert_eq!(record_count(&second_kafka.brokers, TOPIC)?, 60);
    archiver.stop().await?;
    gateway.stop().await?;
    Ok(())
}
