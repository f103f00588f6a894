//! Test fixtures: a real archive (encrypted Parquet files, data keys under a local keyring, committed manifest
//! chains), in an in-memory object store for the restorer's unit tests, or in any store (the end-to-end tests
//! build archives of realistic size this way, with the `testing` feature).

use std::collections::BTreeMap;
use std::sync::Arc;

use chatvault_archive::ArchivedEvent;
use chatvault_archive::chain::{ChainWriter, Commit};
use chatvault_archive::file::{FileOptions, encode_file};
use chatvault_archive::keys::{DataKeys, LocalKeyring};
use chatvault_archive::layout;
use chatvault_archive::manifest::{MANIFEST_FORMAT, Manifest, ManifestFile};
use chatvault_core::time::Date;
use chatvault_proto::v1::{ChatEvent, EventKind, Sender};
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub struct Fixture {
    pub store: Arc<dyn ObjectStore>,
    pub data_keys: DataKeys,
    pub topic: String,
    pub file_options: FileOptions,
    _keyring_dir: Option<tempfile::TempDir>,
}

/// A message-created event at `at` micros, with a deterministic event id.
pub fn event(tenant: &str, conversation: &str, message_id: &str, at: i64) -> ChatEvent {
    ChatEvent {
        event_id: format!("{conversation}/{message_id}/created"),
        tenant_id: tenant.into(),
        workspace_id: "W1".into(),
        conversation_id: conversation.into(),
        message_id: message_id.into(),
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: "U1".into(),
            display_name: "alice".into(),
            is_bot: false,
        }),
        occurred_at_micros: at,
        received_at_micros: at + 1,
        text: format!("text of {message_id}"),
        ..ChatEvent::default()
    }
}

/// An empty manifest (no files) continuing a chain.
pub fn manifest_for(
    topic: &str,
    partition: i32,
    seq: u64,
    start_offset: i64,
    prev_sha256: &str,
) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT.into(),
        topic: topic.into(),
        partition,
        seq,
        start_offset,
        end_offset: start_offset,
        batch_id: format!("batch-{partition}-{seq}"),
        writer_id: "test-writer".into(),
        created_at_micros: 1,
        prev_sha256: prev_sha256.into(),
        files: Vec::new(),
        rejected_records: Vec::new(),
        offset_gaps: Vec::new(),
        supersedes: Vec::new(),
    }
}

impl Fixture {
    pub async fn new() -> Fixture {
        let keyring_dir = tempfile::tempdir().expect("tempdir");
        let keyring =
            LocalKeyring::open(&keyring_dir.path().join("keyring.json")).expect("keyring");
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        Fixture {
            data_keys: DataKeys::new(store.clone(), Arc::new(keyring)),
            store,
            topic: "chatvault.events".into(),
            file_options: FileOptions::default(),
            _keyring_dir: Some(keyring_dir),
        }
    }

    /// A fixture over an existing store and its data keys (for example a deployment's configuration).
    pub fn over(store: Arc<dyn ObjectStore>, data_keys: DataKeys, topic: &str) -> Fixture {
        Fixture {
            store,
            data_keys,
            topic: topic.into(),
            file_options: FileOptions::default(),
            _keyring_dir: None,
        }
    }

    pub fn chain(&self) -> ChainWriter {
        ChainWriter::new(self.store.clone(), &self.topic)
    }

    /// Archives `events` as the next batch of `partition`, the way the archiver does: consecutive Kafka
    /// offsets from the chain head, one encrypted file per tenant and day, then the manifest commit.
    pub async fn commit_batch(&self, partition: i32, events: &[ChatEvent]) -> (Manifest, String) {
        let chain = self.chain();
        let head = chain.reader().head(partition).await.expect("head");
        let archived: Vec<ArchivedEvent> = events
            .iter()
            .enumerate()
            .map(|(index, event)| ArchivedEvent {
                record: event.clone(),
                kafka_partition: partition,
                kafka_offset: head.end_offset + index as i64,
            })
            .collect();
        let mut groups: BTreeMap<(String, String), Vec<&ArchivedEvent>> = BTreeMap::new();
        for row in &archived {
            let date = Date::from_micros(row.record.occurred_at_micros).iso();
            groups
                .entry((row.record.tenant_id.clone(), date))
                .or_default()
                .push(row);
        }
        let batch_id = format!("batch-{partition}-{}", head.next_seq);
        let mut files = Vec::new();
        for (index, ((tenant, date), mut rows)) in groups.into_iter().enumerate() {
            let period = date[..7].to_string();
            let key = self
                .data_keys
                .get_or_create(&tenant, &period)
                .await
                .expect("data key");
            let encoded = encode_file(&mut rows, &key, &self.file_options).expect("encode");
            let path = layout::event_file_path(
                &tenant,
                chatvault_archive::keys::DEFAULT_SCOPE,
                &date,
                partition,
                head.end_offset,
                &batch_id,
                index,
            );
            self.store
                .put(&path, PutPayload::from(encoded.bytes.clone()))
                .await
                .expect("upload");
            files.push(ManifestFile::describe(
                &path, &tenant, &date, &key, &encoded,
            ));
        }
        let mut manifest = manifest_for(
            &self.topic,
            partition,
            head.next_seq,
            head.end_offset,
            &head.last_sha256,
        );
        manifest.end_offset = head.end_offset + events.len() as i64;
        manifest.batch_id = batch_id;
        manifest.files = files;
        match chain.commit(&manifest).await.expect("commit") {
            Commit::Committed { sha256 } => (manifest, sha256),
            Commit::Lost { winner_writer_id } => {
                panic!("fixture commit lost to {winner_writer_id}")
            }
        }
    }
}
