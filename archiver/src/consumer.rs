//! The poll thread and the rebalance handling.
//!
//! Kafka's committed offsets are only a hint: on assignment the archiver reads each partition's manifest chain
//! head from storage, removes the orphans of batches that lost their commit, and starts consuming exactly at
//! the head's `end_offset`. Records below a partition's position are skipped, so a replay never produces a
//! second copy.
//!
//! Shutdown ([`Archiver::run`]): the poll thread stops consuming ([`OnShutdown::StopConsuming`]) or first
//! consumes up to the topic's end ([`OnShutdown::DrainTopic`]), the open batches are sealed, the writer uploads
//! and commits them for up to `archiver.shutdown_timeout_ms` (then abandons the rest: it is still in Kafka), the
//! Kafka offsets of the committed chain heads are committed synchronously, and the consumer leaves the group
//! (bounded by `archiver.session_timeout_ms`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatvault_core::archive::ArchivedEvent;
use chatvault_core::archive::chain::ChainWriter;
use chatvault_core::archive::file::FileOptions;
use chatvault_core::archive::manifest::ChainHead;
use chatvault_core::config::{ArchiverConfig, KafkaConfig, OffsetGapPolicy};
use chatvault_core::error::{Error, Result};
use chatvault_core::event::is_valid_tenant_id;
use chatvault_core::kafka::consumer_config;
use chatvault_core::keys::DataKeys;
use chatvault_core::metrics::metrics;
use chatvault_core::shutdown::{self, Shutdown};
use chatvault_proto::v1::ChatEvent;
use object_store::ObjectStore;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{MAX_TRACED_RECORDS, OpenBatch, Rejected, SealedBatch};
use crate::crash::crash_point;
use crate::dead_letter::DeadLetterProducer;
use crate::gaps::{self, GapCheck, GapVerdict};
use crate::state::{PartitionState, SharedPartitions};
use crate::writer::{ArchiverStats, Writer};

pub(crate) type ArchiverConsumer = BaseConsumer<ArchiverContext>;

static GENERATION: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// Everything an archiver needs besides storage and keys.
#[derive(Debug, Clone)]
pub struct ArchiverOptions {
    pub kafka: KafkaConfig,
    pub config: ArchiverConfig,
    /// Names this worker in manifests and logs (for example `<pod>-<pid>`).
    pub writer_id: String,
    pub on_shutdown: OnShutdown,
}

/// What an archiver does with the records still in Kafka when its shutdown is requested.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnShutdown {
    /// Stop consuming at once; seal, upload and commit what was consumed. The rest stays in Kafka and the
    /// partitions' next owner archives it from the manifest chain heads. For a Kafka cluster that outlives the
    /// process.
    #[default]
    StopConsuming,
    /// Keep consuming until every partition is committed up to the topic's end offsets read when shutdown was
    /// requested, then stop. For a Kafka that dies with the process (standalone's in-process mock cluster),
    /// where records left behind are lost: a shortfall at the deadline makes [`Archiver::run`] fail. Assumes
    /// this worker is the only member of its group (it waits for every partition) and a producer that is not
    /// transactional (the end offset is the high watermark).
    DrainTopic,
}

pub(crate) struct ArchiverContext {
    chain: ChainWriter,
    partitions: SharedPartitions,
    runtime: Handle,
    /// When reading chain heads stops being worth retrying: at shutdown, or at the shutdown deadline while
    /// draining (assignments still matter then).
    give_up: Shutdown,
}

impl ClientContext for ArchiverContext {
    /// librdkafka's statistics (every `statistics.interval.ms`, delivered during poll): publishes each owned
    /// partition's lag as the records past what is durably archived, that is the last stable offset (or the
    /// high watermark) minus the manifest chain head's end offset. Kafka's committed offset is only a hint
    /// here, so it is not used.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let (heads, halted): (Vec<(i32, i64)>, usize) = {
            let partitions = self.partitions.lock();
            (
                partitions
                    .iter()
                    .map(|(partition, state)| (*partition, state.head.end_offset))
                    .collect(),
                partitions.values().filter(|state| state.halted).count(),
            )
        };
        metrics().set_halted_partitions(halted);
        let mut lag = std::collections::BTreeMap::new();
        for topic in statistics.topics.values() {
            for (partition, head_end) in &heads {
                let Some(stats) = topic.partitions.get(partition) else {
                    continue;
                };
                let end = if stats.ls_offset >= 0 {
                    stats.ls_offset
                } else {
                    stats.hi_offset
                };
                if end >= 0 {
                    lag.insert(*partition, end - head_end);
                }
            }
        }
        metrics().replace_consumer_lag(lag);
    }
}

impl ArchiverContext {
    /// Reads the chain head and cleans orphans, retrying until it works or `give_up`. Runs inside the
    /// rebalance callback: consuming cannot start before the position is known.
    fn load_head(&self, partition: i32) -> Option<ChainHead> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = self.runtime.block_on(async {
                let read = async {
                    let head = self.chain.reader().head(partition).await?;
                    let removed = self.chain.clean_orphans(partition, &head).await?;
                    if removed > 0 {
                        tracing::info!(partition, removed, "removed orphan files");
                    }
                    Ok::<_, Error>(head)
                };
                tokio::select! {
                    result = read => Some(result),
                    _ = self.give_up.clone().wait() => None,
                }
            });
            match attempt {
                Some(Ok(head)) => return Some(head),
                None => return None,
                Some(Err(error)) => {
                    tracing::warn!(partition, %error, "reading the manifest chain failed; retrying");
                    let gave_up = self.runtime.block_on(async {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => false,
                            _ = self.give_up.clone().wait() => true,
                        }
                    });
                    if gave_up {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

impl ConsumerContext for ArchiverContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        assignment: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<(String, i32)> = assignment
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_string(), element.partition()))
                    .collect();
                for (topic, partition) in partitions {
                    let Some(head) = self.load_head(partition) else {
                        return;
                    };
                    let offset = if head.next_seq == 0 {
                        Offset::Beginning
                    } else {
                        Offset::Offset(head.end_offset)
                    };
                    if let Err(error) = assignment.set_partition_offset(&topic, partition, offset) {
                        tracing::error!(partition, %error, "could not set the start offset");
                    }
                    tracing::info!(
                        partition,
                        next_seq = head.next_seq,
                        offset = head.end_offset,
                        "partition assigned"
                    );
                    let generation = next_generation();
                    self.partitions.lock().insert(
                        partition,
                        PartitionState {
                            generation,
                            open: OpenBatch::new(
                                partition,
                                generation,
                                head.next_seq,
                                head.end_offset,
                            ),
                            head,
                            resync_to: None,
                            halted: false,
                            gap_refetches: 0,
                        },
                    );
                }
                let result = if cooperative {
                    consumer.incremental_assign(assignment)
                } else {
                    consumer.assign(assignment)
                };
                if let Err(error) = result {
                    tracing::error!(%error, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                {
                    let mut partitions = self.partitions.lock();
                    for element in assignment.elements() {
                        // The open batch is dropped: nothing in it is committed, and the next owner starts from
                        // the chain head.
                        partitions.remove(&element.partition());
                        tracing::info!(partition = element.partition(), "partition revoked");
                    }
                }
                let result = if cooperative {
                    consumer.incremental_unassign(assignment)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.partitions.lock().clear();
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::debug!(%error, "Kafka offset hint commit failed");
        }
    }
}

/// A running archiver.
pub struct Archiver;

/// How long the writer and the poll thread get, after the shutdown deadline, to notice it before the writer's
/// in-flight upload is cancelled.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

impl Archiver {
    /// Runs until `shutdown`: consumes, batches, commits. At shutdown the open batches are sealed (after
    /// draining the topic with [`OnShutdown::DrainTopic`]) and committed for up to
    /// `archiver.shutdown_timeout_ms`; what is not committed by then is abandoned, which loses nothing with
    /// [`OnShutdown::StopConsuming`] (the records are still in Kafka and the next owner resumes at the chain
    /// head). Then the Kafka offsets of the committed heads are committed and the consumer leaves the group.
    ///
    /// Fails on start-up errors and, with [`OnShutdown::DrainTopic`], when records up to the topic's end could
    /// not all be committed before the deadline.
    pub async fn run(
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
        let partitions = SharedPartitions::default();
        let chain = ChainWriter::new(store.clone(), &topic);
        // `abandon` fires `shutdown_timeout_ms` after shutdown was requested: uploads and retries stop there.
        let (abandon_trigger, abandon) = shutdown::channel();
        let deadline = {
            let shutdown = shutdown.clone();
            let timeout = options.config.shutdown_timeout();
            tokio::spawn(async move {
                shutdown.wait().await;
                tokio::time::sleep(timeout).await;
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "archiver shutdown deadline passed; abandoning what is not committed yet"
                );
                abandon_trigger.trigger();
            })
        };
        let context = ArchiverContext {
            chain: chain.clone(),
            partitions: partitions.clone(),
            runtime: Handle::current(),
            give_up: match options.on_shutdown {
                OnShutdown::StopConsuming => shutdown.clone(),
                OnShutdown::DrainTopic => abandon.clone(),
            },
        };
        let consumer: Arc<ArchiverConsumer> = Arc::new(
            consumer_config(&options.kafka, &options.config)
                .create_with_context(context)
                .map_err(|error| Error::invalid_argument(format!("kafka consumer: {error}")))?,
        );
        consumer
            .subscribe(&[&topic])
            .map_err(|error| Error::unavailable(format!("subscribing to {topic}: {error}")))?;
        let (sender, receiver) = mpsc::channel(options.config.max_pending_batches);
        let writer = Writer {
            store,
            chain,
            data_keys,
            partitions: partitions.clone(),
            consumer: consumer.clone(),
            topic: topic.clone(),
            writer_id: options.writer_id.clone(),
            file_options: FileOptions {
                zstd_level: options.config.zstd_level,
                row_group_rows: options.config.row_group_rows,
                row_group_bytes: options.config.row_group_bytes,
                ..FileOptions::default()
            },
            dead_letters,
            stats: stats.clone(),
            abandon: abandon.clone(),
        };
        let mut writer_task = tokio::spawn(writer.run(receiver));
        let poller = Poller {
            stats: stats.clone(),
            consumer: consumer.clone(),
            partitions: partitions.clone(),
            batches: sender,
            config: options.config.clone(),
            topic,
            shutdown,
            abandon: abandon.clone(),
            on_shutdown: options.on_shutdown,
        };
        let (poll_done, mut poll_outcome) = oneshot::channel();
        std::thread::Builder::new()
            .name("archiver-poll".into())
            .spawn(move || {
                let _ = poll_done.send(poller.run());
            })
            .map_err(|error| Error::internal(format!("spawning the poll thread: {error}")))?;

        // Normally the poll thread ends after shutdown (having handed over its last batches), then the writer
        // once it committed them. Past the deadline the writer's upload is cancelled, which also frees a poll
        // thread waiting for room in the writer's channel.
        let past_deadline = || {
            let abandon = abandon.clone();
            async move {
                abandon.wait().await;
                tokio::time::sleep(ABANDON_GRACE).await;
            }
        };
        let mut outcome = None;
        let mut writer_result = None;
        let finished = async {
            outcome = Some((&mut poll_outcome).await);
            writer_result = Some((&mut writer_task).await);
        };
        let in_time = tokio::select! {
            () = finished => true,
            () = past_deadline() => false,
        };
        if !in_time {
            tracing::warn!("the writer is still busy after the deadline; cancelling its upload");
            writer_task.abort();
            let _ = tokio::time::timeout(ABANDON_GRACE, &mut writer_task).await;
            if outcome.is_none() {
                outcome = tokio::time::timeout(ABANDON_GRACE, &mut poll_outcome)
                    .await
                    .ok();
            }
            for (partition, state) in partitions.lock().iter() {
                if state.open.end_offset > state.head.end_offset {
                    tracing::warn!(
                        partition,
                        committed_up_to = state.head.end_offset,
                        consumed_up_to = state.open.end_offset,
                        "abandoned at the shutdown deadline: records from committed_up_to on were not committed"
                    );
                }
            }
        }
        deadline.abort();
        if let Some(Err(error)) = writer_result
            && error.is_panic()
        {
            return Err(Error::internal("the archiver's writer task panicked"));
        }
        let outcome = match outcome {
            Some(Ok(outcome)) => Some(outcome),
            Some(Err(_)) => return Err(Error::internal("the archiver's poll thread panicked")),
            None => {
                tracing::warn!(
                    "the poll thread did not stop; leaving the consumer group to the session timeout"
                );
                None
            }
        };

        // Offsets of what is durable only: the heads advance after a manifest commit, never before.
        let durable: Vec<(i32, i64)> = partitions
            .lock()
            .iter()
            .filter(|(_, state)| state.head.next_seq > 0)
            .map(|(partition, state)| (*partition, state.head.end_offset))
            .collect();
        match Arc::try_unwrap(consumer) {
            Ok(consumer) => {
                leave_group(
                    consumer,
                    &options.kafka.topic,
                    durable,
                    Duration::from_millis(options.config.session_timeout_ms),
                )
                .await
            }
            Err(_) if outcome.is_none() => {}
            Err(_) => tracing::warn!(
                "the consumer is still in use; leaving the consumer group to the session timeout"
            ),
        }

        match (options.on_shutdown, outcome) {
            (OnShutdown::DrainTopic, Some(Err(shortfall))) => Err(Error::unavailable(format!(
                "archiver shutdown: records acknowledged to senders were not archived before the deadline \
                 (archiver.shutdown_timeout_ms) and Kafka does not outlive this process: {shortfall}"
            ))),
            (OnShutdown::DrainTopic, None) => Err(Error::unavailable(
                "archiver shutdown: the poll thread did not finish draining the topic before the deadline \
                 (archiver.shutdown_timeout_ms); records acknowledged to senders may not be archived",
            )),
            _ => {
                tracing::info!("archiver stopped");
                Ok(())
            }
        }
    }
}

/// Commits the Kafka offsets of the committed chain heads (a hint for other consumers and lag monitoring; the
/// manifest chain stays authoritative) and closes the consumer, which leaves the group so its partitions move
/// to the other members at once instead of after the session timeout. Both block on the broker: they run on a
/// thread of their own and are abandoned after `timeout` (the coordinator then drops this member by itself).
async fn leave_group(
    consumer: ArchiverConsumer,
    topic: &str,
    durable: Vec<(i32, i64)>,
    timeout: Duration,
) {
    let mut offsets = TopicPartitionList::new();
    for (partition, end_offset) in &durable {
        if let Err(error) =
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*end_offset))
        {
            tracing::warn!(partition, %error, "could not name an offset to commit");
        }
    }
    let (closed, is_closed) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("archiver-close".into())
        .spawn(move || {
            if offsets.count() > 0 {
                match consumer.commit(&offsets, CommitMode::Sync) {
                    Ok(()) => tracing::info!(?durable, "committed the Kafka offsets of the archived records"),
                    Err(error) => tracing::warn!(%error, "committing the final Kafka offsets failed; the manifest chain is authoritative anyway"),
                }
            }
            // Dropping the consumer closes it: it revokes its partitions and leaves the group.
            drop(consumer);
            let _ = closed.send(());
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not spawn a thread to leave the consumer group");
        return;
    }
    match tokio::time::timeout(timeout, is_closed).await {
        Ok(_) => tracing::info!("left the consumer group"),
        Err(_) => tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            "leaving the consumer group did not finish in time; the coordinator drops this member after the session timeout"
        ),
    }
}

struct Poller {
    stats: Arc<ArchiverStats>,
    consumer: Arc<ArchiverConsumer>,
    partitions: SharedPartitions,
    batches: mpsc::Sender<SealedBatch>,
    config: ArchiverConfig,
    topic: String,
    shutdown: Shutdown,
    abandon: Shutdown,
    on_shutdown: OnShutdown,
}

impl Poller {
    /// Consumes until shutdown. Returns, with [`OnShutdown::DrainTopic`], what could not be archived up to the
    /// topic's end before the deadline.
    fn run(self) -> std::result::Result<(), String> {
        let poll_timeout = Duration::from_millis(50);
        // Age-based sealing, the global cap and resynchronizations are checked on this tick rather than after
        // every record: they scan every owned partition.
        let housekeeping_interval = Duration::from_millis(50);
        let mut last_housekeeping = Instant::now();
        let mut draining = false;
        let mut drain_to: Option<BTreeMap<i32, i64>> = None;
        loop {
            if self.shutdown.is_triggered() {
                match self.on_shutdown {
                    OnShutdown::StopConsuming => {
                        let sealed = self.seal(|_| true);
                        self.send(sealed);
                        return Ok(());
                    }
                    OnShutdown::DrainTopic => {
                        if !draining {
                            draining = true;
                            tracing::info!(
                                "shutdown requested: archiving the topic up to its end first"
                            );
                        }
                        if let Some(done) = self.drain_step(&mut drain_to) {
                            return done;
                        }
                    }
                }
            }
            match self.consumer.poll(poll_timeout) {
                Some(Ok(message)) => {
                    if self.stats.first_record_micros.load(Ordering::Relaxed) == 0 {
                        self.stats
                            .first_record_micros
                            .store(chatvault_core::time::now_micros(), Ordering::Relaxed);
                    }
                    let partition = message.partition();
                    self.accept(&message);
                    if let Some(sealed) = self.seal_if_full(partition) {
                        self.send(vec![sealed]);
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "consumer error"),
                None => {}
            }
            if last_housekeeping.elapsed() >= housekeeping_interval {
                last_housekeeping = Instant::now();
                self.housekeeping();
            }
        }
    }

    /// One step of draining at shutdown: learns the topic's end offsets (once), seals the batches that reached
    /// them, and says whether everything up to them is committed, or, past the deadline, what is not.
    fn drain_step(
        &self,
        drain_to: &mut Option<BTreeMap<i32, i64>>,
    ) -> Option<std::result::Result<(), String>> {
        if drain_to.is_none() {
            match self.end_offsets() {
                Ok(ends) => {
                    tracing::info!(?ends, "draining partitions up to these end offsets");
                    *drain_to = Some(ends);
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the topic's end offsets failed; retrying");
                    if self.abandon.is_triggered() {
                        return Some(Err(format!(
                            "the end offsets of {} could not be read: {error}",
                            self.topic
                        )));
                    }
                    return None;
                }
            }
        }
        let ends = drain_to.as_ref()?;
        let sealed = self.seal(|open| {
            ends.get(&open.partition)
                .is_some_and(|end| open.end_offset >= *end)
        });
        self.send(sealed);
        let missing: Vec<String> = {
            let partitions = self.partitions.lock();
            ends.iter()
                .filter(|(_, end)| **end > 0)
                .filter_map(
                    |(partition, end)| match partitions.get(partition).map(|s| s.head.end_offset) {
                        Some(committed) if committed >= *end => None,
                        Some(committed) => Some(format!(
                            "partition {partition}: offsets {committed}..{end} not committed"
                        )),
                        None => Some(format!(
                            "partition {partition}: not assigned to this archiver (end offset {end})"
                        )),
                    },
                )
                .collect()
        };
        if missing.is_empty() {
            tracing::info!("every partition is archived up to the topic's end");
            return Some(Ok(()));
        }
        if self.abandon.is_triggered() {
            return Some(Err(missing.join("; ")));
        }
        None
    }

    /// The high watermark of every partition of the topic.
    fn end_offsets(&self) -> KafkaResult<BTreeMap<i32, i64>> {
        let timeout = Duration::from_secs(5);
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
        let mut ends = BTreeMap::new();
        for topic in metadata.topics().iter().filter(|t| t.name() == self.topic) {
            for partition in topic.partitions() {
                let (_, high) =
                    self.consumer
                        .fetch_watermarks(&self.topic, partition.id(), timeout)?;
                ends.insert(partition.id(), high);
            }
        }
        Ok(ends)
    }

    fn is_full(&self, open: &OpenBatch) -> bool {
        open.events.len() + open.rejected.len() >= self.config.max_batch_events
            || open.bytes >= self.config.max_batch_bytes
    }

    /// Seals `partition`'s open batch when it reached the count or size limit.
    fn seal_if_full(&self, partition: i32) -> Option<SealedBatch> {
        let mut partitions = self.partitions.lock();
        let state = partitions.get_mut(&partition)?;
        if state.resync_to.is_some() || !self.is_full(&state.open) {
            return None;
        }
        let next = OpenBatch::new(
            partition,
            state.generation,
            state.open.seq + 1,
            state.open.end_offset,
        );
        Some(std::mem::replace(&mut state.open, next).seal())
    }

    /// Resynchronizations, sealing by age, and the global cap on open batches.
    fn housekeeping(&self) {
        self.apply_resyncs();
        let max_bytes = self.config.max_batch_bytes;
        let max_age = self.config.max_batch_age();
        let now = Instant::now();
        let mut sealed =
            self.seal(|open| self.is_full(open) || now.duration_since(open.opened_at) >= max_age);
        // Global cap on open batches: seal the largest when they hold more than two batches' worth.
        let largest = {
            let partitions = self.partitions.lock();
            let total_open: usize = partitions.values().map(|s| s.open.bytes).sum();
            (total_open > 2 * max_bytes)
                .then(|| {
                    partitions
                        .iter()
                        .max_by_key(|(_, state)| state.open.bytes)
                        .map(|(p, _)| *p)
                })
                .flatten()
        };
        if let Some(largest) = largest {
            sealed.extend(self.seal(|open| open.partition == largest));
        }
        self.send(sealed);
    }

    /// Pauses a partition that cannot be archived safely, says why, and counts it: its records stay in Kafka
    /// and nothing of it is committed until a restart re-checks.
    fn halt(&self, partition: i32, offset: i64, why: &str) {
        let head_end = self
            .partitions
            .lock()
            .get(&partition)
            .map(|state| state.head.end_offset)
            .unwrap_or_default();
        tracing::error!(
            partition,
            kafka_offset = offset,
            archived_up_to = head_end,
            "{why}. This partition is halted (not consumed; its records stay in Kafka); a restart re-checks."
        );
        self.stats.halted_partitions.fetch_add(1, Ordering::Relaxed);
        let mut paused = TopicPartitionList::new();
        paused.add_partition(&self.topic, partition);
        if let Err(error) = self.consumer.pause(&paused) {
            tracing::warn!(partition, %error, "pausing the halted partition failed; its records are skipped");
        }
    }

    /// Kafka delivered `delivered` while `expected` was next: asks the broker whether the records between are
    /// gone (see [`crate::gaps`]) and returns whether the record may be archived now. Otherwise the partition
    /// was sought back to fetch again, or halted.
    fn check_gap(&self, partition: i32, expected: i64, delivered: i64) -> bool {
        let refetches = self
            .partitions
            .lock()
            .get(&partition)
            .map(|state| state.gap_refetches)
            .unwrap_or_default();
        let log_start = if self.config.offset_gaps == OffsetGapPolicy::Allow {
            Ok(0)
        } else {
            self.consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
                .map(|(low, _)| low)
                .map_err(|error| error.to_string())
        };
        let check = GapCheck {
            expected,
            delivered,
            log_start,
            refetches,
        };
        match gaps::judge(self.config.offset_gaps, &check) {
            GapVerdict::Commit => true,
            GapVerdict::Refetch { from } => {
                tracing::warn!(
                    partition,
                    expected,
                    delivered,
                    from,
                    log_start = ?check.log_start,
                    "Kafka skipped offsets the broker has not deleted; fetching them again"
                );
                let mut partitions = self.partitions.lock();
                if let Some(state) = partitions.get_mut(&partition) {
                    state.gap_refetches += 1;
                }
                drop(partitions);
                // Messages fetched before the seek are discarded by librdkafka (their fetch version is
                // outdated), so the next message of this partition comes from the new position.
                if let Err(error) = self.consumer.seek(
                    &self.topic,
                    partition,
                    Offset::Offset(from),
                    Duration::from_secs(5),
                ) {
                    tracing::warn!(partition, %error, "seeking back to the gap failed; retried on the next record");
                }
                false
            }
            GapVerdict::Halt { reason } => {
                if let Some(state) = self.partitions.lock().get_mut(&partition) {
                    state.halted = true;
                }
                self.halt(partition, delivered, &reason);
                false
            }
        }
    }

    fn accept(&self, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let offset = message.offset();
        let mut partitions = self.partitions.lock();
        let Some(state) = partitions.get_mut(&partition) else {
            return; // prefetched before a revoke
        };
        if state.resync_to.is_some() || state.halted {
            return; // waiting for a seek, or halted
        }
        if offset < state.head.end_offset {
            // Kafka delivers an offset the committed chain already covers: the consumer's position was
            // reset below the chain's end, which only happens when the partition now ends before it (the
            // topic was deleted and recreated, or a broker lost acknowledged records). Every new record would
            // be skipped as archived, so stop consuming the partition instead: its records stay in Kafka.
            state.halted = true;
            drop(partitions);
            self.halt(
                partition,
                offset,
                "Kafka offsets are behind the archive: the topic was recreated or a broker lost records, and \
                 archiving would skip them as already archived. Produce to a new topic name (kafka.topic) or \
                 investigate the cluster",
            );
            return;
        }
        if offset < state.open.end_offset {
            return; // already in the open batch
        }
        if offset > state.open.end_offset {
            let expected = state.open.end_offset;
            drop(partitions);
            if !self.check_gap(partition, expected, offset) {
                return;
            }
            partitions = self.partitions.lock();
        }
        let Some(state) = partitions.get_mut(&partition) else {
            return;
        };
        if state.resync_to.is_some() || state.halted {
            return;
        }
        state.gap_refetches = 0;
        if state.open.traces.len() < MAX_TRACED_RECORDS
            && let Some(traceparent) = traceparent_header(message)
        {
            state.open.traces.push(traceparent);
        }
        let payload = message.payload().unwrap_or_default();
        let reject = |reason: String| Rejected {
            offset,
            reason,
            key: message.key().map(<[u8]>::to_vec),
            value: payload.to_vec(),
        };
        match ChatEvent::decode(payload) {
            Ok(event) if event.tenant_id.is_empty() || event.event_id.is_empty() => state
                .open
                .push_rejected(reject("record lacks tenant_id or event_id".into())),
            // A tenant id names storage paths and keys: one the gateway would refuse is never archived.
            Ok(event) if !is_valid_tenant_id(&event.tenant_id) => {
                state.open.push_rejected(reject(format!(
                    "tenant_id {:?} is not a valid tenant id ([a-z0-9][a-z0-9_-]{{0,63}})",
                    event.tenant_id.chars().take(80).collect::<String>()
                )))
            }
            Ok(event) => {
                state.open.push_event(
                    ArchivedEvent {
                        event,
                        kafka_partition: partition,
                        kafka_offset: offset,
                    },
                    payload.len(),
                );
            }
            Err(error) => state.open.push_rejected(reject(format!(
                "record is not a chatvault.v1.ChatEvent: {error}"
            ))),
        }
        drop(partitions);
        crash_point("mid_batch");
    }

    fn apply_resyncs(&self) {
        let mut partitions = self.partitions.lock();
        for (partition, state) in partitions.iter_mut() {
            let Some(head) = state.resync_to.clone() else {
                continue;
            };
            match self.consumer.seek(
                &self.topic,
                *partition,
                Offset::Offset(head.end_offset),
                Duration::from_secs(1),
            ) {
                Ok(()) => {
                    tracing::info!(
                        partition,
                        offset = head.end_offset,
                        "resynchronized with the manifest chain"
                    );
                    state.open = OpenBatch::new(
                        *partition,
                        state.generation,
                        head.next_seq,
                        head.end_offset,
                    );
                    state.resync_to = None;
                }
                Err(error) => tracing::warn!(partition, %error, "seek failed; retrying"),
            }
        }
    }

    /// Seals the non-empty open batches selected by `select`; their successors continue the chain.
    fn seal(&self, select: impl Fn(&OpenBatch) -> bool) -> Vec<SealedBatch> {
        let mut sealed = Vec::new();
        let mut partitions = self.partitions.lock();
        for (partition, state) in partitions.iter_mut() {
            if state.resync_to.is_some() || state.open.is_empty() || !select(&state.open) {
                continue;
            }
            let next = OpenBatch::new(
                *partition,
                state.generation,
                state.open.seq + 1,
                state.open.end_offset,
            );
            sealed.push(std::mem::replace(&mut state.open, next).seal());
        }
        sealed
    }

    /// Hands sealed batches to the writer, blocking while it is `max_pending_batches` behind (backpressure:
    /// librdkafka's bounded prefetch queue then stops fetching).
    fn send(&self, sealed: Vec<SealedBatch>) {
        for batch in sealed {
            let (partition, start_offset, end_offset) =
                (batch.partition, batch.start_offset, batch.end_offset);
            if self.batches.blocking_send(batch).is_err() {
                if self.abandon.is_triggered() {
                    tracing::warn!(
                        partition,
                        start_offset,
                        end_offset,
                        "abandoning a sealed batch at the shutdown deadline; its records are still in Kafka"
                    );
                } else {
                    tracing::error!(
                        partition,
                        start_offset,
                        end_offset,
                        "the writer stopped; dropping a sealed batch (it will be consumed again)"
                    );
                }
            }
        }
    }
}

/// The record's W3C `traceparent` header, set by the gateway when traces are on.
fn traceparent_header(message: &BorrowedMessage<'_>) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == "traceparent")
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .map(str::to_string)
}
