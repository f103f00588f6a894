//! The audit trail's files: one row per `chatvault.v1.AuditRecord`, in encrypted Parquet with the same
//! encryption profile and page layout as the chat events' files (see [`crate::file`]), so DuckDB and pyarrow
//! read the trail with its data key like any other archive file.
//!
//! Columns follow the record's fields. Empty strings are stored as nulls, times as `TIMESTAMP(MICROS, UTC)`
//! (an unbounded end of the requested range as null), the outcome by name (`allowed`, `denied`, `error`), and
//! `roles_used` as one comma-separated string: DuckDB cannot decrypt nested columns of these files (see
//! [`crate::schema`]), and role names contain no commas. Rows are sorted by time, then Kafka offset.

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use chatvault_proto::v1::{AuditOutcome, AuditRecord};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::file::{
    EncodedFile, FileOptions, decryption_error, reader_options, sha256_hex, write_parquet,
    writer_properties,
};
use crate::keys::DataKey;
use crate::schema::{column, optional, string_at, strings, utc_micros};
use crate::{Archived, format_error};
use chatvault_core::error::{Error, Result};

pub const COL_TIME: &str = "time";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("record_id", DataType::Utf8, false),
        Field::new(COL_TIME, utc_micros(), false),
        Field::new("service", DataType::Utf8, true),
        Field::new("instance", DataType::Utf8, true),
        Field::new("action", DataType::Utf8, true),
        Field::new("tenant_id", DataType::Utf8, true),
        Field::new("conversation_id", DataType::Utf8, true),
        Field::new("query", DataType::Utf8, true),
        Field::new("range_from", utc_micros(), true),
        Field::new("range_to", utc_micros(), true),
        Field::new("peer_address", DataType::Utf8, true),
        Field::new("user_agent", DataType::Utf8, true),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("subject", DataType::Utf8, true),
        Field::new("issuer", DataType::Utf8, true),
        Field::new("client_id", DataType::Utf8, true),
        Field::new("roles_used", DataType::Utf8, true),
        Field::new("item_count", DataType::Int64, false),
        Field::new("byte_count", DataType::Int64, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
});

/// Columns whose values repeat within a day's records.
const DICTIONARY_COLUMNS: &[&str] = &[
    "service",
    "instance",
    "action",
    "tenant_id",
    "outcome",
    "subject",
    "issuer",
    "client_id",
    "roles_used",
    "kafka_partition",
];

/// The audit trail's schema (version 1).
pub fn audit_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// An outcome's name in files and on the command line.
pub fn outcome_name(outcome: i32) -> &'static str {
    match AuditOutcome::try_from(outcome) {
        Ok(AuditOutcome::Allowed) => "allowed",
        Ok(AuditOutcome::Denied) => "denied",
        Ok(AuditOutcome::Error) => "error",
        _ => "unspecified",
    }
}

/// The outcome of a name written by [`outcome_name`].
pub fn outcome_from_name(name: &str) -> Option<AuditOutcome> {
    match name {
        "allowed" => Some(AuditOutcome::Allowed),
        "denied" => Some(AuditOutcome::Denied),
        "error" => Some(AuditOutcome::Error),
        "unspecified" => Some(AuditOutcome::Unspecified),
        _ => None,
    }
}

fn optional_time(builder: &mut TimestampMicrosecondBuilder, micros: i64) {
    if micros == 0 {
        builder.append_null();
    } else {
        builder.append_value(micros);
    }
}

/// Builds a record batch of `rows`, in the given order.
pub fn to_record_batch(rows: &[&Archived<AuditRecord>]) -> Result<RecordBatch> {
    let capacity = rows.len();
    let strings = || StringBuilder::with_capacity(capacity, capacity * 16);
    let times = || TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC");
    let (mut record_id, mut service, mut instance, mut action) =
        (strings(), strings(), strings(), strings());
    let (mut tenant_id, mut conversation_id, mut query) = (strings(), strings(), strings());
    let (mut peer_address, mut user_agent, mut outcome, mut reason) =
        (strings(), strings(), strings(), strings());
    let (mut subject, mut issuer, mut client_id, mut roles_used) =
        (strings(), strings(), strings(), strings());
    let (mut time, mut range_from, mut range_to) = (times(), times(), times());
    let mut item_count = Int64Builder::with_capacity(capacity);
    let mut byte_count = Int64Builder::with_capacity(capacity);
    let mut kafka_partition = Int32Builder::with_capacity(capacity);
    let mut kafka_offset = Int64Builder::with_capacity(capacity);
    for row in rows {
        let record = &row.record;
        record_id.append_value(&record.record_id);
        time.append_value(record.time_micros);
        optional(&mut service, &record.service);
        optional(&mut instance, &record.instance);
        optional(&mut action, &record.action);
        optional(&mut tenant_id, &record.tenant_id);
        optional(&mut conversation_id, &record.conversation_id);
        optional(&mut query, &record.query);
        optional_time(&mut range_from, record.from_micros);
        optional_time(&mut range_to, record.to_micros);
        optional(&mut peer_address, &record.peer_address);
        optional(&mut user_agent, &record.user_agent);
        outcome.append_value(outcome_name(record.outcome));
        optional(&mut reason, &record.reason);
        optional(&mut subject, &record.subject);
        optional(&mut issuer, &record.issuer);
        optional(&mut client_id, &record.client_id);
        optional(&mut roles_used, &record.roles_used.join(","));
        item_count.append_value(record.item_count);
        byte_count.append_value(record.byte_count);
        kafka_partition.append_value(row.kafka_partition);
        kafka_offset.append_value(row.kafka_offset);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(record_id.finish()),
        Arc::new(time.finish()),
        Arc::new(service.finish()),
        Arc::new(instance.finish()),
        Arc::new(action.finish()),
        Arc::new(tenant_id.finish()),
        Arc::new(conversation_id.finish()),
        Arc::new(query.finish()),
        Arc::new(range_from.finish()),
        Arc::new(range_to.finish()),
        Arc::new(peer_address.finish()),
        Arc::new(user_agent.finish()),
        Arc::new(outcome.finish()),
        Arc::new(reason.finish()),
        Arc::new(subject.finish()),
        Arc::new(issuer.finish()),
        Arc::new(client_id.finish()),
        Arc::new(roles_used.finish()),
        Arc::new(item_count.finish()),
        Arc::new(byte_count.finish()),
        Arc::new(kafka_partition.finish()),
        Arc::new(kafka_offset.finish()),
    ];
    RecordBatch::try_new(audit_schema(), columns).map_err(format_error)
}

/// Decodes every row of a record batch of the audit schema.
pub fn from_record_batch(batch: &RecordBatch) -> Result<Vec<Archived<AuditRecord>>> {
    let times = |name: &str| -> Result<&arrow_array::TimestampMicrosecondArray> {
        column(batch, name)?
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| Error::internal(format!("column {name} is not a timestamp")))
    };
    let integers = |name: &str| -> Result<&arrow_array::Int64Array> {
        column(batch, name)?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| Error::internal(format!("column {name} is not int64")))
    };
    let record_id = strings(batch, "record_id")?;
    let time = times(COL_TIME)?;
    let service = strings(batch, "service")?;
    let instance = strings(batch, "instance")?;
    let action = strings(batch, "action")?;
    let tenant_id = strings(batch, "tenant_id")?;
    let conversation_id = strings(batch, "conversation_id")?;
    let query = strings(batch, "query")?;
    let range_from = times("range_from")?;
    let range_to = times("range_to")?;
    let peer_address = strings(batch, "peer_address")?;
    let user_agent = strings(batch, "user_agent")?;
    let outcome = strings(batch, "outcome")?;
    let reason = strings(batch, "reason")?;
    let subject = strings(batch, "subject")?;
    let issuer = strings(batch, "issuer")?;
    let client_id = strings(batch, "client_id")?;
    let roles_used = strings(batch, "roles_used")?;
    let item_count = integers("item_count")?;
    let byte_count = integers("byte_count")?;
    let kafka_partition = column(batch, "kafka_partition")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| Error::internal("column kafka_partition is not int32"))?;
    let kafka_offset = integers("kafka_offset")?;
    let time_at = |array: &arrow_array::TimestampMicrosecondArray, row: usize| {
        if array.is_null(row) {
            0
        } else {
            array.value(row)
        }
    };
    (0..batch.num_rows())
        .map(|row| {
            let outcome_text = string_at(outcome, row);
            let outcome = outcome_from_name(&outcome_text).ok_or_else(|| {
                Error::internal(format!("audit file: unknown outcome {outcome_text:?}"))
            })?;
            let roles = string_at(roles_used, row);
            Ok(Archived {
                record: AuditRecord {
                    record_id: string_at(record_id, row),
                    time_micros: time.value(row),
                    service: string_at(service, row),
                    instance: string_at(instance, row),
                    action: string_at(action, row),
                    tenant_id: string_at(tenant_id, row),
                    conversation_id: string_at(conversation_id, row),
                    query: string_at(query, row),
                    from_micros: time_at(range_from, row),
                    to_micros: time_at(range_to, row),
                    peer_address: string_at(peer_address, row),
                    user_agent: string_at(user_agent, row),
                    outcome: outcome as i32,
                    reason: string_at(reason, row),
                    subject: string_at(subject, row),
                    issuer: string_at(issuer, row),
                    client_id: string_at(client_id, row),
                    roles_used: if roles.is_empty() {
                        Vec::new()
                    } else {
                        roles.split(',').map(str::to_string).collect()
                    },
                    item_count: item_count.value(row),
                    byte_count: byte_count.value(row),
                },
                kafka_partition: kafka_partition.value(row),
                kafka_offset: kafka_offset.value(row),
            })
        })
        .collect()
}

/// Sorts `rows` by time and Kafka record and encodes them as one encrypted Parquet file under `key` (the
/// audit trail's data key of their month).
pub fn encode_audit_file(
    rows: &mut [&Archived<AuditRecord>],
    key: &DataKey,
    options: &FileOptions,
) -> Result<EncodedFile> {
    if rows.is_empty() {
        return Err(Error::internal("refusing to write an empty audit file"));
    }
    rows.sort_by_key(|row| {
        (
            row.record.time_micros,
            row.kafka_partition,
            row.kafka_offset,
        )
    });
    let min_time = rows.first().map_or(0, |row| row.record.time_micros);
    let max_time = rows.last().map_or(0, |row| row.record.time_micros);
    let schema = audit_schema();
    let properties =
        writer_properties(&schema, key, options, &[COL_TIME], DICTIONARY_COLUMNS, None)?;
    let bytes = write_parquet(schema, properties, rows, options, |chunk| {
        to_record_batch(chunk)
    })?;
    Ok(EncodedFile {
        sha256_hex: sha256_hex(&bytes),
        bytes: Bytes::from(bytes),
        rows: rows.len(),
        min_occurred_micros: min_time,
        max_occurred_micros: max_time,
        conversation_digests: Vec::new(),
        conversation_roots: Vec::new(),
    })
}

/// Decodes every record of an encrypted audit file.
pub fn decode_audit_file(bytes: Bytes, key: &DataKey) -> Result<Vec<Archived<AuditRecord>>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, reader_options(key)?)
        .map_err(decryption_error)?
        .with_batch_size(8192)
        .build()
        .map_err(format_error)?;
    let mut out = Vec::new();
    for batch in reader {
        out.extend(from_record_batch(&batch.map_err(format_error)?)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DataKeys;
    use std::sync::Arc;

    fn record(id: &str, micros: i64, offset: i64) -> Archived<AuditRecord> {
        Archived {
            record: AuditRecord {
                record_id: id.into(),
                time_micros: micros,
                service: "restorer".into(),
                instance: "host-1".into(),
                action: "chatvault.v1.RestoreService/GetConversation".into(),
                tenant_id: "acme".into(),
                conversation_id: "C1\nforged: allowed".into(),
                query: String::new(),
                from_micros: 5,
                to_micros: 0,
                peer_address: "127.0.0.1:5000".into(),
                user_agent: "grpc-go/1.0".into(),
                outcome: AuditOutcome::Denied as i32,
                reason: "missing role restore for tenant acme".into(),
                subject: "alice".into(),
                issuer: "https://id.example".into(),
                client_id: "console".into(),
                roles_used: vec!["restore".into(), "admin".into()],
                item_count: 0,
                byte_count: 0,
            },
            kafka_partition: 0,
            kafka_offset: offset,
        }
    }

    #[tokio::test]
    async fn audit_files_round_trip_every_field_sorted_by_time() {
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let keyring = tempfile::tempdir().expect("tempdir");
        let keys = DataKeys::with_local_keyring(store, &keyring.path().join("keyring.json"))
            .expect("keys");
        let key = keys
            .get_or_create(crate::kind::AUDIT_KEY_SCOPE, "2026-12")
            .await
            .expect("key");
        let late = record("b", 2_000, 7);
        let mut early = record("a", 1_000, 9);
        early.record.roles_used.clear();
        early.record.outcome = AuditOutcome::Allowed as i32;
        early.record.to_micros = 1_500;
        let mut rows = vec![&late, &early];
        let file = encode_audit_file(&mut rows, &key, &FileOptions::default()).expect("encode");
        assert_eq!(
            (
                file.rows,
                file.min_occurred_micros,
                file.max_occurred_micros
            ),
            (2, 1_000, 2_000)
        );
        let decoded = decode_audit_file(file.bytes, &key).expect("decode");
        assert_eq!(decoded, vec![early, late]);
    }
}
