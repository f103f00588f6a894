//! Fakes shared by the archiver's unit tests (the poller's and the stages'): an in-memory store that fails
//! uploads on demand, a dead-letter sink that records what it is given, and the commit stages built over them
//! with a local keyring in a temporary directory. No Kafka, no network.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chatvault_archive::chain::ChainWriter;
use chatvault_archive::file::FileOptions;
use chatvault_archive::keys::{DataKeys, KeyEncryptionProvider, LocalKeyring};
use chatvault_archive::manifest::DeadLetter;
use chatvault_core::error::Result;
use chatvault_core::shutdown::{self, ShutdownTrigger};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::batch::Rejected;
use crate::dead_letter::DeadLetterSink;
use crate::lane::CommitStages;
use crate::stats::ArchiverStats;

/// The topic every test archives.
pub(crate) const TOPIC: &str = "chat";
/// The writer id of [`TestStages`].
pub(crate) const WRITER_ID: &str = "test-writer";

/// An in-memory store whose puts fail for paths containing a given text, while it is set. Every other call
/// (gets, lists, deletes) goes through, so a test can inspect what a failed stage left behind.
#[derive(Debug, Default)]
pub(crate) struct FailingStore {
    inner: InMemory,
    fail_puts_containing: Mutex<Option<String>>,
    refused_puts: AtomicUsize,
}

impl FailingStore {
    /// From now on, puts to paths containing `text` fail (`None`: none fail).
    pub(crate) fn fail_puts_containing(&self, text: Option<&str>) {
        *self.fail_puts_containing.lock().expect("flag") = text.map(str::to_string);
    }

    /// How many puts failed so far.
    pub(crate) fn refused_puts(&self) -> usize {
        self.refused_puts.load(Ordering::Relaxed)
    }
}

impl std::fmt::Display for FailingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailingStore")
    }
}

#[async_trait]
impl ObjectStore for FailingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let failing = self.fail_puts_containing.lock().expect("flag").clone();
        if let Some(text) = failing
            && location.as_ref().contains(&text)
        {
            self.refused_puts.fetch_add(1, Ordering::Relaxed);
            return Err(object_store::Error::Generic {
                store: "FailingStore",
                source: "injected upload failure".into(),
            });
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

/// Records dead-letter copies instead of producing them; the n-th copy is at offset n of the dead-letter
/// topic's partition 0.
#[derive(Default)]
pub(crate) struct DeadLetterRecorder(Mutex<Vec<Rejected>>);

/// The topic [`DeadLetterRecorder`] pretends to produce to.
pub(crate) const DEAD_LETTER_TOPIC: &str = "chat.dead-letter";

impl DeadLetterRecorder {
    /// Every record produced so far, in order.
    pub(crate) fn copies(&self) -> Vec<Rejected> {
        self.0.lock().expect("copies").clone()
    }
}

impl DeadLetterSink for DeadLetterRecorder {
    fn produce<'a>(
        &'a self,
        _source_topic: &'a str,
        _partition: i32,
        rejected: &'a Rejected,
    ) -> BoxFuture<'a, Result<DeadLetter>> {
        Box::pin(async move {
            let mut copies = self.0.lock().expect("copies");
            copies.push(rejected.clone());
            Ok(DeadLetter {
                topic: DEAD_LETTER_TOPIC.into(),
                partition: 0,
                offset: copies.len() as i64 - 1,
            })
        })
    }
}

/// [`CommitStages`] over a [`FailingStore`] and a [`DeadLetterRecorder`], with a local keyring in a temporary
/// directory (removed when this is dropped). Shutdown is never requested: the triggers live as long as this
/// does (a dropped trigger counts as a requested shutdown).
pub(crate) struct TestStages {
    pub(crate) stages: Arc<CommitStages>,
    pub(crate) store: Arc<FailingStore>,
    pub(crate) dead_letters: Arc<DeadLetterRecorder>,
    pub(crate) stats: Arc<ArchiverStats>,
    keyring_path: PathBuf,
    _keyring_dir: tempfile::TempDir,
    _shutdown: ShutdownTrigger,
    _abandon: ShutdownTrigger,
}

impl TestStages {
    /// Stages whose keyring creates a tenant's key-encryption key on first use: every tenant gets keys.
    pub(crate) fn new() -> TestStages {
        let keyring_dir = tempfile::tempdir().expect("keyring dir");
        let keyring_path = keyring_dir.path().join("keyring.json");
        let keyring = LocalKeyring::open(&keyring_path).expect("keyring");
        TestStages::build(keyring_dir, keyring_path, keyring)
    }

    /// Stages whose keyring is read-only and holds key-encryption keys for `tenants` only: any other tenant
    /// can never get a data key (the keyring refuses it, permanently).
    pub(crate) async fn with_read_only_keyring(tenants: &[&str]) -> TestStages {
        let keyring_dir = tempfile::tempdir().expect("keyring dir");
        let keyring_path = keyring_dir.path().join("keyring.json");
        // A writable keyring creates a tenant's key-encryption key when it is first asked for it.
        let writable = LocalKeyring::open(&keyring_path).expect("keyring");
        for tenant in tenants {
            writable.current_kek_id(tenant).await.expect("KEK created");
        }
        let keyring = LocalKeyring::open_read_only(&keyring_path).expect("read-only keyring");
        TestStages::build(keyring_dir, keyring_path, keyring)
    }

    fn build(
        keyring_dir: tempfile::TempDir,
        keyring_path: PathBuf,
        keyring: LocalKeyring,
    ) -> TestStages {
        let store = Arc::new(FailingStore::default());
        let object_store: Arc<dyn ObjectStore> = store.clone();
        let (shutdown_trigger, shutdown) = shutdown::channel();
        let (abandon_trigger, abandon) = shutdown::channel();
        let stats = Arc::new(ArchiverStats::default());
        let dead_letters = Arc::new(DeadLetterRecorder::default());
        let stages = Arc::new(CommitStages {
            store: object_store.clone(),
            chain: ChainWriter::new(object_store.clone(), TOPIC),
            data_keys: DataKeys::new(object_store, Arc::new(keyring)),
            topic: TOPIC.into(),
            writer_id: WRITER_ID.into(),
            file_options: FileOptions::default(),
            dead_letters: dead_letters.clone(),
            upload_concurrency: 8,
            stats: stats.clone(),
            shutdown,
            abandon,
            locks: None,
            kind: std::marker::PhantomData,
        });
        TestStages {
            stages,
            store,
            dead_letters,
            stats,
            keyring_path,
            _keyring_dir: keyring_dir,
            _shutdown: shutdown_trigger,
            _abandon: abandon_trigger,
        }
    }

    /// The store as the stages see it.
    pub(crate) fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Data keys as a reader of the archive gets them: from the key records in the store, unwrapped by the
    /// keyring file (read-only, with a fresh cache, so nothing the stages hold in memory is reused).
    pub(crate) fn reader_data_keys(&self) -> DataKeys {
        let keyring = LocalKeyring::open_read_only(&self.keyring_path).expect("keyring");
        DataKeys::new(self.object_store(), Arc::new(keyring))
    }
}
