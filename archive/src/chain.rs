//! The commit protocol, in one place: [`ChainWriter`] appends to a partition's manifest chain exactly once per
//! sequence number, [`ChainReader`] reads chains and verifies every link. The archiver commits through the
//! writer; the restorer, the test verifier and every later reader or rewriter read through the reader.
//!
//! Each Kafka partition has its own chain of manifests, `manifests/topic=<t>/partition=<p>/<seq>.json`.
//! Manifest `seq` covers the Kafka offsets `[start_offset, end_offset)` of that partition and names the files
//! holding their events; the chain is contiguous (`start_offset` of `seq + 1` is `end_offset` of `seq`) and
//! each manifest carries the SHA-256 of its predecessor's bytes, so removing, altering or reordering a
//! manifest breaks the chain visibly.
//!
//! **Commit** (one writer per partition at a time, enforced by storage, not by Kafka):
//! 1. the writer knows the chain head ([`ChainReader::head`], read when it was assigned the partition; Kafka's
//!    committed offset is only a hint);
//! 2. it records an intent ([`ChainWriter::write_intent`], `pending/<batch id>.json`) naming the files it is
//!    about to upload;
//! 3. it uploads the files;
//! 4. it creates manifest `next_seq` with a **conditional create** ([`ChainWriter::commit`]). Exactly one
//!    writer can create a given sequence number. A failed or unanswered create is resolved by reading the
//!    manifest back: this batch's id means it committed, another id means it lost ([`Commit::Lost`]: a zombie
//!    that lost its partition, or a worker racing a rebalance), no manifest means the outcome is still open
//!    and the same commit may be retried;
//! 5. only then does the writer store the Kafka offset `end_offset` (a hint for the next consumer).
//!
//! **Files are deleted only when their batch provably lost**: when the sequence number is committed under
//! another batch id ([`ChainWriter::abandon`], [`ChainWriter::clean_orphans`]). A writer that gives a batch up
//! for any other reason (revoked, shut down, storage unreachable) leaves its files and intent in place: an
//! unanswered create may still land, and then those files are the archive. A crash between 3 and 4 leaves
//! files named only by an intent; the partition's owner deletes them once the sequence number is committed by
//! another batch. An intent whose sequence number is not yet committed may still belong to a live writer and
//! is left alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::file::sha256_hex;
use super::layout;
use super::manifest::{
    ChainHead, LiveFiles, MANIFEST_FORMAT, Manifest, ManifestFile, PendingIntent, delete_if_exists,
    parse_manifest,
};
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::object_lock::ObjectLock;

/// The topics with manifest chains (`manifests/topic=<topic>/`), sorted; the log's own chain
/// ([`crate::tlog::LOG_TOPIC`]) included.
pub async fn topics(store: &dyn ObjectStore) -> Result<Vec<String>> {
    let listing = store
        .list_with_delimiter(Some(&Path::from(layout::MANIFESTS_ROOT)))
        .await
        .map_err(Error::from)?;
    let mut topics: Vec<String> = listing
        .common_prefixes
        .iter()
        .filter_map(|prefix| {
            prefix
                .filename()
                .and_then(|name| name.strip_prefix("topic="))
                .map(str::to_string)
        })
        .collect();
    topics.sort();
    Ok(topics)
}

/// Reads the manifest chains of one topic.
#[derive(Debug, Clone)]
pub struct ChainReader {
    store: Arc<dyn ObjectStore>,
    topic: String,
}

/// What [`ChainReader::read_after`] verified of one partition: the manifests that continue the chain, in
/// order, each with the head after it, and what stopped the reading, if anything did (a broken link, or a
/// manifest that could not be read). The verified prefix is good even when reading stopped.
#[derive(Debug)]
pub struct VerifiedManifests {
    pub manifests: Vec<(Manifest, ChainHead)>,
    pub error: Option<Error>,
}

/// What one partition's chain holds now ([`ChainReader::chain_files`]): its live files (committed and not
/// superseded by a rewrite), in chain order, with the manifest that committed each; what rewrites superseded;
/// the head the reading ended at; and what stopped the reading, if anything did (then everything here is of
/// the verified prefix).
#[derive(Debug, Default)]
pub struct ChainFiles {
    pub live: Vec<(u64, ManifestFile)>,
    /// Superseded path → (sequence number of the rewrite manifest, its reason).
    pub superseded: HashMap<String, (u64, String)>,
    pub head: ChainHead,
    pub error: Option<Error>,
}

impl ChainReader {
    pub fn new(store: Arc<dyn ObjectStore>, topic: &str) -> ChainReader {
        ChainReader {
            store,
            topic: topic.to_string(),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The partitions that have a chain.
    pub async fn partitions(&self) -> Result<Vec<i32>> {
        let root = layout::manifests_root(&self.topic);
        let listing = self.store.list_with_delimiter(Some(&root)).await?;
        let mut partitions: Vec<i32> = listing
            .common_prefixes
            .iter()
            .filter_map(layout::partition_of_manifest)
            .collect();
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Reads manifest `seq` of `partition` with the SHA-256 of its bytes, as stored: no link is checked.
    pub async fn read(&self, partition: i32, seq: u64) -> Result<(Manifest, String)> {
        let path = layout::manifest_path(&self.topic, partition, seq);
        let bytes = self.store.get(&path).await?.bytes().await?;
        parse_manifest(&path, &bytes)
    }

    /// Manifest `seq` of `partition` if it exists (`None` when it does not).
    pub async fn read_if_exists(
        &self,
        partition: i32,
        seq: u64,
    ) -> Result<Option<(Manifest, String)>> {
        match self.read(partition, seq).await {
            Ok(found) => Ok(Some(found)),
            Err(error) if error.code() == ErrorCode::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Lists the committed sequence numbers of `partition` greater than `after` (all when `None`), ascending.
    pub async fn list_seqs(&self, partition: i32, after: Option<u64>) -> Result<Vec<u64>> {
        let prefix = layout::partition_manifests_prefix(&self.topic, partition);
        let offset = after.map(|seq| layout::manifest_path(&self.topic, partition, seq));
        let listing: Vec<_> = match &offset {
            Some(offset) => {
                self.store
                    .list_with_offset(Some(&prefix), offset)
                    .try_collect()
                    .await?
            }
            None => self.store.list(Some(&prefix)).try_collect().await?,
        };
        let mut seqs: Vec<u64> = listing
            .iter()
            .filter(|meta| meta.location.parts().count() == prefix.parts().count() + 1)
            .filter_map(|meta| layout::manifest_seq(&meta.location))
            .filter(|seq| after.is_none_or(|after| *seq > after))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// The head of `partition`'s chain. The last manifest is checked against its predecessor (link and
    /// contiguity) and the sequence numbers against gaps, so a replaced or removed newest manifest is an
    /// error here rather than a silent new starting point. (Verifying the whole chain is
    /// [`Self::read_after`]'s job.)
    pub async fn head(&self, partition: i32) -> Result<ChainHead> {
        let seqs = self.list_seqs(partition, None).await?;
        let Some(&last) = seqs.last() else {
            return Ok(ChainHead::empty());
        };
        if last + 1 != seqs.len() as u64 {
            let missing = (0..=last).find(|seq| seqs.binary_search(seq).is_err());
            return Err(self.broken(
                partition,
                last,
                format!("manifest {} is missing", missing.unwrap_or_default()),
            ));
        }
        let before = match last.checked_sub(1) {
            None => ChainHead::empty(),
            Some(previous) => {
                let (manifest, sha256) = self.read(partition, previous).await?;
                ChainHead {
                    next_seq: previous + 1,
                    end_offset: manifest.end_offset,
                    last_sha256: sha256,
                }
            }
        };
        let (manifest, sha256) = self.read(partition, last).await?;
        self.verify_link(partition, last, &manifest, &before)?;
        Ok(before.after(&manifest, sha256))
    }

    /// Reads and verifies the manifests of `partition` that follow `from` (a head from an earlier read, or
    /// [`ChainHead::empty`] for the whole chain), in order, up to the first that cannot be read or does not
    /// continue the chain.
    pub async fn read_after(&self, partition: i32, from: &ChainHead) -> VerifiedManifests {
        let mut verified = VerifiedManifests {
            manifests: Vec::new(),
            error: None,
        };
        let after = from.next_seq.checked_sub(1);
        let seqs = match self.list_seqs(partition, after).await {
            Ok(seqs) => seqs,
            Err(error) => {
                verified.error = Some(error);
                return verified;
            }
        };
        let mut head = from.clone();
        for seq in seqs {
            let checked = self.read(partition, seq).await.and_then(|(manifest, sha)| {
                self.verify_link(partition, seq, &manifest, &head)?;
                Ok((manifest, sha))
            });
            match checked {
                Ok((manifest, sha256)) => {
                    head = head.after(&manifest, sha256);
                    verified.manifests.push((manifest, head.clone()));
                }
                Err(error) => {
                    verified.error = Some(error);
                    break;
                }
            }
        }
        verified
    }

    /// Reads and verifies `partition`'s whole chain and applies its rewrites (see [`ChainFiles`]). A rewrite
    /// that supersedes what the chain does not hold live stops the reading like a broken link.
    pub async fn chain_files(&self, partition: i32) -> ChainFiles {
        let verified = self.read_after(partition, &ChainHead::empty()).await;
        let mut files = ChainFiles {
            error: verified.error,
            ..ChainFiles::default()
        };
        let mut live = LiveFiles::default();
        for (manifest, head) in verified.manifests {
            if let Err(error) = live.apply(&manifest) {
                files.error =
                    Some(self.broken(partition, manifest.seq, error.message().to_string()));
                break;
            }
            if manifest.is_rewrite() {
                let superseded: HashSet<&str> = manifest
                    .supersedes
                    .iter()
                    .map(|s| s.path.as_str())
                    .collect();
                files
                    .live
                    .retain(|(_, file)| !superseded.contains(file.path.as_str()));
                for superseded in &manifest.supersedes {
                    files.superseded.insert(
                        superseded.path.clone(),
                        (manifest.seq, superseded.reason.clone()),
                    );
                }
            }
            let seq = manifest.seq;
            files
                .live
                .extend(manifest.files.into_iter().map(|file| (seq, file)));
            files.head = head;
        }
        files
    }

    fn broken(&self, partition: i32, seq: u64, why: String) -> Error {
        Error::new(
            ErrorCode::Internal,
            format!(
                "manifest chain of topic {} partition {partition} is broken at seq {seq}: {why} \
                 (the archive was altered; refusing to trust it)",
                self.topic
            ),
        )
    }

    /// Checks that `manifest`, stored as `seq` of `partition`, continues the chain at `previous`.
    fn verify_link(
        &self,
        partition: i32,
        seq: u64,
        manifest: &Manifest,
        previous: &ChainHead,
    ) -> Result<()> {
        let broken = |why: String| self.broken(partition, seq, why);
        if manifest.seq != seq || manifest.partition != partition || manifest.topic != self.topic {
            return Err(broken(format!(
                "the manifest stored there names topic {} partition {} seq {}",
                manifest.topic, manifest.partition, manifest.seq
            )));
        }
        if manifest.end_offset < manifest.start_offset {
            return Err(broken(format!(
                "it ends (offset {}) before it starts (offset {})",
                manifest.end_offset, manifest.start_offset
            )));
        }
        if manifest.is_rewrite() && manifest.end_offset != manifest.start_offset {
            return Err(broken(format!(
                "it is a rewrite but covers offsets {} to {} (a rewrite covers none)",
                manifest.start_offset, manifest.end_offset
            )));
        }
        if seq != previous.next_seq {
            return Err(broken(match previous.next_seq {
                0 => format!(
                    "the chain starts at seq {seq}: manifests 0 to {} are missing",
                    seq - 1
                ),
                next => format!("manifests {next} to {} are missing", seq - 1),
            }));
        }
        if manifest.prev_sha256 != previous.last_sha256 {
            return Err(broken(if seq == 0 {
                "the first manifest names a predecessor (prev_sha256 is not empty)".into()
            } else {
                format!(
                    "prev_sha256 {} differs from the SHA-256 {} of manifest {}",
                    manifest.prev_sha256,
                    previous.last_sha256,
                    seq - 1
                )
            }));
        }
        if manifest.start_offset != previous.end_offset {
            return Err(broken(format!(
                "it starts at offset {} but manifest {} ended at offset {}",
                manifest.start_offset,
                seq.saturating_sub(1),
                previous.end_offset
            )));
        }
        Ok(())
    }
}

/// How a [`ChainWriter::commit`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The manifest is committed (now, or by an earlier attempt of the same batch whose answer was lost);
    /// `sha256` is that of the stored bytes.
    Committed { sha256: String },
    /// Another batch holds the sequence number: this batch is fenced. Its files may be deleted
    /// ([`ChainWriter::abandon`]).
    Lost { winner_writer_id: String },
}

/// What [`ChainWriter::abandon`] did with a batch that will not be committed by this writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abandoned {
    /// Another batch holds the sequence number: the files and the intent were deleted.
    Deleted,
    /// The batch is committed after all (an unanswered create landed): nothing was deleted.
    WasCommitted { sha256: String },
    /// The sequence number is not committed yet (or storage could not tell): files and intent stay, for
    /// [`ChainWriter::clean_orphans`] to remove once another batch commits the sequence number.
    LeftForCleanup,
}

/// Appends to manifest chains: intents, conditional creates, read-back of ambiguous or conflicting creates,
/// and removal of files of batches that provably lost.
#[derive(Debug, Clone)]
pub struct ChainWriter {
    reader: ChainReader,
}

impl ChainWriter {
    pub fn new(store: Arc<dyn ObjectStore>, topic: &str) -> ChainWriter {
        ChainWriter {
            reader: ChainReader::new(store, topic),
        }
    }

    pub fn reader(&self) -> &ChainReader {
        &self.reader
    }

    fn store(&self) -> &dyn ObjectStore {
        self.reader.store.as_ref()
    }

    pub async fn write_intent(&self, partition: i32, intent: &PendingIntent) -> Result<()> {
        let path = layout::pending_path(&self.reader.topic, partition, &intent.batch_id);
        self.store()
            .put(&path, PutPayload::from(serde_json::to_vec(intent)?))
            .await?;
        Ok(())
    }

    pub async fn delete_intent(&self, partition: i32, batch_id: &str) -> Result<()> {
        let path = layout::pending_path(&self.reader.topic, partition, batch_id);
        delete_if_exists(self.store(), &path).await
    }

    /// Creates `manifest` if its sequence number is free. Any failure of the create is resolved by reading the
    /// manifest back ([`Commit`]); an error is returned only when that leaves the outcome open (no manifest
    /// there yet, or storage unreadable), and then the same batch may retry.
    pub async fn commit(&self, manifest: &Manifest) -> Result<Commit> {
        self.commit_locked(manifest, ObjectLock::default()).await
    }

    /// [`ChainWriter::commit`], the manifest written with an S3 Object Lock (`storage.object_lock`).
    pub async fn commit_locked(&self, manifest: &Manifest, lock: ObjectLock) -> Result<Commit> {
        debug_assert_eq!(manifest.topic, self.reader.topic);
        let path = layout::manifest_path(&self.reader.topic, manifest.partition, manifest.seq);
        let bytes = Bytes::from(serde_json::to_vec_pretty(manifest)?);
        let sha256 = sha256_hex(&bytes);
        let created = self
            .store()
            .put_opts(
                &path,
                PutPayload::from(bytes),
                lock.put_options(PutOptions::from(PutMode::Create)),
            )
            .await;
        let failure = match created {
            Ok(_) => return Ok(Commit::Committed { sha256 }),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => None,
            Err(other) => Some(Error::from(other).context(format!("committing {path}"))),
        };
        match self
            .reader
            .read_if_exists(manifest.partition, manifest.seq)
            .await
        {
            Ok(Some((existing, sha256))) if existing.batch_id == manifest.batch_id => {
                Ok(Commit::Committed { sha256 })
            }
            Ok(Some((existing, _))) => Ok(Commit::Lost {
                winner_writer_id: existing.writer_id,
            }),
            Ok(None) => Err(failure.unwrap_or_else(|| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("{path} was reported as existing but cannot be read; retrying"),
                )
            })),
            Err(read_error) => Err(failure.unwrap_or(read_error)),
        }
    }

    /// Commits `manifest` with the plaintext `files` it names, for the small streams chatvault writes itself
    /// (the transparency log, drill reports): the upload intent, the files, the conditional create. True when
    /// this batch holds the sequence number; false when another batch won it (this batch is then abandoned).
    pub async fn commit_with_files(
        &self,
        manifest: &Manifest,
        files: Vec<(Path, Bytes)>,
    ) -> Result<bool> {
        let unlocked = files
            .into_iter()
            .map(|(path, bytes)| (path, bytes, ObjectLock::default()))
            .collect();
        self.commit_with_locked_files(manifest, unlocked).await
    }

    /// [`ChainWriter::commit_with_files`], each file written with its S3 Object Lock and the manifest with
    /// their union (disposition's replacement files).
    pub async fn commit_with_locked_files(
        &self,
        manifest: &Manifest,
        files: Vec<(Path, Bytes, ObjectLock)>,
    ) -> Result<bool> {
        let manifest_lock = files
            .iter()
            .fold(ObjectLock::default(), |lock, (_, _, file)| {
                lock.union(*file)
            });
        let paths: Vec<Path> = files.iter().map(|(path, _, _)| path.clone()).collect();
        self.write_intent(
            manifest.partition,
            &PendingIntent {
                batch_id: manifest.batch_id.clone(),
                seq: manifest.seq,
                writer_id: manifest.writer_id.clone(),
                files: paths.iter().map(ToString::to_string).collect(),
                created_at_micros: manifest.created_at_micros,
            },
        )
        .await?;
        for (path, bytes, lock) in files {
            self.store()
                .put_opts(
                    &path,
                    PutPayload::from(bytes),
                    lock.put_options(PutOptions::default()),
                )
                .await?;
        }
        match self.commit_locked(manifest, manifest_lock).await? {
            Commit::Committed { .. } => {
                self.delete_intent(manifest.partition, &manifest.batch_id)
                    .await?;
                Ok(true)
            }
            Commit::Lost { winner_writer_id } => {
                tracing::info!(topic = %self.reader.topic, winner = %winner_writer_id, seq = manifest.seq, "another writer committed this sequence number first");
                match self
                    .abandon(manifest.partition, manifest.seq, &manifest.batch_id, &paths)
                    .await
                {
                    Abandoned::WasCommitted { .. } => Ok(true),
                    Abandoned::Deleted | Abandoned::LeftForCleanup => Ok(false),
                }
            }
        }
    }

    /// Appends one plaintext document as the next manifest of a small stream chatvault writes itself (drill
    /// reports, governance changes): manifest `head.next_seq` covers the one "offset" `next_seq` and names
    /// `<root>/<seq:020>-<batch id>.<extension>`. Returns the document's path, or `None` when another writer
    /// took the sequence number first (the caller reads the head again and decides whether its document
    /// still applies).
    pub async fn append_document(
        &self,
        partition: i32,
        head: &ChainHead,
        root: &str,
        extension: &str,
        writer_id: &str,
        bytes: Bytes,
    ) -> Result<Option<Path>> {
        let batch_id = chatvault_core::random_hex(8)?;
        let seq = head.next_seq;
        let path = Path::from(format!("{root}/{seq:020}-{batch_id}.{extension}"));
        let created = chatvault_core::time::now_micros();
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: self.reader.topic.clone(),
            partition,
            seq,
            start_offset: seq as i64,
            end_offset: seq as i64 + 1,
            batch_id,
            writer_id: writer_id.into(),
            created_at_micros: created,
            prev_sha256: head.last_sha256.clone(),
            files: vec![ManifestFile::plaintext(&path, &bytes, 1, created)],
            rejected_records: Vec::new(),
            offset_gaps: Vec::new(),
            supersedes: Vec::new(),
        };
        let committed = self
            .commit_with_files(&manifest, vec![(path.clone(), bytes)])
            .await?;
        Ok(committed.then_some(path))
    }

    /// Gives up batch `batch_id` of sequence number `seq` (revoked partition, lost commit, fenced): deletes
    /// `files` and the intent only if the sequence number is committed by another batch (see the module
    /// documentation); otherwise leaves them.
    pub async fn abandon(
        &self,
        partition: i32,
        seq: u64,
        batch_id: &str,
        files: &[Path],
    ) -> Abandoned {
        let existing = match self.reader.read_if_exists(partition, seq).await {
            Ok(Some((manifest, sha256))) => (manifest, sha256),
            Ok(None) => return Abandoned::LeftForCleanup,
            Err(error) => {
                tracing::warn!(partition, seq, %error, "could not check whether an abandoned batch committed; its files stay for orphan cleanup");
                return Abandoned::LeftForCleanup;
            }
        };
        let (manifest, sha256) = existing;
        if manifest.batch_id == batch_id {
            return Abandoned::WasCommitted { sha256 };
        }
        let committed: HashSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        for file in files {
            if committed.contains(file.as_ref()) {
                continue;
            }
            if let Err(error) = delete_if_exists(self.store(), file).await {
                tracing::warn!(path = %file, %error, "could not delete a fenced batch's file; orphan cleanup removes it later");
                return Abandoned::LeftForCleanup;
            }
        }
        let _ = self.delete_intent(partition, batch_id).await;
        Abandoned::Deleted
    }

    /// Deletes the files of intents that can never commit: those whose sequence number (below
    /// `head.next_seq`) was committed by another batch. Intents of batches that did commit are removed too.
    /// Returns how many orphan files were deleted.
    pub async fn clean_orphans(&self, partition: i32, head: &ChainHead) -> Result<usize> {
        let prefix = layout::pending_prefix(&self.reader.topic, partition);
        let intents: Vec<_> = self.store().list(Some(&prefix)).try_collect().await?;
        let mut deleted = 0;
        for meta in intents {
            let bytes = match self.store().get(&meta.location).await {
                Ok(result) => result.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            let intent: PendingIntent = match serde_json::from_slice(&bytes) {
                Ok(intent) => intent,
                Err(_) => {
                    tracing::warn!(path = %meta.location, "removing unreadable upload intent");
                    delete_if_exists(self.store(), &meta.location).await?;
                    continue;
                }
            };
            if intent.seq >= head.next_seq {
                continue;
            }
            let (manifest, _) = self.reader.read(partition, intent.seq).await?;
            if manifest.batch_id != intent.batch_id {
                let committed: HashSet<&str> =
                    manifest.files.iter().map(|f| f.path.as_str()).collect();
                for file in &intent.files {
                    if !committed.contains(file.as_str()) {
                        delete_if_exists(self.store(), &Path::from(file.as_str())).await?;
                        deleted += 1;
                    }
                }
                tracing::info!(partition, seq = intent.seq, batch_id = %intent.batch_id, files = intent.files.len(),
                    "removed orphan files of a batch that lost its commit");
            }
            delete_if_exists(self.store(), &meta.location).await?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutResult,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::manifest::{MANIFEST_FORMAT, ManifestFile};

    /// What the next storage call suffers.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        None,
        /// Fails without touching storage.
        FailBefore,
        /// Writes, then fails as if the response was lost (timeout, connection reset): the ambiguous case.
        LoseResponse,
        /// Fails at once, but the request is still in flight and lands a little later (after other calls):
        /// the ambiguous case at its worst, where a read-back right after the failure finds nothing.
        LandsLater,
    }

    /// An in-memory store whose puts and gets fail as planned, and which yields before every call so that
    /// concurrent writers interleave.
    #[derive(Debug)]
    struct FlakyStore {
        inner: Arc<InMemory>,
        plan: Mutex<std::collections::VecDeque<Fault>>,
        in_flight: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    }

    impl FlakyStore {
        fn new(plan: Vec<Fault>) -> Arc<FlakyStore> {
            Arc::new(FlakyStore {
                inner: Arc::new(InMemory::new()),
                plan: Mutex::new(plan.into()),
                in_flight: Mutex::new(Vec::new()),
            })
        }

        /// Lets every request still in flight land.
        async fn settle(&self) {
            let in_flight: Vec<_> = self
                .in_flight
                .lock()
                .expect("in flight")
                .drain(..)
                .collect();
            for request in in_flight {
                request.await.expect("in-flight request");
            }
        }

        fn next_fault(&self) -> Fault {
            self.plan
                .lock()
                .expect("plan")
                .pop_front()
                .unwrap_or(Fault::None)
        }

        fn heal(&self) {
            self.plan.lock().expect("plan").clear();
        }

        fn injected() -> object_store::Error {
            object_store::Error::Generic {
                store: "flaky",
                source: "injected failure".into(),
            }
        }
    }

    impl std::fmt::Display for FlakyStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FlakyStore")
        }
    }

    #[async_trait]
    impl ObjectStore for FlakyStore {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            tokio::task::yield_now().await;
            match self.next_fault() {
                Fault::None => self.inner.put_opts(location, payload, opts).await,
                Fault::FailBefore => Err(Self::injected()),
                Fault::LoseResponse => {
                    self.inner.put_opts(location, payload, opts).await?;
                    tokio::task::yield_now().await;
                    Err(Self::injected())
                }
                // Only manifest creates land late here: a late upload of a batch's file after the batch was
                // discarded would leave a file that no intent names (see the module's orphan rules).
                Fault::LandsLater if !matches!(opts.mode, PutMode::Create) => {
                    self.inner.put_opts(location, payload, opts).await?;
                    Err(Self::injected())
                }
                Fault::LandsLater => {
                    let (inner, location) = (self.inner.clone(), location.clone());
                    let request = tokio::spawn(async move {
                        for _ in 0..8 {
                            tokio::task::yield_now().await;
                        }
                        let _ = inner.put_opts(&location, payload, opts).await;
                    });
                    self.in_flight.lock().expect("in flight").push(request);
                    Err(Self::injected())
                }
            }
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            tokio::task::yield_now().await;
            match self.next_fault() {
                Fault::None | Fault::LoseResponse => self.inner.get_opts(location, options).await,
                Fault::FailBefore | Fault::LandsLater => Err(Self::injected()),
            }
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    const TOPIC: &str = "t";
    const PARTITION: i32 = 2;

    fn file_entry(path: &str) -> ManifestFile {
        ManifestFile {
            path: path.to_string(),
            tenant_id: "acme".into(),
            date: "2026-11-25".into(),
            key_period: "2026-11".into(),
            key_scope: String::new(),
            dek_id: "k".into(),
            rows: 1,
            bytes: 1,
            sha256: String::new(),
            min_occurred_micros: 0,
            max_occurred_micros: 0,
            conversation_digests: vec![],
            conversation_roots: Vec::new(),
        }
    }

    fn manifest(head: &ChainHead, records: i64, batch: &str, files: &[&str]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: TOPIC.into(),
            partition: PARTITION,
            seq: head.next_seq,
            start_offset: head.end_offset,
            end_offset: head.end_offset + records,
            batch_id: batch.into(),
            writer_id: format!("writer-of-{batch}"),
            created_at_micros: 1,
            prev_sha256: head.last_sha256.clone(),
            files: files.iter().map(|path| file_entry(path)).collect(),
            rejected_records: vec![],
            offset_gaps: vec![],
            supersedes: Vec::new(),
        }
    }

    fn intent(seq: u64, batch: &str, files: &[&str]) -> PendingIntent {
        PendingIntent {
            batch_id: batch.into(),
            seq,
            writer_id: format!("writer-of-{batch}"),
            files: files.iter().map(|f| f.to_string()).collect(),
            created_at_micros: 1,
        }
    }

    async fn exists(store: &dyn ObjectStore, path: &str) -> bool {
        store.head(&Path::from(path)).await.is_ok()
    }

    #[tokio::test]
    async fn only_one_writer_commits_a_sequence_number_and_the_loser_is_cleaned_up() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let chain = ChainWriter::new(store.clone(), TOPIC);
        let reader = chain.reader();
        assert_eq!(
            reader.head(PARTITION).await.expect("head"),
            ChainHead::empty()
        );
        let first = manifest(&ChainHead::empty(), 10, "a", &["events/a"]);
        let Commit::Committed { sha256 } = chain.commit(&first).await.expect("commit 0") else {
            panic!("seq 0 is free");
        };
        let head = ChainHead::empty().after(&first, sha256);
        // The loser had recorded its intent and uploaded its file.
        store
            .put(&Path::from("events/b"), PutPayload::from_static(b"x"))
            .await
            .expect("put");
        chain
            .write_intent(PARTITION, &intent(1, "b", &["events/b"]))
            .await
            .expect("intent");
        assert!(matches!(
            chain.commit(&manifest(&head, 10, "c", &["events/c"])).await,
            Ok(Commit::Committed { .. })
        ));
        assert_eq!(
            chain
                .commit(&manifest(&head, 5, "b", &["events/b"]))
                .await
                .expect("read back"),
            Commit::Lost {
                winner_writer_id: "writer-of-c".into()
            }
        );
        let head = reader.head(PARTITION).await.expect("head");
        assert_eq!((head.next_seq, head.end_offset), (2, 20));
        assert_eq!(
            chain.clean_orphans(PARTITION, &head).await.expect("clean"),
            1
        );
        assert!(!exists(store.as_ref(), "events/b").await);
        assert_eq!(
            reader.list_seqs(PARTITION, Some(0)).await.expect("list"),
            vec![1]
        );
        assert_eq!(
            reader.partitions().await.expect("partitions"),
            vec![PARTITION]
        );
    }

    /// The create lands but its answer is lost, and the partition is revoked before a retry: the batch is
    /// committed, and giving it up must not delete its files (issue: an ambiguous commit deleted committed
    /// files).
    #[tokio::test]
    async fn an_unanswered_create_is_resolved_by_reading_back_and_its_files_survive_abandon() {
        let store = FlakyStore::new(vec![
            Fault::None,         // the file upload
            Fault::LoseResponse, // the manifest create lands, its answer is lost
            Fault::FailBefore,   // and reading it back fails once too
        ]);
        let chain = ChainWriter::new(store.clone(), TOPIC);
        store
            .put(&Path::from("events/a"), PutPayload::from_static(b"x"))
            .await
            .expect("upload");
        let first = manifest(&ChainHead::empty(), 10, "a", &["events/a"]);
        let error = chain.commit(&first).await.expect_err("outcome open");
        assert!(error.message().contains("injected"), "{error}");
        // The writer gives the batch up (say, the partition was revoked meanwhile).
        let abandoned = chain
            .abandon(PARTITION, 0, "a", &[Path::from("events/a")])
            .await;
        assert!(
            matches!(abandoned, Abandoned::WasCommitted { .. }),
            "{abandoned:?}"
        );
        assert!(
            exists(store.as_ref(), "events/a").await,
            "a committed file was deleted"
        );
        // A retry of the same commit learns that it committed.
        assert!(matches!(
            chain.commit(&first).await,
            Ok(Commit::Committed { .. })
        ));
        let head = chain.reader().head(PARTITION).await.expect("head");
        assert_eq!((head.next_seq, head.end_offset), (1, 10));

        // A batch whose create never reached storage is not deleted either: nobody can tell yet.
        store
            .put(&Path::from("events/b"), PutPayload::from_static(b"x"))
            .await
            .expect("upload");
        assert_eq!(
            chain
                .abandon(PARTITION, 1, "b", &[Path::from("events/b")])
                .await,
            Abandoned::LeftForCleanup
        );
        assert!(exists(store.as_ref(), "events/b").await);
    }

    #[tokio::test]
    async fn head_checks_the_newest_link_and_gaps() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let chain = ChainWriter::new(store.clone(), TOPIC);
        let mut head = ChainHead::empty();
        for batch in ["a", "b", "c"] {
            let next = manifest(&head, 10, batch, &[]);
            let Ok(Commit::Committed { sha256 }) = chain.commit(&next).await else {
                panic!("commit");
            };
            head = head.after(&next, sha256);
        }
        assert_eq!(chain.reader().head(PARTITION).await.expect("head"), head);
        let verified = chain
            .reader()
            .read_after(PARTITION, &ChainHead::empty())
            .await;
        assert!(verified.error.is_none());
        assert_eq!(verified.manifests.last().map(|(_, h)| h), Some(&head));

        // The newest manifest replaced by one that does not link to its predecessor.
        let (mut newest, _) = chain.reader().read(PARTITION, 2).await.expect("read");
        newest.prev_sha256 = "00".repeat(32);
        newest.end_offset = 1_000;
        let path = layout::manifest_path(TOPIC, PARTITION, 2);
        store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec(&newest).expect("json")),
            )
            .await
            .expect("overwrite");
        let error = chain.reader().head(PARTITION).await.expect_err("broken");
        assert!(error.message().contains("broken at seq 2"), "{error}");

        // A manifest removed from the middle.
        store
            .delete(&layout::manifest_path(TOPIC, PARTITION, 1))
            .await
            .expect("delete");
        let error = chain.reader().head(PARTITION).await.expect_err("gap");
        assert!(error.message().contains("manifest 1 is missing"), "{error}");
    }

    /// What one simulated archiver believes it committed.
    #[derive(Debug, Default)]
    struct WriterLog {
        committed: Vec<(u64, String)>,
    }

    /// A writer the way the archiver writes: read the head, record an intent, upload, commit, retry an
    /// unanswered create a few times, and give the batch up (revoked) when storage keeps failing.
    async fn simulated_writer(chain: ChainWriter, name: String, batches: usize) -> WriterLog {
        let mut log = WriterLog::default();
        for n in 0..batches {
            let Ok(head) = chain.reader().head(PARTITION).await else {
                continue;
            };
            let batch_id = format!("{name}-{n}");
            let files = [
                format!("events/{batch_id}-0.parquet"),
                format!("events/{batch_id}-1.parquet"),
            ];
            let file_refs: Vec<&str> = files.iter().map(String::as_str).collect();
            let paths: Vec<Path> = files.iter().map(|f| Path::from(f.as_str())).collect();
            if chain
                .write_intent(PARTITION, &intent(head.next_seq, &batch_id, &file_refs))
                .await
                .is_err()
            {
                continue;
            }
            let mut uploaded = true;
            for path in &paths {
                uploaded &= chain
                    .reader()
                    .store()
                    .put(path, PutPayload::from_static(b"parquet"))
                    .await
                    .is_ok();
            }
            if !uploaded {
                chain
                    .abandon(PARTITION, head.next_seq, &batch_id, &paths)
                    .await;
                continue;
            }
            let next = manifest(&head, 1 + n as i64, &batch_id, &file_refs);
            let mut outcome = None;
            for _attempt in 0..=(n % 3) {
                match chain.commit(&next).await {
                    Ok(commit) => {
                        outcome = Some(commit);
                        break;
                    }
                    Err(_) => continue,
                }
            }
            match outcome {
                Some(Commit::Committed { .. }) => log.committed.push((head.next_seq, batch_id)),
                Some(Commit::Lost { .. }) | None => {
                    if let Abandoned::WasCommitted { .. } = chain
                        .abandon(PARTITION, head.next_seq, &batch_id, &paths)
                        .await
                    {
                        log.committed.push((head.next_seq, batch_id));
                    }
                }
            }
        }
        log
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            6 => Just(Fault::None),
            1 => Just(Fault::FailBefore),
            1 => Just(Fault::LoseResponse),
            1 => Just(Fault::LandsLater),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Concurrent writers over storage that fails and loses answers: every sequence number is committed
        /// once, the chain verifies, no committed file is ever deleted, a writer that believes it committed
        /// seq n really holds n, and what orphan cleanup leaves belongs only to uncommitted sequence numbers.
        #[test]
        fn concurrent_writers_over_flaky_storage_commit_each_sequence_number_once(
            plan in proptest::collection::vec(fault(), 0..160),
            writers in 2usize..5,
            batches in 1usize..8,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let store = FlakyStore::new(plan);
                let chain = ChainWriter::new(store.clone(), TOPIC);
                let tasks: Vec<_> = (0..writers)
                    .map(|w| tokio::spawn(simulated_writer(chain.clone(), format!("w{w}"), batches)))
                    .collect();
                let mut beliefs = Vec::new();
                for task in tasks {
                    beliefs.extend(task.await.expect("writer").committed);
                }
                store.heal();
                store.settle().await;

                let reader = chain.reader();
                let verified = reader.read_after(PARTITION, &ChainHead::empty()).await;
                prop_assert!(verified.error.is_none(), "{:?}", verified.error);
                let head = reader.head(PARTITION).await.expect("head");
                prop_assert_eq!(head.next_seq as usize, verified.manifests.len());
                for (seq, batch_id) in &beliefs {
                    let (manifest, _) = reader.read(PARTITION, *seq).await.expect("believed committed");
                    prop_assert_eq!(&manifest.batch_id, batch_id);
                }
                // (A writer may not learn of a commit that landed while every read-back failed: the chain,
                // not the writer, is the truth, and the next head read finds it.)
                let mut named = HashSet::new();
                for (manifest, _) in &verified.manifests {
                    for file in &manifest.files {
                        prop_assert!(exists(store.as_ref(), &file.path).await, "committed file {} deleted", file.path);
                        named.insert(file.path.clone());
                    }
                }
                chain.clean_orphans(PARTITION, &head).await.expect("clean");
                let left: Vec<String> = store
                    .list(Some(&Path::from("events")))
                    .map_ok(|meta| meta.location.to_string())
                    .try_collect()
                    .await
                    .expect("list");
                for path in left.iter().filter(|path| !named.contains(*path)) {
                    // Only batches that tried the sequence number after the head may keep files.
                    let batch = path.trim_start_matches("events/").rsplit_once('-').map(|(b, _)| b.to_string());
                    let pending = layout::pending_path(TOPIC, PARTITION, batch.as_deref().unwrap_or(""));
                    let bytes = store.get(&pending).await.expect("an orphan has its intent").bytes().await.expect("read");
                    let intent: PendingIntent = serde_json::from_slice(&bytes).expect("intent");
                    prop_assert!(intent.seq >= head.next_seq, "orphan {} of seq {} survived cleanup", path, intent.seq);
                }
                Ok(())
            })?;
        }
    }
}
