//! Disposition against an in-memory store: an apply interrupted after its rewrites resumes and reports them,
//! an archiver committing on the partition at the moment of the rewrite makes it retry on the new head, a
//! plan whose files another plan rewrote is refused, and the archive verifies after all of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::apply::{ApplyRequest, apply_plan};
use super::plan::{PlanRequest, make_plan};
use super::{DispositionLog, Purpose};
use crate::ArchivedEvent;
use crate::chain::ChainWriter;
use crate::file::{FileOptions, encode_file};
use crate::governance::policy::{DAY_MICROS, PolicyScope, RetentionPolicy};
use crate::governance::{Change, GovernanceLog};
use crate::keys::DataKeys;
use crate::keys::LocalKeyring;
use crate::layout;
use crate::manifest::{MANIFEST_FORMAT, Manifest, ManifestFile, OffsetGap};
use crate::tlog::note::{NoteSigner, SigningKey};
use crate::verify::{Sampling, verify_archive};
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_proto::v1::{ChatEvent, Sender};

const TOPIC: &str = "events";
const NOW: i64 = 1_764_000_000_000_000; // 2025-11-24
const OLD: i64 = NOW - 400 * DAY_MICROS;

struct Archive {
    store: Arc<dyn ObjectStore>,
    keys: DataKeys,
    _dir: tempfile::TempDir,
}

fn row(id: &str, at: i64, offset: i64, partition: i32) -> ArchivedEvent {
    ArchivedEvent {
        record: ChatEvent {
            event_id: id.into(),
            tenant_id: "acme".into(),
            conversation_id: "C1".into(),
            message_id: id.into(),
            kind: 1,
            sender: Some(Sender {
                id: "u-ann".into(),
                ..Default::default()
            }),
            occurred_at_micros: at,
            text: format!("text of {id}"),
            ..Default::default()
        },
        kafka_partition: partition,
        kafka_offset: offset,
    }
}

impl Archive {
    fn new(store: Arc<dyn ObjectStore>) -> Archive {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring = LocalKeyring::open(&dir.path().join("keyring.json")).expect("keyring");
        Archive {
            keys: DataKeys::new(store.clone(), Arc::new(keyring)),
            store,
            _dir: dir,
        }
    }

    /// Commits one batch of `rows` (`(id, occurred_at)`) on `partition`, one file per month, as the archiver
    /// does.
    async fn batch(&self, partition: i32, rows: &[(&str, i64)]) {
        let writer = ChainWriter::new(self.store.clone(), TOPIC);
        let head = writer.reader().head(partition).await.expect("head");
        let batch_id = chatvault_core::random_hex(4).expect("random");
        let events: Vec<ArchivedEvent> = rows
            .iter()
            .enumerate()
            .map(|(i, (id, at))| row(id, *at, head.end_offset + i as i64, partition))
            .collect();
        let mut files = Vec::new();
        let mut entries = Vec::new();
        let mut months: Vec<String> = events
            .iter()
            .map(|e| {
                chatvault_core::time::Date::from_micros(e.record.occurred_at_micros).month_period()
            })
            .collect();
        months.sort();
        months.dedup();
        for (index, month) in months.iter().enumerate() {
            let key = self.keys.get_or_create("acme", month).await.expect("key");
            let mut of_month: Vec<&ArchivedEvent> = events
                .iter()
                .filter(|e| {
                    chatvault_core::time::Date::from_micros(e.record.occurred_at_micros)
                        .month_period()
                        == *month
                })
                .collect();
            let date =
                chatvault_core::time::Date::from_micros(of_month[0].record.occurred_at_micros)
                    .iso();
            let encoded =
                encode_file(&mut of_month, &key, &FileOptions::default()).expect("encode");
            let path = layout::event_file_path(
                "acme",
                "",
                &date,
                partition,
                head.end_offset,
                &batch_id,
                index,
            );
            entries.push(ManifestFile::describe(&path, "acme", &date, &key, &encoded));
            files.push((path, encoded.bytes));
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: TOPIC.into(),
            partition,
            seq: head.next_seq,
            start_offset: head.end_offset,
            end_offset: head.end_offset + events.len() as i64,
            batch_id,
            writer_id: "archiver".into(),
            created_at_micros: NOW,
            prev_sha256: head.last_sha256,
            files: entries,
            rejected_records: Vec::new(),
            offset_gaps: Vec::new(),
            supersedes: Vec::new(),
        };
        assert!(
            writer
                .commit_with_files(&manifest, files)
                .await
                .expect("commit")
        );
    }

    /// The ids of every live row of the tenant, sorted.
    async fn live_ids(&self) -> Vec<String> {
        let (files, _) = super::plan::live_files(&self.store, TOPIC, "acme")
            .await
            .expect("live");
        let mut ids = Vec::new();
        for live in files {
            let (rows, _) = super::plan::read_rows(&self.store, &self.keys, &live.file)
                .await
                .expect("read");
            ids.extend(rows.into_iter().map(|r| r.record.event_id));
        }
        ids.sort();
        ids
    }

    async fn plan(&self) -> super::plan::Plan {
        self.plan_at(NOW + DAY_MICROS).await
    }

    async fn plan_at(&self, as_of_micros: i64) -> super::plan::Plan {
        let plan = make_plan(
            &self.store,
            &self.keys,
            PlanRequest {
                tenant_id: "acme".into(),
                purpose: Purpose::Retention,
                topic: TOPIC.into(),
                as_of_micros,
                planned_by: "test".into(),
                reason: String::new(),
            },
            |_, _| {},
        )
        .await
        .expect("plan");
        DispositionLog::new(self.store.clone())
            .commit_plan(plan)
            .await
            .expect("commit plan")
            .document
    }

    async fn apply(
        &self,
        plan_id: u64,
        signer: Arc<dyn NoteSigner>,
    ) -> Result<super::Stored<super::DispositionReport>> {
        apply_plan(
            &self.store,
            &self.keys,
            None,
            signer,
            &FileOptions::default(),
            ApplyRequest {
                tenant_id: "acme".into(),
                plan_id,
                applied_by: "test".into(),
                reason: String::new(),
            },
            |_, _| {},
        )
        .await
    }
}

async fn delete_after_a_year(store: &Arc<dyn ObjectStore>) {
    GovernanceLog::new(store.clone())
        .commit(
            Change::PolicySet {
                policy: RetentionPolicy {
                    tenant_id: "acme".into(),
                    policy_id: "chat-1y".into(),
                    scope: PolicyScope::Tenant,
                    retain_days: None,
                    delete_after_days: Some(365),
                    description: String::new(),
                    version: 0,
                    set_at_micros: 0,
                    set_by: String::new(),
                },
            },
            "test",
            "",
        )
        .await
        .expect("policy");
}

/// A signer that fails its first signature: the apply stops after its rewrites, before its report.
#[derive(Debug)]
struct FailsOnce {
    key: SigningKey,
    failed: AtomicBool,
}

impl NoteSigner for FailsOnce {
    fn name(&self) -> &str {
        self.key.name()
    }
    fn public_key(&self) -> &[u8] {
        self.key.public_key()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(Error::new(
                ErrorCode::Unavailable,
                "the signing key is unreachable",
            ));
        }
        self.key.sign(message)
    }
}

#[tokio::test]
async fn an_interrupted_apply_resumes_and_the_archive_verifies() {
    let archive = Archive::new(Arc::new(InMemory::new()));
    // Partition 0: a file mixing old and new rows (two months: two files), partition 1: only old rows.
    archive
        .batch(0, &[("old-1", OLD), ("new-1", NOW), ("old-2", OLD + 1)])
        .await;
    archive
        .batch(1, &[("old-3", OLD), ("old-4", OLD + 5)])
        .await;
    archive.batch(0, &[("new-2", NOW + 1)]).await;
    delete_after_a_year(&archive.store).await;
    let plan = archive.plan().await;
    assert_eq!(
        (
            plan.totals.rows_removed,
            plan.totals.files_deleted,
            plan.totals.files_rewritten
        ),
        (4, 2, 0)
    );
    let (key, _) = SigningKey::generate("disposition.test").expect("key");
    let signer = Arc::new(FailsOnce {
        key,
        failed: AtomicBool::new(false),
    });
    let error = archive
        .apply(plan.plan_id, signer.clone())
        .await
        .expect_err("the report cannot be signed");
    assert!(error.message().contains("unreachable"), "{error}");
    // The rewrites are committed: restores no longer see the old rows, though no report exists yet.
    assert_eq!(archive.live_ids().await, vec!["new-1", "new-2"]);
    let report = archive
        .apply(plan.plan_id, signer)
        .await
        .expect("resumed")
        .document;
    assert_eq!(report.rewrites.len(), 2, "{report:?}");
    assert_eq!(report.rows_removed, 4);
    let again = archive
        .apply(
            plan.plan_id,
            Arc::new(SigningKey::generate("x").expect("key").0),
        )
        .await;
    assert!(
        again
            .expect_err("applied")
            .message()
            .contains("was applied")
    );
    let verified = verify_archive(
        archive.store.clone(),
        &crate::tlog::LogTrust::default(),
        Sampling::All,
        |_| {},
    )
    .await
    .expect("verify");
    assert!(verified.is_intact(), "{:?}", verified.problems);
    assert_eq!(verified.files_superseded, 2);
    assert!(verified.superseded_present.is_empty());
}

#[tokio::test]
async fn a_plan_whose_files_were_rewritten_since_is_refused() {
    let archive = Archive::new(Arc::new(InMemory::new()));
    // One month's file: two rows due at the plan's time, one ten days younger that is not.
    archive
        .batch(
            0,
            &[
                ("old-1", OLD),
                ("old-2", OLD + 1),
                ("keep", OLD + 10 * DAY_MICROS),
            ],
        )
        .await;
    delete_after_a_year(&archive.store).await;
    let as_of = OLD + 370 * DAY_MICROS;
    let first = archive.plan_at(as_of).await;
    let second = archive.plan_at(as_of).await;
    assert_eq!(first.files, second.files);
    let signer = Arc::new(SigningKey::generate("disposition.test").expect("key").0);
    let report = archive
        .apply(first.plan_id, signer.clone())
        .await
        .expect("applied")
        .document;
    assert_eq!((report.files_rewritten, report.rows_removed), (1, 2));
    // The file keeps its newest row, re-encoded.
    let written = &report.rewrites[0].written[0];
    assert!(
        written
            .path
            .ends_with(&format!(".r{}.parquet", first.plan_id)),
        "{written:?}"
    );
    assert_eq!(archive.live_ids().await, vec!["keep"]);
    let stale = archive
        .apply(second.plan_id, signer)
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), ErrorCode::Conflict);
    assert!(stale.message().contains("no longer a live file"), "{stale}");
}

/// Commits what an archiver commits for a batch of one record Kafka no longer had (no file: an offset gap).
async fn archiver_batch_without_files(store: Arc<InMemory>) {
    let writer = ChainWriter::new(store, TOPIC);
    let head = writer.reader().head(0).await.expect("head");
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        topic: TOPIC.into(),
        partition: 0,
        seq: head.next_seq,
        start_offset: head.end_offset,
        end_offset: head.end_offset + 1,
        batch_id: "raced".into(),
        writer_id: "archiver".into(),
        created_at_micros: NOW,
        prev_sha256: head.last_sha256,
        files: Vec::new(),
        rejected_records: Vec::new(),
        offset_gaps: vec![OffsetGap {
            from: head.end_offset,
            to: head.end_offset + 1,
        }],
        supersedes: Vec::new(),
    };
    assert!(
        writer
            .commit_with_files(&manifest, Vec::new())
            .await
            .expect("commit")
    );
}

/// Before the first create of a rewrite manifest, commits an archiver batch at that sequence number: the
/// race a rewrite loses to the archiver.
#[derive(Debug)]
struct ArchiverFirst {
    inner: Arc<InMemory>,
    raced: AtomicUsize,
}

impl std::fmt::Display for ArchiverFirst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArchiverFirst")
    }
}

#[async_trait]
impl ObjectStore for ArchiverFirst {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let bytes: Bytes = payload.clone().into();
        let is_rewrite = matches!(opts.mode, PutMode::Create)
            && location.as_ref().starts_with("manifests/topic=events/")
            && bytes.windows(17).any(|w| w == b"disposition-plan-");
        if is_rewrite && self.raced.fetch_add(1, Ordering::SeqCst) == 0 {
            archiver_batch_without_files(self.inner.clone()).await;
        }
        self.inner.put_opts(location, payload, opts).await
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
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
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

#[tokio::test]
async fn a_rewrite_that_loses_to_the_archiver_retries_on_the_new_head() {
    let inner = Arc::new(InMemory::new());
    let racing = Arc::new(ArchiverFirst {
        inner: inner.clone(),
        raced: AtomicUsize::new(0),
    });
    let archive = Archive::new(racing.clone());
    archive.batch(0, &[("old-1", OLD), ("new-1", NOW)]).await;
    delete_after_a_year(&archive.store).await;
    let plan = archive.plan().await;
    let signer = Arc::new(SigningKey::generate("disposition.test").expect("key").0);
    let report = archive
        .apply(plan.plan_id, signer)
        .await
        .expect("applied")
        .document;
    assert_eq!(
        racing.raced.load(Ordering::SeqCst),
        2,
        "the first rewrite lost, the second committed"
    );
    // The archiver's batch holds seq 1; the rewrite came after it, and nothing of either is lost.
    assert_eq!(report.rewrites.len(), 1);
    assert_eq!(report.rewrites[0].seq, 2);
    assert_eq!(archive.live_ids().await, vec!["new-1"]);
    let leftover = archive
        .store
        .list(Some(&Path::from("events")))
        .collect_paths()
        .await;
    // Only live files remain: the lost rewrite's uploads were removed with it, the superseded file deleted.
    assert_eq!(leftover.len(), 1, "{leftover:?}");
    let verified = verify_archive(
        archive.store.clone(),
        &crate::tlog::LogTrust::default(),
        Sampling::All,
        |_| {},
    )
    .await
    .expect("verify");
    assert!(verified.is_intact(), "{:?}", verified.problems);
}

trait CollectPaths {
    async fn collect_paths(self) -> Vec<String>;
}

impl CollectPaths for BoxStream<'static, object_store::Result<ObjectMeta>> {
    async fn collect_paths(self) -> Vec<String> {
        use futures::StreamExt;
        self.map(|meta| meta.expect("list").location.to_string())
            .collect()
            .await
    }
}
