//! A PKCS#11 token (an HSM; SoftHSM2 in tests) as the key-encryption-key provider, through cryptoki.
//!
//! Each tenant's KEK versions are AES-256 secret key objects on the token labelled
//! `<keys.pkcs11.key_label_prefix><tenant>-v<n>`, generated on the token as sensitive and non-extractable: the
//! key never leaves the HSM. A data key is wrapped by `C_Encrypt` with AES-GCM under the tenant's newest
//! version (a 96-bit random IV, the [`KeyContext::aad`] as additional data, a 128-bit tag) and stored as
//! `iv | ciphertext | tag`; it is unwrapped by `C_Decrypt` under the version the record names, so the tag
//! also proves the record was not altered or moved to another tenant or month. (GCM through `C_WrapKey` is
//! not offered by every token; encrypting the key bytes needs only the common `CKM_AES_GCM`.)
//!
//! Two processes creating a tenant's first key at once can leave two objects with one label (tokens do not
//! enforce unique labels): unwrapping tries every object with the label until one authenticates, so either
//! wrapping opens.
//!
//! PKCS#11 calls block (a network HSM answers in milliseconds), so they run on the blocking pool, through one
//! logged-in session guarded by a mutex and reopened when the token drops it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::provider::{KeyContext, KeyEncryptionProvider, WrappedKey};
use chatvault_core::config::Pkcs11Config;
use chatvault_core::error::{Error, ErrorCode, Result};

const IV_BYTES: usize = 12;
const TAG_BITS: u64 = 128;

/// The token and the login. `Debug` shows the module, the token and the label prefix, never the PIN.
pub struct Pkcs11Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    pkcs11: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    config: Pkcs11Config,
    session: Mutex<Option<Session>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.inner.config.module)
            .field("token_label", &self.inner.config.token_label)
            .field("key_label_prefix", &self.inner.config.key_label_prefix)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token by label and logs in, so that a wrong module, token or PIN fails
    /// start-up with an error naming the setting.
    pub fn open(config: &Pkcs11Config) -> Result<Pkcs11Hsm> {
        let setting = |name: &str, message: String| {
            Error::invalid_argument(format!("keys.pkcs11.{name}: {message}"))
        };
        let pkcs11 = Pkcs11::new(&config.module).map_err(|error| {
            setting(
                "module",
                format!("cannot load {}: {error}", config.module.display()),
            )
        })?;
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(error) => {
                return Err(setting(
                    "module",
                    format!("{} failed to initialize: {error}", config.module.display()),
                ));
            }
        }
        let mut labels = Vec::new();
        let mut found = None;
        for slot in pkcs11
            .get_slots_with_token()
            .map_err(|error| setting("module", format!("listing slots: {error}")))?
        {
            let Ok(info) = pkcs11.get_token_info(slot) else {
                continue;
            };
            let label = info.label().trim().to_string();
            if label == config.token_label {
                found = Some(slot);
                break;
            }
            labels.push(label);
        }
        let slot = found.ok_or_else(|| {
            setting(
                "token_label",
                format!(
                    "no token labelled {:?} in {} (tokens present: {})",
                    config.token_label,
                    config.module.display(),
                    if labels.is_empty() {
                        "none".to_string()
                    } else {
                        labels.join(", ")
                    }
                ),
            )
        })?;
        let pin = match (&config.pin, &config.pin_file) {
            (Some(pin), _) => pin.clone(),
            (None, Some(path)) => read_pin(path)?,
            (None, None) => return Err(setting("pin", "set pin or pin_file".into())),
        };
        let hsm = Pkcs11Hsm {
            inner: Arc::new(Inner {
                pkcs11,
                slot,
                pin: AuthPin::new(pin.into()),
                config: config.clone(),
                session: Mutex::new(None),
                rng: SystemRandom::new(),
            }),
        };
        hsm.inner.with_session(|_| Ok(())).map_err(|error| {
            if error.message().contains("PinIncorrect") || error.message().contains("PinLen") {
                setting(
                    "pin",
                    format!(
                        "login to token {:?} refused: {}",
                        config.token_label,
                        error.message()
                    ),
                )
            } else {
                error
            }
        })?;
        Ok(hsm)
    }

    /// Runs `call` on the blocking pool with the logged-in session.
    async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Inner, &Session) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_session(|session| call(&inner, session)))
            .await
            .map_err(|error| Error::internal(format!("PKCS#11 task failed: {error}")))?
    }
}

fn read_pin(path: &Path) -> Result<String> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
        Error::invalid_argument(format!(
            "keys.pkcs11.pin_file: cannot read {}: {error}",
            path.display()
        ))
    })?);
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// A PKCS#11 failure: UNAVAILABLE (the token or its connection; retried) unless the token says the data is
/// wrong (a tag that does not verify: PERMISSION_DENIED, a tampered or misplaced record).
fn hsm_error(operation: &str, error: CkError) -> Error {
    match error {
        CkError::Pkcs11(RvError::EncryptedDataInvalid, _)
        | CkError::Pkcs11(RvError::EncryptedDataLenRange, _) => Error::new(
            ErrorCode::PermissionDenied,
            format!(
                "HSM {operation}: the data key record does not authenticate under its key-encryption key \
                 (tampered, or not wrapped with this context)"
            ),
        ),
        error => Error::unavailable(format!("HSM {operation} failed: {error}")),
    }
}

impl Inner {
    /// `call` with a logged-in session, opening (and logging in) one when there is none, and once more when
    /// the token has dropped the session.
    fn with_session<T>(&self, call: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let mut guard = self
            .session
            .lock()
            .map_err(|_| Error::internal("PKCS#11 session lock poisoned"))?;
        let stale = match guard.as_ref() {
            Some(session) => session.get_session_info().is_err(),
            None => true,
        };
        if stale {
            *guard = None;
            let session = self
                .pkcs11
                .open_rw_session(self.slot)
                .map_err(|error| hsm_error("opening a session", error))?;
            match session.login(UserType::User, Some(&self.pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(CkError::Pkcs11(
                    rv @ (RvError::PinIncorrect
                    | RvError::PinInvalid
                    | RvError::PinLenRange
                    | RvError::PinExpired
                    | RvError::PinLocked),
                    _,
                )) => {
                    return Err(Error::invalid_argument(format!(
                        "keys.pkcs11.pin: login to token {:?} refused ({rv:?}): {rv}",
                        self.config.token_label
                    )));
                }
                Err(error) => return Err(hsm_error("login", error)),
            }
            *guard = Some(session);
        }
        let session = guard
            .as_ref()
            .ok_or_else(|| Error::internal("PKCS#11 session missing"))?;
        call(session)
    }

    fn label_prefix(&self, tenant: &str) -> String {
        format!("{}{tenant}-v", self.config.key_label_prefix)
    }

    /// The tenant's KEK objects: (version, label, handle), oldest first.
    fn tenant_keys(
        &self,
        session: &Session,
        tenant: &str,
    ) -> Result<Vec<(u64, String, ObjectHandle)>> {
        let prefix = self.label_prefix(tenant);
        let handles = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
            ])
            .map_err(|error| hsm_error("finding keys", error))?;
        let mut keys = Vec::new();
        for handle in handles {
            let attributes = session
                .get_attributes(handle, &[AttributeType::Label])
                .map_err(|error| hsm_error("reading a key label", error))?;
            for attribute in attributes {
                if let Attribute::Label(bytes) = attribute
                    && let Ok(label) = String::from_utf8(bytes)
                    && let Some(version) = label
                        .strip_prefix(&prefix)
                        .and_then(|version| version.parse::<u64>().ok())
                {
                    keys.push((version, label, handle));
                }
            }
        }
        keys.sort_by_key(|(version, _, _)| *version);
        Ok(keys)
    }

    /// Generates version `version` of the tenant's KEK on the token.
    fn generate(
        &self,
        session: &Session,
        tenant: &str,
        version: u64,
    ) -> Result<(String, ObjectHandle)> {
        let label = format!("{}{version}", self.label_prefix(tenant));
        let handle = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                ],
            )
            .map_err(|error| hsm_error("generating a key-encryption key", error))?;
        Ok((label, handle))
    }

    /// The tenant's newest KEK, generated when it has none.
    fn current(&self, session: &Session, tenant: &str) -> Result<(String, ObjectHandle)> {
        match self.tenant_keys(session, tenant)?.pop() {
            Some((_, label, handle)) => Ok((label, handle)),
            None => self.generate(session, tenant, 1),
        }
    }

    fn encrypt(
        &self,
        session: &Session,
        key: ObjectHandle,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>> {
        let mut iv = [0u8; IV_BYTES];
        self.rng
            .fill(&mut iv)
            .map_err(|_| Error::internal("system random generator failed"))?;
        let mut params_iv = iv;
        let params = GcmParams::new(&mut params_iv, aad, TAG_BITS.into())
            .map_err(|error| hsm_error("GCM parameters", error))?;
        let sealed = session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(|error| hsm_error("wrapping a data key", error))?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }
}

#[async_trait]
impl KeyEncryptionProvider for Pkcs11Hsm {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    async fn wrap(&self, context: &KeyContext<'_>, plaintext: &[u8]) -> Result<WrappedKey> {
        let (tenant, aad, plaintext) = (
            context.tenant.to_string(),
            context.aad(),
            Zeroizing::new(plaintext.to_vec()),
        );
        self.run(move |inner, session| {
            let (label, handle) = inner.current(session, &tenant)?;
            let ciphertext = inner.encrypt(session, handle, &plaintext, &aad)?;
            Ok(WrappedKey {
                kek_id: label,
                ciphertext,
            })
        })
        .await
    }

    async fn unwrap(
        &self,
        context: &KeyContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let (tenant, aad, wrapped) = (context.tenant.to_string(), context.aad(), wrapped.clone());
        self.run(move |inner, session| {
            if wrapped.ciphertext.len() < IV_BYTES + 16 {
                return Err(Error::internal("wrapped key is truncated"));
            }
            let candidates: Vec<ObjectHandle> = inner
                .tenant_keys(session, &tenant)?
                .into_iter()
                .filter(|(_, label, _)| *label == wrapped.kek_id)
                .map(|(_, _, handle)| handle)
                .collect();
            if candidates.is_empty() {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!(
                        "key-encryption key {} of tenant {tenant} is not on token {:?}",
                        wrapped.kek_id, inner.config.token_label
                    ),
                ));
            }
            let (iv, sealed) = wrapped.ciphertext.split_at(IV_BYTES);
            let mut last = None;
            for handle in candidates {
                let mut iv = iv.to_vec();
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())
                    .map_err(|error| hsm_error("GCM parameters", error))?;
                match session.decrypt(&Mechanism::AesGcm(params), handle, sealed) {
                    Ok(plaintext) => return Ok(Zeroizing::new(plaintext)),
                    Err(error) => last = Some(hsm_error("unwrapping a data key", error)),
                }
            }
            Err(last.unwrap_or_else(|| Error::internal("no key tried")))
        })
        .await
    }

    async fn current_kek_id(&self, tenant: &str) -> Result<String> {
        let tenant = tenant.to_string();
        self.run(move |inner, session| Ok(inner.current(session, &tenant)?.0))
            .await
    }

    async fn rotate(&self, tenant: &str) -> Result<String> {
        let tenant = tenant.to_string();
        self.run(move |inner, session| {
            let next = inner
                .tenant_keys(session, &tenant)?
                .last()
                .map(|(version, _, _)| version + 1)
                .unwrap_or(1);
            Ok(inner.generate(session, &tenant, next)?.0)
        })
        .await
    }

    async fn retire(&self, tenant: &str, kek_id: &str) -> Result<String> {
        let (tenant, kek_id) = (tenant.to_string(), kek_id.to_string());
        self.run(move |inner, session| {
            let keys = inner.tenant_keys(session, &tenant)?;
            if keys.last().is_some_and(|(_, label, _)| *label == kek_id) {
                return Err(Error::invalid_argument(format!(
                    "{kek_id} is tenant {tenant}'s current key-encryption key: rotate first"
                )));
            }
            let mut destroyed = 0;
            for (_, label, handle) in keys {
                if label == kek_id {
                    session
                        .destroy_object(handle)
                        .map_err(|error| hsm_error(&format!("destroying {label}"), error))?;
                    destroyed += 1;
                }
            }
            if destroyed == 0 {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!(
                        "token {:?} holds no key {kek_id} of tenant {tenant}",
                        inner.config.token_label
                    ),
                ));
            }
            Ok(format!(
                "destroyed {kek_id} on token {:?}",
                inner.config.token_label
            ))
        })
        .await
    }

    async fn describe_destroy(&self, tenant: &str) -> Result<String> {
        let tenant = tenant.to_string();
        self.run(move |inner, session| {
            let labels: Vec<String> = inner
                .tenant_keys(session, &tenant)?
                .into_iter()
                .map(|(_, label, _)| label)
                .collect();
            Ok(format!(
                "destroyed on token {:?}: {}",
                inner.config.token_label,
                labels.join(", ")
            ))
        })
        .await
    }

    async fn destroy(&self, tenant: &str) -> Result<String> {
        let description = self.describe_destroy(tenant).await?;
        let tenant = tenant.to_string();
        self.run(move |inner, session| {
            for (_, label, handle) in inner.tenant_keys(session, &tenant)? {
                session
                    .destroy_object(handle)
                    .map_err(|error| hsm_error(&format!("destroying {label}"), error))?;
            }
            Ok(())
        })
        .await?;
        Ok(description)
    }

    async fn check(&self) -> Result<()> {
        // Opening found the token and logged in; this checks the session still works.
        self.run(|_, session| {
            session
                .get_session_info()
                .map(|_| ())
                .map_err(|error| hsm_error("session check", error))
        })
        .await
    }
}

/// DER of the Ed25519 curve's object identifier (1.3.101.112), the `CKA_EC_PARAMS` of its keys.
const ED25519_EC_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// A checkpoint signing key on the token: an Ed25519 key pair (`CKK_EC_EDWARDS`) labelled `label`, whose
/// private half is sensitive and non-extractable, so it never leaves the HSM; signatures are `CKM_EDDSA`.
/// `Debug` shows the name and label.
pub struct HsmNoteSigner {
    inner: Arc<Inner>,
    name: String,
    label: String,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for HsmNoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmNoteSigner")
            .field("name", &self.name)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Hsm {
    /// Generates an Ed25519 signing key pair labelled `label` on the token (refused when one exists) and
    /// returns its signer, named `name` (the log's origin).
    pub fn generate_note_key(&self, label: &str, name: &str) -> Result<HsmNoteSigner> {
        self.inner.with_session(|session| {
            if !find_by_label(session, ObjectClass::PRIVATE_KEY, label)?.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "the token already holds a key labelled {label:?}: choose another label"
                )));
            }
            session
                .generate_key_pair(
                    &Mechanism::EccEdwardsKeyPairGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Verify(true),
                        Attribute::EcParams(ED25519_EC_PARAMS.to_vec()),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ],
                )
                .map_err(|error| hsm_error("generating an Ed25519 signing key", error))?;
            Ok(())
        })?;
        self.note_signer(label, name)
    }

    /// The signer of the Ed25519 key pair labelled `label` on the token, named `name` (the log's origin).
    pub fn note_signer(&self, label: &str, name: &str) -> Result<HsmNoteSigner> {
        let public_key = self.inner.with_session(|session| {
            let handle = find_by_label(session, ObjectClass::PUBLIC_KEY, label)?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "integrity.pkcs11_key_label: the token holds no public key labelled {label:?} \
                         (create one with chatvault checkpoint keygen --pkcs11-label)"
                    ))
                })?;
            let point = session
                .get_attributes(handle, &[AttributeType::EcPoint])
                .map_err(|error| hsm_error("reading a public key", error))?
                .into_iter()
                .find_map(|attribute| match attribute {
                    Attribute::EcPoint(point) => Some(point),
                    _ => None,
                })
                .unwrap_or_default();
            ed25519_point(&point).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "integrity.pkcs11_key_label: the key labelled {label:?} is not an Ed25519 key"
                ))
            })
        })?;
        crate::tlog::note::check_origin(name).map_err(Error::invalid_argument)?;
        Ok(HsmNoteSigner {
            inner: self.inner.clone(),
            name: name.to_string(),
            label: label.to_string(),
            public_key,
        })
    }
}

impl crate::tlog::note::NoteSigner for HsmNoteSigner {
    fn name(&self) -> &str {
        &self.name
    }

    fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        self.inner.with_session(|session| {
            let handle = find_by_label(session, ObjectClass::PRIVATE_KEY, &self.label)?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    Error::unavailable(format!(
                        "the token no longer holds the signing key labelled {:?}",
                        self.label
                    ))
                })?;
            session
                .sign(
                    &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                    handle,
                    message,
                )
                .map_err(|error| hsm_error("signing", error))
        })
    }
}

fn find_by_label(session: &Session, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>> {
    session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC_EDWARDS),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|error| hsm_error("finding a signing key", error))
}

/// The 32 raw bytes of an Ed25519 `CKA_EC_POINT`: a DER OCTET STRING (`04 20 ...`), or the bare bytes some
/// tokens return.
fn ed25519_point(point: &[u8]) -> Option<Vec<u8>> {
    match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => Some(rest.to_vec()),
        bare if bare.len() == 32 => Some(bare.to_vec()),
        _ => None,
    }
}
