//! Reading the audit trail: `chatvault.v1.AuditService`, for holders of the `audit` role.
//!
//! Records are read from the archive, never from Kafka: the audit topic's manifest chains (verified link by
//! link by [`ArchiveIndex`], as for chat events) name the committed audit files (`audit/date=...`), each is
//! checked against its manifest's SHA-256 before it is decrypted (under the `_audit` key scope), so a record
//! removed or edited in storage, a removed file or a rewritten manifest makes the query fail naming what is
//! wrong instead of answering without it.
//!
//! A query names one tenant and returns its records matching every filter, ordered by (time, record id), a
//! page at a time. Memory is bounded by one audit file plus one page: files are read in order of their
//! earliest record and only the best `page_size + 1` matches are kept. Every query is itself recorded.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chatvault_archive::audit::decode_audit_file;
use chatvault_archive::keys::DataKeys;
use chatvault_archive::kind::AUDIT_KEY_SCOPE;
use chatvault_archive::manifest::ManifestFile;
use chatvault_archive::tlog::note::VerifierKey;
use chatvault_core::audit::{AuditCall, AuditOutcome, AuditRecord, Auditor, CallSource};
use chatvault_core::auth::{Authenticator, Role};
use chatvault_core::event::check_tenant;
use chatvault_core::{Error, ErrorCode, Result};
use chatvault_proto::v1::audit_service_server::AuditService;
use chatvault_proto::v1::{QueryAuditTrailRequest, QueryAuditTrailResponse};
use object_store::ObjectStore;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::index::{ArchiveIndex, TimeRange};
use crate::reader::{check_committed, fetch_committed};
use crate::service::authorization_of;

/// Records per page unless the request asks for fewer (or more, up to [`MAX_PAGE_SIZE`]).
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
/// Queries served at once; more get RESOURCE_EXHAUSTED (retryable).
const MAX_CONCURRENT_QUERIES: usize = 4;

/// Which records a query wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub tenant_id: String,
    /// Exact matches; `None` matches any.
    pub subject: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<AuditOutcome>,
    pub range: TimeRange,
}

impl AuditFilter {
    fn matches(&self, record: &AuditRecord) -> bool {
        record.tenant_id == self.tenant_id
            && self.range.contains(record.time_micros)
            && self.subject.as_ref().is_none_or(|s| *s == record.subject)
            && self.action.as_ref().is_none_or(|a| *a == record.action)
            && self.outcome.is_none_or(|o| o as i32 == record.outcome)
    }
}

/// A position in the trail's order: after the record with this time and id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageCursor {
    pub time_micros: i64,
    pub record_id: String,
}

impl PageCursor {
    /// The token a client passes back for the next page.
    pub fn token(&self) -> String {
        format!("{}.{}", self.time_micros, self.record_id)
    }

    pub fn parse(token: &str) -> Result<PageCursor> {
        let invalid = || Error::invalid_argument("page_token is not one this service issued");
        let (time, id) = token.split_once('.').ok_or_else(invalid)?;
        let time_micros = time.parse().map_err(|_| invalid())?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        Ok(PageCursor {
            time_micros,
            record_id: id.to_string(),
        })
    }
}

/// One page of matching records, and where the next starts (`None` on the last page).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub next: Option<PageCursor>,
}

/// Reads the audit trail out of the archive.
#[derive(Debug)]
pub struct AuditTrailReader {
    store: Arc<dyn ObjectStore>,
    data_keys: DataKeys,
    index: ArchiveIndex,
}

impl AuditTrailReader {
    /// The trail committed by the manifest chains of `audit_topic` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, data_keys: DataKeys, audit_topic: &str) -> Self {
        AuditTrailReader {
            index: ArchiveIndex::new(store.clone(), audit_topic),
            store,
            data_keys,
        }
    }

    /// Refuses to serve audit records a checkpoint signed by one of `keys` contradicts
    /// ([`ArchiveIndex::with_trusted_keys`]).
    pub fn with_trusted_keys(mut self, keys: Vec<VerifierKey>) -> Self {
        self.index = self.index.with_trusted_keys(keys);
        self
    }

    /// The first `page_size` records after `after` (from the start when `None`) that match `filter`.
    pub async fn query(
        &self,
        filter: &AuditFilter,
        after: Option<&PageCursor>,
        page_size: usize,
    ) -> Result<AuditPage> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let from = match after {
            Some(cursor) if cursor.time_micros > filter.range.from_micros => cursor.time_micros,
            _ => filter.range.from_micros,
        };
        let wanted = TimeRange::new(from, filter.range.to_micros);
        let mut files: Vec<Arc<ManifestFile>> = self
            .index
            .tenant_files(AUDIT_KEY_SCOPE)
            .await?
            .into_iter()
            .filter(|file| wanted.overlaps(file.min_occurred_micros, file.max_occurred_micros))
            .collect();
        files.sort_by_key(|file| file.min_occurred_micros);
        // The best `page_size + 1` matches so far: one more than a page tells whether another page follows.
        let mut best: BTreeMap<PageCursor, AuditRecord> = BTreeMap::new();
        for file in files {
            if best.len() > page_size
                && let Some((last, _)) = best.last_key_value()
                && file.min_occurred_micros > last.time_micros
            {
                break; // every later file starts after the last record kept
            }
            for archived in self.read(&file).await? {
                let record = archived.record;
                let key = PageCursor {
                    time_micros: record.time_micros,
                    record_id: record.record_id.clone(),
                };
                if after.is_some_and(|after| key <= *after) || !filter.matches(&record) {
                    continue;
                }
                best.insert(key, record);
                if best.len() > page_size + 1 {
                    best.pop_last();
                }
            }
        }
        let more = best.len() > page_size;
        let records: Vec<AuditRecord> = best.into_values().take(page_size).collect();
        let next = more.then(|| {
            let last = records.last().expect("a full page");
            PageCursor {
                time_micros: last.time_micros,
                record_id: last.record_id.clone(),
            }
        });
        Ok(AuditPage { records, next })
    }

    /// The records of one committed audit file, after checking it against its manifest.
    async fn read(
        &self,
        file: &ManifestFile,
    ) -> Result<Vec<chatvault_archive::Archived<AuditRecord>>> {
        let key = self
            .data_keys
            .get(AUDIT_KEY_SCOPE, &file.key_period)
            .await
            .map_err(|error| {
                error.context(format!(
                    "audit file {} needs the audit trail's data key of period {}",
                    file.path, file.key_period
                ))
            })?;
        let bytes: Bytes = fetch_committed(self.store.as_ref(), &file.path).await?;
        let file = file.clone();
        // Hashing and decrypting are CPU-bound: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            check_committed(&file, &bytes)?;
            decode_audit_file(bytes, &key)
                .map_err(|error| error.context(format!("decoding audit file {}", file.path)))
        })
        .await
        .map_err(|error| Error::internal(format!("decoding task failed: {error}")))?
    }
}

/// The `chatvault.v1.AuditService` implementation.
#[derive(Clone)]
pub struct AuditApi {
    reader: Arc<AuditTrailReader>,
    authenticator: Authenticator,
    auditor: Auditor,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for AuditApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditApi").finish_non_exhaustive()
    }
}

impl AuditApi {
    pub fn new(
        reader: Arc<AuditTrailReader>,
        authenticator: Authenticator,
        auditor: Auditor,
    ) -> AuditApi {
        AuditApi {
            reader,
            authenticator,
            auditor,
            in_flight: Arc::new(Semaphore::new(MAX_CONCURRENT_QUERIES)),
        }
    }

    async fn page(
        &self,
        authorization: Option<&str>,
        request: &QueryAuditTrailRequest,
        audit: &mut AuditCall,
    ) -> Result<QueryAuditTrailResponse> {
        let caller = self.authenticator.authenticate(authorization).await?;
        audit.principal(&caller);
        let (filter, after, page_size) = parse_request(request)?;
        caller.require(&filter.tenant_id, Role::Audit)?;
        let _permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Error::new(
                ErrorCode::ResourceExhausted,
                "the restorer is serving its maximum of concurrent audit queries; retry later",
            )
        })?;
        let page = self
            .reader
            .query(&filter, after.as_ref(), page_size)
            .await?;
        Ok(QueryAuditTrailResponse {
            records: page.records,
            next_page_token: page.next.map(|cursor| cursor.token()).unwrap_or_default(),
        })
    }
}

/// The longest subject or action a filter may name (a record never holds a longer one).
const MAX_FILTER_BYTES: usize = 512;

fn parse_request(
    request: &QueryAuditTrailRequest,
) -> Result<(AuditFilter, Option<PageCursor>, usize)> {
    check_tenant("tenant_id", &request.tenant_id)?;
    let text = |name: &str, value: &str| -> Result<Option<String>> {
        if value.len() > MAX_FILTER_BYTES {
            return Err(Error::invalid_argument(format!(
                "{name} is {} bytes, longer than the limit of {MAX_FILTER_BYTES}",
                value.len()
            )));
        }
        Ok((!value.is_empty()).then(|| value.to_string()))
    };
    let outcome = match AuditOutcome::try_from(request.outcome) {
        Ok(AuditOutcome::Unspecified) => None,
        Ok(outcome) => Some(outcome),
        Err(_) => {
            return Err(Error::invalid_argument(format!(
                "outcome {} is not an AuditOutcome",
                request.outcome
            )));
        }
    };
    if request.from_micros < 0 || request.to_micros < 0 {
        return Err(Error::invalid_argument(
            "from_micros and to_micros must not be negative (0 means unbounded)",
        ));
    }
    if request.from_micros != 0 && request.to_micros != 0 && request.from_micros > request.to_micros
    {
        return Err(Error::invalid_argument(format!(
            "from_micros ({}) is after to_micros ({})",
            request.from_micros, request.to_micros
        )));
    }
    let page_size = match request.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        size if size <= MAX_PAGE_SIZE => size,
        size => {
            return Err(Error::invalid_argument(format!(
                "page_size {size} is above the limit of {MAX_PAGE_SIZE}"
            )));
        }
    };
    let after = match request.page_token.as_str() {
        "" => None,
        token => Some(PageCursor::parse(token)?),
    };
    let filter = AuditFilter {
        tenant_id: request.tenant_id.clone(),
        subject: text("subject", &request.subject)?,
        action: text("action", &request.action)?,
        outcome,
        range: TimeRange::new(request.from_micros, request.to_micros),
    };
    Ok((filter, after, page_size))
}

/// How a query's filters read in its own audit record.
fn describe_filters(request: &QueryAuditTrailRequest) -> String {
    let mut parts = Vec::new();
    if !request.subject.is_empty() {
        parts.push(format!("subject={}", request.subject));
    }
    if !request.action.is_empty() {
        parts.push(format!("action={}", request.action));
    }
    if request.outcome != 0 {
        parts.push(format!(
            "outcome={}",
            chatvault_archive::audit::outcome_name(request.outcome)
        ));
    }
    if !request.page_token.is_empty() {
        parts.push(format!("page_token={}", request.page_token));
    }
    parts.join(" ")
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn query_audit_trail(
        &self,
        request: Request<QueryAuditTrailRequest>,
    ) -> Result<Response<QueryAuditTrailResponse>, Status> {
        let body = request.get_ref();
        let mut audit = self.auditor.call(
            "chatvault.v1.AuditService/QueryAuditTrail",
            &CallSource::of_grpc(&request),
        );
        audit
            .tenant(&body.tenant_id)
            .time_range(body.from_micros, body.to_micros)
            .query(&describe_filters(body))
            .roles(&[Role::Audit]);
        let result = self
            .page(authorization_of(&request), body, &mut audit)
            .await;
        let response = audit
            .conclude(result, |response| response.records.len() as u64)
            .await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let cursor = PageCursor {
            time_micros: 1_764_000_000_000_000,
            record_id: "00ff".into(),
        };
        assert_eq!(PageCursor::parse(&cursor.token()).expect("parses"), cursor);
        for token in ["", "x.00ff", "12", "12.", "12.zz", "12.00ff/../"] {
            assert_eq!(
                PageCursor::parse(token).expect_err(token).code(),
                ErrorCode::InvalidArgument
            );
        }
    }

    #[test]
    fn requests_are_checked_before_anything_is_read() {
        let valid = QueryAuditTrailRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        };
        let (filter, after, size) = parse_request(&valid).expect("valid");
        assert_eq!(
            (filter.tenant_id.as_str(), after, size),
            ("acme", None, DEFAULT_PAGE_SIZE)
        );
        let refused = [
            QueryAuditTrailRequest::default(),
            QueryAuditTrailRequest {
                tenant_id: "../x".into(),
                ..valid.clone()
            },
            QueryAuditTrailRequest {
                page_size: 1001,
                ..valid.clone()
            },
            QueryAuditTrailRequest {
                outcome: 9,
                ..valid.clone()
            },
            QueryAuditTrailRequest {
                from_micros: 10,
                to_micros: 5,
                ..valid.clone()
            },
            QueryAuditTrailRequest {
                subject: "s".repeat(513),
                ..valid.clone()
            },
        ];
        for request in refused {
            assert_eq!(
                parse_request(&request).expect_err("refused").code(),
                ErrorCode::InvalidArgument,
                "{request:?}"
            );
        }
    }
}
