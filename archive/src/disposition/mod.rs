//! Disposition: removing from the archive what retention policies make due and what a data subject's erasure
//! request names, as a plan that is reviewed and then applied exactly, with a signed report.
//!
//! - A **plan** ([`Plan`], [`plan::make_plan`]) reads the tenant's live files (every chain verified, rewrites
//!   applied), decides each row with the policies and holds of one governance version ([`plan::Judge`]), and
//!   lists exactly which rows of which files go (row ranges in file order), with counts per conversation and
//!   the policy and version deciding them, and the rows a hold keeps. It changes nothing; it is committed as a
//!   document on the `_disposition` stream, and its id is its sequence number there.
//! - **Apply** ([`apply::apply_plan`]) executes one plan by id, so what was reviewed is what runs. It refuses
//!   when the governance stream moved since the plan (a policy or hold changed: holds always win, so a new
//!   plan is needed), when a planned file is no longer live as planned, or when re-deciding a file's rows no
//!   longer gives the planned rows. Per partition it commits one **rewrite manifest** in the data chain
//!   (`Manifest::supersedes`, an empty offset range): files that keep rows are re-encoded under the same data
//!   key and replace the old ones, fully expired files are superseded without replacement. Then it deletes
//!   the superseded objects and commits a **signed report** (a note signed with the integrity signing key, as
//!   drill reports are) to the `_disposition` stream. A crashed apply is resumed by applying the same plan
//!   again: partitions already rewritten for the plan are recognised by the rewrite's reason.
//! - Readers honour rewrites: the restorer's index, `chatvault verify` ([`crate::verify`]), drills. Verify
//!   checks that every superseded file was live in its chain and warns about superseded files still present.

pub mod apply;
pub mod explain;
pub mod locks;
pub mod plan;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::chain::{ChainReader, ChainWriter};
use crate::governance::policy::PolicyRef;
use crate::manifest::{ChainHead, Manifest};
use crate::tlog::committer::fetch_committed;
use crate::tlog::note::{NoteSigner, VerifierKey, open_note};
use chatvault_core::error::{Error, ErrorCode, Result};

pub use plan::Plan;

pub const DISPOSITION_TOPIC: &str = "_disposition";
pub const DISPOSITION_PARTITION: i32 = 0;
pub const DISPOSITION_ROOT: &str = "disposition";
pub const PLAN_FORMAT: &str = "chatvault-disposition-plan-v1";
const REPORT_NOTE_HEADER: &str = "chatvault-disposition-report-v1\n";

/// What a disposition removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "purpose", rename_all = "snake_case")]
pub enum Purpose {
    /// The events the tenant's retention policies make due at the plan's time.
    Retention,
    /// A data subject's erasure request: the events the subject authored (sent, edited, deleted, reacted,
    /// joined or left) and/or the events mentioning them.
    Erasure {
        subject: String,
        authored: bool,
        mentioning: bool,
    },
}

impl Purpose {
    pub fn describe(&self) -> String {
        match self {
            Purpose::Retention => "retention".into(),
            Purpose::Erasure {
                subject,
                authored,
                mentioning,
            } => {
                let what = match (authored, mentioning) {
                    (true, true) => "authored by or mentioning",
                    (true, false) => "authored by",
                    _ => "mentioning",
                };
                format!("erasure of events {what} {subject}")
            }
        }
    }

    pub fn check(&self) -> Result<()> {
        if let Purpose::Erasure {
            subject,
            authored,
            mentioning,
        } = self
        {
            if subject.is_empty() || subject.len() > 256 || subject.chars().any(char::is_control) {
                return Err(Error::invalid_argument(
                    "subject must be a user id of 1 to 256 bytes without control characters",
                ));
            }
            if !authored && !mentioning {
                return Err(Error::invalid_argument(
                    "an erasure removes events authored by the subject, mentioning them, or both: choose at least one",
                ));
            }
        }
        Ok(())
    }
}

/// Rows removed from one conversation, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationCounts {
    pub conversation_id: String,
    pub rows_removed: u64,
    /// Rows the purpose targets that a legal hold keeps.
    pub rows_held: u64,
    /// Per deciding policy (retention only), the rows it removes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyCount>,
    /// The holds that keep rows of the conversation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCount {
    pub policy: PolicyRef,
    pub rows: u64,
}

/// One rewrite commit of an applied plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteCommit {
    pub partition: i32,
    /// The rewrite manifest's sequence number in the data chain.
    pub seq: u64,
    pub manifest_sha256: String,
    /// Files superseded (each named with its SHA-256 in the manifest).
    pub superseded: Vec<String>,
    /// Replacement files (with fewer rows).
    pub written: Vec<WrittenFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    pub path: String,
    pub sha256: String,
    pub rows: u64,
}

/// A superseded object that could not be deleted (for example under S3 Object Lock): out of every restore,
/// but its bytes remain until the deletion succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLeft {
    pub path: String,
    pub error: String,
}

/// What an applied plan did, signed and kept in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispositionReport {
    pub format: String,
    pub plan_id: u64,
    pub plan_path: String,
    pub plan_sha256: String,
    pub tenant_id: String,
    #[serde(flatten)]
    pub purpose: Purpose,
    pub applied_by: String,
    pub applied_at_micros: i64,
    pub reason: String,
    pub rewrites: Vec<RewriteCommit>,
    pub files_rewritten: u64,
    pub files_deleted: u64,
    pub rows_removed: u64,
    pub rows_held: u64,
    pub conversations: Vec<ConversationCounts>,
    pub objects_left: Vec<ObjectLeft>,
}

/// A document of the `_disposition` stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    Plan(Box<Plan>),
    Report(Box<DispositionReport>),
}

/// A document with where it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    pub seq: u64,
    pub path: String,
    pub sha256: String,
    pub document: T,
}

/// The `_disposition` stream: plans (JSON) and signed reports (notes), one document per manifest.
#[derive(Debug, Clone)]
pub struct DispositionLog {
    chain: ChainWriter,
}

/// How often a document's commit is retried when other writers keep taking the sequence number.
const COMMIT_ATTEMPTS: usize = 5;

impl DispositionLog {
    pub fn new(store: Arc<dyn ObjectStore>) -> DispositionLog {
        DispositionLog {
            chain: ChainWriter::new(store, DISPOSITION_TOPIC),
        }
    }

    fn store(&self) -> &Arc<dyn ObjectStore> {
        self.chain.reader().store()
    }

    /// Commits `plan`, setting its id to the sequence number it is committed at.
    pub async fn commit_plan(&self, mut plan: Plan) -> Result<Stored<Plan>> {
        for _ in 0..COMMIT_ATTEMPTS {
            let head = self.chain.reader().head(DISPOSITION_PARTITION).await?;
            plan.plan_id = head.next_seq;
            let bytes = Bytes::from(serde_json::to_vec_pretty(&plan)?);
            let sha256 = crate::file::sha256_hex(&bytes);
            if let Some(path) = self.append(&head, "json", bytes).await? {
                return Ok(Stored {
                    seq: plan.plan_id,
                    path: path.to_string(),
                    sha256,
                    document: plan,
                });
            }
        }
        Err(contended())
    }

    /// Signs `report` with `signer` and commits it.
    pub async fn commit_report(
        &self,
        signer: Arc<dyn NoteSigner>,
        report: DispositionReport,
    ) -> Result<Stored<DispositionReport>> {
        let text = format!("{REPORT_NOTE_HEADER}{}\n", serde_json::to_string(&report)?);
        let note = tokio::task::spawn_blocking(move || signer.sign_note(&text))
            .await
            .map_err(|error| Error::internal(format!("signing task failed: {error}")))??;
        let bytes = Bytes::from(note.into_bytes());
        let sha256 = crate::file::sha256_hex(&bytes);
        for _ in 0..COMMIT_ATTEMPTS {
            let head = self.chain.reader().head(DISPOSITION_PARTITION).await?;
            if let Some(path) = self.append(&head, "txt", bytes.clone()).await? {
                return Ok(Stored {
                    seq: head.next_seq,
                    path: path.to_string(),
                    sha256,
                    document: report,
                });
            }
        }
        Err(contended())
    }

    async fn append(
        &self,
        head: &ChainHead,
        extension: &str,
        bytes: Bytes,
    ) -> Result<Option<object_store::path::Path>> {
        self.chain
            .append_document(
                DISPOSITION_PARTITION,
                head,
                DISPOSITION_ROOT,
                extension,
                "disposition",
                bytes,
            )
            .await
    }

    /// Every document of the stream, in order; reports' signatures are checked against `trusted` (none
    /// given: not checked). Fails when the stream's chain does not verify.
    pub async fn documents(&self, trusted: &[VerifierKey]) -> Result<Vec<Stored<Document>>> {
        let verified = self
            .chain
            .reader()
            .read_after(DISPOSITION_PARTITION, &ChainHead::empty())
            .await;
        if let Some(error) = verified.error {
            return Err(error.context("the disposition stream does not verify"));
        }
        let mut documents = Vec::with_capacity(verified.manifests.len());
        for (manifest, _) in verified.manifests {
            documents.push(self.open(&manifest, trusted).await?);
        }
        Ok(documents)
    }

    /// Plan `plan_id` of `tenant`: NotFound when there is none (or it is another tenant's: a caller learns
    /// nothing about other tenants' plans).
    pub async fn plan(&self, tenant: &str, plan_id: u64) -> Result<Stored<Plan>> {
        let not_found = || {
            Error::new(
                ErrorCode::NotFound,
                format!("tenant {tenant} has no disposition plan {plan_id}"),
            )
        };
        let reader = self.chain.reader();
        let head = reader.head(DISPOSITION_PARTITION).await?;
        if plan_id >= head.next_seq {
            return Err(not_found());
        }
        // The whole chain is verified, not only the plan's manifest: what is applied must be what was planned.
        let verified = reader
            .read_after(DISPOSITION_PARTITION, &ChainHead::empty())
            .await;
        if let Some(error) = verified.error {
            return Err(error.context("the disposition stream does not verify"));
        }
        let Some((manifest, _)) = verified
            .manifests
            .into_iter()
            .find(|(manifest, _)| manifest.seq == plan_id)
        else {
            return Err(not_found());
        };
        match self.open(&manifest, &[]).await? {
            Stored {
                seq,
                path,
                sha256,
                document: Document::Plan(plan),
            } if plan.tenant_id == tenant => Ok(Stored {
                seq,
                path,
                sha256,
                document: *plan,
            }),
            _ => Err(not_found()),
        }
    }

    async fn open(&self, manifest: &Manifest, trusted: &[VerifierKey]) -> Result<Stored<Document>> {
        let file = manifest.files.first().ok_or_else(|| {
            Error::internal(format!(
                "disposition manifest {} names no document",
                manifest.seq
            ))
        })?;
        let bad =
            |why: String| Error::internal(format!("disposition document {}: {why}", file.path));
        let bytes = fetch_committed(self.store().as_ref(), file)
            .await?
            .map_err(bad)?;
        let document = if file.path.ends_with(".json") {
            let plan: Plan = serde_json::from_slice(&bytes)
                .map_err(|error| bad(format!("not a valid plan: {error}")))?;
            if plan.format != PLAN_FORMAT || plan.plan_id != manifest.seq {
                return Err(bad(format!(
                    "plan format {} with id {} is not a {PLAN_FORMAT} plan committed as {}",
                    plan.format, plan.plan_id, manifest.seq
                )));
            }
            Document::Plan(Box::new(plan))
        } else {
            let note = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8".into()))?;
            let text = if trusted.is_empty() {
                note.split("\n\n").next().unwrap_or_default()
            } else {
                open_note(note, trusted).map_err(|error| bad(error.to_string()))?
            };
            let json = text
                .strip_prefix(REPORT_NOTE_HEADER)
                .ok_or_else(|| bad("not a chatvault-disposition-report-v1 note".into()))?;
            let report: DispositionReport = serde_json::from_str(json.trim_end())
                .map_err(|error| bad(format!("not a valid report: {error}")))?;
            Document::Report(Box::new(report))
        };
        Ok(Stored {
            seq: manifest.seq,
            path: file.path.clone(),
            sha256: file.sha256.clone(),
            document,
        })
    }
}

fn contended() -> Error {
    Error::new(
        ErrorCode::Unavailable,
        "other writers kept taking the disposition stream's next sequence number; try again",
    )
}

/// The `reason` a rewrite manifest gives for what it supersedes on behalf of plan `plan_id`: how an
/// interrupted apply recognises its own rewrites.
pub fn rewrite_reason(plan_path: &str) -> String {
    format!("disposition plan {plan_path}")
}

/// Checks a report against the archive: every rewrite it names is the manifest committed at that place in
/// its chain, superseding exactly what the report says for the report's plan.
pub async fn check_report(
    store: Arc<dyn ObjectStore>,
    topic: &str,
    report: &DispositionReport,
) -> Result<()> {
    let reader = ChainReader::new(store, topic);
    let reason = rewrite_reason(&report.plan_path);
    for rewrite in &report.rewrites {
        let (manifest, sha256) = reader.read(rewrite.partition, rewrite.seq).await?;
        let superseded: Vec<&str> = manifest
            .supersedes
            .iter()
            .map(|s| s.path.as_str())
            .collect();
        let written: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        let matches = sha256 == rewrite.manifest_sha256
            && manifest.supersedes.iter().all(|s| s.reason == reason)
            && superseded
                == rewrite
                    .superseded
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
            && written
                == rewrite
                    .written
                    .iter()
                    .map(|w| w.path.as_str())
                    .collect::<Vec<_>>();
        if !matches {
            return Err(Error::internal(format!(
                "the report of plan {} names rewrite manifest {} of partition {}, which the chain holds \
                 differently",
                report.plan_id, rewrite.seq, rewrite.partition
            )));
        }
    }
    Ok(())
}
