//! Offsets Kafka no longer holds. librdkafka's mock broker keeps at most about 5 MB (or 100,000 records) per
//! partition and moves its log-start offset past older records, as retention does on a real broker. Records
//! deleted before they were archived are committed as an `offset_gaps` range of the manifest (the loss made
//! visible), because the broker confirms they are gone; what the broker still holds is archived. (A gap the
//! broker does not confirm is fetched again and then halts the partition: `archiver::gaps`, unit-tested.)

use std::time::Duration;

use chatvault_archive::chain::ChainReader;
use chatvault_archive::manifest::{ChainHead, OffsetGap};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::{ChatEvent, EventKind, Sender};
use chatvault_testkit::archive::wait_for_archive;
use chatvault_testkit::kafka::TestKafka;
use chatvault_testkit::pipeline::{TOPIC, start_archiver, test_config};
use chatvault_testkit::s3::S3Server;
use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_by_the_broker_before_archiving_are_committed_as_a_gap()
-> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 1)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );

    // ~9 MB into one partition while no archiver runs: the broker drops the oldest records.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    let filler = "x".repeat(1_500);
    let mut deliveries = Vec::new();
    for index in 0..6_000 {
        let event = ChatEvent {
            event_id: format!("e{index}"),
            tenant_id: "acme".into(),
            conversation_id: "C1".into(),
            message_id: format!("m{index}"),
            kind: EventKind::MessageCreated as i32,
            sender: Some(Sender {
                id: "U1".into(),
                ..Default::default()
            }),
            occurred_at_micros: 1_764_000_000_000_000 + index,
            received_at_micros: 1_764_000_000_000_000 + index,
            text: format!("{index} {filler}"),
            ..Default::default()
        };
        let value = event.encode_to_vec();
        let producer = producer.clone();
        deliveries.push(async move {
            producer
                .send(
                    FutureRecord::to(TOPIC).key("acme/C1").payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(error, _)| error)
        });
    }
    for delivery in futures::future::join_all(deliveries).await {
        delivery?;
    }
    let inspector: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "gap-inspector")
        .create()?;
    let (log_start, high) = inspector.fetch_watermarks(TOPIC, 0, Duration::from_secs(10))?;
    assert_eq!(high, 6_000);
    assert!(
        log_start > 0,
        "the broker should have deleted the oldest records (log start {log_start})"
    );

    let (archiver, _stats) = start_archiver(&config, "archiver").await?;
    let store = object_store_from_config(&config.storage)?;
    let chains = ChainReader::new(store, TOPIC);
    assert!(
        wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?,
        "not archived up to the high watermark"
    );
    archiver.stop().await?;

    let verified = chains.read_after(0, &ChainHead::empty()).await;
    assert!(verified.error.is_none(), "{:?}", verified.error);
    let gaps: Vec<OffsetGap> = verified
        .manifests
        .iter()
        .flat_map(|(manifest, _)| manifest.offset_gaps.clone())
        .collect();
    assert_eq!(
        gaps,
        vec![OffsetGap {
            from: 0,
            to: log_start
        }],
        "exactly the deleted records are a gap"
    );
    let archived: u64 = verified
        .manifests
        .iter()
        .flat_map(|(manifest, _)| manifest.files.iter().map(|file| file.rows))
        .sum();
    assert_eq!(
        archived as i64,
        6_000 - log_start,
        "every record the broker still held is archived"
    );
    Ok(())
}
