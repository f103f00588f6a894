//! Offsets Kafka no longer holds. librdkafka's mock broker keeps at most about 5 MB (or 100,000 records) per
//! partition and moves its log-start offset past older records, as retention does on a real broker. Records
//! deleted before they were archived are committed as an `offset_gaps` range of the manifest (the loss made
//! visible), because the broker confirms they are gone; what the broker still holds is archived.
//!
//! Offsets a broker skips while it still holds them are never a gap: behind a Kafka-protocol proxy that
//! answers a fetch from inside a record batch with the next batch (tansu 0.6.0's defect), the archiver fetches
//! again from before the gap and archives everything; behind one that never serves the batch, the partition
//! halts (readiness says so) and nothing is committed past the last archived offset until the broker
//! behaves.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chatvault_archive::chain::ChainReader;
use chatvault_archive::manifest::{ChainHead, OffsetGap};
use chatvault_config::Config;
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::{ChatEvent, EventKind, Sender};
use chatvault_testkit::archive::{verify_exactly_once, wait_for_archive};
use chatvault_testkit::kafka::TestKafka;
use chatvault_testkit::kafka_proxy::{FetchFault, KafkaProxy};
use chatvault_testkit::pipeline::{TOPIC, start_archiver, test_config, wait_until};
use chatvault_testkit::process::wait_for_exit;
use chatvault_testkit::s3::S3Server;
use common::archiver_command;
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
    let filler = "x".repeat(1_500);
    let events = (0..6_000).map(|index| ChatEvent {
        text: format!("{index} {filler}"),
        ..numbered_event(index)
    });
    produce(&kafka.brokers, events, "5").await?;
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
    assert!(
        wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?,
        "not archived up to the high watermark"
    );
    archiver.stop().await?;

    let (gaps, archived) = committed_gaps_and_rows(&config).await?;
    assert_eq!(
        gaps,
        vec![OffsetGap {
            from: 0,
            to: log_start
        }],
        "exactly the deleted records are a gap"
    );
    assert_eq!(
        archived as i64,
        6_000 - log_start,
        "every record the broker still held is archived"
    );
    Ok(())
}

/// One chat event of conversation `C1` of tenant `acme`, numbered `index`.
fn numbered_event(index: i64) -> ChatEvent {
    ChatEvent {
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
        text: format!("message {index}"),
        ..Default::default()
    }
}

/// Produces `events` to partition 0 at once, with the producer lingering `linger_ms` (long enough, and they
/// form one Kafka record batch).
async fn produce(
    brokers: &str,
    events: impl Iterator<Item = ChatEvent>,
    linger_ms: &str,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms)
        .create()?;
    let sends = events.map(|event| {
        let (producer, value) = (producer.clone(), event.encode_to_vec());
        async move {
            producer
                .send(
                    FutureRecord::to(TOPIC)
                        .partition(0)
                        .key("acme/C1")
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(error, _)| error)
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    Ok(())
}

/// Offsets 0..99 in one record batch and 100..199 in a second; an archiver process committed 0..39 and
/// 40..79 and was killed, so the chain head (80) lies inside the first batch: the next owner fetches from
/// there, as after any reassignment.
async fn chain_head_inside_a_batch(config: &Config) -> anyhow::Result<()> {
    produce(
        &config.shared.kafka.brokers,
        (0..100).map(numbered_event),
        "500",
    )
    .await?;
    let mut first = archiver_command(config, Some("after_commit:2")).spawn()?;
    let status = wait_for_exit(&mut first, Duration::from_secs(60)).await;
    if status.is_none() {
        first.kill()?;
        anyhow::bail!("the first archiver never committed its second batch");
    }
    let store = object_store_from_config(&config.shared.storage)?;
    let head = ChainReader::new(store, TOPIC).head(0).await?;
    anyhow::ensure!(
        head.end_offset == 80,
        "the first archiver should have committed 0..79, committed up to {}",
        head.end_offset
    );
    produce(
        &config.shared.kafka.brokers,
        (100..200).map(numbered_event),
        "500",
    )
    .await?;
    Ok(())
}

/// Every manifest of partition 0, checked as a chain: `(gaps, archived rows)`.
async fn committed_gaps_and_rows(config: &Config) -> anyhow::Result<(Vec<OffsetGap>, u64)> {
    let store = object_store_from_config(&config.shared.storage)?;
    let verified = ChainReader::new(store, TOPIC)
        .read_after(0, &ChainHead::empty())
        .await;
    if let Some(error) = verified.error {
        anyhow::bail!("the chain does not verify: {error:?}");
    }
    let gaps = verified
        .manifests
        .iter()
        .flat_map(|(manifest, _)| manifest.offset_gaps.clone())
        .collect();
    let rows = verified
        .manifests
        .iter()
        .flat_map(|(manifest, _)| manifest.files.iter().map(|file| file.rows))
        .sum();
    Ok((gaps, rows))
}

fn all_event_ids() -> BTreeSet<String> {
    (0..200).map(|index| format!("e{index}")).collect()
}

/// [`chain_head_inside_a_batch`] on a fresh broker and bucket, then a Kafka proxy in front of the broker
/// answering fetches with `fault`. `config` reaches the broker directly, `through_proxy` through the proxy.
struct BehindAFaultyProxy {
    kafka: TestKafka,
    proxy: KafkaProxy,
    config: Config,
    through_proxy: Config,
    _s3: S3Server,
    _keyring: tempfile::TempDir,
}

async fn behind_a_faulty_proxy(fault: FetchFault) -> anyhow::Result<BehindAFaultyProxy> {
    let kafka = TestKafka::start(TOPIC, 1)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.archiver.max_batch_events = 40;
    config.archiver.max_batch_age = Duration::from_millis(300);
    chain_head_inside_a_batch(&config).await?;
    let proxy = KafkaProxy::start(&kafka.brokers).await?;
    proxy.set_fault(fault);
    let mut through_proxy = config.clone();
    through_proxy.shared.kafka.brokers = proxy.brokers.clone();
    Ok(BehindAFaultyProxy {
        kafka,
        proxy,
        config,
        through_proxy,
        _s3: s3,
        _keyring: keyring,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_a_broker_skipped_but_still_holds_are_fetched_again_not_committed_as_a_gap()
-> anyhow::Result<()> {
    // The next owner reaches Kafka through a proxy that answers the fetch from offset 80 with offsets 100..199.
    let BehindAFaultyProxy {
        kafka,
        proxy,
        config,
        through_proxy,
        _s3,
        _keyring,
    } = behind_a_faulty_proxy(FetchFault::SkipFromInsideBatch).await?;
    let (archiver, _stats) = start_archiver(&through_proxy, "second").await?;
    let archived = wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?;
    archiver.stop().await?;
    assert!(
        proxy.skipped_batches() >= 1,
        "the proxy never skipped a batch: the test did not exercise the defect"
    );
    assert!(archived, "not archived up to the high watermark");

    let (gaps, rows) = committed_gaps_and_rows(&config).await?;
    assert_eq!(
        gaps,
        vec![],
        "offsets the broker still held were committed as a gap"
    );
    assert_eq!(rows, 200, "every record archived once");
    verify_exactly_once(&config, &kafka.brokers, &all_event_ids()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_keeps_skipping_held_offsets_halts_the_partition_instead_of_losing_them()
-> anyhow::Result<()> {
    // Through a proxy that never serves the batch holding the fetched offset, however far back it is asked.
    let BehindAFaultyProxy {
        kafka,
        proxy,
        config,
        through_proxy,
        _s3,
        _keyring,
    } = behind_a_faulty_proxy(FetchFault::SkipHoldingBatch).await?;
    let (archiver, stats) = start_archiver(&through_proxy, "second").await?;
    let halted = wait_until(Duration::from_secs(60), || {
        stats
            .events
            .halted_now
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert!(halted, "the partition was not halted");
    let reason = stats.unready_reason().unwrap_or_default();
    assert!(
        reason.contains("1 owned partition(s) halted"),
        "readiness: {reason:?}"
    );
    let (gaps, rows) = committed_gaps_and_rows(&config).await?;
    assert_eq!(
        gaps,
        vec![],
        "offsets the broker still held were committed as a gap"
    );
    assert_eq!(rows, 80, "nothing committed past the last archived offset");
    archiver.stop().await?;

    // Once the broker serves the records again, a restarted archiver archives them all.
    proxy.set_fault(FetchFault::None);
    let (archiver, _stats) = start_archiver(&through_proxy, "third").await?;
    let archived = wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?;
    archiver.stop().await?;
    assert!(archived, "not archived up to the high watermark");
    let (gaps, rows) = committed_gaps_and_rows(&config).await?;
    assert_eq!(gaps, vec![]);
    assert_eq!(rows, 200);
    verify_exactly_once(&config, &kafka.brokers, &all_event_ids()).await?;
    Ok(())
}
