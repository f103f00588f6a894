//! `chatvault.v1.GovernanceService`: retention policies (the `policy` role) and legal holds (the `hold` role),
//! committed to the archive's governance stream ([`chatvault_archive::governance`]) under the caller's name.
//! Every call, allowed or refused, is recorded in the audit trail; a change's answer waits for its record.
//!
//! Disposition (the `policy` role) plans and applies retention and erasure ([`chatvault_archive::disposition`])
//! with the restorer's data keys; applying needs the integrity signing key for the report
//! (`integrity.signing_key_path` or `signing_key_pkcs11_label`) and is refused without one. Rewritten files
//! use the default writer settings ([`FileOptions::default`]).

use std::sync::Arc;
use std::time::Duration;

use chatvault_archive::disposition::apply::{ApplyRequest, apply_plan};
use chatvault_archive::disposition::locks::{note_storage_locks, sync_locks};
use chatvault_archive::disposition::plan::{PlanRequest, make_plan};
use chatvault_archive::disposition::{DispositionLog, Document, Purpose};
use chatvault_archive::file::FileOptions;
use chatvault_archive::governance::hold::LegalHold;
use chatvault_archive::governance::policy::{PolicyScope, RetentionPolicy};
use chatvault_archive::governance::{Change, GovernanceLog, GovernanceRecord};
use chatvault_archive::keys::DataKeys;
use chatvault_archive::tlog::note::NoteSigner;
use chatvault_core::audit::{AuditCall, Auditor, CallSource};
use chatvault_core::auth::{Authenticator, Principal, Role};
use chatvault_core::event::check_tenant;
use chatvault_core::object_lock::LockingS3;
use chatvault_core::{Error, Result};
use chatvault_proto::v1::governance_service_server::GovernanceService;
use chatvault_proto::v1::{
    ApplyDispositionRequest, DispositionPlanResponse, DispositionReportResponse,
    ExplainPolicyRequest, ExplainPolicyResponse, GovernanceChangeResponse, HoldRequest,
    ListDispositionsRequest, ListDispositionsResponse, ListHoldsRequest, ListHoldsResponse,
    ListPoliciesRequest, ListPoliciesResponse, ListedHold, PlanDispositionRequest,
    ReleaseHoldRequest, RemovePolicyRequest, SetPolicyRequest,
};
use object_store::ObjectStore;
use tonic::{Request, Response, Status};

use crate::service::authorization_of;

/// The longest `reason` a change may carry.
const MAX_REASON_BYTES: usize = 1024;

/// The GovernanceService implementation.
#[derive(Clone)]
pub struct GovernanceApi {
    log: GovernanceLog,
    authenticator: Authenticator,
    auditor: Auditor,
    disposition: Option<Disposition>,
}

/// What disposition needs besides the governance stream.
#[derive(Clone)]
struct Disposition {
    store: Arc<dyn ObjectStore>,
    keys: DataKeys,
    topic: String,
    signer: Option<Arc<dyn NoteSigner>>,
    /// With `storage.object_lock` on: plans note what S3 keeps, applies clear stale legal-hold flags, and
    /// every governance change is carried to the objects already written.
    locks: Option<LockSyncer>,
}

/// Carries governance changes to existing objects' locks ([`sync_locks`]), one tenant at a time.
#[derive(Clone)]
struct LockSyncer {
    locking: Arc<LockingS3>,
    /// How long after a change the sync starts: archivers read the governance state this often, so files
    /// they write meanwhile with the old state are covered too.
    delay: Duration,
    running: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for GovernanceApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GovernanceApi").finish_non_exhaustive()
    }
}

impl GovernanceApi {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        authenticator: Authenticator,
        auditor: Auditor,
    ) -> Self {
        GovernanceApi {
            log: GovernanceLog::new(store),
            authenticator,
            auditor,
            disposition: None,
        }
    }

    /// Serves disposition of `topic`'s archive with `keys`, signing reports with `signer` (none: plans are
    /// served, applying is refused).
    pub fn with_disposition(
        mut self,
        store: Arc<dyn ObjectStore>,
        keys: DataKeys,
        topic: &str,
        signer: Option<Arc<dyn NoteSigner>>,
    ) -> Self {
        self.disposition = Some(Disposition {
            store,
            keys,
            topic: topic.to_string(),
            signer,
            locks: None,
        });
        self
    }

    /// With Object Lock storage (`locking`; `None`: off), after [`GovernanceApi::with_disposition`]: each
    /// governance change starts a lock sync of its tenant `delay` later.
    pub fn with_object_lock(mut self, locking: Option<Arc<LockingS3>>, delay: Duration) -> Self {
        if let (Some(disposition), Some(locking)) = (self.disposition.as_mut(), locking) {
            disposition.locks = Some(LockSyncer {
                locking,
                delay,
                running: Arc::new(tokio::sync::Mutex::new(())),
            });
        }
        self
    }

    /// Starts the lock sync of `tenant` after a governance change (see [`LockSyncer`]); its outcome is
    /// logged, and an object it could not change is tried again by the next sync.
    fn sync_locks_later(&self, tenant: &str) {
        let Some(disposition) = self.disposition.clone() else {
            return;
        };
        let Some(syncer) = disposition.locks.clone() else {
            return;
        };
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(syncer.delay).await;
            let _one_at_a_time = syncer.running.lock().await;
            match sync_locks(
                &disposition.store,
                &disposition.keys,
                &syncer.locking,
                &disposition.topic,
                &tenant,
                |_, _| {},
            )
            .await
            {
                Ok(sync) if sync.errors.is_empty() => tracing::info!(tenant = %tenant,
                    files = sync.files, holds_set = sync.holds_set, holds_cleared = sync.holds_cleared,
                    retention_extended = sync.retention_extended, "Object Locks synced with the governance state"),
                Ok(sync) => tracing::warn!(tenant = %tenant, files = sync.files,
                    errors = ?sync.errors, "some Object Locks could not be synced; the next change tries again"),
                Err(error) => tracing::warn!(tenant = %tenant, %error,
                    "the Object Locks could not be synced with the governance state"),
            }
        });
    }

    fn disposition(&self) -> Result<&Disposition> {
        self.disposition.as_ref().ok_or_else(|| {
            Error::new(
                chatvault_core::ErrorCode::Unavailable,
                "this restorer does not serve disposition",
            )
        })
    }

    /// Authenticates the caller, checks `tenant` and `role`.
    async fn caller(
        &self,
        authorization: Option<&str>,
        tenant: &str,
        role: Role,
        audit: &mut AuditCall,
    ) -> Result<Principal> {
        let caller = self.authenticator.authenticate(authorization).await?;
        audit.principal(&caller);
        check_tenant("tenant_id", tenant)?;
        caller.require(tenant, role)?;
        Ok(caller)
    }

    async fn commit(
        &self,
        caller: &Principal,
        change: Change,
        reason: &str,
    ) -> Result<GovernanceChangeResponse> {
        check_reason(reason)?;
        let tenant = change.tenant().to_string();
        let (record, _) = self.log.commit(change, &caller.name, reason).await?;
        self.sync_locks_later(&tenant);
        change_response(&record)
    }

    /// Runs one call: its audit record names `action`, `tenant` and `role`, and `body` does the work.
    async fn call<T, R, F>(
        &self,
        request: &Request<R>,
        action: &str,
        tenant: &str,
        role: Role,
        body: F,
    ) -> Result<T, Status>
    where
        F: AsyncFnOnce(Principal) -> Result<T>,
    {
        let mut audit = self.auditor.call(
            &format!("chatvault.v1.GovernanceService/{action}"),
            &CallSource::of_grpc(request),
        );
        audit.tenant(tenant).roles(&[role]);
        let result = match self
            .caller(authorization_of(request), tenant, role, &mut audit)
            .await
        {
            Ok(caller) => body(caller).await,
            Err(error) => Err(error),
        };
        Ok(audit.conclude(result, |_| 1).await?)
    }
}

impl GovernanceApi {
    /// A call that changes the state: authorized and audited like [`GovernanceApi::call`], then the change
    /// `build` makes of the request (after authentication, so that bad input from a caller without the role is
    /// a refusal, not a validation message) is committed under the caller's name with `reason`.
    async fn change<R>(
        &self,
        request: &Request<R>,
        action: &str,
        tenant: &str,
        role: Role,
        reason: &str,
        build: impl FnOnce() -> Result<Change>,
    ) -> Result<Response<GovernanceChangeResponse>, Status> {
        let response = self
            .call(request, action, tenant, role, async move |caller| {
                self.commit(&caller, build()?, reason).await
            })
            .await?;
        Ok(Response::new(response))
    }
}

fn check_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
        return Err(Error::invalid_argument(format!(
            "reason must be at most {MAX_REASON_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn change_response(record: &GovernanceRecord) -> Result<GovernanceChangeResponse> {
    Ok(GovernanceChangeResponse {
        version: record.version,
        record_json: serde_json::to_string(record)?,
    })
}

fn hold_of(request: &HoldRequest) -> LegalHold {
    let open = |micros: i64| (micros != 0).then_some(micros);
    LegalHold {
        conversations: request.conversations.clone(),
        custodians: request.custodians.clone(),
        from_micros: open(request.from_micros),
        to_micros: open(request.to_micros),
        query: request.query.clone(),
        ..LegalHold::new(&request.tenant_id, &request.hold_id, &request.matter)
    }
}

#[tonic::async_trait]
impl GovernanceService for GovernanceApi {
    async fn set_policy(
        &self,
        request: Request<SetPolicyRequest>,
    ) -> Result<Response<GovernanceChangeResponse>, Status> {
        let body = request.get_ref();
        let days = |days: u32| (days != 0).then_some(days);
        self.change(
            &request,
            "SetPolicy",
            &body.tenant_id,
            Role::Policy,
            &body.reason,
            || {
                Ok(Change::PolicySet {
                    policy: RetentionPolicy {
                        tenant_id: body.tenant_id.clone(),
                        policy_id: body.policy_id.clone(),
                        scope: PolicyScope::parse(&body.scope)?,
                        retain_days: days(body.retain_days),
                        delete_after_days: days(body.delete_after_days),
                        description: body.description.clone(),
                        version: 0,
                        set_at_micros: 0,
                        set_by: String::new(),
                    },
                })
            },
        )
        .await
    }

    async fn remove_policy(
        &self,
        request: Request<RemovePolicyRequest>,
    ) -> Result<Response<GovernanceChangeResponse>, Status> {
        let body = request.get_ref();
        self.change(
            &request,
            "RemovePolicy",
            &body.tenant_id,
            Role::Policy,
            &body.reason,
            || {
                Ok(Change::PolicyRemoved {
                    tenant_id: body.tenant_id.clone(),
                    policy_id: body.policy_id.clone(),
                })
            },
        )
        .await
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let body = request.get_ref();
        let response = self
            .call(
                &request,
                "ListPolicies",
                &body.tenant_id,
                Role::Policy,
                async |_| {
                    let state = self.log.state().await?;
                    let policy_json = state
                        .policies(&body.tenant_id)
                        .map(serde_json::to_string)
                        .collect::<Result<_, _>>()?;
                    Ok(ListPoliciesResponse {
                        version: state.version,
                        policy_json,
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn explain_policy(
        &self,
        request: Request<ExplainPolicyRequest>,
    ) -> Result<Response<ExplainPolicyResponse>, Status> {
        let body = request.get_ref();
        let response = self
            .call(
                &request,
                "ExplainPolicy",
                &body.tenant_id,
                Role::Policy,
                async |_| {
                    let disposition = self.disposition()?;
                    crate::service::check_conversation_id(&body.conversation_id)?;
                    let explanation = chatvault_archive::disposition::explain::explain(
                        &disposition.store,
                        &disposition.keys,
                        &disposition.topic,
                        &body.tenant_id,
                        &body.conversation_id,
                        match body.as_of_micros {
                            0 => chatvault_core::time::now_micros(),
                            given => given,
                        },
                    )
                    .await?;
                    Ok(ExplainPolicyResponse {
                        explanation_json: serde_json::to_string(&explanation)?,
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn place_hold(
        &self,
        request: Request<HoldRequest>,
    ) -> Result<Response<GovernanceChangeResponse>, Status> {
        let body = request.get_ref();
        self.change(
            &request,
            "PlaceHold",
            &body.tenant_id,
            Role::Hold,
            &body.reason,
            || {
                Ok(Change::HoldPlaced {
                    hold: hold_of(body),
                })
            },
        )
        .await
    }

    async fn change_hold(
        &self,
        request: Request<HoldRequest>,
    ) -> Result<Response<GovernanceChangeResponse>, Status> {
        let body = request.get_ref();
        self.change(
            &request,
            "ChangeHold",
            &body.tenant_id,
            Role::Hold,
            &body.reason,
            || {
                Ok(Change::HoldChanged {
                    hold: hold_of(body),
                })
            },
        )
        .await
    }

    async fn release_hold(
        &self,
        request: Request<ReleaseHoldRequest>,
    ) -> Result<Response<GovernanceChangeResponse>, Status> {
        let body = request.get_ref();
        self.change(
            &request,
            "ReleaseHold",
            &body.tenant_id,
            Role::Hold,
            &body.reason,
            || {
                Ok(Change::HoldReleased {
                    tenant_id: body.tenant_id.clone(),
                    hold_id: body.hold_id.clone(),
                })
            },
        )
        .await
    }

    async fn list_holds(
        &self,
        request: Request<ListHoldsRequest>,
    ) -> Result<Response<ListHoldsResponse>, Status> {
        let body = request.get_ref();
        let response = self
            .call(
                &request,
                "ListHolds",
                &body.tenant_id,
                Role::Hold,
                async |_| {
                    let state = self.log.state().await?;
                    let holds = state
                        .all_holds(&body.tenant_id)
                        .filter(|hold| body.include_released || !hold.is_released())
                        .map(|hold| {
                            Ok(ListedHold {
                                hold_json: serde_json::to_string(hold)?,
                                coverage: hold.describe_coverage(),
                            })
                        })
                        .collect::<Result<_>>()?;
                    Ok(ListHoldsResponse {
                        version: state.version,
                        holds,
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn plan_disposition(
        &self,
        request: Request<PlanDispositionRequest>,
    ) -> Result<Response<DispositionPlanResponse>, Status> {
        let body = request.get_ref();
        let response = self
            .call(
                &request,
                "PlanDisposition",
                &body.tenant_id,
                Role::Policy,
                async |caller| {
                    check_reason(&body.reason)?;
                    let disposition = self.disposition()?;
                    let purpose = if body.erase_subject.is_empty() {
                        Purpose::Retention
                    } else {
                        Purpose::Erasure {
                            subject: body.erase_subject.clone(),
                            authored: body.erase_authored,
                            mentioning: body.erase_mentioning,
                        }
                    };
                    let as_of_micros = match body.as_of_micros {
                        0 => chatvault_core::time::now_micros(),
                        given => given,
                    };
                    let mut plan = make_plan(
                        &disposition.store,
                        &disposition.keys,
                        PlanRequest {
                            tenant_id: body.tenant_id.clone(),
                            purpose,
                            topic: disposition.topic.clone(),
                            as_of_micros,
                            planned_by: caller.name.clone(),
                            reason: body.reason.clone(),
                        },
                        |_, _| {},
                    )
                    .await?;
                    if let Some(syncer) = &disposition.locks {
                        note_storage_locks(&mut plan, &syncer.locking).await?;
                    }
                    let stored = DispositionLog::new(disposition.store.clone())
                        .commit_plan(plan)
                        .await?;
                    Ok(DispositionPlanResponse {
                        plan_id: stored.seq,
                        plan_json: serde_json::to_string(&stored.document)?,
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn apply_disposition(
        &self,
        request: Request<ApplyDispositionRequest>,
    ) -> Result<Response<DispositionReportResponse>, Status> {
        let body = request.get_ref();
        let response = self
            .call(
                &request,
                "ApplyDisposition",
                &body.tenant_id,
                Role::Policy,
                async |caller| {
                    check_reason(&body.reason)?;
                    let disposition = self.disposition()?;
                    let signer = disposition.signer.clone().ok_or_else(|| {
                        Error::new(
                            chatvault_core::ErrorCode::Unavailable,
                            "a disposition report must be signed, and this restorer has no signing key \
                             (integrity.signing_key_path or integrity.signing_key_pkcs11_label)",
                        )
                    })?;
                    let stored = apply_plan(
                        &disposition.store,
                        &disposition.keys,
                        disposition.locks.as_ref().map(|syncer| syncer.locking.as_ref()),
                        signer,
                        &FileOptions::default(),
                        ApplyRequest {
                            tenant_id: body.tenant_id.clone(),
                            plan_id: body.plan_id,
                            applied_by: caller.name.clone(),
                            reason: body.reason.clone(),
                        },
                        |_, _| {},
                    )
                    .await?;
                    Ok(DispositionReportResponse {
                        report_id: stored.seq,
                        report_path: stored.path,
                        report_json: serde_json::to_string(&stored.document)?,
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_dispositions(
        &self,
        request: Request<ListDispositionsRequest>,
    ) -> Result<Response<ListDispositionsResponse>, Status> {
        let body = request.get_ref();
        let response = self
            .call(
                &request,
                "ListDispositions",
                &body.tenant_id,
                Role::Policy,
                async |_| {
                    let disposition = self.disposition()?;
                    let mut listed = ListDispositionsResponse::default();
                    for stored in DispositionLog::new(disposition.store.clone())
                        .documents(&[])
                        .await?
                    {
                        match stored.document {
                            Document::Plan(plan) if plan.tenant_id == body.tenant_id => {
                                listed.plan_json.push(serde_json::to_string(&plan)?);
                            }
                            Document::Report(report) if report.tenant_id == body.tenant_id => {
                                listed.report_json.push(serde_json::to_string(&report)?);
                            }
                            _ => {}
                        }
                    }
                    Ok(listed)
                },
            )
            .await?;
        Ok(Response::new(response))
    }
}
