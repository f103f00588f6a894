//! The manifest chain: how the archiver commits files exactly once.
//!
//! Each Kafka partition has its own chain of manifests, `manifests/topic=<t>/partition=<p>/<seq>.json`. Manifest
//! `seq` covers the Kafka offsets `[start_offset, end_offset)` of that partition and names the files holding
//! their events; the chain is contiguous (`start_offset` of `seq + 1` is `end_offset` of `seq`) and each
//! manifest carries the SHA-256 of its predecessor's bytes, so removing, altering or reordering a manifest
//! breaks the chain visibly.
//!
//! **Commit protocol** (one writer per partition at a time, enforced by storage, not by Kafka):
//! 1. the writer knows the chain head (`next_seq`, `end_offset`), read from storage when it was assigned the
//!    partition; Kafka's committed offset is only a hint;
//! 2. it records an intent (`pending/<batch id>.json`) naming the files it is about to upload;
//! 3. it uploads the files;
//! 4. it creates manifest `next_seq` with a **conditional create** (`PutMode::Create`). Exactly one writer can
//!    create a given sequence number. A writer that loses (a zombie that lost its partition, or a worker racing
//!    a rebalance) gets [`ErrorCode::Conflict`], deletes its files and re-reads the head;
//! 5. only then does the writer store the Kafka offset `end_offset` (a hint for the next consumer).
//!
//! A crash between 3 and 4 leaves orphan files named by an intent; the partition's next owner deletes the files
//! of every intent whose sequence number was committed by another batch ([`ManifestLog::clean_orphans`]). An
//! intent whose sequence number is not yet committed may still belong to a live writer and is left alone.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::file::{EncodedFile, sha256_hex};
use super::layout;
use crate::error::{Error, ErrorCode, Result};
use crate::keys::DataKey;

pub const MANIFEST_FORMAT: &str = "chatvault-manifest-v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always `chatvault-manifest-v1`.
    pub format: String,
    pub topic: String,
    pub partition: i32,
    pub seq: u64,
    /// First Kafka offset covered (inclusive).
    pub start_offset: i64,
    /// Offset after the last one covered (exclusive): where the next manifest starts.
    pub end_offset: i64,
    pub batch_id: String,
    pub writer_id: String,
    pub created_at_micros: i64,
    /// Lower-case hex SHA-256 of the bytes of manifest `seq - 1`; empty for `seq` 0.
    pub prev_sha256: String,
    pub files: Vec<ManifestFile>,
    /// Records of the covered range that are not chat events (undecodable), kept visible rather than dropped.
    #[serde(default)]
    pub rejected_records: Vec<RejectedRecord>,
    /// Offsets of the range that Kafka did not deliver: records deleted by retention before they were archived
    /// (data loss, made visible here), compacted away, or transaction markers (gaps of one).
    #[serde(default)]
    pub offset_gaps: Vec<OffsetGap>,
}

/// Offsets `[from, to)` of a partition that no record was delivered for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OffsetGap {
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFile {
    /// Object path relative to the archive root.
    pub path: String,
    pub tenant_id: String,
    /// `yyyy-mm-dd`, the `date=` partition.
    pub date: String,
    /// `yyyy-mm`: the data key period.
    pub key_period: String,
    pub dek_id: String,
    pub rows: u64,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file's bytes (the encrypted file as stored).
    pub sha256: String,
    pub min_occurred_micros: i64,
    pub max_occurred_micros: i64,
    /// Sorted conversation digests (see `archive::file::conversation_digest`).
    pub conversation_digests: Vec<String>,
}

impl ManifestFile {
    /// The manifest entry of `encoded`, stored at `path`, holding `tenant`'s events of `date` (`yyyy-mm-dd`)
    /// under `key`.
    pub fn describe(
        path: &Path,
        tenant: &str,
        date: &str,
        key: &DataKey,
        encoded: &EncodedFile,
    ) -> ManifestFile {
        ManifestFile {
            path: path.to_string(),
            tenant_id: tenant.to_string(),
            date: date.to_string(),
            key_period: key.period.clone(),
            dek_id: key.dek_id.clone(),
            rows: encoded.rows as u64,
            bytes: encoded.bytes.len() as u64,
            sha256: encoded.sha256_hex.clone(),
            min_occurred_micros: encoded.min_occurred_micros,
            max_occurred_micros: encoded.max_occurred_micros,
            conversation_digests: encoded.conversation_digests.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RejectedRecord {
    pub offset: i64,
    pub reason: String,
}

/// An upload intent: the files a writer is about to upload for sequence number `seq`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingIntent {
    pub batch_id: String,
    pub seq: u64,
    pub writer_id: String,
    pub files: Vec<String>,
    pub created_at_micros: i64,
}

/// Where a partition's chain stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The sequence number the next commit must create.
    pub next_seq: u64,
    /// The next Kafka offset to archive: every offset below it is committed.
    pub end_offset: i64,
    /// SHA-256 of the last manifest's bytes (empty when the chain is empty).
    pub last_sha256: String,
}

impl ChainHead {
    pub fn empty() -> ChainHead {
        ChainHead {
            next_seq: 0,
            end_offset: 0,
            last_sha256: String::new(),
        }
    }
}

/// Reads and appends manifest chains of one topic.
#[derive(Debug, Clone)]
pub struct ManifestLog {
    store: Arc<dyn ObjectStore>,
    topic: String,
}

impl ManifestLog {
    pub fn new(store: Arc<dyn ObjectStore>, topic: &str) -> ManifestLog {
        ManifestLog {
            store,
            topic: topic.to_string(),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Reads manifest `seq` of `partition` with the SHA-256 of its bytes.
    pub async fn read(&self, partition: i32, seq: u64) -> Result<(Manifest, String)> {
        let path = layout::manifest_path(&self.topic, partition, seq);
        let bytes = self.store.get(&path).await?.bytes().await?;
        parse_manifest(&path, &bytes)
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

    /// The head of `partition`'s chain, read from storage.
    pub async fn head(&self, partition: i32) -> Result<ChainHead> {
        let seqs = self.list_seqs(partition, None).await?;
        let Some(last) = seqs.last() else {
            return Ok(ChainHead::empty());
        };
        let (manifest, sha) = self.read(partition, *last).await?;
        Ok(ChainHead {
            next_seq: manifest.seq + 1,
            end_offset: manifest.end_offset,
            last_sha256: sha,
        })
    }

    /// Commits `manifest` with a conditional create. [`ErrorCode::Conflict`] when its sequence number is already
    /// committed (by this batch in an earlier attempt, or by another writer: check [`Self::read`]).
    pub async fn commit(&self, manifest: &Manifest) -> Result<String> {
        debug_assert_eq!(manifest.topic, self.topic);
        let path = layout::manifest_path(&self.topic, manifest.partition, manifest.seq);
        let bytes = Bytes::from(serde_json::to_vec_pretty(manifest)?);
        let sha = sha256_hex(&bytes);
        self.store
            .put_opts(
                &path,
                PutPayload::from(bytes),
                PutOptions::from(PutMode::Create),
            )
            .await
            .map_err(|error| match error {
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. } => Error::new(
                    ErrorCode::Conflict,
                    format!(
                        "manifest {} of partition {} is already committed",
                        manifest.seq, manifest.partition
                    ),
                ),
                other => Error::from(other).context(format!("committing {path}")),
            })?;
        Ok(sha)
    }

    pub async fn write_intent(&self, partition: i32, intent: &PendingIntent) -> Result<()> {
        let path = layout::pending_path(&self.topic, partition, &intent.batch_id);
        self.store
            .put(&path, PutPayload::from(serde_json::to_vec(intent)?))
            .await?;
        Ok(())
    }

    pub async fn delete_intent(&self, partition: i32, batch_id: &str) -> Result<()> {
        let path = layout::pending_path(&self.topic, partition, batch_id);
        delete_if_exists(self.store.as_ref(), &path).await
    }

    /// Deletes the files of intents that can never commit: those whose sequence number (below
    /// `head.next_seq`) was committed by another batch. Intents of batches that did commit are removed too.
    /// Returns how many orphan files were deleted.
    pub async fn clean_orphans(&self, partition: i32, head: &ChainHead) -> Result<usize> {
        let prefix = layout::pending_prefix(&self.topic, partition);
        let intents: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut deleted = 0;
        for meta in intents {
            let bytes = match self.store.get(&meta.location).await {
                Ok(result) => result.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            let intent: PendingIntent = match serde_json::from_slice(&bytes) {
                Ok(intent) => intent,
                Err(_) => {
                    tracing::warn!(path = %meta.location, "removing unreadable upload intent");
                    delete_if_exists(self.store.as_ref(), &meta.location).await?;
                    continue;
                }
            };
            if intent.seq >= head.next_seq {
                continue;
            }
            let (manifest, _) = self.read(partition, intent.seq).await?;
            if manifest.batch_id != intent.batch_id {
                let committed: HashSet<&str> =
                    manifest.files.iter().map(|f| f.path.as_str()).collect();
                for file in &intent.files {
                    if !committed.contains(file.as_str()) {
                        delete_if_exists(self.store.as_ref(), &Path::from(file.as_str())).await?;
                        deleted += 1;
                    }
                }
                tracing::info!(partition, seq = intent.seq, batch_id = %intent.batch_id, files = intent.files.len(),
                    "removed orphan files of a batch that lost its commit");
            }
            delete_if_exists(self.store.as_ref(), &meta.location).await?;
        }
        Ok(deleted)
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
}

/// Parses manifest bytes, checking the format; returns it with the SHA-256 of the bytes.
pub fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<(Manifest, String)> {
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|error| Error::internal(format!("manifest {path} is corrupt: {error}")))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(Error::internal(format!(
            "manifest {path} has unknown format {}",
            manifest.format
        )));
    }
    Ok((manifest, sha256_hex(bytes)))
}

pub async fn delete_if_exists(store: &dyn ObjectStore, path: &Path) -> Result<()> {
    match store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn manifest(seq: u64, start: i64, end: i64, batch: &str, files: &[&str]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: "t".into(),
            partition: 2,
            seq,
            start_offset: start,
            end_offset: end,
            batch_id: batch.into(),
            writer_id: "w".into(),
            created_at_micros: 1,
            prev_sha256: String::new(),
            files: files
                .iter()
                .map(|path| ManifestFile {
                    path: path.to_string(),
                    tenant_id: "acme".into(),
                    date: "2026-11-25".into(),
                    key_period: "2026-11".into(),
                    dek_id: "k".into(),
                    rows: 1,
                    bytes: 1,
                    sha256: String::new(),
                    min_occurred_micros: 0,
                    max_occurred_micros: 0,
                    conversation_digests: vec![],
                })
                .collect(),
            rejected_records: vec![],
            offset_gaps: vec![],
        }
    }

    #[tokio::test]
    async fn only_one_writer_commits_a_sequence_number_and_the_loser_is_cleaned_up() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let log = ManifestLog::new(store.clone(), "t");
        assert_eq!(log.head(2).await.expect("head"), ChainHead::empty());
        log.commit(&manifest(0, 0, 10, "a", &["events/a"]))
            .await
            .expect("commit 0");
        // The loser had recorded its intent and uploaded its file.
        store
            .put(&Path::from("events/b"), PutPayload::from_static(b"x"))
            .await
            .expect("put");
        log.write_intent(
            2,
            &PendingIntent {
                batch_id: "b".into(),
                seq: 1,
                writer_id: "zombie".into(),
                files: vec!["events/b".into()],
                created_at_micros: 1,
            },
        )
        .await
        .expect("intent");
        log.commit(&manifest(1, 10, 20, "c", &["events/c"]))
            .await
            .expect("commit 1");
        let conflict = log
            .commit(&manifest(1, 10, 15, "b", &["events/b"]))
            .await
            .expect_err("fenced");
        assert_eq!(conflict.code(), ErrorCode::Conflict);
        let head = log.head(2).await.expect("head");
        assert_eq!((head.next_seq, head.end_offset), (2, 20));
        assert_eq!(log.clean_orphans(2, &head).await.expect("clean"), 1);
        assert!(store.head(&Path::from("events/b")).await.is_err());
        assert_eq!(log.list_seqs(2, Some(0)).await.expect("list"), vec![1]);
        assert_eq!(log.partitions().await.expect("partitions"), vec![2]);
    }
}
