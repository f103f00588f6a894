//! What an archiver tells the rest of the process while it runs: counters of committed work (tests and
//! benchmarks wait on them), the committed chain heads (standalone acknowledges an event only once it is
//! archived), and its health (halted and stalled partitions, for `/readyz`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct ArchiverStats {
    pub committed_batches: AtomicU64,
    pub committed_events: AtomicU64,
    pub committed_records: AtomicU64,
    pub committed_files: AtomicU64,
    pub committed_bytes: AtomicU64,
    /// Batches given up because another writer committed their sequence number (or the partition moved).
    pub fenced_batches: AtomicU64,
    /// Batches handed back to Kafka after repeated transient failures: their partition backs off and
    /// consumes them again from its chain head.
    pub released_batches: AtomicU64,
    /// Partitions halted (ever): Kafka's offsets fell behind the archive, a gap the broker does not confirm,
    /// or a manifest chain that fails verification.
    pub halted_partitions: AtomicU64,
    /// Owned partitions halted right now.
    pub halted_now: AtomicU64,
    /// Owned partitions with records to archive and no progress for `archiver.stall_timeout`, right now.
    pub stalled_now: AtomicU64,
    /// When the first record was consumed (microseconds since the epoch; 0 before), so throughput can be
    /// measured without the consumer-group join.
    pub first_record_micros: AtomicI64,
    /// The end offset of every partition's chain as this archiver committed (or found) it.
    pub heads: CommittedHeads,
}

impl ArchiverStats {
    /// Why this archiver is not ready, if it is not: a partition it owns is halted or stalled. Both need an
    /// operator (or storage back); readiness makes them visible to the orchestrator and to dashboards.
    pub fn unready_reason(&self) -> Option<String> {
        let halted = self.halted_now.load(Ordering::Relaxed);
        let stalled = self.stalled_now.load(Ordering::Relaxed);
        match (halted, stalled) {
            (0, 0) => None,
            _ => Some(format!(
                "{halted} owned partition(s) halted and {stalled} stalled (records to archive, no commit \
                 for archiver.stall_timeout); see the archiver's error log"
            )),
        }
    }
}

/// The committed chain head (end offset) of each partition this archiver committed to or resumed from, and a
/// way to wait until an offset is archived. Standalone acknowledges an event to its sender only once it is
/// archived, since its Kafka dies with the process (see `cli/src/roles.rs`).
#[derive(Debug, Default)]
pub struct CommittedHeads {
    ends: Mutex<HashMap<i32, i64>>,
    changed: tokio::sync::Notify,
}

impl CommittedHeads {
    /// Records that `partition` is committed up to `end_offset` (exclusive); heads never move back.
    pub fn advance(&self, partition: i32, end_offset: i64) {
        {
            let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
            let end = ends.entry(partition).or_insert(end_offset);
            *end = (*end).max(end_offset);
        }
        self.changed.notify_waiters();
    }

    /// Whether `offset` of `partition` is committed.
    pub fn is_archived(&self, partition: i32, offset: i64) -> bool {
        let ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        ends.get(&partition).is_some_and(|end| *end > offset)
    }

    /// Waits until `offset` of `partition` is committed; false when `timeout` passed first.
    pub async fn wait_archived(&self, partition: i32, offset: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so an advance between the check and the wait is not missed.
            changed.as_mut().enable();
            if self.is_archived(partition, offset) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.is_archived(partition, offset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn waiting_for_an_offset_ends_when_a_commit_covers_it() {
        let heads = Arc::new(CommittedHeads::default());
        assert!(!heads.wait_archived(0, 5, Duration::from_millis(20)).await);
        let waiter = {
            let heads = heads.clone();
            tokio::spawn(async move { heads.wait_archived(0, 5, Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        heads.advance(0, 5); // covers offsets below 5 only
        heads.advance(1, 100); // another partition
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        heads.advance(0, 6);
        assert!(waiter.await.expect("waiter"));
        heads.advance(0, 3); // never moves back
        assert!(heads.is_archived(0, 5));
    }

    #[test]
    fn readiness_names_halted_and_stalled_partitions() {
        let stats = ArchiverStats::default();
        assert_eq!(stats.unready_reason(), None);
        stats.stalled_now.store(2, Ordering::Relaxed);
        let reason = stats.unready_reason().expect("not ready");
        assert!(
            reason.contains("0 owned partition(s) halted and 2 stalled"),
            "{reason}"
        );
    }
}
