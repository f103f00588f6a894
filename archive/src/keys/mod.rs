//! Envelope encryption.
//!
//! - A **key-encryption key** (KEK) per tenant is held by a [`KeyEncryptionProvider`]: the local keyring file
//!   by default ([`LocalKeyring`]), AWS KMS ([`AwsKms`]) or a PKCS#11 HSM ([`Pkcs11Hsm`]); `keys.provider` and
//!   `keys.tenant_providers` choose, per tenant ([`Providers`]).
//! - A **data key** (DEK, 256-bit) per tenant and month encrypts that month's Parquet files, so DuckDB can scan
//!   a tenant's month with one key. It is stored wrapped by the tenant's KEK in the archive itself, at
//!   `keys/tenant=<t>/period=<yyyy-mm>.json` ([`DataKeyRecord`]), next to the data it opens. The record names
//!   the provider and the KEK (version) that wrapped it, so records wrapped before a rotation or a move to
//!   another provider still open, and [`DataKeys::rewrap`] can move them to the current KEK.
//! - Each Parquet file's footer key metadata names the data key ([`FileKeyMetadata`]), so an authorized reader
//!   can find the key of any file.
//!
//! Destroying a tenant's KEK, or one period's record, makes that data unreadable everywhere.
//!
//! Key material never reaches a log: every type that holds a key ([`DataKey`], [`LocalKeyring`], [`DataKeys`])
//! has a `Debug` that leaves the key bytes out. Keys held here are wiped (`zeroize`) when dropped: data keys,
//! key-encryption keys in the keyring's memory, and the buffers they pass through (unwrapped plaintext, the
//! keyring file's bytes); unwrapped data keys are also forgotten `keys.cache_ttl` after they were fetched.
//! What this cannot reach: copies made by libraries we hand a key to (the Parquet crate's encryption
//! properties keep their own `Vec`, the AWS SDK's response buffers), by serde_json while parsing, or left in
//! freed memory by the allocator before this crate saw the bytes.

mod aws_kms;
mod erasure;
mod local;
pub mod pkcs11;
mod provider;
mod rewrap;
mod scopes;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::layout;
use chatvault_core::config::KeysConfig;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::time::now_micros;

pub use aws_kms::AwsKms;
pub use erasure::{ErasureRecord, ShredPlan, ShredReport, ShredTarget};
pub use local::LocalKeyring;
pub use pkcs11::Pkcs11Hsm;
pub use provider::{KeyContext, KeyEncryptionProvider, Providers, WrappedKey};
pub use rewrap::{RewrapOutcome, RewrapReport};
pub use scopes::KeyScopes;

pub const DATA_KEY_BYTES: usize = 32;

/// The key scope of a tenant's default data keys; named scopes (`keys.scopes`) are resolved by [`KeyScopes`].
pub const DEFAULT_SCOPE: &str = "";

/// The stored form of a data key: `keys/tenant=<t>/period=<yyyy-mm>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataKeyRecord {
    /// Always `chatvault-dek-v1`.
    pub format: String,
    pub tenant_id: String,
    /// The key scope within the tenant ([`DEFAULT_SCOPE`], empty, for the tenant's default keys).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// `yyyy-mm`.
    pub period: String,
    pub dek_id: String,
    /// The provider that wrapped it (`local`, `aws_kms`); records written before providers existed have none
    /// and are the keyring's.
    #[serde(default = "local_provider")]
    pub provider: String,
    /// The KEK (version) that wrapped it: a keyring entry (`<tenant>-kek-<n>`) or a KMS key ARN.
    pub kek_id: String,
    /// base64 of the wrapped key. The keyring's (and the HSM's) form is AES-256-GCM `nonce | ciphertext | tag`
    /// of the 32-byte data key under the KEK, with the AAD of [`KeyContext::aad`].
    pub wrapped_key: String,
    pub created_at_micros: i64,
    /// When [`DataKeys::rewrap`] last wrapped it again (0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rewrapped_at_micros: i64,
}

fn local_provider() -> String {
    "local".into()
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// What each Parquet file's footer `key_metadata` holds (JSON): enough to find and unwrap its data key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileKeyMetadata {
    /// Always `chatvault-dek-v1`.
    pub format: String,
    pub tenant_id: String,
    /// The key scope within the tenant (absent: the default scope).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_scope: String,
    pub period: String,
    pub dek_id: String,
    /// Object path of the [`DataKeyRecord`], relative to the archive root.
    pub key_record: String,
}

/// A plaintext data key. Debug output never shows the key, and the key bytes are wiped when it is dropped.
#[derive(Clone)]
pub struct DataKey {
    pub tenant_id: String,
    /// The key scope within the tenant ([`DEFAULT_SCOPE`] for the tenant's default keys).
    pub scope: String,
    pub period: String,
    pub dek_id: String,
    pub key: [u8; DATA_KEY_BYTES],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("tenant_id", &self.tenant_id)
            .field("scope", &self.scope)
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
            key_scope: self.scope.clone(),
            period: self.period.clone(),
            dek_id: self.dek_id.clone(),
            key_record: layout::data_key_path_in(&self.tenant_id, &self.scope, &self.period)
                .to_string(),
        }
    }
}

const CACHE_CAPACITY: usize = 4096;

/// Finds or creates the data key of a tenant's period, through the archive's object store and the tenant's
/// key provider. Plaintext keys are cached in memory, bounded in number and in time (`keys.cache_ttl`: a key
/// destroyed or disabled in the provider stops being usable here within that time). `Debug` names the
/// providers and how many keys are cached.
#[derive(Clone)]
pub struct DataKeys {
    store: Arc<dyn ObjectStore>,
    providers: Arc<Providers>,
    cache: Arc<Mutex<HashMap<CacheId, CachedKey>>>,
    cache_ttl: Duration,
    rng: SystemRandom,
    scopes: Arc<KeyScopes>,
}

/// (tenant, scope, period).
type CacheId = (String, String, String);

fn cache_id(tenant: &str, scope: &str, period: &str) -> CacheId {
    (tenant.to_string(), scope.to_string(), period.to_string())
}

struct CachedKey {
    key: DataKey,
    fetched: Instant,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.cache.lock().map(|cache| cache.len()).unwrap_or(0);
        f.debug_struct("DataKeys")
            .field("providers", &self.providers)
            .field("cached_keys", &cached)
            .finish_non_exhaustive()
    }
}

impl DataKeys {
    /// Data keys wrapped by the providers `keys` configures, after checking that each is reachable and its
    /// keys usable (so a misconfigured KMS key fails start-up, naming the setting, instead of the first
    /// commit).
    pub async fn from_config(store: Arc<dyn ObjectStore>, keys: &KeysConfig) -> Result<DataKeys> {
        let providers = Providers::from_config(keys).await?;
        providers.check().await?;
        Ok(DataKeys::with_providers(store, providers, keys.cache_ttl)
            .with_scopes(KeyScopes::from_config(&keys.scopes)))
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

    /// Every tenant's data keys wrapped by `provider`.
    pub fn new(store: Arc<dyn ObjectStore>, provider: Arc<dyn KeyEncryptionProvider>) -> DataKeys {
        DataKeys::with_providers(
            store,
            Providers::single(provider),
            KeysConfig::default().cache_ttl,
        )
    }

    pub fn with_providers(
        store: Arc<dyn ObjectStore>,
        providers: Providers,
        cache_ttl: Duration,
    ) -> DataKeys {
        DataKeys {
            store,
            providers: Arc::new(providers),
            cache: Arc::new(Mutex::new(HashMap::new())),
            cache_ttl,
            rng: SystemRandom::new(),
            scopes: Arc::new(KeyScopes::default()),
        }
    }

    /// These data keys with the key scopes `scopes` (which scope an event's keys are of).
    pub fn with_scopes(mut self, scopes: KeyScopes) -> DataKeys {
        self.scopes = Arc::new(scopes);
        self
    }

    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// Which key scope an event belongs to (`keys.scopes`).
    pub fn scopes(&self) -> &Arc<KeyScopes> {
        &self.scopes
    }

    /// Forgets (wipes) the cached plaintext key of `tenant`'s `scope` and `period`.
    pub fn forget(&self, tenant: &str, scope: &str, period: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&cache_id(tenant, scope, period));
        }
    }

    fn cached(&self, tenant: &str, scope: &str, period: &str) -> Option<DataKey> {
        let mut cache = self.cache.lock().ok()?;
        let id = cache_id(tenant, scope, period);
        let entry = cache.get(&id)?;
        if entry.fetched.elapsed() < self.cache_ttl {
            return Some(entry.key.clone());
        }
        cache.remove(&id);
        None
    }

    fn remember(&self, key: &DataKey) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                let ttl = self.cache_ttl;
                cache.retain(|_, entry| entry.fetched.elapsed() < ttl);
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(
                cache_id(&key.tenant_id, &key.scope, &key.period),
                CachedKey {
                    key: key.clone(),
                    fetched: Instant::now(),
                },
            );
        }
    }

    /// The data key of `tenant`'s default scope for `period` (see [`DataKeys::get_in`]).
    pub async fn get(&self, tenant: &str, period: &str) -> Result<DataKey> {
        self.get_in(tenant, DEFAULT_SCOPE, period).await
    }

    /// The data key of `tenant`'s default scope for `period`, created when missing (see
    /// [`DataKeys::get_or_create_in`]).
    pub async fn get_or_create(&self, tenant: &str, period: &str) -> Result<DataKey> {
        self.get_or_create_in(tenant, DEFAULT_SCOPE, period).await
    }

    /// The data key of `tenant`'s key scope `scope` for `period`; ERASED when it was shredded (and no new
    /// one created since), NOT_FOUND when none was ever created. A record whose own tenant, scope or period
    /// differs from the ones its path names (copied or swapped in storage) is refused with INTERNAL before it
    /// is unwrapped: a valid record of another tenant or month would otherwise unwrap and be used here.
    pub async fn get_in(&self, tenant: &str, scope: &str, period: &str) -> Result<DataKey> {
        if let Some(key) = self.cached(tenant, scope, period) {
            return Ok(key);
        }
        let path = layout::data_key_path_in(tenant, scope, period);
        let (record, _) = match self.read_record(&path).await {
            Err(error) if error.code() == ErrorCode::NotFound => {
                // Erased data is not missing data: say so, with the date.
                return Err(match self.latest_erasure(tenant, scope, period).await? {
                    Some(erasure) => erasure.error(),
                    None => error,
                });
            }
            other => other?,
        };
        if record.tenant_id != tenant || record.scope != scope || record.period != period {
            return Err(Error::internal(format!(
                "data key record {path} names {} but was read for {}: the record was copied or swapped in \
                 storage; refusing to use it",
                key_name(&record.tenant_id, &record.scope, &record.period),
                key_name(tenant, scope, period)
            )));
        }
        let key = self.unwrap_record(&record).await?;
        self.remember(&key);
        Ok(key)
    }

    /// The data key of `tenant`'s key scope `scope` for `period`, created (and stored with a conditional
    /// create, so concurrent archivers agree on one key) when missing, or when the period's key was erased
    /// (new data of an erased month gets a fresh key; the erased files stay unreadable).
    pub async fn get_or_create_in(
        &self,
        tenant: &str,
        scope: &str,
        period: &str,
    ) -> Result<DataKey> {
        match self.get_in(tenant, scope, period).await {
            Ok(key) => return Ok(key),
            Err(error) if matches!(error.code(), ErrorCode::NotFound | ErrorCode::Erased) => {}
            Err(error) => return Err(error),
        }
        let mut id_bytes = [0u8; 8];
        self.rng
            .fill(&mut id_bytes)
            .map_err(|_| Error::internal("system random generator failed"))?;
        let dek_id = if scope.is_empty() {
            format!("{tenant}/{period}/{}", hex::encode(id_bytes))
        } else {
            format!("{tenant}/{scope}/{period}/{}", hex::encode(id_bytes))
        };
        let provider = self.providers.of(tenant);
        let context = KeyContext {
            tenant,
            scope,
            period,
            dek_id: &dek_id,
        };
        let (key, wrapped) = timed_provider_call("generate", provider.generate(&context)).await?;
        let record = DataKeyRecord {
            format: "chatvault-dek-v1".into(),
            tenant_id: tenant.to_string(),
            scope: scope.to_string(),
            period: period.to_string(),
            dek_id: dek_id.clone(),
            provider: provider.kind().to_string(),
            kek_id: wrapped.kek_id,
            wrapped_key: BASE64.encode(&wrapped.ciphertext),
            created_at_micros: now_micros(),
            rewrapped_at_micros: 0,
        };
        let path = layout::data_key_path_in(tenant, scope, period);
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
                    scope: scope.to_string(),
                    period: period.to_string(),
                    dek_id,
                    key: *key,
                };
                self.remember(&data_key);
                Ok(data_key)
            }
            // Another archiver created it first: use theirs.
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.get_in(tenant, scope, period).await
            }
            Err(error) => Err(Error::from(error).context(format!("storing data key {path}"))),
        }
    }

    /// A key record and its version (for a conditional rewrite).
    async fn read_record(
        &self,
        path: &object_store::path::Path,
    ) -> Result<(DataKeyRecord, object_store::UpdateVersion)> {
        let fetched = self
            .store
            .get(path)
            .await
            .map_err(|error| Error::from(error).context(format!("data key {path}")))?;
        let version = object_store::UpdateVersion {
            e_tag: fetched.meta.e_tag.clone(),
            version: fetched.meta.version.clone(),
        };
        let bytes = fetched.bytes().await?;
        let record: DataKeyRecord = serde_json::from_slice(&bytes).map_err(|error| {
            Error::internal(format!("data key record {path} is corrupt: {error}"))
        })?;
        Ok((record, version))
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
        let provider = self.providers.by_kind(&record.provider).ok_or_else(|| {
            Error::unavailable(format!(
                "data key record of {}/{} was wrapped by key provider {}, which is not configured here \
                 (keys.provider / keys.tenant_providers)",
                record.tenant_id, record.period, record.provider
            ))
        })?;
        let plaintext =
            timed_provider_call("unwrap", provider.unwrap(&record_context(record), &wrapped))
                .await?;
        let key: [u8; DATA_KEY_BYTES] = plaintext
            .as_slice()
            .try_into()
            .map_err(|_| Error::internal("data key has the wrong length"))?;
        Ok(DataKey {
            tenant_id: record.tenant_id.clone(),
            scope: record.scope.clone(),
            period: record.period.clone(),
            dek_id: record.dek_id.clone(),
            key,
        })
    }
}

/// `tenant <t> [scope <s> ]period <p>`, for messages.
fn key_name(tenant: &str, scope: &str, period: &str) -> String {
    if scope.is_empty() {
        format!("tenant {tenant} period {period}")
    } else {
        format!("tenant {tenant} scope {scope} period {period}")
    }
}

/// The context a record's wrapped key is bound to.
fn record_context(record: &DataKeyRecord) -> KeyContext<'_> {
    KeyContext {
        tenant: &record.tenant_id,
        scope: &record.scope,
        period: &record.period,
        dek_id: &record.dek_id,
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
            keyring.debug_state(),
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

    async fn stored_record(
        store: &Arc<dyn ObjectStore>,
        tenant: &str,
        period: &str,
    ) -> DataKeyRecord {
        let bytes = store
            .get(&layout::data_key_path(tenant, period))
            .await
            .expect("record")
            .bytes()
            .await
            .expect("bytes");
        serde_json::from_slice(&bytes).expect("json")
    }

    /// Over a store with conditional updates (memory) and one without (the local file system, where rewrap
    /// overwrites).
    async fn rotate_then_rewrap(store: Arc<dyn ObjectStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring_path = dir.path().join("keyring.json");
        let keyring = Arc::new(LocalKeyring::open(&keyring_path).expect("open"));
        let keys = DataKeys::new(store.clone(), keyring.clone());
        let november = keys.get_or_create("acme", "2026-11").await.expect("nov");
        keys.get_or_create("globex", "2026-11")
            .await
            .expect("globex");
        assert_eq!(keyring.rotate("acme").await.expect("rotate"), "acme-kek-2");
        // Another instance sharing the keyring wraps new keys under the new KEK without a restart.
        let other = DataKeys::new(
            store.clone(),
            Arc::new(LocalKeyring::open(&keyring_path).expect("reopen")),
        );
        other.get_or_create("acme", "2026-12").await.expect("dec");
        assert_eq!(
            stored_record(&store, "acme", "2026-12").await.kek_id,
            "acme-kek-2"
        );
        assert_eq!(
            stored_record(&store, "acme", "2026-11").await.kek_id,
            "acme-kek-1"
        );

        // Not retirable while a record needs it.
        let refused = keys
            .retire_kek("acme", "acme-kek-1")
            .await
            .expect_err("still needed");
        assert_eq!(refused.code(), ErrorCode::Conflict);
        assert!(
            refused.message().contains("period=2026-11.json"),
            "{refused}"
        );
        let mut seen = Vec::new();
        let report = keys
            .rewrap(Some("acme"), |entry| seen.push(entry.record.clone()))
            .await
            .expect("rewrap");
        assert_eq!(
            (report.rewrapped, report.current, report.failed),
            (1, 1, 0),
            "{report:?}"
        );
        assert_eq!(seen.len(), 2);
        let rewrapped = stored_record(&store, "acme", "2026-11").await;
        assert_eq!(rewrapped.kek_id, "acme-kek-2");
        assert_eq!(rewrapped.dek_id, november.dek_id);
        assert!(rewrapped.rewrapped_at_micros > 0);

        // The old KEK is no longer needed: retired, every record still opens; the current one cannot be.
        assert_eq!(
            keys.retire_kek("acme", "acme-kek-2")
                .await
                .expect_err("current")
                .code(),
            ErrorCode::InvalidArgument
        );
        keys.retire_kek("acme", "acme-kek-1").await.expect("retire");
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&keyring_path).expect("read")).expect("json");
        assert!(
            file["tenants"]["acme"]["keys"].get("acme-kek-1").is_none(),
            "{file}"
        );
        let retired = DataKeys::new(
            store.clone(),
            Arc::new(LocalKeyring::open(&keyring_path).expect("reopen")),
        );
        assert_eq!(
            retired.get("acme", "2026-11").await.expect("nov").key,
            november.key
        );
        retired.get("acme", "2026-12").await.expect("dec");

        // Everything is current now; a tampered record is reported and left as it was.
        let mut tampered = stored_record(&store, "globex", "2026-11").await;
        tampered.kek_id = "globex-kek-9".into();
        store
            .put(
                &layout::data_key_path("globex", "2026-11"),
                PutPayload::from(serde_json::to_vec(&tampered).expect("json")),
            )
            .await
            .expect("tamper");
        let report = retired.rewrap(None, |_| {}).await.expect("rewrap all");
        assert_eq!(
            (report.rewrapped, report.current, report.failed),
            (0, 2, 1),
            "{report:?}"
        );
        let failed = report
            .records
            .iter()
            .find(|entry| matches!(entry.outcome, RewrapOutcome::Failed { .. }))
            .expect("failed entry");
        assert_eq!(failed.tenant_id, "globex");
        assert_eq!(
            stored_record(&store, "globex", "2026-11").await.kek_id,
            "globex-kek-9"
        );
    }

    #[tokio::test]
    async fn rotation_wraps_new_keys_under_the_new_kek_and_rewrap_moves_the_old_ones() {
        rotate_then_rewrap(Arc::new(InMemory::new())).await;
        let dir = tempfile::tempdir().expect("tempdir");
        rotate_then_rewrap(Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("fs"),
        ))
        .await;
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
