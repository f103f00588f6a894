//! Applying a committed disposition plan: rewrite commits per partition, deletion of what they supersede, a
//! signed report (see the module documentation of [`super`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use object_store::path::Path;

use super::plan::{
    PlannedFile, decide_rows, governance, in_ranges, learn_participants, live_files, read_rows,
};
use super::{
    DispositionLog, DispositionReport, ObjectLeft, RewriteCommit, Stored, WrittenFile,
    rewrite_reason,
};
use crate::chain::{ChainReader, ChainWriter};
use crate::file::{FileOptions, encode_file};
use crate::governance::locks::LockRules;
use crate::keys::DataKeys;
use crate::manifest::{MANIFEST_FORMAT, Manifest, ManifestFile, Superseded, delete_if_exists};
use crate::tlog::note::NoteSigner;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::object_lock::{LockingS3, ObjectLock};

/// Who applies which plan of which tenant, and why.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub tenant_id: String,
    pub plan_id: u64,
    pub applied_by: String,
    pub reason: String,
}

/// How often a partition's rewrite is retried when the archiver keeps committing first.
const REWRITE_ATTEMPTS: usize = 8;

fn stale(plan_id: u64, why: String) -> Error {
    Error::new(
        ErrorCode::Conflict,
        format!("plan {plan_id} no longer describes the archive ({why}); make a new plan"),
    )
}

/// Executes plan `request.plan_id` exactly (see the module documentation of [`super`]) and commits its
/// signed report. `progress` is called after each file with (files done, files planned).
#[allow(clippy::too_many_arguments)]
pub async fn apply_plan(
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    locking: Option<&LockingS3>,
    signer: Arc<dyn NoteSigner>,
    file_options: &FileOptions,
    request: ApplyRequest,
    mut progress: impl FnMut(u64, u64),
) -> Result<Stored<DispositionReport>> {
    let log = DispositionLog::new(store.clone());
    let stored = log.plan(&request.tenant_id, request.plan_id).await?;
    let plan = &stored.document;
    for document in log.documents(&[]).await? {
        if let super::Document::Report(report) = &document.document
            && report.plan_id == plan.plan_id
        {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!(
                    "plan {} was applied by {} (report {})",
                    plan.plan_id, report.applied_by, document.path
                ),
            ));
        }
    }
    // Holds always win: a policy or hold changed since the plan was made, so it may delete what must stay.
    let mut now = governance(store, &plan.tenant_id, &plan.purpose, plan.as_of_micros).await?;
    if now.changes != plan.governance_changes || now.holds != plan.holds {
        return Err(stale(
            plan.plan_id,
            format!(
                "policies or holds changed since: {} governance change(s) then, {} now; holds then {:?}, now {:?}",
                plan.governance_changes, now.changes, plan.holds, now.holds
            ),
        ));
    }
    let (files, _) = live_files(store, &plan.topic, &plan.tenant_id).await?;
    learn_participants(&mut now.judge, store, keys, &files).await?;
    let reason = rewrite_reason(&stored.path);
    let rules = locking.map(|_| now.judge.lock_rules(&plan.tenant_id));
    let mut by_partition: BTreeMap<i32, Vec<&PlannedFile>> = BTreeMap::new();
    for file in &plan.files {
        by_partition.entry(file.partition).or_default().push(file);
    }
    let total = plan.files.len() as u64;
    let mut done = 0u64;
    for (partition, planned) in &by_partition {
        rewrite_partition(
            store,
            keys,
            file_options,
            &plan.topic,
            *partition,
            planned,
            &now.judge,
            rules.as_ref(),
            plan.plan_id,
            &reason,
        )
        .await?;
        done += planned.len() as u64;
        progress(done, total);
    }
    // Every partition is rewritten: what the rewrites superseded goes. A refusal (Object Lock) leaves the
    // object out of every restore, reported.
    let mut objects_left = Vec::new();
    for file in &plan.files {
        let path = Path::from(file.path.as_str());
        if let Err(error) = delete_superseded(store, locking, &path).await {
            objects_left.push(ObjectLeft {
                path: file.path.clone(),
                error: error.message().to_string(),
            });
        }
    }
    let rewrites = rewrites_of(store, &plan.topic, by_partition.keys().copied(), &reason).await?;
    let report = DispositionReport {
        format: "chatvault-disposition-report-v1".into(),
        plan_id: plan.plan_id,
        plan_path: stored.path.clone(),
        plan_sha256: stored.sha256.clone(),
        tenant_id: plan.tenant_id.clone(),
        purpose: plan.purpose.clone(),
        applied_by: request.applied_by,
        applied_at_micros: chatvault_core::time::now_micros(),
        reason: request.reason,
        files_rewritten: plan.totals.files_rewritten,
        files_deleted: plan.totals.files_deleted,
        rows_removed: plan.totals.rows_removed,
        rows_held: plan.totals.rows_held,
        rewrites,
        conversations: plan.conversations.clone(),
        objects_left,
    };
    log.commit_report(signer, report).await
}

/// Deletes a superseded object. On Object Lock storage its legal-hold flag is cleared first when set: the
/// plan decided its rows with every hold, and what a hold keeps is in the replacement (locked anew). A
/// retain-until date that has not passed makes S3 refuse, and the error says until when.
async fn delete_superseded(
    store: &Arc<dyn ObjectStore>,
    locking: Option<&LockingS3>,
    path: &Path,
) -> Result<()> {
    if let Some(locking) = locking {
        let status = match locking.lock_of(path).await {
            Ok(status) => status,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        if status.legal_hold {
            locking.set_legal_hold(path, false).await?;
        }
        if let Some(until) = status.retain_until_micros
            && until > chatvault_core::time::now_micros()
        {
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "{path} is retained by S3 Object Lock ({}) until {}; its rows are out of every restore, its bytes stay until then",
                    status.mode.as_deref().unwrap_or("lock"),
                    chatvault_core::time::format_time(until)
                ),
            ));
        }
    }
    delete_if_exists(store.as_ref(), path).await
}

/// Commits the rewrite of `planned` (files of one partition), unless an earlier apply of the same plan did.
#[allow(clippy::too_many_arguments)]
async fn rewrite_partition(
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    file_options: &FileOptions,
    topic: &str,
    partition: i32,
    planned: &[&PlannedFile],
    judge: &super::plan::Judge,
    rules: Option<&LockRules>,
    plan_id: u64,
    reason: &str,
) -> Result<()> {
    let writer = ChainWriter::new(store.clone(), topic);
    for _ in 0..REWRITE_ATTEMPTS {
        let chain = writer.reader().chain_files(partition).await;
        if let Some(error) = chain.error {
            return Err(error.context("no disposition on an archive whose chains do not verify"));
        }
        let mut to_do: Vec<(&PlannedFile, ManifestFile)> = Vec::new();
        for file in planned {
            match chain.live.iter().find(|(_, live)| live.path == file.path) {
                Some((seq, live)) if *seq == file.seq && live.sha256 == file.sha256 => {
                    to_do.push((file, live.clone()));
                }
                Some(_) => {
                    return Err(stale(
                        plan_id,
                        format!("{} is committed differently than planned", file.path),
                    ));
                }
                None => match chain.superseded.get(&file.path) {
                    Some((_, by)) if by == reason => {}
                    _ => {
                        return Err(stale(
                            plan_id,
                            format!(
                                "{} is no longer a live file of partition {partition}",
                                file.path
                            ),
                        ));
                    }
                },
            }
        }
        if to_do.is_empty() {
            return Ok(()); // rewritten by an earlier, interrupted apply of this plan
        }
        let mut written: Vec<(Path, Bytes, ManifestFile, ObjectLock)> = Vec::new();
        let mut supersedes = Vec::new();
        for (file, live) in &to_do {
            let (rows, key) = read_rows(store, keys, live).await?;
            let decision = decide_rows(judge, &rows);
            if rows.len() as u64 != file.rows || decision.remove != file.remove {
                return Err(stale(
                    plan_id,
                    format!(
                        "the rows of {} no longer decide as planned ({} planned for removal, {} now)",
                        file.path, file.rows_removed, decision.rows_removed
                    ),
                ));
            }
            supersedes.push(Superseded {
                seq: file.seq,
                path: file.path.clone(),
                sha256: file.sha256.clone(),
                reason: reason.to_string(),
            });
            if file.is_deleted() {
                continue;
            }
            let kept: Vec<_> = rows
                .into_iter()
                .enumerate()
                .filter(|(index, _)| !in_ranges(&file.remove, *index as u64))
                .map(|(_, row)| row)
                .collect();
            let lock = rules.map_or_else(ObjectLock::default, |rules| {
                rules.for_events(kept.iter().map(|row| &row.record))
            });
            let options = file_options.clone();
            let encode_key = key.clone();
            let encoded = tokio::task::spawn_blocking(move || {
                let mut refs: Vec<_> = kept.iter().collect();
                encode_file(&mut refs, &encode_key, &options)
            })
            .await
            .map_err(|error| Error::internal(format!("encoding task failed: {error}")))??;
            let path = replacement_path(&file.path, plan_id);
            let entry = ManifestFile::describe(&path, &live.tenant_id, &live.date, &key, &encoded);
            written.push((path, encoded.bytes, entry, lock));
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: topic.to_string(),
            partition,
            seq: chain.head.next_seq,
            start_offset: chain.head.end_offset,
            end_offset: chain.head.end_offset,
            batch_id: chatvault_core::random_hex(8)?,
            writer_id: format!("disposition-plan-{plan_id}"),
            created_at_micros: chatvault_core::time::now_micros(),
            prev_sha256: chain.head.last_sha256.clone(),
            files: written
                .iter()
                .map(|(_, _, entry, _)| entry.clone())
                .collect(),
            rejected_records: Vec::new(),
            offset_gaps: Vec::new(),
            supersedes,
        };
        let uploads = written
            .into_iter()
            .map(|(path, bytes, _, lock)| (path, bytes, lock))
            .collect();
        if writer.commit_with_locked_files(&manifest, uploads).await? {
            return Ok(());
        }
        // The archiver committed this sequence number first: read the chain again and rewrite on top.
        tracing::info!(
            partition,
            plan_id,
            "an archiver committed first; rewriting on the new head"
        );
    }
    Err(Error::unavailable(format!(
        "partition {partition} kept moving while plan {plan_id} was applied; apply it again"
    )))
}

/// `…/<name>.parquet` → `…/<name>.r<plan>.parquet`, without piling up suffixes of earlier rewrites. It keeps
/// the directory and the name's start, so readers' globs (`p*.parquet`) still find it.
fn replacement_path(path: &str, plan_id: u64) -> Path {
    let stem = path.strip_suffix(".parquet").unwrap_or(path);
    let stem = match stem.rsplit_once(".r") {
        Some((base, suffix))
            if suffix.chars().all(|c| c.is_ascii_digit()) && !suffix.is_empty() =>
        {
            base
        }
        _ => stem,
    };
    Path::from(format!("{stem}.r{plan_id}.parquet"))
}

/// The rewrite manifests of `partitions` whose supersessions carry `reason`.
async fn rewrites_of(
    store: &Arc<dyn ObjectStore>,
    topic: &str,
    partitions: impl Iterator<Item = i32>,
    reason: &str,
) -> Result<Vec<RewriteCommit>> {
    let reader = ChainReader::new(store.clone(), topic);
    let mut rewrites = Vec::new();
    for partition in partitions {
        let verified = reader
            .read_after(partition, &crate::manifest::ChainHead::empty())
            .await;
        if let Some(error) = verified.error {
            return Err(error);
        }
        for (manifest, head) in verified.manifests {
            if manifest.is_rewrite() && manifest.supersedes.iter().all(|s| s.reason == reason) {
                rewrites.push(RewriteCommit {
                    partition,
                    seq: manifest.seq,
                    manifest_sha256: head.last_sha256,
                    superseded: manifest.supersedes.iter().map(|s| s.path.clone()).collect(),
                    written: manifest
                        .files
                        .iter()
                        .map(|file| WrittenFile {
                            path: file.path.clone(),
                            sha256: file.sha256.clone(),
                            rows: file.rows,
                        })
                        .collect(),
                });
            }
        }
    }
    Ok(rewrites)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_keep_the_name_and_replace_earlier_suffixes() {
        let path =
            "events/tenant=acme/date=2026-01-02/p00000-o00000000000000000007-ab12-000.parquet";
        let once = replacement_path(path, 3);
        assert_eq!(
            once.as_ref(),
            "events/tenant=acme/date=2026-01-02/p00000-o00000000000000000007-ab12-000.r3.parquet"
        );
        assert_eq!(
            replacement_path(once.as_ref(), 12).as_ref(),
            "events/tenant=acme/date=2026-01-02/p00000-o00000000000000000007-ab12-000.r12.parquet"
        );
    }
}
