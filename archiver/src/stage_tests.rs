//! Each commit stage on its own ([`crate::encode`], [`crate::upload`], [`crate::commit`]) and the lane that
//! runs them ([`crate::lane`]), over the fakes of [`crate::test_support`]: an in-memory store, a dead-letter
//! recorder, a local keyring. No Kafka: batches are sealed here the way the poller seals them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chatvault_archive::ArchivedEvent;
use chatvault_archive::chain::Commit;
use chatvault_archive::file::{decode_file, sha256_hex};
use chatvault_archive::kind::ChatEvents;
use chatvault_archive::layout;
use chatvault_archive::manifest::{ChainHead, DeadLetter, PendingIntent, RejectedRecord};
use chatvault_core::event::kafka_key;
use chatvault_core::time::{Date, MICROS_PER_SECOND};
use chatvault_proto::v1::ChatEvent;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc};

use crate::batch::{OpenBatch, Rejected, SealedBatch};
use crate::encode::Prepared;
use crate::lane::{BatchOutcome, LaneReport, QUICK_ATTEMPTS};
use crate::test_support::{DEAD_LETTER_TOPIC, TOPIC, TestStages, WRITER_ID};

const PARTITION: i32 = 3;
/// The last day of a month and the first of the next: two dates, and two data-key periods per tenant.
const NOV_30: &str = "2025-11-30";
const DEC_01: &str = "2025-12-01";
/// How long a test waits for a lane's report before it fails (a bound, not an expected duration).
const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// A record as the poller hands it to a batch.
enum Record {
    Event(Box<ArchivedEvent>),
    /// Not a chat event: the poller rejects it when it arrives.
    Undecodable(i64),
}

/// An event of `tenant` in `conversation` at noon UTC of `date` (`yyyy-mm-dd`), from `offset` of the test
/// partition.
fn event(tenant: &str, conversation: &str, date: &str, offset: i64) -> Record {
    let noon = Date::parse_iso(date).expect("date").start_micros() + 12 * 3600 * MICROS_PER_SECOND;
    Record::Event(Box::new(ArchivedEvent {
        record: ChatEvent {
            event_id: format!("e{offset}"),
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            // Unique per event: a file that mixed up two rows' times would not decode equal.
            occurred_at_micros: noon + offset,
            text: format!("message at offset {offset}"),
            ..Default::default()
        },
        kafka_partition: PARTITION,
        kafka_offset: offset,
    }))
}

/// A batch as the poller seals it: `records`, in offset order, pushed into the partition's open batch of
/// sequence number `seq` starting at `start_offset`.
fn seal(seq: u64, start_offset: i64, records: Vec<Record>) -> SealedBatch {
    let mut batch = OpenBatch::<ChatEvents>::new(PARTITION, 1, seq, start_offset);
    for record in records {
        match record {
            Record::Event(archived) => batch.push_event(*archived, 100),
            Record::Undecodable(offset) => batch.push_rejected(Rejected {
                offset,
                reason: "not a ChatEvent".into(),
                key: None,
                value: vec![0xff, 0x00],
            }),
        }
    }
    batch.seal()
}

/// Two tenants on two dates, four (tenant, date) pairs, interleaved as Kafka would deliver them.
fn two_tenants_two_dates(seq: u64, start: i64) -> SealedBatch {
    seal(
        seq,
        start,
        vec![
            event("acme", "c1", NOV_30, start),
            event("globex", "c9", DEC_01, start + 1),
            event("acme", "c2", DEC_01, start + 2),
            event("globex", "c9", NOV_30, start + 3),
            event("acme", "c2", NOV_30, start + 4),
            event("acme", "c1", DEC_01, start + 5),
            event("globex", "c8", DEC_01, start + 6),
        ],
    )
}

/// The chain head after `batch`, as a lane continues it.
fn head_after(batch: &SealedBatch, sha256: String) -> ChainHead {
    ChainHead {
        next_seq: batch.seq + 1,
        end_offset: batch.end_offset,
        last_sha256: sha256,
    }
}

/// Events of `batch` of `tenant` on `date`, in offset order.
fn events_of(batch: &SealedBatch, tenant: &str, date: &str) -> Vec<ArchivedEvent> {
    batch
        .events
        .iter()
        .filter(|archived| {
            archived.record.tenant_id == tenant
                && Date::from_micros(archived.record.occurred_at_micros).iso() == date
        })
        .cloned()
        .collect()
}

async fn exists(store: &dyn ObjectStore, path: &Path) -> bool {
    match store.head(path).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(error) => panic!("head {path}: {error}"),
    }
}

/// Paths of every object below `prefix`, sorted.
async fn listed(store: &dyn ObjectStore, prefix: &str) -> BTreeSet<String> {
    store
        .list(Some(&Path::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .expect("list")
}

fn file_paths(prepared: &Prepared) -> BTreeSet<String> {
    prepared
        .files
        .iter()
        .map(|file| file.path.to_string())
        .collect()
}

async fn encoded(harness: &TestStages, batch: &SealedBatch) -> Prepared {
    harness
        .stages
        .encode(&Arc::new(batch.clone()))
        .await
        .expect("encode")
}

/// Encodes, uploads and commits `batch` on `head`; the batch must win its sequence number.
async fn committed(
    harness: &TestStages,
    batch: &SealedBatch,
    head: &ChainHead,
) -> (Prepared, String) {
    let mut prepared = encoded(harness, batch).await;
    harness
        .stages
        .upload(batch, &mut prepared)
        .await
        .expect("upload");
    match harness
        .stages
        .commit_manifest(batch, head, &prepared)
        .await
        .expect("commit")
    {
        Commit::Committed { sha256 } => (prepared, sha256),
        lost => panic!("batch {} lost its sequence number: {lost:?}", batch.seq),
    }
}

// --- encode ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn encode_writes_one_file_per_tenant_and_date_that_decodes_to_exactly_its_events() {
    let harness = TestStages::new();
    let batch = two_tenants_two_dates(0, 40);
    let prepared = encoded(&harness, &batch).await;

    // Files are numbered in (tenant, date) order within the batch.
    let expected = [
        ("acme", NOV_30),
        ("acme", DEC_01),
        ("globex", NOV_30),
        ("globex", DEC_01),
    ];
    let paths: Vec<Path> = prepared
        .files
        .iter()
        .map(|file| file.path.clone())
        .collect();
    let expected_paths: Vec<Path> = expected
        .iter()
        .enumerate()
        .map(|(index, (tenant, date))| {
            layout::event_file_path(tenant, "", date, PARTITION, 40, &prepared.batch_id, index)
        })
        .collect();
    assert_eq!(paths, expected_paths);

    let reader_keys = harness.reader_data_keys();
    for (file, (tenant, date)) in prepared.files.iter().zip(expected) {
        let entry = &file.manifest_entry;
        assert_eq!(entry.path, file.path.to_string());
        assert_eq!(
            (entry.tenant_id.as_str(), entry.date.as_str()),
            (tenant, date)
        );
        assert_eq!(
            entry.key_period,
            date[..7],
            "one data key per tenant and month"
        );
        assert_eq!(entry.sha256, sha256_hex(&file.bytes));
        assert_eq!(entry.bytes, file.bytes.len() as u64);
        // The key a reader finds from the stored key record opens the file.
        let key = reader_keys
            .get(tenant, &entry.key_period)
            .await
            .expect("the file's data key is stored");
        assert_eq!(key.dek_id, entry.dek_id);
        let mut decoded = decode_file(file.bytes.clone(), &key, None).expect("decode");
        decoded.sort_by_key(|archived| archived.kafka_offset);
        let own = events_of(&batch, tenant, date);
        assert_eq!(entry.rows, own.len() as u64);
        assert_eq!(decoded, own, "file of {tenant} {date}");
    }
    assert!(prepared.rejected.is_empty());
    assert!(
        listed(harness.store.as_ref(), layout::EVENTS_ROOT)
            .await
            .is_empty(),
        "encoding uploads nothing"
    );
}

#[tokio::test]
async fn a_tenant_without_a_key_becomes_rejected_records_while_the_others_get_files() {
    // The keyring is read-only and knows acme only: globex can never get a data key here.
    let harness = TestStages::with_read_only_keyring(&["acme"]).await;
    let batch = seal(
        0,
        10,
        vec![
            event("acme", "c1", NOV_30, 10),
            event("globex", "c9", NOV_30, 11),
            Record::Undecodable(12),
            event("globex", "c9", DEC_01, 13),
            event("acme", "c1", NOV_30, 14),
        ],
    );
    let prepared = encoded(&harness, &batch).await;

    let offsets: Vec<i64> = prepared
        .rejected
        .iter()
        .map(|record| record.offset)
        .collect();
    assert_eq!(
        offsets,
        vec![11, 12, 13],
        "globex's events join the undecodable record, in offset order"
    );
    for record in prepared
        .rejected
        .iter()
        .filter(|record| record.offset != 12)
    {
        let original = batch
            .events
            .iter()
            .find(|archived| archived.kafka_offset == record.offset)
            .expect("a batch event");
        // The dead-letter copy is the record as it was produced: its key and the event.
        assert_eq!(record.key, Some(kafka_key("globex", "c9")));
        assert_eq!(
            ChatEvent::decode(record.value.as_slice()).expect("an event"),
            original.record
        );
        assert!(record.reason.contains("globex"), "{}", record.reason);
    }
    assert_eq!(prepared.rejected[1].reason, "not a ChatEvent");

    assert_eq!(prepared.files.len(), 1);
    let file = &prepared.files[0];
    assert_eq!(
        file.path,
        layout::event_file_path("acme", "", NOV_30, PARTITION, 10, &prepared.batch_id, 0)
    );
    let key = harness
        .reader_data_keys()
        .get("acme", &file.manifest_entry.key_period)
        .await
        .expect("acme's data key");
    let mut decoded = decode_file(file.bytes.clone(), &key, None).expect("decode");
    decoded.sort_by_key(|archived| archived.kafka_offset);
    assert_eq!(decoded, events_of(&batch, "acme", NOV_30));
}

#[tokio::test]
async fn a_key_storage_failure_fails_the_encode_stage_instead_of_rejecting_records() {
    let harness = TestStages::new();
    let batch = two_tenants_two_dates(0, 0);
    // Storing a new data key fails: transient, so nothing may be rejected for it.
    harness.store.fail_puts_containing(Some("keys/"));
    let failed = harness.stages.encode(&Arc::new(batch.clone())).await;
    assert!(failed.is_err(), "a transient key failure fails the stage");

    harness.store.fail_puts_containing(None);
    let prepared = encoded(&harness, &batch).await;
    assert!(prepared.rejected.is_empty());
    assert_eq!(prepared.files.len(), 4);
}

// --- upload ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_file_is_uploaded_before_its_batch_has_an_upload_intent() {
    let harness = TestStages::new();
    let store = harness.object_store();
    let batch = two_tenants_two_dates(0, 0);
    let mut prepared = encoded(&harness, &batch).await;
    let intent_path = layout::pending_path(TOPIC, PARTITION, &prepared.batch_id);

    // The intent cannot be written: no file may be uploaded (it would be an orphan nobody can find).
    harness.store.fail_puts_containing(Some("/pending/"));
    assert!(harness.stages.upload(&batch, &mut prepared).await.is_err());
    assert!(listed(store.as_ref(), layout::EVENTS_ROOT).await.is_empty());

    // The files cannot be written: the intent is there already, naming every one of them.
    harness.store.fail_puts_containing(Some("events/"));
    assert!(harness.stages.upload(&batch, &mut prepared).await.is_err());
    let bytes = store
        .get(&intent_path)
        .await
        .expect("the intent is stored")
        .bytes()
        .await
        .expect("intent bytes");
    let intent: PendingIntent = serde_json::from_slice(&bytes).expect("an intent");
    assert_eq!(
        (
            intent.batch_id.as_str(),
            intent.seq,
            intent.writer_id.as_str()
        ),
        (prepared.batch_id.as_str(), 0, WRITER_ID)
    );
    assert_eq!(
        intent.files.iter().cloned().collect::<BTreeSet<_>>(),
        file_paths(&prepared)
    );
    assert_eq!(intent.files.len(), 4);
    assert!(listed(store.as_ref(), layout::EVENTS_ROOT).await.is_empty());
}

#[tokio::test]
async fn a_retried_upload_stores_every_file_and_dead_letters_each_rejected_record_once() {
    let harness = TestStages::new();
    let store = harness.object_store();
    let mut records = vec![Record::Undecodable(0), Record::Undecodable(1)];
    records.push(event("acme", "c1", NOV_30, 2));
    records.push(event("globex", "c9", DEC_01, 3));
    let batch = seal(0, 0, records);
    let mut prepared = encoded(&harness, &batch).await;

    harness.store.fail_puts_containing(Some("events/"));
    for _ in 0..2 {
        assert!(harness.stages.upload(&batch, &mut prepared).await.is_err());
    }
    harness.store.fail_puts_containing(None);
    harness
        .stages
        .upload(&batch, &mut prepared)
        .await
        .expect("upload once storage is back");

    assert_eq!(
        harness.dead_letters.copies(),
        batch.rejected,
        "each rejected record is produced once across three attempts"
    );
    assert_eq!(
        prepared.dead_letters,
        Some(vec![
            DeadLetter {
                topic: DEAD_LETTER_TOPIC.into(),
                partition: 0,
                offset: 0
            },
            DeadLetter {
                topic: DEAD_LETTER_TOPIC.into(),
                partition: 0,
                offset: 1
            },
        ]),
        "the copies' coordinates are kept for the manifest"
    );
    assert_eq!(
        listed(store.as_ref(), layout::EVENTS_ROOT).await,
        file_paths(&prepared)
    );
    for file in &prepared.files {
        let stored = store
            .get(&file.path)
            .await
            .expect("uploaded")
            .bytes()
            .await
            .expect("bytes");
        assert_eq!(stored, file.bytes, "{}", file.path);
    }
}

// --- commit ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn commit_starts_the_chain_at_sequence_zero_and_each_manifest_links_to_its_predecessor() {
    let harness = TestStages::new();
    let reader = harness.stages.chain.reader();
    let first = seal(
        0,
        0,
        vec![
            event("acme", "c1", NOV_30, 0),
            Record::Undecodable(1),
            event("acme", "c1", NOV_30, 3),
        ],
    );
    let (first_prepared, first_sha) = committed(&harness, &first, &ChainHead::empty()).await;

    let (manifest, stored_sha) = reader.read(PARTITION, 0).await.expect("manifest 0");
    assert_eq!(
        stored_sha, first_sha,
        "the commit reports the stored bytes' hash"
    );
    assert_eq!(
        manifest.prev_sha256, "",
        "the first manifest has no predecessor"
    );
    assert_eq!(
        (manifest.seq, manifest.start_offset, manifest.end_offset),
        (0, 0, 4)
    );
    assert_eq!(manifest.batch_id, first_prepared.batch_id);
    assert_eq!(manifest.writer_id, WRITER_ID);
    let entries: Vec<_> = first_prepared
        .files
        .iter()
        .map(|file| file.manifest_entry.clone())
        .collect();
    assert_eq!(manifest.files, entries);
    assert_eq!(
        manifest.rejected_records,
        vec![RejectedRecord {
            offset: 1,
            reason: "not a ChatEvent".into(),
            dead_letter: Some(DeadLetter {
                topic: DEAD_LETTER_TOPIC.into(),
                partition: 0,
                offset: 0
            }),
        }]
    );
    assert_eq!(manifest.offset_gaps, first.offset_gaps);
    assert_eq!(
        manifest.offset_gaps.len(),
        1,
        "offset 2 was never delivered"
    );

    let first_head = head_after(&first, first_sha.clone());
    let second = two_tenants_two_dates(1, 4);
    let (_, second_sha) = committed(&harness, &second, &first_head).await;
    let (manifest, _) = reader.read(PARTITION, 1).await.expect("manifest 1");
    assert_eq!(manifest.prev_sha256, first_sha);
    assert_eq!(
        reader.head(PARTITION).await.expect("head"),
        head_after(&second, second_sha)
    );
    let verified = reader.read_after(PARTITION, &ChainHead::empty()).await;
    assert!(verified.error.is_none(), "{:?}", verified.error);
    assert_eq!(verified.manifests.len(), 2);
}

#[tokio::test]
async fn a_different_batch_for_a_committed_sequence_number_loses_and_only_its_files_are_cleaned_up()
{
    let harness = TestStages::new();
    let store = harness.object_store();
    let reader = harness.stages.chain.reader();
    let winner = two_tenants_two_dates(0, 0);
    let (winner_prepared, winner_sha) = committed(&harness, &winner, &ChainHead::empty()).await;

    // A writer that still believes the chain empty (a zombie owner) uploads other events for sequence 0.
    let loser = seal(0, 0, vec![event("acme", "c1", DEC_01, 0)]);
    let mut loser_prepared = encoded(&harness, &loser).await;
    harness
        .stages
        .upload(&loser, &mut loser_prepared)
        .await
        .expect("upload");
    let lost = harness
        .stages
        .commit_manifest(&loser, &ChainHead::empty(), &loser_prepared)
        .await
        .expect("a conflict is an answer, not an error");
    assert_eq!(
        lost,
        Commit::Lost {
            winner_writer_id: WRITER_ID.into()
        }
    );
    let (manifest, sha) = reader.read(PARTITION, 0).await.expect("manifest 0");
    assert_eq!(
        (manifest.batch_id, sha),
        (winner_prepared.batch_id.clone(), winner_sha.clone()),
        "the winner's manifest is not replaced"
    );
    // The same batch committing again (its first answer lost) finds its own manifest.
    assert_eq!(
        harness
            .stages
            .commit_manifest(&winner, &ChainHead::empty(), &winner_prepared)
            .await
            .expect("commit"),
        Commit::Committed {
            sha256: winner_sha.clone()
        }
    );

    // The winner's bookkeeping removes the loser's orphans, and nothing of the winner.
    harness
        .stages
        .after_commit(&winner, &winner_prepared, &head_after(&winner, winner_sha))
        .await;
    assert_eq!(
        listed(store.as_ref(), layout::EVENTS_ROOT).await,
        file_paths(&winner_prepared)
    );
    let pending = layout::pending_prefix(TOPIC, PARTITION).to_string();
    assert!(listed(store.as_ref(), &pending).await.is_empty());
}

#[tokio::test]
async fn after_commit_deletes_the_intent_and_advances_the_committed_head() {
    let harness = TestStages::new();
    let store = harness.object_store();
    let batch = two_tenants_two_dates(0, 20);
    let (prepared, sha) = committed(&harness, &batch, &ChainHead::empty()).await;
    let intent = layout::pending_path(TOPIC, PARTITION, &prepared.batch_id);
    assert!(exists(store.as_ref(), &intent).await);
    assert!(!harness.stats.heads.is_archived(PARTITION, 20));

    harness
        .stages
        .after_commit(&batch, &prepared, &head_after(&batch, sha))
        .await;
    assert!(!exists(store.as_ref(), &intent).await, "the intent is done");
    let heads = &harness.stats.heads;
    assert!(heads.is_archived(PARTITION, 26));
    assert!(
        !heads.is_archived(PARTITION, 27),
        "the head ends at the batch's end"
    );
    assert!(!heads.is_archived(PARTITION + 1, 0));
    let counted = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    assert_eq!(counted(&harness.stats.committed_batches), 1);
    assert_eq!(counted(&harness.stats.committed_events), 7);
    assert_eq!(counted(&harness.stats.committed_files), 4);
    // Committed files stay.
    assert_eq!(
        listed(store.as_ref(), layout::EVENTS_ROOT).await,
        file_paths(&prepared)
    );
}

// --- lane -----------------------------------------------------------------------------------------------

/// A lane's reports, as the poll thread receives them.
struct Reports(mpsc::UnboundedReceiver<LaneReport>);

impl Reports {
    fn channel() -> (impl Fn(LaneReport) -> bool + Send + 'static, Reports) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (move |report| sender.send(report).is_ok(), Reports(receiver))
    }

    async fn next(&mut self) -> LaneReport {
        tokio::time::timeout(REPORT_TIMEOUT, self.0.recv())
            .await
            .expect("a lane report in time")
            .expect("the lane is running")
    }
}

#[tokio::test]
async fn a_lane_releases_a_batch_after_quick_attempts_and_a_fresh_lane_commits_it() {
    let harness = TestStages::new();
    let runtime = tokio::runtime::Handle::current();
    let slots = Arc::new(Semaphore::new(2));
    let (alive, mut lanes_alive) = mpsc::channel::<()>(1);
    // One file per attempt, so every attempt makes exactly one refused put.
    let batch = seal(
        0,
        0,
        vec![
            event("acme", "c1", NOV_30, 0),
            event("acme", "c1", NOV_30, 1),
        ],
    );
    let queued = seal(1, 2, vec![event("acme", "c1", NOV_30, 2)]);

    harness.store.fail_puts_containing(Some("events/"));
    let (report, mut reports) = Reports::channel();
    let lane = harness.stages.spawn_lane(
        &runtime,
        PARTITION,
        7,
        ChainHead::empty(),
        report,
        alive.clone(),
    );
    for sealed in [&batch, &queued] {
        let slot = slots.clone().try_acquire_owned().expect("a free slot");
        lane.send(sealed.clone(), slot).expect("lane running");
    }

    let released = reports.next().await;
    assert_eq!(
        (released.partition, released.generation, released.seq),
        (PARTITION, 7, 0)
    );
    assert!(
        matches!(&released.outcome, BatchOutcome::Released { error } if error.contains("injected upload failure")),
        "{released:?}"
    );
    assert_eq!(
        harness.store.refused_puts(),
        QUICK_ATTEMPTS as usize,
        "released after exactly QUICK_ATTEMPTS attempts"
    );
    assert_eq!(
        reports.next().await.outcome,
        BatchOutcome::Dropped,
        "a queued batch no longer continues the chain once one before it was released"
    );
    assert_eq!(
        slots.available_permits(),
        2,
        "both pending-batch slots are free again"
    );
    let store = harness.object_store();
    assert!(!exists(store.as_ref(), &layout::manifest_path(TOPIC, PARTITION, 0)).await);
    assert_eq!(harness.stats.released_batches.load(Ordering::Relaxed), 1);

    // Storage is back; the poller starts a new lane from the stored head and seals the records again.
    harness.store.fail_puts_containing(None);
    let head = harness
        .stages
        .chain
        .reader()
        .head(PARTITION)
        .await
        .expect("head");
    assert_eq!(head, ChainHead::empty());
    let (report, mut reports) = Reports::channel();
    let next_lane = harness
        .stages
        .spawn_lane(&runtime, PARTITION, 8, head, report, alive);
    let slot = slots.clone().try_acquire_owned().expect("a free slot");
    next_lane.send(batch.clone(), slot).expect("lane running");
    let committed = reports.next().await;
    let stored = harness
        .stages
        .chain
        .reader()
        .head(PARTITION)
        .await
        .expect("head");
    assert_eq!((stored.next_seq, stored.end_offset), (1, 2));
    assert_eq!(
        (committed.generation, committed.seq, committed.outcome),
        (8, 0, BatchOutcome::Committed { head: stored })
    );
    assert!(harness.stats.heads.is_archived(PARTITION, 1));

    // A lane whose handle is dropped ends once it has nothing left to do.
    drop((lane, next_lane));
    let ended = tokio::time::timeout(REPORT_TIMEOUT, lanes_alive.recv()).await;
    assert_eq!(ended, Ok(None), "every lane task ended");
}

#[tokio::test]
async fn a_lane_fenced_by_another_batch_reports_fenced_and_deletes_only_its_own_files() {
    let harness = TestStages::new();
    let store = harness.object_store();
    let winner = two_tenants_two_dates(0, 0);
    let (winner_prepared, winner_sha) = committed(&harness, &winner, &ChainHead::empty()).await;
    harness
        .stages
        .after_commit(&winner, &winner_prepared, &head_after(&winner, winner_sha))
        .await;

    // This lane still believes the chain empty.
    let (report, mut reports) = Reports::channel();
    let (alive, _lanes_alive) = mpsc::channel::<()>(1);
    let lane = harness.stages.spawn_lane(
        &tokio::runtime::Handle::current(),
        PARTITION,
        1,
        ChainHead::empty(),
        report,
        alive,
    );
    let slot = Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .expect("a free slot");
    let loser = seal(
        0,
        0,
        vec![
            event("acme", "c1", DEC_01, 0),
            event("zeta", "c5", DEC_01, 1),
        ],
    );
    lane.send(loser, slot).expect("lane running");
    assert_eq!(reports.next().await.outcome, BatchOutcome::Fenced);
    assert_eq!(harness.stats.fenced_batches.load(Ordering::Relaxed), 1);
    // The loser uploaded its files and intent before its commit failed; giving it up removed them again.
    assert_eq!(
        listed(store.as_ref(), layout::EVENTS_ROOT).await,
        file_paths(&winner_prepared)
    );
    let pending = layout::pending_prefix(TOPIC, PARTITION).to_string();
    assert!(listed(store.as_ref(), &pending).await.is_empty());
    let (manifest, _) = harness
        .stages
        .chain
        .reader()
        .read(PARTITION, 0)
        .await
        .expect("manifest 0");
    assert_eq!(manifest.batch_id, winner_prepared.batch_id);
}
