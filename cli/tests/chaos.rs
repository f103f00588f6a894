//! The chaos suite (issue 8): every event a gateway acknowledged is archived exactly once, whatever happens.
//!
//! Two `chatvault gateway` and three `chatvault archiver` processes run against a Kafka broker in its own
//! process (`chatvault-test-broker`: librdkafka's mock cluster, 3 brokers, 12 partitions) and an S3 server
//! (s3s-fs) behind a fault-injecting HTTP proxy (S3 errors without forwarding, latency, answers lost after the
//! write). Several in-test gRPC callers send events with unique identities to both gateways, retrying
//! retryable failures on the other gateway; meanwhile random gateways and archivers are SIGKILLed and
//! restarted, and every broker goes down for a few seconds and comes back (connections drop, data stays).
//! Afterwards the archivers catch up to every partition's high watermark and get SIGTERM, and the checker
//! reads the archive: the manifest chains (testkit's auditor), the bucket listing (no orphans) and the rows as
//! a user reads them (`scripts/read_archive.py`, DuckDB), and prints the figures.
//!
//! Profiles (docs/OPERATIONS.md, "Chaos suite"): the defaults are the CI profile (40,000 events, 5 kills, one
//! broker restart); environment variables scale it:
//! `CHATVAULT_CHAOS_EVENTS`, `CHATVAULT_CHAOS_KILLS`, `CHATVAULT_CHAOS_BROKER_RESTARTS`,
//! `CHATVAULT_CHAOS_RATE` (events per second offered), `CHATVAULT_CHAOS_CALLERS`, `CHATVAULT_CHAOS_SEED`, and
//! `CHATVAULT_CHAOS_KAFKA_BROKERS=host:port` for an external Kafka-compatible broker (no broker restart then).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use chatvault_core::config::StorageConfig;
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_proto::v1::{ChatEvent, EventKind, IngestBatchRequest, Sender};
use chatvault_testkit::archive::{Identity, audit_archive, wait_for_archive};
use chatvault_testkit::broker::{BrokerProcess, ensure_topics};
use chatvault_testkit::fault_proxy::{FaultProxy, Faults};
use chatvault_testkit::kafka::high_watermarks;
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, TENANTS, TOPIC, authorized, data_keys, test_config,
};
use chatvault_testkit::process::{ChildRole, free_address, wait_until_serving, write_config};
use chatvault_testkit::python::{script, venv_python};
use chatvault_testkit::s3::S3Server;
use common::{BASE_MICROS, Rng};
use futures::TryStreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

const PARTITIONS: i32 = 12;
const CONVERSATIONS_PER_TENANT: u64 = 240;
const EVENTS_PER_CALL: usize = 25;
/// The month every event's `occurred_at` falls in (one data key per tenant).
const PERIOD: &str = "2025-11";
const INGEST_SERVICE: &str = "chatvault.v1.IngestService";
/// A call that cannot be acknowledged for this long (on either gateway) fails the test.
const CALL_GIVE_UP: Duration = Duration::from_secs(180);
/// How long after the last kill a broker restart waits (the group's session timeout is 6 s, then a rebalance).
const BROKER_RESTART_QUIET: Duration = Duration::from_secs(15);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chatvault"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The run's size, from the environment (defaults: the CI profile).
#[derive(Debug, Clone)]
struct Profile {
    events: usize,
    kills: usize,
    broker_restarts: usize,
    /// Events per second offered, over all callers (the load is paced so that killed and rebalanced
    /// archivers do not fall behind the mock broker's retention of about 5 MB per partition).
    rate: f64,
    callers: usize,
    seed: u64,
}

impl Profile {
    fn from_env() -> Profile {
        let clock_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_micros() as u64)
            .unwrap_or(1);
        Profile {
            events: env_or("CHATVAULT_CHAOS_EVENTS", 40_000),
            kills: env_or("CHATVAULT_CHAOS_KILLS", 5),
            broker_restarts: env_or("CHATVAULT_CHAOS_BROKER_RESTARTS", 1),
            rate: env_or("CHATVAULT_CHAOS_RATE", 400.0),
            callers: env_or("CHATVAULT_CHAOS_CALLERS", 6),
            seed: env_or("CHATVAULT_CHAOS_SEED", clock_seed),
        }
    }
}

/// Event `seq` of the run: a message with a unique identity (its own event id), in one of the test tenants'
/// conversations, with 80-400 bytes of text, all in [`PERIOD`].
fn chaos_event(seed: u64, seq: usize) -> ChatEvent {
    let mut rng = Rng::new(seed ^ (seq as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let tenant = TENANTS[rng.below(TENANTS.len() as u64) as usize];
    let conversation = format!("chaos-c{:03}", rng.below(CONVERSATIONS_PER_TENANT));
    let event_id = format!("chaos-{seq:09}");
    let user = format!("U{}", rng.below(12));
    let words = 8 + rng.below(50) as usize;
    let text: Vec<&str> = (0..words)
        .map(|_| {
            ["lorem", "ipsum", "dolor", "sit", "amet", "chaos", "kafka"][rng.below(7) as usize]
        })
        .collect();
    ChatEvent {
        tenant_id: tenant.to_string(),
        workspace_id: format!("W-{tenant}"),
        conversation_id: conversation,
        kind: EventKind::MessageCreated as i32,
        message_id: event_id.clone(),
        event_id,
        occurred_at_micros: BASE_MICROS + seq as i64 * 1_000 + rng.below(1_000) as i64,
        sender: Some(Sender {
            id: user.clone(),
            display_name: format!("user {user}"),
            is_bot: false,
        }),
        text: format!("{seq}: {}", text.join(" ")),
        raw_payload: format!("{{\"seq\":{seq}}}").into_bytes(),
        raw_content_type: "application/json".into(),
        ..Default::default()
    }
}

fn identity(event: &ChatEvent) -> Identity {
    (
        event.tenant_id.clone(),
        event.conversation_id.clone(),
        event.event_id.clone(),
    )
}

/// What the callers saw.
#[derive(Debug, Default)]
struct IngestLog {
    /// Identities of every event sent at least once.
    sent: HashSet<Identity>,
    /// Identities of every event in a call answered OK.
    acknowledged: HashSet<Identity>,
    /// Identities sent more than once (their first call failed), with how many times they were sent.
    resent: HashMap<Identity, usize>,
    /// Event sends beyond the first, over all events: an upper bound on the extra Kafka records.
    extra_sends: usize,
    calls_ok: usize,
    /// Failed calls by gRPC code.
    failures: BTreeMap<String, usize>,
    /// Failures that are not retryable: the gateway broke its contract (or the test did).
    unexpected: Vec<String>,
}

/// Whether a failed call may be retried. UNAVAILABLE and RESOURCE_EXHAUSTED are the gateway's retryable
/// answers; the others are what a client sees when the gateway dies mid-call or cannot be reached.
fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown => true,
        // An HTTP/2 stream reset by a dying connection surfaces as INTERNAL.
        Code::Internal => {
            let message = status.message().to_lowercase();
            ["h2", "connection", "transport", "stream", "broken pipe"]
                .iter()
                .any(|word| message.contains(word))
        }
        _ => false,
    }
}

/// One caller: takes the next [`EVENTS_PER_CALL`] sequence numbers until `total`, paced to `rate` overall,
/// sends them to its preferred gateway and, on retryable failures, to the other one until acknowledged.
#[allow(clippy::too_many_arguments)]
async fn caller(
    index: usize,
    endpoints: Vec<String>,
    profile: Profile,
    next: Arc<AtomicUsize>,
    progress: Arc<AtomicUsize>,
    started: Instant,
    log: Arc<Mutex<IngestLog>>,
) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for endpoint in &endpoints {
        let channel = Channel::from_shared(endpoint.clone())?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        clients.push(IngestServiceClient::new(channel));
    }
    loop {
        let first = next.fetch_add(EVENTS_PER_CALL, Ordering::SeqCst);
        if first >= profile.events {
            return Ok(());
        }
        let last = (first + EVENTS_PER_CALL).min(profile.events);
        let due = started + Duration::from_secs_f64(first as f64 / profile.rate);
        tokio::time::sleep_until(due.into()).await;
        let events: Vec<ChatEvent> = (first..last)
            .map(|seq| chaos_event(profile.seed, seq))
            .collect();
        let identities: Vec<Identity> = events.iter().map(identity).collect();
        log.lock()
            .expect("lock")
            .sent
            .extend(identities.iter().cloned());
        progress.fetch_add(events.len(), Ordering::SeqCst);
        let mut gateway = index % clients.len();
        let give_up = Instant::now() + CALL_GIVE_UP;
        let mut attempts = 0usize;
        loop {
            attempts += 1;
            let mut request = authorized(
                IngestBatchRequest {
                    events: events.clone(),
                },
                INGEST_TOKEN,
            );
            request.set_timeout(Duration::from_secs(30));
            let result = clients[gateway].ingest_batch(request).await;
            // What to do next, decided under the log's lock (held across no await).
            let acknowledged_or_given_up = {
                let mut log = log.lock().expect("lock");
                if attempts > 1 {
                    log.extra_sends += events.len();
                    for identity in &identities {
                        log.resent.insert(identity.clone(), attempts);
                    }
                }
                match result {
                    Ok(response) => {
                        let ids = response.into_inner().event_ids;
                        let expected: Vec<&String> = events.iter().map(|e| &e.event_id).collect();
                        if ids.iter().collect::<Vec<_>>() != expected {
                            log.unexpected.push(format!(
                                "call of events {first}..{last}: OK with event ids {:?}…, expected {:?}…",
                                &ids[..ids.len().min(2)],
                                &expected[..2.min(expected.len())]
                            ));
                        }
                        log.calls_ok += 1;
                        log.acknowledged.extend(identities.iter().cloned());
                        true
                    }
                    Err(status) => {
                        *log.failures
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                        if retryable(&status) {
                            anyhow::ensure!(
                                Instant::now() < give_up,
                                "events {first}..{last} were not acknowledged by either gateway within {CALL_GIVE_UP:?}; last answer: {:?} {:?}",
                                status.code(),
                                status.message()
                            );
                            false
                        } else {
                            log.unexpected.push(format!(
                                "call of events {first}..{last} to {}: {:?} {:?} (not retryable)",
                                endpoints[gateway],
                                status.code(),
                                status.message()
                            ));
                            true
                        }
                    }
                }
            };
            if acknowledged_or_given_up {
                break;
            }
            gateway = (gateway + 1) % clients.len();
            let backoff = (50 * attempts as u64).min(1_000);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gateway,
    Archiver,
}

impl Kind {
    fn role(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Archiver => "archiver",
        }
    }
}

/// One role process, respawned after each kill.
struct Role {
    name: String,
    kind: Kind,
    config_path: PathBuf,
    child: ChildRole,
}

impl Role {
    fn spawn(name: &str, kind: Kind, config_path: &Path) -> anyhow::Result<Role> {
        Ok(Role {
            name: name.to_string(),
            kind,
            config_path: config_path.to_path_buf(),
            child: ChildRole::spawn_role(name, binary(), kind.role(), config_path)?,
        })
    }

    fn respawn(&mut self) -> anyhow::Result<()> {
        self.child =
            ChildRole::spawn_role(&self.name, binary(), self.kind.role(), &self.config_path)?;
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    Kill,
    BrokerRestart,
}

/// What the fault schedule did.
#[derive(Debug, Default)]
struct ChaosLog {
    kills: BTreeMap<&'static str, usize>,
    broker_restarts: usize,
    broker_restarts_skipped: usize,
    /// Actions not reached before ingest ended.
    not_reached: usize,
    /// Roles that exited without being killed (each was restarted).
    unexpected_exits: Vec<String>,
}

/// Runs the fault schedule: each action fires once the callers have sent its share of the events. A kill is
/// a SIGKILL of a random role (the first a gateway, the second an archiver), restarted after 0.3-3 s; a broker restart takes every broker down for 3-6 s.
/// Roles that exit on their own are recorded and restarted. Returns when `done` is set.
async fn run_chaos(
    roles: &mut [Role],
    broker: Option<&BrokerProcess>,
    mut plan: Vec<(usize, Action)>,
    progress: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<ChaosLog> {
    let mut rng = Rng::new(seed ^ 0xc4a0_5eed);
    let mut log = ChaosLog::default();
    plan.sort_by_key(|(at, _)| *at);
    let mut plan = plan.into_iter().peekable();
    let mut kills_done = 0usize;
    let mut last_kill: Option<Instant> = None;
    while !done.load(Ordering::SeqCst) {
        for role in roles.iter_mut() {
            if let Some(status) = role.child.try_status()? {
                eprintln!(
                    "chaos: {} exited on its own with {status}; restarting it",
                    role.name
                );
                log.unexpected_exits
                    .push(format!("{} exited with {status}", role.name));
                role.respawn()?;
            }
        }
        // A broker restart waits until the group has settled after the last kill: librdkafka 2.12.1's mock
        // coordinator aborts (`rd_kafka_mock_cgrp_classic_member_add: Assertion '!member->resp'`) when members
        // re-join across a restart in the middle of a rebalance, which takes the whole broker process down.
        let settled = last_kill.is_none_or(|at| at.elapsed() >= BROKER_RESTART_QUIET);
        let due = plan.peek().is_some_and(|(at, action)| {
            progress.load(Ordering::SeqCst) >= *at && (*action != Action::BrokerRestart || settled)
        });
        if !due {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let (at, action) = plan.next().expect("peeked");
        match action {
            Action::Kill => {
                // The first kill hits a gateway and the second an archiver, so even a short run has both;
                // the rest hit any role.
                let candidates: Vec<usize> = (0..roles.len())
                    .filter(|index| match kills_done {
                        0 => roles[*index].kind == Kind::Gateway,
                        1 => roles[*index].kind == Kind::Archiver,
                        _ => true,
                    })
                    .collect();
                let role = &mut roles[candidates[rng.below(candidates.len() as u64) as usize]];
                kills_done += 1;
                let pause = Duration::from_millis(300 + rng.below(2_700));
                eprintln!(
                    "chaos: SIGKILL {} (pid {}) at {at} events sent; restart in {pause:?}",
                    role.name,
                    role.child.id()
                );
                role.child.kill();
                last_kill = Some(Instant::now());
                *log.kills.entry(role.kind.role()).or_default() += 1;
                tokio::time::sleep(pause).await;
                role.respawn()?;
            }
            Action::BrokerRestart => match broker {
                Some(broker) => {
                    // Shorter than the group's session timeout (6 s), so the restart alone expels no member.
                    let down_for = Duration::from_millis(2_000 + rng.below(2_000));
                    eprintln!("chaos: every broker down at {at} events sent, for {down_for:?}");
                    broker.all_down()?;
                    tokio::time::sleep(down_for).await;
                    broker.all_up()?;
                    eprintln!("chaos: brokers up again");
                    log.broker_restarts += 1;
                }
                None => {
                    eprintln!(
                        "chaos: broker restart skipped: an external broker (CHATVAULT_CHAOS_KAFKA_BROKERS) cannot be restarted by the test"
                    );
                    log.broker_restarts_skipped += 1;
                }
            },
        }
    }
    log.not_reached = plan.count();
    Ok(log)
}

/// The rows of one tenant as `scripts/read_archive.py` (DuckDB) returns them for `sql`; empty when the tenant
/// has no files.
fn duckdb_rows(
    root: &Path,
    tenant: &str,
    key_base64: &str,
    sql: &str,
) -> anyhow::Result<Vec<Value>> {
    let output = Command::new(venv_python())
        .arg(script("read_archive.py"))
        .args(["--reader", "duckdb", "--tenant", tenant])
        .arg("--root")
        .arg(root)
        .arg("--key")
        .arg(format!("{PERIOD}={key_base64}"))
        .arg("--sql")
        .arg(sql)
        .output()
        .context("running scripts/read_archive.py")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(1) && stderr.contains("no files of tenant") {
        return Ok(Vec::new());
    }
    anyhow::ensure!(
        output.status.success(),
        "read_archive.py for tenant {tenant} failed ({}): {stderr}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).context("a JSON row from read_archive.py"))
        .collect()
}

/// One archived row as the documented reader returns it.
struct ReaderRow {
    identity: Identity,
    partition: i64,
    offset: i64,
    /// The copy's content: copies of one identity must agree on it.
    content: (String, i64),
}

fn reader_rows(root: &Path, tenant: &str, key_base64: &str) -> anyhow::Result<Vec<ReaderRow>> {
    let sql = "SELECT conversation_id, event_id, kafka_partition, kafka_offset, \
               md5(coalesce(text, '')) AS text_md5, epoch_us(occurred_at) AS occurred FROM events";
    duckdb_rows(root, tenant, key_base64, sql)?
        .into_iter()
        .map(|row| {
            let text = |name: &str| row[name].as_str().unwrap_or_default().to_string();
            let number = |name: &str| {
                row[name]
                    .as_i64()
                    .with_context(|| format!("column {name} of {row}"))
            };
            Ok(ReaderRow {
                identity: (
                    tenant.to_string(),
                    text("conversation_id"),
                    text("event_id"),
                ),
                partition: number("kafka_partition")?,
                offset: number("kafka_offset")?,
                content: (text("text_md5"), number("occurred")?),
            })
        })
        .collect()
}

/// `(low, high)` watermark of every partition of `topic`.
fn watermarks(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "chatvault-chaos-inspector")
        .create()?;
    let mut out = BTreeMap::new();
    for (partition, _) in high_watermarks(brokers, topic)? {
        out.insert(
            partition,
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?,
        );
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_is_archived_exactly_once_under_chaos() -> anyhow::Result<()> {
    let test_started = Instant::now();
    let profile = Profile::from_env();
    eprintln!(
        "chaos profile: {profile:?} (rerun with CHATVAULT_CHAOS_SEED={})",
        profile.seed
    );
    venv_python(); // fail fast with the fix when the virtualenv is missing

    // Kafka in its own process, or an external broker (then a topic and group of this run's own).
    let external = std::env::var("CHATVAULT_CHAOS_KAFKA_BROKERS").ok();
    let (mut broker, brokers, topic) = match &external {
        Some(brokers) => {
            let topic = format!("chatvault-chaos-{}", profile.seed);
            ensure_topics(brokers, &topic, PARTITIONS).await?;
            eprintln!(
                "chaos: external broker {brokers}, topic {topic}; broker restarts will be skipped"
            );
            (None, brokers.clone(), topic)
        }
        None => {
            let broker = BrokerProcess::start(TOPIC, PARTITIONS)?;
            let brokers = broker.brokers.clone();
            (Some(broker), brokers, TOPIC.to_string())
        }
    };

    // S3 behind the fault proxy for the roles; the checker reads the server directly.
    let s3 = S3Server::start("archive").await?;
    let proxy = FaultProxy::start(
        s3.address(),
        Faults {
            error_probability: 0.05,
            max_latency: Duration::from_millis(50),
            drop_response_probability: 0.03,
            seed: profile.seed,
        },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let keyring = dir.path().join("keyring.json");
    let mut config = test_config(&brokers, s3.storage_config_at(&proxy.endpoint()), &keyring);
    config.shared.kafka.topic = topic.clone();
    config.archiver.group_id = format!("chatvault-chaos-{}", profile.seed);
    config.archiver.session_timeout = Duration::from_millis(6_000);
    // Batches of a few seconds: each partition sees a few dozen events per second, and batches sealed every
    // 500 ms (the tests' default) would make thousands of tiny files for the checker to read.
    config.archiver.max_batch_age = Duration::from_millis(2_500);
    config.archiver.shutdown_timeout = Duration::from_millis(20_000);
    config.gateway.drain_timeout = Duration::from_millis(10_000);
    // Several roles share the host: each takes a free port for its metrics endpoint.
    config.shared.telemetry.metrics_listen = "127.0.0.1:0".into();
    let mut direct = config.clone();
    direct.shared.storage = s3.storage_config();

    let mut roles = Vec::new();
    let mut endpoints = Vec::new();
    for index in 0..2 {
        let mut gateway_config = config.clone();
        gateway_config.gateway.grpc_listen = free_address()?;
        gateway_config.gateway.http_listen = free_address()?;
        let path = dir.path().join(format!("gateway-{index}.toml"));
        write_config(&gateway_config, &path)?;
        endpoints.push(format!("http://{}", gateway_config.gateway.grpc_listen));
        roles.push(Role::spawn(
            &format!("gateway-{index}"),
            Kind::Gateway,
            &path,
        )?);
    }
    let archiver_path = dir.path().join("archiver.toml");
    write_config(&config, &archiver_path)?;
    for index in 0..3 {
        roles.push(Role::spawn(
            &format!("archiver-{index}"),
            Kind::Archiver,
            &archiver_path,
        )?);
    }
    for endpoint in &endpoints {
        wait_until_serving(endpoint, INGEST_SERVICE, Duration::from_secs(60)).await?;
    }

    // The fault schedule, by events sent: kills spread over 5-90 % of the run, broker restarts over 20-50 % (a
    // restart may wait up to BROKER_RESTART_QUIET for the group to settle, and must still happen during ingest).
    let mut rng = Rng::new(profile.seed);
    let at = |rng: &mut Rng, from: u64, to: u64| {
        (profile.events as u64 * (from * 10 + rng.below((to - from) * 10)) / 1_000) as usize
    };
    let mut plan = Vec::new();
    for _ in 0..profile.kills {
        plan.push((at(&mut rng, 5, 90), Action::Kill));
    }
    for _ in 0..profile.broker_restarts {
        plan.push((at(&mut rng, 20, 50), Action::BrokerRestart));
    }

    // Load.
    let ingest_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(IngestLog::default()));
    let callers: Vec<_> = (0..profile.callers)
        .map(|index| {
            tokio::spawn(caller(
                index,
                endpoints.clone(),
                profile.clone(),
                next.clone(),
                progress.clone(),
                ingest_started,
                log.clone(),
            ))
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let ingest = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for caller in callers {
                results.push(caller.await);
            }
            done.store(true, Ordering::SeqCst);
            results
        })
    };
    let chaos = run_chaos(
        &mut roles,
        broker.as_ref(),
        plan,
        progress.clone(),
        done.clone(),
        profile.seed,
    )
    .await?;
    for result in ingest.await? {
        result??;
    }
    let ingest_took = ingest_started.elapsed();
    let log = std::mem::take(&mut *log.lock().expect("lock"));
    eprintln!(
        "chaos: ingest done in {ingest_took:?}: {} events sent, {} acknowledged, {} calls OK, failures {:?}; fault proxy {}",
        log.sent.len(),
        log.acknowledged.len(),
        log.calls_ok,
        log.failures,
        proxy.counts.summary()
    );

    // Catch up, then SIGTERM every role.
    let catch_up_started = Instant::now();
    let catch_up_limit = Duration::from_secs(300 + profile.events as u64 / 1_000);
    let caught_up = wait_for_archive(&direct, &brokers, catch_up_limit).await?;
    let catch_up_took = catch_up_started.elapsed();
    let mut failures: Vec<String> = Vec::new();
    if !caught_up {
        let mut heads = Vec::new();
        let chains = chatvault_archive::chain::ChainReader::new(
            object_store_from_config(&direct.shared.storage)?,
            &topic,
        );
        for (partition, high) in high_watermarks(&brokers, &topic)? {
            heads.push(format!(
                "p{partition}: {} of {high}",
                chains.head(partition).await?.end_offset
            ));
        }
        failures.push(format!(
            "the archivers did not catch up within {catch_up_limit:?}: {}",
            heads.join(", ")
        ));
    }
    for role in &roles {
        role.child.terminate()?;
    }
    for role in &mut roles {
        match role.child.wait_for_exit(Duration::from_secs(60)).await {
            Some(status) if status.success() => {}
            Some(status) => {
                failures.push(format!("{} exited with {status} after SIGTERM", role.name))
            }
            None => failures.push(format!("{} did not exit within 60 s of SIGTERM", role.name)),
        }
    }
    failures.extend(chaos.unexpected_exits.iter().cloned());
    failures.extend(log.unexpected.iter().take(20).cloned());
    if let Some(broker) = &mut broker
        && !broker.is_running()
    {
        failures.push("the broker process died".into());
    }

    // The checker. 1. The manifests, read as an auditor does (chains, SHA-256s, rows in range), and the
    // bucket listed directly.
    let check_started = Instant::now();
    let marks = watermarks(&brokers, &topic)?;
    let partitions: Vec<i32> = marks.keys().copied().collect();
    // The S3 server's bucket directory holds the very bytes it serves; reading them from disk is ten times
    // faster than through s3s-fs in a debug build. The bucket is listed through S3 below.
    let mut on_disk = direct.clone();
    on_disk.shared.storage = StorageConfig {
        url: format!("file://{}", s3.bucket_dir().display()),
        ..Default::default()
    };
    let audit = audit_archive(&on_disk, &partitions)
        .await
        .context("the archive's manifest chains do not verify")?;
    let listed: Vec<String> = object_store_from_config(&direct.shared.storage)?
        .list(Some(&"events".into()))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .context("listing the bucket's events/ through S3")?;
    let orphans: Vec<&String> = listed
        .iter()
        .filter(|path| !audit.named_files.contains(*path))
        .collect();
    for (partition, (_, high)) in &marks {
        let head = audit.heads.get(partition).copied().unwrap_or_default();
        if head != *high {
            failures.push(format!(
                "partition {partition}: archived up to offset {head} of {high}"
            ));
        }
    }
    for (partition, seq, from, to) in &audit.offset_gaps {
        let (low, _) = marks.get(partition).copied().unwrap_or_default();
        failures.push(format!(
            "LOSS: partition {partition} manifest {seq} records offset gap [{from}, {to}): Kafka deleted those records before they were archived{} (the mock broker keeps about 5 MB per partition: lower CHATVAULT_CHAOS_RATE or the event count)",
            if low >= *to { format!(" (confirmed: the partition's log now starts at {low})") } else { String::new() }
        ));
    }
    for (partition, seq, offset, reason) in audit.rejected_records.iter().take(10) {
        failures.push(format!(
            "partition {partition} manifest {seq}: record {offset} rejected: {reason}"
        ));
    }
    for (partition, offset) in audit.offsets_archived_twice.iter().take(10) {
        failures.push(format!(
            "partition {partition} offset {offset} archived in more than one row (manifests)"
        ));
    }
    if !orphans.is_empty() {
        failures.push(format!(
            "{} of the {} objects the bucket lists under events/ are named by no committed manifest (orphans), for example {:?}",
            orphans.len(),
            listed.len(),
            &orphans[..orphans.len().min(5)]
        ));
    }
    let collapsed_in_batches: usize = audit.offsets_without_row.values().map(Vec::len).sum();
    if collapsed_in_batches > log.extra_sends {
        failures.push(format!(
            "{collapsed_in_batches} Kafka records are covered by manifests without a row, but at most {} records were copies of a retried send: {:?}",
            log.extra_sends,
            audit.offsets_without_row.iter().take(3).collect::<Vec<_>>()
        ));
    }

    let audit_took = check_started.elapsed();
    // 2. The rows, as a user reads them: scripts/read_archive.py (DuckDB) over the bucket's files, per tenant.
    let keys = data_keys(&direct).await?;
    let mut rows = Vec::new();
    for tenant in TENANTS {
        let key = match keys.get(tenant, PERIOD).await {
            Ok(key) => key,
            Err(_) if !log.acknowledged.iter().any(|(t, ..)| t == tenant) => continue,
            Err(error) => return Err(error).context(format!("data key of {tenant} {PERIOD}")),
        };
        let key_base64 = base64::engine::general_purpose::STANDARD.encode(key.key);
        rows.extend(reader_rows(s3.bucket_dir().as_path(), tenant, &key_base64)?);
    }
    let mut copies: HashMap<&Identity, Vec<&ReaderRow>> = HashMap::new();
    let mut offsets = HashSet::new();
    let mut offsets_twice = Vec::new();
    for row in &rows {
        copies.entry(&row.identity).or_default().push(row);
        if !offsets.insert((row.partition, row.offset)) {
            offsets_twice.push((row.partition, row.offset));
        }
    }
    if rows.len() != audit.rows {
        failures.push(format!(
            "the documented reader sees {} rows, the manifests name {}",
            rows.len(),
            audit.rows
        ));
    }
    if !offsets_twice.is_empty() {
        failures.push(format!(
            "{} Kafka records appear in more than one row of the reader's view, for example {:?}",
            offsets_twice.len(),
            &offsets_twice[..offsets_twice.len().min(5)]
        ));
    }
    let lost: Vec<&Identity> = log
        .acknowledged
        .iter()
        .filter(|identity| !copies.contains_key(identity))
        .collect();
    if !lost.is_empty() {
        failures.push(format!(
            "LOSS: {} acknowledged events are not in the archive, for example {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    let phantoms: Vec<&&Identity> = copies
        .keys()
        .filter(|identity| !log.sent.contains(**identity))
        .collect();
    if !phantoms.is_empty() {
        failures.push(format!(
            "{} archived identities were never sent, for example {:?}",
            phantoms.len(),
            &phantoms[..phantoms.len().min(5)]
        ));
    }
    // Copies beyond the sends are not chatvault's to prevent: librdkafka's idempotent producer can write a
    // record twice when a disconnection persisted the first copy and it then bumps its epoch and sends again
    // (confluentinc/librdkafka#4953; only transactions avoid it), which happens when every broker goes down.
    // They are two Kafka records (different offsets) with the same content, which readers collapse by
    // identity; an archiver archiving one record twice is caught above (one offset in two rows), and copies
    // that differ below.
    let mut raw_copies = 0usize;
    let mut producer_copies = Vec::new();
    let mut disagreeing = Vec::new();
    for (identity, rows) in &copies {
        if rows.len() > 1 {
            raw_copies += rows.len() - 1;
            let sends = log.resent.get(*identity).copied().unwrap_or(1);
            if rows.len() > sends {
                producer_copies.push(format!(
                    "{identity:?}: {} rows, sent {sends} times",
                    rows.len()
                ));
            }
        }
        let contents: BTreeSet<&(String, i64)> = rows.iter().map(|row| &row.content).collect();
        let partitions: BTreeSet<i64> = rows.iter().map(|row| row.partition).collect();
        if contents.len() > 1 || partitions.len() > 1 {
            disagreeing.push(format!("{identity:?}"));
        }
    }
    if !producer_copies.is_empty() {
        eprintln!(
            "chaos: {} identities have more Kafka records than sends (the producer wrote them twice; readers \
             collapse them), for example {:?}",
            producer_copies.len(),
            &producer_copies[..producer_copies.len().min(5)]
        );
    }
    if !disagreeing.is_empty() {
        failures.push(format!(
            "DUPLICATES after collapse: {} identities have copies that differ (content or partition), for example {:?}",
            disagreeing.len(),
            &disagreeing[..disagreeing.len().min(5)]
        ));
    }
    let archived_acknowledged = log
        .acknowledged
        .iter()
        .filter(|identity| copies.contains_key(identity))
        .count();
    let unacknowledged_archived = copies.len() - archived_acknowledged;
    let records: i64 = marks.values().map(|(_, high)| high).sum();

    eprintln!(
        "chaos figures (seed {}):\n  events sent {}, send attempts beyond the first {} ({} events resent), acknowledged {}\n  Kafka records {records}, archived rows {}, archived identities {} (acknowledged {archived_acknowledged}, unacknowledged but archived {unacknowledged_archived})\n  lost {}, duplicated raw copies {raw_copies} (of retried sends, {} of them written twice by the producer; {collapsed_in_batches} more collapsed inside batches), duplicated after collapse {}\n  manifests {}, files {}, orphans {}, offset gaps {}\n  kills {:?} (total {}), broker restarts {} (skipped {}), actions not reached {}\n  call failures by code {:?}; fault proxy {}\n  wall time {:?}: ingest {ingest_took:?}, catch-up {catch_up_took:?}, check {:?} (manifests and files {audit_took:?})",
        profile.seed,
        log.sent.len(),
        log.extra_sends,
        log.resent.len(),
        log.acknowledged.len(),
        rows.len(),
        copies.len(),
        lost.len(),
        producer_copies.len(),
        disagreeing.len(),
        audit.manifests,
        audit.files,
        orphans.len(),
        audit.offset_gaps.len(),
        chaos.kills,
        chaos.kills.values().sum::<usize>(),
        chaos.broker_restarts,
        chaos.broker_restarts_skipped,
        chaos.not_reached,
        log.failures,
        proxy.counts.summary(),
        test_started.elapsed(),
        check_started.elapsed(),
    );
    if chaos.not_reached > 0 {
        failures.push(format!(
            "{} fault actions were not reached before ingest ended",
            chaos.not_reached
        ));
    }
    if log.acknowledged.len() < profile.events / 2 {
        failures.push(format!(
            "only {} of {} events were acknowledged: too few for the run to mean anything",
            log.acknowledged.len(),
            profile.events
        ));
    }
    assert!(
        failures.is_empty(),
        "the chaos run (seed {}) found {} problems:\n- {}",
        profile.seed,
        failures.len(),
        failures.join("\n- ")
    );
    Ok(())
}
