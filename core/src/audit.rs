//! The audit trail's recording side: every authenticated or refused call of a service becomes one
//! [`AuditRecord`] (what, when, where, source, outcome, identity: NIST SP 800-53 AU-3), handed to an
//! [`AuditSink`] that makes it durable before the call is answered.
//!
//! Fail closed: a call whose record cannot be made durable is not served. A service asks [`AuditCall::allowed`]
//! before it sends what it read (for a stream, before its first item, with the number of items it will
//! have); when that fails, the caller gets UNAVAILABLE instead of the data. A refusal is answered as the
//! refusal it is even when its record fails (nothing was served), and the failure is logged.
//!
//! Records are protobuf messages with the request's text verbatim; nothing a caller sends can end one record
//! and start another. [`LogSafe`] escapes such text wherever it is written to a log line.

use std::net::SocketAddr;
use std::sync::Arc;

pub use chatvault_proto::v1::{AuditOutcome, AuditRecord};
use futures::future::BoxFuture;

use crate::auth::{Credential, Principal, Role};
use crate::error::{Coded, Error, ErrorCode, Result};

/// The longest a refusal waits for its record (see [`AuditCall::refused`]).
const REFUSAL_RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Where records go. `record` returns once the record is durable (for the Kafka sink: acknowledged by the
/// in-sync replicas); an error means it is not.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, record: AuditRecord) -> BoxFuture<'_, Result<()>>;
}

/// Makes the records of one service process.
#[derive(Clone)]
pub struct Auditor {
    service: &'static str,
    instance: String,
    sink: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("service", &self.service)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Records of `service` (`gateway`, `restorer`) go to `sink`.
    pub fn new(service: &'static str, sink: Arc<dyn AuditSink>) -> Auditor {
        Auditor {
            service,
            instance: crate::instance_name(),
            sink,
        }
    }

    /// Starts the record of one call of `action` from `source`.
    pub fn call(&self, action: &str, source: &CallSource) -> AuditCall {
        AuditCall {
            sink: self.sink.clone(),
            record: AuditRecord {
                service: self.service.to_string(),
                instance: self.instance.clone(),
                action: action.to_string(),
                peer_address: source
                    .peer_address
                    .map(|address| address.to_string())
                    .unwrap_or_default(),
                user_agent: source.user_agent.clone().unwrap_or_default(),
                ..AuditRecord::default()
            },
        }
    }
}

/// Where a call came from, as the service saw it.
#[derive(Debug, Clone, Default)]
pub struct CallSource {
    pub peer_address: Option<SocketAddr>,
    pub user_agent: Option<String>,
}

impl CallSource {
    /// The source of an HTTP request (a gRPC call before tonic decoded it, or a webhook).
    pub fn of_http<B>(request: &http::Request<B>) -> CallSource {
        CallSource {
            peer_address: request
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|info| info.remote_addr()),
            user_agent: bounded_user_agent(
                request
                    .headers()
                    .get(http::header::USER_AGENT)
                    .and_then(|value| value.to_str().ok()),
            ),
        }
    }

    /// The source of a gRPC call.
    pub fn of_grpc<T>(request: &tonic::Request<T>) -> CallSource {
        CallSource {
            peer_address: request.remote_addr(),
            user_agent: bounded_user_agent(
                request
                    .metadata()
                    .get("user-agent")
                    .and_then(|value| value.to_str().ok()),
            ),
        }
    }
}

/// A user agent (visible ASCII, as the header's `to_str` gives it) as records keep it: at most 512 characters.
fn bounded_user_agent(agent: Option<&str>) -> Option<String> {
    agent.map(|agent| agent.chars().take(512).collect())
}

/// The record of one call, filled in as the call learns who is calling and what it asks for, then finished
/// with its outcome.
#[derive(Debug)]
#[must_use = "a call's record must be finished with allowed or refused"]
pub struct AuditCall {
    sink: Arc<dyn AuditSink>,
    record: AuditRecord,
}

impl std::fmt::Debug for dyn AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSink")
    }
}

impl AuditCall {
    pub fn tenant(&mut self, tenant: &str) -> &mut AuditCall {
        self.record.tenant_id = tenant.to_string();
        self
    }

    pub fn conversation(&mut self, conversation: &str) -> &mut AuditCall {
        self.record.conversation_id = conversation.to_string();
        self
    }

    pub fn time_range(&mut self, from_micros: i64, to_micros: i64) -> &mut AuditCall {
        self.record.from_micros = from_micros;
        self.record.to_micros = to_micros;
        self
    }

    pub fn query(&mut self, query: &str) -> &mut AuditCall {
        self.record.query = query.to_string();
        self
    }

    /// Who is calling, once authenticated.
    pub fn principal(&mut self, principal: &Principal) -> &mut AuditCall {
        self.record.subject = principal.name.clone();
        if let Credential::Oidc { issuer, client_id } = &principal.credential {
            self.record.issuer = issuer.clone();
            self.record.client_id = client_id.clone().unwrap_or_default();
        }
        self
    }

    /// Who runs an operator command (`chatvault keys rotate`, ...) that acts with the deployment's own
    /// credentials rather than a caller's token: the local user and host, as the command found them.
    pub fn operator(&mut self, name: &str) -> &mut AuditCall {
        self.record.subject = name.to_string();
        self
    }

    /// The roles the call needs.
    pub fn roles(&mut self, roles: &[Role]) -> &mut AuditCall {
        self.record.roles_used = roles.iter().map(|role| role.name().to_string()).collect();
        self
    }

    /// A second record of the same call (same what, source and identity), for an outcome learnt after the
    /// first was finished: a stream that fails after it started.
    pub fn copy(&self) -> AuditCall {
        AuditCall {
            sink: self.sink.clone(),
            record: self.record.clone(),
        }
    }

    /// The call is served, returning or accepting `items` (of `bytes` bytes, 0 when not counted). Returns once
    /// the record is durable; an error (UNAVAILABLE) means the call must not be served.
    pub async fn allowed(self, items: u64, bytes: u64) -> Result<()> {
        let AuditCall { sink, mut record } = self;
        record.outcome = AuditOutcome::Allowed as i32;
        record.item_count = items as i64;
        record.byte_count = bytes as i64;
        finish(sink.as_ref(), record).await.map_err(|error| {
            Error::caused_by(
                ErrorCode::Unavailable,
                "the call could not be recorded in the audit trail, so it was not served; retry",
                error,
            )
        })
    }

    /// Finishes the record with the call's `result`: allowed with `count(&value)` items, the value returned
    /// only once the record is durable (UNAVAILABLE otherwise), or refused with the error.
    pub async fn conclude<T>(self, result: Result<T>, count: impl FnOnce(&T) -> u64) -> Result<T> {
        match result {
            Ok(value) => {
                let items = count(&value);
                self.allowed(items, 0).await.map(|()| value)
            }
            Err(error) => {
                self.refused(&error).await;
                Err(error)
            }
        }
    }

    /// The call is refused or failed with `error` (any crate's error, by its code and message): DENIED for
    /// an authentication or authorization refusal, ERROR otherwise. A record that cannot be made durable is
    /// logged; the refusal stands either way.
    pub fn refused(
        self,
        error: &dyn Coded,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let AuditCall { sink, mut record } = self;
        record.outcome = match error.code() {
            ErrorCode::Unauthenticated | ErrorCode::PermissionDenied => AuditOutcome::Denied,
            _ => AuditOutcome::Error,
        } as i32;
        record.reason = error.to_string();
        async move {
            let action = record.action.clone();
            // A refusal serves nothing, so it need not wait for durability as long as a served call does:
            // while the sink is slow (Kafka down), refusals are answered after REFUSAL_RECORD_WAIT instead of
            // holding their callers for the sink's whole timeout. A record still queued then is delivered later.
            match tokio::time::timeout(REFUSAL_RECORD_WAIT, finish(sink.as_ref(), record)).await {
                Ok(Ok(())) => {}
                Ok(Err(failure)) => {
                    tracing::error!(action = %LogSafe(&action), error = %failure, "a refused call could not be recorded in the audit trail");
                }
                Err(_) => {
                    tracing::warn!(action = %LogSafe(&action), "the record of a refused call is not acknowledged yet; answering the refusal");
                }
            }
        }
    }
}

async fn finish(sink: &dyn AuditSink, mut record: AuditRecord) -> Result<()> {
    record.record_id = crate::random_hex(16)?;
    record.time_micros = crate::time::now_micros();
    sink.record(record).await
}

/// Text from outside (a request field, an error naming one) as it may appear in a log line: control characters
/// (C0, DEL, C1: newlines, carriage returns, escape sequences), the Unicode line and paragraph separators and
/// the bidirectional formatting characters are written as `\u{..}` escapes, and a backslash as `\\`, so the
/// escaping cannot be imitated and nothing can start a new line or make one read differently than it is.
#[derive(Debug, Clone, Copy)]
pub struct LogSafe<'a>(pub &'a str);

impl std::fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            if c == '\\' {
                f.write_str("\\\\")?;
            } else {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// Keeps records in memory: for unit tests of services, and nothing else.
#[derive(Debug, Default)]
pub struct MemorySink {
    records: std::sync::Mutex<Vec<AuditRecord>>,
    /// While set, every record fails (to test fail-closed behaviour).
    failing: std::sync::atomic::AtomicBool,
}

impl MemorySink {
    /// The records so far, removed from the sink.
    pub fn take(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .map(|mut records| std::mem::take(&mut *records))
            .unwrap_or_default()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }
}

impl AuditSink for MemorySink {
    fn record(&self, record: AuditRecord) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::unavailable("audit sink failing (test)"));
            }
            self.records
                .lock()
                .map_err(|_| Error::internal("memory sink poisoned"))?
                .push(record);
            Ok(())
        })
    }
}
