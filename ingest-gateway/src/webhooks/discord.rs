//! Discord: interactions and webhook events.
//!
//! Verification: Ed25519 over `X-Signature-Timestamp + raw body` with the application's public key (several
//! keys may be configured), and `X-Signature-Timestamp` (Unix seconds) within the replay window; any failure
//! is 401, as Discord requires (it sends bad signatures on purpose to check). Interactions: `PING` (type 1) is answered `{"type":1}`; interactions carrying a `message` are
//! archived and acknowledged without a visible reply. Webhook events (`{"type":1,"event":{...}}`): a `PING`
//! (type 0) is answered 204; message events (`MESSAGE_CREATE`, `LOBBY_MESSAGE_CREATE`, their `_UPDATE` and
//! `_DELETE`) are archived.

use chatvault_core::error::{Error, Result};
use chatvault_core::time::parse_rfc3339_micros;
use chatvault_proto::v1::{Attachment, ChatEvent, EventKind, Sender, Source};
use ring::signature::{ED25519, UnparsedPublicKey};
use serde_json::{Value, json};

use super::{
    Accepted, PlatformHandler, WebhookRequest, WebhookResponse, check_signed_timestamp, header,
};
use crate::error::IngestError;

pub struct Discord {
    public_keys: Vec<Vec<u8>>,
}

impl Discord {
    pub fn new(public_keys_hex: &[String]) -> Result<Discord> {
        let public_keys = public_keys_hex
            .iter()
            .map(|key| match hex::decode(key) {
                Ok(bytes) if bytes.len() == 32 => Ok(bytes),
                _ => Err(Error::invalid_argument(
                    "a Discord public key must be 64 hex characters",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Discord { public_keys })
    }

    fn verify(&self, request: &WebhookRequest<'_>) -> Result<(), IngestError> {
        let signature = header(request.headers, "x-signature-ed25519")
            .and_then(|value| hex::decode(value).ok())
            .ok_or_else(|| {
                IngestError::unauthenticated(
                    "signature",
                    "missing or malformed X-Signature-Ed25519",
                )
            })?;
        let timestamp = header(request.headers, "x-signature-timestamp").ok_or_else(|| {
            IngestError::unauthenticated("signature", "missing X-Signature-Timestamp")
        })?;
        // The timestamp is signed with the body: a captured request must not replay forever.
        check_signed_timestamp(request, "X-Signature-Timestamp", timestamp)?;
        let mut signed = Vec::with_capacity(timestamp.len() + request.body.len());
        signed.extend_from_slice(timestamp.as_bytes());
        signed.extend_from_slice(request.body);
        let verified = self.public_keys.iter().any(|key| {
            UnparsedPublicKey::new(&ED25519, key)
                .verify(&signed, &signature)
                .is_ok()
        });
        if verified {
            Ok(())
        } else {
            Err(IngestError::unauthenticated(
                "signature",
                "X-Signature-Ed25519 does not verify",
            ))
        }
    }
}

impl PlatformHandler for Discord {
    fn handle(&self, tenant: &str, request: &WebhookRequest<'_>) -> Result<Accepted, IngestError> {
        self.verify(request)?;
        parse_payload(tenant, request.body)
    }
}

/// Interprets a verified Discord body (public so the fuzz targets reach it without a signature).
pub fn parse_payload(tenant: &str, body: &[u8]) -> Result<Accepted, IngestError> {
    let payload: Value = serde_json::from_slice(body)
        .map_err(|error| IngestError::malformed(format!("body is not JSON: {error}")))?;
    let payload_type = payload["type"]
        .as_i64()
        .ok_or_else(|| IngestError::malformed("type must be an integer"))?;
    if payload["event"].is_object() || (payload_type == 0 && payload["application_id"].is_string())
    {
        // Webhook events.
        if payload_type == 0 {
            return Ok(Accepted {
                events: vec![],
                delivery_id: None,
                response: WebhookResponse::empty(204),
            });
        }
        let event = &payload["event"];
        let event_type = event["type"].as_str().unwrap_or_default();
        let kind = match event_type {
            "MESSAGE_CREATE" | "LOBBY_MESSAGE_CREATE" => Some(EventKind::MessageCreated),
            "MESSAGE_UPDATE" | "LOBBY_MESSAGE_UPDATE" => Some(EventKind::MessageEdited),
            "MESSAGE_DELETE" | "LOBBY_MESSAGE_DELETE" => Some(EventKind::MessageDeleted),
            _ => None,
        };
        let events = match kind {
            Some(kind) => vec![message_event(
                tenant,
                &event["data"],
                kind,
                body,
                &event["timestamp"],
            )?],
            None => vec![],
        };
        return Ok(Accepted {
            events,
            delivery_id: None,
            response: WebhookResponse::empty(204),
        });
    }
    match payload_type {
        1 => Ok(Accepted {
            events: vec![],
            delivery_id: None,
            response: WebhookResponse::json(&json!({ "type": 1 })),
        }),
        2..=5 => {
            let events = if payload["message"].is_object() {
                vec![message_event(
                    tenant,
                    &payload["message"],
                    EventKind::MessageCreated,
                    body,
                    &Value::Null,
                )?]
            } else {
                vec![]
            };
            // Component interactions (3) are acknowledged without changing the message (6, deferred
            // update); others with a deferred response (5). chatvault never posts into the conversation.
            let answer = if payload_type == 3 { 6 } else { 5 };
            Ok(Accepted {
                events,
                delivery_id: payload["id"].as_str().map(str::to_string),
                response: WebhookResponse::json(&json!({ "type": answer })),
            })
        }
        other => Err(IngestError::malformed(format!(
            "unknown interaction type {other}"
        ))),
    }
}

/// `event_time` is the envelope's timestamp, used when the message carries none (deletions).
fn message_event(
    tenant: &str,
    message: &Value,
    kind: EventKind,
    raw: &[u8],
    event_time: &Value,
) -> Result<ChatEvent, IngestError> {
    if !message.is_object() {
        return Err(IngestError::malformed("message payload is not an object"));
    }
    let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
    let conversation = match (&message["channel_id"], &message["lobby_id"]) {
        (Value::String(channel), _) => channel.clone(),
        (_, Value::String(lobby)) => format!("lobby:{lobby}"),
        _ => {
            return Err(IngestError::malformed(
                "message has neither channel_id nor lobby_id",
            ));
        }
    };
    let time_field = match kind {
        EventKind::MessageEdited => &message["edited_timestamp"],
        _ => &message["timestamp"],
    };
    let occurred_at_micros = time_field
        .as_str()
        .and_then(parse_rfc3339_micros)
        .or_else(|| message["timestamp"].as_str().and_then(parse_rfc3339_micros))
        .or_else(|| event_time.as_str().and_then(parse_rfc3339_micros))
        .ok_or_else(|| IngestError::malformed("message.timestamp must be an RFC 3339 timestamp"))?;
    let author = &message["author"];
    let sender = author["id"].as_str().map(|id| Sender {
        id: id.to_string(),
        display_name: text(&author["username"]),
        is_bot: author["bot"].as_bool().unwrap_or(false),
    });
    let attachments = message["attachments"]
        .as_array()
        .map(|files| {
            files
                .iter()
                .map(|file| Attachment {
                    id: text(&file["id"]),
                    name: text(&file["filename"]),
                    mime_type: text(&file["content_type"]),
                    size_bytes: file["size"].as_u64().unwrap_or(0),
                    sha256: String::new(),
                    url: text(&file["url"]),
                })
                .collect()
        })
        .unwrap_or_default();
    let mentions = message["mentions"]
        .as_array()
        .map(|users| {
            users
                .iter()
                .filter_map(|user| user["id"].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok(ChatEvent {
        tenant_id: tenant.to_string(),
        source: Source::Discord as i32,
        workspace_id: text(&message["guild_id"]),
        conversation_id: conversation,
        message_id: text(&message["id"]),
        kind: kind as i32,
        sender,
        occurred_at_micros,
        text: text(&message["content"]),
        attachments,
        mentions,
        raw_payload: raw.to_vec(),
        raw_content_type: "application/json".into(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{NOW, extreme_timestamps, headers, outcome, request};
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    #[test]
    fn stale_and_extreme_timestamps_are_refused() {
        let keys = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).expect("key");
        let discord = Discord::new(&[hex::encode(keys.public_key().as_ref())]).expect("discord");
        let body = r#"{"type":1,"id":"816029373512532030","application_id":"774281279254978560","version":1}"#;
        let signed = |timestamp: &str| {
            headers(&[
                (
                    "x-signature-ed25519",
                    hex::encode(keys.sign(format!("{timestamp}{body}").as_bytes()).as_ref()),
                ),
                ("x-signature-timestamp", timestamp.to_string()),
            ])
        };
        for timestamp in extreme_timestamps() {
            let headers = signed(&timestamp);
            let result = discord.handle("acme", &request(&headers, body.as_bytes()));
            match result {
                Err(IngestError::Unauthenticated {
                    reason: "stale_timestamp",
                    message,
                }) => assert!(
                    message.contains("X-Signature-Timestamp") && message.contains(&timestamp),
                    "{message}"
                ),
                other => panic!("{timestamp}: {}", outcome(other)),
            }
        }
        // A captured request replayed an hour later is refused, although its signature is valid.
        let headers = signed(&(NOW - 3600).to_string());
        assert_eq!(
            outcome(discord.handle("acme", &request(&headers, body.as_bytes()))),
            "stale_timestamp"
        );
        let headers = signed(&NOW.to_string());
        assert_eq!(
            outcome(discord.handle("acme", &request(&headers, body.as_bytes()))),
            "ok"
        );
        let headers = signed("soon");
        assert_eq!(
            outcome(discord.handle("acme", &request(&headers, body.as_bytes()))),
            "signature"
        );
    }
}
