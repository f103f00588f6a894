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

use std::collections::BTreeSet;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::file::metadata::SortingColumn;
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
use crate::error::{Error, ErrorCode, Result};
use crate::keys::{DataKey, FileKeyMetadata};

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
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            zstd_level: 3,
            row_group_rows: 65_536,
            row_group_bytes: 16 * 1024 * 1024,
            page_layout: PageLayout::OnePagePerColumnChunk,
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
    fn apply(self, builder: WriterPropertiesBuilder) -> WriterPropertiesBuilder {
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
                for column in DICTIONARY_COLUMNS {
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
            a.event.conversation_id.as_str(),
            a.event.occurred_at_micros,
            a.kafka_partition,
            a.kafka_offset,
        )
            .cmp(&(
                b.event.conversation_id.as_str(),
                b.event.occurred_at_micros,
                b.kafka_partition,
                b.kafka_offset,
            ))
    });
    let mut digests = BTreeSet::new();
    let mut min_occurred = i64::MAX;
    let mut max_occurred = i64::MIN;
    for row in rows.iter() {
        if row.event.tenant_id != key.tenant_id {
            return Err(Error::internal("archive file rows span tenants"));
        }
        digests.insert(conversation_digest(
            &row.event.tenant_id,
            &row.event.conversation_id,
        ));
        min_occurred = min_occurred.min(row.event.occurred_at_micros);
        max_occurred = max_occurred.max(row.event.occurred_at_micros);
    }
    let schema = archive_schema();
    let key_metadata = serde_json::to_vec(&key.file_key_metadata())?;
    let encryption = FileEncryptionProperties::builder(key.key.to_vec())
        .with_footer_key_metadata(key_metadata)
        .build()?;
    let conversation_index = schema.index_of(COL_CONVERSATION_ID)?;
    let occurred_index = schema.index_of(COL_OCCURRED_AT)?;
    let builder = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(options.zstd_level)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(options.row_group_rows))
        .set_max_row_group_bytes(Some(options.row_group_bytes))
        // No Parquet bloom filter, deliberately: DuckDB 2.0.1 cannot decrypt the encrypted bloom filter modules
        // arrow-rs 60 writes and then fails to read the filtered column at all ("Computed AES tag differs from
        // read AES tag"), wherever the filter is placed. Readers find a conversation through the exact
        // per-file conversation digests in the manifest (an index that needs no decryption), the sort order,
        // and row-group and page statistics with the page index.
        .set_bloom_filter_enabled(false)
        .set_sorting_columns(Some(vec![
            SortingColumn {
                column_idx: conversation_index as i32,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: occurred_index as i32,
                descending: false,
                nulls_first: false,
            },
        ]))
        .with_file_encryption_properties(encryption);
    let properties = options.page_layout.apply(builder).build();
    let mut writer = ArrowWriter::try_new(Vec::with_capacity(1 << 20), schema, Some(properties))?;
    // Small record batches, so the byte bound of a row group is checked often enough to hold.
    for chunk in rows.chunks(options.row_group_rows.min(1024)) {
        let batch = to_record_batch(chunk)?;
        writer.write(&batch)?;
    }
    let bytes = writer.into_inner()?;
    Ok(EncodedFile {
        sha256_hex: sha256_hex(&bytes),
        bytes: Bytes::from(bytes),
        rows: rows.len(),
        min_occurred_micros: min_occurred,
        max_occurred_micros: max_occurred,
        conversation_digests: digests.into_iter().collect(),
    })
}

fn reader_options(key: &DataKey) -> Result<ArrowReaderOptions> {
    let decryption = FileDecryptionProperties::builder(key.key.to_vec()).build()?;
    Ok(ArrowReaderOptions::new()
        .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional)
        .with_file_decryption_properties(decryption))
}

fn decryption_error(error: parquet::errors::ParquetError) -> Error {
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
    let conversation_index = schema.index_of(COL_CONVERSATION_ID)?;
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
            if let Some(bloom) =
                builder.get_row_group_column_bloom_filter(index, conversation_index)?
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
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch?;
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
    let decryption = FileDecryptionProperties::builder(key.key.to_vec()).build()?;
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
            period: "2026-11".into(),
            dek_id: "acme/2026-11/test".into(),
            key: [byte; 32],
        }
    }

    fn rows() -> Vec<ArchivedEvent> {
        (0..500)
            .map(|i| ArchivedEvent {
                event: ChatEvent {
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
                &a.event.conversation_id,
                a.event.occurred_at_micros,
                a.kafka_offset,
            )
                .cmp(&(
                    &b.event.conversation_id,
                    b.event.occurred_at_micros,
                    b.kafka_offset,
                ))
        });
        assert_eq!(
            decoded.iter().collect::<Vec<_>>(),
            expected,
            "every field survives, in archive order"
        );

        let one = decode_file(encoded.bytes.clone(), &key(1), Some("C3")).expect("decode one");
        assert!(!one.is_empty() && one.iter().all(|row| row.event.conversation_id == "C3"));
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
                    event: ChatEvent {
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
            (&a.event.conversation_id, a.event.occurred_at_micros)
                .cmp(&(&b.event.conversation_id, b.event.occurred_at_micros))
        });
        assert!(decoded.iter().zip(expected).all(|(a, b)| a == b));
    }
}
