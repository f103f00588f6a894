//! Legal holds: what a hold covers, and the question a key shred asks before destroying a key.
//!
//! A hold names a tenant and narrows what it covers by any of: conversations, custodians (people: a
//! conversation is covered when a custodian sent a message in it, was mentioned or joined it), a time range
//! of `occurred_at`, and a query (words that must all appear in the text, case-insensitive; CJK text matches
//! as substrings, so it needs no segmentation). Every given criterion must hold; a hold with none covers the
//! tenant's whole archive. Holds override every deletion and every shred.
//!
//! Holds are placed, changed and released through the governance stream ([`super`]). Before it existed a hold
//! was recorded by writing `holds/tenant=<t>/<hold id>.json` by hand (format `chatvault-hold-v1`, months in
//! `periods`); such records are still honoured. Reading fails closed: a record that cannot be read or parsed
//! counts as a hold covering everything, so a damaged hold never lets a shred through.

use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::policy::check_policy_id;
use crate::layout;
use chatvault_core::error::{Error, Result};
use chatvault_core::event::check_tenant;
use chatvault_core::time::Date;

pub const HOLD_FORMAT: &str = "chatvault-hold-v1";

/// A legal hold on some or all of a tenant's data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LegalHold {
    /// Always `chatvault-hold-v1`.
    pub format: String,
    pub hold_id: String,
    pub tenant_id: String,
    /// The matter it is for (shown when a deletion or shred is refused).
    #[serde(default)]
    pub matter: String,
    /// Only these conversations (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conversations: Vec<String>,
    /// Only conversations these people took part in (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custodians: Vec<String>,
    /// Only events that occurred in `[from_micros, to_micros)` (either end open when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_micros: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_micros: Option<i64>,
    /// Only events whose text contains every word of it (empty: any).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    /// Hand-written records only: the months (`yyyy-mm`) held; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub periods: Vec<String>,
    pub created_at_micros: i64,
    #[serde(default)]
    pub created_by: String,
    /// The governance version that placed it, and the one that last changed it (0: hand-written).
    #[serde(default)]
    pub placed_version: u64,
    #[serde(default)]
    pub version: u64,
    /// Set when the hold is released; a released hold covers nothing.
    #[serde(default)]
    pub released_at_micros: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub released_by: String,
}

/// What a hold looks at of an event.
#[derive(Debug, Clone, Copy)]
pub struct HeldFacts<'a> {
    pub conversation_id: &'a str,
    pub occurred_at_micros: i64,
    pub text: &'a str,
    /// Whether one of the hold's custodians took part in the event's conversation (the caller knows the
    /// conversation's participants; ignored when the hold names no custodians).
    pub custodian_took_part: bool,
}

impl LegalHold {
    /// A new hold of `tenant`, covering what the criteria say.
    pub fn new(tenant: &str, hold_id: &str, matter: &str) -> LegalHold {
        LegalHold {
            format: HOLD_FORMAT.into(),
            hold_id: hold_id.into(),
            tenant_id: tenant.into(),
            matter: matter.into(),
            conversations: Vec::new(),
            custodians: Vec::new(),
            from_micros: None,
            to_micros: None,
            query: String::new(),
            periods: Vec::new(),
            created_at_micros: 0,
            created_by: String::new(),
            placed_version: 0,
            version: 0,
            released_at_micros: None,
            released_by: String::new(),
        }
    }

    pub fn is_released(&self) -> bool {
        self.released_at_micros.is_some()
    }

    /// Checks what a caller may set, naming the field at fault.
    pub fn check(&self) -> Result<()> {
        check_tenant("tenant_id", &self.tenant_id)?;
        check_policy_id(&self.hold_id)?;
        if self.matter.trim().is_empty() || self.matter.len() > 1024 {
            return Err(Error::invalid_argument(
                "matter must name what the hold is for (1-1024 bytes)",
            ));
        }
        for (field, values) in [
            ("conversations", &self.conversations),
            ("custodians", &self.custodians),
        ] {
            if values.len() > 1000 {
                return Err(Error::invalid_argument(format!(
                    "{field}: at most 1000 per hold"
                )));
            }
            if let Some(bad) = values
                .iter()
                .find(|v| v.is_empty() || v.len() > 256 || v.chars().any(char::is_control))
            {
                return Err(Error::invalid_argument(format!(
                    "{field}: {bad:?} is not an id (1-256 characters, no control characters)"
                )));
            }
        }
        if let (Some(from), Some(to)) = (self.from_micros, self.to_micros)
            && from >= to
        {
            return Err(Error::invalid_argument(
                "the hold's time range is empty: from must be before to",
            ));
        }
        if self.query.len() > 1024 {
            return Err(Error::invalid_argument("query is longer than 1024 bytes"));
        }
        Ok(())
    }

    /// Whether the hold covers any of its tenant's data in `period` (`yyyy-mm`; `None`: any of it). A month's
    /// data key encrypts every conversation of the month, so only the time range and hand-written periods
    /// narrow this: a hold on one conversation refuses the shred of every month it may have events in.
    pub fn covers_period(&self, period: Option<&str>) -> bool {
        if self.is_released() {
            return false;
        }
        let Some(period) = period else {
            return true;
        };
        if !self.periods.is_empty() && !self.periods.iter().any(|p| p == period) {
            return false;
        }
        let Some((start, end)) = month_range(period) else {
            // Not a month: hold it (fail closed).
            return true;
        };
        self.from_micros.is_none_or(|from| from < end) && self.to_micros.is_none_or(|to| to > start)
    }

    /// Whether the hold covers one event of its tenant.
    pub fn covers_event(&self, event: &HeldFacts<'_>) -> bool {
        if self.is_released() {
            return false;
        }
        let at = event.occurred_at_micros;
        (self.conversations.is_empty()
            || self
                .conversations
                .iter()
                .any(|c| c == event.conversation_id))
            && (self.custodians.is_empty() || event.custodian_took_part)
            && self.from_micros.is_none_or(|from| at >= from)
            && self.to_micros.is_none_or(|to| at < to)
            && (self.periods.is_empty()
                || self
                    .periods
                    .iter()
                    .any(|p| Date::from_micros(at).month_period() == *p))
            && self.matches_query(event.text)
    }

    fn matches_query(&self, text: &str) -> bool {
        if self.query.trim().is_empty() {
            return true;
        }
        let text = text.to_lowercase();
        self.query
            .split_whitespace()
            .all(|word| text.contains(&word.to_lowercase()))
    }

    /// One line of what it covers.
    pub fn describe_coverage(&self) -> String {
        let mut parts = Vec::new();
        if !self.conversations.is_empty() {
            parts.push(format!("conversations {}", self.conversations.join(", ")));
        }
        if !self.custodians.is_empty() {
            parts.push(format!("custodians {}", self.custodians.join(", ")));
        }
        if self.from_micros.is_some() || self.to_micros.is_some() {
            let end = |micros: Option<i64>| {
                micros.map_or("…".to_string(), |m| Date::from_micros(m).iso())
            };
            parts.push(format!(
                "occurred {} to {}",
                end(self.from_micros),
                end(self.to_micros)
            ));
        }
        if !self.query.is_empty() {
            parts.push(format!("text containing {:?}", self.query));
        }
        if !self.periods.is_empty() {
            parts.push(format!("months {}", self.periods.join(", ")));
        }
        if parts.is_empty() {
            format!("all of tenant {}", self.tenant_id)
        } else {
            format!("tenant {}: {}", self.tenant_id, parts.join("; "))
        }
    }
}

/// `[start, end)` of a `yyyy-mm` month in microseconds.
fn month_range(period: &str) -> Option<(i64, i64)> {
    let start = Date::parse_iso(&format!("{period}-01"))?;
    let next = start.first_of_next_month();
    Some((start.start_micros(), next.start_micros()))
}

/// The unreleased holds on `tenant` that cover `period` (`None`: any of the tenant's data): those of the
/// governance stream and the hand-written records. A hand-written record that cannot be read or parsed is
/// returned as a hold covering everything (fail closed), its id naming the object; a governance stream that
/// does not verify fails the call.
pub async fn holds_covering(
    store: std::sync::Arc<dyn ObjectStore>,
    tenant: &str,
    period: Option<&str>,
) -> Result<Vec<LegalHold>> {
    let state = super::GovernanceLog::new(store.clone()).state().await?;
    let mut covering: Vec<LegalHold> = state
        .holds(tenant)
        .filter(|hold| hold.covers_period(period))
        .cloned()
        .collect();
    covering.extend(
        handwritten_holds(store.as_ref(), tenant)
            .await?
            .into_iter()
            .filter(|hold| hold.covers_period(period)),
    );
    Ok(covering)
}

/// The hand-written records under `holds/tenant=<tenant>/`.
async fn handwritten_holds(store: &dyn ObjectStore, tenant: &str) -> Result<Vec<LegalHold>> {
    let paths = layout::list_paths(store, &layout::holds_prefix(tenant)).await?;
    let mut holds = Vec::new();
    for path in paths {
        let parsed = match store.get(&path).await {
            Ok(fetched) => fetched
                .bytes()
                .await
                .map_err(|error| error.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<LegalHold>(&bytes).map_err(|error| error.to_string())
                }),
            Err(error) => Err(error.to_string()),
        };
        holds.push(match parsed {
            Ok(hold) if hold.tenant_id == tenant => hold,
            Ok(hold) => LegalHold {
                matter: format!("record names tenant {}, not {tenant}", hold.tenant_id),
                ..LegalHold::new(tenant, path.as_ref(), "")
            },
            Err(error) => LegalHold {
                matter: format!("unreadable hold record: {error}"),
                ..LegalHold::new(tenant, path.as_ref(), "")
            },
        });
    }
    Ok(holds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(conversation: &'a str, at: i64, text: &'a str, custodian: bool) -> HeldFacts<'a> {
        HeldFacts {
            conversation_id: conversation,
            occurred_at_micros: at,
            text,
            custodian_took_part: custodian,
        }
    }

    #[test]
    fn every_given_criterion_must_hold_and_release_ends_coverage() {
        let nov = Date::parse_iso("2025-11-10").unwrap().start_micros();
        let dec = Date::parse_iso("2025-12-10").unwrap().start_micros();
        let mut hold = LegalHold::new("acme", "matter-7", "Doe v. Acme");
        assert!(hold.covers_event(&facts("c9", nov, "", false)));
        hold.conversations = vec!["c1".into()];
        hold.to_micros = Some(Date::parse_iso("2025-12-01").unwrap().start_micros());
        hold.query = "Budget 预算".into();
        assert!(hold.covers_event(&facts("c1", nov, "the budget: 预算表", false)));
        assert!(!hold.covers_event(&facts("c1", nov, "the budget", false)));
        assert!(!hold.covers_event(&facts("c2", nov, "budget 预算", false)));
        assert!(!hold.covers_event(&facts("c1", dec, "budget 预算", false)));
        hold.custodians = vec!["u-ann".into()];
        assert!(!hold.covers_event(&facts("c1", nov, "budget 预算", false)));
        assert!(hold.covers_event(&facts("c1", nov, "budget 预算", true)));
        // A key shred cannot spare conversations: any month the range reaches is held.
        assert!(hold.covers_period(Some("2025-11")));
        assert!(!hold.covers_period(Some("2025-12")));
        assert!(hold.covers_period(None));
        hold.released_at_micros = Some(dec);
        assert!(!hold.covers_event(&facts("c1", nov, "budget 预算", true)));
        assert!(!hold.covers_period(None));
    }

    #[test]
    fn handwritten_records_keep_their_meaning() {
        let json = r#"{"format":"chatvault-hold-v1","hold_id":"matter-7","tenant_id":"acme",
            "periods":["2025-11"],"matter":"Doe v. Acme","created_at_micros":1}"#;
        let hold: LegalHold = serde_json::from_str(json).unwrap();
        assert!(hold.covers_period(Some("2025-11")));
        assert!(!hold.covers_period(Some("2025-10")));
        let nov = Date::parse_iso("2025-11-10").unwrap().start_micros();
        assert!(hold.covers_event(&facts("any", nov, "", false)));
        assert!(!hold.covers_event(&facts("any", nov - 40 * 86_400_000_000, "", false)));
    }

    #[test]
    fn checks_name_the_field_at_fault() {
        let mut hold = LegalHold::new("acme", "m1", "");
        assert!(hold.check().unwrap_err().to_string().contains("matter"));
        hold.matter = "x".into();
        hold.custodians = vec![String::new()];
        assert!(hold.check().unwrap_err().to_string().contains("custodians"));
        hold.custodians.clear();
        hold.from_micros = Some(5);
        hold.to_micros = Some(5);
        assert!(hold.check().unwrap_err().to_string().contains("time range"));
    }
}
