//! What the gateway refuses, and why: one enum for the gRPC services and the webhook listener alike. Each
//! variant has an [`ErrorCode`] (through [`Coded`]), and both transports answer from it: the gRPC status,
//! the HTTP status, and, when the code is retryable, `Retry-After` on HTTP. Each variant also names the
//! reason counted in `chatvault.gateway.requests.rejected` and in a webhook integration's stats.

use chatvault_core::error::{Coded, Error as CoreError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A signature, token or timestamp did not verify. `reason` labels the rejection (`signature`,
    /// `stale_timestamp`, `token`, ...).
    #[error("{message}")]
    Unauthenticated {
        reason: &'static str,
        message: String,
    },
    /// The credentials are valid but do not grant what the request needs.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is not what the sender should send; the message names the problem.
    #[error("{0}")]
    Malformed(String),
    /// An event failed validation (a missing or oversized field); the message names the field and, in a
    /// batch, the event.
    #[error("{0}")]
    InvalidEvent(String),
    /// The body could not be read (the connection broke or the framing was wrong).
    #[error("could not read the request body")]
    UnreadableBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The body is larger than `limit` bytes (`gateway.webhooks.max_body_bytes`).
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The body did not arrive within the read timeout.
    #[error("the body was not received within {millis} ms")]
    BodyTimeout { millis: u128 },
    /// The gateway is at a limit (calls in flight, Kafka's queue): retry after a short backoff.
    #[error("{0}")]
    Overloaded(String),
    /// Kafka did not acknowledge the events; nothing of the request is acknowledged, so it may be retried.
    #[error("the archive cannot take events right now ({0}); retry later")]
    KafkaUnavailable(#[source] CoreError),
    /// A gateway bug, not the sender's fault (answered 500 so that the sender retries once it is fixed).
    #[error("{0}")]
    Internal(String),
}

impl IngestError {
    pub fn unauthenticated(reason: &'static str, message: impl Into<String>) -> IngestError {
        IngestError::Unauthenticated {
            reason,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> IngestError {
        IngestError::Malformed(message.into())
    }

    /// The reason counted for this refusal (a metric label: a small fixed set).
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Unauthenticated { reason, .. } => reason,
            IngestError::PermissionDenied(_) => "permission_denied",
            IngestError::Malformed(_) | IngestError::UnreadableBody(_) => "malformed",
            IngestError::InvalidEvent(_) => "invalid_event",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::BodyTimeout { .. } => "timeout",
            IngestError::Overloaded(_) => "overloaded",
            IngestError::KafkaUnavailable(_) => "kafka_unavailable",
            IngestError::Internal(_) => "internal",
        }
    }

    /// Whether the refusal came before the request's body was read whole, so the connection cannot carry
    /// another request (HTTP answers it with `Connection: close`).
    pub fn body_left_unread(&self) -> bool {
        matches!(
            self,
            IngestError::TooLarge { .. }
                | IngestError::BodyTimeout { .. }
                | IngestError::UnreadableBody(_)
        )
    }
}

impl Coded for IngestError {
    fn code(&self) -> ErrorCode {
        match self {
            IngestError::Unauthenticated { .. } => ErrorCode::Unauthenticated,
            IngestError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            IngestError::Malformed(_)
            | IngestError::InvalidEvent(_)
            | IngestError::UnreadableBody(_) => ErrorCode::InvalidArgument,
            IngestError::TooLarge { .. } => ErrorCode::TooLarge,
            IngestError::BodyTimeout { .. } => ErrorCode::Timeout,
            IngestError::Overloaded(_) => ErrorCode::ResourceExhausted,
            IngestError::KafkaUnavailable(_) => ErrorCode::Unavailable,
            IngestError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The core's errors reaching a gateway caller: authentication and authorization, event validation, and the
/// producer (whose invalid-argument errors, such as a record Kafka refuses as too large, are the sender's).
impl From<CoreError> for IngestError {
    fn from(error: CoreError) -> IngestError {
        match error.code() {
            ErrorCode::Unauthenticated => {
                IngestError::unauthenticated("unauthenticated", error.message())
            }
            ErrorCode::PermissionDenied => IngestError::PermissionDenied(error.message().into()),
            ErrorCode::InvalidArgument | ErrorCode::NotFound | ErrorCode::TooLarge => {
                IngestError::InvalidEvent(error.message().into())
            }
            ErrorCode::ResourceExhausted => IngestError::Overloaded(error.message().into()),
            ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Conflict => {
                IngestError::KafkaUnavailable(error)
            }
            ErrorCode::Internal | ErrorCode::Erased => {
                IngestError::Internal(error.message().into())
            }
        }
    }
}

impl From<IngestError> for tonic::Status {
    fn from(error: IngestError) -> tonic::Status {
        error.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_answers_from_its_code() {
        let cases = [
            (IngestError::unauthenticated("signature", "bad"), 401, false),
            (IngestError::malformed("not JSON"), 400, false),
            (IngestError::TooLarge { limit: 10 }, 413, false),
            (IngestError::BodyTimeout { millis: 5 }, 408, true),
            (IngestError::Overloaded("busy".into()), 503, true),
            (
                IngestError::KafkaUnavailable(CoreError::unavailable("broker down")),
                503,
                true,
            ),
            (IngestError::Internal("bug".into()), 500, false),
        ];
        for (error, status, retryable) in cases {
            assert_eq!(error.code().http_status(), status, "{error:?}");
            assert_eq!(error.code().is_retryable(), retryable, "{error:?}");
        }
        let status = tonic::Status::from(IngestError::TooLarge { limit: 10 });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "body is larger than 10 bytes");
    }

    #[test]
    fn kafka_errors_keep_their_cause() {
        let error = IngestError::from(CoreError::unavailable("the broker is down"));
        assert_eq!(error.reason(), "kafka_unavailable");
        let source = std::error::Error::source(&error).expect("the cause is kept");
        assert_eq!(source.to_string(), "the broker is down");
        assert_eq!(
            error.to_string(),
            "the archive cannot take events right now (the broker is down); retry later"
        );
    }
}
