//! `chatvault keys rewrap`: every data key record moved to its tenant's current key-encryption key (after a
//! `keys rotate`, a change of KMS key, or a move from the keyring to a KMS), so the old KEK can be retired.
//!
//! Only the wrapping changes, never the data key, so no Parquet file is rewritten. Each record is rewritten
//! only after the new wrapping has been unwrapped again and found to give the same key; a record that fails
//! stays as it was (still readable under its old KEK) and is reported. Running it again is harmless: records
//! already under the current KEK are left alone.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use object_store::{PutMode, PutOptions, PutPayload};
use serde::Serialize;

use super::{DataKeyRecord, DataKeys, WrappedKey, record_context, timed_provider_call};
use crate::layout;
use chatvault_core::auth::constant_time_eq;
use chatvault_core::error::{Error, Result};
use chatvault_core::time::now_micros;

/// What happened to one key record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RewrapOutcome {
    /// Wrapped again under the current KEK and rewritten.
    Rewrapped {
        from_provider: String,
        from_kek: String,
        to_provider: String,
        to_kek: String,
    },
    /// Already under the tenant's current KEK.
    Current,
    /// Left unchanged: the reason.
    Failed { error: String },
}

/// One line per key record examined.
#[derive(Debug, Clone, Serialize)]
pub struct RewrapEntry {
    pub record: String,
    pub tenant_id: String,
    pub period: String,
    #[serde(flatten)]
    pub outcome: RewrapOutcome,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RewrapReport {
    pub rewrapped: usize,
    pub current: usize,
    pub failed: usize,
    pub records: Vec<RewrapEntry>,
}

impl DataKeys {
    /// Rewraps every key record of `tenant` (all tenants, the audit trail's included, when `None`) whose
    /// wrapping is not the tenant's current provider and KEK. `progress` sees each entry as it is decided.
    pub async fn rewrap(
        &self,
        tenant: Option<&str>,
        mut progress: impl FnMut(&RewrapEntry),
    ) -> Result<RewrapReport> {
        let prefix = match tenant {
            Some(tenant) => layout::tenant_keys_prefix(tenant),
            None => object_store::path::Path::from(layout::KEYS_ROOT),
        };
        let mut paths = layout::list_paths(self.store.as_ref(), &prefix).await?;
        paths.retain(|path| path.as_ref().ends_with(".json"));
        let mut current_keks: HashMap<String, String> = HashMap::new();
        let mut report = RewrapReport::default();
        for path in paths {
            let (tenant_id, period, outcome) = match self.rewrap_one(&path, &mut current_keks).await
            {
                Ok((record, outcome)) => (record.tenant_id, record.period, outcome),
                Err((tenant_id, period, error)) => (
                    tenant_id,
                    period,
                    RewrapOutcome::Failed {
                        error: error.message().to_string(),
                    },
                ),
            };
            match outcome {
                RewrapOutcome::Rewrapped { .. } => report.rewrapped += 1,
                RewrapOutcome::Current => report.current += 1,
                RewrapOutcome::Failed { .. } => report.failed += 1,
            }
            let entry = RewrapEntry {
                record: path.to_string(),
                tenant_id,
                period,
                outcome,
            };
            progress(&entry);
            report.records.push(entry);
        }
        Ok(report)
    }

    /// Destroys KEK version `kek_id` of `tenant` in its provider, once no key record of the tenant (any
    /// scope) names it; refused (CONFLICT), naming the records, while some still do (run rewrap first).
    pub async fn retire_kek(&self, tenant: &str, kek_id: &str) -> Result<String> {
        let provider = self.providers.of(tenant).clone();
        if timed_provider_call("current_kek_id", provider.current_kek_id(tenant)).await? == kek_id {
            return Err(Error::invalid_argument(format!(
                "{kek_id} is tenant {tenant}'s current key-encryption key: rotate first"
            )));
        }
        let paths =
            layout::list_paths(self.store.as_ref(), &layout::tenant_keys_prefix(tenant)).await?;
        let mut needing = Vec::new();
        for path in paths {
            let (record, _) = self.read_record(&path).await?;
            if record.provider == provider.kind() && record.kek_id == kek_id {
                needing.push(path.to_string());
            }
        }
        if !needing.is_empty() {
            return Err(Error::new(
                chatvault_core::error::ErrorCode::Conflict,
                format!(
                    "{} key record(s) of tenant {tenant} are still wrapped under {kek_id} ({}); run \
                     `chatvault keys rewrap --tenant {tenant}` first",
                    needing.len(),
                    needing.join(", ")
                ),
            ));
        }
        timed_provider_call("retire", provider.retire(tenant, kek_id)).await
    }

    #[allow(clippy::type_complexity)]
    async fn rewrap_one(
        &self,
        path: &object_store::path::Path,
        current_keks: &mut HashMap<String, String>,
    ) -> std::result::Result<(DataKeyRecord, RewrapOutcome), (String, String, Error)> {
        let unnamed = |error: Error| (String::new(), String::new(), error);
        let (record, version) = self.read_record(path).await.map_err(unnamed)?;
        let named = |error: Error| (record.tenant_id.clone(), record.period.clone(), error);
        if layout::data_key_path_in(&record.tenant_id, &record.scope, &record.period) != *path {
            return Err(named(Error::internal(format!(
                "record names tenant {} scope {:?} period {}, which is not its path: copied or swapped in \
                 storage",
                record.tenant_id, record.scope, record.period
            ))));
        }
        let destination = self.providers.of(&record.tenant_id).clone();
        let current = match current_keks.get(&record.tenant_id) {
            Some(current) => current.clone(),
            None => {
                let current = timed_provider_call(
                    "current_kek_id",
                    destination.current_kek_id(&record.tenant_id),
                )
                .await
                .map_err(named)?;
                current_keks.insert(record.tenant_id.clone(), current.clone());
                current
            }
        };
        if record.provider == destination.kind() && record.kek_id == current {
            return Ok((record, RewrapOutcome::Current));
        }
        let original = self.unwrap_record(&record).await.map_err(named)?;
        let wrapped = WrappedKey {
            kek_id: record.kek_id.clone(),
            ciphertext: BASE64
                .decode(&record.wrapped_key)
                .map_err(|_| named(Error::internal("wrapped_key is not base64")))?,
        };
        let context = record_context(&record);
        let rewrapped = if record.provider == destination.kind() {
            timed_provider_call("rewrap", destination.rewrap(&context, &wrapped)).await
        } else {
            // Moving between providers: the plaintext passes through this process once.
            timed_provider_call("wrap", destination.wrap(&context, &original.key)).await
        }
        .map_err(named)?;
        let check = timed_provider_call("unwrap", destination.unwrap(&context, &rewrapped))
            .await
            .map_err(named)?;
        if !constant_time_eq(&check, &original.key) {
            return Err(named(Error::internal(
                "the new wrapping does not unwrap to the same data key; record left unchanged",
            )));
        }
        // A shred since the record was read must win: never write an erased key back (on stores without
        // conditional updates this check is what closes most of that window).
        if self
            .erasure_of(
                &record.tenant_id,
                &record.scope,
                &record.period,
                &record.dek_id,
            )
            .await
            .map_err(named)?
            .is_some()
        {
            return Err(named(Error::new(
                chatvault_core::error::ErrorCode::Erased,
                "the data key was shredded while it was being rewrapped; record left deleted",
            )));
        }
        let updated = DataKeyRecord {
            provider: destination.kind().to_string(),
            kek_id: rewrapped.kek_id.clone(),
            wrapped_key: BASE64.encode(&rewrapped.ciphertext),
            rewrapped_at_micros: now_micros(),
            ..record.clone()
        };
        let payload =
            PutPayload::from(serde_json::to_vec_pretty(&updated).map_err(|error| {
                named(Error::internal(format!("encoding key record: {error}")))
            })?);
        // Conditional on the record being the one read, where the store can (S3, memory): a concurrent rewrap
        // loses cleanly. Stores without conditional updates (the local file system) are overwritten: safe
        // because the only writers of an existing record are rewraps, and every rewrap writes a verified
        // wrapping of the same key.
        let put = self
            .store
            .put_opts(
                path,
                payload.clone(),
                PutOptions::from(PutMode::Update(version)),
            )
            .await;
        match put {
            Ok(_) => {}
            Err(object_store::Error::NotImplemented { .. }) => {
                self.store
                    .put_opts(path, payload, PutOptions::from(PutMode::Overwrite))
                    .await
                    .map_err(|error| {
                        named(Error::from(error).context(format!("writing {path}")))
                    })?;
            }
            Err(object_store::Error::Precondition { .. }) => {
                return Err(named(Error::unavailable(
                    "the record changed while it was being rewrapped; run rewrap again",
                )));
            }
            Err(error) => {
                return Err(named(Error::from(error).context(format!("writing {path}"))));
            }
        }
        Ok((
            updated,
            RewrapOutcome::Rewrapped {
                from_provider: record.provider.clone(),
                from_kek: record.kek_id.clone(),
                to_provider: destination.kind().to_string(),
                to_kek: rewrapped.kek_id,
            },
        ))
    }
}
