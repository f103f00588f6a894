//! The poll thread's state machine and the commit lanes, against a fake [`Broker`] and the stages of
//! [`crate::test_support`] (an in-memory store and a dead-letter recorder): no librdkafka.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatvault_archive::chain::{ChainWriter, Commit};
use chatvault_archive::manifest::{ChainHead, MANIFEST_FORMAT, Manifest};
use chatvault_proto::v1::ChatEvent;
use prost::Message as _;

use super::*;
use crate::config::ArchiverConfig;
use crate::error::BrokerError;
use crate::test_support::{TOPIC, TestStages};

#[derive(Debug, Default)]
struct BrokerLog {
    paused: BTreeSet<i32>,
    seeks: Vec<(i32, Option<i64>)>,
    hints: BTreeMap<i32, i64>,
    log_start: i64,
    high_watermarks: BTreeMap<i32, i64>,
}

#[derive(Clone, Default)]
struct FakeBroker(Arc<Mutex<BrokerLog>>);

impl FakeBroker {
    fn log(&self) -> std::sync::MutexGuard<'_, BrokerLog> {
        self.0.lock().expect("broker log")
    }
}

impl Broker for FakeBroker {
    fn pause(&self, partition: i32) -> std::result::Result<(), BrokerError> {
        self.log().paused.insert(partition);
        Ok(())
    }
    fn resume(&self, partition: i32) -> std::result::Result<(), BrokerError> {
        self.log().paused.remove(&partition);
        Ok(())
    }
    fn seek(&self, partition: i32, offset: Option<i64>) -> std::result::Result<(), BrokerError> {
        self.log().seeks.push((partition, offset));
        Ok(())
    }
    fn watermarks(&self, partition: i32) -> std::result::Result<(i64, i64), BrokerError> {
        let log = self.log();
        let high = log
            .high_watermarks
            .get(&partition)
            .copied()
            .unwrap_or(i64::MAX);
        Ok((log.log_start, high))
    }
    fn end_offsets(&self) -> std::result::Result<BTreeMap<i32, i64>, BrokerError> {
        Ok(self.log().high_watermarks.clone())
    }
    fn commit_offset_hint(&self, partition: i32, end_offset: i64) {
        self.log().hints.insert(partition, end_offset);
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    broker: FakeBroker,
    poller: Poller<FakeBroker>,
    harness: TestStages,
}

impl Fixture {
    fn new(config: ArchiverConfig) -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let harness = TestStages::new();
        let stages = harness.stages.clone();
        let broker = FakeBroker::default();
        let (alive, _) = tokio::sync::mpsc::channel(1);
        let poller = Poller::new(PollerParts {
            broker: broker.clone(),
            runtime: runtime.handle().clone(),
            config,
            on_shutdown: OnShutdown::StopConsuming,
            chain: stages.chain.clone(),
            shutdown: stages.shutdown.clone(),
            abandon: stages.abandon.clone(),
            stats: harness.stats.clone(),
            stages,
            alive,
            view: Arc::default(),
        });
        Fixture {
            runtime,
            broker,
            poller,
            harness,
        }
    }

    /// Applies reports and runs housekeeping until `done` holds (or fails the test after 20 s).
    fn pump_until(&mut self, what: &str, done: impl Fn(&Fixture) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            self.poller.wait_feedback(Duration::from_millis(20));
            self.poller.housekeeping();
        }
    }

    /// What librdkafka's rebalance callback does: assigns the partitions paused, then queues the change.
    fn assign(&mut self, partitions: Vec<i32>) {
        self.broker.log().paused.extend(partitions.iter().copied());
        self.poller.on_rebalance(Rebalance::Assigned(partitions));
    }

    fn phase(&self, partition: i32) -> Option<Phase> {
        self.poller
            .partitions
            .get(&partition)
            .map(|owned| owned.phase)
    }

    fn head(&self, partition: i32) -> Option<ChainHead> {
        self.poller
            .partitions
            .get(&partition)
            .map(|owned| owned.head.clone())
    }

    fn feed(&mut self, partition: i32, offsets: std::ops::Range<i64>) {
        for offset in offsets {
            let payload = event(partition, offset).encode_to_vec();
            self.poller.on_record(Record {
                partition,
                offset,
                key: None,
                payload: &payload,
                traceparent: None,
            });
        }
    }

    fn stored_head(&self, partition: i32) -> ChainHead {
        let store = self.harness.object_store();
        self.runtime
            .block_on(ChainWriter::new(store, TOPIC).reader().head(partition))
            .expect("chain head")
    }
}

fn event(partition: i32, offset: i64) -> ChatEvent {
    ChatEvent {
        tenant_id: "acme".into(),
        conversation_id: format!("c{partition}"),
        event_id: format!("e{partition}-{offset}"),
        occurred_at_micros: 1_764_547_200_000_000 + offset,
        ..Default::default()
    }
}

fn config() -> ArchiverConfig {
    ArchiverConfig {
        max_batch_events: 5,
        max_batch_age: Duration::from_millis(60_000),
        max_pending_batches: 4,
        stall_timeout: Duration::from_millis(300),
        ..ArchiverConfig::default()
    }
}

#[test]
fn assigned_partitions_load_their_heads_off_the_poll_thread_and_commit_in_order() {
    let mut fixture = Fixture::new(config());
    fixture.assign(vec![0, 1]);
    // Nothing is fetched before the head is known.
    assert_eq!(fixture.phase(0), Some(Phase::Loading { retry_at: None }));
    assert!(fixture.poller.partitions[&0].paused);
    fixture.pump_until("both partitions consume", |f| {
        f.phase(0) == Some(Phase::Consuming) && f.phase(1) == Some(Phase::Consuming)
    });
    {
        let log = fixture.broker.log();
        assert!(log.seeks.contains(&(0, None)) && log.seeks.contains(&(1, None)));
        assert!(
            log.paused.is_empty(),
            "resumed once sought: {:?}",
            log.paused
        );
    }
    fixture.feed(0, 0..10);
    fixture.feed(1, 0..5);
    fixture.pump_until("both partitions are committed", |f| {
        f.head(0).map(|h| h.end_offset) == Some(10) && f.head(1).map(|h| h.end_offset) == Some(5)
    });
    assert_eq!(fixture.stored_head(0).next_seq, 2);
    assert_eq!(fixture.stored_head(1).next_seq, 1);
    assert_eq!(
        fixture.broker.log().hints,
        BTreeMap::from([(0, 10), (1, 5)])
    );
    assert_eq!(
        fixture
            .harness
            .stats
            .committed_events
            .load(Ordering::Relaxed),
        15
    );
    assert!(fixture.harness.stats.heads.is_archived(0, 9));
    assert!(fixture.harness.dead_letters.copies().is_empty());
}

#[test]
fn a_failing_partition_backs_off_and_stalls_while_the_others_commit_then_recovers() {
    let mut fixture = Fixture::new(config());
    fixture.harness.store.fail_puts_containing(Some("/p00000-"));
    fixture.assign(vec![0, 1]);
    fixture.pump_until("both partitions consume", |f| {
        f.phase(0) == Some(Phase::Consuming) && f.phase(1) == Some(Phase::Consuming)
    });
    fixture.feed(0, 0..5);
    fixture.feed(1, 0..5);
    fixture.pump_until("partition 1 is committed", |f| {
        f.head(1).map(|h| h.end_offset) == Some(5)
    });
    fixture.pump_until("partition 0 backs off, paused", |f| {
        matches!(f.phase(0), Some(Phase::BackingOff { .. })) && f.broker.log().paused.contains(&0)
    });
    assert!(
        fixture
            .harness
            .stats
            .released_batches
            .load(Ordering::Relaxed)
            >= 1
    );
    fixture.pump_until("partition 0 is reported stalled", |f| {
        f.harness.stats.stalled_now.load(Ordering::Relaxed) == 1
    });
    let reason = fixture
        .harness
        .stats
        .unready_reason()
        .expect("not ready while stalled");
    assert!(reason.contains("1 stalled"), "{reason}");
    assert_eq!(
        fixture.stored_head(0).next_seq,
        0,
        "nothing of partition 0 committed"
    );

    // Storage heals: after its backoff the partition is loaded again, sought to its head, and consumed.
    fixture.harness.store.fail_puts_containing(None);
    let seeks_before = fixture.broker.log().seeks.len();
    fixture.pump_until("partition 0 consumes again", |f| {
        f.phase(0) == Some(Phase::Consuming) && f.broker.log().seeks.len() > seeks_before
    });
    assert_eq!(fixture.broker.log().seeks.last(), Some(&(0, None)));
    fixture.feed(0, 0..5);
    fixture.pump_until("partition 0 is committed and no longer stalled", |f| {
        f.head(0).map(|h| h.end_offset) == Some(5)
            && f.harness.stats.stalled_now.load(Ordering::Relaxed) == 0
    });
    assert_eq!(fixture.harness.stats.unready_reason(), None);
}

#[test]
fn a_broken_chain_halts_its_partition_instead_of_retrying_forever() {
    let mut fixture = Fixture::new(config());
    // Manifest 1 without manifest 0: the chain cannot be trusted.
    let store = fixture.harness.object_store();
    let bogus = Manifest {
        format: MANIFEST_FORMAT.into(),
        topic: TOPIC.into(),
        partition: 0,
        seq: 1,
        start_offset: 5,
        end_offset: 10,
        batch_id: "bogus".into(),
        writer_id: "someone".into(),
        created_at_micros: 1,
        prev_sha256: "00".repeat(32),
        files: Vec::new(),
        rejected_records: Vec::new(),
        offset_gaps: Vec::new(),
        supersedes: Vec::new(),
    };
    let committed = fixture
        .runtime
        .block_on(ChainWriter::new(store, TOPIC).commit(&bogus))
        .expect("commit");
    assert!(matches!(committed, Commit::Committed { .. }));
    fixture.assign(vec![0, 1]);
    fixture.pump_until("partition 0 halts and partition 1 consumes", |f| {
        f.phase(0) == Some(Phase::Halted) && f.phase(1) == Some(Phase::Consuming)
    });
    fixture.poller.housekeeping();
    assert!(fixture.broker.log().paused.contains(&0));
    assert_eq!(fixture.harness.stats.halted_now.load(Ordering::Relaxed), 1);
    assert_eq!(
        fixture
            .harness
            .stats
            .halted_partitions
            .load(Ordering::Relaxed),
        1
    );
    assert!(fixture.harness.stats.unready_reason().is_some());
    // Records of the halted partition are not archived.
    fixture.feed(0, 0..5);
    fixture.poller.housekeeping();
    assert!(fixture.poller.partitions[&0].open.is_empty());
}

#[test]
fn a_fenced_batch_rereads_the_head_and_continues_after_the_winner() {
    let mut fixture = Fixture::new(config());
    fixture.assign(vec![0]);
    fixture.pump_until("partition 0 consumes", |f| {
        f.phase(0) == Some(Phase::Consuming)
    });
    // Another writer (a zombie owner) commits sequence number 0 for offsets 0..3 first.
    let store = fixture.harness.object_store();
    let winner = Manifest {
        format: MANIFEST_FORMAT.into(),
        topic: TOPIC.into(),
        partition: 0,
        seq: 0,
        start_offset: 0,
        end_offset: 3,
        batch_id: "winner".into(),
        writer_id: "other-writer".into(),
        created_at_micros: 1,
        prev_sha256: String::new(),
        files: Vec::new(),
        rejected_records: Vec::new(),
        offset_gaps: Vec::new(),
        supersedes: Vec::new(),
    };
    fixture
        .runtime
        .block_on(ChainWriter::new(store, TOPIC).commit(&winner))
        .expect("commit");
    fixture.feed(0, 0..5);
    fixture.pump_until("partition 0 is sought to the winner's end", |f| {
        f.broker.log().seeks.contains(&(0, Some(3))) && f.phase(0) == Some(Phase::Consuming)
    });
    assert_eq!(
        fixture.harness.stats.fenced_batches.load(Ordering::Relaxed),
        1
    );
    fixture.feed(0, 3..8);
    fixture.pump_until("the next batch continues the winner's chain", |f| {
        f.head(0).map(|h| h.end_offset) == Some(8)
    });
    let head = fixture.stored_head(0);
    assert_eq!((head.next_seq, head.end_offset), (2, 8));
}

#[test]
fn a_refetch_from_before_the_gap_skips_what_is_archived_instead_of_halting() {
    let mut fixture = Fixture::new(ArchiverConfig {
        max_batch_events: 100,
        ..config()
    });
    fixture.assign(vec![0]);
    fixture.pump_until("partition 0 consumes", |f| {
        f.phase(0) == Some(Phase::Consuming)
    });
    fixture.feed(0, 0..100);
    fixture.pump_until("the first 100 are committed", |f| {
        f.head(0).map(|h| h.end_offset) == Some(100)
    });
    // The broker serves 150 where 100 was asked for (a later record batch), while its log starts at 0.
    fixture.feed(0, 150..151);
    assert_eq!(
        fixture.broker.log().seeks.last(),
        Some(&(0, Some(100 - crate::gaps::REFETCH_STEP_BACK)))
    );
    // The re-fetch starts before the archived end: those records are skipped, not taken for a recreated topic.
    fixture.feed(0, 36..151);
    assert_eq!(fixture.phase(0), Some(Phase::Consuming));
    let open = &fixture.poller.partitions[&0].open;
    assert_eq!((open.start_offset, open.end_offset), (100, 151));
    assert_eq!(open.events.len(), 51);
    assert!(open.offset_gaps.is_empty());
}

/// A partition whose consumer starts below the chain head although Kafka holds the records past it (the seek
/// to the head did not hold): the archived records are skipped and the partition sought to the head again. A
/// partition that now ends before the chain (a recreated topic) is halted.
#[test]
fn records_below_the_head_are_skipped_unless_the_partition_ends_before_it() {
    let mut fixture = Fixture::new(config());
    fixture.assign(vec![0, 1]);
    fixture.pump_until("both partitions consume", |f| {
        f.phase(0) == Some(Phase::Consuming) && f.phase(1) == Some(Phase::Consuming)
    });
    fixture.feed(0, 0..10);
    fixture.feed(1, 0..10);
    fixture.pump_until("both are committed up to 10", |f| {
        f.head(0).map(|h| h.end_offset) == Some(10) && f.head(1).map(|h| h.end_offset) == Some(10)
    });
    fixture.broker.log().high_watermarks = BTreeMap::from([(0, 20), (1, 3)]);

    // Partition 0 still holds its records past the head: a position below it is a seek that did not hold.
    fixture.feed(0, 0..4);
    assert_eq!(fixture.phase(0), Some(Phase::Consuming));
    assert_eq!(fixture.broker.log().seeks.last(), Some(&(0, Some(10))));
    fixture.feed(0, 4..13);
    let open = &fixture.poller.partitions[&0].open;
    assert_eq!((open.start_offset, open.end_offset), (10, 13));
    assert_eq!(
        open.events.len(),
        3,
        "archived records skipped, the next ones taken"
    );
    assert!(open.offset_gaps.is_empty());

    // Partition 1 now ends at 3, before the archived 10: the topic was recreated.
    fixture.feed(1, 0..1);
    assert_eq!(fixture.phase(1), Some(Phase::Halted));
    assert_eq!(
        fixture
            .harness
            .stats
            .halted_partitions
            .load(Ordering::Relaxed),
        1
    );
}
