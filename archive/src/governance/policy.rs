//! Retention policies and how they decide an event's fate.
//!
//! A policy applies to a tenant's events through its scope: the whole tenant, a workspace, a conversation, or a
//! classification label (events carry a label list; until classification lands it is empty, so label policies
//! match nothing yet). It can retain (keep at least `retain_days` after the event occurred), delete (remove
//! `delete_after_days` after it occurred), or both (retain, then delete: `delete_after_days >= retain_days`).
//! Ages count from `occurred_at`, the source's timestamp.
//!
//! **Precedence**, when several policies apply to one event (after Microsoft Purview's principles of
//! retention, so that a compliance team finds what it knows):
//! 1. Retention wins over deletion: an event is never deleted while any applicable policy retains it.
//! 2. The longest retention wins.
//! 3. Of the deleting policies, the most specific scope decides: label, then conversation, then workspace, then
//!    tenant; within the same scope the shortest deletion period wins.
//!
//! So an event is due for deletion at `max(deletion date of the deciding policy, longest retention date)`, and
//! never when no applicable policy deletes. Legal holds override all of this (see [`super::hold`]).

use serde::{Deserialize, Serialize};

use chatvault_core::error::{Error, Result};
use chatvault_core::event::check_tenant;

/// A microsecond count of one day.
pub const DAY_MICROS: i64 = 86_400_000_000;
/// The longest period a policy may name (100 years).
pub const MAX_DAYS: u32 = 36_500;

/// What a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum PolicyScope {
    Tenant,
    Workspace(String),
    Conversation(String),
    Label(String),
}

impl PolicyScope {
    /// Rank in the deletion precedence: higher is more specific.
    pub fn specificity(&self) -> u8 {
        match self {
            PolicyScope::Tenant => 0,
            PolicyScope::Workspace(_) => 1,
            PolicyScope::Conversation(_) => 2,
            PolicyScope::Label(_) => 3,
        }
    }

    /// `tenant`, `workspace:<id>`, `conversation:<id>` or `label:<name>`.
    pub fn describe(&self) -> String {
        match self {
            PolicyScope::Tenant => "tenant".into(),
            PolicyScope::Workspace(id) => format!("workspace:{id}"),
            PolicyScope::Conversation(id) => format!("conversation:{id}"),
            PolicyScope::Label(name) => format!("label:{name}"),
        }
    }

    /// Parses [`PolicyScope::describe`]'s form.
    pub fn parse(text: &str) -> Result<PolicyScope> {
        let scope = match text.split_once(':') {
            None if text == "tenant" => PolicyScope::Tenant,
            Some(("workspace", id)) => PolicyScope::Workspace(id.into()),
            Some(("conversation", id)) => PolicyScope::Conversation(id.into()),
            Some(("label", name)) => PolicyScope::Label(name.into()),
            _ => {
                return Err(Error::invalid_argument(format!(
                    "scope {text:?} is not tenant, workspace:<id>, conversation:<id> or label:<name>"
                )));
            }
        };
        scope.check()?;
        Ok(scope)
    }

    fn check(&self) -> Result<()> {
        let id = match self {
            PolicyScope::Tenant => return Ok(()),
            PolicyScope::Workspace(id) | PolicyScope::Conversation(id) | PolicyScope::Label(id) => {
                id
            }
        };
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
            return Err(Error::invalid_argument(format!(
                "scope {}: the id must be 1-256 characters without control characters",
                self.describe()
            )));
        }
        Ok(())
    }

    pub fn matches(&self, event: &EventFacts<'_>) -> bool {
        match self {
            PolicyScope::Tenant => true,
            PolicyScope::Workspace(id) => id == event.workspace_id,
            PolicyScope::Conversation(id) => id == event.conversation_id,
            PolicyScope::Label(name) => event.labels.iter().any(|label| label == name),
        }
    }
}

/// A retention policy of one tenant. `version`, `set_at_micros` and `set_by` are filled in by the
/// governance state when the change that set it is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub tenant_id: String,
    /// Chosen by whoever sets it; setting the same id again replaces the policy (a new version).
    pub policy_id: String,
    pub scope: PolicyScope,
    /// Keep events at least this many days after they occurred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_days: Option<u32>,
    /// Delete events this many days after they occurred (unless retained or held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_after_days: Option<u32>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub set_at_micros: i64,
    #[serde(default)]
    pub set_by: String,
}

impl RetentionPolicy {
    /// `retain-for`, `delete-after` or `retain-then-delete`.
    pub fn action(&self) -> &'static str {
        match (self.retain_days, self.delete_after_days) {
            (Some(_), Some(_)) => "retain-then-delete",
            (Some(_), None) => "retain-for",
            _ => "delete-after",
        }
    }

    /// One line: id, version, scope and terms.
    pub fn describe(&self) -> String {
        let mut terms = Vec::new();
        if let Some(days) = self.retain_days {
            terms.push(format!("retain {days} d"));
        }
        if let Some(days) = self.delete_after_days {
            terms.push(format!("delete after {days} d"));
        }
        format!(
            "{} v{} ({}, {}: {})",
            self.policy_id,
            self.version,
            self.scope.describe(),
            self.action(),
            terms.join(", ")
        )
    }

    /// Checks what a caller may set, naming the field at fault.
    pub fn check(&self) -> Result<()> {
        check_tenant("tenant_id", &self.tenant_id)?;
        check_policy_id(&self.policy_id)?;
        self.scope.check()?;
        for (field, days) in [
            ("retain_days", self.retain_days),
            ("delete_after_days", self.delete_after_days),
        ] {
            if let Some(days) = days
                && !(1..=MAX_DAYS).contains(&days)
            {
                return Err(Error::invalid_argument(format!(
                    "{field} {days} is outside 1..={MAX_DAYS}"
                )));
            }
        }
        match (self.retain_days, self.delete_after_days) {
            (None, None) => Err(Error::invalid_argument(
                "a policy needs retain_days, delete_after_days or both",
            )),
            (Some(retain), Some(delete)) if delete < retain => {
                Err(Error::invalid_argument(format!(
                    "delete_after_days {delete} is shorter than retain_days {retain}: a retain-then-delete \
                     policy deletes only after its retention"
                )))
            }
            _ if self.description.len() > 1024 => Err(Error::invalid_argument(
                "description is longer than 1024 bytes",
            )),
            _ => Ok(()),
        }
    }
}

/// Policy and hold ids: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn check_policy_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "id {id:?} must match [a-z0-9][a-z0-9._-]{{0,63}}"
        )))
    }
}

/// What a policy decision looks at of an event.
#[derive(Debug, Clone, Copy)]
pub struct EventFacts<'a> {
    pub workspace_id: &'a str,
    pub conversation_id: &'a str,
    pub labels: &'a [String],
    pub occurred_at_micros: i64,
}

/// Which policy decided what, as `(policy id, version)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub policy_id: String,
    pub version: u64,
}

impl PolicyRef {
    fn of(policy: &RetentionPolicy) -> PolicyRef {
        PolicyRef {
            policy_id: policy.policy_id.clone(),
            version: policy.version,
        }
    }
}

/// What the policies decide for one event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// The longest retention: kept at least until then, by that policy.
    pub retained_until: Option<(i64, PolicyRef)>,
    /// The deletion date of the deciding deleting policy (before retention is applied).
    pub delete_at: Option<(i64, PolicyRef)>,
}

impl Decision {
    /// When the event becomes due for deletion (`None`: never): the deciding deletion, postponed to the end
    /// of the longest retention.
    pub fn due_at(&self) -> Option<i64> {
        let (delete_at, _) = self.delete_at.as_ref()?;
        Some(match &self.retained_until {
            Some((until, _)) => (*delete_at).max(*until),
            None => *delete_at,
        })
    }

    /// Whether the event is due for deletion at `now_micros` (holds not considered).
    pub fn is_due(&self, now_micros: i64) -> bool {
        self.due_at().is_some_and(|due| due <= now_micros)
    }

    /// The policy that makes the event due: the deleting one, or the retention that postponed it to its end.
    pub fn deciding_policy(&self) -> Option<&PolicyRef> {
        let (delete_at, deleting) = self.delete_at.as_ref()?;
        match &self.retained_until {
            Some((until, retaining)) if until > delete_at => Some(retaining),
            _ => Some(deleting),
        }
    }
}

/// Applies the precedence rules of the module documentation: `policies` are all of the event's tenant's.
pub fn decide<'p>(
    policies: impl IntoIterator<Item = &'p RetentionPolicy>,
    event: &EventFacts<'_>,
) -> Decision {
    let at = |days: u32| {
        event
            .occurred_at_micros
            .saturating_add(i64::from(days) * DAY_MICROS)
    };
    let mut decision = Decision::default();
    // (specificity, days) of the deleting policy chosen so far.
    let mut deciding: Option<(u8, u32)> = None;
    for policy in policies
        .into_iter()
        .filter(|policy| policy.scope.matches(event))
    {
        if let Some(days) = policy.retain_days {
            let until = at(days);
            if decision
                .retained_until
                .as_ref()
                .is_none_or(|(best, _)| until > *best)
            {
                decision.retained_until = Some((until, PolicyRef::of(policy)));
            }
        }
        if let Some(days) = policy.delete_after_days {
            let rank = policy.scope.specificity();
            let better = match deciding {
                None => true,
                Some((best_rank, best_days)) => {
                    rank > best_rank || (rank == best_rank && days < best_days)
                }
            };
            if better {
                deciding = Some((rank, days));
                decision.delete_at = Some((at(days), PolicyRef::of(policy)));
            }
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        id: &str,
        scope: PolicyScope,
        retain: Option<u32>,
        delete: Option<u32>,
    ) -> RetentionPolicy {
        RetentionPolicy {
            tenant_id: "acme".into(),
            policy_id: id.into(),
            scope,
            retain_days: retain,
            delete_after_days: delete,
            description: String::new(),
            version: 1,
            set_at_micros: 0,
            set_by: String::new(),
        }
    }

    fn event<'a>(labels: &'a [String]) -> EventFacts<'a> {
        EventFacts {
            workspace_id: "w1",
            conversation_id: "c1",
            labels,
            occurred_at_micros: 0,
        }
    }

    #[test]
    fn retention_wins_over_deletion_and_the_longest_retention_wins() {
        let policies = [
            policy("keep-1y", PolicyScope::Tenant, Some(365), None),
            policy(
                "keep-7y",
                PolicyScope::Workspace("w1".into()),
                Some(2555),
                None,
            ),
            policy(
                "drop-30d",
                PolicyScope::Conversation("c1".into()),
                None,
                Some(30),
            ),
        ];
        let decision = decide(&policies, &event(&[]));
        assert_eq!(
            decision.retained_until.as_ref().unwrap().1.policy_id,
            "keep-7y"
        );
        assert_eq!(decision.delete_at.as_ref().unwrap().1.policy_id, "drop-30d");
        assert_eq!(decision.due_at(), Some(2555 * DAY_MICROS));
        assert_eq!(decision.deciding_policy().unwrap().policy_id, "keep-7y");
        assert!(!decision.is_due(2554 * DAY_MICROS));
        assert!(decision.is_due(2555 * DAY_MICROS));
    }

    #[test]
    fn the_most_specific_deletion_decides_and_within_a_scope_the_shortest() {
        let labels = vec!["pii".to_string()];
        let policies = [
            policy("tenant-7d", PolicyScope::Tenant, None, Some(7)),
            policy(
                "conv-90d",
                PolicyScope::Conversation("c1".into()),
                None,
                Some(90),
            ),
            policy(
                "conv-60d",
                PolicyScope::Conversation("c1".into()),
                None,
                Some(60),
            ),
            policy(
                "other-1d",
                PolicyScope::Conversation("c2".into()),
                None,
                Some(1),
            ),
        ];
        let decision = decide(&policies, &event(&[]));
        assert_eq!(decision.delete_at.as_ref().unwrap().1.policy_id, "conv-60d");
        assert_eq!(decision.due_at(), Some(60 * DAY_MICROS));
        let mut with_label = policies.to_vec();
        with_label.push(policy(
            "pii-400d",
            PolicyScope::Label("pii".into()),
            None,
            Some(400),
        ));
        let decision = decide(&with_label, &event(&labels));
        assert_eq!(decision.delete_at.as_ref().unwrap().1.policy_id, "pii-400d");
        // A label policy matches nothing without the label.
        let decision = decide(&with_label, &event(&[]));
        assert_eq!(decision.delete_at.as_ref().unwrap().1.policy_id, "conv-60d");
    }

    #[test]
    fn without_a_deleting_policy_nothing_is_ever_due() {
        let policies = [policy("keep", PolicyScope::Tenant, Some(10), None)];
        let decision = decide(&policies, &event(&[]));
        assert_eq!(decision.due_at(), None);
        assert!(!decision.is_due(i64::MAX));
        assert_eq!(decide(&[], &event(&[])), Decision::default());
    }

    #[test]
    fn checks_name_the_field_at_fault() {
        let error = |p: RetentionPolicy| p.check().unwrap_err().to_string();
        assert!(error(policy("x", PolicyScope::Tenant, None, None)).contains("needs retain_days"));
        assert!(
            error(policy("x", PolicyScope::Tenant, Some(30), Some(7)))
                .contains("shorter than retain_days")
        );
        assert!(error(policy("x", PolicyScope::Tenant, Some(0), None)).contains("retain_days 0"));
        assert!(error(policy("Bad Id", PolicyScope::Tenant, Some(1), None)).contains("must match"));
        assert!(
            error(policy(
                "x",
                PolicyScope::Workspace(String::new()),
                Some(1),
                None
            ))
            .contains("workspace:")
        );
        assert!(
            policy("x", PolicyScope::Tenant, Some(7), Some(7))
                .check()
                .is_ok()
        );
        assert_eq!(
            PolicyScope::parse("conversation:c:1").unwrap(),
            PolicyScope::Conversation("c:1".into())
        );
        assert!(PolicyScope::parse("team:x").is_err());
    }
}
