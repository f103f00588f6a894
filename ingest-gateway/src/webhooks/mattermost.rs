//! Mattermost outgoing webhooks: form-encoded (the default) or JSON bodies, authenticated by the shared token
//! the webhook was created with, compared in constant time. The answer is an empty 200 so that Mattermost
//! posts nothing back. Outgoing webhooks fire for public channels only (see docs/WEBHOOKS.md).

use std::collections::HashMap;

use chatvault_core::auth::constant_time_eq;
use chatvault_core::error::{Error, Result};
use chatvault_proto::v1::{ChatEvent, EventKind, Sender, Source};
use serde_json::Value;

use super::{Accepted, PlatformHandler, WebhookRequest, WebhookResponse, header};
use crate::error::IngestError;

pub struct Mattermost {
    tokens: Vec<String>,
}

impl Mattermost {
    pub fn new(tokens: Vec<String>) -> Result<Mattermost> {
        if tokens.iter().any(String::is_empty) {
            return Err(Error::invalid_argument("a Mattermost token is empty"));
        }
        Ok(Mattermost { tokens })
    }
}

impl PlatformHandler for Mattermost {
    fn handle(&self, tenant: &str, request: &WebhookRequest<'_>) -> Result<Accepted, IngestError> {
        let content_type =
            header(request.headers, "content-type").unwrap_or("application/x-www-form-urlencoded");
        let fields: HashMap<String, String> = if content_type.starts_with("application/json") {
            let value: Value = serde_json::from_slice(request.body)
                .map_err(|error| IngestError::malformed(format!("body is not JSON: {error}")))?;
            let object = value
                .as_object()
                .ok_or_else(|| IngestError::malformed("body must be a JSON object"))?;
            object
                .iter()
                .map(|(key, value)| {
                    let text = match value {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    };
                    (key.clone(), text)
                })
                .collect()
        } else if content_type.starts_with("application/x-www-form-urlencoded") {
            if std::str::from_utf8(request.body).is_err() {
                return Err(IngestError::malformed("form body is not UTF-8"));
            }
            form_urlencoded::parse(request.body).into_owned().collect()
        } else {
            return Err(IngestError::malformed(format!(
                "unsupported content type {content_type}"
            )));
        };
        let presented = fields.get("token").map(String::as_str).unwrap_or_default();
        // Every configured token is compared, so timing does not reveal which (if any) matched.
        let matched = self.tokens.iter().fold(false, |found, token| {
            found | constant_time_eq(token.as_bytes(), presented.as_bytes())
        });
        if presented.is_empty() || !matched {
            return Err(IngestError::unauthenticated(
                "token",
                "token does not match",
            ));
        }
        let required = |name: &str| -> Result<String, IngestError> {
            fields
                .get(name)
                .filter(|value| !value.is_empty())
                .cloned()
                .ok_or_else(|| IngestError::malformed(format!("{name} is required")))
        };
        let timestamp_ms: i64 = required("timestamp")?.parse().map_err(|_| {
            IngestError::malformed("timestamp must be milliseconds since the epoch")
        })?;
        let event = ChatEvent {
            tenant_id: tenant.to_string(),
            source: Source::Mattermost as i32,
            workspace_id: fields.get("team_id").cloned().unwrap_or_default(),
            conversation_id: required("channel_id")?,
            message_id: required("post_id")?,
            kind: EventKind::MessageCreated as i32,
            sender: Some(Sender {
                id: required("user_id")?,
                display_name: fields.get("user_name").cloned().unwrap_or_default(),
                is_bot: false,
            }),
            occurred_at_micros: timestamp_ms.checked_mul(1000).ok_or_else(|| {
                IngestError::malformed(
                    "timestamp is not a plausible time (milliseconds since the epoch)",
                )
            })?,
            text: fields.get("text").cloned().unwrap_or_default(),
            raw_payload: request.body.to_vec(),
            raw_content_type: content_type.to_string(),
            ..Default::default()
        };
        Ok(Accepted {
            events: vec![event],
            delivery_id: None,
            response: WebhookResponse::empty(200),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{headers, outcome, request};
    use super::*;

    #[test]
    fn extreme_timestamps_are_refused_not_overflows() {
        let mattermost = Mattermost::new(vec!["token-1".into()]).expect("mattermost");
        let headers = headers(&[(
            "content-type",
            "application/x-www-form-urlencoded".to_string(),
        )]);
        for timestamp in [i64::MAX, i64::MIN, i64::MAX / 999] {
            let body = format!(
                "token=token-1&channel_id=c1&timestamp={timestamp}&user_id=u1&post_id=p1&text=x"
            );
            let result = outcome(mattermost.handle("acme", &request(&headers, body.as_bytes())));
            assert!(
                result.starts_with("malformed: timestamp"),
                "{timestamp}: {result}"
            );
        }
        let body =
            "token=token-1&channel_id=c1&timestamp=1764000000123&user_id=u1&post_id=p1&text=x";
        assert_eq!(
            outcome(mattermost.handle("acme", &request(&headers, body.as_bytes()))),
            "ok"
        );
    }
}
