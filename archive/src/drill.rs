//! Restore drill reports: what `chatvault drill` sampled, what it found and how long it took, signed with the
//! archive's checkpoint key and committed to the archive through the one commit protocol, as the stream
//! [`DRILL_TOPIC`] (partition 0, one manifest per drill naming one file `drills/<seq>-<batch>.txt`). Like
//! every stream, its manifests become leaves of the transparency log, so a report cannot be removed or
//! rewritten unnoticed once a checkpoint covers it; `chatvault verify` checks the chain and the files.
//!
//! A report file is a C2SP signed note whose text is `chatvault-drill-v1\n`, the report as one line of JSON
//! ([`DrillReport`]) and a newline.

use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::chain::{ChainReader, ChainWriter};
use crate::manifest::{ChainHead, Manifest};
use crate::tlog::committer::fetch_committed;
use crate::tlog::note::{NoteSigner, VerifierKey, open_note};
use chatvault_core::error::{Error, Result};

/// The stream of drill reports (`manifests/topic=_drill/partition=0/`).
pub const DRILL_TOPIC: &str = "_drill";
pub const DRILL_PARTITION: i32 = 0;
pub const DRILLS_ROOT: &str = "drills";
const NOTE_HEADER: &str = "chatvault-drill-v1\n";

/// One drill's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillReport {
    pub started_at_micros: i64,
    pub finished_at_micros: i64,
    /// The restorer the conversations were restored through.
    pub restorer: String,
    /// The sample's seed (the same seed samples the same conversations of an unchanged archive).
    pub seed: u64,
    pub conversations: Vec<DrilledConversation>,
    /// What the check of the chains, key records and transparency log found (empty: nothing).
    pub archive_problems: Vec<String>,
    /// Leaves the newest verified checkpoint covers (0: none).
    pub checkpoint_tree_size: u64,
    pub passed: bool,
}

/// One sampled conversation: restored through the restorer, re-read from its Parquet files, compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrilledConversation {
    pub tenant_id: String,
    pub conversation_id: String,
    /// Events the restorer returned, and events the files hold (copies collapsed).
    pub restored_events: u64,
    pub archived_events: u64,
    /// The archive files read.
    pub files: Vec<String>,
    pub restore_millis: u64,
    pub reread_millis: u64,
    pub passed: bool,
    /// What went wrong (empty when it passed), naming the file when one is at fault.
    pub detail: String,
}

/// A committed report, its signature checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredReport {
    pub seq: u64,
    pub path: String,
    pub report: DrillReport,
}

/// Signs `report` with `key` and commits it as the next drill; returns the path of the report file.
pub async fn commit_report(
    store: Arc<dyn ObjectStore>,
    key: Arc<dyn NoteSigner>,
    writer_id: &str,
    report: &DrillReport,
) -> Result<String> {
    let chain = ChainWriter::new(store, DRILL_TOPIC);
    let text = format!("{NOTE_HEADER}{}\n", serde_json::to_string(report)?);
    let note = tokio::task::spawn_blocking(move || key.sign_note(&text))
        .await
        .map_err(|error| Error::internal(format!("signing task failed: {error}")))??;
    let bytes = Bytes::from(note.into_bytes());
    // A concurrent drill may take the sequence number: take the next one.
    for _ in 0..5 {
        let head = chain.reader().head(DRILL_PARTITION).await?;
        let appended = chain
            .append_document(
                DRILL_PARTITION,
                &head,
                DRILLS_ROOT,
                "txt",
                writer_id,
                bytes.clone(),
            )
            .await?;
        if let Some(path) = appended {
            return Ok(path.to_string());
        }
    }
    Err(Error::new(
        chatvault_core::ErrorCode::Unavailable,
        "other drills kept taking the next report's sequence number; run the drill again",
    ))
}

/// Every committed drill report, oldest first, each chain link and signature checked (by one of `trusted`).
/// Fails at the first report that does not verify, naming it.
pub async fn read_reports(
    store: Arc<dyn ObjectStore>,
    trusted: &[VerifierKey],
) -> Result<Vec<StoredReport>> {
    let reader = ChainReader::new(store.clone(), DRILL_TOPIC);
    let verified = reader
        .read_after(DRILL_PARTITION, &ChainHead::empty())
        .await;
    let mut reports = Vec::new();
    for (manifest, _) in verified.manifests {
        reports.push(open_report(store.as_ref(), &manifest, trusted).await?);
    }
    match verified.error {
        Some(error) => Err(error.context("the drill reports' chain does not verify")),
        None => Ok(reports),
    }
}

/// The newest drill report, its signature checked (its chain is not walked: `read_reports` does that).
pub async fn newest_report(
    store: Arc<dyn ObjectStore>,
    trusted: &[VerifierKey],
) -> Result<Option<StoredReport>> {
    let reader = ChainReader::new(store.clone(), DRILL_TOPIC);
    let head = reader.head(DRILL_PARTITION).await?;
    let Some(newest) = head.next_seq.checked_sub(1) else {
        return Ok(None);
    };
    let (manifest, _) = reader.read(DRILL_PARTITION, newest).await?;
    open_report(store.as_ref(), &manifest, trusted)
        .await
        .map(Some)
}

async fn open_report(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    trusted: &[VerifierKey],
) -> Result<StoredReport> {
    let file = manifest.files.first().ok_or_else(|| {
        Error::internal(format!("drill manifest {} names no report", manifest.seq))
    })?;
    let bad = |why: String| Error::internal(format!("drill report {}: {why}", file.path));
    let bytes = fetch_committed(store, file).await?.map_err(bad)?;
    let note = String::from_utf8(bytes.to_vec()).map_err(|_| bad("not UTF-8".into()))?;
    let text = open_note(&note, trusted).map_err(|error| bad(error.to_string()))?;
    let json = text
        .strip_prefix(NOTE_HEADER)
        .ok_or_else(|| bad("not a chatvault-drill-v1 note".into()))?;
    let report: DrillReport = serde_json::from_str(json.trim_end())
        .map_err(|error| bad(format!("its report is not valid: {error}")))?;
    Ok(StoredReport {
        seq: manifest.seq,
        path: file.path.clone(),
        report,
    })
}
