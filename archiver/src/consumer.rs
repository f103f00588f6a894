//! The poll thread and the rebalance handling.
//!
//! Kafka's committed offsets are only a hint: on assignment the archiver reads each partition's manifest chain
//! head from storage, removes the orphans of batches that lost their commit, and starts consuming exactly at
//! the head's `end_offset`. Records below a partition's position are skipped, so a replay never produces a
//! second copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatvault_core::archive::ArchivedEvent;
use chatvault_core::archive::file::FileOptions;
use chatvault_core::archive::manifest::{ChainHead, ManifestLog};
use chatvault_core::config::{ArchiverConfig, KafkaConfig};
use chatvault_core::error::{Error, Result};
use chatvault_core::kafka::consumer_config;
use chatvault_core::keys::DataKeys;
use chatvault_core::shutdown::Shutdown;
use chatvault_proto::v1::ChatEvent;
use object_store::ObjectStore;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::batch::{OpenBatch, SealedBatch};
use crate::crash::crash_point;
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
}

pub(crate) struct ArchiverContext {
    log: ManifestLog,
    partitions: SharedPartitions,
    runtime: Handle,
    shutdown: Shutdown,
}

impl ClientContext for ArchiverContext {}

impl ArchiverContext {
    /// Reads the chain head and cleans orphans, retrying until it works or shutdown begins. Runs inside the
    /// rebalance callback: consuming cannot start before the position is known.
    fn load_head(&self, partition: i32) -> Option<ChainHead> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = self.runtime.block_on(async {
                let head = self.log.head(partition).await?;
                let removed = self.log.clean_orphans(partition, &head).await?;
                if removed > 0 {
                    tracing::info!(partition, removed, "removed orphan files");
                }
                Ok::<_, Error>(head)
            });
            match attempt {
                Ok(head) => return Some(head),
                Err(error) => {
                    if self.shutdown.is_triggered() {
                        return None;
                    }
                    tracing::warn!(partition, %error, "reading the manifest chain failed; retrying");
                    std::thread::sleep(backoff);
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

impl Archiver {
    /// Runs until `shutdown`: consumes, batches, commits. At shutdown the open batches are sealed and committed
    /// (or abandoned, if storage is unreachable: they are consumed again by the next owner), then the consumer
    /// leaves the group.
    pub async fn run(
        options: ArchiverOptions,
        store: Arc<dyn ObjectStore>,
        data_keys: DataKeys,
        stats: Arc<ArchiverStats>,
        shutdown: Shutdown,
    ) -> Result<()> {
        let topic = options.kafka.topic.clone();
        let partitions = SharedPartitions::default();
        let log = ManifestLog::new(store.clone(), &topic);
        let context = ArchiverContext {
            log: log.clone(),
            partitions: partitions.clone(),
            runtime: Handle::current(),
            shutdown: shutdown.clone(),
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
            log,
            data_keys,
            partitions: partitions.clone(),
            consumer: consumer.clone(),
            topic: topic.clone(),
            writer_id: options.writer_id.clone(),
            file_options: FileOptions {
                zstd_level: options.config.zstd_level,
                row_group_rows: options.config.row_group_rows,
            },
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        };
        let writer_task = tokio::spawn(writer.run(receiver));
        let poller = Poller {
            stats: stats.clone(),
            consumer: consumer.clone(),
            partitions,
            batches: sender,
            config: options.config.clone(),
            topic,
            shutdown,
        };
        let poll_thread = std::thread::Builder::new()
            .name("archiver-poll".into())
            .spawn(move || poller.run())
            .map_err(|error| Error::internal(format!("spawning the poll thread: {error}")))?;
        tokio::task::spawn_blocking(move || poll_thread.join())
            .await
            .map_err(|error| Error::internal(format!("poll thread: {error}")))?
            .map_err(|_| Error::internal("the poll thread panicked"))?;
        writer_task
            .await
            .map_err(|error| Error::internal(format!("writer task: {error}")))?;
        // Closing the consumer blocks while it leaves the group: do it off the async workers.
        tokio::task::spawn_blocking(move || drop(consumer))
            .await
            .map_err(|error| Error::internal(format!("closing the consumer: {error}")))?;
        tracing::info!("archiver stopped");
        Ok(())
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
}

impl Poller {
    fn run(self) {
        let poll_timeout = Duration::from_millis(50);
        // Age-based sealing, the global cap and resynchronizations are checked on this tick rather than after
        // every record: they scan every owned partition.
        let housekeeping_interval = Duration::from_millis(50);
        let mut last_housekeeping = Instant::now();
        loop {
            if self.shutdown.is_triggered() {
                let sealed = self.seal(|_| true);
                self.send(sealed);
                return;
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

    fn accept(&self, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let offset = message.offset();
        let mut partitions = self.partitions.lock();
        let Some(state) = partitions.get_mut(&partition) else {
            return; // prefetched before a revoke
        };
        if state.resync_to.is_some() || offset < state.open.end_offset {
            return; // already committed, or waiting for a seek
        }
        let payload = message.payload().unwrap_or_default();
        match ChatEvent::decode(payload) {
            Ok(event) if !event.tenant_id.is_empty() && !event.event_id.is_empty() => {
                state.open.push_event(
                    ArchivedEvent {
                        event,
                        kafka_partition: partition,
                        kafka_offset: offset,
                    },
                    payload.len(),
                );
            }
            Ok(_) => state
                .open
                .push_rejected(offset, "record lacks tenant_id or event_id".into()),
            Err(error) => state.open.push_rejected(
                offset,
                format!("record is not a chatvault.v1.ChatEvent: {error}"),
            ),
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
            if self.batches.blocking_send(batch).is_err() {
                tracing::error!(
                    "the writer stopped; dropping a sealed batch (it will be consumed again)"
                );
            }
        }
    }
}
