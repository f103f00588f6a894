//! `chatvault.v1.KeyService`: data keys for standard readers, handed out only to holders of the `key_export`
//! role for the tenant, and only once the handout is recorded in the audit trail (with how many keys): the
//! recorded alternative to reading the keyring directly.
//!
//! Only tenants' keys are handed out: the audit trail's key scope (`_audit`) is not a tenant id, so no request
//! can name it.

use chatvault_archive::keys::DataKeys;
use chatvault_core::audit::{AuditCall, Auditor, CallSource};
use chatvault_core::auth::{Authenticator, Role};
use chatvault_core::event::check_tenant;
use chatvault_core::time::Date;
use chatvault_core::{Error, ErrorCode, Result};
use chatvault_proto::v1::key_service_server::KeyService;
use chatvault_proto::v1::{ExportDataKeysRequest, ExportDataKeysResponse, ExportedDataKey};
use tonic::{Request, Response, Status};

use crate::service::authorization_of;

/// The most months one request may name.
pub const MAX_PERIODS: usize = 120;

/// The KeyService implementation.
#[derive(Clone)]
pub struct KeyExportApi {
    data_keys: DataKeys,
    authenticator: Authenticator,
    auditor: Auditor,
}

impl std::fmt::Debug for KeyExportApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyExportApi").finish_non_exhaustive()
    }
}

/// A month, `yyyy-mm`: the date of its first day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Period(Date);

impl Period {
    fn parse(field: &str, text: &str) -> Result<Period> {
        let invalid =
            || Error::invalid_argument(format!("{field} {text:?} is not a month (yyyy-mm)"));
        if text.len() != 7 || text.as_bytes()[4] != b'-' {
            return Err(invalid());
        }
        Date::parse_iso(&format!("{text}-01"))
            .map(Period)
            .ok_or_else(invalid)
    }

    fn next(self) -> Period {
        Period(self.0.first_of_next_month())
    }

    fn name(self) -> String {
        self.0.month_period()
    }

    fn start_micros(self) -> i64 {
        self.0.start_micros()
    }
}

/// The months of a request, checked.
fn periods(request: &ExportDataKeysRequest) -> Result<Vec<Period>> {
    let from = Period::parse("from_period", &request.from_period)?;
    let to = if request.to_period.is_empty() {
        from
    } else {
        Period::parse("to_period", &request.to_period)?
    };
    if from > to {
        return Err(Error::invalid_argument(format!(
            "from_period {} is after to_period {}",
            from.name(),
            to.name()
        )));
    }
    let mut months = vec![from];
    while *months.last().expect("one month") < to {
        if months.len() == MAX_PERIODS {
            return Err(Error::invalid_argument(format!(
                "the range names more than {MAX_PERIODS} months; ask for fewer at a time"
            )));
        }
        months.push(months.last().expect("one month").next());
    }
    Ok(months)
}

impl KeyExportApi {
    pub fn new(data_keys: DataKeys, authenticator: Authenticator, auditor: Auditor) -> Self {
        KeyExportApi {
            data_keys,
            authenticator,
            auditor,
        }
    }

    async fn keys(
        &self,
        authorization: Option<&str>,
        request: &ExportDataKeysRequest,
        audit: &mut AuditCall,
    ) -> Result<ExportDataKeysResponse> {
        let caller = self.authenticator.authenticate(authorization).await?;
        audit.principal(&caller);
        check_tenant("tenant_id", &request.tenant_id)?;
        if !request.key_scope.is_empty() {
            check_tenant("key_scope", &request.key_scope)?;
        }
        let months = periods(request)?;
        caller.require(&request.tenant_id, Role::KeyExport)?;
        let mut keys = Vec::new();
        for month in months {
            let key = self
                .data_keys
                .get_in(&request.tenant_id, &request.key_scope, &month.name())
                .await;
            match key {
                Ok(key) => keys.push(ExportedDataKey {
                    tenant_id: key.tenant_id.clone(),
                    period: key.period.clone(),
                    dek_id: key.dek_id.clone(),
                    key: key.key.to_vec(),
                    key_scope: key.scope.clone(),
                }),
                // Nothing of the tenant was archived in that month.
                Err(error) if error.code() == ErrorCode::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        Ok(ExportDataKeysResponse { keys })
    }
}

#[tonic::async_trait]
impl KeyService for KeyExportApi {
    async fn export_data_keys(
        &self,
        request: Request<ExportDataKeysRequest>,
    ) -> Result<Response<ExportDataKeysResponse>, Status> {
        let body = request.get_ref();
        let mut audit = self.auditor.call(
            "chatvault.v1.KeyService/ExportDataKeys",
            &CallSource::of_grpc(&request),
        );
        audit.tenant(&body.tenant_id).roles(&[Role::KeyExport]);
        if let Ok(months) = periods(body) {
            let end = months.last().map_or(0, |last| last.next().start_micros());
            audit.time_range(months[0].start_micros(), end);
        }
        let result = self
            .keys(authorization_of(&request), body, &mut audit)
            .await;
        // The handout is recorded (and durable) before any key leaves the process.
        let response = audit
            .conclude(result, |response| response.keys.len() as u64)
            .await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(from: &str, to: &str) -> ExportDataKeysRequest {
        ExportDataKeysRequest {
            tenant_id: "acme".into(),
            from_period: from.into(),
            to_period: to.into(),
            key_scope: String::new(),
        }
    }

    #[test]
    fn ranges_cover_their_months_across_years_and_bad_ones_name_the_field() {
        let names = |from, to| -> Vec<String> {
            periods(&request(from, to))
                .expect("valid")
                .into_iter()
                .map(Period::name)
                .collect()
        };
        assert_eq!(names("2025-11", ""), ["2025-11"]);
        assert_eq!(
            names("2025-11", "2026-02"),
            ["2025-11", "2025-12", "2026-01", "2026-02"]
        );
        assert_eq!(
            Period::parse("p", "2026-03").expect("valid").start_micros(),
            1_772_323_200_000_000
        );
        for (from, to, field) in [
            ("2025-13", "", "from_period"),
            ("2025-1", "", "from_period"),
            ("2025-11", "2025-1x", "to_period"),
            ("2026-01", "2025-12", "after"),
            ("2000-01", "2026-01", "more than 120"),
        ] {
            let error = periods(&request(from, to)).expect_err(from);
            assert_eq!(error.code(), ErrorCode::InvalidArgument);
            assert!(error.message().contains(field), "{error}");
        }
    }
}
