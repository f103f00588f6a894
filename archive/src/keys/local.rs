//! The local keyring: a JSON file holding one or more AES-256 key-encryption keys per tenant (the current one
//! wraps new data keys; older versions still unwrap). The default provider, for standalone and single-node
//! deployments; production deployments use a KMS or an HSM behind the same trait.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::provider::{KeyContext, KeyEncryptionProvider, WrappedKey, unsupported};
use chatvault_core::error::{Error, ErrorCode, Result};

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
    /// Empty after the tenant's keys were destroyed (the next use creates a new one).
    current: String,
    /// kek id → base64 key
    keys: HashMap<String, String>,
    /// Ids of destroyed keys (`chatvault keys shred`), so that version numbers are never reused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    destroyed: Vec<String>,
}

impl TenantKeys {
    fn has_current(&self) -> bool {
        self.keys.contains_key(&self.current)
    }
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("TenantKeys")
            .field("current", &self.current)
            .field("kek_ids", &ids)
            .field("destroyed", &self.destroyed)
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

    /// The `Debug` form of the in-memory keyring state (for the test that no key material is ever shown).
    #[cfg(test)]
    pub(super) fn debug_state(&self) -> String {
        format!("{:?}", self.state.lock().expect("keyring state"))
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

    /// Changes the keyring file for `tenant` under an exclusive lock on `<keyring>.lock` (serializing
    /// processes and instances sharing the file): `change` sees the file's current content and says whether it
    /// changed it (then the file is written). Returns the content after the change.
    fn update_file(
        &self,
        tenant: &str,
        change: impl FnOnce(&mut KeyringFile) -> Result<bool>,
    ) -> Result<KeyringFile> {
        let cannot_change = |why: String| {
            Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "keyring {} cannot change the key-encryption keys of tenant {tenant}: {why}",
                    self.path.display()
                ),
            )
        };
        if self.read_only {
            return Err(cannot_change(
                "it is read-only (keys.keyring_read_only); change the keyring Secret itself".into(),
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
                    cannot_change(format!("{} is not writable ({error})", lock_path.display()))
                } else {
                    Error::unavailable(format!("opening {}: {error}", lock_path.display()))
                }
            })?;
        lock_file.lock().map_err(|error| {
            Error::unavailable(format!("locking {}: {error}", lock_path.display()))
        })?;
        let mut current = self.read_file()?;
        if change(&mut current)? {
            self.persist(&current)?;
        }
        let _ = lock_file.unlock();
        Ok(current)
    }

    /// Adds a KEK version for `tenant`, deciding on the file's current content: with [`AddKek::IfMissing`]
    /// only when the tenant has no current one (two instances racing agree on one), with [`AddKek::Rotate`]
    /// always, making the new version current. Versions are `<tenant>-kek-<n>`, numbered on from the highest
    /// ever held (destroyed ones included, so an id never names two keys).
    fn add_kek(&self, tenant: &str, mode: AddKek) -> Result<KeyringFile> {
        self.update_file(tenant, |current| {
            let existing = current.tenants.get(tenant);
            if mode == AddKek::IfMissing && existing.is_some_and(TenantKeys::has_current) {
                return Ok(false);
            }
            let next = existing
                .map(|keys| {
                    keys.keys
                        .keys()
                        .chain(&keys.destroyed)
                        .filter_map(|id| kek_version(tenant, id))
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0)
                + 1;
            let mut key = Zeroizing::new([0u8; 32]);
            self.rng
                .fill(key.as_mut())
                .map_err(|_| Error::internal("system random generator failed"))?;
            let id = format!("{tenant}-kek-{next}");
            let entry = current
                .tenants
                .entry(tenant.to_string())
                .or_insert_with(|| TenantKeys {
                    current: String::new(),
                    keys: HashMap::new(),
                    destroyed: Vec::new(),
                });
            entry.keys.insert(id.clone(), BASE64.encode(key.as_ref()));
            entry.current = id;
            Ok(true)
        })
    }

    fn kek_ids(&self, tenant: &str) -> Result<Vec<String>> {
        let file = self.read_file()?;
        let mut ids: Vec<String> = file
            .tenants
            .get(tenant)
            .map(|keys| keys.keys.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        Ok(ids)
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
        if kek_id.is_none() || !known(&state) {
            // Another process sharing the keyring may have added it, or rotated (`chatvault keys rotate`), since
            // we read the file. Wrapping is rare (a new data key per tenant and month), so the current KEK is
            // always taken from the file.
            *state = self.read_file()?;
        }
        let usable = state.tenants.get(tenant).is_some_and(|keys| match kek_id {
            None => keys.has_current(),
            Some(_) => true,
        });
        if !usable {
            if !create || kek_id.is_some() {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!("no key-encryption key for tenant {tenant}"),
                ));
            }
            *state = self.add_kek(tenant, AddKek::IfMissing)?;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddKek {
    IfMissing,
    Rotate,
}

/// `n` of a key id `<tenant>-kek-<n>`.
fn kek_version(tenant: &str, id: &str) -> Option<u64> {
    id.strip_prefix(tenant)?.strip_prefix("-kek-")?.parse().ok()
}

#[async_trait]
impl KeyEncryptionProvider for LocalKeyring {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn wrap(&self, context: &KeyContext<'_>, plaintext: &[u8]) -> Result<WrappedKey> {
        let (kek_id, kek) = self.kek(context.tenant, None, true)?;
        let ciphertext = seal(&self.rng, &kek, plaintext, &context.aad())?;
        Ok(WrappedKey { kek_id, ciphertext })
    }

    async fn unwrap(
        &self,
        context: &KeyContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let (_, kek) = self.kek(context.tenant, Some(&wrapped.kek_id), false)?;
        open(&kek, &wrapped.ciphertext, &context.aad())
    }

    async fn current_kek_id(&self, tenant: &str) -> Result<String> {
        Ok(self.kek(tenant, None, true)?.0)
    }

    async fn rotate(&self, tenant: &str) -> Result<String> {
        let updated = self.add_kek(tenant, AddKek::Rotate)?;
        let current = updated
            .tenants
            .get(tenant)
            .map(|keys| keys.current.clone())
            .ok_or_else(|| Error::internal("keyring lost a tenant it just rotated"))?;
        *self
            .state
            .lock()
            .map_err(|_| Error::internal("keyring lock poisoned"))? = updated;
        Ok(current)
    }

    async fn retire(&self, tenant: &str, kek_id: &str) -> Result<String> {
        let current = self.kek(tenant, None, false)?.0;
        if current == kek_id {
            return Err(unsupported(format!(
                "{kek_id} is tenant {tenant}'s current key-encryption key: rotate first"
            )));
        }
        let mut found = false;
        let updated = self.update_file(tenant, |file| {
            let Some(keys) = file.tenants.get_mut(tenant) else {
                return Ok(false);
            };
            if let Some(mut key) = keys.keys.remove(kek_id) {
                key.zeroize();
                keys.destroyed.push(kek_id.to_string());
                found = true;
            }
            Ok(found)
        })?;
        if !found {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!(
                    "keyring {} holds no key {kek_id} of tenant {tenant}",
                    self.path.display()
                ),
            ));
        }
        *self
            .state
            .lock()
            .map_err(|_| Error::internal("keyring lock poisoned"))? = updated;
        Ok(format!(
            "deleted {kek_id} from keyring {}",
            self.path.display()
        ))
    }

    async fn describe_destroy(&self, tenant: &str) -> Result<String> {
        if self.read_only {
            return Err(unsupported(format!(
                "keyring {} is read-only: remove tenant {tenant}'s keys from the keyring Secret yourself",
                self.path.display()
            )));
        }
        Ok(format!(
            "deleted from keyring {}: {}",
            self.path.display(),
            self.kek_ids(tenant)?.join(", ")
        ))
    }

    async fn destroy(&self, tenant: &str) -> Result<String> {
        let description = self.describe_destroy(tenant).await?;
        let updated = self.update_file(tenant, |current| {
            let Some(keys) = current.tenants.get_mut(tenant) else {
                return Ok(false);
            };
            let mut ids: Vec<String> = keys.keys.keys().cloned().collect();
            ids.sort();
            for key in keys.keys.values_mut() {
                key.zeroize();
            }
            keys.keys.clear();
            keys.destroyed.extend(ids);
            keys.current.clear();
            Ok(true)
        })?;
        *self
            .state
            .lock()
            .map_err(|_| Error::internal("keyring lock poisoned"))? = updated;
        Ok(description)
    }

    async fn check(&self) -> Result<()> {
        // Opening read and parsed the file; a missing file is created on first use.
        Ok(())
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
