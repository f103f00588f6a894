//! Mattermost's bulk export (`mmctl export create`): JSON lines `{"type": T, T: {…}}`, the first a `version`
//! line, then teams, channels, users, posts, direct channels and direct posts (`../shared/reference/
//! backfill.md` §3). The file is given as the `.jsonl` itself or as the ZIP `mmctl export download` gives
//! (holding one `.jsonl`). Units are runs of [`LINES_PER_UNIT`] lines.
//!
//! Identity: the bulk format carries no ids, only names (team and channel names, usernames). Conversations
//! are therefore `<team>/<channel>` (direct channels: `direct:<usernames, sorted, comma-separated>`, or a
//! digest of them when that is longer than an id may be), senders
//! their usernames, and a post's message id is derived from its conversation, author and `create_at` (what
//! Mattermost's own importer matches on). Re-importing the same or a later export adds nothing for posts it
//! already holds; but a post captured live by an outgoing webhook (which names ids) and imported is two
//! archived events: joining them needs the REST API's ids, which the bulk format lacks.
//!
//! What a post becomes: a creation at `create_at`, an edit at `edit_at` when there is one (the export holds
//! the current text only), its reactions at their own `create_at`, and its `replies` as messages of the
//! post's thread. Join and leave system posts become membership events. Team, channel, user and other
//! definition lines carry no time and are not archived (users give display names).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chatvault_core::error::{Error, Result};
use chatvault_proto::v1::{Attachment, ChatEvent, EventKind, Sender, Source as Platform};
use serde_json::Value;

use crate::{Part, PartFuture, Rejection, Source, Unit};

/// Lines per checkpoint unit.
pub const LINES_PER_UNIT: usize = 1000;

/// Longest conversation id the gateway accepts.
const MAX_CONVERSATION_ID_BYTES: usize = 256;

/// Longest line read (a post with many replies is one line).
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Where the JSON lines are: a file, or an entry of a ZIP.
#[derive(Debug, Clone)]
enum Location {
    File(PathBuf),
    /// A ZIP `path` whose entry starts at `data_start`, `compressed` bytes long, deflated or stored.
    ZipEntry {
        path: PathBuf,
        data_start: u64,
        compressed: u64,
        deflated: bool,
    },
}

impl Location {
    fn open(&self) -> std::io::Result<Box<dyn BufRead + Send>> {
        Ok(match self {
            Location::File(path) => Box::new(BufReader::new(std::fs::File::open(path)?)),
            Location::ZipEntry {
                path,
                data_start,
                compressed,
                deflated,
            } => {
                let mut file = std::fs::File::open(path)?;
                file.seek(SeekFrom::Start(*data_start))?;
                let data = file.take(*compressed);
                if *deflated {
                    Box::new(BufReader::new(flate2::read::DeflateDecoder::new(data)))
                } else {
                    Box::new(BufReader::new(data))
                }
            }
        })
    }
}

/// An opened bulk export.
pub struct MattermostExport {
    location: Location,
    fingerprint: String,
    tenant: String,
    lines: usize,
    /// Username → display name.
    display_names: HashMap<String, String>,
    reader: Box<dyn BufRead + Send>,
    /// Index (0-based) of the next line `reader` gives.
    next_line: usize,
}

impl MattermostExport {
    /// Opens `path` (`.jsonl`, or a ZIP holding one), reading it once for its fingerprint, its line count and
    /// its users.
    pub fn open(path: &Path, tenant: &str) -> Result<MattermostExport> {
        let unreadable = |error: std::io::Error| {
            Error::invalid_argument(format!("{} cannot be read: {error}", path.display()))
        };
        let fingerprint = crate::fingerprint(std::fs::File::open(path).map_err(unreadable)?)
            .map_err(unreadable)?;
        let mut magic = [0u8; 4];
        let is_zip = std::fs::File::open(path)
            .and_then(|mut file| file.read_exact(&mut magic))
            .is_ok()
            && magic == *b"PK\x03\x04";
        let location = if is_zip {
            zip_entry(path)?
        } else {
            Location::File(path.to_path_buf())
        };
        let mut reader = location.open().map_err(unreadable)?;
        let mut line = String::new();
        let mut lines = 0;
        let mut display_names = HashMap::new();
        while read_line(&mut *reader, &mut line).map_err(unreadable)? {
            let parsed: Option<Value> = serde_json::from_str(&line).ok();
            if lines == 0 {
                let version = parsed.as_ref().filter(|value| value["type"] == "version");
                if version.is_none() {
                    return Err(Error::invalid_argument(
                        "not a Mattermost bulk export: its first line is not a {\"type\": \"version\", ...} line",
                    ));
                }
            }
            if let Some(user) = parsed.as_ref().filter(|value| value["type"] == "user") {
                let user = &user["user"];
                if let Some(username) = user["username"].as_str() {
                    display_names.insert(username.to_string(), display_name(user));
                }
            }
            lines += 1;
        }
        if lines == 0 {
            return Err(Error::invalid_argument(
                "not a Mattermost bulk export: it is empty",
            ));
        }
        let reader = location.open().map_err(unreadable)?;
        Ok(MattermostExport {
            location,
            fingerprint,
            tenant: tenant.to_string(),
            lines,
            display_names,
            reader,
            next_line: 0,
        })
    }

    fn sender(&self, username: &str) -> Option<Sender> {
        (!username.is_empty()).then(|| Sender {
            id: username.to_string(),
            display_name: self
                .display_names
                .get(username)
                .cloned()
                .unwrap_or_default(),
            is_bot: false,
        })
    }

    /// The events of one line, appended to `unit`; `Err` says why the line cannot be archived.
    fn line_events(&self, line: &str, unit: &mut Unit) -> std::result::Result<(), String> {
        let value: Value =
            serde_json::from_str(line).map_err(|error| format!("is not valid JSON: {error}"))?;
        let kind = value["type"].as_str().unwrap_or_default();
        let (post, conversation) = match kind {
            "post" => {
                let post = &value["post"];
                let team = post["team"].as_str().unwrap_or_default();
                let channel = post["channel"].as_str().unwrap_or_default();
                if team.is_empty() || channel.is_empty() {
                    return Err("a post without its team and channel".into());
                }
                (post, format!("{team}/{channel}"))
            }
            "direct_post" => {
                let post = &value["direct_post"];
                let mut members: Vec<&str> = post["channel_members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if members.is_empty() {
                    return Err("a direct post without channel_members".into());
                }
                members.sort_unstable();
                members.dedup();
                let mut id = format!("direct:{}", members.join(","));
                if id.len() > MAX_CONVERSATION_ID_BYTES {
                    // A large group DM: its members do not fit an id, their digest does.
                    id = format!("direct:{}", post_id(&members.join(","), "", 0));
                }
                (post, id)
            }
            "" => return Err("has no type".into()),
            other => {
                unit.skipped
                    .push(format!("{other} lines (definitions without a time)"));
                return Ok(());
            }
        };
        let raw = line.as_bytes().to_vec();
        self.post_events(post, &conversation, "", Some(raw), unit)
    }

    fn post_events(
        &self,
        post: &Value,
        conversation: &str,
        thread_id: &str,
        raw: Option<Vec<u8>>,
        unit: &mut Unit,
    ) -> std::result::Result<(), String> {
        let user = post["user"].as_str().unwrap_or_default();
        let created_ms = post["create_at"]
            .as_i64()
            .filter(|ms| *ms > 0)
            .ok_or("has no create_at")?;
        let micros = |ms: i64| {
            ms.checked_mul(1000)
                .ok_or_else(|| format!("{ms} is not a plausible time in milliseconds"))
        };
        let occurred = micros(created_ms)?;
        let message_id = post_id(conversation, user, created_ms);
        let base = ChatEvent {
            tenant_id: self.tenant.clone(),
            source: Platform::Mattermost as i32,
            conversation_id: conversation.to_string(),
            sender: self.sender(user),
            ..ChatEvent::default()
        };
        let with_raw = |event: ChatEvent| match &raw {
            Some(raw) => ChatEvent {
                raw_payload: raw.clone(),
                raw_content_type: "application/x-ndjson".into(),
                ..event
            },
            None => event,
        };
        let text = post["message"].as_str().unwrap_or_default().to_string();
        let membership = match post["type"].as_str().unwrap_or_default() {
            "system_join_channel" | "system_add_to_channel" | "system_join_team" => {
                Some(EventKind::MemberJoined)
            }
            "system_leave_channel" | "system_remove_from_channel" | "system_leave_team" => {
                Some(EventKind::MemberLeft)
            }
            _ => None,
        };
        if let Some(kind) = membership {
            unit.events.push(with_raw(ChatEvent {
                kind: kind as i32,
                occurred_at_micros: occurred,
                ..base
            }));
            return Ok(());
        }
        let attachments: Vec<Attachment> = post["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|attachment| attachment["path"].as_str())
            .map(|path| Attachment {
                name: path.rsplit('/').next().unwrap_or(path).to_string(),
                url: path.to_string(),
                ..Attachment::default()
            })
            .collect();
        let created = ChatEvent {
            kind: EventKind::MessageCreated as i32,
            message_id: message_id.clone(),
            thread_id: thread_id.to_string(),
            occurred_at_micros: occurred,
            mentions: mentions(&text),
            text,
            attachments,
            ..base.clone()
        };
        let edit = match post["edit_at"].as_i64().filter(|ms| *ms > created_ms) {
            Some(ms) => Some(ChatEvent {
                kind: EventKind::MessageEdited as i32,
                occurred_at_micros: micros(ms)?,
                ..created.clone()
            }),
            None => None,
        };
        unit.events.push(with_raw(created));
        unit.events.extend(edit);
        for reaction in post["reactions"].as_array().into_iter().flatten() {
            let at = reaction["create_at"].as_i64().unwrap_or(created_ms);
            unit.events.push(ChatEvent {
                kind: EventKind::ReactionAdded as i32,
                message_id: message_id.clone(),
                sender: self.sender(reaction["user"].as_str().unwrap_or_default()),
                reaction: reaction["emoji_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                occurred_at_micros: micros(at.max(created_ms))?,
                ..base.clone()
            });
        }
        if thread_id.is_empty() {
            for (position, reply) in post["replies"].as_array().into_iter().flatten().enumerate() {
                self.post_events(reply, conversation, &message_id, None, unit)
                    .map_err(|reason| format!("reply {position} {reason}"))?;
            }
        }
        Ok(())
    }
}

impl Source for MattermostExport {
    fn kind(&self) -> &'static str {
        "mattermost"
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn units(&self) -> Vec<String> {
        (0..self.lines.div_ceil(LINES_PER_UNIT))
            .map(|unit| unit_name(unit * LINES_PER_UNIT, self.lines))
            .collect()
    }

    fn read<'a>(&'a mut self, unit: &'a str, _cursor: Option<String>) -> PartFuture<'a> {
        let read = self.read_lines(unit);
        Box::pin(std::future::ready(
            read.map(|unit| Part { unit, next: None }),
        ))
    }
}

impl MattermostExport {
    /// The lines of unit `name`, streamed on from where the previous unit ended.
    fn read_lines(&mut self, name: &str) -> Result<Unit> {
        let first = name
            .strip_prefix("lines ")
            .and_then(|range| range.split_once('-'))
            .and_then(|(first, _)| first.parse::<usize>().ok())
            .filter(|first| *first >= 1)
            .ok_or_else(|| Error::internal(format!("not a unit of this export: {name}")))?
            - 1;
        let unreadable =
            |error: std::io::Error| Error::unavailable(format!("reading the export: {error}"));
        if first < self.next_line {
            self.reader = self.location.open().map_err(unreadable)?;
            self.next_line = 0;
        }
        let mut line = String::new();
        while self.next_line < first {
            if !read_line(&mut *self.reader, &mut line).map_err(unreadable)? {
                return Err(Error::unavailable(
                    "the export changed while it was imported",
                ));
            }
            self.next_line += 1;
        }
        let mut unit = Unit {
            name: name.to_string(),
            ..Unit::default()
        };
        let last = (first + LINES_PER_UNIT).min(self.lines);
        while self.next_line < last {
            if !read_line(&mut *self.reader, &mut line).map_err(unreadable)? {
                return Err(Error::unavailable(
                    "the export changed while it was imported",
                ));
            }
            self.next_line += 1;
            if self.next_line == 1 {
                continue; // the version line
            }
            if let Err(reason) = self.line_events(&line, &mut unit) {
                unit.rejected.push(Rejection {
                    unit: name.to_string(),
                    item: format!("line {}", self.next_line),
                    reason,
                });
            }
        }
        Ok(unit)
    }
}

/// `lines 1001-2000` (1-based, inclusive).
fn unit_name(first: usize, lines: usize) -> String {
    format!(
        "lines {}-{}",
        first + 1,
        (first + LINES_PER_UNIT).min(lines)
    )
}

/// The message id of a post: `mm-` and 32 hex characters of SHA-256 over its conversation, author and
/// creation time (length-prefixed).
fn post_id(conversation: &str, user: &str, created_ms: i64) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [conversation, user, &created_ms.to_string()] {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part.as_bytes());
    }
    format!("mm-{}", hex::encode(&context.finish().as_ref()[..16]))
}

/// `@username` mentions (Mattermost usernames: lower-case letters, digits, `.`, `_`, `-`).
fn mentions(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for (index, _) in text.match_indices('@') {
        let before = text[..index].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric()) {
            continue; // an email address
        }
        let name: String = text[index + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .collect();
        let name = name.trim_end_matches('.').to_lowercase();
        if !name.is_empty() && !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

fn display_name(user: &Value) -> String {
    let nickname = user["nickname"].as_str().unwrap_or_default();
    if !nickname.is_empty() {
        return nickname.to_string();
    }
    let full = format!(
        "{} {}",
        user["first_name"].as_str().unwrap_or_default(),
        user["last_name"].as_str().unwrap_or_default()
    );
    full.trim().to_string()
}

/// One line into `line` (without its end); `false` at the end of the input.
fn read_line(reader: &mut dyn BufRead, line: &mut String) -> std::io::Result<bool> {
    line.clear();
    let read = (&mut *reader)
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_line(line)?;
    if read > MAX_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line is longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(read > 0)
}

/// The one `.jsonl` entry of a ZIP, as a location to stream it from.
fn zip_entry(path: &Path) -> Result<Location> {
    let invalid = |what: String| Error::invalid_argument(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|error| invalid(error.to_string()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|error| invalid(format!("not a readable ZIP archive: {error}")))?;
    let names = crate::zip_entry_names(&archive)?;
    let mut jsonl = names.iter().filter(|name| name.ends_with(".jsonl"));
    let (Some(name), None) = (jsonl.next(), jsonl.next()) else {
        return Err(invalid(
            "a Mattermost export ZIP must hold exactly one .jsonl file".into(),
        ));
    };
    let entry = archive
        .by_name_raw(name.as_bytes())
        .map_err(|error| invalid(error.to_string()))?;
    let deflated = match entry.compression() {
        zip::CompressionMethod::Stored => false,
        zip::CompressionMethod::Deflated => true,
        other => {
            return Err(invalid(format!(
                "{name} is compressed with {other:?}; only stored and deflated entries are read"
            )));
        }
    };
    let data_start = entry
        .data_start()
        .ok_or_else(|| invalid(format!("{name}: the entry's data cannot be located")))?;
    Ok(Location::ZipEntry {
        path: path.to_path_buf(),
        data_start,
        compressed: entry.compressed_size(),
        deflated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;

    fn lines() -> Vec<Value> {
        vec![
            json!({"type": "version", "version": 1, "info": {"generator": "mmctl"}}),
            json!({"type": "team", "team": {"name": "acme", "display_name": "Acme"}}),
            json!({"type": "user", "user": {"username": "ann", "nickname": "Annie"}}),
            json!({"type": "user", "user": {"username": "bob", "first_name": "Bob", "last_name": "Ma"}}),
            json!({"type": "post", "post": {"team": "acme", "channel": "town-square", "user": "ann",
                   "message": "hi @bob, mail ann@example.com", "create_at": 1_700_000_000_000_i64,
                   "edit_at": 1_700_000_100_000_i64,
                   "reactions": [{"user": "bob", "emoji_name": "+1", "create_at": 1_700_000_050_000_i64}],
                   "replies": [{"user": "bob", "message": "a reply", "create_at": 1_700_000_200_000_i64}],
                   "attachments": [{"path": "data/2023/a.pdf"}]}}),
            json!({"type": "post", "post": {"team": "acme", "channel": "town-square", "user": "bob",
                   "type": "system_join_channel", "message": "bob joined", "create_at": 1_700_000_300_000_i64}}),
            json!({"type": "direct_post", "direct_post": {"channel_members": ["bob", "ann"], "user": "bob",
                   "message": "a DM", "create_at": 1_700_000_400_000_i64}}),
            json!({"type": "post", "post": {"team": "acme", "channel": "town-square", "user": "ann"}}),
        ]
    }

    fn write(path: &Path, lines: &[Value]) {
        let mut file = std::fs::File::create(path).expect("file");
        for line in lines {
            writeln!(file, "{line}").expect("line");
        }
        writeln!(file, "not json").expect("line");
    }

    fn kinds(unit: &Unit) -> Vec<(&'static str, String, String)> {
        unit.events
            .iter()
            .map(|event| {
                (
                    chatvault_core::event::kind_name(event.kind),
                    event.conversation_id.clone(),
                    event.thread_id.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn posts_become_events_from_a_jsonl_file_or_its_zip() {
        let dir = tempfile::tempdir().expect("dir");
        let jsonl = dir.path().join("export.jsonl");
        write(&jsonl, &lines());
        let zip_path = dir.path().join("export.zip");
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&zip_path).expect("zip"));
        writer
            .start_file("import.jsonl", zip::write::SimpleFileOptions::default())
            .expect("entry");
        writer
            .write_all(&std::fs::read(&jsonl).expect("read"))
            .expect("write");
        writer.finish().expect("finish");
        for path in [&jsonl, &zip_path] {
            let mut export = MattermostExport::open(path, "acme").expect("open");
            assert_eq!(export.units(), vec!["lines 1-9"]);
            let unit = export.read_lines("lines 1-9").expect("unit");
            let root = post_id("acme/town-square", "ann", 1_700_000_000_000);
            assert_eq!(
                kinds(&unit),
                vec![
                    ("message_created", "acme/town-square".into(), String::new()),
                    ("message_edited", "acme/town-square".into(), String::new()),
                    ("reaction_added", "acme/town-square".into(), String::new()),
                    ("message_created", "acme/town-square".into(), root.clone()),
                    ("member_joined", "acme/town-square".into(), String::new()),
                    ("message_created", "direct:ann,bob".into(), String::new()),
                ]
            );
            let created = &unit.events[0];
            assert_eq!(created.message_id, root);
            assert_eq!(created.mentions, vec!["bob"]);
            assert_eq!(
                created.sender.as_ref().expect("sender").display_name,
                "Annie"
            );
            assert_eq!(created.attachments[0].name, "a.pdf");
            assert_eq!(
                unit.events[3].sender.as_ref().expect("sender").display_name,
                "Bob Ma"
            );
            let rejected: Vec<(&str, &str)> = unit
                .rejected
                .iter()
                .map(|r| (r.item.as_str(), r.reason.as_str()))
                .collect();
            assert_eq!(rejected.len(), 2, "{rejected:?}");
            assert_eq!(rejected[0], ("line 8", "has no create_at"));
            assert!(
                rejected[1].1.starts_with("is not valid JSON"),
                "{rejected:?}"
            );
            assert_eq!(unit.skipped.len(), 3);
            // Reading a unit again gives the same events (the reader starts over).
            let again = export.read_lines("lines 1-9").expect("again");
            assert_eq!(again.events, unit.events);
        }
        std::fs::write(&jsonl, "{\"type\": \"post\"}\n").expect("write");
        let error = MattermostExport::open(&jsonl, "acme")
            .err()
            .expect("refused");
        assert!(error.message().contains("first line"), "{error}");
    }
}
