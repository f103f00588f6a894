//! The commit stage: the batch's manifest, created conditionally so that exactly one batch holds each
//! sequence number of the partition's chain; then the bookkeeping of a committed batch.

use std::sync::atomic::Ordering;
use std::time::Instant;

use chatvault_archive::chain::Commit;
use chatvault_archive::manifest::{ChainHead, MANIFEST_FORMAT, Manifest, RejectedRecord};
use chatvault_core::error::Result;
use chatvault_core::metrics::{KeyValue, metrics};
use chatvault_core::object_lock::ObjectLock;
use chatvault_core::time::now_micros;
use tracing::Instrument;

use chatvault_archive::kind::RecordKind;

use crate::batch::SealedBatch;
use crate::crash::crash_point;
use crate::encode::Prepared;
use crate::lane::CommitStages;

impl<K: RecordKind> CommitStages<K> {
    /// The commit stage: the manifest's conditional create, continuing the chain at `head`. `Err` leaves the
    /// outcome open (an unanswered create may have landed): a retry resolves it (the create then finds its own
    /// manifest), and so does giving the batch up.
    pub(crate) async fn commit_manifest(
        &self,
        batch: &SealedBatch<K>,
        head: &ChainHead,
        prepared: &Prepared,
    ) -> Result<Commit> {
        let (batch_id, files) = (prepared.batch_id.as_str(), &prepared.files);
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
            supersedes: Vec::new(),
        };
        let commit_span = tracing::info_span!(
            "archive.commit",
            otel.kind = "client",
            partition = batch.partition,
            seq = batch.seq,
        );
        let commit_started = Instant::now();
        // The link naming a file lives as long as the file (governance::locks).
        let lock = files
            .iter()
            .fold(ObjectLock::default(), |lock, file| lock.union(file.lock));
        let committed = self
            .chain
            .commit_locked(&manifest, lock)
            .instrument(commit_span)
            .await;
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
    pub(crate) async fn after_commit(
        &self,
        batch: &SealedBatch<K>,
        prepared: &Prepared,
        head: &ChainHead,
    ) {
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
        metrics.events_archived.add(
            batch.events.len() as u64,
            &[KeyValue::new("topic", self.topic.clone())],
        );
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
}
