//! Reading committed archive files: fetch, verify against the manifest, decrypt, decode, collapse duplicates.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use chatvault_archive::ArchivedEvent;
use chatvault_archive::file::{
    FileConversations, conversation_digest, decode_file, event_identity_hash, footer_bytes_needed,
    read_conversation_summaries, sha256_hex,
};
use chatvault_archive::keys::{DataKey, DataKeys};
use chatvault_archive::manifest::ManifestFile;
use chatvault_archive::tlog::note::VerifierKey;
use chatvault_core::{Error, ErrorCode, Result};
use chatvault_proto::v1::ConversationSummary;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::index::{ArchiveIndex, TimeRange};
use crate::stream::{BufferGauge, BufferLimits, Held};

/// Reads conversations out of the archive of one topic.
#[derive(Debug)]
pub struct Restorer {
    store: Arc<dyn ObjectStore>,
    data_keys: DataKeys,
    index: ArchiveIndex,
    read_concurrency: usize,
    files_read: AtomicU64,
    footers_read: AtomicU64,
    bytes_fetched: AtomicU64,
    buffer_limits: BufferLimits,
    buffered: Arc<BufferGauge>,
}

/// How much of a file's tail one request fetches when only its footer is needed: most footers fit, longer
/// ones take a second request for the rest.
const FOOTER_PREFETCH_BYTES: u64 = 64 * 1024;

/// One file's contribution to the conversation list.
struct FileListing {
    conversation_id: String,
    workspace_id: String,
    first_event_micros: i64,
    last_event_micros: i64,
    identity_hashes: Vec<u64>,
}

/// Archived events with copies of one event collapsed to the first archived (lowest Kafka partition and
/// offset).
#[derive(Default)]
pub(crate) struct Collapsed {
    unique: HashMap<EventIdentity, ArchivedEvent>,
}

impl Collapsed {
    /// Adds the events of `events` that lie in `range`.
    pub(crate) fn add(&mut self, events: Vec<ArchivedEvent>, range: TimeRange) {
        for event in events {
            if !range.contains(event.record.occurred_at_micros) {
                continue;
            }
            match self.unique.entry(EventIdentity::of(&event)) {
                Entry::Vacant(slot) => {
                    slot.insert(event);
                }
                Entry::Occupied(mut slot) => {
                    let kept = slot.get();
                    if (event.kafka_partition, event.kafka_offset)
                        < (kept.kafka_partition, kept.kafka_offset)
                    {
                        slot.insert(event);
                    }
                }
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.unique.len()
    }

    /// The events sorted by event time, then Kafka partition and offset.
    pub(crate) fn into_sorted(self) -> Vec<ArchivedEvent> {
        let mut events: Vec<ArchivedEvent> = self.unique.into_values().collect();
        events.sort_by_key(|e| {
            (
                e.record.occurred_at_micros,
                e.kafka_partition,
                e.kafka_offset,
            )
        });
        events
    }
}

/// The identity under which copies of one event collapse: `(tenant_id, conversation_id, event_id)`, as
/// everywhere in the archive (ids are unique only within a conversation). Events always carry an `event_id`
/// once accepted by the gateway; an event without one (a foreign writer) is kept as its own Kafka record rather
/// than merged with every other id-less event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EventIdentity {
    Id {
        tenant_id: String,
        conversation_id: String,
        event_id: String,
    },
    Record(i32, i64),
}

impl EventIdentity {
    fn of(event: &ArchivedEvent) -> EventIdentity {
        if event.record.event_id.is_empty() {
            EventIdentity::Record(event.kafka_partition, event.kafka_offset)
        } else {
            EventIdentity::Id {
                tenant_id: event.record.tenant_id.clone(),
                conversation_id: event.record.conversation_id.clone(),
                event_id: event.record.event_id.clone(),
            }
        }
    }
}

impl Restorer {
    /// `read_concurrency` bounds the files fetched and decoded at once for one request (at least 1).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        data_keys: DataKeys,
        topic: &str,
        read_concurrency: usize,
    ) -> Restorer {
        Restorer {
            index: ArchiveIndex::new(store.clone(), topic),
            store,
            data_keys,
            read_concurrency: read_concurrency.max(1),
            files_read: AtomicU64::new(0),
            footers_read: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            buffer_limits: BufferLimits::default(),
            buffered: Arc::default(),
        }
    }

    /// Checks what is served against the transparency log's checkpoints signed by one of `keys`
    /// ([`ArchiveIndex::with_trusted_keys`]); restores then start with an `integrity` item.
    pub fn with_trusted_keys(mut self, keys: Vec<VerifierKey>) -> Restorer {
        self.index = self.index.with_trusted_keys(keys);
        self
    }

    /// How many events a streamed restore gathers at once (see [`crate::stream`]).
    pub fn with_buffer_limits(mut self, limits: BufferLimits) -> Restorer {
        self.buffer_limits = BufferLimits {
            events: limits.events.max(1),
            bytes: limits.bytes.max(1),
        };
        self
    }

    pub fn buffer_limits(&self) -> BufferLimits {
        self.buffer_limits
    }

    /// The most events streamed restores held in memory at once since start (decoded rows of files in
    /// flight and events gathered for emission; instrumentation).
    pub fn peak_buffered_events(&self) -> u64 {
        self.buffered.peak()
    }

    pub(crate) fn buffer_gauge(&self) -> &Arc<BufferGauge> {
        &self.buffered
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub(crate) fn read_concurrency(&self) -> usize {
        self.read_concurrency
    }

    /// [`Self::read_file`], with the decoded events counted in the buffer gauge until the count is dropped.
    pub(crate) async fn read_file_held(
        &self,
        file: Arc<ManifestFile>,
        tenant: &str,
        conversation: Option<&str>,
    ) -> Result<(Vec<ArchivedEvent>, Held)> {
        let events = self.read_file(file, tenant, conversation).await?;
        let held = self.buffered.hold(events.len());
        Ok((events, held))
    }

    pub fn index(&self) -> &ArchiveIndex {
        &self.index
    }

    /// Archive files fetched whole from object storage since start (a metric).
    pub fn files_read(&self) -> u64 {
        self.files_read.load(Ordering::Relaxed)
    }

    /// Archive file footers fetched alone (ranged reads of the file's tail) since start (a metric).
    pub fn footers_read(&self) -> u64 {
        self.footers_read.load(Ordering::Relaxed)
    }

    /// Bytes of archive files fetched from object storage since start, whole files and footers (a metric).
    pub fn bytes_fetched(&self) -> u64 {
        self.bytes_fetched.load(Ordering::Relaxed)
    }

    /// Every archived event of `conversation` with `from_micros <= occurred_at < to_micros` (zero: unbounded),
    /// copies of one event collapsed to the first archived (lowest Kafka partition and offset), sorted by event
    /// time, then Kafka partition and offset. This holds the whole conversation in memory: the gRPC service
    /// streams instead ([`Restorer::plan_conversation`], same result); this is the reference it is tested
    /// against, and serves tools that want the events at once.
    pub async fn conversation_events(
        &self,
        tenant: &str,
        conversation: &str,
        from_micros: i64,
        to_micros: i64,
    ) -> Result<Vec<ArchivedEvent>> {
        let range = TimeRange::new(from_micros, to_micros);
        let files = self
            .index
            .conversation_files(tenant, conversation, range)
            .await?;
        let mut decoded = futures::stream::iter(files)
            .map(|file| self.read_file(file, tenant, Some(conversation)))
            .buffer_unordered(self.read_concurrency);
        let mut collapsed = Collapsed::default();
        // The first error ends the request; dropping the stream cancels the reads still in flight.
        while let Some(events) = decoded.next().await {
            collapsed.add(events?, range);
        }
        Ok(collapsed.into_sorted())
    }

    /// One summary per conversation of `tenant`, sorted by conversation id. Event counts collapse copies of an
    /// event (through 64-bit identity hashes: two distinct events of a conversation merge in the count only on
    /// a hash collision). Each file is summarized from its footer alone, a ranged read of the file's tail
    /// (the conversation summary written since archive files carry one; see
    /// `chatvault_archive::file::FileConversations`), checked against the manifest entry; files without a
    /// summary, or whose summary disagrees with the manifest, are fetched and decoded whole as before. Files
    /// are read `read_concurrency` at a time, in chain order, so memory holds the summaries, one 8-byte hash
    /// per distinct event, and at most `read_concurrency` footers or files. Erased files are left out.
    pub async fn list_conversations(&self, tenant: &str) -> Result<Vec<ConversationSummary>> {
        let files = self.index.tenant_files(tenant).await?;
        let mut listed = futures::stream::iter(files)
            .map(|file| self.file_listing(file, tenant))
            .buffered(self.read_concurrency);
        let mut summaries: BTreeMap<String, (ConversationSummary, HashSet<u64>)> = BTreeMap::new();
        while let Some(listings) = listed.next().await {
            // Erased (crypto-shredded) files are not listed: their conversations are gone unless other files
            // hold them. Restoring a conversation that spans them fails with the erased error instead.
            let listings = match listings {
                Err(error) if error.code() == ErrorCode::Erased => continue,
                other => other?,
            };
            for listing in listings {
                let (summary, seen) = summaries
                    .entry(listing.conversation_id.clone())
                    .or_insert_with(|| {
                        (
                            ConversationSummary {
                                conversation_id: listing.conversation_id.clone(),
                                workspace_id: String::new(),
                                event_count: 0,
                                first_event_micros: i64::MAX,
                                last_event_micros: i64::MIN,
                            },
                            HashSet::new(),
                        )
                    });
                if summary.workspace_id.is_empty() {
                    summary.workspace_id = listing.workspace_id;
                }
                seen.extend(listing.identity_hashes);
                summary.event_count = seen.len() as u64;
                summary.first_event_micros =
                    summary.first_event_micros.min(listing.first_event_micros);
                summary.last_event_micros =
                    summary.last_event_micros.max(listing.last_event_micros);
            }
        }
        Ok(summaries
            .into_values()
            .map(|(summary, _)| summary)
            .collect())
    }

    /// What `file` holds per conversation: from its footer when it carries a summary that agrees with the
    /// manifest entry, otherwise from its decoded rows.
    async fn file_listing(
        &self,
        file: Arc<ManifestFile>,
        tenant: &str,
    ) -> Result<Vec<FileListing>> {
        match self.footer_summaries(&file, tenant).await? {
            Some(summaries) => summaries
                .conversations
                .into_iter()
                .map(|conversation| {
                    Ok(FileListing {
                        identity_hashes: conversation.identity_hashes()?,
                        conversation_id: conversation.conversation_id,
                        workspace_id: conversation.workspace_id,
                        first_event_micros: conversation.first_event_micros,
                        last_event_micros: conversation.last_event_micros,
                    })
                })
                .collect(),
            None => {
                let events = self.read_file(file, tenant, None).await?;
                let mut listings: BTreeMap<String, FileListing> = BTreeMap::new();
                for archived in &events {
                    let event = &archived.record;
                    let listing = listings
                        .entry(event.conversation_id.clone())
                        .or_insert_with(|| FileListing {
                            conversation_id: event.conversation_id.clone(),
                            workspace_id: String::new(),
                            first_event_micros: i64::MAX,
                            last_event_micros: i64::MIN,
                            identity_hashes: Vec::new(),
                        });
                    if listing.workspace_id.is_empty() {
                        listing.workspace_id.clone_from(&event.workspace_id);
                    }
                    listing.first_event_micros =
                        listing.first_event_micros.min(event.occurred_at_micros);
                    listing.last_event_micros =
                        listing.last_event_micros.max(event.occurred_at_micros);
                    listing.identity_hashes.push(event_identity_hash(archived));
                }
                Ok(listings.into_values().collect())
            }
        }
    }

    /// The data key `file` is encrypted under, with the file named when it cannot be had (ERASED when that key
    /// was shredded).
    async fn file_key(&self, file: &ManifestFile, tenant: &str) -> Result<DataKey> {
        self.data_keys
            .get_for_file(tenant, &file.key_scope, &file.key_period, &file.dek_id)
            .await
            .map_err(|error| {
                error.context(format!(
                    "archive file {} needs the data key of period {}",
                    file.path, file.key_period
                ))
            })
    }

    /// The conversation summary in `file`'s footer, read without fetching the rest of the file. `None` when the
    /// file has none (written before summaries existed), when the footer cannot be decoded, or when the
    /// summary disagrees with the manifest entry (rows, time range, conversation digests): the caller then
    /// reads the whole file, whose SHA-256 check names what is wrong.
    async fn footer_summaries(
        &self,
        file: &ManifestFile,
        tenant: &str,
    ) -> Result<Option<FileConversations>> {
        let key = self.file_key(file, tenant).await?;
        let size = file.bytes;
        if size < 8 {
            return Ok(None);
        }
        let location = Path::from(file.path.as_str());
        let mut tail = self
            .fetch_range(&location, size - size.min(FOOTER_PREFETCH_BYTES)..size)
            .await?;
        let needed = match footer_bytes_needed(&tail[tail.len() - 8..]) {
            Ok(needed) if needed <= size => needed,
            _ => return Ok(None),
        };
        if needed > tail.len() as u64 {
            tail = self.fetch_range(&location, size - needed..size).await?;
        }
        self.footers_read.fetch_add(1, Ordering::Relaxed);
        let footer = tail.slice(tail.len() - needed as usize..);
        let summaries = match read_conversation_summaries(footer, &key) {
            Ok(Some(summaries)) => summaries,
            Ok(None) => return Ok(None),
            Err(error) => {
                tracing::warn!(path = %file.path, %error, "archive file footer unreadable; reading the whole file");
                return Ok(None);
            }
        };
        let rows: u64 = summaries.conversations.iter().map(|c| c.rows).sum();
        let first = summaries
            .conversations
            .iter()
            .map(|c| c.first_event_micros)
            .min();
        let last = summaries
            .conversations
            .iter()
            .map(|c| c.last_event_micros)
            .max();
        let mut digests: Vec<String> = summaries
            .conversations
            .iter()
            .map(|c| conversation_digest(tenant, &c.conversation_id))
            .collect();
        digests.sort_unstable();
        let mut committed = file.conversation_digests.clone();
        committed.sort_unstable();
        if rows != file.rows
            || first != Some(file.min_occurred_micros)
            || last != Some(file.max_occurred_micros)
            || digests != committed
        {
            tracing::warn!(path = %file.path, "archive file footer disagrees with its manifest entry; reading the whole file");
            return Ok(None);
        }
        Ok(Some(summaries))
    }

    async fn fetch_range(&self, location: &Path, range: std::ops::Range<u64>) -> Result<Bytes> {
        let bytes = self
            .store
            .get_range(location, range)
            .await
            .map_err(|error| fetch_error(location.as_ref(), error))?;
        self.bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Fetches one committed file, checks it is the file the manifest committed, and decodes the events of
    /// `conversation` (all events when `None`).
    pub(crate) async fn read_file(
        &self,
        file: Arc<ManifestFile>,
        tenant: &str,
        conversation: Option<&str>,
    ) -> Result<Vec<ArchivedEvent>> {
        let key = self.file_key(&file, tenant).await?;
        let bytes = self.fetch(&file.path).await?;
        self.files_read.fetch_add(1, Ordering::Relaxed);
        let tenant = tenant.to_string();
        let conversation = conversation.map(str::to_string);
        // Hashing and decrypting a file are CPU-bound: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            check_committed(&file, &bytes)?;
            let events = decode_file(bytes, &key, conversation.as_deref())
                .map_err(|error| error.context(format!("decoding archive file {}", file.path)))?;
            if let Some(stranger) = events.iter().find(|e| e.record.tenant_id != tenant) {
                return Err(Error::internal(format!(
                    "archive file {} of tenant {tenant} holds an event of tenant {}",
                    file.path, stranger.record.tenant_id
                )));
            }
            Ok(events)
        })
        .await
        .map_err(|error| Error::internal(format!("decoding task failed: {error}")))?
    }

    async fn fetch(&self, path: &str) -> Result<Bytes> {
        let bytes = fetch_committed(self.store.as_ref(), path).await?;
        self.bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }
}

/// Fails unless `bytes` are the file `file`'s manifest committed (its SHA-256), naming the file. CPU-bound.
pub(crate) fn check_committed(file: &ManifestFile, bytes: &[u8]) -> Result<()> {
    let actual = sha256_hex(bytes);
    if actual != file.sha256 {
        return Err(Error::internal(format!(
            "archive file {} was altered: its SHA-256 is {actual}, the manifest committed {}",
            file.path, file.sha256
        )));
    }
    Ok(())
}

/// Fetches the committed file at `path` (not yet checked: see [`check_committed`]); its absence is damage.
pub(crate) async fn fetch_committed(store: &dyn ObjectStore, path: &str) -> Result<Bytes> {
    let fetched = match store.get(&Path::from(path)).await {
        Ok(result) => result.bytes().await,
        Err(error) => Err(error),
    };
    fetched.map_err(|error| fetch_error(path, error))
}

fn fetch_error(path: &str, error: object_store::Error) -> Error {
    match error {
        // The manifest committed this file: its absence is damage to the archive, not a bad request.
        object_store::Error::NotFound { .. } => Error::new(
            ErrorCode::Internal,
            format!("archive file {path} named by a committed manifest is missing"),
        ),
        other => Error::from(other).context(format!("reading archive file {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, event};
    use chatvault_archive::layout;
    use chatvault_proto::v1::EventKind;
    use object_store::PutPayload;

    fn restorer(fixture: &Fixture) -> Restorer {
        Restorer::new(
            fixture.store.clone(),
            fixture.data_keys.clone(),
            &fixture.topic,
            2,
        )
    }

    fn ids(events: &[ArchivedEvent]) -> Vec<&str> {
        events
            .iter()
            .map(|e| e.record.message_id.as_str())
            .collect()
    }

    #[tokio::test]
    async fn duplicates_across_files_collapse_to_the_first_archived_copy() {
        let fixture = Fixture::new().await;
        fixture
            .commit_batch(
                0,
                &[
                    event("acme", "C1", "m1", 1_000),
                    event("acme", "C1", "m2", 3_000),
                ],
            )
            .await;
        // A retried webhook: the same event archived again later, in another partition's file too.
        let mut retried = event("acme", "C1", "m1", 1_000);
        retried.text = "second copy".into();
        fixture
            .commit_batch(0, &[retried.clone(), event("acme", "C1", "m3", 2_000)])
            .await;
        fixture.commit_batch(1, &[retried]).await;
        let restorer = restorer(&fixture);
        let events = restorer
            .conversation_events("acme", "C1", 0, 0)
            .await
            .expect("events");
        assert_eq!(ids(&events), ["m1", "m3", "m2"]);
        assert_eq!((events[0].kafka_partition, events[0].kafka_offset), (0, 0));
        assert_eq!(events[0].record.text, "text of m1");
        assert_eq!(restorer.files_read(), 3);
    }

    #[tokio::test]
    async fn the_time_range_includes_from_and_excludes_to() {
        let fixture = Fixture::new().await;
        let events: Vec<_> = (1..=5)
            .map(|i| event("acme", "C1", &format!("m{i}"), i * 1_000))
            .collect();
        fixture.commit_batch(0, &events[..2]).await;
        fixture.commit_batch(0, &events[2..]).await;
        let restorer = restorer(&fixture);
        let found = restorer
            .conversation_events("acme", "C1", 2_000, 4_000)
            .await
            .expect("range");
        assert_eq!(ids(&found), ["m2", "m3"]);
        let found = restorer
            .conversation_events("acme", "C1", 4_000, 0)
            .await
            .expect("open end");
        assert_eq!(ids(&found), ["m4", "m5"]);
        let before = restorer.files_read();
        // Only the second file overlaps; the first is not fetched.
        let found = restorer
            .conversation_events("acme", "C1", 3_500, 0)
            .await
            .expect("late");
        assert_eq!(ids(&found), ["m4", "m5"]);
        assert_eq!(restorer.files_read() - before, 1);
    }

    #[tokio::test]
    async fn files_without_the_conversation_are_not_fetched() {
        let fixture = Fixture::new().await;
        fixture
            .commit_batch(0, &[event("acme", "C1", "m1", 1_000)])
            .await;
        fixture
            .commit_batch(0, &[event("acme", "C2", "m2", 1_000)])
            .await;
        fixture
            .commit_batch(1, &[event("acme", "C2", "m3", 1_000)])
            .await;
        fixture
            .commit_batch(1, &[event("globex", "C1", "m4", 1_000)])
            .await;
        let restorer = restorer(&fixture);
        let found = restorer
            .conversation_events("acme", "C1", 0, 0)
            .await
            .expect("c1");
        assert_eq!(ids(&found), ["m1"]);
        assert_eq!(restorer.files_read(), 1);
        assert!(
            restorer
                .conversation_events("acme", "C9", 0, 0)
                .await
                .expect("none")
                .is_empty()
        );
        assert!(
            restorer
                .conversation_events("nobody", "C1", 0, 0)
                .await
                .expect("none")
                .is_empty()
        );
        assert_eq!(restorer.files_read(), 1);
    }

    #[tokio::test]
    async fn a_modified_file_is_rejected_naming_its_path() {
        let fixture = Fixture::new().await;
        let (manifest, _) = fixture
            .commit_batch(0, &[event("acme", "C1", "m1", 1_000)])
            .await;
        let path = Path::from(manifest.files[0].path.as_str());
        let mut bytes = fixture
            .store
            .get(&path)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        fixture
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .expect("overwrite");
        let error = restorer(&fixture)
            .conversation_events("acme", "C1", 0, 0)
            .await
            .expect_err("altered file");
        assert_eq!(error.code(), ErrorCode::Internal);
        assert!(error.message().contains(&manifest.files[0].path), "{error}");
        assert!(error.message().contains("altered"), "{error}");
    }

    #[tokio::test]
    async fn orphans_are_ignored_and_missing_committed_files_are_reported() {
        let fixture = Fixture::new().await;
        let (manifest, _) = fixture
            .commit_batch(0, &[event("acme", "C1", "m1", 1_000)])
            .await;
        // An orphan next to the committed file: same directory, same conversation, never committed.
        let orphan =
            layout::event_file_path("acme", "", &manifest.files[0].date, 0, 99, "zombie", 0);
        let committed = fixture
            .store
            .get(&Path::from(manifest.files[0].path.as_str()))
            .await
            .expect("get");
        fixture
            .store
            .put(
                &orphan,
                PutPayload::from(committed.bytes().await.expect("bytes")),
            )
            .await
            .expect("orphan");
        let restorer = restorer(&fixture);
        assert_eq!(
            restorer
                .conversation_events("acme", "C1", 0, 0)
                .await
                .expect("events")
                .len(),
            1
        );
        assert_eq!(restorer.files_read(), 1);
        fixture
            .store
            .delete(&Path::from(manifest.files[0].path.as_str()))
            .await
            .expect("delete");
        let error = restorer
            .conversation_events("acme", "C1", 0, 0)
            .await
            .expect_err("missing");
        assert_eq!(error.code(), ErrorCode::Internal);
        assert!(error.message().contains("missing"), "{error}");
    }

    #[tokio::test]
    async fn an_archive_without_any_commit_is_empty_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("local store"),
        );
        let fixture = Fixture::new().await;
        let restorer = Restorer::new(store, fixture.data_keys.clone(), &fixture.topic, 2);
        assert!(
            restorer
                .conversation_events("acme", "C1", 0, 0)
                .await
                .expect("events")
                .is_empty()
        );
        assert!(
            restorer
                .list_conversations("acme")
                .await
                .expect("list")
                .is_empty()
        );
    }

    /// Archives the same events, in the same batches, with or without footer summaries (files of the format
    /// before them), the first batch possibly in the other format.
    async fn listing_archive(summaries: bool, first_batch_summaries: bool) -> Fixture {
        let mut fixture = Fixture::new().await;
        let big = |conversation: &str, id: usize, at: i64| {
            let mut event = event("acme", conversation, &format!("m{id}"), at);
            // Incompressible, so files are much larger than their footers.
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ id as u64;
            event.raw_payload = (0..2_000)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            if id.is_multiple_of(3) {
                event.workspace_id = String::new();
            }
            event
        };
        for batch in 0..4usize {
            fixture.file_options.conversation_summaries = if batch == 0 {
                first_batch_summaries
            } else {
                summaries
            };
            let mut events: Vec<_> = (0..150)
                .map(|i| {
                    let id = batch * 150 + i;
                    big(&format!("C{}", id % 5), id, 1_000 + id as i64 * 10)
                })
                .collect();
            // A copy of an earlier batch's event (a retried send), and one of another tenant.
            if batch > 0 {
                events.push(big("C1", 1, 1_010));
                events.push(event("globex", "G1", "g", 5));
            }
            fixture.commit_batch(batch as i32 % 2, &events).await;
        }
        fixture
    }

    #[tokio::test]
    async fn conversations_are_listed_from_file_footers_and_older_files_are_decoded() {
        let view = |summaries: &[ConversationSummary]| -> Vec<(String, String, u64, i64, i64)> {
            summaries
                .iter()
                .map(|s| {
                    (
                        s.conversation_id.clone(),
                        s.workspace_id.clone(),
                        s.event_count,
                        s.first_event_micros,
                        s.last_event_micros,
                    )
                })
                .collect()
        };
        let old = listing_archive(false, false).await;
        let old_restorer = restorer(&old);
        let expected = view(&old_restorer.list_conversations("acme").await.expect("old"));
        assert_eq!(expected.len(), 5);
        assert!(
            expected.iter().all(|c| c.2 == 120 && c.1 == "W1"),
            "{expected:?}"
        );
        assert_eq!(
            old_restorer.files_read(),
            4,
            "files without summaries are decoded"
        );

        let new = listing_archive(true, true).await;
        let new_restorer = restorer(&new);
        assert_eq!(
            view(&new_restorer.list_conversations("acme").await.expect("new")),
            expected
        );
        let stored: u64 = new_restorer
            .index()
            .tenant_files("acme")
            .await
            .expect("files")
            .iter()
            .map(|file| file.bytes)
            .sum();
        eprintln!(
            "listing 4 files of {stored} bytes fetched {} bytes (footers only)",
            new_restorer.bytes_fetched()
        );
        assert_eq!(new_restorer.files_read(), 0, "no file is decrypted whole");
        assert_eq!(new_restorer.footers_read(), 4);
        assert!(
            new_restorer.bytes_fetched() * 4 < stored,
            "fetched {} of {stored} stored bytes",
            new_restorer.bytes_fetched()
        );

        // An archive written across the upgrade: the old file is decoded, the new ones are not.
        let mixed = listing_archive(true, false).await;
        let mixed_restorer = restorer(&mixed);
        assert_eq!(
            view(
                &mixed_restorer
                    .list_conversations("acme")
                    .await
                    .expect("mixed")
            ),
            expected
        );
        assert_eq!(mixed_restorer.files_read(), 1);
    }

    #[tokio::test]
    async fn a_file_whose_footer_disagrees_with_its_manifest_is_read_whole() {
        let fixture = Fixture::new().await;
        let (manifest, _) = fixture
            .commit_batch(0, &[event("acme", "C1", "m1", 1_000)])
            .await;
        // Another file of the same tenant and month put in its place: its footer decrypts, but names another
        // conversation than the manifest committed; the whole-file read then reports the substitution.
        let other = Fixture::over(
            fixture.store.clone(),
            fixture.data_keys.clone(),
            "other.topic",
        );
        let (substitute, _) = other
            .commit_batch(0, &[event("acme", "C2", "m2", 1_000)])
            .await;
        let bytes = fixture
            .store
            .get(&Path::from(substitute.files[0].path.as_str()))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        fixture
            .store
            .put(
                &Path::from(manifest.files[0].path.as_str()),
                PutPayload::from(bytes),
            )
            .await
            .expect("substitute");
        let restorer = restorer(&fixture);
        let error = restorer
            .list_conversations("acme")
            .await
            .expect_err("substituted file");
        assert!(error.message().contains("altered"), "{error}");
        assert_eq!(restorer.files_read(), 1);
    }

    #[tokio::test]
    async fn conversations_are_summarized_per_tenant_with_duplicates_counted_once() {
        let fixture = Fixture::new().await;
        let mut edit = event("acme", "C2", "m3", 9_000);
        edit.kind = EventKind::MessageEdited as i32;
        edit.event_id = "C2/m3/edit".into();
        fixture
            .commit_batch(
                0,
                &[
                    event("acme", "C2", "m1", 5_000),
                    event("acme", "C1", "m2", 2_000),
                    edit,
                ],
            )
            .await;
        fixture
            .commit_batch(
                1,
                &[
                    event("acme", "C2", "m1", 5_000),
                    event("globex", "C3", "m9", 1),
                ],
            )
            .await;
        let summaries = restorer(&fixture)
            .list_conversations("acme")
            .await
            .expect("list");
        let view: Vec<_> = summaries
            .iter()
            .map(|s| {
                (
                    s.conversation_id.as_str(),
                    s.workspace_id.as_str(),
                    s.event_count,
                    s.first_event_micros,
                    s.last_event_micros,
                )
            })
            .collect();
        assert_eq!(
            view,
            [("C1", "W1", 1, 2_000, 2_000), ("C2", "W1", 2, 5_000, 9_000)]
        );
    }
}
