//! Exactly once under crashes, rebalances and zombies.
//!
//! The archiver runs as a separate `chatvault archiver` process against the test's Kafka (librdkafka's mock
//! cluster over TCP) and S3 server, and is killed at its crash points (mid-batch, after upload before the
//! manifest commit, after the commit before the offset store) and at random moments while events keep coming.
//! Afterwards every acknowledged event must be in the archive exactly once: the manifest chains tile every
//! partition's offsets without gap or overlap, the committed files hold each Kafka record once, and no file
//! outside the manifests is left behind.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatvault_core::archive::file::{decode_file, sha256_hex};
use chatvault_core::archive::manifest::ManifestLog;
use chatvault_core::config::Config;
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::IngestBatchRequest;
use chatvault_testkit::kafka::{TestKafka, high_watermarks};
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, TENANTS, TOPIC, authorized, data_keys, ingest_client, start_archiver,
    start_gateway, test_config,
};
use chatvault_testkit::s3::S3Server;
use common::{Rng, workload};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

/// Environment for a `chatvault archiver` process with `config`'s settings.
fn archiver_command(config: &Config, crash_at: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    command
        .arg("archiver")
        .env("CHATVAULT__KAFKA__BROKERS", &config.kafka.brokers)
        .env("CHATVAULT__KAFKA__TOPIC", &config.kafka.topic)
        .env("CHATVAULT__STORAGE__URL", &config.storage.url)
        .env("CHATVAULT__KEYS__KEYRING_PATH", &config.keys.keyring_path)
        .env("CHATVAULT__ARCHIVER__GROUP_ID", &config.archiver.group_id)
        .env("CHATVAULT__ARCHIVER__MAX_BATCH_AGE_MS", "300")
        .env("CHATVAULT__ARCHIVER__MAX_BATCH_EVENTS", "150")
        .env("CHATVAULT__ARCHIVER__SESSION_TIMEOUT_MS", "6000")
        .env("RUST_LOG", "warn,chatvault_archiver=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in &config.storage.options {
        command.env(
            format!("CHATVAULT__STORAGE__OPTIONS__{}", key.to_uppercase()),
            value,
        );
    }
    match crash_at {
        Some(point) => command.env("CHATVAULT_CRASH_AT", point),
        None => command.env_remove("CHATVAULT_CRASH_AT"),
    };
    command
}

/// Keeps sending batches through the gateway until `stop` is set; returns the acknowledged event ids.
fn spawn_ingest(
    endpoint: String,
    stop: Arc<Mutex<bool>>,
    seed: u64,
) -> tokio::task::JoinHandle<anyhow::Result<BTreeSet<String>>> {
    tokio::spawn(async move {
        let mut client = ingest_client(&endpoint).await?;
        let mut acknowledged = BTreeSet::new();
        let mut round = 0u64;
        while !*stop.lock().expect("lock") {
            // Unique per round, so every Kafka record holds a distinct event id (within-batch collapsing of
            // duplicate ids would otherwise make offsets legitimately absent from the files).
            let events: Vec<_> = workload(seed + round, TENANTS, 2, 20)
                .into_iter()
                .map(|mut event| {
                    event.conversation_id = format!("{}-r{round}", event.conversation_id);
                    if !event.event_id.is_empty() {
                        event.event_id = format!("{}-r{round}", event.event_id);
                    }
                    event
                })
                .collect();
            for chunk in events.chunks(60) {
                let response = client
                    .ingest_batch(authorized(
                        IngestBatchRequest {
                            events: chunk.to_vec(),
                        },
                        INGEST_TOKEN,
                    ))
                    .await?;
                acknowledged.extend(response.into_inner().event_ids);
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(acknowledged)
    })
}

/// Checks the archive holds every Kafka record of the topic exactly once, and nothing else.
async fn verify_exactly_once(
    config: &Config,
    brokers: &str,
    acknowledged: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let store = object_store_from_config(&config.storage)?;
    let keys = data_keys(config)?;
    let log = ManifestLog::new(store.clone(), TOPIC);
    let mut named_files = HashSet::new();
    let mut archived_ids = HashSet::new();
    for (partition, high_watermark) in high_watermarks(brokers, TOPIC)? {
        let seqs = log.list_seqs(partition, None).await?;
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "partition {partition}: sequence numbers have gaps"
        );
        let mut expected_start = 0i64;
        let mut previous_sha = String::new();
        let mut offsets = BTreeMap::new();
        for seq in seqs {
            let (manifest, sha) = log.read(partition, seq).await?;
            assert_eq!(
                manifest.start_offset, expected_start,
                "partition {partition} seq {seq}: chain not contiguous"
            );
            assert_eq!(
                manifest.prev_sha256, previous_sha,
                "partition {partition} seq {seq}: hash chain broken"
            );
            assert!(manifest.rejected_records.is_empty());
            assert!(
                manifest.offset_gaps.is_empty(),
                "no record may be skipped: {:?}",
                manifest.offset_gaps
            );
            for file in &manifest.files {
                let bytes = store.get(&file.path.as_str().into()).await?.bytes().await?;
                assert_eq!(
                    sha256_hex(&bytes),
                    file.sha256,
                    "{}: bytes differ from the manifest",
                    file.path
                );
                let key = keys.get(&file.tenant_id, &file.key_period).await?;
                for row in decode_file(bytes, &key, None)? {
                    assert_eq!(row.kafka_partition, partition);
                    assert!(
                        (manifest.start_offset..manifest.end_offset).contains(&row.kafka_offset),
                        "row outside its manifest's range"
                    );
                    assert!(
                        offsets
                            .insert(row.kafka_offset, row.event.event_id.clone())
                            .is_none(),
                        "partition {partition} offset {} archived twice",
                        row.kafka_offset
                    );
                    archived_ids.insert(row.event.event_id);
                }
                named_files.insert(file.path.clone());
            }
            expected_start = manifest.end_offset;
            previous_sha = sha;
        }
        assert_eq!(
            expected_start, high_watermark,
            "partition {partition}: not everything archived"
        );
        // Each Kafka record once: no offset missing (batches collapse duplicate event ids only within a batch,
        // and this workload sends each event once).
        let missing: Vec<i64> = (0..high_watermark)
            .filter(|offset| !offsets.contains_key(offset))
            .collect();
        assert!(
            missing.is_empty(),
            "partition {partition}: offsets {missing:?} not archived"
        );
    }
    for event_id in acknowledged {
        assert!(
            archived_ids.contains(event_id),
            "acknowledged event {event_id} is not archived"
        );
    }
    let stored: Vec<String> = store
        .list(Some(&"events".into()))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await?;
    let orphans: Vec<&String> = stored
        .iter()
        .filter(|path| !named_files.contains(*path))
        .collect();
    assert!(
        orphans.is_empty(),
        "files outside any manifest remain: {orphans:?}"
    );
    Ok(())
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn wait_for_archive(
    config: &Config,
    brokers: &str,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let store = object_store_from_config(&config.storage)?;
    let log = ManifestLog::new(store, TOPIC);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut complete = true;
        for (partition, high) in high_watermarks(brokers, TOPIC)? {
            let head = log.head(partition).await?;
            complete &= head.end_offset == high;
        }
        if complete {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_archivers_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 3)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    let stop = Arc::new(Mutex::new(false));
    let ingest = spawn_ingest(gateway.endpoint(), stop.clone(), 100);

    let mut rng = Rng::new(42);
    let crash_plans = [
        Some("mid_batch:250".to_string()),
        Some("after_upload:2".to_string()),
        Some("after_commit:2".to_string()),
        None, // killed at a random moment
        Some("after_upload:1".to_string()),
    ];
    for plan in &crash_plans {
        let mut child = archiver_command(&config, plan.as_deref()).spawn()?;
        match plan {
            Some(point) => {
                let status = wait_for_exit(&mut child, Duration::from_secs(60)).await;
                if status.is_none() {
                    child.kill()?;
                    panic!("the archiver never reached crash point {point}");
                }
                assert!(
                    !status.is_some_and(|s| s.success()),
                    "crash point {point} must abort the process"
                );
            }
            None => {
                tokio::time::sleep(Duration::from_millis(3_000 + rng.below(4_000))).await;
                child.kill()?; // SIGKILL
                child.wait()?;
            }
        }
    }
    *stop.lock().expect("lock") = true;
    let acknowledged = ingest.await??;
    assert!(
        acknowledged.len() > 500,
        "the workload was too small to mean anything"
    );

    // The survivor: archives the rest, then stops gracefully on SIGTERM.
    let mut survivor = archiver_command(&config, None).spawn()?;
    let complete = wait_for_archive(&config, &kafka.brokers, Duration::from_secs(90)).await?;
    let pid = survivor.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let status = wait_for_exit(&mut survivor, Duration::from_secs(30)).await;
    assert!(complete, "the surviving archiver did not catch up");
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful shutdown must exit 0, got {status:?}"
    );

    verify_exactly_once(&config, &kafka.brokers, &acknowledged).await?;
    gateway.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalances_and_a_zombie_writer_keep_the_archive_exactly_once() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 4)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.archiver.max_batch_events = 100;
    config.archiver.max_batch_age_ms = 200;
    let gateway = start_gateway(&config).await?;
    let stop = Arc::new(Mutex::new(false));
    let ingest = spawn_ingest(gateway.endpoint(), stop.clone(), 900);

    // Two archivers share the partitions; a third joins and the first leaves, forcing rebalances.
    let (first, _) = start_archiver(&config, "first").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (second, _) = start_archiver(&config, "second").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (third, _) = start_archiver(&config, "third").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.stop().await?;

    // A zombie: a worker that believes it owns every partition (another consumer group, so Kafka never tells
    // it otherwise) and keeps trying to commit over the rightful owners. Only the conditional manifest create
    // stands between it and a duplicate.
    let mut zombie_config = config.clone();
    zombie_config.archiver.group_id = "chatvault-zombie".into();
    let (zombie, zombie_stats) = start_archiver(&zombie_config, "zombie").await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    *stop.lock().expect("lock") = true;
    let acknowledged = ingest.await??;

    let complete = wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?;
    assert!(complete, "archivers did not catch up");
    // Let the zombie run against a settled archive for a moment, then stop everyone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    zombie.stop().await?;
    second.stop().await?;
    third.stop().await?;
    let fenced = zombie_stats
        .fenced_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("zombie batches fenced: {fenced}");

    verify_exactly_once(&config, &kafka.brokers, &acknowledged).await?;
    gateway.stop().await?;
    Ok(())
}
