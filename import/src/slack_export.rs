//! Slack's Export Data ZIP (standard and corporate exports; `../shared/reference/backfill.md` §1).
//!
//! Layout: index files at the root (`channels.json`, and where the export has them `groups.json` for private
//! channels, `dms.json`, `mpims.json`; `users.json` or `org_users.json`), then one folder per conversation
//! with one JSON array of messages per day, `<folder>/YYYY-MM-DD.json`. A channel's folder is its name and a
//! DM's its id; the index files map folders to conversation ids. Each day file is one unit of the checkpoint,
//! the index files another (`index`: the conversations' creation events).
//!
//! Identity: an exported message is `(workspace, channel id, ts)`, the same as the Events API's `(team_id,
//! event.channel, event.ts)`; both go through `webhooks::slack::created_message`, so a message captured live
//! and imported is one archived event. The workspace is `--workspace`, or else the team id most users of
//! `users.json` belong to.
//!
//! What an export is, and so what the archive gets from it:
//! - a snapshot: a message's current text is archived as its creation, plus an edit at `edited.ts` when the
//!   export records one (the text before the edit is not in the export);
//! - reactions carry no time: each `(reaction, user)` is archived as added at the message's own time, so any
//!   reaction event captured live (which is later) decides the current state;
//! - deletions are absent, except a deleted thread parent, kept as a `tombstone`, archived as a deletion;
//! - joins, leaves, renames and archiving come as message subtypes and are archived as membership and
//!   conversation events; other visible subtypes (bot messages, file shares, `/me`, reminders, ...) as
//!   messages; change notifications (`message_changed`, `message_deleted`, `message_replied`) are counted and
//!   skipped;
//! - file links carry an export token (`?t=xoxe-…`), removed from attachment URLs and raw payloads alike.
//!
//! Enterprise Grid organisation exports (`teams/<workspace>/…`) are refused with an error: import each
//! workspace's export instead.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;

use chatvault_core::error::{Error, Result};
use chatvault_ingest_gateway::webhooks::slack::{
    attachments, created_message, edited_message, sender, slack_time, thread_of,
};
use chatvault_proto::v1::{ChatEvent, EventKind, Source as Platform};
use serde_json::Value;
use zip::ZipArchive;

use crate::{Part, PartFuture, Rejection, Source, Unit};

/// The unit of the index files.
pub const INDEX_UNIT: &str = "index";

/// Largest day file read (uncompressed): a day of one channel is far smaller.
const MAX_ENTRY_BYTES: u64 = 256 * 1024 * 1024;

/// Who imports, into which tenant and workspace.
#[derive(Debug, Clone)]
pub struct Options {
    pub tenant: String,
    /// The Slack team id (`T…`) the export is of; inferred from `users.json` when `None`.
    pub workspace: Option<String>,
}

#[derive(Debug, Clone)]
struct Conversation {
    id: String,
    /// Channel name; empty for a DM.
    name: String,
    created_secs: i64,
    creator: String,
}

/// An opened Slack export.
pub struct SlackExport<R: Read + Seek> {
    archive: ZipArchive<R>,
    fingerprint: String,
    tenant: String,
    workspace: String,
    /// Folder → conversation.
    conversations: BTreeMap<String, Conversation>,
    /// User id → display name.
    display_names: HashMap<String, String>,
    units: Vec<String>,
}

impl SlackExport<std::fs::File> {
    /// Opens the export at `path` (reading it once whole for its fingerprint).
    pub fn open(path: &Path, options: Options) -> Result<Self> {
        let unreadable = |error: std::io::Error| {
            Error::invalid_argument(format!("{} cannot be read: {error}", path.display()))
        };
        let fingerprint = crate::fingerprint(std::fs::File::open(path).map_err(unreadable)?)
            .map_err(unreadable)?;
        let file = std::fs::File::open(path).map_err(unreadable)?;
        SlackExport::from_reader(file, fingerprint, options)
    }
}

impl<R: Read + Seek> SlackExport<R> {
    /// Opens an export from `reader`, whose content has SHA-256 `fingerprint`.
    pub fn from_reader(reader: R, fingerprint: String, options: Options) -> Result<Self> {
        let mut archive = ZipArchive::new(reader).map_err(|error| {
            Error::invalid_argument(format!("not a readable ZIP archive: {error}"))
        })?;
        let names = crate::zip_entry_names(&archive)?;
        if names.iter().any(|name| name.starts_with("teams/")) {
            return Err(Error::invalid_argument(
                "this is an Enterprise Grid organisation export (teams/<workspace>/...), which is not supported: \
                 import each workspace's export",
            ));
        }
        if !names.iter().any(|name| name == "channels.json") {
            return Err(Error::invalid_argument(
                "not a Slack export: there is no channels.json at the root of the archive",
            ));
        }
        let mut users = Vec::new();
        for index in ["users.json", "org_users.json"] {
            if let Some(list) = read_index(&mut archive, index)? {
                users.extend(list);
            }
        }
        let mut display_names = HashMap::new();
        let mut teams: BTreeMap<String, usize> = BTreeMap::new();
        for user in &users {
            let Some(id) = user["id"].as_str() else {
                continue;
            };
            let profile = &user["profile"];
            let name = [
                &profile["display_name"],
                &profile["real_name"],
                &user["real_name"],
                &user["name"],
            ]
            .into_iter()
            .filter_map(Value::as_str)
            .find(|name| !name.is_empty())
            .unwrap_or_default();
            display_names.insert(id.to_string(), name.to_string());
            if let Some(team) = user["team_id"].as_str().filter(|team| !team.is_empty()) {
                *teams.entry(team.to_string()).or_default() += 1;
            }
        }
        let workspace = match options.workspace {
            Some(workspace) => workspace,
            None => teams
                .iter()
                .max_by_key(|(_, count)| **count)
                .map(|(team, _)| team.clone())
                .ok_or_else(|| {
                    Error::invalid_argument(
                        "cannot tell which Slack workspace this export is of (users.json names no team_id): \
                         pass --workspace with the team id (T...)",
                    )
                })?,
        };

        let mut conversations = BTreeMap::new();
        for (index, folder_is_id) in [
            ("channels.json", false),
            ("groups.json", false),
            ("mpims.json", false),
            ("dms.json", true),
        ] {
            for (position, entry) in read_index(&mut archive, index)?
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let id = entry["id"]
                    .as_str()
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        Error::invalid_argument(format!("{index}: entry {position} has no id"))
                    })?;
                let name = entry["name"].as_str().unwrap_or_default();
                let folder = if folder_is_id || name.is_empty() {
                    id
                } else {
                    name
                };
                conversations.insert(
                    folder.to_string(),
                    Conversation {
                        id: id.to_string(),
                        name: if folder_is_id {
                            String::new()
                        } else {
                            name.to_string()
                        },
                        created_secs: entry["created"].as_i64().unwrap_or(0),
                        creator: entry["creator"].as_str().unwrap_or_default().to_string(),
                    },
                );
            }
        }

        let mut units = vec![INDEX_UNIT.to_string()];
        let mut days: Vec<String> = names.into_iter().filter(|name| is_day_file(name)).collect();
        days.sort();
        units.extend(days);
        Ok(SlackExport {
            archive,
            fingerprint,
            tenant: options.tenant,
            workspace,
            conversations,
            display_names,
            units,
        })
    }

    /// One unit of [`Source::units`], whole.
    pub fn read_unit(&mut self, unit: &str) -> Result<Unit> {
        if unit == INDEX_UNIT {
            Ok(self.index_unit())
        } else {
            self.day_unit(unit)
        }
    }

    /// The workspace (team id) the export's events are archived under.
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    fn base(&self) -> ChatEvent {
        ChatEvent {
            tenant_id: self.tenant.clone(),
            source: Platform::Slack as i32,
            workspace_id: self.workspace.clone(),
            ..ChatEvent::default()
        }
    }

    fn index_unit(&self) -> Unit {
        let mut unit = Unit {
            name: INDEX_UNIT.into(),
            ..Unit::default()
        };
        for conversation in self.conversations.values() {
            if conversation.created_secs <= 0 {
                continue;
            }
            unit.events.push(ChatEvent {
                kind: EventKind::ConversationCreated as i32,
                conversation_id: conversation.id.clone(),
                sender: sender(&Value::String(conversation.creator.clone()), false),
                text: conversation.name.clone(),
                occurred_at_micros: conversation.created_secs.saturating_mul(1_000_000),
                ..self.base()
            });
        }
        unit
    }

    fn day_unit(&mut self, name: &str) -> Result<Unit> {
        let mut unit = Unit {
            name: name.into(),
            ..Unit::default()
        };
        let folder = name.split('/').next().unwrap_or_default();
        let Some(conversation) = self.conversations.get(folder).cloned() else {
            unit.rejected.push(Rejection {
                unit: name.into(),
                item: "day file".into(),
                reason: format!(
                    "folder {folder:?} is in no index file (channels.json, groups.json, mpims.json, dms.json), \
                     so its conversation id is unknown"
                ),
            });
            return Ok(unit);
        };
        let messages = match read_json(&mut self.archive, name)? {
            Ok(Value::Array(messages)) => messages,
            Ok(_) => {
                unit.rejected.push(Rejection {
                    unit: name.into(),
                    item: "day file".into(),
                    reason: "is not a JSON array of messages".into(),
                });
                return Ok(unit);
            }
            Err(reason) => {
                unit.rejected.push(Rejection {
                    unit: name.into(),
                    item: "day file".into(),
                    reason,
                });
                return Ok(unit);
            }
        };
        for (position, message) in messages.into_iter().enumerate() {
            if let Err(reason) = self.message_events(&conversation, message, &mut unit) {
                unit.rejected.push(Rejection {
                    unit: name.into(),
                    item: format!("message {position}"),
                    reason,
                });
            }
        }
        Ok(unit)
    }

    /// The events of one exported message, appended to `unit`; `Err` says why it cannot be archived.
    fn message_events(
        &self,
        conversation: &Conversation,
        mut message: Value,
        unit: &mut Unit,
    ) -> std::result::Result<(), String> {
        if !message.is_object() {
            return Err("is not a JSON object".into());
        }
        let occurred = slack_time(&message["ts"], "ts").map_err(|error| error.to_string())?;
        remove_export_tokens(&mut message);
        let channel = conversation.id.clone();
        let base = ChatEvent {
            raw_payload: serde_json::to_vec(&message).expect("a JSON value serializes"),
            raw_content_type: "application/json".into(),
            ..self.base()
        };
        let subtype = message["subtype"].as_str().unwrap_or_default().to_string();
        let member = |kind: EventKind| ChatEvent {
            kind: kind as i32,
            conversation_id: channel.clone(),
            sender: self.named(sender(&message["user"], false)),
            occurred_at_micros: occurred,
            ..base.clone()
        };
        let event = match subtype.as_str() {
            "message_changed" | "message_deleted" | "message_replied" => {
                unit.skipped
                    .push(format!("subtype {subtype} (a change notification)"));
                return Ok(());
            }
            "channel_join" | "group_join" => member(EventKind::MemberJoined),
            "channel_leave" | "group_leave" => member(EventKind::MemberLeft),
            "channel_archive" | "group_archive" => member(EventKind::ConversationArchived),
            "channel_name" | "group_name" => ChatEvent {
                text: message["name"].as_str().unwrap_or_default().to_string(),
                ..member(EventKind::ConversationRenamed)
            },
            "tombstone" => ChatEvent {
                kind: EventKind::MessageDeleted as i32,
                conversation_id: channel.clone(),
                message_id: message["ts"].as_str().unwrap_or_default().to_string(),
                thread_id: thread_of(&message),
                occurred_at_micros: occurred,
                ..base.clone()
            },
            _ => {
                let mut created = created_message(base.clone(), channel.clone(), &message)
                    .map_err(|error| error.to_string())?;
                if created.attachments.is_empty() && message["file"].is_object() {
                    // Old exports carry a single `file`.
                    created.attachments = attachments(&Value::Array(vec![message["file"].clone()]));
                }
                if let Some(sender) = created.sender.as_mut() {
                    sender.display_name = self.display_name(&sender.id, &message);
                }
                let edit = match &message["edited"]["ts"] {
                    Value::Null => None,
                    ts => {
                        let edited_at =
                            slack_time(ts, "edited.ts").map_err(|error| error.to_string())?;
                        let mut edit = edited_message(
                            ChatEvent {
                                raw_payload: Vec::new(),
                                raw_content_type: String::new(),
                                ..base.clone()
                            },
                            channel.clone(),
                            &message,
                            edited_at,
                        );
                        edit.attachments.clone_from(&created.attachments);
                        edit.sender.clone_from(&created.sender);
                        Some(edit)
                    }
                };
                let message_id = created.message_id.clone();
                unit.events.push(created);
                unit.events.extend(edit);
                for reaction in message["reactions"].as_array().into_iter().flatten() {
                    let name = reaction["name"].as_str().unwrap_or_default();
                    for user in reaction["users"].as_array().into_iter().flatten() {
                        unit.events.push(ChatEvent {
                            kind: EventKind::ReactionAdded as i32,
                            conversation_id: channel.clone(),
                            message_id: message_id.clone(),
                            sender: self.named(sender(user, false)),
                            reaction: name.to_string(),
                            occurred_at_micros: occurred,
                            ..self.base()
                        });
                    }
                }
                return Ok(());
            }
        };
        unit.events.push(event);
        Ok(())
    }

    fn named(
        &self,
        sender: Option<chatvault_proto::v1::Sender>,
    ) -> Option<chatvault_proto::v1::Sender> {
        sender.map(|mut sender| {
            sender.display_name = self
                .display_names
                .get(&sender.id)
                .cloned()
                .unwrap_or_default();
            sender
        })
    }

    /// From `users.json`, else the message's own `user_profile`, else a bot message's `username`.
    fn display_name(&self, id: &str, message: &Value) -> String {
        if let Some(name) = self.display_names.get(id).filter(|name| !name.is_empty()) {
            return name.clone();
        }
        [
            &message["user_profile"]["display_name"],
            &message["user_profile"]["real_name"],
            &message["username"],
            &message["bot_profile"]["name"],
        ]
        .into_iter()
        .filter_map(Value::as_str)
        .find(|name| !name.is_empty())
        .unwrap_or_default()
        .to_string()
    }
}

impl<R: Read + Seek> Source for SlackExport<R> {
    fn kind(&self) -> &'static str {
        "slack-export"
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn units(&self) -> Vec<String> {
        self.units.clone()
    }

    fn read<'a>(&'a mut self, unit: &'a str, _cursor: Option<String>) -> PartFuture<'a> {
        let read = if unit == INDEX_UNIT {
            Ok(self.index_unit())
        } else {
            self.day_unit(unit)
        };
        Box::pin(std::future::ready(
            read.map(|unit| Part { unit, next: None }),
        ))
    }
}

/// `<folder>/YYYY-MM-DD.json`.
fn is_day_file(name: &str) -> bool {
    let Some((folder, file)) = name.split_once('/') else {
        return false;
    };
    let Some(date) = file.strip_suffix(".json") else {
        return false;
    };
    !folder.is_empty()
        && date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

/// An index file as a list, `None` when the export has none.
fn read_index<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    name: &str,
) -> Result<Option<Vec<Value>>> {
    if archive.index_for_name(name).is_none() {
        return Ok(None);
    }
    match read_json(archive, name)? {
        Ok(Value::Array(list)) => Ok(Some(list)),
        Ok(_) => Err(Error::invalid_argument(format!(
            "{name} is not a JSON array"
        ))),
        Err(reason) => Err(Error::invalid_argument(format!("{name} {reason}"))),
    }
}

/// An entry parsed as JSON. The outer error is the archive failing; the inner one, the entry's content.
fn read_json<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    name: &str,
) -> Result<std::result::Result<Value, String>> {
    let entry = archive.by_name(name).map_err(|error| {
        Error::invalid_argument(format!("{name} cannot be read from the archive: {error}"))
    })?;
    if entry.size() > MAX_ENTRY_BYTES {
        return Ok(Err(format!(
            "is {} bytes uncompressed, over the importer's limit of {MAX_ENTRY_BYTES}",
            entry.size()
        )));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .take(MAX_ENTRY_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|error| {
            Error::invalid_argument(format!("{name} cannot be decompressed: {error}"))
        })?;
    Ok(serde_json::from_slice(&bytes).map_err(|error| format!("is not valid JSON: {error}")))
}

/// Removes the export token Slack appends to file links (`?t=xoxe-…`): it grants access to the files, so it
/// must not reach the archive.
fn remove_export_tokens(value: &mut Value) {
    match value {
        Value::String(text) if text.starts_with("http") && text.contains("t=xox") => {
            if let Some((base, query)) = text.split_once('?') {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| !pair.starts_with("t=xox"))
                    .collect();
                *text = if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(remove_export_tokens),
        Value::Object(fields) => fields.values_mut().for_each(remove_export_tokens),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{Cursor, Write};

    fn export(entries: &[(&str, Value)]) -> SlackExport<Cursor<Vec<u8>>> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, value) in entries {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .expect("entry");
            writer
                .write_all(&serde_json::to_vec(value).expect("json"))
                .expect("write");
        }
        let bytes = writer.finish().expect("zip").into_inner();
        SlackExport::from_reader(
            Cursor::new(bytes),
            "f".into(),
            Options {
                tenant: "acme".into(),
                workspace: None,
            },
        )
        .expect("export")
    }

    fn kinds(unit: &Unit) -> Vec<(&'static str, String)> {
        unit.events
            .iter()
            .map(|event| {
                (
                    chatvault_core::event::kind_name(event.kind),
                    event.message_id.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn day_files_become_events_with_the_live_identity() {
        let mut slack = export(&[
            (
                "users.json",
                json!([{"id": "U1", "team_id": "T1", "name": "ann", "profile": {"display_name": "Ann"}}]),
            ),
            (
                "channels.json",
                json!([{"id": "C1", "name": "general", "created": 1_600_000_000, "creator": "U1"}]),
            ),
            (
                "general/2024-01-02.json",
                json!([
                    {"type": "message", "user": "U1", "text": "hi <@U2>", "ts": "1704153600.000100",
                     "edited": {"user": "U1", "ts": "1704153700.000000"},
                     "reactions": [{"name": "tada", "count": 2, "users": ["U1", "U2"]}],
                     "files": [{"id": "F1", "name": "a.pdf", "url_private": "https://files.slack.com/a.pdf?t=xoxe-secret"}]},
                    {"type": "message", "subtype": "channel_join", "user": "U2", "ts": "1704153800.000200"},
                    {"type": "message", "subtype": "message_changed", "ts": "1704153900.000300"},
                    {"type": "message", "user": "U1", "text": "no ts"},
                    "not an object",
                ]),
            ),
            ("random/2024-01-02.json", json!([])),
        ]);
        assert_eq!(slack.workspace(), "T1");
        assert_eq!(
            slack.units(),
            vec!["index", "general/2024-01-02.json", "random/2024-01-02.json"]
        );
        let index = slack.read_unit("index").expect("index");
        assert_eq!(kinds(&index), vec![("conversation_created", String::new())]);
        assert_eq!(index.events[0].text, "general");

        let day = slack.read_unit("general/2024-01-02.json").expect("day");
        assert_eq!(
            kinds(&day),
            vec![
                ("message_created", "1704153600.000100".into()),
                ("message_edited", "1704153600.000100".into()),
                ("reaction_added", "1704153600.000100".into()),
                ("reaction_added", "1704153600.000100".into()),
                ("member_joined", String::new()),
            ]
        );
        let created = &day.events[0];
        assert_eq!(
            (
                created.conversation_id.as_str(),
                created.workspace_id.as_str()
            ),
            ("C1", "T1")
        );
        assert_eq!(created.mentions, vec!["U2"]);
        assert_eq!(created.sender.as_ref().expect("sender").display_name, "Ann");
        assert_eq!(created.attachments[0].url, "https://files.slack.com/a.pdf");
        let raw = String::from_utf8(created.raw_payload.clone()).expect("utf-8");
        assert!(!raw.contains("xoxe"), "{raw}");
        assert_eq!(day.events[1].occurred_at_micros, 1_704_153_700_000_000);
        assert_eq!(
            day.skipped,
            vec!["subtype message_changed (a change notification)"]
        );
        let reasons: Vec<&str> = day.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            vec!["ts is missing", "is not a JSON object"],
            "{:?}",
            day.rejected
        );

        // A folder no index names cannot be given a conversation id.
        let orphan = slack.read_unit("random/2024-01-02.json").expect("orphan");
        assert!(orphan.events.is_empty());
        assert!(orphan.rejected[0].reason.contains("in no index file"));
    }

    #[test]
    fn what_is_not_a_slack_export_is_refused_with_the_reason() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .start_file("readme.txt", zip::write::SimpleFileOptions::default())
            .expect("entry");
        let bytes = writer.finish().expect("zip").into_inner();
        let options = Options {
            tenant: "acme".into(),
            workspace: None,
        };
        let error = SlackExport::from_reader(Cursor::new(bytes), "f".into(), options.clone())
            .err()
            .expect("refused");
        assert!(error.message().contains("no channels.json"), "{error}");
        let error = SlackExport::from_reader(Cursor::new(b"PK junk".to_vec()), "f".into(), options)
            .err()
            .expect("refused");
        assert!(error.message().contains("not a readable ZIP"), "{error}");
        // Without users.json the workspace must be named.
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .start_file("channels.json", zip::write::SimpleFileOptions::default())
            .expect("entry");
        writer.write_all(b"[]").expect("write");
        let bytes = writer.finish().expect("zip").into_inner();
        let error = SlackExport::from_reader(
            Cursor::new(bytes),
            "f".into(),
            Options {
                tenant: "acme".into(),
                workspace: None,
            },
        )
        .err()
        .expect("refused");
        assert!(error.message().contains("--workspace"), "{error}");
    }
}
