//! Running the roles, alone or together.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chatvault_archiver::{ArchiverStats, OnShutdown, RoleStats};
use chatvault_config::Config;
use chatvault_core::auth::{Role, token_digest};
use chatvault_core::config::{TenantConfig, TokenConfig};
use chatvault_core::shutdown::{self, Shutdown, ShutdownTrigger};
use chatvault_core::storage::object_store_from_config;
use chatvault_core::telemetry::Telemetry;
use chatvault_kafka::{AckCondition, AckConditions};
use clap::Args;
use rdkafka::mocking::MockCluster;
use tokio::net::TcpListener;

use crate::ops::{self, HealthCheck, OpsState};

pub fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.as_deref())?)
}

/// Triggers shutdown on SIGTERM/SIGINT. A second signal exits at once (status 1), abandoning the graceful
/// shutdown: for an operator who would rather not wait.
fn shutdown_on_signal() -> (Arc<ShutdownTrigger>, Shutdown) {
    let (trigger, shutdown) = shutdown::channel();
    let trigger = Arc::new(trigger);
    let on_signal = trigger.clone();
    tokio::spawn(async move {
        shutdown::termination_signal().await;
        tracing::info!("termination signal received; shutting down");
        on_signal.trigger();
        shutdown::termination_signal().await;
        tracing::error!(
            "second termination signal; exiting without finishing the graceful shutdown"
        );
        std::process::exit(1);
    });
    (trigger, shutdown)
}

async fn bind(address: &str, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("{setting}: binding {address}"))
}

/// The gateway: gRPC on `grpc_listener`, webhooks and `/healthz` on `http_listener`.
pub async fn gateway_task(
    config: &Config,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    ack_conditions: Option<AckConditions>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    chatvault_ingest_gateway::run(
        &config.shared,
        &config.gateway,
        grpc_listener,
        http_listener,
        ack_conditions,
        shutdown,
    )
    .await?;
    Ok(())
}

/// Standalone's acknowledgement rule: its Kafka is librdkafka's in-process mock cluster, which dies with the
/// process (and keeps only about 5 MB per partition), so an event is acknowledged to its sender only once the
/// archiver committed it to the archive. A `kill -9` then loses nothing acknowledged, and a burst the archiver
/// cannot keep up with is slowed down (or refused with a retryable error) instead of being lost. Audit records
/// follow the same rule against the audit trail's archiver: a call is served only once its record is
/// archived.
struct AcknowledgeWhenArchived {
    stats: Arc<ArchiverStats>,
    timeout: Duration,
}

/// How long a standalone acknowledgement may wait for the archive before the sender is told to retry.
const STANDALONE_ARCHIVE_WAIT: Duration = Duration::from_secs(30);

impl AckCondition for AcknowledgeWhenArchived {
    fn wait(
        &self,
        partition: i32,
        offset: i64,
    ) -> futures::future::BoxFuture<'_, chatvault_core::Result<()>> {
        Box::pin(async move {
            if self
                .stats
                .heads
                .wait_archived(partition, offset, self.timeout)
                .await
            {
                Ok(())
            } else {
                Err(chatvault_core::Error::unavailable(format!(
                    "the record reached Kafka but was not archived within {} s; retry (copies collapse by id)",
                    self.timeout.as_secs()
                )))
            }
        })
    }
}

/// Standalone's conditions: events and audit records wait for their own stream's archiver.
fn acknowledge_when_archived(stats: &RoleStats) -> AckConditions {
    AckConditions {
        events: Arc::new(AcknowledgeWhenArchived {
            stats: stats.events.clone(),
            timeout: STANDALONE_ARCHIVE_WAIT,
        }),
        audit: Arc::new(AcknowledgeWhenArchived {
            stats: stats.audit.clone(),
            timeout: STANDALONE_ARCHIVE_WAIT,
        }),
    }
}

/// The archiver role on `config`'s Kafka and storage; `stats` lets the caller watch it (readiness, standalone's
/// acknowledgements).
async fn archiver_task(
    config: &Config,
    shutdown: Shutdown,
    on_shutdown: OnShutdown,
    stats: RoleStats,
) -> anyhow::Result<()> {
    chatvault_archiver::run(
        &config.shared,
        &config.archiver,
        &chatvault_core::instance_name(),
        on_shutdown,
        stats,
        shutdown,
    )
    .await?;
    Ok(())
}

pub async fn restorer_task(
    config: &Config,
    listener: TcpListener,
    audit_condition: Option<Arc<dyn AckCondition>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut audit = chatvault_kafka::audit::KafkaAuditSink::connect(&config.shared.kafka)?;
    if let Some(condition) = audit_condition {
        audit = audit.with_ack_condition(condition);
    }
    let audit = Arc::new(audit);
    chatvault_restorer::run(
        &config.shared,
        &config.restorer,
        listener,
        audit.clone(),
        shutdown,
    )
    .await?;
    audit.flush(Duration::from_secs(5));
    Ok(())
}

/// Runs `role` with the process's telemetry: installs logging, traces and metrics as `service`, serves the
/// operations endpoint (`/metrics`, `/healthz`, `/readyz`) on `telemetry.metrics_listen` while the role runs
/// (readiness drops when `shutdown` begins), and flushes traces and metrics once the role has finished.
async fn with_telemetry(
    service: &str,
    config: &Config,
    shutdown: Shutdown,
    health_check: Option<HealthCheck>,
    role: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let telemetry = Arc::new(Telemetry::install(service, &config.shared.telemetry)?);
    for warning in &config.deprecated_settings {
        tracing::warn!("{warning}");
    }
    let ops_state = OpsState::new(telemetry.clone());
    if let Some(check) = health_check {
        ops_state.set_health_check(check);
    }
    let (ops_trigger, ops_shutdown) = shutdown::channel();
    let ops_server = match config.shared.telemetry.metrics_listen.as_str() {
        "" => None,
        address => {
            let listener = bind(address, "telemetry.metrics_listen").await?;
            let address = listener.local_addr()?;
            tracing::info!(%address, "serving /metrics, /healthz and /readyz");
            Some(tokio::spawn(ops::serve(
                listener,
                ops_state.clone(),
                ops_shutdown,
            )))
        }
    };
    ops_state.set_ready(true);
    let not_ready = {
        let ops_state = ops_state.clone();
        tokio::spawn(async move {
            shutdown.wait().await;
            ops_state.set_ready(false);
        })
    };
    let result = role.await;
    not_ready.abort();
    ops_trigger.trigger();
    if let Some(server) = ops_server {
        let _ = server.await;
    }
    drop(ops_state);
    match Arc::try_unwrap(telemetry) {
        Ok(telemetry) => telemetry.shutdown(),
        Err(_) => tracing::warn!("telemetry still in use at exit; not flushed"),
    }
    result
}

pub async fn run_gateway(config: Config) -> anyhow::Result<()> {
    let (_trigger, shutdown) = shutdown_on_signal();
    with_telemetry("chatvault-gateway", &config, shutdown.clone(), None, async {
        let grpc_listener = bind(&config.gateway.grpc_listen, "gateway.grpc_listen").await?;
        let http_listener = bind(&config.gateway.http_listen, "gateway.http_listen").await?;
        tracing::info!(grpc = %config.gateway.grpc_listen, http = %config.gateway.http_listen, "gateway listening");
        gateway_task(&config, grpc_listener, http_listener, None, shutdown.clone()).await
    })
    .await
}

pub async fn run_archiver(config: Config) -> anyhow::Result<()> {
    let (_trigger, shutdown) = shutdown_on_signal();
    let stats = RoleStats::default();
    let health = {
        let stats = stats.clone();
        Box::new(move || stats.unready_reason()) as HealthCheck
    };
    with_telemetry(
        "chatvault-archiver",
        &config,
        shutdown.clone(),
        Some(health),
        archiver_task(&config, shutdown.clone(), OnShutdown::StopConsuming, stats),
    )
    .await
}

pub async fn run_restorer(config: Config) -> anyhow::Result<()> {
    let (_trigger, shutdown) = shutdown_on_signal();
    with_telemetry(
        "chatvault-restorer",
        &config,
        shutdown.clone(),
        None,
        async {
            let listener = bind(&config.restorer.grpc_listen, "restorer.grpc_listen").await?;
            tracing::info!(address = %config.restorer.grpc_listen, "restorer listening");
            restorer_task(&config, listener, None, shutdown.clone()).await
        },
    )
    .await
}

#[derive(Args, Debug)]
pub struct StandaloneArgs {
    /// Configuration file; standalone overrides Kafka (mock cluster) and defaults storage and keyring to the
    /// data directory.
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the archive and the keyring live.
    #[arg(long, default_value = "./chatvault-data")]
    data_dir: PathBuf,
    /// Partitions of the mock cluster's topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// After start-up, send a sample conversation through the pipeline and print it restored.
    #[arg(long)]
    demo: bool,
    /// gRPC address of the gateway.
    #[arg(long, default_value = "127.0.0.1:50051")]
    gateway_listen: String,
    /// gRPC address of the restorer.
    #[arg(long, default_value = "127.0.0.1:50052")]
    restorer_listen: String,
    /// HTTP address of the webhook endpoints (`POST /webhooks/<integration>`, `GET /healthz`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz` (default 127.0.0.1:9464, or the configuration
    /// file's `telemetry.metrics_listen`; empty switches it off).
    #[arg(long)]
    metrics_listen: Option<String>,
}

pub const STANDALONE_TENANT: &str = "demo";

/// Partitions of standalone's audit topic.
const AUDIT_PARTITIONS: i32 = 1;

/// Key of the placeholder records [`continue_offsets_from_archive`] produces.
const PLACEHOLDER_KEY: &str = "chatvault-standalone-placeholder";

/// The mock cluster starts empty, at offset 0, but the archive on the data directory continues from earlier
/// runs: an archiver resumes each partition at its manifest chain head and skips every record below it, so
/// this run's first records would be silently skipped (and, worse, counted as archived by the acknowledgement
/// rule). Fills each partition of `topic` (the events' topic, and the audit topic: both are archived) with
/// placeholder records (no value) up to its chain head first, so that this run's records get offsets the
/// chain has not covered yet.
async fn continue_offsets_from_archive(
    config: &Config,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let store = object_store_from_config(&config.shared.storage)?;
    let chains = chatvault_archive::chain::ChainReader::new(store, topic);
    let mut heads = Vec::new();
    for partition in 0..partitions {
        let end_offset = chains
            .head(partition)
            .await
            .with_context(|| format!("reading the archive's chain head of partition {partition}"))?
            .end_offset;
        if end_offset > 0 {
            heads.push((partition, end_offset));
        }
    }
    if heads.is_empty() {
        return Ok(());
    }
    tracing::info!(
        topic,
        ?heads,
        "continuing Kafka offsets after the archive's chain heads"
    );
    let brokers = config.shared.kafka.brokers.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .create()
            .context("creating the placeholder producer")?;
        for &(partition, count) in &heads {
            let mut sent = 0;
            while sent < count {
                let record = BaseRecord::<str, [u8]>::to(&topic)
                    .partition(partition)
                    .key(PLACEHOLDER_KEY);
                match producer.send(record) {
                    Ok(()) => sent += 1,
                    Err((error, _))
                        if error.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                    {
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((error, _)) => return Err(error).context("producing placeholders"),
                }
            }
        }
        producer
            .flush(Duration::from_secs(60))
            .context("producing placeholders")?;
        for &(partition, head) in &heads {
            let (_, high) = producer
                .client()
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
            anyhow::ensure!(
                high == head,
                "partition {partition}: placeholders end at offset {high}, the archive's chain at {head}"
            );
        }
        Ok(())
    })
    .await
    .context("the placeholder task failed")?
}

fn random_token() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("system random generator failed"))?;
    Ok(format!("cvt_{}", hex::encode(bytes)))
}

/// The standalone token persists in the data directory so that client commands in another terminal find it.
fn standalone_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("standalone-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_string());
    }
    let token = random_token()?;
    std::fs::write(&path, &token).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(token)
}

pub async fn run_standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let mut config = match &args.config {
        Some(path) => Config::load(Some(path))?,
        None => Config::load(None)?,
    };
    if args.config.is_none() {
        // The archive, its signing key (created on first start) and that key's verifier key as the one
        // trusted: restores say how far the checkpoints cover them.
        crate::checkpoint::standalone_signing_key(&data_dir)?;
        crate::checkpoint::use_data_dir(&mut config, &data_dir)?;
        config.shared.keys.keyring_path = data_dir.join("keyring.json");
        // Checkpoints often, so the demo's conversation is covered within seconds.
        config.shared.integrity.checkpoint_interval = Duration::from_secs(5);
        // Senders wait for the archive (see AcknowledgeWhenArchived): seal batches quickly.
        config.archiver.max_batch_age = Duration::from_millis(500);
        config.archiver.session_timeout = Duration::from_millis(6_000);
        // No load balancer to wait for.
        config.gateway.shutdown_delay = Duration::from_millis(0);
    }
    let token = standalone_token(&data_dir)?;
    if !config
        .shared
        .tenants
        .iter()
        .any(|tenant| tenant.id == STANDALONE_TENANT)
    {
        config.shared.tenants.push(TenantConfig {
            id: STANDALONE_TENANT.into(),
            tokens: vec![TokenConfig {
                name: "standalone".into(),
                token_sha256: Some(hex::encode(token_digest(&token))),
                roles: vec![Role::Ingest, Role::Restore, Role::Admin],
                ..Default::default()
            }],
        });
    }
    if let Some(address) = &args.metrics_listen {
        config.shared.telemetry.metrics_listen = address.clone();
    } else if args.config.is_none()
        && std::env::var_os("CHATVAULT__TELEMETRY__METRICS_LISTEN").is_none()
    {
        // Embedded defaults stay on loopback, like the other standalone listeners.
        config.shared.telemetry.metrics_listen = "127.0.0.1:9464".into();
    }
    let (trigger, shutdown) = shutdown_on_signal();
    let telemetry_config = config.clone();
    let archiver_stats = RoleStats::default();
    let health = {
        let stats = archiver_stats.clone();
        Box::new(move || stats.unready_reason()) as HealthCheck
    };
    with_telemetry("chatvault-standalone", &telemetry_config, shutdown.clone(), Some(health), async move {
        // The mock cluster lives as long as this function: it is the Kafka of the whole process.
        let mock_cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
        mock_cluster
            .create_topic(&config.shared.kafka.topic, args.partitions, 1)
            .context("creating the topic on the mock cluster")?;
        mock_cluster
            .create_topic(&config.archiver.dead_letter_topic(&config.shared.kafka), 1, 1)
            .and_then(|()| {
                mock_cluster.create_topic(&config.shared.kafka.audit_topic(), AUDIT_PARTITIONS, 1)
            })
            .context("creating the dead-letter topic on the mock cluster")?;
        config.shared.kafka.brokers = mock_cluster.bootstrap_servers();
        config.validate()?;
        continue_offsets_from_archive(&config, &config.shared.kafka.topic, args.partitions).await?;
        continue_offsets_from_archive(&config, &config.shared.kafka.audit_topic(), AUDIT_PARTITIONS)
            .await?;

        let gateway_listener = bind(&args.gateway_listen, "--gateway-listen").await?;
        let http_listener = bind(&args.http_listen, "--http-listen").await?;
        let restorer_listener = bind(&args.restorer_listen, "--restorer-listen").await?;

        println!("chatvault standalone");
        println!(
            "  Kafka is librdkafka's in-process mock cluster (not durable), so an event is acknowledged only once it"
        );
        println!(
            "  is archived (encrypted Parquet under the data directory): a crash or kill -9 loses nothing acknowledged."
        );
        println!(
            "  Use `chatvault gateway|archiver|restorer` with a real Kafka cluster in production."
        );
        println!(
            "  ingest gRPC   : {}  (chatvault.v1.IngestService, health, reflection)",
            args.gateway_listen
        );
        println!(
            "  restore gRPC  : {}  (chatvault.v1.RestoreService, health, reflection)",
            args.restorer_listen
        );
        println!(
            "  kafka (mock)  : {}  topic {} ({} partitions)",
            config.shared.kafka.brokers, config.shared.kafka.topic, args.partitions
        );
        println!("  archive       : {}", config.shared.storage.url);
        if let Some(key) = &config.shared.integrity.signing_key_path {
            println!(
                "  checkpoints   : signed every {} s with {} (verifier key beside it)",
                config.shared.integrity.checkpoint_interval.as_secs(),
                key.display()
            );
        }
        println!("  keyring       : {}", config.shared.keys.keyring_path.display());
        println!(
            "  tenant        : {STANDALONE_TENANT}, bearer token in {}",
            data_dir.join("standalone-token").display()
        );
        println!();
        println!("Try it (another terminal):");
        println!("  chatvault demo --data-dir {}", data_dir.display());
        println!(
            "  chatvault conversations --data-dir {} --tenant {STANDALONE_TENANT}",
            data_dir.display()
        );
        println!(
            "  chatvault restore --data-dir {} --tenant {STANDALONE_TENANT} --conversation demo-general",
            data_dir.display()
        );
        println!();

        // Shutdown order: Kafka is the in-process mock cluster and dies with the process, so everything the
        // gateway acknowledged must be archived before the process exits. On a termination signal, or when a
        // role fails (the others then stop too instead of running half a pipeline), the gateway and the
        // restorer stop and drain first (their last calls' audit records wait for the archive); then the
        // archiver consumes both topics up to their ends and commits them (failing if it cannot before
        // archiver.shutdown_timeout).
        let (stop_gateway, gateway_shutdown) = shutdown::channel();
        let (stop_archiver, archiver_shutdown) = shutdown::channel();
        let (stop_restorer, restorer_shutdown) = shutdown::channel();
        let (gateway_done, gateway_finished) = shutdown::channel();
        let (restorer_done, restorer_finished) = shutdown::channel();
        let (archiver_done, archiver_finished) = shutdown::channel();
        let stop_all_on_error = |result: anyhow::Result<()>| {
            if result.is_err() {
                trigger.trigger();
            }
            result
        };
        let conditions = acknowledge_when_archived(&archiver_stats);
        let gateway = async {
            let result = stop_all_on_error(
                gateway_task(
                    &config,
                    gateway_listener,
                    http_listener,
                    Some(conditions.clone()),
                    gateway_shutdown,
                )
                .await,
            );
            gateway_done.trigger();
            result
        };
        let archiver = async {
            let result = stop_all_on_error(
                archiver_task(
                    &config,
                    archiver_shutdown,
                    OnShutdown::DrainTopic,
                    archiver_stats.clone(),
                )
                .await,
            );
            archiver_done.trigger();
            result
        };
        let restorer = async {
            let result = stop_all_on_error(
                restorer_task(
                    &config,
                    restorer_listener,
                    Some(conditions.audit.clone()),
                    restorer_shutdown,
                )
                .await,
            );
            restorer_done.trigger();
            result
        };
        let in_order = async {
            shutdown.clone().wait().await;
            stop_gateway.trigger();
            stop_restorer.trigger();
            gateway_finished.wait().await;
            restorer_finished.wait().await;
            tracing::info!(
                "gateway and restorer stopped; archiving everything they acknowledged and recorded"
            );
            stop_archiver.trigger();
            archiver_finished.wait().await;
        };
        let demo = {
            let gateway = format!("http://{}", args.gateway_listen);
            let restorer = format!("http://{}", args.restorer_listen);
            let token = token.clone();
            let enabled = args.demo;
            async move {
                if enabled {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Err(error) =
                        crate::client::run_demo(&gateway, &restorer, &token, STANDALONE_TENANT).await
                    {
                        eprintln!("demo failed: {error:#}");
                    }
                }
                Ok::<(), anyhow::Error>(())
            }
        };
        let (gateway, archiver, restorer, _, ()) =
            tokio::join!(gateway, archiver, restorer, demo, in_order);
        gateway?;
        archiver?;
        restorer?;
        drop(mock_cluster);
        Ok(())
    })
    .await
}
