//! Offline verification of a whole archive, needing read access to the bucket and nothing else (no keys, no
//! Kafka, no running service): every stream's manifest chains (`manifests/topic=*/`: the chat events and the
//! audit trail alike), link by link, and every file they commit, by size and SHA-256, plus the data key record
//! each file needs. What no manifest names is listed too, as a warning: an upload in flight or the orphan of a
//! crashed writer (named by an upload intent), or a file nobody can account for.
//!
//! With [`Sampling`], every chain, key record and the log are still checked in full, but only a sample of
//! the committed files is fetched and hashed: a file is in the sample when SHA-256(seed, path) is among the
//! `files` smallest, so the sample is uniform, differs from seed to seed, and is reproduced by the same seed.
//! The log's own files are always checked (they are small and vouch for everything else).
//!
//! The transparency log ([`crate::tlog`]) is checked too: every checkpoint's signature (given the public
//! key), the tree its bundles recompute, the consistency between checkpoints, and every leaf against the
//! manifest it names. What no checkpoint covers yet (manifests committed after the newest one) is counted,
//! not vouched for: removing those along with everything after them is what a checkpoint cannot see.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use crate::chain::ChainReader;
use crate::file::sha256_hex;
use crate::layout;
use crate::manifest::{ChainHead, LiveFiles, PendingIntent};
use crate::tlog::{self, LogReport, LogTrust};
use chatvault_core::error::{Error, Result};

/// Files fetched and hashed at once.
const FILES_AT_ONCE: usize = 8;
/// Manifest chains read at once.
const CHAINS_AT_ONCE: usize = 8;

/// What is wrong with the archive: each makes the verification fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Problem {
    /// A chain cannot be verified past `verified_manifests` manifests.
    BrokenChain {
        topic: String,
        partition: i32,
        verified_manifests: u64,
        detail: String,
    },
    /// A committed file is not in the bucket.
    MissingFile { path: String, manifest: String },
    /// A committed file's bytes differ from what its manifest committed.
    AlteredFile {
        path: String,
        manifest: String,
        detail: String,
    },
    /// The data key record a committed file needs is not in the bucket, and no erasure explains it.
    MissingKeyRecord { path: String, needed_by: String },
    /// The key record holds another data key than the files name, and no erasure explains it.
    KeyMismatch {
        path: String,
        needed_by: String,
        detail: String,
    },
    /// A data key recorded as erased is still in its key record: a shred that stopped half-way (run it
    /// again).
    IncompleteErasure { path: String, erasure: String },
    /// The log's bundle, checkpoint or log manifest at `path` is wrong: a bad or forged signature, a root or
    /// size its bundles do not reproduce, a consistency proof that does not verify.
    BadLog { path: String, detail: String },
    /// Leaf `index` of the log names a manifest that was removed or replaced, or is out of chain order.
    LogEntry {
        index: u64,
        topic: String,
        partition: i32,
        seq: u64,
        detail: String,
    },
    /// A checkpoint the auditor kept or the witness holds is not in the log (rolled back or rewritten), or
    /// trusted keys were given and no checkpoint verifies.
    LogRollback { detail: String },
    /// The governance stream's chain verifies but its changes do not replay (an altered or unreadable change,
    /// or one that does not apply to the state before it).
    BadGovernance { detail: String },
    /// A rewrite manifest supersedes a file its chain does not hold live (unknown, already superseded, or
    /// committed with another SHA-256).
    BadRewrite {
        topic: String,
        partition: i32,
        seq: u64,
        detail: String,
    },
    /// Storage failed while reading `path` (not a verdict about the archive; run again).
    Unreadable { path: String, detail: String },
}

/// A file under `events/` or `audit/` that no committed manifest names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreferenced {
    pub path: String,
    /// Whether an upload intent names it (an upload in flight, or the orphan of a writer that crashed or was
    /// fenced, removed by the partition's next owner); otherwise nothing accounts for it.
    pub named_by_intent: bool,
}

/// Which committed files [`verify_archive`] fetches and hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Sampling {
    /// Every file.
    All,
    /// A sample of `files` files chosen by `seed` (see the module documentation).
    Sample { files: u64, seed: u64 },
}

/// The outcome of [`verify_archive`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Verified manifests per topic.
    pub manifests: BTreeMap<String, u64>,
    /// Files the verified manifests commit.
    pub files_committed: u64,
    /// Which of them were fetched and hashed.
    pub sampling: Sampling,
    pub files_checked: u64,
    pub bytes_checked: u64,
    pub key_records_checked: u64,
    /// Committed files whose data key was erased (crypto-shredded): present, intact, and unreadable by
    /// design.
    pub erased_files: u64,
    /// The transparency log.
    pub log: LogReport,
    pub problems: Vec<Problem>,
    pub unreferenced: Vec<Unreferenced>,
    /// Files that rewrite commits replaced: no longer part of the archive.
    pub files_superseded: u64,
    /// Superseded files still in the bucket (a disposition that stopped before deleting them, or storage that
    /// refused the deletion, such as Object Lock): their rows are out of every restore but not yet gone.
    pub superseded_present: Vec<String>,
}

impl Default for VerifyReport {
    fn default() -> Self {
        VerifyReport {
            manifests: BTreeMap::new(),
            files_committed: 0,
            sampling: Sampling::All,
            files_checked: 0,
            bytes_checked: 0,
            key_records_checked: 0,
            erased_files: 0,
            log: LogReport::default(),
            problems: Vec::new(),
            unreferenced: Vec::new(),
            files_superseded: 0,
            superseded_present: Vec::new(),
        }
    }
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Where a verification is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub files_checked: u64,
    pub files_total: u64,
    pub bytes_checked: u64,
}

/// A committed file and the manifest that commits it.
struct Committed {
    path: String,
    /// The key owner (tenant, or `_audit`), key scope, month and data key the manifest says the file is
    /// encrypted under.
    key_owner: String,
    key_scope: String,
    key_period: String,
    dek_id: String,
    bytes: u64,
    sha256: String,
    manifest: String,
}

/// Verifies everything under the archive root of `store` (see the module documentation), fetching the files
/// `sampling` selects and calling `progress` after each. Fails only when the bucket cannot be listed;
/// everything else is a [`Problem`].
pub async fn verify_archive(
    store: Arc<dyn ObjectStore>,
    trust: &LogTrust,
    sampling: Sampling,
    mut progress: impl FnMut(Progress),
) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        sampling,
        ..VerifyReport::default()
    };
    let mut committed = Vec::new();
    let mut intents: BTreeSet<String> = BTreeSet::new();
    let mut manifest_shas: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
    let mut log_manifests = Vec::new();
    let mut superseded: BTreeSet<String> = BTreeSet::new();
    for topic in crate::chain::topics(store.as_ref()).await? {
        let reader = ChainReader::new(store.clone(), &topic);
        let chains = &reader;
        let mut count = 0u64;
        // Chains are independent: several are read at once (each one's manifests in order).
        let mut reads = futures::stream::iter(chains.partitions().await?)
            .map(|partition| async move {
                let verified = chains.read_after(partition, &ChainHead::empty()).await;
                let pending =
                    pending_files(chains.store().as_ref(), chains.topic(), partition).await;
                (partition, verified, pending)
            })
            .buffered(CHAINS_AT_ONCE);
        while let Some((partition, verified, pending)) = reads.next().await {
            let verified_here = verified.manifests.len() as u64;
            let mut live = LiveFiles::default();
            for (manifest, head) in verified.manifests {
                match live.apply(&manifest) {
                    Ok(removed) => superseded.extend(removed.into_iter().map(|(path, _)| path)),
                    Err(error) => report.problems.push(Problem::BadRewrite {
                        topic: topic.clone(),
                        partition,
                        seq: manifest.seq,
                        detail: error.message().to_string(),
                    }),
                }
                manifest_shas
                    .entry((topic.clone(), partition))
                    .or_default()
                    .push(head.last_sha256);
                if topic == tlog::LOG_TOPIC {
                    log_manifests.push(manifest.clone());
                }
                let name = layout::manifest_path(&topic, partition, manifest.seq).to_string();
                committed.extend(manifest.files.into_iter().map(|file| Committed {
                    path: file.path.clone(),
                    key_owner: file.tenant_id.clone(),
                    key_scope: file.key_scope.clone(),
                    key_period: file.key_period.clone(),
                    dek_id: file.dek_id.clone(),
                    bytes: file.bytes,
                    sha256: file.sha256,
                    manifest: name.clone(),
                }));
            }
            count += verified_here;
            if let Some(error) = verified.error {
                report.problems.push(Problem::BrokenChain {
                    topic: topic.clone(),
                    partition,
                    verified_manifests: verified_here,
                    detail: error.message().to_string(),
                });
            }
            intents.extend(pending?);
        }
        report.manifests.insert(topic, count);
    }
    // A superseded file is no longer part of the archive: neither checked nor needing its key.
    committed.retain(|file| !superseded.contains(&file.path));
    report.files_superseded = superseded.len() as u64;
    // Key record → the data keys its files name → (scope, period, first file, files).
    let mut key_records: BTreeMap<String, BTreeMap<String, NeededKey>> = BTreeMap::new();
    // The log's files are plaintext: no data key.
    for file in committed.iter().filter(|file| !file.dek_id.is_empty()) {
        let record = layout::data_key_path_in(&file.key_owner, &file.key_scope, &file.key_period)
            .to_string();
        key_records
            .entry(record)
            .or_default()
            .entry(file.dek_id.clone())
            .or_insert_with(|| NeededKey {
                owner: file.key_owner.clone(),
                scope: file.key_scope.clone(),
                period: file.key_period.clone(),
                needed_by: file.path.clone(),
                files: 0,
            })
            .files += 1;
    }
    report.files_committed = committed.len() as u64;
    let referenced: BTreeSet<String> = committed.iter().map(|file| file.path.clone()).collect();
    let committed = sample(committed, sampling);
    let total = committed.len() as u64;
    let mut checks = futures::stream::iter(committed)
        .map(|file| {
            let store = store.clone();
            async move { check_file(store.as_ref(), file).await }
        })
        .buffer_unordered(FILES_AT_ONCE);
    while let Some((bytes, problem)) = checks.next().await {
        report.files_checked += 1;
        report.bytes_checked += bytes;
        report.problems.extend(problem);
        progress(Progress {
            files_checked: report.files_checked,
            files_total: total,
            bytes_checked: report.bytes_checked,
        });
    }
    // Policies and holds must replay, not only hash: a change that does not apply to the state before it was
    // altered (its chain already broken is reported above).
    let governance_chain_broken = report.problems.iter().any(|problem| {
        matches!(problem, Problem::BrokenChain { topic, .. } if topic == crate::governance::GOVERNANCE_TOPIC)
    });
    if report
        .manifests
        .contains_key(crate::governance::GOVERNANCE_TOPIC)
        && !governance_chain_broken
        && let Err(error) = crate::governance::GovernanceLog::new(store.clone())
            .state()
            .await
    {
        report.problems.push(Problem::BadGovernance {
            detail: error.message().to_string(),
        });
    }
    for (path, needed) in key_records {
        report.key_records_checked += 1;
        check_key_record(store.as_ref(), path, needed, &mut report).await;
    }
    report.log = tlog::check::check_log(
        &store,
        &log_manifests,
        &manifest_shas,
        trust,
        &mut report.problems,
    )
    .await?;
    for root in [
        layout::EVENTS_ROOT,
        layout::AUDIT_ROOT,
        tlog::LOG_ROOT,
        crate::drill::DRILLS_ROOT,
        crate::governance::GOVERNANCE_ROOT,
        crate::disposition::DISPOSITION_ROOT,
    ] {
        let mut listing = store.list(Some(&Path::from(root)));
        while let Some(object) = listing.try_next().await.map_err(Error::from)? {
            let path = object.location.to_string();
            if superseded.contains(&path) {
                report.superseded_present.push(path);
            } else if !referenced.contains(&path) {
                report.unreferenced.push(Unreferenced {
                    named_by_intent: intents.contains(&path),
                    path,
                });
            }
        }
    }
    report.unreferenced.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(report)
}

/// The files of `committed` that `sampling` selects, in their original order; the log's own files always.
fn sample(committed: Vec<Committed>, sampling: Sampling) -> Vec<Committed> {
    let Sampling::Sample { files, seed } = sampling else {
        return committed;
    };
    let rank = |path: &str| {
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        hasher.update(&seed.to_be_bytes());
        hasher.update(path.as_bytes());
        let digest = hasher.finish();
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&digest.as_ref()[..16]);
        u128::from_be_bytes(prefix)
    };
    let is_log = |file: &Committed| file.path.starts_with(tlog::LOG_ROOT);
    let mut ranked: Vec<(u128, usize)> = committed
        .iter()
        .enumerate()
        .filter(|(_, file)| !is_log(file))
        .map(|(index, file)| (rank(&file.path), index))
        .collect();
    ranked.sort_unstable();
    let chosen: BTreeSet<usize> = ranked
        .into_iter()
        .take(usize::try_from(files).unwrap_or(usize::MAX))
        .map(|(_, index)| index)
        .collect();
    committed
        .into_iter()
        .enumerate()
        .filter(|(index, file)| chosen.contains(index) || is_log(file))
        .map(|(_, file)| file)
        .collect()
}

/// The files the upload intents of a partition name.
async fn pending_files(
    store: &dyn ObjectStore,
    topic: &str,
    partition: i32,
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut listing = store.list(Some(&layout::pending_prefix(topic, partition)));
    while let Some(object) = listing.try_next().await.map_err(Error::from)? {
        let Ok(got) = store.get(&object.location).await else {
            continue; // removed since listed: its batch committed or was cleaned up
        };
        let Ok(bytes) = got.bytes().await else {
            continue;
        };
        if let Ok(intent) = serde_json::from_slice::<PendingIntent>(&bytes) {
            files.extend(intent.files);
        }
    }
    Ok(files)
}

/// A data key that committed files name.
struct NeededKey {
    owner: String,
    scope: String,
    period: String,
    /// The first file that needs it (to name in a problem).
    needed_by: String,
    files: u64,
}

/// Checks a key record against the data keys its files name: each must be the record's key, or erased.
async fn check_key_record(
    store: &dyn ObjectStore,
    path: String,
    needed: BTreeMap<String, NeededKey>,
    report: &mut VerifyReport,
) {
    let record_dek = match store.get(&Path::from(path.as_str())).await {
        Ok(fetched) => match fetched
            .bytes()
            .await
            .map_err(|error| error.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<crate::keys::DataKeyRecord>(&bytes)
                    .map_err(|error| error.to_string())
            }) {
            Ok(record) => Some(record.dek_id),
            Err(detail) => {
                report.problems.push(Problem::Unreadable { path, detail });
                return;
            }
        },
        Err(object_store::Error::NotFound { .. }) => None,
        Err(error) => {
            report.problems.push(Problem::Unreadable {
                path,
                detail: error.to_string(),
            });
            return;
        }
    };
    for (dek_id, key) in needed {
        let erasure = layout::erasure_path(&key.owner, &key.scope, &key.period, &dek_id);
        let erased = match store.head(&erasure).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(error) => {
                report.problems.push(Problem::Unreadable {
                    path: erasure.to_string(),
                    detail: error.to_string(),
                });
                continue;
            }
        };
        match (&record_dek, erased) {
            (Some(current), true) if *current == dek_id => {
                report.problems.push(Problem::IncompleteErasure {
                    path: path.clone(),
                    erasure: erasure.to_string(),
                })
            }
            (Some(current), false) if *current == dek_id => {}
            (_, true) => report.erased_files += key.files,
            (None, false) => report.problems.push(Problem::MissingKeyRecord {
                path: path.clone(),
                needed_by: key.needed_by,
            }),
            (Some(current), false) => report.problems.push(Problem::KeyMismatch {
                path: path.clone(),
                needed_by: key.needed_by,
                detail: format!("the files name data key {dek_id}, the record holds {current}"),
            }),
        }
    }
}

/// Fetches and hashes one committed file: its size and what is wrong with it, if anything.
async fn check_file(store: &dyn ObjectStore, file: Committed) -> (u64, Option<Problem>) {
    let fetched = match store.get(&Path::from(file.path.as_str())).await {
        Ok(result) => result.bytes().await,
        Err(error) => Err(error),
    };
    let bytes = match fetched {
        Ok(bytes) => bytes,
        Err(object_store::Error::NotFound { .. }) => {
            return (
                0,
                Some(Problem::MissingFile {
                    path: file.path,
                    manifest: file.manifest,
                }),
            );
        }
        Err(error) => {
            return (
                0,
                Some(Problem::Unreadable {
                    path: file.path,
                    detail: error.to_string(),
                }),
            );
        }
    };
    let size = bytes.len() as u64;
    let sha256 = tokio::task::spawn_blocking(move || sha256_hex(&bytes))
        .await
        .unwrap_or_default();
    let problem = if size != file.bytes {
        Some(format!(
            "{size} bytes, the manifest committed {}",
            file.bytes
        ))
    } else if sha256 != file.sha256 {
        Some(format!(
            "SHA-256 {sha256}, the manifest committed {}",
            file.sha256
        ))
    } else {
        None
    };
    (
        size,
        problem.map(|detail| Problem::AlteredFile {
            path: file.path,
            manifest: file.manifest,
            detail,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(path: &str) -> Committed {
        Committed {
            path: path.to_string(),
            key_owner: String::new(),
            key_scope: String::new(),
            key_period: String::new(),
            dek_id: String::new(),
            bytes: 0,
            sha256: String::new(),
            manifest: String::new(),
        }
    }

    #[test]
    fn a_sample_is_reproduced_by_its_seed_and_always_holds_the_log() {
        let files = || {
            let mut files: Vec<Committed> = (0..1_000)
                .map(|i| committed(&format!("events/tenant=acme/f{i:04}.parquet")))
                .collect();
            files.push(committed("log/bundles/0.json"));
            files
        };
        let paths = |sampling| -> Vec<String> {
            sample(files(), sampling)
                .into_iter()
                .map(|file| file.path)
                .collect()
        };
        let first = paths(Sampling::Sample { files: 50, seed: 7 });
        assert_eq!(first.len(), 51, "50 data files and the log's");
        assert!(first.contains(&"log/bundles/0.json".to_string()));
        assert_eq!(first, paths(Sampling::Sample { files: 50, seed: 7 }));
        let other = paths(Sampling::Sample { files: 50, seed: 8 });
        assert_ne!(first, other, "another seed, another sample");
        // Spread over the whole archive rather than its first files.
        assert!(first.iter().any(|path| path.contains("f09")), "{first:?}");
        assert_eq!(paths(Sampling::All).len(), 1_001);
        assert_eq!(
            paths(Sampling::Sample {
                files: 5_000,
                seed: 1
            })
            .len(),
            1_001
        );
    }

    #[test]
    fn files_and_key_records_name_their_scope() {
        let scoped = layout::event_file_path("acme", "hr-people", "2026-11-30", 0, 0, "ab", 0);
        let default = layout::event_file_path("acme", "", "2026-11-30", 0, 0, "ab", 0);
        assert_eq!(
            scoped.as_ref(),
            "events/tenant=acme/date=2026-11-30/s-hr-people-p00000-o00000000000000000000-ab-000.parquet"
        );
        let name = |path: &Path| {
            path.as_ref()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(layout::scope_of_file_name(&name(&scoped)), "hr-people");
        assert_eq!(layout::scope_of_file_name(&name(&default)), "");
        assert_eq!(
            layout::data_key_path_in("acme", "legal", "2026-11").as_ref(),
            "keys/tenant=acme/scope=legal/period=2026-11.json"
        );
        assert_eq!(
            layout::data_key_path_in("acme", "", "2026-11").as_ref(),
            "keys/tenant=acme/period=2026-11.json"
        );
    }
}
