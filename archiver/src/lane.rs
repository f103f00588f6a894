//! Commit lanes: how a sealed batch becomes committed, encrypted Parquet files.
//!
//! Each partition this worker owns has a *lane*: a task that takes the partition's sealed batches in order and
//! runs them through the stages — [`crate::encode`] (data keys of the batch's (tenant, month)s, one file per
//! (tenant, date) on the blocking pool), [`crate::upload`] (dead-letter copies of rejected records, an upload
//! intent, the files), [`crate::commit`] (the manifest's conditional create through [`ChainWriter`]). Within a
//! partition the stages run one batch at a time, because a manifest names its predecessor's hash; lanes of
//! different partitions run side by side, so a partition whose storage or keys fail does not hold up the
//! others.
//!
//! A lane knows its partition's chain head and only commits a batch that continues it. It reports each batch's
//! [`BatchOutcome`] to the poll thread, which owns every other piece of partition state. A transient failure is
//! retried a few times ([`QUICK_ATTEMPTS`]); after that the batch is *released*: given up (its records are still
//! in Kafka) so the poll thread can back the partition off and consume it again from its chain head, instead
//! of holding memory and a pending-batch slot while storage is down. During shutdown, retries go on until the
//! shutdown deadline, since nothing would consume the batch again.
//!
//! Giving a batch up always goes through [`ChainWriter::abandon`], which deletes its files only when another
//! batch provably holds its sequence number, and reports a batch whose unanswered create landed after all as
//! committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chatvault_archive::chain::{Abandoned, ChainWriter, Commit};
use chatvault_archive::file::FileOptions;
use chatvault_archive::governance::locks::LockRulesSource;
use chatvault_archive::keys::DataKeys;
use chatvault_archive::manifest::ChainHead;
use chatvault_core::error::Result;
use chatvault_core::metrics::{KeyValue, metrics};
use chatvault_core::shutdown::Shutdown;
use chatvault_core::telemetry::continue_batch_traces;
use object_store::ObjectStore;
use object_store::path::Path;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument;

use chatvault_archive::kind::{ChatEvents, RecordKind};

use crate::batch::SealedBatch;
use crate::dead_letter::DeadLetterSink;
use crate::encode::Prepared;
use crate::stats::ArchiverStats;

/// Attempts at a batch (encode, or upload and commit) before it is released back to Kafka, outside shutdown.
pub const QUICK_ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What became of a batch handed to a lane. Every batch sent to a lane gets exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Its manifest is committed; the chain continues at `head`.
    Committed { head: ChainHead },
    /// Another writer holds its sequence number (or it no longer continued the chain): the partition must
    /// re-read its head.
    Fenced,
    /// Given up after repeated transient failures; its records are still in Kafka. `error` is the last one.
    Released { error: String },
    /// Not attempted or given up because its lane was cancelled (partition revoked or re-synchronized).
    Dropped,
    /// Given up at the shutdown deadline.
    Abandoned,
}

/// A lane's report about one batch, for the poll thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneReport {
    pub partition: i32,
    pub generation: u64,
    pub seq: u64,
    pub outcome: BatchOutcome,
}

/// Everything the stages need, shared by every lane of the worker.
pub struct CommitStages<K: RecordKind = ChatEvents> {
    pub store: Arc<dyn ObjectStore>,
    pub chain: ChainWriter,
    pub data_keys: DataKeys,
    pub topic: String,
    pub writer_id: String,
    pub file_options: FileOptions,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// Files of one batch uploaded at once (`archiver.upload_concurrency`).
    pub upload_concurrency: usize,
    pub stats: Arc<ArchiverStats>,
    /// Requested shutdown: from here on a batch is retried until the deadline instead of released.
    pub shutdown: Shutdown,
    /// The shutdown deadline: retries stop and batches not committed yet are abandoned.
    pub abandon: Shutdown,
    /// With `storage.object_lock` on: the governance state each file's and manifest's lock comes from.
    pub locks: Option<Arc<LockRulesSource>>,
    pub kind: std::marker::PhantomData<K>,
}

/// A lane's task ended before it was given a batch.
#[derive(Debug)]
pub struct LaneGone;

/// The poll thread's end of a lane. Dropping it without [`Lane::cancel`] (the poll thread finishing at
/// shutdown) lets the task commit what it was given and then end.
pub struct Lane<K: RecordKind = ChatEvents> {
    batches: mpsc::UnboundedSender<(SealedBatch<K>, OwnedSemaphorePermit)>,
    cancelled: Arc<AtomicBool>,
}

impl<K: RecordKind> Lane<K> {
    /// Queues a batch; its permit (a pending-batch slot) is released once the lane is done with it. Fails
    /// only when the lane's task is gone (the batch is then dropped: it is still in Kafka).
    pub fn send(
        &self,
        batch: SealedBatch<K>,
        permit: OwnedSemaphorePermit,
    ) -> std::result::Result<(), LaneGone> {
        self.batches.send((batch, permit)).map_err(|_| LaneGone)
    }

    /// Stops the lane: the batch in flight is given up at its next step, queued batches are dropped (each
    /// still reported), and the task ends.
    pub fn cancel(self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

impl<K: RecordKind> CommitStages<K> {
    /// Starts the lane of `partition` for `generation`, continuing the chain at `head`. Each batch's report
    /// goes to `reports` (false: nobody listens any more, the lane ends); `alive` is held by the task until it
    /// ends (the role waits for every clone to drop).
    pub fn spawn_lane(
        self: &Arc<Self>,
        runtime: &Handle,
        partition: i32,
        generation: u64,
        head: ChainHead,
        reports: impl Fn(LaneReport) -> bool + Send + 'static,
        alive: mpsc::Sender<()>,
    ) -> Lane<K> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let stages = self.clone();
        let lane_cancelled = cancelled.clone();
        runtime.spawn(async move {
            stages
                .run_lane(
                    partition,
                    generation,
                    head,
                    receiver,
                    lane_cancelled,
                    reports,
                )
                .await;
            drop(alive);
        });
        Lane {
            batches: sender,
            cancelled,
        }
    }

    async fn run_lane(
        &self,
        partition: i32,
        generation: u64,
        mut head: ChainHead,
        mut batches: mpsc::UnboundedReceiver<(SealedBatch<K>, OwnedSemaphorePermit)>,
        cancelled: Arc<AtomicBool>,
        reports: impl Fn(LaneReport) -> bool,
    ) {
        // After a batch that did not commit, the queued ones no longer continue the chain.
        let mut broken = false;
        while let Some((batch, permit)) = batches.recv().await {
            let seq = batch.seq;
            let outcome = if broken || cancelled.load(Ordering::Acquire) {
                BatchOutcome::Dropped
            } else {
                let span = batch_span(&batch);
                self.archive(batch, &head, &cancelled)
                    .instrument(span)
                    .await
            };
            match &outcome {
                BatchOutcome::Committed { head: next } => head = next.clone(),
                _ => broken = true,
            }
            drop(permit);
            let report = LaneReport {
                partition,
                generation,
                seq,
                outcome,
            };
            if !reports(report) {
                return; // the poll thread is gone
            }
        }
    }

    /// Runs one batch through the stages. `head` is the chain as this lane last committed it.
    pub async fn archive(
        &self,
        batch: SealedBatch<K>,
        head: &ChainHead,
        cancelled: &AtomicBool,
    ) -> BatchOutcome {
        if head.next_seq != batch.seq || head.end_offset != batch.start_offset {
            tracing::warn!(
                partition = batch.partition,
                seq = batch.seq,
                head_seq = head.next_seq,
                "batch does not continue the chain head; re-synchronizing"
            );
            return BatchOutcome::Fenced;
        }
        let batch = Arc::new(batch);
        let mut attempts = 0;
        let mut backoff = FIRST_BACKOFF;
        let mut prepared: Option<Prepared> = None;
        loop {
            if cancelled.load(Ordering::Acquire) {
                return match &prepared {
                    Some(ready) => self.give_up(&batch, ready, BatchOutcome::Dropped).await,
                    None => BatchOutcome::Dropped,
                };
            }
            let failed = match prepared.as_mut() {
                None => {
                    let encode_span =
                        tracing::info_span!("archive.encode", events = batch.events.len());
                    match self.encode(&batch).instrument(encode_span).await {
                        Ok(ready) => {
                            prepared = Some(ready);
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(partition = batch.partition, seq = batch.seq, %error, "encoding the batch failed");
                            error
                        }
                    }
                }
                Some(ready) => match self.upload_and_commit(&batch, head, ready).await {
                    Ok(Commit::Committed { sha256 }) => {
                        let head = ChainHead {
                            next_seq: batch.seq + 1,
                            end_offset: batch.end_offset,
                            last_sha256: sha256,
                        };
                        self.after_commit(&batch, ready, &head).await;
                        return BatchOutcome::Committed { head };
                    }
                    Ok(Commit::Lost { winner_writer_id }) => {
                        tracing::warn!(partition = batch.partition, seq = batch.seq, winner = %winner_writer_id,
                            "another writer committed this sequence number first; this batch is fenced");
                        metrics()
                            .commit_failures
                            .add(1, &[KeyValue::new("reason", "fenced")]);
                        return self.give_up(&batch, ready, BatchOutcome::Fenced).await;
                    }
                    Err(error) => {
                        tracing::warn!(partition = batch.partition, seq = batch.seq, %error, "uploading or committing the batch failed");
                        error
                    }
                },
            };
            attempts += 1;
            match self.next_attempt(attempts, &mut backoff).await {
                NextAttempt::Retry => {}
                NextAttempt::Release => {
                    let released = BatchOutcome::Released {
                        error: failed.to_string(),
                    };
                    return match &prepared {
                        Some(ready) => self.give_up(&batch, ready, released).await,
                        None => released,
                    };
                }
                NextAttempt::Abandon => {
                    // Uploaded files of an uncommitted batch are orphans the partition's next owner removes.
                    tracing::warn!(
                        partition = batch.partition,
                        seq = batch.seq,
                        start_offset = batch.start_offset,
                        end_offset = batch.end_offset,
                        events = batch.events.len(),
                        "abandoning an uncommitted batch at the shutdown deadline; its records are still in Kafka"
                    );
                    return BatchOutcome::Abandoned;
                }
            }
        }
    }

    /// After a failed attempt: retry after a backoff, release the batch (outside shutdown, after
    /// [`QUICK_ATTEMPTS`]), or abandon it (the shutdown deadline passed).
    async fn next_attempt(&self, attempts: u32, backoff: &mut Duration) -> NextAttempt {
        if self.abandon.is_triggered() {
            return NextAttempt::Abandon;
        }
        if attempts >= QUICK_ATTEMPTS && !self.shutdown.is_triggered() {
            return NextAttempt::Release;
        }
        let sleep = tokio::time::sleep(*backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = sleep => NextAttempt::Retry,
            _ = self.abandon.clone().wait() => NextAttempt::Abandon,
        }
    }

    /// The upload stage, then the commit stage.
    async fn upload_and_commit(
        &self,
        batch: &SealedBatch<K>,
        head: &ChainHead,
        prepared: &mut Prepared,
    ) -> Result<Commit> {
        self.upload(batch, prepared).await?;
        self.commit_manifest(batch, head, prepared).await
    }

    /// Gives up a batch this lane will not commit. Its files go only if another batch provably holds the
    /// sequence number; if an unanswered create of this batch landed after all, it is committed and reported
    /// so (whatever `outcome` was meant).
    async fn give_up(
        &self,
        batch: &SealedBatch<K>,
        prepared: &Prepared,
        outcome: BatchOutcome,
    ) -> BatchOutcome {
        let paths: Vec<Path> = prepared
            .files
            .iter()
            .map(|file| file.path.clone())
            .collect();
        match self
            .chain
            .abandon(batch.partition, batch.seq, &prepared.batch_id, &paths)
            .await
        {
            Abandoned::WasCommitted { sha256 } => {
                tracing::info!(
                    partition = batch.partition,
                    seq = batch.seq,
                    "a batch given up had committed after all (its create was unanswered); keeping it"
                );
                let head = ChainHead {
                    next_seq: batch.seq + 1,
                    end_offset: batch.end_offset,
                    last_sha256: sha256,
                };
                self.after_commit(batch, prepared, &head).await;
                BatchOutcome::Committed { head }
            }
            Abandoned::Deleted | Abandoned::LeftForCleanup => {
                let counter = match outcome {
                    BatchOutcome::Released { .. } => &self.stats.released_batches,
                    _ => &self.stats.fenced_batches,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                outcome
            }
        }
    }
}

enum NextAttempt {
    Retry,
    Release,
    Abandon,
}

/// The span of one batch's way to the archive (keys, encoding, upload, commit). It continues the trace of
/// the batch's first traced record and links to the others, so an event's trace reaches its archive file.
fn batch_span<K: RecordKind>(batch: &SealedBatch<K>) -> tracing::Span {
    let span = tracing::info_span!(
        "archive.batch",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.partition.id = batch.partition,
        messaging.batch.message_count = batch.events.len() + batch.rejected.len(),
        seq = batch.seq,
        start_offset = batch.start_offset,
        end_offset = batch.end_offset,
    );
    continue_batch_traces(&span, &batch.traces);
    span
}
