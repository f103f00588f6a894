//! `policy explain`: which policies and holds apply to one conversation, what the precedence rules make of
//! them, and what that means for the conversation's archived events (how many are due, when the next ones
//! become due, how many a hold keeps).

use std::collections::HashSet;
use std::sync::Arc;

use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use super::Purpose;
use super::plan::{Verdict, governance, live_files, read_rows};
use crate::file::conversation_digest;
use crate::governance::policy::{EventFacts, PolicyRef, PolicyScope, RetentionPolicy, decide};
use crate::keys::DataKeys;
use chatvault_core::error::Result;

/// The precedence rules, in the words `explain` shows them.
pub const PRECEDENCE: &[&str] = &[
    "a legal hold keeps everything it covers, whatever the policies say",
    "retention wins over deletion: nothing is deleted before the longest retention that applies ends",
    "the longest retention that applies wins",
    "of the deleting policies, the most specific scope decides (label, then conversation, then workspace, then tenant)",
    "within one scope, the shortest deletion period decides",
    "an event is due at the later of its deciding deletion and its longest retention; without a deleting policy it is never due",
];

/// What governs one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub tenant_id: String,
    pub conversation_id: String,
    /// The workspace its events name (empty when it has no archived events).
    pub workspace_id: String,
    /// How many governance changes were read.
    pub governance_changes: u64,
    pub as_of_micros: i64,
    pub events: u64,
    pub first_event_micros: Option<i64>,
    pub last_event_micros: Option<i64>,
    pub policies: Vec<PolicyApplication>,
    pub precedence: Vec<String>,
    /// What the policies decide for the conversation's oldest event.
    pub oldest_event: Option<EventDecision>,
    /// Events the policies make due at `as_of_micros` and no hold keeps.
    pub events_due: u64,
    /// Events due but kept by holds.
    pub events_held: u64,
    /// The earliest time an event not yet due becomes due.
    pub next_due_micros: Option<i64>,
    pub holds: Vec<HoldApplication>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplication {
    pub policy: RetentionPolicy,
    pub applies: bool,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDecision {
    pub occurred_at_micros: i64,
    pub retained_until_micros: Option<i64>,
    pub retained_by: Option<PolicyRef>,
    pub delete_at_micros: Option<i64>,
    pub deleted_by: Option<PolicyRef>,
    pub due_at_micros: Option<i64>,
    pub deciding_policy: Option<PolicyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldApplication {
    pub hold: String,
    pub matter: String,
    pub coverage: String,
    /// The conversation's events the hold covers.
    pub events_covered: u64,
}

/// Explains `conversation` of `tenant` at `as_of_micros` (see the module documentation): reads the files
/// holding the conversation, like a restore.
pub async fn explain(
    store: &Arc<dyn ObjectStore>,
    keys: &DataKeys,
    topic: &str,
    tenant: &str,
    conversation: &str,
    as_of_micros: i64,
) -> Result<Explanation> {
    chatvault_core::event::check_tenant("tenant_id", tenant)?;
    let mut governed = governance(store, tenant, &Purpose::Retention, as_of_micros).await?;
    let digest = conversation_digest(tenant, conversation);
    let (files, _) = live_files(store, topic, tenant).await?;
    let mut events = Vec::new();
    for live in files
        .iter()
        .filter(|live| live.file.conversation_digests.contains(&digest))
    {
        let (rows, _) = read_rows(store, keys, &live.file).await?;
        events.extend(
            rows.into_iter()
                .map(|row| row.record)
                .filter(|event| event.conversation_id == conversation),
        );
    }
    // Who took part, for custodian holds: this conversation's own events are all that matter.
    let mut took_part: HashSet<String> = HashSet::new();
    for event in &events {
        if let Some(sender) = &event.sender {
            took_part.insert(sender.id.clone());
        }
        took_part.extend(event.mentions.iter().cloned());
    }
    governed.judge.set_participants(conversation, took_part);
    let workspace = events
        .first()
        .map(|event| event.workspace_id.clone())
        .unwrap_or_default();
    let policies: Vec<RetentionPolicy> = governed.judge.policies().to_vec();
    let mut explanation = Explanation {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        workspace_id: workspace.clone(),
        governance_changes: governed.changes,
        as_of_micros,
        events: events.len() as u64,
        first_event_micros: events.iter().map(|e| e.occurred_at_micros).min(),
        last_event_micros: events.iter().map(|e| e.occurred_at_micros).max(),
        policies: policies
            .iter()
            .map(|policy| {
                let (applies, why) = match &policy.scope {
                    PolicyScope::Tenant => (true, "applies to the whole tenant".to_string()),
                    PolicyScope::Workspace(id) if *id == workspace => {
                        (true, format!("the conversation is in workspace {id}"))
                    }
                    PolicyScope::Workspace(id) => {
                        (false, format!("the conversation is not in workspace {id}"))
                    }
                    PolicyScope::Conversation(id) if id == conversation => {
                        (true, "names this conversation".to_string())
                    }
                    PolicyScope::Conversation(_) => (false, "names another conversation".into()),
                    PolicyScope::Label(name) => (
                        false,
                        format!("applies to events labelled {name}; no archived event carries labels yet"),
                    ),
                };
                PolicyApplication {
                    policy: policy.clone(),
                    applies,
                    why,
                }
            })
            .collect(),
        precedence: PRECEDENCE.iter().map(|rule| rule.to_string()).collect(),
        oldest_event: None,
        events_due: 0,
        events_held: 0,
        next_due_micros: None,
        holds: governed
            .judge
            .holds()
            .iter()
            .map(|hold| HoldApplication {
                hold: format!("{}@{}", hold.hold_id, hold.version),
                matter: hold.matter.clone(),
                coverage: hold.describe_coverage(),
                events_covered: 0,
            })
            .collect(),
    };
    if let Some(oldest) = events.iter().min_by_key(|event| event.occurred_at_micros) {
        let decision = decide(&policies, &facts(oldest));
        explanation.oldest_event = Some(EventDecision {
            occurred_at_micros: oldest.occurred_at_micros,
            retained_until_micros: decision.retained_until.as_ref().map(|(at, _)| *at),
            retained_by: decision.retained_until.as_ref().map(|(_, by)| by.clone()),
            delete_at_micros: decision.delete_at.as_ref().map(|(at, _)| *at),
            deleted_by: decision.delete_at.as_ref().map(|(_, by)| by.clone()),
            due_at_micros: decision.due_at(),
            deciding_policy: decision.deciding_policy().cloned(),
        });
    }
    for event in &events {
        for (index, hold) in governed.judge.holds().iter().enumerate() {
            if governed.judge.hold_covers(hold, event) {
                explanation.holds[index].events_covered += 1;
            }
        }
        match governed.judge.verdict(event) {
            Verdict::Remove(_) => explanation.events_due += 1,
            Verdict::Held(_) => explanation.events_held += 1,
            Verdict::Keep => {
                if let Some(due) = decide(&policies, &facts(event)).due_at() {
                    explanation.next_due_micros = Some(
                        explanation
                            .next_due_micros
                            .map_or(due, |next| next.min(due)),
                    );
                }
            }
        }
    }
    Ok(explanation)
}

fn facts(event: &chatvault_proto::v1::ChatEvent) -> EventFacts<'_> {
    EventFacts {
        workspace_id: &event.workspace_id,
        conversation_id: &event.conversation_id,
        labels: &[],
        occurred_at_micros: event.occurred_at_micros,
    }
}
