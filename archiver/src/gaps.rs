//! Whether offsets Kafka did not deliver may be committed as a gap.
//!
//! A manifest's `offset_gaps` say "the archive does not hold these offsets", and a committed gap is permanent:
//! the next batch starts after it. So a gap is committed only when the broker confirms that the records are
//! gone: its log-start offset has moved past them (retention deleted them before they were archived). Any
//! other jump in offsets is treated as a fetch that skipped records (a broker serving a later batch than the
//! one asked for, a consumer bug): the partition is fetched again from before the first missing offset, and after
//! [`MAX_REFETCHES`] attempts that keep skipping, it is halted with an error instead of committing the gap.
//!
//! Topics where gaps are normal (compacted topics, transactional producers whose commit markers take an
//! offset each) set `archiver.offset_gaps = "allow"`, which commits every gap as Kafka delivered it.

use crate::config::OffsetGapPolicy;

/// Fetches of the same gap before the partition is halted.
pub const MAX_REFETCHES: u32 = 3;

/// How far before the gap the first re-fetch starts (then 8 and 64 times as far).
pub const REFETCH_STEP_BACK: i64 = 64;

/// What the poll thread knows when a record arrives past the next expected offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapCheck {
    /// The next offset the open batch expects.
    pub expected: i64,
    /// The offset Kafka delivered instead.
    pub delivered: i64,
    /// The partition's log-start offset (low watermark) as the broker reports it now, or why it could not
    /// be read.
    pub log_start: Result<i64, String>,
    /// How many times this partition was already fetched again for this gap.
    pub refetches: u32,
}

/// What to do about a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapVerdict {
    /// The missing offsets are gone from the broker: record them as a gap and archive the delivered record.
    Commit,
    /// Records may still be there: seek to `from` and fetch again.
    Refetch { from: i64 },
    /// The partition keeps skipping records the broker still holds: stop consuming it.
    Halt { reason: String },
}

pub fn judge(policy: OffsetGapPolicy, check: &GapCheck) -> GapVerdict {
    if policy == OffsetGapPolicy::Allow {
        return GapVerdict::Commit;
    }
    let log_start = match &check.log_start {
        Ok(low) if *low >= check.delivered => return GapVerdict::Commit,
        Ok(low) => Ok(*low),
        Err(error) => Err(error.clone()),
    };
    if check.refetches >= MAX_REFETCHES {
        let why = match log_start {
            Ok(low) => format!(
                "the broker's log starts at offset {low}, so offsets {}..{} should still be there",
                low.max(check.expected),
                check.delivered
            ),
            Err(error) => format!("the broker's log-start offset could not be read ({error})"),
        };
        return GapVerdict::Halt {
            reason: format!(
                "Kafka skipped offsets {}..{} on {} fetches and {why}; committing them as a gap would lose them",
                check.expected,
                check.delivered,
                check.refetches + 1
            ),
        };
    }
    // Fetch again from before the gap, further back on each attempt: a broker that answers a fetch from inside
    // a record batch with the *next* batch (tansu 0.6.0 does) then serves the batch holding `expected`. The
    // poll thread skips what it re-reads below `expected`. Records below the log start are gone for good.
    let step_back = REFETCH_STEP_BACK << (3 * check.refetches.min(MAX_REFETCHES));
    let from = check.expected.saturating_sub(step_back);
    let from = match log_start {
        Ok(low) => low.max(from),
        Err(_) => from.max(0),
    };
    GapVerdict::Refetch { from }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(log_start: Result<i64, String>, refetches: u32) -> GapCheck {
        GapCheck {
            expected: 100,
            delivered: 150,
            log_start,
            refetches,
        }
    }

    #[test]
    fn a_gap_is_committed_only_when_the_log_start_passed_it() {
        let confirm = OffsetGapPolicy::Confirm;
        assert_eq!(judge(confirm, &check(Ok(150), 0)), GapVerdict::Commit);
        assert_eq!(judge(confirm, &check(Ok(400), 3)), GapVerdict::Commit);
        // The records are still in the broker: fetch again from before the gap, further back each time (the
        // tansu mid-batch fetch case).
        assert_eq!(
            judge(confirm, &check(Ok(0), 0)),
            GapVerdict::Refetch { from: 100 - 64 }
        );
        assert_eq!(
            judge(confirm, &check(Ok(0), 1)),
            GapVerdict::Refetch { from: 0 }
        );
        assert_eq!(
            judge(
                confirm,
                &GapCheck {
                    expected: 10_000,
                    delivered: 10_050,
                    log_start: Ok(0),
                    refetches: 2
                }
            ),
            GapVerdict::Refetch {
                from: 10_000 - 64 * 64
            }
        );
        // Part of the gap was deleted by retention: fetch from the log start.
        assert_eq!(
            judge(confirm, &check(Ok(120), 1)),
            GapVerdict::Refetch { from: 120 }
        );
        assert_eq!(
            judge(confirm, &check(Err("timed out".into()), 2)),
            GapVerdict::Refetch { from: 0 }
        );
        let GapVerdict::Halt { reason } = judge(confirm, &check(Ok(0), MAX_REFETCHES)) else {
            panic!("halts after the last refetch");
        };
        assert!(
            reason.contains("100..150") && reason.contains("log starts at offset 0"),
            "{reason}"
        );
        let GapVerdict::Halt { reason } =
            judge(confirm, &check(Err("timed out".into()), MAX_REFETCHES))
        else {
            panic!("halts");
        };
        assert!(reason.contains("timed out"), "{reason}");
    }

    #[test]
    fn allow_commits_every_gap() {
        assert_eq!(
            judge(OffsetGapPolicy::Allow, &check(Ok(0), 0)),
            GapVerdict::Commit
        );
    }
}
