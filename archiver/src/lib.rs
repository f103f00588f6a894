//! The archiver: a Kafka consumer-group worker that batches chat events (and, beside them, the audit trail's
//! records) into encrypted Parquet files on object storage and commits them exactly once through the
//! manifest chain (`chatvault_archive::chain`). Everything below is generic over the stream's
//! [`RecordKind`](chatvault_archive::kind::RecordKind).
//!
//! Stages, each in its own module:
//! - [`role`]: the lifecycle ([`Archiver::run`]): start-up checks, the poll thread, the shutdown deadline,
//!   leaving the consumer group.
//! - `kafka`: librdkafka glue: the rebalance callback (assign and pause, nothing else), lag statistics, the
//!   poll loop, the [`poller::Broker`] over the consumer.
//! - [`poller`]: the poll thread's state machine. It owns every piece of partition state: loading chain
//!   heads (on the runtime, never inside the rebalance callback), the open batches, sealing by size, count or
//!   age, per-partition backoff after failures, halting, and the health `/readyz` reports.
//! - [`batch`]: open and sealed batches, and the grouping of rows into files by (tenant, date).
//! - [`gaps`]: whether offsets Kafka did not deliver may be committed as a gap (only when the broker deleted
//!   them).
//! - [`lane`]: one commit lane per owned partition: runs each sealed batch through the stages below, retries,
//!   releases or gives it up, and reports its outcome to the poller.
//! - [`encode`]: the encode stage: data keys, one encrypted Parquet file per (tenant, date).
//! - [`upload`]: the upload stage: dead-letter copies, the upload intent, the files.
//! - [`commit`]: the commit stage: the manifest's conditional create, then the bookkeeping.
//! - [`checkpoint`]: the periodic checkpoint of the transparency log (`chatvault_archive::tlog`).
//! - [`dead_letter`]: the dead-letter topic for records that can never be archived.
//! - [`stats`]: counters, committed heads and health, readable while the archiver runs.
//! - [`crash`]: named crash points used by the crash-safety tests.
//!
//! Memory is bounded by `max_batch_bytes` per open batch (with a global cap of two batches' worth),
//! `max_pending_batches` sealed batches handed to the lanes (a partition whose next batch finds no free slot is
//! paused until one frees), and librdkafka's prefetch queue (`fetch_queue_kbytes`).

pub mod batch;
pub mod checkpoint;
pub mod commit;
pub mod config;
pub mod crash;
pub mod dead_letter;
pub mod encode;
pub mod error;
pub mod gaps;
pub(crate) mod kafka;
pub mod lane;
pub mod poller;
pub mod role;
#[cfg(test)]
mod stage_tests;
pub mod stats;
#[cfg(test)]
mod test_support;
pub mod upload;

pub use poller::OnShutdown;
pub use role::{Archiver, ArchiverOptions, RoleStats, run};
pub use stats::{ArchiverStats, CommittedHeads};
