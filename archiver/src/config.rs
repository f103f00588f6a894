//! The archiver's section of the configuration file, `[archiver]` (the loader and the shared sections are
//! in `chatvault_core::config`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use chatvault_core::config::{KafkaConfig, Section};
use chatvault_core::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {
    /// Kafka consumer group shared by all archivers. Default `chatvault-archiver`.
    pub group_id: String,
    /// A partition's batch is sealed at this many events. Default 200000.
    pub max_batch_events: usize,
    /// ... or at this many bytes of encoded events. Default 64 MiB.
    pub max_batch_bytes: usize,
    /// ... or when its oldest event has waited this long. Default `10s`.
    #[serde(with = "chatvault_core::duration")]
    pub max_batch_age: Duration,
    /// Sealed batches waiting for upload; with the open batches this bounds memory at about
    /// `(partitions + max_pending_batches) * max_batch_bytes` plus librdkafka's fetch queue. Default 2.
    pub max_pending_batches: usize,
    /// librdkafka's prefetch queue per partition, in KiB (`queued.max.messages.kbytes`). Default 32768.
    pub fetch_queue_kbytes: u64,
    /// Files of one batch uploaded at once. Default 8.
    pub upload_concurrency: usize,
    /// Parquet zstd level. Default 3.
    pub zstd_level: i32,
    /// Rows per Parquet row group at most. Default 65536.
    pub row_group_rows: usize,
    /// Estimated encoded bytes (before compression) per Parquet row group at most. Every column chunk is one
    /// data page (so DuckDB can decrypt it), so this bounds pages too. Default 16 MiB.
    pub row_group_bytes: usize,
    /// Kafka topic for records that can never be archived (not a chat event, an invalid tenant id, a tenant
    /// without a key-encryption key): the archiver produces each there, with its reason, before committing it
    /// as a rejected record, so an operator can inspect and replay it. Must exist. Default
    /// `<kafka.topic>.dead-letter`.
    pub dead_letter_topic: String,
    /// Which offsets Kafka did not deliver may be committed as gaps: `confirm` (default) only those the
    /// broker's log-start offset shows deleted, refetching and then halting the partition otherwise; `allow`
    /// every gap, for compacted topics and transactional producers.
    pub offset_gaps: OffsetGapPolicy,
    /// Kafka session timeout. Default `10s`. Also bounds how long leaving the consumer group may take at
    /// shutdown (the coordinator drops a member that did not leave after this long anyway).
    #[serde(with = "chatvault_core::duration")]
    pub session_timeout: Duration,
    /// At shutdown, how long sealed batches may take to be uploaded and committed (retrying storage errors)
    /// before the rest is abandoned: uncommitted records stay in Kafka for the partition's next owner.
    /// Default `30s`.
    #[serde(with = "chatvault_core::duration")]
    pub shutdown_timeout: Duration,
    /// A partition with records to archive that commits nothing for this long is reported stalled
    /// (`chatvault_archiver_partitions_stalled`, and `/readyz` answers 503 naming it), usually because storage,
    /// the key provider or the chain head cannot be reached. It keeps retrying. Default `1m`.
    #[serde(with = "chatvault_core::duration")]
    pub stall_timeout: Duration,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        ArchiverConfig {
            group_id: "chatvault-archiver".into(),
            max_batch_events: 200_000,
            max_batch_bytes: 64 * 1024 * 1024,
            max_batch_age: Duration::from_secs(10),
            max_pending_batches: 2,
            fetch_queue_kbytes: 32 * 1024,
            upload_concurrency: 8,
            zstd_level: 3,
            row_group_rows: 65_536,
            row_group_bytes: 16 * 1024 * 1024,
            offset_gaps: OffsetGapPolicy::Confirm,
            dead_letter_topic: String::new(),
            session_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// See [`ArchiverConfig::offset_gaps`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetGapPolicy {
    #[default]
    Confirm,
    Allow,
}

impl ArchiverConfig {
    /// [`Self::dead_letter_topic`], or its default for `kafka`'s topic.
    pub fn dead_letter_topic(&self, kafka: &KafkaConfig) -> String {
        if self.dead_letter_topic.is_empty() {
            format!("{}.dead-letter", kafka.topic)
        } else {
            self.dead_letter_topic.clone()
        }
    }
}

impl Section for ArchiverConfig {
    const NAME: &'static str = "archiver";
    const MILLISECOND_SETTINGS: &'static [&'static str] = &[
        "max_batch_age",
        "session_timeout",
        "shutdown_timeout",
        "stall_timeout",
    ];

    fn validate(&self) -> Result<()> {
        let invalid = |setting: &str, message: &str| {
            Err(Error::invalid_argument(format!("{setting}: {message}")))
        };
        if self.max_batch_events == 0 {
            return invalid("archiver.max_batch_events", "must be positive");
        }
        if self.max_batch_bytes < 1024 * 1024 {
            return invalid("archiver.max_batch_bytes", "must be at least 1 MiB");
        }
        if self.max_pending_batches == 0 {
            return invalid("archiver.max_pending_batches", "must be positive");
        }
        if !(1..=22).contains(&self.zstd_level) {
            return invalid("archiver.zstd_level", "must be between 1 and 22");
        }
        if self.row_group_rows == 0 {
            return invalid("archiver.row_group_rows", "must be positive");
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.row_group_bytes) {
            return invalid(
                "archiver.row_group_bytes",
                "must be between 1 MiB and 1 GiB (one data page per column chunk: pages must stay readable)",
            );
        }
        if self.upload_concurrency == 0 {
            return invalid("archiver.upload_concurrency", "must be positive");
        }
        if self.stall_timeout.is_zero() {
            return invalid("archiver.stall_timeout", "must be positive");
        }
        Ok(())
    }
}
