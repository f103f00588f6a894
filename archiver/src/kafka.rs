//! librdkafka glue: the consumer's context (rebalances and statistics), [`Broker`] over the consumer, the
//! poll loop, and leaving the group.
//!
//! The rebalance callback runs inside `poll` on the poll thread. It only (un)assigns, pausing every newly
//! assigned partition, and queues a [`Rebalance`] for the [`Poller`], which reads the chain heads on the
//! runtime: the callback never waits for storage, so a slow or broken bucket cannot stall the consumer's
//! group membership.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use chatvault_archive::kind::RecordKind;

use crate::error::BrokerError;
use crate::poller::{Broker, OwnedView, Poller, Rebalance, Record};

pub(crate) type ArchiverConsumer = BaseConsumer<ArchiverContext>;

pub(crate) struct ArchiverContext {
    /// The consumed topic (the lag gauge is per topic).
    pub topic: String,
    pub rebalances: Arc<Mutex<Vec<Rebalance>>>,
    pub view: Arc<Mutex<OwnedView>>,
}

impl ArchiverContext {
    fn queue(&self, rebalance: Rebalance) {
        self.rebalances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rebalance);
    }
}

impl ClientContext for ArchiverContext {
    /// librdkafka's statistics (every `statistics.interval.ms`, delivered during poll): publishes each owned
    /// partition's lag as the records past what is durably archived, that is the last stable offset (or the
    /// high watermark) minus the manifest chain head's end offset. Kafka's committed offset is only a hint
    /// here, so it is not used.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let heads = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .heads
            .clone();
        let mut lag = BTreeMap::new();
        for topic in statistics.topics.values() {
            for (partition, head_end) in &heads {
                let Some(stats) = topic.partitions.get(partition) else {
                    continue;
                };
                let end = if stats.ls_offset >= 0 {
                    stats.ls_offset
                } else {
                    stats.hi_offset
                };
                if end >= 0 {
                    lag.insert(*partition, end - head_end);
                }
            }
        }
        chatvault_core::metrics::metrics().replace_consumer_lag(&self.topic, lag);
    }
}

impl ConsumerContext for ArchiverContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        assignment: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<i32> = assignment
            .elements()
            .iter()
            .map(|element| element.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let result = if cooperative {
                    consumer.incremental_assign(assignment)
                } else {
                    consumer.assign(assignment)
                };
                if let Err(error) = result {
                    tracing::error!(%error, "assigning partitions failed");
                    return;
                }
                // Nothing is fetched until the poller knows the chain head and seeks there.
                if let Err(error) = consumer.pause(assignment) {
                    tracing::error!(%error, "pausing newly assigned partitions failed");
                }
                self.queue(Rebalance::Assigned(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.queue(Rebalance::Revoked(partitions));
                let result = if cooperative {
                    consumer.incremental_unassign(assignment)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.queue(Rebalance::Lost);
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::debug!(%error, "Kafka offset hint commit failed");
        }
    }
}

/// [`Broker`] over the archiver's consumer.
pub(crate) struct KafkaBroker {
    pub consumer: Arc<ArchiverConsumer>,
    pub topic: String,
}

const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

impl KafkaBroker {
    fn one(&self, partition: i32) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition);
        list
    }
}

impl Broker for KafkaBroker {
    fn pause(&self, partition: i32) -> Result<(), BrokerError> {
        self.consumer
            .pause(&self.one(partition))
            .map_err(|error| BrokerError::new("pause", partition, error))
    }

    fn resume(&self, partition: i32) -> Result<(), BrokerError> {
        self.consumer
            .resume(&self.one(partition))
            .map_err(|error| BrokerError::new("resume", partition, error))
    }

    fn seek(&self, partition: i32, offset: Option<i64>) -> Result<(), BrokerError> {
        let offset = offset.map_or(Offset::Beginning, Offset::Offset);
        self.consumer
            .seek(&self.topic, partition, offset, BROKER_TIMEOUT)
            .map_err(|error| BrokerError::new("seek", partition, error))
    }

    fn watermarks(&self, partition: i32) -> Result<(i64, i64), BrokerError> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT)
            .map_err(|error| BrokerError::new("watermarks", partition, error))
    }

    fn end_offsets(&self) -> Result<BTreeMap<i32, i64>, BrokerError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), BROKER_TIMEOUT)
            .map_err(|error| BrokerError::new("metadata", -1, error))?;
        let mut ends = BTreeMap::new();
        for topic in metadata.topics().iter().filter(|t| t.name() == self.topic) {
            for partition in topic.partitions() {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(&self.topic, partition.id(), BROKER_TIMEOUT)
                    .map_err(|error| BrokerError::new("watermarks", partition.id(), error))?;
                ends.insert(partition.id(), high);
            }
        }
        Ok(ends)
    }

    fn commit_offset_hint(&self, partition: i32, end_offset: i64) {
        let mut offsets = TopicPartitionList::new();
        if offsets
            .add_partition_offset(&self.topic, partition, Offset::Offset(end_offset))
            .is_ok()
            && let Err(error) = self.consumer.commit(&offsets, CommitMode::Async)
        {
            tracing::debug!(%error, "storing the Kafka offset hint failed");
        }
    }
}

/// How the poll thread ended.
pub(crate) struct PollExit {
    /// `Err` (with [`crate::OnShutdown::DrainTopic`]): what could not be archived before the deadline.
    pub outcome: Result<(), String>,
    /// The committed heads of the partitions owned at the end, to commit to Kafka when leaving.
    pub durable: Vec<(i32, i64)>,
}

/// The poll loop: polls Kafka, applies queued rebalances and reports, feeds records, does housekeeping, and
/// steps through shutdown once it is requested.
pub(crate) fn poll_loop<K: RecordKind>(
    mut poller: Poller<KafkaBroker, K>,
    rebalances: Arc<Mutex<Vec<Rebalance>>>,
) -> PollExit {
    let poll_timeout = Duration::from_millis(50);
    // Age-based sealing, retries and health scan every owned partition, so they run on a tick rather than
    // after every record.
    let housekeeping_interval = Duration::from_millis(50);
    let mut last_housekeeping = Instant::now();
    let consumer = poller.broker().consumer.clone();
    let take_rebalances = |poller: &mut Poller<KafkaBroker, K>| {
        let queued = std::mem::take(&mut *rebalances.lock().unwrap_or_else(|p| p.into_inner()));
        for rebalance in queued {
            poller.on_rebalance(rebalance);
        }
    };
    loop {
        if poller.shutdown_requested()
            && let Some(outcome) = poller.shutdown_step()
        {
            take_rebalances(&mut poller);
            return PollExit {
                outcome,
                durable: poller.durable_offsets(),
            };
        }
        let polled = consumer.poll(poll_timeout);
        // A rebalance served inside this poll comes before the message it returned.
        take_rebalances(&mut poller);
        poller.drain_feedback();
        match polled {
            Some(Ok(message)) => poller.on_record(record(&message)),
            Some(Err(error)) => tracing::warn!(%error, "consumer error"),
            None => {}
        }
        if last_housekeeping.elapsed() >= housekeeping_interval {
            last_housekeeping = Instant::now();
            poller.housekeeping();
        }
    }
}

fn record<'a>(message: &'a BorrowedMessage<'_>) -> Record<'a> {
    Record {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key(),
        payload: message.payload().unwrap_or_default(),
        traceparent: traceparent_header(message),
    }
}

/// The record's W3C `traceparent` header, set by the gateway when traces are on.
fn traceparent_header<'a>(message: &'a BorrowedMessage<'_>) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == "traceparent")
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
}

/// Commits the Kafka offsets of the committed chain heads (a hint for other consumers and lag monitoring; the
/// manifest chain stays authoritative) and closes the consumer, which leaves the group so its partitions move
/// to the other members at once instead of after the session timeout. Both block on the broker: they run on a
/// thread of their own and are abandoned after `timeout` (the coordinator then drops this member by itself).
pub(crate) async fn leave_group(
    consumer: ArchiverConsumer,
    topic: &str,
    durable: Vec<(i32, i64)>,
    timeout: Duration,
) {
    let mut offsets = TopicPartitionList::new();
    for (partition, end_offset) in &durable {
        if let Err(error) =
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*end_offset))
        {
            tracing::warn!(partition, %error, "could not name an offset to commit");
        }
    }
    let (closed, is_closed) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("archiver-close".into())
        .spawn(move || {
            if offsets.count() > 0 {
                match consumer.commit(&offsets, CommitMode::Sync) {
                    Ok(()) => tracing::info!(?durable, "committed the Kafka offsets of the archived records"),
                    Err(error) => tracing::warn!(%error, "committing the final Kafka offsets failed; the manifest chain is authoritative anyway"),
                }
            }
            // Dropping the consumer closes it: it revokes its partitions and leaves the group.
            drop(consumer);
            let _ = closed.send(());
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not spawn a thread to leave the consumer group");
        return;
    }
    match tokio::time::timeout(timeout, is_closed).await {
        Ok(_) => tracing::info!("left the consumer group"),
        Err(_) => tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            "leaving the consumer group did not finish in time; the coordinator drops this member after the session timeout"
        ),
    }
}
