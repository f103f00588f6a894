//! AWS KMS as the key-encryption-key provider.
//!
//! - New data keys come from `GenerateDataKey` (AES-256) under the tenant's KMS key: the KMS generates the
//!   key and returns it both in plaintext (used, then wiped) and encrypted (stored in the key record).
//! - Unwrapping is `Decrypt` with the key id the record names, so a record can only be opened by the key
//!   that wrapped it, and `chatvault keys rewrap` (`ReEncrypt`) moves records to the current key without the
//!   plaintext leaving the KMS.
//! - Every call carries an encryption context naming tenant, scope, period and data key id
//!   ([`KeyContext::pairs`]): the KMS refuses to decrypt under any other context, and CloudTrail records it
//!   with each use, so the KMS's own log says which tenant's month was opened, and when.
//!
//! Rotation happens in the KMS: automatic rotation keeps the key id (nothing to do here); moving a tenant to a
//! new key is a change of `keys.aws_kms.key_id` (or `tenant_key_ids`) followed by `chatvault keys rewrap`.
//!
//! Errors: a record the KMS refuses as tampered or wrapped under another key is PERMISSION_DENIED. Everything
//! else (the KMS unreachable or throttling, a key disabled or pending deletion, credentials or IAM refusing)
//! is UNAVAILABLE with the KMS's error code in the message: those are conditions an operator fixes, and the
//! archiver stops and retries (its lag alarm fires) rather than dead-lettering a whole tenant's traffic.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kms::Client;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeySpec, KeyState, KeyUsageType};
use zeroize::Zeroizing;

use super::DATA_KEY_BYTES;
use super::provider::{KeyContext, KeyEncryptionProvider, WrappedKey, unsupported};
use chatvault_core::config::AwsKmsConfig;
use chatvault_core::error::{Error, ErrorCode, Result};

/// A KMS client and the key configuration. `Debug` shows the endpoint and key ids (not secrets: KMS key ids
/// and ARNs are identifiers, and credentials are held by the SDK, which never prints them).
pub struct AwsKms {
    client: Client,
    config: AwsKmsConfig,
}

impl std::fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKms")
            .field("region", &self.config.region)
            .field("endpoint_url", &self.config.endpoint_url)
            .field("key_id", &self.config.key_id)
            .field("tenant_key_ids", &self.config.tenant_key_ids)
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// A client for the configured region and endpoint, with credentials from the standard AWS chain
    /// (environment, web identity / IRSA, container and instance metadata). Makes no call to the KMS: see
    /// [`KeyEncryptionProvider::check`].
    pub async fn connect(config: &AwsKmsConfig) -> Result<AwsKms> {
        // rustls on ring: the one TLS stack and crypto library of the project (the SDK's default would add
        // aws-lc-rs). Plain http:// endpoints (a test server) work too.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(config.timeout)
                    .connect_timeout(config.timeout.min(Duration::from_secs(3)))
                    .build(),
            );
        if !config.region.is_empty() {
            loader = loader.region(aws_config::Region::new(config.region.clone()));
        }
        if !config.endpoint_url.is_empty() {
            loader = loader.endpoint_url(config.endpoint_url.clone());
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(Error::invalid_argument(
                "keys.aws_kms.region: no AWS region is configured; set keys.aws_kms.region or AWS_REGION",
            ));
        }
        Ok(AwsKms {
            client: Client::new(&sdk),
            config: config.clone(),
        })
    }

    /// The KMS key (as configured: id, ARN or alias) that wraps `tenant`'s new data keys.
    fn key_of(&self, tenant: &str) -> Result<&str> {
        let key = self
            .config
            .tenant_key_ids
            .get(tenant)
            .unwrap_or(&self.config.key_id);
        if key.is_empty() {
            return Err(Error::invalid_argument(format!(
                "keys.aws_kms.key_id: no KMS key is configured for tenant {tenant} (set keys.aws_kms.key_id or \
                 keys.aws_kms.tenant_key_ids.{tenant})"
            )));
        }
        Ok(key)
    }

    /// The key's ARN, after checking it can wrap data keys: enabled, symmetric, for encryption. Failures say
    /// whether the KMS answered ([`Described::Refused`]) or not ([`Described::Unreachable`]).
    async fn describe_usable(&self, key: &str) -> std::result::Result<String, Described> {
        let described = match self.client.describe_key().key_id(key).send().await {
            Ok(described) => described,
            Err(error @ SdkError::ServiceError(_)) => {
                return Err(Described::Refused(kms_error("DescribeKey", key, error)));
            }
            Err(error) => {
                return Err(Described::Unreachable(kms_error("DescribeKey", key, error)));
            }
        };
        let metadata = described.key_metadata().ok_or_else(|| {
            Described::Refused(Error::unavailable(format!(
                "KMS DescribeKey of {key}: no metadata"
            )))
        })?;
        let problem = if metadata.key_state() != Some(&KeyState::Enabled) {
            Some(format!(
                "is {}",
                metadata
                    .key_state()
                    .map(|state| state.as_str().to_string())
                    .unwrap_or_else(|| "in an unknown state".into())
            ))
        } else if metadata
            .key_usage()
            .is_some_and(|usage| *usage != KeyUsageType::EncryptDecrypt)
            || metadata
                .key_spec()
                .is_some_and(|spec| *spec != KeySpec::SymmetricDefault)
        {
            Some("is not a symmetric encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)".into())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Described::Refused(Error::invalid_argument(format!(
                "KMS key {key} {problem}: it cannot wrap data keys"
            ))));
        }
        Ok(metadata.arn().unwrap_or(key).to_string())
    }
}

/// Why [`AwsKms::describe_usable`] failed.
enum Described {
    /// The KMS did not answer (network, TLS, timeout, credentials not found).
    Unreachable(Error),
    /// The KMS answered: no such key, access denied, or a key that cannot wrap data keys.
    Refused(Error),
}

impl From<Described> for Error {
    fn from(described: Described) -> Error {
        match described {
            Described::Unreachable(error) | Described::Refused(error) => error,
        }
    }
}

fn encryption_context(context: &KeyContext<'_>) -> HashMap<String, String> {
    context
        .pairs()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// Maps an SDK error to the crate's scheme (see the module comment). The message names the operation, the
/// key and the KMS's error code; it never holds key material (the SDK's errors carry none).
fn kms_error<E>(operation: &str, key: &str, error: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(_) = &error {
        let code = error.code().unwrap_or("UnknownError").to_string();
        let message = error.message().unwrap_or("").to_string();
        let code_class = match code.as_str() {
            "InvalidCiphertextException" | "IncorrectKeyException" => ErrorCode::PermissionDenied,
            _ => ErrorCode::Unavailable,
        };
        let hint = match code.as_str() {
            "InvalidCiphertextException" | "IncorrectKeyException" => {
                ": the key record was tampered with, or was not wrapped by this key with this context"
            }
            "NotFoundException" | "DisabledException" | "KMSInvalidStateException" => {
                ": the key must exist and be enabled (check keys.aws_kms.key_id / tenant_key_ids)"
            }
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException" => {
                ": the credentials or the key policy do not allow this (check the role and the key policy)"
            }
            _ => "",
        };
        return Error::new(
            code_class,
            format!("KMS {operation} with key {key} failed: {code}: {message}{hint}"),
        );
    }
    Error::unavailable(format!(
        "KMS {operation} with key {key} failed: {}",
        DisplayErrorContext(&error)
    ))
}

#[async_trait]
impl KeyEncryptionProvider for AwsKms {
    fn kind(&self) -> &'static str {
        "aws_kms"
    }

    async fn wrap(&self, context: &KeyContext<'_>, plaintext: &[u8]) -> Result<WrappedKey> {
        let key = self.key_of(context.tenant)?;
        let encrypted = self
            .client
            .encrypt()
            .key_id(key)
            .plaintext(Blob::new(plaintext.to_vec()))
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(|error| kms_error("Encrypt", key, error))?;
        Ok(WrappedKey {
            kek_id: encrypted.key_id().unwrap_or(key).to_string(),
            ciphertext: encrypted
                .ciphertext_blob()
                .ok_or_else(|| Error::unavailable("KMS Encrypt returned no ciphertext"))?
                .as_ref()
                .to_vec(),
        })
    }

    async fn generate(
        &self,
        context: &KeyContext<'_>,
    ) -> Result<(Zeroizing<[u8; DATA_KEY_BYTES]>, WrappedKey)> {
        let key = self.key_of(context.tenant)?;
        let generated = self
            .client
            .generate_data_key()
            .key_id(key)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(|error| kms_error("GenerateDataKey", key, error))?;
        let plaintext = generated
            .plaintext()
            .ok_or_else(|| Error::unavailable("KMS GenerateDataKey returned no plaintext"))?;
        let data_key: [u8; DATA_KEY_BYTES] = plaintext.as_ref().try_into().map_err(|_| {
            Error::internal("KMS GenerateDataKey returned a key of the wrong length")
        })?;
        let wrapped = WrappedKey {
            kek_id: generated.key_id().unwrap_or(key).to_string(),
            ciphertext: generated
                .ciphertext_blob()
                .ok_or_else(|| Error::unavailable("KMS GenerateDataKey returned no ciphertext"))?
                .as_ref()
                .to_vec(),
        };
        // The response (and its plaintext copy) is dropped here; the SDK's Blob does not zeroize, which is
        // one of the copies the module comment of `keys` lists as out of reach.
        Ok((Zeroizing::new(data_key), wrapped))
    }

    async fn unwrap(
        &self,
        context: &KeyContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let decrypted = self
            .client
            .decrypt()
            .key_id(&wrapped.kek_id)
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(|error| kms_error("Decrypt", &wrapped.kek_id, error))?;
        Ok(Zeroizing::new(
            decrypted
                .plaintext()
                .ok_or_else(|| Error::unavailable("KMS Decrypt returned no plaintext"))?
                .as_ref()
                .to_vec(),
        ))
    }

    async fn current_kek_id(&self, tenant: &str) -> Result<String> {
        Ok(self.describe_usable(self.key_of(tenant)?).await?)
    }

    async fn rewrap(&self, context: &KeyContext<'_>, wrapped: &WrappedKey) -> Result<WrappedKey> {
        let destination = self.key_of(context.tenant)?;
        let encryption_context = encryption_context(context);
        let reencrypted = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .source_key_id(&wrapped.kek_id)
            .set_source_encryption_context(Some(encryption_context.clone()))
            .destination_key_id(destination)
            .set_destination_encryption_context(Some(encryption_context))
            .send()
            .await
            .map_err(|error| kms_error("ReEncrypt", &wrapped.kek_id, error))?;
        Ok(WrappedKey {
            kek_id: reencrypted.key_id().unwrap_or(destination).to_string(),
            ciphertext: reencrypted
                .ciphertext_blob()
                .ok_or_else(|| Error::unavailable("KMS ReEncrypt returned no ciphertext"))?
                .as_ref()
                .to_vec(),
        })
    }

    async fn rotate(&self, tenant: &str) -> Result<String> {
        Err(unsupported(format!(
            "keys held in AWS KMS rotate in the KMS: enable automatic rotation on the key (nothing to do here), \
             or point keys.aws_kms.key_id (or keys.aws_kms.tenant_key_ids.{tenant}) at a new key and run \
             `chatvault keys rewrap --tenant {tenant}`"
        )))
    }

    async fn retire(&self, tenant: &str, kek_id: &str) -> Result<String> {
        Err(unsupported(format!(
            "no key record of tenant {tenant} needs KMS key {kek_id} any more: disable it, or schedule its \
             deletion, in the KMS (chatvault does not change KMS keys)"
        )))
    }

    /// Never done here: a KMS key is deleted in the KMS, by its administrators, after a waiting period.
    async fn describe_destroy(&self, tenant: &str) -> Result<String> {
        Err(unsupported(match self.config.tenant_key_ids.get(tenant) {
            Some(key) => format!(
                "KMS key {key} is tenant {tenant}'s own: to make copies of the deleted key records useless too, \
                 point keys.aws_kms.tenant_key_ids.{tenant} at a new key and schedule {key} for deletion in \
                 the KMS (chatvault does not delete KMS keys: archiving under a key pending deletion would stop)"
            ),
            None => format!(
                "KMS key {} is shared with other tenants; the tenant's data key records are deleted",
                self.config.key_id
            ),
        }))
    }

    async fn destroy(&self, tenant: &str) -> Result<String> {
        self.describe_destroy(tenant).await
    }

    /// Every configured key exists, is enabled, and is a symmetric encryption key the credentials can
    /// describe. Errors name the setting.
    async fn check(&self) -> Result<()> {
        let configured = (!self.config.key_id.is_empty())
            .then(|| ("keys.aws_kms.key_id".to_string(), &self.config.key_id))
            .into_iter()
            .chain(
                self.config
                    .tenant_key_ids
                    .iter()
                    .map(|(tenant, key)| (format!("keys.aws_kms.tenant_key_ids.{tenant}"), key)),
            );
        let endpoint = if self.config.endpoint_url.is_empty() {
            "AWS's endpoint".to_string()
        } else {
            self.config.endpoint_url.clone()
        };
        for (setting, key) in configured {
            match self.describe_usable(key).await {
                Ok(_) => {}
                Err(Described::Refused(error)) => {
                    return Err(Error::new(
                        error.code(),
                        format!("{setting}: {}", error.message()),
                    ));
                }
                Err(Described::Unreachable(error)) => {
                    return Err(Error::unavailable(format!(
                        "keys.aws_kms.endpoint_url / keys.aws_kms.region: the KMS ({endpoint}) could not be \
                         reached, or no AWS credentials were found: {}",
                        error.message()
                    )));
                }
            }
        }
        Ok(())
    }
}
