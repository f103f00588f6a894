//! The gateway's section of the configuration file, `[gateway]` (the loader and the shared sections are in
//! `chatvault_core::config`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use chatvault_core::config::Section;
use chatvault_core::error::{Error, Result};
use chatvault_core::event::{EventLimits, is_valid_tenant_id};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC listen address. Default `0.0.0.0:50051`.
    pub grpc_listen: String,
    /// How long an event may wait for Kafka's acknowledgement before the sender gets UNAVAILABLE
    /// (librdkafka `message.timeout.ms`). Default `10s`.
    #[serde(with = "chatvault_core::duration")]
    pub delivery_timeout: Duration,
    /// Most events waiting in the producer queue (`queue.buffering.max.messages`); beyond it senders get
    /// RESOURCE_EXHAUSTED. Default 100000.
    pub max_queued_events: u64,
    /// Most events in one batch call. Default `10s`.
    pub max_batch_events: usize,
    /// At shutdown, how long the gateway keeps serving after it reported NOT_SERVING, so load balancers and
    /// health-checking clients stop sending before it stops accepting. Default `2s`.
    #[serde(with = "chatvault_core::duration")]
    pub shutdown_delay: Duration,
    /// Grace period for in-flight requests once the gateway stopped accepting at shutdown; calls still running
    /// after it are abandoned (their senders get no OK, so nothing acknowledged is lost). Default `20s`.
    #[serde(with = "chatvault_core::duration")]
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
    #[serde(with = "chatvault_core::duration")]
    pub grpc_keepalive_interval: Duration,
    /// A gRPC connection whose keep-alive PING is not answered within this long is closed. Default `10s`.
    #[serde(with = "chatvault_core::duration")]
    pub grpc_keepalive_timeout: Duration,
    /// Most open webhook (HTTP) connections; a connection beyond it is answered 503 with Retry-After and
    /// closed. Default 1024.
    pub max_http_connections: usize,
    /// How long a webhook client may take to send a request's headers (and how long an idle keep-alive
    /// connection stays open); a slower client is disconnected. Default `10s`.
    #[serde(with = "chatvault_core::duration")]
    pub http_header_read_timeout: Duration,
    /// How long a webhook client may take to send a request's body; a slower client gets 408 and is
    /// disconnected. Default `30s`.
    #[serde(with = "chatvault_core::duration")]
    pub http_body_read_timeout: Duration,
    /// Delivery ids (Slack `event_id`, Standard Webhooks `webhook-id`, ...) each webhook integration
    /// remembers, to answer a platform's redelivery without producing again; beyond it the oldest are
    /// forgotten (a forgotten redelivery is archived again, and readers collapse the copy). Default 100000.
    pub webhook_redelivery_cache_size: usize,
    /// How long a delivery id is remembered; longer than the platforms' retry schedules (Slack retries for
    /// about 6 minutes, Graph for up to 4 hours). Default `1h`.
    #[serde(with = "chatvault_core::duration")]
    pub webhook_redelivery_window: Duration,
    /// At shutdown, once both listeners are drained, how long the producer may take to deliver what is still
    /// queued. Every acknowledged event was delivered already; what remains belongs to calls that failed or
    /// were abandoned, whose senders retry. Default `5s`.
    #[serde(with = "chatvault_core::duration")]
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
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
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

/// Shows how many clear secrets there are, never the secrets.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("platform", &self.platform)
            .field("tenant", &self.tenant)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("secret_files", &self.secret_files)
            .field("certificates", &self.certificates)
            .field("app_id", &self.app_id)
            .field("jwks_file", &self.jwks_file)
            .field("tenant_ids", &self.tenant_ids)
            .finish()
    }
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

impl Section for GatewayConfig {
    const NAME: &'static str = "gateway";
    const MILLISECOND_SETTINGS: &'static [&'static str] = &[
        "delivery_timeout",
        "shutdown_delay",
        "drain_timeout",
        "grpc_keepalive_interval",
        "grpc_keepalive_timeout",
        "http_header_read_timeout",
        "http_body_read_timeout",
    ];

    fn validate(&self) -> Result<()> {
        let invalid = |setting: &str, message: &str| {
            Err(Error::invalid_argument(format!("{setting}: {message}")))
        };
        if self.delivery_timeout.is_zero() {
            return invalid("gateway.delivery_timeout", "must be positive");
        }
        if self.max_batch_events == 0 {
            return invalid("gateway.max_batch_events", "must be positive");
        }
        if self.limits.max_event_bytes < 1024 {
            return invalid("gateway.limits.max_event_bytes", "must be at least 1024");
        }
        let mut webhook_names = std::collections::HashSet::new();
        for (index, webhook) in self.webhooks.iter().enumerate() {
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
        if self.max_webhook_body_bytes < 1024 {
            return invalid("gateway.max_webhook_body_bytes", "must be at least 1024");
        }
        if self.max_grpc_message_bytes < self.limits.max_event_bytes {
            return invalid(
                "gateway.max_grpc_message_bytes",
                "must be at least gateway.limits.max_event_bytes (one event must fit a message)",
            );
        }
        for (setting, value) in [
            ("gateway.max_grpc_calls", self.max_grpc_calls as u64),
            (
                "gateway.grpc_max_concurrent_streams",
                u64::from(self.grpc_max_concurrent_streams),
            ),
            (
                "gateway.grpc_concurrency_limit_per_connection",
                self.grpc_concurrency_limit_per_connection as u64,
            ),
            (
                "gateway.grpc_keepalive_timeout",
                self.grpc_keepalive_timeout.as_millis() as u64,
            ),
            (
                "gateway.max_http_connections",
                self.max_http_connections as u64,
            ),
            (
                "gateway.http_header_read_timeout",
                self.http_header_read_timeout.as_millis() as u64,
            ),
            (
                "gateway.http_body_read_timeout",
                self.http_body_read_timeout.as_millis() as u64,
            ),
            (
                "gateway.webhook_redelivery_cache_size",
                self.webhook_redelivery_cache_size as u64,
            ),
            (
                "gateway.webhook_redelivery_window",
                self.webhook_redelivery_window.as_millis() as u64,
            ),
        ] {
            if value == 0 {
                return invalid(setting, "must be positive");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_a_webhook_shows_no_secret() {
        let webhook = WebhookConfig {
            name: "acme-slack".into(),
            tenant: "acme".into(),
            secrets: vec!["slack-signing-secret".into(), "previous-secret".into()],
            ..Default::default()
        };
        let printed = format!("{webhook:?}");
        assert!(!printed.contains("slack-signing-secret") && !printed.contains("previous-secret"));
        assert!(
            printed.contains("acme-slack") && printed.contains("[2 redacted]"),
            "{printed}"
        );
    }
}
