//! Envelope encryption.
//!
//! - A **key-encryption key** (KEK) per tenant is held by a [`KeyEncryptionProvider`]: the local keyring file
//!   by default ([`LocalKeyring`]), a KMS in production (same trait).
//! - A **data key** (DEK, 256-bit) per tenant and month encrypts that month's Parquet files, so DuckDB can scan
//!   a tenant's month with one key. It is stored wrapped by the tenant's KEK in the archive itself, at
//!   `keys/tenant=<t>/period=<yyyy-mm>.json` ([`DataKeyRecord`]), next to the data it opens.
//! - Each Parquet file's footer key metadata names the data key ([`FileKeyMetadata`]), so an authorized reader
//!   can find the key of any file.
//!
//! Destroying a tenant's KEK, or one period's record, makes that data unreadable everywhere.
//!
//! Key material never reaches a log: every type that holds a key ([`DataKey`], [`LocalKeyring`], [`DataKeys`])
//! has a `Debug` that leaves the key bytes out. Keys held here are wiped (`zeroize`) when dropped: data keys,
//! key-encryption keys in the keyring's memory, and the buffers they pass through (unwrapped plaintext, the
//! keyring file's bytes). What this cannot reach: copies made by libraries we hand a key to (the Parquet
//! crate's encryption properties keep their own `Vec`), by serde_json while parsing, or left in freed memory by
//! the allocator before this crate saw the bytes.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::layout;
use chatvault_core::config::KeysConfig;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::time::now_micros;

pub const DATA_KEY_BYTES: usize = 32;

/// A key wrapped by a key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_id: String,
    pub ciphertext: Vec<u8>,
}

/// Holds tenants' key-encryption keys. Implementations: [`LocalKeyring`]; a KMS client later.
#[async_trait]
pub trait KeyEncryptionProvider: Send + Sync + std::fmt::Debug {
    /// Wraps `plaintext` under the tenant's current KEK (creating it when the provider can). `aad` binds the
    /// wrapped key to its context and must be presented again to unwrap.
    async fn wrap(&self, tenant: &str, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey>;
    /// The unwrapped plaintext, wiped when dropped.
    async fn unwrap(
        &self,
        tenant: &str,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>>;
}

#[derive(Default, Serialize, Deserialize)]
struct KeyringFile {
    version: u32,
    tenants: HashMap<String, TenantKeys>,
}

/// Lists tenants and key ids, never keys.
impl std::fmt::Debug for KeyringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringFile")
            .field("version", &self.version)
            .field("tenants", &self.tenants)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct TenantKeys {
    current: String,
    /// kek id → base64 key
    keys: HashMap<String, String>,
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("TenantKeys")
            .field("current", &self.current)
            .field("kek_ids", &ids)
            .finish_non_exhaustive()
    }
}

impl Drop for TenantKeys {
    fn drop(&mut self) {
        for key in self.keys.values_mut() {
            key.zeroize();
        }
    }
}

/// A keyring file with one AES-256 KEK per tenant, created on first use with mode 0600. Suitable for a single
/// node (standalone, evaluation); production deployments use a KMS behind the same trait. `Debug` shows the
/// path and mode, never keys.
pub struct LocalKeyring {
    path: PathBuf,
    state: Mutex<KeyringFile>,
    rng: SystemRandom,
    /// Never written: a tenant without a key-encryption key cannot get one here (see
    /// [`LocalKeyring::open_read_only`]).
    read_only: bool,
}

impl std::fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl LocalKeyring {
    /// The keyring at `path`, which creates a tenant's key-encryption key on first use.
    pub fn open(path: &Path) -> Result<LocalKeyring> {
        Self::open_with(path, false)
    }

    /// The keyring at `path`, never written (a mounted Secret shared by several pods: if each created keys, they
    /// would diverge). A tenant it holds no key for is refused with PERMISSION_DENIED, a permanent condition
    /// for the archiver: such records are rejected to the dead-letter topic instead of retried forever.
    pub fn open_read_only(path: &Path) -> Result<LocalKeyring> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, read_only: bool) -> Result<LocalKeyring> {
        let keyring = LocalKeyring {
            path: path.to_path_buf(),
            state: Mutex::new(KeyringFile::default()),
            rng: SystemRandom::new(),
            read_only,
        };
        let state = keyring.read_file()?;
        *keyring
            .state
            .lock()
            .map_err(|_| Error::internal("keyring lock poisoned"))? = state;
        Ok(keyring)
    }

    fn read_file(&self) -> Result<KeyringFile> {
        match std::fs::read(&self.path).map(Zeroizing::new) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| {
                Error::internal(format!(
                    "keyring {} is corrupt: {error}",
                    self.path.display()
                ))
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(KeyringFile {
                version: 1,
                tenants: HashMap::new(),
            }),
            Err(error) => Err(Error::unavailable(format!(
                "reading keyring {}: {error}",
                self.path.display()
            ))),
        }
    }

    /// Writes the keyring atomically: a uniquely named temporary file with mode 0600, synced, then renamed.
    fn persist(&self, state: &KeyringFile) -> Result<()> {
        let bytes = Zeroizing::new(serde_json::to_vec_pretty(state)?);
        let temporary = self.path.with_extension(format!(
            "tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let write = || -> std::io::Result<()> {
            let mut file = options.open(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)
        };
        write().map_err(|error| {
            Error::unavailable(format!("writing keyring {}: {error}", self.path.display()))
        })
    }

    /// Creates the tenant's KEK unless another process or instance sharing the file already did. Serialized
    /// across processes by an exclusive lock on `<keyring>.lock`, and decided on the file's current content.
    fn create_kek(&self, tenant: &str) -> Result<KeyringFile> {
        let cannot_create = |why: String| {
            Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "keyring {} holds no key-encryption key for tenant {tenant} and cannot create one: {why}",
                    self.path.display()
                ),
            )
        };
        if self.read_only {
            return Err(cannot_create(
                "it is read-only (keys.keyring_read_only); add the tenant's key to it".into(),
            ));
        }
        let not_writable = |error: &std::io::Error| {
            matches!(
                error.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            )
        };
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| {
                Error::unavailable(format!("creating {}: {error}", parent.display()))
            })?;
        }
        let lock_path = self.path.with_extension("lock");
        let lock_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|error| {
                if not_writable(&error) {
                    cannot_create(format!("{} is not writable ({error})", lock_path.display()))
                } else {
                    Error::unavailable(format!("opening {}: {error}", lock_path.display()))
                }
            })?;
        lock_file.lock().map_err(|error| {
            Error::unavailable(format!("locking {}: {error}", lock_path.display()))
        })?;
        let mut current = self.read_file()?;
        if !current.tenants.contains_key(tenant) {
            let mut key = Zeroizing::new([0u8; 32]);
            self.rng
                .fill(key.as_mut())
                .map_err(|_| Error::internal("system random generator failed"))?;
            let id = format!("{tenant}-kek-1");
            current.tenants.insert(
                tenant.to_string(),
                TenantKeys {
                    current: id.clone(),
                    keys: HashMap::from([(id, BASE64.encode(key.as_ref()))]),
                },
            );
            self.persist(&current)?;
        }
        let _ = lock_file.unlock();
        Ok(current)
    }

    fn kek(
        &self,
        tenant: &str,
        kek_id: Option<&str>,
        create: bool,
    ) -> Result<(String, Zeroizing<Vec<u8>>)> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::internal("keyring lock poisoned"))?;
        let known = |state: &KeyringFile| {
            state
                .tenants
                .get(tenant)
                .is_some_and(|keys| kek_id.is_none_or(|id| keys.keys.contains_key(id)))
        };
        if !known(&state) {
            // Another process sharing the keyring may have added it since we read the file.
            *state = self.read_file()?;
        }
        if !state.tenants.contains_key(tenant) {
            if !create {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!("no key-encryption key for tenant {tenant}"),
                ));
            }
            *state = self.create_kek(tenant)?;
        }
        let tenant_keys = state
            .tenants
            .get(tenant)
            .ok_or_else(|| Error::internal("keyring lost a tenant it just created"))?;
        let id = kek_id.unwrap_or(&tenant_keys.current);
        let encoded = tenant_keys.keys.get(id).ok_or_else(|| {
            Error::new(
                ErrorCode::NotFound,
                format!("key-encryption key {id} of tenant {tenant} is not in the keyring"),
            )
        })?;
        let key = BASE64
            .decode(encoded)
            .map(Zeroizing::new)
            .map_err(|_| Error::internal(format!("keyring entry {id} is not base64")))?;
        Ok((id.to_string(), key))
    }
}

#[async_trait]
impl KeyEncryptionProvider for LocalKeyring {
    async fn wrap(&self, tenant: &str, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey> {
        let (kek_id, kek) = self.kek(tenant, None, true)?;
        let ciphertext = seal(&self.rng, &kek, plaintext, aad)?;
        Ok(WrappedKey { kek_id, ciphertext })
    }

    async fn unwrap(
        &self,
        tenant: &str,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let (_, kek) = self.kek(tenant, Some(&wrapped.kek_id), false)?;
        open(&kek, &wrapped.ciphertext, aad)
    }
}

/// AES-256-GCM: `nonce(12) | ciphertext | tag(16)`.
fn seal(rng: &SystemRandom, key: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| Error::internal("bad key length"))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| Error::internal("system random generator failed"))?;
    // Encrypted in place: once sealed it holds no plaintext, but it is wiped anyway if sealing fails.
    let mut buffer = Zeroizing::new(plaintext.to_vec());
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut *buffer,
    )
    .map_err(|_| Error::internal("key wrapping failed"))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buffer);
    Ok(out)
}

fn open(key: &[u8], sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(Error::internal("wrapped key is truncated"));
    }
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| Error::internal("bad key length"))?,
    );
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce =
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| Error::internal("bad nonce"))?;
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let plaintext = key
        .open_in_place(nonce, Aad::from(aad), &mut buffer)
        .map_err(|_| {
            Error::new(
                ErrorCode::PermissionDenied,
                "unwrapping a data key failed: wrong key-encryption key or tampered key record",
            )
        })?;
    Ok(Zeroizing::new(plaintext.to_vec()))
}

/// The stored form of a data key: `keys/tenant=<t>/period=<yyyy-mm>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataKeyRecord {
    /// Always `chatvault-dek-v1`.
    pub format: String,
    pub tenant_id: String,
    /// `yyyy-mm`.
    pub period: String,
    pub dek_id: String,
    pub kek_id: String,
    /// base64 of AES-256-GCM `nonce | ciphertext | tag` of the 32-byte data key under the KEK, with the AAD
    /// `chatvault-dek-v1|<tenant>|<period>|<dek_id>`.
    pub wrapped_key: String,
    pub created_at_micros: i64,
}

/// What each Parquet file's footer `key_metadata` holds (JSON): enough to find and unwrap its data key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileKeyMetadata {
    /// Always `chatvault-dek-v1`.
    pub format: String,
    pub tenant_id: String,
    pub period: String,
    pub dek_id: String,
    /// Object path of the [`DataKeyRecord`], relative to the archive root.
    pub key_record: String,
}

/// A plaintext data key. Debug output never shows the key, and the key bytes are wiped when it is dropped.
#[derive(Clone)]
pub struct DataKey {
    pub tenant_id: String,
    pub period: String,
    pub dek_id: String,
    pub key: [u8; DATA_KEY_BYTES],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("tenant_id", &self.tenant_id)
            .field("period", &self.period)
            .field("dek_id", &self.dek_id)
            .finish_non_exhaustive()
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl DataKey {
    pub fn file_key_metadata(&self) -> FileKeyMetadata {
        FileKeyMetadata {
            format: "chatvault-dek-v1".into(),
            tenant_id: self.tenant_id.clone(),
            period: self.period.clone(),
            dek_id: self.dek_id.clone(),
            key_record: layout::data_key_path(&self.tenant_id, &self.period).to_string(),
        }
    }
}

fn dek_aad(tenant: &str, period: &str, dek_id: &str) -> Vec<u8> {
    format!("chatvault-dek-v1|{tenant}|{period}|{dek_id}").into_bytes()
}

const CACHE_CAPACITY: usize = 4096;

/// Finds or creates the data key of a tenant's period, through the archive's object store and a KEK provider.
/// Plaintext keys are cached in memory (bounded). `Debug` names the provider and how many keys are cached.
#[derive(Clone)]
pub struct DataKeys {
    store: Arc<dyn ObjectStore>,
    provider: Arc<dyn KeyEncryptionProvider>,
    cache: Arc<Mutex<HashMap<(String, String), DataKey>>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.cache.lock().map(|cache| cache.len()).unwrap_or(0);
        f.debug_struct("DataKeys")
            .field("provider", &self.provider)
            .field("cached_keys", &cached)
            .finish_non_exhaustive()
    }
}

impl DataKeys {
    /// Data keys wrapped by the local keyring that `keys` configures (the default key provider).
    pub fn from_config(store: Arc<dyn ObjectStore>, keys: &KeysConfig) -> Result<DataKeys> {
        let keyring = if keys.keyring_read_only {
            LocalKeyring::open_read_only(&keys.keyring_path)?
        } else {
            LocalKeyring::open(&keys.keyring_path)?
        };
        Ok(DataKeys::new(store, Arc::new(keyring)))
    }

    /// Data keys wrapped by the (writable) local keyring at `keyring_path`.
    pub fn with_local_keyring(
        store: Arc<dyn ObjectStore>,
        keyring_path: &Path,
    ) -> Result<DataKeys> {
        Ok(DataKeys::new(
            store,
            Arc::new(LocalKeyring::open(keyring_path)?),
        ))
    }

    pub fn new(store: Arc<dyn ObjectStore>, provider: Arc<dyn KeyEncryptionProvider>) -> DataKeys {
        DataKeys {
            store,
            provider,
            cache: Arc::new(Mutex::new(HashMap::new())),
            rng: SystemRandom::new(),
        }
    }

    fn cached(&self, tenant: &str, period: &str) -> Option<DataKey> {
        self.cache
            .lock()
            .ok()?
            .get(&(tenant.to_string(), period.to_string()))
            .cloned()
    }

    fn remember(&self, key: &DataKey) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert((key.tenant_id.clone(), key.period.clone()), key.clone());
        }
    }

    /// The data key of `tenant`'s `period`; NOT_FOUND when none was ever created. A record whose own tenant or
    /// period differs from the ones its path names (copied or swapped in storage) is refused with INTERNAL
    /// before it is unwrapped: the AAD binds the wrapped key to the record's fields, not to the path, so a
    /// valid record of another tenant or month would otherwise unwrap and be used here.
    pub async fn get(&self, tenant: &str, period: &str) -> Result<DataKey> {
        if let Some(key) = self.cached(tenant, period) {
            return Ok(key);
        }
        let path = layout::data_key_path(tenant, period);
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|error| Error::from(error).context(format!("data key {path}")))?
            .bytes()
            .await?;
        let record: DataKeyRecord = serde_json::from_slice(&bytes).map_err(|error| {
            Error::internal(format!("data key record {path} is corrupt: {error}"))
        })?;
        if record.tenant_id != tenant || record.period != period {
            return Err(Error::internal(format!(
                "data key record {path} names tenant {} period {} but was read for tenant {tenant} period \
                 {period}: the record was copied or swapped in storage; refusing to use it",
                record.tenant_id, record.period
            )));
        }
        let key = self.unwrap_record(&record).await?;
        self.remember(&key);
        Ok(key)
    }

    /// The data key of `tenant`'s `period`, created (and stored with a conditional create, so concurrent
    /// archivers agree on one key) when missing.
    pub async fn get_or_create(&self, tenant: &str, period: &str) -> Result<DataKey> {
        match self.get(tenant, period).await {
            Ok(key) => return Ok(key),
            Err(error) if error.code() == ErrorCode::NotFound => {}
            Err(error) => return Err(error),
        }
        let mut key = Zeroizing::new([0u8; DATA_KEY_BYTES]);
        let mut id_bytes = [0u8; 8];
        self.rng
            .fill(key.as_mut())
            .and_then(|_| self.rng.fill(&mut id_bytes))
            .map_err(|_| Error::internal("system random generator failed"))?;
        let dek_id = format!("{tenant}/{period}/{}", hex::encode(id_bytes));
        let wrapped = timed_provider_call(
            "wrap",
            self.provider
                .wrap(tenant, key.as_ref(), &dek_aad(tenant, period, &dek_id)),
        )
        .await?;
        let record = DataKeyRecord {
            format: "chatvault-dek-v1".into(),
            tenant_id: tenant.to_string(),
            period: period.to_string(),
            dek_id: dek_id.clone(),
            kek_id: wrapped.kek_id,
            wrapped_key: BASE64.encode(&wrapped.ciphertext),
            created_at_micros: now_micros(),
        };
        let path = layout::data_key_path(tenant, period);
        let put = self
            .store
            .put_opts(
                &path,
                PutPayload::from(serde_json::to_vec_pretty(&record)?),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => {
                let data_key = DataKey {
                    tenant_id: tenant.to_string(),
                    period: period.to_string(),
                    dek_id,
                    key: *key,
                };
                self.remember(&data_key);
                Ok(data_key)
            }
            // Another archiver created it first: use theirs.
            Err(object_store::Error::AlreadyExists { .. }) => self.get(tenant, period).await,
            Err(error) => Err(Error::from(error).context(format!("storing data key {path}"))),
        }
    }

    async fn unwrap_record(&self, record: &DataKeyRecord) -> Result<DataKey> {
        if record.format != "chatvault-dek-v1" {
            return Err(Error::internal(format!(
                "data key record of {}/{} has unknown format {}",
                record.tenant_id, record.period, record.format
            )));
        }
        let ciphertext = BASE64
            .decode(&record.wrapped_key)
            .map_err(|_| Error::internal("data key record: wrapped_key is not base64"))?;
        let wrapped = WrappedKey {
            kek_id: record.kek_id.clone(),
            ciphertext,
        };
        let plaintext = timed_provider_call(
            "unwrap",
            self.provider.unwrap(
                &record.tenant_id,
                &wrapped,
                &dek_aad(&record.tenant_id, &record.period, &record.dek_id),
            ),
        )
        .await?;
        let key: [u8; DATA_KEY_BYTES] = plaintext
            .as_slice()
            .try_into()
            .map_err(|_| Error::internal("data key has the wrong length"))?;
        Ok(DataKey {
            tenant_id: record.tenant_id.clone(),
            period: record.period.clone(),
            dek_id: record.dek_id.clone(),
            key,
        })
    }
}

/// Runs a key-encryption-key provider call in a span, recording its latency and failures
/// (`chatvault.keys.provider.*`). Only the operation is recorded: never key material or tenants.
async fn timed_provider_call<T>(
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let result = call
        .instrument(tracing::info_span!("keys.provider", operation))
        .await;
    let metrics = chatvault_core::metrics::metrics();
    let labels = [chatvault_core::metrics::KeyValue::new(
        "operation",
        operation,
    )];
    metrics
        .key_provider_duration
        .record(started.elapsed().as_secs_f64(), &labels);
    if result.is_err() {
        metrics.key_provider_errors.add(1, &labels);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn data_keys_are_created_once_and_unwrap_after_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring_path = dir.path().join("keyring.json");
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let keyring = Arc::new(LocalKeyring::open(&keyring_path).expect("open"));
        let keys = DataKeys::new(store.clone(), keyring);
        let first = keys.get_or_create("acme", "2026-11").await.expect("create");
        let again = keys.get_or_create("acme", "2026-11").await.expect("get");
        assert_eq!(first.key, again.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&keyring_path)
                .expect("keyring")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A fresh process (new cache, keyring re-read) finds the same key.
        let reopened = DataKeys::new(
            store.clone(),
            Arc::new(LocalKeyring::open(&keyring_path).expect("reopen")),
        );
        assert_eq!(
            reopened.get("acme", "2026-11").await.expect("get").key,
            first.key
        );
        let other_period = reopened
            .get_or_create("acme", "2026-12")
            .await
            .expect("create");
        assert_ne!(other_period.key, first.key);
        // Without the keyring the key cannot be unwrapped.
        let stranger = DataKeys::new(
            store,
            Arc::new(LocalKeyring::open(&dir.path().join("other.json")).expect("open")),
        );
        assert!(stranger.get("acme", "2026-11").await.is_err());
        assert!(!format!("{first:?}").contains(&format!("{:?}", first.key)));
    }

    /// Every textual form a key could take in a log line.
    fn encodings(key: &[u8]) -> Vec<String> {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        vec![
            hex::encode(key),
            hex::encode_upper(key),
            BASE64.encode(key),
            STANDARD_NO_PAD.encode(key),
            URL_SAFE.encode(key),
            URL_SAFE_NO_PAD.encode(key),
            format!("{key:?}"),
            format!("{key:x?}"),
            // A prefix of the bytes as Debug prints them, in case only part is shown.
            format!("{:?}", &key[..4]).trim_end_matches(']').to_string(),
        ]
    }

    #[tokio::test]
    async fn debug_output_of_key_holders_shows_no_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring_path = dir.path().join("keyring.json");
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let keyring = Arc::new(LocalKeyring::open(&keyring_path).expect("open"));
        let keys = DataKeys::new(store, keyring.clone());
        let data_key = keys.get_or_create("acme", "2026-11").await.expect("create");
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&keyring_path).expect("keyring")).expect("json");
        let kek_base64 = file["tenants"]["acme"]["keys"]["acme-kek-1"]
            .as_str()
            .expect("kek")
            .to_string();
        let kek = BASE64.decode(&kek_base64).expect("base64");
        let printed = [
            format!("{data_key:?}"),
            format!("{data_key:#?}"),
            format!("{keys:?}"),
            format!("{keys:#?}"),
            format!("{keyring:?}"),
            format!("{:?}", keyring.state.lock().expect("state")),
        ];
        for text in &printed {
            for secret in encodings(&data_key.key)
                .into_iter()
                .chain(encodings(&kek))
                .chain([kek_base64.clone()])
            {
                assert!(
                    !text.contains(&secret),
                    "{text} shows key material {secret}"
                );
            }
        }
        // What Debug does show is still useful.
        assert!(printed[0].contains("acme/2026-11/"), "{}", printed[0]);
        assert!(printed[4].contains("keyring.json"), "{}", printed[4]);
        assert!(printed[5].contains("acme-kek-1"), "{}", printed[5]);
    }

    #[tokio::test]
    async fn a_record_copied_to_another_tenant_or_period_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let keyring = Arc::new(LocalKeyring::open(&dir.path().join("k.json")).expect("open"));
        let writer = DataKeys::new(store.clone(), keyring.clone());
        writer.get_or_create("acme", "2026-11").await.expect("acme");
        writer
            .get_or_create("globex", "2026-11")
            .await
            .expect("globex");
        let record = |tenant: &str, period: &str| {
            let store = store.clone();
            let path = layout::data_key_path(tenant, period);
            async move {
                store
                    .get(&path)
                    .await
                    .expect("get")
                    .bytes()
                    .await
                    .expect("bytes")
            }
        };
        // acme's November record swapped in as globex's, and copied to acme's December.
        let acme = record("acme", "2026-11").await;
        store
            .put(
                &layout::data_key_path("globex", "2026-11"),
                PutPayload::from(acme.clone()),
            )
            .await
            .expect("swap");
        store
            .put(
                &layout::data_key_path("acme", "2026-12"),
                PutPayload::from(acme),
            )
            .await
            .expect("copy");
        // A fresh reader: nothing cached.
        let reader = DataKeys::new(store.clone(), keyring);
        for (tenant, period, names) in [
            ("globex", "2026-11", "names tenant acme period 2026-11"),
            ("acme", "2026-12", "names tenant acme period 2026-11"),
        ] {
            let error = reader
                .get(tenant, period)
                .await
                .expect_err("swapped record");
            assert_eq!(error.code(), ErrorCode::Internal);
            let message = error.message();
            assert!(message.contains(names), "{message}");
            assert!(
                message.contains(&format!("read for tenant {tenant} period {period}")),
                "{message}"
            );
            assert!(message.contains("swapped"), "{message}");
            // The archiver's path is guarded too: it must not adopt the stranger's key for new files.
            assert!(reader.get_or_create(tenant, period).await.is_err());
        }
        assert!(reader.get("acme", "2026-11").await.is_ok());
    }

    #[tokio::test]
    async fn instances_sharing_a_keyring_file_agree_on_each_tenants_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keyring.json");
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let first = DataKeys::new(
            store.clone(),
            Arc::new(LocalKeyring::open(&path).expect("open")),
        );
        let second = DataKeys::new(
            store.clone(),
            Arc::new(LocalKeyring::open(&path).expect("open")),
        );
        // Both instances opened the file before any KEK existed.
        let created = first.get_or_create("acme", "2026-11").await.expect("first");
        let read = second
            .get("acme", "2026-11")
            .await
            .expect("second unwraps the first's key");
        assert_eq!(created.key, read.key);
        let other = second
            .get_or_create("globex", "2026-11")
            .await
            .expect("second creates");
        assert_eq!(
            first
                .get("globex", "2026-11")
                .await
                .expect("first reads")
                .key,
            other.key
        );
    }
}
