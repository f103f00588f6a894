//! The commit stages: a sealed batch becomes committed, encrypted Parquet files.
//!
//! Each partition this worker owns has a *commit lane*: a task that takes the partition's sealed batches in
//! order and runs them through the stages — **encode** (data keys of the batch's (tenant, month)s, one file per
//! (tenant, date) on the blocking pool), **upload** (dead-letter copies of rejected records, an upload intent,
//! the files), **commit** (the manifest's conditional create through [`ChainWriter`]). Lanes of different
//! partitions run side by side, so a partition whose storage or keys fail does not hold up the others.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chatvault_core::archive::chain::{Abandoned, ChainWriter, Commit};
use chatvault_core::archive::file::{EncodedFile, FileOptions, encode_file};
use chatvault_core::archive::layout;
use chatvault_core::archive::manifest::{
    ChainHead, DeadLetter, MANIFEST_FORMAT, Manifest, ManifestFile, PendingIntent, RejectedRecord,
};
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::event::kafka_key;
use chatvault_core::keys::{DataKey, DataKeys};
use chatvault_core::metrics::{KeyValue, metrics};
use chatvault_core::shutdown::Shutdown;
use chatvault_core::telemetry::continue_batch_traces;
use chatvault_core::time::{Date, now_micros};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use prost::Message as _;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument;

use crate::batch::{Rejected, SealedBatch, group_into_files};
use crate::crash::crash_point;
use crate::dead_letter::DeadLetterSink;
use crate::stats::ArchiverStats;

/// Files of one batch uploaded at once.
pub const UPLOAD_CONCURRENCY: usize = 8;
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
pub struct CommitStages {
    pub store: Arc<dyn ObjectStore>,
    pub chain: ChainWriter,
    pub data_keys: DataKeys,
    pub topic: String,
    pub writer_id: String,
    pub file_options: FileOptions,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    pub stats: Arc<ArchiverStats>,
    /// Requested shutdown: from here on a batch is retried until the deadline instead of released.
    pub shutdown: Shutdown,
    /// The shutdown deadline: retries stop and batches not committed yet are abandoned.
    pub abandon: Shutdown,
}

/// A lane's task ended before it was given a batch.
#[derive(Debug)]
pub struct LaneGone;

/// The poll thread's end of a lane. Dropping it without [`Lane::cancel`] (the poll thread finishing at
/// shutdown) lets the task commit what it was given and then end.
pub struct Lane {
    batches: mpsc::UnboundedSender<(SealedBatch, OwnedSemaphorePermit)>,
    cancelled: Arc<AtomicBool>,
}

impl Lane {
    /// Queues a batch; its permit (a pending-batch slot) is released once the lane is done with it. Fails
    /// only when the lane's task is gone (the batch is then dropped: it is still in Kafka).
    pub fn send(
        &self,
        batch: SealedBatch,
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

impl CommitStages {
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
    ) -> Lane {
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
        mut batches: mpsc::UnboundedReceiver<(SealedBatch, OwnedSemaphorePermit)>,
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
        batch: SealedBatch,
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

    /// Fetches data keys and encodes the batch's files (CPU-bound, on the blocking pool). The events of a
    /// (tenant, month) whose data key can never be had here (no key-encryption key, and the key provider
    /// refuses to create one) become rejected records for the dead-letter topic; any other key failure is
    /// transient and fails the whole stage, to be retried.
    async fn encode(&self, batch: &Arc<SealedBatch>) -> Result<Prepared> {
        let mut keys: HashMap<(String, String), DataKey> = HashMap::new();
        let mut refused: HashMap<(String, String), String> = HashMap::new();
        for archived in &batch.events {
            let period = Date::from_micros(archived.event.occurred_at_micros).month_period();
            let id = (archived.event.tenant_id.clone(), period);
            if keys.contains_key(&id) || refused.contains_key(&id) {
                continue;
            }
            match self.data_keys.get_or_create(&id.0, &id.1).await {
                Ok(key) => {
                    keys.insert(id, key);
                }
                Err(error) if is_permanent_key_failure(&error) => {
                    tracing::error!(partition = batch.partition, tenant = %id.0, period = %id.1, %error,
                        "no data key can be had for this tenant's events: they go to the dead-letter topic");
                    refused.insert(id, error.message().to_string());
                }
                Err(error) => return Err(error),
            }
        }
        let mut rejected = batch.rejected.clone();
        for archived in &batch.events {
            let event = &archived.event;
            let period = Date::from_micros(event.occurred_at_micros).month_period();
            if let Some(reason) = refused.get(&(event.tenant_id.clone(), period)) {
                rejected.push(Rejected {
                    offset: archived.kafka_offset,
                    reason: reason.clone(),
                    key: Some(kafka_key(&event.tenant_id, &event.conversation_id)),
                    value: event.encode_to_vec(),
                });
            }
        }
        rejected.sort_by_key(|record| record.offset);
        let batch_id = random_id()?;
        let encode_batch = batch.clone();
        let options = self.file_options.clone();
        let encode_batch_id = batch_id.clone();
        let files = tokio::task::spawn_blocking(move || -> Result<Vec<PreparedFile>> {
            let mut prepared = Vec::new();
            let groups = group_into_files(&encode_batch.events)
                .into_iter()
                .filter(|group| {
                    keys.contains_key(&(group.tenant_id.to_string(), group.date.month_period()))
                });
            for (index, mut group) in groups.enumerate() {
                let period = group.date.month_period();
                let key = keys
                    .get(&(group.tenant_id.to_string(), period.clone()))
                    .ok_or_else(|| Error::internal("data key missing for a file group"))?;
                let encoded: EncodedFile = encode_file(&mut group.rows, key, &options)?;
                let path = layout::event_file_path(
                    group.tenant_id,
                    &group.date.iso(),
                    encode_batch.partition,
                    encode_batch.start_offset,
                    &encode_batch_id,
                    index,
                );
                prepared.push(PreparedFile {
                    manifest_entry: ManifestFile::describe(
                        &path,
                        group.tenant_id,
                        &group.date.iso(),
                        key,
                        &encoded,
                    ),
                    path,
                    bytes: encoded.bytes,
                });
            }
            Ok(prepared)
        })
        .await
        .map_err(|error| Error::internal(format!("encoding task failed: {error}")))??;
        Ok(Prepared {
            batch_id,
            files,
            rejected,
            dead_letters: None,
        })
    }

    /// Produces the batch's rejected records to the dead-letter topic (once; kept across commit retries).
    async fn dead_letter(&self, batch: &SealedBatch, prepared: &mut Prepared) -> Result<()> {
        if prepared.dead_letters.is_some() {
            return Ok(());
        }
        let mut copies = Vec::with_capacity(prepared.rejected.len());
        for record in &prepared.rejected {
            copies.push(
                self.dead_letters
                    .produce(&self.topic, batch.partition, record)
                    .await?,
            );
        }
        if !copies.is_empty() {
            tracing::warn!(
                partition = batch.partition,
                records = copies.len(),
                "records that can never be archived were produced to the dead-letter topic"
            );
        }
        prepared.dead_letters = Some(copies);
        Ok(())
    }

    /// The upload and commit stages. `Err` leaves the outcome open (an unanswered create may have landed):
    /// a retry resolves it (the create then finds its own manifest), and so does giving the batch up.
    async fn upload_and_commit(
        &self,
        batch: &SealedBatch,
        head: &ChainHead,
        prepared: &mut Prepared,
    ) -> Result<Commit> {
        // Before anything else: a rejected record is committed only with its dead-letter copy.
        self.dead_letter(batch, prepared).await?;
        let (batch_id, files) = (prepared.batch_id.as_str(), &prepared.files);
        self.chain
            .write_intent(
                batch.partition,
                &PendingIntent {
                    batch_id: batch_id.to_string(),
                    seq: batch.seq,
                    writer_id: self.writer_id.clone(),
                    files: files.iter().map(|f| f.path.to_string()).collect(),
                    created_at_micros: now_micros(),
                },
            )
            .await?;
        let to_upload: Vec<(Path, bytes::Bytes)> = files
            .iter()
            .map(|file| (file.path.clone(), file.bytes.clone()))
            .collect();
        let store = self.store.clone();
        let upload_span = tracing::info_span!(
            "archive.upload",
            otel.kind = "client",
            files = files.len(),
            bytes = files.iter().map(|file| file.bytes.len()).sum::<usize>(),
            otel.status_code = tracing::field::Empty,
        );
        let upload_started = Instant::now();
        let uploads = futures::stream::iter(to_upload.into_iter().map(move |(path, bytes)| {
            let store = store.clone();
            async move {
                store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(|error| Error::from(error).context(format!("uploading {path}")))
            }
        }))
        .buffer_unordered(UPLOAD_CONCURRENCY)
        .collect::<Vec<_>>()
        .instrument(upload_span.clone())
        .await;
        if let Some(Err(error)) = uploads.into_iter().find(|upload| upload.is_err()) {
            upload_span.record("otel.status_code", "ERROR");
            metrics()
                .commit_failures
                .add(1, &[KeyValue::new("reason", "upload")]);
            return Err(error);
        }
        metrics()
            .upload_duration
            .record(upload_started.elapsed().as_secs_f64(), &[]);
        crash_point("after_upload");
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: self.topic.clone(),
            partition: batch.partition,
            seq: batch.seq,
            start_offset: batch.start_offset,
            end_offset: batch.end_offset,
            batch_id: batch_id.to_string(),
            writer_id: self.writer_id.clone(),
            created_at_micros: now_micros(),
            prev_sha256: head.last_sha256.clone(),
            files: files.iter().map(|f| f.manifest_entry.clone()).collect(),
            rejected_records: prepared
                .rejected
                .iter()
                .zip(prepared.dead_letters.iter().flatten())
                .map(|(record, copy)| RejectedRecord {
                    offset: record.offset,
                    reason: record.reason.clone(),
                    dead_letter: Some(copy.clone()),
                })
                .collect(),
            offset_gaps: batch.offset_gaps.clone(),
        };
        let commit_span = tracing::info_span!(
            "archive.commit",
            otel.kind = "client",
            partition = batch.partition,
            seq = batch.seq,
        );
        let commit_started = Instant::now();
        let committed = self.chain.commit(&manifest).instrument(commit_span).await;
        metrics()
            .commit_duration
            .record(commit_started.elapsed().as_secs_f64(), &[]);
        if committed.is_err() {
            metrics()
                .commit_failures
                .add(1, &[KeyValue::new("reason", "manifest")]);
        }
        committed
    }

    /// Counts a committed batch, publishes its head, and tidies up: its intent, and the orphans of writers
    /// that lost earlier sequence numbers (they become provably dead once a later one is committed).
    async fn after_commit(&self, batch: &SealedBatch, prepared: &Prepared, head: &ChainHead) {
        let files = &prepared.files;
        let stats = &self.stats;
        stats.heads.advance(batch.partition, batch.end_offset);
        stats.committed_batches.fetch_add(1, Ordering::Relaxed);
        stats
            .committed_events
            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        stats.committed_records.fetch_add(
            (batch.end_offset - batch.start_offset) as u64,
            Ordering::Relaxed,
        );
        stats
            .committed_files
            .fetch_add(files.len() as u64, Ordering::Relaxed);
        stats.committed_bytes.fetch_add(
            files.iter().map(|f| f.bytes.len() as u64).sum(),
            Ordering::Relaxed,
        );
        let metrics = metrics();
        metrics.events_archived.add(batch.events.len() as u64, &[]);
        metrics
            .batch_events
            .record((batch.end_offset - batch.start_offset) as u64, &[]);
        for file in files {
            metrics.file_size.record(file.bytes.len() as u64, &[]);
        }
        tracing::debug!(
            partition = batch.partition,
            seq = batch.seq,
            events = batch.events.len(),
            files = files.len(),
            "batch committed"
        );
        crash_point("after_commit");
        let _ = self
            .chain
            .delete_intent(batch.partition, &prepared.batch_id)
            .await;
        if let Err(error) = self.chain.clean_orphans(batch.partition, head).await {
            tracing::debug!(%error, "orphan cleanup failed; retried after the next commit");
        }
    }

    /// Gives up a batch this lane will not commit. Its files go only if another batch provably holds the
    /// sequence number; if an unanswered create of this batch landed after all, it is committed and reported
    /// so (whatever `outcome` was meant).
    async fn give_up(
        &self,
        batch: &SealedBatch,
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

struct PreparedFile {
    path: Path,
    manifest_entry: ManifestFile,
    bytes: bytes::Bytes,
}

/// A batch ready to upload: its files, and the records it commits as rejected.
struct Prepared {
    batch_id: String,
    files: Vec<PreparedFile>,
    /// The batch's undecodable records plus the events of tenants that can never be archived here.
    rejected: Vec<Rejected>,
    /// Each rejected record's copy in the dead-letter topic, once produced (kept across commit retries).
    dead_letters: Option<Vec<DeadLetter>>,
}

/// The span of one batch's way to the archive (keys, encoding, upload, commit). It continues the trace of
/// the batch's first traced record and links to the others, so an event's trace reaches its archive file.
fn batch_span(batch: &SealedBatch) -> tracing::Span {
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

/// A key failure that retrying cannot fix: the key provider refuses this tenant (for example a read-only
/// keyring without its key-encryption key). Everything else (storage or the provider unreachable, a corrupt
/// key record) is retried: giving up on those would reject records that become archivable in a moment.
fn is_permanent_key_failure(error: &Error) -> bool {
    matches!(
        error.code(),
        ErrorCode::PermissionDenied | ErrorCode::InvalidArgument
    )
}

fn random_id() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::internal("system random generator failed"))?;
    Ok(hex::encode(bytes))
}
