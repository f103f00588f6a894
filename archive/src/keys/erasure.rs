//! Crypto-shredding: erasing a tenant's data, or one month of it, by destroying the data keys it is encrypted
//! under. The Parquet files stay where they are (WORM storage, backups and replicas included) and can never
//! be decrypted again: this is the erasure that reaches every copy.
//!
//! Per data key, in this order (each step is safe to repeat, so a shred that stopped half-way is finished by
//! running it again): an [`ErasureRecord`] is written (`erasures/tenant=<t>/period=<p>/<dek>.json`, create
//! only), then the key record is deleted, then this process's cached copy is wiped. Other processes stop
//! using their cached copy within `keys.cache_ttl`. A shred of the whole tenant then destroys its
//! key-encryption keys where the provider can ([`super::KeyEncryptionProvider::destroy`]), which also makes any
//! copy of the deleted key records useless.
//!
//! Afterwards reads of that data fail with [`ErrorCode::Erased`] naming the tenant, the month and the date
//! of erasure; archiving new events of that tenant and month creates a fresh data key. A shred is refused
//! while a legal hold covers the data ([`crate::governance::hold`]), and the audit trail's own keys are never shredded.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{DataKeys, timed_provider_call};
use crate::governance::hold::{LegalHold, holds_covering};
use crate::layout;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::time::{Date, now_micros};

/// The record that a data key was destroyed: what, when, by whom and why. Kept (never deleted) so that reads
/// and `chatvault verify` can tell erased data from lost data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErasureRecord {
    /// Always `chatvault-erasure-v1`.
    pub format: String,
    pub tenant_id: String,
    /// The key scope within the tenant (absent: the default scope).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// `yyyy-mm`.
    pub period: String,
    /// The destroyed data key; files whose footer names it are unreadable.
    pub dek_id: String,
    pub erased_at_micros: i64,
    /// Who ran the shred (as the audit record names them).
    pub operator: String,
    pub reason: String,
}

impl ErasureRecord {
    /// The error every read of this key's data gets. The reason is left out: it may name the data subject.
    pub fn error(&self) -> Error {
        Error::new(
            ErrorCode::Erased,
            format!(
                "the data of tenant {}{} for {} was erased on {} (crypto-shredded: its data key {} was \
                 destroyed) and cannot be read",
                self.tenant_id,
                if self.scope.is_empty() {
                    String::new()
                } else {
                    format!(" key scope {}", self.scope)
                },
                self.period,
                Date::from_micros(self.erased_at_micros).iso(),
                self.dek_id
            ),
        )
    }
}

/// One data key a shred destroys, and what it makes unreadable.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShredTarget {
    /// The key scope (empty: the tenant's default scope).
    pub scope: String,
    pub period: String,
    pub dek_id: String,
    pub key_record: String,
    /// The scope's files of the month under `events/`.
    pub files: u64,
    pub bytes: u64,
}

/// What a shred would do ([`DataKeys::plan_shred`]), shown by its dry run and confirmed before it runs.
#[derive(Debug, Clone, Serialize)]
pub struct ShredPlan {
    pub tenant_id: String,
    /// `None`: every key scope of the tenant.
    pub scope: Option<String>,
    /// `None`: every month.
    pub period: Option<String>,
    pub targets: Vec<ShredTarget>,
    /// Unreleased legal holds covering the data: any one refuses the shred.
    pub holds: Vec<LegalHold>,
    /// What happens to the tenant's key-encryption keys (whole-tenant shreds only).
    pub key_encryption_keys: String,
}

/// What a shred did.
#[derive(Debug, Clone, Serialize)]
pub struct ShredReport {
    pub erased: Vec<ErasureRecord>,
    pub key_encryption_keys: String,
}

impl DataKeys {
    /// What shredding `tenant` (or one key scope, or one month, or both) would destroy, the files that
    /// become unreadable, the holds that refuse it. Changes nothing. Only a shred of every scope and month
    /// destroys the tenant's key-encryption keys.
    pub async fn plan_shred(
        &self,
        tenant: &str,
        scope: Option<&str>,
        period: Option<&str>,
    ) -> Result<ShredPlan> {
        if tenant == crate::kind::AUDIT_KEY_SCOPE {
            return Err(Error::invalid_argument(
                "the audit trail's keys cannot be shredded: it is the record of who accessed what",
            ));
        }
        let records =
            layout::list_paths(self.store.as_ref(), &layout::tenant_keys_prefix(tenant)).await?;
        let mut sizes: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        let mut listing = self.store.list(Some(&layout::tenant_events_prefix(tenant)));
        while let Some(object) = listing.try_next().await.map_err(Error::from)? {
            let path = object.location.as_ref();
            let month = path
                .split('/')
                .find_map(|part| part.strip_prefix("date="))
                .and_then(|date| date.get(..7))
                .map(str::to_string);
            let name = path.rsplit('/').next().unwrap_or_default();
            if let Some(month) = month {
                let entry = sizes
                    .entry((layout::scope_of_file_name(name).to_string(), month))
                    .or_default();
                entry.0 += 1;
                entry.1 += object.size;
            }
        }
        let mut targets = Vec::new();
        for path in records {
            let (record, _) = self.read_record(&path).await?;
            if period.is_some_and(|period| period != record.period)
                || scope.is_some_and(|scope| scope != record.scope)
            {
                continue;
            }
            if layout::data_key_path_in(tenant, &record.scope, &record.period) != path
                || record.tenant_id != tenant
            {
                return Err(Error::internal(format!(
                    "key record {path} names tenant {} scope {:?} period {}: copied or swapped in storage; \
                     run `chatvault verify` before shredding",
                    record.tenant_id, record.scope, record.period
                )));
            }
            let (files, bytes) = sizes
                .get(&(record.scope.clone(), record.period.clone()))
                .copied()
                .unwrap_or_default();
            targets.push(ShredTarget {
                scope: record.scope.clone(),
                period: record.period.clone(),
                dek_id: record.dek_id.clone(),
                key_record: path.to_string(),
                files,
                bytes,
            });
        }
        let holds = holds_covering(self.store.clone(), tenant, period).await?;
        let key_encryption_keys = match (scope, period) {
            (Some(_), _) | (_, Some(_)) => {
                "kept: the tenant's other data still needs them".to_string()
            }
            (None, None) => match self.providers.of(tenant).describe_destroy(tenant).await {
                Ok(description) => description,
                Err(error) => format!("kept: {}", error.message()),
            },
        };
        Ok(ShredPlan {
            tenant_id: tenant.to_string(),
            scope: scope.map(str::to_string),
            period: period.map(str::to_string),
            targets,
            holds,
            key_encryption_keys,
        })
    }

    /// Carries out `plan` (see the module documentation), calling `progress` after each data key. Refused
    /// (CONFLICT) when a legal hold covers the data, checked again just before acting.
    pub async fn shred(
        &self,
        plan: &ShredPlan,
        operator: &str,
        reason: &str,
        mut progress: impl FnMut(&ErasureRecord),
    ) -> Result<ShredReport> {
        let tenant = plan.tenant_id.as_str();
        let holds = holds_covering(self.store.clone(), tenant, plan.period.as_deref()).await?;
        if let Some(hold) = holds.first() {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!(
                    "refused: legal hold {} ({}) covers tenant {tenant}{}; release it before erasing",
                    hold.hold_id,
                    if hold.matter.is_empty() {
                        "no matter named"
                    } else {
                        &hold.matter
                    },
                    plan.period
                        .as_deref()
                        .map(|period| format!(" {period}"))
                        .unwrap_or_default()
                ),
            ));
        }
        let mut erased = Vec::new();
        for target in &plan.targets {
            let record = ErasureRecord {
                format: "chatvault-erasure-v1".into(),
                tenant_id: tenant.to_string(),
                scope: target.scope.clone(),
                period: target.period.clone(),
                dek_id: target.dek_id.clone(),
                erased_at_micros: now_micros(),
                operator: operator.to_string(),
                reason: reason.to_string(),
            };
            let path = layout::erasure_path(tenant, &target.scope, &target.period, &target.dek_id);
            let put = self
                .store
                .put_opts(
                    &path,
                    PutPayload::from(serde_json::to_vec_pretty(&record)?),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            let record = match put {
                Ok(_) => record,
                // A shred that stopped half-way: keep the first record (its date is the erasure's).
                Err(object_store::Error::AlreadyExists { .. }) => self
                    .erasure_at(&path)
                    .await?
                    .ok_or_else(|| Error::unavailable(format!("{path} vanished; run again")))?,
                Err(error) => {
                    return Err(Error::from(error).context(format!("writing {path}")));
                }
            };
            let key_record = object_store::path::Path::from(target.key_record.as_str());
            match self.store.delete(&key_record).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => {
                    return Err(Error::from(error).context(format!("deleting {key_record}")));
                }
            }
            self.forget(tenant, &target.scope, &target.period);
            progress(&record);
            erased.push(record);
        }
        let key_encryption_keys = match (&plan.scope, &plan.period) {
            (Some(_), _) | (_, Some(_)) => plan.key_encryption_keys.clone(),
            (None, None) => {
                let provider = self.providers.of(tenant).clone();
                match timed_provider_call("destroy", provider.destroy(tenant)).await {
                    Ok(done) => done,
                    Err(error) if error.code() == ErrorCode::InvalidArgument => {
                        format!("kept: {}", error.message())
                    }
                    Err(error) => return Err(error),
                }
            }
        };
        Ok(ShredReport {
            erased,
            key_encryption_keys,
        })
    }

    /// The erasure record at `path`, if there is one.
    async fn erasure_at(&self, path: &object_store::path::Path) -> Result<Option<ErasureRecord>> {
        match self.store.get(path).await {
            Ok(fetched) => {
                let bytes = fetched.bytes().await?;
                Ok(Some(serde_json::from_slice(&bytes).map_err(|error| {
                    Error::internal(format!("erasure record {path} is corrupt: {error}"))
                })?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(Error::from(error).context(format!("reading {path}"))),
        }
    }

    /// The erasure of data key `dek_id` of `tenant`'s `scope` and `period`, if it was shredded.
    pub async fn erasure_of(
        &self,
        tenant: &str,
        scope: &str,
        period: &str,
        dek_id: &str,
    ) -> Result<Option<ErasureRecord>> {
        self.erasure_at(&layout::erasure_path(tenant, scope, period, dek_id))
            .await
    }

    /// The newest erasure of any data key of `tenant`'s `scope` and `period`.
    pub(super) async fn latest_erasure(
        &self,
        tenant: &str,
        scope: &str,
        period: &str,
    ) -> Result<Option<ErasureRecord>> {
        let paths = layout::list_paths(
            self.store.as_ref(),
            &layout::erasures_prefix(tenant, scope, period),
        )
        .await?;
        let mut latest: Option<ErasureRecord> = None;
        for path in paths {
            if let Some(record) = self.erasure_at(&path).await?
                && latest
                    .as_ref()
                    .is_none_or(|newest| record.erased_at_micros > newest.erased_at_micros)
            {
                latest = Some(record);
            }
        }
        Ok(latest)
    }

    /// The data key a file names (its footer's, or its manifest entry's, `dek_id`): the period's key when it
    /// is that one; ERASED when that key was shredded (even if the month has a fresh key since); INTERNAL
    /// when the record holds another key and no erasure explains it.
    pub async fn get_for_file(
        &self,
        tenant: &str,
        scope: &str,
        period: &str,
        dek_id: &str,
    ) -> Result<super::DataKey> {
        let current = self.get_in(tenant, scope, period).await;
        match &current {
            Ok(key) if key.dek_id == dek_id => return current,
            Ok(_) => {}
            Err(error) if error.code() == ErrorCode::Erased => {}
            Err(_) => return current,
        }
        if let Some(erasure) = self.erasure_of(tenant, scope, period, dek_id).await? {
            return Err(erasure.error());
        }
        match current {
            Ok(key) => Err(Error::internal(format!(
                "the file names data key {dek_id}, but the key record of tenant {tenant} scope {scope:?} \
                 {period} holds {}; no erasure explains it: the record was replaced in storage",
                key.dek_id
            ))),
            Err(error) => Err(error),
        }
    }
}
