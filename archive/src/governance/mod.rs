//! Governance: retention policies ([`policy`]) and legal holds ([`hold`]) as versioned configuration kept in
//! the archive itself.
//!
//! Every change (a policy set or removed, a hold placed, changed or released) is one record committed through
//! the one commit protocol as the stream [`GOVERNANCE_TOPIC`]: partition 0, manifest `s` names one JSON file
//! `governance/<s:020>-<batch>.json` ([`GovernanceRecord`]). The sequence number is the change's *version*: a
//! policy carries the version of the change that last set it, and whatever acts on policies (a disposition
//! plan) names the version it was computed at. Like every stream its manifests are leaves of the transparency
//! log and `chatvault verify` checks its chain and files, so the history of what was retained and held cannot
//! be rewritten unnoticed once a checkpoint covers it.
//!
//! The current state is the fold of every change in order ([`GovernanceState`]). A change is checked against
//! the state at the chain head it is committed on (the conditional create makes that head exact), so a
//! committed change that does not apply to the state before it means the stream was altered: reading fails,
//! naming the version.

pub mod hold;
pub mod locks;
pub mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::chain::{ChainReader, ChainWriter};
use crate::manifest::{ChainHead, Manifest};
use crate::tlog::committer::fetch_committed;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_core::time::now_micros;
use hold::LegalHold;
use policy::RetentionPolicy;

/// The stream of governance changes (`manifests/topic=_governance/partition=0/`).
pub const GOVERNANCE_TOPIC: &str = "_governance";
pub const GOVERNANCE_PARTITION: i32 = 0;
pub const GOVERNANCE_ROOT: &str = "governance";
pub const RECORD_FORMAT: &str = "chatvault-governance-v1";

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernanceRecord {
    /// Always `chatvault-governance-v1`.
    pub format: String,
    /// The sequence number it was committed at.
    pub version: u64,
    pub at_micros: i64,
    /// Who made the change (the authenticated caller's name).
    pub actor: String,
    /// Why (a ticket, a matter), as the actor gave it.
    #[serde(default)]
    pub reason: String,
    pub change: Change,
}

/// What a change does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    /// Sets a policy (new, or a new version of the same id).
    PolicySet {
        policy: RetentionPolicy,
    },
    PolicyRemoved {
        tenant_id: String,
        policy_id: String,
    },
    /// Places a new hold.
    HoldPlaced {
        hold: LegalHold,
    },
    /// Replaces what an unreleased hold covers.
    HoldChanged {
        hold: LegalHold,
    },
    HoldReleased {
        tenant_id: String,
        hold_id: String,
    },
}

impl Change {
    /// The tenant it concerns.
    pub fn tenant(&self) -> &str {
        match self {
            Change::PolicySet { policy } => &policy.tenant_id,
            Change::HoldPlaced { hold } | Change::HoldChanged { hold } => &hold.tenant_id,
            Change::PolicyRemoved { tenant_id, .. } | Change::HoldReleased { tenant_id, .. } => {
                tenant_id
            }
        }
    }

    /// `policy.set`, `policy.remove`, `hold.place`, `hold.change` or `hold.release`.
    pub fn action(&self) -> &'static str {
        match self {
            Change::PolicySet { .. } => "policy.set",
            Change::PolicyRemoved { .. } => "policy.remove",
            Change::HoldPlaced { .. } => "hold.place",
            Change::HoldChanged { .. } => "hold.change",
            Change::HoldReleased { .. } => "hold.release",
        }
    }
}

/// Every tenant's policies and holds after the changes up to `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GovernanceState {
    /// The newest change applied (`None`: none yet).
    pub version: Option<u64>,
    policies: BTreeMap<(String, String), RetentionPolicy>,
    /// Released holds stay, so that what was held, by whom and until when is listed.
    holds: BTreeMap<(String, String), LegalHold>,
}

impl GovernanceState {
    /// Every tenant with a policy or a hold, each once, sorted.
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        let mut tenants: Vec<&str> = self
            .policies
            .keys()
            .chain(self.holds.keys())
            .map(|(tenant, _)| tenant.as_str())
            .collect();
        tenants.sort_unstable();
        tenants.dedup();
        tenants.into_iter()
    }

    /// `tenant`'s policies, by id.
    pub fn policies(&self, tenant: &str) -> impl Iterator<Item = &RetentionPolicy> {
        self.policies
            .range((tenant.to_string(), String::new())..)
            .take_while(move |((t, _), _)| t == tenant)
            .map(|(_, policy)| policy)
    }

    /// `tenant`'s unreleased holds, by id.
    pub fn holds(&self, tenant: &str) -> impl Iterator<Item = &LegalHold> {
        self.all_holds(tenant).filter(|hold| !hold.is_released())
    }

    /// `tenant`'s holds, released ones included.
    pub fn all_holds(&self, tenant: &str) -> impl Iterator<Item = &LegalHold> {
        self.holds
            .range((tenant.to_string(), String::new())..)
            .take_while(move |((t, _), _)| t == tenant)
            .map(|(_, hold)| hold)
    }

    pub fn policy(&self, tenant: &str, policy_id: &str) -> Option<&RetentionPolicy> {
        self.policies
            .get(&(tenant.to_string(), policy_id.to_string()))
    }

    pub fn hold(&self, tenant: &str, hold_id: &str) -> Option<&LegalHold> {
        self.holds.get(&(tenant.to_string(), hold_id.to_string()))
    }

    /// Applies `record` (which must be the next version), or says why it does not apply to this state:
    /// INVALID_ARGUMENT for what a caller got wrong, NOT_FOUND / CONFLICT for what the state refuses.
    pub fn apply(&mut self, record: &GovernanceRecord) -> Result<()> {
        let expected = self.version.map_or(0, |v| v + 1);
        if record.version != expected {
            return Err(Error::internal(format!(
                "governance change {} follows version {:?}",
                record.version, self.version
            )));
        }
        match &record.change {
            Change::PolicySet { policy } => {
                policy.check()?;
                let policy = RetentionPolicy {
                    version: record.version,
                    set_at_micros: record.at_micros,
                    set_by: record.actor.clone(),
                    ..policy.clone()
                };
                self.policies
                    .insert((policy.tenant_id.clone(), policy.policy_id.clone()), policy);
            }
            Change::PolicyRemoved {
                tenant_id,
                policy_id,
            } => {
                if self
                    .policies
                    .remove(&(tenant_id.clone(), policy_id.clone()))
                    .is_none()
                {
                    return Err(Error::new(
                        ErrorCode::NotFound,
                        format!("tenant {tenant_id} has no policy {policy_id}"),
                    ));
                }
            }
            Change::HoldPlaced { hold } => {
                hold.check()?;
                let key = (hold.tenant_id.clone(), hold.hold_id.clone());
                if self.holds.contains_key(&key) {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!(
                            "tenant {} already has a hold {} (released holds keep their id)",
                            hold.tenant_id, hold.hold_id
                        ),
                    ));
                }
                let placed = stored_hold(
                    hold,
                    record.at_micros,
                    &record.actor,
                    record.version,
                    record.version,
                );
                self.holds.insert(key, placed);
            }
            Change::HoldChanged { hold } => {
                hold.check()?;
                let current = self.unreleased_hold(&hold.tenant_id, &hold.hold_id)?;
                let changed = stored_hold(
                    hold,
                    current.created_at_micros,
                    &current.created_by,
                    current.placed_version,
                    record.version,
                );
                self.holds
                    .insert((hold.tenant_id.clone(), hold.hold_id.clone()), changed);
            }
            Change::HoldReleased { tenant_id, hold_id } => {
                self.unreleased_hold(tenant_id, hold_id)?;
                let hold = self
                    .holds
                    .get_mut(&(tenant_id.clone(), hold_id.clone()))
                    .expect("checked above");
                hold.released_at_micros = Some(record.at_micros);
                hold.released_by = record.actor.clone();
                hold.version = record.version;
            }
        }
        self.version = Some(record.version);
        Ok(())
    }

    fn unreleased_hold(&self, tenant: &str, hold_id: &str) -> Result<&LegalHold> {
        match self.hold(tenant, hold_id) {
            None => Err(Error::new(
                ErrorCode::NotFound,
                format!("tenant {tenant} has no hold {hold_id}"),
            )),
            Some(hold) if hold.is_released() => Err(Error::new(
                ErrorCode::Conflict,
                format!("hold {hold_id} of tenant {tenant} is already released"),
            )),
            Some(hold) => Ok(hold),
        }
    }
}

/// `hold` as the state keeps it: what the caller asked to cover, with who placed it when and at which versions
/// (never released, never with hand-written `periods`).
fn stored_hold(
    hold: &LegalHold,
    created_at_micros: i64,
    created_by: &str,
    placed_version: u64,
    version: u64,
) -> LegalHold {
    LegalHold {
        format: hold::HOLD_FORMAT.into(),
        created_at_micros,
        created_by: created_by.into(),
        placed_version,
        version,
        released_at_micros: None,
        released_by: String::new(),
        periods: Vec::new(),
        ..hold.clone()
    }
}

/// Reads and extends the governance stream of one archive.
#[derive(Debug, Clone)]
pub struct GovernanceLog {
    store: Arc<dyn ObjectStore>,
}

impl GovernanceLog {
    pub fn new(store: Arc<dyn ObjectStore>) -> GovernanceLog {
        GovernanceLog { store }
    }

    /// The state after every committed change, each link, file digest and change checked.
    pub async fn state(&self) -> Result<GovernanceState> {
        Ok(self.read().await?.0)
    }

    /// The state and the chain head it is at.
    async fn read(&self) -> Result<(GovernanceState, ChainHead)> {
        let reader = ChainReader::new(self.store.clone(), GOVERNANCE_TOPIC);
        let verified = reader
            .read_after(GOVERNANCE_PARTITION, &ChainHead::empty())
            .await;
        if let Some(error) = verified.error {
            return Err(error.context("the governance stream's chain does not verify"));
        }
        let mut state = GovernanceState::default();
        let mut head = ChainHead::empty();
        for (manifest, after) in verified.manifests {
            let record = self.open(&manifest).await?;
            state.apply(&record).map_err(|error| {
                Error::internal(format!(
                    "governance change {} does not apply to the state before it (the stream was altered): {}",
                    manifest.seq,
                    error.message()
                ))
            })?;
            head = after;
        }
        Ok((state, head))
    }

    async fn open(&self, manifest: &Manifest) -> Result<GovernanceRecord> {
        let file = manifest.files.first().ok_or_else(|| {
            Error::internal(format!(
                "governance manifest {} names no change",
                manifest.seq
            ))
        })?;
        let bad = |why: String| Error::internal(format!("governance change {}: {why}", file.path));
        let bytes = fetch_committed(self.store.as_ref(), file)
            .await?
            .map_err(bad)?;
        let record: GovernanceRecord =
            serde_json::from_slice(&bytes).map_err(|error| bad(error.to_string()))?;
        if record.format != RECORD_FORMAT || record.version != manifest.seq {
            return Err(bad(format!(
                "format {} version {} in manifest {}",
                record.format, record.version, manifest.seq
            )));
        }
        Ok(record)
    }

    /// Commits `change` by `actor` as the next version and returns the record and the state after it.
    /// The change is checked against the state at the head it is committed on; when another change wins
    /// that version, the state is read again and the change checked anew.
    pub async fn commit(
        &self,
        change: Change,
        actor: &str,
        reason: &str,
    ) -> Result<(GovernanceRecord, GovernanceState)> {
        let writer = ChainWriter::new(self.store.clone(), GOVERNANCE_TOPIC);
        for _ in 0..5 {
            let (mut state, head) = self.read().await?;
            let record = GovernanceRecord {
                format: RECORD_FORMAT.into(),
                version: head.next_seq,
                at_micros: now_micros(),
                actor: actor.into(),
                reason: reason.into(),
                change: change.clone(),
            };
            state.apply(&record)?;
            let bytes = Bytes::from(serde_json::to_vec_pretty(&record)?);
            let appended = writer
                .append_document(
                    GOVERNANCE_PARTITION,
                    &head,
                    GOVERNANCE_ROOT,
                    "json",
                    actor,
                    bytes,
                )
                .await?;
            if appended.is_some() {
                return Ok((record, state));
            }
        }
        Err(Error::new(
            ErrorCode::Unavailable,
            "other governance changes kept taking the next version; try again",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::policy::PolicyScope;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    fn policy(id: &str, delete: u32) -> RetentionPolicy {
        RetentionPolicy {
            tenant_id: "acme".into(),
            policy_id: id.into(),
            scope: PolicyScope::Tenant,
            retain_days: None,
            delete_after_days: Some(delete),
            description: String::new(),
            version: 0,
            set_at_micros: 0,
            set_by: String::new(),
        }
    }

    #[tokio::test]
    async fn changes_are_versioned_checked_and_survive_a_reread() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let log = GovernanceLog::new(store.clone());
        assert_eq!(log.state().await.unwrap(), GovernanceState::default());
        log.commit(
            Change::PolicySet {
                policy: policy("chat-1y", 365),
            },
            "ann",
            "TICKET-1",
        )
        .await
        .unwrap();
        let (record, state) = log
            .commit(
                Change::PolicySet {
                    policy: policy("chat-1y", 400),
                },
                "bob",
                "",
            )
            .await
            .unwrap();
        assert_eq!(record.version, 1);
        let set = state.policy("acme", "chat-1y").unwrap();
        assert_eq!(
            (set.version, set.delete_after_days, set.set_by.as_str()),
            (1, Some(400), "bob")
        );
        let mut hold = LegalHold::new("acme", "matter-7", "Doe v. Acme");
        hold.conversations = vec!["c1".into()];
        log.commit(Change::HoldPlaced { hold: hold.clone() }, "carol", "")
            .await
            .unwrap();
        // Placing it twice, releasing an unknown hold, removing an unknown policy: refused, nothing committed.
        let twice = log
            .commit(Change::HoldPlaced { hold }, "carol", "")
            .await
            .unwrap_err();
        assert_eq!(twice.code(), ErrorCode::Conflict);
        let unknown = Change::HoldReleased {
            tenant_id: "acme".into(),
            hold_id: "nope".into(),
        };
        assert_eq!(
            log.commit(unknown, "carol", "").await.unwrap_err().code(),
            ErrorCode::NotFound
        );
        let bad = log
            .commit(
                Change::PolicySet {
                    policy: policy("x", 0),
                },
                "ann",
                "",
            )
            .await
            .unwrap_err();
        assert_eq!(bad.code(), ErrorCode::InvalidArgument);
        log.commit(
            Change::HoldReleased {
                tenant_id: "acme".into(),
                hold_id: "matter-7".into(),
            },
            "carol",
            "settled",
        )
        .await
        .unwrap();
        let state = log.state().await.unwrap();
        assert_eq!(state.version, Some(3));
        assert_eq!(state.holds("acme").count(), 0);
        let released = state.hold("acme", "matter-7").unwrap();
        assert_eq!((released.placed_version, released.version), (2, 3));
        assert_eq!(released.released_by, "carol");
        assert!(
            hold::holds_covering(store.clone(), "acme", None)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_altered_change_fails_the_read_naming_it() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let log = GovernanceLog::new(store.clone());
        let hold = LegalHold::new("acme", "matter-7", "Doe v. Acme");
        log.commit(Change::HoldPlaced { hold }, "carol", "")
            .await
            .unwrap();
        assert_eq!(
            hold::holds_covering(store.clone(), "acme", Some("2025-11"))
                .await
                .unwrap()
                .len(),
            1
        );
        let manifest = ChainReader::new(store.clone(), GOVERNANCE_TOPIC)
            .read(GOVERNANCE_PARTITION, 0)
            .await
            .unwrap()
            .0;
        let path = object_store::path::Path::from(manifest.files[0].path.as_str());
        let original = store.get(&path).await.unwrap().bytes().await.unwrap();
        let edited = String::from_utf8(original.to_vec())
            .unwrap()
            .replace("hold_placed", "hold_changed");
        store
            .put(&path, PutPayload::from(edited.into_bytes()))
            .await
            .unwrap();
        let error = log.state().await.unwrap_err().to_string();
        assert!(error.contains(manifest.files[0].path.as_str()), "{error}");
        // A shred asks the same state: it fails rather than going ahead.
        assert!(hold::holds_covering(store, "acme", None).await.is_err());
    }
}

#[cfg(test)]
mod verify_tests {
    use super::*;
    use crate::verify::{Problem, Sampling, verify_archive};
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    #[tokio::test]
    async fn verify_replays_the_changes_not_only_their_hashes() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let log = GovernanceLog::new(store.clone());
        let hold = LegalHold::new("acme", "matter-7", "Doe v. Acme");
        log.commit(Change::HoldPlaced { hold }, "carol", "")
            .await
            .unwrap();
        let release = Change::HoldReleased {
            tenant_id: "acme".into(),
            hold_id: "matter-7".into(),
        };
        log.commit(release, "carol", "").await.unwrap();
        let verify = || async {
            verify_archive(store.clone(), &Default::default(), Sampling::All, |_| {})
                .await
                .unwrap()
        };
        let report = verify().await;
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.unreferenced.is_empty(), "{:?}", report.unreferenced);

        // Someone with write access rewrites the newest change to release another hold and fixes its
        // manifest's digest (the newest manifest has no successor whose link would break).
        let reader = ChainReader::new(store.clone(), GOVERNANCE_TOPIC);
        let (mut manifest, _) = reader.read(GOVERNANCE_PARTITION, 1).await.unwrap();
        let path = object_store::path::Path::from(manifest.files[0].path.as_str());
        let text = String::from_utf8(
            store
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap()
        .replace("matter-7", "matter-8");
        manifest.files[0] = crate::manifest::ManifestFile::plaintext(
            &path,
            text.as_bytes(),
            1,
            manifest.files[0].min_occurred_micros,
        );
        store
            .put(&path, PutPayload::from(text.into_bytes()))
            .await
            .unwrap();
        let manifest_path = crate::layout::manifest_path(GOVERNANCE_TOPIC, GOVERNANCE_PARTITION, 1);
        store
            .put(
                &manifest_path,
                PutPayload::from(serde_json::to_vec(&manifest).unwrap()),
            )
            .await
            .unwrap();
        let report = verify().await;
        assert!(
            report.problems.iter().any(|problem| matches!(
                problem,
                Problem::BadGovernance { detail } if detail.contains("no hold matter-8")
            )),
            "{:?}",
            report.problems
        );
    }
}
