//! The configuration: one TOML file (see `config/chatvault.example.toml`, the reference) plus environment
//! overrides, then a pure validation step whose errors name the setting.
//!
//! This module holds the loader ([`ConfigSource`]) and the settings every role shares ([`SharedConfig`]).
//! Each service's section is defined next to the service (`chatvault_ingest_gateway::config`,
//! `chatvault_archiver::config`, `chatvault_restorer::config`) as a [`Section`]; the whole file, as the
//! binary reads it, is `chatvault_config::Config`.
//!
//! Environment overrides use `CHATVAULT__<SECTION>__<KEY>` (double underscores separate levels, names are
//! case-insensitive): `CHATVAULT__KAFKA__BROKERS=kafka:9092` sets `kafka.brokers`. The environment wins over
//! the file, since Helm and Kubernetes set environment. Values are read as TOML scalars when they parse as one
//! (`10`, `true`), as strings otherwise.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{Authenticator, Role, token_digest};
use crate::error::{Error, Result};
use crate::event::is_valid_tenant_id;

pub const ENV_PREFIX: &str = "CHATVAULT__";

/// librdkafka properties fixed by chatvault (`chatvault-kafka` sets them); `kafka.properties` may not name them. librdkafka's own default for `enable.idempotence` is false, which would allow
/// reordering and duplicates on retry; the consumer's auto-commit and auto-store defaults would move Kafka's
/// offsets ahead of what is durable in the archive.
pub const PROTECTED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "group.id",
    "bootstrap.servers",
];

/// The settings every role shares: the top-level sections `kafka`, `storage`, `keys`, `telemetry` and the
/// `tenants` list. Each service's own section (`gateway`, `archiver`, `restorer`) is a [`Section`] that lives
/// next to its service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    pub kafka: KafkaConfig,
    pub storage: StorageConfig,
    pub keys: KeysConfig,
    pub telemetry: TelemetryConfig,
    /// Tenants and their bearer tokens.
    pub tenants: Vec<TenantConfig>,
    /// OpenID Connect issuers whose JWT access tokens are accepted besides the static tokens, and the roles
    /// their claims grant.
    pub oidc: Vec<OidcIssuerConfig>,
    /// The transparency log: who signs checkpoints, and which keys verify them.
    pub integrity: IntegrityConfig,
}

/// The top-level keys [`SharedConfig`] reads; every other top-level key must be some service's section.
const SHARED_KEYS: &[&str] = &[
    "kafka",
    "storage",
    "keys",
    "telemetry",
    "tenants",
    "oidc",
    "integrity",
];

/// `[integrity]`: the transparency log over the archive (`chatvault_archive::tlog`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntegrityConfig {
    /// File holding the checkpoint signing key (`PRIVATE+KEY+<origin>+...`, written by `chatvault checkpoint
    /// keygen`; the key's name is the log's origin). When set, archivers log new manifests and sign a
    /// checkpoint every `checkpoint_interval`. Empty (default): no checkpoints are signed; standalone creates
    /// a key in its data directory.
    pub signing_key_path: Option<PathBuf>,
    /// Instead of a file: the label of an Ed25519 key pair on the PKCS#11 token of `keys.pkcs11` (created by
    /// `chatvault checkpoint keygen --pkcs11-label`), whose private key never leaves the HSM. Needs `origin`.
    pub signing_key_pkcs11_label: Option<String>,
    /// The log's origin (the key's name) for a key on an HSM; a file key carries its own.
    pub origin: Option<String>,
    /// How often a checkpoint is signed over what was committed since the last one. Default `1m`.
    #[serde(with = "crate::duration")]
    pub checkpoint_interval: Duration,
    /// Verifier keys (`<origin>+<key id>+<key>`, printed by `chatvault checkpoint keygen`) whose checkpoints
    /// `chatvault verify` accepts.
    pub trusted_keys: Vec<String>,
    /// A second store that receives a copy of every checkpoint (ideally a bucket with Object Lock, in
    /// another account), so that a log rolled back in the archive's bucket is exposed. Empty URL (default):
    /// none.
    pub witness: StorageConfig,
}

impl Default for IntegrityConfig {
    fn default() -> Self {
        IntegrityConfig {
            signing_key_path: None,
            signing_key_pkcs11_label: None,
            origin: None,
            checkpoint_interval: Duration::from_secs(60),
            trusted_keys: Vec::new(),
            witness: StorageConfig {
                url: String::new(),
                ..StorageConfig::default()
            },
        }
    }
}

/// One service's section of the configuration file (`[gateway]`, `[archiver]`, `[restorer]`), defined in the
/// service's crate and read by [`ConfigSource::section`].
pub trait Section: Serialize + serde::de::DeserializeOwned + Default {
    /// The section's name in the file and in `CHATVAULT__<NAME>__...` variables.
    const NAME: &'static str;
    /// Duration settings that were integer milliseconds under a `<name>_ms` key in chatvault 0.1 and are
    /// still read under that name, with a warning, for one release.
    const MILLISECOND_SETTINGS: &'static [&'static str] = &[];

    /// Cross-field checks of the section; pure, no IO. Errors name the setting (`<NAME>.<key>`).
    fn validate(&self) -> Result<()>;
}

/// The configuration file with its environment overrides applied, from which the shared settings and each
/// service's section are taken. A role takes the sections it runs; [`ConfigSource::finish`] then refuses
/// any top-level key that no one took, so a misspelt section is an error rather than silently ignored.
#[derive(Debug)]
pub struct ConfigSource {
    root: toml::Table,
    /// Warnings about old setting names found while taking sections; roles log them once their logging is up.
    deprecated_settings: Vec<String>,
}

impl ConfigSource {
    /// Reads `path` (when given) and applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<ConfigSource> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|error| {
                Error::invalid_argument(format!("reading config file {}: {error}", path.display()))
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, &env)
    }

    /// Parses TOML text and applies overrides from `env` (a map, so tests can inject it).
    pub fn from_toml_and_env(text: &str, env: &HashMap<String, String>) -> Result<ConfigSource> {
        let mut root: toml::Table = toml::from_str(text)
            .map_err(|error| Error::invalid_argument(format!("config file: {error}")))?;
        let mut overrides: Vec<(&String, &String)> = env
            .iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        overrides.sort();
        for (key, value) in overrides {
            apply_env_override(&mut root, &key[ENV_PREFIX.len()..], value)
                .map_err(|message| Error::invalid_argument(format!("{key}: {message}")))?;
        }
        Ok(ConfigSource {
            root,
            deprecated_settings: Vec::new(),
        })
    }

    /// Takes and validates the shared settings.
    pub fn shared(&mut self) -> Result<SharedConfig> {
        let mut table = toml::Table::new();
        for key in SHARED_KEYS {
            if let Some(value) = self.root.remove(*key) {
                table.insert((*key).to_string(), value);
            }
        }
        let shared: SharedConfig = deserialize(table, "config")?;
        shared.validate()?;
        Ok(shared)
    }

    /// Takes and validates section `S` (its defaults when the file has none).
    pub fn section<S: Section>(&mut self) -> Result<S> {
        let mut table = match self.root.remove(S::NAME) {
            None => toml::Table::new(),
            Some(toml::Value::Table(table)) => table,
            Some(other) => {
                return Err(Error::invalid_argument(format!(
                    "{}: expected a section, got {}",
                    S::NAME,
                    other.type_str()
                )));
            }
        };
        let warnings = rename_millisecond_settings(S::NAME, S::MILLISECOND_SETTINGS, &mut table)
            .map_err(Error::invalid_argument)?;
        let section: S = deserialize(table, S::NAME)?;
        section.validate()?;
        self.deprecated_settings.extend(warnings);
        Ok(section)
    }

    /// Refuses top-level keys no section was taken for (after every section the caller knows was taken)
    /// and returns the warnings about old setting names.
    pub fn finish(self) -> Result<Vec<String>> {
        if let Some(key) = self.root.keys().next() {
            return Err(Error::invalid_argument(format!(
                "config: unknown section `{key}` (expected kafka, storage, keys, telemetry, tenants, oidc, \
                 gateway, archiver or restorer)"
            )));
        }
        Ok(self.deprecated_settings)
    }
}

/// `table` as a `T`; errors start with `context` (a section name) and name the field.
fn deserialize<T: serde::de::DeserializeOwned>(table: toml::Table, context: &str) -> Result<T> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|error: toml::de::Error| Error::invalid_argument(format!("{context}: {error}")))
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`. Default `localhost:9092`.
    pub brokers: String,
    /// The one topic all events go to. Default `chatvault.events`.
    pub topic: String,
    /// Extra librdkafka properties for every client (for example `security.protocol`, `sasl.*`, `ssl.*`).
    /// The settings chatvault's guarantees rest on (`enable.idempotence`, `acks`, `enable.auto.commit`,
    /// `enable.auto.offset.store`, `isolation.level`) cannot be overridden here.
    #[serde(deserialize_with = "string_values")]
    pub properties: BTreeMap<String, String>,
    /// The topic of the audit trail: one record per call of the gateway and the restorer, kept apart from
    /// chat events. Must exist (replicated like `topic`, with retention long enough for the archiver). Empty
    /// (the default) means `<topic>.audit`.
    pub audit_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topic: "chatvault.events".into(),
            properties: BTreeMap::new(),
            audit_topic: String::new(),
        }
    }
}

impl KafkaConfig {
    /// [`Self::audit_topic`], or its default for [`Self::topic`].
    pub fn audit_topic(&self) -> String {
        if self.audit_topic.is_empty() {
            format!("{}.audit", self.topic)
        } else {
            self.audit_topic.clone()
        }
    }
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where the archive lives: `file:///path`, `s3://bucket[/prefix]`, or `memory://` (tests).
    /// Default `file://./chatvault-data/archive`.
    pub url: String,
    /// object_store options, for example `aws_endpoint`, `aws_region`, `aws_allow_http`,
    /// `aws_access_key_id`, `aws_secret_access_key`. Credentials are better left to the environment
    /// (`AWS_*` variables) or workload identity.
    #[serde(deserialize_with = "string_values")]
    pub options: BTreeMap<String, String>,
    /// S3 Object Lock (`s3://` only; the bucket must have Object Lock enabled): `off` (default),
    /// `governance` or `compliance`. Event files and their manifests are then written with the retain-until
    /// date their tenant's retention policies give them, and the legal-hold flag when a hold may cover them;
    /// deletions remove every version, so S3 refuses them while a lock holds (docs/ARCHITECTURE.md,
    /// "Object Lock").
    pub object_lock: LockMode,
}

/// The S3 Object Lock retention mode chatvault writes with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    #[default]
    Off,
    /// Users with `s3:BypassGovernanceRetention` can still shorten or remove a lock.
    Governance,
    /// Nobody, the account's root included, can delete a locked version before its date.
    Compliance,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: "file://./chatvault-data/archive".into(),
            options: BTreeMap::new(),
            object_lock: LockMode::Off,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Which key provider holds the tenants' key-encryption keys: `local` (the keyring file, default),
    /// `aws_kms` (see `keys.aws_kms`) or `pkcs11` (an HSM, see `keys.pkcs11`). `keys.tenant_providers`
    /// overrides it per tenant.
    pub provider: KeyProviderKind,
    /// Tenant id → provider, for tenants whose keys live elsewhere than `keys.provider` says. The reserved
    /// `_audit` (the audit trail's keys) can be named too.
    pub tenant_providers: BTreeMap<String, KeyProviderKind>,
    /// The local keyring holding each tenant's key-encryption key; created on first use with mode 0600.
    /// Default `./chatvault-data/keyring.json`.
    pub keyring_path: PathBuf,
    /// Never write the keyring (a Secret mounted by several pods, which must not each create keys). Records of
    /// a tenant it holds no key for are rejected to the dead-letter topic. Default false; the Helm chart sets
    /// it.
    pub keyring_read_only: bool,
    /// How long an unwrapped data key stays in memory after it was last fetched from the provider; after
    /// that it is wiped and unwrapped again. Bounds how long a shredded key survives in another process.
    /// Default 5m.
    #[serde(with = "crate::duration")]
    pub cache_ttl: Duration,
    pub aws_kms: AwsKmsConfig,
    pub pkcs11: Pkcs11Config,
    /// Conversations or workspaces whose events get data keys of their own (a legal or HR channel), so that
    /// they can be shredded on their own (`chatvault keys shred --scope`). Adding a conversation to a scope
    /// applies to events archived from then on.
    pub scopes: Vec<KeyScopeConfig>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            provider: KeyProviderKind::Local,
            tenant_providers: BTreeMap::new(),
            keyring_path: PathBuf::from("./chatvault-data/keyring.json"),
            keyring_read_only: false,
            cache_ttl: Duration::from_secs(300),
            aws_kms: AwsKmsConfig::default(),
            pkcs11: Pkcs11Config::default(),
            scopes: Vec::new(),
        }
    }
}

impl KeysConfig {
    /// The provider that holds `tenant`'s key-encryption keys.
    pub fn provider_of(&self, tenant: &str) -> KeyProviderKind {
        self.tenant_providers
            .get(tenant)
            .copied()
            .unwrap_or(self.provider)
    }

    /// Every provider some tenant uses.
    pub fn providers_in_use(&self) -> Vec<KeyProviderKind> {
        let mut kinds: Vec<KeyProviderKind> = std::iter::once(self.provider)
            .chain(self.tenant_providers.values().copied())
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    fn validate(&self) -> Result<()> {
        let invalid = |setting: &str, message: &str| {
            Err(Error::invalid_argument(format!("{setting}: {message}")))
        };
        if self.cache_ttl.is_zero() {
            return invalid("keys.cache_ttl", "must be positive");
        }
        for tenant in self.tenant_providers.keys() {
            if !is_valid_tenant_id(tenant) && tenant != "_audit" {
                return invalid(
                    &format!("keys.tenant_providers.{tenant}"),
                    "is not a valid tenant id",
                );
            }
        }
        let kinds = self.providers_in_use();
        if kinds.contains(&KeyProviderKind::AwsKms) {
            if self.aws_kms.key_id.trim().is_empty() {
                let uncovered = self.provider == KeyProviderKind::AwsKms
                    || self.tenant_providers.iter().any(|(tenant, kind)| {
                        *kind == KeyProviderKind::AwsKms
                            && !self.aws_kms.tenant_key_ids.contains_key(tenant)
                    });
                if uncovered {
                    return invalid(
                        "keys.aws_kms.key_id",
                        "must name the KMS key (id, ARN or alias/...) when keys.provider is aws_kms, unless \
                         keys.aws_kms.tenant_key_ids names a key for every tenant using it",
                    );
                }
            }
            if self.aws_kms.timeout.is_zero() {
                return invalid("keys.aws_kms.timeout", "must be positive");
            }
            let endpoint = &self.aws_kms.endpoint_url;
            let is_http_url = endpoint.starts_with("https://") || endpoint.starts_with("http://");
            if !endpoint.is_empty() && !is_http_url {
                return invalid("keys.aws_kms.endpoint_url", "must be an http(s):// URL");
            }
        }
        if kinds.contains(&KeyProviderKind::Pkcs11) {
            if self.pkcs11.module.as_os_str().is_empty() {
                return invalid(
                    "keys.pkcs11.module",
                    "must name the PKCS#11 library when a tenant's keys are in an HSM",
                );
            }
            if self.pkcs11.token_label.trim().is_empty() {
                return invalid("keys.pkcs11.token_label", "must name the token");
            }
            if self.pkcs11.pin.is_some() == self.pkcs11.pin_file.is_some() {
                return invalid("keys.pkcs11.pin", "set exactly one of pin and pin_file");
            }
            if self.pkcs11.key_label_prefix.is_empty() {
                return invalid("keys.pkcs11.key_label_prefix", "must not be empty");
            }
        }
        let mut claimed: HashMap<(&str, &str, &str), &str> = HashMap::new();
        for (index, scope) in self.scopes.iter().enumerate() {
            let setting = format!("keys.scopes[{index}]");
            if !is_valid_tenant_id(&scope.tenant) {
                return invalid(&format!("{setting}.tenant"), "is not a valid tenant id");
            }
            if !is_valid_tenant_id(&scope.name) || scope.name == "default" {
                return invalid(
                    &format!("{setting}.name"),
                    "must be 1 to 64 characters of a-z, 0-9, '-' and '_', and not `default`",
                );
            }
            if scope.conversations.is_empty() && scope.workspaces.is_empty() {
                return invalid(&setting, "must name at least one conversation or workspace");
            }
            let members = scope
                .conversations
                .iter()
                .map(|id| ("conversation", id.as_str()))
                .chain(scope.workspaces.iter().map(|id| ("workspace", id.as_str())));
            for (kind, id) in members {
                if let Some(other) = claimed.insert((&scope.tenant, kind, id), &scope.name)
                    && other != scope.name
                {
                    return invalid(
                        &setting,
                        &format!(
                            "{kind} {id} of tenant {} is in scopes {other} and {}; it can be in one only",
                            scope.tenant, scope.name
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Where key-encryption keys are held.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum KeyProviderKind {
    /// The keyring file (`keys.keyring_path`).
    #[default]
    Local,
    /// AWS KMS (`keys.aws_kms`): data keys come from GenerateDataKey and are unwrapped with Decrypt, bound to
    /// tenant, scope and period by the encryption context.
    AwsKms,
    /// A PKCS#11 HSM (`keys.pkcs11`): data keys are encrypted (AES-GCM) under a non-extractable AES key on
    /// the token.
    Pkcs11,
}

impl KeyProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyProviderKind::Local => "local",
            KeyProviderKind::AwsKms => "aws_kms",
            KeyProviderKind::Pkcs11 => "pkcs11",
        }
    }
}

/// AWS KMS. Credentials come from the standard AWS chain (environment, web identity / IRSA, ECS and
/// instance metadata); the region from `region` or `AWS_REGION`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsKmsConfig {
    /// Empty: `AWS_REGION` / the AWS profile.
    pub region: String,
    /// A KMS endpoint other than AWS's own (a VPC endpoint, or a test server). Empty: AWS's.
    pub endpoint_url: String,
    /// The symmetric KMS key (id, ARN or `alias/...`) that wraps every tenant's data keys, unless
    /// `tenant_key_ids` names another for the tenant. Changing it rotates: new data keys are wrapped under
    /// the new key, old ones still unwrap under the key they name until `chatvault keys rewrap`.
    pub key_id: String,
    /// Tenant id → KMS key, for tenants with a key of their own (which `chatvault keys shred --tenant` can
    /// then schedule for deletion).
    pub tenant_key_ids: BTreeMap<String, String>,
    /// Per-call timeout. Default 5s.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
}

/// A key scope of its own within a tenant: the events of the named conversations and workspaces are
/// encrypted under data keys of this scope (one per month, `keys/tenant=<t>/scope=<name>/...`), apart from the
/// tenant's default scope. A conversation's own entry wins over its workspace's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyScopeConfig {
    pub tenant: String,
    /// 1 to 64 characters of a-z, 0-9, '-' and '_'; not `default`.
    pub name: String,
    #[serde(default)]
    pub conversations: Vec<String>,
    #[serde(default)]
    pub workspaces: Vec<String>,
}

/// A PKCS#11 token (an HSM, or SoftHSM2 for tests). Each tenant's key-encryption key is an AES-256 secret key
/// object labelled `<key_label_prefix><tenant>-v<version>`, generated on the token sensitive and
/// non-extractable.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token holding the keys (found in whichever slot it is in).
    pub token_label: String,
    /// The user PIN; prefer `pin_file` (a mounted Secret) or the `CHATVAULT__KEYS__PKCS11__PIN` variable.
    pub pin: Option<String>,
    /// A file whose content (trailing newline ignored) is the user PIN.
    pub pin_file: Option<PathBuf>,
    /// Default `chatvault-kek-`.
    pub key_label_prefix: String,
}

impl Default for Pkcs11Config {
    fn default() -> Self {
        Pkcs11Config {
            module: PathBuf::new(),
            token_label: String::new(),
            pin: None,
            pin_file: None,
            key_label_prefix: "chatvault-kek-".into(),
        }
    }
}

/// Leaves the PIN out.
impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &self.pin.as_ref().map(|_| REDACTED))
            .field("pin_file", &self.pin_file)
            .field("key_label_prefix", &self.key_label_prefix)
            .finish()
    }
}

impl Default for AwsKmsConfig {
    fn default() -> Self {
        AwsKmsConfig {
            region: String::new(),
            endpoint_url: String::new(),
            key_id: String::new(),
            tenant_key_ids: BTreeMap::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Logs, metrics and traces. Traces and OTLP metrics are configured with the standard `OTEL_*` environment
/// variables instead (see `core::telemetry`), so that the usual collector set-up works unchanged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// HTTP address serving `GET /metrics` (Prometheus text format), `GET /healthz` (liveness) and
    /// `GET /readyz` (readiness) for every role, the archiver included. Empty switches it off.
    /// Default `0.0.0.0:9464`.
    pub metrics_listen: String,
    /// `text` (default, human-readable) or `json` (one JSON object per line, for log pipelines).
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics_listen: "0.0.0.0:9464".into(),
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One OpenID Connect issuer (see `chatvault_core::auth::oidc`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OidcIssuerConfig {
    /// The issuer identifier, exactly as the provider writes it in `iss` and in its discovery document
    /// (`https://login.example.com/realms/acme`).
    pub issuer: String,
    /// The audience (`aud`) access tokens for chatvault carry: the resource or API identifier registered at
    /// the provider.
    pub audience: String,
    /// Signature algorithms accepted, pinned here (never taken from a token). Default `["RS256", "ES256"]`.
    pub algorithms: Vec<crate::auth::jwt::Algorithm>,
    /// The `typ` header required (`at+jwt` per RFC 9068, which keeps ID tokens out; Keycloak writes `JWT`);
    /// empty accepts any. Default `at+jwt`.
    pub token_type: String,
    /// How far `exp`, `nbf` and `iat` may be off. Default `60s`.
    #[serde(with = "crate::duration")]
    pub clock_skew: Duration,
    /// The key set's address; empty (the default) reads it from the discovery document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// How often the issuer's keys are read again. Default `5m`.
    #[serde(with = "crate::duration")]
    pub jwks_refresh_interval: Duration,
    /// The shortest time between two reads of the keys, however many tokens with unknown key ids arrive.
    /// Default `30s`.
    #[serde(with = "crate::duration")]
    pub jwks_min_refresh_interval: Duration,
    /// Allows `http://` for the discovery document and key set: only for a local test provider. Default
    /// false.
    pub allow_http: bool,
    /// Which claim values grant which roles on which tenant; a token matching none is allowed nothing.
    pub roles: Vec<OidcRoleRule>,
}

impl Default for OidcIssuerConfig {
    fn default() -> Self {
        OidcIssuerConfig {
            issuer: String::new(),
            audience: String::new(),
            algorithms: crate::auth::oidc::default_algorithms(),
            token_type: "at+jwt".into(),
            clock_skew: Duration::from_secs(60),
            jwks_uri: None,
            jwks_refresh_interval: Duration::from_secs(300),
            jwks_min_refresh_interval: Duration::from_secs(30),
            allow_http: false,
            roles: Vec::new(),
        }
    }
}

/// Grants `roles` on `tenant` to tokens whose `claim` (a dotted path such as `groups` or
/// `realm_access.roles`; a string or an array of strings) holds `value`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcRoleRule {
    pub claim: String,
    pub value: String,
    pub tenant: String,
    pub roles: Vec<Role>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id: 1 to 64 characters of a-z, 0-9, '-', '_'.
    pub id: String,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and audit records (never the token itself).
    pub name: String,
    /// Exactly one of `token`, `token_sha256` (hex) or `token_file` (a mounted secret).
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    pub roles: Vec<Role>,
}

/// Shows the token's name, roles and where its value comes from, never a clear token.
impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("token_sha256", &self.token_sha256)
            .field("token_file", &self.token_file)
            .field("roles", &self.roles)
            .finish()
    }
}

/// What `Debug` prints instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// `Debug` of settings whose values may be credentials (librdkafka properties such as `sasl.password`,
/// object_store options such as `aws_secret_access_key`): every key, and the values of keys that name a
/// password, secret, token, key or credential replaced by [`REDACTED`].
pub struct RedactedSettings<'a>(pub &'a BTreeMap<String, String>);

impl std::fmt::Debug for RedactedSettings<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SECRET_WORDS: [&str; 6] =
            ["password", "secret", "token", "key", "credential", "jaas"];
        f.debug_map()
            .entries(self.0.iter().map(|(name, value)| {
                let lower = name.to_ascii_lowercase();
                let shown = if SECRET_WORDS.iter().any(|word| lower.contains(word)) {
                    REDACTED
                } else {
                    value.as_str()
                };
                (name, shown)
            }))
            .finish()
    }
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("properties", &RedactedSettings(&self.properties))
            .field("audit_topic", &self.audit_topic)
            .finish()
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("url", &self.url)
            .field("options", &RedactedSettings(&self.options))
            .field("object_lock", &self.object_lock)
            .finish()
    }
}

impl SharedConfig {
    /// Cross-field checks; pure, no IO. Errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let invalid = |setting: &str, message: &str| {
            Err(Error::invalid_argument(format!("{setting}: {message}")))
        };
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers", "must not be empty");
        }
        if self.kafka.topic.trim().is_empty() {
            return invalid("kafka.topic", "must not be empty");
        }
        for key in self.kafka.properties.keys() {
            if PROTECTED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                return invalid(
                    &format!("kafka.properties.{key}"),
                    "is fixed by chatvault's delivery guarantees and cannot be overridden",
                );
            }
        }
        if !(self.storage.url.starts_with("file://")
            || self.storage.url.starts_with("s3://")
            || self.storage.url.starts_with("memory://"))
        {
            return invalid("storage.url", "must start with file://, s3:// or memory://");
        }
        match (
            &self.integrity.signing_key_path,
            &self.integrity.signing_key_pkcs11_label,
            &self.integrity.origin,
        ) {
            (Some(_), Some(_), _) => {
                return invalid(
                    "integrity.signing_key_pkcs11_label",
                    "set either signing_key_path (a key file) or signing_key_pkcs11_label (a key on the HSM)",
                );
            }
            (_, Some(_), None) => {
                return invalid(
                    "integrity.origin",
                    "a key on the HSM needs the log's origin (the name its checkpoints carry)",
                );
            }
            (_, None, Some(_)) => {
                return invalid(
                    "integrity.origin",
                    "only for signing_key_pkcs11_label: a key file carries its own name",
                );
            }
            _ => {}
        }
        if self.integrity.checkpoint_interval.is_zero() {
            return invalid("integrity.checkpoint_interval", "must be positive");
        }
        let witness = &self.integrity.witness.url;
        if !(witness.is_empty()
            || witness.starts_with("file://")
            || witness.starts_with("s3://")
            || witness.starts_with("memory://"))
        {
            return invalid(
                "integrity.witness.url",
                "must start with file://, s3:// or memory://",
            );
        }
        for (index, tenant) in self.tenants.iter().enumerate() {
            if !is_valid_tenant_id(&tenant.id) {
                return invalid(
                    &format!("tenants[{index}].id"),
                    "must be 1 to 64 characters of a-z, 0-9, '-' and '_'",
                );
            }
            for (token_index, token) in tenant.tokens.iter().enumerate() {
                let setting = format!("tenants[{index}].tokens[{token_index}]");
                let sources = [
                    token.token.is_some(),
                    token.token_sha256.is_some(),
                    token.token_file.is_some(),
                ];
                if sources.iter().filter(|set| **set).count() != 1 {
                    return invalid(
                        &setting,
                        "set exactly one of token, token_sha256, token_file",
                    );
                }
                if let Some(digest) = &token.token_sha256
                    && !(digest.len() == 64 && hex::decode(digest).is_ok())
                {
                    return invalid(
                        &format!("{setting}.token_sha256"),
                        "must be 64 hex characters",
                    );
                }
                if token.roles.is_empty() {
                    return invalid(&format!("{setting}.roles"), "must name at least one role");
                }
                if token.name.is_empty() {
                    return invalid(&format!("{setting}.name"), "must not be empty");
                }
            }
        }
        self.keys.validate()?;
        for (index, issuer) in self.oidc.iter().enumerate() {
            let setting = format!("oidc[{index}]");
            if !(issuer.issuer.starts_with("https://")
                || (issuer.allow_http && issuer.issuer.starts_with("http://")))
            {
                return invalid(
                    &format!("{setting}.issuer"),
                    "must be an https:// URL (http:// only with allow_http, for a local test provider)",
                );
            }
            if self.oidc[..index]
                .iter()
                .any(|other| other.issuer == issuer.issuer)
            {
                return invalid(&format!("{setting}.issuer"), "is configured twice");
            }
            if issuer.audience.trim().is_empty() {
                return invalid(&format!("{setting}.audience"), "must not be empty");
            }
            if issuer.algorithms.is_empty() {
                return invalid(
                    &format!("{setting}.algorithms"),
                    "must name at least one algorithm",
                );
            }
            if issuer.jwks_min_refresh_interval.is_zero() {
                return invalid(
                    &format!("{setting}.jwks_min_refresh_interval"),
                    "must be positive",
                );
            }
            if issuer.jwks_refresh_interval < issuer.jwks_min_refresh_interval {
                return invalid(
                    &format!("{setting}.jwks_refresh_interval"),
                    "must be at least jwks_min_refresh_interval",
                );
            }
            for (rule_index, rule) in issuer.roles.iter().enumerate() {
                let rule_setting = format!("{setting}.roles[{rule_index}]");
                if rule.claim.is_empty() || rule.claim.split('.').any(str::is_empty) {
                    return invalid(
                        &format!("{rule_setting}.claim"),
                        "must be a claim name or dotted path",
                    );
                }
                if rule.value.is_empty() {
                    return invalid(&format!("{rule_setting}.value"), "must not be empty");
                }
                if !is_valid_tenant_id(&rule.tenant) {
                    return invalid(
                        &format!("{rule_setting}.tenant"),
                        "must be a valid tenant id",
                    );
                }
                if rule.roles.is_empty() {
                    return invalid(
                        &format!("{rule_setting}.roles"),
                        "must name at least one role",
                    );
                }
            }
        }
        Ok(())
    }

    /// Builds the authenticator from the tenants' tokens (reading `token_file`s).
    pub fn authenticator(&self) -> Result<Authenticator> {
        let mut authenticator = Authenticator::default();
        for tenant in &self.tenants {
            for token in &tenant.tokens {
                let digest = if let Some(clear) = &token.token {
                    token_digest(clear)
                } else if let Some(hex_digest) = &token.token_sha256 {
                    let bytes = hex::decode(hex_digest).map_err(|_| {
                        Error::invalid_argument(format!("token {}: bad token_sha256", token.name))
                    })?;
                    let mut digest = [0u8; 32];
                    digest.copy_from_slice(&bytes);
                    digest
                } else if let Some(path) = &token.token_file {
                    let clear = std::fs::read_to_string(path).map_err(|error| {
                        Error::invalid_argument(format!(
                            "token {}: reading token_file {}: {error}",
                            token.name,
                            path.display()
                        ))
                    })?;
                    token_digest(clear.trim())
                } else {
                    continue;
                };
                authenticator.add_token_digest(digest, &token.name, &tenant.id, &token.roles);
            }
        }
        for issuer in &self.oidc {
            authenticator.add_issuer(crate::auth::oidc::OidcIssuer::new(issuer.clone())?);
        }
        Ok(authenticator)
    }
}

/// A map of strings that also takes booleans and numbers (`aws_allow_http = true`, or the same from the
/// environment, where `true` parses as a boolean) as their text.
fn string_values<'de, D>(deserializer: D) -> std::result::Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw: BTreeMap<String, toml::Value> = BTreeMap::deserialize(deserializer)?;
    raw.into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Float(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "{key}: expected a string, got {}",
                        other.type_str()
                    )));
                }
            };
            Ok((key, text))
        })
        .collect()
}

/// Rewrites each old `<name>_ms = <integer>` of `section` (from the file or the environment), for each `name`
/// in `names`, as `<name> = "<n>ms"`, and returns a warning per rewrite naming the new setting. Both names at
/// once is an error.
fn rename_millisecond_settings(
    section: &str,
    names: &[&str],
    table: &mut toml::Table,
) -> std::result::Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for name in names {
        let old = format!("{name}_ms");
        let Some(value) = table.remove(&old) else {
            continue;
        };
        if table.contains_key(*name) {
            return Err(format!(
                "{section}.{old}: is the old name of {section}.{name}; set only one"
            ));
        }
        let millis = value
            .as_integer()
            .filter(|millis| *millis >= 0)
            .ok_or_else(|| format!("{section}.{old}: expected a whole number of milliseconds"))?;
        let duration = crate::duration::format(Duration::from_millis(millis as u64));
        warnings.push(format!(
            "{section}.{old} is deprecated and will be removed in the next release: write {section}.{name} = \"{duration}\" \
             (or CHATVAULT__{}__{}={duration})",
            section.to_ascii_uppercase(),
            name.to_ascii_uppercase()
        ));
        table.insert((*name).to_string(), toml::Value::String(duration));
    }
    Ok(warnings)
}

fn apply_env_override(
    root: &mut toml::Table,
    path: &str,
    value: &str,
) -> std::result::Result<(), String> {
    let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
    if segments.iter().any(String::is_empty) {
        return Err("empty path segment".into());
    }
    let (last, parents) = segments.split_last().ok_or("empty path")?;
    let mut table = root;
    for segment in parents {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("{segment} is not a section"))?;
    }
    table.insert(last.clone(), parse_scalar(value));
    Ok(())
}

fn parse_scalar(value: &str) -> toml::Value {
    let document = format!("v = {value}");
    match toml::from_str::<toml::Table>(&document) {
        Ok(mut table) => match table.remove("v") {
            Some(
                parsed
                @ (toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Float(_)),
            ) => parsed,
            _ => toml::Value::String(value.to_string()),
        },
        Err(_) => toml::Value::String(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_settings_are_checked_and_errors_name_the_setting() {
        let error_of = |change: &dyn Fn(&mut KeysConfig)| {
            let mut keys = KeysConfig::default();
            change(&mut keys);
            keys.validate().expect_err("invalid").message().to_string()
        };
        assert!(
            error_of(&|keys| keys.provider = KeyProviderKind::AwsKms)
                .starts_with("keys.aws_kms.key_id:")
        );
        assert!(
            error_of(&|keys| {
                keys.tenant_providers
                    .insert("acme".into(), KeyProviderKind::Pkcs11);
            })
            .starts_with("keys.pkcs11.module:")
        );
        assert!(
            error_of(&|keys| {
                keys.provider = KeyProviderKind::Pkcs11;
                keys.pkcs11.module = "/usr/lib/softhsm/libsofthsm2.so".into();
                keys.pkcs11.token_label = "t".into();
            })
            .starts_with("keys.pkcs11.pin:")
        );
        let scope = |name: &str, conversation: &str| KeyScopeConfig {
            tenant: "acme".into(),
            name: name.into(),
            conversations: vec![conversation.into()],
            workspaces: vec![],
        };
        let twice = error_of(&|keys| {
            keys.scopes = vec![scope("legal", "C1"), scope("hr", "C1")];
        });
        assert!(
            twice.starts_with("keys.scopes[1]:") && twice.contains("legal and hr"),
            "{twice}"
        );
        assert!(
            error_of(&|keys| keys.scopes = vec![scope("default", "C1")])
                .starts_with("keys.scopes[0].name:")
        );
        let fine = KeysConfig {
            scopes: vec![scope("legal", "C1"), scope("hr", "C2")],
            ..KeysConfig::default()
        };
        fine.validate().expect("valid");
    }

    #[test]
    fn debug_output_of_the_configuration_shows_no_secret() {
        let mut shared = SharedConfig::default();
        shared
            .kafka
            .properties
            .insert("sasl.password".into(), "kafka-secret-1".into());
        shared
            .kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        shared
            .storage
            .options
            .insert("aws_secret_access_key".into(), "s3-secret-2".into());
        shared.keys.pkcs11.pin = Some("hsm-pin-3".into());
        shared.tenants.push(TenantConfig {
            id: "acme".into(),
            tokens: vec![TokenConfig {
                name: "bridge".into(),
                token: Some("bearer-token-4".into()),
                ..Default::default()
            }],
        });
        let printed = format!("{shared:?} {shared:#?}");
        for secret in [
            "kafka-secret-1",
            "s3-secret-2",
            "hsm-pin-3",
            "bearer-token-4",
        ] {
            assert!(!printed.contains(secret), "Debug shows {secret}: {printed}");
        }
        // What is not secret is still shown.
        for shown in [
            "sasl.password",
            "SASL_SSL",
            "aws_secret_access_key",
            "bridge",
        ] {
            assert!(printed.contains(shown), "Debug lost {shown}");
        }
    }

    /// A section as a service defines one.
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Widget {
        #[serde(with = "crate::duration")]
        wait: Duration,
        count: u32,
    }

    impl Section for Widget {
        const NAME: &'static str = "widget";
        const MILLISECOND_SETTINGS: &'static [&'static str] = &["wait"];
        fn validate(&self) -> Result<()> {
            if self.count > 10 {
                return Err(Error::invalid_argument("widget.count: at most 10"));
            }
            Ok(())
        }
    }

    fn source(text: &str, env: &[(&str, &str)]) -> ConfigSource {
        let env = env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        ConfigSource::from_toml_and_env(text, &env).expect("parses")
    }

    #[test]
    fn sections_are_taken_with_the_environment_applied() {
        let mut config = source(
            "[kafka]\nbrokers = \"file:9092\"\n[widget]\ncount = 3\n",
            &[
                ("CHATVAULT__KAFKA__BROKERS", "env:9092"),
                ("CHATVAULT__WIDGET__WAIT_MS", "2500"),
                ("CHATVAULT__STORAGE__OPTIONS__AWS_ALLOW_HTTP", "true"),
                ("UNRELATED", "x"),
            ],
        );
        let shared = config.shared().expect("valid");
        let widget: Widget = config.section().expect("valid");
        assert_eq!(shared.kafka.brokers, "env:9092", "the environment wins");
        assert_eq!(shared.storage.options["aws_allow_http"], "true");
        assert_eq!(
            widget,
            Widget {
                wait: Duration::from_millis(2500),
                count: 3
            }
        );
        assert_eq!(
            config.finish().expect("nothing unknown"),
            vec![
                "widget.wait_ms is deprecated and will be removed in the next release: write \
                 widget.wait = \"2500ms\" (or CHATVAULT__WIDGET__WAIT=2500ms)"
                    .to_string()
            ],
            "the old name still works, with a warning"
        );
    }

    #[test]
    fn errors_name_the_section_and_the_setting() {
        let mut config = source("[widget]\ncount = 11\n", &[]);
        let error = config.section::<Widget>().expect_err("too many");
        assert_eq!(error.message(), "widget.count: at most 10");

        let mut config = source("[widget]\ncolor = 1\n", &[]);
        let error = config.section::<Widget>().expect_err("unknown field");
        assert!(
            error.message().starts_with("widget: unknown field `color`"),
            "{}",
            error.message()
        );

        let mut config = source("widget = 3\n", &[]);
        let error = config.section::<Widget>().expect_err("not a table");
        assert_eq!(error.message(), "widget: expected a section, got integer");

        let mut config = source("[widget]\nwait_ms = 1\nwait = \"1s\"\n", &[]);
        let error = config.section::<Widget>().expect_err("both names");
        assert_eq!(
            error.message(),
            "widget.wait_ms: is the old name of widget.wait; set only one"
        );

        let mut config = source("[widgets]\ncount = 1\n", &[]);
        config.shared().expect("valid");
        config.section::<Widget>().expect("defaults");
        let error = config.finish().expect_err("misspelt section");
        assert!(
            error
                .message()
                .starts_with("config: unknown section `widgets`"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn the_shared_keys_are_the_shared_sections() {
        let table = toml::Table::try_from(SharedConfig::default()).expect("serializable");
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut expected = SHARED_KEYS.to_vec();
        expected.sort();
        assert_eq!(keys, expected);
    }

    #[test]
    fn shared_settings_are_checked() {
        for (text, expected) in [
            ("[kafka]\nbrokerz = \"x\"", "unknown field `brokerz`"),
            ("[storage]\nurl = \"ftp://x\"", "storage.url"),
            (
                "[kafka.properties]\n\"enable.idempotence\" = \"false\"",
                "kafka.properties.enable.idempotence",
            ),
            ("[[tenants]]\nid = \"Bad Tenant\"", "tenants[0].id"),
            (
                "[[tenants]]\nid = \"acme\"\n[[tenants.tokens]]\nname = \"t\"\nroles = [\"ingest\"]",
                "tenants[0].tokens[0]",
            ),
        ] {
            let error = source(text, &[]).shared().expect_err(expected);
            assert!(
                error.message().contains(expected),
                "{expected}: {}",
                error.message()
            );
        }
    }
}
