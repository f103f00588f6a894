//! The log's part of `chatvault verify`: recomputes the tree from the bundles, checks every checkpoint (its
//! signature, size, root, and the consistency proof from the one before), checks every leaf against the
//! manifest it names (present, the same bytes, in chain order, once), counts the manifests no checkpoint
//! covers yet, and checks the checkpoints an auditor kept or a witness store holds against the log, which
//! is what exposes a log rolled back to an earlier checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use super::committer::{fetch_committed, log_files};
use super::merkle::{Frontier, Hash, verify_consistency};
use super::note::{Checkpoint, VerifierKey, open_note, split_note};
use super::{BUNDLE_FORMAT, Bundle, CHECKPOINTS_ROOT, LOG_TOPIC, hashes_from_hex};
use crate::chain::ChainReader;
use crate::manifest::Manifest;
use crate::verify::Problem;
use chatvault_core::error::Result;

/// What the auditor brings to a verification of the log.
#[derive(Debug, Clone, Default)]
pub struct LogTrust {
    /// Keys whose checkpoint signatures are accepted; with none, signatures are not checked (and the report
    /// says so).
    pub keys: Vec<VerifierKey>,
    /// Checkpoints (signed notes) the auditor kept from earlier verifications: each must be in the log.
    pub kept_checkpoints: Vec<String>,
    /// A second store holding copies of the checkpoints (`log/checkpoints/<size>.txt`): each must be in the log.
    pub witness: Option<Arc<dyn ObjectStore>>,
}

/// What the verification found of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LogReport {
    pub checkpoints: u64,
    /// Leaves of the newest checkpoint that verified.
    pub tree_size: u64,
    /// Base64 root of that checkpoint's tree.
    pub root: String,
    /// Whether checkpoint signatures were checked (trusted keys were given).
    pub signatures_checked: bool,
    /// Manifests covered by a checkpoint.
    pub covered_manifests: u64,
    /// Committed manifests that no checkpoint covers yet (committed after the newest one).
    pub uncovered_manifests: u64,
    /// Checkpoints kept by the auditor or held by the witness that were found in the log.
    pub external_checkpoints_matched: u64,
}

/// Checks the log (see the module documentation). `log_manifests` is the verified prefix of the log's chain;
/// `chains` the SHA-256 of every verified manifest, per stream partition, by sequence number.
pub(crate) async fn check_log(
    store: &Arc<dyn ObjectStore>,
    log_manifests: &[Manifest],
    chains: &BTreeMap<(String, i32), Vec<String>>,
    trust: &LogTrust,
    problems: &mut Vec<Problem>,
) -> Result<LogReport> {
    let mut report = LogReport {
        signatures_checked: !trust.keys.is_empty(),
        ..LogReport::default()
    };
    let mut frontier = Frontier::new();
    let mut roots: BTreeMap<u64, Hash> = BTreeMap::new();
    let mut next_seq: BTreeMap<(String, i32), u64> = BTreeMap::new();
    let bad = |path: &str, detail: String| Problem::BadLog {
        path: path.to_string(),
        detail,
    };
    for manifest in log_manifests {
        let log_path = crate::layout::manifest_path(LOG_TOPIC, manifest.partition, manifest.seq);
        let (bundle_file, checkpoint_file) = match log_files(manifest) {
            Ok(files) => files,
            Err(detail) => {
                problems.push(bad(log_path.as_ref(), detail));
                break;
            }
        };
        // A missing or altered bundle or checkpoint is reported with the committed files; the tree cannot be
        // followed past it.
        let Ok(bundle_bytes) = fetch_committed(store.as_ref(), bundle_file).await? else {
            break;
        };
        let Ok(note_bytes) = fetch_committed(store.as_ref(), checkpoint_file).await? else {
            break;
        };
        let bundle: Bundle = match serde_json::from_slice(&bundle_bytes) {
            Ok(bundle) => bundle,
            Err(error) => {
                problems.push(bad(&bundle_file.path, format!("not a log bundle: {error}")));
                break;
            }
        };
        if bundle.format != BUNDLE_FORMAT
            || bundle.first_index != frontier.size()
            || bundle.first_index != manifest.start_offset as u64
            || bundle.tree_size != manifest.end_offset as u64
            || bundle.tree_size != bundle.first_index + bundle.leaves.len() as u64
        {
            problems.push(bad(
                &bundle_file.path,
                format!(
                    "the bundle does not continue the log: it covers leaves {}..{} ({} given), the log stands at \
                     {} leaves and its manifest covers {}..{}",
                    bundle.first_index,
                    bundle.tree_size,
                    bundle.leaves.len(),
                    frontier.size(),
                    manifest.start_offset,
                    manifest.end_offset
                ),
            ));
            break;
        }
        let (old_size, old_root) = (frontier.size(), frontier.root());
        for (offset, leaf) in bundle.leaves.iter().enumerate() {
            let index = bundle.first_index + offset as u64;
            let key = (leaf.topic.clone(), leaf.partition);
            let expected = next_seq.get(&key).copied().unwrap_or(0);
            let entry = |detail: String| Problem::LogEntry {
                index,
                topic: leaf.topic.clone(),
                partition: leaf.partition,
                seq: leaf.seq,
                detail,
            };
            if leaf.seq != expected {
                problems.push(entry(format!(
                    "out of order: the log expected manifest {expected} of this partition next"
                )));
            }
            next_seq.insert(key.clone(), leaf.seq.max(expected) + 1);
            let stored = match chains
                .get(&key)
                .and_then(|shas| shas.get(leaf.seq as usize))
            {
                Some(sha) => Ok(Some(sha.clone())),
                None => ChainReader::new(store.clone(), &leaf.topic)
                    .read_if_exists(leaf.partition, leaf.seq)
                    .await
                    .map(|found| found.map(|(_, sha)| sha)),
            };
            let stored = match stored {
                Ok(stored) => stored,
                Err(error) => {
                    problems.push(entry(format!("the manifest cannot be read: {error}")));
                    frontier.push(leaf.hash());
                    continue;
                }
            };
            match stored {
                Some(sha) if sha == leaf.manifest_sha256 => report.covered_manifests += 1,
                Some(sha) => problems.push(entry(format!(
                    "the manifest was replaced: its SHA-256 is {sha}, the log recorded {}",
                    leaf.manifest_sha256
                ))),
                None => problems.push(entry(
                    "the manifest was removed: the log names it, the bucket does not have it"
                        .into(),
                )),
            }
            frontier.push(leaf.hash());
        }
        let root = frontier.root();
        match hashes_from_hex(&bundle.consistency_proof) {
            Some(proof)
                if verify_consistency(old_size, frontier.size(), &old_root, &root, &proof) => {}
            _ => problems.push(bad(
                &bundle_file.path,
                format!(
                    "its consistency proof from {old_size} to {} leaves does not verify",
                    frontier.size()
                ),
            )),
        }
        let note = String::from_utf8_lossy(&note_bytes);
        match read_checkpoint(&note, &trust.keys) {
            Ok(checkpoint) if checkpoint.size != frontier.size() || checkpoint.root != root => {
                problems.push(bad(
                    &checkpoint_file.path,
                    format!(
                        "it signs {} leaves with root {}, the log's bundles give {} leaves with root {}",
                        checkpoint.size,
                        base64_of(&checkpoint.root),
                        frontier.size(),
                        base64_of(&root)
                    ),
                ))
            }
            Ok(checkpoint) if checkpoint.origin != bundle.origin => problems.push(bad(
                &checkpoint_file.path,
                format!(
                    "it names origin {}, the log's bundles {}",
                    checkpoint.origin, bundle.origin
                ),
            )),
            Ok(_) => {
                report.checkpoints += 1;
                report.tree_size = frontier.size();
                report.root = base64_of(&root);
            }
            Err(detail) => problems.push(bad(&checkpoint_file.path, detail)),
        }
        roots.insert(frontier.size(), root);
    }
    report.uncovered_manifests = chains
        .iter()
        .filter(|((topic, _), _)| topic != LOG_TOPIC)
        .map(|(key, shas)| {
            (shas.len() as u64).saturating_sub(next_seq.get(key).copied().unwrap_or(0))
        })
        .sum();
    if !trust.keys.is_empty() && report.checkpoints == 0 {
        problems.push(Problem::LogRollback {
            detail: "no checkpoint signed by a trusted key: the archive has no verifiable transparency log"
                .into(),
        });
    }

    let mut external: Vec<(String, String)> = trust
        .kept_checkpoints
        .iter()
        .enumerate()
        .map(|(n, note)| (format!("kept checkpoint {}", n + 1), note.clone()))
        .collect();
    if let Some(witness) = &trust.witness {
        let listed: Vec<_> = witness
            .list(Some(&Path::from(CHECKPOINTS_ROOT)))
            .try_collect()
            .await?;
        for object in listed {
            let bytes = witness.get(&object.location).await?.bytes().await?;
            external.push((
                format!("witness {}", object.location),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    for (name, note) in external {
        match read_checkpoint(&note, &trust.keys) {
            Ok(checkpoint) => match roots.get(&checkpoint.size) {
                Some(root) if *root == checkpoint.root => report.external_checkpoints_matched += 1,
                Some(root) => problems.push(Problem::LogRollback {
                    detail: format!(
                        "{name} signs root {} at {} leaves, the archive's log has root {} there: the log was \
                         rewritten",
                        base64_of(&checkpoint.root),
                        checkpoint.size,
                        base64_of(root)
                    ),
                }),
                None => problems.push(Problem::LogRollback {
                    detail: format!(
                        "{name} covers {} leaves, the archive's log has no checkpoint of that size (it stands at \
                         {}): the log was rolled back or rewritten",
                        checkpoint.size,
                        frontier.size()
                    ),
                }),
            },
            Err(detail) => problems.push(Problem::LogRollback {
                detail: format!("{name}: {detail}"),
            }),
        }
    }
    Ok(report)
}

/// A checkpoint note's checkpoint, its signature checked when `keys` are given.
fn read_checkpoint(note: &str, keys: &[VerifierKey]) -> std::result::Result<Checkpoint, String> {
    let text = if keys.is_empty() {
        split_note(note).map(|(text, _)| text)
    } else {
        open_note(note, keys)
    }
    .map_err(|error| error.to_string())?;
    Checkpoint::parse(text).map_err(|error| error.message().to_string())
}

fn base64_of(hash: &Hash) -> String {
    base64::engine::general_purpose::STANDARD.encode(hash)
}
