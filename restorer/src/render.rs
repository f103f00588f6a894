//! A plain-text transcript of restored items, for people reading a restored conversation.
//!
//! ```text
//! [2026-11-25 10:00:00Z] * U3 joined
//! [2026-11-25 10:00:01Z] alice (U1): hello  (edited)
//!   reactions: :thumbsup: U1, U2
//!   ↳ [2026-11-25 10:00:05Z] bob (U2): hi back
//! [2026-11-25 10:01:00Z] alice (U1): <message deleted at 2026-11-25 10:02:00Z>
//! ```

use std::fmt::Write;

use chatvault_core::event::kind_name;

use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{ChatEvent, EventKind, RestoreItem, RestoredMessage, Sender};

const REPLY_MARK: &str = "  ↳ ";

/// Renders items as a transcript, one line per message or event (plus lines for reactions, attachments and
/// continuation lines of multi-line texts). Archived events, when present, follow under their own heading.
pub fn render_text(items: &[RestoreItem]) -> String {
    let mut out = String::new();
    let mut archived_heading_written = false;
    for item in items {
        match &item.item {
            Some(Item::Message(message)) => render_message(&mut out, message),
            Some(Item::Event(event)) => {
                let _ = writeln!(
                    out,
                    "[{}] * {}",
                    format_time(event.occurred_at_micros),
                    describe_event(event)
                );
            }
            Some(Item::ArchivedEvent(event)) => {
                if !archived_heading_written {
                    out.push_str("\n--- archived events ---\n");
                    archived_heading_written = true;
                }
                render_archived_event(&mut out, event);
            }
            Some(Item::Integrity(status)) => {
                let _ = writeln!(out, "integrity: {}", status.detail);
            }
            // A document for `chatvault verify-export`, not part of the transcript.
            Some(Item::Evidence(_)) => {}
            None => {}
        }
    }
    out
}

pub use chatvault_core::time::format_time;

fn render_message(out: &mut String, message: &RestoredMessage) {
    let is_reply = !message.thread_id.is_empty() && message.thread_id != message.message_id;
    let (first_prefix, detail_prefix) = if is_reply {
        (REPLY_MARK, "      ")
    } else {
        ("", "  ")
    };
    let mut notes = Vec::new();
    if message.edited && !message.deleted {
        notes.push("edited".to_string());
    }
    if message.creation_missing {
        notes.push("original message not archived".to_string());
    }
    let body = if message.deleted {
        format!(
            "<message deleted at {}>",
            format_time(message.deleted_at_micros)
        )
    } else {
        message.text.clone()
    };
    let _ = write!(
        out,
        "{first_prefix}[{}] {}: ",
        format_time(message.created_at_micros),
        describe_sender(message.sender.as_ref())
    );
    // Continuation lines of a multi-line text are indented under the message.
    let mut lines = body.split('\n');
    out.push_str(lines.next().unwrap_or_default());
    for line in lines {
        out.push('\n');
        out.push_str(detail_prefix);
        out.push_str("  ");
        out.push_str(line);
    }
    if !notes.is_empty() {
        let _ = write!(out, "  ({})", notes.join(", "));
    }
    out.push('\n');
    for attachment in &message.attachments {
        let name = if attachment.name.is_empty() {
            &attachment.id
        } else {
            &attachment.name
        };
        let _ = write!(out, "{detail_prefix}attachment: {name}");
        if !attachment.mime_type.is_empty() {
            let _ = write!(
                out,
                " ({}, {} bytes)",
                attachment.mime_type, attachment.size_bytes
            );
        }
        out.push('\n');
    }
    if !message.reactions.is_empty() {
        let reactions: Vec<String> = message
            .reactions
            .iter()
            .map(|reaction| format!(":{}: {}", reaction.name, reaction.user_ids.join(", ")))
            .collect();
        let _ = writeln!(out, "{detail_prefix}reactions: {}", reactions.join("; "));
    }
}

fn describe_sender(sender: Option<&Sender>) -> String {
    match sender {
        Some(sender) if !sender.display_name.is_empty() && !sender.id.is_empty() => {
            format!("{} ({})", sender.display_name, sender.id)
        }
        Some(sender) if !sender.display_name.is_empty() => sender.display_name.clone(),
        Some(sender) if !sender.id.is_empty() => sender.id.clone(),
        _ => "unknown sender".to_string(),
    }
}

fn actor(event: &ChatEvent) -> String {
    match event.sender.as_ref() {
        Some(sender) if !sender.id.is_empty() => sender.id.clone(),
        Some(sender) if !sender.display_name.is_empty() => sender.display_name.clone(),
        _ => "someone".to_string(),
    }
}

fn describe_event(event: &ChatEvent) -> String {
    match EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified) {
        EventKind::MemberJoined => format!("{} joined", actor(event)),
        EventKind::MemberLeft => format!("{} left", actor(event)),
        EventKind::ConversationCreated => format!("conversation created by {}", actor(event)),
        EventKind::ConversationRenamed => format!("conversation renamed to {:?}", event.text),
        EventKind::ConversationArchived => format!("conversation archived by {}", actor(event)),
        EventKind::CaptureGap => {
            "CAPTURE GAP reported by the source: events may be missing here".to_string()
        }
        other => format!("{} event by {}", kind_name(other as i32), actor(event)),
    }
}

fn render_archived_event(out: &mut String, event: &ChatEvent) {
    let _ = write!(
        out,
        "[{}] {} event_id={}",
        format_time(event.occurred_at_micros),
        kind_name(event.kind),
        event.event_id
    );
    if !event.message_id.is_empty() {
        let _ = write!(out, " message={}", event.message_id);
    }
    if let Some(sender) = event.sender.as_ref().filter(|s| !s.id.is_empty()) {
        let _ = write!(out, " sender={}", sender.id);
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatvault_proto::v1::{Attachment, Reaction};

    /// 2026-11-25T10:00:00Z
    const T0: i64 = 1_795_600_800_000_000;

    fn alice() -> Option<Sender> {
        Some(Sender {
            id: "U1".into(),
            display_name: "alice".into(),
            is_bot: false,
        })
    }

    fn message(id: &str, thread: &str, at: i64, text: &str) -> RestoredMessage {
        RestoredMessage {
            message_id: id.into(),
            thread_id: thread.into(),
            sender: alice(),
            created_at_micros: at,
            text: text.into(),
            ..RestoredMessage::default()
        }
    }

    fn item(item: Item) -> RestoreItem {
        RestoreItem { item: Some(item) }
    }

    #[test]
    fn times_are_utc_with_seconds() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(T0 + 3_661_999_999), "2026-11-25 11:01:01Z");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59Z");
    }

    #[test]
    fn a_transcript_shows_messages_threads_reactions_and_events() {
        let mut edited = message("m1", "", T0 + 1_000_000, "hello\nsecond line");
        edited.edited = true;
        edited.reactions = vec![
            Reaction {
                name: "thumbsup".into(),
                user_ids: vec!["U1".into(), "U2".into()],
            },
            Reaction {
                name: "eyes".into(),
                user_ids: vec!["U3".into()],
            },
        ];
        edited.attachments = vec![Attachment {
            name: "plan.pdf".into(),
            mime_type: "application/pdf".into(),
            size_bytes: 1234,
            ..Attachment::default()
        }];
        let mut reply = message("m2", "m1", T0 + 5_000_000, "hi back");
        reply.sender = Some(Sender {
            id: "U2".into(),
            display_name: "bob".into(),
            is_bot: false,
        });
        let mut removed = message("m3", "", T0 + 60_000_000, "");
        removed.deleted = true;
        removed.deleted_at_micros = T0 + 120_000_000;
        let mut orphan = message("m4", "", T0 + 180_000_000, "what was this about");
        orphan.creation_missing = true;
        orphan.sender = None;
        let joined = ChatEvent {
            kind: EventKind::MemberJoined as i32,
            sender: Some(Sender {
                id: "U3".into(),
                ..Sender::default()
            }),
            occurred_at_micros: T0,
            ..ChatEvent::default()
        };
        let renamed = ChatEvent {
            kind: EventKind::ConversationRenamed as i32,
            text: "x".into(),
            occurred_at_micros: T0 + 200_000_000,
            ..ChatEvent::default()
        };
        let gap = ChatEvent {
            kind: EventKind::CaptureGap as i32,
            occurred_at_micros: T0 + 300_000_000,
            ..ChatEvent::default()
        };
        let text = render_text(&[
            item(Item::Event(joined)),
            item(Item::Message(edited)),
            item(Item::Message(reply)),
            item(Item::Message(removed)),
            item(Item::Message(orphan)),
            item(Item::Event(renamed)),
            item(Item::Event(gap.clone())),
            item(Item::ArchivedEvent(ChatEvent {
                event_id: "e1".into(),
                ..gap
            })),
        ]);
        let expected = "\
[2026-11-25 10:00:00Z] * U3 joined
[2026-11-25 10:00:01Z] alice (U1): hello
    second line  (edited)
  attachment: plan.pdf (application/pdf, 1234 bytes)
  reactions: :thumbsup: U1, U2; :eyes: U3
  ↳ [2026-11-25 10:00:05Z] bob (U2): hi back
[2026-11-25 10:01:00Z] alice (U1): <message deleted at 2026-11-25 10:02:00Z>
[2026-11-25 10:03:00Z] unknown sender: what was this about  (original message not archived)
[2026-11-25 10:03:20Z] * conversation renamed to \"x\"
[2026-11-25 10:05:00Z] * CAPTURE GAP reported by the source: events may be missing here

--- archived events ---
[2026-11-25 10:05:00Z] capture_gap event_id=e1
";
        assert_eq!(text, expected);
    }
}
