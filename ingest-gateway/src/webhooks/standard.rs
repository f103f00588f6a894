//! Standard Webhooks (<https://www.standardwebhooks.com>), for any other sender.
//!
//! Verification: `webhook-signature` holds space-separated `v1,<base64 HMAC-SHA256>` signatures over
//! `<webhook-id>.<webhook-timestamp>.<raw body>`; any signature matching any configured `whsec_` secret is
//! accepted (rotation), compared in constant time; `webhook-timestamp` must be within the replay window.
//! `webhook-id` is the idempotency key: events without their own id get one derived from it.
//!
//! Payload (documented in docs/WEBHOOKS.md): `{"type": "chat.event", "data": {...}}` with one event, or
//! `{"type": "chat.events", "data": [{...}, ...]}`. Event fields: `conversation_id`, `kind` (`message_created`,
//! `message_edited`, ...), `occurred_at` (RFC 3339), and optionally `event_id`, `workspace_id`, `thread_id`,
//! `message_id`, `sender` (`id`, `display_name`, `is_bot`), `text`, `reaction`, `mentions` (user ids),
//! `attachments` (`id`, `name`, `mime_type`, `size_bytes`, `sha256`, `url`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chatvault_core::error::{Error, Result};
use chatvault_core::event::kind_from_name;
use chatvault_core::time::parse_rfc3339_micros;
use chatvault_proto::v1::{Attachment, ChatEvent, Sender, Source};
use ring::{digest, hmac};
use serde_json::Value;
use serde_json::value::RawValue;

use super::evidence::{Item, is_json_object};
use super::{
    Accepted, PlatformHandler, WebhookRequest, WebhookResponse, check_signed_timestamp, header,
};
use crate::error::IngestError;

pub struct StandardWebhooks {
    integration: String,
    keys: Vec<hmac::Key>,
}

impl StandardWebhooks {
    pub fn new(integration: &str, secrets: &[String]) -> Result<StandardWebhooks> {
        let keys = secrets
            .iter()
            .map(|secret| {
                let encoded = secret.strip_prefix("whsec_").ok_or_else(|| {
                    Error::invalid_argument("a Standard Webhooks secret must start with whsec_")
                })?;
                let key = BASE64.decode(encoded).map_err(|_| {
                    Error::invalid_argument("a Standard Webhooks secret is not base64 after whsec_")
                })?;
                if !(24..=64).contains(&key.len()) {
                    return Err(Error::invalid_argument(
                        "a Standard Webhooks secret must hold 24 to 64 bytes",
                    ));
                }
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &key))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StandardWebhooks {
            integration: integration.to_string(),
            keys,
        })
    }

    fn verify(&self, request: &WebhookRequest<'_>) -> Result<String, IngestError> {
        let id = header(request.headers, "webhook-id")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| IngestError::unauthenticated("signature", "missing webhook-id"))?;
        let timestamp = header(request.headers, "webhook-timestamp").ok_or_else(|| {
            IngestError::unauthenticated("signature", "missing webhook-timestamp")
        })?;
        check_signed_timestamp(request, "webhook-timestamp", timestamp)?;
        let signatures = header(request.headers, "webhook-signature").ok_or_else(|| {
            IngestError::unauthenticated("signature", "missing webhook-signature")
        })?;
        let mut signed = Vec::with_capacity(id.len() + timestamp.len() + request.body.len() + 2);
        signed.extend_from_slice(id.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(timestamp.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(request.body);
        let verified = signatures
            .split(' ')
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|encoded| BASE64.decode(encoded).ok())
            .any(|signature| {
                self.keys
                    .iter()
                    .any(|key| hmac::verify(key, &signed, &signature).is_ok())
            });
        if verified {
            Ok(id.to_string())
        } else {
            Err(IngestError::unauthenticated(
                "signature",
                "no webhook-signature matches",
            ))
        }
    }
}

impl PlatformHandler for StandardWebhooks {
    fn handle(&self, tenant: &str, request: &WebhookRequest<'_>) -> Result<Accepted, IngestError> {
        let webhook_id = self.verify(request)?;
        let events = self.parse_payload(tenant, &webhook_id, request.body)?;
        Ok(Accepted {
            events,
            delivery_id: Some(webhook_id),
            response: WebhookResponse::empty(204),
        })
    }
}

impl StandardWebhooks {
    /// Interprets a verified body (public so the fuzz targets reach it without a signature). Each event's
    /// `raw_payload` is its item of `data`, sliced verbatim from `body` (see [`super::evidence`]); items are
    /// parsed one at a time, so memory stays proportional to the body, not to items × body.
    pub fn parse_payload(
        &self,
        tenant: &str,
        webhook_id: &str,
        body: &[u8],
    ) -> Result<Vec<ChatEvent>, IngestError> {
        /// The envelope's two fields; `data` stays unparsed bytes of the body.
        #[derive(serde::Deserialize)]
        struct Payload<'a> {
            #[serde(rename = "type", default)]
            kind: Option<Value>,
            #[serde(borrow, default)]
            data: Option<&'a RawValue>,
        }
        if !is_json_object(body) {
            return Err(IngestError::malformed("body is not a JSON object"));
        }
        let payload: Payload<'_> = serde_json::from_slice(body)
            .map_err(|error| IngestError::malformed(format!("body is not JSON: {error}")))?;
        let data = match payload.data {
            Some(raw) => Some((raw, Item::of(body, raw)?)),
            None => None,
        };
        let items: Vec<Item<'_>> = match (payload.kind.as_ref().and_then(Value::as_str), data) {
            (Some("chat.event"), Some((_, data))) if data.is_object() => vec![data],
            (Some("chat.events"), Some((raw, data))) if data.json.starts_with('[') => {
                Item::elements(body, raw, "data")?
            }
            (Some("chat.event" | "chat.events"), _) => {
                return Err(IngestError::malformed(
                    "data must be an object (chat.event) or an array (chat.events)",
                ));
            }
            (Some(other), _) => {
                return Err(IngestError::malformed(format!("unknown type {other}")));
            }
            (None, _) => return Err(IngestError::malformed("type is required")),
        };
        items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                let value: Value = serde_json::from_str(item.json).map_err(|error| {
                    IngestError::malformed(format!("data[{index}] is not JSON: {error}"))
                })?;
                Ok(item.attach(self.event(tenant, webhook_id, index, &value)?))
            })
            .collect()
    }
}

impl StandardWebhooks {
    fn event(
        &self,
        tenant: &str,
        webhook_id: &str,
        index: usize,
        item: &Value,
    ) -> Result<ChatEvent, IngestError> {
        let field = |name: &str| -> Result<String, IngestError> {
            match &item[name] {
                Value::Null => Ok(String::new()),
                Value::String(text) => Ok(text.clone()),
                _ => Err(IngestError::malformed(format!(
                    "data[{index}].{name} must be a string"
                ))),
            }
        };
        let kind_text = field("kind")?;
        let kind = kind_from_name(&kind_text).ok_or_else(|| {
            IngestError::malformed(format!(
                "data[{index}].kind {kind_text:?} is not a known event kind"
            ))
        })?;
        let occurred_text = field("occurred_at")?;
        let occurred_at_micros = parse_rfc3339_micros(&occurred_text).ok_or_else(|| {
            IngestError::malformed(format!(
                "data[{index}].occurred_at must be an RFC 3339 timestamp"
            ))
        })?;
        let sender = match &item["sender"] {
            Value::Null => None,
            Value::Object(sender) => Some(Sender {
                id: sender
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                display_name: sender
                    .get("display_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                is_bot: sender
                    .get("is_bot")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
            _ => {
                return Err(IngestError::malformed(format!(
                    "data[{index}].sender must be an object"
                )));
            }
        };
        let mentions = match &item["mentions"] {
            Value::Null => vec![],
            Value::Array(ids) => ids
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => {
                return Err(IngestError::malformed(format!(
                    "data[{index}].mentions must be an array of user ids"
                )));
            }
        };
        let attachments = match &item["attachments"] {
            Value::Null => vec![],
            Value::Array(files) => files
                .iter()
                .map(|file| Attachment {
                    id: file["id"].as_str().unwrap_or_default().to_string(),
                    name: file["name"].as_str().unwrap_or_default().to_string(),
                    mime_type: file["mime_type"].as_str().unwrap_or_default().to_string(),
                    size_bytes: file["size_bytes"].as_u64().unwrap_or(0),
                    sha256: file["sha256"].as_str().unwrap_or_default().to_string(),
                    url: file["url"].as_str().unwrap_or_default().to_string(),
                })
                .collect(),
            _ => {
                return Err(IngestError::malformed(format!(
                    "data[{index}].attachments must be an array"
                )));
            }
        };
        let mut event_id = field("event_id")?;
        if event_id.is_empty() {
            // The delivery's webhook-id is the sender's idempotency key: the same delivery always maps to the
            // same event ids.
            let mut context = digest::Context::new(&digest::SHA256);
            for part in [self.integration.as_str(), webhook_id, &index.to_string()] {
                context.update(&(part.len() as u64).to_be_bytes());
                context.update(part.as_bytes());
            }
            event_id = format!("swh-{}", hex::encode(&context.finish().as_ref()[..16]));
        }
        Ok(ChatEvent {
            event_id,
            tenant_id: tenant.to_string(),
            source: Source::StandardWebhooks as i32,
            workspace_id: field("workspace_id")?,
            conversation_id: field("conversation_id")?,
            thread_id: field("thread_id")?,
            message_id: field("message_id")?,
            kind: kind as i32,
            sender,
            occurred_at_micros,
            received_at_micros: 0,
            text: field("text")?,
            attachments,
            mentions,
            reaction: field("reaction")?,
            raw_content_type: "application/json".into(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{NOW, extreme_timestamps, headers, outcome, request};
    use super::*;

    fn signed(secret: &[u8], id: &str, timestamp: &str, body: &str) -> http::HeaderMap {
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret),
            format!("{id}.{timestamp}.{body}").as_bytes(),
        );
        headers(&[
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", timestamp.to_string()),
            (
                "webhook-signature",
                format!("v1,{}", BASE64.encode(tag.as_ref())),
            ),
        ])
    }

    #[test]
    fn extreme_timestamps_are_stale_not_overflows() {
        let secret = [7u8; 32];
        let handler =
            StandardWebhooks::new("generic", &[format!("whsec_{}", BASE64.encode(secret))])
                .expect("handler");
        let body = r#"{"type":"chat.event","data":{"conversation_id":"c","kind":"message_created","occurred_at":"2025-11-24T16:00:00Z"}}"#;
        for timestamp in extreme_timestamps() {
            let headers = signed(&secret, "msg_1", &timestamp, body);
            assert_eq!(
                outcome(handler.handle("acme", &request(&headers, body.as_bytes()))),
                "stale_timestamp",
                "{timestamp}"
            );
        }
        let headers = signed(&secret, "msg_1", &NOW.to_string(), body);
        assert_eq!(
            outcome(handler.handle("acme", &request(&headers, body.as_bytes()))),
            "ok"
        );
    }

    #[test]
    fn each_item_is_its_own_slice_of_the_body() {
        let handler =
            StandardWebhooks::new("generic", &[format!("whsec_{}", BASE64.encode([7u8; 32]))])
                .expect("handler");
        let item = |n: u32| {
            format!(
                r#"{{"conversation_id":"c","kind":"message_created","message_id":"m{n}","occurred_at":"2025-11-24T16:00:00Z","text":"caf\u00e9 {n}"}}"#
            )
        };
        let body = format!(
            "{{ \"type\" : \"chat.events\", \"data\" : [ {} ,\n{} ], \"note\": [1] }}",
            item(1),
            item(2)
        );
        let mut events = handler
            .parse_payload("acme", "msg_1", body.as_bytes())
            .expect("events");
        for (index, event) in events.iter().enumerate() {
            assert_eq!(event.raw_payload, item(index as u32 + 1).into_bytes());
            assert_eq!(
                &body.as_bytes()[event.raw_payload_offset as usize..][..event.raw_payload.len()],
                event.raw_payload.as_slice()
            );
        }
        super::super::evidence::seal(body.as_bytes(), &mut events).expect("seal");
        assert_eq!(
            events[0].delivery_envelope,
            b"{ \"type\" : \"chat.events\", \"data\" : [  ,\n ], \"note\": [1] }".to_vec()
        );
        for malformed in [
            r#"["chat.events", []]"#,
            r#"{"type":"chat.events","data":{}}"#,
            r#"{"type":"chat.event","data":[]}"#,
            r#"{"type":"chat.events","data":[1]}"#,
            r#"{"type":"chat.events","type":"chat.event","data":[]}"#,
        ] {
            assert!(
                handler
                    .parse_payload("acme", "msg_1", malformed.as_bytes())
                    .is_err(),
                "{malformed}"
            );
        }
    }
}
