//! The one error scheme. Every error a caller can see has an [`ErrorCode`], and the code alone decides the
//! gRPC status, the HTTP status and whether a retry can help: [`ErrorCode::grpc_code`],
//! [`ErrorCode::http_status`], [`ErrorCode::is_retryable`]. Each crate has its own `thiserror` enum for what
//! can go wrong in it (the gateway's `IngestError`, the archive's `FormatError`) and gives each variant a code
//! through [`Coded`]; transports (the gRPC services, the webhook listener) answer from the code, never by
//! hand.
//!
//! [`Error`] is the core's own: a code, a message for the caller, and the underlying error kept as its
//! `source()` (for logs), not flattened into the message. Messages name the field or setting at fault and
//! never carry secrets.

use std::fmt;

/// An error with an [`ErrorCode`]: what every crate's error enum implements, so that any transport can
/// answer it.
pub trait Coded: std::error::Error {
    fn code(&self) -> ErrorCode;

    /// The answer to a gRPC caller: the code's status with the error's message.
    fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code().grpc_code(), self.to_string())
    }
}

/// The class of an error, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed; retrying it unchanged cannot succeed.
    InvalidArgument,
    /// No valid credentials were presented.
    Unauthenticated,
    /// The credentials do not grant the role needed for this tenant.
    PermissionDenied,
    NotFound,
    /// Overload: the caller should back off and retry.
    ResourceExhausted,
    /// The request is larger than a configured limit; retrying it unchanged cannot succeed.
    TooLarge,
    /// The caller did not send its request in time (a body read timeout); it may retry.
    Timeout,
    /// A dependency (Kafka, object storage, key provider) is unreachable: retry later.
    Unavailable,
    /// The operation conflicts with the current state (for example a manifest sequence already committed).
    Conflict,
    /// The data was erased (crypto-shredded: its data key destroyed) and can never be read again.
    Erased,
    /// A bug or a corrupt archive.
    Internal,
}

impl ErrorCode {
    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Erased => "erased",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            // gRPC's own message-size refusal is RESOURCE_EXHAUSTED, which retry policies treat as transient;
            // a request over a limit is not, so it is an invalid argument.
            ErrorCode::TooLarge => tonic::Code::InvalidArgument,
            ErrorCode::Timeout => tonic::Code::DeadlineExceeded,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Conflict => tonic::Code::Aborted,
            // Not NOT_FOUND: the data existed and its erasure is a state of the archive the caller must be
            // told about; not retryable either.
            ErrorCode::Erased => tonic::Code::FailedPrecondition,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status. The HTTP callers are webhook senders, and they retry on 5xx: Microsoft Graph retries
    /// only server errors, so overload is 503 (with `Retry-After`), not 429, which it would drop.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Timeout => 408,
            ErrorCode::Conflict => 409,
            ErrorCode::Erased => 410,
            ErrorCode::TooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::ResourceExhausted | ErrorCode::Unavailable => 503,
        }
    }

    /// Whether the same request may succeed later (the caller should back off and retry).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::ResourceExhausted | ErrorCode::Unavailable | ErrorCode::Timeout
        )
    }
}

/// The underlying cause kept by an [`Error`].
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    code: ErrorCode,
    message: String,
    #[source]
    source: Option<Source>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// An error caused by `source`, which is kept (see [`std::error::Error::source`]) rather than pasted
    /// into the message; the message says what failed, in the caller's terms.
    pub fn caused_by(
        code: ErrorCode,
        message: impl Into<String>,
        source: impl Into<Source>,
    ) -> Self {
        Error {
            code,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with what was being done, keeping the code and the source.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

impl Coded for Error {
    fn code(&self) -> ErrorCode {
        self.code
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        error.to_status()
    }
}

impl From<object_store::Error> for Error {
    fn from(error: object_store::Error) -> Self {
        let code = match &error {
            object_store::Error::NotFound { .. } => ErrorCode::NotFound,
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => ErrorCode::Conflict,
            _ => ErrorCode::Unavailable,
        };
        Error::caused_by(code, format!("object store: {error}"), error)
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error::caused_by(ErrorCode::Internal, format!("json: {error}"), error)
    }
}
