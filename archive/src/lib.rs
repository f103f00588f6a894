//! The archive format, shared by the archiver (writer) and the restorer (reader), and the keys it is
//! encrypted with. `docs/ARCHITECTURE.md` describes it for writers of compatible readers.
//!
//! - [`keys`]: envelope encryption: key-encryption keys (local keyring) and per-tenant, per-month data keys.
//! - [`layout`]: object paths.
//! - [`schema`]: the Parquet/Arrow schema and the conversion between events and record batches.
//! - [`file`](mod@file): encrypted Parquet encoding and decoding, and the page layout.
//! - [`manifest`]: what a committed batch records, per Kafka partition.
//! - [`chain`]: the commit protocol: [`chain::ChainWriter`] commits manifests exactly once,
//!   [`chain::ChainReader`] reads chains and verifies their links.
//! - [`kind`]: the streams the archive holds ([`kind::ChatEvents`], [`kind::AuditTrail`]): what differs
//!   between them (decoding, key scope, paths, file schema); the commit protocol is the same for both.
//! - [`audit`]: the audit trail's Parquet schema and files.
//! - [`governance`]: retention policies and legal holds, a stream of versioned changes in the archive.
//! - [`disposition`]: retention and erasure plans, applied as rewrite commits, with signed reports.
//! - [`tlog`]: the transparency log: every manifest a leaf of one Merkle tree, signed checkpoints.
//! - [`verify`]: offline verification of a whole archive (chains, files, key records) from the bucket alone.

pub mod audit;
pub mod chain;
pub mod disposition;
pub mod drill;
pub mod file;
pub mod governance;
pub mod keys;
pub mod kind;
pub mod layout;
pub mod manifest;
pub mod schema;
pub mod tlog;
pub mod verify;

use chatvault_core::error::{Coded, Error, ErrorCode};
use chatvault_proto::v1::ChatEvent;

/// A failure of the Parquet or Arrow libraries, kept as the source of the chatvault error it becomes.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
}

/// A Parquet or Arrow failure as a chatvault error: internal (a bug, or a file that is not what its manifest
/// says; the restorer checks every file's SHA-256 before decoding it).
pub(crate) fn format_error(error: impl Into<FormatError>) -> Error {
    let error = error.into();
    Error::caused_by(error.code(), error.to_string(), error)
}

impl Coded for FormatError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
}

/// A record (a chat event, an audit record) together with the Kafka record it was archived from.
#[derive(Debug, Clone, PartialEq)]
pub struct Archived<R> {
    pub record: R,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// A chat event together with the Kafka record it was archived from.
pub type ArchivedEvent = Archived<ChatEvent>;
