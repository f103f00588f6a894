//! The configuration: one TOML file (see `config/chatvault.example.toml`, the reference) plus environment
//! overrides, then a pure validation step whose errors name the setting.
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
use crate::event::{EventLimits, is_valid_tenant_id};

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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub storage: StorageConfig,
    pub keys: KeysConfig,
    pub gateway: GatewayConfig,
    pub archiver: ArchiverConfig,
    pub restorer: RestorerConfig,
    pub telemetry: TelemetryConfig,
    /// Tenants and their bearer tokens.
    pub tenants: Vec<TenantConfig>,
    /// Warnings about old setting names found while loading (see [`Config::load`]); roles log them once
    /// their logging is up. Not a setting.
    #[serde(skip)]
    pub deprecated_settings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topic: "chatvault.events".into(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: "file://./chatvault-data/archive".into(),
            options: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// The local keyring holding each tenant's key-encryption key; created on first use with mode 0600.
    /// Default `./chatvault-data/keyring.json`.
    pub keyring_path: PathBuf,
    /// Never write the keyring (a Secret mounted by several pods, which must not each create keys). Records of
    /// a tenant it holds no key for are rejected to the dead-letter topic. Default false; the Helm chart sets
    /// it.
    pub keyring_read_only: bool,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            keyring_path: PathBuf::from("./chatvault-data/keyring.json"),
            keyring_read_only: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC listen address. Default `0.0.0.0:50051`.
    pub grpc_listen: String,
    /// How long an event may wait for Kafka's acknowledgement before the sender gets UNAVAILABLE
    /// (librdkafka `message.timeout.ms`). Default `10s`.
    #[serde(with = "crate::duration")]
    pub delivery_timeout: Duration,
    /// Most events waiting in the producer queue (`queue.buffering.max.messages`); beyond it senders get
    /// RESOURCE_EXHAUSTED. Default 100000.
    pub max_queued_events: u64,
    /// Most events in one batch call. Default `10s`.
    pub max_batch_events: usize,
    /// At shutdown, how long the gateway keeps serving after it reported NOT_SERVING, so load balancers and
    /// health-checking clients stop sending before it stops accepting. Default `2s`.
    #[serde(with = "crate::duration")]
    pub shutdown_delay: Duration,
    /// Grace period for in-flight requests once the gateway stopped accepting at shutdown; calls still running
    /// after it are abandoned (their senders get no OK, so nothing acknowledged is lost). Default `20s`.
    #[serde(with = "crate::duration")]
    pub drain_timeout: Duration,
    pub limits: EventLimits,
    /// HTTP listen address of the webhook endpoints (`POST /webhooks/<integration>`). Default `0.0.0.0:8080`.
    pub http_listen: String,
    /// Largest accepted webhook body; larger requests get 413. Default 1 MiB.
    pub max_webhook_body_bytes: usize,
    /// How far a signed webhook timestamp may be from now (Slack, Standard Webhooks, Discord). Default 300
    /// (5 minutes).
    pub webhook_replay_window_secs: u64,
    /// Largest accepted gRPC message (a whole IngestBatch request, or one message of a stream), enforced while
    /// it is decoded, which happens only after its bearer token was accepted. Default 16 MiB.
    pub max_grpc_message_bytes: usize,
    /// Most gRPC ingest calls in flight in the process, streams included; further calls get RESOURCE_EXHAUSTED
    /// before their message is read. With `max_grpc_message_bytes` it bounds what decoding can hold at once.
    /// Default 256.
    pub max_grpc_calls: usize,
    /// HTTP/2 streams (calls) one gRPC connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    /// Default 100.
    pub grpc_max_concurrent_streams: u32,
    /// Calls of one gRPC connection served at once; the connection's further calls wait. Default 32.
    pub grpc_concurrency_limit_per_connection: usize,
    /// Interval of HTTP/2 keep-alive PINGs on gRPC connections; `0s` sends none. Default `30s`.
    #[serde(with = "crate::duration")]
    pub grpc_keepalive_interval: Duration,
    /// A gRPC connection whose keep-alive PING is not answered within this long is closed. Default `10s`.
    #[serde(with = "crate::duration")]
    pub grpc_keepalive_timeout: Duration,
    /// Most open webhook (HTTP) connections; a connection beyond it is answered 503 with Retry-After and
    /// closed. Default 1024.
    pub max_http_connections: usize,
    /// How long a webhook client may take to send a request's headers (and how long an idle keep-alive
    /// connection stays open); a slower client is disconnected. Default `10s`.
    #[serde(with = "crate::duration")]
    pub http_header_read_timeout: Duration,
    /// How long a webhook client may take to send a request's body; a slower client gets 408 and is
    /// disconnected. Default `30s`.
    #[serde(with = "crate::duration")]
    pub http_body_read_timeout: Duration,
    /// Delivery ids (Slack `event_id`, Standard Webhooks `webhook-id`, ...) each webhook integration
    /// remembers, to answer a platform's redelivery without producing again; beyond it the oldest are
    /// forgotten (a forgotten redelivery is archived again, and readers collapse the copy). Default 100000.
    pub webhook_redelivery_cache_size: usize,
    /// How long a delivery id is remembered; longer than the platforms' retry schedules (Slack retries for
    /// about 6 minutes, Graph for up to 4 hours). Default `1h`.
    #[serde(with = "crate::duration")]
    pub webhook_redelivery_window: Duration,
    /// At shutdown, once both listeners are drained, how long the producer may take to deliver what is still
    /// queued. Every acknowledged event was delivered already; what remains belongs to calls that failed or
    /// were abandoned, whose senders retry. Default `5s`.
    #[serde(with = "crate::duration")]
    pub producer_flush_timeout: Duration,
    /// Webhook integrations, one endpoint each.
    pub webhooks: Vec<WebhookConfig>,
}

/// A chat platform that pushes webhooks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebhookPlatform {
    /// Slack Events API: `secrets` are signing secrets.
    Slack,
    /// Standard Webhooks senders: `secrets` are `whsec_<base64>` secrets.
    StandardWebhooks,
    /// Mattermost outgoing webhooks: `secrets` are the outgoing webhook tokens.
    Mattermost,
    /// Discord: `secrets` are application public keys (64 hex characters).
    Discord,
    /// Microsoft Teams through Microsoft Graph change notifications: `secrets` are the accepted `clientState`
    /// values; rich notifications also need `certificates`, `app_id` and `jwks_file`.
    Teams,
}

impl WebhookPlatform {
    /// The configuration spelling (`standard_webhooks`), also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookPlatform::Slack => "slack",
            WebhookPlatform::StandardWebhooks => "standard_webhooks",
            WebhookPlatform::Mattermost => "mattermost",
            WebhookPlatform::Discord => "discord",
            WebhookPlatform::Teams => "teams",
        }
    }
}

/// A private key for Microsoft Graph rich notifications, chosen by the notification's `encryptionCertificateId`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TeamsCertificate {
    /// The `encryptionCertificateId` given when the subscription was created (1 to 128 characters).
    pub id: String,
    /// PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`) with the RSA private key of that certificate.
    pub private_key_file: PathBuf,
}

/// One webhook integration: `POST /webhooks/<name>` binds a platform, a tenant and its secrets. Several
/// secrets may be valid at once (rotation): a request verified by any of them is accepted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Path segment of the endpoint: 1 to 64 characters of a-z, 0-9, '-' and '_'.
    pub name: String,
    pub platform: Option<WebhookPlatform>,
    /// Tenant the integration's events belong to.
    pub tenant: String,
    /// Secrets in clear (prefer `secret_files`). Never logged.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Files holding one secret each (mounted Kubernetes secrets); read at start-up.
    #[serde(default)]
    pub secret_files: Vec<PathBuf>,
    /// Teams only: private keys for rich notifications (several at once while rotating certificates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<TeamsCertificate>,
    /// Teams only: the Azure app (client) id, the expected `aud` of Graph's validation tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Teams only: a JSON Web Key Set file with the Microsoft identity platform's signing keys
    /// (`https://login.microsoftonline.com/common/discovery/v2.0/keys`); re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// Teams only: Azure tenant ids whose notifications are accepted; empty accepts any tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenant_ids: Vec<String>,
}

impl WebhookConfig {
    /// Every configured secret, files read and trimmed.
    pub fn resolve_secrets(&self) -> Result<Vec<String>> {
        let mut secrets = self.secrets.clone();
        for path in &self.secret_files {
            let text = std::fs::read_to_string(path).map_err(|error| {
                Error::invalid_argument(format!(
                    "webhook {}: reading secret file {}: {error}",
                    self.name,
                    path.display()
                ))
            })?;
            secrets.push(text.trim().to_string());
        }
        Ok(secrets)
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            grpc_listen: "0.0.0.0:50051".into(),
            delivery_timeout: Duration::from_secs(10),
            max_queued_events: 100_000,
            max_batch_events: 10_000,
            shutdown_delay: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(20),
            limits: EventLimits::default(),
            http_listen: "0.0.0.0:8080".into(),
            max_webhook_body_bytes: 1024 * 1024,
            webhook_replay_window_secs: 300,
            max_grpc_message_bytes: 16 * 1024 * 1024,
            max_grpc_calls: 256,
            grpc_max_concurrent_streams: 100,
            grpc_concurrency_limit_per_connection: 32,
            grpc_keepalive_interval: Duration::from_secs(30),
            grpc_keepalive_timeout: Duration::from_secs(10),
            max_http_connections: 1024,
            http_header_read_timeout: Duration::from_secs(10),
            http_body_read_timeout: Duration::from_secs(30),
            webhook_redelivery_cache_size: 100_000,
            webhook_redelivery_window: Duration::from_secs(3600),
            producer_flush_timeout: Duration::from_secs(5),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {
    /// Kafka consumer group shared by all archivers. Default `chatvault-archiver`.
    pub group_id: String,
    /// A partition's batch is sealed at this many events. Default 200000.
    pub max_batch_events: usize,
    /// ... or at this many bytes of encoded events. Default 64 MiB.
    pub max_batch_bytes: usize,
    /// ... or when its oldest event has waited this long. Default `10s`.
    #[serde(with = "crate::duration")]
    pub max_batch_age: Duration,
    /// Sealed batches waiting for upload; with the open batches this bounds memory at about
    /// `(partitions + max_pending_batches) * max_batch_bytes` plus librdkafka's fetch queue. Default 2.
    pub max_pending_batches: usize,
    /// librdkafka's prefetch queue per partition, in KiB (`queued.max.messages.kbytes`). Default 32768.
    pub fetch_queue_kbytes: u64,
    /// Files of one batch uploaded at once. Default 8.
    pub upload_concurrency: usize,
    /// Parquet zstd level. Default 3.
    pub zstd_level: i32,
    /// Rows per Parquet row group at most. Default 65536.
    pub row_group_rows: usize,
    /// Estimated encoded bytes (before compression) per Parquet row group at most. Every column chunk is one
    /// data page (so DuckDB can decrypt it), so this bounds pages too. Default 16 MiB.
    pub row_group_bytes: usize,
    /// Kafka topic for records that can never be archived (not a chat event, an invalid tenant id, a tenant
    /// without a key-encryption key): the archiver produces each there, with its reason, before committing it
    /// as a rejected record, so an operator can inspect and replay it. Must exist. Default
    /// `<kafka.topic>.dead-letter`.
    pub dead_letter_topic: String,
    /// Which offsets Kafka did not deliver may be committed as gaps: `confirm` (default) only those the
    /// broker's log-start offset shows deleted, refetching and then halting the partition otherwise; `allow`
    /// every gap, for compacted topics and transactional producers.
    pub offset_gaps: OffsetGapPolicy,
    /// Kafka session timeout. Default `10s`. Also bounds how long leaving the consumer group may take at
    /// shutdown (the coordinator drops a member that did not leave after this long anyway).
    #[serde(with = "crate::duration")]
    pub session_timeout: Duration,
    /// At shutdown, how long sealed batches may take to be uploaded and committed (retrying storage errors)
    /// before the rest is abandoned: uncommitted records stay in Kafka for the partition's next owner.
    /// Default `30s`.
    #[serde(with = "crate::duration")]
    pub shutdown_timeout: Duration,
    /// A partition with records to archive that commits nothing for this long is reported stalled
    /// (`chatvault_archiver_partitions_stalled`, and `/readyz` answers 503 naming it), usually because storage,
    /// the key provider or the chain head cannot be reached. It keeps retrying. Default `1m`.
    #[serde(with = "crate::duration")]
    pub stall_timeout: Duration,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        ArchiverConfig {
            group_id: "chatvault-archiver".into(),
            max_batch_events: 200_000,
            max_batch_bytes: 64 * 1024 * 1024,
            max_batch_age: Duration::from_secs(10),
            max_pending_batches: 2,
            fetch_queue_kbytes: 32 * 1024,
            upload_concurrency: 8,
            zstd_level: 3,
            row_group_rows: 65_536,
            row_group_bytes: 16 * 1024 * 1024,
            offset_gaps: OffsetGapPolicy::Confirm,
            dead_letter_topic: String::new(),
            session_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// See [`ArchiverConfig::offset_gaps`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetGapPolicy {
    #[default]
    Confirm,
    Allow,
}

impl ArchiverConfig {
    /// [`Self::dead_letter_topic`], or its default for `kafka`'s topic.
    pub fn dead_letter_topic(&self, kafka: &KafkaConfig) -> String {
        if self.dead_letter_topic.is_empty() {
            format!("{}.dead-letter", kafka.topic)
        } else {
            self.dead_letter_topic.clone()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RestorerConfig {
    /// gRPC listen address. Default `0.0.0.0:50052`.
    pub grpc_listen: String,
    /// Files fetched and decoded at once for one request. Default 4.
    pub read_concurrency: usize,
    /// Restore calls served at once by one restorer; beyond it callers get RESOURCE_EXHAUSTED (retryable).
    /// Default 16.
    pub max_concurrent_requests: usize,
    /// Events one streamed restore gathers in memory at most before sending them (with
    /// `max_buffered_bytes`, the per-request memory bound besides the files in flight). Default 4096.
    pub max_buffered_events: usize,
    /// Bytes of encoded events one streamed restore gathers at most. Default 16 MiB.
    pub max_buffered_bytes: usize,
    /// At shutdown, how long in-flight calls (restore streams) may run after the restorer stopped accepting;
    /// calls still running after it are cut off. Default `20s`.
    #[serde(with = "crate::duration")]
    pub drain_timeout: Duration,
}

impl Default for RestorerConfig {
    fn default() -> Self {
        RestorerConfig {
            grpc_listen: "0.0.0.0:50052".into(),
            read_concurrency: 4,
            max_concurrent_requests: 16,
            max_buffered_events: 4_096,
            max_buffered_bytes: 16 * 1024 * 1024,
            drain_timeout: Duration::from_secs(20),
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id: 1 to 64 characters of a-z, 0-9, '-', '_'.
    pub id: String,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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

impl Config {
    /// Loads `path` (when given), applies the process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|error| {
                Error::invalid_argument(format!("reading config file {}: {error}", path.display()))
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, &env)
    }

    /// Parses TOML text, applies overrides from `env` (a map, so tests can inject it), and validates.
    pub fn from_toml_and_env(text: &str, env: &HashMap<String, String>) -> Result<Config> {
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
        let deprecated_settings =
            rename_millisecond_settings(&mut root).map_err(Error::invalid_argument)?;
        let mut config: Config =
            toml::Value::Table(root)
                .try_into()
                .map_err(|error: toml::de::Error| {
                    Error::invalid_argument(format!("config: {error}"))
                })?;
        config.validate()?;
        config.deprecated_settings = deprecated_settings;
        Ok(config)
    }

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
        if self.gateway.delivery_timeout.is_zero() {
            return invalid("gateway.delivery_timeout", "must be positive");
        }
        if self.gateway.max_batch_events == 0 {
            return invalid("gateway.max_batch_events", "must be positive");
        }
        if self.gateway.limits.max_event_bytes < 1024 {
            return invalid("gateway.limits.max_event_bytes", "must be at least 1024");
        }
        if self.archiver.max_batch_events == 0 {
            return invalid("archiver.max_batch_events", "must be positive");
        }
        if self.archiver.max_batch_bytes < 1024 * 1024 {
            return invalid("archiver.max_batch_bytes", "must be at least 1 MiB");
        }
        if self.archiver.max_pending_batches == 0 {
            return invalid("archiver.max_pending_batches", "must be positive");
        }
        if !(1..=22).contains(&self.archiver.zstd_level) {
            return invalid("archiver.zstd_level", "must be between 1 and 22");
        }
        if self.archiver.row_group_rows == 0 {
            return invalid("archiver.row_group_rows", "must be positive");
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.archiver.row_group_bytes) {
            return invalid(
                "archiver.row_group_bytes",
                "must be between 1 MiB and 1 GiB (one data page per column chunk: pages must stay readable)",
            );
        }
        if self.archiver.upload_concurrency == 0 {
            return invalid("archiver.upload_concurrency", "must be positive");
        }
        if self.archiver.stall_timeout.is_zero() {
            return invalid("archiver.stall_timeout", "must be positive");
        }
        if self.restorer.read_concurrency == 0 {
            return invalid("restorer.read_concurrency", "must be positive");
        }
        if self.restorer.max_concurrent_requests == 0 {
            return invalid("restorer.max_concurrent_requests", "must be positive");
        }
        if self.restorer.max_buffered_events == 0 {
            return invalid("restorer.max_buffered_events", "must be positive");
        }
        if self.restorer.max_buffered_bytes < 64 * 1024 {
            return invalid("restorer.max_buffered_bytes", "must be at least 64 KiB");
        }
        let mut webhook_names = std::collections::HashSet::new();
        for (index, webhook) in self.gateway.webhooks.iter().enumerate() {
            let setting = format!("gateway.webhooks[{index}]");
            if !is_valid_tenant_id(&webhook.name) {
                return invalid(
                    &format!("{setting}.name"),
                    "must be 1 to 64 characters of a-z, 0-9, '-' and '_'",
                );
            }
            if !webhook_names.insert(webhook.name.as_str()) {
                return invalid(&format!("{setting}.name"), "is used by another webhook");
            }
            if webhook.platform.is_none() {
                return invalid(
                    &format!("{setting}.platform"),
                    "is required: slack, standard_webhooks, mattermost, discord or teams",
                );
            }
            validate_teams_settings(webhook, &setting)?;
            if !is_valid_tenant_id(&webhook.tenant) {
                return invalid(&format!("{setting}.tenant"), "must be a valid tenant id");
            }
            if webhook.secrets.is_empty() && webhook.secret_files.is_empty() {
                return invalid(&setting, "needs at least one of secrets, secret_files");
            }
        }
        if self.gateway.max_webhook_body_bytes < 1024 {
            return invalid("gateway.max_webhook_body_bytes", "must be at least 1024");
        }
        if self.gateway.max_grpc_message_bytes < self.gateway.limits.max_event_bytes {
            return invalid(
                "gateway.max_grpc_message_bytes",
                "must be at least gateway.limits.max_event_bytes (one event must fit a message)",
            );
        }
        for (setting, value) in [
            ("gateway.max_grpc_calls", self.gateway.max_grpc_calls as u64),
            (
                "gateway.grpc_max_concurrent_streams",
                u64::from(self.gateway.grpc_max_concurrent_streams),
            ),
            (
                "gateway.grpc_concurrency_limit_per_connection",
                self.gateway.grpc_concurrency_limit_per_connection as u64,
            ),
            (
                "gateway.grpc_keepalive_timeout",
                self.gateway.grpc_keepalive_timeout.as_millis() as u64,
            ),
            (
                "gateway.max_http_connections",
                self.gateway.max_http_connections as u64,
            ),
            (
                "gateway.http_header_read_timeout",
                self.gateway.http_header_read_timeout.as_millis() as u64,
            ),
            (
                "gateway.http_body_read_timeout",
                self.gateway.http_body_read_timeout.as_millis() as u64,
            ),
            (
                "gateway.webhook_redelivery_cache_size",
                self.gateway.webhook_redelivery_cache_size as u64,
            ),
            (
                "gateway.webhook_redelivery_window",
                self.gateway.webhook_redelivery_window.as_millis() as u64,
            ),
        ] {
            if value == 0 {
                return invalid(setting, "must be positive");
            }
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
        Ok(authenticator)
    }
}

/// The Teams-only settings of one webhook: absent for other platforms; for Teams, certificates with unique ids
/// and key files, and (with certificates, i.e. rich notifications) `app_id` and `jwks_file`.
fn validate_teams_settings(webhook: &WebhookConfig, setting: &str) -> Result<()> {
    let invalid =
        |name: String, message: &str| Err(Error::invalid_argument(format!("{name}: {message}")));
    if webhook.platform != Some(WebhookPlatform::Teams) {
        let teams_only = [
            ("certificates", !webhook.certificates.is_empty()),
            ("app_id", webhook.app_id.is_some()),
            ("jwks_file", webhook.jwks_file.is_some()),
            ("tenant_ids", !webhook.tenant_ids.is_empty()),
        ];
        if let Some((name, _)) = teams_only.iter().find(|(_, set)| *set) {
            return invalid(format!("{setting}.{name}"), "is only for platform teams");
        }
        return Ok(());
    }
    let mut ids = std::collections::HashSet::new();
    for (index, certificate) in webhook.certificates.iter().enumerate() {
        let name = format!("{setting}.certificates[{index}]");
        if certificate.id.is_empty() || certificate.id.len() > 128 {
            return invalid(format!("{name}.id"), "must be 1 to 128 characters");
        }
        if !ids.insert(certificate.id.as_str()) {
            return invalid(format!("{name}.id"), "is used by another certificate");
        }
        if certificate.private_key_file.as_os_str().is_empty() {
            return invalid(
                format!("{name}.private_key_file"),
                "must name a PKCS#8 PEM file",
            );
        }
    }
    if let Some(app_id) = &webhook.app_id
        && app_id.trim().is_empty()
    {
        return invalid(format!("{setting}.app_id"), "must not be empty");
    }
    if !webhook.certificates.is_empty() {
        if webhook.app_id.is_none() {
            return invalid(
                format!("{setting}.app_id"),
                "is required with certificates (rich notifications carry validation tokens for this app)",
            );
        }
        if webhook.jwks_file.is_none() {
            return invalid(
                format!("{setting}.jwks_file"),
                "is required with certificates (the keys that sign validation tokens)",
            );
        }
    }
    for (index, tenant) in webhook.tenant_ids.iter().enumerate() {
        if tenant.trim().is_empty() {
            return invalid(
                format!("{setting}.tenant_ids[{index}]"),
                "must not be empty",
            );
        }
    }
    Ok(())
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

/// Durations that were integer milliseconds under a `_ms` name in chatvault 0.1 (`archiver.max_batch_age_ms = 500`
/// is now `archiver.max_batch_age = "500ms"`). The old names are still read, for one release.
const MILLISECOND_SETTINGS: &[(&str, &str)] = &[
    ("gateway", "delivery_timeout"),
    ("gateway", "shutdown_delay"),
    ("gateway", "drain_timeout"),
    ("gateway", "grpc_keepalive_interval"),
    ("gateway", "grpc_keepalive_timeout"),
    ("gateway", "http_header_read_timeout"),
    ("gateway", "http_body_read_timeout"),
    ("archiver", "max_batch_age"),
    ("archiver", "session_timeout"),
    ("archiver", "shutdown_timeout"),
    ("archiver", "stall_timeout"),
    ("restorer", "drain_timeout"),
];

/// Rewrites each old `<name>_ms = <integer>` (from the file or the environment) as `<name> = "<n>ms"`, and
/// returns a warning per rewrite, naming the new setting. Both names at once is an error.
fn rename_millisecond_settings(root: &mut toml::Table) -> std::result::Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for (section, name) in MILLISECOND_SETTINGS {
        let Some(table) = root.get_mut(*section).and_then(toml::Value::as_table_mut) else {
            continue;
        };
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
    fn environment_overrides_the_file() {
        let text = r#"
            [kafka]
            brokers = "file-broker:9092"
            [archiver]
            max_batch_events = 10
        "#;
        let env = HashMap::from([
            (
                "CHATVAULT__KAFKA__BROKERS".to_string(),
                "env-broker:9092".to_string(),
            ),
            (
                "CHATVAULT__ARCHIVER__MAX_BATCH_AGE_MS".to_string(),
                "2500".to_string(),
            ),
            (
                "CHATVAULT__STORAGE__OPTIONS__AWS_ALLOW_HTTP".to_string(),
                "true".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ]);
        let config = Config::from_toml_and_env(text, &env).expect("valid");
        assert_eq!(config.kafka.brokers, "env-broker:9092");
        assert_eq!(config.archiver.max_batch_events, 10);
        assert_eq!(config.archiver.max_batch_age, Duration::from_millis(2500));
        assert_eq!(
            config.deprecated_settings,
            vec![
                "archiver.max_batch_age_ms is deprecated and will be removed in the next release: write \
                 archiver.max_batch_age = \"2500ms\" (or CHATVAULT__ARCHIVER__MAX_BATCH_AGE=2500ms)"
                    .to_string()
            ],
            "the old name still works, with a warning"
        );
        assert_eq!(config.storage.options["aws_allow_http"], "true");
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
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
            ("[archiver]\nzstd_level = 0", "archiver.zstd_level"),
            (
                "[archiver]\nupload_concurrency = 0",
                "archiver.upload_concurrency",
            ),
            (
                "[archiver]\nstall_timeout = \"0s\"",
                "archiver.stall_timeout",
            ),
            (
                "[archiver]\nmax_batch_age = 500",
                "expected a duration with a unit, such as \"500ms\"",
            ),
            (
                "[archiver]\nmax_batch_age_ms = 500\nmax_batch_age = \"1s\"",
                "archiver.max_batch_age_ms: is the old name of archiver.max_batch_age; set only one",
            ),
            (
                "[restorer]\nmax_concurrent_requests = 0",
                "restorer.max_concurrent_requests",
            ),
            (
                "[restorer]\nmax_buffered_bytes = 1024",
                "restorer.max_buffered_bytes: must be at least 64 KiB",
            ),
            (
                "[[gateway.webhooks]]\nname = \"t\"\nplatform = \"teams\"\ntenant = \"acme\"\nsecrets = [\"s\"]\napp_id = \"a\"\njwks_file = \"/k\"\n[[gateway.webhooks.certificates]]\nid = \"c\"\nprivate_key_file = \"/a\"\n[[gateway.webhooks.certificates]]\nid = \"c\"\nprivate_key_file = \"/b\"",
                "gateway.webhooks[0].certificates[1].id",
            ),
            (
                "[[gateway.webhooks]]\nname = \"t\"\nplatform = \"teams\"\ntenant = \"acme\"\nsecrets = [\"s\"]\njwks_file = \"/k\"\n[[gateway.webhooks.certificates]]\nid = \"c\"\nprivate_key_file = \"/a\"",
                "gateway.webhooks[0].app_id",
            ),
            (
                "[[gateway.webhooks]]\nname = \"s\"\nplatform = \"slack\"\ntenant = \"acme\"\nsecrets = [\"s\"]\napp_id = \"a\"",
                "gateway.webhooks[0].app_id: is only for platform teams",
            ),
            (
                "[[gateway.webhooks]]\nname = \"t\"\nplatform = \"teams\"\ntenant = \"acme\"\nsecrets = [\"s\"]\ncertificate = []",
                "unknown field `certificate`",
            ),
        ];
        for (text, expected) in cases {
            let error = Config::from_toml_and_env(text, &HashMap::new()).expect_err(expected);
            assert!(
                error.message().contains(expected),
                "{expected}: {}",
                error.message()
            );
        }
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../../config/chatvault.example.toml");
        let config = Config::from_toml_and_env(text, &HashMap::new()).expect("example is valid");
        assert_eq!(config.tenants[0].tokens.len(), 2);
        // The example's token_file is not mounted here; the error names the token and the file.
        let error = config.authenticator().expect_err("file missing");
        assert!(error.message().contains("acme-legal") && error.message().contains("token_file"));
    }

    /// Every leaf setting of `table` as `(dotted path, value)`; arrays of tables (tenants, webhooks) left out.
    fn leaf_settings(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, toml::Value>) {
        for (key, value) in table {
            let path = format!("{prefix}{key}");
            match value {
                toml::Value::Table(inner) => leaf_settings(inner, &format!("{path}."), out),
                toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {}
                toml::Value::Array(items) if items.is_empty() => {}
                other => {
                    out.insert(path, other.clone());
                }
            }
        }
    }

    /// The defaults have one source, the `Default` impls. The example file, which documents every setting
    /// with its default, must state exactly those values.
    #[test]
    fn the_example_file_states_the_defaults() {
        let example: toml::Table =
            toml::from_str(include_str!("../../config/chatvault.example.toml")).expect("TOML");
        let defaults = toml::Table::try_from(Config::default()).expect("serializable");
        let (mut stated, mut default) = (BTreeMap::new(), BTreeMap::new());
        leaf_settings(&example, "", &mut stated);
        leaf_settings(&defaults, "", &mut default);
        let mut differences = Vec::new();
        for (path, value) in &default {
            match stated.get(path) {
                Some(stated) if stated == value => {}
                Some(stated) => {
                    differences.push(format!("{path}: example {stated:?}, default {value:?}"))
                }
                None => differences.push(format!(
                    "{path}: default {value:?}, missing from the example"
                )),
            }
        }
        for path in stated.keys().filter(|path| !default.contains_key(*path)) {
            differences.push(format!("{path}: in the example, not a default"));
        }
        assert!(differences.is_empty(), "{differences:#?}");
    }

    /// The chart needs some defaults itself (to check that a pod's grace period covers its role's shutdown);
    /// it must use the binary's.
    #[test]
    fn the_chart_assumes_the_binary_defaults() {
        let helpers = include_str!("../../helm/chatvault/templates/_helpers.tpl");
        let defaults = Config::default();
        let millis = |section: &str, name: &str| -> u128 {
            let table = toml::Table::try_from(&defaults).expect("serializable");
            let text = table[section][name]
                .as_str()
                .expect("a duration")
                .to_string();
            crate::duration::parse(&text).expect("parses").as_millis()
        };
        let pattern = "include \"chatvault.durationMillis\" (list $v.config.";
        let mut checked = 0;
        for (at, _) in helpers.match_indices(pattern) {
            let rest = &helpers[at + pattern.len()..];
            let call = &rest[..rest.find(')').expect("closed")];
            let parts: Vec<&str> = call.split_whitespace().collect();
            let [section, name, assumed] = parts[..] else {
                panic!("unexpected call {call:?}");
            };
            let name = name.trim_matches('"');
            let assumed: u128 = assumed.parse().expect("millis");
            assert_eq!(
                assumed,
                millis(section, name),
                "{section}.{name} in _helpers.tpl"
            );
            checked += 1;
        }
        assert_eq!(
            checked, 5,
            "the grace-period checks of gateway, restorer and archiver"
        );
        let sequence = millis("gateway", "shutdown_delay")
            + millis("gateway", "drain_timeout")
            + millis("archiver", "shutdown_timeout")
            + millis("archiver", "session_timeout")
            + millis("restorer", "drain_timeout");
        assert!(
            helpers.contains(&format!(
                "\"preStopSleepSeconds\" 0) {sequence} \"the gateway's, archiver's and restorer's default"
            )),
            "the standalone grace check assumes {sequence} ms of shutdown deadlines in sequence"
        );
    }

    #[test]
    fn commented_teams_example_is_valid() {
        let text = include_str!("../../config/chatvault.example.toml");
        let start = text.find("# [[gateway.webhooks]]").expect("Teams example");
        let block: String = text[start..]
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| format!("{}\n", line.trim_start_matches('#').trim_start()))
            .collect();
        let config = Config::from_toml_and_env(&format!("{text}\n{block}"), &HashMap::new())
            .expect("Teams example is valid");
        let teams = &config.gateway.webhooks[1];
        assert_eq!(teams.platform, Some(WebhookPlatform::Teams));
        assert_eq!(teams.certificates[0].id, "cert-2026");
    }
}
