//! The sample conversation of `chatvault demo`: a thread, an edit, a deletion, reactions and membership.
//!
//! Timestamps are fixed to the start of the current UTC day, and event ids are derived by the gateway, so
//! running the demo twice on one day archives nothing new: the second copy collapses onto the first.

use chatvault_core::time::{MICROS_PER_DAY, MICROS_PER_SECOND, now_micros};
use chatvault_proto::v1::{Attachment, ChatEvent, EventKind, Sender};

pub const DEMO_CONVERSATION: &str = "demo-general";

fn person(id: &str, name: &str) -> Option<Sender> {
    Some(Sender {
        id: id.into(),
        display_name: name.into(),
        is_bot: false,
    })
}

pub fn sample_conversation(tenant: &str) -> Vec<ChatEvent> {
    let now = now_micros();
    let day_start = now - now.rem_euclid(MICROS_PER_DAY);
    let at = |seconds: i64| day_start + 9 * 3600 * MICROS_PER_SECOND + seconds * MICROS_PER_SECOND;
    let base = ChatEvent {
        tenant_id: tenant.into(),
        workspace_id: "demo-workspace".into(),
        conversation_id: DEMO_CONVERSATION.into(),
        ..Default::default()
    };
    let event =
        |kind: EventKind, seconds: i64, message: &str, sender: Option<Sender>, text: &str| {
            ChatEvent {
                kind: kind as i32,
                occurred_at_micros: at(seconds),
                message_id: message.into(),
                sender,
                text: text.into(),
                ..base.clone()
            }
        };
    let alice = || person("U-ALICE", "alice");
    let bob = || person("U-BOB", "bob");
    let carol = || person("U-CAROL", "carol");
    vec![
        event(EventKind::MemberJoined, 0, "", carol(), ""),
        event(
            EventKind::MessageCreated,
            10,
            "m1",
            alice(),
            "Morning! The Q4 budget draft is in the shared drive.",
        ),
        ChatEvent {
            thread_id: "m1".into(),
            attachments: vec![Attachment {
                id: "F1".into(),
                name: "q4-budget-comments.pdf".into(),
                mime_type: "application/pdf".into(),
                size_bytes: 48_213,
                sha256: "5f2b8e2cc0f4b64e1b5f8f3e1b0b9f0d7c1a2b3c4d5e6f708192a3b4c5d6e7f8".into(),
                url: String::new(),
            }],
            ..event(
                EventKind::MessageCreated,
                40,
                "m2",
                bob(),
                "Thanks, my comments are attached.",
            )
        },
        event(
            EventKind::MessageEdited,
            70,
            "m1",
            alice(),
            "Morning! The Q4 budget draft (v2) is in the shared drive.",
        ),
        ChatEvent {
            reaction: "thumbsup".into(),
            ..event(EventKind::ReactionAdded, 80, "m1", bob(), "")
        },
        ChatEvent {
            reaction: "eyes".into(),
            ..event(EventKind::ReactionAdded, 85, "m1", carol(), "")
        },
        ChatEvent {
            reaction: "eyes".into(),
            ..event(EventKind::ReactionRemoved, 95, "m1", carol(), "")
        },
        event(
            EventKind::MessageCreated,
            120,
            "m3",
            carol(),
            "Oops, wrong channel, ignore this.",
        ),
        event(EventKind::MessageDeleted, 130, "m3", carol(), ""),
        ChatEvent {
            thread_id: "m1".into(),
            ..event(
                EventKind::MessageCreated,
                150,
                "m4",
                alice(),
                "Great, I'll merge them by Friday.",
            )
        },
        event(EventKind::MemberLeft, 200, "", bob(), ""),
    ]
}
