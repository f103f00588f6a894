//! Delivery evidence: the signed body of a webhook delivery is kept once, not once per item.
//!
//! A delivery (one signed HTTP body) may carry many items (Standard Webhooks `chat.events`, Microsoft Graph
//! `value[]`). Copying the whole body into every item's event multiplied a 1 MiB body by its item count, in
//! memory and in Kafka. Instead:
//!
//! - each event's `raw_payload` is its own item's bytes, sliced verbatim from the body (never re-serialized),
//!   and `raw_payload_offset` says where that slice starts in the body; an event of a single-event platform
//!   (Slack, Mattermost, Discord) has the whole body at offset 0;
//! - every event of the delivery carries `delivery_sha256`, the hex SHA-256 of the whole body;
//! - the event with the smallest offset carries `delivery_envelope`: the body with every event's slice cut out
//!   (items that produced no event stay in it), empty when one event holds the whole body.
//!
//! [`reassemble`] is the auditor's recipe: sort a delivery's events by offset and insert each `raw_payload`
//! into the envelope at its offset; the result is the signed body byte for byte, which `delivery_sha256`
//! confirms. No Kafka record is larger than its item plus, for one event, the envelope.

use std::ops::Range;

use chatvault_proto::v1::ChatEvent;
use ring::digest;
use serde_json::value::RawValue;

use crate::error::IngestError;

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// The byte range of `slice` within `body`, when `slice` is a sub-slice of it (serde_json borrows raw values
/// from the input it parses, so their bytes are the body's own).
pub fn range_in(body: &[u8], slice: &str) -> Option<Range<usize>> {
    let start = (slice.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(slice.len())?;
    (body.get(start..end)? == slice.as_bytes()).then_some(start..end)
}

/// One item of a delivery: its verbatim JSON and where it starts in the body.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    pub json: &'a str,
    pub offset: usize,
}

impl<'a> Item<'a> {
    /// The item that serde_json borrowed from `body` as `raw`.
    pub fn of(body: &'a [u8], raw: &'a RawValue) -> Result<Item<'a>, IngestError> {
        let json = raw.get();
        let range = range_in(body, json).ok_or_else(|| {
            IngestError::malformed("an item of the body could not be located in it")
        })?;
        Ok(Item {
            json,
            offset: range.start,
        })
    }

    /// Every element of the JSON array `raw` (borrowed from `body`), each with its place in `body`. `what`
    /// names the array in the error when `raw` is not an array (`data`, `value`).
    pub fn elements(
        body: &'a [u8],
        raw: &'a RawValue,
        what: &str,
    ) -> Result<Vec<Item<'a>>, IngestError> {
        let elements: Vec<&'a RawValue> = serde_json::from_str(raw.get())
            .map_err(|_| IngestError::malformed(format!("{what} must be an array")))?;
        elements
            .into_iter()
            .map(|element| Item::of(body, element))
            .collect()
    }

    /// Whether the item is a JSON object.
    pub fn is_object(&self) -> bool {
        self.json.starts_with('{')
    }

    /// `event` with this item as its evidence: its bytes as `raw_payload`, its offset.
    pub fn attach(&self, mut event: ChatEvent) -> ChatEvent {
        event.raw_payload = self.json.as_bytes().to_vec();
        event.raw_payload_offset = self.offset as u64;
        event
    }
}

/// Whether `body`, after leading whitespace, starts a JSON object (`{`). serde's derived structs also accept
/// arrays (fields by position), which no platform sends.
pub fn is_json_object(body: &[u8]) -> bool {
    body.iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|byte| *byte == b'{')
}

/// A platform handler's event whose `raw_payload` is not the body's bytes at its `raw_payload_offset`, or
/// overlaps another event's: a bug of the handler, never the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event {event}: raw_payload is not the body's bytes at raw_payload_offset {raw_payload_offset} (or overlaps another event's)"
)]
pub struct SealError {
    /// The event's index in the delivery.
    pub event: usize,
    pub raw_payload_offset: u64,
}

/// Completes the evidence of one delivery's events: each event's `raw_payload` must be the slice of `body` at
/// its `raw_payload_offset` (platform handlers set both), and the slices must not overlap. Sets every event's
/// `delivery_sha256` and gives the envelope to the event with the smallest offset. The error names the event
/// whose slice is not the body's (a bug of the platform handler, never the sender's fault).
pub fn seal(body: &[u8], events: &mut [ChatEvent]) -> Result<(), SealError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&index| events[index].raw_payload_offset);
    let sliced: usize = events.iter().map(|event| event.raw_payload.len()).sum();
    let mut envelope = Vec::with_capacity(body.len().saturating_sub(sliced));
    let mut position = 0usize;
    for &index in &order {
        let event = &events[index];
        let start = usize::try_from(event.raw_payload_offset)
            .ok()
            .filter(|start| *start >= position);
        let range =
            start.and_then(|start| Some(start..start.checked_add(event.raw_payload.len())?));
        match range {
            Some(range) if body.get(range.clone()) == Some(event.raw_payload.as_slice()) => {
                envelope.extend_from_slice(&body[position..range.start]);
                position = range.end;
            }
            _ => {
                return Err(SealError {
                    event: index,
                    raw_payload_offset: event.raw_payload_offset,
                });
            }
        }
    }
    envelope.extend_from_slice(&body[position..]);
    let digest = sha256_hex(body);
    for event in events.iter_mut() {
        event.delivery_sha256.clone_from(&digest);
        event.delivery_envelope.clear();
    }
    events[order[0]].delivery_envelope = envelope;
    Ok(())
}

/// The auditor's recipe: the delivery's body from its envelope and its events' `(raw_payload_offset,
/// raw_payload)` pairs, in any order. `None` when the pieces do not fit together (an offset before the end of
/// the previous slice, or beyond the envelope). Compare the SHA-256 of the result with `delivery_sha256`: a
/// match proves the events are exactly the items of that signed body, none missing.
pub fn reassemble<'a>(
    envelope: &[u8],
    slices: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Option<Vec<u8>> {
    let mut slices: Vec<(u64, &[u8])> = slices.into_iter().collect();
    slices.sort_by_key(|(offset, _)| *offset);
    let total = slices.iter().try_fold(envelope.len(), |sum, (_, slice)| {
        sum.checked_add(slice.len())
    })?;
    let mut body = Vec::with_capacity(total);
    let mut taken = 0usize;
    for (offset, slice) in slices {
        let gap = usize::try_from(offset).ok()?.checked_sub(body.len())?;
        let end = taken.checked_add(gap)?;
        body.extend_from_slice(envelope.get(taken..end)?);
        taken = end;
        body.extend_from_slice(slice);
    }
    body.extend_from_slice(envelope.get(taken..)?);
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events cut from `body` at `ranges`, as a platform handler builds them.
    fn events(body: &[u8], ranges: &[(usize, usize)]) -> Vec<ChatEvent> {
        ranges
            .iter()
            .map(|&(start, end)| ChatEvent {
                raw_payload: body[start..end].to_vec(),
                raw_payload_offset: start as u64,
                ..Default::default()
            })
            .collect()
    }

    fn reassembled(events: &[ChatEvent]) -> Option<Vec<u8>> {
        let envelope = events
            .iter()
            .find(|event| !event.delivery_envelope.is_empty())
            .map(|event| event.delivery_envelope.as_slice())
            .unwrap_or_default();
        reassemble(
            envelope,
            events
                .iter()
                .map(|event| (event.raw_payload_offset, event.raw_payload.as_slice())),
        )
    }

    #[test]
    fn envelope_and_slices_reproduce_the_body_exactly() {
        let body =
            br#"{"type": "chat.events", "data": [ {"a":1} ,{"b":"\u00e9"},{"c":[1,2]}], "z":0}"#;
        let text = std::str::from_utf8(body).unwrap();
        let ranges: Vec<(usize, usize)> = ["{\"a\":1}", "{\"b\":\"\\u00e9\"}", "{\"c\":[1,2]}"]
            .iter()
            .map(|item| {
                let start = text.find(item).unwrap();
                (start, start + item.len())
            })
            .collect();
        // Events in another order than their items: the envelope goes to the first item's event.
        let mut sealed = events(body, &[ranges[2], ranges[0], ranges[1]]);
        seal(body, &mut sealed).expect("seal");
        assert_eq!(
            sealed[1].delivery_envelope,
            br#"{"type": "chat.events", "data": [  ,,], "z":0}"#.to_vec()
        );
        assert!(sealed[0].delivery_envelope.is_empty() && sealed[2].delivery_envelope.is_empty());
        assert!(
            sealed
                .iter()
                .all(|event| event.delivery_sha256 == sha256_hex(body))
        );
        assert_eq!(reassembled(&sealed).as_deref(), Some(&body[..]));
        // A missing event: the pieces no longer fit, or the digest no longer matches.
        for missing in 0..3 {
            let mut partial = sealed.clone();
            partial.remove(missing);
            assert_ne!(
                reassembled(&partial).map(|bytes| sha256_hex(&bytes)),
                Some(sha256_hex(body)),
                "without event {missing}"
            );
        }
        // One event holding the whole body: no envelope.
        let mut whole = events(body, &[(0, body.len())]);
        seal(body, &mut whole).expect("seal");
        assert!(whole[0].delivery_envelope.is_empty());
        assert_eq!(reassembled(&whole).as_deref(), Some(&body[..]));
    }

    #[test]
    fn slices_that_are_not_the_body_are_refused() {
        let body = b"[0123456789]";
        let mut overlapping = events(body, &[(1, 5), (4, 8)]);
        assert!(seal(body, &mut overlapping).is_err());
        let mut foreign = events(body, &[(1, 5)]);
        foreign[0].raw_payload = b"abcd".to_vec();
        assert!(seal(body, &mut foreign).is_err());
        let mut beyond = events(body, &[(1, 5)]);
        beyond[0].raw_payload_offset = 10;
        assert!(seal(body, &mut beyond).is_err());
        assert_eq!(reassemble(b"ab", [(5, &b"x"[..])]), None);
    }

    #[test]
    fn items_are_located_in_the_body_they_were_parsed_from() {
        let body = br#"{"value": [ {"x": 1},  {"y": [2]} ]}"#;
        #[derive(serde::Deserialize)]
        struct Batch<'a> {
            #[serde(borrow)]
            value: &'a RawValue,
        }
        let batch: Batch<'_> = serde_json::from_slice(body).expect("json");
        let items = Item::elements(body, batch.value, "value").expect("items");
        assert_eq!(
            items
                .iter()
                .map(|item| (item.offset, item.json))
                .collect::<Vec<_>>(),
            vec![(12, "{\"x\": 1}"), (23, "{\"y\": [2]}")]
        );
        let copy = String::from("{\"x\": 1}");
        assert!(range_in(body, &copy).is_none(), "a copy is not a slice");
        let not_array: Batch<'_> = serde_json::from_slice(br#"{"value": {}}"#).expect("json");
        assert!(Item::elements(br#"{"value": {}}"#, not_array.value, "value").is_err());
    }
}
