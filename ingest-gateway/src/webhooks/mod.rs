//! Webhook ingest: one endpoint per configured integration, `POST /webhooks/<name>`.
//!
//! Each platform module verifies the request the platform's way (signature, replay window, shared token),
//! answers its handshakes, and normalizes the payload into `ChatEvent`s; [`server`] produces them through the
//! same Kafka producer and acknowledgement rule as gRPC (2xx only after Kafka acknowledged every event) and maps
//! failures to statuses the platforms retry on.
//!
//! Status contract: 401 failed verification (signature, token, stale timestamp), 400 malformed body (the
//! message names the problem), 413 body over `gateway.max_webhook_body_bytes`, 404 unknown integration,
//! 408 body not received within `gateway.http_body_read_timeout`, 503 with `Retry-After` when Kafka cannot
//! take the events (or the listener is at `gateway.max_http_connections`). Nothing is produced for a rejected
//! request. The signed body is kept as evidence once per delivery: each event holds its own item's bytes, and
//! one event the rest of the body ([`evidence`]).

pub mod discord;
pub mod evidence;
pub mod mattermost;
pub mod server;
pub mod slack;
pub mod standard;
pub mod teams;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{WebhookConfig, WebhookPlatform};
use chatvault_core::error::{Error, Result};

use crate::error::IngestError;
use chatvault_core::metrics::{metrics, rejection_labels, source_label};
use chatvault_proto::v1::ChatEvent;
use http::HeaderMap;

/// What a platform handler sees of a request.
pub struct WebhookRequest<'a> {
    pub headers: &'a HeaderMap,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
    /// The raw body, exactly as received (signatures are over these bytes).
    pub body: &'a [u8],
    /// Seconds since the epoch, now.
    pub now_secs: i64,
    /// Tolerance for signed timestamps, seconds.
    pub replay_window_secs: i64,
}

/// A response to send once the events (if any) are acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookResponse {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
}

impl WebhookResponse {
    pub fn empty(status: u16) -> WebhookResponse {
        WebhookResponse {
            status,
            content_type: None,
            body: Vec::new(),
        }
    }

    pub fn json(value: &serde_json::Value) -> WebhookResponse {
        WebhookResponse {
            status: 200,
            content_type: Some("application/json"),
            body: value.to_string().into_bytes(),
        }
    }

    pub fn text(body: &str) -> WebhookResponse {
        WebhookResponse {
            status: 200,
            content_type: Some("text/plain; charset=utf-8"),
            body: body.as_bytes().to_vec(),
        }
    }
}

/// What a verified request asks for.
#[derive(Debug)]
pub struct Accepted {
    /// Events to produce before answering; empty for handshakes and ignored event types.
    pub events: Vec<ChatEvent>,
    /// The platform's own delivery id (Slack `event_id`, Standard Webhooks `webhook-id`), used to answer a
    /// redelivery without producing again.
    pub delivery_id: Option<String>,
    pub response: WebhookResponse,
}

/// A platform's verification and normalization.
pub trait PlatformHandler: Send + Sync {
    fn handle(&self, tenant: &str, request: &WebhookRequest<'_>) -> Result<Accepted, IngestError>;
}

/// Counters of one integration: accepted events, answered redeliveries and rejected requests by reason. Each
/// count also goes to the process metrics (`chatvault_core::metrics`), labelled with the platform.
#[derive(Debug)]
pub struct IntegrationStats {
    /// The platform, as the metrics' `source` label.
    source: &'static str,
    accepted_events: AtomicU64,
    pub duplicate_deliveries: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl IntegrationStats {
    pub fn new(source: &'static str) -> IntegrationStats {
        IntegrationStats {
            source,
            accepted_events: AtomicU64::new(0),
            duplicate_deliveries: AtomicU64::new(0),
            rejected: Mutex::default(),
        }
    }

    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut rejected) = self.rejected.lock() {
            *rejected.entry(reason).or_default() += 1;
        }
        metrics()
            .requests_rejected
            .add(1, &rejection_labels(self.source, reason));
    }

    pub fn accept(&self, events: usize) {
        self.accepted_events
            .fetch_add(events as u64, Ordering::Relaxed);
        metrics()
            .events_accepted
            .add(events as u64, &source_label(self.source));
    }

    pub fn redelivered(&self) {
        self.duplicate_deliveries.fetch_add(1, Ordering::Relaxed);
        metrics().redeliveries.add(1, &source_label(self.source));
    }

    /// Rejected requests by reason (`signature`, `stale_timestamp`, `token`, `malformed`, `too_large`,
    /// `timeout`, `invalid_event`, `kafka_unavailable`, `internal`; Teams adds `client_state`, `tenant`, `jwt`).
    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn accepted(&self) -> u64 {
        self.accepted_events.load(Ordering::Relaxed)
    }
}

/// Delivery ids acknowledged recently, bounded in count and age, so a platform's retry of an acknowledged
/// delivery is answered without producing again. A restart forgets them; the event ids derived from the
/// source identity still collapse such copies in the archive.
#[derive(Debug)]
pub struct RecentDeliveries {
    capacity: usize,
    ttl: Duration,
    state: Mutex<(HashMap<String, Instant>, VecDeque<String>)>,
}

impl RecentDeliveries {
    pub fn new(capacity: usize, ttl: Duration) -> RecentDeliveries {
        RecentDeliveries {
            capacity,
            ttl,
            state: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.state
            .lock()
            .map(|state| state.0.get(id).is_some_and(|at| at.elapsed() < self.ttl))
            .unwrap_or(false)
    }

    pub fn insert(&self, id: String) {
        if let Ok(mut state) = self.state.lock() {
            let (seen, order) = &mut *state;
            while order.len() >= self.capacity {
                if let Some(oldest) = order.pop_front() {
                    seen.remove(&oldest);
                }
            }
            if seen.insert(id.clone(), Instant::now()).is_none() {
                order.push_back(id);
            }
        }
    }
}

/// One configured endpoint.
pub struct Integration {
    pub name: String,
    pub tenant: String,
    pub platform: WebhookPlatform,
    pub handler: Box<dyn PlatformHandler>,
    pub stats: IntegrationStats,
    pub recent: RecentDeliveries,
}

impl std::fmt::Debug for Integration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets live in the handler and are never printed.
        f.debug_struct("Integration")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

impl Integration {
    /// Builds an integration from its configuration, reading and checking its secrets.
    pub fn from_config(config: &WebhookConfig) -> Result<Integration> {
        let platform = config.platform.ok_or_else(|| {
            Error::invalid_argument(format!("webhook {}: platform is required", config.name))
        })?;
        let secrets = config.resolve_secrets()?;
        let context = |error: Error| error.context(format!("webhook {}", config.name));
        let handler: Box<dyn PlatformHandler> = match platform {
            WebhookPlatform::Slack => Box::new(slack::Slack::new(secrets).map_err(context)?),
            WebhookPlatform::StandardWebhooks => {
                Box::new(standard::StandardWebhooks::new(&config.name, &secrets).map_err(context)?)
            }
            WebhookPlatform::Mattermost => {
                Box::new(mattermost::Mattermost::new(secrets).map_err(context)?)
            }
            WebhookPlatform::Discord => Box::new(discord::Discord::new(&secrets).map_err(context)?),
            WebhookPlatform::Teams => {
                Box::new(teams::Teams::new(config, secrets).map_err(context)?)
            }
        };
        Ok(Integration {
            name: config.name.clone(),
            tenant: config.tenant.clone(),
            platform,
            handler,
            stats: IntegrationStats::new(platform.as_str()),
            recent: {
                let defaults = crate::config::GatewayConfig::default();
                RecentDeliveries::new(
                    defaults.webhook_redelivery_cache_size,
                    defaults.webhook_redelivery_window,
                )
            },
        })
    }

    /// Remembers up to `capacity` delivery ids for `window` (`gateway.webhook_redelivery_cache_size` and
    /// `gateway.webhook_redelivery_window`) instead of the defaults.
    pub fn remembering(mut self, capacity: usize, window: Duration) -> Integration {
        self.recent = RecentDeliveries::new(capacity, window);
        self
    }
}

/// Whether a signed timestamp (`timestamp_secs`, attacker-chosen) lies within `window_secs` of `now_secs`.
/// Total for every input: the distance is computed without overflow (`i64::MAX`, `i64::MIN` and anything in
/// between are simply far away).
pub fn within_replay_window(now_secs: i64, timestamp_secs: i64, window_secs: i64) -> bool {
    now_secs.abs_diff(timestamp_secs) <= window_secs.max(0).unsigned_abs()
}

/// The replay check of a signed timestamp header: the integer seconds in `value`, within the window of
/// `request`. `name` names the header in the 401's message, which also says how the timestamp was wrong.
pub(crate) fn check_signed_timestamp(
    request: &WebhookRequest<'_>,
    name: &str,
    value: &str,
) -> Result<(), IngestError> {
    let seconds: i64 = value.trim().parse().map_err(|_| {
        IngestError::unauthenticated(
            "signature",
            format!("{name} is not an integer number of seconds"),
        )
    })?;
    if within_replay_window(request.now_secs, seconds, request.replay_window_secs) {
        Ok(())
    } else {
        Err(IngestError::unauthenticated(
            "stale_timestamp",
            format!(
                "{name} {seconds} is stale: outside the replay window of {} seconds around now ({})",
                request.replay_window_secs, request.now_secs
            ),
        ))
    }
}

/// A header as text, if present and valid.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// User ids mentioned in Slack-style text (`<@U123>` or `<@U123|name>`).
pub(crate) fn slack_style_mentions(text: &str) -> Vec<String> {
    let mut mentions = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<@") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('>') else { break };
        let id = after[..end].split('|').next().unwrap_or_default();
        if !id.is_empty() && !mentions.iter().any(|known: &String| known == id) {
            mentions.push(id.to_string());
        }
        rest = &after[end..];
    }
    mentions
}

/// Helpers for the platforms' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// "Now" in the unit tests.
    pub const NOW: i64 = 1_764_000_000;

    /// Signed timestamps an attacker may choose, none within 300 s of [`NOW`]: the extremes of i64 (where
    /// `now - timestamp` overflows), far past and future, and just outside the window.
    pub fn extreme_timestamps() -> Vec<String> {
        [
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
            i64::MAX - NOW,
            NOW.wrapping_add(i64::MIN),
            -NOW,
            0,
            NOW - 301,
            NOW + 301,
        ]
        .iter()
        .map(i64::to_string)
        .collect()
    }

    pub fn request<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> WebhookRequest<'a> {
        WebhookRequest {
            headers,
            query: None,
            body,
            now_secs: NOW,
            replay_window_secs: 300,
        }
    }

    pub fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().expect("header value"));
        }
        headers
    }

    /// The rejection reason, or `ok`.
    pub fn outcome(result: Result<Accepted, IngestError>) -> String {
        match result {
            Ok(_) => "ok".into(),
            Err(IngestError::Unauthenticated { reason, .. }) => reason.into(),
            Err(IngestError::Malformed(message)) => format!("malformed: {message}"),
            Err(other) => format!("{}: {other}", other.reason()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_deliveries_are_bounded() {
        let recent = RecentDeliveries::new(2, Duration::from_secs(60));
        recent.insert("a".into());
        recent.insert("b".into());
        recent.insert("c".into());
        assert!(!recent.contains("a") && recent.contains("b") && recent.contains("c"));
    }

    #[test]
    fn replay_window_is_total_for_extreme_timestamps() {
        let now = 1_764_000_000;
        assert!(within_replay_window(now, now - 300, 300));
        assert!(within_replay_window(now, now + 300, 300));
        assert!(!within_replay_window(now, now - 301, 300));
        for extreme in [i64::MAX, i64::MIN, i64::MIN + 1, -now, now + i64::MAX / 2] {
            assert!(!within_replay_window(now, extreme, 300), "{extreme}");
            assert!(!within_replay_window(extreme, now, 300), "{extreme}");
        }
        assert!(within_replay_window(i64::MIN, i64::MIN, 0));
        assert!(within_replay_window(i64::MAX, i64::MAX, i64::MAX));
        assert!(!within_replay_window(i64::MIN, i64::MAX, i64::MAX));
        assert!(
            within_replay_window(now, now, -1) && !within_replay_window(now, now + 1, -1),
            "a negative window accepts only now"
        );
    }

    #[test]
    fn mentions_are_extracted_once() {
        assert_eq!(
            slack_style_mentions("hi <@U1> and <@U2|bob>, <@U1>"),
            vec!["U1", "U2"]
        );
        assert!(slack_style_mentions("no <@ mention").is_empty());
    }
}
