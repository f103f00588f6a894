//! Disposition on S3 Object Lock storage (`storage.object_lock`; [`crate::governance::locks`] says what each
//! object is locked with when it is written):
//!
//! - [`sync_locks`] carries governance changes to the objects already written: a hold placed or changed sets
//!   the legal-hold flag of every live file with an event it covers, a released hold clears the flag of
//!   files no other hold covers, a policy that lengthens retention moves their retain-until dates later
//!   (S3 never lets a date move earlier). The restorer runs it after every governance change.
//! - [`note_storage_locks`] marks the planned files whose retain-until date has not passed: their rows
//!   leave every restore when the plan is applied, but S3 keeps the bytes until that date. The plan then
//!   offers crypto-shredding of the key scope and month that cover them (`chatvault keys shred`), which makes
//!   every copy unreadable now, and says that it erases the whole month of the scope, not only the planned
//!   rows.
//! - Applying a plan writes the replacement files with the locks of the rows they keep, clears the stale
//!   legal-hold flag of a superseded file (the plan decided its rows with every hold), and reports the
//!   objects S3 still refuses to delete ([`super::ObjectLeft`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use chatvault_core::error::Result;
use chatvault_core::object_lock::LockingS3;
use chatvault_core::time::{Date, now_micros};
use object_store::ObjectStore;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::Purpose;
use super::plan::{Plan, governance, learn_participants, live_files, read_rows};
use crate::keys::DataKeys;
use crate::layout::scope_of_file_name;

/// What [`sync_locks`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSync {
    pub tenant_id: String,
    /// The governance version the locks were computed from (`None`: no change yet).
    pub governance_version: Option<u64>,
    pub files: u64,
    pub holds_set: u64,
    pub holds_cleared: u64,
    pub retention_extended: u64,
    /// Objects whose lock could not be read or changed, one line each (the next sync tries again).
    pub errors: Vec<String>,
}

/// Brings the Object Lock of each of `tenant`'s live files in `topic` to what the current policies and holds
/// ask (see the module documentation). Reads and decrypts every live file of the tenant (custodian holds are
/// judged by who took part in each conversation). `progress` is called after each file with (done, total).
pub async fn sync_locks(
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    locking: &LockingS3,
    topic: &str,
    tenant: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<LockSync> {
    let governance = governance(store, tenant, &Purpose::Retention, now_micros()).await?;
    let mut judge = governance.judge;
    let (files, _) = live_files(store, topic, tenant).await?;
    learn_participants(&mut judge, store, keys, &files).await?;
    let rules = judge.lock_rules(tenant);
    let mut sync = LockSync {
        tenant_id: tenant.to_string(),
        governance_version: governance.changes.checked_sub(1),
        ..LockSync::default()
    };
    let total = files.len() as u64;
    for (done, live) in files.iter().enumerate() {
        let (rows, _) = read_rows(store, keys, &live.file).await?;
        let wanted = rules.for_events(rows.iter().map(|row| &row.record));
        let path = Path::from(live.file.path.as_str());
        sync.files += 1;
        match locking.lock_of(&path).await {
            Err(error) => sync.errors.push(error.to_string()),
            Ok(current) => {
                if wanted.legal_hold != current.legal_hold {
                    match locking.set_legal_hold(&path, wanted.legal_hold).await {
                        Ok(()) if wanted.legal_hold => sync.holds_set += 1,
                        Ok(()) => sync.holds_cleared += 1,
                        Err(error) => sync.errors.push(error.to_string()),
                    }
                }
                if let Some(until) = wanted.retain_until_micros
                    && current.retain_until_micros.is_none_or(|now| now < until)
                {
                    match locking.extend_retention(&path, until).await {
                        Ok(()) => sync.retention_extended += 1,
                        Err(error) => sync.errors.push(error.to_string()),
                    }
                }
            }
        }
        progress(done as u64 + 1, total);
    }
    Ok(sync)
}

/// A key scope's month that covers planned files S3 keeps until a later date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShredOffer {
    /// The key scope (empty: the tenant's default scope).
    pub key_scope: String,
    /// The month (`yyyy-mm`) whose data key encrypts them.
    pub period: String,
    pub files: u64,
    /// The latest retain-until date among them.
    pub locked_until_micros: i64,
    /// The command that shreds the scope's month (it erases every event of it, not only the planned rows).
    pub command: String,
}

/// Sets [`super::plan::PlannedFile::locked_until_micros`] of the planned files S3 keeps past now and the
/// plan's [`Plan::shred_offers`] (see the module documentation).
pub async fn note_storage_locks(plan: &mut Plan, locking: &LockingS3) -> Result<()> {
    let now = now_micros();
    let mut offers: BTreeMap<(String, String), ShredOffer> = BTreeMap::new();
    for file in &mut plan.files {
        let status = locking
            .lock_of(&Path::from(file.path.as_str()))
            .await
            .map_err(chatvault_core::error::Error::from)?;
        let Some(until) = status.retain_until_micros.filter(|until| *until > now) else {
            continue;
        };
        file.locked_until_micros = Some(until);
        let name = file.path.rsplit('/').next().unwrap_or_default();
        let scope = scope_of_file_name(name).to_string();
        let period = file
            .path
            .split('/')
            .find_map(|segment| segment.strip_prefix("date="))
            .map(|date| date.chars().take(7).collect::<String>())
            .unwrap_or_else(|| Date::from_micros(plan.as_of_micros).month_period());
        let offer = offers
            .entry((scope.clone(), period.clone()))
            .or_insert_with(|| ShredOffer {
                command: format!(
                    "chatvault keys shred --tenant {} --period {period}{}",
                    plan.tenant_id,
                    if scope.is_empty() {
                        String::new()
                    } else {
                        format!(" --scope {scope}")
                    }
                ),
                key_scope: scope,
                period,
                files: 0,
                locked_until_micros: until,
            });
        offer.files += 1;
        offer.locked_until_micros = offer.locked_until_micros.max(until);
    }
    plan.shred_offers = offers.into_values().collect();
    Ok(())
}
