//! Manifests: what a committed batch records (its Kafka offsets, files, rejected records and offset gaps), the
//! upload intent written before its files, and the chain head. How manifests are committed and chains
//! verified is [`super::chain`].

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::file::{EncodedFile, sha256_hex};
use crate::keys::DataKey;
use chatvault_core::error::{Error, Result};

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
    /// A **rewrite commit** (retention, erasure): the files of earlier manifests of this chain that this
    /// manifest's `files` replace. A rewrite covers no new offsets (`start_offset == end_offset`). The chain's
    /// files are every manifest's files minus every superseded one ([`LiveFiles`]); a superseded file must be
    /// a live file of the chain when the rewrite commits, with the SHA-256 it was committed with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<Superseded>,
}

/// A file a rewrite commit replaces: where it was committed, and what it was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Superseded {
    /// The sequence number of the manifest (of the same chain) that committed it.
    pub seq: u64,
    pub path: String,
    pub sha256: String,
    /// Why, naming the document that ordered it (for example `disposition/<plan>.json`).
    pub reason: String,
}

impl Manifest {
    pub fn is_rewrite(&self) -> bool {
        !self.supersedes.is_empty()
    }
}

/// A chain's live files as its manifests are read in order: each manifest adds its files and removes what it
/// supersedes. A rewrite that names a file the chain does not hold live (unknown, already superseded, or with
/// another SHA-256) is an error: the chain was altered or its writer is broken.
#[derive(Debug, Default, Clone)]
pub struct LiveFiles {
    /// Path → (seq of the committing manifest, SHA-256, tenant).
    live: std::collections::HashMap<String, (u64, String, String)>,
}

impl LiveFiles {
    /// Applies `manifest` (the chain's next); returns what it supersedes, as (path, tenant).
    pub fn apply(&mut self, manifest: &Manifest) -> Result<Vec<(String, String)>> {
        for superseded in &manifest.supersedes {
            match self.live.get(&superseded.path) {
                Some((seq, sha256, _))
                    if *seq == superseded.seq && *sha256 == superseded.sha256 => {}
                Some((seq, sha256, _)) => {
                    return Err(Error::internal(format!(
                        "rewrite manifest {} supersedes {} of manifest {} (SHA-256 {}), but the chain committed \
                         it in manifest {seq} with SHA-256 {sha256}",
                        manifest.seq, superseded.path, superseded.seq, superseded.sha256
                    )));
                }
                None => {
                    return Err(Error::internal(format!(
                        "rewrite manifest {} supersedes {}, which is not a live file of the chain",
                        manifest.seq, superseded.path
                    )));
                }
            }
        }
        let mut removed = Vec::with_capacity(manifest.supersedes.len());
        for superseded in &manifest.supersedes {
            if let Some((_, _, tenant)) = self.live.remove(&superseded.path) {
                removed.push((superseded.path.clone(), tenant));
            }
        }
        for file in &manifest.files {
            self.live.insert(
                file.path.clone(),
                (manifest.seq, file.sha256.clone(), file.tenant_id.clone()),
            );
        }
        Ok(removed)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.live.contains_key(path)
    }
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
    /// The key scope within the tenant (empty: the default scope; absent in older manifests).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_scope: String,
    pub dek_id: String,
    pub rows: u64,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file's bytes (the encrypted file as stored).
    pub sha256: String,
    pub min_occurred_micros: i64,
    pub max_occurred_micros: i64,
    /// Sorted conversation digests (see `archive::file::conversation_digest`).
    pub conversation_digests: Vec<String>,
    /// Per conversation digest (same order), the hex RFC 9162 root of the event leaves of the conversation's
    /// rows in the file, in file order (`archive::tlog::evidence`); absent in older manifests and for files
    /// that are not chat events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conversation_roots: Vec<String>,
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
            key_scope: key.scope.clone(),
            dek_id: key.dek_id.clone(),
            rows: encoded.rows as u64,
            bytes: encoded.bytes.len() as u64,
            sha256: encoded.sha256_hex.clone(),
            min_occurred_micros: encoded.min_occurred_micros,
            max_occurred_micros: encoded.max_occurred_micros,
            conversation_digests: encoded.conversation_digests.clone(),
            conversation_roots: encoded.conversation_roots.clone(),
        }
    }
}

impl ManifestFile {
    /// The manifest entry of a plaintext file chatvault writes itself (log bundles and checkpoints, drill
    /// reports): no tenant, no data key, dated `at_micros`.
    pub fn plaintext(path: &Path, bytes: &[u8], rows: u64, at_micros: i64) -> ManifestFile {
        ManifestFile {
            path: path.to_string(),
            tenant_id: String::new(),
            date: chatvault_core::time::Date::from_micros(at_micros).iso(),
            key_period: String::new(),
            key_scope: String::new(),
            dek_id: String::new(),
            rows,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            min_occurred_micros: at_micros,
            max_occurred_micros: at_micros,
            conversation_digests: Vec::new(),
            conversation_roots: Vec::new(),
        }
    }
}

/// A record of the covered range that can never be archived, with why. Its bytes are in the dead-letter topic
/// (`dead_letter`), where an operator can inspect them and, once the cause is fixed (for example the tenant's
/// key added), produce them to the topic again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RejectedRecord {
    pub offset: i64,
    pub reason: String,
    /// Where the record's key and value were produced (absent in manifests written before dead-lettering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
}

/// A record's copy in the dead-letter topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
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

impl Default for ChainHead {
    fn default() -> Self {
        ChainHead::empty()
    }
}

impl ChainHead {
    pub fn empty() -> ChainHead {
        ChainHead {
            next_seq: 0,
            end_offset: 0,
            last_sha256: String::new(),
        }
    }

    /// The head after `manifest` (whose stored bytes hash to `sha256`) was committed on top of this one.
    pub fn after(&self, manifest: &Manifest, sha256: String) -> ChainHead {
        ChainHead {
            next_seq: manifest.seq + 1,
            end_offset: manifest.end_offset,
            last_sha256: sha256,
        }
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

    fn file(path: &str, sha256: &str) -> ManifestFile {
        ManifestFile {
            tenant_id: "acme".into(),
            sha256: sha256.into(),
            ..ManifestFile::plaintext(&Path::from(path), b"", 1, 0)
        }
    }

    fn manifest(seq: u64, files: Vec<ManifestFile>, supersedes: Vec<Superseded>) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: "t".into(),
            partition: 0,
            seq,
            start_offset: 0,
            end_offset: 0,
            batch_id: format!("b{seq}"),
            writer_id: "w".into(),
            created_at_micros: 0,
            prev_sha256: String::new(),
            files,
            rejected_records: Vec::new(),
            offset_gaps: Vec::new(),
            supersedes,
        }
    }

    fn superseded(seq: u64, path: &str, sha256: &str) -> Superseded {
        Superseded {
            seq,
            path: path.into(),
            sha256: sha256.into(),
            reason: "test".into(),
        }
    }

    #[test]
    fn rewrites_replace_live_files_and_nothing_else() {
        let mut live = LiveFiles::default();
        live.apply(&manifest(0, vec![file("a", "1"), file("b", "2")], vec![]))
            .unwrap();
        let removed = live
            .apply(&manifest(
                1,
                vec![file("a2", "3")],
                vec![superseded(0, "a", "1")],
            ))
            .unwrap();
        assert_eq!(removed, vec![("a".to_string(), "acme".to_string())]);
        assert!(!live.contains("a") && live.contains("a2") && live.contains("b"));
        // Superseding twice, an unknown file, the wrong manifest or the wrong bytes: all refused, and a
        // refused rewrite changes nothing.
        for bad in [
            superseded(0, "a", "1"),
            superseded(0, "zzz", "1"),
            superseded(1, "b", "2"),
            superseded(0, "b", "9"),
        ] {
            let error = live
                .apply(&manifest(2, vec![file("c", "4")], vec![bad.clone()]))
                .unwrap_err();
            assert!(error.message().contains("supersedes"), "{bad:?}: {error}");
            assert!(live.contains("b") && !live.contains("c"));
        }
    }
}
