//! Encrypted Parquet files of the archive.
//!
//! The encryption profile is fixed so that standard readers open our files with the data key alone (see
//! `docs/ARCHITECTURE.md`): Parquet modular encryption, `AES_GCM_V1`, uniform encryption (the footer key
//! encrypts the footer and every column), encrypted footer, a 256-bit key, DataPage V1 and **no AAD prefix**
//! (DuckDB rejects files written with one, even when it is stored). A file's identity is bound instead by its
//! SHA-256 in the manifest.
//!
//! The page layout is fixed too (see [`PageLayout`]): every column chunk holds exactly one data page, because
//! DuckDB (2.0.1 and 1.5.6) cannot decrypt an encrypted column chunk of more than one data page ("Computed AES
//! tag differs from read AES tag"), whichever tool wrote it. Row groups are bounded by bytes instead, which
//! bounds the pages and the writer's memory.
//!
//! Each file also carries a summary of its conversations ([`FileConversations`]) in the footer's key-value
//! metadata under [`CONVERSATIONS_METADATA_KEY`]. The footer is encrypted, so conversation ids stay private,
//! and a reader lists a tenant's conversations from the footers alone ([`read_conversation_summaries`])
//! instead of decrypting every row. Files written before lack the key; readers decode those.

use std::collections::BTreeMap;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_schema::{Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaDataReader, SortingColumn};
use parquet::file::properties::{
    EnabledStatistics, WriterProperties, WriterPropertiesBuilder, WriterVersion,
};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnPath;
use ring::digest;

use super::ArchivedEvent;
use super::schema::{
    COL_CONVERSATION_ID, COL_OCCURRED_AT, archive_schema, from_record_batch, to_record_batch,
};
use crate::format_error;
use crate::keys::{DataKey, FileKeyMetadata};
use crate::tlog::evidence::{conversation_root, event_leaf};
use chatvault_core::error::{Error, ErrorCode, Result};

/// Writer tuning.
#[derive(Debug, Clone)]
pub struct FileOptions {
    pub zstd_level: i32,
    /// Upper bound on the rows of a row group.
    pub row_group_rows: usize,
    /// Upper bound on a row group's estimated encoded size (before compression). With one data page per
    /// column chunk this also bounds every page, and so what a reader must decrypt and hold at once.
    pub row_group_bytes: usize,
    pub page_layout: PageLayout,
    /// Write the per-file conversation summary into the footer (always, except to make files of the earlier
    /// format in tests).
    pub conversation_summaries: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            zstd_level: 3,
            row_group_rows: 65_536,
            row_group_bytes: 16 * 1024 * 1024,
            page_layout: PageLayout::OnePagePerColumnChunk,
            conversation_summaries: true,
        }
    }
}

/// How column chunks are cut into data pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageLayout {
    /// What the archiver writes: one data page per column chunk, dictionaries only for low-cardinality columns
    /// and never falling back to plain encoding mid-chunk (a fallback starts a second data page). Every
    /// standard reader decrypts these files, DuckDB included, at any size.
    OnePagePerColumnChunk,
    /// The writer's defaults for pages (1 MiB or 20,000 values per page, dictionaries for every column with
    /// fallback at 1 MiB): the layout of files written before archive format 1.1. The restorer and pyarrow
    /// read them; DuckDB fails on any column chunk that got a second page. Kept only to measure the layout
    /// against (`benches/benches/file_layout.rs`) and to make such files in tests.
    WriterDefaultPages,
}

/// Columns whose values repeat within a file, so dictionary encoding pays. The rest (ids, free text, payloads,
/// timestamps, offsets) are plain-encoded: a dictionary of unique values only costs memory, and one that
/// overflows its limit falls back to plain encoding in a second data page.
const DICTIONARY_COLUMNS: &[&str] = &[
    "tenant_id",
    "source",
    "workspace_id",
    COL_CONVERSATION_ID,
    "thread_id",
    "kind",
    "sender_id",
    "sender_name",
    "reaction",
    "raw_content_type",
    "kafka_partition",
];

impl PageLayout {
    /// Applies the layout; `dictionary_columns` are the columns of the schema worth a dictionary.
    fn apply(
        self,
        builder: WriterPropertiesBuilder,
        dictionary_columns: &[&str],
    ) -> WriterPropertiesBuilder {
        match self {
            PageLayout::WriterDefaultPages => builder,
            PageLayout::OnePagePerColumnChunk => {
                // No page limit of its own: a page ends with its row group. The dictionary limit is lifted as
                // well, so a dictionary never falls back to plain encoding; the row-group byte bound keeps
                // both finite (a dictionary is never larger than the plain values it replaces).
                let mut builder = builder
                    .set_data_page_size_limit(usize::MAX)
                    .set_data_page_row_count_limit(usize::MAX)
                    .set_dictionary_enabled(false)
                    .set_dictionary_page_size_limit(usize::MAX);
                for column in dictionary_columns {
                    builder =
                        builder.set_column_dictionary_enabled(ColumnPath::from(*column), true);
                }
                builder
            }
        }
    }
}

/// An encoded file and what the manifest records about it.
#[derive(Debug, Clone)]
pub struct EncodedFile {
    pub bytes: Bytes,
    pub sha256_hex: String,
    pub rows: usize,
    pub min_occurred_micros: i64,
    pub max_occurred_micros: i64,
    /// Sorted [`conversation_digest`]s of the conversations in the file.
    pub conversation_digests: Vec<String>,
    /// Per digest (same order), the conversation's root of event leaves (`tlog::evidence`).
    pub conversation_roots: Vec<String>,
}

/// A short digest of a conversation's identity, listed per file in manifests so readers skip files without
/// opening them, and without the manifest naming conversations in clear.
pub fn conversation_digest(tenant: &str, conversation: &str) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(tenant.as_bytes());
    context.update(b"/");
    context.update(conversation.as_bytes());
    hex::encode(&context.finish().as_ref()[..8])
}

/// The footer key-value metadata key of a file's [`FileConversations`] (JSON).
pub const CONVERSATIONS_METADATA_KEY: &str = "chatvault.conversations";
/// The `format` of [`FileConversations`].
pub const CONVERSATIONS_FORMAT: &str = "chatvault-conversations-v1";

/// What a file's footer says about its conversations: one entry per conversation, in file order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileConversations {
    /// Always [`CONVERSATIONS_FORMAT`].
    pub format: String,
    pub conversations: Vec<FileConversation>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileConversation {
    pub conversation_id: String,
    /// The first non-empty workspace id of the conversation's rows (empty when none has one).
    pub workspace_id: String,
    /// Rows of the conversation in the file.
    pub rows: u64,
    pub first_event_micros: i64,
    pub last_event_micros: i64,
    /// base64 of the sorted, distinct [`event_identity_hash`]es of the rows (8 bytes each, big-endian), so a
    /// reader counts events across files with copies collapsed without reading the rows.
    pub event_hashes: String,
}

impl FileConversation {
    /// The distinct identity hashes of the conversation's events in this file.
    pub fn identity_hashes(&self) -> Result<Vec<u64>> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.event_hashes)
            .map_err(|_| Error::internal("conversation summary: event_hashes is not base64"))?;
        if bytes.len() % 8 != 0 {
            return Err(Error::internal(
                "conversation summary: event_hashes is not a list of 8-byte hashes",
            ));
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|chunk| {
                let mut hash = [0u8; 8];
                hash.copy_from_slice(chunk);
                u64::from_be_bytes(hash)
            })
            .collect())
    }
}

/// A 64-bit hash of an archived event's identity within its conversation: its `event_id`, or its Kafka record
/// when it has none (such events never collapse). Collisions only merge two events in a count.
pub fn event_identity_hash(event: &ArchivedEvent) -> u64 {
    let mut context = digest::Context::new(&digest::SHA256);
    if event.record.event_id.is_empty() {
        context.update(b"r");
        context.update(&event.kafka_partition.to_be_bytes());
        context.update(&event.kafka_offset.to_be_bytes());
    } else {
        context.update(b"e");
        context.update(event.record.event_id.as_bytes());
    }
    let mut hash = [0u8; 8];
    hash.copy_from_slice(&context.finish().as_ref()[..8]);
    u64::from_be_bytes(hash)
}

/// The summaries of rows sorted by conversation.
fn summarize_conversations(rows: &[&ArchivedEvent]) -> FileConversations {
    use base64::Engine;
    let mut conversations = Vec::new();
    let mut hashes: Vec<u64> = Vec::new();
    let finish = |summary: &mut FileConversation, hashes: &mut Vec<u64>| {
        hashes.sort_unstable();
        hashes.dedup();
        let bytes: Vec<u8> = hashes.iter().flat_map(|hash| hash.to_be_bytes()).collect();
        summary.event_hashes = base64::engine::general_purpose::STANDARD.encode(bytes);
        hashes.clear();
    };
    let mut current: Option<FileConversation> = None;
    for row in rows {
        let event = &row.record;
        if current
            .as_ref()
            .is_some_and(|summary| summary.conversation_id != event.conversation_id)
            && let Some(mut done) = current.take()
        {
            finish(&mut done, &mut hashes);
            conversations.push(done);
        }
        let summary = current.get_or_insert_with(|| FileConversation {
            conversation_id: event.conversation_id.clone(),
            workspace_id: String::new(),
            rows: 0,
            first_event_micros: i64::MAX,
            last_event_micros: i64::MIN,
            event_hashes: String::new(),
        });
        if summary.workspace_id.is_empty() {
            summary.workspace_id.clone_from(&event.workspace_id);
        }
        summary.rows += 1;
        summary.first_event_micros = summary.first_event_micros.min(event.occurred_at_micros);
        summary.last_event_micros = summary.last_event_micros.max(event.occurred_at_micros);
        hashes.push(event_identity_hash(row));
    }
    if let Some(mut done) = current {
        finish(&mut done, &mut hashes);
        conversations.push(done);
    }
    FileConversations {
        format: CONVERSATIONS_FORMAT.into(),
        conversations,
    }
}

/// The footer of an encrypted Parquet file ends with `<metadata length: u32 LE>PARE`: how many bytes from the
/// end of the file a reader needs for the footer alone, given the file's last 8 bytes.
pub fn footer_bytes_needed(last_8_bytes: &[u8]) -> Result<u64> {
    let [a, b, c, d, magic @ ..] = last_8_bytes else {
        return Err(Error::internal(
            "archive file is shorter than a Parquet footer",
        ));
    };
    if magic != b"PARE" && magic != b"PAR1" {
        return Err(Error::internal(
            "archive file does not end with a Parquet footer (no PARE/PAR1 magic)",
        ));
    }
    Ok(u64::from(u32::from_le_bytes([*a, *b, *c, *d])) + 8)
}

/// The conversation summary of a file, from its footer only: `footer` is the file's last
/// [`footer_bytes_needed`] bytes (or more). `None` for files written before summaries existed. The footer is
/// decrypted with `key` and authenticated by AES-GCM, so a summary cannot be altered without the key.
pub fn read_conversation_summaries(
    footer: Bytes,
    key: &DataKey,
) -> Result<Option<FileConversations>> {
    let decryption = FileDecryptionProperties::builder(key.key.to_vec())
        .build()
        .map_err(format_error)?;
    let metadata = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Skip)
        .with_decryption_properties(Some(decryption))
        .parse_and_finish(&footer)
        .map_err(decryption_error)?;
    let Some(value) = metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|pairs| {
            pairs
                .iter()
                .find(|pair| pair.key == CONVERSATIONS_METADATA_KEY)
        })
        .and_then(|pair| pair.value.as_deref())
    else {
        return Ok(None);
    };
    let summaries: FileConversations = serde_json::from_str(value).map_err(|error| {
        Error::internal(format!(
            "the file's conversation summary is corrupt: {error}"
        ))
    })?;
    if summaries.format != CONVERSATIONS_FORMAT {
        return Err(Error::internal(format!(
            "the file's conversation summary has unknown format {}",
            summaries.format
        )));
    }
    Ok(Some(summaries))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// Sorts `rows` by conversation, event time and Kafka offset (the archive's sort order) and encodes them as
/// one encrypted Parquet file under `key`. All rows must belong to the key's tenant.
pub fn encode_file(
    rows: &mut [&ArchivedEvent],
    key: &DataKey,
    options: &FileOptions,
) -> Result<EncodedFile> {
    if rows.is_empty() {
        return Err(Error::internal("refusing to write an empty archive file"));
    }
    rows.sort_by(|a, b| {
        (
            a.record.conversation_id.as_str(),
            a.record.occurred_at_micros,
            a.kafka_partition,
            a.kafka_offset,
        )
            .cmp(&(
                b.record.conversation_id.as_str(),
                b.record.occurred_at_micros,
                b.kafka_partition,
                b.kafka_offset,
            ))
    });
    // Digest → the event leaves of the conversation's rows, in file order (rows are sorted by conversation).
    let mut digests: BTreeMap<String, Vec<crate::tlog::merkle::Hash>> = BTreeMap::new();
    let mut min_occurred = i64::MAX;
    let mut max_occurred = i64::MIN;
    for row in rows.iter() {
        if row.record.tenant_id != key.tenant_id {
            return Err(Error::internal("archive file rows span tenants"));
        }
        digests
            .entry(conversation_digest(
                &row.record.tenant_id,
                &row.record.conversation_id,
            ))
            .or_default()
            .push(event_leaf(&row.record));
        min_occurred = min_occurred.min(row.record.occurred_at_micros);
        max_occurred = max_occurred.max(row.record.occurred_at_micros);
    }
    let metadata = options
        .conversation_summaries
        .then(|| -> Result<Vec<KeyValue>> {
            Ok(vec![KeyValue::new(
                CONVERSATIONS_METADATA_KEY.to_string(),
                serde_json::to_string(&summarize_conversations(rows))?,
            )])
        })
        .transpose()?;
    let schema = archive_schema();
    let properties = writer_properties(
        &schema,
        key,
        options,
        &[COL_CONVERSATION_ID, COL_OCCURRED_AT],
        DICTIONARY_COLUMNS,
        metadata,
    )?;
    let bytes = write_parquet(schema, properties, rows, options, |chunk| {
        to_record_batch(chunk)
    })?;
    Ok(EncodedFile {
        sha256_hex: sha256_hex(&bytes),
        bytes: Bytes::from(bytes),
        rows: rows.len(),
        min_occurred_micros: min_occurred,
        max_occurred_micros: max_occurred,
        conversation_roots: digests
            .values()
            .map(|leaves| conversation_root(leaves))
            .collect(),
        conversation_digests: digests.into_keys().collect(),
    })
}

/// The writer properties of every archive file, whatever its stream: the encryption profile and page layout
/// of the module documentation, zstd, page statistics, rows sorted by `sorted_by` (ascending), and the
/// footer's key-value `metadata`.
pub(crate) fn writer_properties(
    schema: &Schema,
    key: &DataKey,
    options: &FileOptions,
    sorted_by: &[&str],
    dictionary_columns: &[&str],
    metadata: Option<Vec<KeyValue>>,
) -> Result<WriterProperties> {
    let key_metadata = serde_json::to_vec(&key.file_key_metadata())?;
    let encryption = FileEncryptionProperties::builder(key.key.to_vec())
        .with_footer_key_metadata(key_metadata)
        .build()
        .map_err(format_error)?;
    let sorting = sorted_by
        .iter()
        .map(|column| {
            Ok(SortingColumn {
                column_idx: schema.index_of(column).map_err(format_error)? as i32,
                descending: false,
                nulls_first: false,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let builder = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(options.zstd_level).map_err(format_error)?,
        ))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(options.row_group_rows))
        .set_max_row_group_bytes(Some(options.row_group_bytes))
        // No Parquet bloom filter, deliberately: DuckDB 2.0.1 cannot decrypt the encrypted bloom filter modules
        // arrow-rs 60 writes and then fails to read the filtered column at all ("Computed AES tag differs from
        // read AES tag"), wherever the filter is placed. Readers find a conversation through the exact
        // per-file conversation digests in the manifest (an index that needs no decryption), the sort order,
        // and row-group and page statistics with the page index.
        .set_bloom_filter_enabled(false)
        .set_sorting_columns(Some(sorting))
        .set_key_value_metadata(metadata)
        .with_file_encryption_properties(encryption);
    Ok(options
        .page_layout
        .apply(builder, dictionary_columns)
        .build())
}

/// Writes `rows` (already sorted) as one Parquet file of `schema`, converting small chunks at a time with
/// `to_batch` so that the byte bound of a row group is checked often enough to hold.
pub(crate) fn write_parquet<T>(
    schema: SchemaRef,
    properties: WriterProperties,
    rows: &[T],
    options: &FileOptions,
    to_batch: impl Fn(&[T]) -> Result<RecordBatch>,
) -> Result<Vec<u8>> {
    let mut writer = ArrowWriter::try_new(Vec::with_capacity(1 << 20), schema, Some(properties))
        .map_err(format_error)?;
    for chunk in rows.chunks(options.row_group_rows.min(1024)) {
        writer.write(&to_batch(chunk)?).map_err(format_error)?;
    }
    writer.into_inner().map_err(format_error)
}

pub(crate) fn reader_options(key: &DataKey) -> Result<ArrowReaderOptions> {
    let decryption = FileDecryptionProperties::builder(key.key.to_vec())
        .build()
        .map_err(format_error)?;
    Ok(ArrowReaderOptions::new()
        .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional)
        .with_file_decryption_properties(decryption))
}

pub(crate) fn decryption_error(error: parquet::errors::ParquetError) -> Error {
    Error::new(
        ErrorCode::Internal,
        format!("opening an archive file failed (wrong data key or corrupt file): {error}"),
    )
}

/// Decodes the events of `conversation` (or all events when `None`) from an encrypted archive file, skipping
/// row groups whose statistics (or bloom filter, in files written by other tools) exclude the conversation.
pub fn decode_file(
    bytes: Bytes,
    key: &DataKey,
    conversation: Option<&str>,
) -> Result<Vec<ArchivedEvent>> {
    let builder =
        ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, reader_options(key)?)
            .map_err(decryption_error)?;
    let metadata = builder.metadata().clone();
    let schema = archive_schema();
    let conversation_index = schema.index_of(COL_CONVERSATION_ID).map_err(format_error)?;
    let mut row_groups = Vec::new();
    for (index, row_group) in metadata.row_groups().iter().enumerate() {
        if let Some(wanted) = conversation {
            let column = row_group.column(conversation_index);
            if let Some(Statistics::ByteArray(stats)) = column.statistics()
                && let (Some(min), Some(max)) = (stats.min_opt(), stats.max_opt())
                && (wanted.as_bytes() < min.data() || wanted.as_bytes() > max.data())
            {
                continue;
            }
            if let Some(bloom) = builder
                .get_row_group_column_bloom_filter(index, conversation_index)
                .map_err(format_error)?
                && !bloom.check(&wanted)
            {
                continue;
            }
        }
        row_groups.push(index);
    }
    if row_groups.is_empty() {
        return Ok(Vec::new());
    }
    let reader = builder
        .with_row_groups(row_groups)
        .with_batch_size(8192)
        .build()
        .map_err(format_error)?;
    let mut out = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.map_err(format_error)?;
        match conversation {
            Some(wanted) => {
                let conversations = batch
                    .column(conversation_index)
                    .as_string_opt::<i32>()
                    .ok_or_else(|| Error::internal("conversation_id is not utf8"))?
                    .clone();
                out.extend(from_record_batch(&batch, |row| {
                    conversations.value(row) == wanted
                })?);
            }
            None => out.extend(from_record_batch(&batch, |_| true)?),
        }
    }
    Ok(out)
}

/// The number of data pages of every column chunk, per row group, from the file's offset index. A file whose
/// chunks all have one page is readable by DuckDB (see [`PageLayout`]); this finds files written before that
/// layout (they need a rewrite for DuckDB, not for the restorer or pyarrow).
pub fn data_pages_per_column_chunk(bytes: Bytes, key: &DataKey) -> Result<Vec<Vec<usize>>> {
    let decryption = FileDecryptionProperties::builder(key.key.to_vec())
        .build()
        .map_err(format_error)?;
    let options = ArrowReaderOptions::new()
        .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required)
        .with_file_decryption_properties(decryption);
    let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options)
        .map_err(decryption_error)?;
    let metadata = builder.metadata();
    (0..metadata.num_row_groups())
        .map(|row_group| {
            let index = metadata.page_index_for_row_group(row_group);
            (0..metadata.row_group(row_group).num_columns())
                .map(|column| {
                    index.num_data_pages(column).ok_or_else(|| {
                        Error::internal(format!(
                            "row group {row_group} column {column} has no offset index"
                        ))
                    })
                })
                .collect()
        })
        .collect()
}

/// Parses a file's footer key metadata.
pub fn parse_key_metadata(bytes: &[u8]) -> Result<FileKeyMetadata> {
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatvault_proto::v1::{Attachment, ChatEvent, Sender};

    fn key(byte: u8) -> DataKey {
        DataKey {
            tenant_id: "acme".into(),
            scope: String::new(),
            period: "2026-11".into(),
            dek_id: "acme/2026-11/test".into(),
            key: [byte; 32],
        }
    }

    fn rows() -> Vec<ArchivedEvent> {
        (0..500)
            .map(|i| ArchivedEvent {
                record: ChatEvent {
                    event_id: format!("e{i:04}"),
                    tenant_id: "acme".into(),
                    source: 1,
                    workspace_id: if i % 2 == 0 {
                        "W1".into()
                    } else {
                        String::new()
                    },
                    conversation_id: format!("C{}", i % 7),
                    thread_id: if i % 3 == 0 {
                        format!("m{}", i / 2)
                    } else {
                        String::new()
                    },
                    message_id: format!("m{i}"),
                    kind: 1 + (i % 11),
                    sender: Some(Sender {
                        id: format!("U{}", i % 5),
                        display_name: "d".into(),
                        is_bot: i % 9 == 0,
                    }),
                    occurred_at_micros: 1_764_000_000_000_000 + (500 - i as i64) * 1_000,
                    received_at_micros: 1_764_000_001_000_000,
                    text: format!("text {i} ✓"),
                    attachments: if i % 4 == 0 {
                        vec![Attachment {
                            id: "F".into(),
                            name: "a.pdf".into(),
                            size_bytes: 7,
                            ..Default::default()
                        }]
                    } else {
                        vec![]
                    },
                    mentions: if i % 6 == 0 {
                        vec!["U1".into(), "U2".into()]
                    } else {
                        vec![]
                    },
                    reaction: if i % 8 == 0 {
                        "tada".into()
                    } else {
                        String::new()
                    },
                    raw_payload: if i % 2 == 0 {
                        format!("{{\"i\":{i}}}").into_bytes()
                    } else {
                        vec![]
                    },
                    raw_content_type: if i % 2 == 0 {
                        "application/json".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                },
                kafka_partition: 3,
                kafka_offset: i as i64,
            })
            .collect()
    }

    #[test]
    fn files_round_trip_sorted_and_only_open_with_their_key() {
        let original = rows();
        let mut refs: Vec<&ArchivedEvent> = original.iter().collect();
        let encoded = encode_file(
            &mut refs,
            &key(1),
            &FileOptions {
                row_group_rows: 64,
                ..FileOptions::default()
            },
        )
        .expect("encode");
        assert_eq!(encoded.rows, 500);
        assert_eq!(encoded.conversation_digests.len(), 7);
        assert_eq!(
            &encoded.bytes[encoded.bytes.len() - 4..],
            b"PARE",
            "encrypted footer"
        );

        let decoded = decode_file(encoded.bytes.clone(), &key(1), None).expect("decode");
        let mut expected: Vec<&ArchivedEvent> = original.iter().collect();
        expected.sort_by(|a, b| {
            (
                &a.record.conversation_id,
                a.record.occurred_at_micros,
                a.kafka_offset,
            )
                .cmp(&(
                    &b.record.conversation_id,
                    b.record.occurred_at_micros,
                    b.kafka_offset,
                ))
        });
        assert_eq!(
            decoded.iter().collect::<Vec<_>>(),
            expected,
            "every field survives, in archive order"
        );

        let one = decode_file(encoded.bytes.clone(), &key(1), Some("C3")).expect("decode one");
        assert!(!one.is_empty() && one.iter().all(|row| row.record.conversation_id == "C3"));
        assert!(
            decode_file(encoded.bytes.clone(), &key(1), Some("C-none"))
                .expect("decode none")
                .is_empty()
        );

        let wrong = decode_file(encoded.bytes, &key(2), None).expect_err("wrong key");
        assert!(
            wrong.message().contains("wrong data key"),
            "{}",
            wrong.message()
        );
    }

    #[test]
    fn the_footer_alone_summarizes_the_conversations() {
        let original = rows();
        let mut refs: Vec<&ArchivedEvent> = original.iter().collect();
        let encoded = encode_file(&mut refs, &key(1), &FileOptions::default()).expect("encode");
        let needed =
            footer_bytes_needed(&encoded.bytes[encoded.bytes.len() - 8..]).expect("tail") as usize;
        assert!(
            needed < encoded.bytes.len(),
            "{needed} of {}",
            encoded.bytes.len()
        );
        let footer = encoded.bytes.slice(encoded.bytes.len() - needed..);
        let summaries = read_conversation_summaries(footer.clone(), &key(1))
            .expect("footer")
            .expect("summaries");
        let ids: Vec<_> = summaries
            .conversations
            .iter()
            .map(|c| c.conversation_id.as_str())
            .collect();
        assert_eq!(ids, ["C0", "C1", "C2", "C3", "C4", "C5", "C6"]);
        for summary in &summaries.conversations {
            let expected: Vec<&ArchivedEvent> = original
                .iter()
                .filter(|row| row.record.conversation_id == summary.conversation_id)
                .collect();
            assert_eq!(summary.rows, expected.len() as u64);
            assert_eq!(
                summary.identity_hashes().expect("hashes").len(),
                expected.len()
            );
            let first = expected.iter().map(|r| r.record.occurred_at_micros).min();
            let last = expected.iter().map(|r| r.record.occurred_at_micros).max();
            assert_eq!(Some(summary.first_event_micros), first);
            assert_eq!(Some(summary.last_event_micros), last);
            assert_eq!(summary.workspace_id, "W1");
        }
        // The footer is encrypted: no conversation id in clear, and the wrong key cannot open it.
        assert!(!encoded.bytes.windows(4).any(|w| w == b"\"C3\""));
        assert!(read_conversation_summaries(footer, &key(2)).is_err());

        // Files written before summaries existed have none.
        let mut refs: Vec<&ArchivedEvent> = original.iter().collect();
        let old = encode_file(
            &mut refs,
            &key(1),
            &FileOptions {
                conversation_summaries: false,
                ..FileOptions::default()
            },
        )
        .expect("encode");
        let needed = footer_bytes_needed(&old.bytes[old.bytes.len() - 8..]).expect("tail") as usize;
        assert_eq!(
            read_conversation_summaries(old.bytes.slice(old.bytes.len() - needed..), &key(1))
                .expect("footer"),
            None
        );
    }

    /// Rows big and varied enough that the writer's default page limits (1 MiB, 20,000 values, dictionary
    /// fallback at 1 MiB) cut pages: ~60 MB of text in 40,000 rows, every text distinct.
    fn big_rows() -> Vec<ArchivedEvent> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..40_000)
            .map(|i| {
                let len = 300 + (next() % 1700) as usize;
                let text: String = (0..len)
                    .map(|_| char::from(b'a' + (next() % 26) as u8))
                    .collect();
                ArchivedEvent {
                    record: ChatEvent {
                        event_id: format!("e{i}"),
                        tenant_id: "acme".into(),
                        source: 1,
                        conversation_id: format!("C{}", i % 40),
                        message_id: format!("m{i}"),
                        kind: 1,
                        sender: Some(Sender {
                            id: format!("U{}", i % 300),
                            display_name: format!("user {}", i % 300),
                            is_bot: false,
                        }),
                        occurred_at_micros: 1_764_000_000_000_000 + i as i64,
                        received_at_micros: 1_764_000_001_000_000 + i as i64,
                        text,
                        ..Default::default()
                    },
                    kafka_partition: 0,
                    kafka_offset: i as i64,
                }
            })
            .collect()
    }

    #[test]
    fn every_column_chunk_has_one_data_page_and_row_groups_are_bounded_by_bytes() {
        let original = big_rows();
        let encode = |layout: PageLayout| {
            let mut refs: Vec<&ArchivedEvent> = original.iter().collect();
            encode_file(
                &mut refs,
                &key(1),
                &FileOptions {
                    row_group_bytes: 16 * 1024 * 1024,
                    page_layout: layout,
                    ..FileOptions::default()
                },
            )
            .expect("encode")
        };

        // The old layout is the baseline that breaks DuckDB: some chunk has several pages.
        let old =
            data_pages_per_column_chunk(encode(PageLayout::WriterDefaultPages).bytes, &key(1))
                .expect("pages");
        assert!(
            old.iter().flatten().any(|&pages| pages > 1),
            "the writer's default layout should cut pages here: {old:?}"
        );

        let encoded = encode(PageLayout::OnePagePerColumnChunk);
        let pages = data_pages_per_column_chunk(encoded.bytes.clone(), &key(1)).expect("pages");
        assert!(
            pages.len() >= 3,
            "~60 MB of text must be split into row groups of at most 16 MiB: {} row group(s)",
            pages.len()
        );
        assert!(
            pages.iter().flatten().all(|&pages| pages == 1),
            "one data page per column chunk: {pages:?}"
        );
        let decoded = decode_file(encoded.bytes, &key(1), None).expect("decode");
        assert_eq!(decoded.len(), original.len());
        let mut expected: Vec<&ArchivedEvent> = original.iter().collect();
        expected.sort_by(|a, b| {
            (&a.record.conversation_id, a.record.occurred_at_micros)
                .cmp(&(&b.record.conversation_id, b.record.occurred_at_micros))
        });
        assert!(decoded.iter().zip(expected).all(|(a, b)| a == b));
    }
}
