//! Legal holds, as far as erasure needs them: the seam `chatvault keys shred` asks before destroying a key.
//!
//! A hold is a JSON record at `holds/tenant=<t>/<hold id>.json` ([`LegalHold`]). Placing, listing and
//! releasing holds (and retention) are the governance issue's work; until then a hold is recorded by writing
//! that record, and this module only reads them. It fails closed: a record it cannot read or parse counts as
//! a hold covering everything, so a damaged hold never lets a shred through.

use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::layout;
use chatvault_core::error::Result;

/// A legal hold on a tenant's data, or on some of its months.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LegalHold {
    /// Always `chatvault-hold-v1`.
    pub format: String,
    pub hold_id: String,
    pub tenant_id: String,
    /// The months (`yyyy-mm`) held; empty: all of the tenant's data.
    #[serde(default)]
    pub periods: Vec<String>,
    /// The matter it is for (shown when a shred is refused).
    #[serde(default)]
    pub matter: String,
    pub created_at_micros: i64,
    /// Set when the hold is released; a released hold covers nothing.
    #[serde(default)]
    pub released_at_micros: Option<i64>,
}

impl LegalHold {
    /// Whether the hold covers `period` of its tenant (`None`: any of its data).
    pub fn covers(&self, period: Option<&str>) -> bool {
        if self.released_at_micros.is_some() {
            return false;
        }
        match period {
            Some(period) => self.periods.is_empty() || self.periods.iter().any(|p| p == period),
            None => true,
        }
    }
}

/// The unreleased holds on `tenant` that cover `period` (`None`: any of the tenant's data). A record that
/// cannot be read or parsed is returned as a hold covering everything (fail closed), its id naming the object.
pub async fn holds_covering(
    store: &dyn ObjectStore,
    tenant: &str,
    period: Option<&str>,
) -> Result<Vec<LegalHold>> {
    let paths = layout::list_paths(store, &layout::holds_prefix(tenant)).await?;
    let mut covering = Vec::new();
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
        let hold = match parsed {
            Ok(hold) if hold.tenant_id == tenant => hold,
            Ok(hold) => LegalHold {
                matter: format!("record names tenant {}, not {tenant}", hold.tenant_id),
                ..unreadable(&path, tenant)
            },
            Err(error) => LegalHold {
                matter: format!("unreadable hold record: {error}"),
                ..unreadable(&path, tenant)
            },
        };
        if hold.covers(period) {
            covering.push(hold);
        }
    }
    Ok(covering)
}

fn unreadable(path: &object_store::path::Path, tenant: &str) -> LegalHold {
    LegalHold {
        format: "chatvault-hold-v1".into(),
        hold_id: path.to_string(),
        tenant_id: tenant.to_string(),
        periods: Vec::new(),
        matter: String::new(),
        created_at_micros: 0,
        released_at_micros: None,
    }
}
