//! The poll thread's state machine: every piece of state about the partitions this worker owns lives here,
//! owned by the one thread that polls Kafka, and changes only in reaction to something that happened:
//!
//! - a **rebalance** ([`Rebalance`]): an assigned partition starts *loading* (paused in Kafka while its chain
//!   head is read from storage on the runtime; the poll thread keeps serving Kafka meanwhile); a revoked one is
//!   forgotten and its commit lane cancelled;
//! - a **head loaded** ([`Feedback::Head`]): the partition is sought to the head's end offset, resumed, and
//!   gets a fresh commit lane; a transient storage error retries after a per-partition backoff, a chain that
//!   fails verification halts the partition;
//! - a **record** ([`Record`]): appended to the partition's open batch (or judged as an offset gap, see
//!   [`crate::gaps`]); a full batch is sealed and handed to the lane;
//! - a **lane report** ([`Feedback::Lane`]): a committed batch moves the head (and the Kafka offset hint); a
//!   fenced one re-reads the head; a released one (repeated transient failures) backs the partition off: it is
//!   paused, then loaded again and consumed from its head, while the other partitions go on;
//! - **housekeeping** (every 50 ms): sealing by age and the global cap on open batches, due retries, pausing a
//!   partition whose sealed batch waits for a pending-batch slot (backpressure without blocking the thread),
//!   and the health a `/readyz` reports (halted and stalled partitions).
//!
//! Kafka is reached only through [`Broker`], so the whole machine runs in unit tests against a fake.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ArchiverConfig, OffsetGapPolicy};
use chatvault_archive::Archived;
use chatvault_archive::chain::ChainWriter;
use chatvault_archive::kind::{ChatEvents, RecordKind};
use chatvault_archive::manifest::ChainHead;
use chatvault_core::error::{ErrorCode, Result};
use chatvault_core::metrics::metrics;
use chatvault_core::shutdown::Shutdown;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc};

use crate::batch::{MAX_TRACED_RECORDS, OpenBatch, Rejected, SealedBatch};
use crate::crash::crash_point;
use crate::error::BrokerError;
use crate::gaps::{self, GapCheck, GapVerdict};
use crate::lane::{BatchOutcome, CommitStages, Lane, LaneReport};
use crate::stats::ArchiverStats;

/// What the poll thread asks of Kafka besides polling. Implemented over librdkafka in `kafka.rs`.
pub trait Broker {
    /// Stops fetching `partition` (records already fetched may still arrive).
    fn pause(&self, partition: i32) -> std::result::Result<(), BrokerError>;
    fn resume(&self, partition: i32) -> std::result::Result<(), BrokerError>;
    /// Moves the fetch position of `partition` to `offset` (`None`: the log's beginning). Records fetched
    /// from the old position are not delivered afterwards.
    fn seek(&self, partition: i32, offset: Option<i64>) -> std::result::Result<(), BrokerError>;
    /// The partition's `(log-start offset, high watermark)` as the broker reports them now.
    fn watermarks(&self, partition: i32) -> std::result::Result<(i64, i64), BrokerError>;
    /// The high watermark of every partition of the topic.
    fn end_offsets(&self) -> std::result::Result<BTreeMap<i32, i64>, BrokerError>;
    /// Stores `end_offset` as the group's committed offset of `partition`: a hint for lag monitoring and other
    /// consumers only (the manifest chain is authoritative), so failures are not reported.
    fn commit_offset_hint(&self, partition: i32, end_offset: i64);
}

/// One consumed Kafka record, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// The W3C `traceparent` header, set by the gateway when traces are on.
    pub traceparent: Option<&'a str>,
}

/// A change of the assignment, as librdkafka's rebalance callback saw it (it runs inside `poll`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    /// Assigned and already paused: nothing is fetched until the head is known and the partition sought.
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
    /// The assignment was lost (a rebalance error): every partition is dropped.
    Lost,
}

/// Reports from tasks on the runtime to the poll thread.
#[derive(Debug)]
pub enum Feedback {
    Head {
        partition: i32,
        generation: u64,
        head: Result<ChainHead>,
    },
    Lane(LaneReport),
}

/// What the operations view shows about owned partitions (read by librdkafka's statistics callback).
#[derive(Debug, Default, Clone)]
pub struct OwnedView {
    /// Owned partition → committed chain head end offset (known heads only).
    pub heads: BTreeMap<i32, i64>,
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
    /// where records left behind are lost: a shortfall at the deadline makes the archiver fail. Assumes this
    /// worker is the only member of its group (it waits for every partition) and a producer that is not
    /// transactional (the end offset is the high watermark).
    DrainTopic,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// First and largest pause of a partition after a transient failure.
const FIRST_PARTITION_BACKOFF: Duration = Duration::from_millis(500);
const MAX_PARTITION_BACKOFF: Duration = Duration::from_secs(30);
/// Seeks back to the chain head after records below it arrived, before the partition is halted.
const MAX_POSITION_RESETS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The chain head is being read (`retry_at: None`) or will be read again at `retry_at`.
    Loading {
        retry_at: Option<Instant>,
    },
    Consuming,
    /// A batch was released after transient failures: loaded again at `until`.
    BackingOff {
        until: Instant,
    },
    /// Not consumed until a restart re-checks (the reason was logged).
    Halted,
}

struct Owned<K: RecordKind> {
    /// Changes whenever the partition's position is re-read from storage; reports of older generations are
    /// ignored.
    generation: u64,
    phase: Phase,
    /// The committed chain head, as loaded or advanced by this worker's own commits.
    head: ChainHead,
    /// The batch being filled (meaningful while consuming).
    open: OpenBatch<K>,
    /// Sealed batches waiting for a pending-batch slot; the partition is paused while any wait.
    waiting: VecDeque<SealedBatch<K>>,
    lane: Option<Lane<K>>,
    /// Batches handed to the current lane and not reported yet.
    in_flight: usize,
    /// Whether Kafka was told to pause the partition.
    paused: bool,
    /// After a re-fetch from before the expected offset: records below this are skipped silently.
    skip_below: Option<i64>,
    gap_refetches: u32,
    /// Times Kafka delivered a record below the chain head since it was loaded, each answered by seeking to
    /// the head again (see [`Poller::behind_the_head`]).
    position_resets: u32,
    /// Consecutive released batches (the partition's backoff grows with them).
    failures: u32,
    /// The last commit, or the last moment the partition had nothing to archive.
    progress_at: Instant,
    stalled: bool,
}

impl<K: RecordKind> Owned<K> {
    fn has_pending_work(&self) -> bool {
        match self.phase {
            Phase::Halted => false,
            Phase::Loading { .. } | Phase::BackingOff { .. } => true,
            Phase::Consuming => {
                !self.open.is_empty() || !self.waiting.is_empty() || self.in_flight > 0
            }
        }
    }
}

/// The poll thread's state and reactions (see the module documentation), for a stream of records of kind
/// `K`.
pub struct Poller<B: Broker, K: RecordKind = ChatEvents> {
    broker: B,
    runtime: Handle,
    config: ArchiverConfig,
    on_shutdown: OnShutdown,
    chain: ChainWriter,
    stages: Arc<CommitStages<K>>,
    stats: Arc<ArchiverStats>,
    partitions: HashMap<i32, Owned<K>>,
    /// Sealed batches handed to lanes and not finished, across partitions (`archiver.max_pending_batches`).
    pending_slots: Arc<Semaphore>,
    feedback: std::sync::mpsc::Sender<Feedback>,
    reports: std::sync::mpsc::Receiver<Feedback>,
    /// Held by every lane task; the role waits until all clones are gone.
    alive: mpsc::Sender<()>,
    view: Arc<Mutex<OwnedView>>,
    shutdown: Shutdown,
    abandon: Shutdown,
    /// Shutdown with [`OnShutdown::StopConsuming`] began: nothing more is consumed.
    stopping: bool,
    drain_to: Option<BTreeMap<i32, i64>>,
}

/// How a [`Poller`] is put together.
pub struct PollerParts<B: Broker, K: RecordKind = ChatEvents> {
    pub broker: B,
    pub runtime: Handle,
    pub config: ArchiverConfig,
    pub on_shutdown: OnShutdown,
    pub chain: ChainWriter,
    pub stages: Arc<CommitStages<K>>,
    pub stats: Arc<ArchiverStats>,
    pub alive: mpsc::Sender<()>,
    pub view: Arc<Mutex<OwnedView>>,
    pub shutdown: Shutdown,
    pub abandon: Shutdown,
}

impl<B: Broker, K: RecordKind> Poller<B, K> {
    pub fn new(parts: PollerParts<B, K>) -> Poller<B, K> {
        let (feedback, reports) = std::sync::mpsc::channel();
        Poller {
            pending_slots: Arc::new(Semaphore::new(parts.config.max_pending_batches.max(1))),
            broker: parts.broker,
            runtime: parts.runtime,
            config: parts.config,
            on_shutdown: parts.on_shutdown,
            chain: parts.chain,
            stages: parts.stages,
            stats: parts.stats,
            partitions: HashMap::new(),
            feedback,
            reports,
            alive: parts.alive,
            view: parts.view,
            shutdown: parts.shutdown,
            abandon: parts.abandon,
            stopping: false,
            drain_to: None,
        }
    }

    pub fn broker(&self) -> &B {
        &self.broker
    }

    /// Whether the role's shutdown was requested: the poll loop then calls [`Self::shutdown_step`].
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.is_triggered()
    }

    /// The committed heads of the owned partitions that have any: the offsets to commit to Kafka when
    /// leaving the group.
    pub fn durable_offsets(&self) -> Vec<(i32, i64)> {
        let mut durable: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter(|(_, owned)| owned.head.next_seq > 0)
            .map(|(partition, owned)| (*partition, owned.head.end_offset))
            .collect();
        durable.sort_unstable();
        durable
    }

    /// Logs what is left uncommitted (at the shutdown deadline).
    pub fn log_abandoned(&self) {
        for (partition, owned) in &self.partitions {
            if owned.open.end_offset > owned.head.end_offset || owned.in_flight > 0 {
                tracing::warn!(
                    partition,
                    committed_up_to = owned.head.end_offset,
                    consumed_up_to = owned.open.end_offset,
                    "abandoned at the shutdown deadline: records from committed_up_to on were not committed"
                );
            }
        }
    }

    // ----- rebalances -------------------------------------------------------------------------------------

    pub fn on_rebalance(&mut self, rebalance: Rebalance) {
        match rebalance {
            Rebalance::Assigned(partitions) => {
                for partition in partitions {
                    self.assign(partition);
                }
            }
            Rebalance::Revoked(partitions) => {
                for partition in partitions {
                    if let Some(owned) = self.partitions.remove(&partition) {
                        if let Some(lane) = owned.lane {
                            lane.cancel();
                        }
                        // The open batch is dropped: nothing in it is committed, and the next owner starts
                        // from the chain head.
                        tracing::info!(partition, "partition revoked");
                    }
                }
            }
            Rebalance::Lost => {
                tracing::error!("the assignment was lost; dropping every partition");
                for (_, owned) in self.partitions.drain() {
                    if let Some(lane) = owned.lane {
                        lane.cancel();
                    }
                }
            }
        }
        self.publish();
    }

    fn assign(&mut self, partition: i32) {
        let generation = next_generation();
        let now = Instant::now();
        if let Some(previous) = self.partitions.remove(&partition)
            && let Some(lane) = previous.lane
        {
            lane.cancel();
        }
        self.partitions.insert(
            partition,
            Owned {
                generation,
                phase: Phase::Loading { retry_at: None },
                head: ChainHead::empty(),
                open: OpenBatch::new(partition, generation, 0, 0),
                waiting: VecDeque::new(),
                lane: None,
                in_flight: 0,
                paused: true,
                skip_below: None,
                gap_refetches: 0,
                position_resets: 0,
                failures: 0,
                progress_at: now,
                stalled: false,
            },
        );
        tracing::info!(partition, "partition assigned; reading its chain head");
        self.load_head(partition, generation);
    }

    /// Reads the chain head (and removes the orphans of batches that lost their commit) on the runtime.
    fn load_head(&self, partition: i32, generation: u64) {
        let chain = self.chain.clone();
        let feedback = self.feedback.clone();
        self.runtime.spawn(async move {
            let head = async {
                let head = chain.reader().head(partition).await?;
                let removed = chain.clean_orphans(partition, &head).await?;
                if removed > 0 {
                    tracing::info!(partition, removed, "removed orphan files");
                }
                Ok(head)
            }
            .await;
            let _ = feedback.send(Feedback::Head {
                partition,
                generation,
                head,
            });
        });
    }

    /// Starts over from storage: a new generation, the lane cancelled, what was consumed dropped (it is still
    /// in Kafka), the partition paused; loaded again now or after a backoff.
    fn restart(&mut self, partition: i32, backoff: Option<Duration>) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        owned.generation = next_generation();
        if let Some(lane) = owned.lane.take() {
            lane.cancel();
        }
        owned.waiting.clear();
        owned.in_flight = 0;
        owned.skip_below = None;
        owned.gap_refetches = 0;
        owned.position_resets = 0;
        owned.open = OpenBatch::new(partition, owned.generation, 0, 0);
        let generation = owned.generation;
        match backoff {
            Some(delay) => {
                owned.phase = Phase::BackingOff {
                    until: Instant::now() + delay,
                }
            }
            None => owned.phase = Phase::Loading { retry_at: None },
        }
        self.reconcile_pause(partition);
        if backoff.is_none() {
            self.load_head(partition, generation);
        }
    }

    // ----- feedback ---------------------------------------------------------------------------------------

    /// Applies every report that arrived since the last call.
    pub fn drain_feedback(&mut self) {
        while let Ok(feedback) = self.reports.try_recv() {
            self.on_feedback(feedback);
        }
    }

    /// Waits up to `timeout` for one report and applies it (tests use this instead of polling).
    pub fn wait_feedback(&mut self, timeout: Duration) -> bool {
        match self.reports.recv_timeout(timeout) {
            Ok(feedback) => {
                self.on_feedback(feedback);
                true
            }
            Err(_) => false,
        }
    }

    fn on_feedback(&mut self, feedback: Feedback) {
        match feedback {
            Feedback::Head {
                partition,
                generation,
                head,
            } => self.on_head(partition, generation, head),
            Feedback::Lane(report) => self.on_report(report),
        }
        self.publish();
    }

    fn on_head(&mut self, partition: i32, generation: u64, head: Result<ChainHead>) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        if owned.generation != generation || owned.phase != (Phase::Loading { retry_at: None }) {
            return;
        }
        let head = match head {
            Ok(head) => head,
            Err(error) if error.code() == ErrorCode::Internal => {
                let reason = format!("its manifest chain cannot be trusted: {error}");
                let end_offset = owned.head.end_offset;
                self.halt(partition, end_offset, &reason);
                return;
            }
            Err(error) => {
                self.load_again_later(partition, "reading the manifest chain head", &error);
                return;
            }
        };
        let start = (head.next_seq > 0).then_some(head.end_offset);
        if let Err(error) = self.broker.seek(partition, start) {
            self.load_again_later(partition, "seeking to the chain head", &error);
            return;
        }
        if head.next_seq > 0 {
            self.stats.heads.advance(partition, head.end_offset);
        }
        let lane = self.stages.spawn_lane(
            &self.runtime,
            partition,
            generation,
            head.clone(),
            {
                let feedback = self.feedback.clone();
                move |report| feedback.send(Feedback::Lane(report)).is_ok()
            },
            self.alive.clone(),
        );
        let owned = self.partitions.get_mut(&partition).expect("owned");
        tracing::info!(
            partition,
            next_seq = head.next_seq,
            offset = head.end_offset,
            "consuming from the chain head"
        );
        owned.open = OpenBatch::new(partition, generation, head.next_seq, head.end_offset);
        owned.head = head;
        owned.lane = Some(lane);
        owned.phase = Phase::Consuming;
        self.reconcile_pause(partition);
    }

    /// A transient failure while loading: the partition stays loading and tries again after its backoff.
    fn load_again_later(&mut self, partition: i32, what: &str, error: &dyn std::fmt::Display) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        owned.failures += 1;
        let delay = partition_backoff(owned.failures);
        tracing::warn!(partition, %error, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
        owned.phase = Phase::Loading {
            retry_at: Some(Instant::now() + delay),
        };
    }

    fn on_report(&mut self, report: LaneReport) {
        let partition = report.partition;
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        if owned.generation != report.generation {
            return; // a cancelled lane's batch; its outcome was published through the stats if it committed
        }
        owned.in_flight = owned.in_flight.saturating_sub(1);
        match report.outcome {
            BatchOutcome::Committed { head } => {
                let end_offset = head.end_offset;
                owned.head = head;
                owned.failures = 0;
                owned.progress_at = Instant::now();
                self.broker.commit_offset_hint(partition, end_offset);
                self.flush_waiting(partition);
            }
            BatchOutcome::Fenced => {
                tracing::info!(partition, "re-reading the chain head after a fenced batch");
                self.restart(partition, None);
            }
            BatchOutcome::Released { error } => {
                owned.failures += 1;
                let delay = partition_backoff(owned.failures);
                tracing::warn!(
                    partition,
                    seq = report.seq,
                    %error,
                    failures = owned.failures,
                    backoff_ms = delay.as_millis() as u64,
                    "a batch failed repeatedly and went back to Kafka; this partition backs off, the others go on"
                );
                self.restart(partition, Some(delay));
            }
            BatchOutcome::Dropped | BatchOutcome::Abandoned => {}
        }
    }

    // ----- records ----------------------------------------------------------------------------------------

    /// Takes one consumed record.
    pub fn on_record(&mut self, record: Record<'_>) {
        if self.stats.first_record_micros.load(Ordering::Relaxed) == 0 {
            self.stats
                .first_record_micros
                .store(chatvault_core::time::now_micros(), Ordering::Relaxed);
        }
        if self.stopping {
            return;
        }
        let partition = record.partition;
        if self.accept(record) {
            crash_point("mid_batch");
            self.seal_if_full(partition);
        }
    }

    /// Adds `record` to its partition's open batch; false when it was skipped.
    fn accept(&mut self, record: Record<'_>) -> bool {
        let (partition, offset) = (record.partition, record.offset);
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return false; // prefetched before a revoke
        };
        if owned.phase != Phase::Consuming {
            return false; // fetched before a pause; the partition is sought again before it resumes
        }
        if let Some(skip_below) = owned.skip_below {
            if offset < skip_below {
                return false; // re-fetched from before the gap
            }
            owned.skip_below = None;
        }
        if offset < owned.head.end_offset {
            self.behind_the_head(partition, offset);
            return false;
        }
        if offset < owned.open.end_offset {
            return false; // already in the open batch
        }
        if offset > owned.open.end_offset {
            let expected = owned.open.end_offset;
            if !self.check_gap(partition, expected, offset) {
                return false;
            }
        }
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return false;
        };
        owned.gap_refetches = 0;
        if owned.open.traces.len() < MAX_TRACED_RECORDS
            && let Some(traceparent) = record.traceparent
        {
            owned.open.traces.push(traceparent.to_string());
        }
        let payload = record.payload;
        let reject = |reason: String| Rejected {
            offset,
            reason,
            key: record.key.map(<[u8]>::to_vec),
            value: payload.to_vec(),
        };
        let open = &mut owned.open;
        match <K::Record as prost::Message>::decode(payload) {
            Ok(record) => match K::refusal(&record) {
                Some(reason) => open.push_rejected(reject(reason)),
                None => open.push_event(
                    Archived {
                        record,
                        kafka_partition: partition,
                        kafka_offset: offset,
                    },
                    payload.len(),
                ),
            },
            Err(error) => {
                open.push_rejected(reject(format!("record is not a {}: {error}", K::MESSAGE)))
            }
        }
        true
    }

    /// Kafka delivered `offset`, which the committed chain already covers: the consumer's position is below
    /// the chain's end. Either the partition now ends before the chain (the topic was deleted and recreated, or
    /// a broker lost acknowledged records: every new record would be skipped as archived, so the partition is
    /// halted and its records stay in Kafka), or the seek to the chain head did not hold. librdkafka can
    /// start a freshly assigned partition from its committed offset (or `auto.offset.reset`) after the seek
    /// returned, when the group has no offset stored past the head, as after an archiver was killed between
    /// committing a manifest and storing its offset. Then the partition's high watermark is at or past the head:
    /// the records below the head are skipped and the partition is sought to the head again, up to
    /// [`MAX_POSITION_RESETS`] times before it is halted.
    fn behind_the_head(&mut self, partition: i32, offset: i64) {
        let Some(owned) = self.partitions.get(&partition) else {
            return;
        };
        let head_end = owned.head.end_offset;
        let resets = owned.position_resets;
        let high = self.broker.watermarks(partition).map(|(_, high)| high);
        let recreated = matches!(high, Ok(high) if high < head_end);
        if recreated || resets >= MAX_POSITION_RESETS {
            let why = match high {
                Ok(high) if high < head_end => {
                    format!(
                        "the partition now ends at offset {high}, before the archived end {head_end}"
                    )
                }
                _ => format!(
                    "Kafka kept delivering offsets below the archived end {head_end} after {resets} seeks to it"
                ),
            };
            self.halt(
                partition,
                offset,
                &format!(
                    "Kafka offsets are behind the archive ({why}): the topic was recreated or a broker lost \
                     records, and archiving would skip them as already archived. Produce to a new topic name \
                     (kafka.topic) or investigate the cluster"
                ),
            );
            return;
        }
        tracing::warn!(
            partition,
            kafka_offset = offset,
            archived_up_to = head_end,
            high_watermark = ?high,
            "Kafka delivered a record the archive already holds (the consumer did not start at the chain head); \
             seeking to the chain head again"
        );
        if let Some(owned) = self.partitions.get_mut(&partition) {
            owned.position_resets += 1;
            owned.skip_below = Some(owned.skip_below.unwrap_or(head_end).max(head_end));
        }
        if let Err(error) = self.broker.seek(partition, Some(head_end)) {
            tracing::warn!(partition, %error, "seeking to the chain head failed; retried on the next record");
        }
    }

    /// Kafka delivered `delivered` while `expected` was next: asks the broker whether the records between are
    /// gone (see [`crate::gaps`]) and returns whether the record may be archived now. Otherwise the partition
    /// was sought back to fetch again, or halted.
    fn check_gap(&mut self, partition: i32, expected: i64, delivered: i64) -> bool {
        let refetches = self
            .partitions
            .get(&partition)
            .map(|owned| owned.gap_refetches)
            .unwrap_or_default();
        let log_start = if self.config.offset_gaps == OffsetGapPolicy::Allow {
            Ok(0)
        } else {
            self.broker
                .watermarks(partition)
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
                if let Some(owned) = self.partitions.get_mut(&partition) {
                    owned.gap_refetches += 1;
                    owned.skip_below = Some(expected);
                }
                if let Err(error) = self.broker.seek(partition, Some(from)) {
                    tracing::warn!(partition, %error, "seeking back to the gap failed; retried on the next record");
                }
                false
            }
            GapVerdict::Halt { reason } => {
                self.halt(partition, delivered, &reason);
                false
            }
        }
    }

    /// Pauses a partition that cannot be archived safely, says why, and counts it: its records stay in Kafka
    /// and nothing of it is committed until a restart re-checks.
    fn halt(&mut self, partition: i32, offset: i64, why: &str) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        tracing::error!(
            partition,
            kafka_offset = offset,
            archived_up_to = owned.head.end_offset,
            "{why}. This partition is halted (not consumed; its records stay in Kafka); a restart re-checks."
        );
        owned.phase = Phase::Halted;
        if let Some(lane) = owned.lane.take() {
            lane.cancel();
        }
        owned.waiting.clear();
        owned.in_flight = 0;
        self.stats.halted_partitions.fetch_add(1, Ordering::Relaxed);
        self.reconcile_pause(partition);
    }

    // ----- sealing and handing over -----------------------------------------------------------------------

    fn is_full(&self, open: &OpenBatch<K>) -> bool {
        open.events.len() + open.rejected.len() >= self.config.max_batch_events
            || open.bytes >= self.config.max_batch_bytes
    }

    fn seal_if_full(&mut self, partition: i32) {
        let full = self
            .partitions
            .get(&partition)
            .is_some_and(|owned| self.is_full(&owned.open));
        if full {
            self.seal_partition(partition);
        }
    }

    /// Seals the partition's open batch (when consuming and not empty) and hands it on.
    fn seal_partition(&mut self, partition: i32) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        if owned.phase != Phase::Consuming || owned.open.is_empty() {
            return;
        }
        let next = OpenBatch::new(
            partition,
            owned.generation,
            owned.open.seq + 1,
            owned.open.end_offset,
        );
        let sealed = std::mem::replace(&mut owned.open, next).seal();
        owned.waiting.push_back(sealed);
        self.flush_waiting(partition);
    }

    /// Hands the partition's waiting batches to its lane while pending-batch slots are free; the partition is
    /// paused while any still wait (so the bound holds without blocking this thread).
    fn flush_waiting(&mut self, partition: i32) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        while !owned.waiting.is_empty() {
            let Ok(permit) = self.pending_slots.clone().try_acquire_owned() else {
                break;
            };
            let Some(batch) = owned.waiting.pop_front() else {
                break;
            };
            let Some(lane) = &owned.lane else {
                break;
            };
            let (start_offset, end_offset) = (batch.start_offset, batch.end_offset);
            match lane.send(batch, permit) {
                Ok(()) => owned.in_flight += 1,
                Err(_) => {
                    tracing::error!(
                        partition,
                        start_offset,
                        end_offset,
                        "the partition's commit lane stopped; dropping a sealed batch (it will be consumed again)"
                    );
                }
            }
        }
        self.reconcile_pause(partition);
    }

    /// Pauses or resumes the partition in Kafka so that it is fetched exactly when it is consuming, no sealed
    /// batch waits for a slot, and no shutdown stopped consumption.
    fn reconcile_pause(&mut self, partition: i32) {
        let Some(owned) = self.partitions.get_mut(&partition) else {
            return;
        };
        let fetch = owned.phase == Phase::Consuming && owned.waiting.is_empty() && !self.stopping;
        if fetch != owned.paused {
            return;
        }
        let result = if fetch {
            self.broker.resume(partition)
        } else {
            self.broker.pause(partition)
        };
        match result {
            Ok(()) => owned.paused = !fetch,
            Err(error) => {
                tracing::warn!(partition, %error, fetch, "pausing or resuming failed; retried")
            }
        }
    }

    // ----- housekeeping -----------------------------------------------------------------------------------

    /// Due retries, sealing by age and the global cap on open batches, pending slots, pause states, health.
    pub fn housekeeping(&mut self) {
        let now = Instant::now();
        let partitions: Vec<i32> = self.partitions.keys().copied().collect();
        for partition in &partitions {
            let Some(owned) = self.partitions.get_mut(partition) else {
                continue;
            };
            match owned.phase {
                Phase::Loading {
                    retry_at: Some(retry_at),
                } if retry_at <= now => {
                    owned.phase = Phase::Loading { retry_at: None };
                    let generation = owned.generation;
                    self.load_head(*partition, generation);
                }
                Phase::BackingOff { until } if until <= now => {
                    owned.phase = Phase::Loading { retry_at: None };
                    let generation = owned.generation;
                    self.load_head(*partition, generation);
                }
                _ => {}
            }
        }
        let max_age = self.config.max_batch_age;
        for partition in &partitions {
            let due = self.partitions.get(partition).is_some_and(|owned| {
                self.is_full(&owned.open)
                    || (!owned.open.is_empty()
                        && now.duration_since(owned.open.opened_at) >= max_age)
            });
            if due {
                self.seal_partition(*partition);
            }
        }
        // Global cap on open batches: seal the largest when they hold more than two batches' worth.
        let total_open: usize = self.partitions.values().map(|o| o.open.bytes).sum();
        if total_open > 2 * self.config.max_batch_bytes
            && let Some(largest) = self
                .partitions
                .iter()
                .max_by_key(|(_, owned)| owned.open.bytes)
                .map(|(partition, _)| *partition)
        {
            self.seal_partition(largest);
        }
        for partition in &partitions {
            self.flush_waiting(*partition);
        }
        self.update_health(now);
        self.publish();
    }

    /// Counts halted and stalled partitions for `/readyz` and the gauges; logs a partition once when it stalls.
    fn update_health(&mut self, now: Instant) {
        let stall_after = self.config.stall_timeout;
        let (mut halted, mut stalled) = (0usize, 0usize);
        for (partition, owned) in self.partitions.iter_mut() {
            if owned.phase == Phase::Halted {
                halted += 1;
            }
            if !owned.has_pending_work() {
                owned.progress_at = now;
            }
            let is_stalled =
                owned.has_pending_work() && now.duration_since(owned.progress_at) >= stall_after;
            if is_stalled && !owned.stalled {
                tracing::error!(
                    partition,
                    archived_up_to = owned.head.end_offset,
                    stalled_for_ms = now.duration_since(owned.progress_at).as_millis() as u64,
                    failures = owned.failures,
                    "this partition has records to archive and committed nothing for archiver.stall_timeout; \
                     see the warnings before this line (storage, keys or the chain head)"
                );
            } else if !is_stalled && owned.stalled {
                tracing::info!(partition, "the partition makes progress again");
            }
            owned.stalled = is_stalled;
            stalled += usize::from(is_stalled);
        }
        self.stats
            .halted_now
            .store(halted as u64, Ordering::Relaxed);
        self.stats
            .stalled_now
            .store(stalled as u64, Ordering::Relaxed);
        metrics().set_halted_partitions(&self.stages.topic, halted);
        metrics().set_stalled_partitions(&self.stages.topic, stalled);
    }

    fn publish(&self) {
        let heads = self
            .partitions
            .iter()
            .filter(|(_, owned)| !matches!(owned.phase, Phase::Loading { .. }))
            .map(|(partition, owned)| (*partition, owned.head.end_offset))
            .collect();
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.heads = heads;
    }

    // ----- shutdown ---------------------------------------------------------------------------------------

    /// One step of shutting down, called on every turn of the poll loop once shutdown was requested. Returns
    /// `Some` when the poll thread may stop: with [`OnShutdown::DrainTopic`], `Err` names what could not be
    /// archived up to the topic's end before the deadline.
    pub fn shutdown_step(&mut self) -> Option<std::result::Result<(), String>> {
        match self.on_shutdown {
            OnShutdown::StopConsuming => {
                if !self.stopping {
                    self.stopping = true;
                    let partitions: Vec<i32> = self.partitions.keys().copied().collect();
                    for partition in partitions {
                        self.seal_partition(partition);
                        self.reconcile_pause(partition);
                    }
                }
                let partitions: Vec<i32> = self.partitions.keys().copied().collect();
                for partition in partitions {
                    self.flush_waiting(partition);
                }
                let busy = self
                    .partitions
                    .values()
                    .any(|owned| !owned.waiting.is_empty() || owned.in_flight > 0);
                if !busy || self.abandon.is_triggered() {
                    return Some(Ok(()));
                }
                None
            }
            OnShutdown::DrainTopic => self.drain_step(),
        }
    }

    /// Draining at shutdown: learns the topic's end offsets (once), seals the batches that reached them, and
    /// says whether everything up to them is committed, or, past the deadline, what is not.
    fn drain_step(&mut self) -> Option<std::result::Result<(), String>> {
        if self.drain_to.is_none() {
            match self.broker.end_offsets() {
                Ok(ends) => {
                    tracing::info!(?ends, "draining partitions up to these end offsets");
                    self.drain_to = Some(ends);
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the topic's end offsets failed; retrying");
                    if self.abandon.is_triggered() {
                        return Some(Err(format!(
                            "the end offsets of the topic could not be read: {error}"
                        )));
                    }
                    return None;
                }
            }
        }
        let ends = self.drain_to.clone()?;
        for (partition, end) in &ends {
            let reached = self
                .partitions
                .get(partition)
                .is_some_and(|owned| owned.open.end_offset >= *end);
            if reached {
                self.seal_partition(*partition);
            }
        }
        let missing: Vec<String> = ends
            .iter()
            .filter(|(_, end)| **end > 0)
            .filter_map(|(partition, end)| {
                match self.partitions.get(partition).map(|o| o.head.end_offset) {
                    Some(committed) if committed >= *end => None,
                    Some(committed) => Some(format!(
                        "partition {partition}: offsets {committed}..{end} not committed"
                    )),
                    None => Some(format!(
                        "partition {partition}: not assigned to this archiver (end offset {end})"
                    )),
                }
            })
            .collect();
        if missing.is_empty() {
            tracing::info!("every partition is archived up to the topic's end");
            return Some(Ok(()));
        }
        if self.abandon.is_triggered() {
            return Some(Err(missing.join("; ")));
        }
        None
    }
}

/// The pause of a partition after its `failures`-th consecutive failure.
fn partition_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_PARTITION_BACKOFF * 2u32.pow(doublings)).min(MAX_PARTITION_BACKOFF)
}

#[cfg(test)]
#[path = "poller_tests.rs"]
mod tests;
