//! What S3 Object Lock asks of each archived object (`storage.object_lock`), from the governance state.
//!
//! - **Retain-until**: the longest retention any policy gives an event of the object
//!   ([`super::policy::decide`]'s `retained_until`); an object of several events carries the latest date. Deletion
//!   policies set no date: they are what disposition enforces, not what storage must refuse.
//! - **Legal hold flag**: set when an unreleased hold may cover an event of the object. Conversation, time
//!   range and query criteria are judged exactly; a hold that names custodians is judged by the
//!   conversation's participants when the caller knows them ([`LockRules::for_tenant`], as disposition
//!   does) and is otherwise taken to cover (the archiver sees one batch, not who took part before): the flag
//!   only ever blocks a deletion, so erring towards it keeps what may be evidence.
//!
//! A manifest's lock is the union of its files' locks: the chain link that names a file lives as long as
//! the file. Key records, the governance stream, the transparency log and audit files are written without a
//! lock: a data key must stay destroyable for crypto-shredding, and the streams are tamper-evident by their
//! signed checkpoints.
//!
//! Locks are set when an object is written. A hold placed later, a hold released, or a policy that
//! lengthens retention is carried to the objects already written by [`crate::disposition::locks::sync_locks`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatvault_core::error::Result;
use chatvault_core::object_lock::ObjectLock;
use chatvault_proto::v1::ChatEvent;
use tokio::sync::Mutex;

use super::hold::{HeldFacts, LegalHold};
use super::policy::{EventFacts, RetentionPolicy, decide};
use super::{GovernanceLog, GovernanceState};

/// One governance state, ready to judge events' locks.
#[derive(Debug, Clone, Default)]
pub struct LockRules {
    tenants: Arc<HashMap<String, TenantRules>>,
}

#[derive(Debug, Clone, Default)]
struct TenantRules {
    policies: Vec<RetentionPolicy>,
    /// Unreleased holds only.
    holds: Vec<LegalHold>,
    /// Conversation → who took part; `None`: unknown (custodian holds then cover).
    participants: Option<HashMap<String, HashSet<String>>>,
}

impl LockRules {
    /// Every tenant's policies and unreleased holds in `state`; custodians unknown.
    pub fn new(state: &GovernanceState) -> LockRules {
        let tenants = state
            .tenants()
            .map(|tenant| {
                let rules = TenantRules {
                    policies: state.policies(tenant).cloned().collect(),
                    holds: state.holds(tenant).cloned().collect(),
                    participants: None,
                };
                (tenant.to_string(), rules)
            })
            .collect();
        LockRules {
            tenants: Arc::new(tenants),
        }
    }

    /// One tenant's rules, with custodian holds judged by `participants` (conversation → users who took
    /// part) when given, as disposition knows them.
    pub fn for_tenant(
        tenant: &str,
        policies: &[RetentionPolicy],
        holds: &[LegalHold],
        participants: Option<HashMap<String, HashSet<String>>>,
    ) -> LockRules {
        let rules = TenantRules {
            policies: policies.to_vec(),
            holds: holds
                .iter()
                .filter(|hold| !hold.is_released())
                .cloned()
                .collect(),
            participants,
        };
        LockRules {
            tenants: Arc::new(HashMap::from([(tenant.to_string(), rules)])),
        }
    }

    /// The lock one event asks of the object it is written to.
    pub fn for_event(&self, event: &ChatEvent) -> ObjectLock {
        let Some(rules) = self.tenants.get(&event.tenant_id) else {
            return ObjectLock::default();
        };
        let decision = decide(
            &rules.policies,
            &EventFacts {
                workspace_id: &event.workspace_id,
                conversation_id: &event.conversation_id,
                labels: &[],
                occurred_at_micros: event.occurred_at_micros,
            },
        );
        ObjectLock {
            retain_until_micros: decision.retained_until.map(|(until, _)| until),
            legal_hold: rules
                .holds
                .iter()
                .any(|hold| rules.hold_may_cover(hold, event)),
        }
    }

    /// The union of the locks of `events`.
    pub fn for_events<'e>(&self, events: impl IntoIterator<Item = &'e ChatEvent>) -> ObjectLock {
        events
            .into_iter()
            .fold(ObjectLock::default(), |lock, event| {
                lock.union(self.for_event(event))
            })
    }
}

impl TenantRules {
    fn hold_may_cover(&self, hold: &LegalHold, event: &ChatEvent) -> bool {
        let custodian_took_part = hold.custodians.is_empty()
            || match &self.participants {
                None => true,
                Some(participants) => participants
                    .get(&event.conversation_id)
                    .is_some_and(|took_part| hold.custodians.iter().any(|c| took_part.contains(c))),
            };
        hold.covers_event(&HeldFacts {
            conversation_id: &event.conversation_id,
            occurred_at_micros: event.occurred_at_micros,
            text: &event.text,
            custodian_took_part,
        })
    }
}

/// How long the archiver trusts the governance state it read before reading it again. A policy or hold
/// changed within this window reaches the objects written meanwhile through [`crate::disposition::locks::sync_locks`].
pub const LOCK_RULES_REFRESH: Duration = Duration::from_secs(30);

/// When the governance stream cannot be read, how long an older state may still be used (a storage blip
/// must not stop archiving); after that, batches fail and are retried rather than written with locks that
/// may be stale.
pub const LOCK_RULES_MAX_AGE: Duration = Duration::from_secs(600);

/// The archiver's cached view of the governance stream, for writing locks.
#[derive(Debug)]
pub struct LockRulesSource {
    log: GovernanceLog,
    cached: Mutex<Option<(Instant, LockRules)>>,
}

impl LockRulesSource {
    pub fn new(log: GovernanceLog) -> LockRulesSource {
        LockRulesSource {
            log,
            cached: Mutex::new(None),
        }
    }

    /// The rules of the newest governance state, read again when older than [`LOCK_RULES_REFRESH`].
    pub async fn rules(&self) -> Result<LockRules> {
        let mut cached = self.cached.lock().await;
        if let Some((read_at, rules)) = cached.as_ref()
            && read_at.elapsed() < LOCK_RULES_REFRESH
        {
            return Ok(rules.clone());
        }
        match self.log.state().await {
            Ok(state) => {
                let rules = LockRules::new(&state);
                *cached = Some((Instant::now(), rules.clone()));
                Ok(rules)
            }
            Err(error) => match cached.as_ref() {
                Some((read_at, rules)) if read_at.elapsed() < LOCK_RULES_MAX_AGE => {
                    tracing::warn!(%error, age_s = read_at.elapsed().as_secs(),
                        "the governance stream cannot be read: writing Object Locks from the state read before");
                    Ok(rules.clone())
                }
                _ => Err(error.context(
                    "Object Lock needs the governance state (policies and holds) to lock new objects",
                )),
            },
        }
    }
}
