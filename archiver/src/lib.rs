//! The archiver: a Kafka consumer-group worker that batches chat events into encrypted Parquet files on object
//! storage and commits them exactly once through the manifest chain (`chatvault_core::archive::chain`).
//!
//! Stages, each in its own module:
//! - [`consumer`]: the poll thread. Owns the Kafka consumer, applies rebalances (reading each assigned
//!   partition's chain head from storage and seeking there), fills one open [`batch::OpenBatch`] per partition
//!   and seals it by size, count or age.
//! - [`batch`]: open and sealed batches, and the grouping of rows into files by (tenant, date).
//! - [`dead_letter`]: the dead-letter topic for records that can never be archived.
//! - [`gaps`]: whether offsets Kafka did not deliver may be committed as a gap (only when the broker deleted
//!   them).
//! - [`writer`]: the async commit stage: encode, upload, conditional manifest create, then the Kafka offset.
//! - [`state`]: what the poll thread and the writer share about each owned partition.
//! - [`crash`]: named crash points used by the crash-safety tests.
//!
//! Memory is bounded by `max_batch_bytes` per open batch (with a global cap), `max_pending_batches` sealed
//! batches in the channel to the writer, and librdkafka's prefetch queue (`fetch_queue_kbytes`).

pub mod batch;
pub mod consumer;
pub mod crash;
pub mod dead_letter;
pub mod gaps;
pub mod state;
pub mod writer;

pub use consumer::{Archiver, ArchiverOptions, OnShutdown};
