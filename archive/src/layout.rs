//! Object paths of the archive, relative to the archive root (`storage.url`):
//!
//! ```text
//! events/tenant=<tenant>/date=<yyyy-mm-dd>/p<partition>-o<first offset>-<batch id>-<n>.parquet
//! events/tenant=<tenant>/date=<yyyy-mm-dd>/s-<scope>-p<partition>-...parquet  a key scope's events
//! audit/date=<yyyy-mm-dd>/p<partition>-o<first offset>-<batch id>-<n>.parquet   the audit trail
//! keys/tenant=<tenant>/period=<yyyy-mm>.json                       wrapped data key of a tenant's month
//! keys/tenant=<tenant>/scope=<scope>/period=<yyyy-mm>.json         ... of a key scope's month
//! erasures/tenant=<tenant>/[scope=<scope>/]period=<yyyy-mm>/<dek>.json   a destroyed data key (crypto-shred)
//! governance/<seq>-<batch>.json                                  policy and hold changes (crate::governance)
//! holds/tenant=<tenant>/<hold id>.json                              hand-written legal holds (refuse a shred)
//! manifests/topic=<topic>/partition=<p>/<seq, 20 digits>.json       committed batches, a hash chain
//! manifests/topic=<topic>/partition=<p>/pending/<batch id>.json     upload intents, for orphan cleanup
//! ```
//!
//! The `events/` tree is Hive-partitioned so DuckDB, Spark and pyarrow discover `tenant` and `date` on their
//! own. Only files named by a committed manifest belong to the archive; anything else under `events/` (or
//! `audit/`) is an orphan of a crashed or fenced writer and is removed by the partition's next owner. The
//! audit trail's files are committed by the manifest chains of the audit topic
//! (`manifests/topic=<audit topic>/...`) and encrypted under the reserved key scope `_audit`
//! (`keys/tenant=_audit/...`; see [`crate::kind::AUDIT_KEY_SCOPE`]).

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;

use chatvault_core::error::{Error, Result};

pub const EVENTS_ROOT: &str = "events";
pub const MANIFESTS_ROOT: &str = "manifests";
pub const KEYS_ROOT: &str = "keys";
pub const AUDIT_ROOT: &str = "audit";
pub const ERASURES_ROOT: &str = "erasures";
pub const HOLDS_ROOT: &str = "holds";

pub fn tenant_events_prefix(tenant: &str) -> Path {
    Path::from(format!("{EVENTS_ROOT}/tenant={tenant}"))
}

/// A batch's file of `tenant`'s events of `date_iso` in key scope `scope` (empty: the default scope). Scoped
/// files start with `s-<scope>-`, default ones with `p`, so a reader's glob (`p*.parquet`) picks one key's
/// files.
pub fn event_file_path(
    tenant: &str,
    scope: &str,
    date_iso: &str,
    partition: i32,
    first_offset: i64,
    batch_id: &str,
    index: usize,
) -> Path {
    let scope_prefix = if scope.is_empty() {
        String::new()
    } else {
        format!("s-{scope}-")
    };
    Path::from(format!(
        "{EVENTS_ROOT}/tenant={tenant}/date={date_iso}/{scope_prefix}p{partition:05}-o{first_offset:020}-{batch_id}-{index:03}.parquet"
    ))
}

pub fn audit_file_path(
    date_iso: &str,
    partition: i32,
    first_offset: i64,
    batch_id: &str,
    index: usize,
) -> Path {
    Path::from(format!(
        "{AUDIT_ROOT}/date={date_iso}/p{partition:05}-o{first_offset:020}-{batch_id}-{index:03}.parquet"
    ))
}

/// The key scope of an events file, from its name (`s-<scope>-...`; empty: the default scope).
pub fn scope_of_file_name(name: &str) -> &str {
    let Some(rest) = name.strip_prefix("s-") else {
        return "";
    };
    // The scope ends where `-p<5 digits>-o` begins (scope names may contain `-p` themselves).
    rest.match_indices("-p")
        .find(|(at, _)| {
            let tail = &rest.as_bytes()[at + 2..];
            tail.len() > 7 && tail[..5].iter().all(u8::is_ascii_digit) && &tail[5..7] == b"-o"
        })
        .map(|(at, _)| &rest[..at])
        .unwrap_or("")
}

/// Every data key record of `tenant` (all scopes) is under this prefix.
pub fn tenant_keys_prefix(tenant: &str) -> Path {
    Path::from(format!("{KEYS_ROOT}/tenant={tenant}"))
}

/// The objects under `prefix` (as a directory), sorted.
pub async fn list_paths(store: &dyn ObjectStore, prefix: &Path) -> Result<Vec<Path>> {
    let mut paths: Vec<Path> = store
        .list(Some(prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .map_err(|error| Error::from(error).context(format!("listing {prefix}")))?;
    paths.sort();
    Ok(paths)
}

/// The data key record of `tenant`'s default scope for `period`.
pub fn data_key_path(tenant: &str, period: &str) -> Path {
    data_key_path_in(tenant, "", period)
}

/// The data key record of `tenant`'s key scope `scope` (empty: the default scope) for `period`.
pub fn data_key_path_in(tenant: &str, scope: &str, period: &str) -> Path {
    if scope.is_empty() {
        Path::from(format!("{KEYS_ROOT}/tenant={tenant}/period={period}.json"))
    } else {
        Path::from(format!(
            "{KEYS_ROOT}/tenant={tenant}/scope={scope}/period={period}.json"
        ))
    }
}

fn scope_segment(scope: &str) -> String {
    if scope.is_empty() {
        String::new()
    } else {
        format!("scope={scope}/")
    }
}

/// Where the erasure records of a key scope's month are (one per destroyed data key of the month).
pub fn erasures_prefix(tenant: &str, scope: &str, period: &str) -> Path {
    Path::from(format!(
        "{ERASURES_ROOT}/tenant={tenant}/{}period={period}",
        scope_segment(scope)
    ))
}

/// The erasure record of data key `dek_id` (its last `/` segment names the file).
pub fn erasure_path(tenant: &str, scope: &str, period: &str, dek_id: &str) -> Path {
    let name = dek_id.rsplit('/').next().unwrap_or(dek_id);
    Path::from(format!(
        "{ERASURES_ROOT}/tenant={tenant}/{}period={period}/{name}.json",
        scope_segment(scope)
    ))
}

pub fn holds_prefix(tenant: &str) -> Path {
    Path::from(format!("{HOLDS_ROOT}/tenant={tenant}"))
}

pub fn manifests_root(topic: &str) -> Path {
    Path::from(format!("{MANIFESTS_ROOT}/topic={topic}"))
}

pub fn partition_manifests_prefix(topic: &str, partition: i32) -> Path {
    Path::from(format!(
        "{MANIFESTS_ROOT}/topic={topic}/partition={partition}"
    ))
}

pub fn manifest_path(topic: &str, partition: i32, seq: u64) -> Path {
    Path::from(format!(
        "{MANIFESTS_ROOT}/topic={topic}/partition={partition}/{seq:020}.json"
    ))
}

pub fn pending_prefix(topic: &str, partition: i32) -> Path {
    Path::from(format!(
        "{MANIFESTS_ROOT}/topic={topic}/partition={partition}/pending"
    ))
}

pub fn pending_path(topic: &str, partition: i32, batch_id: &str) -> Path {
    Path::from(format!(
        "{MANIFESTS_ROOT}/topic={topic}/partition={partition}/pending/{batch_id}.json"
    ))
}

/// The sequence number of a manifest path's file name, if it is one.
pub fn manifest_seq(path: &Path) -> Option<u64> {
    let name = path.filename()?;
    let digits = name.strip_suffix(".json")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The partition number of a `partition=<p>` path segment below a topic's manifests root.
pub fn partition_of_manifest(path: &Path) -> Option<i32> {
    path.parts()
        .find_map(|part| part.as_ref().strip_prefix("partition=").map(str::to_string))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_sort_by_sequence_and_parse_back() {
        let a = manifest_path("chatvault.events", 3, 9);
        let b = manifest_path("chatvault.events", 3, 10);
        assert!(a.to_string() < b.to_string());
        assert_eq!(manifest_seq(&b), Some(10));
        assert_eq!(partition_of_manifest(&b), Some(3));
        assert_eq!(manifest_seq(&pending_path("t", 3, "abc")), None);
    }
}
