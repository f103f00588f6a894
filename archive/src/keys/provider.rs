//! The seam between data keys and whoever holds the key-encryption keys (KEKs): the local keyring file, AWS
//! KMS, or a PKCS#11 HSM. A provider wraps (and generates) data keys under a tenant's current KEK and unwraps
//! them under the KEK version they name, always bound to a [`KeyContext`] (tenant, scope, period, data key
//! id) that must be presented again to unwrap. [`Providers`] routes each tenant to its configured provider.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::DATA_KEY_BYTES;
use chatvault_core::config::{KeyProviderKind, KeysConfig};
use chatvault_core::error::{Error, ErrorCode, Result};

/// A key wrapped by a key-encryption key. `kek_id` names the KEK (and its version) that wrapped it: a keyring
/// entry, a KMS key ARN, an HSM key label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_id: String,
    pub ciphertext: Vec<u8>,
}

/// What a data key is bound to. A wrapped key only unwraps with the context it was wrapped with, so a key
/// record copied to another tenant, scope or month is useless there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyContext<'a> {
    /// The owner of the key-encryption key: a tenant id, or the reserved `_audit`.
    pub tenant: &'a str,
    /// The key scope within the tenant; [`super::DEFAULT_SCOPE`] (empty) for the tenant's default scope.
    pub scope: &'a str,
    /// `yyyy-mm`.
    pub period: &'a str,
    pub dek_id: &'a str,
}

impl KeyContext<'_> {
    /// Authenticated data binding a wrapped key to its context, for providers that wrap with AES-GCM (the
    /// keyring, the HSM). The default scope keeps the form used before scopes existed, so those records
    /// still unwrap.
    pub fn aad(&self) -> Vec<u8> {
        if self.scope.is_empty() {
            format!(
                "chatvault-dek-v1|{}|{}|{}",
                self.tenant, self.period, self.dek_id
            )
        } else {
            format!(
                "chatvault-dek-v2|{}|{}|{}|{}",
                self.tenant, self.scope, self.period, self.dek_id
            )
        }
        .into_bytes()
    }

    /// The same binding as key/value pairs, for a KMS encryption context (which a KMS also writes to its own
    /// audit log, CloudTrail for AWS: so only identifiers, never content).
    pub fn pairs(&self) -> [(&'static str, String); 4] {
        [
            ("chatvault:tenant", self.tenant.to_string()),
            (
                "chatvault:scope",
                if self.scope.is_empty() {
                    "default".to_string()
                } else {
                    self.scope.to_string()
                },
            ),
            ("chatvault:period", self.period.to_string()),
            ("chatvault:dek_id", self.dek_id.to_string()),
        ]
    }
}

/// Holds tenants' key-encryption keys. Implementations: [`super::LocalKeyring`], [`super::AwsKms`] and
/// [`super::Pkcs11Hsm`]; [`Providers`] routes between them by tenant.
///
/// Errors follow one rule the archiver relies on: PERMISSION_DENIED or INVALID_ARGUMENT means this tenant can
/// never get a key here as configured (its records go to the dead-letter topic); UNAVAILABLE means try again
/// later (the archiver stops committing and retries, losing nothing).
#[async_trait]
pub trait KeyEncryptionProvider: Send + Sync + std::fmt::Debug {
    /// `local`, `aws_kms` or `pkcs11`: for records and logs.
    fn kind(&self) -> &'static str;

    /// Wraps `plaintext` under the tenant's current KEK (creating it when the provider can).
    async fn wrap(&self, context: &KeyContext<'_>, plaintext: &[u8]) -> Result<WrappedKey>;

    /// The unwrapped plaintext, wiped when dropped.
    async fn unwrap(
        &self,
        context: &KeyContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>>;

    /// A new random data key and its wrapped form. A KMS generates it (GenerateDataKey); others draw it from
    /// the system's random generator and wrap it.
    async fn generate(
        &self,
        context: &KeyContext<'_>,
    ) -> Result<(Zeroizing<[u8; DATA_KEY_BYTES]>, WrappedKey)> {
        let mut key = Zeroizing::new([0u8; DATA_KEY_BYTES]);
        SystemRandom::new()
            .fill(key.as_mut())
            .map_err(|_| Error::internal("system random generator failed"))?;
        let wrapped = self.wrap(context, key.as_ref()).await?;
        Ok((key, wrapped))
    }

    /// The id of the KEK that new data keys of `tenant` are wrapped under.
    async fn current_kek_id(&self, tenant: &str) -> Result<String>;

    /// `wrapped` wrapped again under the tenant's current KEK (for `chatvault keys rewrap`). The default
    /// unwraps and wraps; a KMS re-encrypts without the plaintext leaving it.
    async fn rewrap(&self, context: &KeyContext<'_>, wrapped: &WrappedKey) -> Result<WrappedKey> {
        let plaintext = self.unwrap(context, wrapped).await?;
        self.wrap(context, &plaintext).await
    }

    /// Makes a new KEK version current for `tenant` and returns its id. Providers whose keys rotate elsewhere
    /// (a KMS) refuse with INVALID_ARGUMENT saying how to rotate there.
    async fn rotate(&self, tenant: &str) -> Result<String>;

    /// Destroys one KEK version of `tenant` that no key record needs any more (after `keys rewrap`): the
    /// current version is refused. Returns what was done. INVALID_ARGUMENT when the provider will not (a
    /// KMS: disable or delete the key there).
    async fn retire(&self, tenant: &str, kek_id: &str) -> Result<String>;

    /// What destroying every KEK of `tenant` would do, without doing it (for a shred's dry run); an error
    /// (INVALID_ARGUMENT) says why it will not be done (a read-only keyring, a KMS key shared with other
    /// tenants).
    async fn describe_destroy(&self, tenant: &str) -> Result<String>;

    /// Destroys every KEK of `tenant`, so that no copy of its wrapped data keys (backups included) can be
    /// unwrapped again; new data of the tenant gets a new KEK. Returns what was done, for the shred's report.
    /// INVALID_ARGUMENT when the provider will not (see [`KeyEncryptionProvider::describe_destroy`]).
    async fn destroy(&self, tenant: &str) -> Result<String>;

    /// Start-up check that the provider is reachable and its configured keys are usable. Errors name the
    /// setting to fix.
    async fn check(&self) -> Result<()>;
}

/// Routes each tenant to the provider `keys.provider` / `keys.tenant_providers` names.
#[derive(Debug)]
pub struct Providers {
    default: Arc<dyn KeyEncryptionProvider>,
    by_tenant: BTreeMap<String, Arc<dyn KeyEncryptionProvider>>,
    /// Every opened provider, by [`KeyEncryptionProvider::kind`]: records name the one that wrapped them.
    by_kind: BTreeMap<&'static str, Arc<dyn KeyEncryptionProvider>>,
}

impl Providers {
    /// Opens every provider the configuration uses. Opening checks what needs no KMS call (the keyring file;
    /// the HSM's module, token and PIN); [`KeyEncryptionProvider::check`] does the rest.
    pub async fn from_config(keys: &KeysConfig) -> Result<Providers> {
        let mut opened: BTreeMap<KeyProviderKind, Arc<dyn KeyEncryptionProvider>> = BTreeMap::new();
        for kind in keys.providers_in_use() {
            let provider: Arc<dyn KeyEncryptionProvider> = match kind {
                KeyProviderKind::Local => Arc::new(if keys.keyring_read_only {
                    super::LocalKeyring::open_read_only(&keys.keyring_path)?
                } else {
                    super::LocalKeyring::open(&keys.keyring_path)?
                }),
                KeyProviderKind::AwsKms => Arc::new(super::AwsKms::connect(&keys.aws_kms).await?),
                KeyProviderKind::Pkcs11 => {
                    let config = keys.pkcs11.clone();
                    Arc::new(
                        tokio::task::spawn_blocking(move || super::Pkcs11Hsm::open(&config))
                            .await
                            .map_err(|error| {
                                Error::internal(format!("opening the HSM failed: {error}"))
                            })??,
                    )
                }
            };
            opened.insert(kind, provider);
        }
        let pick = |kind: KeyProviderKind| {
            opened.get(&kind).cloned().ok_or_else(|| {
                Error::internal(format!("key provider {} not opened", kind.as_str()))
            })
        };
        let default = pick(keys.provider)?;
        let mut by_tenant = BTreeMap::new();
        for (tenant, kind) in &keys.tenant_providers {
            by_tenant.insert(tenant.clone(), pick(*kind)?);
        }
        Ok(Providers {
            default,
            by_tenant,
            by_kind: opened
                .into_values()
                .map(|provider| (provider.kind(), provider))
                .collect(),
        })
    }

    /// Every tenant with one provider.
    pub fn single(provider: Arc<dyn KeyEncryptionProvider>) -> Providers {
        Providers {
            default: provider.clone(),
            by_tenant: BTreeMap::new(),
            by_kind: BTreeMap::from([(provider.kind(), provider)]),
        }
    }

    /// The provider holding `tenant`'s KEKs.
    pub fn of(&self, tenant: &str) -> &Arc<dyn KeyEncryptionProvider> {
        self.by_tenant.get(tenant).unwrap_or(&self.default)
    }

    /// The opened provider of a kind (`local`, `aws_kms`), to unwrap a record it wrapped.
    pub fn by_kind(&self, kind: &str) -> Option<&Arc<dyn KeyEncryptionProvider>> {
        self.by_kind.get(kind)
    }

    /// Checks every provider in use (see [`KeyEncryptionProvider::check`]).
    pub async fn check(&self) -> Result<()> {
        for provider in self.by_kind.values() {
            provider.check().await?;
        }
        Ok(())
    }
}

/// The error for an operation a provider does not do.
pub(crate) fn unsupported(what: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidArgument, what.into())
}
