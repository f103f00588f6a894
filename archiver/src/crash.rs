//! Crash points for the crash-safety tests.
//!
//! When the environment variable `CHATVAULT_CRASH_AT` is `<point>` or `<point>:<n>`, the process aborts
//! (no cleanup, like `kill -9`) the n-th time (default: first) it reaches that point. Points:
//! - `mid_batch`: a record was added to an open batch;
//! - `after_upload`: a batch's files are uploaded, its manifest not yet committed;
//! - `after_commit`: the manifest is committed, the Kafka offset not yet stored.
//!
//! Unset (the normal case) this costs one relaxed atomic load per call.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct CrashPlan {
    point: String,
    at_hit: u64,
    hits: AtomicU64,
}

static PLAN: OnceLock<Option<CrashPlan>> = OnceLock::new();

fn plan() -> &'static Option<CrashPlan> {
    PLAN.get_or_init(|| {
        let spec = std::env::var("CHATVAULT_CRASH_AT").ok()?;
        let (point, at_hit) = match spec.split_once(':') {
            Some((point, count)) => (point.to_string(), count.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some(CrashPlan {
            point,
            at_hit: at_hit.max(1),
            hits: AtomicU64::new(0),
        })
    })
}

/// Aborts the process if the configured crash point is `point` and this is its n-th hit.
pub fn crash_point(point: &str) {
    if let Some(plan) = plan()
        && plan.point == point
        && plan.hits.fetch_add(1, Ordering::Relaxed) + 1 == plan.at_hit
    {
        eprintln!("chatvault: crash point {point} reached, aborting (CHATVAULT_CRASH_AT)");
        std::process::abort();
    }
}
