//! Graceful shutdown of every role, as Kubernetes does it (SIGTERM), during sustained ingest: every event a
//! sender got OK for is archived exactly once, and every process exits 0 well within its deadline.
//!
//! The roles run as `chatvault` child processes against the test's Kafka (librdkafka's mock cluster over TCP)
//! and S3 server (s3s-fs over TCP), or as `chatvault standalone` with its own in-process Kafka.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatvault_archive::chain::ChainReader;
use chatvault_config::Config;
use chatvault_core::config::{KeysConfig, SharedConfig, StorageConfig};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
use chatvault_proto::v1::{
    ChatEvent, EventKind, GetConversationRequest, IngestBatchRequest, Sender,
};
use chatvault_testkit::archive::{verify_archive, verify_exactly_once, wait_for_archive};
use chatvault_testkit::kafka::{TestKafka, committed_offsets};
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, RESTORE_TOKEN, TENANTS, TOPIC, authorized, ingest_client, start_archiver,
    start_gateway, test_config, wait_until,
};
use chatvault_testkit::process::{
    ChildRole, ServingStatus, free_address, health_status, wait_until_serving, write_config,
};
use chatvault_testkit::proxy::FreezableProxy;
use chatvault_testkit::s3::S3Server;
use common::{BASE_MICROS, workload};
use tonic::Code;

/// A generous bound on every shutdown (they take one to a few seconds): timing assertions must hold on a
/// loaded two-core machine.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(30);
const INGEST_SERVICE: &str = "chatvault.v1.IngestService";
const RESTORE_SERVICE: &str = "chatvault.v1.RestoreService";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chatvault"))
}

/// What a sending client saw.
#[derive(Debug, Default)]
struct IngestLog {
    /// Event ids of every call answered OK.
    acknowledged: BTreeSet<String>,
    /// When each OK arrived.
    oks: Vec<Instant>,
    /// When each failed call failed, with its status.
    failures: Vec<(Instant, Code, String)>,
}

impl IngestLog {
    fn oks_after(&self, moment: Instant) -> usize {
        self.oks.iter().filter(|at| **at > moment).count()
    }

    fn failures_after(&self, moment: Instant) -> usize {
        self.failures.iter().filter(|(at, ..)| *at > moment).count()
    }
}

/// One call's events: a small chat workload whose conversation and explicit event ids carry `tag`, so every
/// call of every client sends distinct event ids.
fn tagged_events(seed: u64, tenants: &[&str], tag: &str) -> Vec<ChatEvent> {
    workload(seed, tenants, 2, 10)
        .into_iter()
        .map(|mut event| {
            event.conversation_id = format!("{}-{tag}", event.conversation_id);
            if !event.event_id.is_empty() {
                event.event_id = format!("{}-{tag}", event.event_id);
            }
            event
        })
        .collect()
}

/// Sends batch calls back to back until `stop`, recording every acknowledged event id and every failure.
/// Failed calls are not retried (their events may or may not be archived; only acknowledged ones must be).
fn spawn_ingest(
    endpoint: String,
    token: String,
    tenants: Vec<String>,
    client: u64,
    log: Arc<Mutex<IngestLog>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let tenants: Vec<&str> = tenants.iter().map(String::as_str).collect();
        let mut ingest = ingest_client(&endpoint).await?;
        let mut call = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let events = tagged_events(
                client * 1_000_000 + call,
                &tenants,
                &format!("c{client}n{call}"),
            );
            let result = ingest
                .ingest_batch(authorized(IngestBatchRequest { events }, &token))
                .await;
            let now = Instant::now();
            match result {
                Ok(response) => {
                    let mut log = log.lock().expect("lock");
                    log.oks.push(now);
                    log.acknowledged.extend(response.into_inner().event_ids);
                }
                Err(status) => {
                    log.lock().expect("lock").failures.push((
                        now,
                        status.code(),
                        status.message().to_string(),
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            call += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    })
}

/// Watches `service` at `endpoint` right after a SIGTERM: true once it reports NOT_SERVING, false if the
/// server stopped answering first.
async fn observe_not_serving(endpoint: &str, service: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match health_status(endpoint, service).await {
            Ok(ServingStatus::NotServing) => return true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => return false,
        }
    }
    false
}

/// Separate processes: gateway, and two archivers in turn, all SIGTERMed while a client keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_gateway_and_archivers_during_ingest_loses_no_acknowledged_event()
-> anyhow::Result<()> {
    let test_started = Instant::now();
    let kafka = TestKafka::start(TOPIC, 3)?;
    let s3 = S3Server::start("archive").await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &dir.path().join("keyring.json"),
    );
    config.gateway.grpc_listen = free_address()?;
    config.gateway.http_listen = free_address()?;
    config.gateway.shutdown_delay = Duration::from_millis(1_500);
    config.gateway.drain_timeout = Duration::from_millis(10_000);
    config.archiver.shutdown_timeout = Duration::from_millis(15_000);
    // Several roles share the host: each takes a free port for its metrics endpoint.
    config.shared.telemetry.metrics_listen = "127.0.0.1:0".into();
    let config_path = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let gateway_endpoint = format!("http://{}", config.gateway.grpc_listen);

    let mut gateway = ChildRole::spawn_role("gateway", binary(), "gateway", &config_path)?;
    let mut first_archiver =
        ChildRole::spawn_role("archiver-1", binary(), "archiver", &config_path)?;
    wait_until_serving(&gateway_endpoint, INGEST_SERVICE, SHUTDOWN_BOUND).await?;
    let log = Arc::new(Mutex::new(IngestLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = spawn_ingest(
        gateway_endpoint.clone(),
        INGEST_TOKEN.into(),
        TENANTS.iter().map(|t| t.to_string()).collect(),
        1,
        log.clone(),
        stop.clone(),
    );
    let store = object_store_from_config(&config.shared.storage)?;
    let manifests = ChainReader::new(store, TOPIC);
    // Let the first archiver join and commit a few batches under load.
    let committing = async {
        let deadline = Instant::now() + SHUTDOWN_BOUND;
        while Instant::now() < deadline {
            let mut heads = 0;
            for partition in 0..3 {
                heads += manifests.head(partition).await?.next_seq;
            }
            if heads >= 3 {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(false)
    };
    assert!(committing.await?, "the first archiver never committed");

    // 1. SIGTERM the archiver mid-ingest.
    let (status, took) = first_archiver.terminate_and_wait(SHUTDOWN_BOUND).await?;
    eprintln!("first archiver: {status} {took:?} after SIGTERM");
    assert!(status.success(), "the first archiver exited with {status}");
    // It committed Kafka offsets exactly up to what its manifests made durable, and no further.
    for (partition, committed) in
        committed_offsets(&kafka.brokers, &config.archiver.group_id, TOPIC)?
    {
        let head = manifests.head(partition).await?;
        assert_eq!(
            committed,
            (head.next_seq > 0).then_some(head.end_offset),
            "partition {partition}: committed Kafka offset vs the manifest chain head"
        );
    }

    // 2. A second archiver takes over while ingest goes on.
    let mut second_archiver =
        ChildRole::spawn_role("archiver-2", binary(), "archiver", &config_path)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 3. SIGTERM the gateway mid-ingest: NOT_SERVING first, still serving for shutdown_delay_ms, then it stops
    // accepting, drains and exits.
    let oks_before = log.lock().expect("lock").oks.len();
    let sigterm_at = Instant::now();
    gateway.terminate()?;
    let reported_not_serving = observe_not_serving(&gateway_endpoint, INGEST_SERVICE).await;
    let server_not_serving = observe_not_serving(&gateway_endpoint, "").await;
    let status = gateway.wait_for_exit(SHUTDOWN_BOUND).await;
    let exited_at = Instant::now();
    eprintln!(
        "gateway: {status:?} {:?} after SIGTERM",
        exited_at - sigterm_at
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the gateway must exit 0 within {SHUTDOWN_BOUND:?}, got {status:?}"
    );
    assert!(
        reported_not_serving && server_not_serving,
        "the gateway must report NOT_SERVING (IngestService and \"\") before it stops accepting"
    );
    // The client now fails (the gateway is gone); give it a moment to notice, then stop it.
    let noticed = wait_until(Duration::from_secs(10), || {
        log.lock().expect("lock").failures_after(exited_at) >= 3
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    client.await??;
    let log = std::mem::take(&mut *log.lock().expect("lock"));
    eprintln!(
        "client: {} calls OK ({} before SIGTERM, {} while the gateway shut down), {} failed; {} events acknowledged",
        log.oks.len(),
        oks_before,
        log.oks_after(sigterm_at),
        log.failures.len(),
        log.acknowledged.len()
    );
    assert!(
        noticed,
        "the client saw no failures after the gateway exited"
    );
    assert_eq!(
        log.oks_after(exited_at),
        0,
        "OK answers after the gateway exited"
    );
    assert!(
        log.failures
            .iter()
            .all(|(at, code, _)| *at > sigterm_at && *code == Code::Unavailable),
        "failures must be UNAVAILABLE and come only after SIGTERM: {:?}",
        log.failures
            .iter()
            .map(|(at, code, message)| (at.saturating_duration_since(sigterm_at), code, message))
            .collect::<Vec<_>>()
    );
    assert!(
        log.acknowledged.len() >= 1_000,
        "the workload was too small to mean anything"
    );

    // 4. The second archiver catches up, then gets its SIGTERM.
    let caught_up = wait_for_archive(&config, &kafka.brokers, Duration::from_secs(60)).await?;
    let (status, took) = second_archiver.terminate_and_wait(SHUTDOWN_BOUND).await?;
    eprintln!("second archiver: {status} {took:?} after SIGTERM");
    assert!(caught_up, "the second archiver did not catch up");
    assert!(status.success(), "the second archiver exited with {status}");

    // Every Kafka record once, every acknowledged event exactly once, chains contiguous, no orphans.
    let report = verify_exactly_once(&config, &kafka.brokers, &log.acknowledged).await?;
    report.ensure_each_once(&log.acknowledged)?;
    eprintln!("test took {:?}", test_started.elapsed());
    Ok(())
}

/// `chatvault standalone`: one process, Kafka in it. SIGTERM during ingest must first stop the gateway, then
/// archive the topic to its end, then exit 0. A second run on the same data directory (a fresh Kafka whose
/// offsets start at 0 again) keeps archiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_standalone_during_ingest_archives_every_acknowledged_event()
-> anyhow::Result<()> {
    let test_started = Instant::now();
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    // Kafka died with the process: the archive alone must hold every acknowledged event, once.
    let config = Config {
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
    };

    let mut acknowledged = standalone_under_load(&data_dir, &[1, 2]).await?;
    let report = verify_archive(&config, &[0, 1, 2]).await?;
    report.ensure_each_once(&acknowledged)?;
    eprintln!("archive after the first run: heads {:?}", report.heads);

    let second_run = standalone_under_load(&data_dir, &[3]).await?;
    acknowledged.extend(second_run);
    let report = verify_archive(&config, &[0, 1, 2]).await?;
    report.ensure_each_once(&acknowledged)?;
    eprintln!(
        "archive after the second run: heads {:?}; test took {:?}",
        report.heads,
        test_started.elapsed()
    );
    Ok(())
}

/// Runs `chatvault standalone` on `data_dir` with one ingest client per entry of `clients` (each sends distinct
/// event ids), SIGTERMs it once it archived something, checks it exits 0 in time, and returns the
/// acknowledged event ids.
async fn standalone_under_load(
    data_dir: &Path,
    clients: &[u64],
) -> anyhow::Result<BTreeSet<String>> {
    let gateway_address = free_address()?;
    let restorer_address = free_address()?;
    let http_address = free_address()?;
    let metrics_address = free_address()?;
    let data_dir_arg = data_dir.to_string_lossy().to_string();
    let manifests_before = count_manifests(&data_dir.join("archive"));
    let mut standalone = ChildRole::spawn(
        "standalone",
        binary(),
        &[
            "standalone",
            "--data-dir",
            &data_dir_arg,
            "--partitions",
            "3",
            "--gateway-listen",
            &gateway_address,
            "--restorer-listen",
            &restorer_address,
            "--http-listen",
            &http_address,
            "--metrics-listen",
            &metrics_address,
        ],
    )?;
    let gateway_endpoint = format!("http://{gateway_address}");
    wait_until_serving(&gateway_endpoint, INGEST_SERVICE, SHUTDOWN_BOUND).await?;
    let token = std::fs::read_to_string(data_dir.join("standalone-token"))?
        .trim()
        .to_string();

    // Several clients, so that calls are in flight at any moment, the SIGTERM's included.
    let log = Arc::new(Mutex::new(IngestLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .iter()
        .map(|client| {
            spawn_ingest(
                gateway_endpoint.clone(),
                token.clone(),
                vec!["demo".to_string()],
                *client,
                log.clone(),
                stop.clone(),
            )
        })
        .collect();
    // Sustained ingest long enough for the archiver to join its group and commit under load.
    let archived_some = wait_until(SHUTDOWN_BOUND, || {
        count_manifests(&data_dir.join("archive")) > manifests_before
    })
    .await;
    assert!(archived_some, "standalone archived nothing");
    // Standalone acknowledges a call only once its events are archived (about half a second each), so keep
    // the load on until enough was acknowledged to mean something, then SIGTERM it mid-load.
    let enough = wait_until(Duration::from_secs(120), || {
        log.lock().expect("lock").acknowledged.len() >= 250 * clients.len()
    })
    .await;
    assert!(enough, "standalone acknowledged too little under load");

    let sigterm_at = Instant::now();
    let (status, took) = standalone.terminate_and_wait(SHUTDOWN_BOUND).await?;
    eprintln!("standalone: {status} {took:?} after SIGTERM");
    let noticed = wait_until(Duration::from_secs(10), || {
        log.lock().expect("lock").failures_after(sigterm_at) >= clients.len()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let log = std::mem::take(&mut *log.lock().expect("lock"));
    eprintln!(
        "clients: {} calls OK ({} after SIGTERM), {} failed; {} events acknowledged",
        log.oks.len(),
        log.oks_after(sigterm_at),
        log.failures.len(),
        log.acknowledged.len()
    );
    assert!(status.success(), "standalone exited with {status}");
    assert!(
        noticed,
        "the clients saw no failures after the standalone exited"
    );
    assert!(
        log.acknowledged.len() >= 250 * clients.len(),
        "the workload was too small to mean anything"
    );
    Ok(log.acknowledged)
}

/// How many manifests were committed under the standalone archive directory.
fn count_manifests(archive: &Path) -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|entry| {
                    let path: PathBuf = entry.path();
                    if path.is_dir() {
                        if path.file_name().is_some_and(|name| name == "pending") {
                            0
                        } else {
                            count(&path)
                        }
                    } else {
                        usize::from(path.extension().is_some_and(|ext| ext == "json"))
                    }
                })
                .sum()
        })
    }
    count(&archive.join("manifests"))
}

/// The restorer: SIGTERM while two GetConversation streams are in flight, one read to its end and one whose
/// client stopped reading. New calls are refused, the first stream finishes completely, the stalled one is cut
/// off at `restorer.drain_timeout`, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_restorer_lets_the_in_flight_stream_finish() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 1)?;
    let s3 = S3Server::start("archive").await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &dir.path().join("keyring.json"),
    );
    config.restorer.grpc_listen = free_address()?;
    config.restorer.drain_timeout = Duration::from_millis(4_000);
    config.shared.telemetry.metrics_listen = "127.0.0.1:0".into();

    // A conversation large enough that its restore stream outlasts HTTP/2 flow-control windows.
    const MESSAGES: usize = 1_500;
    let events: Vec<ChatEvent> = (0..MESSAGES)
        .map(|index| ChatEvent {
            tenant_id: "acme".into(),
            conversation_id: "C-long".into(),
            message_id: format!("m{index}"),
            kind: EventKind::MessageCreated as i32,
            sender: Some(Sender {
                id: format!("U{}", index % 5),
                ..Default::default()
            }),
            occurred_at_micros: BASE_MICROS + index as i64 * 1_000_000,
            text: format!(
                "message {index}: {}",
                "lorem ipsum dolor sit amet ".repeat(40)
            ),
            ..Default::default()
        })
        .collect();
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    for chunk in events.chunks(500) {
        ingest
            .ingest_batch(authorized(
                IngestBatchRequest {
                    events: chunk.to_vec(),
                },
                INGEST_TOKEN,
            ))
            .await?;
    }
    let archived = wait_until(SHUTDOWN_BOUND, || {
        stats.events.committed_events.load(Ordering::Relaxed) as usize >= MESSAGES
    })
    .await;
    assert!(archived, "the conversation was not archived");
    gateway.stop().await?;
    archiver.stop().await?;

    let config_path = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let endpoint = format!("http://{}", config.restorer.grpc_listen);
    let mut restorer = ChildRole::spawn_role("restorer", binary(), "restorer", &config_path)?;
    wait_until_serving(&endpoint, RESTORE_SERVICE, SHUTDOWN_BOUND).await?;
    // Small flow-control windows (one connection per stream): the server can only send as fast as each
    // client reads.
    let open_stream = || async {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
            .initial_stream_window_size(64 * 1024)
            .initial_connection_window_size(64 * 1024)
            .connect()
            .await?;
        let stream = RestoreServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .get_conversation(authorized(
                GetConversationRequest {
                    tenant_id: "acme".into(),
                    conversation_id: "C-long".into(),
                    include_events: true,
                    ..Default::default()
                },
                RESTORE_TOKEN,
            ))
            .await?
            .into_inner();
        anyhow::Ok(stream)
    };
    let mut stream = open_stream().await?;
    let mut stalled = open_stream().await?;
    let mut items = vec![stream.message().await?.expect("a first item")];
    let stalled_first = stalled.message().await?;
    assert!(stalled_first.is_some(), "the second stream has started");

    let sigterm_at = Instant::now();
    restorer.terminate()?;
    // New calls are refused (NOT_SERVING, then no longer accepted) while the stream is still open.
    let refused = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match health_status(&endpoint, RESTORE_SERVICE).await {
                Ok(ServingStatus::Serving) => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => return true,
            }
        }
        false
    };
    assert!(
        refused.await,
        "the restorer kept serving new calls after SIGTERM"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        restorer.try_status()?.is_none(),
        "the restorer exited before its in-flight stream finished"
    );
    while let Some(item) = stream.message().await? {
        items.push(item);
    }
    let events_restored = items
        .iter()
        .filter(|item| matches!(item.item, Some(Item::ArchivedEvent(_))))
        .count();
    let messages_restored = items
        .iter()
        .filter(|item| matches!(item.item, Some(Item::Message(_))))
        .count();
    assert_eq!(
        (events_restored, messages_restored),
        (MESSAGES, MESSAGES),
        "the in-flight stream must finish complete"
    );
    // The stalled stream holds the process until the drain deadline, then it is cut off.
    let status = restorer.wait_for_exit(SHUTDOWN_BOUND).await;
    let took = sigterm_at.elapsed();
    eprintln!("restorer: {status:?} {took:?} after SIGTERM");
    assert!(
        status.is_some_and(|s| s.success()),
        "the restorer must exit 0 after its drain, got {status:?}"
    );
    assert!(
        took >= config.restorer.drain_timeout,
        "the restorer exited before its drain deadline while a stream was in flight"
    );
    let mut stalled_items = 1;
    let stalled_end = loop {
        match stalled.message().await {
            Ok(Some(_)) => stalled_items += 1,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    eprintln!("stalled stream: {stalled_items} items, then {stalled_end:?}");
    assert!(
        stalled_end.is_some() && stalled_items < 2 * MESSAGES,
        "the stalled stream must end in an error, not look complete ({stalled_items} items)"
    );
    Ok(())
}

/// An archiver whose storage stops answering mid-upload still exits 0 at its shutdown deadline (nothing is
/// lost: the uncommitted records stay in Kafka), and the next archiver archives everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_archiver_with_hung_storage_exits_at_its_deadline() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let s3_address = s3.endpoint.trim_start_matches("http://").parse()?;
    let proxy = FreezableProxy::start(s3_address).await?;
    let dir = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &dir.path().join("keyring.json"),
    );
    // The archiver process reaches storage through the proxy.
    let mut hung_config = config.clone();
    hung_config
        .shared
        .storage
        .options
        .insert("aws_endpoint".into(), proxy.endpoint());
    hung_config.archiver.shutdown_timeout = Duration::from_millis(3_000);
    hung_config.archiver.stall_timeout = Duration::from_millis(1_000);
    let ops_address = free_address()?;
    hung_config.shared.telemetry.metrics_listen = ops_address.clone();
    let config_path = dir.path().join("chatvault.toml");
    write_config(&hung_config, &config_path)?;

    let gateway = start_gateway(&config).await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    let mut acknowledged = BTreeSet::new();
    let mut send = async |tag: &str| -> anyhow::Result<()> {
        for call in 0..5 {
            let events = tagged_events(call, TENANTS, &format!("{tag}{call}"));
            let response = ingest
                .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
                .await?;
            acknowledged.extend(response.into_inner().event_ids);
        }
        Ok(())
    };
    let mut archiver = ChildRole::spawn_role("archiver", binary(), "archiver", &config_path)?;
    send("before").await?;
    let archived = wait_for_archive(&config, &kafka.brokers, SHUTDOWN_BOUND).await?;
    assert!(archived, "the archiver did not archive the first events");

    let readyz = format!("http://{ops_address}/readyz");
    assert_eq!(reqwest::get(&readyz).await?.status(), 200);
    proxy.freeze();
    send("frozen").await?;
    // The archiver consumes them and uploads into the frozen connection: after stall_timeout_ms it reports
    // the partitions stalled and stops being ready.
    let mut unready = None;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_BOUND;
    while unready.is_none() && tokio::time::Instant::now() < deadline {
        let response = reqwest::get(&readyz).await?;
        if response.status() == 503 {
            unready = Some(response.text().await?);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let unready = unready.expect("/readyz stayed 200 while storage hung");
    eprintln!("archiver with hung storage, /readyz: {unready}");
    assert!(unready.contains("stalled"), "{unready}");
    let (status, took) = archiver.terminate_and_wait(SHUTDOWN_BOUND).await?;
    eprintln!("archiver with hung storage: {status} {took:?} after SIGTERM");
    assert!(status.success(), "the archiver exited with {status}");
    assert!(
        took >= hung_config.archiver.shutdown_timeout,
        "the archiver gave up before its shutdown deadline"
    );

    proxy.thaw();
    let (next, _) = start_archiver(&config, "next").await?;
    let caught_up = wait_for_archive(&config, &kafka.brokers, SHUTDOWN_BOUND).await?;
    next.stop().await?;
    gateway.stop().await?;
    assert!(caught_up, "the next archiver did not catch up");
    let report = verify_exactly_once(&config, &kafka.brokers, &acknowledged).await?;
    report.ensure_each_once(&acknowledged)?;
    Ok(())
}
