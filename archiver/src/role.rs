//! The archiver role's lifecycle: start-up checks, the poll thread, shutdown with its deadline, leaving the
//! consumer group.
//!
//! The role archives two streams, each an [`Archiver`] of its own with its own consumer group, poll thread
//! and manifest chains: the chat events (`kafka.topic`, group `archiver.group_id`) and the audit trail
//! (`kafka.audit_topic`, group `<archiver.group_id>.audit`). Both dead-letter into `archiver.dead_letter_topic`
//! (the copies' headers name their source topic).
//!
//! Shutdown ([`Archiver::run`]): the poll thread stops consuming ([`OnShutdown::StopConsuming`]) or first
//! consumes up to the topic's end ([`OnShutdown::DrainTopic`]), the open batches are sealed, the commit lanes
//! upload and commit them for up to `archiver.shutdown_timeout` (then abandon the rest: it is still in
//! Kafka), the Kafka offsets of the committed chain heads are committed synchronously, and the consumer leaves
//! the group (bounded by `archiver.session_timeout`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatvault_archive::chain::ChainWriter;
use chatvault_archive::file::FileOptions;
use chatvault_archive::governance::GovernanceLog;
use chatvault_archive::governance::locks::LockRulesSource;
use chatvault_archive::keys::DataKeys;
use chatvault_archive::kind::{AuditTrail, ChatEvents, RecordKind};
use chatvault_core::config::LockMode;
use chatvault_core::config::{KafkaConfig, SharedConfig};
use chatvault_core::error::{Error, Result};
use chatvault_core::shutdown::{self, Shutdown};
use chatvault_core::storage::object_store_from_config;
use chatvault_kafka::{ConsumerSettings, consumer_config};

use crate::config::ArchiverConfig;
use object_store::ObjectStore;
use rdkafka::consumer::Consumer;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::dead_letter::DeadLetterProducer;
use crate::kafka::{self, ArchiverConsumer, ArchiverContext, KafkaBroker, PollExit};
use crate::lane::CommitStages;
use crate::poller::{OnShutdown, OwnedView, Poller, PollerParts};
use crate::stats::ArchiverStats;

/// Everything an archiver needs besides storage and keys.
#[derive(Debug, Clone)]
pub struct ArchiverOptions {
    /// The cluster; its `topic` is the one consumed.
    pub kafka: KafkaConfig,
    /// The archiver's settings; `group_id` and `dead_letter_topic` are this stream's.
    pub config: ArchiverConfig,
    /// Names this worker in manifests and logs (for example `<pod>-<pid>`).
    pub writer_id: String,
    pub on_shutdown: OnShutdown,
    /// Write S3 Object Locks from the governance state (`storage.object_lock` on; the store then is a
    /// `LockingS3`).
    pub object_lock: bool,
}

impl ArchiverOptions {
    /// The options of the audit trail's archiver beside this chat events' one: the audit topic, its own
    /// consumer group, and the same dead-letter topic.
    pub fn for_audit_trail(&self) -> ArchiverOptions {
        let mut audit = self.clone();
        // The audit trail is tamper-evident by its checkpoints and kept by its own retention.
        audit.object_lock = false;
        audit.config.dead_letter_topic = self.config.dead_letter_topic(&self.kafka);
        audit.config.group_id = format!("{}.audit", self.config.group_id);
        audit.kafka.topic = self.kafka.audit_topic();
        audit
    }
}

/// What the role's two archivers tell the rest of the process while they run.
#[derive(Debug, Clone, Default)]
pub struct RoleStats {
    pub events: Arc<ArchiverStats>,
    pub audit: Arc<ArchiverStats>,
}

impl RoleStats {
    /// Why the role is not ready, if it is not (see [`ArchiverStats::unready_reason`]).
    pub fn unready_reason(&self) -> Option<String> {
        let events = self
            .events
            .unready_reason()
            .map(|why| format!("chat events: {why}"));
        let audit = self
            .audit
            .unready_reason()
            .map(|why| format!("audit trail: {why}"));
        match (events, audit) {
            (None, None) => None,
            (Some(why), None) | (None, Some(why)) => Some(why),
            (Some(events), Some(audit)) => Some(format!("{events}; {audit}")),
        }
    }
}

/// The archiver role on the shared settings (storage, keys, Kafka) and its `[archiver]` section, until
/// `shutdown`: the chat events' archiver and the audit trail's, side by side. The one assembly of the role:
/// the binary, the test kit and the benchmarks all start it here (or through [`Archiver::run`] with a store
/// of their own). `stats` lets the caller watch it. Fails as soon as either archiver fails (the other is
/// shut down first).
pub async fn run(
    shared: &SharedConfig,
    config: &ArchiverConfig,
    writer_id: &str,
    on_shutdown: OnShutdown,
    stats: RoleStats,
    shutdown: Shutdown,
) -> Result<()> {
    let store = object_store_from_config(&shared.storage)?;
    let keys = DataKeys::from_config(store.clone(), &shared.keys).await?;
    let committer = crate::checkpoint::committer_from_config(shared, store.clone(), writer_id)?;
    let options = ArchiverOptions {
        kafka: shared.kafka.clone(),
        config: config.clone(),
        writer_id: writer_id.to_string(),
        on_shutdown,
        object_lock: shared.storage.object_lock != LockMode::Off,
    };
    let audit_options = options.for_audit_trail();
    // Either archiver failing stops the other: the role is one unit to its orchestrator.
    let (stop_trigger, stop) = shutdown::channel();
    let stop_trigger = Arc::new(stop_trigger);
    let stop_both = {
        let (shutdown, stop_trigger) = (shutdown.clone(), stop_trigger.clone());
        tokio::spawn(async move {
            shutdown.wait().await;
            stop_trigger.trigger();
        })
    };
    let stopping = |result: Result<()>| {
        if result.is_err() {
            stop_trigger.trigger();
        }
        result
    };
    let checkpoints = committer.clone().map(|committer| {
        let (interval, stop) = (shared.integrity.checkpoint_interval, stop.clone());
        tokio::spawn(async move { crate::checkpoint::run_until(&committer, interval, stop).await })
    });
    let (events, audit) = tokio::join!(
        async {
            stopping(
                Archiver::run::<ChatEvents>(
                    options,
                    store.clone(),
                    keys.clone(),
                    stats.events,
                    stop.clone(),
                )
                .await,
            )
        },
        async {
            stopping(
                Archiver::run::<AuditTrail>(
                    audit_options,
                    store.clone(),
                    keys.clone(),
                    stats.audit,
                    stop.clone(),
                )
                .await,
            )
        },
    );
    stop_both.abort();
    if let (Some(task), Some(committer)) = (checkpoints, committer) {
        let _ = task.await;
        // What the archivers committed last is covered before the role exits (unless storage is down: the
        // next replica to start covers it).
        let final_round = crate::checkpoint::checkpoint_round(&committer);
        let _ = tokio::time::timeout(Duration::from_secs(10), final_round).await;
    }
    events.and(audit)
}

/// A running archiver.
pub struct Archiver;

/// How long the lanes and the poll thread get, after the shutdown deadline, to notice it before the role
/// stops waiting for them.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

impl Archiver {
    /// Runs until `shutdown`: consumes, batches, commits. At shutdown the open batches are sealed (after
    /// draining the topic with [`OnShutdown::DrainTopic`]) and committed for up to
    /// `archiver.shutdown_timeout`; what is not committed by then is abandoned, which loses nothing with
    /// [`OnShutdown::StopConsuming`] (the records are still in Kafka and the next owner resumes at the chain
    /// head). Then the Kafka offsets of the committed heads are committed and the consumer leaves the group.
    ///
    /// Fails on start-up errors and, with [`OnShutdown::DrainTopic`], when records up to the topic's end could
    /// not all be committed before the deadline.
    pub async fn run<K: RecordKind>(
        options: ArchiverOptions,
        store: Arc<dyn ObjectStore>,
        data_keys: DataKeys,
        stats: Arc<ArchiverStats>,
        shutdown: Shutdown,
    ) -> Result<()> {
        let topic = options.kafka.topic.clone();
        let dead_letters = {
            let (kafka, dead_letter_topic) = (
                options.kafka.clone(),
                options.config.dead_letter_topic(&options.kafka),
            );
            tokio::task::spawn_blocking(move || {
                DeadLetterProducer::connect(&kafka, &dead_letter_topic)
            })
            .await
            .map_err(|error| {
                Error::internal(format!("checking the dead-letter topic: {error}"))
            })??
        };
        let chain = ChainWriter::new(store.clone(), &topic);
        // `abandon` fires `shutdown_timeout` after shutdown was requested: uploads and retries stop there.
        let (abandon_trigger, abandon) = shutdown::channel();
        let deadline = {
            let shutdown = shutdown.clone();
            let timeout = options.config.shutdown_timeout;
            tokio::spawn(async move {
                shutdown.deadline(timeout).await;
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "archiver shutdown deadline passed; abandoning what is not committed yet"
                );
                abandon_trigger.trigger();
            })
        };
        let rebalances = Arc::new(Mutex::new(Vec::new()));
        let view = Arc::new(Mutex::new(OwnedView::default()));
        let context = ArchiverContext {
            topic: topic.clone(),
            rebalances: rebalances.clone(),
            view: view.clone(),
        };
        let consumer: Arc<ArchiverConsumer> = Arc::new(
            consumer_config(
                &options.kafka,
                ConsumerSettings {
                    group_id: &options.config.group_id,
                    session_timeout: options.config.session_timeout,
                    fetch_queue_kbytes: options.config.fetch_queue_kbytes,
                },
            )
            .create_with_context(context)
            .map_err(|error| Error::invalid_argument(format!("kafka consumer: {error}")))?,
        );
        consumer
            .subscribe(&[&topic])
            .map_err(|error| Error::unavailable(format!("subscribing to {topic}: {error}")))?;
        let stages = Arc::new(CommitStages {
            store: store.clone(),
            chain: chain.clone(),
            data_keys,
            topic: topic.clone(),
            writer_id: options.writer_id.clone(),
            file_options: FileOptions {
                zstd_level: options.config.zstd_level,
                row_group_rows: options.config.row_group_rows,
                row_group_bytes: options.config.row_group_bytes,
                ..FileOptions::default()
            },
            dead_letters: Arc::new(dead_letters),
            upload_concurrency: options.config.upload_concurrency.max(1),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
            abandon: abandon.clone(),
            locks: options
                .object_lock
                .then(|| Arc::new(LockRulesSource::new(GovernanceLog::new(store.clone())))),
            kind: std::marker::PhantomData,
        });
        // Every lane task holds a clone of `alive`; `recv` returns `None` once all are gone.
        let (alive, mut lanes_done) = mpsc::channel::<()>(1);
        let poller = Poller::<KafkaBroker, K>::new(PollerParts {
            broker: KafkaBroker {
                consumer: consumer.clone(),
                topic: topic.clone(),
            },
            runtime: Handle::current(),
            config: options.config.clone(),
            on_shutdown: options.on_shutdown,
            chain,
            stages,
            stats,
            alive,
            view,
            shutdown: shutdown.clone(),
            abandon: abandon.clone(),
        });
        let (poll_done, mut poll_exit) = oneshot::channel::<PollExit>();
        std::thread::Builder::new()
            .name("archiver-poll".into())
            .spawn(move || {
                let _ = poll_done.send(kafka::poll_loop(poller, rebalances));
            })
            .map_err(|error| Error::internal(format!("spawning the poll thread: {error}")))?;

        // Normally the poll thread ends after shutdown (once its last batches are committed), then the lanes.
        // Past the deadline the lanes abandon their batches; the role waits a grace period at most.
        let mut exit: Option<std::result::Result<PollExit, oneshot::error::RecvError>> = None;
        let finished = async {
            exit = Some((&mut poll_exit).await);
            while lanes_done.recv().await.is_some() {}
        };
        let in_time = shutdown::drain(abandon.clone(), ABANDON_GRACE, finished)
            .await
            .is_some();
        if !in_time {
            tracing::warn!("commit lanes are still busy after the deadline; not waiting for them");
            if exit.is_none() {
                exit = tokio::time::timeout(ABANDON_GRACE, &mut poll_exit)
                    .await
                    .ok();
            }
        }
        deadline.abort();
        let exit = match exit {
            Some(Ok(exit)) => Some(exit),
            Some(Err(_)) => return Err(Error::internal("the archiver's poll thread panicked")),
            None => {
                tracing::warn!(
                    "the poll thread did not stop; leaving the consumer group to the session timeout"
                );
                None
            }
        };
        let durable = exit.as_ref().map(|e| e.durable.clone()).unwrap_or_default();
        match Arc::try_unwrap(consumer) {
            Ok(consumer) => {
                kafka::leave_group(consumer, &topic, durable, options.config.session_timeout).await
            }
            Err(_) if exit.is_none() => {}
            Err(_) => tracing::warn!(
                "the consumer is still in use; leaving the consumer group to the session timeout"
            ),
        }

        match (options.on_shutdown, exit.map(|exit| exit.outcome)) {
            (OnShutdown::DrainTopic, Some(Err(shortfall))) => Err(Error::unavailable(format!(
                "archiver shutdown: records acknowledged to senders were not archived before the deadline \
                 (archiver.shutdown_timeout) and Kafka does not outlive this process: {shortfall}"
            ))),
            (OnShutdown::DrainTopic, None) => Err(Error::unavailable(
                "archiver shutdown: the poll thread did not finish draining the topic before the deadline \
                 (archiver.shutdown_timeout); records acknowledged to senders may not be archived",
            )),
            _ => {
                tracing::info!("archiver stopped");
                Ok(())
            }
        }
    }
}
