//! Records that can never be archived do not stall the archiver. With a read-only keyring (the Helm layout)
//! that holds no key for tenant `globex`, records produced straight to Kafka for `globex`, for an invalid
//! tenant id, and one that is not a chat event are each committed as a rejected record with its reason and a
//! copy in the dead-letter topic, while `acme`'s events before and after them are archived.

use std::collections::BTreeMap;
use std::time::Duration;

use chatvault_archive::chain::ChainReader;
use chatvault_archive::keys::DataKeys;
use chatvault_archive::manifest::ChainHead;
use chatvault_core::event::kafka_key;
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::{ChatEvent, EventKind, Sender};
use chatvault_testkit::archive::wait_for_archive;
use chatvault_testkit::kafka::TestKafka;
use chatvault_testkit::pipeline::{TOPIC, start_archiver, test_config};
use chatvault_testkit::s3::S3Server;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn event(tenant: &str, index: usize) -> ChatEvent {
    ChatEvent {
        event_id: format!("{tenant}-{index}"),
        tenant_id: tenant.into(),
        conversation_id: "C1".into(),
        message_id: format!("m{index}"),
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: "U1".into(),
            ..Default::default()
        }),
        occurred_at_micros: 1_764_000_000_000_000 + index as i64,
        received_at_micros: 1_764_000_000_000_000 + index as i64,
        text: format!("message {index}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unarchivable_records_go_to_the_dead_letter_topic_and_the_rest_is_archived()
-> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 1)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    // The keyring knows acme only (created by a writable instance), then is mounted read-only.
    let store = object_store_from_config(&config.shared.storage)?;
    DataKeys::with_local_keyring(store.clone(), &config.shared.keys.keyring_path)?
        .get_or_create("acme", "2025-11")
        .await?;
    config.shared.keys.keyring_read_only = true;

    // What goes to the topic, in offset order: Some(expected rejection reason) for the unarchivable ones.
    let mut records: Vec<(Vec<u8>, Vec<u8>, Option<&str>)> = Vec::new();
    for index in 0..20 {
        let acme = event("acme", index);
        records.push((kafka_key("acme", "C1"), acme.encode_to_vec(), None));
        if index == 5 {
            let globex = event("globex", index);
            records.push((
                kafka_key("globex", "C1"),
                globex.encode_to_vec(),
                Some("read-only"),
            ));
        }
        if index == 8 {
            records.push((
                b"x".to_vec(),
                event("Not A Tenant", index).encode_to_vec(),
                Some("not a valid tenant id"),
            ));
        }
        if index == 12 {
            records.push((
                b"x".to_vec(),
                vec![0xff; 7],
                Some("not a chatvault.v1.ChatEvent"),
            ));
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .create()?;
    for (key, value, _) in &records {
        producer
            .send(
                FutureRecord::to(TOPIC).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)?;
    }

    let (archiver, _stats) = start_archiver(&config, "archiver").await?;
    let chains = ChainReader::new(store, TOPIC);
    assert!(
        wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?,
        "not archived up to the high watermark"
    );
    archiver.stop().await?;

    let verified = chains.read_after(0, &ChainHead::empty()).await;
    assert!(verified.error.is_none(), "{:?}", verified.error);
    let rejected: BTreeMap<i64, _> = verified
        .manifests
        .iter()
        .flat_map(|(manifest, _)| manifest.rejected_records.clone())
        .map(|record| (record.offset, record))
        .collect();
    let archived_rows: u64 = verified
        .manifests
        .iter()
        .flat_map(|(manifest, _)| manifest.files.iter().map(|file| file.rows))
        .sum();
    assert_eq!(archived_rows, 20, "every acme event is archived");
    let expected: Vec<(i64, &str)> = records
        .iter()
        .enumerate()
        .filter_map(|(offset, (_, _, reason))| reason.map(|reason| (offset as i64, reason)))
        .collect();
    assert_eq!(
        rejected.keys().copied().collect::<Vec<_>>(),
        expected
            .iter()
            .map(|(offset, _)| *offset)
            .collect::<Vec<_>>(),
        "exactly the unarchivable records are rejected"
    );

    // Each rejected record's copy is in the dead-letter topic, with its source and reason.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "dead-letter-reader")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let dead_letter_topic = format!("{TOPIC}.dead-letter");
    consumer.subscribe(&[&dead_letter_topic])?;
    let mut copies = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while copies.len() < expected.len() && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            let header = |name: &str| {
                message
                    .headers()
                    .and_then(|headers| headers.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).to_string())
                    .unwrap_or_default()
            };
            assert_eq!(header("chatvault-source-topic"), TOPIC);
            let source_offset: i64 = header("chatvault-source-offset").parse()?;
            copies.insert(
                source_offset,
                (
                    message.offset(),
                    header("chatvault-rejected-reason"),
                    message.payload().unwrap_or_default().to_vec(),
                ),
            );
        }
    }
    assert_eq!(
        copies.len(),
        expected.len(),
        "every rejected record has its copy"
    );
    for (offset, reason) in expected {
        let record = &rejected[&offset];
        assert!(
            record.reason.contains(reason),
            "offset {offset}: {}",
            record.reason
        );
        let copy = record
            .dead_letter
            .as_ref()
            .expect("dead-letter coordinates");
        assert_eq!(copy.topic, dead_letter_topic);
        let (copy_offset, copy_reason, value) = &copies[&offset];
        assert_eq!(*copy_offset, copy.offset, "the manifest points at the copy");
        assert_eq!(copy_reason, &record.reason);
        let original = &records[offset as usize].1;
        if reason == "read-only" {
            assert_eq!(
                ChatEvent::decode(value.as_slice())?,
                ChatEvent::decode(original.as_slice())?
            );
        } else {
            assert_eq!(
                value, original,
                "undecodable records are kept byte for byte"
            );
        }
    }
    Ok(())
}
