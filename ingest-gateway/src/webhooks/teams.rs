//! Microsoft Teams through Microsoft Graph change notifications (`chatMessage` subscriptions).
//!
//! Handshake: Graph validates a notification URL (and a lifecycle notification URL) with a request carrying
//! `?validationToken=<url-encoded>`; the answer is 200 `text/plain` with the percent-decoded token and nothing
//! is produced. The notification and lifecycle URLs may both be this endpoint.
//!
//! Verification of a notification batch `{"value": [...], "validationTokens": [...]}`:
//! - every item's `clientState` must equal one of the integration's secrets (constant time; several for
//!   rotation), else 401 `client_state` for the whole request;
//! - with `tenant_ids` configured, every item's `tenantId` must be listed, else 401 `tenant`;
//! - rich notifications (items with `encryptedContent`) need `validationTokens`: each an RS256 JWT signed by a
//!   key of the configured JWKS file (by `kid`), unexpired (5 minutes of skew), `aud` = `app_id`, `azp`/`appid`
//!   = Graph's change-notification publisher; any failure (or no tokens) is 401 `jwt`;
//! - `encryptedContent`: the RSA private key is chosen by `encryptionCertificateId` (unknown: 400 naming it),
//!   `dataKey` is unwrapped with RSA-OAEP (SHA-1, MGF1-SHA-1), `dataSignature` (HMAC-SHA256 of the decoded
//!   `data` under that key) is verified before anything is decrypted (mismatch: 401 `signature`), and `data` is
//!   AES-256-CBC/PKCS#7 with the IV = the key's first 16 bytes. The plaintext is the `chatMessage` resource.
//!
//! Mapping: `changeType` created → MESSAGE_CREATED, updated → MESSAGE_EDITED (MESSAGE_DELETED when the message
//! has `deletedDateTime`, Teams' soft delete), deleted → MESSAGE_DELETED. `conversation_id` is the chat id
//! (`chatId`) or the channel id (`channelIdentity.channelId`) as Teams writes them (`19:...@thread.v2`,
//! `19:...@thread.tacv2`, no prefix); `workspace_id` the team id; `thread_id` the `replyToId` of a channel reply.
//! Without resource data, ids come from `resource` (`chats('..')/messages('..')`,
//! `teams('..')/channels('..')/messages('..')[/replies('..')]`): a deletion is archived as such, while a
//! creation or an update without content is archived as a CAPTURE_GAP naming the message (its content must be
//! fetched from Graph; an empty edit would erase the archived text). Lifecycle notifications
//! (`reauthorizationRequired`, `subscriptionRemoved`, `missed`, ...) are archived as CAPTURE_GAP events in
//! conversation `subscription:<subscriptionId>`. Each event keeps its own notification of `value[]`
//! verbatim (the delivery's envelope travels once, see [`super::evidence`]); Graph sends no delivery id, so retries collapse through the derived event ids (timestamps from the message).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::config::WebhookConfig;
use aes::Aes256;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeDecrypt, KeyIvInit};
use chatvault_core::auth::constant_time_eq;
use chatvault_core::auth::jwt::{Algorithm, JwkSet, UnverifiedToken};
use chatvault_core::error::{Error, Result};
use chatvault_core::time::{now_micros, parse_rfc3339_micros};
use chatvault_proto::v1::{Attachment, ChatEvent, EventKind, Sender, Source};
use ring::hmac;
use rsa::pkcs8::DecodePrivateKey;
use serde_json::Value;
use serde_json::value::RawValue;
use sha1::Sha1;

use super::evidence::{Item, is_json_object};
use super::{Accepted, PlatformHandler, WebhookRequest, WebhookResponse};
use crate::error::IngestError;

/// The app id of Microsoft Graph's change-notification publisher (`azp`/`appid` of its validation tokens).
pub const GRAPH_NOTIFICATION_PUBLISHER: &str = "0bf30f3b-4a52-48df-9a82-234910c4a086";
/// Clock skew tolerated on validation token `exp`/`nbf`, seconds.
pub const JWT_SKEW_SECS: i64 = 300;
/// Graph's limit on `clientState`.
const MAX_CLIENT_STATE_CHARS: usize = 255;

/// The signing keys of validation tokens, read from a JSON Web Key Set file and re-read when the file's
/// modification time changes (the deployment refreshes it from Microsoft's `keys` endpoint).
struct Jwks {
    path: Option<PathBuf>,
    state: Mutex<(Option<SystemTime>, JwkSet)>,
}

impl Jwks {
    fn from_file(path: &Path) -> Result<Jwks> {
        let (modified, keys) = read_jwks_file(path)?;
        Ok(Jwks {
            path: Some(path.to_path_buf()),
            state: Mutex::new((modified, keys)),
        })
    }

    #[cfg(test)]
    fn from_json(text: &str) -> Result<Jwks> {
        Ok(Jwks {
            path: None,
            state: Mutex::new((None, JwkSet::parse(text.as_bytes())?)),
        })
    }

    /// The keys, after re-reading the file if it changed. A file that no longer parses keeps the previous
    /// keys (and is logged), so a half-written refresh does not stop ingest.
    fn keys(&self) -> Option<JwkSet> {
        let mut state = self.state.lock().ok()?;
        if let Some(path) = &self.path {
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != state.0 {
                match read_jwks_file(path) {
                    Ok(fresh) => *state = fresh,
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "JWKS file not reloaded; keeping the previous keys");
                        state.0 = modified;
                    }
                }
            }
        }
        Some(state.1.clone())
    }
}

fn read_jwks_file(path: &Path) -> Result<(Option<SystemTime>, JwkSet)> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let bytes = std::fs::read(path).map_err(|error| {
        Error::invalid_argument(format!("reading jwks_file {}: {error}", path.display()))
    })?;
    let keys = JwkSet::parse(&bytes)
        .map_err(|error| error.context(format!("jwks_file {}", path.display())))?;
    Ok((modified, keys))
}

pub struct Teams {
    client_states: Vec<String>,
    keys: HashMap<String, rsa::PrivateKey>,
    app_id: Option<String>,
    jwks: Option<Jwks>,
    tenant_ids: Vec<String>,
}

impl Teams {
    /// From an integration's settings; `client_states` are its resolved secrets.
    pub fn new(config: &WebhookConfig, client_states: Vec<String>) -> Result<Teams> {
        let mut keys = HashMap::new();
        for certificate in &config.certificates {
            let pem = std::fs::read_to_string(&certificate.private_key_file).map_err(|error| {
                Error::invalid_argument(format!(
                    "certificate {}: reading private_key_file {}: {error}",
                    certificate.id,
                    certificate.private_key_file.display()
                ))
            })?;
            keys.insert(certificate.id.clone(), private_key(&certificate.id, &pem)?);
        }
        let jwks = config
            .jwks_file
            .as_deref()
            .map(Jwks::from_file)
            .transpose()?;
        Teams::from_parts(
            client_states,
            keys,
            config.app_id.clone(),
            jwks,
            config.tenant_ids.clone(),
        )
    }

    fn from_parts(
        client_states: Vec<String>,
        keys: HashMap<String, rsa::PrivateKey>,
        app_id: Option<String>,
        jwks: Option<Jwks>,
        tenant_ids: Vec<String>,
    ) -> Result<Teams> {
        if client_states
            .iter()
            .any(|state| state.is_empty() || state.chars().count() > MAX_CLIENT_STATE_CHARS)
        {
            return Err(Error::invalid_argument(
                "a Teams clientState secret must be 1 to 255 characters",
            ));
        }
        Ok(Teams {
            client_states,
            keys,
            app_id,
            jwks,
            tenant_ids,
        })
    }

    fn client_state_matches(&self, presented: &str) -> bool {
        // Every configured value is compared (no early exit), each in constant time.
        self.client_states.iter().fold(false, |matched, state| {
            constant_time_eq(state.as_bytes(), presented.as_bytes()) | matched
        })
    }

    /// Checks one validation token; the refusal says why.
    fn verify_token(&self, token: &str, now_secs: i64) -> std::result::Result<(), IngestError> {
        fn refused(why: impl Into<String>) -> IngestError {
            IngestError::unauthenticated("jwt", why)
        }
        let (Some(app_id), Some(jwks)) = (&self.app_id, &self.jwks) else {
            return Err(refused(
                "no app_id and jwks_file configured for validation tokens",
            ));
        };
        // Graph signs validation tokens RS256 with the Microsoft identity platform's keys.
        let parsed = UnverifiedToken::parse(token)
            .map_err(|error| refused(format!("a validation token: {}", error.message())))?;
        let keys = jwks
            .keys()
            .ok_or_else(|| refused("the validation token keys are unavailable"))?;
        parsed.verify(&[Algorithm::RS256], &keys).map_err(|error| {
            refused(format!(
                "a validation token: {}",
                error.into_error().message()
            ))
        })?;
        parsed
            .check_times(now_secs, JWT_SKEW_SECS)
            .map_err(|error| refused(format!("a validation token: {}", error.message())))?;
        if !parsed.has_audience(app_id) {
            return Err(refused("a validation token is for another audience"));
        }
        let claims = &parsed.claims;
        let publisher = parsed
            .claim_str("azp")
            .or_else(|| parsed.claim_str("appid"));
        if publisher != Some(GRAPH_NOTIFICATION_PUBLISHER) {
            return Err(refused(
                "a validation token was not issued to Graph's notification publisher",
            ));
        }
        if let Some(tid) = claims.get("tid").and_then(Value::as_str)
            && !self.tenant_allowed(tid)
        {
            return Err(refused(format!(
                "a validation token is for tenant {tid}, not allowed"
            )));
        }
        Ok(())
    }

    fn tenant_allowed(&self, tenant: &str) -> bool {
        self.tenant_ids.is_empty()
            || self
                .tenant_ids
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(tenant))
    }

    /// Verifies and decrypts one item's `encryptedContent` to the resource JSON.
    fn decrypt(&self, index: usize, content: &Value) -> std::result::Result<Value, IngestError> {
        let field = |name: &str| -> std::result::Result<Vec<u8>, IngestError> {
            content[name]
                .as_str()
                .and_then(|text| BASE64.decode(text).ok())
                .ok_or_else(|| {
                    IngestError::malformed(format!(
                        "value[{index}].encryptedContent.{name} is missing or not base64"
                    ))
                })
        };
        let certificate = content["encryptionCertificateId"].as_str().ok_or_else(|| {
            IngestError::malformed(format!(
                "value[{index}].encryptedContent.encryptionCertificateId is missing"
            ))
        })?;
        let key = self.keys.get(certificate).ok_or_else(|| {
            IngestError::malformed(format!(
                "value[{index}].encryptedContent.encryptionCertificateId {certificate:?} is not a configured certificate"
            ))
        })?;
        let wrapped = field("dataKey")?;
        let data = field("data")?;
        let data_signature = field("dataSignature")?;
        let symmetric = key.oaep_decrypt::<Sha1>(&wrapped).map_err(|_| {
            IngestError::unauthenticated(
                "signature",
                format!("value[{index}].encryptedContent does not verify"),
            )
        })?;
        if symmetric.len() != 32 {
            return Err(IngestError::unauthenticated(
                "signature",
                format!("value[{index}].encryptedContent does not verify"),
            ));
        }
        // The signature is checked before anything is decrypted (ring's verify compares in constant time).
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, &symmetric),
            &data,
            &data_signature,
        )
        .map_err(|_| {
            IngestError::unauthenticated(
                "signature",
                format!("value[{index}].encryptedContent.dataSignature does not match"),
            )
        })?;
        let decryptor = cbc::Decryptor::<Aes256>::new_from_slices(&symmetric, &symmetric[..16])
            .map_err(|_| IngestError::malformed("bad AES key length"))?;
        let mut buffer = data;
        let plain = decryptor
            .decrypt_padded::<Pkcs7>(&mut buffer)
            .map_err(|_| {
                IngestError::malformed(format!(
                    "value[{index}].encryptedContent.data is not AES-CBC/PKCS#7 under its dataKey"
                ))
            })?;
        serde_json::from_slice(plain).map_err(|error| {
            IngestError::malformed(format!(
                "value[{index}].encryptedContent.data is not JSON: {error}"
            ))
        })
    }
}

/// Parses a PKCS#8 PEM RSA private key.
fn private_key(id: &str, pem: &str) -> Result<rsa::PrivateKey> {
    rsa::PrivateKey::from_pkcs8_pem(pem).map_err(|error| {
        Error::invalid_argument(format!(
            "certificate {id}: private_key_file is not a PKCS#8 PEM RSA private key: {error}"
        ))
    })
}

/// The `validationToken` query parameter, percent-decoded (`+` is kept: Graph percent-encodes).
fn validation_token(query: Option<&str>) -> Option<std::result::Result<String, IngestError>> {
    let value = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("validationToken="))?;
    Some(
        percent_decode(value)
            .ok_or_else(|| IngestError::malformed("validationToken is not percent-encoded UTF-8")),
    )
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Ids named in a Graph resource path: `chats('19:..')/messages('16..')`, `teams('..')/channels('..')/
/// messages('..')/replies('..')`, or the same in `segment/value` form.
fn resource_ids(resource: &str) -> HashMap<String, String> {
    let mut ids = HashMap::new();
    let mut segments = resource.trim_start_matches('/').split('/');
    while let Some(segment) = segments.next() {
        if let Some((name, rest)) = segment.split_once("('") {
            if let Some(value) = rest.strip_suffix("')") {
                ids.insert(name.to_string(), value.to_string());
            }
        } else if matches!(
            segment,
            "chats" | "teams" | "channels" | "messages" | "replies"
        ) && let Some(value) = segments.next()
        {
            ids.insert(segment.to_string(), value.to_string());
        }
    }
    ids
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

fn non_empty(value: &Value) -> Option<&str> {
    value.as_str().filter(|text| !text.is_empty())
}

/// An RFC 3339 timestamp of the message, if present; malformed is 400.
fn timestamp(
    message: &Value,
    name: &str,
    index: usize,
) -> std::result::Result<Option<i64>, IngestError> {
    match non_empty(&message[name]) {
        None => Ok(None),
        Some(raw) => parse_rfc3339_micros(raw).map(Some).ok_or_else(|| {
            IngestError::malformed(format!(
                "value[{index}] message {name} is not an RFC 3339 timestamp"
            ))
        }),
    }
}

fn sender(message: &Value) -> Option<Sender> {
    let from = &message["from"];
    for (kind, is_bot) in [("user", false), ("application", true), ("device", false)] {
        let who = &from[kind];
        if let Some(id) = non_empty(&who["id"]) {
            return Some(Sender {
                id: id.to_string(),
                display_name: text(&who["displayName"]),
                is_bot,
            });
        }
    }
    None
}

fn attachments(message: &Value) -> Vec<Attachment> {
    message["attachments"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| Attachment {
                    id: text(&item["id"]),
                    name: text(&item["name"]),
                    mime_type: text(&item["contentType"]),
                    size_bytes: 0,
                    sha256: String::new(),
                    url: text(&item["contentUrl"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn mentions(message: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for mention in message["mentions"].as_array().into_iter().flatten() {
        if let Some(id) = non_empty(&mention["mentioned"]["user"]["id"])
            && !out.iter().any(|known| known == id)
        {
            out.push(id.to_string());
        }
    }
    out
}

const LIFECYCLE_TEXT: &[(&str, &str)] = &[
    (
        "reauthorizationRequired",
        "the subscription must be reauthorized; notifications stop once it expires",
    ),
    (
        "subscriptionRemoved",
        "the subscription was removed; notifications are lost until it is recreated and resynchronized",
    ),
    (
        "missed",
        "Graph could not deliver some notifications; resynchronize through the delta or export APIs",
    ),
];

/// Normalizes one notification (after verification); `message` is the decrypted resource, if any. The event's
/// evidence (`raw_payload`, the item's bytes) is attached by the caller.
fn normalize(
    tenant: &str,
    index: usize,
    item: &Value,
    message: Option<&Value>,
) -> std::result::Result<Option<ChatEvent>, IngestError> {
    let base = ChatEvent {
        tenant_id: tenant.to_string(),
        source: Source::Teams as i32,
        raw_content_type: "application/json".into(),
        ..Default::default()
    };
    let subscription = text(&item["subscriptionId"]);
    if let Some(lifecycle) = non_empty(&item["lifecycleEvent"]) {
        let meaning = LIFECYCLE_TEXT
            .iter()
            .find(|(name, _)| *name == lifecycle)
            .map(|(_, meaning)| *meaning)
            .unwrap_or("notifications may be missing");
        let subscription_id = if subscription.is_empty() {
            "unknown"
        } else {
            subscription.as_str()
        };
        return Ok(Some(ChatEvent {
            kind: EventKind::CaptureGap as i32,
            conversation_id: format!("subscription:{subscription_id}"),
            occurred_at_micros: now_micros(),
            text: format!(
                "Microsoft Graph lifecycle event {lifecycle} for subscription {subscription_id} (resource {}): {meaning}",
                text(&item["resource"])
            ),
            ..base
        }));
    }
    let change = item["changeType"].as_str().unwrap_or_default();
    if !matches!(change, "created" | "updated" | "deleted") {
        if change.is_empty() {
            return Err(IngestError::malformed(format!(
                "value[{index}] has neither changeType nor lifecycleEvent"
            )));
        }
        // Other change types are acknowledged and not archived.
        return Ok(None);
    }
    let ids = resource_ids(item["resource"].as_str().unwrap_or_default());
    let empty = Value::Null;
    let message_json = message.unwrap_or(&empty);
    let from_resource = |name: &str| ids.get(name).cloned().unwrap_or_default();
    let message_id = non_empty(&message_json["id"])
        .map(str::to_string)
        .or_else(|| ids.get("replies").cloned())
        .or_else(|| ids.get("messages").cloned())
        .or_else(|| non_empty(&item["resourceData"]["id"]).map(str::to_string))
        .ok_or_else(|| IngestError::malformed(format!("value[{index}] names no message")))?;
    let thread_id = match non_empty(&message_json["replyToId"]) {
        Some(root) => root.to_string(),
        None if ids.contains_key("replies") => from_resource("messages"),
        None => String::new(),
    };
    let channel = &message_json["channelIdentity"];
    let conversation_id = non_empty(&message_json["chatId"])
        .or_else(|| non_empty(&channel["channelId"]))
        .map(str::to_string)
        .or_else(|| ids.get("chats").cloned())
        .or_else(|| ids.get("channels").cloned())
        .ok_or_else(|| {
            IngestError::malformed(format!(
                "value[{index}] names no chat or channel (resource or chatMessage)"
            ))
        })?;
    let workspace_id = non_empty(&channel["teamId"])
        .map(str::to_string)
        .unwrap_or_else(|| from_resource("teams"));
    let base = ChatEvent {
        conversation_id,
        workspace_id,
        message_id,
        thread_id,
        ..base
    };
    let Some(message) = message else {
        if change == "deleted" {
            return Ok(Some(ChatEvent {
                kind: EventKind::MessageDeleted as i32,
                occurred_at_micros: now_micros(),
                ..base
            }));
        }
        return Ok(Some(ChatEvent {
            kind: EventKind::CaptureGap as i32,
            occurred_at_micros: now_micros(),
            text: format!(
                "Teams message {} was {change} but the notification carried no content (subscribe with includeResourceData); fetch it from Microsoft Graph",
                base.message_id
            ),
            ..base
        }));
    };
    let created = timestamp(message, "createdDateTime", index)?;
    let modified = timestamp(message, "lastModifiedDateTime", index)?;
    let edited = timestamp(message, "lastEditedDateTime", index)?;
    let deleted = timestamp(message, "deletedDateTime", index)?;
    let now = now_micros();
    let (kind, occurred) = match change {
        "created" => (EventKind::MessageCreated, created.or(modified)),
        "updated" if deleted.is_some() => (EventKind::MessageDeleted, deleted),
        "updated" => (EventKind::MessageEdited, modified.or(edited).or(created)),
        _ => (EventKind::MessageDeleted, deleted.or(modified)),
    };
    let deletion = kind == EventKind::MessageDeleted;
    Ok(Some(ChatEvent {
        kind: kind as i32,
        occurred_at_micros: occurred.unwrap_or(now),
        sender: sender(message),
        text: if deletion {
            String::new()
        } else {
            text(&message["body"]["content"])
        },
        attachments: if deletion {
            vec![]
        } else {
            attachments(message)
        },
        mentions: if deletion { vec![] } else { mentions(message) },
        ..base
    }))
}

/// The events of a `chatMessage` as Microsoft Graph's export API (`getAllMessages`) returns it: its current
/// state, not a change. Identity is the same as for a change notification's resource data (chat id, or team
/// and channel id; message `id`; sender; `createdDateTime`), so a message captured live and exported is one
/// archived creation. Beyond the creation:
/// - `lastEditedDateTime` gives an edit at that time (a live edit is archived at `lastModifiedDateTime`, which
///   is the edit's time when Graph notifies it; later reactions move it, which the export does not repeat);
/// - `deletedDateTime` (a soft delete, readable for 21 days) a deletion at that time, as a live update with
///   `deletedDateTime` is archived;
/// - each of `reactions` an addition at its own `createdDateTime`;
/// - system event messages (`messageType` `systemEventMessage`): members added or removed become membership
///   events (one per member), a renamed chat or channel a rename; other system events are returned in the
///   second list, by `@odata.type`, and not archived.
///
/// Each event keeps the message as its raw payload (`raw`, the bytes Graph sent, when given).
pub fn exported_message_events(
    tenant: &str,
    message: &Value,
    raw: &[u8],
) -> std::result::Result<(Vec<ChatEvent>, Vec<String>), IngestError> {
    let message_id = non_empty(&message["id"])
        .ok_or_else(|| IngestError::malformed("message has no id"))?
        .to_string();
    let channel = &message["channelIdentity"];
    let conversation_id = non_empty(&message["chatId"])
        .or_else(|| non_empty(&channel["channelId"]))
        .ok_or_else(|| IngestError::malformed("message names neither chatId nor channelIdentity"))?
        .to_string();
    let created = timestamp(message, "createdDateTime", 0)?
        .ok_or_else(|| IngestError::malformed("message has no createdDateTime"))?;
    let base = ChatEvent {
        tenant_id: tenant.to_string(),
        source: Source::Teams as i32,
        workspace_id: text(&channel["teamId"]),
        conversation_id,
        raw_payload: raw.to_vec(),
        raw_content_type: "application/json".into(),
        ..Default::default()
    };
    let mut events = Vec::new();
    let mut skipped = Vec::new();
    if message["messageType"].as_str() == Some("systemEventMessage") {
        let detail = &message["eventDetail"];
        let detail_type = text(&detail["@odata.type"]);
        let kind = match detail_type.trim_start_matches("#microsoft.graph.") {
            "membersAddedEventMessageDetail" | "membersJoinedEventMessageDetail" => {
                Some(EventKind::MemberJoined)
            }
            "membersDeletedEventMessageDetail" | "membersLeftEventMessageDetail" => {
                Some(EventKind::MemberLeft)
            }
            _ => None,
        };
        if let Some(kind) = kind {
            for member in detail["members"].as_array().into_iter().flatten() {
                if let Some(id) = non_empty(&member["id"]) {
                    events.push(ChatEvent {
                        kind: kind as i32,
                        occurred_at_micros: created,
                        sender: Some(Sender {
                            id: id.to_string(),
                            display_name: text(&member["displayName"]),
                            is_bot: false,
                        }),
                        ..base.clone()
                    });
                }
            }
        } else if detail_type.ends_with("chatRenamedEventMessageDetail")
            || detail_type.ends_with("channelRenamedEventMessageDetail")
        {
            let name = non_empty(&detail["chatDisplayName"])
                .or_else(|| non_empty(&detail["channelDisplayName"]))
                .unwrap_or_default();
            events.push(ChatEvent {
                kind: EventKind::ConversationRenamed as i32,
                occurred_at_micros: created,
                text: name.to_string(),
                ..base.clone()
            });
        } else {
            skipped.push(format!(
                "system event {}",
                detail_type.trim_start_matches('#')
            ));
        }
        return Ok((events, skipped));
    }
    let message_base = ChatEvent {
        message_id,
        thread_id: text(&message["replyToId"]),
        ..base
    };
    let creation = ChatEvent {
        kind: EventKind::MessageCreated as i32,
        occurred_at_micros: created,
        sender: sender(message),
        text: text(&message["body"]["content"]),
        attachments: attachments(message),
        mentions: mentions(message),
        ..message_base.clone()
    };
    let edited = timestamp(message, "lastEditedDateTime", 0)?.filter(|at| *at > created);
    let deleted = timestamp(message, "deletedDateTime", 0)?;
    let without_raw = ChatEvent {
        raw_payload: Vec::new(),
        raw_content_type: String::new(),
        ..message_base.clone()
    };
    events.push(creation.clone());
    if let Some(at) = edited {
        events.push(ChatEvent {
            kind: EventKind::MessageEdited as i32,
            occurred_at_micros: at,
            raw_payload: Vec::new(),
            raw_content_type: String::new(),
            ..creation.clone()
        });
    }
    for reaction in message["reactions"].as_array().into_iter().flatten() {
        let user = &reaction["user"]["user"];
        let Some(id) = non_empty(&user["id"]) else {
            continue;
        };
        let at = timestamp(reaction, "createdDateTime", 0)?.unwrap_or(created);
        events.push(ChatEvent {
            kind: EventKind::ReactionAdded as i32,
            occurred_at_micros: at.max(created),
            sender: Some(Sender {
                id: id.to_string(),
                display_name: text(&user["displayName"]),
                is_bot: false,
            }),
            reaction: non_empty(&reaction["displayName"])
                .or_else(|| non_empty(&reaction["reactionType"]))
                .unwrap_or_default()
                .to_string(),
            ..without_raw.clone()
        });
    }
    if let Some(at) = deleted {
        events.push(ChatEvent {
            kind: EventKind::MessageDeleted as i32,
            occurred_at_micros: at,
            sender: sender(message),
            ..without_raw
        });
    }
    Ok((events, skipped))
}

impl PlatformHandler for Teams {
    fn handle(
        &self,
        tenant: &str,
        request: &WebhookRequest<'_>,
    ) -> std::result::Result<Accepted, IngestError> {
        if let Some(token) = validation_token(request.query) {
            return Ok(Accepted {
                events: vec![],
                delivery_id: None,
                response: WebhookResponse {
                    status: 200,
                    content_type: Some("text/plain"),
                    body: token?.into_bytes(),
                },
            });
        }
        /// The batch's two fields; the items stay unparsed bytes of the body.
        #[derive(serde::Deserialize)]
        struct Batch<'a> {
            #[serde(borrow, default)]
            value: Option<&'a RawValue>,
            #[serde(rename = "validationTokens", default)]
            validation_tokens: Option<Value>,
        }
        /// What verification needs of an item, borrowed from the body.
        #[derive(serde::Deserialize)]
        struct Credentials<'a> {
            #[serde(rename = "clientState", borrow, default)]
            client_state: Option<Cow<'a, str>>,
            #[serde(rename = "tenantId", borrow, default)]
            tenant_id: Option<Cow<'a, str>>,
            #[serde(rename = "encryptedContent", borrow, default)]
            encrypted_content: Option<&'a RawValue>,
        }
        let body = request.body;
        if !is_json_object(body) {
            return Err(IngestError::malformed("body is not JSON: not an object"));
        }
        let payload: Batch<'_> = serde_json::from_slice(body)
            .map_err(|error| IngestError::malformed(format!("body is not JSON: {error}")))?;
        let items = payload
            .value
            .filter(|value| value.get().starts_with('['))
            .ok_or_else(|| IngestError::malformed("value must be an array of notifications"))?;
        let items = Item::elements(body, items, "value")?;
        // Verification reads only clientState, tenantId and whether content is encrypted, borrowed from the
        // body, for every item before anything is decrypted or normalized.
        let mut rich = false;
        for (index, item) in items.iter().enumerate() {
            if !item.is_object() {
                return Err(IngestError::malformed(format!(
                    "value[{index}] must be an object"
                )));
            }
            let credentials: Credentials<'_> =
                serde_json::from_str(item.json).map_err(|error| {
                    IngestError::malformed(format!("value[{index}] is not a notification: {error}"))
                })?;
            let presented = credentials.client_state.as_deref().unwrap_or_default();
            if !self.client_state_matches(presented) {
                return Err(IngestError::unauthenticated(
                    "client_state",
                    format!("value[{index}].clientState does not match"),
                ));
            }
            if !self.tenant_allowed(credentials.tenant_id.as_deref().unwrap_or_default()) {
                return Err(IngestError::unauthenticated(
                    "tenant",
                    format!("value[{index}].tenantId is not an allowed tenant"),
                ));
            }
            rich |= credentials
                .encrypted_content
                .is_some_and(|content| content.get().starts_with('{'));
        }
        let tokens = payload.validation_tokens.as_ref().and_then(Value::as_array);
        if rich && tokens.is_none_or(Vec::is_empty) {
            return Err(IngestError::unauthenticated(
                "jwt",
                "rich notifications without validationTokens",
            ));
        }
        if rich || (tokens.is_some() && self.jwks.is_some()) {
            for token in tokens.into_iter().flatten() {
                let token = token.as_str().ok_or_else(|| {
                    IngestError::unauthenticated("jwt", "a validation token is not a string")
                })?;
                self.verify_token(token, request.now_secs)?;
            }
        }
        // One item parsed at a time: memory stays proportional to the body.
        let mut events = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let value: Value = serde_json::from_str(item.json).map_err(|error| {
                IngestError::malformed(format!("value[{index}] is not JSON: {error}"))
            })?;
            let message = match &value["encryptedContent"] {
                Value::Object(_) => Some(self.decrypt(index, &value["encryptedContent"])?),
                Value::Null => None,
                _ => {
                    return Err(IngestError::malformed(format!(
                        "value[{index}].encryptedContent must be an object"
                    )));
                }
            };
            if let Some(event) = normalize(tenant, index, &value, message.as_ref())? {
                events.push(item.attach(event));
            }
        }
        Ok(Accepted {
            events,
            delivery_id: None,
            response: WebhookResponse::empty(202),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
    use cbc::cipher::BlockModeEncrypt;
    use http::HeaderMap;
    use ring::rand::{SecureRandom, SystemRandom};
    use ring::signature;
    use serde_json::json;

    const ENCRYPTION_KEY: &str =
        include_str!("../../../cli/tests/fixtures/teams-encryption-key.pem");
    const SIGNING_KEY: &str = include_str!("../../../cli/tests/fixtures/teams-signing-key.pem");
    const APP_ID: &str = "8e4f6d2a-1111-4c2b-9d3e-5a6b7c8d9e0f";
    const STATE: &str = "secretClientValue";

    fn pem_der(pem: &str) -> Vec<u8> {
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        BASE64.decode(body).expect("pem")
    }

    fn signer() -> signature::RsaKeyPair {
        signature::RsaKeyPair::from_pkcs8(&pem_der(SIGNING_KEY)).expect("signing key")
    }

    fn jwks_json() -> String {
        use rsa::traits::PublicKeyParts;
        let public = private_key("signing", SIGNING_KEY)
            .expect("key")
            .to_public_key();
        json!({"keys": [{"kty": "RSA", "use": "sig", "kid": "test-kid",
            "n": BASE64URL.encode(public.n_bytes()),
            "e": BASE64URL.encode(public.e_bytes())}]})
        .to_string()
    }

    fn jwt(claims: Value) -> String {
        let header =
            BASE64URL.encode(json!({"alg": "RS256", "typ": "JWT", "kid": "test-kid"}).to_string());
        let input = format!("{header}.{}", BASE64URL.encode(claims.to_string()));
        let mut sig = vec![0; signer().public().modulus_len()];
        signer()
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("sign");
        format!("{input}.{}", BASE64URL.encode(sig))
    }

    fn good_claims() -> Value {
        let now = now_micros() / 1_000_000;
        json!({"aud": APP_ID, "azp": GRAPH_NOTIFICATION_PUBLISHER, "exp": now + 3600, "nbf": now - 60,
               "iss": "https://sts.windows.net/tid/", "tid": "tid"})
    }

    fn teams() -> Teams {
        let key = private_key("cert-1", ENCRYPTION_KEY).expect("key");
        Teams::from_parts(
            vec!["old-state".into(), STATE.into()],
            HashMap::from([("cert-1".to_string(), key)]),
            Some(APP_ID.into()),
            Some(Jwks::from_json(&jwks_json()).expect("jwks")),
            vec![],
        )
        .expect("teams")
    }

    fn encrypt(resource: &Value) -> Value {
        let mut key = [0u8; 32];
        SystemRandom::new().fill(&mut key).expect("random");
        let plain = resource.to_string().into_bytes();
        let mut buffer = vec![0u8; plain.len() + 16];
        buffer[..plain.len()].copy_from_slice(&plain);
        let data = cbc::Encryptor::<Aes256>::new_from_slices(&key, &key[..16])
            .expect("key")
            .encrypt_padded::<Pkcs7>(&mut buffer, plain.len())
            .expect("pad")
            .to_vec();
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &data);
        let public = private_key("cert-1", ENCRYPTION_KEY)
            .expect("key")
            .to_public_key();
        let wrapped = public.oaep_encrypt::<Sha1>(&key).expect("wrap");
        json!({"data": BASE64.encode(&data), "dataSignature": BASE64.encode(tag.as_ref()),
               "dataKey": BASE64.encode(wrapped), "encryptionCertificateId": "cert-1",
               "encryptionCertificateThumbprint": "07293748CC064953A3052FB978C735FB89E61C3D"})
    }

    fn chat_message() -> Value {
        json!({"id": "1616990032035", "replyToId": null, "messageType": "message",
               "createdDateTime": "2021-03-29T03:53:52.035Z", "lastModifiedDateTime": "2021-03-29T03:53:52.035Z",
               "deletedDateTime": null, "chatId": "19:8b081ef6-4792-4def-b2c9-c363a1bf41d5_5031bb31@unq.gbl.spaces",
               "from": {"user": {"id": "8ea0e38b-efb3-4757-924a-5f94061cf8c2", "displayName": "Robin Kline"}},
               "body": {"contentType": "html", "content": "<p>Hello <at id=\"0\">Alex</at></p>"},
               "attachments": [{"id": "a1", "contentType": "reference", "contentUrl": "https://contoso.sharepoint.com/f.docx", "name": "f.docx"}],
               "mentions": [{"id": 0, "mentionText": "Alex", "mentioned": {"user": {"id": "u-alex", "displayName": "Alex"}}}]})
    }

    fn item(change: &str, encrypted: Option<Value>) -> Value {
        let mut item = json!({"subscriptionId": "sub-1", "changeType": change, "clientState": STATE,
            "tenantId": "tid", "subscriptionExpirationDateTime": "2030-01-01T00:00:00Z",
            "resource": "chats('19:8b081ef6-4792-4def-b2c9-c363a1bf41d5_5031bb31@unq.gbl.spaces')/messages('1616990032035')",
            "resourceData": {"id": "1616990032035", "@odata.type": "#Microsoft.Graph.chatMessage"}});
        if let Some(content) = encrypted {
            item["encryptedContent"] = content;
        }
        item
    }

    fn handle(
        teams: &Teams,
        query: Option<&str>,
        body: &[u8],
    ) -> std::result::Result<Accepted, IngestError> {
        let headers = HeaderMap::new();
        teams.handle(
            "acme",
            &WebhookRequest {
                headers: &headers,
                query,
                body,
                now_secs: now_micros() / 1_000_000,
                replay_window_secs: 300,
            },
        )
    }

    fn rich(items: Vec<Value>, tokens: Vec<String>) -> Vec<u8> {
        json!({"value": items, "validationTokens": tokens})
            .to_string()
            .into_bytes()
    }

    fn reason(result: std::result::Result<Accepted, IngestError>) -> String {
        match result {
            Err(IngestError::Unauthenticated { reason, .. }) => format!("401 {reason}"),
            Err(IngestError::Malformed(message)) => format!("400 {message}"),
            Err(other) => format!("{} {other}", other.reason()),
            Ok(accepted) => format!("ok {}", accepted.events.len()),
        }
    }

    #[test]
    fn validation_token_is_echoed_decoded() {
        let accepted = handle(
            &teams(),
            Some("validationToken=Validation%3a%20Testing+client%2Fx"),
            b"",
        )
        .expect("handshake");
        assert!(accepted.events.is_empty());
        assert_eq!(accepted.response.status, 200);
        assert_eq!(accepted.response.content_type, Some("text/plain"));
        assert_eq!(accepted.response.body, b"Validation: Testing+client/x");
        assert!(matches!(
            handle(&teams(), Some("validationToken=%ff"), b""),
            Err(IngestError::Malformed(_))
        ));
    }

    #[test]
    fn rich_created_message_is_decrypted_and_mapped() {
        let body = rich(
            vec![item("created", Some(encrypt(&chat_message())))],
            vec![jwt(good_claims())],
        );
        let accepted = handle(&teams(), None, &body).expect("accepted");
        assert_eq!(accepted.response, WebhookResponse::empty(202));
        let event = &accepted.events[0];
        assert_eq!(event.kind, EventKind::MessageCreated as i32);
        assert_eq!(event.message_id, "1616990032035");
        assert_eq!(
            event.conversation_id,
            "19:8b081ef6-4792-4def-b2c9-c363a1bf41d5_5031bb31@unq.gbl.spaces"
        );
        assert_eq!(event.text, "<p>Hello <at id=\"0\">Alex</at></p>");
        assert_eq!(event.mentions, vec!["u-alex"]);
        assert_eq!(
            event.attachments[0].url,
            "https://contoso.sharepoint.com/f.docx"
        );
        assert_eq!(
            event.sender.as_ref().map(|s| s.display_name.as_str()),
            Some("Robin Kline")
        );
        assert_eq!(
            event.occurred_at_micros,
            parse_rfc3339_micros("2021-03-29T03:53:52.035Z").unwrap()
        );
        // The evidence is the item's own bytes, verbatim, at its offset in the body (not the whole body).
        let offset = event.raw_payload_offset as usize;
        assert_eq!(
            &body[offset..offset + event.raw_payload.len()],
            event.raw_payload.as_slice()
        );
        let item: Value = serde_json::from_slice(&event.raw_payload).expect("item JSON");
        assert_eq!(item["changeType"], "created");
        assert!(event.raw_payload.len() < body.len());
    }

    #[test]
    fn updates_edit_or_soft_delete_and_channel_replies_thread() {
        let mut reply = chat_message();
        reply["chatId"] = Value::Null;
        reply["replyToId"] = json!("1616990000000");
        reply["channelIdentity"] = json!({"teamId": "team-1", "channelId": "19:chan@thread.tacv2"});
        reply["from"] = json!({"application": {"id": "bot-1", "displayName": "Bot"}});
        reply["lastModifiedDateTime"] = json!("2021-03-29T04:00:00Z");
        let mut deleted = chat_message();
        deleted["deletedDateTime"] = json!("2021-03-29T05:00:00Z");
        let body = rich(
            vec![
                item("updated", Some(encrypt(&reply))),
                item("updated", Some(encrypt(&deleted))),
            ],
            vec![jwt(good_claims())],
        );
        let events = handle(&teams(), None, &body).expect("accepted").events;
        assert_eq!(events[0].kind, EventKind::MessageEdited as i32);
        assert_eq!(
            (
                events[0].thread_id.as_str(),
                events[0].workspace_id.as_str()
            ),
            ("1616990000000", "team-1")
        );
        assert_eq!(events[0].conversation_id, "19:chan@thread.tacv2");
        assert!(events[0].sender.as_ref().is_some_and(|s| s.is_bot));
        assert_eq!(events[1].kind, EventKind::MessageDeleted as i32);
        assert_eq!(
            events[1].occurred_at_micros,
            parse_rfc3339_micros("2021-03-29T05:00:00Z").unwrap()
        );
        assert!(events[1].text.is_empty());
    }

    #[test]
    fn basic_notifications_and_lifecycle_events() {
        let mut channel_delete = item("deleted", None);
        channel_delete["resource"] = json!(
            "teams('team-1')/channels('19:chan@thread.tacv2')/messages('100')/replies('101')"
        );
        let lifecycle = json!({"subscriptionId": "sub-9", "lifecycleEvent": "missed", "clientState": STATE,
            "resource": "chats/getAllMessages", "tenantId": "tid"});
        let body = json!({"value": [channel_delete, item("created", None), lifecycle]}).to_string();
        let events = handle(&teams(), None, body.as_bytes())
            .expect("accepted")
            .events;
        assert_eq!(events[0].kind, EventKind::MessageDeleted as i32);
        assert_eq!(
            (
                events[0].workspace_id.as_str(),
                events[0].conversation_id.as_str(),
                events[0].message_id.as_str(),
                events[0].thread_id.as_str()
            ),
            ("team-1", "19:chan@thread.tacv2", "101", "100")
        );
        assert_eq!(events[1].kind, EventKind::CaptureGap as i32);
        assert_eq!(events[1].message_id, "1616990032035");
        assert_eq!(events[2].kind, EventKind::CaptureGap as i32);
        assert_eq!(events[2].conversation_id, "subscription:sub-9");
        assert!(events[2].text.contains("missed"));
    }

    #[test]
    fn verification_failures_are_refused() {
        let teams = teams();
        let good = || item("created", Some(encrypt(&chat_message())));
        let mut wrong_state = good();
        wrong_state["clientState"] = json!("guess");
        assert_eq!(
            reason(handle(
                &teams,
                None,
                &rich(vec![good(), wrong_state], vec![jwt(good_claims())])
            )),
            "401 client_state"
        );
        let mut tampered = good();
        let mut data = BASE64
            .decode(tampered["encryptedContent"]["data"].as_str().unwrap())
            .unwrap();
        data[0] ^= 1;
        tampered["encryptedContent"]["data"] = json!(BASE64.encode(data));
        assert_eq!(
            reason(handle(
                &teams,
                None,
                &rich(vec![tampered], vec![jwt(good_claims())])
            )),
            "401 signature"
        );
        let mut unknown = good();
        unknown["encryptedContent"]["encryptionCertificateId"] = json!("cert-9");
        assert!(
            reason(handle(
                &teams,
                None,
                &rich(vec![unknown], vec![jwt(good_claims())])
            ))
            .contains("\"cert-9\"")
        );
        assert_eq!(
            reason(handle(&teams, None, &rich(vec![good()], vec![]))),
            "401 jwt"
        );
        let mut claims = good_claims();
        claims["aud"] = json!("someone-else");
        assert_eq!(
            reason(handle(&teams, None, &rich(vec![good()], vec![jwt(claims)]))),
            "401 jwt"
        );
        let mut claims = good_claims();
        claims["exp"] = json!(now_micros() / 1_000_000 - 301);
        assert_eq!(
            reason(handle(&teams, None, &rich(vec![good()], vec![jwt(claims)]))),
            "401 jwt"
        );
        let mut claims = good_claims();
        claims["azp"] = json!("not-graph");
        assert_eq!(
            reason(handle(&teams, None, &rich(vec![good()], vec![jwt(claims)]))),
            "401 jwt"
        );
        let forged = jwt(good_claims()).replace('.', ".x").replacen(".x", ".", 1);
        assert_eq!(
            reason(handle(&teams, None, &rich(vec![good()], vec![forged]))),
            "401 jwt"
        );
        assert!(reason(handle(&teams, None, b"{not json")).starts_with("400"));
        assert_eq!(
            reason(handle(
                &teams,
                None,
                &rich(vec![good()], vec![jwt(good_claims())])
            )),
            "ok 1"
        );
    }

    #[test]
    fn extreme_token_times_do_not_overflow() {
        let teams = teams();
        let body = |claims: Value| {
            rich(
                vec![item("created", Some(encrypt(&chat_message())))],
                vec![jwt(claims)],
            )
        };
        let with = |name: &str, value: Value| {
            let mut claims = good_claims();
            claims[name] = value;
            claims
        };
        // i64::MAX + skew overflowed; a token valid until the end of time is simply not expired.
        assert_eq!(
            reason(handle(&teams, None, &body(with("exp", json!(i64::MAX))))),
            "ok 1"
        );
        assert_eq!(
            reason(handle(&teams, None, &body(with("exp", json!(1e300))))),
            "ok 1"
        );
        for expired in [json!(i64::MIN), json!(-1e300)] {
            assert_eq!(
                reason(handle(&teams, None, &body(with("exp", expired)))),
                "401 jwt"
            );
        }
        assert_eq!(
            reason(handle(&teams, None, &body(with("nbf", json!(i64::MIN))))),
            "ok 1"
        );
        assert_eq!(
            reason(handle(&teams, None, &body(with("nbf", json!(i64::MAX))))),
            "401 jwt"
        );
    }

    #[test]
    fn tenant_allow_list_and_resource_paths() {
        let mut limited = teams();
        limited.tenant_ids = vec!["other".into()];
        let body = json!({"value": [item("deleted", None)]}).to_string();
        assert_eq!(
            reason(handle(&limited, None, body.as_bytes())),
            "401 tenant"
        );
        let ids = resource_ids("/teams/t1/channels/c1/messages/m1");
        assert_eq!(
            (
                ids["teams"].as_str(),
                ids["channels"].as_str(),
                ids["messages"].as_str()
            ),
            ("t1", "c1", "m1")
        );
        assert_eq!(percent_decode("a%2Bb+c").as_deref(), Some("a+b+c"));
    }

    #[test]
    fn an_exported_message_has_the_identity_of_its_live_notification() {
        use chatvault_core::event::derive_event_id;
        let message = json!({
            "id": "1700000000000", "messageType": "message", "chatId": "19:abc@thread.v2",
            "createdDateTime": "2023-11-14T22:13:20.000Z", "lastModifiedDateTime": "2023-11-14T22:20:00.000Z",
            "lastEditedDateTime": "2023-11-14T22:15:00.000Z", "deletedDateTime": "2023-11-14T22:30:00.000Z",
            "from": {"user": {"id": "u1", "displayName": "Ann"}},
            "body": {"contentType": "html", "content": "<p>hi</p>"},
            "reactions": [{"reactionType": "like", "createdDateTime": "2023-11-14T22:14:00.000Z",
                           "user": {"user": {"id": "u2", "displayName": "Bob"}}}]
        });
        let live = |change: &str| {
            let item = json!({"changeType": change, "resource": "chats('19:abc@thread.v2')/messages('1700000000000')"});
            let event = normalize("acme", 0, &item, Some(&message))
                .expect("ok")
                .expect("event");
            derive_event_id(&event)
        };
        let (events, skipped) = exported_message_events("acme", &message, b"{}").expect("events");
        assert!(skipped.is_empty());
        let kinds: Vec<i32> = events.iter().map(|event| event.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::MessageCreated,
                EventKind::MessageEdited,
                EventKind::ReactionAdded,
                EventKind::MessageDeleted
            ]
            .map(|kind| kind as i32)
        );
        assert_eq!(derive_event_id(&events[0]), live("created"));
        // A soft delete notified live (an update carrying deletedDateTime) is the exported deletion.
        assert_eq!(derive_event_id(&events[3]), live("updated"));

        let system = json!({
            "id": "2", "messageType": "systemEventMessage", "chatId": "19:abc@thread.v2",
            "createdDateTime": "2023-11-14T22:13:20.000Z",
            "eventDetail": {"@odata.type": "#microsoft.graph.membersAddedEventMessageDetail",
                            "members": [{"id": "u3", "displayName": "Carl"}, {"id": "u4"}]}
        });
        let (events, _) = exported_message_events("acme", &system, b"{}").expect("events");
        assert_eq!(events.len(), 2);
        assert!(
            events
                .iter()
                .all(|event| event.kind == EventKind::MemberJoined as i32)
        );
        let call = json!({"id": "3", "messageType": "systemEventMessage", "chatId": "c",
            "createdDateTime": "2023-11-14T22:13:20.000Z",
            "eventDetail": {"@odata.type": "#microsoft.graph.callEndedEventMessageDetail"}});
        let (events, skipped) = exported_message_events("acme", &call, b"{}").expect("events");
        assert!(events.is_empty());
        assert_eq!(
            skipped,
            vec!["system event microsoft.graph.callEndedEventMessageDetail"]
        );
    }
}
