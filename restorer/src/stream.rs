//! Streaming restore: a conversation of any size is served with bounded memory.
//!
//! The view cannot be emitted in a single pass over the events in time order: a message's edits, deletion
//! and reactions can come long after it, and a thread root is followed by all its replies, however late they
//! are. So a restore runs in two passes over the conversation's candidate files:
//!
//! 1. **Plan** ([`Restorer::plan_conversation`]): read every candidate file once (`read_concurrency` at a
//!    time) and keep a compact index of the conversation: per event its time, Kafka record, kind, message
//!    and thread (interned ids), size and file; copies of one event collapsed to the first archived. From the
//!    index alone the conversation is laid out (`rehydrate::layout`): the order of every item is known
//!    before any item is built. A conversation whose events fit in [`BufferLimits`] keeps them from this
//!    pass and is rehydrated in memory as before (one read of each file).
//! 2. **Emit** ([`ConversationPlan::emit`]): walk the layout in groups of consecutive items whose events fit
//!    in the limits, fetch just those events again from the files that hold them, rehydrate the group's
//!    messages and send its items; then, with `include_events`, the archived events in time order in chunks
//!    within the limits. Items go out through a bounded channel, so a slow client slows the restore down
//!    instead of filling memory.
//!
//! **Memory bound** of one restore: the compact index (about 50 bytes per event plus each distinct message
//! and thread id once), the layout (one entry per item), at most [`BufferLimits`] events gathered for
//! emission (a single message with more events than the limit is folded in chunks of the limit), the states
//! of the messages of one group (their revisions' texts are what the client receives), and the decoded rows
//! of the conversation in at most `read_concurrency` files in flight plus the `read_concurrency` files read
//! last, kept for the next group (each at most one archive file's rows, the archiver's batch bound). Never
//! the whole conversation's events or payloads. The price is that files are read more than once: in the plan,
//! and again by the groups (and events chunks) that need events from them, less the groups served from the
//! files kept.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chatvault_archive::ArchivedEvent;
use chatvault_archive::manifest::ManifestFile;
use chatvault_core::event::is_about_a_message;
use chatvault_core::{Error, Result};
use chatvault_proto::v1::integrity_status::Coverage as IntegrityCoverage;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{ChatEvent, EventKind, IntegrityStatus, RestoreItem};
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;

use crate::index::{Coverage, Selection, TimeRange};
use crate::reader::Restorer;
use crate::rehydrate::{MessagePlace, MessageState, Placed, layout, rehydrate};

/// How many events (and event bytes, protobuf-encoded) a restore gathers at once for emission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    pub events: usize,
    pub bytes: usize,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            events: 4_096,
            bytes: 16 * 1024 * 1024,
        }
    }
}

/// Events held in memory by restores, now and at most (instrumentation for tests and metrics): decoded rows
/// of files in flight, events kept for emission.
#[derive(Debug, Default)]
pub(crate) struct BufferGauge {
    current: AtomicU64,
    peak: AtomicU64,
}

impl BufferGauge {
    pub(crate) fn hold(self: &Arc<Self>, events: usize) -> Held {
        let mut held = Held {
            gauge: self.clone(),
            events: 0,
        };
        held.add(events);
        held
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// A count of events in a [`BufferGauge`], released when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    gauge: Arc<BufferGauge>,
    events: u64,
}

impl Held {
    pub(crate) fn add(&mut self, events: usize) {
        let events = events as u64;
        self.events += events;
        let now = self.gauge.current.fetch_add(events, Ordering::Relaxed) + events;
        self.gauge.peak.fetch_max(now, Ordering::Relaxed);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.current.fetch_sub(self.events, Ordering::Relaxed);
    }
}

const NO_ID: u32 = u32::MAX;

/// One archived event of the conversation in the compact index.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: i64,
    partition: i32,
    offset: i64,
    kind: i32,
    /// Interned message id ([`NO_ID`] when empty).
    message: u32,
    /// Interned thread id ([`NO_ID`] when empty).
    thread: u32,
    /// Index of the candidate file holding it.
    file: u32,
    /// Protobuf-encoded size of the event.
    size: u32,
}

impl Slot {
    fn key(&self) -> (i64, i32, i64) {
        (self.at, self.partition, self.offset)
    }

    fn is_message_event(&self) -> bool {
        self.message != NO_ID
            && is_about_a_message(EventKind::try_from(self.kind).unwrap_or(EventKind::Unspecified))
    }
}

#[derive(Debug, Default)]
struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    fn intern(&mut self, id: &str) -> u32 {
        if id.is_empty() {
            return NO_ID;
        }
        if let Some(&index) = self.ids.get(id) {
            return index;
        }
        let index = self.names.len() as u32;
        self.names.push(id.to_string());
        self.ids.insert(id.to_string(), index);
        index
    }

    fn name(&self, index: u32) -> &str {
        self.names
            .get(index as usize)
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// A conversation ready to be streamed: its size is known, nothing of it is sent yet.
#[derive(Debug)]
pub struct ConversationPlan {
    tenant: String,
    conversation: String,
    include_events: bool,
    /// Sent first, when the restorer checks the transparency log.
    integrity: Option<IntegrityStatus>,
    /// Sent last, when asked for: the evidence document.
    evidence: Option<String>,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// Small enough to keep from the plan's read: the view, and the events when asked for.
    InMemory {
        view: Vec<RestoreItem>,
        events: Vec<ChatEvent>,
        _held: Held,
    },
    Streamed(Box<Streamed>),
}

#[derive(Debug)]
struct Streamed {
    files: Vec<Arc<ManifestFile>>,
    /// Deduplicated, in time order (time, Kafka partition, offset): the input positions of rehydration.
    slots: Vec<Slot>,
    names: Interner,
    /// Per interned message id, the positions of its events, ascending.
    events_of_message: HashMap<u32, Vec<u32>>,
    layout: Vec<Placed>,
}

impl ConversationPlan {
    /// How many items [`Self::emit`] sends (view items, plus archived events when asked for).
    pub fn item_count(&self) -> u64 {
        u64::from(self.integrity.is_some())
            + u64::from(self.evidence.is_some())
            + match &self.mode {
                Mode::InMemory { view, events, .. } => {
                    (view.len() + if self.include_events { events.len() } else { 0 }) as u64
                }
                Mode::Streamed(streamed) => {
                    (streamed.layout.len()
                        + if self.include_events {
                            streamed.slots.len()
                        } else {
                            0
                        }) as u64
                }
            }
    }

    /// Sends the items in conversation order (see `RestoreItem` in `restore.proto`). Stops early, without an
    /// error, when the receiver is gone.
    pub async fn emit(
        self,
        restorer: &Restorer,
        items: &mpsc::Sender<Result<RestoreItem>>,
    ) -> Result<()> {
        let include_events = self.include_events;
        if let Some(status) = self.integrity {
            let item = RestoreItem {
                item: Some(Item::Integrity(status)),
            };
            if items.send(Ok(item)).await.is_err() {
                return Ok(());
            }
        }
        match self.mode {
            Mode::InMemory {
                view,
                events,
                _held,
            } => {
                for item in view {
                    if items.send(Ok(item)).await.is_err() {
                        return Ok(());
                    }
                }
                if include_events {
                    for event in events {
                        let item = RestoreItem {
                            item: Some(Item::ArchivedEvent(event)),
                        };
                        if items.send(Ok(item)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            Mode::Streamed(streamed) => {
                let context = Emission {
                    restorer,
                    tenant: &self.tenant,
                    conversation: &self.conversation,
                    streamed: &streamed,
                    items,
                    recent: Mutex::new(VecDeque::new()),
                };
                if !context.emit_view().await? {
                    return Ok(());
                }
                if include_events {
                    context.emit_archived_events().await?;
                }
            }
        }
        if let Some(evidence) = self.evidence {
            let item = RestoreItem {
                item: Some(Item::Evidence(evidence)),
            };
            // A receiver gone by now needs nothing more.
            let _ = items.send(Ok(item)).await;
        }
        Ok(())
    }

    /// Ends the restore with `evidence` (a `chatvault-evidence-v1` document).
    pub fn with_evidence(mut self, evidence: String) -> ConversationPlan {
        self.evidence = Some(evidence);
        self
    }
}

struct Emission<'a> {
    restorer: &'a Restorer,
    tenant: &'a str,
    conversation: &'a str,
    streamed: &'a Streamed,
    items: &'a mpsc::Sender<Result<RestoreItem>>,
    /// The decoded rows of the files read last (at most `read_concurrency`), newest last: consecutive groups
    /// mostly need the same files.
    recent: Mutex<VecDeque<RecentFile>>,
}

struct RecentFile {
    file: u32,
    events: Arc<Vec<ArchivedEvent>>,
    _held: Held,
}

impl Emission<'_> {
    fn positions_of(&self, placed: &Placed) -> Vec<u32> {
        match placed {
            Placed::Message(id) => self
                .streamed
                .names
                .ids
                .get(id)
                .and_then(|message| self.streamed.events_of_message.get(message))
                .cloned()
                .unwrap_or_default(),
            Placed::Event(position) => vec![*position as u32],
        }
    }

    /// Splits positions (ascending) into runs within the buffer limits (at least one event each).
    fn chunks(&self, positions: &[u32]) -> Vec<std::ops::Range<usize>> {
        let limits = self.restorer.buffer_limits();
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (index, position) in positions.iter().enumerate() {
            let size = self.streamed.slots[*position as usize].size as usize;
            if index > start && (index - start >= limits.events || bytes + size > limits.bytes) {
                chunks.push(start..index);
                start = index;
                bytes = 0;
            }
            bytes += size;
        }
        if start < positions.len() {
            chunks.push(start..positions.len());
        }
        chunks
    }

    /// Sends the view, group by group; false when the receiver is gone.
    async fn emit_view(&self) -> Result<bool> {
        let limits = self.restorer.buffer_limits();
        let mut group: Vec<&Placed> = Vec::new();
        let (mut events, mut bytes) = (0usize, 0usize);
        for placed in &self.streamed.layout {
            let positions = self.positions_of(placed);
            let size: usize = positions
                .iter()
                .map(|p| self.streamed.slots[*p as usize].size as usize)
                .sum();
            if !group.is_empty()
                && (events + positions.len() > limits.events || bytes + size > limits.bytes)
            {
                if !self.emit_group(&group).await? {
                    return Ok(false);
                }
                group.clear();
                events = 0;
                bytes = 0;
            }
            group.push(placed);
            events += positions.len();
            bytes += size;
        }
        if !group.is_empty() {
            return self.emit_group(&group).await;
        }
        Ok(true)
    }

    async fn emit_group(&self, group: &[&Placed]) -> Result<bool> {
        let mut positions: Vec<u32> = group
            .iter()
            .flat_map(|placed| self.positions_of(placed))
            .collect();
        positions.sort_unstable();
        let mut states: HashMap<u32, MessageState> = HashMap::new();
        let mut events: HashMap<usize, ChatEvent> = HashMap::new();
        let mut held = self.restorer.buffer_gauge().hold(0);
        for chunk in self.chunks(&positions) {
            let chunk = &positions[chunk];
            let (fetched, _fetched_held) = self.fetch(chunk).await?;
            for (position, archived) in chunk.iter().zip(fetched) {
                let slot = self.streamed.slots[*position as usize];
                if slot.is_message_event() {
                    let kind = EventKind::try_from(slot.kind).unwrap_or(EventKind::Unspecified);
                    states
                        .entry(slot.message)
                        .or_insert_with(|| {
                            MessageState::first_seen(&archived.record, *position as usize)
                        })
                        .apply(kind, &archived.record);
                } else {
                    held.add(1);
                    events.insert(*position as usize, archived.record);
                }
            }
        }
        for placed in group {
            let item = match placed {
                Placed::Message(id) => {
                    let message = self.streamed.names.ids.get(id).copied();
                    let state = message.and_then(|message| states.remove(&message));
                    state.map(|state| Item::Message(state.into_message()))
                }
                Placed::Event(position) => events.remove(position).map(Item::Event),
            };
            let item = item.ok_or_else(|| {
                Error::internal(
                    "a planned restore item has no events: the archive changed during the restore",
                )
            })?;
            if self
                .items
                .send(Ok(RestoreItem { item: Some(item) }))
                .await
                .is_err()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn emit_archived_events(&self) -> Result<()> {
        let positions: Vec<u32> = (0..self.streamed.slots.len() as u32).collect();
        for chunk in self.chunks(&positions) {
            let (fetched, _held) = self.fetch(&positions[chunk]).await?;
            for archived in fetched {
                let item = RestoreItem {
                    item: Some(Item::ArchivedEvent(archived.record)),
                };
                if self.items.send(Ok(item)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The events at `positions` (ascending), read again from the files that hold them, in that order.
    async fn fetch(&self, positions: &[u32]) -> Result<(Vec<ArchivedEvent>, Held)> {
        let slots = &self.streamed.slots;
        let wanted: HashMap<(i32, i64), usize> = positions
            .iter()
            .enumerate()
            .map(|(index, position)| {
                let slot = slots[*position as usize];
                ((slot.partition, slot.offset), index)
            })
            .collect();
        let files: BTreeSet<u32> = positions
            .iter()
            .map(|position| slots[*position as usize].file)
            .collect();
        let mut found: Vec<Option<ArchivedEvent>> = (0..positions.len()).map(|_| None).collect();
        let mut held = self.restorer.buffer_gauge().hold(0);
        let mut pick = |events: &[ArchivedEvent]| {
            for archived in events {
                if let Some(&index) = wanted.get(&(archived.kafka_partition, archived.kafka_offset))
                    && found[index].is_none()
                {
                    found[index] = Some(archived.clone());
                    held.add(1);
                }
            }
        };
        let mut to_read = Vec::new();
        {
            let recent = self
                .recent
                .lock()
                .map_err(|_| Error::internal("restore cache poisoned"))?;
            for file in files {
                match recent.iter().find(|recent| recent.file == file) {
                    Some(recent) => pick(&recent.events),
                    None => to_read.push(file),
                }
            }
        }
        let mut decoded = futures::stream::iter(to_read)
            .map(|file| async move {
                let read = self
                    .restorer
                    .read_file_held(
                        self.streamed.files[file as usize].clone(),
                        self.tenant,
                        Some(self.conversation),
                    )
                    .await;
                (file, read)
            })
            .buffer_unordered(self.restorer.read_concurrency());
        while let Some((file, result)) = decoded.next().await {
            let (events, decoded_held) = result?;
            pick(&events);
            let mut recent = self
                .recent
                .lock()
                .map_err(|_| Error::internal("restore cache poisoned"))?;
            recent.push_back(RecentFile {
                file,
                events: Arc::new(events),
                _held: decoded_held,
            });
            while recent.len() > self.restorer.read_concurrency() {
                recent.pop_front();
            }
        }
        let events = found
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::internal(
                    "an archive file no longer holds an event it held when the restore was planned",
                )
            })?;
        Ok((events, held))
    }
}

impl Restorer {
    /// Plans the restore of `conversation` (pass 1 above): reads its candidate files once and either keeps the
    /// conversation (when it fits in the buffer limits) or an index of it. Errors of the archive (a broken
    /// chain, a missing or altered file, a missing key) surface here, before anything is sent.
    pub async fn plan_conversation(
        &self,
        tenant: &str,
        conversation: &str,
        range: TimeRange,
        include_events: bool,
    ) -> Result<ConversationPlan> {
        let Selection {
            files, coverage, ..
        } = self
            .index()
            .conversation_selection(tenant, conversation, range)
            .await?;
        let integrity = integrity_status(&coverage, files.len() as u64);
        let limits = self.buffer_limits();
        let mut names = Interner::default();
        let mut slots: Vec<(Slot, Box<str>)> = Vec::new();
        // The events themselves, while they fit in the limits.
        let mut kept: Option<(Vec<ArchivedEvent>, usize, Held)> =
            Some((Vec::new(), 0, self.buffer_gauge().hold(0)));
        let mut decoded = futures::stream::iter(files.iter().cloned().enumerate())
            .map(|(index, file)| async move {
                (
                    index,
                    self.read_file_held(file, tenant, Some(conversation)).await,
                )
            })
            .buffer_unordered(self.read_concurrency());
        while let Some((file, result)) = decoded.next().await {
            let (events, _decoded_held) = result?;
            for archived in events {
                let event = &archived.record;
                if !range.contains(event.occurred_at_micros) {
                    continue;
                }
                let size = event.encoded_len();
                let slot = Slot {
                    at: event.occurred_at_micros,
                    partition: archived.kafka_partition,
                    offset: archived.kafka_offset,
                    kind: event.kind,
                    message: names.intern(&event.message_id),
                    thread: names.intern(&event.thread_id),
                    file: file as u32,
                    size: u32::try_from(size).unwrap_or(u32::MAX),
                };
                slots.push((slot, event.event_id.clone().into_boxed_str()));
                if let Some((events, bytes, held)) = kept.as_mut() {
                    if events.len() < limits.events && *bytes + size <= limits.bytes {
                        events.push(archived);
                        *bytes += size;
                        held.add(1);
                    } else {
                        kept = None;
                    }
                }
            }
        }
        drop(decoded);
        // Copies of one event collapse to the first archived (lowest Kafka partition and offset); events
        // without an id are each their own.
        slots.sort_unstable_by(|(a, a_id), (b, b_id)| {
            (a_id.is_empty(), a_id, a.partition, a.offset).cmp(&(
                b_id.is_empty(),
                b_id,
                b.partition,
                b.offset,
            ))
        });
        slots.dedup_by(|(_, later), (_, first)| !later.is_empty() && later == first);
        let mut slots: Vec<Slot> = slots.into_iter().map(|(slot, _)| slot).collect();
        slots.sort_unstable_by_key(Slot::key);

        let mode = match kept {
            Some((events, _, held)) => {
                let mut by_record: HashMap<(i32, i64), ChatEvent> = events
                    .into_iter()
                    .map(|archived| {
                        (
                            (archived.kafka_partition, archived.kafka_offset),
                            archived.record,
                        )
                    })
                    .collect();
                let events: Vec<ChatEvent> = slots
                    .iter()
                    .filter_map(|slot| by_record.remove(&(slot.partition, slot.offset)))
                    .collect();
                let view = rehydrate(&events);
                Mode::InMemory {
                    view,
                    events: if include_events { events } else { Vec::new() },
                    _held: held,
                }
            }
            None => Mode::Streamed(Box::new(streamed_plan(files, slots, names))),
        };
        Ok(ConversationPlan {
            tenant: tenant.to_string(),
            conversation: conversation.to_string(),
            include_events,
            integrity,
            evidence: None,
            mode,
        })
    }
}

/// The `integrity` item of a restore that read `files` files, when the log is checked.
fn integrity_status(coverage: &Coverage, files: u64) -> Option<IntegrityStatus> {
    let (checkpoint, tree_size, uncovered_files) = match coverage {
        Coverage::NotChecked => return None,
        Coverage::NoCheckpoint => (String::new(), 0, files),
        Coverage::Checkpoint {
            note,
            tree_size,
            uncovered_files,
            ..
        } => (note.clone(), *tree_size, *uncovered_files),
    };
    let (state, detail) = if checkpoint.is_empty() {
        (
            IntegrityCoverage::NotCovered,
            format!("no checkpoint is signed yet: none of the {files} file(s) is covered"),
        )
    } else if uncovered_files == 0 {
        (
            IntegrityCoverage::Covered,
            format!("all {files} file(s) are covered by checkpoint {tree_size}"),
        )
    } else if uncovered_files == files {
        (
            IntegrityCoverage::NotCovered,
            format!(
                "none of the {files} file(s) is covered yet: all were committed after checkpoint {tree_size}"
            ),
        )
    } else {
        (
            IntegrityCoverage::PartlyCovered,
            format!(
                "{uncovered_files} of {files} file(s) were committed after checkpoint {tree_size}: not yet covered"
            ),
        )
    };
    Some(IntegrityStatus {
        coverage: state as i32,
        checkpoint,
        tree_size,
        files,
        uncovered_files,
        detail,
    })
}

/// Lays out a conversation from its compact index, with exactly the choices of [`rehydrate`] (see
/// `MessageState`): a message is dated by its first creation, else by its first event; its thread is the
/// first non-empty thread id among its events.
fn streamed_plan(files: Vec<Arc<ManifestFile>>, slots: Vec<Slot>, names: Interner) -> Streamed {
    struct Building {
        first_position: usize,
        first_at: i64,
        created_at: Option<i64>,
        thread: u32,
    }
    let mut messages: HashMap<u32, Building> = HashMap::new();
    let mut events_of_message: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut other_events = Vec::new();
    for (position, slot) in slots.iter().enumerate() {
        if !slot.is_message_event() {
            other_events.push((slot.at, position));
            continue;
        }
        events_of_message
            .entry(slot.message)
            .or_default()
            .push(position as u32);
        let building = messages.entry(slot.message).or_insert(Building {
            first_position: position,
            first_at: slot.at,
            created_at: None,
            thread: NO_ID,
        });
        if building.thread == NO_ID {
            building.thread = slot.thread;
        }
        if slot.kind == EventKind::MessageCreated as i32 && building.created_at.is_none() {
            building.created_at = Some(slot.at);
        }
    }
    let places = messages
        .into_iter()
        .map(|(message, building)| MessagePlace {
            message_id: names.name(message).to_string(),
            thread_id: names.name(building.thread).to_string(),
            created_at_micros: building.created_at.unwrap_or(building.first_at),
            first_position: building.first_position,
        })
        .collect();
    let layout = layout(places, other_events);
    Streamed {
        files,
        slots,
        names,
        events_of_message,
        layout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rehydrate::restore_items;
    use crate::testing::{Fixture, event};
    use chatvault_proto::v1::Sender;

    fn restorer(fixture: &Fixture, limits: BufferLimits) -> Restorer {
        Restorer::new(
            fixture.store.clone(),
            fixture.data_keys.clone(),
            &fixture.topic,
            2,
        )
        .with_buffer_limits(limits)
    }

    async fn collect(restorer: &Restorer, plan: ConversationPlan) -> Vec<RestoreItem> {
        let expected = plan.item_count();
        let (sender, mut receiver) = mpsc::channel(4);
        let emit = async move {
            let result = plan.emit(restorer, &sender).await;
            drop(sender);
            result
        };
        let receive = async {
            let mut items = Vec::new();
            while let Some(item) = receiver.recv().await {
                items.push(item.expect("item"));
            }
            items
        };
        let (result, items) = tokio::join!(emit, receive);
        result.expect("emitted");
        assert_eq!(items.len() as u64, expected, "item_count is what is sent");
        items
    }

    /// The reference: the whole conversation in memory, rehydrated at once.
    async fn in_memory(
        restorer: &Restorer,
        conversation: &str,
        range: TimeRange,
    ) -> Vec<RestoreItem> {
        let events: Vec<ChatEvent> = restorer
            .conversation_events("acme", conversation, range.from_micros, range.to_micros)
            .await
            .expect("events")
            .into_iter()
            .map(|archived| archived.record)
            .collect();
        restore_items(&events, true)
    }

    fn with(kind: EventKind, message: &str, at: i64, user: &str, id: &str) -> ChatEvent {
        let mut event = event("acme", "C1", message, at);
        event.kind = kind as i32;
        event.event_id = id.into();
        event.sender = Some(Sender {
            id: user.into(),
            display_name: user.into(),
            is_bot: false,
        });
        event.text = format!("{} of {message} at {at}", kind.as_str_name());
        event
    }

    /// A conversation of `messages` messages with everything rehydration cares about: threads whose replies
    /// come late, edits far after their message, deletions, reactions added and removed, membership events,
    /// events without a message id or an event id, creations missing, and retried copies in later files.
    fn conversation(messages: usize) -> Vec<ChatEvent> {
        use EventKind::*;
        let mut events = Vec::new();
        for i in 0..messages {
            let at = 1_000_000 + i as i64 * 100;
            let id = format!("m{i}");
            let mut created = with(MessageCreated, &id, at, "U1", &format!("{id}/c"));
            created.raw_payload = vec![b'p'; 200];
            if i % 4 == 1 {
                // A reply to an earlier root, sometimes long after it.
                created.thread_id = format!("m{}", (i / 40) * 40);
            }
            if i % 97 != 5 {
                events.push(created);
            }
            if i % 3 == 0 {
                let late = at + 50_000 + (i as i64 % 7) * 1_000;
                events.push(with(MessageEdited, &id, late, "U1", &format!("{id}/e1")));
                events.push(with(
                    MessageEdited,
                    &id,
                    late + 7,
                    "U1",
                    &format!("{id}/e2"),
                ));
            }
            if i % 5 == 0 {
                events.push(with(ReactionAdded, &id, at + 10, "U2", &format!("{id}/r1")));
                events.push(with(ReactionAdded, &id, at + 20, "U3", &format!("{id}/r2")));
                events.push(with(
                    ReactionRemoved,
                    &id,
                    at + 90_000,
                    "U2",
                    &format!("{id}/r3"),
                ));
            }
            if i % 10 == 7 {
                events.push(with(
                    MessageDeleted,
                    &id,
                    at + 70_000,
                    "U1",
                    &format!("{id}/d"),
                ));
            }
            if i % 50 == 0 {
                events.push(with(
                    MemberJoined,
                    "",
                    at + 1,
                    &format!("U{i}"),
                    &format!("j{i}"),
                ));
            }
            if i % 200 == 3 {
                // No event id: kept as its own record.
                events.push(with(MemberLeft, "", at + 2, "U9", ""));
            }
        }
        events.sort_by_key(|e| e.occurred_at_micros);
        events
    }

    /// Archives `events` in time order in batches of `batch` events over two partitions, with retried copies
    /// (different text, so the kept copy shows) of some events in later batches.
    async fn archive(fixture: &Fixture, events: &[ChatEvent], batch: usize) {
        for (index, chunk) in events.chunks(batch).enumerate() {
            let mut rows = chunk.to_vec();
            if index > 0 {
                let earlier = &events[(index - 1) * batch];
                let mut copy = earlier.clone();
                copy.text = "a retried copy".into();
                rows.push(copy);
            }
            fixture.commit_batch(index as i32 % 2, &rows).await;
        }
    }

    #[tokio::test]
    async fn a_streamed_restore_equals_the_in_memory_restore() {
        let fixture = Fixture::new().await;
        let events = conversation(400);
        archive(&fixture, &events, 97).await;
        let reference = restorer(&fixture, BufferLimits::default());
        for range in [TimeRange::UNBOUNDED, TimeRange::new(1_010_000, 1_030_000)] {
            let expected = in_memory(&reference, "C1", range).await;
            assert!(expected.len() > 400, "{}", expected.len());
            for limits in [
                BufferLimits::default(),
                BufferLimits {
                    events: 7,
                    bytes: usize::MAX,
                },
                BufferLimits {
                    events: 10_000,
                    bytes: 8_000,
                },
            ] {
                let restorer = restorer(&fixture, limits);
                let plan = restorer
                    .plan_conversation("acme", "C1", range, true)
                    .await
                    .expect("plan");
                let streamed = matches!(plan.mode, Mode::Streamed(_));
                assert_eq!(streamed, limits != BufferLimits::default(), "{limits:?}");
                let items = collect(&restorer, plan).await;
                assert!(
                    items == expected,
                    "{limits:?} {range:?}: the restores differ"
                );
                // Without events only the view is sent.
                let plan = restorer
                    .plan_conversation("acme", "C1", range, false)
                    .await
                    .expect("plan");
                let view = collect(&restorer, plan).await;
                assert!(
                    view.iter()
                        .all(|item| !matches!(item.item, Some(Item::ArchivedEvent(_))))
                );
                assert!(expected.starts_with(&view));
            }
        }
    }

    #[tokio::test]
    async fn a_conversation_far_larger_than_the_buffer_limits_is_restored_within_them() {
        let fixture = Fixture::new().await;
        let events = conversation(12_000);
        let total = events.len();
        const PER_FILE: usize = 500;
        archive(&fixture, &events, PER_FILE).await;
        let limits = BufferLimits {
            events: 500,
            bytes: usize::MAX,
        };
        let restorer = restorer(&fixture, limits);
        let plan = restorer
            .plan_conversation("acme", "C1", TimeRange::UNBOUNDED, true)
            .await
            .expect("plan");
        assert!(matches!(plan.mode, Mode::Streamed(_)));
        let items = collect(&restorer, plan).await;
        let archived = items
            .iter()
            .filter(|item| matches!(item.item, Some(Item::ArchivedEvent(_))))
            .count();
        assert_eq!(archived, total, "every event once, copies collapsed");
        // At most: the events gathered for one group or chunk (counted twice while a chunk is folded), plus
        // the decoded rows of `read_concurrency` (2) files in flight and 2 kept, each at most one file (plus
        // its copy).
        let bound = 2 * limits.events + 4 * (PER_FILE + 1);
        let peak = restorer.peak_buffered_events() as usize;
        eprintln!(
            "conversation of {total} events ({} items): at most {peak} events held at once (bound {bound})",
            items.len()
        );
        assert!(peak <= bound, "{peak} events held at once, bound {bound}");
        assert!(
            total > 9 * bound,
            "the conversation is far larger than the bound"
        );
        // And it is the same conversation.
        let expected = in_memory(&restorer, "C1", TimeRange::UNBOUNDED).await;
        assert!(items == expected, "the streamed restore differs");
    }
}
