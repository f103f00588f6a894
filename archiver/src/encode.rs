//! The encode stage: a sealed batch's records become encrypted Parquet files in memory, one per (key scope,
//! UTC date), each under the data key of its scope and month (a chat event's scope is its tenant; the audit
//! trail has one scope). Records of a scope that can never get a key here become rejected records instead
//! (they go to the dead-letter topic).

use std::collections::HashMap;
use std::sync::Arc;

use chatvault_archive::file::EncodedFile;
use chatvault_archive::keys::DataKey;
use chatvault_archive::kind::RecordKind;
use chatvault_archive::manifest::{DeadLetter, ManifestFile};
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::object_lock::ObjectLock;
use chatvault_core::time::Date;
use object_store::path::Path;
use prost::Message as _;

use crate::batch::{Rejected, SealedBatch, group_into_files};
use crate::lane::CommitStages;

impl<K: RecordKind> CommitStages<K> {
    /// Fetches data keys and encodes the batch's files (CPU-bound, on the blocking pool). The records of a
    /// (key scope, month) whose data key can never be had here (no key-encryption key, and the key provider
    /// refuses to create one) become rejected records for the dead-letter topic; any other key failure is
    /// transient and fails the whole stage, to be retried.
    pub(crate) async fn encode(&self, batch: &Arc<SealedBatch<K>>) -> Result<Prepared> {
        // (key owner, key scope, month) → its data key.
        let mut keys: HashMap<(String, String, String), DataKey> = HashMap::new();
        let mut refused: HashMap<(String, String, String), String> = HashMap::new();
        let scopes = self.data_keys.scopes();
        let key_id = |record: &K::Record| {
            (
                K::key_owner(record).to_string(),
                K::key_scope(record, scopes).to_string(),
                Date::from_micros(K::time_micros(record)).month_period(),
            )
        };
        for archived in &batch.events {
            let id = key_id(&archived.record);
            if keys.contains_key(&id) || refused.contains_key(&id) {
                continue;
            }
            match self.data_keys.get_or_create_in(&id.0, &id.1, &id.2).await {
                Ok(key) => {
                    keys.insert(id, key);
                }
                Err(error) if is_permanent_key_failure(&error) => {
                    tracing::error!(partition = batch.partition, key_owner = %id.0, key_scope = %id.1,
                        period = %id.2, %error,
                        "no data key can be had for these records: they go to the dead-letter topic");
                    refused.insert(id, error.message().to_string());
                }
                Err(error) => return Err(error),
            }
        }
        let mut rejected = batch.rejected.clone();
        // Most batches have no refused key: skip the per-record lookup (and its allocations) then.
        for archived in batch.events.iter().filter(|_| !refused.is_empty()) {
            let record = &archived.record;
            if let Some(reason) = refused.get(&key_id(record)) {
                rejected.push(Rejected {
                    offset: archived.kafka_offset,
                    reason: reason.clone(),
                    key: Some(K::kafka_key(record)),
                    value: record.encode_to_vec(),
                });
            }
        }
        rejected.sort_by_key(|record| record.offset);
        let rules = match &self.locks {
            Some(source) => Some(source.rules().await?),
            None => None,
        };
        let batch_id = chatvault_core::random_hex(8)?;
        let encode_batch = batch.clone();
        let options = self.file_options.clone();
        let encode_batch_id = batch_id.clone();
        let scopes = scopes.clone();
        let files = tokio::task::spawn_blocking(move || -> Result<Vec<PreparedFile>> {
            let mut prepared = Vec::new();
            let group_key = |group: &crate::batch::FileGroup<'_, K>| {
                (
                    group.key_owner.to_string(),
                    group.key_scope.to_string(),
                    group.date.month_period(),
                )
            };
            let groups = group_into_files::<K>(&encode_batch.events, &scopes)
                .into_iter()
                .filter(|group| keys.contains_key(&group_key(group)));
            for (index, mut group) in groups.enumerate() {
                let key = keys
                    .get(&group_key(&group))
                    .ok_or_else(|| Error::internal("data key missing for a file group"))?;
                let lock = rules.as_ref().map_or_else(ObjectLock::default, |rules| {
                    group
                        .rows
                        .iter()
                        .fold(ObjectLock::default(), |lock, archived| {
                            lock.union(K::object_lock(&archived.record, rules))
                        })
                });
                let encoded: EncodedFile = K::encode_file(&mut group.rows, key, &options)?;
                let path = K::file_path(
                    group.key_owner,
                    group.key_scope,
                    group.date,
                    encode_batch.partition,
                    encode_batch.start_offset,
                    &encode_batch_id,
                    index,
                );
                prepared.push(PreparedFile {
                    manifest_entry: ManifestFile::describe(
                        &path,
                        group.key_owner,
                        &group.date.iso(),
                        key,
                        &encoded,
                    ),
                    path,
                    bytes: encoded.bytes,
                    lock,
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

pub(crate) struct PreparedFile {
    pub(crate) path: Path,
    pub(crate) manifest_entry: ManifestFile,
    pub(crate) bytes: bytes::Bytes,
    /// The S3 Object Lock it is written with (none unless `storage.object_lock` is on).
    pub(crate) lock: ObjectLock,
}

/// A batch ready to upload: its files, and the records it commits as rejected.
pub(crate) struct Prepared {
    pub(crate) batch_id: String,
    pub(crate) files: Vec<PreparedFile>,
    /// The batch's undecodable records plus the records of key scopes that can never be archived here.
    pub(crate) rejected: Vec<Rejected>,
    /// Each rejected record's copy in the dead-letter topic, once produced (kept across commit retries).
    pub(crate) dead_letters: Option<Vec<DeadLetter>>,
}
