//! Slack Events API.
//!
//! Verification: `X-Slack-Signature: v0=<hex HMAC-SHA256(signing secret, "v0:" + timestamp + ":" + raw body)>`,
//! checked in constant time against every configured signing secret, and `X-Slack-Request-Timestamp` within the
//! replay window (5 minutes by default). Handshake: `url_verification` echoes the challenge. Events:
//! messages and their subtypes (edits `message_changed`, deletions `message_deleted`, thread replies, file
//! shares, bot messages), reactions added and removed, members joining and leaving, channel created, renamed
//! and archived; `app_rate_limited` is archived as a capture gap. Other event types are acknowledged and not
//! archived, so Slack does not disable the endpoint. Slack's `event_id` is the delivery id (retries repeat it).

use chatvault_core::error::{Error, Result};
use chatvault_core::time::{MICROS_PER_SECOND, parse_slack_ts};
use chatvault_proto::v1::{Attachment, ChatEvent, EventKind, Sender, Source};
use ring::hmac;
use serde_json::{Value, json};

use super::{
    Accepted, PlatformHandler, WebhookRequest, WebhookResponse, check_signed_timestamp, header,
    slack_style_mentions,
};
use crate::error::IngestError;

pub struct Slack {
    keys: Vec<hmac::Key>,
}

impl Slack {
    pub fn new(signing_secrets: Vec<String>) -> Result<Slack> {
        if signing_secrets.iter().any(String::is_empty) {
            return Err(Error::invalid_argument("a Slack signing secret is empty"));
        }
        Ok(Slack {
            keys: signing_secrets
                .iter()
                .map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()))
                .collect(),
        })
    }

    fn verify(&self, request: &WebhookRequest<'_>) -> Result<(), IngestError> {
        let timestamp = header(request.headers, "x-slack-request-timestamp").ok_or_else(|| {
            IngestError::unauthenticated("signature", "missing X-Slack-Request-Timestamp")
        })?;
        check_signed_timestamp(request, "X-Slack-Request-Timestamp", timestamp)?;
        let signature = header(request.headers, "x-slack-signature")
            .and_then(|value| value.strip_prefix("v0="))
            .and_then(|hex_signature| hex::decode(hex_signature).ok())
            .ok_or_else(|| {
                IngestError::unauthenticated("signature", "missing or malformed X-Slack-Signature")
            })?;
        let mut signed = Vec::with_capacity(request.body.len() + timestamp.len() + 4);
        signed.extend_from_slice(b"v0:");
        signed.extend_from_slice(timestamp.as_bytes());
        signed.push(b':');
        signed.extend_from_slice(request.body);
        // ring's verify compares in constant time.
        if self
            .keys
            .iter()
            .any(|key| hmac::verify(key, &signed, &signature).is_ok())
        {
            Ok(())
        } else {
            Err(IngestError::unauthenticated(
                "signature",
                "X-Slack-Signature does not match",
            ))
        }
    }
}

impl PlatformHandler for Slack {
    fn handle(&self, tenant: &str, request: &WebhookRequest<'_>) -> Result<Accepted, IngestError> {
        self.verify(request)?;
        let envelope: Value = serde_json::from_slice(request.body)
            .map_err(|error| IngestError::malformed(format!("body is not JSON: {error}")))?;
        let kind = envelope["type"].as_str().unwrap_or_default();
        match kind {
            "url_verification" => {
                let challenge = envelope["challenge"].as_str().ok_or_else(|| {
                    IngestError::malformed("url_verification without a challenge")
                })?;
                Ok(Accepted {
                    events: vec![],
                    delivery_id: None,
                    response: WebhookResponse::json(&json!({ "challenge": challenge })),
                })
            }
            "event_callback" => {
                let delivery_id = envelope["event_id"].as_str().map(str::to_string);
                let events = normalize_event(tenant, &envelope, request.body)?;
                Ok(Accepted {
                    events,
                    delivery_id,
                    response: WebhookResponse::empty(200),
                })
            }
            "app_rate_limited" => {
                // Slack dropped events for this workspace: archive the gap so it is visible and can be back-filled.
                let team = envelope["team_id"].as_str().unwrap_or_default();
                let minute = envelope["minute_rate_limited"]
                    .as_i64()
                    .unwrap_or(request.now_secs);
                let occurred_at_micros =
                    minute.checked_mul(MICROS_PER_SECOND).ok_or_else(|| {
                        IngestError::malformed("minute_rate_limited is not a plausible time")
                    })?;
                let gap = ChatEvent {
                    tenant_id: tenant.to_string(),
                    source: Source::Slack as i32,
                    workspace_id: team.to_string(),
                    conversation_id: format!("workspace:{team}"),
                    kind: EventKind::CaptureGap as i32,
                    occurred_at_micros,
                    text: "Slack rate-limited event deliveries (app_rate_limited); events of this minute may be missing".into(),
                    raw_payload: request.body.to_vec(),
                    raw_content_type: "application/json".into(),
                    ..Default::default()
                };
                Ok(Accepted {
                    events: vec![gap],
                    delivery_id: None,
                    response: WebhookResponse::empty(200),
                })
            }
            "" => Err(IngestError::malformed("body has no type field")),
            _ => Ok(Accepted {
                events: vec![],
                delivery_id: None,
                response: WebhookResponse::empty(200),
            }),
        }
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// A Slack timestamp (`"1700000000.000100"`, or a number) in microseconds; `what` names it in the error.
pub fn slack_time(value: &Value, what: &str) -> Result<i64, IngestError> {
    let raw = match value {
        Value::String(ts) => ts.clone(),
        Value::Number(number) => number.to_string(),
        _ => return Err(IngestError::malformed(format!("{what} is missing"))),
    };
    parse_slack_ts(&raw)
        .ok_or_else(|| IngestError::malformed(format!("{what} is not a Slack timestamp")))
}

/// The sender named by a user (or bot) id; `None` when there is none.
pub fn sender(user: &Value, bot: bool) -> Option<Sender> {
    let id = user.as_str()?;
    Some(Sender {
        id: id.to_string(),
        display_name: String::new(),
        is_bot: bot,
    })
}

/// A message's `files` as attachment metadata (Slack serves the content only with a token).
pub fn attachments(files: &Value) -> Vec<Attachment> {
    files
        .as_array()
        .map(|files| {
            files
                .iter()
                .map(|file| Attachment {
                    id: text(&file["id"]),
                    name: text(&file["name"]),
                    mime_type: text(&file["mimetype"]),
                    size_bytes: file["size"].as_u64().unwrap_or(0),
                    sha256: String::new(),
                    url: text(&file["url_private"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A thread reply carries `thread_ts` different from its own `ts`; a root carries none (or its own).
pub fn thread_of(message: &Value) -> String {
    let ts = message["ts"].as_str().unwrap_or_default();
    match message["thread_ts"].as_str() {
        Some(thread) if thread != ts => thread.to_string(),
        _ => String::new(),
    }
}

/// Normalizes the inner `event` of an `event_callback` envelope. Unsupported types yield no event.
pub fn normalize_event(
    tenant: &str,
    envelope: &Value,
    raw: &[u8],
) -> Result<Vec<ChatEvent>, IngestError> {
    let event = &envelope["event"];
    if !event.is_object() {
        return Err(IngestError::malformed(
            "event_callback without an event object",
        ));
    }
    let base = ChatEvent {
        tenant_id: tenant.to_string(),
        source: Source::Slack as i32,
        workspace_id: text(&envelope["team_id"]),
        raw_payload: raw.to_vec(),
        raw_content_type: "application/json".into(),
        ..Default::default()
    };
    let event_type = event["type"].as_str().unwrap_or_default();
    let normalized = match event_type {
        "message" => {
            let subtype = event["subtype"].as_str();
            let channel = text(&event["channel"]);
            match subtype {
                None | Some("thread_broadcast" | "file_share" | "bot_message" | "me_message") => {
                    Some(created_message(base, channel, event)?)
                }
                Some("message_changed") => {
                    let message = &event["message"];
                    let edited_at = match &message["edited"]["ts"] {
                        Value::Null => slack_time(&event["ts"], "event.ts")?,
                        ts => slack_time(ts, "event.message.edited.ts")?,
                    };
                    Some(edited_message(base, channel, message, edited_at))
                }
                Some("message_deleted") => Some(ChatEvent {
                    kind: EventKind::MessageDeleted as i32,
                    conversation_id: channel,
                    message_id: text(&event["deleted_ts"]),
                    thread_id: thread_of(&event["previous_message"]),
                    sender: sender(&event["previous_message"]["user"], false),
                    occurred_at_micros: slack_time(&event["ts"], "event.ts")?,
                    ..base
                }),
                // channel_join/channel_leave duplicate member_joined_channel/member_left_channel; topic and
                // purpose changes are not archived yet.
                Some(_) => None,
            }
        }
        "reaction_added" | "reaction_removed" => {
            let item = &event["item"];
            if item["type"].as_str() != Some("message") {
                None
            } else {
                Some(ChatEvent {
                    kind: if event_type == "reaction_added" {
                        EventKind::ReactionAdded as i32
                    } else {
                        EventKind::ReactionRemoved as i32
                    },
                    conversation_id: text(&item["channel"]),
                    message_id: text(&item["ts"]),
                    sender: sender(&event["user"], false),
                    reaction: text(&event["reaction"]),
                    occurred_at_micros: slack_time(&event["event_ts"], "event.event_ts")?,
                    ..base
                })
            }
        }
        "member_joined_channel" | "member_left_channel" => Some(ChatEvent {
            kind: if event_type == "member_joined_channel" {
                EventKind::MemberJoined as i32
            } else {
                EventKind::MemberLeft as i32
            },
            conversation_id: text(&event["channel"]),
            sender: sender(&event["user"], false),
            occurred_at_micros: event_time(event, envelope)?,
            ..base
        }),
        "channel_created" | "channel_rename" => {
            let channel = &event["channel"];
            Some(ChatEvent {
                kind: if event_type == "channel_created" {
                    EventKind::ConversationCreated as i32
                } else {
                    EventKind::ConversationRenamed as i32
                },
                conversation_id: text(&channel["id"]),
                sender: sender(&channel["creator"], false),
                text: text(&channel["name"]),
                occurred_at_micros: event_time(event, envelope)?,
                ..base
            })
        }
        "channel_archive" => Some(ChatEvent {
            kind: EventKind::ConversationArchived as i32,
            conversation_id: text(&event["channel"]),
            sender: sender(&event["user"], false),
            occurred_at_micros: event_time(event, envelope)?,
            ..base
        }),
        _ => None,
    };
    Ok(normalized.into_iter().collect())
}

/// A message as posted: the `event` of a `message` callback without a subtype (or a thread broadcast, file
/// share, bot or `/me` message), and equally a message of a Slack export's day file. Both paths must map a
/// message to the same identity (channel, `ts`, sender), so the same message captured live and imported
/// collapses to one archived event; `base` carries tenant, source, workspace and the raw payload.
pub fn created_message(
    base: ChatEvent,
    channel: String,
    message: &Value,
) -> Result<ChatEvent, IngestError> {
    let body = text(&message["text"]);
    let is_bot =
        message["subtype"].as_str() == Some("bot_message") || message["bot_id"].is_string();
    let user = if message["user"].is_string() {
        &message["user"]
    } else {
        &message["bot_id"]
    };
    Ok(ChatEvent {
        kind: EventKind::MessageCreated as i32,
        conversation_id: channel,
        message_id: text(&message["ts"]),
        thread_id: thread_of(message),
        sender: sender(user, is_bot),
        occurred_at_micros: slack_time(&message["ts"], "ts")?,
        mentions: slack_style_mentions(&body),
        text: body,
        attachments: attachments(&message["files"]),
        ..base
    })
}

/// The edit of `message` (its state after the edit) at `edited_at`: the `message` of a `message_changed`
/// callback, or an exported message carrying `edited`. Same identity rules as [`created_message`].
pub fn edited_message(
    base: ChatEvent,
    channel: String,
    message: &Value,
    edited_at: i64,
) -> ChatEvent {
    let body = text(&message["text"]);
    ChatEvent {
        kind: EventKind::MessageEdited as i32,
        conversation_id: channel,
        message_id: text(&message["ts"]),
        thread_id: thread_of(message),
        sender: sender(&message["user"], message["bot_id"].is_string()),
        occurred_at_micros: edited_at,
        mentions: slack_style_mentions(&body),
        text: body,
        attachments: attachments(&message["files"]),
        ..base
    }
}

/// `event.event_ts` when present, else the envelope's `event_time` (seconds).
fn event_time(event: &Value, envelope: &Value) -> Result<i64, IngestError> {
    if !event["event_ts"].is_null() {
        return slack_time(&event["event_ts"], "event.event_ts");
    }
    let seconds = envelope["event_time"].as_i64().ok_or_else(|| {
        IngestError::malformed("neither event.event_ts nor event_time is present")
    })?;
    seconds
        .checked_mul(MICROS_PER_SECOND)
        .ok_or_else(|| IngestError::malformed("event_time is not a plausible time"))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{NOW, extreme_timestamps, headers, outcome, request};
    use super::*;

    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

    fn signed(timestamp: &str, body: &str) -> http::HeaderMap {
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
        let tag = hmac::sign(&key, format!("v0:{timestamp}:{body}").as_bytes());
        headers(&[
            ("x-slack-request-timestamp", timestamp.to_string()),
            (
                "x-slack-signature",
                format!("v0={}", hex::encode(tag.as_ref())),
            ),
        ])
    }

    #[test]
    fn extreme_timestamps_are_stale_not_overflows() {
        let slack = Slack::new(vec![SECRET.into()]).expect("slack");
        let body = r#"{"type":"event_callback","team_id":"T1","event_id":"Ev1","event_time":9223372036854775807,
            "event":{"type":"member_joined_channel","user":"U1","channel":"C1"}}"#;
        for timestamp in extreme_timestamps() {
            let headers = signed(&timestamp, body);
            assert_eq!(
                outcome(slack.handle("acme", &request(&headers, body.as_bytes()))),
                "stale_timestamp",
                "{timestamp}"
            );
        }
        let headers = signed("99999999999999999999", body);
        assert_eq!(
            outcome(slack.handle("acme", &request(&headers, body.as_bytes()))),
            "signature"
        );
        // Fresh and signed: event_time (seconds) too large for microseconds is a 400, not an overflow.
        let headers = signed(&NOW.to_string(), body);
        let result = outcome(slack.handle("acme", &request(&headers, body.as_bytes())));
        assert!(result.contains("event_time"), "{result}");
    }
}
