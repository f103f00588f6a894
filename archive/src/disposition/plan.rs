//! Making a disposition plan: which rows of which live files a purpose removes, decided with one governance
//! version ([`Judge`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::{ConversationCounts, PLAN_FORMAT, PolicyCount, Purpose};
use crate::ArchivedEvent;
use crate::chain::ChainReader;
use crate::file::{decode_file, sha256_hex};
use crate::governance::GovernanceLog;
use crate::governance::hold::{HeldFacts, LegalHold, holds_covering};
use crate::governance::locks::LockRules;
use crate::governance::policy::{EventFacts, PolicyRef, RetentionPolicy, decide};
use crate::keys::DataKeys;
use crate::manifest::ManifestFile;
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_proto::v1::ChatEvent;

/// A reviewed-before-applied list of exactly what a disposition removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Always `chatvault-disposition-plan-v1`.
    pub format: String,
    /// The plan's sequence number on the `_disposition` stream (set when it is committed).
    pub plan_id: u64,
    pub tenant_id: String,
    #[serde(flatten)]
    pub purpose: Purpose,
    /// The data stream (topic) whose chains the plan read.
    pub topic: String,
    /// The instant retention is evaluated at.
    pub as_of_micros: i64,
    /// How many governance changes the plan read (the governance version it decided with is this minus
    /// one); apply refuses when the stream has moved.
    pub governance_changes: u64,
    /// The holds that applied (governance holds and hand-written records), as `id@version`.
    pub holds: Vec<String>,
    pub planned_by: String,
    pub planned_at_micros: i64,
    pub reason: String,
    /// Per partition, the chain's next sequence number when it was read.
    pub heads: Vec<PlannedHead>,
    /// The files that lose rows, in chain order.
    pub files: Vec<PlannedFile>,
    pub conversations: Vec<ConversationCounts>,
    pub totals: Totals,
    /// With Object Lock: the key scopes' months whose shredding makes the locked planned files unreadable
    /// now ([`super::locks::note_storage_locks`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shred_offers: Vec<super::locks::ShredOffer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedHead {
    pub partition: i32,
    pub next_seq: u64,
}

/// One live file that loses rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    pub partition: i32,
    /// The manifest that committed it.
    pub seq: u64,
    pub path: String,
    pub sha256: String,
    pub rows: u64,
    /// Rows removed, as half-open `[start, end)` ranges of row numbers in file order.
    pub remove: Vec<[u64; 2]>,
    pub rows_removed: u64,
    /// S3 Object Lock keeps the object until then (`storage.object_lock`): applying takes its rows out of
    /// every restore, and its bytes stay until the date ([`super::locks::note_storage_locks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_micros: Option<i64>,
}

impl PlannedFile {
    /// Every row goes: the file is superseded without a replacement.
    pub fn is_deleted(&self) -> bool {
        self.rows_removed == self.rows
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Live files of the tenant read.
    pub files_read: u64,
    pub rows_read: u64,
    pub files_deleted: u64,
    pub files_rewritten: u64,
    pub rows_removed: u64,
    pub rows_held: u64,
}

/// What a [`Judge`] decides for one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// The purpose removes it (retention: by this policy).
    Remove(Option<PolicyRef>),
    /// The purpose targets it, but these holds keep it.
    Held(Vec<String>),
}

/// Decides rows for one purpose with one governance version.
#[derive(Debug, Clone)]
pub struct Judge {
    purpose: Purpose,
    as_of_micros: i64,
    policies: Vec<RetentionPolicy>,
    holds: Vec<LegalHold>,
    /// Conversation → the users who took part (sent anything, joined, left, were mentioned), when a hold names
    /// custodians.
    participants: HashMap<String, HashSet<String>>,
}

impl Judge {
    pub fn verdict(&self, event: &ChatEvent) -> Verdict {
        let targeted = match &self.purpose {
            Purpose::Retention => {
                let decision = decide(
                    &self.policies,
                    &EventFacts {
                        workspace_id: &event.workspace_id,
                        conversation_id: &event.conversation_id,
                        labels: &[],
                        occurred_at_micros: event.occurred_at_micros,
                    },
                );
                decision
                    .is_due(self.as_of_micros)
                    .then(|| decision.deciding_policy().cloned())
            }
            Purpose::Erasure {
                subject,
                authored,
                mentioning,
            } => {
                let by = *authored && event.sender.as_ref().is_some_and(|s| &s.id == subject);
                let of = *mentioning && event.mentions.iter().any(|m| m == subject);
                (by || of).then_some(None)
            }
        };
        let Some(policy) = targeted else {
            return Verdict::Keep;
        };
        let holding: Vec<String> = self
            .holds
            .iter()
            .filter(|hold| self.hold_covers(hold, event))
            .map(|hold| hold.hold_id.clone())
            .collect();
        if holding.is_empty() {
            Verdict::Remove(policy)
        } else {
            Verdict::Held(holding)
        }
    }

    /// Whether `hold` covers `event`, custodians judged by who took part in its conversation.
    pub fn hold_covers(&self, hold: &LegalHold, event: &ChatEvent) -> bool {
        let participants = self.participants.get(&event.conversation_id);
        hold.covers_event(&HeldFacts {
            conversation_id: &event.conversation_id,
            occurred_at_micros: event.occurred_at_micros,
            text: &event.text,
            custodian_took_part: participants
                .is_some_and(|took_part| hold.custodians.iter().any(|c| took_part.contains(c))),
        })
    }

    pub fn policies(&self) -> &[RetentionPolicy] {
        &self.policies
    }

    /// The unreleased holds of the tenant.
    pub fn holds(&self) -> &[LegalHold] {
        &self.holds
    }

    /// Who took part in `conversation` (replacing what was learned of it).
    pub fn set_participants(&mut self, conversation: &str, took_part: HashSet<String>) {
        self.participants
            .insert(conversation.to_string(), took_part);
    }

    /// The Object Lock rules of `tenant` with this judge's policies, holds and participants.
    pub fn lock_rules(&self, tenant: &str) -> LockRules {
        LockRules::for_tenant(
            tenant,
            &self.policies,
            &self.holds,
            Some(self.participants.clone()),
        )
    }

    fn needs_participants(&self) -> bool {
        self.holds.iter().any(|hold| !hold.custodians.is_empty())
    }
}

/// The governance a plan decides with: the number of changes, the judge, and the holds as `id@version`.
pub(crate) struct Governance {
    pub changes: u64,
    pub judge: Judge,
    pub holds: Vec<String>,
}

/// Reads the governance stream and the hand-written holds of `tenant` for `purpose` at `as_of_micros`.
pub(crate) async fn governance(
    store: &Arc<dyn ObjectStore>,
    tenant: &str,
    purpose: &Purpose,
    as_of_micros: i64,
) -> Result<Governance> {
    let state = GovernanceLog::new(store.clone()).state().await?;
    let holds = holds_covering(store.clone(), tenant, None).await?;
    let mut hold_names: Vec<String> = holds
        .iter()
        .map(|hold| format!("{}@{}", hold.hold_id, hold.version))
        .collect();
    hold_names.sort();
    Ok(Governance {
        changes: state.version.map_or(0, |version| version + 1),
        judge: Judge {
            purpose: purpose.clone(),
            as_of_micros,
            policies: state.policies(tenant).cloned().collect(),
            holds,
            participants: HashMap::new(),
        },
        holds: hold_names,
    })
}

/// A live file of the tenant and the manifest that committed it.
pub(crate) struct LiveFile {
    pub partition: i32,
    pub seq: u64,
    pub file: ManifestFile,
}

/// The tenant's live files in every chain of `topic`, with each chain's head; fails when a chain does not
/// verify (nothing is planned or applied on an archive that does not).
pub(crate) async fn live_files(
    store: &Arc<dyn ObjectStore>,
    topic: &str,
    tenant: &str,
) -> Result<(Vec<LiveFile>, Vec<PlannedHead>)> {
    let reader = ChainReader::new(store.clone(), topic);
    let mut files = Vec::new();
    let mut heads = Vec::new();
    for partition in reader.partitions().await? {
        let chain = reader.chain_files(partition).await;
        if let Some(error) = chain.error {
            return Err(error.context("no disposition on an archive whose chains do not verify"));
        }
        heads.push(PlannedHead {
            partition,
            next_seq: chain.head.next_seq,
        });
        files.extend(
            chain
                .live
                .into_iter()
                .filter(|(_, file)| file.tenant_id == tenant)
                .map(|(seq, file)| LiveFile {
                    partition,
                    seq,
                    file,
                }),
        );
    }
    Ok((files, heads))
}

/// Fetches a committed file, checks its SHA-256 and decodes every row (off the async workers).
pub(crate) async fn read_rows(
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    file: &ManifestFile,
) -> Result<(Vec<ArchivedEvent>, crate::keys::DataKey)> {
    let key = keys
        .get_for_file(
            &file.tenant_id,
            &file.key_scope,
            &file.key_period,
            &file.dek_id,
        )
        .await
        .map_err(|error| error.context(format!("archive file {} needs its data key", file.path)))?;
    let bytes = match store
        .get(&object_store::path::Path::from(file.path.as_str()))
        .await
    {
        Ok(found) => found.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(Error::internal(format!(
                "committed archive file {} is missing",
                file.path
            )));
        }
        Err(error) => return Err(error.into()),
    };
    let expected = file.sha256.clone();
    let path = file.path.clone();
    let tenant = file.tenant_id.clone();
    let decode_key = key.clone();
    let rows = tokio::task::spawn_blocking(move || {
        if sha256_hex(&bytes) != expected {
            return Err(Error::internal(format!(
                "archive file {path} was altered: its SHA-256 differs from its manifest's"
            )));
        }
        let rows = decode_file(bytes, &decode_key, None)
            .map_err(|error| error.context(format!("decoding archive file {path}")))?;
        if rows.iter().any(|row| row.record.tenant_id != tenant) {
            return Err(Error::internal(format!(
                "archive file {path} of tenant {tenant} holds another tenant's events"
            )));
        }
        Ok(rows)
    })
    .await
    .map_err(|error| Error::internal(format!("decoding task failed: {error}")))??;
    Ok((rows, key))
}

/// Fills in who took part in which conversation, when a hold names custodians (one more read of every file).
pub(crate) async fn learn_participants(
    judge: &mut Judge,
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    files: &[LiveFile],
) -> Result<()> {
    if !judge.needs_participants() {
        return Ok(());
    }
    for live in files {
        let (rows, _) = read_rows(store, keys, &live.file).await?;
        for row in rows {
            let took_part = judge
                .participants
                .entry(row.record.conversation_id.clone())
                .or_default();
            if let Some(sender) = &row.record.sender {
                took_part.insert(sender.id.clone());
            }
            took_part.extend(row.record.mentions.iter().cloned());
        }
    }
    Ok(())
}

/// Row decisions of one file: the removed rows as ranges, and per conversation what was removed and held.
pub(crate) struct FileDecision {
    pub remove: Vec<[u64; 2]>,
    pub rows_removed: u64,
    pub rows_held: u64,
    pub conversations: BTreeMap<String, ConversationTally>,
}

#[derive(Default)]
pub(crate) struct ConversationTally {
    removed: u64,
    held: u64,
    policies: BTreeMap<PolicyRef, u64>,
    holds: BTreeSet<String>,
}

pub(crate) fn decide_rows(judge: &Judge, rows: &[ArchivedEvent]) -> FileDecision {
    let mut decision = FileDecision {
        remove: Vec::new(),
        rows_removed: 0,
        rows_held: 0,
        conversations: BTreeMap::new(),
    };
    for (index, row) in rows.iter().enumerate() {
        let verdict = judge.verdict(&row.record);
        if verdict == Verdict::Keep {
            continue;
        }
        let tally = decision
            .conversations
            .entry(row.record.conversation_id.clone())
            .or_default();
        match verdict {
            Verdict::Keep => {}
            Verdict::Remove(policy) => {
                let index = index as u64;
                match decision.remove.last_mut() {
                    Some(range) if range[1] == index => range[1] += 1,
                    _ => decision.remove.push([index, index + 1]),
                }
                decision.rows_removed += 1;
                tally.removed += 1;
                if let Some(policy) = policy {
                    *tally.policies.entry(policy).or_default() += 1;
                }
            }
            Verdict::Held(holds) => {
                decision.rows_held += 1;
                tally.held += 1;
                tally.holds.extend(holds);
            }
        }
    }
    decision
}

/// Whether row `index` is in `ranges` (sorted, disjoint).
pub(crate) fn in_ranges(ranges: &[[u64; 2]], index: u64) -> bool {
    let at = ranges.partition_point(|range| range[1] <= index);
    ranges.get(at).is_some_and(|range| range[0] <= index)
}

/// Who asks for a plan, why, and when its retention is evaluated.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub tenant_id: String,
    pub purpose: Purpose,
    pub topic: String,
    pub as_of_micros: i64,
    pub planned_by: String,
    pub reason: String,
}

/// Reads the tenant's archive and decides every row (see the module documentation). Changes nothing; the
/// caller commits the plan ([`super::DispositionLog::commit_plan`]). `progress` is called after each file
/// with (files read, files to read).
pub async fn make_plan(
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    request: PlanRequest,
    mut progress: impl FnMut(u64, u64),
) -> Result<Plan> {
    request.purpose.check()?;
    chatvault_core::event::check_tenant("tenant_id", &request.tenant_id)?;
    let Governance {
        changes,
        mut judge,
        holds,
    } = governance(
        store,
        &request.tenant_id,
        &request.purpose,
        request.as_of_micros,
    )
    .await?;
    if request.purpose == Purpose::Retention
        && !judge
            .policies
            .iter()
            .any(|policy| policy.delete_after_days.is_some())
    {
        return Err(Error::new(
            ErrorCode::Conflict,
            format!(
                "tenant {} has no policy that deletes anything (chatvault policy list): there is nothing to plan",
                request.tenant_id
            ),
        ));
    }
    let (files, heads) = live_files(store, &request.topic, &request.tenant_id).await?;
    learn_participants(&mut judge, store, keys, &files).await?;
    let mut plan = Plan {
        format: PLAN_FORMAT.into(),
        plan_id: 0,
        tenant_id: request.tenant_id,
        purpose: request.purpose,
        topic: request.topic,
        as_of_micros: request.as_of_micros,
        governance_changes: changes,
        holds,
        planned_by: request.planned_by,
        planned_at_micros: chatvault_core::time::now_micros(),
        reason: request.reason,
        heads,
        files: Vec::new(),
        conversations: Vec::new(),
        totals: Totals::default(),
        shred_offers: Vec::new(),
    };
    let mut conversations: BTreeMap<String, ConversationTally> = BTreeMap::new();
    let total = files.len() as u64;
    for (done, live) in files.iter().enumerate() {
        let (rows, _) = read_rows(store, keys, &live.file).await?;
        plan.totals.files_read += 1;
        plan.totals.rows_read += rows.len() as u64;
        let decision = decide_rows(&judge, &rows);
        plan.totals.rows_held += decision.rows_held;
        for (conversation, tally) in decision.conversations {
            let total = conversations.entry(conversation).or_default();
            total.removed += tally.removed;
            total.held += tally.held;
            for (policy, rows) in tally.policies {
                *total.policies.entry(policy).or_default() += rows;
            }
            total.holds.extend(tally.holds);
        }
        if decision.rows_removed > 0 {
            let planned = PlannedFile {
                partition: live.partition,
                seq: live.seq,
                path: live.file.path.clone(),
                sha256: live.file.sha256.clone(),
                rows: rows.len() as u64,
                remove: decision.remove,
                rows_removed: decision.rows_removed,
                locked_until_micros: None,
            };
            plan.totals.rows_removed += planned.rows_removed;
            if planned.is_deleted() {
                plan.totals.files_deleted += 1;
            } else {
                plan.totals.files_rewritten += 1;
            }
            plan.files.push(planned);
        }
        progress(done as u64 + 1, total);
    }
    plan.conversations = conversations
        .into_iter()
        .map(|(conversation_id, tally)| ConversationCounts {
            conversation_id,
            rows_removed: tally.removed,
            rows_held: tally.held,
            policies: tally
                .policies
                .into_iter()
                .map(|(policy, rows)| PolicyCount { policy, rows })
                .collect(),
            holds: tally.holds.into_iter().collect(),
        })
        .collect();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_answer_membership() {
        let ranges = [[0, 2], [5, 6], [9, 12]];
        let inside: Vec<u64> = (0..14).filter(|i| in_ranges(&ranges, *i)).collect();
        assert_eq!(inside, vec![0, 1, 5, 9, 10, 11]);
        assert!(!in_ranges(&[], 0));
    }
}
