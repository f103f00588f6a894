//! Exactly once under crashes, rebalances and zombies.
//!
//! The archiver runs as a separate `chatvault archiver` process against the test's Kafka (librdkafka's mock
//! cluster over TCP) and S3 server, and is killed at its crash points (mid-batch, after upload before the
//! manifest commit, after the commit before the offset store) and at random moments while events keep coming.
//! Afterwards every acknowledged event must be in the archive exactly once: the manifest chains tile every
//! partition's offsets without gap or overlap, the committed files hold each Kafka record once, and no file
//! outside the manifests is left behind.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatvault_proto::v1::IngestBatchRequest;
use chatvault_testkit::archive::{verify_exactly_once, wait_for_archive};
use chatvault_testkit::kafka::TestKafka;
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, TENANTS, TOPIC, authorized, ingest_client, start_archiver, start_gateway,
    test_config,
};
use chatvault_testkit::process::wait_for_exit;
use chatvault_testkit::s3::S3Server;
use common::{Rng, archiver_command, workload};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_archivers_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 3)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.archiver.max_batch_age = Duration::from_millis(300);
    config.archiver.max_batch_events = 150;
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
    config.archiver.max_batch_age = Duration::from_millis(200);
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
        .events
        .fenced_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("zombie batches fenced: {fenced}");

    verify_exactly_once(&config, &kafka.brokers, &acknowledged).await?;
    gateway.stop().await?;
    Ok(())
}
