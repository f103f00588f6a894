//! Rules of the canonical `ChatEvent`: validation at ingest, the stable event id, the Kafka key and the names
//! under which kinds and sources appear in the archive.

use chatvault_proto::v1::{ChatEvent, EventKind, Source};
use prost::Message;
use ring::digest;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::time::{MICROS_PER_DAY, now_micros};

/// Size limits applied to every ingested event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventLimits {
    /// Largest accepted `text`, in bytes. Default 64 KiB.
    pub max_text_bytes: usize,
    /// Largest accepted `raw_payload`, in bytes. Default 256 KiB.
    pub max_raw_payload_bytes: usize,
    /// Largest accepted encoded event, in bytes. Default 512 KiB; keep it below the topic's
    /// `max.message.bytes` (1 MiB by default).
    pub max_event_bytes: usize,
    /// Most attachments and most mentions per event. Default 100 each.
    pub max_list_items: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_text_bytes: 64 * 1024,
            max_raw_payload_bytes: 256 * 1024,
            max_event_bytes: 512 * 1024,
            max_list_items: 100,
        }
    }
}

const MAX_ID_BYTES: usize = 256;
const MAX_TENANT_BYTES: usize = 64;
/// Events more than this far in the future are rejected: they would land in a wrong date partition.
const MAX_CLOCK_SKEW_MICROS: i64 = MICROS_PER_DAY;

/// Whether `tenant` is a valid tenant id: 1 to 64 characters of `a-z`, `0-9`, `-` and `_`, starting with a
/// letter or digit. Tenant ids become object-store path segments (`tenant=<id>`), so the alphabet is strict.
pub fn is_valid_tenant_id(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_BYTES
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && tenant.as_bytes()[0].is_ascii_alphanumeric()
}

/// INVALID_ARGUMENT naming `field` unless `tenant` is a valid tenant id ([`is_valid_tenant_id`]).
pub fn check_tenant(field: &str, tenant: &str) -> Result<()> {
    if tenant.is_empty() {
        return Err(Error::invalid_argument(format!("{field} is required")));
    }
    if !is_valid_tenant_id(tenant) {
        return Err(Error::invalid_argument(format!(
            "{field} must be 1 to 64 characters of a-z, 0-9, '-' and '_' starting with a letter or digit"
        )));
    }
    Ok(())
}

fn check_id(field: &str, value: &str, required: bool) -> Result<()> {
    if value.is_empty() {
        if required {
            return Err(Error::invalid_argument(format!("{field} is required")));
        }
        return Ok(());
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::invalid_argument(format!(
            "{field} is {} bytes, longer than the limit of {MAX_ID_BYTES}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid_argument(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// Validates an event as received from a sender and completes it: the source defaults to `default_source`,
/// `received_at_micros` is set to now, and a missing `event_id` is derived. Returns the encoded size.
///
/// Every error is INVALID_ARGUMENT and names the field at fault.
pub fn validate_and_complete(
    event: &mut ChatEvent,
    default_source: Source,
    limits: &EventLimits,
) -> Result<usize> {
    check_tenant("tenant_id", &event.tenant_id)?;
    check_id("conversation_id", &event.conversation_id, true)?;
    check_id("workspace_id", &event.workspace_id, false)?;
    check_id("thread_id", &event.thread_id, false)?;
    let kind = EventKind::try_from(event.kind)
        .ok()
        .filter(|kind| *kind != EventKind::Unspecified)
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "kind {} is not a known event kind (see chatvault.v1.EventKind)",
                event.kind
            ))
        })?;
    if Source::try_from(event.source).is_err() {
        return Err(Error::invalid_argument(format!(
            "source {} is not a known source (see chatvault.v1.Source)",
            event.source
        )));
    }
    if event.source == Source::Unspecified as i32 {
        event.source = default_source as i32;
    }
    check_id("message_id", &event.message_id, is_about_a_message(kind))?;
    let sender_id = event.sender.as_ref().map(|s| s.id.as_str()).unwrap_or("");
    let sender_required = matches!(
        kind,
        EventKind::MessageCreated
            | EventKind::ReactionAdded
            | EventKind::ReactionRemoved
            | EventKind::MemberJoined
            | EventKind::MemberLeft
    );
    check_id("sender.id", sender_id, sender_required)?;
    if matches!(kind, EventKind::ReactionAdded | EventKind::ReactionRemoved) {
        check_id("reaction", &event.reaction, true)?;
    }
    if event.occurred_at_micros <= 0 {
        return Err(Error::invalid_argument(
            "occurred_at_micros is required (microseconds since the Unix epoch, > 0)",
        ));
    }
    let now = now_micros();
    if event.occurred_at_micros > now + MAX_CLOCK_SKEW_MICROS {
        return Err(Error::invalid_argument(
            "occurred_at_micros is more than a day in the future",
        ));
    }
    if event.text.len() > limits.max_text_bytes {
        return Err(Error::invalid_argument(format!(
            "text is {} bytes, over the limit of {}",
            event.text.len(),
            limits.max_text_bytes
        )));
    }
    if event.raw_payload.len() > limits.max_raw_payload_bytes {
        return Err(Error::invalid_argument(format!(
            "raw_payload is {} bytes, over the limit of {}",
            event.raw_payload.len(),
            limits.max_raw_payload_bytes
        )));
    }
    if event.attachments.len() > limits.max_list_items {
        return Err(Error::invalid_argument(format!(
            "attachments has {} items, over the limit of {}",
            event.attachments.len(),
            limits.max_list_items
        )));
    }
    if event.mentions.len() > limits.max_list_items {
        return Err(Error::invalid_argument(format!(
            "mentions has {} items, over the limit of {}",
            event.mentions.len(),
            limits.max_list_items
        )));
    }
    for (index, attachment) in event.attachments.iter().enumerate() {
        if !attachment.sha256.is_empty()
            && (attachment.sha256.len() != 64
                || !attachment
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(Error::invalid_argument(format!(
                "attachments[{index}].sha256 must be 64 lower-case hex characters"
            )));
        }
    }
    if event
        .sender
        .as_ref()
        .is_some_and(|sender| *sender == Default::default())
    {
        // An all-empty sender is stored as no sender; normalize so round trips compare equal.
        event.sender = None;
    }
    check_id("event_id", &event.event_id, false)?;
    if event.event_id.is_empty() {
        event.event_id = derive_event_id(event);
    }
    event.received_at_micros = now;
    let encoded_len = event.encoded_len();
    if encoded_len > limits.max_event_bytes {
        return Err(Error::invalid_argument(format!(
            "event is {encoded_len} bytes encoded, over the limit of {}",
            limits.max_event_bytes
        )));
    }
    Ok(encoded_len)
}

/// Whether events of `kind` concern one message (and so carry a `message_id`): created, edited, deleted,
/// reactions.
pub fn is_about_a_message(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::MessageCreated
            | EventKind::MessageEdited
            | EventKind::MessageDeleted
            | EventKind::ReactionAdded
            | EventKind::ReactionRemoved
    )
}

/// The stable id of an event that arrived without one: `cv1-` and 32 hex characters of a SHA-256 over the
/// source identity of the event. Every field is length-prefixed so that no two different identities hash the
/// same input. The receive time and the payload are deliberately not part of it: a retry differs in those.
pub fn derive_event_id(event: &ChatEvent) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    let sender_id = event.sender.as_ref().map(|s| s.id.as_str()).unwrap_or("");
    let occurred = event.occurred_at_micros.to_string();
    let source = event.source.to_string();
    let kind = event.kind.to_string();
    for part in [
        event.tenant_id.as_str(),
        source.as_str(),
        event.workspace_id.as_str(),
        event.conversation_id.as_str(),
        event.message_id.as_str(),
        kind.as_str(),
        occurred.as_str(),
        event.reaction.as_str(),
        sender_id,
    ] {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part.as_bytes());
    }
    let digest = context.finish();
    format!("cv1-{}", hex::encode(&digest.as_ref()[..16]))
}

/// The Kafka record key: `<tenant>/<conversation>`. Tenant ids cannot contain `/`, so the key is unambiguous;
/// keying by conversation keeps each conversation's events in order on one partition.
pub fn kafka_key(tenant_id: &str, conversation_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant_id.len() + 1 + conversation_id.len());
    key.extend_from_slice(tenant_id.as_bytes());
    key.push(b'/');
    key.extend_from_slice(conversation_id.as_bytes());
    key
}

/// Archive name of an event kind (`message_created`, ...).
pub fn kind_name(kind: i32) -> &'static str {
    match EventKind::try_from(kind).unwrap_or(EventKind::Unspecified) {
        EventKind::Unspecified => "unspecified",
        EventKind::MessageCreated => "message_created",
        EventKind::MessageEdited => "message_edited",
        EventKind::MessageDeleted => "message_deleted",
        EventKind::ReactionAdded => "reaction_added",
        EventKind::ReactionRemoved => "reaction_removed",
        EventKind::MemberJoined => "member_joined",
        EventKind::MemberLeft => "member_left",
        EventKind::ConversationCreated => "conversation_created",
        EventKind::ConversationRenamed => "conversation_renamed",
        EventKind::ConversationArchived => "conversation_archived",
        EventKind::CaptureGap => "capture_gap",
    }
}

/// Inverse of [`kind_name`].
pub fn kind_from_name(name: &str) -> Option<EventKind> {
    (1..=11)
        .filter_map(|value| EventKind::try_from(value).ok())
        .find(|kind| kind_name(*kind as i32) == name)
}

/// Archive name of a source (`grpc`, `slack`, ...).
pub fn source_name(source: i32) -> &'static str {
    match Source::try_from(source).unwrap_or(Source::Unspecified) {
        Source::Unspecified => "unspecified",
        Source::Grpc => "grpc",
        Source::Slack => "slack",
        Source::Teams => "teams",
        Source::Mattermost => "mattermost",
        Source::Discord => "discord",
        Source::StandardWebhooks => "standard_webhooks",
    }
}

/// Inverse of [`source_name`].
pub fn source_from_name(name: &str) -> Option<Source> {
    (0..=6)
        .filter_map(|value| Source::try_from(value).ok())
        .find(|source| source_name(*source as i32) == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatvault_proto::v1::Sender;

    fn message() -> ChatEvent {
        ChatEvent {
            tenant_id: "acme".into(),
            conversation_id: "C1".into(),
            message_id: "m1".into(),
            kind: EventKind::MessageCreated as i32,
            sender: Some(Sender {
                id: "U1".into(),
                ..Default::default()
            }),
            occurred_at_micros: 1_700_000_000_000_000,
            text: "hello".into(),
            ..Default::default()
        }
    }

    #[test]
    fn completes_a_valid_event() {
        let mut event = message();
        validate_and_complete(&mut event, Source::Grpc, &EventLimits::default()).expect("valid");
        assert_eq!(event.source, Source::Grpc as i32);
        assert!(event.event_id.starts_with("cv1-") && event.event_id.len() == 36);
        assert!(event.received_at_micros > 0);
    }

    #[test]
    fn derived_id_is_stable_across_retries_and_distinct_across_identities() {
        let first = message();
        let mut retry = message();
        retry.received_at_micros = 42;
        retry.raw_payload = b"different envelope".to_vec();
        assert_eq!(derive_event_id(&first), derive_event_id(&retry));
        let mut edit = message();
        edit.kind = EventKind::MessageEdited as i32;
        assert_ne!(derive_event_id(&first), derive_event_id(&edit));
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        let mut shifted = message();
        shifted.conversation_id = "C".into();
        shifted.message_id = "1m1".into();
        assert_ne!(derive_event_id(&first), derive_event_id(&shifted));
    }

    #[test]
    fn errors_name_the_field() {
        let limits = EventLimits::default();
        type Mutation = Box<dyn Fn(&mut ChatEvent)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("tenant_id is required", Box::new(|e| e.tenant_id.clear())),
            (
                "tenant_id must be",
                Box::new(|e| e.tenant_id = "Acme Corp".into()),
            ),
            (
                "conversation_id is required",
                Box::new(|e| e.conversation_id.clear()),
            ),
            ("message_id is required", Box::new(|e| e.message_id.clear())),
            ("kind 0 is not a known", Box::new(|e| e.kind = 0)),
            ("kind 99 is not a known", Box::new(|e| e.kind = 99)),
            ("source 42 is not a known", Box::new(|e| e.source = 42)),
            ("sender.id is required", Box::new(|e| e.sender = None)),
            (
                "occurred_at_micros is required",
                Box::new(|e| e.occurred_at_micros = 0),
            ),
            ("text is", Box::new(|e| e.text = "x".repeat(64 * 1024 + 1))),
            (
                "raw_payload is",
                Box::new(|e| e.raw_payload = vec![0; 256 * 1024 + 1]),
            ),
        ];
        for (expected, mutate) in cases {
            let mut event = message();
            mutate(&mut event);
            let error =
                validate_and_complete(&mut event, Source::Grpc, &limits).expect_err(expected);
            assert_eq!(error.code(), crate::ErrorCode::InvalidArgument);
            assert!(
                error.message().starts_with(expected),
                "{expected}: got {}",
                error.message()
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for value in 1..=11 {
            assert_eq!(
                kind_from_name(kind_name(value)).map(|k| k as i32),
                Some(value)
            );
        }
        for value in 0..=6 {
            assert_eq!(
                source_from_name(source_name(value)).map(|s| s as i32),
                Some(value)
            );
        }
    }
}
