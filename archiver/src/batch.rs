//! Open and sealed batches.
//!
//! A batch covers a contiguous range of one partition's offsets, `[start_offset, end_offset)`, starting where
//! the previous batch (or the committed chain) ended, so consecutive manifests tile the partition without gaps
//! even when Kafka offsets themselves have gaps (compaction, transaction markers).

use std::collections::BTreeMap;
use std::time::Instant;

use chatvault_archive::Archived;
use chatvault_archive::keys::KeyScopes;
use chatvault_archive::kind::{ChatEvents, RecordKind};
use chatvault_archive::manifest::OffsetGap;
use chatvault_core::time::Date;

/// The batch a partition is filling, of records of kind `K`.
#[derive(Debug)]
pub struct OpenBatch<K: RecordKind = ChatEvents> {
    pub partition: i32,
    pub generation: u64,
    pub seq: u64,
    pub start_offset: i64,
    /// Offset after the last record added.
    pub end_offset: i64,
    pub events: Vec<Archived<K::Record>>,
    pub rejected: Vec<Rejected>,
    /// Offsets of the range that Kafka did not deliver (see [`OffsetGap`]).
    pub offset_gaps: Vec<OffsetGap>,
    pub bytes: usize,
    pub opened_at: Instant,
    /// `traceparent` headers of the first traced records (at most [`MAX_TRACED_RECORDS`]): the batch's span
    /// continues the first one's trace and links to the others.
    pub traces: Vec<String>,
}

/// A record that can never be archived, with its reason and its bytes (for the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub offset: i64,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

/// Traced records a batch remembers: one parent plus links, enough to find a batch from the traces of its
/// events without holding a header per record.
pub const MAX_TRACED_RECORDS: usize = 32;

impl<K: RecordKind> OpenBatch<K> {
    pub fn new(partition: i32, generation: u64, seq: u64, start_offset: i64) -> OpenBatch<K> {
        OpenBatch {
            partition,
            generation,
            seq,
            start_offset,
            end_offset: start_offset,
            events: Vec::new(),
            rejected: Vec::new(),
            offset_gaps: Vec::new(),
            bytes: 0,
            opened_at: Instant::now(),
            traces: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.end_offset == self.start_offset
    }

    /// Records the offsets between the last one seen and `offset` as a gap, when there are any.
    fn note_gap(&mut self, offset: i64) {
        if self.is_empty() {
            self.opened_at = Instant::now();
        }
        if offset > self.end_offset {
            if offset - self.end_offset > 1 {
                tracing::warn!(
                    partition = self.partition,
                    from = self.end_offset,
                    to = offset,
                    "Kafka offsets missing: deleted by retention before they were archived, or compacted"
                );
            }
            self.offset_gaps.push(OffsetGap {
                from: self.end_offset,
                to: offset,
            });
        }
    }

    pub fn push_event(&mut self, event: Archived<K::Record>, encoded_len: usize) {
        self.note_gap(event.kafka_offset);
        self.end_offset = event.kafka_offset + 1;
        self.bytes += encoded_len;
        self.events.push(event);
    }

    pub fn push_rejected(&mut self, rejected: Rejected) {
        self.note_gap(rejected.offset);
        self.end_offset = rejected.offset + 1;
        self.bytes += rejected.value.len() + rejected.key.as_ref().map_or(0, Vec::len);
        self.rejected.push(rejected);
    }

    /// Closes the batch; the next one starts at `end_offset` with sequence number `seq + 1`.
    pub fn seal(self) -> SealedBatch<K> {
        SealedBatch {
            partition: self.partition,
            generation: self.generation,
            seq: self.seq,
            start_offset: self.start_offset,
            end_offset: self.end_offset,
            events: self.events,
            rejected: self.rejected,
            offset_gaps: self.offset_gaps,
            bytes: self.bytes,
            traces: self.traces,
        }
    }
}

/// A batch handed to the writer. Moved from the poll thread to its lane, never copied (tests keep copies to
/// compare against).
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub struct SealedBatch<K: RecordKind = ChatEvents> {
    pub partition: i32,
    pub generation: u64,
    pub seq: u64,
    pub start_offset: i64,
    pub end_offset: i64,
    pub events: Vec<Archived<K::Record>>,
    pub rejected: Vec<Rejected>,
    pub offset_gaps: Vec<OffsetGap>,
    pub bytes: usize,
    /// See [`OpenBatch::traces`].
    pub traces: Vec<String>,
}

/// Rows of one future file: the records of one key owner's key scope (a tenant's events, or those of one of
/// its `keys.scopes`) of one UTC date.
#[derive(Debug)]
pub struct FileGroup<'a, K: RecordKind = ChatEvents> {
    pub key_owner: &'a str,
    pub key_scope: &'a str,
    pub date: Date,
    pub rows: Vec<&'a Archived<K::Record>>,
}

/// Groups a batch's records by (key scope, UTC date of the record's time), collapsing copies of one record
/// within the batch (a retried send produced twice). A chat event's identity is `(tenant_id,
/// conversation_id, event_id)`: senders number events per conversation, so the same `event_id` in another
/// conversation or tenant is another event. Copies across batches are collapsed by readers, under the same
/// identity.
pub fn group_into_files<'a, K: RecordKind>(
    events: &'a [Archived<K::Record>],
    scopes: &'a KeyScopes,
) -> Vec<FileGroup<'a, K>> {
    // (key owner, key scope, date) → rows.
    type Groups<'r, R> = BTreeMap<(&'r str, &'r str, Date), Vec<&'r Archived<R>>>;
    let mut groups: Groups<'a, K::Record> = BTreeMap::new();
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for archived in events {
        let owner = K::key_owner(&archived.record);
        if !seen.insert((owner, K::identity(&archived.record))) {
            continue;
        }
        let scope = K::key_scope(&archived.record, scopes);
        let date = Date::from_micros(K::time_micros(&archived.record));
        groups
            .entry((owner, scope, date))
            .or_default()
            .push(archived);
    }
    groups
        .into_iter()
        .map(|((key_owner, key_scope, date), rows)| FileGroup {
            key_owner,
            key_scope,
            date,
            rows,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatvault_archive::ArchivedEvent;
    use chatvault_proto::v1::ChatEvent;

    fn event(tenant: &str, id: &str, micros: i64, offset: i64) -> ArchivedEvent {
        ArchivedEvent {
            record: ChatEvent {
                event_id: id.into(),
                tenant_id: tenant.into(),
                conversation_id: "c".into(),
                occurred_at_micros: micros,
                ..Default::default()
            },
            kafka_partition: 0,
            kafka_offset: offset,
        }
    }

    #[test]
    fn batches_tile_offsets_and_groups_split_by_tenant_and_date() {
        let day = chatvault_core::time::MICROS_PER_DAY;
        let mut batch = OpenBatch::<ChatEvents>::new(0, 1, 7, 100);
        assert!(batch.is_empty());
        batch.push_event(event("a", "e1", day, 103), 10);
        assert_eq!(batch.offset_gaps, vec![OffsetGap { from: 100, to: 103 }]);
        batch.push_rejected(Rejected {
            offset: 104,
            reason: "not a ChatEvent".into(),
            key: None,
            value: vec![1, 2],
        });
        batch.push_event(event("b", "e2", day, 105), 10);
        batch.push_event(event("a", "e3", 2 * day + 1, 106), 10);
        batch.push_event(event("a", "e1", day, 107), 10);
        let sealed = batch.seal();
        assert_eq!(
            (sealed.start_offset, sealed.end_offset, sealed.seq),
            (100, 108, 7)
        );
        let scopes = KeyScopes::default();
        let groups = group_into_files::<ChatEvents>(&sealed.events, &scopes);
        let shape: Vec<(&str, String, usize)> = groups
            .iter()
            .map(|g| (g.key_owner, g.date.iso(), g.rows.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a", "1970-01-02".to_string(), 1),
                ("a", "1970-01-03".to_string(), 1),
                ("b", "1970-01-02".to_string(), 1)
            ]
        );
    }

    #[test]
    fn only_copies_of_one_identity_collapse() {
        // Per-conversation sequence numbers: ids "1".."5" in 8 conversations of t1 and 1 of t2, all sent twice.
        let mut batch = OpenBatch::<ChatEvents>::new(0, 1, 0, 0);
        let mut offset = 0;
        for _copy in 0..2 {
            for (tenant, conversations) in [("t1", 8), ("t2", 1)] {
                for conversation in 0..conversations {
                    for id in 1..=5 {
                        let mut archived = event(tenant, &id.to_string(), 1, offset);
                        archived.record.conversation_id = format!("c{conversation}");
                        batch.push_event(archived, 10);
                        offset += 1;
                    }
                }
            }
        }
        let sealed = batch.seal();
        let scopes = KeyScopes::default();
        let groups = group_into_files::<ChatEvents>(&sealed.events, &scopes);
        let kept: usize = groups.iter().map(|group| group.rows.len()).sum();
        assert_eq!(kept, 45, "one row per (tenant, conversation, event id)");
        assert!(
            groups
                .iter()
                .flat_map(|group| &group.rows)
                .all(|row| row.kafka_offset < 45),
            "the first copy is kept"
        );
    }

    /// A record as Kafka delivers it to one partition: its offset comes after a gap of `skip` offsets, and it
    /// is a chat event of some (tenant, conversation, event id), or an undecodable record.
    #[derive(Debug, Clone)]
    struct Delivered {
        skip: i64,
        identity: Option<(u8, u8, u8)>,
        seal_after: bool,
    }

    fn delivered() -> impl proptest::strategy::Strategy<Value = Delivered> {
        use proptest::prelude::*;
        (
            prop_oneof![8 => Just(0i64), 1 => 1i64..5],
            proptest::option::weighted(0.9, (0u8..3, 0u8..4, 0u8..6)),
            proptest::bool::weighted(0.15),
        )
            .prop_map(|(skip, identity, seal_after)| Delivered {
                skip,
                identity,
                seal_after,
            })
    }

    proptest::proptest! {
        /// Batches filled from any delivery (gaps, undecodable records, the same event id in other
        /// conversations and tenants, copies of one event) and sealed at any point tile the partition: every
        /// offset from the start to the last delivered one is in exactly one batch, as an event, a rejected
        /// record or a gap; and a batch's files keep exactly one row per distinct identity.
        #[test]
        fn batches_tile_every_offset_once_and_keep_every_identity(
            start in 0i64..1_000,
            records in proptest::collection::vec(delivered(), 1..200),
        ) {
            let mut sealed = Vec::new();
            let mut open = OpenBatch::<ChatEvents>::new(3, 1, 0, start);
            let mut offset = start;
            for record in &records {
                offset += record.skip;
                match record.identity {
                    Some((tenant, conversation, id)) => {
                        let mut archived = event(&format!("t{tenant}"), &format!("e{id}"), 1, offset);
                        archived.record.conversation_id = format!("c{conversation}");
                        open.push_event(archived, 10);
                    }
                    None => open.push_rejected(Rejected {
                        offset,
                        reason: "not a ChatEvent".into(),
                        key: None,
                        value: vec![0xff],
                    }),
                }
                offset += 1;
                if record.seal_after {
                    let next = OpenBatch::<ChatEvents>::new(3, 1, open.seq + 1, open.end_offset);
                    sealed.push(std::mem::replace(&mut open, next).seal());
                }
            }
            if !open.is_empty() {
                sealed.push(open.seal());
            }

            let mut covered = std::collections::BTreeMap::new();
            let mut expected_start = start;
            for (index, batch) in sealed.iter().enumerate() {
                proptest::prop_assert_eq!(batch.seq, index as u64);
                proptest::prop_assert_eq!(batch.start_offset, expected_start, "batches are contiguous");
                expected_start = batch.end_offset;
                let mut mark = |offset: i64, what: &str| {
                    proptest::prop_assert!(
                        (batch.start_offset..batch.end_offset).contains(&offset),
                        "offset {} outside its batch", offset
                    );
                    proptest::prop_assert!(covered.insert(offset, what.to_string()).is_none(), "offset {} twice", offset);
                    Ok(())
                };
                for archived in &batch.events {
                    mark(archived.kafka_offset, "event")?;
                }
                for rejected in &batch.rejected {
                    mark(rejected.offset, "rejected")?;
                }
                for gap in &batch.offset_gaps {
                    for missing in gap.from..gap.to {
                        mark(missing, "gap")?;
                    }
                }
                let distinct: std::collections::HashSet<(String, String, String)> = batch
                    .events
                    .iter()
                    .map(|a| (a.record.tenant_id.clone(), a.record.conversation_id.clone(), a.record.event_id.clone()))
                    .collect();
                let scopes = KeyScopes::default();
                let rows: Vec<(String, String, String)> = group_into_files::<ChatEvents>(&batch.events, &scopes)
                    .iter()
                    .flat_map(|group| group.rows.iter())
                    .map(|a| (a.record.tenant_id.clone(), a.record.conversation_id.clone(), a.record.event_id.clone()))
                    .collect();
                proptest::prop_assert_eq!(rows.len(), distinct.len(), "one row per identity");
                let kept: std::collections::HashSet<_> = rows.into_iter().collect();
                proptest::prop_assert_eq!(kept, distinct, "no identity dropped");
            }
            proptest::prop_assert_eq!(expected_start, offset, "the last batch ends after the last record");
            let all: Vec<i64> = covered.keys().copied().collect();
            proptest::prop_assert_eq!(all, (start..offset).collect::<Vec<_>>(), "every offset covered once");
        }
    }
}
