//! The archiver's own errors (the rest of its failures are `chatvault_core::Error`s from storage, keys and
//! the archive format).

use chatvault_core::error::{Coded, ErrorCode};

/// A request to Kafka besides polling (pause, resume, seek, watermarks, metadata) that failed, through
/// librdkafka or a test's fake [`crate::poller::Broker`]. Always worth retrying: the poll thread tries again
/// on a later turn. The cause is kept as `source()` and also shown in the message, since the poll thread
/// logs these as they are.
#[derive(Debug, thiserror::Error)]
#[error("Kafka {request} of partition {partition} failed: {source}")]
pub struct BrokerError {
    /// What was asked: `pause`, `resume`, `seek`, `watermarks` or `metadata`.
    pub request: &'static str,
    /// The partition asked about (`-1` for the whole topic).
    pub partition: i32,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BrokerError {
    pub fn new(
        request: &'static str,
        partition: i32,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BrokerError {
        BrokerError {
            request,
            partition,
            source: source.into(),
        }
    }
}

impl Coded for BrokerError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}
