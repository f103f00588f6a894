//! `chatvault standalone` never loses what it acknowledged. Its Kafka is librdkafka's in-process mock cluster
//! (gone with the process, and keeping only about 5 MB per partition), so standalone acknowledges an event only
//! once it is archived. Two ways that used to lose acknowledged events:
//!
//! - a burst faster than the archiver: the mock dropped records before they were archived;
//! - `kill -9` of the process: acknowledged but unarchived events died with the in-process Kafka.
//!
//! The same holds for the audit trail: every acknowledged call's audit record is in the archive, across the
//! kill and the restarts (whose new in-process Kafka starts the audit topic at offset 0 again).
//!
//! The CI profile sends `CHATVAULT_STANDALONE_BURST_EVENTS` events (default 120,000 of ~500 bytes, 24 times
//! what the mock keeps of one partition); the full profile is 1,000,000 (README, "Tests").

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatvault_config::Config;
use chatvault_core::config::{KeysConfig, SharedConfig, StorageConfig};
use chatvault_proto::v1::{ChatEvent, EventKind, IngestBatchRequest, Sender};
use chatvault_testkit::archive::verify_archive;
use chatvault_testkit::pipeline::{authorized, ingest_client};
use chatvault_testkit::process::{ChildRole, free_address, wait_until_serving};

const INGEST_SERVICE: &str = "chatvault.v1.IngestService";
const PARTITIONS: &[i32] = &[0, 1, 2];
const BATCH: usize = 1_000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chatvault"))
}

struct Standalone {
    process: ChildRole,
    endpoint: String,
    token: String,
}

async fn start_standalone(data_dir: &Path) -> anyhow::Result<Standalone> {
    let gateway = free_address()?;
    let data_dir_arg = data_dir.to_string_lossy().to_string();
    let process = ChildRole::spawn(
        "standalone",
        binary(),
        &[
            "standalone",
            "--data-dir",
            &data_dir_arg,
            "--partitions",
            "3",
            "--gateway-listen",
            &gateway,
            "--restorer-listen",
            &free_address()?,
            "--http-listen",
            &free_address()?,
            "--metrics-listen",
            &free_address()?,
        ],
    )?;
    let endpoint = format!("http://{gateway}");
    wait_until_serving(&endpoint, INGEST_SERVICE, Duration::from_secs(60)).await?;
    let token = std::fs::read_to_string(data_dir.join("standalone-token"))?
        .trim()
        .to_string();
    Ok(Standalone {
        process,
        endpoint,
        token,
    })
}

/// The archive of a standalone data directory, read the documented way.
fn archive_config(data_dir: &Path) -> Config {
    Config {
        shared: SharedConfig {
            storage: StorageConfig {
                url: format!("file://{}", data_dir.join("archive").display()),
                ..Default::default()
            },
            keys: KeysConfig {
                keyring_path: data_dir.join("keyring.json"),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A ~500-byte message of tenant `demo` with an explicit, globally unique event id.
fn message(run: &str, index: u64) -> ChatEvent {
    ChatEvent {
        event_id: format!("{run}-{index}"),
        tenant_id: "demo".into(),
        conversation_id: format!("C{}", index % 97),
        message_id: format!("{run}-m{index}"),
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: format!("U{}", index % 13),
            display_name: "burst".into(),
            is_bot: false,
        }),
        occurred_at_micros: 1_764_000_000_000_000 + index as i64 * 1_000,
        text: format!("{index:>10} {}", "lorem ipsum dolor sit amet ".repeat(17)),
        ..Default::default()
    }
}

/// `callers` concurrent IngestBatch callers sending `total` events of `run` (or until `stop`); returns the
/// acknowledged event ids. Failed calls are not retried: their events are simply not acknowledged.
async fn send(
    (endpoint, token): (&str, &str),
    run: &'static str,
    total: u64,
    callers: u64,
    stop: Arc<AtomicBool>,
    acknowledged_events: Arc<AtomicU64>,
) -> anyhow::Result<(BTreeSet<String>, usize)> {
    let next = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (endpoint, token) = (endpoint.to_string(), token.to_string());
            let (next, acknowledged, failures, stop, acknowledged_events) = (
                next.clone(),
                acknowledged.clone(),
                failures.clone(),
                stop.clone(),
                acknowledged_events.clone(),
            );
            tokio::spawn(async move {
                let mut client = ingest_client(&endpoint).await?;
                while !stop.load(Ordering::Relaxed) {
                    let first = next.fetch_add(BATCH as u64, Ordering::Relaxed);
                    if first >= total {
                        break;
                    }
                    let events: Vec<ChatEvent> = (first..(first + BATCH as u64).min(total))
                        .map(|index| message(run, index))
                        .collect();
                    match client
                        .ingest_batch(authorized(IngestBatchRequest { events }, &token))
                        .await
                    {
                        Ok(response) => {
                            let ids = response.into_inner().event_ids;
                            acknowledged_events.fetch_add(ids.len() as u64, Ordering::Relaxed);
                            acknowledged.lock().expect("lock").extend(ids);
                        }
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        // A caller whose connection died with a killed process ends with an error: that is expected there.
        let _ = task.await?;
    }
    let acknowledged = std::mem::take(&mut *acknowledged.lock().expect("lock"));
    Ok((acknowledged, failures.load(Ordering::Relaxed) as usize))
}

fn burst_events() -> u64 {
    std::env::var("CHATVAULT_STANDALONE_BURST_EVENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(120_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_is_archived_whole_and_kill_9_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let config = archive_config(&data_dir);

    // 1. A burst, 8 callers, as fast as standalone takes it; then a graceful stop.
    let total = burst_events();
    let mut standalone = start_standalone(&data_dir).await?;
    let started = Instant::now();
    let (burst, failed) = send(
        (&standalone.endpoint, &standalone.token),
        "burst",
        total,
        8,
        Arc::new(AtomicBool::new(false)),
        Arc::default(),
    )
    .await?;
    let took = started.elapsed();
    eprintln!(
        "burst: {} of {total} events acknowledged in {took:?} ({:.0} events/s), {failed} calls failed",
        burst.len(),
        burst.len() as f64 / took.as_secs_f64()
    );
    assert!(
        burst.len() as u64 >= total * 9 / 10,
        "most of the burst should be acknowledged: {} of {total}",
        burst.len()
    );
    // Every acknowledged event is in the archive already: kill -9, no graceful drain.
    standalone.process.kill();
    let report = verify_archive(&config, PARTITIONS).await?;
    report.ensure_each_once(&burst)?;

    // 2. kill -9 in the middle of sustained ingest, then a restart on the same data directory.
    let Standalone {
        mut process,
        endpoint,
        token,
    } = start_standalone(&data_dir).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    // Killed once ingest is well under way (the consumer group's join takes seconds, longer on a loaded
    // machine), in the middle of the calls then in flight.
    let killer = {
        let (stop, progress) = (stop.clone(), progress.clone());
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
            while progress.load(Ordering::Relaxed) < 4 * BATCH as u64
                && tokio::time::Instant::now() < give_up
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            process.kill();
            stop.store(true, Ordering::Relaxed);
        })
    };
    let (killed_run, failed) =
        send((&endpoint, &token), "killed", u64::MAX, 4, stop, progress).await?;
    killer.await?;
    eprintln!(
        "kill -9 during ingest: {} events acknowledged before the kill, {failed} calls failed",
        killed_run.len()
    );
    assert!(
        killed_run.len() >= 2 * BATCH,
        "too little was acknowledged before the kill to mean anything"
    );
    let restarted_at = chatvault_core::time::now_micros();
    let mut restarted = start_standalone(&data_dir).await?;
    let (after_restart, _) = send(
        (&restarted.endpoint, &restarted.token),
        "restarted",
        10 * BATCH as u64,
        2,
        Arc::new(AtomicBool::new(false)),
        Arc::default(),
    )
    .await?;
    let (status, _) = restarted
        .process
        .terminate_and_wait(Duration::from_secs(60))
        .await?;
    assert!(status.success(), "standalone exited with {status}");

    let report = verify_archive(&config, PARTITIONS).await?;
    report.ensure_each_once(burst.iter().chain(&killed_run).chain(&after_restart))?;

    // Every acknowledged call was served only once its audit record was archived: the allowed ingest records
    // of the archived trail count at least every acknowledged event (more when an answer was lost in a kill).
    let store = chatvault_core::storage::object_store_from_config(&config.shared.storage)?;
    let keys =
        chatvault_archive::keys::DataKeys::from_config(store.clone(), &config.shared.keys).await?;
    let trail = chatvault_restorer::AuditTrailReader::new(store, keys, "chatvault.events.audit");
    let filter = chatvault_restorer::audit_trail::AuditFilter {
        tenant_id: "demo".into(),
        action: Some("chatvault.v1.IngestService/IngestBatch".into()),
        outcome: Some(chatvault_core::audit::AuditOutcome::Allowed),
        ..Default::default()
    };
    let (mut recorded, mut after_the_restart, mut cursor) = (0i64, 0i64, None);
    loop {
        let page = trail.query(&filter, cursor.as_ref(), 1_000).await?;
        for record in &page.records {
            recorded += record.item_count;
            if record.time_micros >= restarted_at {
                after_the_restart += record.item_count;
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let acknowledged = (burst.len() + killed_run.len() + after_restart.len()) as i64;
    assert!(
        recorded >= acknowledged && after_the_restart >= after_restart.len() as i64,
        "audit records of {recorded} events ({after_the_restart} after the restart) for {acknowledged} \
         acknowledged ({} after the restart)",
        after_restart.len()
    );
    Ok(())
}
