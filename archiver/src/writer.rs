//! The commit stage: turns a sealed batch into committed, encrypted Parquet files.
//!
//! Per batch: fetch (or create) the data keys of its (tenant, month)s; encode one file per (tenant, date) on the
//! blocking pool; record an upload intent; upload; create the manifest conditionally; store the Kafka offset.
//! Transient storage failures are retried with backoff; a lost conditional create (another writer committed
//! the sequence number) fences this batch and the partition is re-synchronized. A batch given up for any
//! reason goes through [`ChainWriter::abandon`], which deletes its files only when another batch provably holds
//! its sequence number (an unanswered create may have landed).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::batch::{Rejected, SealedBatch, group_into_files};
use crate::consumer::ArchiverConsumer;
use crate::crash::crash_point;
use crate::dead_letter::DeadLetterProducer;
use crate::state::SharedPartitions;

const UPLOAD_CONCURRENCY: usize = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Counters of committed work, readable while the archiver runs (tests and benchmarks wait on them).
#[derive(Debug, Default)]
pub struct ArchiverStats {
    pub committed_batches: AtomicU64,
    pub committed_events: AtomicU64,
    pub committed_records: AtomicU64,
    pub committed_files: AtomicU64,
    pub committed_bytes: AtomicU64,
    pub fenced_batches: AtomicU64,
    /// Partitions halted because Kafka's offsets fell behind the archive.
    pub halted_partitions: AtomicU64,
    /// When the first record was consumed (microseconds since the epoch; 0 before), so throughput can be
    /// measured without the consumer-group join.
    pub first_record_micros: std::sync::atomic::AtomicI64,
    /// The end offset of every partition's chain as this archiver committed it.
    pub heads: CommittedHeads,
}

/// The committed chain head (end offset) of each partition this archiver committed to, and a way to wait until
/// an offset is archived. Standalone acknowledges an event to its sender only once it is archived, since its
/// Kafka dies with the process (see `cli/src/roles.rs`).
#[derive(Debug, Default)]
pub struct CommittedHeads {
    ends: std::sync::Mutex<HashMap<i32, i64>>,
    changed: tokio::sync::Notify,
}

impl CommittedHeads {
    /// Records that `partition` is committed up to `end_offset` (exclusive); heads never move back.
    pub fn advance(&self, partition: i32, end_offset: i64) {
        {
            let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
            let end = ends.entry(partition).or_insert(end_offset);
            *end = (*end).max(end_offset);
        }
        self.changed.notify_waiters();
    }

    /// Whether `offset` of `partition` is committed.
    pub fn is_archived(&self, partition: i32, offset: i64) -> bool {
        let ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        ends.get(&partition).is_some_and(|end| *end > offset)
    }

    /// Waits until `offset` of `partition` is committed; false when `timeout` passed first.
    pub async fn wait_archived(&self, partition: i32, offset: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so an advance between the check and the wait is not missed.
            changed.as_mut().enable();
            if self.is_archived(partition, offset) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.is_archived(partition, offset);
            }
        }
    }
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

pub(crate) struct Writer {
    pub store: Arc<dyn ObjectStore>,
    pub chain: ChainWriter,
    pub data_keys: DataKeys,
    pub partitions: SharedPartitions,
    pub consumer: Arc<ArchiverConsumer>,
    pub topic: String,
    pub writer_id: String,
    pub file_options: FileOptions,
    pub dead_letters: DeadLetterProducer,
    pub stats: Arc<ArchiverStats>,
    /// Fires at the shutdown deadline: retries stop and batches not committed yet are abandoned.
    pub abandon: Shutdown,
}

enum Outcome {
    Committed(String),
    Fenced,
}

impl Writer {
    pub async fn run(self, mut batches: mpsc::Receiver<SealedBatch>) {
        while let Some(batch) = batches.recv().await {
            let span = batch_span(&batch);
            self.commit_batch(batch).instrument(span).await;
        }
    }

    fn is_current(&self, batch: &SealedBatch) -> bool {
        self.partitions.generation(batch.partition) == Some(batch.generation)
    }

    async fn commit_batch(&self, batch: SealedBatch) {
        if !self.is_current(&batch) {
            tracing::debug!(
                partition = batch.partition,
                seq = batch.seq,
                "dropping a batch of a revoked or resynchronized partition"
            );
            return;
        }
        let batch = Arc::new(batch);
        let mut backoff = Duration::from_millis(100);
        let mut prepared: Option<Prepared> = None;
        loop {
            if self.abandon.is_triggered() {
                // Uploaded files of an uncommitted batch are orphans the next owner removes.
                tracing::warn!(
                    partition = batch.partition,
                    seq = batch.seq,
                    start_offset = batch.start_offset,
                    end_offset = batch.end_offset,
                    events = batch.events.len(),
                    "abandoning an uncommitted batch at the shutdown deadline; its records are still in Kafka"
                );
                return;
            }
            if !self.is_current(&batch) {
                if let Some(prepared) = &prepared {
                    self.give_up(&batch, &prepared.batch_id, &prepared.files)
                        .await;
                }
                return;
            }
            if prepared.is_none() {
                let encode_span =
                    tracing::info_span!("archive.encode", events = batch.events.len());
                match self.prepare(&batch).instrument(encode_span).await {
                    Ok(files) => prepared = Some(files),
                    Err(error) => {
                        tracing::warn!(partition = batch.partition, seq = batch.seq, %error, "preparing batch failed; retrying");
                        if self.backoff(&mut backoff).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let Some(ready) = prepared.as_mut() else {
                continue;
            };
            let committed = self.upload_and_commit(&batch, ready).await;
            let (batch_id, files) = (&ready.batch_id, &ready.files);
            match committed {
                Ok(Outcome::Committed(sha)) => {
                    self.after_commit(&batch, sha.clone(), files).await;
                    let _ = self.chain.delete_intent(batch.partition, batch_id).await;
                    // Orphans of writers that lost earlier sequence numbers (crashed after upload, or fenced
                    // zombies) become provably dead once a later sequence number is committed: remove them now
                    // rather than at the next assignment.
                    let head = ChainHead {
                        next_seq: batch.seq + 1,
                        end_offset: batch.end_offset,
                        last_sha256: sha,
                    };
                    if let Err(error) = self.chain.clean_orphans(batch.partition, &head).await {
                        tracing::debug!(%error, "orphan cleanup failed; retried after the next commit");
                    }
                    return;
                }
                Ok(Outcome::Fenced) => {
                    self.give_up(&batch, batch_id, files).await;
                    self.resync(batch.partition).await;
                    return;
                }
                Err(error) => {
                    tracing::warn!(partition = batch.partition, seq = batch.seq, %error, "committing batch failed; retrying");
                    if self.backoff(&mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps before a retry. Returns true when the shutdown deadline passed: the batch is abandoned
    /// uncommitted, so its records are consumed again by the partition's next owner. Before the deadline a
    /// shutdown keeps retrying: sealed batches are committed if storage comes back in time.
    async fn backoff(&self, backoff: &mut Duration) -> bool {
        let sleep = tokio::time::sleep(*backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = sleep => false,
            _ = self.abandon.clone().wait() => true,
        }
    }

    /// Fetches data keys and encodes the batch's files (CPU-bound, on the blocking pool). The events of a
    /// (tenant, month) whose data key can never be had here (no key-encryption key, and the key provider
    /// refuses to create one) become rejected records for the dead-letter topic; any other key failure is
    /// transient and fails the whole preparation, to be retried.
    async fn prepare(&self, batch: &Arc<SealedBatch>) -> Result<Prepared> {
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

    async fn upload_and_commit(
        &self,
        batch: &SealedBatch,
        prepared: &mut Prepared,
    ) -> Result<Outcome> {
        // Before anything else: a rejected record is committed only with its dead-letter copy.
        self.dead_letter(batch, prepared).await?;
        let (batch_id, files) = (prepared.batch_id.as_str(), &prepared.files);
        let prev_sha256 = {
            let partitions = self.partitions.lock();
            let Some(state) = partitions.get(&batch.partition) else {
                return Ok(Outcome::Fenced);
            };
            if state.head.next_seq != batch.seq || state.head.end_offset != batch.start_offset {
                tracing::warn!(
                    partition = batch.partition,
                    seq = batch.seq,
                    head_seq = state.head.next_seq,
                    "batch does not continue the chain head; resynchronizing"
                );
                return Ok(Outcome::Fenced);
            }
            state.head.last_sha256.clone()
        };
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
            prev_sha256,
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
        match committed {
            Ok(Commit::Committed { sha256 }) => Ok(Outcome::Committed(sha256)),
            Ok(Commit::Lost { winner_writer_id }) => {
                tracing::warn!(partition = batch.partition, seq = batch.seq, winner = %winner_writer_id,
                    "another writer committed this sequence number first; this batch is fenced");
                metrics()
                    .commit_failures
                    .add(1, &[KeyValue::new("reason", "fenced")]);
                Ok(Outcome::Fenced)
            }
            Err(error) => {
                // The outcome is open (the create may have landed unanswered): the retry resolves it.
                metrics()
                    .commit_failures
                    .add(1, &[KeyValue::new("reason", "manifest")]);
                Err(error)
            }
        }
    }

    async fn after_commit(&self, batch: &SealedBatch, sha: String, files: &[PreparedFile]) {
        let still_owned = {
            let mut partitions = self.partitions.lock();
            match partitions.get_mut(&batch.partition) {
                Some(state) if state.generation == batch.generation => {
                    state.head.next_seq = batch.seq + 1;
                    state.head.end_offset = batch.end_offset;
                    state.head.last_sha256 = sha;
                    true
                }
                _ => false,
            }
        };
        self.stats.heads.advance(batch.partition, batch.end_offset);
        self.stats.committed_batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .committed_events
            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        self.stats.committed_records.fetch_add(
            (batch.end_offset - batch.start_offset) as u64,
            Ordering::Relaxed,
        );
        self.stats
            .committed_files
            .fetch_add(files.len() as u64, Ordering::Relaxed);
        self.stats.committed_bytes.fetch_add(
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
        if still_owned {
            // A hint only: the manifest chain is the source of truth on the next assignment.
            let mut offsets = TopicPartitionList::new();
            if offsets
                .add_partition_offset(
                    &self.topic,
                    batch.partition,
                    Offset::Offset(batch.end_offset),
                )
                .is_ok()
                && let Err(error) = self.consumer.commit(&offsets, CommitMode::Async)
            {
                tracing::debug!(%error, "storing the Kafka offset hint failed");
            }
        }
    }

    /// Gives up a batch this writer will not commit (fenced, or its partition revoked or resynchronized). Its
    /// files go only if another batch provably holds the sequence number; if an unanswered create of this
    /// batch landed after all, the batch is counted as committed.
    async fn give_up(&self, batch: &SealedBatch, batch_id: &str, files: &[PreparedFile]) {
        let paths: Vec<Path> = files.iter().map(|file| file.path.clone()).collect();
        match self
            .chain
            .abandon(batch.partition, batch.seq, batch_id, &paths)
            .await
        {
            Abandoned::Deleted => {
                self.stats.fenced_batches.fetch_add(1, Ordering::Relaxed);
            }
            Abandoned::LeftForCleanup => {
                self.stats.fenced_batches.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    partition = batch.partition,
                    seq = batch.seq,
                    "a given-up batch's files stay until its sequence number is committed by another batch"
                );
            }
            Abandoned::WasCommitted { sha256 } => {
                tracing::info!(
                    partition = batch.partition,
                    seq = batch.seq,
                    "a batch given up had committed after all (its create was unanswered); keeping it"
                );
                self.after_commit(batch, sha256, files).await;
            }
        }
    }

    /// Re-reads the chain head after losing a commit race and tells the poll thread to seek there.
    async fn resync(&self, partition: i32) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.chain.reader().head(partition).await {
                Ok(head) => {
                    let mut partitions = self.partitions.lock();
                    if let Some(state) = partitions.get_mut(&partition) {
                        state.generation = crate::consumer::next_generation();
                        state.head = head.clone();
                        state.resync_to = Some(head);
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "reading the chain head failed; retrying");
                    if self.backoff(&mut backoff).await {
                        return;
                    }
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_an_offset_ends_when_a_commit_covers_it() {
        let heads = Arc::new(CommittedHeads::default());
        assert!(!heads.wait_archived(0, 5, Duration::from_millis(20)).await);
        let waiter = {
            let heads = heads.clone();
            tokio::spawn(async move { heads.wait_archived(0, 5, Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        heads.advance(0, 5); // covers offsets below 5 only
        heads.advance(1, 100); // another partition
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        heads.advance(0, 6);
        assert!(waiter.await.expect("waiter"));
        heads.advance(0, 3); // never moves back
        assert!(heads.is_archived(0, 5));
    }
}
