//! The archive format, shared by the archiver (writer) and the restorer (reader). `docs/ARCHITECTURE.md`
//! describes it for writers of compatible readers.
//!
//! - [`layout`]: object paths.
//! - [`schema`]: the Parquet/Arrow schema and the conversion between events and record batches.
//! - [`file`](mod@file): encrypted Parquet encoding and decoding, and the page layout.
//! - [`manifest`]: what a committed batch records, per Kafka partition.
//! - [`chain`]: the commit protocol: [`chain::ChainWriter`] commits manifests exactly once,
//!   [`chain::ChainReader`] reads chains and verifies their links.

pub mod chain;
pub mod file;
pub mod layout;
pub mod manifest;
pub mod schema;

use chatvault_proto::v1::ChatEvent;

/// An event together with the Kafka record it was archived from.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedEvent {
    pub event: ChatEvent,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}
