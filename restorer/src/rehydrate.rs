//! Rehydration: from the archived events of one conversation to the conversation as people saw it.
//!
//! Pure functions over events that are already deduplicated and sorted by time (see
//! [`crate::Restorer::conversation_events`]). The contract is documented on `RestoredMessage` and
//! `RestoreItem` in `proto/chatvault/v1/restore.proto`; the choices the proto leaves open are made here:
//!
//! - A deleted message keeps its history: its revisions list the original text and every edit even when it was
//!   never edited, so a tombstone still shows what was said (the archive exists to retain it). Its current
//!   `text` is empty.
//! - When the creation is missing, the message is dated by the first archived event about it, and its sender is
//!   taken from an edit (the author) or a deletion, never from a reaction (that is the reacting user).
//! - A second creation of a message that was already created (a source that re-sent it under a new event id) is
//!   ignored in the view; it is still listed among the archived events when those are requested.
//! - Events that are not about a message, and message events without a message id, appear as `event` items.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chatvault_core::event::is_about_a_message;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{
    Attachment, ChatEvent, EventKind, Reaction, RestoreItem, RestoredMessage, Revision, Sender,
};

/// The rehydrated view of a conversation followed, when `include_events` is set, by every input event as an
/// `archived_event` item in input order.
pub fn restore_items(events: &[ChatEvent], include_events: bool) -> Vec<RestoreItem> {
    let mut items = rehydrate(events);
    if include_events {
        items.reserve(events.len());
        items.extend(events.iter().map(|event| RestoreItem {
            item: Some(Item::ArchivedEvent(event.clone())),
        }));
    }
    items
}

/// Rehydrates a conversation from its events (deduplicated, sorted by time): messages with their current
/// state, and membership and lifecycle events, in conversation order.
pub fn rehydrate(events: &[ChatEvent]) -> Vec<RestoreItem> {
    let mut messages: HashMap<&str, MessageState> = HashMap::new();
    let mut other_events: Vec<(usize, &ChatEvent)> = Vec::new();
    for (position, event) in events.iter().enumerate() {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        if !is_about_a_message(kind) || event.message_id.is_empty() {
            other_events.push((position, event));
            continue;
        }
        let state = messages
            .entry(event.message_id.as_str())
            .or_insert_with(|| MessageState::first_seen(event, position));
        state.apply(kind, event);
    }
    order(messages, other_events)
}

/// What is known about one message while its events are applied.
#[derive(Debug)]
pub(crate) struct MessageState {
    message_id: String,
    thread_id: String,
    sender: Option<Sender>,
    /// Set from the creation when there is one; until then the time of the first event about the message.
    created_at_micros: i64,
    /// The creation's text as a revision, when the creation is archived.
    original: Option<Revision>,
    edits: Vec<Revision>,
    deleted_at_micros: Option<i64>,
    reactions: BTreeMap<String, BTreeSet<String>>,
    attachments: Vec<Attachment>,
    mentions: Vec<String>,
    /// Position of the first event about the message: the last tie-breaker of the order.
    first_position: usize,
}

impl MessageState {
    pub(crate) fn first_seen(event: &ChatEvent, position: usize) -> MessageState {
        MessageState {
            message_id: event.message_id.clone(),
            thread_id: event.thread_id.clone(),
            sender: None,
            created_at_micros: event.occurred_at_micros,
            original: None,
            edits: Vec::new(),
            deleted_at_micros: None,
            reactions: BTreeMap::new(),
            attachments: Vec::new(),
            mentions: Vec::new(),
            first_position: position,
        }
    }

    pub(crate) fn apply(&mut self, kind: EventKind, event: &ChatEvent) {
        if self.thread_id.is_empty() {
            self.thread_id.clone_from(&event.thread_id);
        }
        let revision = || Revision {
            text: event.text.clone(),
            at_micros: event.occurred_at_micros,
            event_id: event.event_id.clone(),
        };
        match kind {
            EventKind::MessageCreated => {
                if self.original.is_some() {
                    return;
                }
                self.original = Some(revision());
                self.created_at_micros = event.occurred_at_micros;
                if event.sender.is_some() {
                    self.sender.clone_from(&event.sender);
                }
                // Edits applied before (only possible with skewed source clocks) keep their newer lists.
                if self.attachments.is_empty() {
                    self.attachments.clone_from(&event.attachments);
                }
                if self.mentions.is_empty() {
                    self.mentions.clone_from(&event.mentions);
                }
            }
            EventKind::MessageEdited => {
                self.edits.push(revision());
                if self.sender.is_none() {
                    self.sender.clone_from(&event.sender);
                }
                if !event.attachments.is_empty() {
                    self.attachments.clone_from(&event.attachments);
                }
                if !event.mentions.is_empty() {
                    self.mentions.clone_from(&event.mentions);
                }
            }
            EventKind::MessageDeleted => {
                self.deleted_at_micros
                    .get_or_insert(event.occurred_at_micros);
                if self.sender.is_none() && self.original.is_none() && self.edits.is_empty() {
                    self.sender.clone_from(&event.sender);
                }
            }
            EventKind::ReactionAdded | EventKind::ReactionRemoved => {
                let user = event
                    .sender
                    .as_ref()
                    .map(|s| s.id.clone())
                    .unwrap_or_default();
                if kind == EventKind::ReactionAdded {
                    self.reactions
                        .entry(event.reaction.clone())
                        .or_default()
                        .insert(user);
                } else if let Some(users) = self.reactions.get_mut(&event.reaction) {
                    users.remove(&user);
                    if users.is_empty() {
                        self.reactions.remove(&event.reaction);
                    }
                }
            }
            _ => {}
        }
    }

    pub(crate) fn into_message(self) -> RestoredMessage {
        let deleted = self.deleted_at_micros.is_some();
        let edited = !self.edits.is_empty();
        let current_text = self
            .edits
            .last()
            .or(self.original.as_ref())
            .map(|revision| revision.text.clone())
            .unwrap_or_default();
        let creation_missing = self.original.is_none();
        let revisions = if edited || deleted {
            self.original.into_iter().chain(self.edits).collect()
        } else {
            Vec::new()
        };
        RestoredMessage {
            message_id: self.message_id,
            thread_id: self.thread_id,
            sender: self.sender,
            created_at_micros: self.created_at_micros,
            text: if deleted { String::new() } else { current_text },
            revisions,
            edited,
            deleted,
            deleted_at_micros: self.deleted_at_micros.unwrap_or(0),
            reactions: self
                .reactions
                .into_iter()
                .map(|(name, users)| Reaction {
                    name,
                    user_ids: users.into_iter().collect(),
                })
                .collect(),
            attachments: self.attachments,
            mentions: self.mentions,
            creation_missing,
        }
    }
}

/// Sort key of a top-level item: time, then message id (empty for events), then input position.
type OrderKey = (i64, String, usize);

/// What places a message in the conversation: its id, thread, creation time (the first creation's, else the
/// time of the first event about it) and the input position of the first event about it. The streaming
/// restore computes these from a compact index, without the messages' content.
#[derive(Debug, Clone)]
pub(crate) struct MessagePlace {
    pub message_id: String,
    pub thread_id: String,
    pub created_at_micros: i64,
    pub first_position: usize,
}

impl MessagePlace {
    fn key(&self) -> OrderKey {
        (
            self.created_at_micros,
            self.message_id.clone(),
            self.first_position,
        )
    }

    fn is_reply(&self) -> bool {
        !self.thread_id.is_empty() && self.thread_id != self.message_id
    }
}

/// One item of the laid-out conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Placed {
    Message(String),
    /// The event at this input position.
    Event(usize),
}

fn order(
    messages: HashMap<&str, MessageState>,
    other_events: Vec<(usize, &ChatEvent)>,
) -> Vec<RestoreItem> {
    let places: Vec<MessagePlace> = messages
        .values()
        .map(|state| MessagePlace {
            message_id: state.message_id.clone(),
            thread_id: state.thread_id.clone(),
            created_at_micros: state.created_at_micros,
            first_position: state.first_position,
        })
        .collect();
    let event_places: Vec<(i64, usize)> = other_events
        .iter()
        .map(|(position, event)| (event.occurred_at_micros, *position))
        .collect();
    let events: HashMap<usize, &ChatEvent> = other_events.into_iter().collect();
    let mut messages: HashMap<String, MessageState> = messages
        .into_iter()
        .map(|(id, state)| (id.to_string(), state))
        .collect();
    layout(places, event_places)
        .into_iter()
        .filter_map(|placed| match placed {
            Placed::Message(id) => messages.remove(&id).map(|state| RestoreItem {
                item: Some(Item::Message(state.into_message())),
            }),
            Placed::Event(position) => events.get(&position).map(|event| RestoreItem {
                item: Some(Item::Event((*event).clone())),
            }),
        })
        .collect()
}

/// Lays the conversation out: top-level items by time, each message directly followed by its replies (and
/// theirs) by time. A reply whose root is not archived is top-level itself, thread id kept, so nothing is lost.
/// `events` are the other items, as (event time, input position).
pub(crate) fn layout(messages: Vec<MessagePlace>, events: Vec<(i64, usize)>) -> Vec<Placed> {
    let messages: HashMap<String, MessagePlace> = messages
        .into_iter()
        .map(|place| (place.message_id.clone(), place))
        .collect();
    let mut replies: HashMap<String, Vec<OrderKey>> = HashMap::new();
    let mut roots: Vec<OrderKey> = Vec::new();
    for place in messages.values() {
        if place.is_reply() && messages.contains_key(place.thread_id.as_str()) {
            replies
                .entry(place.thread_id.clone())
                .or_default()
                .push(place.key());
        } else {
            roots.push(place.key());
        }
    }
    // Messages caught in a cycle of thread ids (A replies to B, B to A) are reachable from no root: promote the
    // earliest of each cycle to top level until every message is reachable.
    let mut reachable: HashSet<String> = HashSet::new();
    for root in &roots {
        mark_reachable(&root.1, &replies, &mut reachable);
    }
    let mut unreached: Vec<OrderKey> = messages
        .values()
        .filter(|place| !reachable.contains(&place.message_id))
        .map(MessagePlace::key)
        .collect();
    unreached.sort();
    for key in unreached {
        if !reachable.contains(&key.1) {
            mark_reachable(&key.1, &replies, &mut reachable);
            roots.push(key);
        }
    }
    for children in replies.values_mut() {
        children.sort();
    }

    let mut top_level: Vec<(OrderKey, Option<usize>)> =
        roots.into_iter().map(|key| (key, None)).collect();
    top_level.extend(
        events
            .into_iter()
            .map(|(at, position)| ((at, String::new(), position), Some(position))),
    );
    top_level.sort_by(|a, b| a.0.cmp(&b.0));

    let mut placed = Vec::with_capacity(messages.len() + top_level.len());
    let mut emitted: HashSet<String> = HashSet::new();
    for (key, event) in top_level {
        match event {
            None => emit_thread(&key.1, &replies, &mut emitted, &mut placed),
            Some(position) => placed.push(Placed::Event(position)),
        }
    }
    placed
}

fn mark_reachable(
    id: &str,
    replies: &HashMap<String, Vec<OrderKey>>,
    reachable: &mut HashSet<String>,
) {
    let mut pending = vec![id.to_string()];
    while let Some(id) = pending.pop() {
        if !reachable.insert(id.clone()) {
            continue;
        }
        if let Some(children) = replies.get(&id) {
            pending.extend(children.iter().map(|key| key.1.clone()));
        }
    }
}

/// Places a message and, depth first, its replies. Each message is placed once: `emitted` guards against
/// cycles.
fn emit_thread(
    root: &str,
    replies: &HashMap<String, Vec<OrderKey>>,
    emitted: &mut HashSet<String>,
    placed: &mut Vec<Placed>,
) {
    let mut pending = vec![root.to_string()];
    while let Some(id) = pending.pop() {
        if !emitted.insert(id.clone()) {
            continue;
        }
        if let Some(children) = replies.get(&id) {
            // Reversed onto the stack so the earliest reply is emitted first.
            pending.extend(children.iter().rev().map(|key| key.1.clone()));
        }
        placed.push(Placed::Message(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kind: EventKind, message_id: &str, at: i64, user: &str) -> ChatEvent {
        ChatEvent {
            event_id: format!("{message_id}/{}/{at}/{user}", kind.as_str_name()),
            tenant_id: "acme".into(),
            conversation_id: "C1".into(),
            message_id: message_id.into(),
            kind: kind as i32,
            sender: Some(Sender {
                id: user.into(),
                display_name: format!("name of {user}"),
                is_bot: false,
            }),
            occurred_at_micros: at,
            received_at_micros: at,
            ..ChatEvent::default()
        }
    }

    fn created(message_id: &str, at: i64, text: &str) -> ChatEvent {
        ChatEvent {
            text: text.into(),
            ..base(EventKind::MessageCreated, message_id, at, "U1")
        }
    }

    fn reply(message_id: &str, root: &str, at: i64) -> ChatEvent {
        ChatEvent {
            thread_id: root.into(),
            ..created(message_id, at, &format!("reply {message_id}"))
        }
    }

    fn edited(message_id: &str, at: i64, text: &str) -> ChatEvent {
        ChatEvent {
            text: text.into(),
            ..base(EventKind::MessageEdited, message_id, at, "U1")
        }
    }

    fn deleted(message_id: &str, at: i64) -> ChatEvent {
        base(EventKind::MessageDeleted, message_id, at, "U1")
    }

    fn reaction(kind: EventKind, message_id: &str, at: i64, user: &str, name: &str) -> ChatEvent {
        ChatEvent {
            reaction: name.into(),
            ..base(kind, message_id, at, user)
        }
    }

    fn membership(kind: EventKind, at: i64, user: &str) -> ChatEvent {
        base(kind, "", at, user)
    }

    fn messages(items: &[RestoreItem]) -> Vec<&RestoredMessage> {
        items
            .iter()
            .filter_map(|item| match &item.item {
                Some(Item::Message(message)) => Some(message),
                _ => None,
            })
            .collect()
    }

    fn only_message(items: &[RestoreItem]) -> &RestoredMessage {
        let found = messages(items);
        assert_eq!(found.len(), 1, "{items:?}");
        found[0]
    }

    /// A compact picture of the order: message ids, `*<kind>` for events, `>` before replies.
    fn layout(items: &[RestoreItem]) -> Vec<String> {
        items
            .iter()
            .map(|item| match &item.item {
                Some(Item::Message(m))
                    if !m.thread_id.is_empty() && m.thread_id != m.message_id =>
                {
                    format!(">{}", m.message_id)
                }
                Some(Item::Message(m)) => m.message_id.clone(),
                Some(Item::Event(e)) => format!("*{}", e.kind().as_str_name()),
                Some(Item::ArchivedEvent(e)) => format!("raw:{}", e.event_id),
                Some(Item::Integrity(_)) => "integrity".into(),
                Some(Item::Evidence(_)) => "evidence".into(),
                None => "?".into(),
            })
            .collect()
    }

    #[test]
    fn a_plain_message_has_no_revisions() {
        let mut event = created("m1", 10, "hello");
        event.mentions = vec!["U2".into()];
        event.thread_id = "m1".into();
        let items = rehydrate(&[event]);
        let message = only_message(&items);
        assert_eq!(message.text, "hello");
        assert_eq!(message.thread_id, "m1");
        assert_eq!(message.created_at_micros, 10);
        assert_eq!(message.mentions, ["U2"]);
        assert_eq!(message.sender.as_ref().map(|s| s.id.as_str()), Some("U1"));
        assert!(message.revisions.is_empty());
        assert!(!message.edited && !message.deleted && !message.creation_missing);
    }

    #[test]
    fn edits_apply_in_time_order_keeping_the_original_first() {
        let mut second = edited("m1", 30, "third text");
        second.attachments = vec![Attachment {
            id: "F1".into(),
            name: "plan.pdf".into(),
            ..Attachment::default()
        }];
        let items = rehydrate(&[
            created("m1", 10, "first text"),
            edited("m1", 20, "second text"),
            second,
        ]);
        let message = only_message(&items);
        assert!(message.edited);
        assert_eq!(message.text, "third text");
        let history: Vec<_> = message
            .revisions
            .iter()
            .map(|r| (r.text.as_str(), r.at_micros))
            .collect();
        assert_eq!(
            history,
            [("first text", 10), ("second text", 20), ("third text", 30)]
        );
        assert_eq!(
            message.revisions[0].event_id,
            created("m1", 10, "").event_id
        );
        assert_eq!(message.attachments.len(), 1);
    }

    #[test]
    fn an_edit_without_lists_keeps_the_attachments_and_mentions() {
        let mut original = created("m1", 10, "see @U2");
        original.mentions = vec!["U2".into()];
        let message_items = rehydrate(&[original, edited("m1", 20, "see @U2 now")]);
        assert_eq!(only_message(&message_items).mentions, ["U2"]);
    }

    #[test]
    fn a_deletion_leaves_a_tombstone_with_the_history() {
        let items = rehydrate(&[
            created("m1", 10, "secret plan"),
            edited("m1", 20, "revised plan"),
            deleted("m1", 30),
            edited("m1", 40, "after deletion"),
        ]);
        let message = only_message(&items);
        assert!(message.deleted && message.edited);
        assert_eq!(message.deleted_at_micros, 30);
        assert_eq!(message.text, "");
        let history: Vec<_> = message.revisions.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(history, ["secret plan", "revised plan", "after deletion"]);

        let items = rehydrate(&[
            created("m2", 10, "never edited"),
            deleted("m2", 20),
            deleted("m2", 25),
        ]);
        let message = only_message(&items);
        assert!(message.deleted && !message.edited);
        assert_eq!(message.deleted_at_micros, 20);
        assert_eq!(message.text, "");
        assert_eq!(message.revisions.len(), 1);
        assert_eq!(message.revisions[0].text, "never edited");
    }

    #[test]
    fn reactions_follow_additions_and_removals_in_order() {
        use EventKind::{ReactionAdded as Added, ReactionRemoved as Removed};
        let items = rehydrate(&[
            created("m1", 10, "ship it"),
            reaction(Added, "m1", 11, "U3", "thumbsup"),
            reaction(Added, "m1", 12, "U2", "thumbsup"),
            reaction(Added, "m1", 13, "U2", "eyes"),
            reaction(Added, "m1", 14, "U2", "eyes"),
            reaction(Removed, "m1", 15, "U2", "eyes"),
            reaction(Added, "m1", 16, "U4", "tada"),
            reaction(Removed, "m1", 17, "U9", "tada"),
            reaction(Removed, "m1", 18, "U9", "never-added"),
        ]);
        let message = only_message(&items);
        let reactions: Vec<_> = message
            .reactions
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.user_ids.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            reactions,
            [("tada", vec!["U4"]), ("thumbsup", vec!["U2", "U3"])]
        );
        // Reactions never touch the text or the author.
        assert_eq!(message.text, "ship it");
        assert_eq!(message.sender.as_ref().map(|s| s.id.as_str()), Some("U1"));
        assert!(!message.edited);
    }

    #[test]
    fn events_about_an_unarchived_creation_still_make_a_message() {
        let items = rehydrate(&[
            reaction(EventKind::ReactionAdded, "m1", 5, "U7", "eyes"),
            edited("m1", 8, "edited text"),
            deleted("m2", 9),
        ]);
        let found = messages(&items);
        assert_eq!(found.len(), 2);
        let m1 = found[0];
        assert_eq!(m1.message_id, "m1");
        assert!(m1.creation_missing && m1.edited);
        assert_eq!(m1.created_at_micros, 5);
        assert_eq!(m1.text, "edited text");
        // The author comes from the edit, not from the reacting user.
        assert_eq!(m1.sender.as_ref().map(|s| s.id.as_str()), Some("U1"));
        let history: Vec<_> = m1.revisions.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(history, ["edited text"]);
        let m2 = found[1];
        assert!(m2.creation_missing && m2.deleted);
        assert_eq!(m2.created_at_micros, 9);
        assert!(m2.revisions.is_empty());

        let reacted_only = rehydrate(&[reaction(EventKind::ReactionAdded, "m3", 5, "U7", "eyes")]);
        let m3 = only_message(&reacted_only);
        assert!(m3.creation_missing && m3.sender.is_none());
        assert_eq!(m3.reactions.len(), 1);
    }

    #[test]
    fn a_creation_archived_after_its_edit_is_still_the_original() {
        // Source clocks can disagree: the edit carries an earlier timestamp than the creation.
        let items = rehydrate(&[edited("m1", 5, "edited"), created("m1", 7, "original")]);
        let message = only_message(&items);
        assert!(!message.creation_missing && message.edited);
        assert_eq!(message.created_at_micros, 7);
        assert_eq!(message.text, "edited");
        let history: Vec<_> = message.revisions.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(history, ["original", "edited"]);
    }

    #[test]
    fn threads_follow_their_root_and_orphan_replies_stay_in_time_order() {
        let items = rehydrate(&[
            created("r1", 10, "root one"),
            created("t2", 20, "top two"),
            reply("a", "r1", 25),
            reply("orphan", "gone", 27),
            reply("b", "r1", 30),
            created("t3", 40, "top three"),
            reply("c", "t2", 50),
            edited("r1", 60, "root one, edited"),
        ]);
        assert_eq!(
            layout(&items),
            ["r1", ">a", ">b", "t2", ">c", ">orphan", "t3"]
        );
        let found = messages(&items);
        assert_eq!(found[5].thread_id, "gone");
        assert_eq!(found[0].text, "root one, edited");
    }

    #[test]
    fn ties_break_by_message_id_and_cyclic_threads_lose_nothing() {
        let items = rehydrate(&[created("b", 10, "b"), created("a", 10, "a")]);
        assert_eq!(layout(&items), ["a", "b"]);
        let items = rehydrate(&[
            reply("x", "y", 10),
            reply("y", "x", 20),
            created("z", 15, "z"),
        ]);
        assert_eq!(layout(&items), [">x", ">y", "z"]);
    }

    #[test]
    fn membership_and_lifecycle_events_sit_among_the_messages_by_time() {
        let mut renamed = membership(EventKind::ConversationRenamed, 35, "U1");
        renamed.text = "launch".into();
        let items = rehydrate(&[
            membership(EventKind::ConversationCreated, 1, "U1"),
            membership(EventKind::MemberJoined, 5, "U3"),
            created("m1", 10, "hi"),
            reply("m2", "m1", 40),
            renamed,
            membership(EventKind::MemberLeft, 50, "U3"),
            membership(EventKind::CaptureGap, 60, ""),
            membership(EventKind::ConversationArchived, 70, "U1"),
        ]);
        assert_eq!(
            layout(&items),
            [
                "*EVENT_KIND_CONVERSATION_CREATED",
                "*EVENT_KIND_MEMBER_JOINED",
                "m1",
                ">m2",
                "*EVENT_KIND_CONVERSATION_RENAMED",
                "*EVENT_KIND_MEMBER_LEFT",
                "*EVENT_KIND_CAPTURE_GAP",
                "*EVENT_KIND_CONVERSATION_ARCHIVED",
            ]
        );
    }

    #[test]
    fn archived_events_follow_the_view_in_input_order_when_asked() {
        let events = [
            created("m1", 10, "hi"),
            edited("m1", 20, "hi!"),
            membership(EventKind::MemberJoined, 15, "U2"),
        ];
        assert_eq!(restore_items(&events, false).len(), 2);
        let items = restore_items(&events, true);
        let raw: Vec<_> = layout(&items).into_iter().skip(2).collect();
        let expected: Vec<_> = events
            .iter()
            .map(|e| format!("raw:{}", e.event_id))
            .collect();
        assert_eq!(raw, expected);
    }

    #[test]
    fn message_events_without_a_message_id_are_kept_as_events() {
        let items = rehydrate(&[created("", 10, "who am I")]);
        assert_eq!(layout(&items), ["*EVENT_KIND_MESSAGE_CREATED"]);
    }
}
