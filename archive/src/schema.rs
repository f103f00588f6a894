//! The archive's Arrow/Parquet schema and the conversion between [`ArchivedEvent`]s and record batches.
//!
//! One row per archived Kafka record. Empty strings of the protobuf event are stored as nulls; timestamps are
//! `TIMESTAMP(MICROS, UTC)`; enums are stored by name (`message_created`, `slack`) so that SQL reads naturally.
//!
//! `mentions` and `attachments` are JSON text columns rather than Parquet lists: DuckDB 2.0.1 fails to decrypt
//! nested (repeated) columns of arrow-rs 60 encrypted files ("Computed AES tag differs from read AES tag")
//! while it reads every flat column, and being readable by DuckDB with the data key is a fixed requirement.
//! The standard-reader test catches a regression.

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chatvault_proto::v1::{Attachment, ChatEvent, Sender};
use serde::{Deserialize, Serialize};

use crate::{ArchivedEvent, format_error};
use chatvault_core::error::{Error, Result};
use chatvault_core::event::{kind_from_name, kind_name, source_from_name, source_name};

pub const COL_CONVERSATION_ID: &str = "conversation_id";
pub const COL_OCCURRED_AT: &str = "occurred_at";
pub const COL_DELIVERY_SHA256: &str = "delivery_sha256";
pub const COL_RAW_PAYLOAD_OFFSET: &str = "raw_payload_offset";
pub const COL_DELIVERY_ENVELOPE: &str = "delivery_envelope";

pub(crate) fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("tenant_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("workspace_id", DataType::Utf8, true),
        Field::new(COL_CONVERSATION_ID, DataType::Utf8, false),
        Field::new("thread_id", DataType::Utf8, true),
        Field::new("message_id", DataType::Utf8, true),
        Field::new("kind", DataType::Utf8, false),
        Field::new("sender_id", DataType::Utf8, true),
        Field::new("sender_name", DataType::Utf8, true),
        Field::new("sender_is_bot", DataType::Boolean, false),
        Field::new(COL_OCCURRED_AT, utc_micros(), false),
        Field::new("received_at", utc_micros(), false),
        Field::new("text", DataType::Utf8, true),
        Field::new("reaction", DataType::Utf8, true),
        Field::new("mentions_json", DataType::Utf8, true),
        Field::new("attachments_json", DataType::Utf8, true),
        Field::new("raw_payload", DataType::Binary, true),
        Field::new("raw_content_type", DataType::Utf8, true),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        // Delivery evidence, added after the first files were written: trailing and nullable, and optional on
        // read (files written before lack them).
        Field::new(COL_DELIVERY_SHA256, DataType::Utf8, true),
        Field::new(COL_RAW_PAYLOAD_OFFSET, DataType::Int64, true),
        Field::new(COL_DELIVERY_ENVELOPE, DataType::Binary, true),
    ]))
});

/// The archive schema (version 1).
pub fn archive_schema() -> SchemaRef {
    SCHEMA.clone()
}

pub(crate) fn optional(builder: &mut StringBuilder, value: &str) {
    if value.is_empty() {
        builder.append_null();
    } else {
        builder.append_value(value);
    }
}

/// Builds a record batch of `rows`, in the given order.
pub fn to_record_batch(rows: &[&ArchivedEvent]) -> Result<RecordBatch> {
    let capacity = rows.len();
    let mut event_id = StringBuilder::with_capacity(capacity, capacity * 36);
    let mut tenant_id = StringBuilder::with_capacity(capacity, capacity * 8);
    let mut source = StringBuilder::with_capacity(capacity, capacity * 6);
    let mut workspace_id = StringBuilder::new();
    let mut conversation_id = StringBuilder::new();
    let mut thread_id = StringBuilder::new();
    let mut message_id = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut sender_id = StringBuilder::new();
    let mut sender_name = StringBuilder::new();
    let mut sender_is_bot = BooleanBuilder::with_capacity(capacity);
    let mut occurred_at = TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC");
    let mut received_at = TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC");
    let mut text = StringBuilder::new();
    let mut reaction = StringBuilder::new();
    let mut mentions = StringBuilder::new();
    let mut attachments = StringBuilder::new();
    let mut raw_payload = BinaryBuilder::new();
    let mut raw_content_type = StringBuilder::new();
    let mut kafka_partition = Int32Builder::with_capacity(capacity);
    let mut kafka_offset = Int64Builder::with_capacity(capacity);
    let mut delivery_sha256 = StringBuilder::new();
    let mut raw_payload_offset = Int64Builder::with_capacity(capacity);
    let mut delivery_envelope = BinaryBuilder::new();

    for row in rows {
        let event = &row.record;
        let sender = event.sender.clone().unwrap_or_default();
        event_id.append_value(&event.event_id);
        tenant_id.append_value(&event.tenant_id);
        source.append_value(source_name(event.source));
        optional(&mut workspace_id, &event.workspace_id);
        conversation_id.append_value(&event.conversation_id);
        optional(&mut thread_id, &event.thread_id);
        optional(&mut message_id, &event.message_id);
        kind.append_value(kind_name(event.kind));
        optional(&mut sender_id, &sender.id);
        optional(&mut sender_name, &sender.display_name);
        sender_is_bot.append_value(sender.is_bot);
        occurred_at.append_value(event.occurred_at_micros);
        received_at.append_value(event.received_at_micros);
        optional(&mut text, &event.text);
        optional(&mut reaction, &event.reaction);
        if event.mentions.is_empty() {
            mentions.append_null();
        } else {
            mentions.append_value(serde_json::to_string(&event.mentions)?);
        }
        if event.attachments.is_empty() {
            attachments.append_null();
        } else {
            let json: Vec<AttachmentJson> =
                event.attachments.iter().map(AttachmentJson::from).collect();
            attachments.append_value(serde_json::to_string(&json)?);
        }
        if event.raw_payload.is_empty() {
            raw_payload.append_null();
        } else {
            raw_payload.append_value(&event.raw_payload);
        }
        optional(&mut raw_content_type, &event.raw_content_type);
        kafka_partition.append_value(row.kafka_partition);
        kafka_offset.append_value(row.kafka_offset);
        if event.delivery_sha256.is_empty() {
            delivery_sha256.append_null();
            raw_payload_offset.append_null();
        } else {
            delivery_sha256.append_value(&event.delivery_sha256);
            let offset = i64::try_from(event.raw_payload_offset).map_err(|_| {
                Error::internal(format!(
                    "raw_payload_offset {} does not fit int64",
                    event.raw_payload_offset
                ))
            })?;
            raw_payload_offset.append_value(offset);
        }
        if event.delivery_envelope.is_empty() {
            delivery_envelope.append_null();
        } else {
            delivery_envelope.append_value(&event.delivery_envelope);
        }
    }

    let columns: Vec<ArrayRef> = vec![
        Arc::new(event_id.finish()),
        Arc::new(tenant_id.finish()),
        Arc::new(source.finish()),
        Arc::new(workspace_id.finish()),
        Arc::new(conversation_id.finish()),
        Arc::new(thread_id.finish()),
        Arc::new(message_id.finish()),
        Arc::new(kind.finish()),
        Arc::new(sender_id.finish()),
        Arc::new(sender_name.finish()),
        Arc::new(sender_is_bot.finish()),
        Arc::new(occurred_at.finish()),
        Arc::new(received_at.finish()),
        Arc::new(text.finish()),
        Arc::new(reaction.finish()),
        Arc::new(mentions.finish()),
        Arc::new(attachments.finish()),
        Arc::new(raw_payload.finish()),
        Arc::new(raw_content_type.finish()),
        Arc::new(kafka_partition.finish()),
        Arc::new(kafka_offset.finish()),
        Arc::new(delivery_sha256.finish()),
        Arc::new(raw_payload_offset.finish()),
        Arc::new(delivery_envelope.finish()),
    ];
    RecordBatch::try_new(archive_schema(), columns).map_err(format_error)
}

pub(crate) fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| Error::internal(format!("archive file lacks column {name}")))
}

pub(crate) fn strings<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a arrow_array::StringArray> {
    column(batch, name)?
        .as_string_opt::<i32>()
        .ok_or_else(|| Error::internal(format!("column {name} is not utf8")))
}

pub(crate) fn string_at(array: &arrow_array::StringArray, row: usize) -> String {
    if array.is_null(row) {
        String::new()
    } else {
        array.value(row).to_string()
    }
}

/// Decodes the rows of a record batch for which `keep(row)` holds. Every column of the archive schema must be
/// present except the delivery evidence columns, which files written before they existed lack (read as empty).
pub fn from_record_batch(
    batch: &RecordBatch,
    mut keep: impl FnMut(usize) -> bool,
) -> Result<Vec<ArchivedEvent>> {
    let event_id = strings(batch, "event_id")?;
    let tenant_id = strings(batch, "tenant_id")?;
    let source = strings(batch, "source")?;
    let workspace_id = strings(batch, "workspace_id")?;
    let conversation_id = strings(batch, COL_CONVERSATION_ID)?;
    let thread_id = strings(batch, "thread_id")?;
    let message_id = strings(batch, "message_id")?;
    let kind = strings(batch, "kind")?;
    let sender_id = strings(batch, "sender_id")?;
    let sender_name = strings(batch, "sender_name")?;
    let sender_is_bot = column(batch, "sender_is_bot")?
        .as_boolean_opt()
        .ok_or_else(|| Error::internal("sender_is_bot is not boolean"))?;
    let occurred_at = column(batch, COL_OCCURRED_AT)?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| Error::internal("occurred_at is not a timestamp"))?;
    let received_at = column(batch, "received_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| Error::internal("received_at is not a timestamp"))?;
    let text = strings(batch, "text")?;
    let reaction = strings(batch, "reaction")?;
    let mentions = strings(batch, "mentions_json")?;
    let attachments = strings(batch, "attachments_json")?;
    let raw_payload = column(batch, "raw_payload")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| Error::internal("raw_payload is not binary"))?;
    let raw_content_type = strings(batch, "raw_content_type")?;
    let kafka_partition = column(batch, "kafka_partition")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| Error::internal("kafka_partition is not int32"))?;
    let kafka_offset = column(batch, "kafka_offset")?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| Error::internal("kafka_offset is not int64"))?;
    let delivery_sha256 = batch
        .column_by_name(COL_DELIVERY_SHA256)
        .map(|_| strings(batch, COL_DELIVERY_SHA256))
        .transpose()?;
    let raw_payload_offset = batch
        .column_by_name(COL_RAW_PAYLOAD_OFFSET)
        .map(|array| {
            array
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| Error::internal("raw_payload_offset is not int64"))
        })
        .transpose()?;
    let delivery_envelope = batch
        .column_by_name(COL_DELIVERY_ENVELOPE)
        .map(|array| {
            array
                .as_binary_opt::<i32>()
                .ok_or_else(|| Error::internal("delivery_envelope is not binary"))
        })
        .transpose()?;

    let mut out = Vec::new();
    for row in 0..batch.num_rows() {
        if !keep(row) {
            continue;
        }
        let mention_list: Vec<String> = if mentions.is_null(row) {
            Vec::new()
        } else {
            serde_json::from_str(mentions.value(row))
                .map_err(|error| Error::internal(format!("mentions_json of row {row}: {error}")))?
        };
        let attachment_list: Vec<Attachment> = if attachments.is_null(row) {
            Vec::new()
        } else {
            serde_json::from_str::<Vec<AttachmentJson>>(attachments.value(row))
                .map_err(|error| {
                    Error::internal(format!("attachments_json of row {row}: {error}"))
                })?
                .into_iter()
                .map(Attachment::from)
                .collect()
        };
        let kind_text = kind.value(row);
        let source_text = source.value(row);
        let sender = Sender {
            id: string_at(sender_id, row),
            display_name: string_at(sender_name, row),
            is_bot: sender_is_bot.value(row),
        };
        let event = ChatEvent {
            event_id: event_id.value(row).to_string(),
            tenant_id: tenant_id.value(row).to_string(),
            source: source_from_name(source_text).map(|s| s as i32).unwrap_or(0),
            workspace_id: string_at(workspace_id, row),
            conversation_id: conversation_id.value(row).to_string(),
            thread_id: string_at(thread_id, row),
            message_id: string_at(message_id, row),
            kind: kind_from_name(kind_text).map(|k| k as i32).unwrap_or(0),
            sender: if sender == Sender::default() {
                None
            } else {
                Some(sender)
            },
            occurred_at_micros: occurred_at.value(row),
            received_at_micros: received_at.value(row),
            text: string_at(text, row),
            attachments: attachment_list,
            mentions: mention_list,
            reaction: string_at(reaction, row),
            raw_payload: if raw_payload.is_null(row) {
                Vec::new()
            } else {
                raw_payload.value(row).to_vec()
            },
            raw_content_type: string_at(raw_content_type, row),
            delivery_sha256: delivery_sha256
                .map(|array| string_at(array, row))
                .unwrap_or_default(),
            raw_payload_offset: raw_payload_offset
                .filter(|array| !array.is_null(row))
                .map(|array| u64::try_from(array.value(row)).unwrap_or_default())
                .unwrap_or_default(),
            delivery_envelope: delivery_envelope
                .filter(|array| !array.is_null(row))
                .map(|array| array.value(row).to_vec())
                .unwrap_or_default(),
        };
        out.push(ArchivedEvent {
            record: event,
            kafka_partition: kafka_partition.value(row),
            kafka_offset: kafka_offset.value(row),
        });
    }
    Ok(out)
}

/// One element of `attachments_json`: `{"id", "name", "mime_type", "size_bytes", "sha256", "url"}`, every key
/// present (empty strings for unknown values) so SQL can extract fields without guards.
#[derive(Debug, Serialize, Deserialize)]
struct AttachmentJson {
    id: String,
    name: String,
    mime_type: String,
    size_bytes: u64,
    sha256: String,
    url: String,
}

impl From<&Attachment> for AttachmentJson {
    fn from(attachment: &Attachment) -> Self {
        AttachmentJson {
            id: attachment.id.clone(),
            name: attachment.name.clone(),
            mime_type: attachment.mime_type.clone(),
            size_bytes: attachment.size_bytes,
            sha256: attachment.sha256.clone(),
            url: attachment.url.clone(),
        }
    }
}

impl From<AttachmentJson> for Attachment {
    fn from(json: AttachmentJson) -> Self {
        Attachment {
            id: json.id,
            name: json.name,
            mime_type: json.mime_type,
            size_bytes: json.size_bytes,
            sha256: json.sha256,
            url: json.url,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatvault_proto::v1::{EventKind, Source};

    fn archived(delivery: bool) -> ArchivedEvent {
        let mut event = ChatEvent {
            event_id: "e1".into(),
            tenant_id: "acme".into(),
            source: Source::StandardWebhooks as i32,
            conversation_id: "c1".into(),
            message_id: "m1".into(),
            kind: EventKind::MessageCreated as i32,
            sender: Some(Sender {
                id: "u1".into(),
                ..Default::default()
            }),
            occurred_at_micros: 1_700_000_000_000_000,
            received_at_micros: 1_700_000_000_000_001,
            raw_payload: b"{\"item\":1}".to_vec(),
            raw_content_type: "application/json".into(),
            ..Default::default()
        };
        if delivery {
            event.delivery_sha256 = "ab".repeat(32);
            event.raw_payload_offset = 27;
            event.delivery_envelope = b"{\"type\":\"chat.events\",\"data\":[]}".to_vec();
        }
        ArchivedEvent {
            record: event,
            kafka_partition: 3,
            kafka_offset: 42,
        }
    }

    #[test]
    fn delivery_evidence_round_trips() {
        let rows = [archived(true), archived(false)];
        let batch = to_record_batch(&rows.iter().collect::<Vec<_>>()).expect("batch");
        let decoded = from_record_batch(&batch, |_| true).expect("decode");
        assert_eq!(decoded, rows);
    }

    #[test]
    fn files_without_the_evidence_columns_still_decode() {
        let rows = [archived(true)];
        let batch = to_record_batch(&rows.iter().collect::<Vec<_>>()).expect("batch");
        // The schema before the evidence columns: everything up to kafka_offset.
        let before = batch
            .schema()
            .index_of("kafka_offset")
            .expect("kafka_offset")
            + 1;
        let old = batch
            .project(&(0..before).collect::<Vec<_>>())
            .expect("project");
        assert!(old.column_by_name(COL_DELIVERY_SHA256).is_none());
        let decoded = from_record_batch(&old, |_| true).expect("decode old file");
        assert_eq!(decoded, [archived(false)]);
    }
}
